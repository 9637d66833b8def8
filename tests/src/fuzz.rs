//! What fuzzing feeds arbitrary bytes to: every decoder that reads what another party wrote.
//! Each function returns, never panics, whatever its input; what decodes must also convert
//! back the same way (a panic says it does not). The cargo-fuzz targets (`fuzz/`) and the
//! proptest runs in CI (`tests/tests/decoders.rs`) call these same functions.

use prost::Message as _;

use ledger_domain::{HoldStatus, TransferRecord};
use ledger_proto::ledger::internal::v1 as ipb;
use ledger_proto::{self as wire, pb};
use ledger_shard::codec;
use ledger_shard::directory::Forward;
use ledger_shard::engine::{CoordRecord, PreparedRecord};
use ledger_shard::protocol::Message;

/// The public requests: protobuf, then the conversion to the domain and its validation.
pub fn public_request(data: &[u8]) {
    if let Ok(t) = pb::Transfer::decode(data)
        && let Ok(transfer) = wire::transfer(t)
        && transfer.validate().is_ok()
    {
        // A valid request survives the way back to the wire and in again.
        let again = wire::transfer(wire::transfer_to_wire(&transfer)).expect("converts back");
        assert_eq!(again, transfer);
    }
    if let Ok(a) = pb::Account::decode(data)
        && let Ok(account) = wire::new_account(a)
    {
        let _ = account.normalize();
    }
    let _ = pb::CreateTransfersRequest::decode(data);
}

/// Every stored record kind and format.
pub fn stored_record(data: &[u8]) {
    let _ = codec::decode::<TransferRecord>("transfer", data);
    let _ = codec::decode::<HoldStatus>("hold", data);
    let _ = codec::decode::<PreparedRecord>("prepared record", data);
    let _ = codec::decode_account(data);
    let _ = CoordRecord::decode(data);
    if let Ok(forward) = Forward::decode(data)
        && forward.home.is_some()
    {
        assert_eq!(
            Forward::decode(&forward.encode()).expect("reads back"),
            forward
        );
    }
}

/// The node-to-node shard messages, alone and in a `Deliver` batch.
pub fn shard_message(data: &[u8]) {
    if let Ok(message) = ipb::ShardMessage::decode(data)
        && let Ok(decoded) = Message::try_from(message)
    {
        // What decodes encodes back to the same message.
        let again = Message::try_from(ipb::ShardMessage::from(&decoded)).expect("converts back");
        assert_eq!(again, decoded);
    }
    if let Ok(request) = ipb::DeliverRequest::decode(data) {
        for envelope in request.messages {
            if let Some(message) = envelope.message {
                let _ = Message::try_from(message);
            }
        }
    }
}

/// The store's key codec on bytes that are no key: reads at any offset answer or refuse, and
/// the end of a prefix sorts after it.
pub fn store_key(data: &[u8], at: usize) {
    let _ = ledger_store::key::read_str(data, at);
    let _ = ledger_store::key::read_u64(data, at);
    let end = ledger_store::key::prefix_end(data);
    assert!(data.is_empty() || data.iter().all(|b| *b == 0xff) || end.as_slice() > data);
}
