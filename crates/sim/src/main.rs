//! `ledger-sim`: runs seeds of the deterministic simulation and reports violations.
//!
//! `ledger-sim --seeds N` runs seeds 0..N (or from `--from`) and ends with one line
//! `seeds: N, violations: V`; `ledger-sim --seed S -v` replays one seed, step by step. A seed
//! that finds a violation prints the command that replays it.

// Timing the runs is this tool's job; the simulated clock is the seeds'.
#![allow(clippy::disallowed_methods)]

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use ledger_sim::run;

#[derive(Parser, Debug)]
#[command(
    name = "ledger-sim",
    version,
    about = "Deterministic simulation of the ledger: seeded workloads and faults, judged by a reference ledger and the invariant checkers"
)]
struct Args {
    /// Run this many seeds.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Replay this one seed (and print what it chose and found).
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print every step.
    #[arg(short, long)]
    verbose: bool,
    /// With --seed: print every batch's output (writes, replies, messages) at the end.
    #[arg(long)]
    journal: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        let outcome = run::run(seed, args.verbose);
        if args.journal {
            for line in &outcome.journal {
                println!("{line}");
            }
        }
        println!(
            "seed {seed}: {} transfers, {} node crashes, {} partitions, {} takeovers, {} step-downs, {} simulated ms ({} waiting), journal {:016x}",
            outcome.transfers,
            outcome.crashes,
            outcome.partitions,
            outcome.takeovers,
            outcome.step_downs,
            outcome.simulated_ms,
            outcome.waited_ms,
            outcome.journal_hash
        );
        for v in &outcome.violations {
            println!("  violation: {v}");
        }
        return if outcome.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let started = Instant::now();
    let (mut violations, mut simulated_ms, mut transfers) = (0usize, 0u64, 0usize);
    let (mut cut_short, mut waited_ms_max) = (0usize, 0u64);
    for seed in args.from..args.from + args.seeds {
        let outcome = run::run(seed, false);
        simulated_ms += outcome.simulated_ms;
        transfers += outcome.transfers;
        cut_short += usize::from(outcome.cut_short);
        waited_ms_max = waited_ms_max.max(outcome.waited_ms);
        if !outcome.violations.is_empty() {
            violations += outcome.violations.len();
            println!(
                "seed {seed}: {} violations, first: {}",
                outcome.violations.len(),
                outcome.violations[0]
            );
            println!("  replay: cargo run --release --bin ledger-sim -- --seed {seed} -v");
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{} transfers in {secs:.1} s: {:.0} seeds/s, {:.0} simulated s per wall s",
        transfers,
        args.seeds as f64 / secs,
        simulated_ms as f64 / 1_000.0 / secs
    );
    println!(
        "{cut_short} runs ended their workload early (waits past the bound); longest wait {} s",
        waited_ms_max / 1_000
    );
    println!("seeds: {}, violations: {violations}", args.seeds);
    if violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
