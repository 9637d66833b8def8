//! A seeded cluster: regions, nodes (each with its clock's skew), shards with their region and
//! owner, as a cluster file the real map check accepts, and the real placement rings that put
//! each account on a shard of its home region.

use std::collections::BTreeMap;

use rand::Rng;
use rand::rngs::StdRng;

use ledger_domain::ShardId;
use ledger_domain::cluster::{ClusterFile, ClusterMap, NodeEntry, RegionEntry, ShardEntry};
use ledger_shard::directory::Rings;

/// Nodes and shards a seed may choose at most (a bound on a run's cost).
const NODES_PER_REGION_MAX: usize = 3;
const SHARDS_PER_NODE_MAX: usize = 2;

#[derive(Clone, Debug)]
pub struct SimNode {
    pub id: String,
    pub region: usize,
    /// How far its clock is from the simulation's (ms).
    pub skew_ms: i64,
}

#[derive(Debug)]
pub struct Topology {
    pub regions: Vec<String>,
    pub nodes: Vec<SimNode>,
    /// Per region: whether its shards' stores are shared by its nodes (as with FoundationDB),
    /// so that another node of the region may take a shard over.
    pub shared: Vec<bool>,
    pub map: ClusterMap,
    pub rings: Rings,
}

impl Topology {
    pub fn seeded(rng: &mut StdRng) -> Self {
        let region_count = rng.random_range(1..=3usize);
        let regions: Vec<String> = ["eu", "us", "ap"][..region_count]
            .iter()
            .map(|r| r.to_string())
            .collect();
        let skews = [0, 0, 0, 150, -150, 2_000, -2_000];
        let mut nodes = Vec::new();
        let mut shard_entries = Vec::new();
        let mut shards = 0u32;
        for (r, region) in regions.iter().enumerate() {
            let count = rng.random_range(1..=NODES_PER_REGION_MAX);
            for n in 0..count {
                let id = format!("{region}-{}", n + 1);
                let owned = rng.random_range(1..=SHARDS_PER_NODE_MAX);
                for _ in 0..owned {
                    shard_entries.push(ShardEntry {
                        ids: shards.to_string(),
                        region: region.clone(),
                        owner: id.clone(),
                    });
                    shards += 1;
                }
                nodes.push(SimNode {
                    id,
                    region: r,
                    skew_ms: skews[rng.random_range(0..skews.len())],
                });
            }
        }
        let shared = regions
            .iter()
            .enumerate()
            .map(|(r, _)| {
                nodes.iter().filter(|n| n.region == r).count() > 1 && rng.random_bool(0.5)
            })
            .collect();
        let file = ClusterFile {
            version: 1,
            shards,
            vnodes_per_shard: 16,
            regions: regions
                .iter()
                .map(|name| RegionEntry { name: name.clone() })
                .collect(),
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| NodeEntry {
                    id: n.id.clone(),
                    region: regions[n.region].clone(),
                    client_address: format!("127.0.0.1:{}", 1_000 + 2 * i),
                    peer_address: format!("127.0.0.1:{}", 1_001 + 2 * i),
                })
                .collect(),
            shard_entries,
        };
        let map = file.check().expect("a seeded cluster file is valid");
        let rings = Rings::of_map(&map);
        Topology {
            regions,
            nodes,
            shared,
            map,
            rings,
        }
    }

    pub fn shards(&self) -> u32 {
        self.map.shard_count()
    }

    /// The node that owns `shard` in the map.
    pub fn owner(&self, shard: ShardId) -> usize {
        let owner = &self.map.shards[shard.0 as usize].owner;
        self.node(owner)
    }

    pub fn node(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn region_of_shard(&self, shard: ShardId) -> usize {
        self.nodes[self.owner(shard)].region
    }

    /// Other nodes of `shard`'s region that may take it over (none unless its store is shared).
    pub fn successors(&self, shard: ShardId, leader: usize) -> Vec<usize> {
        let region = self.region_of_shard(shard);
        if !self.shared[region] {
            return Vec::new();
        }
        (0..self.nodes.len())
            .filter(|n| *n != leader && self.nodes[*n].region == region)
            .collect()
    }

    /// The home shard of an account of `region` placed by `key` (the real rings).
    pub fn home(&self, region: usize, key: &str) -> ShardId {
        self.rings
            .home(&self.regions[region], key)
            .expect("every seeded region has shards")
    }

    /// Shards per node, for `-v`.
    pub fn describe(&self) -> String {
        let mut by_node: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (s, place) in self.map.shards.iter().enumerate() {
            by_node.entry(&place.owner).or_default().push(s as u32);
        }
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "{}{} shards {:?} skew {} ms",
                    n.id,
                    if self.shared[n.region] {
                        " (shared store)"
                    } else {
                        ""
                    },
                    by_node.get(n.id.as_str()).cloned().unwrap_or_default(),
                    n.skew_ms
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
