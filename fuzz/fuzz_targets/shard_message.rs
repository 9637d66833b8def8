#![no_main]
//! `cargo +nightly fuzz run shard_message`: see `ledger_tests::fuzz::shard_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ledger_tests::fuzz::shard_message(data));
