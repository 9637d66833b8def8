//! The simulator in CI: a few hundred seeds find no violation, and a seed replays exactly.
//! `ledger-sim --seeds 10000` runs many more (docs/benchmarks.md).

use ledger_sim::run;

/// Seeds CI runs on every change.
const SEEDS: u64 = 300;

#[test]
fn seeds_find_no_violation() {
    let mut found = Vec::new();
    for seed in 0..SEEDS {
        let outcome = run::run(seed, false);
        assert!(outcome.transfers > 0, "seed {seed} ran no transfer");
        if let Some(first) = outcome.violations.first() {
            found.push(format!(
                "seed {seed}: {first} (replay: cargo run --release --bin ledger-sim -- --seed {seed} -v)"
            ));
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let first = run::run(7, false);
    let again = run::run(7, false);
    assert_eq!(first.journal_hash, again.journal_hash);
    assert_eq!(
        (first.transfers, first.crashes, first.simulated_ms),
        (again.transfers, again.crashes, again.simulated_ms)
    );
    assert_ne!(
        run::run(8, false).journal_hash,
        first.journal_hash,
        "another seed, another run"
    );
}

/// Each deliberately broken variant of the engine (`ledger_shard::bugs`) is caught within a
/// bounded number of seeds: the simulation has teeth.
#[test]
fn every_broken_variant_is_caught_within_a_few_seeds() {
    use ledger_shard::bugs::{self, Bug};
    const WITHIN: u64 = 100;
    for bug in [
        Bug::ApplyDecisionTwice,
        Bug::PresumeCommit,
        Bug::ForgetRejections,
        Bug::SkipEpochCheck,
        Bug::ReleaseLockEarly,
        Bug::ApplyStaleGrant,
    ] {
        bugs::set(Some(bug));
        let caught = (0..WITHIN).find_map(|seed| {
            let found = run::run(seed, false).violations;
            found.first().map(|first| (seed, first.clone()))
        });
        bugs::set(None);
        let (seed, first) =
            caught.unwrap_or_else(|| panic!("{bug:?} not caught in {WITHIN} seeds"));
        eprintln!("{bug:?} caught at seed {seed}: {first}");
    }
}
