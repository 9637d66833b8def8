//! Which shard holds an account: consistent hashing of its placement key over the shards, with
//! virtual nodes (the `hashring` crate, whose default SipHash has fixed keys, so placement is
//! the same in every process and every run).
//!
//! Placement must never change for an existing cluster: the shard count and the virtual node
//! count are recorded in the cluster metadata at `init`, and `tests` below pin known keys.

use hashring::HashRing;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A virtual node: `replica` distinguishes the points one shard owns on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct VNode {
    shard: u32,
    replica: u32,
}

#[derive(Clone)]
pub struct Placement {
    ring: HashRing<VNode>,
    shard_count: u32,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("shard_count", &self.shard_count)
            .finish()
    }
}

impl Placement {
    /// Virtual nodes per shard: enough that 16 shards get within a few percent of an even share.
    pub const VNODES_PER_SHARD_DEFAULT: u32 = 64;

    pub fn new(shard_count: u32, vnodes_per_shard: u32) -> Self {
        assert!(shard_count > 0, "a cluster needs at least one shard");
        let all: Vec<ShardId> = (0..shard_count).map(ShardId).collect();
        Self::of_shards(&all, vnodes_per_shard)
    }

    /// The ring of some shards only (one region's): each shard keeps the points it has on the
    /// ring of every shard, so a region that holds every shard places keys exactly as
    /// [`Placement::new`] does.
    pub fn of_shards(shards: &[ShardId], vnodes_per_shard: u32) -> Self {
        assert!(!shards.is_empty(), "a ring needs at least one shard");
        assert!(
            vnodes_per_shard > 0,
            "a shard needs at least one virtual node"
        );
        let mut ring = HashRing::new();
        ring.batch_add(
            shards
                .iter()
                .flat_map(|shard| {
                    (0..vnodes_per_shard).map(move |replica| VNode {
                        shard: shard.0,
                        replica,
                    })
                })
                .collect(),
        );
        Self {
            ring,
            shard_count: shards.len() as u32,
        }
    }

    /// How many shards the ring holds.
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn shard_of(&self, placement_key: &str) -> ShardId {
        let vnode = self.ring.get(&placement_key).expect("ring is never empty");
        ShardId(vnode.shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_pinned() {
        // If this fails, placement changed: existing clusters would look for accounts on the
        // wrong shard. Never update these values without a migration.
        let p = Placement::new(16, Placement::VNODES_PER_SHARD_DEFAULT);
        let got: Vec<u32> = ["alice", "bob", "carol", "acct:1", "acct:2"]
            .iter()
            .map(|k| p.shard_of(k).0)
            .collect();
        assert_eq!(got, PINNED);
    }

    const PINNED: [u32; 5] = [6, 11, 1, 13, 2];

    #[test]
    fn spreads_keys() {
        let p = Placement::new(16, Placement::VNODES_PER_SHARD_DEFAULT);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[p.shard_of(&format!("acct:{i}")).0 as usize] += 1;
        }
        // Each shard should get roughly 1000; allow a wide margin.
        assert!(
            counts.iter().all(|&c| (500..1600).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_region_of_every_shard_places_as_the_whole_ring() {
        let all: Vec<ShardId> = (0..16).map(ShardId).collect();
        let whole = Placement::new(16, Placement::VNODES_PER_SHARD_DEFAULT);
        let region = Placement::of_shards(&all, Placement::VNODES_PER_SHARD_DEFAULT);
        for i in 0..1_000 {
            let key = format!("acct:{i}");
            assert_eq!(region.shard_of(&key), whole.shard_of(&key), "{key}");
        }
    }

    #[test]
    fn a_region_places_only_on_its_shards() {
        let region = [ShardId(3), ShardId(7), ShardId(11)];
        let p = Placement::of_shards(&region, Placement::VNODES_PER_SHARD_DEFAULT);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..3_000 {
            let shard = p.shard_of(&format!("acct:{i}"));
            assert!(region.contains(&shard), "{shard}");
            seen.insert(shard);
        }
        assert_eq!(seen.len(), 3, "every shard of the region gets keys");
    }

    #[test]
    fn one_shard() {
        let p = Placement::new(1, 4);
        assert_eq!(p.shard_of("x"), ShardId(0));
    }
}
