//! What the engine knows of the store: the values its runtime fetched for the open batch.
//!
//! The engine never reads the store itself (with FoundationDB a read is a network round trip,
//! and a simulation needs an engine that only computes). A step that needs a stored value looks
//! it up here, under this batch's own writes; a value nobody fetched yet is *wanted*, and the
//! step waits (stalls) until the runtime has fetched it:
//!
//! ```text
//!  handle(input) ──► reads known? ── yes ──► apply
//!                         │ no
//!                         ▼
//!                  wanted += keys, stalled += step   (later inputs queue behind it, in order)
//!                         │
//!   runtime: take_wanted() ──► store reads (async) ──► supply(values) ──► stalled steps run
//! ```
//!
//! A step gathers all of its reads before it changes anything, so a stalled step is simply
//! run again once its values arrive. The values are valid for one batch: the store moves on at
//! every commit, so `finish` forgets them.

use foldhash::HashMap;
use serde::de::DeserializeOwned;

use ledger_domain::ShardId;

use crate::codec::{self, DecodeError};
use crate::keys;

/// A stored value the engine may need, by kind and id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Read {
    /// A transfer id's recorded outcome (`keys::transfer`).
    Transfer(String),
    /// A hold's status (`keys::hold`).
    Hold(String),
    /// A directory record: the placement key of an account homed elsewhere (`keys::forward`).
    Forward(String),
    /// A participant attempt's done marker (`keys::done`).
    Done(String),
    /// Where an account lives, when the node's directory does not know without asking the
    /// node that leads the account's directory shard. Its value is [`location_value`]'s.
    Locate(String),
}

impl Read {
    /// The store key of this value in `shard`; `None` for a location, which is not in this
    /// shard's store.
    pub fn key(&self, shard: ShardId) -> Option<Vec<u8>> {
        Some(match self {
            Read::Transfer(id) => keys::transfer(shard, id),
            Read::Hold(id) => keys::hold(shard, id),
            Read::Forward(id) => keys::forward(shard, id),
            Read::Done(attempt) => keys::done(shard, attempt),
            Read::Locate(_) => return None,
        })
    }
}

/// A location as the engine is handed it: the shard, or `None` if the lookup failed.
pub fn location_value(shard: Option<ShardId>) -> Value {
    shard.map(|shard| shard.0.to_be_bytes().to_vec())
}

/// The shard in a [`location_value`].
pub(super) fn location(value: &Value) -> Option<ShardId> {
    value.as_deref().map(|bytes| {
        let bytes = <[u8; 4]>::try_from(bytes).expect("a location is four bytes");
        ShardId(u32::from_be_bytes(bytes))
    })
}

/// What a stored value turned out to be: its bytes, `None` if absent.
pub type Value = Option<Vec<u8>>;

/// A fetched value, decoded: `Some(None)` fetched and absent, `None` not fetched.
pub(super) fn decoded<T: DeserializeOwned>(
    value: Option<&Value>,
    what: &'static str,
) -> Result<Option<Option<T>>, DecodeError> {
    value
        .map(|value| {
            value
                .as_deref()
                .map(|bytes| codec::decode(what, bytes))
                .transpose()
        })
        .transpose()
}

/// The values fetched for the open batch, one map per kind (so a lookup by `&str` needs no
/// owned key).
#[derive(Debug, Default)]
pub(super) struct Fetched {
    transfers: HashMap<String, Value>,
    holds: HashMap<String, Value>,
    forwards: HashMap<String, Value>,
    done: HashMap<String, Value>,
    locations: HashMap<String, Value>,
}

impl Fetched {
    pub(super) fn insert(&mut self, read: Read, value: Value) {
        match read {
            Read::Transfer(id) => self.transfers.insert(id, value),
            Read::Hold(id) => self.holds.insert(id, value),
            Read::Forward(id) => self.forwards.insert(id, value),
            Read::Done(attempt) => self.done.insert(attempt, value),
            Read::Locate(id) => self.locations.insert(id, value),
        };
    }

    /// The fetched value (`Some(None)`: fetched, absent), or `None` if not fetched.
    pub(super) fn transfer(&self, id: &str) -> Option<&Value> {
        self.transfers.get(id)
    }

    pub(super) fn hold(&self, id: &str) -> Option<&Value> {
        self.holds.get(id)
    }

    pub(super) fn forward(&self, id: &str) -> Option<&Value> {
        self.forwards.get(id)
    }

    pub(super) fn done(&self, attempt: &str) -> Option<&Value> {
        self.done.get(attempt)
    }

    pub(super) fn location(&self, id: &str) -> Option<&Value> {
        self.locations.get(id)
    }

    /// Forgets every value, keeping the maps' room for the next batch.
    pub(super) fn clear(&mut self) {
        self.transfers.clear();
        self.holds.clear();
        self.forwards.clear();
        self.done.clear();
        self.locations.clear();
    }
}

/// A lookup's answer: known (present or absent), or not fetched yet (and now wanted).
pub(super) enum Known<T> {
    Yes(Option<T>),
    Wanted,
}

impl<T> Known<T> {
    /// The value if known: `Some(None)` when known absent, `None` when wanted.
    pub(super) fn known(self) -> Option<Option<T>> {
        match self {
            Known::Yes(value) => Some(value),
            Known::Wanted => None,
        }
    }
}
