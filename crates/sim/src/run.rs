//! One simulated run: everything from one seed, in one thread, on simulated time.
//!
//! Shards of real engines over memory stores (`ledger_shard::sim::Sim`, which runs each batch
//! as a leader's runtime does); a seeded workload sent the way a client and the router do
//! (route by the debit account's shard or the hold's, retry the same id when an answer is
//! lost or says to retry), one transfer at a time or in bursts of concurrent transfers
//! (between accounts without limits, whose outcomes do not depend on their order, so the
//! reference still predicts each one); seeded faults (a shard crashed after any number of
//! protocol messages, messages lost, duplicated and reordered, time jumps past timeouts); and
//! judges:
//! the reference ledger for every answer, then a liveness phase (no fault, every timer due)
//! after which nothing may be in flight, every balance and version must match the reference,
//! and every invariant checker must find nothing.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ledger_domain::{AccountFlags, NewAccount, Rejection, ShardId, Transfer, TransferKind};
use ledger_shard::engine::{Input, Reply};
use ledger_shard::sim::Sim;
use ledger_shard::{Options, read};
use ledger_store::Store;

use crate::checks;
use crate::reference::Reference;

/// Attempts at one transfer before the run counts it as never answered (a liveness failure).
const ATTEMPTS_MAX: usize = 30;
/// Delivery rounds a settling cluster gets before it counts as stuck.
const SETTLE_ROUNDS_MAX: usize = 400;

/// What a run's seed chose, printed with `-v`.
#[derive(Debug)]
pub struct Plan {
    pub shards: u32,
    pub accounts: usize,
    pub ops: usize,
    /// Chance that a delivered message is lost, duplicated, and that a round is reordered
    /// (per mille).
    pub loss: u32,
    pub duplicate: u32,
    pub reorder: u32,
    pub options: Options,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub violations: Vec<String>,
    pub transfers: usize,
    pub crashes: usize,
    pub simulated_ms: u64,
    /// A hash of every batch's output, in order: the same seed gives the same hash.
    pub journal_hash: u64,
}

struct Run {
    rng: StdRng,
    sim: Sim,
    reference: Reference,
    plan: Plan,
    /// Account ids and their shards.
    accounts: Vec<(String, ShardId)>,
    /// Transfers sent so far (for retries of the same id).
    sent: Vec<Transfer>,
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
    let shards = rng.random_range(2..=6u32);
    let retry_ms = [0, 10, 100][rng.random_range(0..3)];
    let prepare_timeout_ms = [200, 1_000, 10_000][rng.random_range(0..3)];
    let options = Options {
        retry_ms: retry_ms.max(1),
        prepared_query_ms: retry_ms,
        prepare_timeout_ms,
        lock_wait_ms_max: prepare_timeout_ms / 2,
        lock_waiters_max: rng.random_range(1..=64),
        ..Options::default()
    };
    let plan = Plan {
        shards,
        accounts: rng.random_range(3..=12),
        ops: rng.random_range(10..=120),
        loss: [0, 50, 200][rng.random_range(0..3)],
        duplicate: [0, 50, 200][rng.random_range(0..3)],
        reorder: [0, 300][rng.random_range(0..2)],
        options,
    };
    if verbose {
        println!("seed {seed}: {plan:?}");
    }
    let accounts: Vec<(String, ShardId)> = (0..plan.accounts)
        .map(|i| (format!("a{i}"), ShardId(rng.random_range(0..shards))))
        .collect();
    let homes: BTreeMap<String, ShardId> = accounts.iter().cloned().collect();
    let locate = Arc::new(move |id: &str| Some(homes.get(id).copied().unwrap_or(ShardId(0))));
    let mut sim = Sim::new(shards, locate, plan.options.clone());
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
        let token = sim.token();
        sim.batch(
            *shard,
            vec![Input::CreateAccount {
                token,
                account: spec.clone(),
            }],
        );
        reference.create_account(spec);
    }
    let mut run = Run {
        rng,
        sim,
        reference,
        plan,
        accounts,
        sent: Vec::new(),
        outcome: Outcome::default(),
        verbose,
    };
    run.play(seed);
    run.outcome.simulated_ms = run.sim.now_ms;
    let mut hasher = DefaultHasher::new();
    run.sim.journal.take().unwrap_or_default().hash(&mut hasher);
    run.outcome.journal_hash = hasher.finish();
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
                        timeout_seconds: self.rng.random_range(0..3) * 1_000,
                        ..self.posted(&format!("t{n}"), d, c, amount)
                    }
                }
                62..72 => self.resolve(n, TransferKind::PostPending),
                72..78 => self.resolve(n, TransferKind::VoidPending),
                78..88 if !self.sent.is_empty() => {
                    // A retry of an earlier id with the same fields.
                    self.sent[self.rng.random_range(0..self.sent.len())].clone()
                }
                88..92 => {
                    self.burst(n);
                    continue;
                }
                92..95 => {
                    let ms = self.rng.random_range(1..4) * 1_000_000;
                    if self.verbose {
                        println!("  advance {ms} ms");
                    }
                    self.sim.now_ms += ms;
                    self.reference.advance(ms);
                    self.settle("after a time jump");
                    continue;
                }
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
        self.sim.now_ms += self.plan.options.prepare_timeout_ms * 4;
        self.settle("in the liveness phase");
        self.check_final(seed);
    }

    /// Up to eight transfers in flight at once between accounts without limits, some of them
    /// sent twice: every one must get the reference's answer.
    fn burst(&mut self, n: usize) {
        let free: Vec<usize> = (0..self.accounts.len())
            .filter(|i| {
                let id = &self.accounts[*i].0;
                !self.reference.accounts[id]
                    .spec
                    .flags
                    .debits_must_not_exceed_credits
            })
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
            let victim = ShardId(self.rng.random_range(0..self.plan.shards));
            self.sim.deliver_all(self.rng.random_range(0..4));
            self.sim.crash(victim);
            self.outcome.crashes += 1;
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
            }
            let mut retry = Vec::new();
            let tokens: Vec<u64> = waiting.keys().copied().collect();
            for token in tokens {
                if let Some(Reply::Transfer(reply)) = self.sim.replies.get(&token) {
                    let i = waiting.remove(&token).expect("waiting");
                    match reply
                        .record
                        .result
                        .as_ref()
                        .map(|c| c.amount)
                        .map_err(|r| *r)
                    {
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
                self.sim.now_ms += self.plan.options.retry_ms;
                self.sim.tick_all();
                if self.sim.inbox.is_empty() && retry.is_empty() {
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
        let expected = self.reference.transfer(&t);
        let got = self.transfer(&t);
        self.outcome.transfers += 1;
        if self.verbose {
            println!(
                "  {} {} -> {}: {got:?}",
                t.id, t.debit_account_id, t.credit_account_id
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

    fn violation(&mut self, what: String) {
        if self.verbose {
            println!("  VIOLATION {what}");
        }
        self.outcome.violations.push(what);
    }

    /// What the router does: the debit account's shard, or for a post or void the shard
    /// that recorded it or its hold; `Err`: answered without any shard (not recorded).
    fn route(&self, t: &Transfer) -> Result<ShardId, Rejection> {
        let resolves = matches!(
            t.kind,
            TransferKind::PostPending | TransferKind::VoidPending
        );
        if !resolves {
            return Ok(self.home(&t.debit_account_id));
        }
        let shards = (0..self.plan.shards).map(ShardId);
        let store = |shard: ShardId| &*self.sim.stores[shard.0 as usize];
        for shard in shards.clone() {
            if read::transfer(store(shard), shard, &t.id)
                .ok()
                .flatten()
                .is_some()
            {
                return Ok(shard);
            }
        }
        for shard in shards.clone() {
            if let Some(hold) = read::hold(store(shard), shard, &t.pending_id)
                .ok()
                .flatten()
            {
                return Ok(self.home(&hold.debit_account_id));
            }
        }
        let recorded = shards.clone().any(|shard| {
            read::transfer(store(shard), shard, &t.pending_id)
                .ok()
                .flatten()
                .is_some()
        });
        Err(if recorded {
            Rejection::PendingTransferNotPending
        } else {
            Rejection::PendingTransferNotFound
        })
    }

    fn home(&self, id: &str) -> ShardId {
        self.accounts
            .iter()
            .find(|(a, _)| a == id)
            .map_or(ShardId(0), |(_, shard)| *shard)
    }

    /// Submits until a final answer: the same id again after a retriable rejection or a reply
    /// lost with a crashed leader. Faults from the seed along the way. `None`: never answered.
    fn transfer(&mut self, t: &Transfer) -> Option<Result<u64, Rejection>> {
        let shard = match self.route(t) {
            Ok(shard) => shard,
            Err(reason) => return Some(Err(reason)),
        };
        for _ in 0..ATTEMPTS_MAX {
            let token = self.sim.token();
            self.sim.batch(
                shard,
                vec![Input::CreateTransfer {
                    token,
                    transfer: t.clone(),
                    trace: None,
                }],
            );
            if self.rng.random_bool(0.08) {
                let victim = ShardId(self.rng.random_range(0..self.plan.shards));
                let after = self.rng.random_range(0..4);
                for _ in 0..after {
                    self.sim.deliver_all(1);
                }
                if self.verbose {
                    println!("  crash shard {victim} after {after} messages");
                }
                self.sim.crash(victim);
                self.outcome.crashes += 1;
            }
            for _ in 0..100 {
                if let Some(Reply::Transfer(reply)) = self.sim.replies.get(&token) {
                    let result = reply
                        .record
                        .result
                        .as_ref()
                        .map(|c| c.amount)
                        .map_err(|r| *r);
                    if matches!(result, Err(r) if r.is_retriable()) {
                        break;
                    }
                    self.settle("after an answer");
                    return Some(result);
                }
                if self.sim.inbox.is_empty() {
                    self.sim.now_ms += self.plan.options.retry_ms;
                    self.sim.tick_all();
                    if self.sim.inbox.is_empty() && !self.sim.replies.contains_key(&token) {
                        // The waiter was lost with a crashed leader, or its lock wait ran
                        // out of time to come: move time on, then send the same id again.
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

    /// One round of deliveries with the seed's network faults.
    fn deliver_round(&mut self) {
        let mut queued: Vec<_> = self.sim.inbox.drain(..).collect();
        if self.rng.random_range(0..1_000) < self.plan.reorder {
            for i in (1..queued.len()).rev() {
                let j = self.rng.random_range(0..=i);
                queued.swap(i, j);
            }
        }
        let mut delivered = Vec::with_capacity(queued.len());
        for message in queued {
            if self.rng.random_range(0..1_000) < self.plan.loss {
                continue;
            }
            if self.rng.random_range(0..1_000) < self.plan.duplicate {
                delivered.push(message.clone());
            }
            delivered.push(message);
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
    /// flight; a cluster that does not get there is a liveness violation.
    fn settle(&mut self, when: &str) {
        for _ in 0..SETTLE_ROUNDS_MAX {
            self.sim.now_ms += self.plan.options.retry_ms;
            self.sim.tick_all();
            for _ in 0..50 {
                if self.sim.inbox.is_empty() {
                    break;
                }
                self.deliver_round();
            }
            let quiet = self.sim.inbox.is_empty()
                && (0..self.plan.shards).all(|i| {
                    let shard = ShardId(i);
                    read::in_flight(&*self.sim.stores[i as usize], shard).ok() == Some((0, 0))
                });
            if quiet {
                return;
            }
        }
        self.violation(format!("the cluster did not settle {when}"));
    }

    fn check_final(&mut self, seed: u64) {
        let mut found = Vec::new();
        for (id, model) in &self.reference.accounts {
            let shard = self.home(id);
            match read::account(&*self.sim.stores[shard.0 as usize], shard, id) {
                Ok(Some(real)) => {
                    if real.balances != model.balances || real.version != model.version {
                        found.push(format!(
                            "account {id}: {:?} v{}, the reference {:?} v{}",
                            real.balances, real.version, model.balances, model.version
                        ));
                    }
                }
                other => found.push(format!("account {id}: {other:?}")),
            }
        }
        let stores: Vec<&dyn Store> = self.sim.stores.iter().map(|s| &**s as &dyn Store).collect();
        found.extend(checks::all(&checks::Snapshot::read(&stores)));
        if !found.is_empty() && self.verbose {
            println!("  seed {seed}: {} violations at the end", found.len());
        }
        for v in found {
            self.violation(v);
        }
    }
}
