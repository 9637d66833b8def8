//! Cross-shard two-phase commit, coordinator side. The debit account's shard coordinates.
//!
//! ```text
//!  coordinator (debit shard)                         participant (credit shard)
//!  ─────────────────────────                         ──────────────────────────
//!  lock hold (post/void/expiry of a cross-shard hold)
//!  locks in ascending account id order:
//!   debit < credit: lock debit, check it
//!  log record {attempt, plan, undecided}  ─ durable ─►
//!                                         Prepare ──► lock credit (queue, deadline), check,
//!                                                     log prepared record ─ durable ─►
//!                                      ◄── Prepared   (or Refused: nothing held)
//!   debit > credit: lock debit now, check it
//!  DECISION: apply debit, write transfer record,
//!  record.decision = commit  ─ durable ─ (commit point) ─►
//!                                         Decide ───► apply credit, drop prepared, lock released,
//!                                                     done marker ─ durable ─►
//!                                      ◄── Acked
//!  delete record, reply to the client
//! ```
//!
//! Locks are taken in one global order (hold first, then accounts by ascending id), so waits
//! cannot form a cycle. The coordinator's own leg is applied in the same commit as the
//! decision, so it never needs a durable lock.
//!
//! Recovery: a new leader loads every record. Decided ones re-send their decision until acked.
//! Undecided ones are aborted (presumed abort). A participant that holds a prepared lock too
//! long asks; a coordinator with no live record for that attempt answers abort.

use serde::{Deserialize, Serialize};

use ledger_domain::{
    EntryKind, HoldState, HoldStatus, Rejection, ShardId, Transfer, TransferRecord,
};

use super::{
    Engine, Fatal, Parked, PendingHold, Plan, Reply, Task, Token, TransferReply, lock_key_account,
    lock_key_hold,
};
use crate::codec::{self, DecodeError};
use crate::keys;
use crate::protocol::{Attempt, Decision, Leg, Message};
use crate::trace::{self, Role, TraceParent};

/// What a coordination does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    Transfer(Transfer),
    /// Release an expired cross-shard hold.
    Expire {
        pending_id: String,
    },
}

/// The durable coordinator log record (`keys::coord`), in format [`CoordRecord::FORMAT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordRecord {
    pub attempt: Attempt,
    pub work: Work,
    pub(crate) plan: Plan,
    /// None while preparing; the decision once made. Written before any Decide is sent.
    pub decision: Option<Decision>,
    /// The caller's trace: recovery after a restart continues it.
    pub trace: Option<TraceParent>,
}

impl CoordRecord {
    const WHAT: &'static str = "coordinator record";
    /// 2: the decision is a [`Decision`]. 1 (read only): it was an `Option<bool>`.
    pub const FORMAT: u8 = 2;

    pub fn encode(&self) -> Vec<u8> {
        codec::encode_format(Self::FORMAT, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match codec::envelope(Self::WHAT, bytes)? {
            (Self::FORMAT, body) => codec::decode_body(Self::WHAT, body),
            (1, body) => codec::decode_body::<CoordRecordV1>(Self::WHAT, body).map(Self::from),
            (format, _) => Err(codec::unknown_format(Self::WHAT, format)),
        }
    }
}

/// A coordinator record of format 1, as builds before the [`Decision`] enum wrote it.
#[derive(Deserialize)]
struct CoordRecordV1 {
    attempt: Attempt,
    work: Work,
    plan: Plan,
    decision: Option<bool>,
    trace: Option<TraceParent>,
}

impl From<CoordRecordV1> for CoordRecord {
    fn from(v1: CoordRecordV1) -> Self {
        let decision = v1.decision.map(|commit| {
            if commit {
                Decision::Commit
            } else {
                Decision::Abort
            }
        });
        CoordRecord {
            attempt: v1.attempt,
            work: v1.work,
            plan: v1.plan,
            decision,
            trace: v1.trace,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Taking this shard's locks (may be parked behind one).
    Locking,
    /// Prepare sent; waiting for Prepared or Refused.
    AwaitPrepared,
    /// Decided; waiting for the participant's Acked.
    AwaitAck,
}

#[derive(Debug)]
pub(crate) struct Coordination {
    record: CoordRecord,
    step: Step,
    /// The record is in the store (or in this batch's writes).
    logged: bool,
    hold_locked: bool,
    debit_locked: bool,
    credit_version: Option<u64>,
    pub(crate) waiters: Vec<Token>,
    started_ms: u64,
    last_sent_ms: u64,
    /// The reply for waiters once the participant has applied a commit.
    reply: Option<TransferReply>,
    /// Why it was aborted, while the participant has yet to ack the abort (in memory only: a
    /// coordination recovered as aborted has none).
    aborted: Option<Rejection>,
    spans: Spans,
}

impl Coordination {
    /// For an aborted coordination that waits only for the participant's ack: the reason to
    /// answer a retry of its request with at once (a passing one: a final reason is recorded,
    /// and the record answers first). A retry after the ack starts a new attempt.
    pub(crate) fn abort_reason(&self) -> Option<Rejection> {
        (self.record.decision == Some(Decision::Abort))
            .then(|| self.aborted.unwrap_or(Rejection::LockTimeout))
    }
}

/// The open spans of a coordination (sampled traces only) and when each phase began.
#[derive(Debug, Default)]
struct Spans {
    /// `lock.wait` while parked behind one of this shard's locks.
    wait: Option<tracing::Span>,
    wait_ms: u64,
    /// `2pc.prepare` from the Prepare sent to Prepared or Refused; after a restart, the
    /// `2pc.recover` span of an undecided coordination.
    prepare: Option<tracing::Span>,
    prepare_ms: u64,
    /// `2pc.decide` from the decision to the participant's Acked; after a restart, the
    /// `2pc.recover` span of a decided one.
    decide: Option<tracing::Span>,
    decide_ms: u64,
}

impl Coordination {
    pub(crate) fn request(&self) -> Option<&Transfer> {
        match &self.record.work {
            Work::Transfer(t) => Some(t),
            Work::Expire { .. } => None,
        }
    }

    pub(crate) fn attempt_key(&self) -> String {
        self.record.attempt.key()
    }

    fn hold_id(&self) -> Option<&str> {
        match &self.record.work {
            Work::Transfer(t) if !t.pending_id.is_empty() => Some(&t.pending_id),
            Work::Transfer(_) => None,
            Work::Expire { pending_id } => Some(pending_id),
        }
    }

    /// What a Prepare carries: the prepare span's context, else the caller's.
    fn leg(&self) -> Leg {
        let plan = &self.record.plan;
        let (transfer_id, entry_kind, code, expected_version) = match &self.record.work {
            Work::Transfer(t) => (
                t.id.clone(),
                EntryKind::of(t.kind),
                t.code,
                t.expected_credit_version,
            ),
            Work::Expire { pending_id } => (pending_id.clone(), EntryKind::ExpirePending, 0, None),
        };
        Leg {
            attempt: self.record.attempt.clone(),
            account_id: plan.credit_id.clone(),
            ledger: plan.ledger.clone(),
            change: plan.credit,
            expected_version,
            transfer_id,
            entry_kind,
            code,
            trace: trace::context_of(&self.spans.prepare, self.record.trace),
        }
    }

    fn decide_message(&self, decision: Decision, now_ms: u64) -> Message {
        Message::Decide {
            attempt: self.record.attempt.clone(),
            decision,
            committed_at_ms: now_ms,
            trace: trace::context_of(&self.spans.decide, self.record.trace),
        }
    }
}

fn expire_op(pending_id: &str) -> String {
    format!("!expire:{pending_id}")
}

impl Engine {
    pub(super) fn start_coordination(
        &mut self,
        token: Token,
        transfer: Transfer,
        plan: Plan,
        trace: Option<TraceParent>,
    ) -> Result<(), Fatal> {
        if self.coordinations.len() >= self.options.coordinations_max {
            let record = TransferRecord {
                request: transfer,
                result: Err(Rejection::AccountBusy),
            };
            self.reply(token, Reply::Transfer(TransferReply::new(record, None)));
            return Ok(());
        }
        let op = transfer.id.clone();
        self.insert_coordination(
            op.clone(),
            Work::Transfer(transfer),
            plan,
            vec![token],
            trace,
        );
        self.advance(&op)
    }

    pub(super) fn start_expiry(
        &mut self,
        pending_id: String,
        hold: HoldStatus,
        credit_shard: ShardId,
    ) -> Result<(), Fatal> {
        let op = expire_op(&pending_id);
        if self.coordinations.contains_key(&op) {
            return Ok(());
        }
        let (debit, credit) = hold.expiry_changes();
        let plan = Plan {
            debit_id: hold.debit_account_id.clone(),
            credit_id: hold.credit_account_id.clone(),
            credit_shard,
            ledger: hold.ledger.clone(),
            amount: hold.amount,
            debit,
            credit,
            hold: Some(hold),
        };
        self.insert_coordination(
            op.clone(),
            Work::Expire { pending_id },
            plan,
            Vec::new(),
            None,
        );
        self.advance(&op)
    }

    fn insert_coordination(
        &mut self,
        op: String,
        work: Work,
        plan: Plan,
        waiters: Vec<Token>,
        trace: Option<TraceParent>,
    ) {
        let attempt = Attempt {
            op: op.clone(),
            epoch: self.epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let coordination = Coordination {
            record: CoordRecord {
                attempt,
                work,
                plan,
                decision: None,
                trace,
            },
            step: Step::Locking,
            logged: false,
            hold_locked: false,
            debit_locked: false,
            credit_version: None,
            waiters,
            started_ms: self.now_ms,
            last_sent_ms: self.now_ms,
            reply: None,
            aborted: None,
            spans: Spans::default(),
        };
        self.coordinations.insert(op, coordination);
        self.metrics.coordinations_started.increment(1);
    }

    pub(super) fn recover_coordination(&mut self, record: CoordRecord) {
        let op = record.attempt.op.clone();
        let decided = record.decision.is_some();
        // A span in the transfer's trace, linked to this term's `shard.recover` span: open
        // until the participant acks the decision (or, undecided, until the abort).
        let recovery = trace::phase(
            "2pc.recover",
            record.trace,
            self.shard,
            Role::Coordinator,
            &op,
        );
        if let Some(span) = &recovery {
            trace::link_current(span);
            let action = match record.decision {
                Some(Decision::Commit) => "resend the commit decision until acked",
                Some(Decision::Abort) => "resend the abort decision until acked",
                None => "undecided: presumed abort",
            };
            span.record("action", action);
        }
        let spans = if decided {
            Spans {
                decide: recovery,
                ..Spans::default()
            }
        } else {
            Spans {
                prepare: recovery,
                ..Spans::default()
            }
        };
        let coordination = Coordination {
            // Undecided: the Prepare may have gone out, so wait for its timeout, then abort.
            // `started_ms: 0` makes the first tick do that (presumed abort).
            step: if decided {
                Step::AwaitAck
            } else {
                Step::AwaitPrepared
            },
            record,
            logged: true,
            hold_locked: false,
            debit_locked: false,
            credit_version: None,
            waiters: Vec::new(),
            started_ms: 0,
            last_sent_ms: 0,
            reply: None,
            aborted: None,
            spans,
        };
        self.coordinations.insert(op, coordination);
    }

    /// Drives a coordination as far as it can go now. Idempotent: a stale wake-up is harmless.
    pub(super) fn advance(&mut self, op: &str) -> Result<(), Fatal> {
        let Some(c) = self.coordinations.get(op) else {
            return Ok(());
        };
        if c.step != Step::Locking && !(c.step == Step::AwaitPrepared && c.credit_version.is_some())
        {
            return Ok(());
        }
        let holder = c.attempt_key();
        let plan = c.record.plan.clone();
        // 1. The hold (if any) comes first in the lock order; then re-check with it held. Its
        //    status is read before the lock is taken, so a step that waits for the store has
        //    changed nothing (nothing else runs in between, so it is the status under the lock).
        if let (Some(pending_id), false) = (c.hold_id().map(str::to_string), c.hold_locked) {
            let Some(pending) = self.pending_reads(&pending_id)? else {
                self.stall(Task::Advance(op.to_string()));
                return Ok(());
            };
            match self.take_lock(op, &lock_key_hold(&pending_id), &holder) {
                Taken::Yes => self.coordination(op).hold_locked = true,
                Taken::Parked => return Ok(()),
                Taken::Busy => return self.abort(op, Rejection::AccountBusy),
            }
            if let Err(reason) = self.recheck_hold(op, pending) {
                return self.abort(op, reason);
            }
        }
        // 2. Accounts in ascending id order: the debit (ours) now if it sorts first or once the
        //    credit is prepared.
        let c = self.coordination(op);
        let debit_first = plan.debit_id < plan.credit_id;
        if !c.debit_locked && (debit_first || c.credit_version.is_some()) {
            match self.take_lock(op, &lock_key_account(&plan.debit_id), &holder) {
                Taken::Yes => self.coordination(op).debit_locked = true,
                Taken::Parked => return Ok(()),
                Taken::Busy => return self.abort(op, Rejection::AccountBusy),
            }
            let expected = self
                .coordination(op)
                .request()
                .and_then(|t| t.expected_debit_version);
            if let Err(reason) =
                self.check_change(&plan.debit_id, &plan.ledger, &plan.debit, expected)
            {
                return self.abort(op, reason);
            }
        }
        let c = self.coordination(op);
        if c.debit_locked && c.credit_version.is_some() {
            return self.decide_commit(op);
        }
        if c.step == Step::Locking {
            // 3. Log the record durably before the Prepare leaves (the runtime sends messages
            //    only after the batch commits).
            let now = self.now_ms;
            let caller = self.coordination(op).record.trace;
            let span = self.begin_phase("2pc.prepare", caller, Role::Coordinator, op);
            let c = self.coordination(op);
            c.step = Step::AwaitPrepared;
            c.logged = true;
            c.last_sent_ms = now;
            c.spans.prepare = span;
            c.spans.prepare_ms = now;
            let record = c.record.clone();
            let leg = c.leg();
            self.batch
                .writes
                .put(keys::coord(self.shard, op), record.encode());
            self.send(plan.credit_shard, Message::Prepare(leg));
            #[cfg(feature = "sim-bugs")]
            if crate::bugs::on(crate::bugs::Bug::ReleaseLockEarly)
                && self.coordination(op).debit_locked
            {
                self.unlock(&lock_key_account(&plan.debit_id), &holder);
            }
        }
        Ok(())
    }

    fn coordination(&mut self, op: &str) -> &mut Coordination {
        self.coordinations.get_mut(op).expect("live coordination")
    }

    /// Takes one of this shard's locks for the coordination, or parks it behind the holder
    /// (its lock wait is timed and traced until it gets the lock).
    fn take_lock(&mut self, op: &str, key: &str, holder: &str) -> Taken {
        match self.lock_or_park(key, holder, park(op)) {
            Ok(true) => {
                self.end_coordination_wait(op);
                Taken::Yes
            }
            Ok(false) => {
                self.begin_coordination_wait(op, key);
                Taken::Parked
            }
            Err(_) => Taken::Busy,
        }
    }

    /// The coordination is parked behind `lock`: its `lock.wait` span starts (once).
    fn begin_coordination_wait(&mut self, op: &str, lock: &str) {
        if self.coordination(op).spans.wait_ms != 0 {
            return;
        }
        let caller = self.coordination(op).record.trace;
        let span = self.begin_phase("lock.wait", caller, Role::Coordinator, op);
        if let Some(span) = &span {
            span.record("lock", lock);
        }
        self.metrics.lock_waits.increment(1);
        let now = self.now_ms.max(1);
        let c = self.coordination(op);
        c.spans.wait = span;
        c.spans.wait_ms = now;
    }

    /// The coordination stops waiting for a lock (it got it, or it is aborted).
    fn end_coordination_wait(&mut self, op: &str) {
        let c = self.coordination(op);
        let since = std::mem::take(&mut c.spans.wait_ms);
        let span = c.spans.wait.take();
        if since != 0 {
            self.metrics.lock_wait(self.now_ms.saturating_sub(since));
        }
        drop(span);
    }

    /// Ends the prepare phase (`outcome`: prepared, refused, aborted).
    fn end_prepare(&mut self, op: &str, outcome: &str) {
        let now = self.now_ms;
        let c = self.coordination(op);
        let span = c.spans.prepare.take();
        let began = std::mem::take(&mut c.spans.prepare_ms);
        if began != 0 {
            self.metrics
                .phase_prepare
                .record(now.saturating_sub(began) as f64 / 1000.0);
        }
        trace::outcome(&span, outcome);
        self.end_phase(span);
    }

    /// Begins the decide phase: the decision is written in this batch.
    fn begin_decide(&mut self, op: &str, decision: Decision) {
        let now = self.now_ms;
        let caller = self.coordination(op).record.trace;
        let span = self.begin_phase("2pc.decide", caller, Role::Coordinator, op);
        trace::decision(&span, decision);
        let c = self.coordination(op);
        c.spans.decide = span;
        c.spans.decide_ms = now;
    }

    /// With the hold locked, checks it is still pending (and for a transfer, still resolves
    /// the same way). `pending`: the hold as read just before its lock was taken.
    fn recheck_hold(&mut self, op: &str, pending: PendingHold) -> Result<(), Rejection> {
        let c = self.coordination(op);
        let work = c.record.work.clone();
        match work {
            Work::Transfer(transfer) => {
                let credit_shard = self.coordination(op).record.plan.credit_shard;
                let plan = self.plan(&transfer, Some(pending), Some(credit_shard))?;
                debug_assert_eq!(plan, self.coordination(op).record.plan);
                Ok(())
            }
            Work::Expire { .. } => match pending {
                PendingHold::Found(hold) if hold.state == HoldState::Pending => Ok(()),
                _ => Err(Rejection::PendingTransferNotPending),
            },
        }
    }

    /// The commit point: apply our leg, record the outcome and the decision, in one commit.
    fn decide_commit(&mut self, op: &str) -> Result<(), Fatal> {
        let now = self.now_ms;
        let c = self.coordinations.get_mut(op).expect("live coordination");
        let plan = c.record.plan.clone();
        let work = c.record.work.clone();
        let credit_version = c.credit_version.expect("prepared");
        let holder = c.attempt_key();
        let (transfer_id, kind, code) = match &work {
            Work::Transfer(t) => (t.id.clone(), EntryKind::of(t.kind), t.code),
            Work::Expire { pending_id } => (pending_id.clone(), EntryKind::ExpirePending, 0),
        };
        self.end_prepare(op, "prepared");
        self.begin_decide(op, Decision::Commit);
        let decide_cx = trace::context_of(&self.coordination(op).spans.decide, None);
        let apply = self.begin_phase("2pc.apply", decide_cx, Role::Coordinator, op);
        self.end_phase(apply);
        let debit_version =
            self.apply_change(&plan.debit_id, &plan.debit, &transfer_id, kind, code);
        let reply = match &work {
            Work::Transfer(transfer) => {
                let hold = self.settle_hold(transfer, &plan);
                if super::quota::is_quota_account(&plan.debit_id) {
                    let trace = self.coordination(op).record.trace;
                    self.quota_spent(transfer, trace);
                }
                let committed = self.committed(plan.clone(), debit_version, credit_version, true);
                let record = TransferRecord {
                    request: transfer.clone(),
                    result: Ok(committed),
                };
                self.put_transfer(&record);
                Some(TransferReply::new(record, hold))
            }
            Work::Expire { pending_id } => {
                let hold = plan.hold.clone().expect("expiry has a hold");
                self.put_hold(
                    pending_id,
                    HoldStatus {
                        state: HoldState::Expired,
                        ..hold
                    },
                );
                None
            }
        };
        let c = self.coordination(op);
        c.record.decision = Some(Decision::Commit);
        c.step = Step::AwaitAck;
        c.last_sent_ms = now;
        c.reply = reply;
        let record = c.record.clone();
        let decide = c.decide_message(Decision::Commit, now);
        self.batch
            .writes
            .put(keys::coord(self.shard, op), record.encode());
        self.send(plan.credit_shard, decide);
        self.unlock(&lock_key_account(&plan.debit_id), &holder);
        if let Some(hold) = self.coordination(op).hold_id().map(str::to_string) {
            self.unlock(&lock_key_hold(&hold), &holder);
        }
        Ok(())
    }

    /// Aborts before the commit point. Final reasons are recorded for the transfer id;
    /// retriable ones are not. If the participant may hold a prepared lock, the abort is logged
    /// and sent; otherwise the coordination simply ends.
    fn abort(&mut self, op: &str, reason: Rejection) -> Result<(), Fatal> {
        let c = self.coordinations.get_mut(op).expect("live coordination");
        assert!(
            c.record.decision.is_none(),
            "shard={} abort after decision {op}",
            self.shard
        );
        let participant_may_hold = c.step == Step::AwaitPrepared;
        self.metrics.abort(reason);
        self.end_coordination_wait(op);
        self.end_prepare(op, &format!("aborted: {}", reason.name()));
        let c = self.coordination(op);
        let holder = c.attempt_key();
        let hold = c.hold_id().map(str::to_string);
        let waiters = std::mem::take(&mut c.waiters);
        let plan = c.record.plan.clone();
        if let Work::Transfer(transfer) = c.record.work.clone() {
            let record = TransferRecord {
                request: transfer,
                result: Err(reason),
            };
            if !reason.is_retriable() {
                self.put_transfer(&record);
            }
            for token in waiters {
                let reply = TransferReply::new(record.clone(), None);
                self.reply(token, Reply::Transfer(reply));
            }
        }
        self.unlock(&lock_key_account(&plan.debit_id), &holder);
        if let Some(hold) = hold {
            self.unlock(&lock_key_hold(&hold), &holder);
        }
        if participant_may_hold {
            let now = self.now_ms;
            self.begin_decide(op, Decision::Abort);
            let c = self.coordination(op);
            c.record.decision = Some(Decision::Abort);
            c.aborted = Some(reason);
            c.step = Step::AwaitAck;
            c.last_sent_ms = now;
            let record = c.record.clone();
            let decide = c.decide_message(Decision::Abort, now);
            self.batch
                .writes
                .put(keys::coord(self.shard, op), record.encode());
            self.send(plan.credit_shard, decide);
        } else {
            let c = self.coordinations.remove(op).expect("live coordination");
            if c.logged {
                self.batch.writes.delete(keys::coord(self.shard, op));
            }
        }
        Ok(())
    }

    pub(super) fn on_coordinator_message(
        &mut self,
        from: ShardId,
        message: Message,
    ) -> Result<(), Fatal> {
        let attempt = match &message {
            Message::Prepared { attempt, .. }
            | Message::Refused { attempt, .. }
            | Message::Acked { attempt }
            | Message::QueryDecision { attempt } => attempt.clone(),
            other => unreachable!("not a coordinator message: {other:?}"),
        };
        let live = self
            .coordinations
            .get(&attempt.op)
            .filter(|c| c.record.attempt == attempt)
            .map(|c| (c.step, c.record.decision));
        match (message, live) {
            (Message::Prepared { version_after, .. }, Some((Step::AwaitPrepared, None))) => {
                self.end_prepare(&attempt.op, "prepared");
                self.coordination(&attempt.op).credit_version = Some(version_after);
                self.advance(&attempt.op)?;
            }
            (Message::Refused { reason, .. }, Some((Step::AwaitPrepared, None))) => {
                // The participant holds nothing, so no Decide is owed.
                self.end_prepare(&attempt.op, &format!("refused: {}", reason.name()));
                self.coordination(&attempt.op).step = Step::Locking;
                self.abort(&attempt.op, reason)?;
            }
            (Message::Acked { .. }, Some((Step::AwaitAck, Some(_)))) => {
                let mut c = self
                    .coordinations
                    .remove(&attempt.op)
                    .expect("live coordination");
                if c.spans.decide_ms != 0 {
                    let took = self.now_ms.saturating_sub(c.spans.decide_ms);
                    self.metrics.phase_decide.record(took as f64 / 1000.0);
                }
                trace::outcome(&c.spans.decide, "acked");
                self.end_phase(c.spans.decide.take());
                self.batch
                    .writes
                    .delete(keys::coord(self.shard, &attempt.op));
                match (c.reply.take(), c.abort_reason(), &c.record.work) {
                    (Some(reply), _, _) => {
                        for token in c.waiters {
                            self.reply(token, Reply::Transfer(reply.clone()));
                        }
                    }
                    // Nobody waits on an abort (a retry is answered at once), but were one to,
                    // it gets the abort's reason rather than no answer at all.
                    (None, Some(reason), Work::Transfer(transfer)) => {
                        for token in c.waiters {
                            let record = TransferRecord {
                                request: transfer.clone(),
                                result: Err(reason),
                            };
                            self.reply(token, Reply::Transfer(TransferReply::new(record, None)));
                        }
                    }
                    _ => {}
                }
            }
            (Message::QueryDecision { .. }, Some((_, Some(decision)))) => {
                let decide = self.coordinations[&attempt.op].decide_message(decision, self.now_ms);
                self.send(from, decide);
            }
            (Message::QueryDecision { .. }, Some((_, None))) => {} // Undecided: it will be sent.
            (Message::QueryDecision { .. }, None) => {
                // No live record for this attempt: it was never decided commit (a committed
                // attempt keeps its record until the participant acks). Presumed abort.
                let decide = Message::Decide {
                    attempt,
                    decision: Decision::Abort,
                    committed_at_ms: self.now_ms,
                    trace: None,
                };
                self.send(from, decide);
            }
            _ => {} // Late duplicates of answers already handled.
        }
        Ok(())
    }

    pub(super) fn tick_coordinations(&mut self) -> Result<(), Fatal> {
        let now = self.now_ms;
        let mut timed_out = Vec::new();
        for (op, c) in &mut self.coordinations {
            let waited = now.saturating_sub(c.started_ms);
            match c.step {
                Step::Locking if waited >= self.options.lock_wait_ms_max => {
                    timed_out.push(op.clone())
                }
                Step::AwaitPrepared if waited >= self.options.prepare_timeout_ms => {
                    timed_out.push(op.clone());
                }
                Step::AwaitPrepared
                    if now.saturating_sub(c.last_sent_ms) >= self.options.retry_ms =>
                {
                    c.last_sent_ms = now;
                    self.batch
                        .messages
                        .push((c.record.plan.credit_shard, Message::Prepare(c.leg())));
                }
                Step::AwaitAck if now.saturating_sub(c.last_sent_ms) >= self.options.retry_ms => {
                    c.last_sent_ms = now;
                    let decide = c.decide_message(c.record.decision.expect("decided"), now);
                    self.batch
                        .messages
                        .push((c.record.plan.credit_shard, decide));
                }
                _ => {}
            }
        }
        for op in timed_out {
            #[cfg(feature = "sim-bugs")]
            if crate::bugs::on(crate::bugs::Bug::PresumeCommit)
                && self.coordination(&op).started_ms == 0
                && matches!(self.coordination(&op).record.work, Work::Transfer(_))
            {
                let c = self.coordination(&op);
                c.credit_version = Some(c.credit_version.unwrap_or(1));
                self.decide_commit(&op)?;
                continue;
            }
            self.abort(&op, Rejection::LockTimeout)?;
        }
        Ok(())
    }
}

/// What [`Engine::take_lock`] did.
enum Taken {
    Yes,
    /// Queued behind the holder; `advance` runs again when the lock is released.
    Parked,
    /// The lock's wait queue is full.
    Busy,
}

fn park(op: &str) -> Parked {
    Parked::Coordination { op: op.to_string() }
}
