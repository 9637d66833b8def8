//! Where a shard's keys live in FoundationDB: each key of the ledger (`S <shard> <kind> ...`,
//! `ledger_shard::keys`) as a byte-string element under the subspace `("ledger", <cluster
//! name>, <shard>)`, packed by the tuple layer. The tuple layer keeps the order of byte
//! strings, so the ledger's range `[start, end)` is the packed range `[key(start), key(end))`,
//! and a shard's keys are one contiguous range ([`ShardSpace::range`]) that holds no other
//! shard's or cluster's.

use std::borrow::Cow;

use foundationdb_tuple::{Bytes, Subspace};

/// The first element of every key the ledger writes.
pub const ROOT: &str = "ledger";

/// A key read back from FoundationDB that is not one of this shard's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} is not a key of this shard's subspace: {reason}")]
pub struct ForeignKey {
    pub key: Vec<u8>,
    pub reason: String,
}

/// The subspace of one shard of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSpace {
    space: Subspace,
}

impl ShardSpace {
    pub fn new(cluster: &str, shard: u32) -> Self {
        Self {
            space: Subspace::all().subspace(&(ROOT, cluster, shard)),
        }
    }

    /// The FoundationDB key of the ledger's `key`.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        self.space.pack(&Bytes(Cow::Borrowed(key)))
    }

    /// The ledger's key of a FoundationDB key of this shard.
    pub fn decode(&self, fdb_key: &[u8]) -> Result<Vec<u8>, ForeignKey> {
        if !self.space.is_start_of(fdb_key) {
            return Err(ForeignKey {
                key: fdb_key.to_vec(),
                reason: "another subspace".into(),
            });
        }
        self.space
            .unpack::<Bytes>(fdb_key)
            .map(|b| b.0.into_owned())
            .map_err(|e| ForeignKey {
                key: fdb_key.to_vec(),
                reason: e.to_string(),
            })
    }

    /// `[start, end)` of every key of this shard.
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        self.space.range()
    }

    /// The FoundationDB range of the ledger's range `[start, end)`.
    pub fn range_of(&self, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
        (self.key(start), self.key(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte string of up to three bytes over an alphabet with the escaped byte (0x00),
    /// the escape's partner (0xFF) and bytes around them.
    fn small_keys() -> Vec<Vec<u8>> {
        let alphabet = [0x00u8, 0x01, 0x02, 0x7F, 0xFE, 0xFF];
        let mut keys = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for k in &last {
                for b in alphabet {
                    let mut longer = k.clone();
                    longer.push(b);
                    next.push(longer);
                }
            }
            keys.extend(next.iter().cloned());
            last = next;
        }
        keys
    }

    #[test]
    fn packing_keeps_the_order_of_keys_and_round_trips() {
        let space = ShardSpace::new("eu", 7);
        let keys = small_keys();
        for a in &keys {
            assert_eq!(&space.decode(&space.key(a)).unwrap(), a);
            for b in &keys {
                assert_eq!(
                    a.cmp(b),
                    space.key(a).cmp(&space.key(b)),
                    "{a:?} against {b:?}"
                );
            }
        }
    }

    #[test]
    fn a_shard_is_one_range_holding_no_other_shard_or_cluster() {
        let space = ShardSpace::new("eu", 7);
        let (start, end) = space.range();
        for key in small_keys() {
            let packed = space.key(&key);
            assert!(start <= packed && packed < end, "{key:?}");
        }
        for other in [
            ShardSpace::new("eu", 8),
            ShardSpace::new("eu", 70),
            ShardSpace::new("eu2", 7),
            ShardSpace::new("e", 7),
        ] {
            for key in small_keys() {
                let packed = other.key(&key);
                assert!(!(start <= packed && packed < end), "{other:?} {key:?}");
                assert!(space.decode(&packed).is_err());
            }
        }
    }

    /// A ledger range maps to the packed range holding exactly the keys inside it.
    #[test]
    fn a_ledger_range_is_the_packed_range_of_its_ends() {
        let space = ShardSpace::new("us", 0);
        let keys = small_keys();
        let (start, end) = (vec![0x01], vec![0x7F, 0x00]);
        let (fdb_start, fdb_end) = space.range_of(&start, &end);
        for key in &keys {
            let inside = start <= *key && *key < end;
            let packed = space.key(key);
            assert_eq!(inside, fdb_start <= packed && packed < fdb_end, "{key:?}");
        }
    }
}
