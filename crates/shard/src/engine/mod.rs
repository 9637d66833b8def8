//! The sans-IO engine of one shard: events in, commands out.
//!
//! ```text
//!   Input (command | peer message) ──► handle() ──┐
//!   time ───────────────────────────► tick()   ──┼──► finish() ─► Output {
//!                                                  │                 writes   (one store commit)
//!   stored values ─────────────────► supply() ──┤                 replies  (after the commit)
//!     (what take_wanted() asked for)               │                 messages (after the commit)
//!                                                  ┘               }
//! ```
//!
//! The runtime calls `begin`, feeds inputs, fetches what the engine wants and supplies it
//! (again, until it wants nothing), calls `tick` (and fetches again), then `finish`, commits
//! the writes durably and only then delivers replies and messages: nothing is acknowledged,
//! and no protocol step is taken, before the state it reports is durable.
//!
//! The engine only computes: it holds no store and reads no clock. All accounts of the shard
//! are held in memory (the engine is their only writer). Transfer records, holds, directory
//! records and done markers stay in the store; a step that needs one waits until the runtime
//! has fetched it ([`reads`]). Its output (writes, replies, messages and their order) depends
//! only on its inputs, the values supplied and the times given: maps whose order reaches the
//! output are ordered maps, never hash maps seeded per process. (One exception, outside any
//! simulation: in a sampled trace, the span ids that messages carry come from the
//! OpenTelemetry SDK's random generator; without an exporter no span is made.)
//!
//! Account locks exist only for cross-shard transfers (see [`coordinator`] and
//! [`participant`]): an account that is prepared for one cannot change until the decision.
//! Other operations on it wait in a bounded queue per lock, with a deadline; other accounts are
//! unaffected.

// Inputs and replies are moved once through channels and queues; boxing them would add an
// allocation per transfer for no gain.
#![allow(clippy::large_enum_variant, clippy::result_large_err)]

mod accounts;
mod coordinator;
pub mod id_filter;
mod participant;
mod quota;
#[cfg(test)]
mod quota_tests;
pub mod reads;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use foldhash::{HashMap, HashSet};
use serde::{Deserialize, Serialize};

use ledger_domain::{
    Account, Balances, Change, Committed, EntryKind, HoldState, HoldStatus, NewAccount, Rejection,
    ShardId, Side, Transfer, TransferKind, TransferRecord,
};
use ledger_store::{Expect, Write, WriteBatch};

use crate::codec::{self, DecodeError};
use crate::directory::Forward;
use crate::metrics::EngineMetrics;
use crate::protocol::Message;
use crate::quota::{Allowance, Command, CommandError, CommandReply, QuotaRecord, Settlement};
use crate::trace::{self, Role, TraceParent};
use crate::{Options, keys};
use accounts::Accounts;
use reads::{Fetched, Known, Read, Value};

pub use coordinator::CoordRecord;
pub use participant::PreparedRecord;

/// Identifies a waiting caller; the runtime maps it to a reply channel.
pub type Token = u64;

/// Finds the shard of an account id from what the node knows without asking another node
/// (`crate::directory::Directory::home`); `None`: only a directory lookup can say, and the
/// engine waits for it as for a stored value ([`Read::Locate`]).
pub type Locate = Arc<dyn Fn(&str) -> Option<ShardId> + Send + Sync>;

#[derive(Clone, Debug)]
pub enum Input {
    /// Create an account homed on this shard (already validated and normalised).
    CreateAccount { token: Token, account: NewAccount },
    /// This shard is the directory shard of `id` (the shard its id hashes to): record that the
    /// account lives on `home` because of its placement key. First writer wins.
    ReserveForward {
        token: Token,
        id: String,
        placement_key: String,
        home: ShardId,
    },
    /// A transfer whose debit account (or hold) is on this shard (already validated), with the
    /// caller's trace context (its 2PC and lock-wait spans join that trace).
    CreateTransfer {
        token: Token,
        transfer: Transfer,
        trace: Option<TraceParent>,
    },
    /// A two-phase commit or quota message from another shard.
    Peer { from: ShardId, message: Message },
    /// An operator's quota command (`crate::quota::Command`): run by the account's home
    /// shard, or (`Command::Region`) answered by a quota shard.
    Quota { token: Token, command: Command },
}

#[derive(Clone, Debug)]
pub enum Reply {
    Account(Result<Account, Rejection>),
    Forward(Result<(), Rejection>),
    Transfer(TransferReply),
    Quota(CommandReply),
    /// Nothing was applied or recorded, for a reason that passes (another node did not
    /// answer): the same request may succeed later.
    Unavailable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferReply {
    pub record: TransferRecord,
    /// For a hold: its current status.
    pub hold: Option<HoldStatus>,
    /// Answered from the id's recorded outcome (a retry with the same fields): nothing was
    /// applied now.
    pub replayed: bool,
    /// For `exists_with_different_fields`: the fields (wire names) in which the request
    /// differs from the one recorded (or in flight) under its id.
    pub differing: Vec<&'static str>,
}

impl TransferReply {
    /// The amount moved, or the rejection.
    pub fn outcome(&self) -> Result<u64, Rejection> {
        self.record
            .result
            .as_ref()
            .map(|c| c.amount)
            .map_err(|r| *r)
    }

    /// The answer of a request applied (or refused) now.
    pub fn new(record: TransferRecord, hold: Option<HoldStatus>) -> Self {
        Self {
            record,
            hold,
            replayed: false,
            differing: Vec::new(),
        }
    }

    /// The refusal of a request that reuses the id of `recorded` with other fields.
    fn different_fields(request: Transfer, recorded: &Transfer) -> Self {
        let differing = recorded.differing_fields(&request);
        let record = TransferRecord {
            request,
            result: Err(Rejection::ExistsWithDifferentFields),
        };
        Self {
            differing,
            ..Self::new(record, None)
        }
    }
}

#[derive(Debug, Default)]
pub struct Output {
    pub writes: WriteBatch,
    pub replies: Vec<(Token, Reply)>,
    pub messages: Vec<(ShardId, Message)>,
    /// Spans of steps this batch completes: the runtime drops (ends) them once it is durable.
    pub ended: Vec<tracing::Span>,
    /// Phase spans begun in this batch: the batch span links to them.
    pub links: Vec<TraceParent>,
}

/// The engine cannot go on: a value supplied from the store does not decode. The runtime fails
/// the batch's callers, drops the engine and rebuilds it from the store.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// What a new leader loads from the store before it serves.
#[derive(Debug, Default)]
pub struct Recovered {
    pub accounts: Vec<Account>,
    pub holds: Vec<(String, HoldStatus)>,
    pub coordinations: Vec<CoordRecord>,
    pub prepared: Vec<PreparedRecord>,
    /// Transfer ids the shard had recorded at an earlier term's last lease renewal
    /// (`keys::id_count`; 0 if none was written): the first filter is made big enough for
    /// them, so a restart fills one filter, not a small one and then a rebuilt one.
    pub ids_recorded: u64,
    /// Home side: the allowances of accounts homed here.
    pub allowances: Vec<Allowance>,
    /// Quota side: this shard's quota records and the settlements not yet answered.
    pub quota_records: Vec<QuotaRecord>,
    pub outbox: Vec<Settlement>,
}

/// A lock on an account (`a:<id>`) or on a hold being resolved across shards (`h:<id>`).
#[derive(Debug)]
struct Lock {
    holder: String,
    waiters: VecDeque<Parked>,
}

#[derive(Debug)]
enum Parked {
    /// A command or prepare that touches a locked account; `deadline_ms` bounds the wait.
    /// `wait` is its `lock.wait` span (sampled traces only), ended when it runs or times out.
    Input {
        input: Input,
        deadline_ms: u64,
        since_ms: u64,
        wait: Option<tracing::Span>,
    },
    /// A coordination waiting for one of its own shard's locks.
    Coordination { op: String },
}

/// A step waiting for stored values (see [`reads`]); run again once they are supplied.
#[derive(Debug)]
enum Task {
    Input(Input),
    /// A coordination's next step: it rechecks its hold once it has the hold's lock.
    Advance(String),
    /// The expiry of a due hold.
    Expire(String),
}

/// A post's or void's hold, as the stored values show it.
#[derive(Clone, Debug)]
enum PendingHold {
    Found(HoldStatus),
    /// No hold, but a transfer with that id: it was not a hold.
    NotPending,
    NotFound,
}

/// The stored values a transfer's handling reads, gathered before it changes anything.
#[derive(Debug)]
struct TransferReads {
    /// The id's recorded outcome (a replay).
    recorded: Option<TransferRecord>,
    /// For a replayed committed hold: its status.
    recorded_hold: Option<HoldStatus>,
    /// For a post or void: its hold.
    pending: Option<PendingHold>,
    /// For a new transfer that gets as far as its credit account: that account's shard
    /// (`Some(None)`: the directory lookup failed).
    credit_shard: Option<Option<ShardId>>,
}

/// The writes, replies and messages of the batch being built.
#[derive(Debug, Default)]
struct Batch {
    writes: WriteBatch,
    /// Accounts changed in this batch -> their version when the batch began (None: created).
    dirty: HashMap<String, Option<u64>>,
    /// Transfer records written in this batch (read before the store): id -> its write.
    transfers: HashMap<String, usize>,
    holds: HashMap<String, HoldStatus>,
    /// Directory records written in this batch.
    forwards: HashMap<String, Forward>,
    /// Participant attempts decided in this batch: their done markers are among its writes,
    /// not yet in the store.
    done: HashSet<String>,
    replies: Vec<(Token, Reply)>,
    messages: Vec<(ShardId, Message)>,
    ended: Vec<tracing::Span>,
    links: Vec<TraceParent>,
}

pub struct Engine {
    shard: ShardId,
    epoch: u64,
    options: Options,
    locate: Locate,
    now_ms: u64,
    accounts: Accounts,
    /// Pending holds with a timeout, by expiry.
    expiries: BTreeSet<(u64, String)>,
    // Ordered maps: ticks walk these three, and the order of what they send and answer must
    // not depend on a hash seed (the engine is deterministic).
    locks: BTreeMap<String, Lock>,
    /// Cross-shard operations this shard coordinates, by op.
    coordinations: BTreeMap<String, coordinator::Coordination>,
    /// Legs this shard has prepared as a participant, by attempt key.
    prepared: BTreeMap<String, participant::Prepared>,
    next_seq: u64,
    /// Waiters released by a lock, run after the current input.
    rerun: VecDeque<Parked>,
    /// Stored values supplied for this batch.
    fetched: Fetched,
    /// Stored values a stalled step waits for, not yet handed to the runtime.
    wanted: BTreeSet<Read>,
    /// Steps waiting for stored values, in arrival order; while any waits, new inputs queue
    /// behind it, so a request's transfers apply in their order.
    stalled: VecDeque<Task>,
    batch: Batch,
    metrics: EngineMetrics,
    /// The transfer ids this shard has recorded (`None`: no filter configured). Shared with
    /// the task that fills it from the store when the term begins.
    ids: Option<Arc<id_filter::IdFilter>>,
    /// A bigger filter being filled to replace `ids`, which is past its design load; ids
    /// recorded meanwhile go into both. Swapped in once complete.
    next_ids: Option<Arc<id_filter::IdFilter>>,
    /// `next_ids`, for the runtime to fill once the batch that made it has committed.
    ids_to_fill: Option<Arc<id_filter::IdFilter>>,
    /// Whether this term has warned that its filter is full at its largest size.
    filter_full_logged: bool,
    /// The transfer ids recorded as of an earlier term (`Recovered::ids_recorded`).
    ids_recorded_before: u64,
    /// Regional quotas: allowances (home side), quota records and the outbox (quota side).
    quotas: quota::Quotas,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("shard", &self.shard)
            .field("epoch", &self.epoch)
            .field("accounts", &self.accounts.len())
            .field("locks", &self.locks.len())
            .field("coordinations", &self.coordinations.len())
            .field("prepared", &self.prepared.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds the engine of a new leader term from what the store holds. Prepared legs take
    /// their locks again; coordinations resume (undecided ones are aborted: presumed abort).
    pub fn new(
        shard: ShardId,
        epoch: u64,
        options: Options,
        locate: Locate,
        recovered: Recovered,
    ) -> Self {
        let ids = id_filter::IdFilter::new(
            options
                .transfer_filter_initial_bytes
                .max(id_filter::bytes_for(recovered.ids_recorded))
                .min(options.transfer_filter_bytes),
        )
        .map(Arc::new);
        let mut engine = Self {
            shard,
            epoch,
            options,
            locate,
            now_ms: 0,
            accounts: recovered.accounts.into_iter().collect(),
            expiries: BTreeSet::new(),
            locks: BTreeMap::new(),
            coordinations: BTreeMap::new(),
            prepared: BTreeMap::new(),
            next_seq: 0,
            rerun: VecDeque::new(),
            fetched: Fetched::default(),
            wanted: BTreeSet::new(),
            stalled: VecDeque::new(),
            batch: Batch::default(),
            metrics: EngineMetrics::new(shard),
            ids,
            next_ids: None,
            ids_to_fill: None,
            filter_full_logged: false,
            ids_recorded_before: recovered.ids_recorded,
            quotas: quota::Quotas::default(),
        };
        engine.recover_quotas(
            recovered.allowances,
            recovered.quota_records,
            recovered.outbox,
        );
        for (id, hold) in recovered.holds {
            if let (HoldState::Pending, Some(at)) = (hold.state, hold.expires_at_ms) {
                engine.expiries.insert((at, id));
            }
        }
        for record in recovered.prepared {
            engine.recover_prepared(record);
        }
        for record in recovered.coordinations {
            engine.recover_coordination(record);
        }
        engine
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The filter of recorded transfer ids in use, for [`id_filter::fill`] to fill from the
    /// store when the term begins; until it has, the engine looks every id up in the store.
    pub fn id_filter(&self) -> Option<Arc<id_filter::IdFilter>> {
        self.ids.clone()
    }

    /// About how many transfer ids the shard has recorded: the inserts of its filter once
    /// filled (an id the fill saw twice counts twice), and never fewer than the count the
    /// term started from. For the next term's first filter's size (`keys::id_count`).
    pub fn ids_recorded(&self) -> u64 {
        match &self.ids {
            Some(ids) if ids.is_complete() => ids.inserted().max(self.ids_recorded_before),
            _ => self.ids_recorded_before,
        }
    }

    /// A bigger filter of recorded transfer ids made by the batch just finished, to be filled
    /// by [`id_filter::fill`] once that batch has committed (not before: the scan must find
    /// its records). The engine uses it once it is complete.
    pub fn take_id_filter_to_fill(&mut self) -> Option<Arc<id_filter::IdFilter>> {
        self.ids_to_fill.take()
    }

    /// Starts a batch at time `now_ms`.
    pub fn begin(&mut self, now_ms: u64) {
        assert!(
            self.batch.writes.is_empty(),
            "shard={} a batch is already open",
            self.shard
        );
        // Time never goes backwards inside the engine, even if the wall clock does.
        self.now_ms = self.now_ms.max(now_ms);
        if self
            .next_ids
            .as_ref()
            .is_some_and(|next| next.is_complete())
        {
            self.ids = self.next_ids.take();
        }
    }

    /// Makes room for `transfers` more transfers in the open batch (a request's group arrives
    /// whole): its vectors grow once instead of doubling, which copied every element and, for
    /// a group of thousands, faulted in fresh pages each time.
    pub fn reserve_transfers(&mut self, transfers: usize) {
        self.batch.replies.reserve(transfers);
        // A transfer record and an entry per account; accounts are written at `finish`.
        self.batch
            .writes
            .writes
            .reserve(transfers.saturating_mul(3));
    }

    pub fn handle(&mut self, input: Input) -> Result<(), Fatal> {
        if !self.stalled.is_empty() {
            // Inputs apply in the order they came: behind a stalled step an input waits too,
            // but its reads are asked for now, so one fetch serves them all.
            self.prefetch(&input)?;
            self.stalled.push_back(Task::Input(input));
            return Ok(());
        }
        self.dispatch(input)?;
        self.run_released()
    }

    /// The stored values stalled steps wait for, for the runtime to fetch and hand to
    /// [`Engine::supply`]. Empty when nothing waits.
    pub fn take_wanted(&mut self) -> Vec<Read> {
        std::mem::take(&mut self.wanted).into_iter().collect()
    }

    /// Whether a step waits for stored values (the runtime fetches them before `finish`; a
    /// step still waiting then runs in a later batch).
    pub fn is_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// Hands in stored values (as of the last commit) and runs the steps that waited for them,
    /// in order. A step may find it needs more: it stalls again and [`Engine::take_wanted`]
    /// says what.
    pub fn supply(&mut self, values: impl IntoIterator<Item = (Read, Value)>) -> Result<(), Fatal> {
        for (read, value) in values {
            self.fetched.insert(read, value);
        }
        for work in std::mem::take(&mut self.stalled) {
            if !self.stalled.is_empty() {
                self.prefetch_work(&work)?;
                self.stalled.push_back(work);
                continue;
            }
            match work {
                Task::Input(input) => self.dispatch(input)?,
                Task::Advance(op) => self.advance(&op)?,
                Task::Expire(pending_id) => self.expire_hold(pending_id)?,
            }
            self.run_released()?;
        }
        Ok(())
    }

    /// Parks a step until the values it asked for are supplied.
    fn stall(&mut self, work: Task) {
        self.metrics.stalls.increment(1);
        self.stalled.push_back(work);
    }

    /// Asks for the stored values an input will read, without running it.
    fn prefetch(&mut self, input: &Input) -> Result<(), Fatal> {
        match input {
            Input::CreateAccount { account, .. } => {
                if self.accounts.get(&account.id).is_none() {
                    self.lookup_forward(&account.id)?;
                }
            }
            Input::ReserveForward { id, .. } => {
                if self.accounts.get(id).is_none() {
                    self.lookup_forward(id)?;
                }
            }
            Input::CreateTransfer { transfer, .. } => {
                self.transfer_reads(transfer)?;
            }
            Input::Peer {
                message: Message::Prepare(leg),
                ..
            } => {
                let key = leg.attempt.key();
                if !self.prepared.contains_key(&key) {
                    self.lookup_done(&key);
                }
            }
            Input::Peer { .. } | Input::Quota { .. } => {}
        }
        Ok(())
    }

    fn prefetch_work(&mut self, work: &Task) -> Result<(), Fatal> {
        match work {
            Task::Input(input) => self.prefetch(input),
            // Asked for when they stalled; they run only after what queued before them.
            Task::Advance(_) | Task::Expire(_) => Ok(()),
        }
    }

    /// Runs the waiters a released lock let go.
    fn run_released(&mut self) -> Result<(), Fatal> {
        while let Some(parked) = self.rerun.pop_front() {
            match parked {
                Parked::Input {
                    input,
                    deadline_ms,
                    since_ms,
                    wait,
                } => {
                    if self.now_ms >= deadline_ms {
                        self.end_wait(since_ms, wait, "timed out");
                        self.time_out(input);
                    } else {
                        self.end_wait(since_ms, wait, "acquired");
                        self.dispatch(input)?;
                    }
                }
                Parked::Coordination { op } => self.advance(&op)?,
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, input: Input) -> Result<(), Fatal> {
        match input {
            Input::CreateAccount { token, account } => self.create_account(token, account)?,
            Input::ReserveForward {
                token,
                id,
                placement_key,
                home,
            } => self.reserve_forward(token, id, placement_key, home)?,
            Input::CreateTransfer {
                token,
                transfer,
                trace,
            } => self.create_transfer(token, transfer, trace)?,
            Input::Peer { from, message } => {
                if let Some(message) = self.on_quota_message(from, message)? {
                    self.on_message(from, message)?;
                }
            }
            Input::Quota { token, command } => self.quota_command(token, command)?,
        }
        Ok(())
    }

    /// Time-driven work: lock-wait deadlines, hold expiry, protocol retries and timeouts.
    pub fn tick(&mut self) -> Result<(), Fatal> {
        self.expire_lock_waits();
        self.expire_holds()?;
        self.tick_coordinations()?;
        self.tick_prepared();
        self.tick_quotas();
        self.run_released()
    }

    /// Ends the batch: the writes with their preconditions (this leader's epoch, and every
    /// changed account still at the version this leader last committed), replies and messages.
    pub fn finish(&mut self) -> Output {
        let mut batch = std::mem::take(&mut self.batch);
        #[cfg(debug_assertions)]
        self.check_invariants(&batch);
        let mut writes = std::mem::take(&mut batch.writes);
        let mut dirty: Vec<_> = batch.dirty.drain().collect();
        dirty.sort_unstable();
        #[cfg(feature = "sim-bugs")]
        let fenced = !crate::bugs::on(crate::bugs::Bug::SkipEpochCheck);
        #[cfg(not(feature = "sim-bugs"))]
        let fenced = true;
        if fenced && (!writes.writes.is_empty() || !dirty.is_empty()) {
            writes.expect(
                keys::lease(self.shard),
                Expect::Prefix(codec::version_prefix(self.epoch)),
            );
        }
        for (id, before) in dirty {
            let account = &self.accounts[&id];
            let key = keys::account(self.shard, &id);
            let expect = match before {
                None => Expect::Absent,
                Some(version) => Expect::Prefix(codec::version_prefix(version)),
            };
            writes.expect(key.clone(), expect);
            writes.put(key, codec::encode_account(account));
        }
        self.metrics
            .in_flight(self.coordinations.len(), self.prepared.len());
        self.grow_id_filter(&batch);
        // The next batch starts sized like this one, instead of growing by doubling (a copy
        // of every element each time). Bounded as the batch is: `batch_inputs_max` inputs per batch.
        self.batch.writes.writes.reserve(writes.writes.len());
        self.batch
            .writes
            .preconditions
            .reserve(writes.preconditions.len());
        self.batch.replies.reserve(batch.replies.len());
        // The next batch reuses this one's maps, emptied: fresh ones grew by rehashing, about
        // three times per one-transfer call at (b). Bounded as the batch is.
        batch.transfers.clear();
        batch.holds.clear();
        batch.forwards.clear();
        batch.done.clear();
        // The store moves on with this commit: what was fetched for this batch is stale.
        self.fetched.clear();
        self.batch.dirty = batch.dirty;
        self.batch.transfers = batch.transfers;
        self.batch.holds = batch.holds;
        self.batch.forwards = batch.forwards;
        self.batch.done = batch.done;
        Output {
            writes,
            replies: batch.replies,
            messages: batch.messages,
            ended: batch.ended,
            links: batch.links,
        }
    }

    /// Past its design load, starts a bigger filter of recorded ids (up to the configured
    /// most), with this batch's ids in it; the runtime fills it with the store's once this
    /// batch has committed.
    fn grow_id_filter(&mut self, batch: &Batch) {
        let Some(ids) = &self.ids else {
            return;
        };
        let inserted = ids.inserted();
        self.metrics.filter_ids.set(inserted as f64);
        if self.next_ids.is_some() || !ids.is_complete() || inserted <= ids.design_capacity() {
            return;
        }
        let most = self.options.transfer_filter_bytes;
        if ids.bytes() >= most {
            if !self.filter_full_logged {
                self.filter_full_logged = true;
                tracing::warn!(
                    shard = %self.shard,
                    ids = inserted,
                    capacity = ids.design_capacity(),
                    "the transfer-id filter is full at its largest size: more and more new ids will be looked up in the store; raise shard.transfer_filter_bytes (12 bits per id)"
                );
            }
            return;
        }
        let bytes = id_filter::bytes_for(inserted)
            .max(ids.bytes() * 2)
            .min(most);
        let Some(next) = id_filter::IdFilter::new(bytes).map(Arc::new) else {
            return;
        };
        for id in batch.transfers.keys() {
            next.insert(id);
        }
        tracing::debug!(shard = %self.shard, ids = inserted, bytes, "rebuilding the transfer-id filter bigger");
        self.next_ids = Some(Arc::clone(&next));
        self.ids_to_fill = Some(next);
    }

    #[cfg(debug_assertions)]
    fn check_invariants(&self, batch: &Batch) {
        for (id, before) in &batch.dirty {
            let account = &self.accounts[id];
            assert!(
                account.satisfies_flags(),
                "shard={} I2 broken: {account:?}",
                self.shard
            );
            if let Some(before) = before {
                assert!(
                    account.version > *before,
                    "shard={} I4: {id} version went back",
                    self.shard
                );
            }
        }
        for (key, lock) in &self.locks {
            let held = self.prepared.contains_key(&lock.holder)
                || self
                    .coordinations
                    .values()
                    .any(|c| c.attempt_key() == lock.holder);
            assert!(
                held,
                "shard={} lock {key} held by unknown {}",
                self.shard, lock.holder
            );
        }
    }

    // ---- reads (from this batch's writes, else from the values supplied) -------------------

    /// Asks the runtime for a stored value.
    fn want(&mut self, read: Read) {
        self.wanted.insert(read);
    }

    /// A value as fetched (`Some`: present or absent), or, not fetched yet, wanted.
    fn known<T>(&mut self, found: Option<Option<T>>, read: impl FnOnce() -> Read) -> Known<T> {
        match found {
            Some(value) => Known::Yes(value),
            None => {
                self.want(read());
                Known::Wanted
            }
        }
    }

    fn lookup_transfer(&mut self, id: &str) -> Result<Known<TransferRecord>, Fatal> {
        if let Some(&index) = self.batch.transfers.get(id) {
            let Write::Put(_, bytes) = &self.batch.writes.writes[index] else {
                unreachable!("a transfer record is a put")
            };
            return Ok(Known::Yes(Some(codec::decode("transfer", bytes)?)));
        }
        // Not in this batch; a complete filter rules most new ids out without the store.
        if self.ids.as_ref().is_some_and(|f| f.certainly_absent(id)) {
            self.metrics.filter_skips.increment(1);
            return Ok(Known::Yes(None));
        }
        let found = reads::decoded(self.fetched.transfer(id), "transfer")?;
        Ok(self.known(found, || Read::Transfer(id.to_string())))
    }

    fn lookup_hold(&mut self, pending_id: &str) -> Result<Known<HoldStatus>, Fatal> {
        if let Some(hold) = self.batch.holds.get(pending_id) {
            return Ok(Known::Yes(Some(hold.clone())));
        }
        let found = reads::decoded(self.fetched.hold(pending_id), "hold")?;
        Ok(self.known(found, || Read::Hold(pending_id.to_string())))
    }

    /// The directory record this shard holds for account `id`, if any: in this batch or in
    /// the store. Kept in the store, not in memory: only creating an account asks, and a node
    /// with a million accounts placed by key held about 100 MiB of them (docs/benchmarks.md).
    fn lookup_forward(&mut self, id: &str) -> Result<Known<Forward>, Fatal> {
        if let Some(forward) = self.batch.forwards.get(id) {
            return Ok(Known::Yes(Some(forward.clone())));
        }
        let found = self
            .fetched
            .forward(id)
            .map(|value| value.as_deref().map(Forward::decode).transpose())
            .transpose()?;
        Ok(self.known(found, || Read::Forward(id.to_string())))
    }

    /// The shard of account `id`: this one if it holds the account, else what the node's
    /// directory knows, else a directory lookup the runtime makes (`Known::Yes(None)`: the
    /// lookup failed, the directory shard's node did not answer).
    fn lookup_location(&mut self, id: &str) -> Known<ShardId> {
        if self.accounts.get(id).is_some() {
            debug_assert!(
                (self.locate)(id).is_none_or(|shard| shard == self.shard),
                "{id} is held here"
            );
            return Known::Yes(Some(self.shard));
        }
        if let Some(shard) = (self.locate)(id) {
            return Known::Yes(Some(shard));
        }
        let found = self.fetched.location(id).map(reads::location);
        self.known(found, || Read::Locate(id.to_string()))
    }

    /// Whether a participant attempt is decided (applied or released), in this batch or in the
    /// store; `None` while not fetched.
    fn lookup_done(&mut self, attempt_key: &str) -> Option<bool> {
        if self.batch.done.contains(attempt_key) {
            return Some(true);
        }
        match self.fetched.done(attempt_key) {
            Some(value) => Some(value.is_some()),
            None => {
                self.want(Read::Done(attempt_key.to_string()));
                None
            }
        }
    }

    /// What a post or void finds of its hold; `None` while not fetched.
    fn pending_reads(&mut self, pending_id: &str) -> Result<Option<PendingHold>, Fatal> {
        match self.lookup_hold(pending_id)? {
            Known::Wanted => Ok(None),
            Known::Yes(Some(hold)) => Ok(Some(PendingHold::Found(hold))),
            Known::Yes(None) => Ok(match self.lookup_transfer(pending_id)? {
                Known::Wanted => None,
                Known::Yes(Some(_)) => Some(PendingHold::NotPending),
                Known::Yes(None) => Some(PendingHold::NotFound),
            }),
        }
    }

    /// Everything a transfer's handling reads; `None` while any of it is not fetched (all of
    /// it that can be known now is asked for at once).
    fn transfer_reads(&mut self, transfer: &Transfer) -> Result<Option<TransferReads>, Fatal> {
        let recorded = self.lookup_transfer(&transfer.id)?.known();
        let pending = match transfer.kind {
            TransferKind::PostPending | TransferKind::VoidPending => {
                self.pending_reads(&transfer.pending_id)?.map(Some)
            }
            TransferKind::Posted | TransferKind::Pending => Some(None),
        };
        let (Some(recorded), Some(pending)) = (recorded, pending) else {
            return Ok(None);
        };
        // A new transfer's credit account: where it lives decides the path.
        let credit_shard = match (&recorded, transfer.kind, &pending) {
            (Some(_), _, _) => None,
            (None, TransferKind::Posted | TransferKind::Pending, _) => {
                match self.lookup_location(&transfer.credit_account_id) {
                    Known::Yes(shard) => Some(shard),
                    Known::Wanted => return Ok(None),
                }
            }
            (None, _, Some(PendingHold::Found(hold))) => {
                match self.lookup_location(&hold.credit_account_id) {
                    Known::Yes(shard) => Some(shard),
                    Known::Wanted => return Ok(None),
                }
            }
            (None, _, _) => None,
        };
        // A replayed committed hold is answered with its status.
        let recorded_hold = match &recorded {
            Some(record)
                if record.request.kind == TransferKind::Pending && record.result.is_ok() =>
            {
                match self.lookup_hold(&transfer.id)?.known() {
                    Some(hold) => hold,
                    None => return Ok(None),
                }
            }
            _ => None,
        };
        Ok(Some(TransferReads {
            recorded,
            recorded_hold,
            pending,
            credit_shard,
        }))
    }

    // ---- writes ------------------------------------------------------------------------------

    fn reply(&mut self, token: Token, reply: Reply) {
        self.batch.replies.push((token, reply));
    }

    fn send(&mut self, to: ShardId, message: Message) {
        self.batch.messages.push((to, message));
    }

    /// Begins a phase span of a sampled trace; the batch span links to it.
    fn begin_phase(
        &mut self,
        name: &'static str,
        parent: Option<TraceParent>,
        role: Role,
        op: &str,
    ) -> Option<tracing::Span> {
        let span = trace::phase(name, parent, self.shard, role, op)?;
        if let Some(cx) = TraceParent::of_span(&span) {
            self.batch.links.push(cx);
        }
        Some(span)
    }

    /// Ends `span` once this batch is durable.
    fn end_phase(&mut self, span: Option<tracing::Span>) {
        if let Some(span) = span {
            self.batch.ended.push(span);
        }
    }

    fn put_transfer(&mut self, record: &TransferRecord) {
        let id = &record.request.id;
        let index = self.batch.writes.writes.len();
        self.batch
            .writes
            .put(keys::transfer(self.shard, id), codec::encode(record));
        self.batch.transfers.insert(id.clone(), index);
        // Before the commit: if it fails, the term ends and its filters with it.
        for ids in [&self.ids, &self.next_ids].into_iter().flatten() {
            ids.insert(id);
        }
    }

    fn put_hold(&mut self, pending_id: &str, hold: HoldStatus) {
        match (hold.state, hold.expires_at_ms) {
            (HoldState::Pending, Some(at)) => {
                self.expiries.insert((at, pending_id.to_string()));
            }
            (_, Some(at)) => {
                self.expiries.remove(&(at, pending_id.to_string()));
            }
            _ => {}
        }
        self.batch
            .writes
            .put(keys::hold(self.shard, pending_id), codec::encode(&hold));
        self.batch.holds.insert(pending_id.to_string(), hold);
    }

    /// Applies one change to a local account: balances, version + 1, and its entry (I4).
    /// The change must have been checked (`check_change`); failing here is a bug.
    fn apply_change(
        &mut self,
        account_id: &str,
        change: &Change,
        transfer_id: &str,
        kind: EntryKind,
        code: u32,
    ) -> u64 {
        let now_ms = self.now_ms;
        let shard = self.shard;
        let account = self
            .accounts
            .get_mut(account_id)
            .expect("checked account exists");
        let after = account
            .balances
            .apply(change, account.spec.flags, account.spec.credit_limit)
            .unwrap_or_else(|r| panic!("shard={shard} checked change failed: {r} {change:?}"));
        if !self.batch.dirty.contains_key(account_id) {
            self.batch
                .dirty
                .insert(account_id.to_string(), Some(account.version));
        }
        account.balances = after;
        account.version += 1;
        let entry = codec::EntryRef {
            account_id,
            version: account.version,
            transfer_id,
            side: change.side,
            kind,
            amount: entry_amount(change),
            balances: after,
            committed_at_ms: now_ms,
            code,
        };
        let version = account.version;
        self.batch.writes.put(
            keys::entry(shard, account_id, version),
            codec::encode(&entry),
        );
        version
    }

    /// Checks a change against a local account without applying it.
    fn check_change(
        &self,
        account_id: &str,
        ledger: &str,
        change: &Change,
        expected_version: Option<u64>,
    ) -> Result<Balances, Rejection> {
        check_account(
            self.accounts.get(account_id),
            ledger,
            change,
            expected_version,
        )
    }

    // ---- locks -------------------------------------------------------------------------------

    fn is_locked(&self, key: &str) -> bool {
        self.locks.contains_key(key)
    }

    /// Whether a cross-shard operation holds `account_id` (no lock key is built while no lock
    /// is held, the common case on the single-shard path).
    fn account_locked(&self, account_id: &str) -> bool {
        !self.locks.is_empty() && self.is_locked(&lock_key_account(account_id))
    }

    /// Takes `key` for `holder`, or queues `parked` behind it. Returns whether it was taken.
    /// A full queue hands `parked` back.
    fn lock_or_park(&mut self, key: &str, holder: &str, parked: Parked) -> Result<bool, Parked> {
        match self.locks.get_mut(key) {
            None => {
                let lock = Lock {
                    holder: holder.to_string(),
                    waiters: VecDeque::new(),
                };
                self.locks.insert(key.to_string(), lock);
                Ok(true)
            }
            Some(lock) if lock.holder == holder => Ok(true),
            Some(lock) => {
                if lock.waiters.len() >= self.options.lock_waiters_max {
                    return Err(parked);
                }
                lock.waiters.push_back(parked);
                Ok(false)
            }
        }
    }

    /// Queues `input` behind the held lock `key` until the lock is released or its deadline
    /// passes. A full queue refuses it at once (`account_busy`).
    fn wait_for_lock(
        &mut self,
        key: &str,
        input: Input,
        trace: Option<TraceParent>,
        role: Role,
        op: &str,
    ) {
        let wait = self.begin_phase("lock.wait", trace, role, op);
        if let Some(span) = &wait {
            span.record("lock", key);
        }
        let parked = Parked::Input {
            input,
            deadline_ms: self.now_ms + self.options.lock_wait_ms_max,
            since_ms: self.now_ms,
            wait,
        };
        let lock = self.locks.get_mut(key).expect("park on a held lock");
        if lock.waiters.len() >= self.options.lock_waiters_max {
            if let Parked::Input { input, wait, .. } = parked {
                trace::outcome(&wait, "busy");
                self.metrics.lock_busy.increment(1);
                self.refuse_busy(input, Rejection::AccountBusy);
            }
            return;
        }
        self.metrics.lock_waits.increment(1);
        lock.waiters.push_back(parked);
    }

    /// A parked input stops waiting (it got the lock, or its deadline passed).
    fn end_wait(&mut self, since_ms: u64, wait: Option<tracing::Span>, outcome: &str) {
        self.metrics.lock_wait(self.now_ms.saturating_sub(since_ms));
        trace::outcome(&wait, outcome);
    }

    fn unlock(&mut self, key: &str, holder: &str) {
        if self
            .locks
            .get(key)
            .is_some_and(|lock| lock.holder == holder)
        {
            let lock = self.locks.remove(key).expect("present");
            self.rerun.extend(lock.waiters);
        }
    }

    fn expire_lock_waits(&mut self) {
        let now = self.now_ms;
        let mut expired = Vec::new();
        for lock in self.locks.values_mut() {
            lock.waiters.retain_mut(|parked| match parked {
                Parked::Input { deadline_ms, .. } if *deadline_ms <= now => {
                    expired.push(std::mem::replace(
                        parked,
                        Parked::Coordination { op: String::new() },
                    ));
                    false
                }
                _ => true,
            });
        }
        for parked in expired {
            if let Parked::Input {
                input,
                since_ms,
                wait,
                ..
            } = parked
            {
                self.end_wait(since_ms, wait, "timed out");
                self.time_out(input);
            }
        }
    }

    /// An input waited too long for a lock: nothing was applied, the caller may retry.
    fn time_out(&mut self, input: Input) {
        self.refuse_busy(input, Rejection::LockTimeout);
    }

    fn refuse_busy(&mut self, input: Input, reason: Rejection) {
        debug_assert!(reason.is_retriable());
        match input {
            Input::CreateTransfer {
                token, transfer, ..
            } => {
                let record = TransferRecord {
                    request: transfer,
                    result: Err(reason),
                };
                self.reply(token, Reply::Transfer(TransferReply::new(record, None)));
            }
            Input::Peer {
                from,
                message: Message::Prepare(leg),
            } => {
                self.send(
                    from,
                    Message::Refused {
                        attempt: leg.attempt,
                        reason,
                    },
                );
            }
            Input::Quota { token, .. } => {
                let error = CommandError::Busy(reason.name().to_string());
                self.reply(token, Reply::Quota(CommandReply::Refused(error)));
            }
            other => unreachable!(
                "only transfers, prepares and quota commands wait for locks: {other:?}"
            ),
        }
    }

    // ---- accounts ----------------------------------------------------------------------------

    fn create_account(&mut self, token: Token, spec: NewAccount) -> Result<(), Fatal> {
        if let Some(existing) = self.accounts.get(&spec.id) {
            let reply = if existing.spec == spec {
                Ok(existing.clone())
            } else {
                Err(Rejection::ExistsWithDifferentFields)
            };
            self.reply(token, Reply::Account(reply));
            return Ok(());
        }
        let Some(forward) = self.lookup_forward(&spec.id)?.known() else {
            let input = Input::CreateAccount {
                token,
                account: spec,
            };
            self.stall(Task::Input(input));
            return Ok(());
        };
        if forward.is_some_and(|f| !f.matches(&spec.placement_key, self.shard)) {
            self.reply(
                token,
                Reply::Account(Err(Rejection::ExistsWithDifferentFields)),
            );
            return Ok(());
        }
        let account = Account {
            spec,
            balances: Balances::default(),
            version: 0,
            created_at_ms: self.now_ms,
        };
        self.batch.dirty.insert(account.spec.id.clone(), None);
        self.accounts.insert(account.clone());
        self.reply(token, Reply::Account(Ok(account)));
        Ok(())
    }

    fn reserve_forward(
        &mut self,
        token: Token,
        id: String,
        placement_key: String,
        home: ShardId,
    ) -> Result<(), Fatal> {
        debug_assert_ne!(home, self.shard, "a forward points elsewhere");
        let taken_by = match self.accounts.get(&id) {
            Some(account) => Some(Forward::new(account.spec.placement_key.clone(), self.shard)),
            None => match self.lookup_forward(&id)?.known() {
                Some(forward) => forward,
                None => {
                    let input = Input::ReserveForward {
                        token,
                        id,
                        placement_key,
                        home,
                    };
                    self.stall(Task::Input(input));
                    return Ok(());
                }
            },
        };
        let reply = match taken_by {
            Some(forward) if forward.matches(&placement_key, home) => Ok(()),
            Some(_) => Err(Rejection::ExistsWithDifferentFields),
            None => {
                let key = keys::forward(self.shard, &id);
                let forward = Forward::new(placement_key, home);
                self.batch.writes.expect(key.clone(), Expect::Absent);
                self.batch.writes.put(key, forward.encode());
                self.batch.forwards.insert(id, forward);
                Ok(())
            }
        };
        self.reply(token, Reply::Forward(reply));
        Ok(())
    }

    // ---- transfers ---------------------------------------------------------------------------

    fn create_transfer(
        &mut self,
        token: Token,
        transfer: Transfer,
        trace: Option<TraceParent>,
    ) -> Result<(), Fatal> {
        // Every read first: a step that waits for the store has changed nothing.
        let Some(reads) = self.transfer_reads(&transfer)? else {
            let input = Input::CreateTransfer {
                token,
                transfer,
                trace,
            };
            self.stall(Task::Input(input));
            return Ok(());
        };
        // Idempotency: the id's recorded outcome, or the cross-shard operation in flight.
        let recorded = reads.recorded;
        #[cfg(feature = "sim-bugs")]
        let recorded = recorded.filter(|r| {
            !(crate::bugs::on(crate::bugs::Bug::ForgetRejections) && r.result.is_err())
        });
        if let Some(record) = recorded {
            let reply = replay(record, reads.recorded_hold, &transfer);
            self.reply(token, Reply::Transfer(reply));
            return Ok(());
        }
        if let Some(c) = self.coordinations.get_mut(&transfer.id) {
            let reply = match c.request() {
                Some(in_flight) if in_flight.same_request(&transfer) => match c.abort_reason() {
                    Some(reason) => {
                        let record = TransferRecord {
                            request: transfer,
                            result: Err(reason),
                        };
                        TransferReply::new(record, None)
                    }
                    None => {
                        c.waiters.push(token);
                        return Ok(());
                    }
                },
                Some(in_flight) => TransferReply::different_fields(transfer, in_flight),
                None => unreachable!("an expiry's op is not a transfer id"),
            };
            self.reply(token, Reply::Transfer(reply));
            return Ok(());
        }
        if quota::is_quota_account(&transfer.debit_account_id)
            && !self.quota_open(&transfer.debit_account_id, &transfer)
        {
            // Recorded: a retry in this region takes the ordinary path again.
            self.reject(token, transfer, Rejection::QuotaExhausted);
            return Ok(());
        }
        if reads.credit_shard == Some(None) {
            // Not recorded: the same id succeeds once the directory shard's node answers.
            let reason = "the credit account's directory shard did not answer".to_string();
            self.reply(token, Reply::Unavailable(reason));
            return Ok(());
        }
        let held = reads.pending.as_ref().and_then(|p| match p {
            PendingHold::Found(hold) => Some([
                hold.debit_account_id.clone(),
                hold.credit_account_id.clone(),
            ]),
            _ => None,
        });
        let plan = match self.plan(&transfer, reads.pending, reads.credit_shard.flatten()) {
            Ok(plan) => plan,
            Err(reason) => {
                // A balance or version that a cross-shard transfer holding the account is
                // about to change decides nothing yet: a credit it was acknowledged for may
                // be on its way. Wait for the lock, then judge again.
                let accounts = held.unwrap_or_else(|| {
                    [
                        transfer.debit_account_id.clone(),
                        transfer.credit_account_id.clone(),
                    ]
                });
                let locked = accounts.iter().find(|id| self.account_locked(id)).cloned();
                if let Some(account_id) = locked.filter(|_| reason.depends_on_balances()) {
                    self.wait_for_account(&account_id, token, transfer, trace);
                    return Ok(());
                }
                // The quota account's balance or existence is no answer about the account it
                // stands for: its home decides, by the ordinary path.
                let quota_declines = matches!(
                    reason,
                    Rejection::ExceedsCredits
                        | Rejection::DebitAccountNotFound
                        | Rejection::Overflow
                );
                let reason =
                    if quota::is_quota_account(&transfer.debit_account_id) && quota_declines {
                        Rejection::QuotaExhausted
                    } else {
                        reason
                    };
                self.reject(token, transfer, reason);
                return Ok(());
            }
        };
        if plan.credit_shard != self.shard {
            return self.start_coordination(token, transfer, plan, trace);
        }
        // Single shard: one local commit, no two-phase commit. Wait only if a cross-shard
        // transfer holds one of the accounts.
        for account_id in [&plan.debit_id, &plan.credit_id] {
            if self.account_locked(account_id) {
                self.wait_for_account(account_id, token, transfer, trace);
                return Ok(());
            }
        }
        let reply = self.commit_local(transfer, plan, trace);
        self.reply(token, Reply::Transfer(reply));
        Ok(())
    }

    /// Parks a transfer behind the lock a cross-shard transfer holds on `account_id`; it runs
    /// again from the start once the lock is released (or answers `lock_timeout`).
    fn wait_for_account(
        &mut self,
        account_id: &str,
        token: Token,
        transfer: Transfer,
        trace: Option<TraceParent>,
    ) {
        let key = lock_key_account(account_id);
        let op = transfer.id.clone();
        let input = Input::CreateTransfer {
            token,
            transfer,
            trace,
        };
        self.wait_for_lock(&key, input, trace, Role::Local, &op);
    }

    /// Records a final rejection (so a replay returns it) and replies. Retriable rejections are
    /// not recorded.
    fn reject(&mut self, token: Token, request: Transfer, reason: Rejection) {
        let record = TransferRecord {
            request,
            result: Err(reason),
        };
        if !reason.is_retriable() {
            self.put_transfer(&record);
        }
        self.reply(token, Reply::Transfer(TransferReply::new(record, None)));
    }

    /// Works out what a transfer would do and checks everything local. The credit side is
    /// checked here only when the credit account is on this shard. `pending`: a post's or
    /// void's hold ([`Engine::pending_reads`]).
    fn plan(
        &self,
        transfer: &Transfer,
        pending: Option<PendingHold>,
        credit_shard: Option<ShardId>,
    ) -> Result<Plan, Rejection> {
        let (debit_id, credit_id, ledger, amount, debit, credit, hold) = match transfer.kind {
            TransferKind::Posted | TransferKind::Pending => {
                let (debit, credit) = transfer.new_changes();
                (
                    transfer.debit_account_id.clone(),
                    transfer.credit_account_id.clone(),
                    transfer.ledger.clone(),
                    transfer.amount,
                    debit,
                    credit,
                    None,
                )
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                let hold = match pending.expect("a post or void reads its hold") {
                    PendingHold::Found(hold) => hold,
                    PendingHold::NotPending => return Err(Rejection::PendingTransferNotPending),
                    PendingHold::NotFound => return Err(Rejection::PendingTransferNotFound),
                };
                let (amount, debit, credit) = hold.resolve(transfer, self.now_ms)?;
                (
                    hold.debit_account_id.clone(),
                    hold.credit_account_id.clone(),
                    hold.ledger.clone(),
                    amount,
                    debit,
                    credit,
                    Some(hold),
                )
            }
        };
        self.check_change(&debit_id, &ledger, &debit, transfer.expected_debit_version)?;
        let credit_account = self.accounts.get(&credit_id);
        let credit_shard = credit_shard.expect("transfer_reads located the credit account");
        if credit_shard == self.shard {
            check_account(
                credit_account,
                &ledger,
                &credit,
                transfer.expected_credit_version,
            )?;
        }
        Ok(Plan {
            debit_id,
            credit_id,
            credit_shard,
            ledger,
            amount,
            debit,
            credit,
            hold,
        })
    }

    /// Applies a checked single-shard transfer.
    fn commit_local(
        &mut self,
        transfer: Transfer,
        plan: Plan,
        trace: Option<TraceParent>,
    ) -> TransferReply {
        let kind = EntryKind::of(transfer.kind);
        let debit_version = self.apply_change(
            &plan.debit_id,
            &plan.debit,
            &transfer.id,
            kind,
            transfer.code,
        );
        let credit_version = self.apply_change(
            &plan.credit_id,
            &plan.credit,
            &transfer.id,
            kind,
            transfer.code,
        );
        let hold = self.settle_hold(&transfer, &plan);
        if quota::is_quota_account(&plan.debit_id) {
            self.quota_spent(&transfer, trace);
        }
        let committed = self.committed(plan, debit_version, credit_version, false);
        let record = TransferRecord {
            request: transfer,
            result: Ok(committed),
        };
        self.put_transfer(&record);
        TransferReply::new(record, hold)
    }

    /// The outcome of an applied plan (its accounts and ledger move into it).
    fn committed(
        &self,
        plan: Plan,
        debit_version: u64,
        credit_version: u64,
        cross: bool,
    ) -> Committed {
        Committed {
            debit_account_id: plan.debit_id,
            credit_account_id: plan.credit_id,
            ledger: plan.ledger,
            amount: plan.amount,
            committed_at_ms: self.now_ms,
            debit_account_version: debit_version,
            credit_account_version: credit_version,
            cross_shard: cross,
        }
    }

    /// Creates the hold of a pending transfer, or records what a post/void did to its hold.
    /// Returns the hold a pending transfer created.
    fn settle_hold(&mut self, transfer: &Transfer, plan: &Plan) -> Option<HoldStatus> {
        match transfer.kind {
            TransferKind::Posted => None,
            TransferKind::Pending => {
                let expires_at_ms = (transfer.timeout_seconds > 0)
                    .then(|| self.now_ms + u64::from(transfer.timeout_seconds) * 1_000);
                let hold = HoldStatus {
                    state: HoldState::Pending,
                    debit_account_id: plan.debit_id.clone(),
                    credit_account_id: plan.credit_id.clone(),
                    ledger: plan.ledger.clone(),
                    amount: plan.amount,
                    posted_amount: 0,
                    expires_at_ms,
                };
                self.put_hold(&transfer.id, hold.clone());
                Some(hold)
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                let mut hold = plan.hold.clone().expect("post/void has a hold");
                if transfer.kind == TransferKind::PostPending {
                    hold.state = HoldState::Posted;
                    hold.posted_amount = plan.amount;
                } else {
                    hold.state = HoldState::Voided;
                }
                self.put_hold(&transfer.pending_id, hold);
                None
            }
        }
    }

    // ---- hold expiry -------------------------------------------------------------------------

    fn expire_holds(&mut self) -> Result<(), Fatal> {
        let due: Vec<String> = self
            .expiries
            .range(..(self.now_ms + 1, String::new()))
            .map(|(_, id)| id.clone())
            .collect();
        for pending_id in due {
            let waiting = self
                .stalled
                .iter()
                .any(|w| matches!(w, Task::Expire(id) if *id == pending_id));
            if !waiting {
                self.expire_hold(pending_id)?;
            }
        }
        Ok(())
    }

    fn expire_hold(&mut self, pending_id: String) -> Result<(), Fatal> {
        let hold = match self.lookup_hold(&pending_id)? {
            Known::Yes(Some(hold)) => hold,
            Known::Yes(None) => return Ok(()),
            Known::Wanted => {
                self.stall(Task::Expire(pending_id));
                return Ok(());
            }
        };
        if hold.state != HoldState::Pending {
            return Ok(());
        }
        let credit_shard = match self.lookup_location(&hold.credit_account_id) {
            Known::Yes(Some(shard)) => shard,
            // The directory shard's node did not answer: tried again next tick.
            Known::Yes(None) => return Ok(()),
            Known::Wanted => {
                self.stall(Task::Expire(pending_id));
                return Ok(());
            }
        };
        let (debit, credit) = hold.expiry_changes();
        if credit_shard != self.shard {
            return self.start_expiry(pending_id, hold, credit_shard);
        }
        let busy = [&hold.debit_account_id, &hold.credit_account_id]
            .iter()
            .any(|id| self.account_locked(id));
        if busy {
            return Ok(()); // Tried again next tick, once the cross-shard transfer is done.
        }
        let kind = EntryKind::ExpirePending;
        self.apply_change(&hold.debit_account_id, &debit, &pending_id, kind, 0);
        self.apply_change(&hold.credit_account_id, &credit, &pending_id, kind, 0);
        self.put_hold(
            &pending_id,
            HoldStatus {
                state: HoldState::Expired,
                ..hold
            },
        );
        Ok(())
    }
}

/// The answer to a replayed id: the original outcome if the fields are identical (a replayed
/// committed hold with its status `hold`).
fn replay(record: TransferRecord, hold: Option<HoldStatus>, request: &Transfer) -> TransferReply {
    if !record.request.same_request(request) {
        return TransferReply::different_fields(request.clone(), &record.request);
    }
    TransferReply {
        replayed: true,
        ..TransferReply::new(record, hold)
    }
}

/// What a checked transfer will do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Plan {
    debit_id: String,
    credit_id: String,
    credit_shard: ShardId,
    ledger: String,
    amount: u64,
    debit: Change,
    credit: Change,
    hold: Option<HoldStatus>,
}

fn lock_key_account(id: &str) -> String {
    format!("a:{id}")
}

fn lock_key_hold(pending_id: &str) -> String {
    format!("h:{pending_id}")
}

/// The amount an entry shows: what was posted, else reserved, else released.
fn entry_amount(change: &Change) -> u64 {
    if change.posted_add > 0 {
        change.posted_add
    } else if change.pending_add > 0 {
        change.pending_add
    } else {
        change.pending_sub
    }
}

/// Checks a change against a local account (`None`: this shard does not hold it) without
/// applying it.
fn check_account(
    account: Option<&Account>,
    ledger: &str,
    change: &Change,
    expected_version: Option<u64>,
) -> Result<Balances, Rejection> {
    let (not_found, version_mismatch) = match change.side {
        Side::Debit => (
            Rejection::DebitAccountNotFound,
            Rejection::DebitVersionMismatch,
        ),
        Side::Credit => (
            Rejection::CreditAccountNotFound,
            Rejection::CreditVersionMismatch,
        ),
    };
    let account = account.ok_or(not_found)?;
    if account.spec.ledger != ledger {
        return Err(Rejection::LedgerMismatch);
    }
    if expected_version.is_some_and(|v| v != account.version) {
        return Err(version_mismatch);
    }
    account
        .balances
        .apply(change, account.spec.flags, account.spec.credit_limit)
}
