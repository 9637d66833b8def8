//! One simulated run: everything from one seed, in one thread, on simulated time.
//!
//! A seeded cluster (`topology`: regions, nodes with skewed clocks, shards placed by the real
//! map check and rings, some regions with a store their nodes share) of real engines over
//! memory stores (`ledger_shard::sim::Sim`, which runs each batch as a leader's runtime does,
//! with its lease and epoch); a seeded workload sent the way a client and the router do (to
//! any node, forwarded to the leader of the debit account's shard or the hold's; the same id
//! again when an answer is lost or says to retry), one transfer at a time or in bursts of
//! concurrent transfers (between accounts without limits, whose outcomes do not depend on
//! their order, so the reference still predicts each one); seeded faults (a node crashed after
//! any number of protocol messages, messages lost, duplicated, reordered and delayed between
//! regions, partitions between nodes or regions, one way or both, store commits that fail or
//! stall, a stalled leader whose shard another node takes over and who wakes later, time
//! jumps past timeouts); regional quotas (operators' grants, moves and revokes of allowances
//! of accounts homed in one region to others, transfers entering a region that spend them by
//! the quota path or fall back to two-phase commit, settlements, closes at expiry); and
//! judges: the reference ledger for every answer, I5 for every
//! commit (a deposed leader's commit must not land), then a liveness phase (every fault
//! healed, every timer due) after which nothing may be in flight, every balance and version
//! must match the reference, and every invariant checker must find nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ledger_domain::{
    AccountFlags, HoldState, NewAccount, Rejection, ShardId, Transfer, TransferKind,
};
use ledger_shard::engine::{Input, Reply};
use ledger_shard::protocol::Message;
use ledger_shard::quota::{self, Command};
use ledger_shard::runtime::LeaseError;
use ledger_shard::sim::Sim;
use ledger_shard::{Options, read, route};
use ledger_store::{Memory, Store};

use crate::checks;
use crate::reference::Reference;
use crate::topology::Topology;

/// Attempts at one transfer before the run counts it as never answered (a liveness failure).
const ATTEMPTS_MAX: usize = 30;
/// Delivery rounds a settling cluster gets before it counts as stuck.
const SETTLE_ROUNDS_MAX: usize = 400;
/// Rounds a settle runs while a partition is up (what crosses the cut waits for the heal).
const SETTLE_ROUNDS_UNDER_PARTITION: usize = 4;
/// Simulated time spent waiting (everything but the time jumps) after which a run ends its
/// workload: the reference's clock moves by the jumps alone, so it judges a hold's expiry as
/// the cluster does while the waits since the hold began stay well under a hold's timeout
/// (`HOLD_TIMEOUT_S`: even with the longest operation's waits on top of these).
const WAITED_MS_MAX: u64 = 3_000_000;
/// A hold's timeout is 0 (none) or a multiple of this.
const HOLD_TIMEOUT_S: u32 = 10_000;
/// How long a client waits for a call whose forward or answer a partition cut.
const CALL_TIMEOUT_MS: u64 = 2_000;
/// A time jump: whole multiples of this (and a little more, so that a hold's expiry is never
/// within a clock's skew of the moment it is judged).
const JUMP_MS: u64 = HOLD_TIMEOUT_S as u64 * 1_000;
const JUMP_PAST_MS: u64 = 10_000;

/// What a run's seed chose, printed with `-v`.
#[derive(Debug)]
pub struct Plan {
    pub topology: String,
    pub accounts: usize,
    pub ops: usize,
    /// Chance that a delivered message is lost, duplicated, and that a round is reordered
    /// (per mille).
    pub loss: u32,
    pub duplicate: u32,
    pub reorder: u32,
    /// Delay of a message between regions.
    pub wan_delay_ms: u64,
    /// Chance per operation that a partition starts (per mille).
    pub partitions: u32,
    /// Chance per call that its leader's commit stalls (per mille), and mean commits between
    /// two that fail (0: none fail).
    pub stalls: u32,
    pub commits_per_failure: u64,
    /// Chance per operation that a leader of a shared store is deposed by another node, and
    /// that a deposed leader wakes (per mille).
    pub takeovers: u32,
    pub wakes: u32,
    /// Chance per operation that it is a regional-quota one (per mille; 0 with one region).
    pub quotas: u32,
    pub options: Options,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub transfers: usize,
    pub crashes: usize,
    pub partitions: usize,
    pub takeovers: usize,
    /// The workload ended early: its waits added up to `WAITED_MS_MAX`.
    pub cut_short: bool,
    /// Simulated time spent waiting (not jumping).
    pub waited_ms: u64,
    pub step_downs: u64,
    pub simulated_ms: u64,
    /// A hash of every batch's output, in order: the same seed gives the same hash.
    pub journal_hash: u64,
    /// Every batch's output, in order (`ledger-sim --seed S --journal` prints it).
    pub journal: Vec<String>,
}

struct Run {
    rng: StdRng,
    sim: Sim,
    reference: Reference,
    plan: Plan,
    topology: Topology,
    /// Account ids and their shards.
    accounts: Vec<(String, ShardId)>,
    /// Transfers sent so far (for retries of the same id).
    sent: Vec<Transfer>,
    /// Messages on a wide-area link: (due at, to, from, message).
    delayed: Vec<(u64, ShardId, ShardId, Message)>,
    /// Links cut by a partition, one way each: (from node, to node).
    cuts: BTreeSet<(usize, usize)>,
    /// The operation at which the partition heals.
    heal_at: usize,
    /// Accounts that have had an allowance (their versions move with grants and
    /// settlements at home, which the reference does not follow).
    quota_accounts: BTreeSet<usize>,
    /// (account, region) pairs granted an allowance at some point.
    granted: BTreeSet<(usize, usize)>,
    outcome: Outcome,
    verbose: bool,
}

/// Runs one seed. A panic of the engine (one of its assertions) is a violation too.
pub fn run(seed: u64, verbose: bool) -> Outcome {
    match std::panic::catch_unwind(|| run_seed(seed, verbose)) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            Outcome {
                violations: vec![format!("the run panicked: {what}")],
                ..Outcome::default()
            }
        }
    }
}

fn run_seed(seed: u64, verbose: bool) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let topology = Topology::seeded(&mut rng);
    let shards = topology.shards();
    let prepare_timeout_ms = [200, 1_000, 10_000][rng.random_range(0..3)];
    // Wide-area delays well within the prepare timeout and the lock wait (as a deployment
    // must set them): with a round trip near either, attempts time out one after another
    // and a transfer between regions may never get through.
    let wan_delay_ms = [0, 50, 150][rng.random_range(0..3)].min(prepare_timeout_ms / 10);
    // Resends no more often than a message takes to cross (as a deployment must set them, or
    // every link carries a flood of copies).
    let retry_ms = [0, 10, 100][rng.random_range(0..3)].max(wan_delay_ms);
    let options = Options {
        retry_ms: retry_ms.max(1),
        prepared_query_ms: retry_ms,
        prepare_timeout_ms,
        lock_wait_ms_max: prepare_timeout_ms / 2,
        lock_waiters_max: rng.random_range(1..=64),
        lease_ms: [2_000, 10_000][rng.random_range(0..2)],
        // Two-phase commits a shard coordinates at once: past it, `account_busy` (retried).
        coordinations_max: [2, 4, 16_384][rng.random_range(0..3)],
        ..Options::default()
    };
    let several_nodes = topology.nodes.len() > 1;
    let plan = Plan {
        topology: topology.describe(),
        accounts: rng.random_range(3..=12),
        ops: rng.random_range(10..=120),
        loss: [0, 50, 200][rng.random_range(0..3)],
        duplicate: [0, 50, 200][rng.random_range(0..3)],
        reorder: [0, 300][rng.random_range(0..2)],
        wan_delay_ms,
        partitions: if several_nodes {
            [0, 30, 100][rng.random_range(0..3)]
        } else {
            0
        },
        stalls: [0, 20, 80][rng.random_range(0..3)],
        commits_per_failure: [0, 0, 40, 200][rng.random_range(0..4)],
        takeovers: if topology.shared.iter().any(|s| *s) {
            [30, 100][rng.random_range(0..2)]
        } else {
            0
        },
        wakes: [100, 400][rng.random_range(0..2)],
        quotas: if topology.regions.len() > 1 {
            [0, 150, 400][rng.random_range(0..3)]
        } else {
            0
        },
        options,
    };
    if verbose {
        println!("seed {seed}: {plan:?}");
    }
    let accounts: Vec<(String, ShardId)> = (0..plan.accounts)
        .map(|i| {
            let id = format!("a{i}");
            let region = rng.random_range(0..topology.regions.len());
            let home = topology.home(region, &id);
            (id, home)
        })
        .collect();
    let homes: BTreeMap<String, ShardId> = accounts.iter().cloned().collect();
    let locate = Arc::new(move |id: &str| Some(homes.get(id).copied().unwrap_or(ShardId(0))));
    let leaders = (0..shards)
        .map(|s| {
            let owner = &topology.nodes[topology.owner(ShardId(s))];
            (owner.id.clone(), owner.skew_ms)
        })
        .collect();
    let stores = (0..shards).map(|_| Arc::new(Memory::new())).collect();
    let mut sim = Sim::led_by(stores, locate, plan.options.clone(), leaders);
    if plan.commits_per_failure > 0 {
        let mut n = 0;
        while n < 50_000 {
            n += rng.random_range(1..=2 * plan.commits_per_failure);
            sim.failing_commits.insert(n);
        }
    }
    sim.journal = Some(Vec::new());
    let mut reference = Reference::default();
    reference.now_ms = sim.now_ms;
    for (i, (id, shard)) in accounts.iter().enumerate() {
        let spec = NewAccount {
            id: id.clone(),
            ledger: "USD".into(),
            placement_key: id.clone(),
            flags: AccountFlags {
                debits_must_not_exceed_credits: i > 0 && rng.random_bool(0.5),
                ..Default::default()
            },
            ..Default::default()
        };
        // Created where it lives, until it is (a commit may fail).
        loop {
            let token = sim.token();
            sim.batch(
                *shard,
                vec![Input::CreateAccount {
                    token,
                    account: spec.clone(),
                }],
            );
            if sim.replies.contains_key(&token) {
                break;
            }
        }
        reference.create_account(spec);
    }
    let mut run = Run {
        rng,
        sim,
        reference,
        plan,
        topology,
        accounts,
        sent: Vec::new(),
        delayed: Vec::new(),
        cuts: BTreeSet::new(),
        heal_at: 0,
        quota_accounts: BTreeSet::new(),
        granted: BTreeSet::new(),
        outcome: Outcome::default(),
        verbose,
    };
    run.play(seed);
    run.outcome.simulated_ms = run.sim.now_ms;
    run.outcome.step_downs = run.sim.step_downs;
    run.outcome.waited_ms = run.sim.now_ms - run.reference.now_ms;
    let mut hasher = DefaultHasher::new();
    let journal = run.sim.journal.take().unwrap_or_default();
    journal.hash(&mut hasher);
    run.outcome.journal_hash = hasher.finish();
    run.outcome.journal = journal;
    run.outcome
}

impl Run {
    fn play(&mut self, seed: u64) {
        // Money for the accounts that may not overdraw, from the first (which may).
        for i in 1..self.accounts.len() {
            let fund = self.posted(&format!("fund-{i}"), 0, i, 1_000);
            self.send(fund);
        }
        for n in 0..self.plan.ops {
            if self.sim.now_ms - self.reference.now_ms > WAITED_MS_MAX {
                if self.verbose {
                    println!("  the waits add up to {WAITED_MS_MAX} ms: the workload ends");
                }
                self.outcome.cut_short = true;
                break;
            }
            self.faults_between(n);
            self.sync_expiries();
            if self.plan.quotas > 0 && self.rng.random_range(0..1_000) < self.plan.quotas {
                self.quota_op(n);
                continue;
            }
            let roll = self.rng.random_range(0..100);
            let t = match roll {
                0..50 => {
                    let (d, c) = self.pair();
                    let amount = self.rng.random_range(1..400);
                    self.posted(&format!("t{n}"), d, c, amount)
                }
                50..62 => {
                    let (d, c) = self.pair();
                    let amount = self.rng.random_range(1..400);
                    Transfer {
                        kind: TransferKind::Pending,
                        timeout_seconds: self.rng.random_range(0..3) * HOLD_TIMEOUT_S,
                        ..self.posted(&format!("t{n}"), d, c, amount)
                    }
                }
                62..72 => self.resolve(n, TransferKind::PostPending),
                72..78 => self.resolve(n, TransferKind::VoidPending),
                78..88 if !self.sent.is_empty() => {
                    // A retry of an earlier id with the same fields.
                    self.sent[self.rng.random_range(0..self.sent.len())].clone()
                }
                88..91 => {
                    self.burst(n);
                    continue;
                }
                91..93 => {
                    self.contended_burst(n);
                    continue;
                }
                93..96 => {
                    let ms = self.rng.random_range(1..4) * JUMP_MS + JUMP_PAST_MS;
                    if self.verbose {
                        println!("  advance {ms} ms");
                    }
                    self.sim.now_ms += ms;
                    self.reference.pass(ms);
                    self.settle("after a time jump");
                    continue;
                }
                96..98 => self.bad_request(n),
                _ => {
                    let (d, c) = self.pair();
                    let amount = self.rng.random_range(1..50);
                    self.posted(&format!("t{n}"), d, c, amount)
                }
            };
            self.send(t);
        }
        // Liveness: no more faults; everything in flight must finish.
        self.plan.loss = 0;
        self.plan.duplicate = 0;
        self.heal("the liveness phase");
        self.sim.failing_commits.clear();
        for shard in 0..self.topology.shards() {
            self.sim.resume(ShardId(shard));
        }
        while !self.sim.deposed.is_empty() {
            self.sim.wake(0, Vec::new());
        }
        self.sim.now_ms += self.plan.options.prepare_timeout_ms * 4;
        self.settle("in the liveness phase");
        self.sync_expiries();
        // Every allowance revoked: what regions did not spend comes back to its account.
        for a in self.quota_accounts.clone() {
            for r in 0..self.topology.regions.len() {
                if r != self.topology.region_of_shard(self.accounts[a].1) {
                    self.quota_command(a, r, 0, 3_600_000);
                }
            }
        }
        self.sync_quotas();
        self.check_final(seed);
    }

    /// Up to eight transfers in flight at once between accounts without limits, some of them
    /// sent twice: every one must get the reference's answer.
    fn burst(&mut self, n: usize) {
        let free: Vec<usize> = (0..self.accounts.len())
            .filter(|i| !self.limited(*i))
            .collect();
        if free.len() < 2 {
            return;
        }
        let count = self.rng.random_range(2..=8);
        let mut batch = Vec::new();
        for k in 0..count {
            let d = free[self.rng.random_range(0..free.len())];
            let c = free[(free.iter().position(|x| *x == d).unwrap()
                + self.rng.random_range(1..free.len()))
                % free.len()];
            let amount = self.rng.random_range(1..100);
            let t = self.posted(&format!("t{n}-{k}"), d, c, amount);
            if self.rng.random_bool(0.2) {
                batch.push(t.clone()); // the same request twice, concurrently
            }
            batch.push(t);
        }
        let expected: Vec<_> = batch.iter().map(|t| self.reference.transfer(t)).collect();
        let answers = self.concurrently(&batch);
        self.settle("after a burst");
        for (i, t) in batch.iter().enumerate() {
            self.outcome.transfers += 1;
            match answers[i] {
                Some(got) if got == expected[i] => {}
                Some(got) => self.violation(format!(
                    "transfer {} (in a burst): the cluster answered {got:?}, the reference {:?}",
                    t.id, expected[i]
                )),
                None => self.violation(format!(
                    "transfer {} (in a burst) never got a final answer",
                    t.id
                )),
            }
        }
        for t in batch {
            if !self.sent.iter().any(|s| s.id == t.id) {
                self.sent.push(t);
            }
        }
    }

    /// Two to six transfers in flight at once that debit one or two accounts which may not
    /// overdraw, for more than they hold together: which ones succeed depends on the order the
    /// cluster took them in. Every one must get a final answer, the same for the same id, and
    /// some order of them (and of the expiries of holds past due) must give exactly those
    /// answers from the reference; the reference then moves on in that order.
    fn contended_burst(&mut self, n: usize) {
        let limited: Vec<usize> = (0..self.accounts.len())
            .filter(|i| self.limited(*i))
            .collect();
        if limited.is_empty() {
            return;
        }
        self.sync_quotas();
        let debits: Vec<usize> = (0..self.rng.random_range(1..=2))
            .map(|_| limited[self.rng.random_range(0..limited.len())])
            .collect();
        let mut batch = Vec::new();
        for k in 0..self.rng.random_range(2..=6) {
            let d = debits[self.rng.random_range(0..debits.len())];
            let c = (d + self.rng.random_range(1..self.accounts.len())) % self.accounts.len();
            let amount = self.rng.random_range(1..700);
            let t = self.posted(&format!("t{n}-{k}"), d, c, amount);
            if self.rng.random_bool(0.2) {
                batch.push(t.clone());
            }
            batch.push(t);
        }
        let answers = self.concurrently(&batch);
        self.settle("after a contended burst");
        let mut unique: Vec<(Transfer, Result<u64, Rejection>)> = Vec::new();
        for (t, answer) in batch.iter().zip(&answers) {
            self.outcome.transfers += 1;
            let Some(answer) = answer else {
                self.violation(format!(
                    "transfer {} (in a contended burst) never got a final answer",
                    t.id
                ));
                return;
            };
            match unique.iter().find(|(u, _)| u.id == t.id) {
                Some((_, first)) if first != answer => {
                    self.violation(format!(
                        "transfer {} (in a contended burst) answered {first:?} and {answer:?}",
                        t.id
                    ));
                    return;
                }
                Some(_) => {}
                None => unique.push((t.clone(), *answer)),
            }
        }
        let overdue = self.reference.overdue();
        // Rights a region gave back (a shrink, a close at expiry) may have been released at
        // home at any point of the burst: what the homes reserve now, wherever it helps.
        let reserved = Some(self.cluster_reserved()).filter(|_| !self.quota_accounts.is_empty());
        match serial_order(&self.reference, &unique, &overdue, reserved.as_ref()) {
            Some(reference) => self.reference = reference,
            None => self.violation(format!(
                "no order of the contended burst {:?} gives its answers from the reference",
                unique
                    .iter()
                    .map(|(t, a)| format!(
                        "{} {}->{} {}: {a:?}",
                        t.id, t.debit_account_id, t.credit_account_id, t.amount
                    ))
                    .collect::<Vec<_>>()
            )),
        }
        for t in batch {
            if !self.sent.iter().any(|s| s.id == t.id) {
                self.sent.push(t);
            }
        }
    }

    fn limited(&self, account: usize) -> bool {
        let id = &self.accounts[account].0;
        self.reference.accounts[id]
            .spec
            .flags
            .debits_must_not_exceed_credits
    }

    /// Sends `batch` all at once (each to its debit account's shard) and waits for their
    /// answers, sending again what is answered with a retriable rejection or lost; faults
    /// from the seed along the way, healed if the burst cannot finish under them. `None`: a
    /// transfer never answered.
    fn concurrently(&mut self, batch: &[Transfer]) -> Vec<Option<Result<u64, Rejection>>> {
        // token -> index in `batch`; answered ones leave.
        let mut waiting: BTreeMap<u64, usize> = BTreeMap::new();
        let mut answers: Vec<Option<Result<u64, Rejection>>> = vec![None; batch.len()];
        let submit = |run: &mut Run, indices: Vec<usize>, waiting: &mut BTreeMap<u64, usize>| {
            let mut by_shard: BTreeMap<u32, Vec<Input>> = BTreeMap::new();
            for i in indices {
                let token = run.sim.token();
                waiting.insert(token, i);
                by_shard
                    .entry(run.home(&batch[i].debit_account_id).0)
                    .or_default()
                    .push(Input::CreateTransfer {
                        token,
                        transfer: batch[i].clone(),
                        trace: None,
                    });
            }
            for (shard, inputs) in by_shard {
                run.sim.batch(ShardId(shard), inputs);
            }
        };
        submit(self, (0..batch.len()).collect(), &mut waiting);
        if self.rng.random_bool(0.1) {
            let after = self.rng.random_range(0..4);
            self.sim.deliver_all(after);
            self.crash_a_node(after);
        }
        let faults = (self.plan.loss, self.plan.duplicate);
        for round in 0..ATTEMPTS_MAX * 40 {
            if waiting.is_empty() {
                break;
            }
            if round == ATTEMPTS_MAX * 20 {
                // Faults that never stop may keep a burst from finishing (a duplicated
                // Prepare parked behind a lock, refusals while the queue is full): the
                // liveness owed is once they heal.
                (self.plan.loss, self.plan.duplicate) = (0, 0);
                self.heal("a burst could not finish");
            }
            let mut retry = Vec::new();
            let tokens: Vec<u64> = waiting.keys().copied().collect();
            for token in tokens {
                if let Some(Reply::Transfer(reply)) = self.sim.replies.get(&token) {
                    let i = waiting.remove(&token).expect("waiting");
                    match reply.outcome() {
                        Err(r) if r.is_retriable() => {
                            if self.verbose {
                                println!("    {} answered {r:?}: sent again", batch[i].id);
                            }
                            retry.push(i)
                        }
                        result => answers[i] = Some(result),
                    }
                }
            }
            if self.sim.inbox.is_empty() {
                self.pass_time();
                if self.idle() && retry.is_empty() {
                    // Waiters lost with a crashed leader: time on, then the same ids again.
                    if self.verbose {
                        println!(
                            "    no answer and nothing moving: {} sent again",
                            waiting.len()
                        );
                    }
                    self.sim.now_ms += self.plan.options.prepare_timeout_ms;
                    retry.extend(waiting.values().copied());
                    waiting.clear();
                }
            }
            if !retry.is_empty() {
                // A client backs off before it sends the same id again.
                self.sim.now_ms += self
                    .rng
                    .random_range(1..=self.plan.options.lock_wait_ms_max);
                submit(self, retry, &mut waiting);
            }
            self.deliver_round();
        }
        (self.plan.loss, self.plan.duplicate) = faults;
        answers
    }

    /// A request that passes validation but that the ledger must refuse: an account that does
    /// not exist, another ledger, or a stale expected version (every one of them recorded).
    fn bad_request(&mut self, n: usize) -> Transfer {
        let (d, c) = self.pair();
        let amount = self.rng.random_range(1..50);
        let t = self.posted(&format!("t{n}"), d, c, amount);
        match self.rng.random_range(0..5) {
            0 => Transfer {
                debit_account_id: format!("nobody-{n}"),
                ..t
            },
            1 => Transfer {
                credit_account_id: format!("nobody-{n}"),
                ..t
            },
            2 => Transfer {
                ledger: "EUR".into(),
                ..t
            },
            3 if !self.quota_accounts.contains(&d) => Transfer {
                expected_debit_version: Some(self.rng.random_range(0..40)),
                ..t
            },
            4 if !self.quota_accounts.contains(&c) => Transfer {
                expected_credit_version: Some(self.rng.random_range(0..40)),
                ..t
            },
            _ => Transfer {
                ledger: "EUR".into(),
                ..t
            },
        }
    }

    fn pair(&mut self) -> (usize, usize) {
        let d = self.rng.random_range(0..self.accounts.len());
        let c = (d + self.rng.random_range(1..self.accounts.len())) % self.accounts.len();
        (d, c)
    }

    fn posted(&self, id: &str, debit: usize, credit: usize, amount: u64) -> Transfer {
        Transfer {
            id: id.into(),
            debit_account_id: self.accounts[debit].0.clone(),
            credit_account_id: self.accounts[credit].0.clone(),
            amount,
            ledger: "USD".into(),
            ..Transfer::default()
        }
    }

    /// A post or void of an earlier hold (or of an id that is none).
    fn resolve(&mut self, n: usize, kind: TransferKind) -> Transfer {
        let holds: Vec<String> = self
            .sent
            .iter()
            .filter(|t| t.kind == TransferKind::Pending)
            .map(|t| t.id.clone())
            .collect();
        let pending_id = if holds.is_empty() || self.rng.random_bool(0.1) {
            format!("nothing-{n}")
        } else {
            holds[self.rng.random_range(0..holds.len())].clone()
        };
        Transfer {
            id: format!("t{n}"),
            kind,
            pending_id,
            amount: if kind == TransferKind::PostPending {
                self.rng.random_range(0..300)
            } else {
                0
            },
            ..Transfer::default()
        }
    }

    /// Sends a transfer as a client would and compares the answer with the reference.
    fn send(&mut self, t: Transfer) {
        if t.validate().is_err() {
            return; // The API refuses it before any shard sees it.
        }
        self.sync_expiries();
        self.sync_quotas();
        let overdue = self.reference.overdue();
        let before = (!overdue.is_empty() || !self.quota_accounts.is_empty())
            .then(|| self.reference.clone());
        let mut expected = self.reference.transfer(&t);
        let got = self.transfer(&t);
        if let Some(mut resynced) = before.clone()
            && got != Some(expected)
            && !self.quota_accounts.is_empty()
        {
            // A region's unspent rights released at home while the transfer was on its way
            // (a shrink's or close's answer) may have made room for it: right too.
            for (account, reserved) in self.cluster_reserved() {
                resynced.reserve(&account, reserved);
            }
            let alternative = resynced.transfer(&t);
            if got == Some(alternative) {
                self.reference = resynced;
                expected = alternative;
            }
        }
        if let Some(mut after_expiries) = before
            && got != Some(expected)
        {
            // Holds past due whose expiry had not committed when the transfer was sent may
            // have expired before it was judged: the answer with them expired is right too.
            for id in &overdue {
                after_expiries.expire(id);
            }
            let alternative = after_expiries.transfer(&t);
            if got == Some(alternative) {
                self.reference = after_expiries;
                expected = alternative;
            }
        }
        self.outcome.transfers += 1;
        if self.verbose {
            let what = if t.pending_id.is_empty() {
                format!("{} -> {}", t.debit_account_id, t.credit_account_id)
            } else {
                format!("{:?} of {}", t.kind, t.pending_id)
            };
            println!(
                "  {} {what} ({} ms after the reference's clock): {got:?}",
                t.id,
                self.sim.now_ms - self.reference.now_ms
            );
        }
        match got {
            Some(got) if got == expected => {}
            Some(got) => self.violation(format!(
                "transfer {}: the cluster answered {got:?}, the reference {expected:?}",
                t.id
            )),
            None => self.violation(format!("transfer {} never got a final answer", t.id)),
        }
        if !self.sent.iter().any(|s| s.id == t.id) {
            self.sent.push(t);
        }
    }

    /// Tells the reference which of the holds it has past due the cluster has expired (an
    /// expiry commits once its shard's leader sees it due, and between shards only once both
    /// can be reached); a hold the cluster expired before it was due is a violation.
    fn sync_expiries(&mut self) {
        let mut early = Vec::new();
        let overdue: BTreeSet<String> = self.reference.overdue().into_iter().collect();
        for (id, expired) in self.cluster_holds() {
            if !expired {
                continue;
            }
            if overdue.contains(&id) {
                self.reference.expire(&id);
            } else if self
                .reference
                .hold(&id)
                .is_some_and(|h| h.state == HoldState::Pending)
            {
                early.push(format!("hold {id} expired before it was due"));
            }
        }
        for v in early {
            self.violation(v);
        }
    }

    /// Each hold the reference knows, and whether the cluster has it expired.
    fn cluster_holds(&self) -> Vec<(String, bool)> {
        self.reference
            .holds()
            .map(|(id, hold)| {
                let shard = self.home(&hold.debit_account_id);
                let state = read::hold(&*self.sim.stores[shard.0 as usize], shard, id)
                    .ok()
                    .flatten()
                    .map(|h| h.state);
                (id.clone(), state == Some(HoldState::Expired))
            })
            .collect()
    }

    /// Whether a hold the reference has past due is still pending in the cluster.
    fn expiries_due(&self) -> bool {
        let overdue = self.reference.overdue();
        !overdue.is_empty()
            && self
                .cluster_holds()
                .iter()
                .any(|(id, expired)| !expired && overdue.contains(id))
    }

    fn violation(&mut self, what: String) {
        if self.verbose {
            println!("  VIOLATION {what}");
        }
        self.outcome.violations.push(what);
    }

    /// Where the router sends `t`, decided by its own functions (`ledger_shard::route`) over
    /// what its lookups would find (the transfer and the hold by id, on every shard); `Err`:
    /// answered without any shard (not recorded).
    fn route(&self, t: &Transfer) -> Result<ShardId, Rejection> {
        if let Some((region, account)) = quota::parse_quota_id(&t.debit_account_id) {
            let r = self.topology.regions.iter().position(|n| n == region);
            return Ok(self.topology.home(r.expect("a region of the map"), account));
        }
        let shards = (0..self.topology.shards()).map(ShardId);
        let store = |shard: ShardId| &*self.sim.stores[shard.0 as usize];
        let recorded = |id: &str, shard: ShardId| {
            read::transfer(store(shard), shard, id)
                .ok()
                .flatten()
                .is_some()
        };
        let mut found = route::Found::default();
        let hold = if route::resolves(t) {
            found.recorded_at = shards.clone().find(|s| recorded(&t.id, *s));
            found.pending_recorded = shards.clone().any(|s| recorded(&t.pending_id, s));
            shards
                .clone()
                .find_map(|s| read::hold(store(s), s, &t.pending_id).ok().flatten())
        } else {
            None
        };
        found.hold_debit = hold.as_ref().map(|h| h.debit_account_id.as_str());
        let home = route::coordinating_account(t, &found).map(|account| self.home(account));
        match route::coordinator(t, &found, home) {
            Ok(route::Coordinator::Shard(shard)) => Ok(shard),
            Ok(route::Coordinator::HoldMissing(reason)) => Err(reason),
            Err(account) => unreachable!("every account has a home here: {account}"),
        }
    }

    fn home(&self, id: &str) -> ShardId {
        self.accounts
            .iter()
            .find(|(a, _)| a == id)
            .map_or(ShardId(0), |(_, shard)| *shard)
    }

    /// Submits until a final answer, each attempt through a node picked at random (forwarded
    /// to the shard's leader, the answer coming back the same way): the same id again after a
    /// retriable rejection, or an answer lost with a crashed leader or to a partition. Faults
    /// from the seed along the way; a partition still up halfway through the attempts heals
    /// (partitions end). `None`: never answered.
    fn transfer(&mut self, t: &Transfer) -> Option<Result<u64, Rejection>> {
        let shard = match self.route(t) {
            Ok(shard) => shard,
            Err(reason) => return Some(Err(reason)),
        };
        for attempt in 0..ATTEMPTS_MAX {
            if attempt == ATTEMPTS_MAX / 2 {
                self.heal("a transfer could not finish");
            }
            let entry = self.rng.random_range(0..self.topology.nodes.len());
            if !self.link_up(entry, self.leader(shard)) {
                // The forward cannot reach the leader: the call fails at its deadline.
                if self.verbose {
                    println!("  {}: node {entry} cannot reach the leader", t.id);
                }
                self.sim.now_ms += CALL_TIMEOUT_MS;
                self.settle("before a retry");
                continue;
            }
            let token = self.sim.token();
            let input = Input::CreateTransfer {
                token,
                transfer: t.clone(),
                trace: None,
            };
            if self.rng.random_range(0..1_000) < self.plan.stalls {
                self.sim.stall(shard, vec![input]);
                self.after_stall(shard);
            } else {
                self.sim.batch(shard, vec![input]);
            }
            if self.rng.random_bool(0.08) {
                let after = self.rng.random_range(0..4);
                for _ in 0..after {
                    self.sim.deliver_all(1);
                }
                self.crash_a_node(after);
            }
            for _ in 0..100 {
                if let Some(Reply::Transfer(reply)) = self.sim.replies.get(&token) {
                    let result = reply.outcome();
                    if !self.link_up(self.leader(shard), entry) {
                        // The answer is lost on its way back: the call fails at its deadline.
                        if self.verbose {
                            println!("  {}: the answer cannot reach node {entry}", t.id);
                        }
                        self.sim.now_ms += CALL_TIMEOUT_MS;
                        break;
                    }
                    if matches!(result, Err(r) if r.is_retriable()) {
                        if self.verbose {
                            println!("    {} answered {result:?}: sent again", t.id);
                        }
                        break;
                    }
                    self.settle("after an answer");
                    return Some(result);
                }
                if self.sim.inbox.is_empty() {
                    self.pass_time();
                    if self.idle() && !self.sim.replies.contains_key(&token) {
                        // The waiter was lost with a crashed or deposed leader, or its lock
                        // wait ran out of time to come: move time on, then send the same id
                        // again.
                        if self.verbose {
                            println!("    {}: no answer and nothing moving: sent again", t.id);
                        }
                        self.sim.now_ms += self.plan.options.prepare_timeout_ms;
                        break;
                    }
                }
                self.deliver_round();
            }
            self.settle("before a retry");
        }
        None
    }

    /// Faults that start between operations: a partition heals or starts, a leader of a
    /// shared store is deposed by another node, a deposed leader wakes.
    fn faults_between(&mut self, op: usize) {
        if !self.cuts.is_empty() && op >= self.heal_at {
            self.heal("its time");
        }
        if self.cuts.is_empty() && self.rng.random_range(0..1_000) < self.plan.partitions {
            self.partition(op);
        }
        if self.rng.random_range(0..1_000) < self.plan.takeovers {
            let shard = ShardId(self.rng.random_range(0..self.topology.shards()));
            let successors = self.topology.successors(shard, self.leader(shard));
            if !successors.is_empty() {
                let next = successors[self.rng.random_range(0..successors.len())];
                self.take_over(shard, next);
            }
        }
        if !self.sim.deposed.is_empty() && self.rng.random_range(0..1_000) < self.plan.wakes {
            // It wakes with a tick (its timers, its resends), or with a call a router that
            // had not heard of the new leader sent it.
            let which = self.rng.random_range(0..self.sim.deposed.len());
            let inputs = if self.sent.is_empty() || self.rng.random_bool(0.5) {
                Vec::new()
            } else {
                let t = self.sent[self.rng.random_range(0..self.sent.len())].clone();
                let token = self.sim.token();
                vec![Input::CreateTransfer {
                    token,
                    transfer: t,
                    trace: None,
                }]
            };
            if self.verbose {
                println!("  a deposed leader wakes with {} inputs", inputs.len());
            }
            self.sim.wake(which, inputs);
        }
    }

    /// A partition: between two nodes or two regions, both ways or one way, until a seeded
    /// later operation.
    fn partition(&mut self, op: usize) {
        let nodes = self.topology.nodes.len();
        let regions = self.topology.regions.len();
        let one_way = self.rng.random_bool(0.5);
        let (side_a, side_b): (Vec<usize>, Vec<usize>) = if regions > 1 && self.rng.random_bool(0.5)
        {
            let a = self.rng.random_range(0..regions);
            let b = (a + self.rng.random_range(1..regions)) % regions;
            let of = |r: usize| -> Vec<usize> {
                (0..nodes)
                    .filter(|n| self.topology.nodes[*n].region == r)
                    .collect()
            };
            (of(a), of(b))
        } else {
            let a = self.rng.random_range(0..nodes);
            let b = (a + self.rng.random_range(1..nodes)) % nodes;
            (vec![a], vec![b])
        };
        for a in &side_a {
            for b in &side_b {
                self.cuts.insert((*a, *b));
                if !one_way {
                    self.cuts.insert((*b, *a));
                }
            }
        }
        self.heal_at = op + self.rng.random_range(1..=8);
        self.outcome.partitions += 1;
        if self.verbose {
            let name = |n: &Vec<usize>| {
                n.iter()
                    .map(|i| self.topology.nodes[*i].id.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            println!(
                "  partition {} {} {} until op {}",
                name(&side_a),
                if one_way { "-/->" } else { "<-/->" },
                name(&side_b),
                self.heal_at
            );
        }
    }

    fn heal(&mut self, why: &str) {
        if !self.cuts.is_empty() {
            if self.verbose {
                println!("  the partition heals: {why}");
            }
            self.cuts.clear();
        }
    }

    fn link_up(&self, from: usize, to: usize) -> bool {
        !self.cuts.contains(&(from, to))
    }

    /// The node leading `shard` now.
    fn leader(&self, shard: ShardId) -> usize {
        self.topology.node(&self.sim.leaders[shard.0 as usize])
    }

    /// A node crashes: every shard it leads loses what it had not committed.
    fn crash_a_node(&mut self, after: usize) {
        let victim = self.rng.random_range(0..self.topology.nodes.len());
        if self.verbose {
            println!(
                "  crash node {} after {after} messages",
                self.topology.nodes[victim].id
            );
        }
        for shard in 0..self.topology.shards() {
            if self.leader(ShardId(shard)) == victim {
                self.sim.crash(ShardId(shard));
            }
        }
        self.outcome.crashes += 1;
    }

    /// A leader's commit stalled: either it goes on after a while, or (with a shared store)
    /// the leader stays paused past its lease and another node of its region takes over.
    fn after_stall(&mut self, shard: ShardId) {
        let successors = self.topology.successors(shard, self.leader(shard));
        self.deliver_round();
        if successors.is_empty() || self.rng.random_bool(0.4) {
            self.sim.now_ms += self.rng.random_range(1..=self.plan.options.lease_ms);
            if self.verbose {
                println!("  shard {shard}: a stalled commit goes on");
            }
            self.sim.resume(shard);
        } else {
            let next = successors[self.rng.random_range(0..successors.len())];
            self.take_over(shard, next);
        }
    }

    /// `node` takes `shard` over once the lease has lapsed by its clock (time moves on until
    /// it has).
    fn take_over(&mut self, shard: ShardId, node: usize) {
        let (id, skew_ms) = (
            self.topology.nodes[node].id.clone(),
            self.topology.nodes[node].skew_ms,
        );
        loop {
            match self.sim.take_over(shard, &id, skew_ms) {
                Ok(()) => break,
                Err(LeaseError::Held { expires_at_ms, .. }) => {
                    let by_its_clock = expires_at_ms.saturating_add_signed(-skew_ms) + 1;
                    self.sim.now_ms = self.sim.now_ms.max(by_its_clock);
                }
                Err(e) => panic!("taking a lease in memory: {e}"),
            }
        }
        self.outcome.takeovers += 1;
        if self.verbose {
            println!("  shard {shard}: node {id} takes over");
        }
    }

    /// Nothing queued and nothing on a wide-area link.
    fn idle(&self) -> bool {
        self.sim.inbox.is_empty() && self.delayed.is_empty()
    }

    /// Time moves on by the retry interval, or to the next wide-area arrival if that comes
    /// first, and every leader ticks.
    fn pass_time(&mut self) {
        let tick = self.sim.now_ms + self.plan.options.retry_ms;
        let arrival = self.delayed.iter().map(|d| d.0).min().unwrap_or(tick);
        self.sim.now_ms = tick.min(arrival).max(self.sim.now_ms);
        self.sim.tick_all();
    }

    /// One round of deliveries with the seed's network faults: messages between regions wait
    /// out the wide-area delay, cut links drop what they carry, and the rest may be lost,
    /// duplicated or reordered.
    fn deliver_round(&mut self) {
        let now = self.sim.now_ms;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|d| d.0 <= now);
        self.delayed = later;
        let mut queued: Vec<_> = due
            .into_iter()
            .map(|(_, to, from, m)| (to, from, m))
            .collect();
        for (to, from, message) in self.sim.inbox.drain(..).collect::<Vec<_>>() {
            let far = self.topology.region_of_shard(to) != self.topology.region_of_shard(from);
            if far && self.plan.wan_delay_ms > 0 {
                // A copy of one still on the link is dropped, as `Sim` drops a resend of one
                // still queued.
                let on_the_link = self
                    .delayed
                    .iter()
                    .any(|d| d.1 == to && d.2 == from && d.3 == message);
                if !on_the_link {
                    self.delayed
                        .push((now + self.plan.wan_delay_ms, to, from, message));
                }
            } else {
                queued.push((to, from, message));
            }
        }
        if self.rng.random_range(0..1_000) < self.plan.reorder {
            for i in (1..queued.len()).rev() {
                let j = self.rng.random_range(0..=i);
                queued.swap(i, j);
            }
        }
        let mut delivered = Vec::with_capacity(queued.len());
        for message in queued {
            if !self.link_up(self.leader(message.1), self.leader(message.0)) {
                continue;
            }
            if self.rng.random_range(0..1_000) < self.plan.loss {
                continue;
            }
            if self.rng.random_range(0..1_000) < self.plan.duplicate {
                delivered.push(message.clone());
            }
            delivered.push(message);
        }
        if !self.sim.deposed.is_empty() && self.rng.random_range(0..4_000) < self.plan.wakes {
            // A deposed leader wakes to copies of what is on its way to its shard (a sender
            // that had not heard of the new leader), and answers as it knows.
            let which = self.rng.random_range(0..self.sim.deposed.len());
            let shard = self.sim.deposed[which].shard;
            let inputs: Vec<Input> = delivered
                .iter()
                .filter(|(to, _, _)| *to == shard)
                .map(|(_, from, message)| Input::Peer {
                    from: *from,
                    message: message.clone(),
                })
                .collect();
            if !inputs.is_empty() {
                if self.verbose {
                    println!(
                        "  the deposed leader of shard {shard} wakes to {} messages",
                        inputs.len()
                    );
                }
                self.sim.wake(which, inputs);
            }
        }
        self.sim.inbox.extend(delivered);
        if self.rng.random_bool(0.5) {
            self.sim.deliver_grouped(1);
        } else {
            let n = self.sim.inbox.len();
            self.sim.deliver_all(n);
        }
    }

    /// Ticks and delivers until no message is queued and no shard has a two-phase commit in
    /// flight; a cluster that does not get there is a liveness violation. While a partition
    /// is up, it only ticks and delivers for a while: what crosses the cut waits for the heal.
    fn settle(&mut self, when: &str) {
        for round in 0..SETTLE_ROUNDS_MAX {
            if !self.cuts.is_empty() && round == SETTLE_ROUNDS_UNDER_PARTITION {
                return;
            }
            self.pass_time();
            for _ in 0..50 {
                if self.idle() {
                    break;
                }
                if self.sim.inbox.is_empty() {
                    self.pass_time();
                }
                self.deliver_round();
            }
            let quiet = self.idle()
                && !self.expiries_due()
                && (0..self.topology.shards()).all(|i| {
                    let shard = ShardId(i);
                    read::in_flight(&*self.sim.stores[i as usize], shard).ok() == Some((0, 0))
                });
            if quiet {
                return;
            }
        }
        self.violation(format!("the cluster did not settle {when}"));
    }

    // ---- regional quotas ------------------------------------------------------------------

    /// An operator's change of an allowance, or a transfer entering a region that spends one.
    fn quota_op(&mut self, n: usize) {
        let mut a = self.rng.random_range(1..self.accounts.len());
        let home_region = |a: usize| self.topology.region_of_shard(self.accounts[a].1);
        let others: Vec<usize> = (0..self.topology.regions.len())
            .filter(|r| *r != home_region(a))
            .collect();
        let mut r = others[self.rng.random_range(0..others.len())];
        // Mostly an account and region that were granted an allowance.
        if !self.granted.is_empty() && self.rng.random_bool(0.8) {
            let i = self.rng.random_range(0..self.granted.len());
            (a, r) = *self.granted.iter().nth(i).expect("in range");
        }
        let others: Vec<usize> = (0..self.topology.regions.len())
            .filter(|r| *r != home_region(a))
            .collect();
        match self.rng.random_range(0..100) {
            0..65 => self.quota_transfer(n, a, r),
            65..85 => {
                let amount = self.rng.random_range(0..900);
                let lease_ms = [20_000, 3_600_000, 3_600_000][self.rng.random_range(0..3)];
                self.quota_command(a, r, amount, lease_ms);
            }
            85..94 if others.len() > 1 => {
                let to = others[(others.iter().position(|o| *o == r).unwrap() + 1) % others.len()];
                let amount = self.rng.random_range(1..300);
                let (account, _) = self.accounts[a].clone();
                self.granted.insert((a, to));
                let command = Command::Move {
                    from: self.topology.regions[r].clone(),
                    from_shard: self.topology.home(r, &account),
                    to: quota::MoveTo {
                        region: self.topology.regions[to].clone(),
                        quota_shard: self.topology.home(to, &account),
                        lease_ms: 3_600_000,
                    },
                    account_id: account,
                    amount,
                };
                self.run_quota_command(a, command);
            }
            _ => self.quota_command(a, r, 0, 3_600_000),
        }
    }

    /// `SetQuota(account a, region r, amount, lease)` at the account's home.
    fn quota_command(&mut self, a: usize, r: usize, amount: u64, lease_ms: u64) {
        if amount > 0 {
            self.granted.insert((a, r));
        }
        let (account, _) = self.accounts[a].clone();
        let command = Command::Set {
            region: self.topology.regions[r].clone(),
            quota_shard: self.topology.home(r, &account),
            account_id: account,
            amount,
            lease_ms,
        };
        self.run_quota_command(a, command);
    }

    fn run_quota_command(&mut self, a: usize, command: Command) {
        self.quota_accounts.insert(a);
        let home = self.accounts[a].1;
        let token = self.sim.token();
        if self.verbose {
            println!("  quota {command:?}");
        }
        self.sim.batch(home, vec![Input::Quota { token, command }]);
        if self.verbose {
            println!("    answered {:?}", self.sim.replies.get(&token));
        }
        self.settle("after a quota change");
        self.sync_quotas();
    }

    /// A transfer from account `a` entering region `r`: the quota path first (as the router
    /// sends it), then the ordinary path if the region declines. Retried in that region only.
    fn quota_transfer(&mut self, n: usize, a: usize, r: usize) {
        let c = (a + self.rng.random_range(1..self.accounts.len())) % self.accounts.len();
        let amount = self.rng.random_range(1..200);
        let t = self.posted(&format!("q{n}"), a, c, amount);
        let mut spend = t.clone();
        spend.debit_account_id = quota::quota_id(&self.topology.regions[r], &t.debit_account_id);
        self.sync_expiries();
        self.sync_quotas();
        let got = self.transfer(&spend);
        self.outcome.transfers += 1;
        match got {
            Some(Err(Rejection::QuotaExhausted)) => {
                if self.verbose {
                    println!("  {}: declined by the quota path", t.id);
                }
                self.send(t);
            }
            Some(got) => {
                self.sync_expiries();
                let expected = self.reference.transfer_reserved(&t);
                if self.verbose {
                    println!(
                        "  {} by the quota path of {}: {got:?}",
                        t.id, self.topology.regions[r]
                    );
                }
                if got != expected {
                    self.violation(format!(
                        "quota-path transfer {}: the cluster answered {got:?}, the reference {expected:?}",
                        t.id
                    ));
                }
            }
            None => self.violation(format!("transfer {} never got a final answer", t.id)),
        }
    }

    /// What each account's home reserves for regions and they have not spent: its
    /// allowances' reservations less what regions spent and the home has yet to settle.
    fn cluster_reserved(&self) -> BTreeMap<String, u64> {
        let (mut allowances, mut outbox) = (Vec::new(), Vec::new());
        for (i, store) in self.sim.stores.iter().enumerate() {
            let (a, _, o) = checks::quota_state(&**store, ShardId(i as u32));
            allowances.extend(a);
            outbox.extend(o);
        }
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for al in &allowances {
            let unsettled: u64 = outbox
                .iter()
                .filter(|(region, e)| {
                    *region == al.region
                        && e.transfer.debit_account_id == al.account_id
                        && e.seq > al.last_seq
                })
                .map(|(_, e)| e.transfer.amount)
                .sum();
            *out.entry(al.account_id.clone()).or_default() +=
                al.outstanding().saturating_sub(unsettled);
        }
        out
    }

    /// Tells the reference what the cluster's homes reserve now.
    fn sync_quotas(&mut self) {
        if self.quota_accounts.is_empty() {
            return;
        }
        for (account, reserved) in self.cluster_reserved() {
            self.reference.reserve(&account, reserved);
        }
    }

    fn check_final(&mut self, seed: u64) {
        let mut found = Vec::new();
        let quota_accounts: BTreeSet<&str> = self
            .quota_accounts
            .iter()
            .map(|a| self.accounts[*a].0.as_str())
            .collect();
        for (id, model) in &self.reference.accounts {
            let shard = self.home(id);
            // An account with allowances has entries of grants, releases and settlements
            // the reference does not number.
            let numbered = !quota_accounts.contains(id.as_str());
            match read::account(&*self.sim.stores[shard.0 as usize], shard, id) {
                Ok(Some(real)) => {
                    if real.balances != model.balances
                        || (numbered && real.version != model.version)
                    {
                        found.push(format!(
                            "account {id}: {:?} v{}, the reference {:?} v{}",
                            real.balances, real.version, model.balances, model.version
                        ));
                    }
                }
                other => found.push(format!("account {id}: {other:?}")),
            }
        }
        // I5: no commit of a leader whose epoch was past landed. I6: no attempt was sent two
        // decisions (and what each participant applied shows in the balances).
        found.extend(self.sim.fenced_landed.iter().cloned());
        found.extend(self.sim.decisions_changed.iter().cloned());
        let stores: Vec<&dyn Store> = self.sim.stores.iter().map(|s| &**s as &dyn Store).collect();
        let snapshot = checks::Snapshot::read(&stores);
        found.extend(checks::all(&snapshot));
        found.extend(checks::quotas_settled(&snapshot));
        if !found.is_empty() && self.verbose {
            println!("  seed {seed}: {} violations at the end", found.len());
        }
        for v in found {
            self.violation(v);
        }
    }
}

/// An order of `transfers` (each with the answer the cluster gave), with expiries of the holds
/// in `overdue` wherever they help, in which `reference` gives every answer; the reference
/// after it. A depth-first search: six transfers have at most 720 orders.
fn serial_order(
    reference: &Reference,
    transfers: &[(Transfer, Result<u64, Rejection>)],
    overdue: &[String],
    reserved: Option<&BTreeMap<String, u64>>,
) -> Option<Reference> {
    if transfers.is_empty() {
        return Some(reference.clone());
    }
    for (i, (t, answer)) in transfers.iter().enumerate() {
        let mut next = reference.clone();
        if next.transfer(t) == *answer {
            let rest: Vec<_> = transfers
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, x)| x.clone())
                .collect();
            if let Some(done) = serial_order(&next, &rest, overdue, reserved) {
                return Some(done);
            }
        }
    }
    for (i, id) in overdue.iter().enumerate() {
        let mut next = reference.clone();
        next.expire(id);
        if let Some(done) = serial_order(&next, transfers, &overdue[i + 1..], reserved) {
            return Some(done);
        }
    }
    let differs = |r: &&BTreeMap<String, u64>| {
        r.iter()
            .any(|(a, v)| reference.reserved.get(a).copied().unwrap_or(0) != *v)
    };
    if let Some(reserved) = reserved.filter(differs) {
        let mut next = reference.clone();
        for (account, r) in reserved {
            next.reserve(account, *r);
        }
        if let Some(done) = serial_order(&next, transfers, overdue, None) {
            return Some(done);
        }
    }
    None
}
