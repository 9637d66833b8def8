//! A deterministic in-process cluster of engines over memory stores, for unit tests, model
//! tests and simulation. Time is a number the test moves; messages wait in one ordered inbox
//! until the test delivers them, so a test can drop, delay or reorder them, or "crash" a shard
//! (rebuild its engine from its store, losing everything not committed).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ledger_domain::ShardId;
use ledger_store::{Memory, Store};

use crate::Options;
use crate::engine::id_filter::{self, IdFilter};
use crate::engine::{Engine, Input, Locate, Output, Reply, Token};
use crate::protocol::Message;
use crate::runtime::{FETCH_ROUNDS_MAX, acquire_lease, load};

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
        let shards = stores.len() as u32;
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
        };
        for i in 0..shards {
            let engine = sim.boot(ShardId(i));
            sim.engines.push(engine);
        }
        sim
    }

    fn boot(&self, shard: ShardId) -> Engine {
        let store: Arc<dyn Store> = self.stores[shard.0 as usize].clone();
        let lease = acquire_lease(&*store, shard, "sim", self.now_ms, self.options.lease_ms)
            .expect("lease");
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
        engine
    }

    /// Loses the shard's memory and rebuilds it from its store under a new epoch.
    pub fn crash(&mut self, shard: ShardId) {
        self.engines[shard.0 as usize] = self.boot(shard);
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
    pub fn batch(&mut self, shard: ShardId, inputs: Vec<Input>) -> Output {
        let store = Arc::clone(&self.stores[shard.0 as usize]);
        let engine = &mut self.engines[shard.0 as usize];
        engine.begin(self.now_ms);
        for input in inputs {
            engine.handle(input).expect("engine");
        }
        fetch(engine, &*store);
        engine.tick().expect("tick");
        fetch(engine, &*store);
        let output = engine.finish();
        if !output.writes.is_empty() {
            self.stores[shard.0 as usize]
                .commit(&output.writes)
                .expect("commit");
        }
        // As a leader's runtime does once the batch has committed (at once, unless told not to).
        if let Some(bigger) = engine.take_id_filter_to_fill() {
            self.unfilled.push((shard, bigger));
            if !self.fill_later {
                self.fill_filters();
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
        output
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
