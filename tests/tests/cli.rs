//! The README's five-minute tour, run with the real `ledger` CLI against a real server.

use std::process::Command;

use ledger_tests::process::{InProcess, ledger_bin, test_config};

/// Runs `ledger <args>`; returns (exit code, stdout + stderr).
fn ledger(addr: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(ledger_bin())
        .arg("--addr")
        .arg(addr)
        .args(args)
        .output()
        .expect("run ledger");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tour() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let addr = server.addr.clone();
    let run = move |args: &'static [&'static str]| {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || ledger(&addr, args))
                .await
                .unwrap()
        }
    };
    for args in [
        &[
            "account",
            "create",
            "alice",
            "--ledger",
            "USD",
            "--no-overdraft",
        ][..],
        &["account", "create", "bob", "--ledger", "USD"],
        &["account", "create", "bank", "--ledger", "USD"],
        &[
            "transfer", "create", "fund-1", "--debit", "bank", "--credit", "alice", "--amount",
            "10000", "--ledger", "USD",
        ],
        &[
            "transfer", "create", "pay-1", "--debit", "alice", "--credit", "bob", "--amount",
            "2500", "--ledger", "USD",
        ],
        &[
            "hold",
            "create",
            "hold-1",
            "--debit",
            "alice",
            "--credit",
            "bob",
            "--amount",
            "3000",
            "--ledger",
            "USD",
            "--timeout",
            "3600",
        ],
        &[
            "hold", "post", "hold-1", "--id", "post-1", "--amount", "2000",
        ],
    ] {
        let (code, out) = run(args).await;
        assert_eq!(code, 0, "ledger {args:?}: {out}");
    }
    let (code, out) = run(&["balance", "alice"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("available=5500")
            && out.contains("debits_posted=4500")
            && out.contains("version=4"),
        "{out}"
    );
    let (_, out) = run(&["statement", "alice"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[3].starts_with("#4 post-1 debit post_pending amount=2000"),
        "{out}"
    );
    let (_, out) = run(&["transfer", "get", "hold-1"]).await;
    assert!(out.contains("hold_state=posted"), "{out}");

    // Each `ledger` run starts a trace (or joins --traceparent); the transfer records its id
    // and `transfer get` prints it, so an operator can go from a transfer id to its trace.
    let (code, out) = run(&[
        "transfer",
        "create",
        "traced-1",
        "--debit",
        "alice",
        "--credit",
        "bob",
        "--amount",
        "1",
        "--ledger",
        "USD",
        "--traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let (_, out) = run(&["transfer", "get", "traced-1"]).await;
    assert!(
        out.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
        "{out}"
    );
    let (_, out) = run(&["transfer", "get", "pay-1"]).await;
    let trace = out.split("trace_id=").nth(1).unwrap_or_default().trim();
    assert_eq!(trace.len(), 32, "a generated trace id: {out}");
    assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");

    let (code, out) = run(&[
        "transfer", "create", "pay-2", "--debit", "alice", "--credit", "bob", "--amount", "999999",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 1, "a rejection exits 1: {out}");
    assert!(out.contains("rejected pay-2: exceeds_credits"), "{out}");
    let (code, out) = run(&[
        "transfer", "create", "pay-1", "--debit", "alice", "--credit", "bob", "--amount", "2500",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 0, "an identical replay returns the original: {out}");
    let (code, out) = run(&[
        "transfer", "create", "pay-1", "--debit", "alice", "--credit", "bob", "--amount", "1",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(out.contains("exists_with_different_fields"), "{out}");
    let (code, out) = run(&[
        "transfer", "create", "--debit", "alice", "--credit", "bob", "--amount", "0", "--ledger",
        "USD",
    ])
    .await;
    assert_eq!(code, 2, "invalid input exits 2: {out}");
    assert!(out.contains("amount: must be greater than 0"), "{out}");
    let (_, out) = run(&["balance", "alice"]).await;
    assert!(
        out.contains("version=5"),
        "nothing changed but traced-1: {out}"
    );
    server.stop().await;
}
