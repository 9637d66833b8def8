//! Deliberately broken variants of the engine, to show that the simulation catches each
//! (docs/design/0003-simulation.md, Teeth). Compiled only with the `sim-bugs` feature, and off
//! unless a test turns one on for its own thread (the simulation runs in one).

use std::cell::Cell;

/// A broken variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// A participant applies a commit decision twice.
    ApplyDecisionTwice,
    /// A coordinator that finds an undecided attempt after a restart commits it instead of
    /// aborting (presumed commit), whether or not its participant prepared.
    PresumeCommit,
    /// A retry of a rejected transfer is applied anew instead of answered with its recorded
    /// rejection.
    ForgetRejections,
    /// A leader commits without the precondition on its epoch, so a deposed leader's commit
    /// can land after another took the shard over.
    SkipEpochCheck,
    /// A coordinator releases its lock on the debit account as soon as its Prepare leaves,
    /// before the decision, so another transfer may spend what this one is about to.
    ReleaseLockEarly,
    /// A quota shard applies a grant whose epoch it already holds (a resend of an older
    /// change), so its region may spend more than the home granted.
    ApplyStaleGrant,
}

thread_local! {
    static ON: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Turns `bug` on (or every variant off) for this thread.
pub fn set(bug: Option<Bug>) {
    ON.with(|on| on.set(bug));
}

/// Whether `bug` is on for this thread.
pub fn on(bug: Bug) -> bool {
    ON.with(|on| on.get() == Some(bug))
}
