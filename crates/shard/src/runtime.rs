//! The runtime of one shard leader: a task on the node's tokio runtime that owns the engine.
//! Callers and leaders share the runtime's threads, so a command reaches its shard and the
//! reply gets back without a thread switch; the leader waits for durability as a future (the
//! log's flusher thread wakes it), never by blocking a thread (docs/benchmarks.md).
//!
//! ```text
//!  queue ──► drain up to batch_inputs_max ──► engine ──► one durable commit ──► replies
//!                  ▲                                     (epoch + versions     ──► messages
//!                  └──────────── next batch ◄──────────── preconditions)
//! ```
//!
//! Group commit: whatever queued while the previous batch was syncing forms the next batch, so
//! batch size follows load and one fsync serves many callers. Nothing is acknowledged before
//! its batch is durable.
//!
//! A leader term begins by taking the lease: epoch + 1, written conditionally on the lease it
//! read. Every batch commit expects that epoch, so a stale leader's commit is rejected (I5).
//! If a commit fails or the store cannot be read, the leader steps down: callers in flight get
//! `Unavailable` (retrying the same transfer id is safe), and a new term reloads from the store.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ledger_domain::{HoldStatus, NewAccount, ShardId, Transfer};
use ledger_store::{Expect, Store, WriteBatch};

use crate::engine::{
    CoordRecord, Engine, Input, Locate, PreparedRecord, Recovered, Reply, Token, id_filter,
};
use crate::metrics::RuntimeMetrics;
use crate::protocol::Message;
use crate::trace::TraceParent;
use crate::{Clock, Options, ReadError, codec, keys};

/// The lease record: value = epoch (u64 BE) then this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    pub node: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("shard {shard}: the lease is held by node {node} until {expires_at_ms}")]
    Held {
        shard: ShardId,
        node: String,
        expires_at_ms: u64,
    },
    #[error("shard {shard}: lost a race for the lease; retry")]
    Raced { shard: ShardId },
    #[error(transparent)]
    Read(#[from] ReadError),
}

fn encode_lease(lease: &Lease) -> Vec<u8> {
    let mut out = codec::version_prefix(lease.epoch);
    out.extend_from_slice(&codec::encode(lease));
    out
}

fn decode_lease(bytes: &[u8]) -> Result<Lease, ReadError> {
    let body = bytes.get(8..).ok_or_else(|| codec::DecodeError {
        what: "lease",
        reason: "shorter than its header".into(),
    })?;
    Ok(codec::decode("lease", body)?)
}

/// Takes the shard's lease with a new epoch. A lease held by another node and not yet expired
/// is refused; our own node's lease (a restart) is taken over at once.
pub fn acquire_lease(
    store: &dyn Store,
    shard: ShardId,
    node: &str,
    now_ms: u64,
    lease_ms: u64,
) -> Result<Lease, LeaseError> {
    let key = keys::lease(shard);
    let current = store.get(&key).map_err(ReadError::from)?;
    let mut batch = WriteBatch::default();
    let epoch = match &current {
        None => {
            batch.expect(key.clone(), Expect::Absent);
            1
        }
        Some(bytes) => {
            let lease = decode_lease(bytes)?;
            if lease.node != node && lease.expires_at_ms > now_ms {
                return Err(LeaseError::Held {
                    shard,
                    node: lease.node,
                    expires_at_ms: lease.expires_at_ms,
                });
            }
            batch.expect(key.clone(), Expect::Equals(bytes.clone()));
            lease.epoch + 1
        }
    };
    let lease = Lease {
        epoch,
        node: node.to_string(),
        expires_at_ms: now_ms + lease_ms,
    };
    batch.put(key, encode_lease(&lease));
    store
        .commit(&batch)
        .map_err(|_| LeaseError::Raced { shard })?;
    Ok(lease)
}

/// Loads what a new leader needs from the store.
pub fn load(store: &dyn Store, shard: ShardId) -> Result<Recovered, ReadError> {
    let scan = |(s, e): (Vec<u8>, Vec<u8>)| store.scan(&s, &e, usize::MAX);
    let accounts = crate::read::all_accounts(store, shard)?;
    let mut holds = Vec::new();
    for (k, v) in scan(keys::holds(shard))? {
        let (_, id) = key_tail_str(&k)?;
        holds.push((id, codec::decode::<HoldStatus>("hold", &v)?));
    }
    let coordinations = scan(keys::coord_all(shard))?
        .iter()
        .map(|(_, v)| CoordRecord::decode(v))
        .collect::<Result<_, _>>()?;
    let prepared = scan(keys::prepared_all(shard))?
        .iter()
        .map(|(_, v)| codec::decode::<PreparedRecord>("prepared record", v))
        .collect::<Result<_, _>>()?;
    // Only sizes the first filter: a damaged count is ignored, never a reason not to lead.
    let ids_recorded = match store.get(&keys::id_count(shard))? {
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_be_bytes)
            .unwrap_or_else(|_| {
                tracing::warn!(%shard, len = bytes.len(), "ignoring a damaged transfer id count");
                0
            }),
        None => 0,
    };
    Ok(Recovered {
        accounts,
        holds,
        coordinations,
        prepared,
        ids_recorded,
    })
}

/// Keys are `S <u32> <kind u8> <string>`: returns the string.
fn key_tail_str(key: &[u8]) -> Result<((), String), ReadError> {
    ledger_store::key::read_str(key, 6)
        .map(|(s, _)| ((), s))
        .ok_or_else(|| {
            ReadError::Decode(codec::DecodeError {
                what: "key",
                reason: format!("{key:?}"),
            })
        })
}

/// Delivers messages between shards (in this process: their queues; later: gRPC).
pub trait Peers: Send + Sync + 'static {
    /// Best effort: the protocol retries, so a message may be dropped when a queue is full.
    fn send(&self, to: ShardId, from: ShardId, message: Message);
}

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
    Stop,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    /// The leader stepped down or is stopping; nothing unacknowledged is lost. Retry (with the
    /// same transfer id).
    #[error("shard {0} is unavailable (its leader is changing or stopping); retry")]
    Unavailable(ShardId),
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

pub struct Runtime {
    pub shard: ShardId,
    pub node: String,
    pub options: Options,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub peers: Arc<dyn Peers>,
    pub locate: Locate,
    pub rx: mpsc::Receiver<Command>,
}

/// A batch span links to at most this many callers' spans (a batch can carry thousands).
pub const LINKS_PER_BATCH_MAX: usize = 128;

/// How often an idle leader wakes for timers (lock deadlines, hold expiry, retries).
const TICK_MS: u64 = 20;

impl Runtime {
    /// Runs leader terms until stopped: a task on the node's tokio runtime. It never blocks
    /// its thread: commits wait for the log's fsync as futures, and a term's start (reading
    /// the lease and loading the shard) runs on the blocking pool.
    pub async fn run(mut self) {
        loop {
            let start = self.term_start();
            let begun = match tokio::task::spawn_blocking(move || start.begin()).await {
                Ok(begun) => begun,
                Err(e) => {
                    tracing::error!(shard = %self.shard, error = %e, "loading the shard failed; this shard stops");
                    return;
                }
            };
            let engine = match begun {
                Ok(engine) => engine,
                Err(e) => {
                    tracing::warn!(shard = %self.shard, error = %e, "cannot lead yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            tracing::info!(shard = %self.shard, epoch = engine.epoch(), "leading");
            if let Some(ids) = engine.id_filter() {
                self.fill_id_filter(ids);
            }
            match self.lead(engine).await {
                Term::Stopped => return,
                Term::SteppedDown(reason) => {
                    tracing::error!(shard = %self.shard, %reason, "stepping down; reloading");
                }
            }
        }
    }

    /// Starts filling a filter of recorded transfer ids from the store, on the blocking pool:
    /// the term's first, or a bigger one the engine made. The engine uses a filter once its
    /// scan is done (until then, the store or the filter it replaces). The task stops by itself
    /// once the term has ended.
    fn fill_id_filter(&self, filter: Arc<id_filter::IdFilter>) {
        let (store, shard) = (Arc::clone(&self.store), self.shard);
        drop(tokio::task::spawn_blocking(move || {
            let started = stopwatch();
            match id_filter::fill(&*store, shard, &filter) {
                Ok(Some(ids)) => tracing::debug!(
                    shard = %shard,
                    ids,
                    ms = started.elapsed().as_millis() as u64,
                    bytes = filter.bytes(),
                    "transfer-id filter filled"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    shard = %shard,
                    error = %e,
                    "cannot fill a transfer-id filter; this term goes on without it (looking ids up in the store, or in the smaller filter it was to replace)"
                ),
            }
        }));
    }

    fn term_start(&self) -> TermStart {
        TermStart {
            shard: self.shard,
            node: self.node.clone(),
            options: self.options.clone(),
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            locate: Arc::clone(&self.locate),
        }
    }

    async fn lead(&mut self, mut engine: Engine) -> Term {
        let mut waiting = Waiting::default();
        let mut metrics = RuntimeMetrics::new(self.shard);
        metrics.term(engine.epoch());
        let renew_every = self.options.lease_ms / 3;
        let mut renewed_at = self.clock.now_ms();
        // One timer for the whole term, re-armed only when it fires: a timer per wake-up cost
        // a timer-wheel insert and removal for every batch.
        let tick = tokio::time::sleep(Duration::from_millis(TICK_MS));
        tokio::pin!(tick);
        loop {
            let first = tokio::select! {
                command = self.rx.recv() => match command {
                    Some(command) => Some(command),
                    None => return Term::Stopped,
                },
                () = &mut tick => None,
            };
            if first.is_none() {
                tick.as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_millis(TICK_MS));
            } else {
                // Woken by one command: let the calls that are ready to run queue theirs
                // first, so one batch (and one commit) carries them all. Small calls otherwise
                // made batches of about one command each (docs/benchmarks.md).
                tokio::task::yield_now().await;
            }
            let now = self.clock.now_ms();
            engine.begin(now);
            let mut stop = false;
            let mut inputs = 0;
            let mut links: Vec<TraceParent> = Vec::new();
            let mut next = first;
            while let Some(command) = next.take() {
                let handle = |engine: &mut Engine, input| {
                    engine
                        .handle(input)
                        .map_err(|e| Term::SteppedDown(e.to_string()))
                };
                let result = match command {
                    Command::Stop => {
                        stop = true;
                        break;
                    }
                    Command::Peer { from, message } => {
                        handle(&mut engine, Input::Peer { from, message })
                    }
                    Command::CreateAccount(account, tx) => {
                        let token = waiting.one(tx);
                        handle(&mut engine, Input::CreateAccount { token, account })
                    }
                    Command::ReserveForward {
                        id,
                        placement_key,
                        home,
                        reply,
                    } => {
                        let token = waiting.one(reply);
                        handle(
                            &mut engine,
                            Input::ReserveForward {
                                token,
                                id,
                                placement_key,
                                home,
                            },
                        )
                    }
                    Command::CreateTransfer(transfer, caller, tx) => {
                        if let Some(caller) = caller
                            && caller.sampled
                            && links.len() < LINKS_PER_BATCH_MAX
                        {
                            links.push(caller);
                        }
                        let token = waiting.one(tx);
                        handle(
                            &mut engine,
                            Input::CreateTransfer {
                                token,
                                transfer,
                                trace: caller,
                            },
                        )
                    }
                    Command::CreateTransfers(transfers, caller, tx) => {
                        if let Some(caller) = caller
                            && caller.sampled
                            && links.len() < LINKS_PER_BATCH_MAX
                        {
                            links.push(caller);
                        }
                        let tokens = waiting.group(transfers.len(), tx);
                        inputs += transfers.len().saturating_sub(1);
                        engine.reserve_transfers(transfers.len());
                        let mut result = Ok(());
                        for (transfer, token) in transfers.into_iter().zip(tokens) {
                            result = handle(
                                &mut engine,
                                Input::CreateTransfer {
                                    token,
                                    transfer,
                                    trace: caller,
                                },
                            );
                            if result.is_err() {
                                break;
                            }
                            // A big request is thousands of inputs: let the runtime's other
                            // tasks (calls being decoded and answered) run now and then.
                            tokio::task::coop::consume_budget().await;
                        }
                        result
                    }
                };
                if let Err(term) = result {
                    return term;
                }
                tokio::task::coop::consume_budget().await;
                inputs += 1;
                if inputs < self.options.batch_inputs_max {
                    next = self.rx.try_recv().ok();
                }
            }
            if let Err(term) = self.fetch(&mut engine, &mut metrics).await {
                return term;
            }
            if let Err(e) = engine.tick() {
                return Term::SteppedDown(e.to_string());
            }
            if let Err(term) = self.fetch(&mut engine, &mut metrics).await {
                return term;
            }
            let mut output = engine.finish();
            if now.saturating_sub(renewed_at) >= renew_every {
                let lease = Lease {
                    epoch: engine.epoch(),
                    node: self.node.clone(),
                    expires_at_ms: now + self.options.lease_ms,
                };
                output.writes.expect(
                    keys::lease(self.shard),
                    Expect::Prefix(codec::version_prefix(engine.epoch())),
                );
                output
                    .writes
                    .put(keys::lease(self.shard), encode_lease(&lease));
                // Sizes the next term's first filter (`Engine::new`).
                output.writes.put(
                    keys::id_count(self.shard),
                    engine.ids_recorded().to_be_bytes().to_vec(),
                );
                renewed_at = now;
            }
            // Only a batch inside a sampled trace gets a span (a command of a sampled call, or a
            // phase span it began): any other would be a span nobody sees, paid for on every
            // batch (docs/benchmarks.md).
            let span = if !links.is_empty() || !output.links.is_empty() {
                tracing::info_span!(
                    "shard.batch",
                    shard = self.shard.0,
                    epoch = engine.epoch(),
                    inputs,
                    writes = output.writes.writes.len(),
                )
            } else {
                tracing::Span::none()
            };
            if !span.is_none() {
                let room = LINKS_PER_BATCH_MAX.saturating_sub(links.len());
                links.extend(output.links.iter().take(room));
                for link in links {
                    span.add_link(link.span_context());
                }
            }
            metrics.queue_depth.set(self.rx.len() as f64);
            if inputs > 0 {
                metrics.batch_inputs.record(inputs as f64);
            }
            if !output.writes.is_empty() {
                metrics
                    .batch_writes
                    .record(output.writes.writes.len() as f64);
                let started = stopwatch();
                let commit_span = if span.is_none() {
                    tracing::Span::none()
                } else {
                    tracing::info_span!(parent: &span, "store.commit", shard = self.shard.0)
                };
                let committed = self
                    .store
                    .commit_async(output.writes)
                    .instrument(commit_span)
                    .await;
                metrics
                    .commit_seconds
                    .record(started.elapsed().as_secs_f64());
                if let Err(e) = committed {
                    if matches!(e, ledger_store::CommitError::Conflict { .. }) {
                        metrics.commit_conflicts.increment(1);
                    } else {
                        metrics.commit_failures.increment(1);
                    }
                    // Fenced or failed: nothing of this batch is acknowledged. Dropping the
                    // reply senders tells every waiting caller `Unavailable`.
                    return Term::SteppedDown(format!("commit failed: {e}"));
                }
            }
            // Durable: the steps it completes end now.
            drop(output.ended);
            for (token, reply) in output.replies {
                if let Reply::Transfer(r) = &reply {
                    metrics.transfer(r.record.result.as_ref().map(|_| ()).map_err(|e| *e));
                }
                waiting.reply(token, reply);
            }
            metrics.flush();
            // After the commit: the scan must find the records of the batch that made it.
            if let Some(bigger) = engine.take_id_filter_to_fill() {
                self.fill_id_filter(bigger);
            }
            for (to, message) in output.messages {
                self.peers.send(to, self.shard, message);
            }
            if stop {
                return Term::Stopped;
            }
        }
    }
}

impl Runtime {
    /// Fetches the stored values the engine waits for and hands them in, round after round
    /// (a step may find it needs more), at most [`FETCH_ROUNDS_MAX`] rounds per batch; steps
    /// still waiting then run in a later batch.
    async fn fetch(&self, engine: &mut Engine, metrics: &mut RuntimeMetrics) -> Result<(), Term> {
        for _ in 0..FETCH_ROUNDS_MAX {
            let wanted = engine.take_wanted();
            if wanted.is_empty() {
                return Ok(());
            }
            metrics.store_reads.increment(wanted.len() as u64);
            let keys = wanted.iter().map(|read| read.key(self.shard)).collect();
            let values = self
                .store
                .get_many_async(keys)
                .await
                .map_err(|e| Term::SteppedDown(format!("store read failed: {e}")))?;
            debug_assert_eq!(values.len(), wanted.len(), "one value per key");
            engine
                .supply(wanted.into_iter().zip(values))
                .map_err(|e| Term::SteppedDown(e.to_string()))?;
        }
        Ok(())
    }
}

/// Rounds of store reads per batch before the batch commits without its still-waiting steps
/// (a step's reads form a chain of at most three; lock releases can start more steps).
pub const FETCH_ROUNDS_MAX: usize = 16;

/// What a term's start needs, moved to the blocking pool (it reads the whole shard).
struct TermStart {
    shard: ShardId,
    node: String,
    options: Options,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    locate: Locate,
}

impl TermStart {
    /// Takes the lease and loads the shard, in a `shard.recover` span: the recovery spans of
    /// the coordinations and prepared legs it resumes link to it.
    fn begin(self) -> Result<Engine, LeaseError> {
        let span = tracing::info_span!(
            "shard.recover",
            shard = self.shard.0,
            epoch = tracing::field::Empty,
            accounts = tracing::field::Empty,
            coordinations = tracing::field::Empty,
            prepared = tracing::field::Empty,
        );
        let _recover = span.enter();
        let now = self.clock.now_ms();
        let lease = acquire_lease(
            &*self.store,
            self.shard,
            &self.node,
            now,
            self.options.lease_ms,
        )?;
        let recovered = load(&*self.store, self.shard)?;
        span.record("epoch", lease.epoch);
        span.record("accounts", recovered.accounts.len());
        span.record("coordinations", recovered.coordinations.len());
        span.record("prepared", recovered.prepared.len());
        Ok(Engine::new(
            self.shard,
            lease.epoch,
            self.options,
            self.locate,
            recovered,
        ))
    }
}

/// Measures the store commit (a runtime adapter: it may read the monotonic clock).
#[allow(clippy::disallowed_methods)]
fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}

enum Term {
    Stopped,
    SteppedDown(String),
}

/// Callers waiting for replies: single commands, or groups that get one reply when all of
/// their items have one. A group of `len` items takes the tokens `group + 1 ..= group + len`,
/// so finding an item's group is a range lookup, not an entry per item.
#[derive(Default)]
struct Waiting {
    next: Token,
    ones: HashMap<Token, oneshot::Sender<Reply>>,
    groups: BTreeMap<Token, Group>,
}

struct Group {
    replies: Vec<Option<Reply>>,
    remaining: usize,
    tx: oneshot::Sender<Vec<Reply>>,
}

impl Waiting {
    fn one(&mut self, tx: oneshot::Sender<Reply>) -> Token {
        self.next += 1;
        self.ones.insert(self.next, tx);
        self.next
    }

    fn group(
        &mut self,
        len: usize,
        tx: oneshot::Sender<Vec<Reply>>,
    ) -> std::ops::RangeInclusive<Token> {
        let group = self.next + 1;
        self.next = group + len as Token;
        let replies = (0..len).map(|_| None).collect();
        self.groups.insert(
            group,
            Group {
                replies,
                remaining: len,
                tx,
            },
        );
        if len == 0 {
            self.finish(group);
        }
        group + 1..=self.next
    }

    fn reply(&mut self, token: Token, reply: Reply) {
        if let Some(tx) = self.ones.remove(&token) {
            let _ = tx.send(reply);
            return;
        }
        let Some((&group, g)) = self.groups.range_mut(..token).next_back() else {
            return;
        };
        let index = (token - group - 1) as usize;
        if index >= g.replies.len() || g.replies[index].is_some() {
            debug_assert!(index >= g.replies.len(), "one reply per item");
            return;
        }
        g.replies[index] = Some(reply);
        g.remaining -= 1;
        if g.remaining == 0 {
            self.finish(group);
        }
    }

    fn finish(&mut self, group: Token) {
        let g = self.groups.remove(&group).expect("group");
        let _ = g.tx.send(
            g.replies
                .into_iter()
                .map(|r| r.expect("every item replied"))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_domain::Rejection;

    const BUSY: Rejection = Rejection::AccountBusy;
    const TIMEOUT: Rejection = Rejection::LockTimeout;

    fn answer(reason: Rejection) -> Reply {
        Reply::Forward(Err(reason))
    }

    fn reasons(replies: &[Reply]) -> Vec<Rejection> {
        replies
            .iter()
            .map(|r| match r {
                Reply::Forward(Err(reason)) => *reason,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Groups and single callers interleave; each group gets its replies in item order, once
    /// every item has one, whatever order the engine answered in.
    #[test]
    fn replies_reach_their_callers_in_item_order() {
        let mut waiting = Waiting::default();
        let (one_tx, mut one_rx) = oneshot::channel();
        let single = waiting.one(one_tx);
        let (a_tx, mut a_rx) = oneshot::channel();
        let a: Vec<Token> = waiting.group(3, a_tx).collect();
        let (empty_tx, mut empty_rx) = oneshot::channel();
        assert_eq!(waiting.group(0, empty_tx).count(), 0);
        let (b_tx, mut b_rx) = oneshot::channel();
        let b: Vec<Token> = waiting.group(2, b_tx).collect();
        assert!(
            empty_rx.try_recv().unwrap().is_empty(),
            "an empty group answers at once"
        );

        waiting.reply(b[1], answer(TIMEOUT));
        waiting.reply(a[2], answer(TIMEOUT));
        waiting.reply(a[0], answer(BUSY));
        assert!(
            a_rx.try_recv().is_err(),
            "not before every item has a reply"
        );
        waiting.reply(single, answer(BUSY));
        assert_eq!(reasons(&[one_rx.try_recv().unwrap()]), [BUSY]);
        waiting.reply(a[1], answer(TIMEOUT));
        assert_eq!(reasons(&a_rx.try_recv().unwrap()), [BUSY, TIMEOUT, TIMEOUT]);
        // A token nobody waits for (already answered, or never issued) is ignored.
        waiting.reply(single, answer(BUSY));
        waiting.reply(10_000, answer(BUSY));
        assert!(b_rx.try_recv().is_err());
        waiting.reply(b[0], answer(BUSY));
        assert_eq!(reasons(&b_rx.try_recv().unwrap()), [BUSY, TIMEOUT]);
        assert!(waiting.groups.is_empty() && waiting.ones.is_empty());
    }
}
