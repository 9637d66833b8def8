//! Transfers, holds and entries.
//!
//! A transfer moves `amount` from the debit account to the credit account within one ledger.
//! Holds ("pending transfers", the business-level two-phase transfer) reserve an amount first
//! and are later posted (fully or partly), voided, or expire. "Prepare" and "lock" are reserved
//! for the cross-shard commit protocol, which is a different thing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::account::Change;
use crate::validate::{InvalidInput, validate_id, validate_ledger, validate_metadata};
use crate::{Amount, Balances, Rejection};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Debit,
    Credit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferKind {
    /// Moves the amount at once.
    #[default]
    Posted,
    /// Places a hold.
    Pending,
    /// Posts (part of) the hold `pending_id`.
    PostPending,
    /// Releases the hold `pending_id`.
    VoidPending,
}

/// A transfer as the client asked for it. Stored verbatim: an identical replay of the same id
/// compares equal to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub id: String,
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub amount: Amount,
    pub ledger: String,
    pub code: u32,
    pub kind: TransferKind,
    pub pending_id: String,
    pub timeout_seconds: u32,
    pub expected_debit_version: Option<u64>,
    pub expected_credit_version: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    /// Not part of the request's identity (see [`Transfer::same_request`]): the W3C trace id
    /// (32 lowercase hex digits) of the call that created it, or empty. Set by the server from
    /// the call's trace context, never from the message.
    pub trace_id: String,
}

impl Transfer {
    /// Idempotency: are these the same request? Every field the client chose counts; the trace
    /// id does not (a retry comes under a new trace).
    pub fn same_request(&self, other: &Transfer) -> bool {
        self.differing_fields(other).is_empty()
    }

    /// The fields (by their wire names) in which `other` differs from this request, for an
    /// `exists_with_different_fields` refusal to name them. Empty: the same request.
    pub fn differing_fields(&self, other: &Transfer) -> Vec<&'static str> {
        let Transfer {
            id,
            debit_account_id,
            credit_account_id,
            amount,
            ledger,
            code,
            kind,
            pending_id,
            timeout_seconds,
            expected_debit_version,
            expected_credit_version,
            metadata,
            trace_id: _,
        } = self;
        [
            ("id", *id == other.id),
            (
                "debit_account_id",
                *debit_account_id == other.debit_account_id,
            ),
            (
                "credit_account_id",
                *credit_account_id == other.credit_account_id,
            ),
            ("amount", *amount == other.amount),
            ("ledger", *ledger == other.ledger),
            ("code", *code == other.code),
            ("flags", *kind == other.kind),
            ("pending_id", *pending_id == other.pending_id),
            ("timeout_seconds", *timeout_seconds == other.timeout_seconds),
            (
                "expected_debit_version",
                *expected_debit_version == other.expected_debit_version,
            ),
            (
                "expected_credit_version",
                *expected_credit_version == other.expected_credit_version,
            ),
            ("metadata", *metadata == other.metadata),
        ]
        .into_iter()
        .filter_map(|(field, same)| (!same).then_some(field))
        .collect()
    }

    /// Checks everything that can be checked without looking at state. A failure becomes
    /// `INVALID_ARGUMENT` and nothing is applied.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_id("id", &self.id)?;
        validate_metadata("metadata", &self.metadata)?;
        match self.kind {
            TransferKind::Posted | TransferKind::Pending => {
                validate_id("debit_account_id", &self.debit_account_id)?;
                validate_id("credit_account_id", &self.credit_account_id)?;
                validate_ledger("ledger", &self.ledger)?;
                if self.amount == 0 {
                    return Err(InvalidInput::new("amount", "must be greater than 0"));
                }
                if !self.pending_id.is_empty() {
                    return Err(InvalidInput::new(
                        "pending_id",
                        "only applies with flags.post_pending or flags.void_pending",
                    ));
                }
                if self.kind == TransferKind::Posted && self.timeout_seconds != 0 {
                    return Err(InvalidInput::new(
                        "timeout_seconds",
                        "only applies with flags.pending",
                    ));
                }
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                validate_id("pending_id", &self.pending_id)?;
                if self.pending_id == self.id {
                    return Err(InvalidInput::new("pending_id", "must differ from id"));
                }
                if !self.debit_account_id.is_empty() {
                    validate_id("debit_account_id", &self.debit_account_id)?;
                }
                if !self.credit_account_id.is_empty() {
                    validate_id("credit_account_id", &self.credit_account_id)?;
                }
                if !self.ledger.is_empty() {
                    validate_ledger("ledger", &self.ledger)?;
                }
                if self.timeout_seconds != 0 {
                    return Err(InvalidInput::new(
                        "timeout_seconds",
                        "only applies with flags.pending",
                    ));
                }
            }
        }
        if !self.debit_account_id.is_empty() && self.debit_account_id == self.credit_account_id {
            return Err(InvalidInput::new(
                "credit_account_id",
                "must differ from debit_account_id",
            ));
        }
        Ok(())
    }

    /// The legs for a transfer that does not involve a hold (`Posted` or `Pending`).
    pub fn new_changes(&self) -> (Change, Change) {
        let (pending_add, posted_add) = match self.kind {
            TransferKind::Pending => (self.amount, 0),
            _ => (0, self.amount),
        };
        let change = |side| Change {
            side,
            pending_add,
            pending_sub: 0,
            posted_add,
        };
        (change(Side::Debit), change(Side::Credit))
    }
}

/// What became of a hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    Pending,
    Posted,
    Voided,
    Expired,
}

/// The mutable side of a hold, stored beside its (immutable) transfer record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldStatus {
    pub state: HoldState,
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub ledger: String,
    pub amount: Amount,
    pub posted_amount: Amount,
    /// When the hold expires (Unix ms), if it has a timeout.
    pub expires_at_ms: Option<u64>,
}

impl HoldStatus {
    /// Validates a post or void of this hold and returns the effective amount and the two legs.
    pub fn resolve(
        &self,
        request: &Transfer,
        now_ms: u64,
    ) -> Result<(Amount, Change, Change), Rejection> {
        match self.state {
            HoldState::Pending => {}
            HoldState::Posted => return Err(Rejection::PendingTransferAlreadyPosted),
            HoldState::Voided => return Err(Rejection::PendingTransferAlreadyVoided),
            HoldState::Expired => return Err(Rejection::PendingTransferExpired),
        }
        if self.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(Rejection::PendingTransferExpired);
        }
        let mismatch = |given: &str, held: &str| !given.is_empty() && given != held;
        if mismatch(&request.debit_account_id, &self.debit_account_id)
            || mismatch(&request.credit_account_id, &self.credit_account_id)
            || mismatch(&request.ledger, &self.ledger)
        {
            return Err(Rejection::PendingTransferMismatch);
        }
        let (amount, posted_add) = match request.kind {
            TransferKind::PostPending => {
                let amount = if request.amount == 0 {
                    self.amount
                } else {
                    request.amount
                };
                if amount > self.amount {
                    return Err(Rejection::ExceedsPendingAmount);
                }
                (amount, amount)
            }
            TransferKind::VoidPending => {
                if request.amount != 0 && request.amount != self.amount {
                    return Err(Rejection::ExceedsPendingAmount);
                }
                (self.amount, 0)
            }
            other => unreachable!("resolve called for {other:?}"),
        };
        // The whole hold is released; a partial post returns the rest to the accounts.
        let change = |side| Change {
            side,
            pending_add: 0,
            pending_sub: self.amount,
            posted_add,
        };
        Ok((amount, change(Side::Debit), change(Side::Credit)))
    }

    /// The legs that release an expired hold.
    pub fn expiry_changes(&self) -> (Change, Change) {
        let change = |side| Change {
            side,
            pending_add: 0,
            pending_sub: self.amount,
            posted_add: 0,
        };
        (change(Side::Debit), change(Side::Credit))
    }
}

/// The stored, immutable record of a transfer id's final outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    /// The request exactly as received (idempotency compares against it).
    pub request: Transfer,
    pub result: Result<Committed, Rejection>,
}

/// What a committed transfer did, with the fields a post/void inherited from its hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub debit_account_id: String,
    pub credit_account_id: String,
    pub ledger: String,
    pub amount: Amount,
    pub committed_at_ms: u64,
    pub debit_account_version: u64,
    pub credit_account_version: u64,
    pub cross_shard: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    Posted,
    Pending,
    PostPending,
    VoidPending,
    ExpirePending,
}

impl EntryKind {
    pub fn of(kind: TransferKind) -> Self {
        match kind {
            TransferKind::Posted => EntryKind::Posted,
            TransferKind::Pending => EntryKind::Pending,
            TransferKind::PostPending => EntryKind::PostPending,
            TransferKind::VoidPending => EntryKind::VoidPending,
        }
    }
}

/// One change of one account, appended and never changed. `version` is the account's version
/// after the change, so an account's entries are numbered 1, 2, 3, ... without gaps (I4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub account_id: String,
    pub version: u64,
    pub transfer_id: String,
    pub side: Side,
    pub kind: EntryKind,
    pub amount: Amount,
    pub balances: Balances,
    pub committed_at_ms: u64,
    pub code: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn posted() -> Transfer {
        Transfer {
            id: "t1".into(),
            debit_account_id: "a".into(),
            credit_account_id: "b".into(),
            amount: 10,
            ledger: "USD".into(),
            ..Transfer::default()
        }
    }

    #[test]
    fn differing_fields_are_named_and_the_trace_id_does_not_count() {
        let original = posted();
        let retry = Transfer {
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            ..posted()
        };
        assert!(original.same_request(&retry));
        assert!(original.differing_fields(&retry).is_empty());
        let changed = Transfer {
            amount: 11,
            credit_account_id: "c".into(),
            kind: TransferKind::Pending,
            metadata: [("k".to_string(), "v".to_string())].into(),
            ..posted()
        };
        assert!(!original.same_request(&changed));
        assert_eq!(
            original.differing_fields(&changed),
            ["credit_account_id", "amount", "flags", "metadata"]
        );
    }

    #[test]
    fn validation_names_the_field() {
        assert!(posted().validate().is_ok());
        let cases: Vec<(Transfer, &str)> = vec![
            (
                Transfer {
                    amount: 0,
                    ..posted()
                },
                "amount",
            ),
            (
                Transfer {
                    id: String::new(),
                    ..posted()
                },
                "id",
            ),
            (
                Transfer {
                    credit_account_id: "a".into(),
                    ..posted()
                },
                "credit_account_id",
            ),
            (
                Transfer {
                    ledger: "usd".into(),
                    ..posted()
                },
                "ledger",
            ),
            (
                Transfer {
                    pending_id: "p".into(),
                    ..posted()
                },
                "pending_id",
            ),
            (
                Transfer {
                    timeout_seconds: 5,
                    ..posted()
                },
                "timeout_seconds",
            ),
            (
                Transfer {
                    kind: TransferKind::PostPending,
                    pending_id: String::new(),
                    ..posted()
                },
                "pending_id",
            ),
        ];
        for (t, field) in cases {
            assert_eq!(t.validate().unwrap_err().field, field, "{t:?}");
        }
    }

    fn hold() -> HoldStatus {
        HoldStatus {
            state: HoldState::Pending,
            debit_account_id: "a".into(),
            credit_account_id: "b".into(),
            ledger: "USD".into(),
            amount: 100,
            posted_amount: 0,
            expires_at_ms: Some(1_000),
        }
    }

    #[test]
    fn resolving_holds() {
        let post = Transfer {
            id: "p2".into(),
            kind: TransferKind::PostPending,
            pending_id: "p1".into(),
            amount: 40,
            ..Transfer::default()
        };
        let (amount, debit, _) = hold().resolve(&post, 10).unwrap();
        assert_eq!((amount, debit.pending_sub, debit.posted_add), (40, 100, 40));
        let full = Transfer {
            amount: 0,
            ..post.clone()
        };
        assert_eq!(hold().resolve(&full, 10).unwrap().0, 100);
        let too_much = Transfer {
            amount: 101,
            ..post.clone()
        };
        assert_eq!(
            hold().resolve(&too_much, 10).unwrap_err(),
            Rejection::ExceedsPendingAmount
        );
        assert_eq!(
            hold().resolve(&post, 1_000).unwrap_err(),
            Rejection::PendingTransferExpired
        );
        let other = Transfer {
            debit_account_id: "x".into(),
            ..post.clone()
        };
        assert_eq!(
            hold().resolve(&other, 10).unwrap_err(),
            Rejection::PendingTransferMismatch
        );
        let posted = HoldStatus {
            state: HoldState::Posted,
            ..hold()
        };
        assert_eq!(
            posted.resolve(&post, 10).unwrap_err(),
            Rejection::PendingTransferAlreadyPosted
        );
        let void = Transfer {
            kind: TransferKind::VoidPending,
            amount: 0,
            ..post
        };
        let (amount, debit, credit) = hold().resolve(&void, 10).unwrap();
        assert_eq!(
            (amount, debit.posted_add, credit.pending_sub),
            (100, 0, 100)
        );
    }
}
