//! A tiny run of the benchmark (a few hundred transfers, cross-shard and holds included) that
//! checks correctness only: the bench's own end-of-run audit must pass. Speed is never asserted
//! here; see docs/benchmarks.md.

use std::process::Command;

use ledger_tests::process::{ledgerd_bin, workspace_bin};

#[test]
fn bench_smoke_run_audits_clean() {
    ledgerd_bin(); // the bench starts the ledgerd next to it
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("ledger-bench"))
        .current_dir(dir.path())
        .args([
            "--count",
            "400",
            "--clients",
            "8",
            "--accounts",
            "200",
            "--shards",
            "4",
        ])
        .args([
            "--cross-percent",
            "50",
            "--pending-percent",
            "20",
            "--ceiling-secs",
            "0",
            "--duration",
            "60",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("transfers: 400 "), "{stdout}");
    assert!(stdout.contains("ledgerd store: embedded"), "{stdout}");
    assert!(
        stdout.contains("check: balances conserved; debit totals equal the acknowledged transfers"),
        "{stdout}"
    );
}

/// `--store memory` starts the ledgerd without durability (a comparison for the durable runs):
/// the report gives the store as the ledgerd reported it, and the same audit passes. With `--addr` the flag is refused, since the
/// bench did not start that ledgerd.
#[test]
fn bench_runs_a_memory_store_ledgerd_and_says_so() {
    ledgerd_bin();
    let dir = tempfile::tempdir().unwrap();
    let bench = || {
        let mut command = Command::new(workspace_bin("ledger-bench"));
        command.current_dir(dir.path()).args([
            "--count",
            "200",
            "--clients",
            "4",
            "--accounts",
            "100",
            "--shards",
            "2",
            "--ceiling-secs",
            "0",
            "--store",
            "memory",
        ]);
        command
    };
    let out = bench().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("ledgerd store: memory (NOT durable)"),
        "{stdout}"
    );
    assert!(stdout.contains("check: balances conserved"), "{stdout}");
    let refused = bench().args(["--addr", "127.0.0.1:1"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--store applies to the ledgerd the bench starts"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
