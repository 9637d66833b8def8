#![no_main]
//! `cargo +nightly fuzz run public_request`: see `ledger_tests::fuzz::public_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ledger_tests::fuzz::public_request(data));
