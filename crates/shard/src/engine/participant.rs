//! Cross-shard two-phase commit, participant side: the credit account's shard.
//!
//! Prepare: lock the account (waiting in its bounded queue if another cross-shard transfer has
//! it), check the change, make a prepared record durable, answer `Prepared`. The lock keeps the
//! account unchanged until the decision, so the check stays true. A refusal holds nothing.
//!
//! Decide: apply (or drop) the leg, delete the prepared record, write a done marker for the
//! attempt (so a late duplicate Prepare is ignored rather than prepared again), release the
//! lock, answer `Acked`. A Decide for an attempt with no prepared record is acknowledged as is.

use serde::{Deserialize, Serialize};

use ledger_domain::ShardId;

use super::{Engine, Fatal, Input, Lock, Parked, Task, lock_key_account};
use crate::protocol::{Attempt, Decision, Leg, Message};
use crate::trace::{self, Role, TraceParent};
use crate::{codec, keys};

/// The durable record of a prepared leg; its existence is the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRecord {
    pub leg: Leg,
    pub coordinator: ShardId,
}

#[derive(Debug)]
pub(crate) struct Prepared {
    record: PreparedRecord,
    prepared_ms: u64,
    last_query_ms: u64,
    /// After a restart: the `2pc.recover` span, open until the decision arrives.
    recovery: Option<tracing::Span>,
}

impl Engine {
    pub(super) fn on_message(&mut self, from: ShardId, message: Message) -> Result<(), Fatal> {
        match message {
            Message::Prepare(leg) => self.on_prepare(from, leg),
            Message::Decide {
                attempt,
                decision,
                trace,
                ..
            } => {
                self.on_decide(&attempt.key(), decision, trace);
                self.send(from, Message::Acked { attempt });
                Ok(())
            }
            other => self.on_coordinator_message(from, other),
        }
    }

    fn on_prepare(&mut self, from: ShardId, leg: Leg) -> Result<(), Fatal> {
        let key = leg.attempt.key();
        if self.prepared.contains_key(&key) {
            let version_after = self.accounts[&leg.account_id].version + 1;
            self.send(
                from,
                Message::Prepared {
                    attempt: leg.attempt,
                    version_after,
                },
            );
            return Ok(());
        }
        match self.lookup_done(&key) {
            Some(true) => return Ok(()), // A late duplicate: already decided and applied.
            Some(false) => {}
            None => {
                let input = Input::Peer {
                    from,
                    message: Message::Prepare(leg),
                };
                self.stall(Task::Input(input));
                return Ok(());
            }
        }
        if self.supersede(&leg) {
            return Ok(()); // A newer attempt of the operation is prepared here.
        }
        let lock = lock_key_account(&leg.account_id);
        if self.is_locked(&lock) {
            let (trace, op) = (leg.trace, leg.attempt.op.clone());
            let input = Input::Peer {
                from,
                message: Message::Prepare(leg),
            };
            self.wait_for_lock(&lock, input, trace, Role::Participant, &op);
            return Ok(());
        }
        let span = self.begin_phase("2pc.prepare", leg.trace, Role::Participant, &leg.attempt.op);
        if let Err(reason) = self.check_change(
            &leg.account_id,
            &leg.ledger,
            &leg.change,
            leg.expected_version,
        ) {
            trace::outcome(&span, &format!("refused: {}", reason.name()));
            self.end_phase(span);
            self.send(
                from,
                Message::Refused {
                    attempt: leg.attempt,
                    reason,
                },
            );
            return Ok(());
        }
        let version_after = self.accounts[&leg.account_id].version + 1;
        let record = PreparedRecord {
            leg,
            coordinator: from,
        };
        self.batch
            .writes
            .put(keys::prepared(self.shard, &key), codec::encode(&record));
        let attempt = record.leg.attempt.clone();
        self.hold_prepared(record, self.now_ms, None);
        trace::outcome(&span, "prepared");
        self.end_phase(span);
        self.send(
            from,
            Message::Prepared {
                attempt,
                version_after,
            },
        );
        Ok(())
    }

    /// A coordinator runs one attempt of an operation at a time, and starts another only once
    /// the last is gone (a committed one never is followed by another: its outcome is
    /// recorded). So a Prepare of a newer attempt says every older one was abandoned: an older
    /// attempt prepared here is released as aborted (as its coordinator, asked, would answer)
    /// and the older Prepares still queued behind the account's lock are dropped. Without it,
    /// each resend of a Prepare parked behind a lock took the lock in turn once it ran, after
    /// its attempt was abandoned, and a retried transfer could be refused `account_busy` for as
    /// long as they kept coming. Returns whether this Prepare is the stale one.
    fn supersede(&mut self, leg: &Leg) -> bool {
        let same_op = format!("{}#", leg.attempt.op);
        let mut older = Vec::new();
        for (key, p) in self.prepared.range(same_op.clone()..) {
            if !key.starts_with(&same_op) {
                break;
            }
            let attempt = &p.record.leg.attempt;
            if attempt.op != leg.attempt.op {
                continue;
            }
            if newer_than(attempt, &leg.attempt) {
                return true;
            }
            if *attempt != leg.attempt {
                older.push(key.clone());
            }
        }
        for key in older {
            self.on_decide(&key, Decision::Abort, None);
        }
        if let Some(lock) = self.locks.get_mut(&lock_key_account(&leg.account_id)) {
            lock.waiters.retain(|parked| match parked {
                Parked::Input {
                    input:
                        Input::Peer {
                            message: Message::Prepare(queued),
                            ..
                        },
                    ..
                } => {
                    queued.attempt.op != leg.attempt.op
                        || !newer_than(&leg.attempt, &queued.attempt)
                }
                _ => true,
            });
        }
        false
    }

    fn hold_prepared(
        &mut self,
        record: PreparedRecord,
        prepared_ms: u64,
        recovery: Option<tracing::Span>,
    ) {
        let key = record.leg.attempt.key();
        let lock = Lock {
            holder: key.clone(),
            waiters: Default::default(),
        };
        let previous = self
            .locks
            .insert(lock_key_account(&record.leg.account_id), lock);
        assert!(
            previous.is_none(),
            "shard={} {key}: account already locked",
            self.shard
        );
        self.prepared.insert(
            key,
            Prepared {
                record,
                prepared_ms,
                last_query_ms: 0,
                recovery,
            },
        );
    }

    pub(super) fn recover_prepared(&mut self, record: PreparedRecord) {
        // A span in the transfer's trace, linked to this term's `shard.recover` span, open
        // until the decision arrives.
        let recovery = trace::phase(
            "2pc.recover",
            record.leg.trace,
            self.shard,
            Role::Participant,
            &record.leg.attempt.op,
        );
        if let Some(span) = &recovery {
            trace::link_current(span);
            span.record(
                "action",
                "hold the lock; ask the coordinator for the decision",
            );
        }
        // prepared_ms 0: ask the coordinator at the first tick.
        self.hold_prepared(record, 0, recovery);
    }

    fn on_decide(&mut self, key: &str, decision: Decision, trace: Option<TraceParent>) {
        let Some(prepared) = self.prepared.remove(key) else {
            return;
        };
        trace::decision(&prepared.recovery, decision);
        trace::outcome(&prepared.recovery, "decided");
        self.end_phase(prepared.recovery);
        let leg = prepared.record.leg;
        let span = self.begin_phase("2pc.decide", trace, Role::Participant, &leg.attempt.op);
        trace::decision(&span, decision);
        let commit = decision.is_commit();
        trace::outcome(&span, if commit { "applied" } else { "released" });
        if commit {
            let apply = self.begin_phase(
                "2pc.apply",
                trace::context_of(&span, trace),
                Role::Participant,
                &leg.attempt.op,
            );
            self.end_phase(apply);
            self.apply_change(
                &leg.account_id,
                &leg.change,
                &leg.transfer_id,
                leg.entry_kind,
                leg.code,
            );
            #[cfg(feature = "sim-bugs")]
            if crate::bugs::on(crate::bugs::Bug::ApplyDecisionTwice) {
                self.apply_change(
                    &leg.account_id,
                    &leg.change,
                    &leg.transfer_id,
                    leg.entry_kind,
                    leg.code,
                );
            }
        }
        self.batch.writes.delete(keys::prepared(self.shard, key));
        self.batch
            .writes
            .put(keys::done(self.shard, key), codec::encode(&commit)); // format 1: a bool
        self.batch.done.insert(key.to_string());
        self.unlock(&lock_key_account(&leg.account_id), key);
        self.end_phase(span);
    }

    pub(super) fn tick_prepared(&mut self) {
        let now = self.now_ms;
        for p in self.prepared.values_mut() {
            let held = now.saturating_sub(p.prepared_ms);
            if held >= self.options.prepared_query_ms
                && now.saturating_sub(p.last_query_ms) >= self.options.retry_ms
            {
                p.last_query_ms = now;
                let query = Message::QueryDecision {
                    attempt: p.record.leg.attempt.clone(),
                };
                self.batch.messages.push((p.record.coordinator, query));
            }
        }
    }
}

/// Whether attempt `a` of an operation is newer than `b` of the same operation (one
/// coordinator numbers them: epoch, then sequence).
fn newer_than(a: &Attempt, b: &Attempt) -> bool {
    (a.epoch, a.seq) > (b.epoch, b.seq)
}
