#![no_main]
//! `cargo +nightly fuzz run stored_record`: see `ledger_tests::fuzz::stored_record`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ledger_tests::fuzz::stored_record(data));
