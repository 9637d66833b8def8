//! How callers reach a shard leader: its bounded queue of commands, each with a reply channel,
//! behind a cheap, cloneable [`ShardHandle`]; and [`Peers`], how a leader's protocol messages
//! reach other shards.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use ledger_domain::{NewAccount, ShardId, Transfer};

use crate::engine::Reply;
use crate::protocol::Message;
use crate::trace::TraceParent;

/// Delivers messages between shards (of this node: their queues; of another node: the
/// node-to-node API), and asks other nodes where accounts live.
pub trait Peers: Send + Sync + 'static {
    /// Best effort: the protocol retries, so a message may be dropped when a queue is full.
    fn send(&self, to: ShardId, from: ShardId, message: Message);

    /// Where account `id` lives, for a location the engine waits for
    /// ([`crate::engine::reads::Read::Locate`]): asks the node that leads the id's directory
    /// shard. `None` if it did not answer.
    fn locate(&self, id: String) -> BoxFuture<Option<ShardId>>;
}

/// A boxed future, as [`Peers`] returns them.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What callers put on a shard's queue.
#[derive(Debug)]
pub enum Command {
    CreateAccount(NewAccount, oneshot::Sender<Reply>),
    ReserveForward {
        id: String,
        placement_key: String,
        home: ShardId,
        reply: oneshot::Sender<Reply>,
    },
    /// A transfer with the caller's trace context (the batch span links to it; 2PC and
    /// lock-wait spans join its trace).
    CreateTransfer(Transfer, Option<TraceParent>, oneshot::Sender<Reply>),
    /// Many transfers, one reply with one result each, in order (cheaper than one command each).
    CreateTransfers(
        Vec<Transfer>,
        Option<TraceParent>,
        oneshot::Sender<Vec<Reply>>,
    ),
    Peer {
        from: ShardId,
        message: Message,
    },
    /// An operator's quota command (regional quotas).
    Quota(crate::quota::Command, oneshot::Sender<Reply>),
    Stop,
}

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The leader stepped down or is stopping; nothing unacknowledged is lost. Retry later
    /// (with the same transfer id).
    #[error("shard {0} is unavailable (its leader is changing or stopping); retry")]
    Unavailable(ShardId),
    /// Another node the operation needs did not answer; nothing was applied or recorded.
    /// Retry (with the same transfer id).
    #[error("{0}; retry with the same ids")]
    Unreachable(String),
    /// This node does not lead the shard. Send the call to the leader the hint names (if one
    /// is known), with the same transfer ids.
    #[error("this node does not lead shard {shard}{}", leader.as_ref().map(|l| format!("; its leader is node {} at {}", l.node, l.address)).unwrap_or_default())]
    NotLeader {
        shard: ShardId,
        leader: Option<LeaderHint>,
    },
}

/// Where a shard's leader is believed to be: a node id and its client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub node: String,
    pub address: String,
}

/// A cheap, cloneable handle to a shard's queue.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    shard: ShardId,
    tx: mpsc::Sender<Command>,
}

impl ShardHandle {
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Queues the command `make` builds around a reply channel and waits for the reply. Not an
    /// `async fn`, and queued through a reserved slot: the command is built once and held once
    /// while the caller waits, not also as an argument and inside the send (a small call's
    /// futures are moved into a box per request, docs/benchmarks.md).
    fn request<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> impl Future<Output = Result<T, ShardError>> + Send + '_ {
        let (tx, rx) = oneshot::channel();
        let command = make(tx);
        async move {
            let unavailable = ShardError::Unavailable(self.shard);
            let permit = self.tx.reserve().await.map_err(|_| unavailable.clone())?;
            permit.send(command);
            rx.await.map_err(|_| unavailable)
        }
    }

    pub fn create_account(
        &self,
        account: NewAccount,
    ) -> impl Future<Output = Result<Reply, ShardError>> + Send + '_ {
        self.request(move |tx| Command::CreateAccount(account, tx))
    }

    pub fn reserve_forward(
        &self,
        id: String,
        placement_key: String,
        home: ShardId,
    ) -> impl Future<Output = Result<Reply, ShardError>> + Send + '_ {
        self.request(move |reply| Command::ReserveForward {
            id,
            placement_key,
            home,
            reply,
        })
    }

    pub fn create_transfer(
        &self,
        transfer: Transfer,
    ) -> impl Future<Output = Result<Reply, ShardError>> + Send + '_ {
        self.request(move |tx| Command::CreateTransfer(transfer, TraceParent::current(), tx))
    }

    pub fn create_transfers(
        &self,
        transfers: Vec<Transfer>,
    ) -> impl Future<Output = Result<Vec<Reply>, ShardError>> + Send + '_ {
        self.request(move |tx| Command::CreateTransfers(transfers, TraceParent::current(), tx))
    }

    pub fn quota(
        &self,
        command: crate::quota::Command,
    ) -> impl Future<Output = Result<Reply, ShardError>> + Send + '_ {
        self.request(move |tx| Command::Quota(command, tx))
    }

    /// Best effort, never waits: used for protocol messages, which are retried.
    pub fn deliver(&self, from: ShardId, message: Message) {
        let _ = self.tx.try_send(Command::Peer { from, message });
    }

    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }
}

pub fn channel(shard: ShardId, capacity: usize) -> (ShardHandle, mpsc::Receiver<Command>) {
    let (tx, rx) = mpsc::channel(capacity);
    (ShardHandle { shard, tx }, rx)
}
