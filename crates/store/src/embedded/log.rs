//! The write-ahead log: one append-only log shared by every store of a node, with group
//! commit across them.
//!
//! ```text
//!  shard 0 ─ submit(tag 0, seq, writes) ─┐
//!  shard 1 ─ submit(tag 1, seq, writes) ─┼─► pending buffer ─► flusher thread: write + fsync ─► wake
//!  shard 7 ─ submit(tag 7, seq, writes) ─┘    (what arrives during a flush forms the next group)
//! ```
//!
//! A committer submits its record and gets the number of the flush group it joined; it then
//! waits for that group either by blocking ([`Log::wait`], [`Log::append`]) or as a future
//! ([`Log::synced`]), so a shard leader running as an async task never blocks a thread on
//! an fsync. One flusher thread per log does every write and fsync.
//!
//! Each store (tag) numbers its commits 1, 2, 3, ...; a record is `(tag, seq, writes)`. A store
//! makes its B-tree durable now and then (a checkpoint) and reports it with [`Log::durable`];
//! a segment file is deleted once every tag in it is durable past its records. On open, the
//! records of every segment are read (a torn or corrupt tail ends a segment: it was never
//! acknowledged) and handed to the stores to replay with [`Log::take_recovered`].
//!
//! Why shared: with one log per shard, sixteen shards paid sixteen fsyncs for what one fsync
//! can cover (docs/benchmarks.md).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::Write;

/// A segment is closed and a new one started once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// A segment file is extended with zeros this far ahead of its records (capped at
/// [`SEGMENT_BYTES`]), so that most flushes overwrite bytes the file already has. An fsync
/// after an append that grows the file must also commit the new size and blocks to the
/// file system's journal; one that only overwrites syncs data alone. Measured on this
/// machine's disk: 4 KiB write + fdatasync, 4 400-5 500/s appending, 7 800-8 800/s
/// overwriting, with 30-40% less CPU each (docs/benchmarks.md). PostgreSQL zero-fills its
/// WAL segments for the same reason. Zeros read as the end of a segment's records.
pub const ZERO_AHEAD_BYTES: u64 = 8 << 20;
/// A flush of at least this many bytes that reaches past the zeros grows the file by its own
/// records, without zeros ahead. Its fsync writes that much data anyway, so committing a new
/// size adds little, while zero-filling ahead of large flushes doubled what the disk wrote:
/// workload (a), 8 000 transfers per call, ran 4-9% slower zero-filling every flush, while
/// small calls (b), whose flushes are tens of KiB, gained up to 31% (docs/benchmarks.md).
pub const ZERO_FILL_FLUSH_BYTES_MAX: u64 = 256 << 10;
/// The zeros written when a segment is extended, a slice of this at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
const MAGIC: u32 = 0x4C45_4457; // "LEDW"
/// Buffers up to this size are kept for reuse (the flush buffer and each committer's encoding
/// scratch); bigger ones, from an unusually large batch, are freed after use.
const KEEP_BUFFER_BYTES: usize = 8 << 20;

/// Records read at open, per tag, in log order.
pub type Recovered = Vec<(u64, Vec<Write>)>;

#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// Signalled after every flush (blocking waiters).
    flushed: Condvar,
    /// Signals the idle flusher that records are pending (or that the log is closing).
    work: Condvar,
}

#[derive(Debug)]
struct State {
    /// Records waiting for the next flush, and the number of that flush.
    pending: Vec<u8>,
    /// The last flushed buffer, emptied, to become `pending` again: the log does not allocate
    /// (and fault in) a fresh buffer per flush.
    spare: Vec<u8>,
    pending_tags: HashMap<u32, u64>,
    open_group: u64,
    synced_group: u64,
    /// The flusher waits for work (a submit must signal it).
    flusher_idle: bool,
    /// Threads blocked in [`Log::wait`]. Async commits wait through wakers instead, so this is
    /// usually zero, and then a flush signals `flushed` to nobody without a system call.
    blocked_waiters: usize,
    closing: bool,
    /// Async waiters: the group each waits for, and how to wake it. At most one per store
    /// with a commit in flight.
    wakers: Vec<(u64, Waker)>,
    /// The current segment (taken by the flusher while it writes).
    file: Option<File>,
    index: u64,
    /// Bytes of records in the current segment (where the next flush writes).
    bytes: u64,
    /// How far the current segment file is known to extend: records, then zeros. (After a
    /// failed zero-fill the file may be longer; the extra is zeros too.)
    zeroed: u64,
    /// Whether the current segment is still extended with zeros ahead of its records (not once
    /// writing them failed).
    zero_ahead: bool,
    /// Per segment: the highest seq of each tag in it.
    segments: BTreeMap<u64, HashMap<u32, u64>>,
    /// Per tag: the highest seq its store has made durable on its own.
    durable: HashMap<u32, u64>,
    recovered: HashMap<u32, Recovered>,
    failed: Option<LogFailed>,
}

impl State {
    /// Whether flush group `group` is on disk: `Some(Ok)` yes, `Some(Err)` it never will be.
    fn outcome(&self, group: u64) -> Option<Result<(), LogFailed>> {
        if self.synced_group >= group {
            return Some(Ok(()));
        }
        self.failed.clone().map(Err)
    }
}

/// The log failed to write, sync or rotate a segment. Part of a record may be on disk; the log
/// takes nothing more in this process, and a restart replays what is intact. Every commit
/// waiting on it gets the same failure, so it is cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
#[error("log {op} in {dir} failed: {source}")]
pub struct LogFailed {
    pub op: &'static str,
    pub dir: PathBuf,
    #[source]
    pub source: Arc<std::io::Error>,
}

impl LogFailed {
    fn new(op: &'static str, dir: &Path, source: std::io::Error) -> Self {
        Self {
            op,
            dir: dir.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:016}.log"))
}

impl Log {
    /// Opens the log directory (creating it), reads every record for replay, starts a new
    /// segment and the flusher thread.
    pub fn open(dir: &Path) -> std::io::Result<Log> {
        std::fs::create_dir_all(dir)?;
        let mut indices: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        indices.sort_unstable();
        let mut recovered: HashMap<u32, Recovered> = HashMap::new();
        let mut segments = BTreeMap::new();
        for &index in &indices {
            let mut tags = HashMap::new();
            for (tag, seq, writes) in read_segment(&segment_path(dir, index))? {
                tags.insert(tag, seq);
                recovered.entry(tag).or_default().push((seq, writes));
            }
            segments.insert(index, tags);
        }
        let index = indices.last().map_or(0, |i| i + 1);
        let file = create_segment(dir, index)?;
        segments.insert(index, HashMap::new());
        let state = State {
            pending: Vec::new(),
            spare: Vec::new(),
            pending_tags: HashMap::new(),
            open_group: 1,
            synced_group: 0,
            flusher_idle: false,
            blocked_waiters: 0,
            closing: false,
            wakers: Vec::new(),
            file: Some(file),
            index,
            bytes: 0,
            zeroed: 0,
            zero_ahead: true,
            segments,
            durable: HashMap::new(),
            recovered,
            failed: None,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            flushed: Condvar::new(),
            work: Condvar::new(),
        });
        let flusher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("log-flusher".into())
                .spawn(move || shared.run_flusher())?
        };
        Ok(Log {
            shared,
            flusher: Some(flusher),
        })
    }

    /// The records of `tag` found at open, in order (empty after the first call).
    pub fn take_recovered(&self, tag: u32) -> Recovered {
        self.lock().recovered.remove(&tag).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Adds a record to the next flush and returns that flush's group number (wait for it
    /// with [`Log::wait`] or [`Log::synced`]). Nothing is durable before the wait returns.
    pub fn submit(&self, tag: u32, seq: u64, writes: &[Write]) -> Result<u64, LogFailed> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Encoded (and checksummed) outside the lock, then copied into the pending buffer.
        let mut state = SCRATCH.with_borrow_mut(|record| {
            if record.capacity() > KEEP_BUFFER_BYTES {
                *record = Vec::new(); // the last record was unusually large: free it here, unlocked
            }
            record.clear();
            encode_into(record, tag, seq, writes);
            let mut state = self.lock();
            if state.failed.is_none() {
                state.pending.extend_from_slice(record);
            }
            state
        });
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        state.pending_tags.insert(tag, seq);
        if std::mem::take(&mut state.flusher_idle) {
            self.shared.work.notify_one();
        }
        Ok(state.open_group)
    }

    /// Blocks until flush group `group` is on disk.
    pub fn wait(&self, group: u64) -> Result<(), LogFailed> {
        let mut state = self.lock();
        loop {
            if let Some(outcome) = state.outcome(group) {
                return outcome;
            }
            state.blocked_waiters += 1;
            state = self
                .shared
                .flushed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.blocked_waiters -= 1;
        }
    }

    /// Resolves once flush group `group` is on disk, without blocking a thread meanwhile.
    pub fn synced(&self, group: u64) -> Synced<'_> {
        Synced { log: self, group }
    }

    /// Appends a record and returns once it is on disk (fsynced), together with whatever other
    /// records arrived meanwhile.
    pub fn append(&self, tag: u32, seq: u64, writes: &[Write]) -> Result<(), LogFailed> {
        let group = self.submit(tag, seq, writes)?;
        self.wait(group)
    }

    /// `tag`'s store made everything up to `seq` durable by itself: segments that hold nothing
    /// newer for any tag can go.
    pub fn durable(&self, tag: u32, seq: u64) {
        let mut state = self.lock();
        state.durable.insert(tag, seq);
        self.shared.collect(&mut state);
    }

    /// How many segment files exist (for tests and status).
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }
}

impl Drop for Log {
    /// Flushes what is pending, then stops the flusher.
    fn drop(&mut self) {
        self.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

/// A wait for one flush group: resolves once it is on disk (or the log failed).
#[derive(Debug)]
pub struct Synced<'a> {
    log: &'a Log,
    group: u64,
}

impl std::future::Future for Synced<'_> {
    type Output = Result<(), LogFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.log.lock();
        if let Some(outcome) = state.outcome(self.group) {
            return Poll::Ready(outcome);
        }
        let waker = cx.waker();
        match state.wakers.iter_mut().find(|(_, w)| w.will_wake(waker)) {
            Some(entry) => entry.0 = entry.0.min(self.group),
            None => state.wakers.push((self.group, waker.clone())),
        }
        Poll::Pending
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The flusher thread: writes and syncs whatever is pending, one group at a time, until
    /// the log is dropped (it flushes what is pending first).
    fn run_flusher(&self) {
        let mut state = self.lock();
        loop {
            while state.pending.is_empty() && !state.closing {
                state.flusher_idle = true;
                state = self
                    .work
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            state.flusher_idle = false;
            if state.pending.is_empty() || state.failed.is_some() {
                return; // closing, or nothing more may be logged
            }
            // Let other committers that are ready to run append theirs first: one fsync then
            // covers more records. Measured: small calls on 16 shards, +20%
            // (docs/benchmarks.md). With nothing else runnable it returns at once.
            drop(state);
            std::thread::yield_now();
            state = self.lock();
            let group = state.open_group;
            state.open_group += 1;
            let spare = std::mem::take(&mut state.spare);
            let mut buffer = std::mem::replace(&mut state.pending, spare);
            let tags = std::mem::take(&mut state.pending_tags);
            let file = state.file.take().expect("the flusher owns the segment");
            let (at, zeroed, zero_ahead) = (state.bytes, state.zeroed, state.zero_ahead);
            drop(state);
            let flushed_bytes = buffer.len() as u64;
            let end = at + flushed_bytes;
            let extend_to = if zero_ahead {
                file_end_after(at, flushed_bytes, zeroed)
            } else {
                end.max(zeroed)
            };
            // The records, then the zeros ahead of them (if any are due), in one fsync. The
            // zeros only make later fsyncs cheaper: if they cannot be written (a full disk, a
            // file size limit), the records still are, and the segment grows by its records
            // from then on.
            let written = file.write_all_at(&buffer, at).and_then(|()| {
                let zeros = zero_fill(&file, end.max(zeroed), extend_to);
                file.sync_data().map(|()| zeros)
            });
            buffer.clear();
            if buffer.capacity() > KEEP_BUFFER_BYTES {
                buffer = Vec::new();
            }
            state = self.lock();
            state.spare = buffer;
            state.file = Some(file);
            match written {
                Ok(zeros) => {
                    state.synced_group = group;
                    state.bytes += flushed_bytes;
                    match zeros {
                        Ok(()) => state.zeroed = extend_to,
                        Err(e) => {
                            state.zeroed = end.max(zeroed);
                            state.zero_ahead = false;
                            tracing::warn!(log = %self.dir.display(), error = %e, "cannot write zeros ahead of the log's records; this segment grows by its records instead");
                        }
                    }
                    let index = state.index;
                    let segment = state.segments.entry(index).or_default();
                    for (tag, seq) in tags {
                        segment.insert(tag, seq);
                    }
                    if state.bytes >= SEGMENT_BYTES
                        && let Err(e) = self.rotate(&mut state)
                    {
                        state.failed = Some(LogFailed::new("rotation", &self.dir, e));
                    }
                }
                Err(e) => {
                    // Part of the buffer may be on disk. Nothing more may be logged in this
                    // process: a restart replays what is intact.
                    state.failed = Some(LogFailed::new("write", &self.dir, e));
                }
            }
            if state.blocked_waiters > 0 {
                self.flushed.notify_all();
            }
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.wakers)
                .into_iter()
                .partition(|(g, _)| state.outcome(*g).is_some());
            state.wakers = waiting;
            drop(state);
            for (_, waker) in ready {
                waker.wake();
            }
            state = self.lock();
        }
    }

    fn rotate(&self, state: &mut State) -> std::io::Result<()> {
        let index = state.index + 1;
        state.file = Some(create_segment(&self.dir, index)?);
        state.index = index;
        state.bytes = 0;
        state.zeroed = 0;
        state.zero_ahead = true;
        state.segments.insert(index, HashMap::new());
        self.collect(state);
        Ok(())
    }

    fn collect(&self, state: &mut State) {
        let current = state.index;
        let done: Vec<u64> = state
            .segments
            .iter()
            .filter(|(index, tags)| {
                **index != current
                    && tags
                        .iter()
                        .all(|(tag, seq)| state.durable.get(tag).is_some_and(|d| d >= seq))
            })
            .map(|(index, _)| *index)
            .collect();
        for index in done {
            // Failing to delete only costs disk space; replay skips durable records.
            let _ = std::fs::remove_file(segment_path(&self.dir, index));
            state.segments.remove(&index);
        }
    }
}

/// The length of a segment file that is `zeroed` bytes long once a flush of `len` bytes at
/// `at` is written: unchanged while the flush falls within it, else extended with zeros
/// [`ZERO_AHEAD_BYTES`] further (at most to [`SEGMENT_BYTES`]), unless the flush is big
/// ([`ZERO_FILL_FLUSH_BYTES_MAX`]): then just to its end.
fn file_end_after(at: u64, len: u64, zeroed: u64) -> u64 {
    let end = at + len;
    if end <= zeroed {
        zeroed
    } else if len >= ZERO_FILL_FLUSH_BYTES_MAX {
        end
    } else {
        (zeroed + ZERO_AHEAD_BYTES).min(SEGMENT_BYTES).max(end)
    }
}

/// Writes zeros to `file` from byte `from` up to `to` (nothing when `to <= from`).
fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(ZEROS.len(), |left| left.min(ZEROS.len()));
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn create_segment(dir: &Path, index: u64) -> std::io::Result<File> {
    // Written at explicit offsets (records, and zeros ahead of them), not appended.
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(segment_path(dir, index))?;
    // Make the new file's directory entry durable too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Record: magic u32 | body length u32 | crc32 of body u32 | body = tag u32, seq u64, count u32,
/// then per write: tag u8 (0 put, 1 delete), key length u32, key, [value length u32, value].
/// Little-endian.
fn encode_into(body: &mut Vec<u8>, tag: u32, seq: u64, writes: &[Write]) {
    let size = writes.iter().fold(12 + 16, |n, w| {
        n + match w {
            Write::Put(k, v) => 9 + k.len() + v.len(),
            Write::Delete(k) => 5 + k.len(),
        }
    });
    // The header (magic, length, crc) is filled in once the body behind it is written.
    let start = body.len();
    body.reserve(size);
    body.extend_from_slice(&[0; 12]);
    body.extend_from_slice(&tag.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(
        &u32::try_from(writes.len())
            .expect("writes fit u32")
            .to_le_bytes(),
    );
    for write in writes {
        let (kind, key, value) = match write {
            Write::Put(k, v) => (0u8, k, Some(v)),
            Write::Delete(k) => (1u8, k, None),
        };
        body.push(kind);
        body.extend_from_slice(
            &u32::try_from(key.len())
                .expect("key fits u32")
                .to_le_bytes(),
        );
        body.extend_from_slice(key);
        if let Some(v) = value {
            body.extend_from_slice(
                &u32::try_from(v.len())
                    .expect("value fits u32")
                    .to_le_bytes(),
            );
            body.extend_from_slice(v);
        }
    }
    let len = u32::try_from(body.len() - start - 12).expect("record fits u32");
    let crc = crc32fast::hash(&body[start + 12..]);
    body[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
    body[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    body[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(body.len() - start, size, "record size computed up front");
}

/// Every whole, intact record of a segment, in order; a torn or corrupt tail ends it.
fn read_segment(path: &Path) -> std::io::Result<Vec<(u32, u64, Vec<Write>)>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    let u32_at = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
    };
    while let (Some(magic), Some(len), Some(crc)) = (u32_at(at), u32_at(at + 4), u32_at(at + 8)) {
        let Some(body) = bytes.get(at + 12..at + 12 + len as usize) else {
            break;
        };
        if magic != MAGIC || crc32fast::hash(body) != crc {
            break;
        }
        let Some(record) = decode(body) else { break };
        records.push(record);
        at += 12 + len as usize;
    }
    Ok(records)
}

fn decode(body: &[u8]) -> Option<(u32, u64, Vec<Write>)> {
    let mut at = 0;
    let mut take = |n: usize| {
        let s = body.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let tag = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut writes = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let kind = take(1)?[0];
        let klen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(klen)?.to_vec();
        match kind {
            0 => {
                let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                writes.push(Write::Put(key, take(vlen)?.to_vec()));
            }
            1 => writes.push(Write::Delete(key)),
            _ => return None,
        }
    }
    Some((tag, seq, writes))
}

/// For tests: tears a segment's last record as a crash mid-write would, by zeroing its last
/// `n` bytes (the zeros ahead of the records start right after it). The record must end in a
/// nonzero byte.
#[cfg(test)]
pub(crate) fn tear_last_record(path: &Path, n: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let end = records_end(&bytes);
    bytes[end - n..end].fill(0);
    std::fs::write(path, &bytes).unwrap();
}

/// For tests: where a segment's records end (its last nonzero byte, plus one), given records
/// that end in a nonzero byte.
#[cfg(test)]
fn records_end(segment: &[u8]) -> usize {
    segment.iter().rposition(|&b| b != 0).expect("a record") + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: u8) -> Vec<Write> {
        vec![Write::Put(vec![k], vec![k; 3]), Write::Delete(vec![k, k])]
    }

    #[test]
    fn records_round_trip_and_torn_tails_end_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path()).unwrap();
            log.append(1, 1, &put(1)).unwrap();
            log.append(2, 1, &put(2)).unwrap();
            log.append(1, 2, &put(3)).unwrap();
        }
        tear_last_record(&segment_path(dir.path(), 0), 3);
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.take_recovered(1), vec![(1, put(1))]);
        assert_eq!(log.take_recovered(2), vec![(1, put(2))]);
        assert!(log.take_recovered(1).is_empty(), "handed out once");
    }

    /// The segment file is extended with zeros ahead of its records (so a small flush
    /// overwrites instead of growing the file), again once records reach past them; a big
    /// flush grows it by itself; the zeros read as the end of the records.
    #[test]
    fn segments_are_zero_filled_ahead_of_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 0);
        let len = || std::fs::metadata(&path).unwrap().len();
        let records_end = || records_end(&std::fs::read(&path).unwrap()) as u64;
        let big = vec![Write::Put(vec![9], vec![7; ZERO_AHEAD_BYTES as usize])];
        {
            let log = Log::open(dir.path()).unwrap();
            assert_eq!(len(), 0, "nothing before a flush");
            log.append(1, 1, &put(1)).unwrap();
            assert_eq!(len(), ZERO_AHEAD_BYTES);
            log.append(1, 2, &put(2)).unwrap();
            assert_eq!(len(), ZERO_AHEAD_BYTES, "a flush within the zeros");
            // A big record past the zeros: the file ends where it does.
            log.append(1, 3, &big).unwrap();
            assert_eq!(len(), records_end());
            let after_big = len();
            // The next small flush reaches past the end again: zeros ahead of it.
            log.append(1, 4, &put(4)).unwrap();
            assert_eq!(len(), after_big + ZERO_AHEAD_BYTES);
            assert!(records_end() < after_big + 100);
        }
        let log = Log::open(dir.path()).unwrap();
        let expected = vec![(1, put(1)), (2, put(2)), (3, big), (4, put(4))];
        assert_eq!(log.take_recovered(1), expected);
    }

    /// A flush whose zeros ahead cannot be written (here a file size limit, refusing them as a
    /// full disk would) still writes and syncs its records, and so do the flushes after it.
    /// The appends run in a child process (this test binary again) started by `prlimit`, with
    /// `SIGXFSZ` ignored so that a write past the limit fails instead of killing it.
    #[test]
    fn a_flush_goes_through_when_its_zeros_cannot_be_written() {
        const CHILD: &str = "LEDGER_LOG_TEST_LIMITED_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            let log = Log::open(Path::new(&dir)).unwrap();
            for seq in 1..=3u64 {
                log.append(1, seq, &put(u8::try_from(seq).unwrap()))
                    .unwrap();
            }
            return;
        }
        let limit = ZERO_AHEAD_BYTES / 8;
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("sh")
            .args([
                "-c",
                "trap '' XFSZ; exec prlimit --fsize=\"$1\" \"$2\" --exact \"$3\"",
            ])
            .args(["sh", &limit.to_string()])
            .arg(std::env::current_exe().unwrap())
            .arg("embedded::log::tests::a_flush_goes_through_when_its_zeros_cannot_be_written")
            .env(CHILD, dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "the limited appends failed: {status}");
        let path = segment_path(dir.path(), 0);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            limit,
            "zeros up to the limit"
        );
        let log = Log::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.take_recovered(1).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn zeros_ahead_stop_at_the_segment_size_and_skip_big_flushes() {
        let (small, big) = (100, ZERO_FILL_FLUSH_BYTES_MAX);
        assert_eq!(file_end_after(0, small, 0), ZERO_AHEAD_BYTES);
        assert_eq!(
            file_end_after(50, small, ZERO_AHEAD_BYTES),
            ZERO_AHEAD_BYTES
        );
        assert_eq!(file_end_after(0, big, 0), big);
        assert_eq!(file_end_after(100, big, 1000), 100 + big);
        // Near the segment's end: zeros up to its size, or just the records past it.
        let near = SEGMENT_BYTES - ZERO_AHEAD_BYTES / 2;
        assert_eq!(file_end_after(near, small, near), SEGMENT_BYTES);
        let last = SEGMENT_BYTES - 10;
        assert_eq!(file_end_after(last, small, last), last + small);
    }

    #[test]
    fn reused_buffers_carry_nothing_over_between_flushes() {
        // One record bigger than the buffers kept for reuse, then small ones that reuse the
        // flush buffer and the encoding scratch: each must land exactly once, whole.
        let dir = tempfile::tempdir().unwrap();
        let big = vec![Write::Put(vec![9], vec![7; KEEP_BUFFER_BYTES + 1])];
        {
            let log = Log::open(dir.path()).unwrap();
            log.append(1, 1, &put(1)).unwrap();
            log.append(1, 2, &big).unwrap();
            for seq in 3..6 {
                log.append(1, seq, &put(u8::try_from(seq).unwrap()))
                    .unwrap();
            }
        }
        let log = Log::open(dir.path()).unwrap();
        let mut expected = vec![(1, put(1)), (2, big)];
        expected.extend((3..6).map(|seq| (seq, put(u8::try_from(seq).unwrap()))));
        assert_eq!(log.take_recovered(1), expected);
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(Log::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8u32)
            .map(|tag| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for seq in 1..=50u64 {
                        log.append(tag, seq, &put(tag as u8)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        let log = Log::open(dir.path()).unwrap();
        for tag in 0..8 {
            let seqs: Vec<u64> = log
                .take_recovered(tag)
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "tag {tag}");
        }
    }

    /// An async waiter registers its waker and is woken by the flusher once its group is on
    /// disk (a waiter that is never woken would strand its shard).
    #[test]
    fn async_waiters_are_woken_once_their_group_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path()).unwrap();
            let mut pending_polls = 0;
            for seq in 1..=20u64 {
                let group = log
                    .submit(1, seq, &put(u8::try_from(seq).unwrap()))
                    .unwrap();
                let synced = log.synced(group);
                let (result, pending) = poll_until_woken(synced);
                result.unwrap();
                pending_polls += pending;
            }
            assert!(
                pending_polls > 0,
                "every wait was over before the first poll"
            );
        }
        let log = Log::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.take_recovered(1).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    }

    /// Polls a future; between polls, waits (at most 10 s) to be woken. Returns the output and
    /// how many polls were pending.
    fn poll_until_woken<F: std::future::Future>(future: F) -> (F::Output, usize) {
        #[derive(Default)]
        struct Flag(Mutex<bool>, Condvar);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                *self.0.lock().unwrap() = true;
                self.1.notify_all();
            }
        }
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        let mut pending = 0;
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return (out, pending);
            }
            pending += 1;
            let woken = flag.0.lock().unwrap();
            let (mut woken, timeout) = flag
                .1
                .wait_timeout_while(woken, std::time::Duration::from_secs(10), |w| !*w)
                .unwrap();
            assert!(!timeout.timed_out(), "a pending waiter was never woken");
            *woken = false;
        }
    }

    #[test]
    fn segments_go_once_every_tag_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        log.append(1, 1, &put(1)).unwrap();
        log.append(2, 1, &put(2)).unwrap();
        drop(log);
        // Reopen: segment 0 is old, segment 1 is new.
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.segments(), 2);
        log.durable(1, 1);
        assert_eq!(log.segments(), 2, "tag 2 is not durable yet");
        log.durable(2, 1);
        assert_eq!(log.segments(), 1);
        assert!(!segment_path(dir.path(), 0).exists());
    }
}
