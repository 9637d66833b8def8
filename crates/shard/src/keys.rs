//! The key layout of a shard. Every key starts with the shard's prefix, so shards can share one
//! keyspace (FoundationDB) or live in files of their own (embedded), and a shard's data is one
//! contiguous range.
//!
//! ```text
//! S <shard u32> 01                         lease (epoch first, so commits can expect it)
//! S <shard u32> 02 <account id>            account: version u64 BE, then the record
//! S <shard u32> 03 <account id> <version>  entry (statement line), never rewritten
//! S <shard u32> 04 <transfer id>           transfer record: the id's final outcome
//! S <shard u32> 05 <pending id>            hold status (mutable)
//! S <shard u32> 06 <attempt>               participant: prepared record (holds a lock)
//! S <shard u32> 07 <transfer id>           coordinator log record
//! S <shard u32> 08 <attempt>               participant: decision applied (dedupes replays)
//! S <shard u32> 09 <account id>            directory: account id homed on another shard
//! S <shard u32> 0A                         transfer ids recorded (u64 BE), as of the last
//!                                          lease renewal: sizes a new term's id filter
//! S <shard u32> 0B <account id> <region>   home: an allowance of a region (regional quotas)
//! S <shard u32> 0C <account id>            quota shard: its quota record of an account
//! S <shard u32> 0D <account id> <seq>      quota shard: a settlement in the outbox
//! ```

use ledger_domain::ShardId;
use ledger_store::key::{Key, prefix_end};

const LEASE: u8 = 0x01;
const ACCOUNT: u8 = 0x02;
const ENTRY: u8 = 0x03;
const TRANSFER: u8 = 0x04;
const HOLD: u8 = 0x05;
const PREPARED: u8 = 0x06;
const COORD: u8 = 0x07;
const DONE: u8 = 0x08;
const FORWARD: u8 = 0x09;
const ID_COUNT: u8 = 0x0A;
const ALLOWANCE: u8 = 0x0B;
const QUOTA: u8 = 0x0C;
const OUTBOX: u8 = 0x0D;

fn base(shard: ShardId, kind: u8) -> Key {
    Key::new().u8(b'S').u32(shard.0).u8(kind)
}

pub fn lease(shard: ShardId) -> Vec<u8> {
    base(shard, LEASE).into_bytes()
}

/// How many transfer ids the shard had recorded at its leader's last lease renewal (about:
/// its filter's inserts), so that a new term's filter starts at the size it will need.
pub fn id_count(shard: ShardId) -> Vec<u8> {
    base(shard, ID_COUNT).into_bytes()
}

pub fn account(shard: ShardId, id: &str) -> Vec<u8> {
    base(shard, ACCOUNT).str(id).into_bytes()
}

pub fn entry(shard: ShardId, account_id: &str, version: u64) -> Vec<u8> {
    base(shard, ENTRY).str(account_id).u64(version).into_bytes()
}

/// The packed-group rule of a shard's store (`ledger_store::embedded`, packed groups): an entry is written
/// once, and an account's entries in increasing version order, so an entry key's group is its
/// account (every byte but the version's eight). Account ids are terminated, so groups are
/// prefix-free.
pub fn entry_group(key: &[u8]) -> Option<usize> {
    const HEAD: usize = 6; // b'S', the shard, the kind
    (key.len() >= HEAD + 1 + 8 && key[0] == b'S' && key[5] == ENTRY).then(|| key.len() - 8)
}

pub fn transfer(shard: ShardId, id: &str) -> Vec<u8> {
    base(shard, TRANSFER).str(id).into_bytes()
}

pub fn hold(shard: ShardId, pending_id: &str) -> Vec<u8> {
    base(shard, HOLD).str(pending_id).into_bytes()
}

pub fn prepared(shard: ShardId, attempt: &str) -> Vec<u8> {
    base(shard, PREPARED).str(attempt).into_bytes()
}

pub fn coord(shard: ShardId, op: &str) -> Vec<u8> {
    base(shard, COORD).str(op).into_bytes()
}

pub fn done(shard: ShardId, attempt: &str) -> Vec<u8> {
    base(shard, DONE).str(attempt).into_bytes()
}

pub fn forward(shard: ShardId, account_id: &str) -> Vec<u8> {
    base(shard, FORWARD).str(account_id).into_bytes()
}

pub fn allowance(shard: ShardId, account_id: &str, region: &str) -> Vec<u8> {
    base(shard, ALLOWANCE)
        .str(account_id)
        .str(region)
        .into_bytes()
}

pub fn quota(shard: ShardId, account_id: &str) -> Vec<u8> {
    base(shard, QUOTA).str(account_id).into_bytes()
}

pub fn outbox(shard: ShardId, account_id: &str, seq: u64) -> Vec<u8> {
    base(shard, OUTBOX).str(account_id).u64(seq).into_bytes()
}

pub fn allowances(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, ALLOWANCE)
}

pub fn quotas(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, QUOTA)
}

pub fn outbox_all(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, OUTBOX)
}

/// `[start, end)` of every key of one kind in a shard.
fn range(shard: ShardId, kind: u8) -> (Vec<u8>, Vec<u8>) {
    let start = base(shard, kind).into_bytes();
    let end = prefix_end(&start);
    (start, end)
}

pub fn accounts(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, ACCOUNT)
}

pub fn transfers(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, TRANSFER)
}

pub fn holds(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, HOLD)
}

pub fn prepared_all(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, PREPARED)
}

pub fn coord_all(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, COORD)
}

pub fn forwards(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    range(shard, FORWARD)
}

/// Entries of one account from `from_version` on.
pub fn entries(shard: ShardId, account_id: &str, from_version: u64) -> (Vec<u8>, Vec<u8>) {
    let prefix = base(shard, ENTRY).str(account_id).into_bytes();
    let start = base(shard, ENTRY)
        .str(account_id)
        .u64(from_version)
        .into_bytes();
    (start, prefix_end(&prefix))
}
