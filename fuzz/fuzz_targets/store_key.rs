#![no_main]
//! `cargo +nightly fuzz run store_key`: see `ledger_tests::fuzz::store_key` (the first byte
//! picks the offset it reads at).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((at, rest)) = data.split_first() {
        ledger_tests::fuzz::store_key(rest, usize::from(*at));
    }
});
