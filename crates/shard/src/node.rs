//! All shards of this process: their stores, queues and leader tasks, message delivery
//! between them, and where each account lives.
//!
//! Where an account lives: `placement.shard_of(placement_key)`. Clients name accounts by id, so
//! an account whose placement key is not its id (and hashes elsewhere) gets a directory record
//! ("forward") on the shard its id hashes to, written before the account itself; that shard is
//! the one place that decides whether an id is taken. The forwards are small and loaded into
//! memory at start.

use std::sync::{Arc, RwLock};

// Seeded per process like the engine's maps, and cheaper than SipHash on short ids: every call
// locates its accounts here (docs/benchmarks.md).
use foldhash::HashMap;

use ledger_domain::{Placement, ShardId};
use ledger_store::Store;

use crate::ReadError;
use crate::engine::Locate;
use crate::protocol::Message;
use crate::runtime::{Peers, Runtime, ShardHandle, channel};
use crate::{Clock, Options, codec, keys};

/// Delivers messages to shards of this process through their queues.
struct LocalPeers {
    handles: Vec<ShardHandle>,
}

impl Peers for LocalPeers {
    fn send(&self, to: ShardId, from: ShardId, message: Message) {
        self.handles[to.0 as usize].deliver(from, message);
    }
}

pub struct Node {
    placement: Placement,
    forwards: Arc<RwLock<HashMap<String, ShardId>>>,
    handles: Vec<ShardHandle>,
    stores: Vec<Arc<dyn Store>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("shards", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts one leader task per store (store `i` holds shard `i`) on the current tokio
    /// runtime: call it from within one. Leaders share the runtime's threads with the gRPC
    /// server, so a call reaches its shard and gets its answer without a thread switch.
    pub fn start(
        node_id: &str,
        placement: Placement,
        stores: Vec<Arc<dyn Store>>,
        options: Options,
        clock: Arc<dyn Clock>,
    ) -> Result<Node, ReadError> {
        assert_eq!(
            stores.len(),
            placement.shard_count() as usize,
            "one store per shard"
        );
        let mut forwards = HashMap::default();
        for (i, store) in stores.iter().enumerate() {
            let (start, end) = keys::forwards(ShardId(i as u32));
            for (key, value) in store.scan(&start, &end, usize::MAX)? {
                let (id, _) = ledger_store::key::read_str(&key, 6).ok_or_else(|| {
                    ReadError::Decode(codec::DecodeError {
                        what: "forward key",
                        reason: format!("{key:?}"),
                    })
                })?;
                let placement_key: String = codec::decode("forward", &value)?;
                forwards.insert(id, placement.shard_of(&placement_key));
            }
        }
        let forwards = Arc::new(RwLock::new(forwards));
        let (handles, receivers): (Vec<_>, Vec<_>) = (0..placement.shard_count())
            .map(|i| channel(ShardId(i), options.queue_capacity))
            .unzip();
        let peers: Arc<dyn Peers> = Arc::new(LocalPeers {
            handles: handles.clone(),
        });
        let locate = locate_fn(placement.clone(), Arc::clone(&forwards));
        let mut tasks = Vec::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            let runtime = Runtime {
                shard: ShardId(i as u32),
                node: node_id.to_string(),
                options: options.clone(),
                store: Arc::clone(&stores[i]),
                clock: Arc::clone(&clock),
                peers: Arc::clone(&peers),
                locate: Arc::clone(&locate),
                rx,
            };
            tasks.push(tokio::spawn(runtime.run()));
        }
        Ok(Node {
            placement,
            forwards,
            handles,
            stores,
            tasks,
        })
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn shard_count(&self) -> u32 {
        self.placement.shard_count()
    }

    /// The shard an account id lives on.
    pub fn locate(&self, account_id: &str) -> ShardId {
        locate(&self.placement, &self.forwards, account_id)
    }

    /// Records (in memory) that `id` lives on `home`; call after the directory shard accepted it.
    pub fn remember_forward(&self, id: &str, home: ShardId) {
        self.forwards
            .write()
            .expect("poisoned")
            .insert(id.to_string(), home);
    }

    pub fn handle(&self, shard: ShardId) -> &ShardHandle {
        &self.handles[shard.0 as usize]
    }

    pub fn store(&self, shard: ShardId) -> &Arc<dyn Store> {
        &self.stores[shard.0 as usize]
    }

    /// Stops every leader after its current batch, and waits for them.
    pub async fn shutdown(self) {
        for handle in &self.handles {
            handle.stop().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn locate(placement: &Placement, forwards: &RwLock<HashMap<String, ShardId>>, id: &str) -> ShardId {
    let forwards = forwards.read().expect("poisoned");
    // Most clusters place every account by its id: skip hashing the id for an empty map.
    if !forwards.is_empty()
        && let Some(shard) = forwards.get(id)
    {
        return *shard;
    }
    placement.shard_of(id)
}

fn locate_fn(placement: Placement, forwards: Arc<RwLock<HashMap<String, ShardId>>>) -> Locate {
    Arc::new(move |id: &str| locate(&placement, &forwards, id))
}
