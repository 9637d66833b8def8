//! The generated gRPC code of `ledger.v1` (and of the node-to-node `ledger.internal.v1`) and the conversions between the wire types and the
//! domain model. Wire -> domain conversions reject malformed input with the field named;
//! domain -> wire conversions cannot fail.

#![allow(clippy::pedantic)]

pub mod ledger {
    pub mod v1 {
        tonic::include_proto!("ledger.v1");
    }
    /// The node-to-node API; its conversions live with the protocol types
    /// (`ledger_shard::protocol::wire`).
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("ledger.internal.v1");
        }
    }
}

pub use ledger::v1 as pb;

/// For server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");

use ledger_domain::{
    Account, Committed, Entry, EntryKind, HoldState, HoldStatus, InvalidInput, NewAccount,
    Rejection, Side, Transfer, TransferKind, TransferRecord,
};

pub fn new_account(a: pb::Account) -> Result<NewAccount, InvalidInput> {
    unset("debits_pending", a.debits_pending != 0)?;
    unset("debits_posted", a.debits_posted != 0)?;
    unset("credits_pending", a.credits_pending != 0)?;
    unset("credits_posted", a.credits_posted != 0)?;
    unset("version", a.version != 0)?;
    unset("created_at_unix_ms", a.created_at_unix_ms != 0)?;
    unset("shard", a.shard != 0)?;
    let flags = a.flags.unwrap_or_default();
    Ok(NewAccount {
        id: a.id,
        ledger: a.ledger,
        flags: ledger_domain::AccountFlags {
            debits_must_not_exceed_credits: flags.debits_must_not_exceed_credits,
            credits_must_not_exceed_debits: flags.credits_must_not_exceed_debits,
        },
        placement_key: a.placement_key,
        metadata: a.metadata.into_iter().collect(),
        credit_limit: a.credit_limit.unwrap_or(0),
    })
}

/// The wire form of an account to create in `region` (what a node forwards to the account's
/// home shard's node).
pub fn new_account_to_wire(a: &NewAccount, region: &str) -> pb::Account {
    pb::Account {
        id: a.id.clone(),
        ledger: a.ledger.clone(),
        flags: Some(pb::AccountFlags {
            debits_must_not_exceed_credits: a.flags.debits_must_not_exceed_credits,
            credits_must_not_exceed_debits: a.flags.credits_must_not_exceed_debits,
        }),
        placement_key: a.placement_key.clone(),
        metadata: a.metadata.clone().into_iter().collect(),
        credit_limit: (a.credit_limit > 0).then_some(a.credit_limit),
        region: region.to_string(),
        ..Default::default()
    }
}

/// An account as stored on `shard`, a shard of `region`.
pub fn account(a: &Account, shard: u32, region: &str) -> pb::Account {
    let s = &a.spec;
    pb::Account {
        id: s.id.clone(),
        ledger: s.ledger.clone(),
        flags: Some(pb::AccountFlags {
            debits_must_not_exceed_credits: s.flags.debits_must_not_exceed_credits,
            credits_must_not_exceed_debits: s.flags.credits_must_not_exceed_debits,
        }),
        placement_key: s.placement_key.clone(),
        metadata: s.metadata.clone().into_iter().collect(),
        credit_limit: (s.credit_limit > 0).then_some(s.credit_limit),
        debits_pending: a.balances.debits_pending,
        debits_posted: a.balances.debits_posted,
        credits_pending: a.balances.credits_pending,
        credits_posted: a.balances.credits_posted,
        version: a.version,
        created_at_unix_ms: a.created_at_ms,
        shard,
        region: region.to_string(),
    }
}

pub fn balance(a: &Account) -> pb::Balance {
    pb::Balance {
        account_id: a.spec.id.clone(),
        ledger: a.spec.ledger.clone(),
        debits_pending: a.balances.debits_pending,
        debits_posted: a.balances.debits_posted,
        credits_pending: a.balances.credits_pending,
        credits_posted: a.balances.credits_posted,
        available: a.balances.available(a.spec.credit_limit),
        version: a.version,
    }
}

/// The balance of an account in its wire form (as read from another node).
pub fn balance_of_wire(a: &pb::Account) -> pb::Balance {
    let balances = ledger_domain::Balances {
        debits_pending: a.debits_pending,
        debits_posted: a.debits_posted,
        credits_pending: a.credits_pending,
        credits_posted: a.credits_posted,
    };
    pb::Balance {
        account_id: a.id.clone(),
        ledger: a.ledger.clone(),
        debits_pending: a.debits_pending,
        debits_posted: a.debits_posted,
        credits_pending: a.credits_pending,
        credits_posted: a.credits_posted,
        available: balances.available(a.credit_limit.unwrap_or(0)),
        version: a.version,
    }
}

/// A wire transfer as the client sent it. Only the flags can be malformed here; the rest is
/// checked by `Transfer::validate`.
/// Refuses a field the ledger sets (output only) that a client sent on a new record: it would
/// otherwise be dropped without a word.
fn unset(field: &'static str, is_set: bool) -> Result<(), InvalidInput> {
    if is_set {
        return Err(InvalidInput::new(
            field,
            "is set by the ledger (output only); leave it unset in a request",
        ));
    }
    Ok(())
}

pub fn transfer(t: pb::Transfer) -> Result<Transfer, InvalidInput> {
    unset("committed_at_unix_ms", t.committed_at_unix_ms != 0)?;
    unset(
        "hold_state",
        t.hold_state != pb::HoldState::Unspecified as i32,
    )?;
    unset("hold_posted_amount", t.hold_posted_amount != 0)?;
    unset("debit_account_version", t.debit_account_version != 0)?;
    unset("credit_account_version", t.credit_account_version != 0)?;
    unset("cross_shard", t.cross_shard)?;
    unset("quota_path", t.quota_path)?;
    unset("trace_id", !t.trace_id.is_empty())?;
    let flags = t.flags.unwrap_or_default();
    let kind = match (flags.pending, flags.post_pending, flags.void_pending) {
        (false, false, false) => TransferKind::Posted,
        (true, false, false) => TransferKind::Pending,
        (false, true, false) => TransferKind::PostPending,
        (false, false, true) => TransferKind::VoidPending,
        _ => {
            return Err(InvalidInput::new(
                "flags",
                "at most one of pending, post_pending and void_pending may be set",
            ));
        }
    };
    Ok(Transfer {
        id: t.id,
        debit_account_id: t.debit_account_id,
        credit_account_id: t.credit_account_id,
        amount: t.amount,
        ledger: t.ledger,
        code: t.code,
        kind,
        pending_id: t.pending_id,
        timeout_seconds: t.timeout_seconds,
        expected_debit_version: t.expected_debit_version,
        expected_credit_version: t.expected_credit_version,
        metadata: t.metadata.into_iter().collect(),
        trace_id: String::new(),
    })
}

fn transfer_flags(kind: TransferKind) -> pb::TransferFlags {
    pb::TransferFlags {
        pending: kind == TransferKind::Pending,
        post_pending: kind == TransferKind::PostPending,
        void_pending: kind == TransferKind::VoidPending,
    }
}

/// The wire form of a transfer request (what a client sends).
pub fn transfer_to_wire(t: &Transfer) -> pb::Transfer {
    transfer_into_wire(t.clone())
}

/// As [`transfer_to_wire`], moving the strings instead of copying them.
pub fn transfer_into_wire(t: Transfer) -> pb::Transfer {
    pb::Transfer {
        id: t.id,
        debit_account_id: t.debit_account_id,
        credit_account_id: t.credit_account_id,
        amount: t.amount,
        ledger: t.ledger,
        code: t.code,
        flags: Some(transfer_flags(t.kind)),
        pending_id: t.pending_id,
        timeout_seconds: t.timeout_seconds,
        expected_debit_version: t.expected_debit_version,
        expected_credit_version: t.expected_credit_version,
        metadata: t.metadata.into_iter().collect(),
        trace_id: t.trace_id,
        ..Default::default()
    }
}

/// A committed transfer: the request with the effective accounts, ledger and amount filled in.
pub fn committed_transfer(
    record: &TransferRecord,
    hold: Option<&HoldStatus>,
) -> Option<pb::Transfer> {
    let committed = record.result.as_ref().ok()?.clone();
    Some(committed_into_wire(record.request.clone(), committed, hold))
}

fn committed_into_wire(
    request: Transfer,
    committed: Committed,
    hold: Option<&HoldStatus>,
) -> pb::Transfer {
    let mut t = transfer_into_wire(request);
    t.debit_account_id = committed.debit_account_id;
    t.credit_account_id = committed.credit_account_id;
    t.ledger = committed.ledger;
    t.amount = committed.amount;
    t.committed_at_unix_ms = committed.committed_at_ms;
    t.debit_account_version = committed.debit_account_version;
    t.credit_account_version = committed.credit_account_version;
    t.cross_shard = committed.cross_shard;
    if let Some(hold) = hold {
        t.hold_state = hold_state(hold.state) as i32;
        t.hold_posted_amount = hold.posted_amount;
    }
    t
}

fn hold_state(state: HoldState) -> pb::HoldState {
    match state {
        HoldState::Pending => pb::HoldState::Pending,
        HoldState::Posted => pb::HoldState::Posted,
        HoldState::Voided => pb::HoldState::Voided,
        HoldState::Expired => pb::HoldState::Expired,
    }
}

pub fn rejection(reason: Rejection) -> pb::Rejection {
    pb::Rejection {
        reason: i32::try_from(reason.code()).expect("small"),
        message: reason.describe().to_string(),
        retriable: reason.is_retriable(),
        differing_fields: Vec::new(),
    }
}

/// The answer to one transfer: the committed transfer or the rejection. Takes the record, so
/// its strings move into the answer (a batch answers thousands of items).
pub fn transfer_result(record: TransferRecord, hold: Option<&HoldStatus>) -> pb::TransferResult {
    let id = record.request.id.clone();
    let outcome = match record.result {
        Ok(committed) => pb::transfer_result::Outcome::Transfer(committed_into_wire(
            record.request,
            committed,
            hold,
        )),
        Err(reason) => pb::transfer_result::Outcome::Rejection(rejection(reason)),
    };
    pb::TransferResult {
        id,
        outcome: Some(outcome),
        replayed: false,
    }
}

pub fn entry(e: &Entry) -> pb::Entry {
    pb::Entry {
        account_id: e.account_id.clone(),
        version: e.version,
        transfer_id: e.transfer_id.clone(),
        side: match e.side {
            Side::Debit => pb::Side::Debit,
            Side::Credit => pb::Side::Credit,
        } as i32,
        kind: match e.kind {
            EntryKind::Posted => pb::EntryKind::Posted,
            EntryKind::Pending => pb::EntryKind::Pending,
            EntryKind::PostPending => pb::EntryKind::PostPending,
            EntryKind::VoidPending => pb::EntryKind::VoidPending,
            EntryKind::ExpirePending => pb::EntryKind::ExpirePending,
        } as i32,
        amount: e.amount,
        debits_pending: e.balances.debits_pending,
        debits_posted: e.balances.debits_posted,
        credits_pending: e.balances.credits_pending,
        credits_posted: e.balances.credits_posted,
        committed_at_unix_ms: e.committed_at_ms,
        code: e.code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_rejection_numbers_match_the_domain() {
        // The proto enum and the domain enum must agree number for number.
        for r in Rejection::ALL {
            let wire = pb::RejectionReason::try_from(i32::try_from(r.code()).unwrap()).unwrap();
            assert_eq!(wire.as_str_name().to_ascii_lowercase(), r.name(), "{r:?}");
        }
    }

    #[test]
    fn conflicting_flags_are_invalid() {
        let t = pb::Transfer {
            flags: Some(pb::TransferFlags {
                pending: true,
                void_pending: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(transfer(t).unwrap_err().field, "flags");
    }

    #[test]
    fn transfer_round_trip() {
        let t = Transfer {
            id: "t".into(),
            kind: TransferKind::PostPending,
            pending_id: "p".into(),
            expected_credit_version: Some(3),
            ..Default::default()
        };
        assert_eq!(transfer(transfer_to_wire(&t)).unwrap(), t);
    }
}
