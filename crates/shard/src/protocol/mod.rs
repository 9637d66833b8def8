//! The two-phase commit between shards as a contract: the messages one shard's engine sends
//! another, and what they carry. Shards of one node hand these to each other's queues; between
//! nodes they travel as `ledger.internal.v1` protobuf messages (`proto/ledger/internal/v1/`,
//! converted in [`wire`]), so a node of one build understands a node of another.
//!
//! ```text
//!  coordinator                     participant
//!      │ ── Prepare(leg) ────────────► │  lock, check, prepared record durable
//!      │ ◄──────── Prepared / Refused ─ │
//!      │  decision durable (commit point)
//!      │ ── Decide(decision) ────────► │  apply or release, done marker durable
//!      │ ◄───────────────────── Acked ─ │
//!      │ ◄─────────── QueryDecision ── │  (a prepared participant that waited too long)
//! ```
//!
//! Every message is idempotent, keyed by its [`Attempt`]: a duplicate, late or resent message
//! changes nothing that its first delivery did not.

pub mod wire;

use serde::{Deserialize, Serialize};

use ledger_domain::{Change, EntryKind, Rejection};

use crate::trace::TraceParent;

/// What the coordinator decided for an attempt. Made durable before any participant hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    Commit,
    Abort,
}

impl Decision {
    pub fn is_commit(self) -> bool {
        self == Decision::Commit
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }
}

/// One try at a cross-shard operation. A transfer id retried after a retriable abort gets a new
/// attempt, so a late message of the old attempt can never touch the new one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attempt {
    /// The transfer id, or `!expire:<pending id>` for a hold's expiry.
    pub op: String,
    /// The coordinator's leader epoch.
    pub epoch: u64,
    pub seq: u64,
}

impl Attempt {
    /// A key that cannot collide with an id (`#` is not an id character).
    pub fn key(&self) -> String {
        format!("{}#{}.{}", self.op, self.epoch, self.seq)
    }
}

/// Shard-to-shard messages of the two-phase commit. All are idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Coordinator -> participant: lock the account, check the change, make it durable, answer.
    Prepare(Leg),
    /// Participant -> coordinator: prepared; the account's version once the leg applies.
    Prepared {
        attempt: Attempt,
        version_after: u64,
    },
    /// Participant -> coordinator: the change cannot be applied; nothing is held.
    Refused { attempt: Attempt, reason: Rejection },
    /// Coordinator -> participant: the durable decision.
    Decide {
        attempt: Attempt,
        decision: Decision,
        committed_at_ms: u64,
        /// The coordinator's decide span: the participant's decide span is its child.
        trace: Option<TraceParent>,
    },
    /// Participant -> coordinator: the decision is applied and the lock released.
    Acked { attempt: Attempt },
    /// Participant -> coordinator: what was decided? (no answer while undecided)
    QueryDecision { attempt: Attempt },
    /// Home -> quota shard (regional quotas, [`crate::quota`]): raise the region's limit by
    /// `add` under `epoch` (applied once; an older epoch never).
    Grant {
        account_id: String,
        region: String,
        ledger: String,
        epoch: u64,
        add: u64,
        expires_at_ms: u64,
    },
    /// Home -> quota shard: give back up to `amount` unspent under `epoch` (donor first).
    Shrink {
        account_id: String,
        region: String,
        epoch: u64,
        amount: u64,
        expires_at_ms: u64,
    },
    /// Quota shard -> home: `epoch` is applied; a shrink gave back `moved`.
    QuotaAck {
        account_id: String,
        region: String,
        epoch: u64,
        moved: u64,
    },
    /// Quota shard -> home: spending under `epoch` stopped at expiry; `returned`: what every
    /// close of this allowance gave back, in all (the home releases what it has not yet).
    Closed {
        account_id: String,
        region: String,
        epoch: u64,
        returned: u64,
    },
    /// Home -> quota shard: closes that gave back `returned` in all are applied.
    CloseAck { account_id: String, returned: u64 },
    /// Quota shard -> home: quota-path transfers to settle, in order per account.
    Settle {
        region: String,
        entries: Vec<crate::quota::Settlement>,
    },
    /// Home -> quota shard: what became of each settlement.
    SettleAck {
        results: Vec<crate::quota::SettleResult>,
    },
}

/// The participant's half of a cross-shard operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    pub attempt: Attempt,
    pub account_id: String,
    pub ledger: String,
    pub change: Change,
    pub expected_version: Option<u64>,
    /// For the entry: the transfer (or hold) id, its kind and code.
    pub transfer_id: String,
    pub entry_kind: EntryKind,
    pub code: u32,
    /// The coordinator's prepare span: the participant's prepare span is its child.
    pub trace: Option<TraceParent>,
}
