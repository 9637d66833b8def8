//! [`FdbStore`]: one shard's [`Store`] in a FoundationDB cluster (docs/design/0005-foundationdb.md).
//! Reads are snapshot reads in one transaction each (a batch's fetch: every key at once);
//! a commit is one transaction that reads its preconditions (conflict ranges), checks them,
//! writes, and commits, retried by FoundationDB's own backoff up to the retry limit and within
//! the timeout set on the database.

use std::path::PathBuf;
use std::sync::Arc;

use foundationdb::options::{DatabaseOption, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector, RangeOption, Transaction};
use futures::future::try_join_all;

use ledger_store::{
    CommitError, CommitFuture, Error, Expect, Pairs, ReadFuture, Store, Write, WriteBatch,
};

use crate::keys::ShardSpace;

/// FoundationDB's limits on one transaction (its documentation: 10 MB of writes, keys of
/// 10 KB, values of 100 KB), kept with a margin.
pub const TRANSACTION_BYTES_MAX: usize = 9_000_000;
pub const KEY_BYTES_MAX: usize = 10_000;
pub const VALUE_BYTES_MAX: usize = 100_000;
/// Pairs one range read asks for at a time.
pub const SCAN_PAGE: usize = 1_024;

/// How a node reaches its region's FoundationDB cluster.
#[derive(Clone, Debug)]
pub struct FdbOptions {
    /// The cluster file of the region's FoundationDB cluster.
    pub cluster_file: PathBuf,
    /// The subspace of this ledger in that cluster (several ledgers may share one).
    pub cluster_name: String,
    /// Each transaction's timeout and retry limit (FoundationDB's own retry loop).
    pub timeout_ms: i32,
    pub retry_limit: i32,
}

/// The FoundationDB client's network thread: started once per process, stopped when dropped
/// (after every store is).
pub struct Network(#[allow(dead_code)] foundationdb::api::NetworkAutoStop);

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Network")
    }
}

impl Network {
    /// Starts the client's network thread. Call once per process, and keep the value until
    /// every [`FdbStore`] is dropped.
    #[allow(unsafe_code)]
    pub fn start() -> Network {
        // SAFETY: `boot` must run once per process and its guard must outlive every use of
        // the client; `Network` is that guard, and `ledgerd` makes one at start and drops it
        // after its leaders have stopped.
        Network(unsafe { foundationdb::boot() })
    }
}

/// Opens the region's cluster with the transaction timeout and retry limit set.
pub fn open_database(options: &FdbOptions) -> Result<Arc<Database>, Error> {
    let path = options.cluster_file.display().to_string();
    let opened = |e: FdbError| Error::Open {
        path: path.clone(),
        source: Box::new(e),
    };
    let db = Database::from_path(&path).map_err(opened)?;
    db.set_option(DatabaseOption::TransactionTimeout(options.timeout_ms))
        .map_err(opened)?;
    db.set_option(DatabaseOption::TransactionRetryLimit(options.retry_limit))
        .map_err(opened)?;
    Ok(Arc::new(db))
}

/// One shard of the ledger in a FoundationDB cluster.
pub struct FdbStore {
    db: Arc<Database>,
    space: ShardSpace,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("space", &self.space)
            .finish_non_exhaustive()
    }
}

fn io(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Io(Box::new(e))
}

impl FdbStore {
    pub fn new(db: Arc<Database>, cluster_name: &str, shard: u32) -> Self {
        Self {
            db,
            space: ShardSpace::new(cluster_name, shard),
        }
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let packed: Vec<Vec<u8>> = keys.iter().map(|k| self.space.key(k)).collect();
        let mut trx = self.db.create_trx().map_err(io)?;
        loop {
            let reads = try_join_all(packed.iter().map(|k| trx.get(k, true))).await;
            match reads {
                Ok(values) => {
                    return Ok(values.into_iter().map(|v| v.map(|s| s.to_vec())).collect());
                }
                Err(e) => trx = trx.on_error(e).await.map_err(io)?,
            }
        }
    }

    /// A scan in pages of at most [`SCAN_PAGE`] pairs, each in a transaction of its own, so a
    /// long scan (a new leader loading its shard) never meets FoundationDB's 5 s limit on one
    /// transaction. Pages read at different versions: scans serve a leader's own shard (no
    /// one else writes it) and reads of committed state.
    async fn scan_async(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error> {
        let (mut from, fdb_end) = self.space.range_of(start, end);
        let mut out = Vec::new();
        while out.len() < limit {
            let option = RangeOption {
                begin: KeySelector::first_greater_or_equal(from.clone()),
                end: KeySelector::first_greater_or_equal(fdb_end.clone()),
                limit: Some((limit - out.len()).min(SCAN_PAGE)),
                mode: StreamingMode::WantAll,
                ..RangeOption::default()
            };
            let mut trx = self.db.create_trx().map_err(io)?;
            let page = loop {
                match trx.get_range(&option, 1, true).await {
                    Ok(page) => break page,
                    Err(e) => trx = trx.on_error(e).await.map_err(io)?,
                }
            };
            let Some(last) = page.last().map(|kv| kv.key().to_vec()) else {
                break;
            };
            for kv in page.iter() {
                out.push((
                    self.space.decode(kv.key()).map_err(io)?,
                    kv.value().to_vec(),
                ));
            }
            if !page.more() {
                break;
            }
            // The next page starts just after the last key read.
            from = last;
            from.push(0);
        }
        Ok(out)
    }

    /// Refuses a batch FoundationDB would refuse, before it is sent.
    fn check_limits(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        let too_big = |what: String| Err(CommitError::NotCommitted(what.into()));
        if batch.size_bytes() > TRANSACTION_BYTES_MAX {
            return too_big(format!(
                "the batch writes {} bytes; a FoundationDB transaction takes at most {TRANSACTION_BYTES_MAX}",
                batch.size_bytes()
            ));
        }
        for write in &batch.writes {
            let (key, value) = match write {
                Write::Put(k, v) => (k, Some(v)),
                Write::Delete(k) => (k, None),
            };
            if self.space.key(key).len() > KEY_BYTES_MAX {
                return too_big(format!(
                    "a key of {} bytes (at most {KEY_BYTES_MAX})",
                    key.len()
                ));
            }
            if value.is_some_and(|v| v.len() > VALUE_BYTES_MAX) {
                return too_big(format!("a value of more than {VALUE_BYTES_MAX} bytes"));
            }
        }
        Ok(())
    }

    /// One transaction: read the preconditions (conflict ranges), check them, write, commit.
    /// A retry after a commit whose outcome is unknown that finds a precondition broken
    /// reports the outcome unknown, not a conflict: the first try may have committed (and
    /// moved the versions the preconditions expect).
    async fn commit_batch(&self, batch: WriteBatch) -> Result<(), CommitError> {
        self.check_limits(&batch)?;
        let failed = |maybe_committed: bool, e: FdbError| {
            if maybe_committed {
                CommitError::Unknown(Box::new(e))
            } else {
                CommitError::NotCommitted(Box::new(e))
            }
        };
        let keys: Vec<Vec<u8>> = batch
            .preconditions
            .iter()
            .map(|(k, _)| self.space.key(k))
            .collect();
        let mut maybe_committed = false;
        let mut trx: Transaction = self.db.create_trx().map_err(|e| failed(false, e))?;
        loop {
            let current = match try_join_all(keys.iter().map(|k| trx.get(k, false))).await {
                Ok(current) => current,
                Err(e) => {
                    trx = trx
                        .on_error(e)
                        .await
                        .map_err(|e| failed(maybe_committed, e))?;
                    continue;
                }
            };
            for ((key, expect), value) in batch.preconditions.iter().zip(&current) {
                if !holds(expect, value.as_deref()) {
                    if maybe_committed {
                        return Err(CommitError::Unknown(
                            format!("an earlier try may have committed; precondition on {key:?} no longer holds").into(),
                        ));
                    }
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
            for write in &batch.writes {
                match write {
                    Write::Put(k, v) => trx.set(&self.space.key(k), v),
                    Write::Delete(k) => trx.clear(&self.space.key(k)),
                }
            }
            match trx.commit().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    maybe_committed |= e.is_maybe_committed();
                    trx = e.on_error().await.map_err(|e| failed(maybe_committed, e))?;
                }
            }
        }
    }
}

fn holds(expect: &Expect, current: Option<&[u8]>) -> bool {
    expect.holds(current)
}

impl Store for FdbStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let keys = [key.to_vec()];
        let mut values = futures::executor::block_on(self.get_many(&keys))?;
        Ok(values.pop().flatten())
    }

    fn get_many_async(&self, keys: Vec<Vec<u8>>) -> ReadFuture<'_> {
        Box::pin(async move { self.get_many(&keys).await })
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error> {
        futures::executor::block_on(self.scan_async(start, end, limit))
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        futures::executor::block_on(self.commit_batch(batch.clone()))
    }

    fn commit_owned(&self, batch: WriteBatch) -> Result<(), CommitError> {
        futures::executor::block_on(self.commit_batch(batch))
    }

    fn commit_async(&self, batch: WriteBatch) -> CommitFuture<'_> {
        Box::pin(self.commit_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "fdb"
    }
}
