//! The router's decision of where a transfer is coordinated, once its lookups are done: the
//! server's router (`crates/server/src/router.rs`) and the simulation (`ledger-sim`) both
//! decide with these functions.

use ledger_domain::{Rejection, ShardId, Transfer, TransferKind};

/// Where a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coordinator {
    /// The shard that coordinates it (or that already recorded it).
    Shard(ShardId),
    /// A post or void whose hold does not exist: answered without any shard, and not
    /// recorded (the hold may yet be created).
    HoldMissing(Rejection),
}

impl Coordinator {
    pub fn shard(&self) -> Option<ShardId> {
        match self {
            Coordinator::Shard(shard) => Some(*shard),
            Coordinator::HoldMissing(_) => None,
        }
    }
}

/// Whether `t` resolves a hold (a post or void), whose accounts are the hold's.
pub fn resolves(t: &Transfer) -> bool {
    matches!(
        t.kind,
        TransferKind::PostPending | TransferKind::VoidPending
    )
}

/// What the lookups found for a post or void.
#[derive(Clone, Debug, Default)]
pub struct Found<'a> {
    /// The shard that recorded the transfer's own id already (it is answered there).
    pub recorded_at: Option<ShardId>,
    /// The debit account of the hold it names, if that hold exists.
    pub hold_debit: Option<&'a str>,
    /// Whether its `pending_id` names a recorded transfer (that is no hold).
    pub pending_recorded: bool,
}

/// The account whose home coordinates `t`: its debit account, or for a post or void the
/// hold's; `None` for a post or void already recorded or whose hold does not exist.
pub fn coordinating_account<'a>(t: &'a Transfer, found: &Found<'a>) -> Option<&'a str> {
    if !resolves(t) {
        return Some(&t.debit_account_id);
    }
    if found.recorded_at.is_some() {
        return None;
    }
    found.hold_debit
}

/// Where `t` goes, given what the lookups found and the home of its coordinating account
/// (`coordinating_account`); `Err` names the account that could not be located.
pub fn coordinator<'a>(
    t: &'a Transfer,
    found: &Found<'a>,
    home: Option<ShardId>,
) -> Result<Coordinator, &'a str> {
    match (coordinating_account(t, found), home) {
        (Some(_), Some(home)) => Ok(Coordinator::Shard(home)),
        (Some(account), None) => Err(account),
        (None, _) => Ok(match found.recorded_at {
            Some(shard) => Coordinator::Shard(shard),
            None if found.pending_recorded => {
                Coordinator::HoldMissing(Rejection::PendingTransferNotPending)
            }
            None => Coordinator::HoldMissing(Rejection::PendingTransferNotFound),
        }),
    }
}
