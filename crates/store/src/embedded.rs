//! The embedded durable backend: redb (a copy-on-write B-tree in one file) behind a write-ahead
//! log.
//!
//! ```text
//!  commit(batch):  check preconditions in a redb write txn
//!                  append {seq, writes} to <file>.wal, fsync   <- durable from here
//!                  apply writes + applied_seq in the txn, commit without fsync
//!  checkpoint:     every CHECKPOINT_COMMITS commits or CHECKPOINT_WAL_BYTES of log, the redb
//!                  commit is made durable instead (fsync) and the log is truncated
//!  open:           replay log records with seq > applied_seq, make durable, truncate
//! ```
//!
//! Why: a copy-on-write B-tree rewrites every leaf a commit touches. With scattered keys
//! (accounts, entries, transfer ids) a durable commit per batch wrote about 20 KiB per transfer
//! and made the disk's bandwidth the limit (docs/benchmarks.md). With the log, the fsync per
//! batch is one small sequential write, and leaves dirtied by many batches reach the disk once
//! per checkpoint.
//!
//! Visibility: a commit becomes visible to readers only after its log record is synced, so a
//! reader never sees anything that a crash could take back. A failure after the log record is
//! synced but before redb applied it leaves the store poisoned: every later commit fails until
//! the process restarts and replays the log (a leader would otherwise reload state that lacks a
//! durable commit).
//!
//! redb's `begin_write` blocks while another write transaction is open, so callers run commits
//! on a blocking thread; the shard runtime gives each shard its own thread and its own file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{CommitError, Error, Store, Write, WriteBatch};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// The log position redb has applied (in the same transaction as the writes).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED_SEQ: &str = "applied_seq";

/// Durable redb commits (and log truncations) at least this often, in commits...
pub const CHECKPOINT_COMMITS: u64 = 512;
/// ... or in bytes of log.
pub const CHECKPOINT_WAL_BYTES: u64 = 64 << 20;
/// A log record larger than this is refused (and on replay, treated as corruption).
pub const WAL_RECORD_BYTES_MAX: u64 = 1 << 30;
const WAL_MAGIC: u32 = 0x4C45_4457; // "LEDW"

pub struct Embedded {
    db: Database,
    path: String,
    wal: Mutex<Wal>,
}

struct Wal {
    file: File,
    path: PathBuf,
    /// Sequence number of the last commit (applied or logged).
    seq: u64,
    bytes: u64,
    commits_since_checkpoint: u64,
    poisoned: bool,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.path)
            .finish()
    }
}

impl Embedded {
    /// Page cache of a database opened with [`Embedded::open`].
    pub const CACHE_BYTES_DEFAULT: usize = 64 << 20;

    /// Opens (or creates) the database file with the default cache. Fails with [`Error::Open`]
    /// if another process has it open or the file is not a redb database.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with_cache(path, Self::CACHE_BYTES_DEFAULT)
    }

    /// Opens (or creates) the database file with a page cache of at most `cache_bytes` (redb's
    /// own default is 1 GiB per file, too much with one file per shard), and replays its log.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, Error> {
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
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        txn.open_table(KV).map_err(|e| open_err(e.to_string()))?;
        let applied = {
            let meta = txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
            meta.get(APPLIED_SEQ)
                .map_err(|e| open_err(e.to_string()))?
                .map_or(0, |v| v.value())
        };
        txn.commit().map_err(|e| open_err(e.to_string()))?;

        let wal_path = PathBuf::from(format!("{shown}.wal"));
        let records = read_wal(&wal_path)
            .map_err(|e| open_err(format!("its log {}: {e}", wal_path.display())))?;
        let mut seq = applied;
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            let mut table = txn.open_table(KV).map_err(|e| open_err(e.to_string()))?;
            for (record_seq, writes) in records {
                if record_seq <= applied {
                    continue; // Already in the last durable checkpoint.
                }
                if record_seq != seq + 1 {
                    return Err(open_err(format!(
                        "its log jumps from commit {seq} to {record_seq}; refusing to guess"
                    )));
                }
                apply(&mut table, &writes).map_err(|e| open_err(e.to_string()))?;
                seq = record_seq;
            }
            let mut meta = txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
            meta.insert(APPLIED_SEQ, seq)
                .map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?; // durable: the log can go
        // Append mode: after a checkpoint truncates the log, the next record goes to offset 0
        // (a plain write would land at the old offset and leave a hole that reads as garbage).
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| open_err(format!("cannot open its log: {e}")))?;
        file.set_len(0)
            .and_then(|()| file.sync_all())
            .map_err(|e| open_err(format!("cannot truncate its log: {e}")))?;
        let wal = Wal {
            file,
            path: wal_path,
            seq,
            bytes: 0,
            commits_since_checkpoint: 0,
            poisoned: false,
        };
        Ok(Self {
            db,
            path: shown,
            wal: Mutex::new(wal),
        })
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

/// Record: magic u32 | body length u32 | crc32 of body u32 | body = seq u64, count u32, then per
/// write: tag u8 (0 put, 1 delete), key length u32, key, [value length u32, value]. All
/// little-endian.
fn encode_record(seq: u64, writes: &[Write]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + writes.len() * 96);
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(
        &u32::try_from(writes.len())
            .expect("writes fit u32")
            .to_le_bytes(),
    );
    for write in writes {
        let (tag, key, value) = match write {
            Write::Put(k, v) => (0u8, k, Some(v)),
            Write::Delete(k) => (1u8, k, None),
        };
        body.push(tag);
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
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&WAL_MAGIC.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(body.len())
            .expect("record fits u32")
            .to_le_bytes(),
    );
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads every whole, intact record. A torn or corrupt tail (a crash mid-append) ends the log:
/// those records were never acknowledged.
fn read_wal(path: &Path) -> std::io::Result<Vec<(u64, Vec<Write>)>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut records = Vec::new();
    let mut at = 0usize;
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
    };
    while let (Some(magic), Some(len), Some(crc)) = (
        u32_at(&bytes, at),
        u32_at(&bytes, at + 4),
        u32_at(&bytes, at + 8),
    ) {
        let len = len as usize;
        let Some(body) = bytes.get(at + 12..at + 12 + len) else {
            break;
        };
        if magic != WAL_MAGIC || crc32fast::hash(body) != crc {
            break;
        }
        match decode_body(body) {
            Some(record) => records.push(record),
            None => break,
        }
        at += 12 + len;
    }
    Ok(records)
}

fn decode_body(body: &[u8]) -> Option<(u64, Vec<Write>)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let count = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) as usize;
    let mut at = 12;
    let mut take = |n: usize| {
        let s = body.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let mut writes = Vec::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let tag = take(1)?[0];
        let klen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(klen)?.to_vec();
        match tag {
            0 => {
                let vlen = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                writes.push(Write::Put(key, take(vlen)?.to_vec()));
            }
            1 => writes.push(Write::Delete(key)),
            _ => return None,
        }
    }
    Some((seq, writes))
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
        // One commit at a time per file: the log order is the commit order.
        let mut wal = self.wal.lock().expect("poisoned lock");
        if wal.poisoned {
            return Err(CommitError::NotCommitted(format!(
                "{}: an earlier commit failed after it was logged; restart to replay the log",
                self.path
            )));
        }
        let mut txn = self.db.begin_write().map_err(|e| not_committed(&e))?;
        let seq = wal.seq + 1;
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
        let checkpoint = wal.commits_since_checkpoint + 1 >= CHECKPOINT_COMMITS
            || wal.bytes >= CHECKPOINT_WAL_BYTES;
        if checkpoint {
            // This redb commit is itself durable and covers every logged commit: no record.
            txn.set_durability(Durability::Immediate)
                .map_err(|e| not_committed(&e))?;
            txn.commit().map_err(|e| {
                wal.poisoned = true; // the outcome is unknown; do not build on it
                CommitError::Unknown(e.to_string())
            })?;
            wal.seq = seq;
            wal.commits_since_checkpoint = 0;
            wal.bytes = 0;
            // Truncation failing is harmless (replay skips applied records), but say so.
            if let Err(e) = wal.file.set_len(0).and_then(|()| wal.file.sync_all()) {
                wal.poisoned = true;
                return Err(CommitError::Unknown(format!(
                    "log truncation of {}: {e}",
                    wal.path.display()
                )));
            }
            return Ok(());
        }
        let record = encode_record(seq, &batch.writes);
        if record.len() as u64 > WAL_RECORD_BYTES_MAX {
            return Err(CommitError::NotCommitted(format!(
                "batch of {} bytes is too large",
                record.len()
            )));
        }
        txn.set_durability(Durability::None)
            .map_err(|e| not_committed(&e))?;
        if let Err(e) = wal
            .file
            .write_all(&record)
            .and_then(|()| wal.file.sync_data())
        {
            // Part of the record may be on disk; replay ignores a torn tail, but a whole
            // record may have made it. Unknown, and no further commits in this process.
            wal.poisoned = true;
            return Err(CommitError::Unknown(format!("log append: {e}")));
        }
        wal.seq = seq;
        wal.bytes += record.len() as u64;
        wal.commits_since_checkpoint += 1;
        txn.commit().map_err(|e| {
            wal.poisoned = true;
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
        {
            let store = Embedded::open(&path).unwrap();
            for i in 0..10u8 {
                let mut b = WriteBatch::default();
                b.put(vec![b'k', i], vec![i]);
                store.commit(&b).unwrap();
            }
            // Simulate a crash: copy the files as they are now, while redb has no durable commit
            // of these (only the log has them), and open the copy.
            std::fs::copy(&path, crash.path().join("db.redb")).unwrap();
            std::fs::copy(
                dir.path().join("db.redb.wal"),
                crash.path().join("db.redb.wal"),
            )
            .unwrap();
            drop(store);
        }
        let (dir, path) = (&crash, crash.path().join("db.redb"));
        let wal = std::fs::read(dir.path().join("db.redb.wal")).unwrap();
        assert!(!wal.is_empty(), "the commits are in the log");
        // A torn tail (a crash mid-append) is ignored: append half a record.
        let mut torn = wal.clone();
        torn.extend_from_slice(&wal[..wal.len() / 20]);
        std::fs::write(dir.path().join("db.redb.wal"), &torn).unwrap();
        let store = Embedded::open(&path).unwrap();
        for i in 0..10u8 {
            assert_eq!(
                store.get(&[b'k', i]).unwrap(),
                Some(vec![i]),
                "commit {i} replayed"
            );
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("db.redb.wal"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn checkpoints_bound_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Embedded::open(&path).unwrap();
        for i in 0..(CHECKPOINT_COMMITS + 3) {
            let mut b = WriteBatch::default();
            b.put(i.to_be_bytes().to_vec(), vec![1]);
            store.commit(&b).unwrap();
        }
        let len = std::fs::metadata(dir.path().join("db.redb.wal"))
            .unwrap()
            .len();
        assert!(
            len > 0 && len < 200,
            "only the commits after the checkpoint are logged: {len}"
        );
        drop(store);
        let store = Embedded::open(&path).unwrap();
        assert_eq!(
            store.scan(&[], &[0xFF; 9], usize::MAX).unwrap().len() as u64,
            CHECKPOINT_COMMITS + 3
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
