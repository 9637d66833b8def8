//! The ledger's deterministic simulation (docs/design/0003-simulation.md): a run per seed over
//! real engines ([`run`]) of a seeded cluster ([`topology`]), judged by a reference ledger ([`reference`]) and one checker per
//! invariant ([`checks`]), which the cross-crate tests use too.

pub mod checks;
pub mod reference;
pub mod run;
pub mod topology;
