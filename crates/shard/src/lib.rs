//! The shard: the single writer of one slice of the accounts.
//!
//! - [`engine`]: the sans-IO ledger engine of one shard. Inputs (client commands, messages from
//!   other shards, time) go in; a batch's store writes, replies and outgoing messages come out.
//!   It also holds the cross-shard two-phase commit, both as coordinator and as participant,
//!   because both need the shard's account locks.
//! - [`runtime`]: the thread that owns an engine: takes the lease (epoch), drains the queue,
//!   group-commits each batch durably, and only then replies and sends messages.
//! - [`node`]: the shards this process leads, their queues, and message delivery between
//!   shards, here or on other nodes.
//! - [`leaders`]: who leads each shard as a node believes (the map's owner, or with a shared
//!   store the lease holder heard of).
//! - [`directory`]: where an account lives (home and directory shards, forward records).
//! - [`read`]: reads of committed state (balances, statements, transfers) straight from the
//!   store, without going through the leader.

#[cfg(feature = "sim-bugs")]
pub mod bugs;
pub mod codec;
pub mod directory;
pub mod engine;
pub mod keys;
pub mod leaders;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod quota;
pub mod read;
pub mod route;
pub mod runtime;
pub mod sim;
pub mod trace;

use serde::{Deserialize, Serialize};

/// A read of a shard's stored state failed: the store could not be read, or it holds bytes
/// this build cannot decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The store failed; the read may succeed later.
    #[error(transparent)]
    Store(#[from] ledger_store::Error),
    /// The bytes are damaged or of a format this build does not know.
    #[error(transparent)]
    Decode(#[from] codec::DecodeError),
}

impl From<engine::Fatal> for ReadError {
    fn from(e: engine::Fatal) -> Self {
        match e {
            engine::Fatal::Decode(e) => ReadError::Decode(e),
        }
    }
}

/// Limits and timings of a shard. Every queue and wait has a named bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Commands and messages applied in one batch, hence one store commit.
    pub batch_inputs_max: usize,
    /// Capacity of a shard's input queue; a full queue pushes back on callers.
    pub queue_capacity: usize,
    /// Operations that may wait on one locked account before new ones are refused (`account_busy`).
    pub lock_waiters_max: usize,
    /// How long an operation waits for a locked account before `lock_timeout`.
    pub lock_wait_ms_max: u64,
    /// A coordinator aborts a cross-shard transfer whose participants have not all prepared by then.
    pub prepare_timeout_ms: u64,
    /// A participant holding a prepared lock this long asks the coordinator for the decision.
    pub prepared_query_ms: u64,
    /// Resend interval for unanswered protocol messages.
    pub retry_ms: u64,
    /// Cross-shard transfers a shard coordinates at once; more are refused (`account_busy`).
    pub coordinations_max: usize,
    /// The leader's lease; renewed at a third of it.
    pub lease_ms: u64,
    /// Most bytes of each shard's filter of recorded transfer ids (`engine::id_filter`), which
    /// spares a new id's idempotency check a search of the store. It starts at
    /// `transfer_filter_initial_bytes` and is rebuilt bigger (about 24 bits per id) whenever it
    /// holds more than one id per 12 bits, up to this; past that it helps less and less. 0: no
    /// filter.
    pub transfer_filter_bytes: usize,
    /// The filter's first size.
    pub transfer_filter_initial_bytes: usize,
    /// Settlements a quota shard keeps waiting for their homes; past it, spending in its region
    /// takes the ordinary path (regional quotas).
    pub quota_outbox_max: usize,
    /// Settlements in one `Settle` message to a home shard (one message in flight per home).
    pub settle_batch_max: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_inputs_max: 8_192,
            queue_capacity: 65_536,
            lock_waiters_max: 1_024,
            lock_wait_ms_max: 5_000,
            prepare_timeout_ms: 10_000,
            prepared_query_ms: 2_000,
            retry_ms: 500,
            coordinations_max: 16_384,
            lease_ms: 10_000,
            transfer_filter_bytes: 8 << 20,
            transfer_filter_initial_bytes: 256 << 10,
            quota_outbox_max: 65_536,
            settle_batch_max: 1_024,
        }
    }
}

/// The clock, injected so tests and simulations control time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock: the one place that may read it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now_ms(&self) -> u64 {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970");
        u64::try_from(since.as_millis()).expect("milliseconds fit u64")
    }
}
