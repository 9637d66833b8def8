//! Business rejections: outcomes, not errors. Each has a stable number (the wire enum's) that is
//! never reused; a retired reason stays as a tombstone.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Rejection {
    DebitAccountNotFound = 1,
    CreditAccountNotFound = 2,
    /// An account's ledger differs from the transfer's.
    LedgerMismatch = 3,
    /// A no-overdraft debit account would have debits above its credits (plus credit limit).
    ExceedsCredits = 4,
    /// A `credits_must_not_exceed_debits` credit account would have credits above its debits.
    ExceedsDebits = 5,
    DebitVersionMismatch = 6,
    CreditVersionMismatch = 7,
    /// The id exists with other fields (idempotency key reuse).
    ExistsWithDifferentFields = 8,
    /// A balance would overflow u64 (or a hold's pending amount would go below zero).
    Overflow = 9,
    PendingTransferNotFound = 10,
    /// `pending_id` names a transfer that is not a hold.
    PendingTransferNotPending = 11,
    PendingTransferAlreadyPosted = 12,
    PendingTransferAlreadyVoided = 13,
    PendingTransferExpired = 14,
    /// Posting more than the hold, or voiding a different amount.
    ExceedsPendingAmount = 15,
    /// The accounts or ledger given with a post/void differ from the hold's.
    PendingTransferMismatch = 16,
    /// Retriable: an account stayed locked by an in-flight cross-shard transfer too long.
    LockTimeout = 17,
    /// Retriable: the account's lock queue is full.
    AccountBusy = 18,
    /// Reserved for regional quotas.
    QuotaExhausted = 19,
}

impl Rejection {
    /// The stable wire number.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Whether the rejection follows from an account's balances or version, which a
    /// cross-shard transfer holding the account's lock may be about to change.
    pub fn depends_on_balances(self) -> bool {
        matches!(
            self,
            Rejection::ExceedsCredits
                | Rejection::ExceedsDebits
                | Rejection::Overflow
                | Rejection::DebitVersionMismatch
                | Rejection::CreditVersionMismatch
        )
    }

    /// Retriable rejections record nothing: the same transfer id may succeed later. Every other
    /// rejection is final and recorded, so a replay returns it again.
    pub fn is_retriable(self) -> bool {
        matches!(self, Rejection::LockTimeout | Rejection::AccountBusy)
    }

    pub fn name(self) -> &'static str {
        match self {
            Rejection::DebitAccountNotFound => "debit_account_not_found",
            Rejection::CreditAccountNotFound => "credit_account_not_found",
            Rejection::LedgerMismatch => "ledger_mismatch",
            Rejection::ExceedsCredits => "exceeds_credits",
            Rejection::ExceedsDebits => "exceeds_debits",
            Rejection::DebitVersionMismatch => "debit_version_mismatch",
            Rejection::CreditVersionMismatch => "credit_version_mismatch",
            Rejection::ExistsWithDifferentFields => "exists_with_different_fields",
            Rejection::Overflow => "overflow",
            Rejection::PendingTransferNotFound => "pending_transfer_not_found",
            Rejection::PendingTransferNotPending => "pending_transfer_not_pending",
            Rejection::PendingTransferAlreadyPosted => "pending_transfer_already_posted",
            Rejection::PendingTransferAlreadyVoided => "pending_transfer_already_voided",
            Rejection::PendingTransferExpired => "pending_transfer_expired",
            Rejection::ExceedsPendingAmount => "exceeds_pending_amount",
            Rejection::PendingTransferMismatch => "pending_transfer_mismatch",
            Rejection::LockTimeout => "lock_timeout",
            Rejection::AccountBusy => "account_busy",
            Rejection::QuotaExhausted => "quota_exhausted",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rejection::DebitAccountNotFound => "the debit account does not exist",
            Rejection::CreditAccountNotFound => "the credit account does not exist",
            Rejection::LedgerMismatch => "an account's ledger differs from the transfer's ledger",
            Rejection::ExceedsCredits => {
                "the debit account does not allow overdraft and lacks available funds"
            }
            Rejection::ExceedsDebits => "the credit account's credits would exceed its debits",
            Rejection::DebitVersionMismatch => {
                "the debit account is no longer at expected_debit_version"
            }
            Rejection::CreditVersionMismatch => {
                "the credit account is no longer at expected_credit_version"
            }
            Rejection::ExistsWithDifferentFields => {
                "a transfer or account with this id exists with different fields"
            }
            Rejection::Overflow => "a balance would overflow",
            Rejection::PendingTransferNotFound => "pending_id names no transfer",
            Rejection::PendingTransferNotPending => "pending_id names a transfer that is no hold",
            Rejection::PendingTransferAlreadyPosted => "the hold was already posted",
            Rejection::PendingTransferAlreadyVoided => "the hold was already voided",
            Rejection::PendingTransferExpired => "the hold expired",
            Rejection::ExceedsPendingAmount => "the amount exceeds (or differs from) the hold",
            Rejection::PendingTransferMismatch => {
                "accounts or ledger differ from the hold's; leave them empty to inherit"
            }
            Rejection::LockTimeout => {
                "an account stayed locked by a cross-shard transfer too long; retry the same id"
            }
            Rejection::AccountBusy => {
                "too many operations wait for this account; retry the same id"
            }
            Rejection::QuotaExhausted => "the regional quota does not cover this debit",
        }
    }

    pub const ALL: [Rejection; 19] = [
        Rejection::DebitAccountNotFound,
        Rejection::CreditAccountNotFound,
        Rejection::LedgerMismatch,
        Rejection::ExceedsCredits,
        Rejection::ExceedsDebits,
        Rejection::DebitVersionMismatch,
        Rejection::CreditVersionMismatch,
        Rejection::ExistsWithDifferentFields,
        Rejection::Overflow,
        Rejection::PendingTransferNotFound,
        Rejection::PendingTransferNotPending,
        Rejection::PendingTransferAlreadyPosted,
        Rejection::PendingTransferAlreadyVoided,
        Rejection::PendingTransferExpired,
        Rejection::ExceedsPendingAmount,
        Rejection::PendingTransferMismatch,
        Rejection::LockTimeout,
        Rejection::AccountBusy,
        Rejection::QuotaExhausted,
    ];

    pub fn from_code(code: u32) -> Option<Rejection> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_unique() {
        // Numbers are part of the wire contract: a change here breaks every client.
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(r.code() as usize, i + 1, "{r}");
            assert_eq!(Rejection::from_code(r.code()), Some(*r));
        }
        assert_eq!(Rejection::from_code(0), None);
    }
}
