//! Reads of committed state, straight from the store: balances, statements and transfers.
//! Everything here has been made durable by a leader, so a read never shows an unacknowledged
//! change. They bypass the leader's queue, so reads do not slow down writes.

use ledger_domain::{Account, Entry, HoldStatus, ShardId, TransferRecord};
use ledger_store::Store;

use crate::{ReadError, codec, keys};

pub fn account(store: &dyn Store, shard: ShardId, id: &str) -> Result<Option<Account>, ReadError> {
    match store.get(&keys::account(shard, id))? {
        Some(bytes) => Ok(Some(codec::decode_account(&bytes)?)),
        None => Ok(None),
    }
}

/// A transfer id's recorded outcome, with its hold's status if it is a committed hold.
pub fn transfer(
    store: &dyn Store,
    shard: ShardId,
    id: &str,
) -> Result<Option<(TransferRecord, Option<HoldStatus>)>, ReadError> {
    let Some(bytes) = store.get(&keys::transfer(shard, id))? else {
        return Ok(None);
    };
    let record: TransferRecord = codec::decode("transfer", &bytes)?;
    Ok(Some((record, hold(store, shard, id)?)))
}

pub fn hold(
    store: &dyn Store,
    shard: ShardId,
    pending_id: &str,
) -> Result<Option<HoldStatus>, ReadError> {
    match store.get(&keys::hold(shard, pending_id))? {
        Some(bytes) => Ok(Some(codec::decode("hold", &bytes)?)),
        None => Ok(None),
    }
}

/// Up to `limit` entries of an account with version >= `from_version`, oldest first.
pub fn entries(
    store: &dyn Store,
    shard: ShardId,
    account_id: &str,
    from_version: u64,
    limit: usize,
) -> Result<Vec<Entry>, ReadError> {
    let (start, end) = keys::entries(shard, account_id, from_version);
    store
        .scan(&start, &end, limit)?
        .into_iter()
        .map(|(_, v)| codec::decode::<Entry>("entry", &v).map_err(ReadError::from))
        .collect()
}

/// The shard's lease: who leads it, under which epoch, until when.
pub fn lease(
    store: &dyn Store,
    shard: ShardId,
) -> Result<Option<crate::runtime::Lease>, ReadError> {
    store
        .get(&keys::lease(shard))?
        .map(|bytes| crate::runtime::lease::decode_lease(&bytes))
        .transpose()
}

/// Prepared records and coordinator log records still present (after recovery both should
/// drain to none).
pub fn in_flight(store: &dyn Store, shard: ShardId) -> Result<(usize, usize), ReadError> {
    let (s, e) = keys::prepared_all(shard);
    let prepared = store.scan(&s, &e, usize::MAX)?.len();
    let (s, e) = keys::coord_all(shard);
    let coordinating = store.scan(&s, &e, usize::MAX)?.len();
    Ok((prepared, coordinating))
}

/// Every account of a shard (checkers and tools; the leader loads them the same way).
pub fn all_accounts(store: &dyn Store, shard: ShardId) -> Result<Vec<Account>, ReadError> {
    let (s, e) = keys::accounts(shard);
    store
        .scan(&s, &e, usize::MAX)?
        .into_iter()
        .map(|(_, v)| codec::decode_account(&v).map_err(ReadError::from))
        .collect()
}
