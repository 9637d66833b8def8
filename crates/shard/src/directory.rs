//! Where an account lives (docs/design/0002-cluster.md, Where an account lives).
//!
//! An account's **home shard** is its placement key's shard on the ring of its home region's
//! shards. Its id is reserved on its **directory shard**, the id's shard on the ring of every
//! shard; when the two differ, the directory shard holds a [`Forward`] record naming the home.
//! So any node finds any account from its id alone: the directory shard's answer, or, with no
//! record there, the directory shard itself.
//!
//! [`Directory`] is a node's view: the records of the directory shards it leads (in memory,
//! complete), and a bounded cache of answers from other nodes. An account never moves, so a
//! cached answer never goes stale; only answers for accounts that exist are cached (an id not
//! yet created may still be created with another home).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use ledger_domain::{Placement, ShardId};

use ledger_store::Store;

use crate::codec::{self, DecodeError};
use crate::{ReadError, keys};

/// A directory record: account `id` is homed on another shard than its directory shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub placement_key: String,
    /// The home shard. `None` in records of format 1, written while one region held every
    /// shard: the home is then the placement key's shard on the ring of every shard.
    pub home: Option<ShardId>,
}

/// A forward record as format 2 lays it out.
#[derive(Serialize, Deserialize)]
struct ForwardV2 {
    placement_key: String,
    home: u32,
}

impl Forward {
    const WHAT: &'static str = "forward";
    /// Format 1: the placement key alone. Format 2: the placement key and the home shard.
    pub const FORMAT: u8 = 2;

    pub fn new(placement_key: String, home: ShardId) -> Self {
        Self {
            placement_key,
            home: Some(home),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let home = self.home.expect("a new forward names its home shard");
        codec::encode_format(
            Self::FORMAT,
            &ForwardV2 {
                placement_key: self.placement_key.clone(),
                home: home.0,
            },
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match codec::envelope(Self::WHAT, bytes)? {
            (Self::FORMAT, body) => {
                let v2: ForwardV2 = codec::decode_body(Self::WHAT, body)?;
                Ok(Self::new(v2.placement_key, ShardId(v2.home)))
            }
            (1, body) => Ok(Self {
                placement_key: codec::decode_body(Self::WHAT, body)?,
                home: None,
            }),
            (format, _) => Err(codec::unknown_format(Self::WHAT, format)),
        }
    }

    /// Whether an account placed by `placement_key` on `home` is the one this record reserved.
    pub fn matches(&self, placement_key: &str, home: ShardId) -> bool {
        self.placement_key == placement_key && self.home.is_none_or(|h| h == home)
    }

    /// The home shard, given the ring of every shard (for a record of format 1).
    pub fn home_on(&self, all: &Placement) -> ShardId {
        self.home
            .unwrap_or_else(|| all.shard_of(&self.placement_key))
    }
}

/// Accounts located from other nodes' answers kept at most; past it the cache starts over
/// (an answer costs one lookup to get again).
pub const LOCATIONS_CACHED_MAX: usize = 1 << 20;

/// The map's rings: every shard's (directory shards) and each region's (home shards).
#[derive(Clone, Debug)]
pub struct Rings {
    pub all: Placement,
    pub regions: BTreeMap<String, Placement>,
}

impl Rings {
    pub fn of_map(map: &ledger_domain::cluster::ClusterMap) -> Self {
        let all = Placement::new(map.shard_count(), map.vnodes_per_shard);
        let regions = map
            .regions
            .iter()
            .map(|region| {
                let shards: Vec<ShardId> = (0..map.shard_count())
                    .filter(|s| map.shards[*s as usize].region == *region)
                    .map(ShardId)
                    .collect();
                let ring = Placement::of_shards(&shards, map.vnodes_per_shard);
                (region.clone(), ring)
            })
            .collect();
        Self { all, regions }
    }

    /// The home shard of an account placed by `placement_key` in `region`; `None` for a
    /// region the map does not have.
    pub fn home(&self, region: &str, placement_key: &str) -> Option<ShardId> {
        self.regions
            .get(region)
            .map(|ring| ring.shard_of(placement_key))
    }

    /// The shard that reserves account ids like `id`.
    pub fn directory(&self, id: &str) -> ShardId {
        self.all.shard_of(id)
    }
}

/// A node's knowledge of where accounts live.
pub struct Directory {
    rings: Rings,
    /// Indexed by shard: whether this node leads it and holds its records. Fixed for a node
    /// with stores of its own; with a shared store, set while this node's term lasts
    /// ([`Directory::lead`]).
    local: Vec<AtomicBool>,
    /// The forward records of the directory shards this node leads: every one of them.
    forwards: RwLock<HashMap<String, ShardId>>,
    /// Answers from other nodes, for accounts that exist.
    cache: Mutex<HashMap<String, ShardId>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The forward records `store` holds for directory shard `shard`: id and home.
pub fn forwards_of(
    store: &dyn Store,
    shard: ShardId,
    all: &Placement,
) -> Result<Vec<(String, ShardId)>, ReadError> {
    let (start, end) = keys::forwards(shard);
    store
        .scan(&start, &end, usize::MAX)?
        .into_iter()
        .map(|(key, value)| {
            let (id, _) = ledger_store::key::read_str(&key, 6).ok_or_else(|| {
                ReadError::Decode(codec::DecodeError {
                    what: "forward key",
                    reason: format!("{key:?}"),
                })
            })?;
            Ok((id, Forward::decode(&value)?.home_on(all)))
        })
        .collect()
}

/// A directory shard's answer for an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// Where the account lives, or would live if it were created with no placement key.
    pub home: ShardId,
    /// Whether the directory shard knows the account exists (else `home` is the directory
    /// shard itself, and is not cached).
    pub exists: bool,
}

impl Directory {
    pub fn new(rings: Rings, local: Vec<bool>, forwards: HashMap<String, ShardId>) -> Self {
        Self {
            rings,
            local: local.into_iter().map(AtomicBool::new).collect(),
            forwards: RwLock::new(forwards),
            cache: Mutex::new(HashMap::default()),
        }
    }

    pub fn rings(&self) -> &Rings {
        &self.rings
    }

    pub fn is_local(&self, shard: ShardId) -> bool {
        self.local
            .get(shard.0 as usize)
            .is_some_and(|l| l.load(Ordering::Acquire))
    }

    /// This node began leading directory shard `shard` (a shared store): its forward records
    /// are read again, for another leader may have written some since, and only then are its
    /// ids answered from here. A term that has taken the lease fences every older leader, so
    /// what it reads is complete.
    pub fn lead(&self, store: &dyn Store, shard: ShardId) -> Result<(), ReadError> {
        let found = forwards_of(store, shard, &self.rings.all)?;
        self.forwards.write().expect("poisoned").extend(found);
        self.local[shard.0 as usize].store(true, Ordering::Release);
        Ok(())
    }

    /// This node's term for `shard` ended: its ids are asked of its next leader. The records
    /// read stay (an account never moves).
    pub fn follow(&self, shard: ShardId) {
        self.local[shard.0 as usize].store(false, Ordering::Release);
    }

    /// The home of account `id` if this node knows it without asking another node: its
    /// directory shard is led here, or an earlier answer is cached.
    pub fn home(&self, id: &str) -> Option<ShardId> {
        // A record first: it exists only for ids whose directory shard is led here, and
        // answers without hashing the id onto the ring (every call locates its accounts).
        {
            let forwards = self.forwards.read().expect("poisoned");
            if !forwards.is_empty()
                && let Some(home) = forwards.get(id)
            {
                return Some(*home);
            }
        }
        let directory = self.rings.directory(id);
        if self.is_local(directory) {
            // No record: the account lives on its directory shard (or does not exist).
            return Some(directory);
        }
        self.cache.lock().expect("poisoned").get(id).copied()
    }

    /// The forward record this node holds for `id`, if its directory shard is led here.
    pub fn forward(&self, id: &str) -> Option<ShardId> {
        self.forwards.read().expect("poisoned").get(id).copied()
    }

    /// Records that `id` lives on `home`, once its directory shard has accepted it (here) or
    /// another node has said so.
    pub fn remember(&self, id: &str, home: ShardId) {
        if self.is_local(self.rings.directory(id)) {
            if home != self.rings.directory(id) {
                self.forwards
                    .write()
                    .expect("poisoned")
                    .insert(id.to_string(), home);
            }
            return;
        }
        let mut cache = self.cache.lock().expect("poisoned");
        if cache.len() >= LOCATIONS_CACHED_MAX {
            cache.clear();
        }
        cache.insert(id.to_string(), home);
    }
}

#[cfg(test)]
mod tests {
    use ledger_domain::cluster::ClusterFile;

    use super::*;

    const MAP: &str = r#"
version = 1
shards = 6
[[regions]]
name = "eu"
[[regions]]
name = "us"
[[nodes]]
id = "eu-1"
region = "eu"
client_address = "127.0.0.1:1"
peer_address = "127.0.0.1:2"
[[nodes]]
id = "us-1"
region = "us"
client_address = "127.0.0.1:3"
peer_address = "127.0.0.1:4"
[[shard]]
ids = "0-2"
region = "eu"
owner = "eu-1"
[[shard]]
ids = "3-5"
region = "us"
owner = "us-1"
"#;

    fn rings() -> Rings {
        let file: ClusterFile = toml::from_str(MAP).unwrap();
        Rings::of_map(&file.check().unwrap())
    }

    #[test]
    fn an_account_is_homed_on_a_shard_of_its_region() {
        let rings = rings();
        for i in 0..500 {
            let key = format!("acct:{i}");
            assert!(rings.home("eu", &key).unwrap().0 < 3, "{key}");
            assert!(rings.home("us", &key).unwrap().0 >= 3, "{key}");
        }
        assert_eq!(rings.home("ap", "x"), None);
    }

    #[test]
    fn a_node_knows_the_ids_of_its_directory_shards_and_caches_the_rest() {
        let rings = rings();
        let local = vec![true, true, true, false, false, false];
        let ours = (0..)
            .map(|i| format!("a{i}"))
            .find(|id| rings.directory(id).0 < 3)
            .unwrap();
        let theirs = (0..)
            .map(|i| format!("a{i}"))
            .find(|id| rings.directory(id).0 >= 3)
            .unwrap();
        let directory = Directory::new(rings.clone(), local, HashMap::default());
        assert_eq!(directory.home(&ours), Some(rings.directory(&ours)));
        assert_eq!(directory.home(&theirs), None, "asks the other node");
        directory.remember(&theirs, ShardId(1));
        assert_eq!(directory.home(&theirs), Some(ShardId(1)));
        directory.remember(&ours, ShardId(4));
        assert_eq!(directory.home(&ours), Some(ShardId(4)), "a forward of ours");
        assert_eq!(directory.forward(&ours), Some(ShardId(4)));
    }

    #[test]
    fn forward_records_of_both_formats_decode() {
        let new = Forward::new("key".into(), ShardId(5));
        assert_eq!(Forward::decode(&new.encode()).unwrap(), new);
        let old = codec::encode(&"key".to_string());
        let old = Forward::decode(&old).unwrap();
        assert_eq!(old.home, None);
        assert!(
            old.matches("key", ShardId(9)),
            "format 1 compares keys only"
        );
        assert!(new.matches("key", ShardId(5)));
        assert!(!new.matches("key", ShardId(4)), "same key, another region");
        assert!(!new.matches("other", ShardId(5)));
    }
}
