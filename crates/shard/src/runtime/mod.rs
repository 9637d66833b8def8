//! The runtime of one shard leader: a task on the node's tokio runtime that owns the engine.
//! Callers and leaders share the runtime's threads, so a command reaches its shard and the
//! reply gets back without a thread switch; the leader waits for durability as a future (the
//! log's flusher thread wakes it), never by blocking a thread (docs/benchmarks.md).
//!
//! ```text
//!  wake ──► drain up to batch_inputs_max ──► engine ──► fetch ──► tick, fetch ──► finish
//!   ▲        (commands become inputs)          (stored values it waits for)         │
//!   │                                                                                ▼
//!   └── deliver: replies, messages ◄── commit: one durable store commit ◄── renew lease
//!                                       (epoch + versions preconditions)
//! ```
//!
//! The steps are the methods of [`Runtime`] that `lead` calls in that order. The lease lives in
//! `lease`, a term's start (lease, load, engine) in `recovery`, the queue and its handle in
//! `handle`, and the callers waiting for replies in `waiting`.
//!
//! Group commit: whatever queued while the previous batch was syncing forms the next batch, so
//! batch size follows load and one fsync serves many callers. Nothing is acknowledged before
//! its batch is durable.
//!
//! A leader term begins by taking the lease: epoch + 1, written conditionally on the lease it
//! read. Every batch commit expects that epoch, so a stale leader's commit is rejected (I5).
//! If a commit fails or the store cannot be read, the leader steps down: callers in flight get
//! `Unavailable` (retrying the same transfer id is safe), and a new term reloads from the store.

mod handle;
pub(crate) mod lease;
mod recovery;
mod waiting;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ledger_domain::ShardId;
use ledger_store::{Store, WriteBatch};

pub use handle::{BoxFuture, Command, LeaderHint, Peers, ShardError, ShardHandle, channel};
pub use lease::{Lease, LeaseError, acquire_lease, acquire_lease_after, release, renew};
pub use recovery::load;

use crate::directory::Directory;
use crate::engine::reads::{self, Read};
use crate::engine::{Engine, Input, Locate, Output, Reply, id_filter};
use crate::leaders::Leaders;
use crate::metrics::RuntimeMetrics;
use crate::trace::TraceParent;
use crate::{Clock, Options, keys};
use recovery::TermStart;
use waiting::Waiting;

pub struct Runtime {
    pub shard: ShardId,
    pub node: String,
    pub options: Options,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub peers: Arc<dyn Peers>,
    pub locate: Locate,
    pub rx: mpsc::Receiver<Command>,
    /// Where this node records whether it leads the shard, and who does when it does not.
    pub leaders: Arc<Leaders>,
    /// The node's directory: with a shared store, a term's start reads the shard's forward
    /// records into it.
    pub directory: Arc<Directory>,
}

/// A batch span links to at most this many callers' spans (a batch can carry thousands).
pub const LINKS_PER_BATCH_MAX: usize = 128;

/// How often an idle leader wakes for timers (lock deadlines, hold expiry, retries).
const TICK_MS: u64 = 20;
/// How long a shard that cannot lead waits before it tries again.
const LEAD_RETRY_MS: u64 = 200;
/// With a shared store, a node that is not a shard's preferred leader (the map's owner) takes
/// a lapsed lease only this long after it lapsed (at most; a quarter of the lease if shorter),
/// and waits as long before its first try: the owner gets the first chance.
pub const STANDBY_GRACE_MS_MAX: u64 = 1_000;

impl Runtime {
    /// Runs leader terms until stopped: a task on the node's tokio runtime. It never blocks
    /// its thread: commits wait for the log's fsync as futures, and a term's start (reading
    /// the lease and loading the shard) runs on the blocking pool.
    pub async fn run(mut self) {
        let shared = self.leaders.shared();
        let standby = shared && self.leaders.owner(self.shard) != self.node;
        let grace_ms = if standby {
            (self.options.lease_ms / 4).min(STANDBY_GRACE_MS_MAX)
        } else {
            0
        };
        if standby && matches!(self.wait_to_lead(grace_ms).await, Term::Stopped) {
            return;
        }
        loop {
            let start = self.term_start(grace_ms);
            let begun = match tokio::task::spawn_blocking(move || start.begin()).await {
                Ok(begun) => begun,
                Err(e) => {
                    tracing::error!(shard = %self.shard, error = %e, "loading the shard failed; this shard stops");
                    return;
                }
            };
            let (engine, lease_until) = match begun {
                Ok(begun) => begun,
                Err(e) => {
                    if let LeaseError::Held { node, .. } = &e {
                        // Another node leads: routine with a shared store.
                        self.leaders.heard(self.shard, node);
                        tracing::debug!(shard = %self.shard, error = %e, "another node leads; waiting");
                    } else {
                        tracing::warn!(shard = %self.shard, error = %e, "cannot lead yet; retrying");
                    }
                    if matches!(self.wait_to_lead(LEAD_RETRY_MS).await, Term::Stopped) {
                        return;
                    }
                    continue;
                }
            };
            let epoch = engine.epoch();
            // One line per shard: for debugging; ledgerd's start-up summary says it is serving.
            if shared {
                tracing::info!(shard = %self.shard, epoch, node = %self.node, "leading");
            } else {
                tracing::debug!(shard = %self.shard, epoch, "leading");
            }
            self.leaders.began(self.shard);
            if let Some(ids) = engine.id_filter() {
                self.fill_id_filter(ids);
            }
            let ended = self.lead(engine, lease_until).await;
            self.leaders.ended(self.shard);
            if shared {
                self.directory.follow(self.shard);
            }
            match ended {
                Term::Stopped => {
                    if shared {
                        // Another node of the region takes the shard at once.
                        let (store, shard, node) =
                            (Arc::clone(&self.store), self.shard, self.node.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            lease::release(&*store, shard, &node, epoch)
                        })
                        .await;
                    }
                    return;
                }
                Term::SteppedDown(reason) => {
                    tracing::error!(shard = %self.shard, %reason, "stepping down; reloading");
                }
            }
        }
    }

    /// Between two tries to lead (another node holds the lease, or the store cannot be
    /// read): what is sent meanwhile is dropped, so its callers hear `Unavailable` at once,
    /// and a stop still stops.
    async fn wait_to_lead(&mut self, ms: u64) -> Term {
        let retry = tokio::time::sleep(Duration::from_millis(ms));
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut retry => return Term::SteppedDown(StepDown::Deposed),
                command = self.rx.recv() => match command {
                    None | Some(Command::Stop) => return Term::Stopped,
                    Some(_) => {}
                },
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

    fn term_start(&self, grace_ms: u64) -> TermStart {
        TermStart {
            shard: self.shard,
            node: self.node.clone(),
            options: self.options.clone(),
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            locate: Arc::clone(&self.locate),
            grace_ms,
            directory: self.leaders.shared().then(|| Arc::clone(&self.directory)),
        }
    }

    /// One leader term: batch after batch until it stops or steps down. `lease_until`: when
    /// the lease the term began with expires.
    async fn lead(&mut self, mut engine: Engine, lease_until: u64) -> Term {
        let mut term = TermState {
            waiting: Waiting::default(),
            metrics: RuntimeMetrics::new(self.shard),
            renewed_at: self.clock.now_ms(),
            lease_until,
        };
        term.metrics.term(engine.epoch());
        // One timer for the whole term, re-armed only when it fires: a timer per wake-up cost
        // a timer-wheel insert and removal for every batch.
        let tick = tokio::time::sleep(Duration::from_millis(TICK_MS));
        tokio::pin!(tick);
        loop {
            let first = match self.wake(tick.as_mut()).await {
                Wake::Command(command) => Some(command),
                Wake::Tick => None,
                Wake::Closed => return Term::Stopped,
            };
            let now = self.clock.now_ms();
            engine.begin(now);
            let drained = match self.drain(&mut engine, &mut term.waiting, first).await {
                Ok(drained) => drained,
                Err(stepped_down) => return stepped_down,
            };
            let until = term.lease_until;
            let fetched = self.within_lease(until, self.fetch(&mut engine, &mut term.metrics));
            if let Err(stepped_down) = fetched.await {
                return stepped_down;
            }
            if let Err(e) = engine.tick() {
                return Term::SteppedDown(StepDown::Engine(e));
            }
            let fetched = self.within_lease(until, self.fetch(&mut engine, &mut term.metrics));
            if let Err(stepped_down) = fetched.await {
                return stepped_down;
            }
            let mut output = engine.finish();
            let renewed = self.renew_lease_if_due(&engine, &mut output, now, &mut term.renewed_at);
            let span = self.batch_span(&engine, &output, drained.links, drained.inputs);
            term.metrics.queue_depth.set(self.rx.len() as f64);
            if drained.inputs > 0 {
                term.metrics.batch_inputs.record(drained.inputs as f64);
            }
            let writes = std::mem::take(&mut output.writes);
            // Nothing to commit, so no commit to be fenced by: messages leave only while the
            // lease is still this term's (`lease::holds`).
            let unfenced = writes.is_empty() && !output.messages.is_empty();
            let committed = self.commit(writes, &span, &mut term.metrics);
            if let Err(stepped_down) = self.within_lease(until, committed).await {
                return stepped_down;
            }
            if let Some(expires) = renewed {
                term.lease_until = expires;
            }
            if unfenced {
                let held = self.within_lease(term.lease_until, self.holds(engine.epoch()));
                if let Err(stepped_down) = held.await {
                    return stepped_down;
                }
            }
            self.deliver(&mut engine, output, &mut term);
            if drained.stop {
                return Term::Stopped;
            }
        }
    }

    /// Runs a step of a batch that waits for the store. With a shared store, a step that has
    /// not finished when the term's lease expires (`until`, by this node's clock) ends the term:
    /// another node of the region may lead by then, and this one must stop answering as the
    /// leader (what the step would commit is fenced by the store in any case). Its callers hear
    /// `Unavailable`; retrying with the same transfer ids is safe.
    async fn within_lease(
        &self,
        until: u64,
        step: impl Future<Output = Result<(), Term>>,
    ) -> Result<(), Term> {
        if !self.leaders.shared() {
            return step.await;
        }
        let left = until.saturating_sub(self.clock.now_ms());
        tokio::time::timeout(Duration::from_millis(left), step)
            .await
            .unwrap_or(Err(Term::SteppedDown(StepDown::Lapsed)))
    }

    /// Whether the shard's lease is still at `epoch` (`lease::holds`), read without blocking
    /// the thread.
    async fn holds(&self, epoch: u64) -> Result<(), Term> {
        let read = self
            .store
            .get_many_async(vec![keys::lease(self.shard)])
            .await;
        let value = read
            .map_err(|e| Term::SteppedDown(StepDown::Read(e)))?
            .pop()
            .flatten();
        match lease::holds_in(value.as_deref(), epoch) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Term::SteppedDown(StepDown::Deposed)),
            Err(e) => Err(Term::SteppedDown(StepDown::Lease(e))),
        }
    }

    /// Waits for the first command of a batch, or for the timer (then re-armed).
    async fn wake(&mut self, mut tick: std::pin::Pin<&mut tokio::time::Sleep>) -> Wake {
        tokio::select! {
            command = self.rx.recv() => match command {
                Some(command) => {
                    // Woken by one command: let the calls that are ready to run queue theirs
                    // first, so one batch (and one commit) carries them all. Small calls
                    // otherwise made batches of about one command each (docs/benchmarks.md).
                    tokio::task::yield_now().await;
                    Wake::Command(command)
                }
                None => Wake::Closed,
            },
            () = &mut tick => {
                tick.reset(tokio::time::Instant::now() + Duration::from_millis(TICK_MS));
                Wake::Tick
            }
        }
    }

    /// Feeds `first` and whatever else is queued, up to `batch_inputs_max` inputs, to the
    /// engine.
    async fn drain(
        &mut self,
        engine: &mut Engine,
        waiting: &mut Waiting,
        first: Option<Command>,
    ) -> Result<Drained, Term> {
        let mut drained = Drained::default();
        let mut next = first;
        while let Some(command) = next.take() {
            let handle = |engine: &mut Engine, input| {
                engine
                    .handle(input)
                    .map_err(|e| Term::SteppedDown(StepDown::Engine(e)))
            };
            match command {
                Command::Stop => {
                    drained.stop = true;
                    break;
                }
                Command::Peer { from, message } => handle(engine, Input::Peer { from, message })?,
                Command::Quota(command, tx) => {
                    let token = waiting.one(tx);
                    handle(engine, Input::Quota { token, command })?;
                }
                Command::CreateAccount(account, tx) => {
                    let token = waiting.one(tx);
                    handle(engine, Input::CreateAccount { token, account })?;
                }
                Command::ReserveForward {
                    id,
                    placement_key,
                    home,
                    reply,
                } => {
                    let token = waiting.one(reply);
                    let input = Input::ReserveForward {
                        token,
                        id,
                        placement_key,
                        home,
                    };
                    handle(engine, input)?;
                }
                Command::CreateTransfer(transfer, caller, tx) => {
                    drained.link(caller);
                    let token = waiting.one(tx);
                    let input = Input::CreateTransfer {
                        token,
                        transfer,
                        trace: caller,
                    };
                    handle(engine, input)?;
                }
                Command::CreateTransfers(transfers, caller, tx) => {
                    drained.link(caller);
                    let tokens = waiting.group(transfers.len(), tx);
                    drained.inputs += transfers.len().saturating_sub(1);
                    engine.reserve_transfers(transfers.len());
                    for (transfer, token) in transfers.into_iter().zip(tokens) {
                        let input = Input::CreateTransfer {
                            token,
                            transfer,
                            trace: caller,
                        };
                        handle(engine, input)?;
                        // A big request is thousands of inputs: let the runtime's other
                        // tasks (calls being decoded and answered) run now and then.
                        tokio::task::coop::consume_budget().await;
                    }
                }
            }
            tokio::task::coop::consume_budget().await;
            drained.inputs += 1;
            if drained.inputs < self.options.batch_inputs_max {
                next = self.rx.try_recv().ok();
            }
        }
        Ok(drained)
    }

    /// Fetches the stored values the engine waits for and hands them in, round after round
    /// (a step may find it needs more), at most [`FETCH_ROUNDS_MAX`] rounds per batch; steps
    /// still waiting then run in a later batch.
    async fn fetch(&self, engine: &mut Engine, metrics: &mut RuntimeMetrics) -> Result<(), Term> {
        for _ in 0..FETCH_ROUNDS_MAX {
            let wanted = engine.take_wanted();
            if wanted.is_empty() {
                return Ok(());
            }
            // Locations come from the node's directory (another node, usually); the rest
            // from this shard's store, both at once.
            let (locations, stored): (Vec<Read>, Vec<Read>) = wanted
                .into_iter()
                .partition(|read| matches!(read, Read::Locate(_)));
            metrics.store_reads.increment(stored.len() as u64);
            let keys = stored
                .iter()
                .map(|read| read.key(self.shard).expect("a stored value has a key"))
                .collect();
            let lookups = locations.iter().map(|read| match read {
                Read::Locate(id) => self.peers.locate(id.clone()),
                _ => unreachable!("partitioned"),
            });
            let (values, located) = futures::join!(
                self.store.get_many_async(keys),
                futures::future::join_all(lookups)
            );
            let values = values.map_err(|e| Term::SteppedDown(StepDown::Read(e)))?;
            debug_assert_eq!(values.len(), stored.len(), "one value per key");
            let located = located.into_iter().map(reads::location_value);
            engine
                .supply(
                    stored
                        .into_iter()
                        .zip(values)
                        .chain(locations.into_iter().zip(located)),
                )
                .map_err(|e| Term::SteppedDown(StepDown::Engine(e)))?;
        }
        Ok(())
    }

    /// Adds the lease's renewal to the batch once a third of the lease has passed (with the
    /// count of recorded transfer ids, which sizes the next term's first filter); returns
    /// when the renewed lease expires.
    fn renew_lease_if_due(
        &self,
        engine: &Engine,
        output: &mut Output,
        now: u64,
        renewed_at: &mut u64,
    ) -> Option<u64> {
        if now.saturating_sub(*renewed_at) < self.options.lease_ms / 3 {
            return None;
        }
        lease::renew(
            &mut output.writes,
            self.shard,
            &self.node,
            engine,
            now,
            self.options.lease_ms,
        );
        *renewed_at = now;
        Some(now + self.options.lease_ms)
    }

    /// The batch's span, linked to the sampled callers' spans and the phase spans it begins.
    /// Only a batch inside a sampled trace gets one: any other would be a span nobody sees,
    /// paid for on every batch (docs/benchmarks.md).
    fn batch_span(
        &self,
        engine: &Engine,
        output: &Output,
        mut links: Vec<TraceParent>,
        inputs: usize,
    ) -> tracing::Span {
        if links.is_empty() && output.links.is_empty() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            "shard.batch",
            shard = self.shard.0,
            epoch = engine.epoch(),
            inputs,
            writes = output.writes.writes.len(),
        );
        if !span.is_none() {
            let room = LINKS_PER_BATCH_MAX.saturating_sub(links.len());
            links.extend(output.links.iter().take(room));
            for link in links {
                span.add_link(link.span_context());
            }
        }
        span
    }

    /// Makes the batch durable. A failed commit (fenced, or the store failed) ends the term:
    /// nothing of the batch is acknowledged.
    async fn commit(
        &self,
        writes: WriteBatch,
        span: &tracing::Span,
        metrics: &mut RuntimeMetrics,
    ) -> Result<(), Term> {
        if writes.is_empty() {
            return Ok(());
        }
        metrics.batch_writes.record(writes.writes.len() as f64);
        let started = stopwatch();
        let commit_span = if span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(parent: span, "store.commit", shard = self.shard.0)
        };
        let committed = self
            .store
            .commit_async(writes)
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
            // Dropping the reply senders tells every waiting caller `Unavailable`.
            return Err(Term::SteppedDown(StepDown::Commit(e)));
        }
        Ok(())
    }

    /// After the commit: ends the spans of completed steps, answers the callers, starts filling
    /// a bigger id filter (its scan must find this batch's records) and sends the messages.
    fn deliver(&self, engine: &mut Engine, output: Output, term: &mut TermState) {
        drop(output.ended);
        for (token, reply) in output.replies {
            if let Reply::Transfer(r) = &reply {
                term.metrics
                    .transfer(r.record.result.as_ref().map(|_| ()).map_err(|e| *e));
            }
            term.waiting.reply(token, reply);
        }
        term.metrics.flush();
        if let Some(bigger) = engine.take_id_filter_to_fill() {
            self.fill_id_filter(bigger);
        }
        for (to, message) in output.messages {
            self.peers.send(to, self.shard, message);
        }
    }
}

/// What a leader term keeps from batch to batch.
struct TermState {
    waiting: Waiting,
    metrics: RuntimeMetrics,
    /// When the lease was last renewed.
    renewed_at: u64,
    /// When the lease expires, by this node's clock, unless a renewal commits first.
    lease_until: u64,
}

/// What woke the leader. Moved once per batch: boxing the command would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Command(Command),
    Tick,
    /// Every handle is gone: the node is stopping.
    Closed,
}

/// What one batch took from the queue.
#[derive(Default)]
struct Drained {
    /// Inputs (a request's transfers count one each).
    inputs: usize,
    /// Sampled callers' trace contexts, for the batch span's links.
    links: Vec<TraceParent>,
    /// A `Stop` came: the term ends after this batch.
    stop: bool,
}

impl Drained {
    fn link(&mut self, caller: Option<TraceParent>) {
        if let Some(caller) = caller
            && caller.sampled
            && self.links.len() < LINKS_PER_BATCH_MAX
        {
            self.links.push(caller);
        }
    }
}

/// Rounds of store reads per batch before the batch commits without its still-waiting steps
/// (a step's reads form a chain of at most three; lock releases can start more steps).
pub const FETCH_ROUNDS_MAX: usize = 16;

/// Measures the store commit (a runtime adapter: it may read the monotonic clock).
#[allow(clippy::disallowed_methods)]
fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}

/// Why a leader term ended before it was told to stop. Every caller of the term's open batch
/// gets `Unavailable` (its reply sender is dropped); nothing of that batch was acknowledged,
/// and retrying with the same transfer ids is safe. The next term reloads from the store.
#[derive(Debug, thiserror::Error)]
enum StepDown {
    /// The engine found a stored value it cannot decode.
    #[error("the engine cannot go on: {0}")]
    Engine(#[source] crate::engine::Fatal),
    /// Fetching the values the engine waits for failed.
    #[error("a store read failed: {0}")]
    Read(#[source] ledger_store::Error),
    /// The batch's commit failed: fenced by a newer epoch, or the store failed.
    #[error("the commit failed: {0}")]
    Commit(#[source] ledger_store::CommitError),
    /// A batch with messages and nothing to commit found the lease at another epoch.
    #[error("another leader holds the lease")]
    Deposed,
    /// Reading the lease for such a batch failed.
    #[error("reading the lease failed: {0}")]
    Lease(#[source] crate::ReadError),
    /// The lease expired while the store had not answered (a shared store).
    #[error("the lease expired before the store answered")]
    Lapsed,
}

#[derive(Debug)]
enum Term {
    Stopped,
    SteppedDown(StepDown),
}
