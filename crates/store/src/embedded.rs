//! The embedded durable backend: redb (a copy-on-write B-tree in one file) behind the
//! write-ahead [`Log`].
//!
//! ```text
//!  commit(batch):  check preconditions in a redb write txn
//!                  log.append(tag, seq, writes): synced, with other stores' records  <- durable
//!                  apply writes + applied_seq in the txn, commit without fsync (now visible)
//!  checkpoint:     every CHECKPOINT_COMMITS commits the redb commit is durable instead,
//!                  and the log may drop segments everyone has made durable
//!  open:           replay this store's log records with seq > applied_seq, make durable
//! ```
//!
//! Why: a copy-on-write B-tree rewrites every leaf a commit touches. With scattered keys
//! (accounts, entries, transfer ids) a durable commit per batch wrote about 20 KiB per transfer
//! and made the disk's bandwidth the limit (docs/benchmarks.md). With the log, a batch costs
//! one small sequential write, shared with every other shard's batch in the same fsync, and
//! leaves dirtied by many batches reach the disk once per checkpoint.
//!
//! Visibility: a commit becomes visible to readers only after its log record is synced, so a
//! reader never sees anything that a crash could take back. A failure after the record is
//! synced but before redb applied it poisons the store: every later commit fails until the
//! process restarts and replays the log (a leader would otherwise reload state that lacks a
//! durable commit).
//!
//! redb's `begin_write` blocks while another write transaction is open, so callers run commits
//! on a blocking thread; the shard runtime gives each shard its own thread and its own file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::log::Log;
use crate::{CommitError, Error, Store, Write, WriteBatch};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// The log position redb has applied (in the same transaction as the writes).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED_SEQ: &str = "applied_seq";

/// A durable redb commit (a checkpoint) at least every this many commits.
pub const CHECKPOINT_COMMITS: u64 = 512;

pub struct Embedded {
    db: Database,
    path: String,
    tag: u32,
    log: Arc<Log>,
    state: Mutex<State>,
}

struct State {
    /// The last commit's sequence number (this store's numbering in the log).
    seq: u64,
    commits_since_checkpoint: u64,
    poisoned: bool,
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
/// log in `log/` (one fsync for all shards' commits).
pub fn open_shards(
    dir: &Path,
    count: u32,
    cache_bytes_each: usize,
) -> Result<Vec<Embedded>, Error> {
    let log_dir = dir.join("log");
    let log = Log::open(&log_dir).map_err(|e| Error::Open {
        path: log_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let log = Arc::new(log);
    (0..count)
        .map(|shard| {
            let path = dir.join(format!("shard-{shard:04}.redb"));
            Embedded::open_in_log(&path, cache_bytes_each, Arc::clone(&log), shard)
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
        let log_dir = PathBuf::from(format!("{}.log", path.display()));
        let log = Log::open(&log_dir).map_err(|e| Error::Open {
            path: log_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::open_in_log(path, cache_bytes, Arc::new(log), 0)
    }

    /// Opens a database file whose commits go to `log` under `tag`, replaying the log first.
    pub fn open_in_log(
        path: &Path,
        cache_bytes: usize,
        log: Arc<Log>,
        tag: u32,
    ) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let open_err = |reason: String| Error::Open {
            path: shown.clone(),
            reason,
        };
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                    "it is already open in another process (is another ledgerd running?)".into(),
                ),
                other => open_err(other.to_string()),
            })?;
        let oe = |e: &dyn std::fmt::Display| open_err(e.to_string());
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| oe(&e))?;
        txn.open_table(KV).map_err(|e| oe(&e))?;
        let applied = {
            let meta = txn.open_table(META).map_err(|e| oe(&e))?;
            meta.get(APPLIED_SEQ)
                .map_err(|e| oe(&e))?
                .map_or(0, |v| v.value())
        };
        txn.commit().map_err(|e| oe(&e))?;

        let mut seq = applied;
        let txn = db.begin_write().map_err(|e| oe(&e))?;
        {
            let mut table = txn.open_table(KV).map_err(|e| oe(&e))?;
            for (record_seq, writes) in log.take_recovered(tag) {
                if record_seq <= applied {
                    continue; // Already in the last durable checkpoint.
                }
                if record_seq != seq + 1 {
                    return Err(open_err(format!(
                        "the log jumps from commit {seq} to {record_seq}; refusing to guess"
                    )));
                }
                apply(&mut table, &writes).map_err(|e| oe(&e))?;
                seq = record_seq;
            }
            let mut meta = txn.open_table(META).map_err(|e| oe(&e))?;
            meta.insert(APPLIED_SEQ, seq).map_err(|e| oe(&e))?;
        }
        txn.commit().map_err(|e| oe(&e))?; // durable (redb's default)
        log.durable(tag, seq);
        let state = State {
            seq,
            commits_since_checkpoint: 0,
            poisoned: false,
        };
        Ok(Self {
            db,
            path: shown,
            tag,
            log,
            state: Mutex::new(state),
        })
    }

    /// Makes everything committed so far durable in redb itself (a checkpoint).
    fn checkpoint(&self, state: &mut State) -> Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        state.commits_since_checkpoint = 0;
        self.log.durable(self.tag, state.seq);
        Ok(())
    }
}

impl Drop for Embedded {
    /// A clean close checkpoints, so the next open has nothing to replay.
    fn drop(&mut self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !state.poisoned && state.commits_since_checkpoint > 0 {
            let _ = self.checkpoint(&mut state);
        }
    }
}

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
}

fn apply(
    table: &mut redb::Table<&[u8], &[u8]>,
    writes: &[Write],
) -> Result<(), redb::StorageError> {
    for write in writes {
        match write {
            Write::Put(k, v) => {
                table.insert(k.as_slice(), v.as_slice())?;
            }
            Write::Delete(k) => {
                table.remove(k.as_slice())?;
            }
        }
    }
    Ok(())
}

impl Store for Embedded {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(KV).map_err(io)?;
        Ok(table.get(key).map_err(io)?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<crate::Pairs, Error> {
        if start >= end {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(KV).map_err(io)?;
        let mut out = Vec::new();
        for item in table.range(start..end).map_err(io)?.take(limit) {
            let (k, v) = item.map_err(io)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        let not_committed = |e: &dyn std::fmt::Display| CommitError::NotCommitted(e.to_string());
        // One commit at a time per store: its log order is its commit order.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.poisoned {
            return Err(CommitError::NotCommitted(format!(
                "{}: an earlier commit failed after it was logged; restart to replay the log",
                self.path
            )));
        }
        let mut txn = self.db.begin_write().map_err(|e| not_committed(&e))?;
        let seq = state.seq + 1;
        {
            let mut table = txn.open_table(KV).map_err(|e| not_committed(&e))?;
            for (key, expect) in &batch.preconditions {
                let current = table.get(key.as_slice()).map_err(|e| not_committed(&e))?;
                if !expect.holds(current.as_ref().map(|v| v.value())) {
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
            apply(&mut table, &batch.writes).map_err(|e| not_committed(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| not_committed(&e))?;
            meta.insert(APPLIED_SEQ, seq)
                .map_err(|e| not_committed(&e))?;
        }
        if state.commits_since_checkpoint + 1 >= CHECKPOINT_COMMITS {
            // This redb commit is itself durable and covers every logged commit: no record.
            txn.set_durability(Durability::Immediate)
                .map_err(|e| not_committed(&e))?;
            txn.commit().map_err(|e| {
                state.poisoned = true; // the outcome is unknown; do not build on it
                CommitError::Unknown(e.to_string())
            })?;
            state.seq = seq;
            state.commits_since_checkpoint = 0;
            self.log.durable(self.tag, seq);
            return Ok(());
        }
        txn.set_durability(Durability::None)
            .map_err(|e| not_committed(&e))?;
        if let Err(e) = self.log.append(self.tag, seq, &batch.writes) {
            // Part of the record may be on disk. Unknown, and no further commits here.
            state.poisoned = true;
            return Err(CommitError::Unknown(format!("log append: {e}")));
        }
        state.seq = seq;
        state.commits_since_checkpoint += 1;
        txn.commit().map_err(|e| {
            state.poisoned = true;
            CommitError::Unknown(format!("logged but not applied (restart replays it): {e}"))
        })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let bytes = std::fs::read(newest).unwrap();
        std::fs::write(newest, &bytes[..bytes.len() - 2]).unwrap();
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
    fn checkpoints_keep_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Embedded::open(&path).unwrap();
        for i in 0..(CHECKPOINT_COMMITS + 3) {
            let mut b = WriteBatch::default();
            b.put(i.to_be_bytes().to_vec(), vec![1]);
            store.commit(&b).unwrap();
        }
        drop(store);
        let store = Embedded::open(&path).unwrap();
        let all = store.scan(&[], &[0xFF; 9], usize::MAX).unwrap();
        assert_eq!(all.len() as u64, CHECKPOINT_COMMITS + 3);
    }

    #[test]
    fn shards_share_one_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = open_shards(dir.path(), 3, 4 << 20).unwrap();
            for (i, store) in stores.iter().enumerate() {
                let mut b = WriteBatch::default();
                b.put(b"k".to_vec(), vec![i as u8]);
                store.commit(&b).unwrap();
            }
        }
        let stores = open_shards(dir.path(), 3, 4 << 20).unwrap();
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
}
