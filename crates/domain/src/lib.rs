//! The ledger's data model: accounts, transfers, entries, rejection reasons, validation,
//! placement and the cluster map. Pure: no I/O, no clock, no randomness, so the shard engine, the server and the
//! tests all agree on one meaning of every field.

mod account;
pub mod cluster;
mod placement;
mod rejection;
mod transfer;
mod validate;

pub use account::{Account, AccountFlags, Balances, Change, NewAccount};
pub use placement::{Placement, ShardId};
pub use rejection::Rejection;
pub use transfer::{
    Committed, Entry, EntryKind, HoldState, HoldStatus, Side, Transfer, TransferKind,
    TransferRecord,
};
pub use validate::{
    ID_LEN_MAX, InvalidInput, LEDGER_LEN_MAX, METADATA_ENTRIES_MAX, METADATA_KEY_LEN_MAX,
    METADATA_VALUE_LEN_MAX, validate_id,
};

/// Amounts are unsigned minor units (cents for USD). Every sum is checked: an overflow is a
/// rejection, never a wrap.
pub type Amount = u64;
