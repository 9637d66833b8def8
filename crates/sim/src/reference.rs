//! The reference ledger: a plain, sequential, in-memory model of the ledger's semantics, with no
//! shards, locks, batches or protocol. Tests apply the same operations to the real thing and
//! compare outcomes and balances with this model (TigerBeetle's auditor, redb's fuzz reference).
//!
//! It reuses the domain's balance arithmetic and hold resolution (tested on their own), so what
//! it checks is everything around them: idempotency, routing, two-phase commit, recovery.

use std::collections::BTreeMap;

use ledger_domain::{
    Account, Balances, HoldState, HoldStatus, NewAccount, Rejection, Transfer, TransferKind,
};

#[derive(Clone, Debug, Default)]
pub struct Reference {
    pub accounts: BTreeMap<String, Account>,
    transfers: BTreeMap<String, (Transfer, Result<u64, Rejection>)>,
    holds: BTreeMap<String, HoldStatus>,
    pub now_ms: u64,
    /// Regional quotas: what each account's home reserves for regions and they have not
    /// spent, counted in the account's pending debits (learned from the cluster: grants and
    /// releases are operators' and regions' doing, [`Reference::reserve`]).
    pub reserved: BTreeMap<String, u64>,
}

impl Reference {
    pub fn create_account(&mut self, spec: NewAccount) {
        self.accounts.entry(spec.id.clone()).or_insert(Account {
            spec,
            balances: Balances::default(),
            version: 0,
            created_at_ms: 0,
        });
    }

    /// Applies a transfer; returns the amount moved or the rejection, as the ledger must.
    pub fn transfer(&mut self, t: &Transfer) -> Result<u64, Rejection> {
        if let Some((request, result)) = self.transfers.get(&t.id) {
            return if request == t {
                *result
            } else {
                Err(Rejection::ExistsWithDifferentFields)
            };
        }
        let result = self.apply(t);
        // A post/void of a hold that does not exist is answered without recording the id (the
        // hold may yet be created); every other outcome is final.
        let unrecorded = matches!(
            result,
            Err(Rejection::PendingTransferNotFound | Rejection::PendingTransferNotPending)
        );
        if !unrecorded {
            self.transfers.insert(t.id.clone(), (t.clone(), result));
        }
        result
    }

    fn apply(&mut self, t: &Transfer) -> Result<u64, Rejection> {
        let (debit_id, credit_id, ledger, amount, debit, credit) = match t.kind {
            TransferKind::Posted | TransferKind::Pending => {
                let (d, c) = t.new_changes();
                (
                    t.debit_account_id.clone(),
                    t.credit_account_id.clone(),
                    t.ledger.clone(),
                    t.amount,
                    d,
                    c,
                )
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                let Some(hold) = self.holds.get(&t.pending_id) else {
                    return Err(if self.transfers.contains_key(&t.pending_id) {
                        Rejection::PendingTransferNotPending
                    } else {
                        Rejection::PendingTransferNotFound
                    });
                };
                let (amount, d, c) = hold.resolve(t, self.now_ms)?;
                (
                    hold.debit_account_id.clone(),
                    hold.credit_account_id.clone(),
                    hold.ledger.clone(),
                    amount,
                    d,
                    c,
                )
            }
        };
        let check = |accounts: &BTreeMap<String, Account>,
                     id: &str,
                     change,
                     expected: Option<u64>,
                     nf,
                     vm| {
            let a: &Account = accounts.get(id).ok_or(nf)?;
            if a.spec.ledger != ledger {
                return Err(Rejection::LedgerMismatch);
            }
            if expected.is_some_and(|v| v != a.version) {
                return Err(vm);
            }
            a.balances.apply(&change, a.spec.flags, a.spec.credit_limit)
        };
        let debit_after = check(
            &self.accounts,
            &debit_id,
            debit,
            t.expected_debit_version,
            Rejection::DebitAccountNotFound,
            Rejection::DebitVersionMismatch,
        )?;
        let credit_after = check(
            &self.accounts,
            &credit_id,
            credit,
            t.expected_credit_version,
            Rejection::CreditAccountNotFound,
            Rejection::CreditVersionMismatch,
        )?;
        for (id, after) in [(&debit_id, debit_after), (&credit_id, credit_after)] {
            let a = self.accounts.get_mut(id).expect("checked");
            a.balances = after;
            a.version += 1;
        }
        match t.kind {
            TransferKind::Pending => {
                let expires_at_ms = (t.timeout_seconds > 0)
                    .then(|| self.now_ms + u64::from(t.timeout_seconds) * 1_000);
                self.holds.insert(
                    t.id.clone(),
                    HoldStatus {
                        state: HoldState::Pending,
                        debit_account_id: debit_id,
                        credit_account_id: credit_id,
                        ledger,
                        amount,
                        posted_amount: 0,
                        expires_at_ms,
                    },
                );
            }
            TransferKind::PostPending => {
                let h = self.holds.get_mut(&t.pending_id).expect("resolved");
                h.state = HoldState::Posted;
                h.posted_amount = amount;
            }
            TransferKind::VoidPending => {
                self.holds.get_mut(&t.pending_id).expect("resolved").state = HoldState::Voided;
            }
            TransferKind::Posted => {}
        }
        Ok(amount)
    }

    /// Sets what `account`'s home reserves for regions (unspent), as the cluster says: the
    /// account's pending debits move by the difference.
    pub fn reserve(&mut self, account: &str, reserved: u64) {
        let before = self.reserved.get(account).copied().unwrap_or(0);
        if before == reserved {
            return;
        }
        let a = self
            .accounts
            .get_mut(account)
            .expect("reserved for an account");
        a.balances.debits_pending = a.balances.debits_pending - before + reserved;
        self.reserved.insert(account.to_string(), reserved);
    }

    /// A posted transfer a region committed by the quota path: its debit comes out of the
    /// account's reservation (no check of the debit account: its home reserved it), its credit
    /// is checked as any. Recorded: a retry in that region gets the same answer.
    pub fn transfer_reserved(&mut self, t: &Transfer) -> Result<u64, Rejection> {
        if let Some((request, result)) = self.transfers.get(&t.id) {
            return if request == t {
                *result
            } else {
                Err(Rejection::ExistsWithDifferentFields)
            };
        }
        let result = self.apply_reserved(t);
        self.transfers.insert(t.id.clone(), (t.clone(), result));
        result
    }

    fn apply_reserved(&mut self, t: &Transfer) -> Result<u64, Rejection> {
        let (_, credit) = t.new_changes();
        let c = self
            .accounts
            .get(&t.credit_account_id)
            .ok_or(Rejection::CreditAccountNotFound)?;
        if c.spec.ledger != t.ledger {
            return Err(Rejection::LedgerMismatch);
        }
        if t.expected_credit_version.is_some_and(|v| v != c.version) {
            return Err(Rejection::CreditVersionMismatch);
        }
        let credit_after = c
            .balances
            .apply(&credit, c.spec.flags, c.spec.credit_limit)?;
        let reserved = self.reserved.entry(t.debit_account_id.clone()).or_default();
        *reserved = reserved
            .checked_sub(t.amount)
            .expect("a region spent more than its account's home reserved (I7)");
        let a = self
            .accounts
            .get_mut(&t.debit_account_id)
            .expect("debit account");
        a.balances.debits_pending -= t.amount;
        a.balances.debits_posted += t.amount;
        a.version += 1;
        let c = self
            .accounts
            .get_mut(&t.credit_account_id)
            .expect("checked");
        c.balances = credit_after;
        c.version += 1;
        Ok(t.amount)
    }

    /// Moves time forward and expires every hold that is due.
    pub fn advance(&mut self, ms: u64) {
        self.pass(ms);
        for id in self.overdue() {
            self.expire(&id);
        }
    }

    /// Moves time forward and leaves holds that fall due pending: for a cluster whose
    /// expiries commit some time after they fall due, told each one by [`Reference::expire`].
    pub fn pass(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// Holds past their expiry and still pending.
    pub fn overdue(&self) -> Vec<String> {
        self.holds
            .iter()
            .filter(|(_, h)| {
                h.state == HoldState::Pending && h.expires_at_ms.is_some_and(|at| at <= self.now_ms)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn hold(&self, pending_id: &str) -> Option<&HoldStatus> {
        self.holds.get(pending_id)
    }

    pub fn holds(&self) -> impl Iterator<Item = (&String, &HoldStatus)> {
        self.holds.iter()
    }

    /// Expires a pending hold that is due (and nothing else).
    pub fn expire(&mut self, pending_id: &str) {
        let now = self.now_ms;
        let Some(hold) = self.holds.get_mut(pending_id) else {
            return;
        };
        if hold.state != HoldState::Pending || hold.expires_at_ms.is_none_or(|at| at > now) {
            return;
        }
        let (d, c) = hold.expiry_changes();
        for (id, change) in [(&hold.debit_account_id, d), (&hold.credit_account_id, c)] {
            let a = self.accounts.get_mut(id).expect("hold accounts exist");
            a.balances = a
                .balances
                .apply(&change, a.spec.flags, a.spec.credit_limit)
                .expect("release");
            a.version += 1;
        }
        hold.state = HoldState::Expired;
    }
}
