//! Shared test machinery: a reference ledger, invariant checkers, and helpers that start real
//! `ledgerd` servers (in process on port 0, or as child processes for crash tests).

pub mod cluster;
pub mod fuzz;
pub mod leader;
pub mod process;
pub mod wire;

/// The invariant checkers and the reference ledger, shared with the simulator.
pub use ledger_sim::{checks, reference};
