//! The FoundationDB backend of [`ledger_store::Store`] (docs/design/0005-foundationdb.md).
//!
//! [`keys`] (the key codec: the ledger's keys under a tuple-encoded subspace per cluster and
//! shard) is pure Rust and always built. The store itself, [`FdbStore`], is behind the
//! off-by-default feature `fdb`: it needs `libclang` to build (bindgen) and `libfdb_c` to link.

pub mod keys;
#[cfg(feature = "fdb")]
mod store;

#[cfg(feature = "fdb")]
pub use store::{FdbOptions, FdbStore, Network, open_database};
