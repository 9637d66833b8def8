//! The cluster map: regions, nodes, and each shard's home region and owner node, with a
//! version. Every node of a cluster holds the same map (written at `ledgerd init` from one
//! cluster file) and every node-to-node call carries its version (docs/design/0002-cluster.md).
//!
//! [`ClusterFile`] is the file's form (TOML), [`ClusterMap`] the checked map: building one
//! refuses a file that names an unknown region or owner, leaves a shard without an owner,
//! gives one shard twice, reuses a node id or an address, or puts a shard on a node of another
//! region, each with what and where ([`MapError`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ShardId;

/// A cluster file as written (TOML; `deploy/cluster.toml` is an example).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The map's version: every node-to-node call carries it, and a node refuses a call made
    /// under another one. At least 1.
    pub version: u64,
    /// How many shards the cluster has, fixed at init.
    pub shards: u32,
    /// Virtual nodes per shard on the placement ring.
    #[serde(default = "vnodes_default")]
    pub vnodes_per_shard: u32,
    pub regions: Vec<RegionEntry>,
    pub nodes: Vec<NodeEntry>,
    /// Which shards live where: each entry gives a shard or a range (`"0-7"`).
    #[serde(rename = "shard")]
    pub shard_entries: Vec<ShardEntry>,
}

fn vnodes_default() -> u32 {
    crate::Placement::VNODES_PER_SHARD_DEFAULT
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: String,
    pub region: String,
    /// Where clients call it (`LedgerService`).
    pub client_address: String,
    /// Where other nodes call it (`ledger.internal.v1`), apart so it can be firewalled.
    pub peer_address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// One shard (`"3"`) or an inclusive range (`"0-7"`).
    pub ids: String,
    /// The shard's home region: accounts of that region are placed over its shards.
    pub region: String,
    /// The node that leads it (its data is on that node's disk).
    pub owner: String,
}

/// A node of the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub region: String,
    pub client_address: String,
    pub peer_address: String,
}

/// A shard of the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlace {
    pub region: String,
    pub owner: String,
}

/// A checked cluster map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub version: u64,
    pub vnodes_per_shard: u32,
    pub regions: Vec<String>,
    pub nodes: Vec<NodeInfo>,
    /// Indexed by shard id.
    pub shards: Vec<ShardPlace>,
}

/// What is wrong with a cluster file; each names what and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    #[error("version must be at least 1")]
    VersionZero,
    #[error("shards must be at least 1")]
    NoShards,
    #[error("vnodes_per_shard must be at least 1")]
    NoVnodes,
    #[error("region {region:?} is listed twice")]
    RegionTwice { region: String },
    #[error("{what} names region {region:?}, which is not among the regions")]
    UnknownRegion { what: String, region: String },
    #[error("node id {id:?} is used by two nodes")]
    NodeTwice { id: String },
    #[error("address {address} is used twice: by node {first:?} and by node {second:?}")]
    AddressTwice {
        address: String,
        first: String,
        second: String,
    },
    #[error("shard entry {ids:?}: not a shard number or a range like \"0-7\"")]
    BadShardIds { ids: String },
    #[error("shard entry {ids:?}: shard {shard} is past the last shard ({last})")]
    ShardOutOfRange { ids: String, shard: u32, last: u32 },
    #[error("shard {shard} is given twice (entries {first:?} and {second:?})")]
    ShardTwice {
        shard: u32,
        first: String,
        second: String,
    },
    #[error("shard {shard} is given by no entry: every shard needs a region and an owner")]
    ShardUnowned { shard: u32 },
    #[error("shard entry {ids:?}: owner {owner:?} is not among the nodes")]
    UnknownOwner { ids: String, owner: String },
    #[error(
        "shard entry {ids:?}: owner {owner:?} is in region {owner_region:?}, not the shards' region {region:?}"
    )]
    OwnerInOtherRegion {
        ids: String,
        owner: String,
        owner_region: String,
        region: String,
    },
    #[error("region {region:?} has no shards, so no account could live there")]
    RegionWithoutShards { region: String },
    #[error("node {node:?} is not in the cluster file (its nodes: {nodes})")]
    NodeNotInMap { node: String, nodes: String },
}

impl ClusterFile {
    /// Checks the file and builds the map.
    pub fn check(&self) -> Result<ClusterMap, MapError> {
        if self.version == 0 {
            return Err(MapError::VersionZero);
        }
        if self.shards == 0 {
            return Err(MapError::NoShards);
        }
        if self.vnodes_per_shard == 0 {
            return Err(MapError::NoVnodes);
        }
        let mut regions = BTreeSet::new();
        for r in &self.regions {
            if !regions.insert(r.name.as_str()) {
                return Err(MapError::RegionTwice {
                    region: r.name.clone(),
                });
            }
        }
        let known_region = |what: String, region: &str| {
            if regions.contains(region) {
                Ok(())
            } else {
                Err(MapError::UnknownRegion {
                    what,
                    region: region.to_string(),
                })
            }
        };
        let mut nodes: BTreeMap<&str, &NodeEntry> = BTreeMap::new();
        let mut addresses: BTreeMap<&str, &str> = BTreeMap::new();
        for n in &self.nodes {
            known_region(format!("node {:?}", n.id), &n.region)?;
            if nodes.insert(n.id.as_str(), n).is_some() {
                return Err(MapError::NodeTwice { id: n.id.clone() });
            }
            for address in [&n.client_address, &n.peer_address] {
                if let Some(first) = addresses.insert(address.as_str(), n.id.as_str()) {
                    return Err(MapError::AddressTwice {
                        address: address.clone(),
                        first: first.to_string(),
                        second: n.id.clone(),
                    });
                }
            }
        }
        let mut shards: Vec<Option<(&ShardEntry, ShardPlace)>> =
            (0..self.shards).map(|_| None).collect();
        for entry in &self.shard_entries {
            let what = format!("shard entry {:?}", entry.ids);
            known_region(what, &entry.region)?;
            let owner = nodes
                .get(entry.owner.as_str())
                .ok_or_else(|| MapError::UnknownOwner {
                    ids: entry.ids.clone(),
                    owner: entry.owner.clone(),
                })?;
            if owner.region != entry.region {
                return Err(MapError::OwnerInOtherRegion {
                    ids: entry.ids.clone(),
                    owner: entry.owner.clone(),
                    owner_region: owner.region.clone(),
                    region: entry.region.clone(),
                });
            }
            for shard in shard_range(&entry.ids)? {
                let slot =
                    shards
                        .get_mut(shard as usize)
                        .ok_or_else(|| MapError::ShardOutOfRange {
                            ids: entry.ids.clone(),
                            shard,
                            last: self.shards - 1,
                        })?;
                if let Some((first, _)) = slot {
                    return Err(MapError::ShardTwice {
                        shard,
                        first: first.ids.clone(),
                        second: entry.ids.clone(),
                    });
                }
                *slot = Some((
                    entry,
                    ShardPlace {
                        region: entry.region.clone(),
                        owner: entry.owner.clone(),
                    },
                ));
            }
        }
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(shard, place)| {
                place.map(|(_, place)| place).ok_or(MapError::ShardUnowned {
                    shard: shard as u32,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for region in &regions {
            if !shards.iter().any(|s| s.region == *region) {
                return Err(MapError::RegionWithoutShards {
                    region: (*region).to_string(),
                });
            }
        }
        Ok(ClusterMap {
            version: self.version,
            vnodes_per_shard: self.vnodes_per_shard,
            regions: self.regions.iter().map(|r| r.name.clone()).collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeInfo {
                    id: n.id.clone(),
                    region: n.region.clone(),
                    client_address: n.client_address.clone(),
                    peer_address: n.peer_address.clone(),
                })
                .collect(),
            shards,
        })
    }
}

/// `"3"` or `"0-7"` (inclusive).
fn shard_range(ids: &str) -> Result<std::ops::RangeInclusive<u32>, MapError> {
    let bad = || MapError::BadShardIds {
        ids: ids.to_string(),
    };
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
    match ids.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (number(first)?, number(last)?);
            if first > last {
                return Err(bad());
            }
            Ok(first..=last)
        }
        None => {
            let one = number(ids)?;
            Ok(one..=one)
        }
    }
}

impl ClusterMap {
    /// The map of one node owning every shard, in one region: what a single-node `ledgerd
    /// start` on an empty directory makes.
    pub fn single_node(
        shard_count: u32,
        vnodes_per_shard: u32,
        node: NodeInfo,
    ) -> Result<Self, MapError> {
        let region = node.region.clone();
        let owner = node.id.clone();
        ClusterFile {
            version: 1,
            shards: shard_count,
            vnodes_per_shard,
            regions: vec![RegionEntry {
                name: region.clone(),
            }],
            nodes: vec![NodeEntry {
                id: node.id,
                region: node.region,
                client_address: node.client_address,
                peer_address: node.peer_address,
            }],
            shard_entries: vec![ShardEntry {
                ids: format!("0-{}", shard_count.saturating_sub(1)),
                region,
                owner,
            }],
        }
        .check()
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn node(&self, id: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Checks that `id` is a node of this map.
    pub fn require_node(&self, id: &str) -> Result<&NodeInfo, MapError> {
        self.node(id).ok_or_else(|| MapError::NodeNotInMap {
            node: id.to_string(),
            nodes: self
                .nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The shards `node` owns.
    pub fn shards_of(&self, node: &str) -> Vec<ShardId> {
        (0..self.shard_count())
            .filter(|s| self.shards[*s as usize].owner == node)
            .map(ShardId)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
version = 3
shards = 8

[[regions]]
name = "eu"
[[regions]]
name = "us"

[[nodes]]
id = "eu-1"
region = "eu"
client_address = "127.0.0.1:50051"
peer_address = "127.0.0.1:51051"
[[nodes]]
id = "eu-2"
region = "eu"
client_address = "127.0.0.1:50052"
peer_address = "127.0.0.1:51052"
[[nodes]]
id = "us-1"
region = "us"
client_address = "127.0.0.1:50053"
peer_address = "127.0.0.1:51053"

[[shard]]
ids = "0-2"
region = "eu"
owner = "eu-1"
[[shard]]
ids = "3"
region = "eu"
owner = "eu-2"
[[shard]]
ids = "4-7"
region = "us"
owner = "us-1"
"#;

    fn file() -> ClusterFile {
        toml::from_str(FILE).unwrap()
    }

    #[test]
    fn a_good_file_makes_the_map() {
        let map = file().check().unwrap();
        assert_eq!((map.version, map.shard_count()), (3, 8));
        assert_eq!(map.shards_of("eu-1"), [ShardId(0), ShardId(1), ShardId(2)]);
        assert_eq!(map.shards_of("eu-2"), [ShardId(3)]);
        assert_eq!(map.shards[5].region, "us");
        assert!(map.require_node("us-1").is_ok());
        let err = map.require_node("ap-1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"ap-1\" is not in the cluster file (its nodes: eu-1, eu-2, us-1)"
        );
    }

    /// Each mistake is refused, and the message says what and where.
    #[test]
    fn each_mistake_is_refused_by_name() {
        type Change = Box<dyn Fn(&mut ClusterFile)>;
        let cases: Vec<(&str, Change, &str)> = vec![
            (
                "unknown region of a node",
                Box::new(|f| f.nodes[2].region = "ap".into()),
                "node \"us-1\" names region \"ap\", which is not among the regions",
            ),
            (
                "unknown region of a shard",
                Box::new(|f| f.shard_entries[2].region = "ap".into()),
                "shard entry \"4-7\" names region \"ap\", which is not among the regions",
            ),
            (
                "a shard given twice",
                Box::new(|f| f.shard_entries[1].ids = "2".into()),
                "shard 2 is given twice (entries \"0-2\" and \"2\")",
            ),
            (
                "a shard owned by no node",
                Box::new(|f| f.shard_entries[2].ids = "4-6".into()),
                "shard 7 is given by no entry: every shard needs a region and an owner",
            ),
            (
                "an owner not in the file",
                Box::new(|f| f.shard_entries[1].owner = "eu-9".into()),
                "shard entry \"3\": owner \"eu-9\" is not among the nodes",
            ),
            (
                "an owner of another region",
                Box::new(|f| f.shard_entries[1].owner = "us-1".into()),
                "shard entry \"3\": owner \"us-1\" is in region \"us\", not the shards' region \"eu\"",
            ),
            (
                "duplicate addresses",
                Box::new(|f| f.nodes[1].peer_address = "127.0.0.1:50051".into()),
                "address 127.0.0.1:50051 is used twice: by node \"eu-1\" and by node \"eu-2\"",
            ),
            (
                "a node id twice",
                Box::new(|f| f.nodes[1].id = "eu-1".into()),
                "node id \"eu-1\" is used by two nodes",
            ),
            (
                "a shard past the end",
                Box::new(|f| f.shard_entries[2].ids = "4-8".into()),
                "shard entry \"4-8\": shard 8 is past the last shard (7)",
            ),
            (
                "a bad range",
                Box::new(|f| f.shard_entries[2].ids = "7-4".into()),
                "shard entry \"7-4\": not a shard number or a range like \"0-7\"",
            ),
            (
                "a region without shards",
                Box::new(|f| {
                    f.regions.push(RegionEntry { name: "ap".into() });
                }),
                "region \"ap\" has no shards, so no account could live there",
            ),
            (
                "version 0",
                Box::new(|f| f.version = 0),
                "version must be at least 1",
            ),
        ];
        for (what, change, message) in cases {
            let mut f = file();
            change(&mut f);
            let err = f.check().unwrap_err();
            assert_eq!(err.to_string(), message, "{what}");
        }
    }

    #[test]
    fn unknown_settings_are_refused_by_the_parser() {
        let text = FILE.replace("version = 3", "version = 3\nshard_count = 8");
        let err = toml::from_str::<ClusterFile>(&text).unwrap_err();
        assert!(err.to_string().contains("shard_count"), "{err}");
    }

    #[test]
    fn a_single_node_map_owns_every_shard() {
        let node = NodeInfo {
            id: "node-1".into(),
            region: "local".into(),
            client_address: "127.0.0.1:50051".into(),
            peer_address: "127.0.0.1:51051".into(),
        };
        let map = ClusterMap::single_node(16, 64, node).unwrap();
        assert_eq!(map.shards_of("node-1").len(), 16);
        assert_eq!(map.regions, ["local"]);
    }
}
