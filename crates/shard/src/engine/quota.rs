//! Regional quotas in the engine ([`crate::quota`]): the home shard's allowances (operators'
//! commands, answers from regions, settlements) and the quota shard's records (grants,
//! shrinks, spending through the quota account, the outbox, closing at expiry).
//!
//! Every account these steps change may be locked by a cross-shard transfer in flight; a step
//! that finds one locked does nothing now: an operator's command waits for the lock like a
//! transfer, a message is dropped and comes again (every quota message is resent until
//! answered, and answered the same way twice).

use std::collections::{BTreeMap, BTreeSet};

use ledger_domain::{
    Account, AccountFlags, Balances, Change, Committed, EntryKind, NewAccount, ShardId, Side,
    Transfer, TransferRecord,
};

use super::{Engine, Fatal, Input, Known, Reply, Token, lock_key_account};
use crate::codec;
use crate::keys;
use crate::protocol::Message;
use crate::quota::{
    Allowance, Command, CommandError, CommandReply, MoveTo, Pending, QUOTA_SKEW_MARGIN_MS,
    QUOTAS_PER_ACCOUNT_MAX, QuotaRecord, RegionView, SettleResult, Settlement, change_id,
    clearing_id, escrow_id, parse_quota_id, quota_id,
};
use crate::trace::{Role, TraceParent};

/// Quota state an engine holds in memory, loaded when its term begins. Ticks run every batch,
/// so what they look for is indexed: they touch only allowances with a change in flight,
/// records due to close or with a close to report, and the first settlements per home.
#[derive(Debug, Default)]
pub(super) struct Quotas {
    /// Home side: (account, region) -> allowance.
    pub allowances: BTreeMap<(String, String), Allowance>,
    /// Allowances whose change waits for its region, and when it was last sent (0: not yet
    /// in this term).
    pub sent_ms: BTreeMap<(String, String), u64>,
    /// Quota side: account -> record ([`Engine::put_quota_record`] keeps the indexes below).
    pub records: BTreeMap<String, QuotaRecord>,
    /// Open records by the time they stop spending.
    closing: BTreeSet<(u64, String)>,
    /// Records with a close the home has not confirmed, and when it was last reported.
    pub close_sent_ms: BTreeMap<String, u64>,
    /// Settlements not yet answered, by (home shard, account, seq).
    pub outbox: BTreeMap<(ShardId, String, u64), Settlement>,
    /// Home shards with a `Settle` in flight, and when it was sent.
    pub settling: BTreeMap<ShardId, u64>,
    /// Sums over the records (limit, spent, unsettled) and their region, for the gauges;
    /// changed since they were last reported.
    totals: (u64, u64, u64),
    region: String,
    totals_changed: bool,
}

/// A record's part of the gauges: its limit (granted less given back), spent, and spent but
/// not answered by the home.
fn contribution(r: &QuotaRecord) -> (u64, u64, u64) {
    (
        r.granted.saturating_sub(r.returned),
        r.spent,
        r.spent.saturating_sub(r.settled).saturating_sub(r.refused),
    )
}

/// When an open record stops spending (`None`: closed, or never granted).
fn close_at(r: &QuotaRecord) -> Option<u64> {
    (!r.closed && r.epoch > 0).then(|| r.expires_at_ms.saturating_sub(QUOTA_SKEW_MARGIN_MS))
}

/// Reasons a settlement is refused at home (the `reason` label of
/// `ledger_quota_settlements_refused_total`).
pub const REFUSED_DUPLICATE: &str = "duplicate";
pub const REFUSED_WRITTEN_OFF: &str = "written_off";
pub const REFUSED_OVERDRAWN: &str = "overdrawn";
pub const REFUSED_NO_ALLOWANCE: &str = "no_allowance";

/// Whether `id` is a quota account (a transfer debiting it takes the quota path).
pub(super) fn is_quota_account(id: &str) -> bool {
    parse_quota_id(id).is_some()
}

fn debit(pending_add: u64, pending_sub: u64, posted_add: u64) -> Change {
    Change {
        side: Side::Debit,
        pending_add,
        pending_sub,
        posted_add,
    }
}

fn credit(pending_add: u64, pending_sub: u64, posted_add: u64) -> Change {
    Change {
        side: Side::Credit,
        pending_add,
        pending_sub,
        posted_add,
    }
}

impl Engine {
    // ---- home side: operators' commands ---------------------------------------------------

    pub(super) fn quota_command(&mut self, token: Token, command: Command) -> Result<(), Fatal> {
        if let Command::Region { account_id } = &command {
            let view = self.region_view(account_id);
            self.reply(token, Reply::Quota(CommandReply::Region(view)));
            return Ok(());
        }
        let account_id = command.account_id().to_string();
        let Some(account) = self.accounts.get(&account_id) else {
            let error = CommandError::AccountNotFound(account_id);
            self.reply(token, Reply::Quota(CommandReply::Refused(error)));
            return Ok(());
        };
        let ledger = account.spec.ledger.clone();
        if matches!(command, Command::Show { .. }) {
            let list = self.allowances_of(&account_id);
            self.reply(token, Reply::Quota(CommandReply::Allowances(list)));
            return Ok(());
        }
        if self.account_locked(&account_id) {
            let key = lock_key_account(&account_id);
            let input = Input::Quota { token, command };
            self.wait_for_lock(&key, input, None, Role::Local, &account_id);
            return Ok(());
        }
        let result = match command {
            Command::Set {
                account_id,
                region,
                quota_shard,
                amount,
                lease_ms,
            } => self.set_quota(&account_id, &ledger, &region, quota_shard, amount, lease_ms),
            Command::Move {
                account_id,
                from,
                from_shard,
                to,
                amount,
            } => self.move_quota(&account_id, &from, from_shard, to, amount),
            Command::WriteOff { account_id, region } => self.write_off(&account_id, &region),
            Command::Show { .. } | Command::Region { .. } => unreachable!("answered above"),
        };
        let reply = match result {
            Ok(()) => CommandReply::Allowances(self.allowances_of(&account_id)),
            Err(error) => CommandReply::Refused(error),
        };
        self.reply(token, Reply::Quota(reply));
        Ok(())
    }

    fn allowances_of(&self, account_id: &str) -> Vec<Allowance> {
        self.quotas
            .allowances
            .range((account_id.to_string(), String::new())..)
            .take_while(|((a, _), _)| a == account_id)
            .map(|(_, allowance)| allowance.clone())
            .collect()
    }

    fn region_view(&self, account_id: &str) -> Option<RegionView> {
        let record = self.quotas.records.get(account_id)?;
        let available = self
            .accounts
            .get(&quota_id(&record.region, account_id))
            .map_or(0, |q| q.balances.available(0));
        let in_flight = self
            .quotas
            .outbox
            .range((record.home, account_id.to_string(), 0)..)
            .take_while(|((_, a, _), _)| a == account_id)
            .map(|(_, s)| s.transfer.amount)
            .sum();
        Some(RegionView {
            record: record.clone(),
            available,
            in_flight,
        })
    }

    /// A new allowance record, checked against the per-account bound.
    fn new_allowance(
        &self,
        account_id: &str,
        region: &str,
        quota_shard: ShardId,
    ) -> Result<Allowance, CommandError> {
        if self.allowances_of(account_id).len() >= QUOTAS_PER_ACCOUNT_MAX {
            return Err(CommandError::TooMany);
        }
        Ok(Allowance {
            account_id: account_id.to_string(),
            region: region.to_string(),
            quota_shard,
            epoch: 0,
            confirmed: 0,
            granted: 0,
            settled: 0,
            released: 0,
            refused: 0,
            expires_at_ms: 0,
            pending: None,
            last_seq: 0,
            written_off_through: 0,
            close_released: 0,
        })
    }

    /// Whether a change of `region`'s allowance of `account_id` is in progress, or a move
    /// into it waits for its donor.
    fn change_in_progress(&self, account_id: &str, region: &str) -> bool {
        self.allowances_of(account_id)
            .iter()
            .any(|a| match &a.pending {
                Some(Pending::Shrink { to: Some(to), .. }) => {
                    a.region == region || to.region == region
                }
                Some(_) => a.region == region,
                None => false,
            })
    }

    fn set_quota(
        &mut self,
        account_id: &str,
        ledger: &str,
        region: &str,
        quota_shard: ShardId,
        amount: u64,
        lease_ms: u64,
    ) -> Result<(), CommandError> {
        if self.change_in_progress(account_id, region) {
            return Err(CommandError::ChangeInProgress);
        }
        let key = (account_id.to_string(), region.to_string());
        let mut allowance = match self.quotas.allowances.get(&key) {
            Some(a) => a.clone(),
            None => self.new_allowance(account_id, region, quota_shard)?,
        };
        let reserved = allowance.outstanding();
        allowance.epoch += 1;
        allowance.expires_at_ms = self.now_ms.saturating_add(lease_ms);
        if amount >= reserved {
            let add = amount - reserved;
            self.reserve(&mut allowance, ledger, add)?;
            allowance.pending = Some(Pending::Grant { add });
        } else {
            allowance.pending = Some(Pending::Shrink {
                amount: reserved - amount,
                to: None,
            });
        }
        self.put_allowance(allowance);
        self.send_change(&key);
        Ok(())
    }

    fn move_quota(
        &mut self,
        account_id: &str,
        from: &str,
        from_shard: ShardId,
        to: MoveTo,
        amount: u64,
    ) -> Result<(), CommandError> {
        if from == to.region {
            return Err(CommandError::Invalid {
                field: "to_region",
                reason: "is the region the rights move from".into(),
            });
        }
        let key = (account_id.to_string(), from.to_string());
        let Some(mut allowance) = self.quotas.allowances.get(&key).cloned() else {
            return Err(CommandError::NoAllowance(from.to_string()));
        };
        if self.change_in_progress(account_id, from)
            || self.change_in_progress(account_id, &to.region)
        {
            return Err(CommandError::ChangeInProgress);
        }
        let to_key = (account_id.to_string(), to.region.clone());
        if !self.quotas.allowances.contains_key(&to_key) {
            self.new_allowance(account_id, &to.region, to.quota_shard)?;
        }
        debug_assert_eq!(allowance.quota_shard, from_shard);
        allowance.epoch += 1;
        allowance.pending = Some(Pending::Shrink {
            amount,
            to: Some(to),
        });
        self.put_allowance(allowance);
        self.send_change(&key);
        Ok(())
    }

    fn write_off(&mut self, account_id: &str, region: &str) -> Result<(), CommandError> {
        let key = (account_id.to_string(), region.to_string());
        let Some(mut allowance) = self.quotas.allowances.get(&key).cloned() else {
            return Err(CommandError::NoAllowance(region.to_string()));
        };
        let rest = allowance.outstanding();
        let id = change_id("writeoff", region, account_id, allowance.epoch);
        self.release(&allowance, rest, &id);
        allowance.released += rest;
        allowance.written_off_through = allowance.epoch;
        allowance.pending = None;
        self.quotas.sent_ms.remove(&key);
        // Best effort (not resent): a region that hears it stops spending under the epochs
        // written off; what it spent meanwhile is refused when it arrives.
        allowance.epoch += 1;
        self.send(
            allowance.quota_shard,
            Message::Shrink {
                account_id: account_id.to_string(),
                region: region.to_string(),
                epoch: allowance.epoch,
                amount: u64::MAX,
                expires_at_ms: self.now_ms,
            },
        );
        tracing::warn!(
            shard = %self.shard,
            account = account_id,
            region,
            epoch = allowance.epoch,
            released = rest,
            "allowance written off: later settlements of its epochs will be refused"
        );
        self.put_allowance(allowance);
        Ok(())
    }

    /// Grows the hold of `allowance` by `add` (checked like any debit of the account).
    fn reserve(
        &mut self,
        allowance: &mut Allowance,
        ledger: &str,
        add: u64,
    ) -> Result<(), CommandError> {
        let account_id = allowance.account_id.clone();
        let change = debit(add, 0, 0);
        if add == 0 {
            return Ok(());
        }
        self.check_change(&account_id, ledger, &change, None)
            .map_err(|r| CommandError::ExceedsCredits(r.name().to_string()))?;
        let escrow = escrow_id(&allowance.region, &account_id);
        self.ensure_system_account(&escrow, ledger, AccountFlags::default());
        let id = change_id("grant", &allowance.region, &account_id, allowance.epoch);
        self.apply_change(&account_id, &change, &id, EntryKind::Pending, 0);
        self.apply_change(&escrow, &credit(add, 0, 0), &id, EntryKind::Pending, 0);
        allowance.granted += add;
        Ok(())
    }

    /// Shrinks the hold of `allowance` by `amount` (nothing is posted).
    fn release(&mut self, allowance: &Allowance, amount: u64, id: &str) {
        if amount == 0 {
            return;
        }
        let escrow = escrow_id(&allowance.region, &allowance.account_id);
        let kind = EntryKind::VoidPending;
        self.apply_change(&allowance.account_id, &debit(0, amount, 0), id, kind, 0);
        self.apply_change(&escrow, &credit(0, amount, 0), id, kind, 0);
    }

    /// Creates a system account of this shard if it does not exist yet.
    fn ensure_system_account(&mut self, id: &str, ledger: &str, flags: AccountFlags) {
        if self.accounts.get(id).is_some() {
            return;
        }
        let account = Account {
            spec: NewAccount {
                id: id.to_string(),
                ledger: ledger.to_string(),
                flags,
                placement_key: id.to_string(),
                ..NewAccount::default()
            },
            balances: Balances::default(),
            version: 0,
            created_at_ms: self.now_ms,
        };
        self.batch.dirty.insert(id.to_string(), None);
        self.accounts.insert(account);
    }

    fn put_allowance(&mut self, allowance: Allowance) {
        let key = keys::allowance(self.shard, &allowance.account_id, &allowance.region);
        self.batch.writes.put(key, codec::encode(&allowance));
        let map_key = (allowance.account_id.clone(), allowance.region.clone());
        self.quotas.allowances.insert(map_key, allowance);
    }

    /// Sends an allowance's pending change to its region (again).
    fn send_change(&mut self, key: &(String, String)) {
        let Some(allowance) = self.quotas.allowances.get(key) else {
            return;
        };
        let Some(pending) = &allowance.pending else {
            return;
        };
        let ledger = self
            .accounts
            .get(&allowance.account_id)
            .map(|a| a.spec.ledger.clone())
            .unwrap_or_default();
        let message = match pending {
            Pending::Grant { add } => Message::Grant {
                account_id: allowance.account_id.clone(),
                region: allowance.region.clone(),
                ledger,
                epoch: allowance.epoch,
                add: *add,
                expires_at_ms: allowance.expires_at_ms,
            },
            Pending::Shrink { amount, .. } => Message::Shrink {
                account_id: allowance.account_id.clone(),
                region: allowance.region.clone(),
                epoch: allowance.epoch,
                amount: *amount,
                expires_at_ms: allowance.expires_at_ms,
            },
        };
        let to = allowance.quota_shard;
        self.quotas.sent_ms.insert(key.clone(), self.now_ms);
        self.send(to, message);
    }

    // ---- home side: answers from regions -------------------------------------------------

    /// A region answered a Grant or a Shrink of `epoch`.
    fn on_quota_ack(&mut self, account_id: String, region: String, epoch: u64, moved: u64) {
        let key = (account_id.clone(), region.clone());
        let Some(mut allowance) = self.quotas.allowances.get(&key).cloned() else {
            return;
        };
        if epoch != allowance.epoch || allowance.confirmed >= epoch {
            return; // An answer to an older change, or one already taken.
        }
        match allowance.pending.clone() {
            None => {}
            Some(Pending::Grant { .. }) => {
                allowance.confirmed = epoch;
                allowance.pending = None;
                self.quotas.sent_ms.remove(&key);
                self.put_allowance(allowance);
            }
            Some(Pending::Shrink { to, .. }) => {
                if self.account_locked(&account_id) {
                    return; // Resent; taken once the transfer in flight is done.
                }
                let id = change_id("release", &region, &account_id, epoch);
                let moved = moved.min(allowance.outstanding());
                self.release(&allowance, moved, &id);
                allowance.released += moved;
                allowance.confirmed = epoch;
                allowance.pending = None;
                self.quotas.sent_ms.remove(&key);
                self.put_allowance(allowance);
                if let Some(to) = to.filter(|_| moved > 0) {
                    self.grant_moved(&account_id, to, moved);
                }
            }
        }
    }

    /// The second half of a move: the donor gave `amount` up, the receiving region gets it.
    fn grant_moved(&mut self, account_id: &str, to: MoveTo, amount: u64) {
        let key = (account_id.to_string(), to.region.clone());
        let mut allowance = match self.quotas.allowances.get(&key) {
            Some(a) => a.clone(),
            None => match self.new_allowance(account_id, &to.region, to.quota_shard) {
                Ok(a) => a,
                // Checked when the move was asked for; the rights stay released.
                Err(error) => {
                    tracing::error!(shard = %self.shard, account = account_id, region = %to.region, %error, "moved rights could not be granted");
                    return;
                }
            },
        };
        let ledger = self.accounts[account_id].spec.ledger.clone();
        allowance.epoch += 1;
        allowance.expires_at_ms = self.now_ms.saturating_add(to.lease_ms);
        // The same amount was released in this batch: the account can cover it.
        if let Err(error) = self.reserve(&mut allowance, &ledger, amount) {
            tracing::error!(shard = %self.shard, account = account_id, %error, "moved rights could not be reserved");
            return;
        }
        allowance.pending = Some(Pending::Grant { add: amount });
        self.put_allowance(allowance);
        self.send_change(&key);
    }

    /// A region closed `epoch` at its expiry: its closes gave back `returned` in all, of which
    /// the home releases what it has not released yet (never more than it still reserves: a
    /// write-off may have released it already).
    fn on_closed(
        &mut self,
        from: ShardId,
        account_id: String,
        region: String,
        epoch: u64,
        returned: u64,
    ) {
        let key = (account_id.clone(), region.clone());
        if let Some(mut allowance) = self.quotas.allowances.get(&key).cloned()
            && returned > allowance.close_released
        {
            if self.account_locked(&account_id) {
                return; // Reported again; taken once the transfer in flight is done.
            }
            let release = (returned - allowance.close_released).min(allowance.outstanding());
            let id = change_id("close", &region, &account_id, epoch);
            self.release(&allowance, release, &id);
            allowance.released += release;
            allowance.close_released = returned;
            self.put_allowance(allowance);
        }
        self.send(
            from,
            Message::CloseAck {
                account_id,
                returned,
            },
        );
    }

    /// Settlements from a quota shard of `region`, in order.
    fn on_settle(
        &mut self,
        from: ShardId,
        region: String,
        entries: Vec<Settlement>,
    ) -> Result<(), Fatal> {
        // Every record the entries need first, in one fetch: nothing is applied until all are
        // here (a step that waits has changed nothing).
        let mut wanted = false;
        for entry in &entries {
            let key = (entry.transfer.debit_account_id.clone(), region.clone());
            let new = self
                .quotas
                .allowances
                .get(&key)
                .is_some_and(|a| entry.seq > a.last_seq);
            if new && matches!(self.lookup_transfer(&entry.transfer.id)?, Known::Wanted) {
                wanted = true;
            }
        }
        if wanted {
            let input = Input::Peer {
                from,
                message: Message::Settle { region, entries },
            };
            self.stall(super::Task::Input(input));
            return Ok(());
        }
        let mut results = Vec::new();
        let mut stalled = false;
        for entry in &entries {
            let account_id = entry.transfer.debit_account_id.clone();
            let amount = entry.transfer.amount;
            let key = (account_id.clone(), region.clone());
            let Some(allowance) = self.quotas.allowances.get(&key).cloned() else {
                self.refuse_settlement(&entry.transfer, &region, REFUSED_NO_ALLOWANCE);
                results.push(SettleResult {
                    account_id,
                    seq: entry.seq,
                    amount,
                    refused: Some(REFUSED_NO_ALLOWANCE.to_string()),
                });
                continue;
            };
            if entry.seq <= allowance.last_seq {
                results.push(SettleResult {
                    account_id,
                    seq: entry.seq,
                    amount,
                    refused: None,
                });
                continue; // A resend: answered again, nothing applied.
            }
            if entry.seq != allowance.last_seq + 1 {
                tracing::error!(shard = %self.shard, account = %account_id, %region, seq = entry.seq, last = allowance.last_seq, "a settlement out of order: not taken");
                break;
            }
            if self.account_locked(&account_id) {
                break; // Resent once the transfer in flight is done.
            }
            let recorded = match self.lookup_transfer(&entry.transfer.id)? {
                Known::Yes(recorded) => recorded,
                Known::Wanted => {
                    stalled = true;
                    break;
                }
            };
            let in_flight = self.coordinations.contains_key(&entry.transfer.id);
            let refused = if recorded.is_some() || in_flight {
                Some(REFUSED_DUPLICATE)
            } else if entry.epoch <= allowance.written_off_through {
                Some(REFUSED_WRITTEN_OFF)
            } else if allowance.outstanding() < amount {
                Some(REFUSED_OVERDRAWN)
            } else {
                None
            };
            let mut allowance = allowance;
            allowance.last_seq = entry.seq;
            match refused {
                Some(reason) => {
                    allowance.refused += amount;
                    self.refuse_settlement(&entry.transfer, &region, reason);
                }
                None => {
                    self.settle(entry, &allowance);
                    allowance.settled += amount;
                }
            }
            self.put_allowance(allowance);
            results.push(SettleResult {
                account_id,
                seq: entry.seq,
                amount,
                refused: refused.map(str::to_string),
            });
        }
        if !results.is_empty() {
            self.send(from, Message::SettleAck { results });
        }
        if stalled {
            // Run again once the record is fetched; what was applied above is a resend then.
            let input = Input::Peer {
                from,
                message: Message::Settle { region, entries },
            };
            self.stall(super::Task::Input(input));
        }
        Ok(())
    }

    /// Applies one settlement: the account's part of the hold becomes posted, and the transfer
    /// is recorded here with its original fields.
    fn settle(&mut self, entry: &Settlement, allowance: &Allowance) {
        let transfer = &entry.transfer;
        let amount = transfer.amount;
        let span = self.begin_phase("quota.settle", entry.trace, Role::Coordinator, &transfer.id);
        let kind = EntryKind::PostPending;
        let escrow = escrow_id(&allowance.region, &allowance.account_id);
        let debit_version = self.apply_change(
            &allowance.account_id,
            &debit(0, amount, amount),
            &transfer.id,
            kind,
            transfer.code,
        );
        self.apply_change(
            &escrow,
            &credit(0, amount, amount),
            &transfer.id,
            kind,
            transfer.code,
        );
        let record = TransferRecord {
            request: transfer.clone(),
            result: Ok(Committed {
                debit_account_id: transfer.debit_account_id.clone(),
                credit_account_id: transfer.credit_account_id.clone(),
                ledger: transfer.ledger.clone(),
                amount,
                committed_at_ms: entry.spent_at_ms,
                debit_account_version: debit_version,
                credit_account_version: 0,
                cross_shard: true,
            }),
        };
        self.put_transfer(&record);
        self.metrics
            .settlement_lag(self.now_ms.saturating_sub(entry.spent_at_ms));
        self.end_phase(span);
    }

    fn refuse_settlement(&mut self, transfer: &Transfer, region: &str, reason: &'static str) {
        self.metrics.settlement_refused(reason);
        tracing::error!(
            shard = %self.shard,
            transfer = %transfer.id,
            account = %transfer.debit_account_id,
            amount = transfer.amount,
            region,
            reason,
            "a settlement was refused: its amount stays reserved until an operator writes the allowance off"
        );
    }

    /// Resends changes the regions have not answered.
    fn tick_allowances(&mut self) {
        let due: Vec<(String, String)> = self
            .quotas
            .sent_ms
            .iter()
            .filter(|(_, at)| self.now_ms.saturating_sub(**at) >= self.options.retry_ms)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.send_change(&key);
        }
    }

    // ---- quota side ----------------------------------------------------------------------

    fn on_grant(&mut self, from: ShardId, grant: Message) {
        let Message::Grant {
            account_id,
            region,
            ledger,
            epoch,
            add,
            expires_at_ms,
        } = grant
        else {
            unreachable!("a grant");
        };
        let held = self.quotas.records.get(&account_id).map_or(0, |r| r.epoch);
        #[cfg(feature = "sim-bugs")]
        let held = if crate::bugs::on(crate::bugs::Bug::ApplyStaleGrant) {
            held.min(epoch.saturating_sub(1))
        } else {
            held
        };
        if held < epoch {
            let quota = quota_id(&region, &account_id);
            let clearing = clearing_id(&region, &account_id);
            if self.account_locked(&quota) {
                return; // Resent; taken once the spend in flight is done.
            }
            let mut record = self
                .quotas
                .records
                .get(&account_id)
                .cloned()
                .unwrap_or_else(|| QuotaRecord {
                    account_id: account_id.clone(),
                    region: region.clone(),
                    ledger: ledger.clone(),
                    home: from,
                    epoch: 0,
                    expires_at_ms: 0,
                    closed: false,
                    closed_returned: 0,
                    close_acked: 0,
                    granted: 0,
                    returned: 0,
                    spent: 0,
                    settled: 0,
                    refused: 0,
                    next_seq: 1,
                    last_shrink: None,
                });
            let no_overdraft = AccountFlags {
                debits_must_not_exceed_credits: true,
                ..AccountFlags::default()
            };
            self.ensure_system_account(&quota, &ledger, no_overdraft);
            self.ensure_system_account(&clearing, &ledger, AccountFlags::default());
            if add > 0 {
                let id = change_id("grant", &region, &account_id, epoch);
                let kind = EntryKind::Posted;
                self.apply_change(&clearing, &debit(0, 0, add), &id, kind, 0);
                self.apply_change(&quota, &credit(0, 0, add), &id, kind, 0);
            }
            record.granted += add;
            record.epoch = epoch;
            record.home = from;
            record.expires_at_ms = expires_at_ms;
            record.closed = false;
            self.put_quota_record(record);
        }
        self.send(
            from,
            Message::QuotaAck {
                account_id,
                region,
                epoch,
                moved: 0,
            },
        );
    }

    fn on_shrink(&mut self, from: ShardId, shrink: Message) {
        let Message::Shrink {
            account_id,
            region,
            epoch,
            amount,
            expires_at_ms,
        } = shrink
        else {
            unreachable!("a shrink");
        };
        let moved = match self.quotas.records.get(&account_id).cloned() {
            // Never granted here: nothing to give back.
            None => 0,
            Some(record) if record.epoch >= epoch => match record.last_shrink {
                Some((e, moved)) if e == epoch => moved,
                _ => 0,
            },
            Some(mut record) => {
                let quota = quota_id(&region, &account_id);
                let clearing = clearing_id(&region, &account_id);
                if self.account_locked(&quota) {
                    return; // Resent; taken once the spend in flight is done.
                }
                let unspent = self
                    .accounts
                    .get(&quota)
                    .map_or(0, |q| q.balances.available(0));
                let moved = amount.min(unspent);
                if moved > 0 {
                    let id = change_id("shrink", &region, &account_id, epoch);
                    let kind = EntryKind::Posted;
                    self.apply_change(&quota, &debit(0, 0, moved), &id, kind, 0);
                    self.apply_change(&clearing, &credit(0, 0, moved), &id, kind, 0);
                }
                record.returned += moved;
                record.epoch = epoch;
                record.expires_at_ms = expires_at_ms;
                record.last_shrink = Some((epoch, moved));
                self.put_quota_record(record);
                moved
            }
        };
        self.send(
            from,
            Message::QuotaAck {
                account_id,
                region,
                epoch,
                moved,
            },
        );
    }

    fn on_close_ack(&mut self, account_id: String, returned: u64) {
        if let Some(mut record) = self.quotas.records.get(&account_id).cloned()
            && returned > record.close_acked
        {
            record.close_acked = returned;
            self.quotas.close_sent_ms.remove(&account_id);
            self.put_quota_record(record);
        }
    }

    fn on_settle_ack(&mut self, from: ShardId, results: Vec<SettleResult>) {
        self.quotas.settling.remove(&from);
        for result in results {
            let key = (from, result.account_id.clone(), result.seq);
            if self.quotas.outbox.remove(&key).is_none() {
                continue; // Answered before.
            }
            self.batch
                .writes
                .delete(keys::outbox(self.shard, &result.account_id, result.seq));
            let Some(mut record) = self.quotas.records.get(&result.account_id).cloned() else {
                continue;
            };
            match &result.refused {
                None => record.settled += result.amount,
                Some(reason) => {
                    record.refused += result.amount;
                    tracing::error!(shard = %self.shard, account = %result.account_id, seq = result.seq, amount = result.amount, reason, "the home refused a settlement");
                }
            }
            self.put_quota_record(record);
        }
        self.metrics.outbox_depth(self.quotas.outbox.len());
    }

    fn put_quota_record(&mut self, record: QuotaRecord) {
        let key = keys::quota(self.shard, &record.account_id);
        self.batch.writes.put(key, codec::encode(&record));
        self.index_record(&record);
        let old = self
            .quotas
            .records
            .insert(record.account_id.clone(), record);
        if let Some(old) = old {
            self.unindex_record(&old);
        }
    }

    /// Adds a record to the indexes the ticks and the gauges use.
    fn index_record(&mut self, r: &QuotaRecord) {
        let q = &mut self.quotas;
        if let Some(at) = close_at(r) {
            q.closing.insert((at, r.account_id.clone()));
        }
        if r.closed_returned > r.close_acked {
            q.close_sent_ms.entry(r.account_id.clone()).or_insert(0);
        } else {
            q.close_sent_ms.remove(&r.account_id);
        }
        let (limit, spent, unsettled) = contribution(r);
        q.totals.0 += limit;
        q.totals.1 += spent;
        q.totals.2 += unsettled;
        q.region.clone_from(&r.region);
        q.totals_changed = true;
    }

    /// Takes a replaced record out of the indexes (its account's entries are the new one's).
    fn unindex_record(&mut self, old: &QuotaRecord) {
        let q = &mut self.quotas;
        if let Some(at) = close_at(old)
            && q.records.get(&old.account_id).and_then(close_at) != Some(at)
        {
            q.closing.remove(&(at, old.account_id.clone()));
        }
        let (limit, spent, unsettled) = contribution(old);
        q.totals.0 -= limit;
        q.totals.1 -= spent;
        q.totals.2 -= unsettled;
    }

    /// The quota gauges, once per batch that changed a record.
    fn report_quota_totals(&mut self) {
        if std::mem::take(&mut self.quotas.totals_changed) {
            let (limit, spent, unsettled) = self.quotas.totals;
            self.metrics
                .quota_totals(&self.quotas.region, limit, spent, unsettled);
        }
    }

    /// Whether a transfer debiting the quota account `quota` may take the quota path now.
    pub(super) fn quota_open(&self, quota: &str, transfer: &Transfer) -> bool {
        let Some((_, account_id)) = parse_quota_id(quota) else {
            return false;
        };
        let Some(record) = self.quotas.records.get(account_id) else {
            return false;
        };
        transfer.kind == ledger_domain::TransferKind::Posted
            && transfer.expected_debit_version.is_none()
            && record.open_at(self.now_ms)
            && self.quotas.outbox.len() < self.options.quota_outbox_max
    }

    /// A quota-path transfer's debit was applied in this batch: its settlement joins the
    /// outbox in the same commit.
    pub(super) fn quota_spent(&mut self, transfer: &Transfer, trace: Option<TraceParent>) {
        let Some((_, account_id)) = parse_quota_id(&transfer.debit_account_id) else {
            return;
        };
        let Some(mut record) = self.quotas.records.get(account_id).cloned() else {
            unreachable!("a quota account without its record: {account_id}");
        };
        let seq = record.next_seq;
        record.next_seq += 1;
        record.spent += transfer.amount;
        let mut original = transfer.clone();
        original.debit_account_id = record.account_id.clone();
        let settlement = Settlement {
            seq,
            epoch: record.epoch,
            transfer: original,
            spent_at_ms: self.now_ms,
            trace,
        };
        self.batch.writes.put(
            keys::outbox(self.shard, &record.account_id, seq),
            codec::encode(&settlement),
        );
        self.quotas
            .outbox
            .insert((record.home, record.account_id.clone(), seq), settlement);
        self.metrics.quota_spent.increment(1);
        self.metrics.outbox_depth(self.quotas.outbox.len());
        self.put_quota_record(record);
    }

    /// Closes expired records, reports closes until answered, sends settlements.
    fn tick_quota_records(&mut self) {
        let now = self.now_ms;
        let retry = self.options.retry_ms;
        let expired: Vec<String> = self
            .quotas
            .closing
            .range(..(now.saturating_add(1), String::new()))
            .map(|(_, account)| account.clone())
            .collect();
        for account_id in expired {
            let mut record = self.quotas.records[&account_id].clone();
            let quota = quota_id(&record.region, &account_id);
            let clearing = clearing_id(&record.region, &account_id);
            if self.account_locked(&quota) {
                continue; // Next tick, once the spend in flight is done.
            }
            let unspent = self
                .accounts
                .get(&quota)
                .map_or(0, |q| q.balances.available(0));
            if unspent > 0 {
                let id = change_id("close", &record.region, &account_id, record.epoch);
                let kind = EntryKind::Posted;
                self.apply_change(&quota, &debit(0, 0, unspent), &id, kind, 0);
                self.apply_change(&clearing, &credit(0, 0, unspent), &id, kind, 0);
            }
            record.returned += unspent;
            record.closed = true;
            record.closed_returned += unspent;
            self.put_quota_record(record);
        }
        let closes: Vec<Message> = self
            .quotas
            .close_sent_ms
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= retry)
            .map(|(account, _)| &self.quotas.records[account])
            .map(|r| Message::Closed {
                account_id: r.account_id.clone(),
                region: r.region.clone(),
                epoch: r.epoch,
                returned: r.closed_returned,
            })
            .collect();
        for message in closes {
            let Message::Closed { account_id, .. } = &message else {
                unreachable!()
            };
            let home = self.quotas.records[account_id].home;
            self.quotas.close_sent_ms.insert(account_id.clone(), now);
            self.send(home, message);
        }
        self.send_settlements();
    }

    /// One `Settle` per home shard with settlements waiting and none in flight (or one
    /// unanswered for a retry interval): the oldest, in order, up to the batch bound. Touches
    /// only the first settlements of each home (the outbox is ordered by home).
    fn send_settlements(&mut self) {
        let now = self.now_ms;
        let mut next = self.quotas.outbox.keys().next().map(|(home, _, _)| *home);
        while let Some(home) = next {
            let after = home.0.checked_add(1).map(ShardId);
            next = after.and_then(|after| {
                self.quotas
                    .outbox
                    .range((after, String::new(), 0)..)
                    .next()
                    .map(|((h, _, _), _)| *h)
            });
            let busy = self
                .quotas
                .settling
                .get(&home)
                .is_some_and(|at| now.saturating_sub(*at) < self.options.retry_ms);
            if busy {
                continue;
            }
            let entries: Vec<Settlement> = self
                .quotas
                .outbox
                .range((home, String::new(), 0)..)
                .take_while(|((h, _, _), _)| *h == home)
                .take(self.options.settle_batch_max)
                .map(|(_, s)| s.clone())
                .collect();
            let region = self.quotas.region.clone();
            self.quotas.settling.insert(home, now);
            self.send(home, Message::Settle { region, entries });
        }
    }

    // ---- dispatch ------------------------------------------------------------------------

    /// A quota message from another shard; `None` if `message` is not one.
    pub(super) fn on_quota_message(
        &mut self,
        from: ShardId,
        message: Message,
    ) -> Result<Option<Message>, Fatal> {
        match message {
            m @ Message::Grant { .. } => self.on_grant(from, m),
            m @ Message::Shrink { .. } => self.on_shrink(from, m),
            Message::QuotaAck {
                account_id,
                region,
                epoch,
                moved,
            } => self.on_quota_ack(account_id, region, epoch, moved),
            Message::Closed {
                account_id,
                region,
                epoch,
                returned,
            } => self.on_closed(from, account_id, region, epoch, returned),
            Message::CloseAck {
                account_id,
                returned,
            } => self.on_close_ack(account_id, returned),
            Message::Settle { region, entries } => self.on_settle(from, region, entries)?,
            Message::SettleAck { results } => self.on_settle_ack(from, results),
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    pub(super) fn tick_quotas(&mut self) {
        self.tick_allowances();
        self.tick_quota_records();
        self.report_quota_totals();
    }

    /// Loads the quota state of a new term.
    pub(super) fn recover_quotas(
        &mut self,
        allowances: Vec<Allowance>,
        records: Vec<QuotaRecord>,
        outbox: Vec<Settlement>,
    ) {
        for a in allowances {
            let key = (a.account_id.clone(), a.region.clone());
            if a.pending.is_some() {
                self.quotas.sent_ms.insert(key.clone(), 0); // resent at the first tick
            }
            self.quotas.allowances.insert(key, a);
        }
        for r in records {
            self.index_record(&r);
            self.quotas.records.insert(r.account_id.clone(), r);
        }
        for s in outbox {
            let home = self.quotas.records[&s.transfer.debit_account_id].home;
            self.quotas
                .outbox
                .insert((home, s.transfer.debit_account_id.clone(), s.seq), s);
        }
    }
}
