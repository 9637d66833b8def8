//! Who leads each shard, as this node believes (docs/design/0005-foundationdb.md, Leadership).
//!
//! With a store of its own per node (the embedded store), a shard's data is on its owner's
//! disk and only the map's owner can lead it: the belief is the map. With a store the nodes of
//! a region share (FoundationDB), any node of the shard's region can lead it, the lease in the
//! store decides which, and the map's owner is only the preferred leader. A node then learns
//! who leads from three sources, newest wins:
//!
//! - its own runtime for the shard: leading, or waiting while another node holds the lease
//!   (the lease names it);
//! - a `NOT_LEADER` answer, or a misdelivered message's answer, from another node;
//! - a node that does not answer: the next node of the shard's region is tried.
//!
//! A belief is a routing hint, never a safety property: a node that acts on a stale one is
//! refused by the store (its commits expect its lease's epoch).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use ledger_domain::ShardId;
use ledger_domain::cluster::ClusterMap;

/// One shard's leadership as this node sees it.
#[derive(Debug, Default)]
struct Shard {
    /// This node's runtime leads it (a term has begun and not ended).
    leading: AtomicBool,
    /// The node believed to lead it when this one does not; `None`: the map's owner.
    believed: Mutex<Option<String>>,
}

#[derive(Debug)]
pub struct Leaders {
    me: String,
    /// The nodes of a region share each shard's store: leadership moves between them.
    shared: bool,
    /// Indexed by shard: the map's owner.
    owners: Vec<String>,
    /// Indexed by shard: whether this node is the owner (every call asks).
    owned: Vec<bool>,
    /// Indexed by shard: the nodes of its region, in map order (who may lead it when shared).
    candidates: Vec<Vec<String>>,
    shards: Vec<Shard>,
}

impl Leaders {
    /// The leadership of every shard of `map` as node `me` sees it. `shared`: the nodes of a
    /// region share their shards' stores.
    pub fn new(map: &ClusterMap, me: &str, shared: bool) -> Self {
        let owners: Vec<String> = map.shards.iter().map(|s| s.owner.clone()).collect();
        let owned = owners.iter().map(|o| o == me).collect();
        let candidates = map
            .shards
            .iter()
            .map(|s| {
                map.nodes
                    .iter()
                    .filter(|n| n.region == s.region)
                    .map(|n| n.id.clone())
                    .collect()
            })
            .collect();
        Self {
            me: me.to_string(),
            shared,
            owners,
            owned,
            candidates,
            shards: map.shards.iter().map(|_| Shard::default()).collect(),
        }
    }

    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The map's owner of `shard`: its preferred leader.
    pub fn owner(&self, shard: ShardId) -> &str {
        &self.owners[shard.0 as usize]
    }

    /// Whether `node` may lead `shard` (it is a node of the shard's region).
    fn may_lead(&self, shard: ShardId, node: &str) -> bool {
        self.candidates
            .get(shard.0 as usize)
            .is_some_and(|c| c.iter().any(|n| n == node))
    }

    /// The node believed to lead `shard`: this one while it leads, else the last node heard
    /// of, else the map's owner.
    pub fn leader(&self, shard: ShardId) -> String {
        if !self.shared {
            return self.owner(shard).to_string();
        }
        let state = &self.shards[shard.0 as usize];
        if state.leading.load(Ordering::Acquire) {
            return self.me.clone();
        }
        let believed = state.believed.lock().expect("poisoned");
        believed
            .clone()
            .unwrap_or_else(|| self.owner(shard).to_string())
    }

    /// Whether commands for `shard` are for this node: it leads it, or no other node is
    /// known to (a term may be starting here).
    pub fn here(&self, shard: ShardId) -> bool {
        let Some(state) = self.shards.get(shard.0 as usize) else {
            return false;
        };
        if !self.shared {
            return self.owned[shard.0 as usize];
        }
        if state.leading.load(Ordering::Acquire) {
            return true;
        }
        match &*state.believed.lock().expect("poisoned") {
            Some(node) => *node == self.me,
            None => self.owned[shard.0 as usize],
        }
    }

    /// This node's runtime began a term for `shard`.
    pub fn began(&self, shard: ShardId) {
        self.shards[shard.0 as usize]
            .leading
            .store(true, Ordering::Release);
    }

    /// This node's runtime ended its term for `shard` (stopped, deposed, or its lease lapsed):
    /// until it hears who leads, it guesses the next node of the region, which answers with
    /// the leader if it is not. Alone in its region, it is the leader it waits for.
    pub fn ended(&self, shard: ShardId) {
        let state = &self.shards[shard.0 as usize];
        let mut believed = state.believed.lock().expect("poisoned");
        state.leading.store(false, Ordering::Release);
        *believed = self.next_after(shard.0 as usize, &self.me);
    }

    /// The node of `shard`'s region after `node` (round and round), other than this one.
    fn next_after(&self, shard: usize, node: &str) -> Option<String> {
        let candidates = &self.candidates[shard];
        let at = candidates.iter().position(|n| n == node).unwrap_or(0);
        (1..=candidates.len())
            .map(|step| &candidates[(at + step) % candidates.len()])
            .find(|n| *n != node && **n != self.me)
            .cloned()
    }

    /// Heard that `node` leads `shard` (its lease, or another node's hint). Ignored without a
    /// shared store (the owner is the only leader), for a node that cannot lead the shard,
    /// and when it names this node: only its own runtime says when it leads (another node's
    /// hint naming it is out of date, and believing it would keep commands here for a term
    /// that is not running).
    pub fn heard(&self, shard: ShardId, node: &str) {
        if !self.shared || node == self.me || !self.may_lead(shard, node) {
            return;
        }
        let state = &self.shards[shard.0 as usize];
        if state.leading.load(Ordering::Acquire) {
            return;
        }
        let mut believed = state.believed.lock().expect("poisoned");
        if believed.as_deref() != Some(node) {
            tracing::debug!(%shard, node, me = %self.me, "leader heard of");
            *believed = Some(node.to_string());
        }
    }

    /// `node` did not answer: every shard believed led by it is believed led by the next node
    /// of its region (which answers with the leader if it is not). Only with a shared store.
    pub fn unanswered(&self, node: &str) {
        if !self.shared || node == self.me {
            return;
        }
        for (i, state) in self.shards.iter().enumerate() {
            if state.leading.load(Ordering::Acquire) {
                continue;
            }
            let mut believed = state.believed.lock().expect("poisoned");
            let current = believed.as_deref().unwrap_or(&self.owners[i]);
            if current != node {
                continue;
            }
            if let Some(next) = self.next_after(i, node) {
                tracing::debug!(shard = i, node, next = %next, me = %self.me, "leader unanswered; trying the next node");
                *believed = Some(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ledger_domain::cluster::ClusterFile;

    use super::*;

    const MAP: &str = r#"
version = 1
shards = 4
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
id = "eu-2"
region = "eu"
client_address = "127.0.0.1:3"
peer_address = "127.0.0.1:4"
[[nodes]]
id = "eu-3"
region = "eu"
client_address = "127.0.0.1:5"
peer_address = "127.0.0.1:6"
[[nodes]]
id = "us-1"
region = "us"
client_address = "127.0.0.1:7"
peer_address = "127.0.0.1:8"
[[shard]]
ids = "0-1"
region = "eu"
owner = "eu-1"
[[shard]]
ids = "2-3"
region = "us"
owner = "us-1"
"#;

    fn map() -> ClusterMap {
        let file: ClusterFile = toml::from_str(MAP).unwrap();
        file.check().unwrap()
    }

    #[test]
    fn without_a_shared_store_the_owner_leads_whatever_is_heard() {
        let leaders = Leaders::new(&map(), "eu-2", false);
        leaders.heard(ShardId(0), "eu-2");
        leaders.unanswered("eu-1");
        assert_eq!(leaders.leader(ShardId(0)), "eu-1");
        assert!(!leaders.here(ShardId(0)));
        let owner = Leaders::new(&map(), "eu-1", false);
        assert!(owner.here(ShardId(0)), "before its term begins");
    }

    #[test]
    fn with_a_shared_store_the_lease_holder_heard_of_leads() {
        let leaders = Leaders::new(&map(), "eu-2", true);
        let shard = ShardId(1);
        assert_eq!(
            leaders.leader(shard),
            "eu-1",
            "the owner until heard otherwise"
        );
        assert!(!leaders.here(shard));
        leaders.heard(shard, "eu-3");
        assert_eq!(leaders.leader(shard), "eu-3");
        leaders.heard(shard, "us-1");
        assert_eq!(
            leaders.leader(shard),
            "eu-3",
            "a node of another region cannot lead"
        );
        leaders.heard(shard, "eu-2");
        assert_eq!(
            leaders.leader(shard),
            "eu-3",
            "only its own runtime says it leads"
        );
        leaders.began(shard);
        assert!(leaders.here(shard));
        leaders.heard(shard, "eu-1");
        assert_eq!(leaders.leader(shard), "eu-2", "its own term knows better");
        leaders.ended(shard);
        assert_eq!(
            leaders.leader(shard),
            "eu-3",
            "a guess: the next node but this one"
        );
        assert!(!leaders.here(shard));
        let alone = Leaders::new(&map(), "us-1", true);
        alone.began(ShardId(2));
        alone.ended(ShardId(2));
        assert!(alone.here(ShardId(2)), "no other node to lead it");
    }

    #[test]
    fn a_node_that_does_not_answer_passes_its_shards_to_the_next_node_of_their_region() {
        let leaders = Leaders::new(&map(), "eu-2", true);
        leaders.unanswered("eu-1");
        assert_eq!(
            leaders.leader(ShardId(0)),
            "eu-3",
            "skips this node: its own runtime says when it leads"
        );
        leaders.unanswered("eu-3");
        assert_eq!(leaders.leader(ShardId(0)), "eu-1", "round and round");
        leaders.unanswered("us-1");
        assert_eq!(leaders.leader(ShardId(2)), "us-1", "no other node there");
    }
}
