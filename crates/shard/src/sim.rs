//! A deterministic in-process cluster of engines over memory stores, for unit tests, model
//! tests and simulation. Time is a number the test moves; messages wait in one ordered inbox
//! until the test delivers them, so a test can drop, delay or reorder them, or "crash" a shard
//! (rebuild its engine from its store, losing everything not committed).
//!
//! Leadership is the runtime's: each shard's leader holds the lease under its node's name
//! (renewed with its batches as the runtime renews it) and every commit expects its epoch. A
//! test can skew a shard's clock, fail a commit (a store fault: the leader steps down and
//! starts again from its store), stall a commit midway, and let another node take a shard
//! over once the lease has lapsed by that node's clock; the deposed leader may wake later and
//! try to commit, which must be refused (I5: [`Sim::fenced_landed`] lists any that was not).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use ledger_domain::ShardId;
use ledger_store::{Memory, Store, Write, WriteBatch};

use crate::engine::id_filter::{self, IdFilter};
use crate::engine::{CoordRecord, Engine, Input, Locate, Output, Reply, Token};
use crate::protocol::{Attempt, Decision, Message};
use crate::runtime::lease::{self, decode_lease};
use crate::runtime::{FETCH_ROUNDS_MAX, LeaseError, acquire_lease, load, renew};
use crate::{Options, keys};

/// A coordinator record as a batch leaves it.
enum Recorded {
    Deleted,
    As(Option<Box<CoordRecord>>),
}

/// A leader that lost its shard to another node: its engine, and the batch it was committing
/// when it stalled (if it was).
pub struct Deposed {
    pub shard: ShardId,
    pub node: String,
    pub engine: Engine,
    pub stalled: Option<Output>,
}

pub struct Sim {
    pub engines: Vec<Engine>,
    pub stores: Vec<Arc<Memory>>,
    pub now_ms: u64,
    pub options: Options,
    locate: Locate,
    /// Messages sent but not yet delivered: (to, from, message).
    pub inbox: VecDeque<(ShardId, ShardId, Message)>,
    pub replies: HashMap<Token, Reply>,
    next_token: Token,
    /// Bigger transfer-id filters the engines made, not yet filled: with `fill_later` set they
    /// wait here for [`Sim::fill_filters`] (a runtime's fill takes a while), else they are
    /// filled as soon as their batch has committed.
    pub unfilled: Vec<(ShardId, Arc<IdFilter>)>,
    pub fill_later: bool,
    /// With `Some`, every batch's output (shard, writes, replies, messages, in order) is
    /// written down here: two runs of one scenario must write the same lines.
    pub journal: Option<Vec<String>>,
    /// Per shard: the node whose engine leads it (the lease's holder), its clock's distance
    /// from `now_ms`, and when it last renewed its lease (by its clock).
    pub leaders: Vec<String>,
    pub skew_ms: Vec<i64>,
    renewed_at: Vec<u64>,
    /// Per shard: the batch its leader is committing while the commit stalls. A stalled
    /// leader takes no input: what reaches it is lost, as when a runtime steps down.
    pub stalled: Vec<Option<Output>>,
    /// Per shard: inputs that reached a stalled leader, for its next batch once the commit
    /// goes on (lost if the shard is taken over or crashes first, as the runtime fails them).
    held: Vec<Vec<Input>>,
    /// Leaders that lost their shard to another node, not yet woken.
    pub deposed: Vec<Deposed>,
    /// Commits so far; those whose number is in `failing_commits` fail (a store fault).
    pub commits: u64,
    pub failing_commits: BTreeSet<u64>,
    /// Leaders that stepped down because their commit failed.
    pub step_downs: u64,
    /// Commits that landed although the shard's lease had moved past their leader's epoch.
    pub fenced_landed: Vec<String>,
    /// Every durable decision a coordinator sent, by attempt; and what broke I6 (a decision
    /// is final), see [`Sim::check_decision`].
    pub decisions: HashMap<(ShardId, Attempt), Decision>,
    pub decisions_changed: Vec<String>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now_ms", &self.now_ms)
            .field("inbox", &self.inbox.len())
            .finish()
    }
}

impl Sim {
    pub fn new(shards: u32, locate: Locate, options: Options) -> Self {
        let stores = (0..shards).map(|_| Arc::new(Memory::new())).collect();
        Self::with_stores(stores, locate, options)
    }

    /// A cluster whose shard `i` leads from `stores[i]` (holding what it holds: a restart).
    pub fn with_stores(stores: Vec<Arc<Memory>>, locate: Locate, options: Options) -> Self {
        let leaders = vec![("sim".to_string(), 0); stores.len()];
        Self::led_by(stores, locate, options, leaders)
    }

    /// A cluster whose shard `i` leads from `stores[i]`, led by node `leaders[i].0` whose
    /// clock is `leaders[i].1` ms from the simulation's.
    pub fn led_by(
        stores: Vec<Arc<Memory>>,
        locate: Locate,
        options: Options,
        leaders: Vec<(String, i64)>,
    ) -> Self {
        let shards = stores.len() as u32;
        assert_eq!(leaders.len(), stores.len(), "one leader per shard");
        let (leaders, skew_ms): (Vec<String>, Vec<i64>) = leaders.into_iter().unzip();
        let mut sim = Sim {
            engines: Vec::new(),
            stores,
            now_ms: 1_000_000,
            options,
            locate,
            inbox: VecDeque::new(),
            replies: HashMap::new(),
            next_token: 0,
            unfilled: Vec::new(),
            fill_later: false,
            journal: None,
            leaders,
            skew_ms,
            renewed_at: vec![0; shards as usize],
            stalled: (0..shards).map(|_| None).collect(),
            held: (0..shards).map(|_| Vec::new()).collect(),
            deposed: Vec::new(),
            commits: 0,
            failing_commits: BTreeSet::new(),
            step_downs: 0,
            fenced_landed: Vec::new(),
            decisions: HashMap::new(),
            decisions_changed: Vec::new(),
        };
        for i in 0..shards {
            let engine = sim.boot(ShardId(i));
            sim.engines.push(engine);
        }
        sim
    }

    /// The time by `shard`'s leader's clock.
    pub fn now_of(&self, shard: ShardId) -> u64 {
        self.now_ms
            .saturating_add_signed(self.skew_ms[shard.0 as usize])
    }

    fn boot(&mut self, shard: ShardId) -> Engine {
        let i = shard.0 as usize;
        let now = self.now_of(shard);
        let engine = self
            .boot_as(shard, &self.leaders[i].clone(), now)
            .expect("a node takes its own lease over at once");
        self.renewed_at[i] = now;
        engine
    }

    fn boot_as(&self, shard: ShardId, node: &str, now: u64) -> Result<Engine, LeaseError> {
        let store: Arc<dyn Store> = self.stores[shard.0 as usize].clone();
        let lease = acquire_lease(&*store, shard, node, now, self.options.lease_ms)?;
        let recovered = load(&*store, shard).expect("load");
        let engine = Engine::new(
            shard,
            lease.epoch,
            self.options.clone(),
            self.locate.clone(),
            recovered,
        );
        // As a leader's runtime does, but at once: every test runs with the filter complete.
        if let Some(ids) = engine.id_filter() {
            id_filter::fill(&*store, shard, &ids).expect("fill the transfer-id filter");
        }
        Ok(engine)
    }

    /// Loses the shard's memory (and a stalled commit) and rebuilds it from its store under a
    /// new epoch, led by the same node.
    pub fn crash(&mut self, shard: ShardId) {
        self.stalled[shard.0 as usize] = None;
        self.held[shard.0 as usize].clear();
        self.engines[shard.0 as usize] = self.boot(shard);
    }

    /// `node`, whose clock is `skew_ms` from `now_ms`, takes `shard` over: refused while the
    /// lease has not lapsed by that clock. The leader it replaces is deposed, not stopped: it
    /// keeps its memory (and its stalled batch) until [`Sim::wake`].
    pub fn take_over(
        &mut self,
        shard: ShardId,
        node: &str,
        skew_ms: i64,
    ) -> Result<(), LeaseError> {
        let i = shard.0 as usize;
        let now = self.now_ms.saturating_add_signed(skew_ms);
        let engine = self.boot_as(shard, node, now)?;
        let old = std::mem::replace(&mut self.engines[i], engine);
        self.deposed.push(Deposed {
            shard,
            node: std::mem::replace(&mut self.leaders[i], node.to_string()),
            engine: old,
            stalled: self.stalled[i].take(),
        });
        self.held[i].clear();
        self.skew_ms[i] = skew_ms;
        self.renewed_at[i] = now;
        Ok(())
    }

    /// Runs a batch on `shard` up to its commit and stalls there: the batch is neither
    /// durable nor answered until [`Sim::resume`] (or lost, if the shard is taken over or
    /// crashes first).
    pub fn stall(&mut self, shard: ShardId, inputs: Vec<Input>) {
        let i = shard.0 as usize;
        if self.stalled[i].is_some() {
            return;
        }
        let now = self.now_of(shard);
        let store = Arc::clone(&self.stores[i]);
        let output = compute(&mut self.engines[i], &*store, now, inputs);
        self.stalled[i] = Some(output);
    }

    /// The stalled commit of `shard`'s leader goes on; then what reached it meanwhile forms
    /// its next batch.
    pub fn resume(&mut self, shard: ShardId) {
        let i = shard.0 as usize;
        if let Some(output) = self.stalled[i].take() {
            self.land(shard, output);
            let held = std::mem::take(&mut self.held[i]);
            if !held.is_empty() {
                self.batch(shard, held);
            }
        }
    }

    /// A deposed leader wakes: it goes on with its stalled commit, or else runs a batch of
    /// `inputs`, and steps down when the store refuses the commit (as it must: its epoch is
    /// past). If the commit lands anyway, it is written down in `fenced_landed` and its
    /// replies and messages go out as a leader's would.
    pub fn wake(&mut self, which: usize, inputs: Vec<Input>) {
        if which >= self.deposed.len() {
            return;
        }
        let Deposed {
            shard,
            node,
            mut engine,
            stalled,
        } = self.deposed.remove(which);
        let output = match stalled {
            Some(output) => output,
            None => {
                let store = Arc::clone(&self.stores[shard.0 as usize]);
                compute(&mut engine, &*store, self.now_ms, inputs)
            }
        };
        let epoch = engine.epoch();
        if let Some(journal) = &mut self.journal {
            journal.push(format!(
                "{shard}: deposed leader {node} (epoch {epoch}) wakes"
            ));
        }
        self.commit_and_send(shard, epoch, output);
    }

    /// Fills the bigger transfer-id filters waiting in `unfilled` from their stores.
    pub fn fill_filters(&mut self) {
        for (shard, filter) in std::mem::take(&mut self.unfilled) {
            id_filter::fill(&*self.stores[shard.0 as usize], shard, &filter)
                .expect("fill a bigger transfer-id filter");
        }
    }

    pub fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    /// Runs one batch on `shard`: the inputs, a tick, the commit, with the store reads the
    /// engine asks for in between, as a leader's runtime does. Returns the output (already
    /// committed; replies recorded; messages queued).
    ///
    /// A leader whose commit stalls keeps what reaches it for later ([`Sim::resume`]); one
    /// whose commit fails steps down and starts again from its store (nothing of the batch is
    /// answered).
    pub fn batch(&mut self, shard: ShardId, inputs: Vec<Input>) -> Output {
        let i = shard.0 as usize;
        if self.stalled[i].is_some() {
            self.held[i].extend(inputs);
            return Output::default();
        }
        let now = self.now_of(shard);
        let store = Arc::clone(&self.stores[i]);
        let mut output = compute(&mut self.engines[i], &*store, now, inputs);
        if now.saturating_sub(self.renewed_at[i]) >= self.options.lease_ms / 3 {
            renew(
                &mut output.writes,
                shard,
                &self.leaders[i],
                &self.engines[i],
                now,
                self.options.lease_ms,
            );
            self.renewed_at[i] = now;
        }
        self.land(shard, output)
    }

    /// Commits the current leader's batch and sends what it says; a failed commit makes the
    /// leader step down and start a new term (as the runtime does). Returns what was sent.
    fn land(&mut self, shard: ShardId, output: Output) -> Output {
        let i = shard.0 as usize;
        let epoch = self.engines[i].epoch();
        match self.commit_and_send(shard, epoch, output) {
            Some(output) => {
                // As a leader's runtime does once the batch has committed (at once, unless
                // told not to).
                if let Some(bigger) = self.engines[i].take_id_filter_to_fill() {
                    self.unfilled.push((shard, bigger));
                    if !self.fill_later {
                        self.fill_filters();
                    }
                }
                output
            }
            None => {
                // A new term of the same node, from what the store holds.
                self.step_downs += 1;
                self.engines[i] = self.boot(shard);
                Output::default()
            }
        }
    }

    /// Commits `output` (from a leader at `epoch`) unless the commit is one that fails, and
    /// on success records its replies and queues its messages. `None`: the commit failed.
    fn commit_and_send(&mut self, shard: ShardId, epoch: u64, output: Output) -> Option<Output> {
        let i = shard.0 as usize;
        // Each decision sent, with the coordinator's record as this batch leaves it: checked
        // once the batch is durable. A batch that deletes the record (the participant
        // acknowledged) may both resend the decision and answer a late query with abort.
        let decisions: Vec<(Attempt, Decision, Option<Box<CoordRecord>>)> = output
            .messages
            .iter()
            .filter_map(|(_, message)| match message {
                Message::Decide {
                    attempt, decision, ..
                } => match self.coord_record(shard, &output.writes, &attempt.op) {
                    Recorded::Deleted => None,
                    Recorded::As(record) => Some((attempt.clone(), *decision, record)),
                },
                _ => None,
            })
            .collect();
        if output.writes.is_empty() && !output.messages.is_empty() {
            // Messages from a batch that writes nothing leave only while its leader still
            // holds the lease, as the runtime sends them (`lease::holds`).
            if !lease::holds(&*self.stores[i], shard, epoch).unwrap_or(false) {
                if let Some(journal) = &mut self.journal {
                    journal.push(format!("{shard}: messages of epoch {epoch} fenced"));
                }
                return None;
            }
        }
        if !output.writes.is_empty() {
            self.commits += 1;
            if self.failing_commits.contains(&self.commits) {
                if let Some(journal) = &mut self.journal {
                    journal.push(format!("{shard}: commit {} fails", self.commits));
                }
                return None;
            }
            let leased = self.stores[i]
                .get(&keys::lease(shard))
                .ok()
                .flatten()
                .and_then(|bytes| decode_lease(&bytes).ok())
                .map_or(0, |lease| lease.epoch);
            if self.stores[i].commit(&output.writes).is_err() {
                if let Some(journal) = &mut self.journal {
                    journal.push(format!("{shard}: commit at epoch {epoch} refused"));
                }
                return None;
            }
            if leased > epoch {
                self.fenced_landed.push(format!(
                    "shard {shard}: a commit of epoch {epoch} landed after epoch {leased} took the lease"
                ));
            }
        }
        if let Some(journal) = &mut self.journal {
            journal.push(format!(
                "{shard} at {}: writes {:?} replies {:?} messages {:?}",
                self.now_ms, output.writes, output.replies, output.messages
            ));
        }
        for (token, reply) in &output.replies {
            self.replies.insert(*token, reply.clone());
        }
        for (attempt, decision, record) in decisions {
            self.check_decision(shard, &attempt, decision, record);
        }

        for (to, message) in &output.messages {
            // A resend identical to a message still queued is dropped, as a network may drop
            // any message: with `retry_ms: 0` every batch resends everything in flight, and
            // delivering each message in a batch of its own would otherwise grow the inbox
            // faster than it drains.
            let queued = self
                .inbox
                .iter()
                .any(|(t, f, m)| *t == *to && *f == shard && m == message);
            if !queued {
                self.inbox.push_back((*to, shard, message.clone()));
            }
        }
        Some(output)
    }

    /// I6 for a decision `shard` sends: while it keeps the attempt's record, the decision is
    /// the durable one, and an attempt's durable decision never changes; once the record is
    /// gone (the participant acknowledged, or nothing was logged), only abort may be answered
    /// (presumed abort: a late query of a finished attempt gets it, and the participant,
    /// holding nothing for the attempt, ignores it).
    fn check_decision(
        &mut self,
        shard: ShardId,
        attempt: &Attempt,
        decision: Decision,
        record: Option<Box<CoordRecord>>,
    ) {
        let Some(record) = record.filter(|r| r.attempt == *attempt) else {
            if decision != Decision::Abort {
                self.decisions_changed.push(format!(
                    "shard {shard}: attempt {attempt:?} was sent {decision:?} with no record of it"
                ));
            }
            return;
        };
        if record.decision != Some(decision) {
            self.decisions_changed.push(format!(
                "shard {shard}: attempt {attempt:?} was sent {decision:?}, its record says {:?}",
                record.decision
            ));
        }
        let first = *self
            .decisions
            .entry((shard, attempt.clone()))
            .or_insert(decision);
        if first != decision {
            self.decisions_changed.push(format!(
                "shard {shard}: attempt {attempt:?} was decided {first:?}, then {decision:?}"
            ));
        }
    }

    /// The coordinator record of `op` on `shard` as `writes` leave it (as the store holds it
    /// if they do not touch it).
    fn coord_record(&self, shard: ShardId, writes: &WriteBatch, op: &str) -> Recorded {
        let key = keys::coord(shard, op);
        let written = writes.writes.iter().rev().find_map(|w| match w {
            Write::Put(k, value) if *k == key => Some(Some(value.clone())),
            Write::Delete(k) if *k == key => Some(None),
            _ => None,
        });
        let bytes = match written {
            Some(None) => return Recorded::Deleted,
            Some(Some(bytes)) => Some(bytes),
            None => self.stores[shard.0 as usize].get(&key).ok().flatten(),
        };
        Recorded::As(
            bytes
                .and_then(|bytes| CoordRecord::decode(&bytes).ok())
                .map(Box::new),
        )
    }

    /// Delivers queued messages (each in a batch of its own) until none are left or `max`
    /// were delivered.
    pub fn deliver_all(&mut self, max: usize) -> usize {
        let mut delivered = 0;
        while delivered < max {
            let Some((to, from, message)) = self.inbox.pop_front() else {
                break;
            };
            self.batch(to, vec![Input::Peer { from, message }]);
            delivered += 1;
        }
        delivered
    }

    /// Delivers every queued message, each shard's in one batch in queue order, round after
    /// round, until none are left or `max_rounds` ran; returns how many were delivered. Unlike
    /// [`Sim::deliver_all`], messages that reach a shard together (duplicates, a decision and
    /// a late resend) meet in one batch, as they do when a leader drains a queue that filled
    /// while it committed.
    pub fn deliver_grouped(&mut self, max_rounds: usize) -> usize {
        let mut delivered = 0;
        for _ in 0..max_rounds {
            if self.inbox.is_empty() {
                break;
            }
            let mut by_shard: std::collections::BTreeMap<u32, Vec<Input>> = Default::default();
            for (to, from, message) in self.inbox.drain(..) {
                by_shard
                    .entry(to.0)
                    .or_default()
                    .push(Input::Peer { from, message });
                delivered += 1;
            }
            for (shard, inputs) in by_shard {
                self.batch(ShardId(shard), inputs);
            }
        }
        delivered
    }

    /// Runs a tick on every shard.
    pub fn tick_all(&mut self) {
        for i in 0..self.engines.len() {
            self.batch(ShardId(i as u32), Vec::new());
        }
    }
}

/// One batch of `engine` up to its commit: the inputs, the reads it asks for, a tick, more
/// reads, `finish`, in the order of the runtime's `lead`.
fn compute(engine: &mut Engine, store: &dyn Store, now_ms: u64, inputs: Vec<Input>) -> Output {
    engine.begin(now_ms);
    for input in inputs {
        engine.handle(input).expect("engine");
    }
    fetch(engine, store);
    engine.tick().expect("tick");
    fetch(engine, store);
    engine.finish()
}

/// Supplies what the engine wants from `store`, round after round, as the runtime does.
pub(crate) fn fetch(engine: &mut Engine, store: &dyn Store) {
    for _ in 0..FETCH_ROUNDS_MAX {
        let wanted = engine.take_wanted();
        if wanted.is_empty() {
            return;
        }
        let values: Vec<_> = wanted
            .into_iter()
            .map(|read| {
                let key = read
                    .key(engine.shard())
                    .expect("a Sim's locate knows every id");
                let value = store.get(&key).expect("read");
                (read, value)
            })
            .collect();
        engine.supply(values).expect("engine");
    }
}
