//! The embedded durable backend on redb: a copy-on-write B-tree in one file, one writer at a
//! time, every commit fsynced before it returns (redb's default `Durability::Immediate`).
//!
//! redb's `begin_write` blocks while another write transaction is open, so callers run commits
//! on a blocking thread; the shard runtime gives each shard its own thread and its own file.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{CommitError, Error, Store, Write, WriteBatch};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

pub struct Embedded {
    db: Database,
    path: String,
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
    /// own default is 1 GiB per file, too much with one file per shard).
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
        // Create the table up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        txn.open_table(KV).map_err(|e| open_err(e.to_string()))?;
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Self { db, path: shown })
    }
}

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
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
        let txn = self.db.begin_write().map_err(|e| not_committed(&e))?;
        {
            let mut table = txn.open_table(KV).map_err(|e| not_committed(&e))?;
            for (key, expect) in &batch.preconditions {
                let current = table.get(key.as_slice()).map_err(|e| not_committed(&e))?;
                if !expect.holds(current.as_ref().map(|v| v.value())) {
                    return Err(CommitError::Conflict { key: key.clone() });
                }
            }
            for write in &batch.writes {
                match write {
                    Write::Put(k, v) => {
                        table
                            .insert(k.as_slice(), v.as_slice())
                            .map_err(|e| not_committed(&e))?;
                    }
                    Write::Delete(k) => {
                        table.remove(k.as_slice()).map_err(|e| not_committed(&e))?;
                    }
                }
            }
        }
        // An error from the final commit (fsync) leaves the outcome unknown to us.
        txn.commit()
            .map_err(|e| CommitError::Unknown(e.to_string()))
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
    fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        std::fs::write(&path, b"this is not a database, just some text").unwrap();
        let err = Embedded::open(&path).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err}");
    }
}
