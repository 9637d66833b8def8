//! A leader term's start: take the lease, then load what the shard holds (accounts, holds,
//! coordinator and prepared records, the count of recorded transfer ids) and build the engine
//! from it. Prepared legs take their locks again; coordinations resume (undecided ones are
//! aborted: presumed abort).

use std::sync::Arc;

use ledger_domain::{HoldStatus, ShardId};
use ledger_store::Store;

use super::lease::{LeaseError, acquire_lease_after};
use crate::directory::Directory;
use crate::engine::{CoordRecord, Engine, Locate, PreparedRecord, Recovered};
use crate::quota::{Allowance, QuotaRecord, Settlement};
use crate::{Clock, Options, ReadError, codec, keys};

/// Loads what a new leader needs from the store.
pub fn load(store: &dyn Store, shard: ShardId) -> Result<Recovered, ReadError> {
    let scan = |(s, e): (Vec<u8>, Vec<u8>)| store.scan(&s, &e, usize::MAX);
    let accounts = crate::read::all_accounts(store, shard)?;
    let mut holds = Vec::new();
    for (k, v) in scan(keys::holds(shard))? {
        let (_, id) = key_tail_str(&k)?;
        holds.push((id, codec::decode::<HoldStatus>("hold", &v)?));
    }
    let coordinations = scan(keys::coord_all(shard))?
        .iter()
        .map(|(_, v)| CoordRecord::decode(v))
        .collect::<Result<_, _>>()?;
    let prepared = scan(keys::prepared_all(shard))?
        .iter()
        .map(|(_, v)| codec::decode::<PreparedRecord>("prepared record", v))
        .collect::<Result<_, _>>()?;
    // Only sizes the first filter: a damaged count is ignored, never a reason not to lead.
    let ids_recorded = match store.get(&keys::id_count(shard))? {
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_be_bytes)
            .unwrap_or_else(|_| {
                tracing::warn!(%shard, len = bytes.len(), "ignoring a damaged transfer id count");
                0
            }),
        None => 0,
    };
    let allowances = scan(keys::allowances(shard))?
        .iter()
        .map(|(_, v)| codec::decode::<Allowance>("allowance", v))
        .collect::<Result<_, _>>()?;
    let quota_records = scan(keys::quotas(shard))?
        .iter()
        .map(|(_, v)| codec::decode::<QuotaRecord>("quota record", v))
        .collect::<Result<_, _>>()?;
    let outbox = scan(keys::outbox_all(shard))?
        .iter()
        .map(|(_, v)| codec::decode::<Settlement>("settlement", v))
        .collect::<Result<_, _>>()?;
    Ok(Recovered {
        accounts,
        holds,
        coordinations,
        prepared,
        ids_recorded,
        allowances,
        quota_records,
        outbox,
    })
}

/// Keys are `S <u32> <kind u8> <string>`: returns the string.
fn key_tail_str(key: &[u8]) -> Result<((), String), ReadError> {
    ledger_store::key::read_str(key, 6)
        .map(|(s, _)| ((), s))
        .ok_or_else(|| {
            ReadError::Decode(codec::DecodeError {
                what: "key",
                reason: format!("{key:?}"),
            })
        })
}

/// What a term's start needs, moved to the blocking pool (it reads the whole shard).
pub(super) struct TermStart {
    pub(super) shard: ShardId,
    pub(super) node: String,
    pub(super) options: Options,
    pub(super) store: Arc<dyn Store>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) locate: Locate,
    /// How long after another node's lease lapsed this node may take it.
    pub(super) grace_ms: u64,
    /// With a shared store: the node's directory, which reads the shard's forward records once
    /// the lease is taken.
    pub(super) directory: Option<Arc<Directory>>,
}

impl TermStart {
    /// Takes the lease and loads the shard, in a `shard.recover` span: the recovery spans of
    /// the coordinations and prepared legs it resumes link to it.
    /// Returns the engine and when the lease it took expires.
    pub(super) fn begin(self) -> Result<(Engine, u64), LeaseError> {
        let span = tracing::info_span!(
            "shard.recover",
            shard = self.shard.0,
            epoch = tracing::field::Empty,
            accounts = tracing::field::Empty,
            coordinations = tracing::field::Empty,
            prepared = tracing::field::Empty,
        );
        let _recover = span.enter();
        let now = self.clock.now_ms();
        let lease = acquire_lease_after(
            &*self.store,
            self.shard,
            &self.node,
            now,
            self.options.lease_ms,
            self.grace_ms,
        )?;
        let recovered = load(&*self.store, self.shard)?;
        if let Some(directory) = &self.directory {
            directory.lead(&*self.store, self.shard)?;
        }
        span.record("epoch", lease.epoch);
        span.record("accounts", recovered.accounts.len());
        span.record("coordinations", recovered.coordinations.len());
        span.record("prepared", recovered.prepared.len());
        let engine = Engine::new(
            self.shard,
            lease.epoch,
            self.options,
            self.locate,
            recovered,
        );
        Ok((engine, lease.expires_at_ms))
    }
}
