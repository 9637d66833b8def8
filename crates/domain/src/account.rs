//! Accounts and their balances, and the one function that changes a balance: [`Balances::apply`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{InvalidInput, validate_id, validate_ledger, validate_metadata};
use crate::{Amount, Rejection, Side};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountFlags {
    /// No overdraft: debits (pending + posted) <= credits posted + credit limit.
    pub debits_must_not_exceed_credits: bool,
    /// Credits (pending + posted) <= debits posted.
    pub credits_must_not_exceed_debits: bool,
}

/// What a client asks for when it creates an account. Creating the same id again with an equal
/// `NewAccount` is idempotent; with a different one it is rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAccount {
    pub id: String,
    pub ledger: String,
    pub flags: AccountFlags,
    /// Accounts sharing a placement key share a shard. Never empty once validated.
    pub placement_key: String,
    pub metadata: BTreeMap<String, String>,
    pub credit_limit: Amount,
}

impl NewAccount {
    /// Validates and normalises (an empty placement key becomes the id).
    pub fn normalize(mut self) -> Result<Self, InvalidInput> {
        validate_id("id", &self.id)?;
        validate_ledger("ledger", &self.ledger)?;
        if self.placement_key.is_empty() {
            self.placement_key.clone_from(&self.id);
        }
        validate_id("placement_key", &self.placement_key)?;
        validate_metadata("metadata", &self.metadata)?;
        if self.flags.debits_must_not_exceed_credits && self.flags.credits_must_not_exceed_debits {
            return Err(InvalidInput::new(
                "flags",
                "debits_must_not_exceed_credits and credits_must_not_exceed_debits are mutually \
                 exclusive",
            ));
        }
        if self.credit_limit > 0 && !self.flags.debits_must_not_exceed_credits {
            return Err(InvalidInput::new(
                "credit_limit",
                "only applies with flags.debits_must_not_exceed_credits",
            ));
        }
        Ok(self)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    pub debits_pending: Amount,
    pub debits_posted: Amount,
    pub credits_pending: Amount,
    pub credits_posted: Amount,
}

/// One account's change from one transfer (a "leg"): how its pending and posted amounts on one
/// side move. A posted transfer is `posted_add`; a hold is `pending_add`; posting a hold is
/// `pending_sub` + `posted_add`; voiding or expiring it is `pending_sub`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub side: Side,
    pub pending_add: Amount,
    pub pending_sub: Amount,
    pub posted_add: Amount,
}

impl Balances {
    /// Applies one change with checked arithmetic and checks the account's flags, counting
    /// pending debits (I2). Returns the balances after, or the rejection; `self` is untouched.
    pub fn apply(
        &self,
        change: &Change,
        flags: AccountFlags,
        credit_limit: Amount,
    ) -> Result<Balances, Rejection> {
        let mut after = *self;
        let (pending, posted) = match change.side {
            Side::Debit => (&mut after.debits_pending, &mut after.debits_posted),
            Side::Credit => (&mut after.credits_pending, &mut after.credits_posted),
        };
        *pending = pending
            .checked_add(change.pending_add)
            .and_then(|p| p.checked_sub(change.pending_sub))
            .ok_or(Rejection::Overflow)?;
        *posted = posted
            .checked_add(change.posted_add)
            .ok_or(Rejection::Overflow)?;
        // Totals are computed in u128: pending + posted may exceed u64 even when each fits.
        if flags.debits_must_not_exceed_credits {
            let debits = u128::from(after.debits_pending) + u128::from(after.debits_posted);
            let limit = u128::from(after.credits_posted) + u128::from(credit_limit);
            if debits > limit {
                return Err(Rejection::ExceedsCredits);
            }
        }
        if flags.credits_must_not_exceed_debits {
            let credits = u128::from(after.credits_pending) + u128::from(after.credits_posted);
            if credits > u128::from(after.debits_posted) {
                return Err(Rejection::ExceedsDebits);
            }
        }
        Ok(after)
    }

    /// credits_posted + limit - debits_posted - debits_pending, floored at 0.
    pub fn available(&self, credit_limit: Amount) -> Amount {
        let have = u128::from(self.credits_posted) + u128::from(credit_limit);
        let owe = u128::from(self.debits_posted) + u128::from(self.debits_pending);
        u64::try_from(have.saturating_sub(owe)).unwrap_or(u64::MAX)
    }
}

/// A stored account: the creation request, the balances, and the version (+1 per change).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub spec: NewAccount,
    pub balances: Balances,
    /// 0 at creation; +1 on every change; entry `n` of the account carries version `n`.
    pub version: u64,
    pub created_at_ms: u64,
}

impl Account {
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Checks the flags hold for the current balances (I2); used by invariant checkers.
    pub fn satisfies_flags(&self) -> bool {
        let b = &self.balances;
        let flags = self.spec.flags;
        let ok_debits = !flags.debits_must_not_exceed_credits
            || u128::from(b.debits_pending) + u128::from(b.debits_posted)
                <= u128::from(b.credits_posted) + u128::from(self.spec.credit_limit);
        let ok_credits = !flags.credits_must_not_exceed_debits
            || u128::from(b.credits_pending) + u128::from(b.credits_posted)
                <= u128::from(b.debits_posted);
        ok_debits && ok_credits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_overdraft() -> AccountFlags {
        AccountFlags {
            debits_must_not_exceed_credits: true,
            ..AccountFlags::default()
        }
    }

    #[test]
    fn overdraft_counts_pending_debits() {
        let b = Balances {
            credits_posted: 100,
            debits_pending: 60,
            ..Balances::default()
        };
        let debit = |n| Change {
            side: Side::Debit,
            pending_add: 0,
            pending_sub: 0,
            posted_add: n,
        };
        assert_eq!(
            b.apply(&debit(41), no_overdraft(), 0),
            Err(Rejection::ExceedsCredits)
        );
        assert_eq!(
            b.apply(&debit(40), no_overdraft(), 0)
                .unwrap()
                .debits_posted,
            40
        );
        assert_eq!(
            b.apply(&debit(41), no_overdraft(), 1)
                .unwrap()
                .debits_posted,
            41
        );
        assert_eq!(
            b.apply(&debit(41), AccountFlags::default(), 0)
                .unwrap()
                .debits_posted,
            41
        );
    }

    #[test]
    fn overflow_is_a_rejection() {
        let b = Balances {
            credits_posted: u64::MAX,
            ..Balances::default()
        };
        let credit = Change {
            side: Side::Credit,
            pending_add: 0,
            pending_sub: 0,
            posted_add: 1,
        };
        assert_eq!(
            b.apply(&credit, AccountFlags::default(), 0),
            Err(Rejection::Overflow)
        );
        let release = Change {
            side: Side::Credit,
            pending_add: 0,
            pending_sub: 1,
            posted_add: 0,
        };
        assert_eq!(
            b.apply(&release, AccountFlags::default(), 0),
            Err(Rejection::Overflow)
        );
    }

    #[test]
    fn credits_must_not_exceed_debits() {
        let flags = AccountFlags {
            credits_must_not_exceed_debits: true,
            ..Default::default()
        };
        let b = Balances {
            debits_posted: 10,
            ..Balances::default()
        };
        let credit = |n| Change {
            side: Side::Credit,
            pending_add: n,
            pending_sub: 0,
            posted_add: 0,
        };
        assert!(b.apply(&credit(10), flags, 0).is_ok());
        assert_eq!(
            b.apply(&credit(11), flags, 0),
            Err(Rejection::ExceedsDebits)
        );
    }

    #[test]
    fn normalize() {
        let a = NewAccount {
            id: "a".into(),
            ledger: "USD".into(),
            ..Default::default()
        };
        assert_eq!(a.clone().normalize().unwrap().placement_key, "a");
        let bad = NewAccount {
            credit_limit: 5,
            ..a.clone()
        };
        assert_eq!(bad.normalize().unwrap_err().field, "credit_limit");
        let both = NewAccount {
            flags: AccountFlags {
                debits_must_not_exceed_credits: true,
                credits_must_not_exceed_debits: true,
            },
            ..a
        };
        assert_eq!(both.normalize().unwrap_err().field, "flags");
    }
}
