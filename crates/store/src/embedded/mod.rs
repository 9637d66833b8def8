//! The embedded durable backend: redb (a copy-on-write B-tree in one file) behind the
//! write-ahead [`Log`], with an in-memory overlay of the commits since the last checkpoint.
//!
//! ```text
//!  commit(batch):  check preconditions against overlay, then redb
//!                  log.append(tag, seq, writes): synced, with other stores' records  <- durable
//!                  put the writes in the overlay (now visible)
//!  checkpoint:     every Limits::checkpoint_commits commits, or once the overlay holds
//!                  Limits::overlay_bytes, freeze the overlay and start a fresh one; a
//!                  checkpoint thread writes the frozen one into redb in one durable
//!                  transaction, packing members of groups into chunks (`packed`), (one
//!                  at a time: one that comes due while another runs
//!                  starts after it, and commits wait for it only once the overlay holds
//!                  1.5 times the limit); then the log may drop segments that every
//!                  store has made durable
//!  open:           replay this store's log records with seq > applied_seq, make durable
//! ```
//!
//! Why: a copy-on-write B-tree rewrites every leaf a commit touches. With scattered keys
//! (accounts, entries, transfer ids) a durable commit per batch wrote about 20 KiB per transfer
//! and made the disk's bandwidth the limit (docs/benchmarks.md). With the log, a batch costs
//! one small sequential write, shared with every other shard's batch in the same fsync. Even a
//! non-durable redb transaction per batch cost half of the node's CPU (callgrind, in
//! docs/benchmarks.md), so batches go to an ordered in-memory overlay instead and reach redb
//! together, sorted, once per checkpoint: a leaf is rewritten once per checkpoint, not once
//! per batch.
//!
//! Visibility: a commit becomes visible to readers only after its log record is synced, so a
//! reader never sees anything that a crash could take back. A failure after the record is
//! synced poisons the store: every later commit fails until the process restarts and replays
//! the log (a leader would otherwise reload state that lacks a durable commit).
//!
//! One commit at a time per store: its log order is its commit order, and each shard has one
//! writer (its leader) and its own file. The state's mutex is held to check preconditions and
//! to apply a synced commit, not while the log syncs: readers take it only to look at the
//! overlay. [`Store::commit_async`] waits for the sync as a future, so a leader running as an
//! async task never blocks its thread on an fsync.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Cause, CommitError, Error, OpenProblem, Store, Write, WriteBatch};
use coalesce::CoalescingFile;
use log::{Log, LogFailed};
use overlay::{ENTRY_OVERHEAD_BYTES, Overlay, OverlayKey};
pub use packed::{CHUNK_BYTES_MAX, GroupOf, MEMBERS_MAX};
use packed::{PACKED, Packer};

mod coalesce;
mod log;
mod overlay;
mod packed;

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// The log position redb has applied (in the same transaction as the writes).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED_SEQ: &str = "applied_seq";

/// A durable redb commit (a checkpoint) at least every this many commits (unless
/// [`Limits::checkpoint_commits`] says otherwise). Small calls make commits of one transfer
/// each: at 512, 16 shards checkpointed many times a second, a redb transaction and a thread
/// each, for a few hundred KiB (docs/benchmarks.md); the overlay's byte limit is what bounds
/// memory and replay.
pub const CHECKPOINT_COMMITS: u64 = 8192;
/// ... or as soon as the overlay's entries take this many bytes (keys, values and each entry's
/// headers, [`ENTRY_OVERHEAD_BYTES`]; per store, unless
/// [`Limits::overlay_bytes`] says otherwise; a node splits its budget between its shards).
/// Bigger overlays make checkpoints cheaper per write: a leaf is copied once per checkpoint
/// however many of its keys change (docs/benchmarks.md).
pub const OVERLAY_BYTES_DEFAULT: usize = 8 << 20;

/// Memory limits of one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// redb's page cache.
    pub cache_bytes: usize,
    /// Bytes the overlay's entries take (keys, values, headers) before a checkpoint is due. A
    /// checkpoint that comes due while the previous one still runs starts after it; commits
    /// wait for it only once the overlay holds 1.5 times this (backpressure). A store holds at
    /// most that plus the frozen overlay being written.
    pub overlay_bytes: usize,
    /// Commits in the overlay before a checkpoint is due, however few bytes they hold.
    pub checkpoint_commits: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cache_bytes: Embedded::CACHE_BYTES_DEFAULT,
            overlay_bytes: OVERLAY_BYTES_DEFAULT,
            checkpoint_commits: CHECKPOINT_COMMITS,
        }
    }
}

impl Limits {
    fn overlay_bytes_hard(&self) -> usize {
        self.overlay_bytes + self.overlay_bytes / 2
    }
}

pub struct Embedded {
    db: Arc<Database>,
    limits: Limits,
    /// Which keys checkpoints pack into chunks (see [`packed`]); `None` packs nothing.
    group_of: Option<GroupOf>,
    path: String,
    tag: u32,
    log: Arc<Log>,
    state: Mutex<State>,
    /// Signalled when a commit in flight finishes.
    idle: Condvar,
}

struct State {
    /// The last commit's sequence number (this store's numbering in the log).
    seq: u64,
    commits_since_checkpoint: u64,
    poisoned: bool,
    /// A commit's record is in the log and its writes not yet in the overlay.
    in_flight: bool,
    /// Threads waiting on `idle` for the commit in flight. A shard has one writer, so almost
    /// always none: the commit that ends is then signalled to nobody, and no system call is
    /// made (std's `Condvar` makes one for every notify, waiter or not: one per commit).
    idle_waiters: usize,
    /// Logged (durable) writes not yet in redb: key -> value, or `None` for a delete.
    overlay: Overlay,
    overlay_bytes: usize,
    /// The previous overlay, being written into redb by a checkpoint thread. Readers look at
    /// `overlay`, then here, then redb.
    frozen: Option<Frozen>,
    /// A read snapshot of redb reused by point reads (a read transaction per read costs more
    /// than the lookup). Valid while every commit it lacks is still in `overlay` or `frozen`:
    /// dropped whenever a checkpoint's overlay is let go.
    snapshot: Option<Snapshot>,
}

/// redb's tables as of one read transaction.
struct Snapshot {
    kv: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    packed: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl Snapshot {
    fn open(db: &Database) -> Result<Self, Error> {
        let txn = db.begin_read().map_err(io)?;
        Ok(Self {
            kv: txn.open_table(KV).map_err(io)?,
            packed: txn.open_table(PACKED).map_err(io)?,
        })
    }
}

struct Frozen {
    overlay: Arc<Overlay>,
    /// The last commit it holds.
    seq: u64,
    thread: std::thread::JoinHandle<Result<(), Cause>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.path)
            .field("tag", &self.tag)
            .finish()
    }
}

/// Opens the stores of a node's data directory: `shard-NNNN.redb` for `0..count`, sharing the
/// log in `log/` (one fsync for all shards' commits). Checkpoints pack the keys `group_of`
/// places in groups (see [`packed`]).
pub fn open_shards(
    dir: &Path,
    count: u32,
    limits_each: Limits,
    group_of: Option<GroupOf>,
) -> Result<Vec<Embedded>, Error> {
    let all: Vec<u32> = (0..count).collect();
    open_shards_of(dir, &all, limits_each, group_of)
}

/// As [`open_shards`], for some shards only (those a node of a cluster leads); the stores are
/// in the order of `shards`.
pub fn open_shards_of(
    dir: &Path,
    shards: &[u32],
    limits_each: Limits,
    group_of: Option<GroupOf>,
) -> Result<Vec<Embedded>, Error> {
    let log_dir = dir.join("log");
    let log = Log::open(&log_dir).map_err(|e| Error::Open {
        path: log_dir.display().to_string(),
        source: e.into(),
    })?;
    let log = Arc::new(log);
    shards
        .iter()
        .map(|&shard| {
            let path = dir.join(format!("shard-{shard:04}.redb"));
            Embedded::open_in_log(&path, limits_each, Arc::clone(&log), shard, group_of)
        })
        .collect()
}

impl Embedded {
    /// Page cache of a database opened with [`Embedded::open`].
    pub const CACHE_BYTES_DEFAULT: usize = 64 << 20;

    /// Opens (or creates) a database file with a log of its own (`<file>.log/`). Fails with
    /// [`Error::Open`] if another process has it open or the file is not a redb database.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with_cache(path, Self::CACHE_BYTES_DEFAULT)
    }

    /// As [`Embedded::open`], with a page cache of at most `cache_bytes` (redb's own default is
    /// 1 GiB per file, too much with one file per shard).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, Error> {
        let limits = Limits {
            cache_bytes,
            ..Limits::default()
        };
        Self::open_with_limits(path, limits)
    }

    /// As [`Embedded::open`], with the given limits.
    pub fn open_with_limits(path: &Path, limits: Limits) -> Result<Self, Error> {
        let log_dir = PathBuf::from(format!("{}.log", path.display()));
        let log = Log::open(&log_dir).map_err(|e| Error::Open {
            path: log_dir.display().to_string(),
            source: e.into(),
        })?;
        Self::open_in_log(path, limits, Arc::new(log), 0, None)
    }

    /// Opens a database file whose commits go to `log` under `tag`, replaying the log first.
    /// Checkpoints pack the keys `group_of` places in groups (see [`packed`]).
    pub fn open_in_log(
        path: &Path,
        limits: Limits,
        log: Arc<Log>,
        tag: u32,
        group_of: Option<GroupOf>,
    ) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let open_err = |e: redb::Error| Error::Open {
            path: shown.clone(),
            source: e.into(),
        };
        let refuse = |problem| Error::Unopenable {
            path: shown.clone(),
            problem,
        };
        // Written through a backend that merges the pages of a checkpoint into fewer writes
        // (`coalesce`).
        let db = CoalescingFile::open(path)
            .and_then(|backend| {
                redb::Builder::new()
                    .set_cache_size(limits.cache_bytes)
                    .create_with_backend(backend)
            })
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::InUse {
                    path: shown.clone(),
                },
                other => open_err(other.into()),
            })?;
        // Create the tables up front so readers never meet a missing table.
        let (packed_rows, applied) = (|| -> Result<(bool, u64), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(KV)?;
            let packed_rows = txn.open_table(PACKED)?.first()?.is_some();
            let applied = txn
                .open_table(META)?
                .get(APPLIED_SEQ)?
                .map_or(0, |v| v.value());
            txn.commit()?;
            Ok((packed_rows, applied))
        })()
        .map_err(open_err)?;
        if packed_rows && group_of.is_none() {
            return Err(refuse(OpenProblem::PackedWithoutRule));
        }

        // Replay: the records past the checkpoint, in order, written as one checkpoint.
        let mut seq = applied;
        let mut replayed = Overlay::new();
        for (record_seq, writes) in log.take_recovered(tag) {
            if record_seq <= applied {
                continue; // Already in the last durable checkpoint.
            }
            if record_seq != seq + 1 {
                return Err(refuse(OpenProblem::LogGap {
                    from: seq,
                    to: record_seq,
                }));
            }
            overlay_apply(&mut replayed, &writes);
            seq = record_seq;
        }
        write_checkpoint(&db, &replayed, seq, group_of).map_err(|source| Error::Open {
            path: shown.clone(),
            source,
        })?;
        log.durable(tag, seq);
        let state = State {
            seq,
            commits_since_checkpoint: 0,
            poisoned: false,
            in_flight: false,
            idle_waiters: 0,
            overlay: Overlay::new(),
            overlay_bytes: 0,
            frozen: None,
            snapshot: None,
        };
        Ok(Self {
            db: Arc::new(db),
            limits,
            group_of,
            path: shown,
            tag,
            log,
            state: Mutex::new(state),
            idle: Condvar::new(),
        })
    }

    /// The commit in flight has ended (finished or abandoned): wakes whoever waits to commit.
    fn end_in_flight(&self, state: &mut State) {
        state.in_flight = false;
        if state.idle_waiters > 0 {
            self.idle.notify_all();
        }
    }

    /// Hands the overlay to a checkpoint thread, which writes it into redb in one durable
    /// transaction; commits go on meanwhile into a fresh overlay. At most one checkpoint runs
    /// at a time: a second one waits for the first (backpressure, and a bound on memory).
    fn start_checkpoint(&self, state: &mut State) -> Result<(), Cause> {
        self.settle(state, true)?;
        let next = Overlay::with_capacity(state.overlay.len());
        let overlay = Arc::new(std::mem::replace(&mut state.overlay, next));
        state.overlay_bytes = 0;
        state.commits_since_checkpoint = 0;
        let seq = state.seq;
        let (db, frozen, group_of) = (Arc::clone(&self.db), Arc::clone(&overlay), self.group_of);
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint-{}", self.tag))
            .spawn(move || write_checkpoint(&db, &frozen, seq, group_of))?;
        state.frozen = Some(Frozen {
            overlay,
            seq,
            thread,
        });
        Ok(())
    }

    /// Collects a finished checkpoint (or waits for it): its commits are now in redb, and the
    /// log may drop them.
    fn settle(&self, state: &mut State, wait: bool) -> Result<(), Cause> {
        let finished = state
            .frozen
            .as_ref()
            .is_some_and(|f| wait || f.thread.is_finished());
        if !finished {
            return Ok(());
        }
        let frozen = state.frozen.take().expect("checked");
        state.snapshot = None;
        let outcome = frozen
            .thread
            .join()
            .unwrap_or_else(|_| Err(Cause::from("the checkpoint thread panicked")));
        // Freeing a checkpoint's worth of small allocations takes milliseconds: not on the
        // committing thread. (If no thread can be started, the overlay is freed right here.)
        let overlay = frozen.overlay;
        let _ = std::thread::Builder::new()
            .name(format!("overlay-free-{}", self.tag))
            .spawn(move || drop(overlay));
        match outcome {
            Ok(()) => {
                self.log.durable(self.tag, frozen.seq);
                Ok(())
            }
            Err(e) => {
                // The log still holds every commit; a restart replays them.
                state.poisoned = true;
                state.frozen = None;
                Err(e)
            }
        }
    }

    /// Waits for a running checkpoint, then writes what remains in the overlay (at close).
    fn checkpoint_now(&self, state: &mut State) -> Result<(), Cause> {
        self.settle(state, true)?;
        if state.overlay.is_empty() {
            return Ok(());
        }
        write_checkpoint(&self.db, &state.overlay, state.seq, self.group_of)?;
        state.snapshot = None;
        state.overlay = Overlay::new();
        state.overlay_bytes = 0;
        state.commits_since_checkpoint = 0;
        self.log.durable(self.tag, state.seq);
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The committed value of `key`: the overlay's, else the checkpoint's, else redb's.
    fn read(&self, state: &mut State, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.read_with(state, key, |value| value.map(<[u8]>::to_vec))
    }

    /// Looks at the committed value of `key` in place (a precondition needs no copy of it).
    fn read_with<T>(
        &self,
        state: &mut State,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> T,
    ) -> Result<T, Error> {
        if !state.overlay.is_empty() || state.frozen.is_some() {
            let probe = OverlayKey::new(key);
            if let Some(value) = state.overlay.get(&probe) {
                return Ok(f(value));
            }
            if let Some(value) = state.frozen.as_ref().and_then(|f| f.overlay.get(&probe)) {
                return Ok(f(value));
            }
        }
        let snapshot = match &state.snapshot {
            Some(snapshot) => snapshot,
            None => state.snapshot.insert(Snapshot::open(&self.db)?),
        };
        if let Some(found) = snapshot.kv.get(key).map_err(io)? {
            return Ok(f(Some(found.value())));
        }
        match packed::group(self.group_of, key) {
            Some(group) => {
                let found = packed::get(&snapshot.packed, key, group)?;
                Ok(f(found.as_deref()))
            }
            None => Ok(f(None)),
        }
    }
}

impl Drop for Embedded {
    /// A clean close checkpoints, so the next open has nothing to replay.
    fn drop(&mut self) {
        let mut state = self.state();
        if !state.poisoned
            && let Err(e) = self.checkpoint_now(&mut state)
        {
            tracing::error!(store = %self.path, error = %e, "checkpoint at close failed; the log keeps every commit");
        }
    }
}

/// One durable redb transaction holding `overlay` and the log position it reaches. Keys that
/// `group_of` places in groups are packed into chunks (see [`packed`]).
fn write_checkpoint(
    db: &Database,
    overlay: &Overlay,
    seq: u64,
    group_of: Option<GroupOf>,
) -> Result<(), Cause> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut table = txn.open_table(KV)?;
        let mut packed = txn.open_table(PACKED)?;
        let mut packer = Packer::new();
        let mut bytes = Vec::new();
        for (key, value) in overlay.iter() {
            bytes.clear();
            key.write_to(&mut bytes);
            match (value, packed::group(group_of, &bytes)) {
                (Some(v), Some(group)) => packer.push(&mut packed, &mut table, &bytes, group, v)?,
                (Some(v), None) => {
                    table.insert(bytes.as_slice(), v)?;
                }
                (None, _) => {
                    table.remove(bytes.as_slice())?;
                }
            }
        }
        packer.flush(&mut packed, &mut table)?;
        let mut meta = txn.open_table(META)?;
        meta.insert(APPLIED_SEQ, seq)?;
    }
    txn.commit()?;
    Ok(())
}

/// Merges two runs ordered by `cmp`; on equal items the one from `first` is kept and the
/// other dropped.
fn merge_by<T>(
    first: impl Iterator<Item = T>,
    second: impl Iterator<Item = T>,
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> impl Iterator<Item = T> {
    use std::cmp::Ordering;
    let (mut first, mut second) = (first.peekable(), second.peekable());
    std::iter::from_fn(move || {
        let order = match (first.peek(), second.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => cmp(a, b),
        };
        match order {
            Ordering::Less => first.next(),
            Ordering::Equal => {
                second.next();
                first.next()
            }
            Ordering::Greater => second.next(),
        }
    })
}

/// Merges two ordered runs of overlay entries; `newer` wins on equal keys.
fn merge_overlays<'a>(
    newer: impl Iterator<Item = (&'a OverlayKey, Option<&'a [u8]>)>,
    older: impl Iterator<Item = (&'a OverlayKey, Option<&'a [u8]>)>,
) -> impl Iterator<Item = (&'a OverlayKey, Option<&'a [u8]>)> {
    merge_by(newer, older, |n, o| n.0.cmp(o.0))
}

/// A row read from redb, owned.
type Row = Result<(Vec<u8>, Vec<u8>), Error>;

/// Merges plain rows with packed members, both ordered; an error comes out as soon as it is
/// met. On an equal key, which a packed group's contract rules out, the plain row wins.
fn merge_rows(
    rows: impl Iterator<Item = Row>,
    members: impl Iterator<Item = Row>,
) -> impl Iterator<Item = Row> {
    use std::cmp::Ordering;
    merge_by(rows, members, |r, m| match (r, m) {
        (Ok(r), Ok(m)) => r.0.cmp(&m.0),
        (Err(_), _) => Ordering::Less,
        (_, Err(_)) => Ordering::Greater,
    })
}

fn io(e: impl Into<redb::Error>) -> Error {
    Error::Io(e.into().into())
}

/// Adds a commit's writes to an overlay (copying their values into its arena); returns the
/// bytes they take (see [`ENTRY_OVERHEAD_BYTES`]).
fn overlay_apply(overlay: &mut Overlay, writes: &[Write]) -> usize {
    let mut bytes = 0;
    for write in writes {
        let (key, value) = match write {
            Write::Put(k, v) => (k, Some(v.as_slice())),
            Write::Delete(k) => (k, None),
        };
        bytes += ENTRY_OVERHEAD_BYTES + key.len() + value.map_or(0, <[u8]>::len);
        overlay.insert(key, value);
    }
    bytes
}

impl Store for Embedded {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let mut state = self.state();
        self.read(&mut state, key)
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<crate::Pairs, Error> {
        if start >= end {
            return Ok(Vec::new());
        }
        let state = self.state();
        let snapshot = Snapshot::open(&self.db)?;
        // redb's rows and packed members, merged (a key is in at most one of them), then
        // merged with the overlay's; the overlay wins on equal keys and its deletes hide
        // redb's values.
        let rows = snapshot.kv.range(start..end).map_err(io)?.map(|row| {
            row.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .map_err(io)
        });
        let members = match self.group_of {
            Some(group_of) => Some(packed::Range::new(&snapshot.packed, group_of, start, end)?),
            None => None,
        };
        let mut base = merge_rows(rows, members.into_iter().flatten()).peekable();
        let (from, to) = (OverlayKey::new(start), OverlayKey::new(end));
        let range = || (Bound::Included(&from), Bound::Excluded(&to));
        let frozen = state.frozen.as_ref().map(|f| &*f.overlay);
        let mut over = merge_overlays(
            state.overlay.range(range()),
            frozen.into_iter().flat_map(|f| f.range(range())),
        )
        .peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let base_key = match base.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => {
                    let Some(Err(e)) = base.next() else {
                        unreachable!("peeked an error")
                    };
                    return Err(e);
                }
                None => None,
            };
            let take_overlay = match (&base_key, over.peek()) {
                (None, None) => break,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(b), Some((o, _))) => **o <= OverlayKey::new(b),
            };
            if take_overlay {
                let (k, v) = over.next().expect("peeked");
                let k = k.to_bytes();
                if base_key.as_ref() == Some(&k) {
                    base.next(); // shadowed by the overlay
                }
                if let Some(v) = v {
                    out.push((k, v.to_vec()));
                }
            } else {
                out.push(base.next().expect("peeked")?);
            }
        }
        Ok(out)
    }

    /// One cut, taken under the store's lock: the keys of the overlay and of the checkpoint
    /// being written are copied out, and a read snapshot of redb opened, before the lock is let
    /// go (a checkpoint drops its overlay only under that lock, after its redb commit, so
    /// every key that holds a value is in one of the three; a key in two of them is passed
    /// twice). redb's keys are then read from the snapshot while commits go on. Nothing is
    /// sorted and no value is copied. The snapshot keeps redb from reusing the pages that
    /// checkpoints free until the visit ends (the file grows by what they write meanwhile).
    fn for_each_key(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), Error> {
        if start >= end {
            return Ok(());
        }
        let (from, to) = (OverlayKey::new(start), OverlayKey::new(end));
        let mut held = Vec::new();
        let mut ends = Vec::new();
        let snapshot = {
            let state = self.state();
            let frozen = state.frozen.as_ref().map(|f| &*f.overlay);
            for overlay in std::iter::once(&state.overlay).chain(frozen) {
                for key in overlay.keys_between(&from, &to) {
                    key.write_to(&mut held);
                    ends.push(held.len());
                }
            }
            Snapshot::open(&self.db)?
        };
        let mut at = 0;
        for stop in ends {
            if !f(&held[at..stop]) {
                return Ok(());
            }
            at = stop;
        }
        drop(held);
        for row in snapshot.kv.range(start..end).map_err(io)? {
            let (key, _) = row.map_err(io)?;
            if !f(key.value()) {
                return Ok(());
            }
        }
        if let Some(group_of) = self.group_of {
            for member in packed::Range::new(&snapshot.packed, group_of, start, end)? {
                if !f(&member?.0) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        self.commit_writes(&batch.preconditions, &batch.writes)
    }

    fn commit_async(&self, batch: WriteBatch) -> crate::CommitFuture<'_> {
        Box::pin(async move {
            let Some(group) = self.begin_commit(&batch.preconditions, &batch.writes)? else {
                return Ok(());
            };
            let mut in_flight = InFlight::new(self);
            let synced = self.log.synced(group).await;
            // The overlay copies the values; the batch is freed here, after the store's lock
            // is let go, by the thread that allocated it.
            in_flight.finish(&batch.writes, synced)
        })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

impl Embedded {
    /// A blocking commit: begin, wait for the log, finish.
    fn commit_writes(
        &self,
        preconditions: &[(Vec<u8>, crate::Expect)],
        writes: &[Write],
    ) -> Result<(), CommitError> {
        let Some(group) = self.begin_commit(preconditions, writes)? else {
            return Ok(());
        };
        let mut in_flight = InFlight::new(self);
        let synced = self.log.wait(group);
        in_flight.finish(writes, synced)
    }

    /// The first half of a commit: checks the preconditions and hands the record to the log.
    /// Returns the log group to wait for, or `None` when there is nothing to write. The caller
    /// must then call [`InFlight::finish`]: until it does, this store takes no other commit.
    fn begin_commit(
        &self,
        preconditions: &[(Vec<u8>, crate::Expect)],
        writes: &[Write],
    ) -> Result<Option<u64>, CommitError> {
        // One commit at a time per store: its log order is its commit order. A shard has one
        // writer, so this waits only if a second writer shows up (a test, say).
        let mut state = self.state();
        while state.in_flight {
            state.idle_waiters += 1;
            state = self
                .idle
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.idle_waiters -= 1;
        }
        if let Err(e) = self.settle(&mut state, false) {
            tracing::error!(store = %self.path, error = %e, "checkpoint failed; the log keeps every commit, restart to replay it");
        }
        if state.poisoned {
            return Err(CommitError::Poisoned {
                path: self.path.clone(),
            });
        }
        for (key, expect) in preconditions {
            let holds = self
                .read_with(&mut state, key, |current| expect.holds(current))
                .map_err(|e| CommitError::NotCommitted(e.into()))?;
            if !holds {
                return Err(CommitError::Conflict { key: key.clone() });
            }
        }
        if writes.is_empty() {
            return Ok(None);
        }
        if let Some(key) = writes.iter().find_map(|w| match w {
            Write::Delete(key) if packed::group(self.group_of, key).is_some() => Some(key),
            _ => None,
        }) {
            return Err(CommitError::DeletesPackedMember { key: key.clone() });
        }
        let seq = state.seq + 1;
        match self.log.submit(self.tag, seq, writes) {
            Ok(group) => {
                state.seq = seq;
                state.in_flight = true;
                Ok(Some(group))
            }
            Err(e) => {
                // Part of the record may be on disk. Unknown, and no further commits here.
                state.poisoned = true;
                Err(CommitError::Unknown(e.into()))
            }
        }
    }
}

/// A commit whose record is in the log but not yet visible. Dropped before it finishes (its
/// task was cancelled while it waited for the fsync), it poisons the store: the record may
/// be durable without being visible, and only a restart's replay can tell.
struct InFlight<'a> {
    store: &'a Embedded,
    finished: bool,
}

impl<'a> InFlight<'a> {
    fn new(store: &'a Embedded) -> Self {
        Self {
            store,
            finished: false,
        }
    }

    /// The second half of a commit, once the log has answered: a synced record's writes
    /// become visible (and may start a checkpoint).
    fn finish(
        &mut self,
        writes: &[Write],
        synced: Result<(), LogFailed>,
    ) -> Result<(), CommitError> {
        self.finished = true;
        let store = self.store;
        let mut state = store.state();
        store.end_in_flight(&mut state);
        if let Err(e) = synced {
            state.poisoned = true;
            return Err(CommitError::Unknown(e.into()));
        }
        state.commits_since_checkpoint += 1;
        state.overlay_bytes += overlay_apply(&mut state.overlay, writes);
        let due = state.commits_since_checkpoint >= store.limits.checkpoint_commits
            || state.overlay_bytes >= store.limits.overlay_bytes;
        // A checkpoint still running is not waited for (that would stall this shard's commits)
        // until the overlay reaches its hard limit.
        let running = state.frozen.is_some();
        if due && (!running || state.overlay_bytes >= store.limits.overlay_bytes_hard()) {
            // The commit is durable (logged) whatever happens here; a failed checkpoint leaves
            // the log holding it, and the store refuses further commits until a restart.
            if let Err(e) = store.start_checkpoint(&mut state) {
                state.poisoned = true;
                tracing::error!(store = %store.path, error = %e, "checkpoint failed; the log keeps every commit, restart to replay it");
            }
        }
        Ok(())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self.store.state();
            self.store.end_in_flight(&mut state);
            state.poisoned = true;
            tracing::error!(store = %self.store.path, "a commit was abandoned while its log record was being synced; restart to replay the log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Expect;
    use std::collections::BTreeMap;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = Embedded::open(&dir.path().join("db.redb")).unwrap();
        crate::conformance::run_all(&store);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let store = Embedded::open(&path).unwrap();
            let mut b = WriteBatch::default();
            b.put(b"k".to_vec(), b"v".to_vec());
            store.commit(&b).unwrap();
        }
        let store = Embedded::open(&path).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    /// Writers that find a commit in flight wait for it and are woken when it ends (the store
    /// signals only when someone waits): every commit of four threads lands, none hangs.
    #[test]
    fn writers_waiting_for_the_commit_in_flight_are_woken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Embedded::open(&dir.path().join("db.redb")).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        for writer in 0..4u8 {
            let (store, done) = (Arc::clone(&store), done.clone());
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let mut b = WriteBatch::default();
                    b.put(vec![b'w', writer, i], vec![i]);
                    store.commit(&b).unwrap();
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a writer waiting for the commit in flight was never woken");
        }
        for writer in 0..4u8 {
            for i in 0..50u8 {
                assert_eq!(store.get(&[b'w', writer, i]).unwrap(), Some(vec![i]));
            }
        }
    }

    /// An async commit is visible once it resolves. One abandoned while its record was being
    /// synced poisons the store: that record may be durable without being visible.
    #[test]
    fn async_commits_become_visible_and_an_abandoned_one_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Embedded::open(&dir.path().join("db.redb")).unwrap();
        let batch = |k: u8| {
            let mut b = WriteBatch::default();
            b.put(vec![b'k', k], vec![k]);
            b
        };
        futures::executor::block_on(store.commit_async(batch(0))).unwrap();
        assert_eq!(store.get(b"k\0").unwrap(), Some(vec![0]));

        // Poll once: the record goes to the log; then give up on it before it is synced. (A
        // flush can win the race; such a commit simply completes, so try again.)
        let noop = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(noop);
        let mut abandoned = false;
        for k in 1..=100 {
            let mut commit = store.commit_async(batch(k));
            if commit.as_mut().poll(&mut cx).is_pending() {
                abandoned = true;
                break;
            }
        }
        assert!(
            abandoned,
            "every commit was synced before its first poll returned"
        );
        assert!(matches!(
            store.commit(&batch(200)),
            Err(CommitError::Poisoned { .. })
        ));
    }

    #[test]
    fn logged_commits_survive_a_crash_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let crash = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Embedded::open(&path).unwrap();
        for i in 0..10u8 {
            let mut b = WriteBatch::default();
            b.put(vec![b'k', i], vec![i]);
            store.commit(&b).unwrap();
        }
        // Simulate a crash: copy the files as they are now, while redb has no durable commit
        // of these (only the log has them), and open the copy.
        std::fs::copy(&path, crash.path().join("db.redb")).unwrap();
        let log = crash.path().join("db.redb.log");
        std::fs::create_dir(&log).unwrap();
        for entry in std::fs::read_dir(dir.path().join("db.redb.log")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), log.join(entry.file_name())).unwrap();
        }
        drop(store);
        // A torn tail (a crash mid-append) is ignored: cut the newest segment's last record.
        let mut segments: Vec<_> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segments.sort();
        let newest = segments
            .iter()
            .rev()
            .find(|p| std::fs::metadata(p).unwrap().len() > 0)
            .unwrap();
        log::tear_last_record(newest, 2);
        let store = Embedded::open(&crash.path().join("db.redb")).unwrap();
        for i in 0..9u8 {
            assert_eq!(
                store.get(&[b'k', i]).unwrap(),
                Some(vec![i]),
                "commit {i} replayed"
            );
        }
        assert_eq!(
            store.get(&[b'k', 9]).unwrap(),
            None,
            "the torn record was never acknowledged"
        );
        // New commits continue the numbering after the replayed ones.
        let mut b = WriteBatch::default();
        b.put(b"after".to_vec(), b"x".to_vec());
        store.commit(&b).unwrap();
        drop(store);
        let store = Embedded::open(&crash.path().join("db.redb")).unwrap();
        assert_eq!(store.get(b"after").unwrap(), Some(b"x".to_vec()));
    }

    #[test]
    fn the_overlay_shadows_what_redb_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let put = |store: &Embedded, k: &[u8], v: &[u8]| {
            let mut b = WriteBatch::default();
            b.put(k.to_vec(), v.to_vec());
            store.commit(&b).unwrap();
        };
        {
            let store = Embedded::open(&path).unwrap();
            for k in [b"a", b"b", b"c", b"e"] {
                put(&store, k, b"old");
            }
        } // a clean close checkpoints: these are now in redb, not the overlay
        let store = Embedded::open(&path).unwrap();
        let mut b = WriteBatch::default();
        b.delete(b"b".to_vec());
        b.put(b"c".to_vec(), b"new".to_vec());
        b.put(b"d".to_vec(), b"new".to_vec());
        store.commit(&b).unwrap();
        let expected = |store: &Embedded| {
            assert_eq!(store.get(b"b").unwrap(), None, "deleted in the overlay");
            assert_eq!(store.get(b"c").unwrap(), Some(b"new".to_vec()));
            let all = store.scan(b"a", b"f", usize::MAX).unwrap();
            let keys: Vec<(&[u8], &[u8])> = all
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let want: Vec<(&[u8], &[u8])> = vec![
                (b"a", b"old"),
                (b"c", b"new"),
                (b"d", b"new"),
                (b"e", b"old"),
            ];
            assert_eq!(keys, want);
            let two = store.scan(b"b", b"z", 2).unwrap();
            assert_eq!(two.len(), 2);
            assert_eq!(two[0].0, b"c");
            assert_eq!(two[1].0, b"d");
            let mut conflict = WriteBatch::default();
            conflict.expect(b"b".to_vec(), Expect::Absent);
            conflict.expect(b"c".to_vec(), Expect::Equals(b"new".to_vec()));
            conflict.put(b"f".to_vec(), b"x".to_vec());
            conflict
        };
        let batch = expected(&store);
        store
            .commit(&batch)
            .expect("preconditions read the overlay");
        drop(store);
        let store = Embedded::open(&path).unwrap();
        let _ = expected(&store);
        assert_eq!(store.get(b"f").unwrap(), Some(b"x".to_vec()));
    }

    /// Checkpoints every this many commits in the tests below (the default is far more).
    const FEW_COMMITS: u64 = 200;

    fn open_checkpointing_often(path: &Path) -> Embedded {
        let limits = Limits {
            checkpoint_commits: FEW_COMMITS,
            ..Limits::default()
        };
        Embedded::open_with_limits(path, limits).unwrap()
    }

    #[test]
    fn the_overlay_limit_counts_what_entries_take_not_just_their_bytes() {
        // 100 one-byte puts are 200 bytes of keys and values, but each entry's headers take
        // far more memory: with a 4 KiB limit a checkpoint must come due before the last one.
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            overlay_bytes: 4 << 10,
            checkpoint_commits: u64::MAX,
            ..Limits::default()
        };
        let store = Embedded::open_with_limits(&dir.path().join("db.redb"), limits).unwrap();
        let mut checkpointed_at = None;
        for i in 0..100u8 {
            let mut b = WriteBatch::default();
            b.put(vec![i], vec![i]);
            store.commit(&b).unwrap();
            if checkpointed_at.is_none() && store.state().overlay.len() <= usize::from(i) {
                checkpointed_at = Some(i);
            }
        }
        // It came due with the entry that took the count to the limit, not before or after.
        let at = usize::from(checkpointed_at.expect("a checkpoint took the overlay"));
        let each = ENTRY_OVERHEAD_BYTES + 2;
        assert!(
            at * each < 4 << 10 && (at + 1) * each >= 4 << 10,
            "checkpoint after entry {at}"
        );
        for i in 0..100u8 {
            assert_eq!(store.get(&[i]).unwrap(), Some(vec![i]));
        }
    }

    #[test]
    fn reads_during_and_after_background_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = open_checkpointing_often(&path);
        let key = |i: u64| (i % 50).to_be_bytes().to_vec();
        // Keys are overwritten and deleted across several checkpoints.
        let rounds = 3 * FEW_COMMITS + 7;
        let mut live = std::collections::BTreeSet::new();
        for i in 0..rounds {
            let mut b = WriteBatch::default();
            if i % 7 == 3 {
                b.delete(key(i));
            } else {
                b.put(key(i), i.to_be_bytes().to_vec());
            }
            store.commit(&b).unwrap();
            if i % 7 == 3 {
                live.remove(&key(i));
            } else {
                live.insert(key(i));
            }
            if i % 97 == 0 {
                assert_eq!(store.get(&key(i)).unwrap().is_some(), i % 7 != 3);
            }
            if i % 13 == 0 {
                // Checkpoints run in the background meanwhile: keys are in the overlay, the
                // one being checkpointed, or redb.
                let mut seen = std::collections::BTreeSet::new();
                store
                    .for_each_key(&[], &[0xFF; 9], &mut |k| {
                        seen.insert(k.to_vec());
                        true
                    })
                    .unwrap();
                assert!(
                    live.is_subset(&seen),
                    "for_each_key missed a key at commit {i}"
                );
            }
        }
        let expected: BTreeMap<Vec<u8>, Vec<u8>> = {
            let mut m = BTreeMap::new();
            for i in 0..rounds {
                if i % 7 == 3 {
                    m.remove(&key(i));
                } else {
                    m.insert(key(i), i.to_be_bytes().to_vec());
                }
            }
            m
        };
        let want: Vec<(Vec<u8>, Vec<u8>)> = expected.into_iter().collect();
        assert_eq!(store.scan(&[], &[0xFF; 9], usize::MAX).unwrap(), want);
        drop(store);
        let store = Embedded::open(&path).unwrap();
        assert_eq!(store.scan(&[], &[0xFF; 9], usize::MAX).unwrap(), want);
    }

    #[test]
    fn the_reused_read_snapshot_never_hides_a_checkpointed_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_checkpointing_often(&dir.path().join("db.redb"));
        let put = |k: &[u8], v: u64| {
            let mut b = WriteBatch::default();
            b.put(k.to_vec(), v.to_be_bytes().to_vec());
            store.commit(&b).unwrap();
        };
        let value = |k: &[u8]| {
            let v = store.get(k).unwrap()?;
            Some(u64::from_be_bytes(v.try_into().unwrap()))
        };
        for round in 0..3u64 {
            // A miss takes a snapshot of redb; then a write goes overlay -> frozen -> redb.
            assert_eq!(value(b"missing"), None);
            let key = format!("k{round}");
            put(key.as_bytes(), round);
            // Fill until a checkpoint takes the overlay (the key is then in the frozen one).
            for i in 0..FEW_COMMITS {
                put(b"filler", i);
                assert_eq!(
                    value(key.as_bytes()),
                    Some(round),
                    "round {round}, commit {i}"
                );
                if store.state().frozen.is_some() {
                    break;
                }
            }
            assert!(store.state().frozen.is_some(), "a checkpoint is running");
            store.settle(&mut store.state(), true).unwrap();
            assert_eq!(
                value(key.as_bytes()),
                Some(round),
                "round {round}: read from redb once the checkpoint is collected"
            );
        }
    }

    #[test]
    fn checkpoints_keep_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = open_checkpointing_often(&path);
        for i in 0..(FEW_COMMITS + 3) {
            let mut b = WriteBatch::default();
            b.put(i.to_be_bytes().to_vec(), vec![1]);
            store.commit(&b).unwrap();
        }
        drop(store);
        let store = Embedded::open(&path).unwrap();
        let all = store.scan(&[], &[0xFF; 9], usize::MAX).unwrap();
        assert_eq!(all.len() as u64, FEW_COMMITS + 3);
    }

    #[test]
    fn shards_share_one_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = open_shards(dir.path(), 3, Limits::default(), None).unwrap();
            for (i, store) in stores.iter().enumerate() {
                let mut b = WriteBatch::default();
                b.put(b"k".to_vec(), vec![i as u8]);
                store.commit(&b).unwrap();
            }
        }
        let stores = open_shards(dir.path(), 3, Limits::default(), None).unwrap();
        for (i, store) in stores.iter().enumerate() {
            assert_eq!(store.get(b"k").unwrap(), Some(vec![i as u8]));
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("log")).unwrap().count(),
            1,
            "old segments collected"
        );
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        std::fs::write(&path, b"this is not a database, just some text").unwrap();
        let err = Embedded::open(&path).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err}");
    }

    /// Test groups: `g`, a group byte, then an 8-byte big-endian sequence number.
    fn test_group(key: &[u8]) -> Option<usize> {
        (key.len() == 10 && key[0] == b'g').then_some(2)
    }

    fn member(group: u8, seq: u64) -> Vec<u8> {
        let mut key = vec![b'g', group];
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    fn open_packed(dir: &Path, overlay_bytes: usize) -> Embedded {
        let log = Arc::new(Log::open(&dir.join("log")).unwrap());
        let limits = Limits {
            overlay_bytes,
            ..Limits::default()
        };
        Embedded::open_in_log(&dir.join("db.redb"), limits, log, 0, Some(test_group)).unwrap()
    }

    /// Every read a caller can make agrees with `model`: all point reads (members, keys
    /// between members, plain keys), the whole range, ranges that start and end inside groups,
    /// and limits.
    fn assert_reads_match(store: &Embedded, model: &BTreeMap<Vec<u8>, Vec<u8>>, rng: &mut u64) {
        let mut next = || {
            *rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *rng >> 33
        };
        let all: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(store.scan(&[], &[0xFF], usize::MAX).unwrap(), all);
        assert_keys_cover(store, model, &[], &[0xFF]);
        for (k, v) in model {
            assert_eq!(store.get(k).unwrap().as_ref(), Some(v), "get {k:?}");
        }
        for _ in 0..200 {
            let group = (next() % 5) as u8;
            let a = member(group, next() % 400);
            let b = member((next() % 5) as u8, next() % 400);
            let (start, end) = if a <= b { (a, b) } else { (b, a) };
            assert_eq!(
                store.get(&start).unwrap(),
                model.get(&start).cloned(),
                "get {start:?}"
            );
            let limit = (next() % 70) as usize;
            let want: Vec<_> = model
                .range(start.clone()..end.clone())
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(
                store.scan(&start, &end, limit).unwrap(),
                want,
                "scan {start:?}..{end:?} limit {limit}"
            );
            assert_keys_cover(store, model, &start, &end);
        }
    }

    /// `for_each_key` over `start..end` visits every key `model` holds there, and no key
    /// outside it; the only others it may visit are deleted plain keys (`h...`).
    fn assert_keys_cover(
        store: &Embedded,
        model: &BTreeMap<Vec<u8>, Vec<u8>>,
        start: &[u8],
        end: &[u8],
    ) {
        let mut seen = std::collections::BTreeSet::new();
        store
            .for_each_key(start, end, &mut |key| {
                assert!(
                    start <= key && key < end,
                    "{key:?} outside {start:?}..{end:?}"
                );
                seen.insert(key.to_vec());
                true
            })
            .unwrap();
        for key in model.range(start.to_vec()..end.to_vec()).map(|(k, _)| k) {
            assert!(seen.contains(key), "for_each_key missed {key:?}");
        }
        for key in &seen {
            assert!(model.contains_key(key) || key[0] == b'h', "visited {key:?}");
        }
    }

    #[test]
    fn packed_groups_read_back_as_written_across_checkpoints_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        let mut rng = 7u64;
        let mut next_seq = [0u64; 5];
        {
            // A small overlay: many checkpoints, so groups span many chunks and checkpoints.
            let store = open_packed(dir.path(), 16 << 10);
            for round in 0u64..60 {
                let mut b = WriteBatch::default();
                for group in 0..5u8 {
                    // Group 0 grows by 100 a round (chunks split at MEMBERS_MAX); group 1
                    // carries big values (chunks split at CHUNK_BYTES_MAX).
                    let n = [100, 3, 1, 0, 2][usize::from(group)] + round % 2;
                    for _ in 0..n {
                        let key = member(group, next_seq[usize::from(group)]);
                        next_seq[usize::from(group)] += 2; // odd numbers stay free
                        let len = if group == 1 {
                            6_000
                        } else {
                            1 + (round as usize % 30)
                        };
                        let value = vec![group.wrapping_add(round as u8); len];
                        b.put(key.clone(), value.clone());
                        model.insert(key, value);
                    }
                }
                if round % 7 == 3 {
                    // Out of order: below members already written (and checkpointed).
                    let key = member(0, 2 * round + 1);
                    b.put(key.clone(), b"late".to_vec());
                    model.insert(key, b"late".to_vec());
                }
                // Plain keys, put and deleted, interleaved with the groups' range.
                let plain = format!("h{}", round % 9).into_bytes();
                if round % 3 == 0 {
                    b.delete(plain.clone());
                    model.remove(&plain);
                } else {
                    b.put(plain.clone(), round.to_be_bytes().to_vec());
                    model.insert(plain, round.to_be_bytes().to_vec());
                }
                store.commit(&b).unwrap();
                if round % 10 == 9 {
                    assert_reads_match(&store, &model, &mut rng);
                }
            }
            // Members are never deleted: refused, and nothing changes.
            let mut b = WriteBatch::default();
            b.put(b"h0".to_vec(), b"no".to_vec());
            b.delete(member(0, 0));
            let err = store.commit(&b).unwrap_err();
            assert!(
                matches!(err, CommitError::DeletesPackedMember { .. }),
                "{err}"
            );
            assert_reads_match(&store, &model, &mut rng);
            // Packing happened: far fewer rows than members.
            let mut state = store.state();
            store.checkpoint_now(&mut state).unwrap();
            drop(state);
            let txn = store.db.begin_read().unwrap();
            let chunks = txn.open_table(PACKED).unwrap().iter().unwrap().count();
            let members = model.keys().filter(|k| k[0] == b'g').count();
            assert!(
                chunks > 0 && chunks * 10 < members,
                "{chunks} chunks for {members}"
            );
        }
        let store = open_packed(dir.path(), 16 << 10);
        assert_reads_match(&store, &model, &mut rng);
        drop(store);
        // Without the rule the packed rows could not be read: refused, not silently partial.
        let err = Embedded::open(&dir.path().join("db.redb")).unwrap_err();
        assert!(err.to_string().contains("packed rows"), "{err}");
    }

    #[test]
    fn packed_groups_survive_a_crash_before_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        {
            let store = open_packed(dir.path(), 8 << 20);
            for seq in 0..300u64 {
                let mut b = WriteBatch::default();
                let key = member((seq % 3) as u8, seq);
                b.put(key.clone(), seq.to_le_bytes().to_vec());
                model.insert(key, seq.to_le_bytes().to_vec());
                store.commit(&b).unwrap();
            }
            // A crash: no checkpoint at close; only the log has these commits.
            store.state().poisoned = true;
        }
        let store = open_packed(dir.path(), 8 << 20);
        assert_reads_match(&store, &model, &mut 3);
    }

    #[test]
    fn conformance_with_packed_groups() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run_all(&open_packed(dir.path(), 4 << 10));
    }
}
