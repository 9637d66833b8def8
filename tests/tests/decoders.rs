//! Fuzzing by proptest: arbitrary bytes through every decoder that reads what another party
//! wrote: the public requests (protobuf, then the wire-to-domain conversion and validation),
//! the stored records (every record kind and format), the node-to-node shard messages, and the
//! store's key codec. Each must answer (a value or an error) and never panic; what decodes must
//! convert back the same way. The bodies are `ledger_tests::fuzz`, which the cargo-fuzz
//! targets in `fuzz/` run too (they need a nightly toolchain; these run in CI on stable).

use proptest::prelude::*;

use ledger_tests::fuzz;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

/// Bytes that start like a stored record (a known format byte) more often than chance would.
fn record_bytes() -> impl Strategy<Value = Vec<u8>> {
    (0u8..4, bytes()).prop_map(|(format, mut rest)| {
        rest.insert(0, format);
        rest
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn public_requests_decode_convert_and_validate_without_panicking(data in bytes()) {
        fuzz::public_request(&data);
    }

    #[test]
    fn stored_records_decode_without_panicking(data in record_bytes()) {
        fuzz::stored_record(&data);
    }

    #[test]
    fn shard_messages_decode_without_panicking(data in bytes()) {
        fuzz::shard_message(&data);
    }

    #[test]
    fn store_keys_read_back_and_garbage_is_refused_without_panicking(
        data in bytes(),
        at in 0usize..600,
        id in "[A-Za-z0-9._:@/-]{1,64}",
        // A string's terminator followed by a 0xFF byte reads as an escaped 0x00 (see
        // `ledger_store::key`): the numbers the ledger writes after a string (entry versions)
        // stay below 2^56, so their first byte is 0x00. Found by this test.
        n in 0u64..(1 << 56),
    ) {
        fuzz::store_key(&data, at);
        let key = ledger_store::key::Key::new().u8(3).str(&id).u64(n).into_bytes();
        let (read, next) = ledger_store::key::read_str(&key, 1).expect("a key written reads back");
        prop_assert_eq!(read, id);
        prop_assert_eq!(ledger_store::key::read_u64(&key, next), Some(n));
    }
}
