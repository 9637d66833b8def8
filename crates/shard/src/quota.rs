//! Regional quotas (`docs/design/0004-regional-quotas.md`): an account's home grants a region an
//! allowance of the account's balance; the region spends it with local commits and settles the
//! spending at home afterwards.
//!
//! ```text
//!  home shard of A (region H)                       quota shard of (A, R) (region R)
//!  hold A -> !escrow!R!A  (granted)                 !clearing!R!A -> !quota!R!A  (limit)
//!     ── Grant {e, add} ──────────────────────────►  quota record epoch e
//!     ◄──────────────────────────── QuotaAck {e} ─
//!                                                   spend: !quota!R!A -> C (ordinary transfer
//!                                                     of R), settlement into the outbox
//!     ◄────────────── Settle {seq, transfer, e} ─
//!  A pending -> posted, transfer recorded
//!     ── SettleAck {seq, refused?} ───────────────►  outbox entry dropped
//!     ── Shrink {e + 1, amount} ──────────────────►  unspent -> clearing (donor first)
//!     ◄──────────────────── QuotaAck {e + 1, moved} ─
//!  release `moved` (and grant it to another region)
//!     ◄──────────────── Closed {e, returned} ─  at expiry minus the skew margin
//!  release what is new ── CloseAck {returned} ►   (`returned`: all closes gave back, in all)
//! ```
//!
//! Every message is idempotent: changes carry the home's epoch (applied once, never an older
//! one), settlements a sequence number per (account, region) (applied once, in order).

use serde::{Deserialize, Serialize};

use ledger_domain::{ShardId, Transfer};

use crate::trace::TraceParent;

/// A region stops spending an allowance this long before its expiry by its own clock: the
/// clock skew between regions a deployment must stay within.
pub const QUOTA_SKEW_MARGIN_MS: u64 = 5_000;
/// Regions one account may hold allowances in.
pub const QUOTAS_PER_ACCOUNT_MAX: usize = 16;
/// Longest lease an operator may give an allowance (about a year).
pub const QUOTA_LEASE_MS_MAX: u64 = 366 * 24 * 3600 * 1000;

/// The separator of system account ids: never in a user id (`validate_id`) or a region name.
const SEP: char = '!';

/// The escrow account of (account, region) on the account's home shard: the other side of
/// the allowance's hold.
pub fn escrow_id(region: &str, account: &str) -> String {
    format!("{SEP}escrow{SEP}{region}{SEP}{account}")
}

/// The quota account of (account, region) on the quota shard: its balance is what the region
/// may still spend.
pub fn quota_id(region: &str, account: &str) -> String {
    format!("{SEP}quota{SEP}{region}{SEP}{account}")
}

/// The clearing account of (account, region) on the quota shard: the other side of grants and
/// of unspent rights given back.
pub fn clearing_id(region: &str, account: &str) -> String {
    format!("{SEP}clearing{SEP}{region}{SEP}{account}")
}

/// `(region, account)` of a quota account id.
pub fn parse_quota_id(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("!quota!")?;
    rest.split_once(SEP)
}

/// The id of a change's statement entries: `!<what>!<region>!<account>!<epoch>`.
pub fn change_id(what: &str, region: &str, account: &str, epoch: u64) -> String {
    format!("{SEP}{what}{SEP}{region}{SEP}{account}{SEP}{epoch}")
}

/// A change of an allowance the home has made and the region has yet to answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// The hold grew by `add`; the region is to raise its limit by as much.
    Grant { add: u64 },
    /// The region is to give back up to `amount` of what it has not spent (donor first);
    /// what it gives back is released, and with `to`, granted to another region.
    Shrink { amount: u64, to: Option<MoveTo> },
}

/// Where a move's rights go once the donor has given them up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTo {
    pub region: String,
    pub quota_shard: ShardId,
    pub lease_ms: u64,
}

/// The home's record of one allowance (`keys::allowance`), kept by A's home shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    pub account_id: String,
    pub region: String,
    pub quota_shard: ShardId,
    /// The last epoch the home issued, and the last the region answered.
    pub epoch: u64,
    pub confirmed: u64,
    /// Sums over the allowance's life: what the hold grew by, what was settled (posted), what
    /// came back unspent (released) or was written off (released too).
    pub granted: u64,
    pub settled: u64,
    pub released: u64,
    /// Settlements refused (duplicates, written off): they stay reserved.
    pub refused: u64,
    pub expires_at_ms: u64,
    pub pending: Option<Pending>,
    /// The last settlement sequence number applied or refused.
    pub last_seq: u64,
    /// Settlements of epochs up to this one are refused (an operator wrote them off).
    pub written_off_through: u64,
    /// What the region gave back at its closes, released here (the region reports the sum, so a
    /// lost or reordered report is made up by the next).
    pub close_released: u64,
}

impl Allowance {
    /// The hold still reserved: granted minus settled minus released.
    pub fn outstanding(&self) -> u64 {
        self.granted - self.settled - self.released
    }
}

/// The quota shard's record of one allowance (`keys::quota`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRecord {
    pub account_id: String,
    /// The region of this shard.
    pub region: String,
    pub ledger: String,
    pub home: ShardId,
    pub epoch: u64,
    pub expires_at_ms: u64,
    /// Spending stopped at expiry (until a new grant).
    pub closed: bool,
    /// What its closes gave back, in all, and how much of that the home has confirmed: reported
    /// (`Closed`) until confirmed.
    pub closed_returned: u64,
    pub close_acked: u64,
    /// Sums: granted by the home, given back (shrinks, close), spent, settled at home, and
    /// refused at home.
    pub granted: u64,
    pub returned: u64,
    pub spent: u64,
    pub settled: u64,
    pub refused: u64,
    /// The sequence number of the next settlement.
    pub next_seq: u64,
    /// The last shrink: its epoch and what it moved (a resent Shrink gets this answer).
    pub last_shrink: Option<(u64, u64)>,
}

impl QuotaRecord {
    /// What the region may still spend now, by its clock.
    pub fn open_at(&self, now_ms: u64) -> bool {
        !self.closed && now_ms < self.expires_at_ms.saturating_sub(QUOTA_SKEW_MARGIN_MS)
    }
}

/// One quota-path transfer to settle at home (`keys::outbox`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub seq: u64,
    pub epoch: u64,
    /// As the client sent it: the debit account is the allowance's account.
    pub transfer: Transfer,
    pub spent_at_ms: u64,
    /// The transfer's trace: the home's `quota.settle` span is its child.
    pub trace: Option<TraceParent>,
}

/// The home's answer to one settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleResult {
    pub account_id: String,
    pub seq: u64,
    pub amount: u64,
    /// Why it was refused (`duplicate`, `written_off`, `overdrawn`, `no_allowance`).
    pub refused: Option<String>,
}

/// An operator's request about an account's allowances, run by the account's home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Set region's allowance to `amount` (grow it, or shrink it donor first), expiring
    /// `lease_ms` from now.
    Set {
        account_id: String,
        region: String,
        quota_shard: ShardId,
        amount: u64,
        lease_ms: u64,
    },
    /// Move `amount` of unspent rights from one region to another, donor first.
    Move {
        account_id: String,
        from: String,
        from_shard: ShardId,
        to: MoveTo,
        amount: u64,
    },
    /// Release what the home still reserves for a region that cannot report, and refuse every
    /// later settlement of its epochs so far.
    WriteOff { account_id: String, region: String },
    /// The account's allowances as the home knows them.
    Show { account_id: String },
    /// What this quota shard knows of the account's allowance in its region.
    Region { account_id: String },
}

impl Command {
    pub fn account_id(&self) -> &str {
        match self {
            Command::Set { account_id, .. }
            | Command::Move { account_id, .. }
            | Command::WriteOff { account_id, .. }
            | Command::Show { account_id }
            | Command::Region { account_id } => account_id,
        }
    }
}

/// The home's answer to a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandReply {
    /// The account's allowances after the command (a change the region has yet to answer
    /// shows as `pending`).
    Allowances(Vec<Allowance>),
    /// A quota shard's view (`None`: it holds no allowance of the account).
    Region(Option<RegionView>),
    Refused(CommandError),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("account {0:?} is not homed on this shard")]
    AccountNotFound(String),
    #[error("region {0:?} is the account's home region: it needs no allowance")]
    HomeRegion(String),
    #[error("the account cannot cover the allowance: {0}")]
    ExceedsCredits(String),
    #[error("the account stayed locked by transfers in flight ({0}); try again")]
    Busy(String),
    #[error("a change of this allowance is still waiting for its region's answer")]
    ChangeInProgress,
    #[error("no allowance of region {0:?}")]
    NoAllowance(String),
    #[error("the account has allowances in {QUOTAS_PER_ACCOUNT_MAX} regions already")]
    TooMany,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// What a quota shard knows of one allowance, for `GetQuotas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionView {
    pub record: QuotaRecord,
    /// The quota account's available balance: what may still be spent.
    pub available: u64,
    /// Settlements not yet answered by the home.
    pub in_flight: u64,
}
