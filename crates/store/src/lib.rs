//! Storage: one [`Store`] trait for ordered key-value transactions with conditional commits,
//! and its backends. This crate offers:
//!
//! - [`Store`], [`WriteBatch`] and [`Expect`]: reads (point, many at once, ranges, keys only)
//!   and atomic commits with preconditions, blocking or as a future.
//! - [`Embedded`] (redb): the default. Durable: `commit` returns only after the data is synced
//!   to disk, so anything acknowledged after a commit survives `kill -9` and power loss. Its
//!   parts (write-ahead log, in-memory overlay, packed entry groups, coalesced page writes)
//!   are private to [`embedded`]; [`open_shards`] opens one store per shard over one log.
//! - [`Memory`]: tests and simulation only; nothing survives the process.
//! - [`key`]: the order-preserving key encoding callers build their key layouts with.
//! - [`conformance`]: one test suite every backend must pass.
//!
//! Every commit carries preconditions ([`Expect`]): the shard leader makes each batch
//! conditional on its lease epoch still being current and on the account versions it read.
//! A precondition that does not hold fails the whole commit with [`CommitError::Conflict`] and
//! writes nothing; that is how a stale leader is fenced (I5).

pub mod conformance;
pub mod embedded;
pub mod key;
mod memory;

use std::sync::Arc;

pub use embedded::{Embedded, GroupOf, Limits, open_shards, open_shards_of};
pub use memory::Memory;

/// What a key must hold for a commit to go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist and hold exactly these bytes.
    Equals(Vec<u8>),
    /// The key must exist and its value must start with these bytes (e.g. a version header).
    Prefix(Vec<u8>),
}

impl Expect {
    /// Whether a key's current value (`None`: absent) satisfies this precondition. Backends
    /// that check preconditions themselves (FoundationDB) use it.
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match (self, current) {
            (Expect::Absent, None) => true,
            (Expect::Equals(want), Some(have)) => want.as_slice() == have,
            (Expect::Prefix(want), Some(have)) => have.starts_with(want),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// One atomic transaction: all preconditions are checked, then all writes applied, or nothing.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub preconditions: Vec<(Vec<u8>, Expect)>,
    pub writes: Vec<Write>,
}

impl WriteBatch {
    pub fn expect(&mut self, key: Vec<u8>, expect: Expect) {
        self.preconditions.push((key, expect));
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.push(Write::Put(key, value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.push(Write::Delete(key));
    }

    pub fn is_empty(&self) -> bool {
        self.preconditions.is_empty() && self.writes.is_empty()
    }

    /// Bytes written, for metrics and batch limits.
    pub fn size_bytes(&self) -> usize {
        self.writes
            .iter()
            .map(|w| match w {
                Write::Put(k, v) => k.len() + v.len(),
                Write::Delete(k) => k.len(),
            })
            .sum()
    }
}

/// What a storage engine or the OS said, kept as an error's source.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of opening a store and of reads. Each variant is a different reaction: fix the
/// setup ([`Error::InUse`], [`Error::Unopenable`], [`Error::Open`]), retry later
/// ([`Error::Io`]), or stop and call an operator ([`Error::Damaged`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another process has the store open. Stop it, or use another data directory.
    #[error(
        "cannot open the store at {path}: it is already open in another process (is another ledgerd running?)"
    )]
    InUse { path: String },
    /// What the store holds does not let it open as asked; it is left as it is.
    #[error("cannot open the store at {path}: {problem}")]
    Unopenable { path: String, problem: OpenProblem },
    /// The storage engine or the OS failed to open the store (not a database, unreadable, no
    /// room); the source says what.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Cause,
    },
    /// A read failed in the storage engine or the OS; nothing changed. It may succeed later.
    #[error("storage read failed: {0}")]
    Io(#[source] Cause),
    /// Stored bytes are damaged: the store needs an operator.
    #[error("the store is damaged: {what}: {why}")]
    Damaged { what: String, why: &'static str },
}

/// Why a store refuses to open although its files could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenProblem {
    /// It holds packed rows and was opened without the rule that reads them.
    #[error("it holds packed rows, and was opened without the rule that reads them")]
    PackedWithoutRule,
    /// The log skips commits: replaying it would lose some.
    #[error("the log jumps from commit {from} to {to}; refusing to guess")]
    LogGap { from: u64, to: u64 },
}

/// Why a commit did not go through. Each variant is a different reaction: step down and
/// reload ([`CommitError::Conflict`]), retry later ([`CommitError::NotCommitted`]), find out by
/// reading again ([`CommitError::Unknown`]), or restart ([`CommitError::Poisoned`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// A precondition did not hold; nothing was written. For a leader this means it was fenced
    /// (its epoch is no longer current) or its view of an account is stale: it must step down
    /// and reload.
    #[error("precondition failed on key {key:?}; nothing was written")]
    Conflict { key: Vec<u8> },
    /// The commit failed before it could take effect (its preconditions could not be read);
    /// nothing was written. It may succeed later.
    #[error("commit failed, nothing was written: {0}")]
    NotCommitted(#[source] Cause),
    /// A write the store never takes: a delete of a member of a packed group (a caller's bug).
    /// Nothing was written.
    #[error(
        "commit refused, nothing was written: key {key:?} is in a packed group, whose members are never deleted"
    )]
    DeletesPackedMember { key: Vec<u8> },
    /// An earlier commit failed after it was logged: the store takes no commit until a
    /// restart replays its log.
    #[error(
        "the store at {path} takes no more commits: an earlier commit failed after it was logged; restart to replay the log"
    )]
    Poisoned { path: String },
    /// The commit may or may not have taken effect (FoundationDB's commit_unknown_result, or an
    /// fsync error). Resolve by re-reading; retry transfers with the same ids.
    #[error("commit outcome unknown: {0}")]
    Unknown(#[source] Cause),
}

/// Ordered key-value storage with atomic conditional commits.
///
/// Reads see committed data only. Implementations are shared between threads; each shard
/// leader is the only writer of its own key range.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// Reads several keys, for an async caller: a shard leader fetches what its engine needs
    /// in one call per round. The values come in the order of `keys`. The default reads them
    /// one by one before the future is returned, which suits a backend whose reads do not wait
    /// on a network (embedded, memory); a remote backend overrides it with one round trip.
    fn get_many_async(&self, keys: Vec<Vec<u8>>) -> ReadFuture<'_> {
        Box::pin(std::future::ready(
            keys.iter().map(|key| self.get(key)).collect(),
        ))
    }

    /// Up to `limit` pairs with `start <= key < end`, ascending.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error>;

    /// Calls `f` with keys in `start <= key < end`, in no particular order, until it returns
    /// `false`: at least every key that holds a value both when the call begins and when it
    /// returns, perhaps keys written or deleted meanwhile, and perhaps a key more than once. For a caller that needs the
    /// keys only, and neither their order nor their values, such as a filter of recorded ids:
    /// a backend can skip copying values and sorting, and keep its writer waiting less. The
    /// default pages through [`Store::scan`].
    fn for_each_key(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), Error> {
        let mut from = start.to_vec();
        loop {
            let page = self.scan(&from, end, KEY_PAGE)?;
            for (key, _) in &page {
                if !f(key) {
                    return Ok(());
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == KEY_PAGE => {
                    // The next key after `last`.
                    from.clone_from(last);
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// Checks every precondition and applies every write atomically. When it returns `Ok`, the
    /// commit is durable (for durable backends).
    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError>;

    /// As [`Store::commit`], for a caller that is done with the batch: a backend that keeps the
    /// written bytes in memory takes them instead of copying them.
    fn commit_owned(&self, batch: WriteBatch) -> Result<(), CommitError> {
        self.commit(&batch)
    }

    /// As [`Store::commit_owned`], for an async caller: waiting for durability does not block
    /// its thread. The default runs the blocking commit inside the future, which suits a
    /// backend whose commit does not wait (memory); a durable backend overrides it.
    fn commit_async(&self, batch: WriteBatch) -> CommitFuture<'_> {
        Box::pin(std::future::ready(self.commit_owned(batch)))
    }

    /// A short name for logs ("embedded", "memory").
    fn kind(&self) -> &'static str;
}

pub type SharedStore = Arc<dyn Store>;

/// What [`Store::commit_async`] returns.
pub type CommitFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CommitError>> + Send + 'a>>;

/// What [`Store::get_many_async`] returns: one value per key, in order.
pub type ReadFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Option<Vec<u8>>>, Error>> + Send + 'a>,
>;

/// Key-value pairs from a scan, ascending by key.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Pairs per [`Store::scan`] in the default [`Store::for_each_key`]: bounds what one page holds
/// in memory (and, in a backend that locks per read, how long its writer waits).
pub const KEY_PAGE: usize = 1_024;
