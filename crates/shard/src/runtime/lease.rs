//! The leader lease of a shard: the right to write it, with the epoch that fences a stale
//! leader. A term takes the lease at epoch + 1, written conditionally on the lease it read; a
//! lease another node holds is refused until it expires; the leader renews it with its batches.

use serde::{Deserialize, Serialize};

use ledger_domain::ShardId;
use ledger_store::{Expect, Store, WriteBatch};

use crate::engine::Engine;
use crate::{ReadError, codec, keys};

/// The lease record: value = epoch (u64 BE) then this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    pub node: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("shard {shard}: the lease is held by node {node} until {expires_at_ms}")]
    Held {
        shard: ShardId,
        node: String,
        expires_at_ms: u64,
    },
    #[error("shard {shard}: lost a race for the lease; retry")]
    Raced { shard: ShardId },
    #[error(transparent)]
    Read(#[from] ReadError),
}

pub(super) fn encode_lease(lease: &Lease) -> Vec<u8> {
    let mut out = codec::version_prefix(lease.epoch);
    out.extend_from_slice(&codec::encode(lease));
    out
}

pub(crate) fn decode_lease(bytes: &[u8]) -> Result<Lease, ReadError> {
    let body = bytes.get(8..).ok_or_else(|| codec::DecodeError {
        what: "lease",
        reason: "shorter than its header".into(),
    })?;
    Ok(codec::decode("lease", body)?)
}

/// Takes the shard's lease with a new epoch. A lease held by another node and not yet expired
/// is refused; our own node's lease (a restart) is taken over at once.
pub fn acquire_lease(
    store: &dyn Store,
    shard: ShardId,
    node: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<Lease, LeaseError> {
    acquire_lease_after(store, shard, node, now_ms, lease_ms, 0)
}

/// As [`acquire_lease`], but another node's lease is refused until `grace_ms` after it expired:
/// a node that is not the shard's preferred leader (the map's owner) leaves the owner the
/// first chance to take it back.
pub fn acquire_lease_after(
    store: &dyn Store,
    shard: ShardId,
    node: &str,
    now_ms: u64,
    lease_ms: u64,
    grace_ms: u64,
) -> Result<Lease, LeaseError> {
    let key = keys::lease(shard);
    let current = store.get(&key).map_err(ReadError::from)?;
    let mut batch = WriteBatch::default();
    let epoch = match &current {
        None => {
            batch.expect(key.clone(), Expect::Absent);
            1
        }
        Some(bytes) => {
            let lease = decode_lease(bytes)?;
            if lease.node != node && lease.expires_at_ms.saturating_add(grace_ms) > now_ms {
                return Err(LeaseError::Held {
                    shard,
                    node: lease.node,
                    expires_at_ms: lease.expires_at_ms,
                });
            }
            batch.expect(key.clone(), Expect::Equals(bytes.clone()));
            lease.epoch + 1
        }
    };
    let lease = Lease {
        epoch,
        node: node.to_string(),
        expires_at_ms: now_ms + lease_ms,
    };
    batch.put(key, encode_lease(&lease));
    store
        .commit(&batch)
        .map_err(|_| LeaseError::Raced { shard })?;
    Ok(lease)
}

/// Gives up the lease of a stopping leader at `epoch`: it expires at once, so another node of
/// the region takes the shard without waiting for it to lapse. Written only if the lease is
/// still this term's (a newer leader's is left alone); whether it was.
pub fn release(store: &dyn Store, shard: ShardId, node: &str, epoch: u64) -> bool {
    let lease = Lease {
        epoch,
        node: node.to_string(),
        expires_at_ms: 0,
    };
    let mut batch = WriteBatch::default();
    batch.expect(
        keys::lease(shard),
        Expect::Prefix(codec::version_prefix(epoch)),
    );
    batch.put(keys::lease(shard), encode_lease(&lease));
    // Refused: another node took the lease already (or the store failed: it lapses).
    store.commit(&batch).is_ok()
}

/// Adds to `writes` the renewal of `engine`'s lease by `node` until `now_ms + lease_ms`,
/// expected at the engine's epoch, with the count of recorded transfer ids (which sizes the
/// next term's first filter).
pub fn renew(
    writes: &mut WriteBatch,
    shard: ShardId,
    node: &str,
    engine: &Engine,
    now_ms: u64,
    lease_ms: u64,
) {
    let lease = Lease {
        epoch: engine.epoch(),
        node: node.to_string(),
        expires_at_ms: now_ms + lease_ms,
    };
    writes.expect(
        keys::lease(shard),
        Expect::Prefix(codec::version_prefix(engine.epoch())),
    );
    writes.put(keys::lease(shard), encode_lease(&lease));
    writes.put(
        keys::id_count(shard),
        engine.ids_recorded().to_be_bytes().to_vec(),
    );
}

/// Whether the shard's lease is still at `epoch`: a batch that writes nothing has no commit to
/// be fenced by, so a leader checks this before it sends what such a batch says. A leader
/// deposed by another node (a shared store) that has not yet tried to commit still has its
/// memory, and what it would answer from it (a decision presumed, an acknowledgement of a
/// decision it holds nothing for) may contradict what the new leader made durable.
pub fn holds(store: &dyn Store, shard: ShardId, epoch: u64) -> Result<bool, ReadError> {
    let stored = store.get(&keys::lease(shard)).map_err(ReadError::from)?;
    holds_in(stored.as_deref(), epoch)
}

/// Whether the stored lease `value` is at `epoch`.
pub fn holds_in(value: Option<&[u8]>, epoch: u64) -> Result<bool, ReadError> {
    let Some(bytes) = value else {
        return Ok(false);
    };
    Ok(decode_lease(bytes)?.epoch == epoch)
}
