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

use super::{Engine, Fatal, Input, Leg, Lock, Message, Parked, lock_key_account};
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
}

impl Engine {
    pub(super) fn on_message(&mut self, from: ShardId, message: Message) -> Result<(), Fatal> {
        match message {
            Message::Prepare(leg) => self.on_prepare(from, leg),
            Message::Decide {
                attempt, commit, ..
            } => {
                self.on_decide(from, &attempt.key(), commit);
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
        if self.store.get(&keys::done(self.shard, &key))?.is_some() {
            return Ok(()); // A late duplicate: this attempt is already decided and applied.
        }
        let lock = lock_key_account(&leg.account_id);
        if self.is_locked(&lock) {
            let deadline_ms = self.now_ms + self.options.lock_wait_ms_max;
            let input = Input::Peer {
                from,
                message: Message::Prepare(leg),
            };
            if let Err(Parked::Input { input, .. }) =
                self.park(&lock, Parked::Input { input, deadline_ms })
            {
                self.refuse_busy(input, ledger_domain::Rejection::AccountBusy);
            }
            return Ok(());
        }
        if let Err(reason) = self.check_change(
            &leg.account_id,
            &leg.ledger,
            &leg.change,
            leg.expected_version,
        ) {
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
        self.hold_prepared(record, self.now_ms);
        self.send(
            from,
            Message::Prepared {
                attempt,
                version_after,
            },
        );
        Ok(())
    }

    fn hold_prepared(&mut self, record: PreparedRecord, prepared_ms: u64) {
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
            },
        );
    }

    pub(super) fn recover_prepared(&mut self, record: PreparedRecord) {
        // prepared_ms 0: ask the coordinator at the first tick.
        self.hold_prepared(record, 0);
    }

    fn on_decide(&mut self, _from: ShardId, key: &str, commit: bool) {
        let Some(prepared) = self.prepared.remove(key) else {
            return;
        };
        let leg = prepared.record.leg;
        if commit {
            self.apply_change(
                &leg.account_id,
                &leg.change,
                &leg.transfer_id,
                leg.entry_kind,
                leg.code,
            );
        }
        self.batch.writes.delete(keys::prepared(self.shard, key));
        self.batch
            .writes
            .put(keys::done(self.shard, key), codec::encode(&commit));
        self.unlock(&lock_key_account(&leg.account_id), key);
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
