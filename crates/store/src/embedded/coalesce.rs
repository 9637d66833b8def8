//! A redb storage backend that holds page writes until redb syncs, then writes them in file
//! order, pages that follow one another in one system call.
//!
//! Why: a checkpoint commits one redb transaction, and redb writes each dirty page with a
//! `pwrite` of its own, in the order of its write cache's hash table. At workload (a) that was
//! about 50 000 `pwrite`s a second of 4 KiB each, and the checkpoint threads spent nearly half
//! their time in them, mostly in the kernel's per-call work rather than in copying
//! (docs/benchmarks.md). About four in ten of a checkpoint's pages sit next to another one it
//! writes, so sorting and merging saves that share of the calls.
//!
//! What it keeps: every read sees every write made before it, whether written out yet or not,
//! and `sync_data` returns only once all of them are on disk, as with redb's own file backend.
//! Only a write that redb has not synced may reach the file later than it would have there, or
//! not at all if the process dies first; redb never counts on such a write (a commit is durable
//! once its sync returns, and the ledger's log keeps every commit until a checkpoint's sync has
//! returned).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Bytes of page writes held at most before they are written out without waiting for a sync
/// (a bigger transaction than that still works, in several rounds of writes). A checkpoint at
/// workload (a) held 10.2 MB at its sync at the median and 12.7 MB at most (226 checkpoints in
/// 20 s, 16 shards); each store holds its own, so 16 shards hold at most 256 MiB, briefly, on
/// top of redb's own copy.
pub const HELD_BYTES_MAX: usize = 16 << 20;

/// The longest run of neighbouring pages written in one call: bounds the buffer a run is
/// copied into, which each store keeps (a fresh one per sync was fresh memory, faulted in page
/// by page, on each checkpoint's new thread). Runs are mostly one to three pages.
pub const RUN_BYTES_MAX: usize = 256 << 10;

#[derive(Debug)]
pub struct CoalescingFile {
    inner: FileBackend,
    held: Mutex<Held>,
    /// Where a run of neighbouring pages is copied before its write; kept between syncs.
    run: Mutex<Vec<u8>>,
    /// Writes made to the file (for tests: how many runs the held pages became).
    file_writes: AtomicU64,
}

/// Page writes not yet made: offset -> bytes. No two overlap.
#[derive(Debug, Default)]
struct Held {
    writes: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl CoalescingFile {
    /// Opens (or creates) the file at `path` as redb's own `Builder::create` does.
    pub fn open(path: &Path) -> Result<Self, redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self {
            inner: FileBackend::new(file)?,
            held: Mutex::new(Held::default()),
            run: Mutex::new(Vec::new()),
            file_writes: AtomicU64::new(0),
        })
    }

    fn write_file(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file_writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write(offset, bytes)
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out every held write, in file order, neighbours merged. The lock is not held
    /// meanwhile: readers never read pages redb is still writing (it writes new pages, never
    /// one a reader's snapshot holds), and only redb's one writing thread writes or syncs.
    fn write_out(&self) -> io::Result<()> {
        let writes = {
            let mut held = self.held();
            held.bytes = 0;
            std::mem::take(&mut held.writes)
        };
        let mut writes = writes.into_iter().peekable();
        let mut run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        run.clear();
        let mut run_start = 0;
        let failed = loop {
            let Some((offset, bytes)) = writes.next() else {
                break None;
            };
            if run.is_empty() {
                run_start = offset;
            }
            let end = offset + bytes.len() as u64;
            let neighbour_follows = writes.peek().is_some_and(|(next, next_bytes)| {
                *next == end && run.len() + bytes.len() + next_bytes.len() <= RUN_BYTES_MAX
            });
            let written = if run.is_empty() && !neighbour_follows {
                // A page on its own: written from where it is, not copied.
                self.write_file(offset, &bytes)
            } else {
                run.extend_from_slice(&bytes);
                if neighbour_follows {
                    continue;
                }
                self.write_file(run_start, &run)
            };
            match written {
                Ok(()) => run.clear(),
                Err(e) => {
                    let unwritten = if run.is_empty() {
                        bytes
                    } else {
                        std::mem::take(&mut *run)
                    };
                    break Some((e, run_start, unwritten));
                }
            }
        };
        let Some((e, start, unwritten)) = failed else {
            return Ok(());
        };
        // Held again, so that no later read misses them (redb fails the database on a write
        // error in any case).
        let mut held = self.held();
        for (offset, bytes) in std::iter::once((start, unwritten)).chain(writes) {
            held.bytes += bytes.len();
            held.writes.insert(offset, bytes);
        }
        Err(e)
    }
}

/// Whether `[start, end)` overlaps a held write other than one exactly at `[start, end)`.
fn overlaps_another(held: &Held, start: u64, end: u64) -> bool {
    let before = held
        .writes
        .range(..start)
        .next_back()
        .is_some_and(|(offset, bytes)| offset + bytes.len() as u64 > start);
    let inside = held
        .writes
        .range(start..end)
        .any(|(offset, bytes)| *offset != start || offset + bytes.len() as u64 != end);
    before || inside
}

impl StorageBackend for CoalescingFile {
    fn len(&self) -> Result<u64, io::Error> {
        let held = self.held();
        let held_end = held
            .writes
            .last_key_value()
            .map_or(0, |(offset, bytes)| offset + bytes.len() as u64);
        Ok(self.inner.len()?.max(held_end))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let held = self.held();
        let end = offset + out.len() as u64;
        // Pages redb wrote and reads back before its sync (once its write cache is full, it
        // writes pages early and reads them again) come from the held writes: writing them out
        // for the read cost a round of writes each time, 23% of `ledgerd` at workload (a)
        // (docs/benchmarks.md). Held writes do not overlap, so the newest bytes of each part
        // of the range are in at most one of them, else in the file.
        let touching: Vec<(u64, &[u8])> = held
            .writes
            .range(..end)
            .rev()
            .take_while(|(start, bytes)| *start + bytes.len() as u64 > offset)
            .map(|(start, bytes)| (*start, bytes.as_slice()))
            .collect();
        let covered = touching.iter().map(|(start, bytes)| {
            let from = (*start).max(offset);
            let to = (start + bytes.len() as u64).min(end);
            to - from
        });
        let holds_any = !held.writes.is_empty();
        if touching.is_empty() || covered.sum::<u64>() < out.len() as u64 {
            // Some of the range is only in the file: read it, then lay the held bytes over it.
            match self.inner.read(offset, out) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && holds_any => {
                    // Past the file's end, where a held write further on would have extended
                    // it (redb sizes the file before it writes, so this is for completeness).
                    drop(held);
                    self.write_out()?;
                    return self.inner.read(offset, out);
                }
                read => read?,
            }
        }
        for (start, bytes) in touching {
            let from = start.max(offset);
            let to = (start + bytes.len() as u64).min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - start) as usize..(to - start) as usize]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        // In order: the writes redb made before it resized the file land before the resize.
        self.write_out()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.write_out()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let end = offset + data.len() as u64;
        if overlaps_another(&self.held(), offset, end) {
            // A range written again in another shape: what came first goes first.
            self.write_out()?;
        }
        let mut held = self.held();
        let replaced = held.writes.insert(offset, data.to_vec());
        held.bytes = held.bytes + data.len() - replaced.map_or(0, |r| r.len());
        let over = held.bytes > HELD_BYTES_MAX;
        drop(held);
        if over {
            self.write_out()?;
        }
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        let written = self.write_out();
        let closed = self.inner.close();
        written.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> CoalescingFile {
        CoalescingFile::open(path).unwrap()
    }

    fn read(backend: &CoalescingFile, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        backend.read(offset, &mut out).unwrap();
        out
    }

    /// Neighbouring pages go to the file in one write, a page apart in its own, and only at
    /// the sync; the file then holds exactly what was written.
    #[test]
    fn neighbouring_pages_are_written_together_at_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let backend = open(&path);
        backend.set_len(8 * 4096).unwrap();
        for page in [2u64, 0, 1, 5] {
            backend
                .write(page * 4096, &vec![page as u8 + 1; 4096])
                .unwrap();
        }
        assert_eq!(
            backend.file_writes.load(Ordering::Relaxed),
            0,
            "held until the sync"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![0; 8 * 4096]);
        backend.sync_data().unwrap();
        assert_eq!(
            backend.file_writes.load(Ordering::Relaxed),
            2,
            "pages 0-2, then 5"
        );
        let file = std::fs::read(&path).unwrap();
        for (page, want) in [
            (0, 1),
            (1, 2),
            (2, 3),
            (3, 0),
            (4, 0),
            (5, 6),
            (6, 0),
            (7, 0),
        ] {
            assert_eq!(
                file[page * 4096..(page + 1) * 4096],
                vec![want; 4096],
                "page {page}"
            );
        }
    }

    /// Past `HELD_BYTES_MAX` the held pages go to the file without waiting for a sync, and
    /// what they hold is what was written.
    #[test]
    fn held_pages_past_the_limit_are_written_out_before_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let backend = open(&path);
        let pages = HELD_BYTES_MAX / 4096 + 1;
        for page in 0..pages {
            // Every other page: no neighbours, one write each.
            backend
                .write(2 * page as u64 * 4096, &vec![(page % 251) as u8 + 1; 4096])
                .unwrap();
        }
        assert_eq!(
            backend.file_writes.load(Ordering::Relaxed),
            pages as u64,
            "written out as the limit was passed, before any sync"
        );
        assert_eq!(backend.held().bytes, 0);
        let file = std::fs::read(&path).unwrap();
        for page in [0, pages / 2, pages - 1] {
            let at = 2 * page * 4096;
            assert_eq!(
                file[at..at + 4096],
                vec![(page % 251) as u8 + 1; 4096],
                "page {page}"
            );
        }
    }

    /// A small deterministic generator, so the sequence below repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A read of held pages, whole or in part, and of a range that is partly held and partly
    /// only in the file, is answered without writing anything out before the sync.
    #[test]
    fn reads_of_held_pages_write_nothing_out() {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(&dir.path().join("f"));
        backend.set_len(4 * 4096).unwrap();
        backend.write(0, &[7; 4096]).unwrap();
        backend.sync_data().unwrap();
        let synced = backend.file_writes.load(Ordering::Relaxed);
        backend.write(4096, &[1; 4096]).unwrap();
        backend.write(8192, &[2; 4096]).unwrap();
        assert_eq!(read(&backend, 4096, 8192), [[1; 4096], [2; 4096]].concat());
        assert_eq!(read(&backend, 6000, 100), [1; 100]);
        assert_eq!(read(&backend, 2048, 4096), [[7; 2048], [1; 2048]].concat());
        assert_eq!(backend.file_writes.load(Ordering::Relaxed), synced);
        backend.sync_data().unwrap();
        assert_eq!(backend.file_writes.load(Ordering::Relaxed), synced + 1);
    }

    /// Random writes of one to four pages (overlapping each other in any shape), reads, resizes
    /// and syncs, checked at every read against a plain byte vector: a read always sees the
    /// latest write, and after the last sync the file is the vector.
    #[test]
    fn reads_lengths_and_the_synced_file_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let backend = open(&path);
        let mut model: Vec<u8> = Vec::new();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for step in 0..3_000u32 {
            match rng.below(10) {
                0..=4 => {
                    let offset = rng.below(24) * 1024;
                    let len = (1 + rng.below(4) as usize) * 1024;
                    let byte = (step % 251) as u8 + 1;
                    backend.write(offset, &vec![byte; len]).unwrap();
                    let end = offset as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[offset as usize..end].fill(byte);
                }
                5..=7 if !model.is_empty() => {
                    let offset = rng.below(model.len() as u64) as usize;
                    let len = 1 + rng.below((model.len() - offset) as u64) as usize;
                    assert_eq!(
                        read(&backend, offset as u64, len),
                        model[offset..offset + len],
                        "step {step}: read {offset}+{len}"
                    );
                }
                8 => {
                    let len = rng.below(28) * 1024;
                    backend.set_len(len).unwrap();
                    model.resize(len as usize, 0);
                }
                _ => backend.sync_data().unwrap(),
            }
            assert_eq!(
                backend.len().unwrap(),
                model.len() as u64,
                "step {step}: length"
            );
        }
        backend.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), model);
    }

    /// A redb database through this backend keeps what it committed across a reopen.
    #[test]
    fn a_redb_database_through_it_survives_reopen() {
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let value = |i: u64| vec![(i % 256) as u8; 100 + (i % 700) as usize];
        for round in 0..3u64 {
            let db = redb::Builder::new()
                .create_with_backend(open(&path))
                .unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(T).unwrap();
                for i in round * 5_000..(round + 1) * 5_000 {
                    table
                        .insert(i * 7919 % 100_003, value(i).as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let db = redb::Builder::new()
            .create_with_backend(open(&path))
            .unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = txn.open_table(T).unwrap();
        for i in 0..15_000u64 {
            let got = table.get(i * 7919 % 100_003).unwrap().expect("committed");
            assert_eq!(got.value(), value(i).as_slice(), "key of {i}");
        }
    }
}
