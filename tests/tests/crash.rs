//! Crash tests against a real `ledgerd` process: concurrent same-shard and cross-shard
//! transfers, `kill -9` at random moments (including between prepare and decision), restart,
//! and then: every acknowledged transfer is present exactly once, nothing unacknowledged was
//! applied twice after retries, balances are conserved per ledger, no lock, prepared record or
//! coordinator record is left behind, and no no-overdraft account is overdrawn.
//!
//! `LEDGER_SEED` reproduces the kill timings and the workload; `LEDGER_CRASH_CYCLES` sets the
//! number of kills (default 20).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ledger_client::{Client, pb};
use ledger_shard::read;
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::process::{
    Ledgerd, metrics_url, open_shards, test_config, two_pc_in_flight_after,
};
use ledger_tests::wire::{seed, settle};

const SHARDS: u32 = 4;
const WORKERS: usize = 8;

/// What the test knows about each transfer id it sent: None until an answer arrived.
type Sent = Arc<Mutex<HashMap<String, (pb::Transfer, Option<pb::TransferResult>)>>>;

fn accounts() -> Vec<pb::Account> {
    let mut out: Vec<pb::Account> = (0..8)
        .map(|i| pb::Account {
            id: format!("acc-{i}"),
            ledger: "USD".into(),
            flags: Some(pb::AccountFlags {
                debits_must_not_exceed_credits: i % 2 == 0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    // Two accounts sharing a placement key: transfers between them are single-shard.
    for id in ["pair-a", "pair-b"] {
        out.push(pb::Account {
            id: id.into(),
            ledger: "USD".into(),
            placement_key: "pair".into(),
            ..Default::default()
        });
    }
    out.push(pb::Account {
        id: "bank".into(),
        ledger: "USD".into(),
        ..Default::default()
    });
    out
}

async fn worker(addr: String, cycle: usize, w: usize, seed: u64, sent: Sent) {
    let Ok(client) = Client::connect(&addr).await else {
        return;
    };
    let mut raw = client.raw();
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<String> = accounts().into_iter().map(|a| a.id).collect();
    for n in 0.. {
        let (debit, credit) = if rng.random_bool(0.3) {
            if rng.random_bool(0.5) {
                ("pair-a", "pair-b")
            } else {
                ("pair-b", "pair-a")
            }
        } else {
            let d = rng.random_range(0..ids.len());
            let c = (d + rng.random_range(1..ids.len())) % ids.len();
            (ids[d].as_str(), ids[c].as_str())
        };
        let t = pb::Transfer {
            id: format!("c{cycle}-w{w}-{n}"),
            debit_account_id: debit.into(),
            credit_account_id: credit.into(),
            amount: rng.random_range(1..100),
            ledger: "USD".into(),
            ..Default::default()
        };
        sent.lock().unwrap().insert(t.id.clone(), (t.clone(), None));
        match raw.transfer(t.clone()).await {
            Ok(r) => {
                sent.lock()
                    .unwrap()
                    .insert(t.id.clone(), (t, Some(r.into_inner())));
            }
            Err(_) => return, // the server died: the outcome is unknown
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let seed = seed();
    let cycles: usize = std::env::var("LEDGER_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("crash test: LEDGER_SEED={seed} cycles={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = test_config(&data, SHARDS);
    let sent: Sent = Arc::default();

    // Set-up: accounts, and money for the no-overdraft ones.
    let node = Ledgerd::start(dir.path(), &config);
    let client = Client::connect(&node.addr).await.unwrap();
    for r in client.create_accounts(accounts()).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    for i in (0..8).step_by(2) {
        let fund = pb::Transfer {
            id: format!("fund-{i}"),
            debit_account_id: "bank".into(),
            credit_account_id: format!("acc-{i}"),
            amount: 10_000,
            ledger: "USD".into(),
            ..Default::default()
        };
        let r = settle(&client, fund.clone()).await;
        sent.lock()
            .unwrap()
            .insert(fund.id.clone(), (fund, Some(r)));
    }
    node.terminate();

    let mut kills_with_work_in_flight = 0;
    for cycle in 0..cycles {
        let node = Ledgerd::start(dir.path(), &config);
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(worker(
                    node.addr.clone(),
                    cycle,
                    w,
                    rng.random(),
                    sent.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        node.kill9();
        for w in workers {
            w.abort();
        }
        // Look at what the kill left on disk: prepared or coordinator records mean it landed
        // between prepare and decision.
        let stores = open_shards(&data, SHARDS);
        let in_flight: usize = stores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (p, c) = read::in_flight(s, ledger_domain::ShardId(i as u32)).unwrap();
                p + c
            })
            .sum();
        if in_flight > 0 {
            kills_with_work_in_flight += 1;
        }
    }
    eprintln!("{kills_with_work_in_flight} of {cycles} kills left two-phase commits in flight");
    assert!(
        kills_with_work_in_flight > 0,
        "no kill landed between prepare and decision; rerun with more cycles"
    );

    // Restart; settle every transfer whose answer was lost with the process.
    let mut config = config;
    config.telemetry.metrics_listen = "127.0.0.1:0".into();
    let node = Ledgerd::start(dir.path(), &config);
    let client = Client::connect(&node.addr).await.unwrap();
    let all: Vec<(pb::Transfer, Option<pb::TransferResult>)> =
        sent.lock().unwrap().values().cloned().collect();
    let mut outcomes: HashMap<String, (pb::Transfer, pb::TransferResult)> = HashMap::new();
    let mut acknowledged = 0;
    for (t, answer) in all {
        let settled = settle(&client, t.clone()).await;
        if let Some(answer) = answer {
            acknowledged += 1;
            // The acknowledged outcome is the outcome, forever, and the answer after the
            // crashes comes from its record (a replay).
            assert_eq!(
                (&settled.id, &settled.outcome),
                (&answer.id, &answer.outcome),
                "transfer {} changed its outcome after crashes",
                t.id
            );
            assert!(settled.replayed, "{} answered from its record", t.id);
        }
        outcomes.insert(t.id.clone(), (t, settled));
    }
    eprintln!(
        "{} transfers sent, {acknowledged} acknowledged before a kill",
        outcomes.len()
    );
    assert!(acknowledged > cycles, "the workload barely ran");

    // Every committed transfer is in both statements exactly once, and nothing else is.
    let mut expected_entries: HashMap<String, Vec<String>> = HashMap::new();
    let mut committed_total = 0u64;
    for (t, r) in outcomes.values() {
        if let Some(pb::transfer_result::Outcome::Transfer(c)) = &r.outcome {
            committed_total += c.amount;
            expected_entries
                .entry(t.debit_account_id.clone())
                .or_default()
                .push(t.id.clone());
            expected_entries
                .entry(t.credit_account_id.clone())
                .or_default()
                .push(t.id.clone());
        }
    }
    let mut debits_total = 0u64;
    for a in accounts() {
        let mut got: Vec<String> = client
            .all_entries(&a.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.transfer_id)
            .collect();
        let mut want = expected_entries.remove(&a.id).unwrap_or_default();
        got.sort();
        want.sort();
        assert_eq!(got, want, "statement of {}", a.id);
        debits_total += client.balance(&a.id).await.unwrap().debits_posted;
    }
    assert_eq!(
        debits_total, committed_total,
        "posted debits are exactly the committed transfers"
    );

    // Let recovery finish (participants ask about prepared locks, coordinators resend their
    // decisions): wait until no shard has a two-phase commit in flight, then stop cleanly and
    // inspect the disk.
    let url = metrics_url(&node);
    let in_flight = two_pc_in_flight_after(&[url], Duration::from_secs(60)).await;
    assert_eq!(
        in_flight, 0.0,
        "seed {seed}: two-phase commits still in flight after 60 s"
    );
    node.terminate();
    let stores = open_shards(&data, SHARDS);
    let refs: Vec<&dyn Store> = stores.iter().map(|s| s as &dyn Store).collect();
    let violations = checks::all(&checks::Snapshot::read(&refs));
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}

#[test]
fn a_second_ledgerd_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir.path().join("data"), 2);
    let first = Ledgerd::start(dir.path(), &config);
    let mut second = config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    let path = dir.path().join("second.toml");
    std::fs::write(&path, toml::to_string(&second).unwrap()).unwrap();
    let out = std::process::Command::new(ledger_tests::process::ledgerd_bin())
        .args(["start", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already open"), "{stderr}");
    first.terminate();
}
