//! In-memory backend for tests and simulation. Same semantics as the durable backends, minus
//! durability.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::{CommitError, Error, Store, Write, WriteBatch};

#[derive(Debug, Default)]
pub struct Memory {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for Memory {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.map.lock().expect("poisoned").get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<crate::Pairs, Error> {
        if start >= end {
            return Ok(Vec::new());
        }
        let map = self.map.lock().expect("poisoned");
        Ok(map
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        self.commit_owned(batch.clone())
    }

    fn commit_owned(&self, batch: WriteBatch) -> Result<(), CommitError> {
        let mut map = self.map.lock().expect("poisoned");
        for (key, expect) in &batch.preconditions {
            if !expect.holds(map.get(key).map(Vec::as_slice)) {
                return Err(CommitError::Conflict { key: key.clone() });
            }
        }
        for write in batch.writes {
            match write {
                Write::Put(k, v) => {
                    map.insert(k, v);
                }
                Write::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
