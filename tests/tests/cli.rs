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
    let run = {
        let addr = addr.clone();
        move |args: &'static [&'static str]| {
            let addr = addr.clone();
            async move {
                tokio::task::spawn_blocking(move || ledger(&addr, args))
                    .await
                    .unwrap()
            }
        }
    };
    let run_owned = move |args: Vec<String>| {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ledger(&addr, &args)
            })
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
    // Times for people: RFC 3339 in UTC, not epoch milliseconds.
    let at = out
        .split("committed_at=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        at.len() == 24 && at.starts_with("20") && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{out}"
    );

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
    // The rejection is recorded: it can be looked up.
    let (code, out) = run(&["transfer", "get", "pay-2"]).await;
    assert_eq!(code, 1, "a recorded rejection exits 1: {out}");
    assert!(out.contains("rejected pay-2: exceeds_credits"), "{out}");
    assert!(!out.contains("not found"), "{out}");
    // A retry with the same fields answers the recorded outcome, and says so.
    let (code, out) = run(&[
        "transfer", "create", "pay-1", "--debit", "alice", "--credit", "bob", "--amount", "2500",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 0, "an identical replay returns the original: {out}");
    assert!(
        out.contains("transfer pay-1 alice -> bob amount=2500")
            && out.contains("replayed pay-1: the outcome recorded for this id"),
        "{out}"
    );
    let (code, out) = run(&[
        "transfer", "create", "pay-2", "--debit", "alice", "--credit", "bob", "--amount", "999999",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("rejected pay-2: exceeds_credits") && out.contains("(replayed:"),
        "a replayed rejection says so: {out}"
    );
    // The same id with other fields is refused, naming what differs.
    let (code, out) = run(&[
        "transfer", "create", "pay-1", "--debit", "alice", "--credit", "bank", "--amount", "1",
        "--ledger", "USD",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        out.contains("rejected pay-1: exists_with_different_fields")
            && out.contains("it differs in credit_account_id, amount"),
        "{out}"
    );
    // Amounts: positive whole minor units, said plainly.
    for amount in ["0", "-5", "10.50"] {
        let (code, out) = run_owned(vec![
            "transfer".into(),
            "create".into(),
            "--debit".into(),
            "alice".into(),
            "--credit".into(),
            "bob".into(),
            "--amount".into(),
            amount.into(),
            "--ledger".into(),
            "USD".into(),
        ])
        .await;
        assert_eq!(code, 2, "a bad amount exits 2: {out}");
        assert!(
            out.contains("amount must be a positive whole number of minor units (2500 for 25.00)"),
            "{amount}: {out}"
        );
        assert!(
            !out.contains("-- -5") && !out.contains("invalid digit"),
            "{out}"
        );
    }
    // A request the ledger refuses as malformed: one line naming the field, exit 2.
    let (code, out) = run(&[
        "transfer", "create", "--debit", "alice", "--credit", "bob", "--amount", "5", "--ledger",
        "usd",
    ])
    .await;
    assert_eq!(code, 2, "invalid input exits 2: {out}");
    assert!(
        out.starts_with("ledger: invalid request: ledger: "),
        "{out}"
    );
    assert!(!out.contains("Client specified"), "{out}");
    // Not found: one form and one exit code, whatever was looked up.
    for args in [
        &["balance", "ghost"][..],
        &["transfer", "get", "ghost"],
        &["account", "get", "ghost"],
    ] {
        let (code, out) = run(args).await;
        assert_eq!(code, 3, "not found exits 3: {args:?}: {out}");
        assert!(!out.contains("Some requested entity"), "{out}");
    }
    let (_, out) = run(&["balance", "ghost"]).await;
    assert_eq!(
        out.trim(),
        "ledger: not found: account \"ghost\" does not exist"
    );
    let (_, out) = run(&["balance", "alice"]).await;
    assert!(
        out.contains("version=5"),
        "nothing changed but traced-1: {out}"
    );
    server.stop().await;
}

/// With no ledgerd listening, the CLI says so in a sentence, with how to start one, and exits
/// 4 (unavailable).
#[test]
fn an_unreachable_server_is_named_with_how_to_start_one() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("http://127.0.0.1:{port}");
    let (code, out) = ledger(&addr, &["balance", "alice"]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!("ledgerd is not reachable at {addr}"))
            && out.contains("ledgerd start"),
        "{out}"
    );
    assert!(!out.contains("transport error"), "{out}");
}

/// `ledger --help` documents the exit codes; options say what they are for; `ledgerd init`
/// offers only what init uses.
#[test]
fn help_documents_exit_codes_options_and_init() {
    let help = |bin: &std::path::Path, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = help(&ledger_bin(), &["--help"]);
    for line in [
        "Exit codes:",
        "1  rejected",
        "3  not found",
        "4  unavailable",
    ] {
        assert!(top.contains(line), "{top}");
    }
    let create = help(&ledger_bin(), &["transfer", "create", "--help"]);
    for (option, words) in [
        ("--debit", "The account debited"),
        ("--credit", "The account credited"),
        ("--ledger", "currency"),
        ("--code", "reason code"),
        ("--expected-debit-version", "still at this version"),
        ("--meta", "key=value"),
    ] {
        let line = create
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(option))
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains(words), "{option}: {create}");
    }
    let init = help(&ledger_tests::process::ledgerd_bin(), &["init", "--help"]);
    assert!(
        init.contains("--data-dir") && init.contains("--shards"),
        "{init}"
    );
    for unused in ["--listen", "--otlp-endpoint", "--metrics-listen", "--store"] {
        assert!(!init.contains(unused), "init does not use {unused}: {init}");
    }
}

/// A start logs one summary line, not a line per shard; a clean stop says it stopped.
#[test]
fn ledgerd_logs_one_start_line_and_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(ledger_tests::process::ledgerd_bin())
        .args([
            "start",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "4",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("LEDGER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("ledgerd listening on "), "{line}");
    // Every shard leads before the server answers; give the leaders a moment to log.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("leading"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
}
