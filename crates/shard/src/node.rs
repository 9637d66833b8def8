//! The shards this process leads: their stores, queues and leader tasks, message delivery
//! between shards (here, or on another node through [`Remote`]), and where each account lives
//! ([`Directory`]).
//!
//! A single node leads every shard of its map and never needs another node. A node of a
//! cluster leads the shards its map gives it; messages to other shards, and directory lookups
//! for ids whose directory shard is elsewhere, go through the [`Remote`] the server gives it
//! (docs/design/0002-cluster.md). With a store the nodes of a region share, a node runs a
//! leader for every shard of its region and the leases decide which node's leads ([`Leaders`],
//! docs/design/0005-foundationdb.md).

use std::sync::Arc;

use foldhash::HashMap;

use ledger_domain::ShardId;
use ledger_domain::cluster::ClusterMap;
use ledger_store::Store;

use crate::ReadError;
use crate::directory::{Directory, Located, Rings, forwards_of};
use crate::engine::Locate;
use crate::leaders::Leaders;
use crate::protocol::Message;
use crate::runtime::{BoxFuture, Peers, Runtime, ShardHandle, channel};
use crate::{Clock, Options};

/// What a node asks of the other nodes (the server's peer transport).
pub trait Remote: Send + Sync + 'static {
    /// Sends a message to a shard another node leads. Best effort: the protocol resends.
    fn send(&self, to: ShardId, from: ShardId, message: Message);

    /// Asks the node that leads `directory` where account `id` lives. `None`: no answer.
    fn locate(&self, directory: ShardId, id: String) -> BoxFuture<Option<Located>>;
}

/// Delivers to the shards of this node through their queues, to others through the remote.
struct NodePeers {
    handles: Vec<Option<ShardHandle>>,
    directory: Arc<Directory>,
    remote: Option<Arc<dyn Remote>>,
    leaders: Arc<Leaders>,
}

impl Peers for NodePeers {
    fn send(&self, to: ShardId, from: ShardId, message: Message) {
        let here = self.handles[to.0 as usize]
            .as_ref()
            .filter(|_| self.leaders.here(to));
        match (here, &self.remote) {
            (Some(handle), _) => handle.deliver(from, message),
            (None, Some(remote)) => remote.send(to, from, message),
            (None, None) => {
                tracing::error!(%to, %from, "a message for a shard no node leads is dropped");
            }
        }
    }

    fn locate(&self, id: String) -> BoxFuture<Option<ShardId>> {
        let directory = Arc::clone(&self.directory);
        let remote = self.remote.clone();
        Box::pin(async move { locate(&directory, remote.as_deref(), id).await })
    }
}

/// Where `id` lives: known here, or asked of the node that leads its directory shard.
async fn locate(directory: &Directory, remote: Option<&dyn Remote>, id: String) -> Option<ShardId> {
    if let Some(home) = directory.home(&id) {
        return Some(home);
    }
    let located = remote?
        .locate(directory.rings().directory(&id), id.clone())
        .await?;
    if located.exists {
        directory.remember(&id, located.home);
    }
    Some(located.home)
}

pub struct Node {
    id: String,
    map: ClusterMap,
    directory: Arc<Directory>,
    remote: Option<Arc<dyn Remote>>,
    /// Indexed by shard; `None` for a shard another node leads.
    handles: Vec<Option<ShardHandle>>,
    stores: Vec<Option<Arc<dyn Store>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    leaders: Arc<Leaders>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("shards", &self.handles.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts one leader task per store on the current tokio runtime: call it from within
    /// one. `stores` are the shards this node may lead: those the map gives it, or with a
    /// shared store ([`Leaders::shared`]) every shard of its region, whose leases decide which
    /// node leads (the others wait, docs/design/0005-foundationdb.md). `remote` reaches the
    /// other nodes (none for a single node). Leaders share the runtime's threads with the gRPC
    /// server, so a call reaches its shard and gets its answer without a thread switch.
    pub fn start(
        node_id: &str,
        map: ClusterMap,
        stores: Vec<(ShardId, Arc<dyn Store>)>,
        options: Options,
        clock: Arc<dyn Clock>,
        remote: Option<Arc<dyn Remote>>,
        leaders: Arc<Leaders>,
    ) -> Result<Node, ReadError> {
        let rings = Rings::of_map(&map);
        let count = map.shard_count() as usize;
        let mut local_stores: Vec<Option<Arc<dyn Store>>> = vec![None; count];
        let mut forwards = HashMap::default();
        for (shard, store) in stores {
            assert!((shard.0 as usize) < count, "shard {shard} is in the map");
            // With a shared store, a term's start reads them (another node may lead first).
            if !leaders.shared() {
                forwards.extend(forwards_of(&*store, shard, &rings.all)?);
            }
            local_stores[shard.0 as usize] = Some(store);
        }
        let local: Vec<bool> = local_stores
            .iter()
            .map(|s| s.is_some() && !leaders.shared())
            .collect();
        let directory = Arc::new(Directory::new(rings, local, forwards));
        let mut handles: Vec<Option<ShardHandle>> = vec![None; count];
        let mut receivers = Vec::new();
        for (i, store) in local_stores.iter().enumerate() {
            if store.is_some() {
                let (handle, rx) = channel(ShardId(i as u32), options.queue_capacity);
                handles[i] = Some(handle);
                receivers.push((i, rx));
            }
        }
        let peers: Arc<dyn Peers> = Arc::new(NodePeers {
            handles: handles.clone(),
            directory: Arc::clone(&directory),
            remote: remote.clone(),
            leaders: Arc::clone(&leaders),
        });
        let locate: Locate = {
            let directory = Arc::clone(&directory);
            Arc::new(move |id: &str| directory.home(id))
        };
        let mut tasks = Vec::new();
        for (i, rx) in receivers {
            let runtime = Runtime {
                shard: ShardId(i as u32),
                node: node_id.to_string(),
                options: options.clone(),
                store: Arc::clone(local_stores[i].as_ref().expect("led here")),
                clock: Arc::clone(&clock),
                peers: Arc::clone(&peers),
                locate: Arc::clone(&locate),
                rx,
                leaders: Arc::clone(&leaders),
                directory: Arc::clone(&directory),
            };
            tasks.push(tokio::spawn(runtime.run()));
        }
        Ok(Node {
            id: node_id.to_string(),
            map,
            directory,
            remote,
            handles,
            stores: local_stores,
            tasks,
            leaders,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    pub fn rings(&self) -> &Rings {
        self.directory.rings()
    }

    pub fn shard_count(&self) -> u32 {
        self.map.shard_count()
    }

    /// The shards this node leads (or, before their terms begin, is to lead).
    pub fn local_shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.handles.len() as u32)
            .map(ShardId)
            .filter(|s| self.handle(*s).is_some())
    }

    /// The shards whose stores this node reads: those it leads, and with a shared store every
    /// shard of its region.
    pub fn readable_shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.stores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| ShardId(i as u32))
    }

    /// Whether commands for `shard` go to this node's leader of it.
    pub fn is_local(&self, shard: ShardId) -> bool {
        self.handle(shard).is_some()
    }

    /// Who leads each shard, as this node believes.
    pub fn leaders(&self) -> &Arc<Leaders> {
        &self.leaders
    }

    /// The shard an account id lives on, if known without asking another node.
    pub fn home(&self, account_id: &str) -> Option<ShardId> {
        self.directory.home(account_id)
    }

    /// The shard an account id lives on, asking the node that leads its directory shard if
    /// need be (once: the answer is kept). `None`: that node did not answer.
    pub async fn locate(&self, account_id: &str) -> Option<ShardId> {
        locate(
            &self.directory,
            self.remote.as_deref(),
            account_id.to_string(),
        )
        .await
    }

    /// The directory's answer for an id whose directory shard this node leads; `None` if
    /// another node leads it. `exists` says whether the account is known to exist (a forward
    /// record, or the account on the directory shard itself).
    pub fn located_here(&self, id: &str) -> Result<Option<Located>, ReadError> {
        let directory = self.directory.rings().directory(id);
        let Some(store) = self
            .store(directory)
            .filter(|_| self.directory.is_local(directory))
        else {
            return Ok(None);
        };
        if let Some(home) = self.directory.forward(id) {
            return Ok(Some(Located { home, exists: true }));
        }
        let exists = crate::read::account(&**store, directory, id)?.is_some();
        Ok(Some(Located {
            home: directory,
            exists,
        }))
    }

    /// Records that `id` lives on `home`: after its directory shard accepted it, or another
    /// node said so.
    pub fn remember_home(&self, id: &str, home: ShardId) {
        self.directory.remember(id, home);
    }

    /// The queue of a shard this node leads (or is to lead: its term may be starting).
    pub fn handle(&self, shard: ShardId) -> Option<&ShardHandle> {
        self.handles
            .get(shard.0 as usize)
            .and_then(Option::as_ref)
            .filter(|_| self.leaders.here(shard))
    }

    /// The store of a shard this node reads (see [`Node::readable_shards`]).
    pub fn store(&self, shard: ShardId) -> Option<&Arc<dyn Store>> {
        self.stores.get(shard.0 as usize).and_then(Option::as_ref)
    }

    /// Stops every leader after its current batch (a leader of a shared store then gives up
    /// its lease), and waits for them.
    pub async fn shutdown(self) {
        for handle in self.handles.iter().flatten() {
            handle.stop().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
