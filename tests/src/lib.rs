//! Shared test machinery: a reference ledger, invariant checkers, and helpers that start real
//! `ledgerd` servers (in process on port 0, or as child processes for crash tests).

pub mod checks;
pub mod cluster;
pub mod leader;
pub mod process;
pub mod reference;
pub mod wire;
