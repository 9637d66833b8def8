//! Crash test of a multi-region cluster of real `ledgerd` processes (`ledgerd demo`: three
//! regions, one with two nodes): concurrent transfers on every path (same shard, cross-shard
//! on one node, cross-node, cross-region) entering at every node, `kill -9` of a random node
//! (so of coordinators and participants alike) at random moments, restart with `ledgerd start
//! --config`, and then: every acknowledged transfer keeps its outcome and is in both statements
//! exactly once, balances are conserved per ledger over the whole cluster, no lock, prepared
//! record or coordinator record is left, and no no-overdraft account is negative.
//!
//! `LEDGER_SEED` reproduces the timings and the workload; `LEDGER_CRASH_CYCLES` sets the
//! number of kills (default 10).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ledger_client::{Client, pb};
use ledger_domain::ShardId;
use ledger_shard::read;
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::cluster::Demo;
use ledger_tests::process::two_pc_in_flight_after;
use ledger_tests::wire::{seed, settle};

const WORKERS: usize = 4;
const REGIONS: [&str; 3] = ["eu", "us", "ap"];

type Sent = Arc<Mutex<HashMap<String, (pb::Transfer, Option<pb::TransferResult>)>>>;

/// Three accounts per region (the even ones may not overdraw), a pair sharing a placement key
/// in eu, and a bank per region that funds the rest.
fn accounts() -> Vec<pb::Account> {
    let mut out = Vec::new();
    for region in REGIONS {
        for i in 0..3 {
            out.push(pb::Account {
                id: format!("{region}-{i}"),
                ledger: "USD".into(),
                region: region.into(),
                flags: Some(pb::AccountFlags {
                    debits_must_not_exceed_credits: i % 2 == 0,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        out.push(pb::Account {
            id: format!("bank-{region}"),
            ledger: "USD".into(),
            region: region.into(),
            ..Default::default()
        });
    }
    for id in ["pair-a", "pair-b"] {
        out.push(pb::Account {
            id: id.into(),
            ledger: "USD".into(),
            region: "eu".into(),
            placement_key: "pair".into(),
            ..Default::default()
        });
    }
    out
}

async fn worker(addrs: Vec<String>, cycle: usize, w: usize, seed: u64, sent: Sent) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<String> = accounts().into_iter().map(|a| a.id).collect();
    let mut clients = Vec::new();
    for addr in &addrs {
        let Ok(client) = Client::connect(addr).await else {
            return;
        };
        clients.push(client.raw());
    }
    for n in 0.. {
        let (debit, credit) = if rng.random_bool(0.2) {
            ("pair-a".to_string(), "pair-b".to_string())
        } else {
            let d = rng.random_range(0..ids.len());
            let c = (d + rng.random_range(1..ids.len())) % ids.len();
            (ids[d].clone(), ids[c].clone())
        };
        let t = pb::Transfer {
            id: format!("c{cycle}-w{w}-{n}"),
            debit_account_id: debit,
            credit_account_id: credit,
            amount: rng.random_range(1..100),
            ledger: "USD".into(),
            ..Default::default()
        };
        sent.lock().unwrap().insert(t.id.clone(), (t.clone(), None));
        let via = rng.random_range(0..clients.len());
        match clients[via].transfer(t.clone()).await {
            Ok(r) => {
                sent.lock()
                    .unwrap()
                    .insert(t.id.clone(), (t, Some(r.into_inner())));
            }
            // A node died (this one, or one the transfer needs): the outcome is unknown.
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_any_node_at_random_moments_loses_nothing_acknowledged() {
    let seed = seed();
    let cycles: usize = std::env::var("LEDGER_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("cluster crash test: LEDGER_SEED={seed} cycles={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(dir.path(), "eu:2,us,ap", 2, &["--metrics"]);
    let map = demo.cluster_file().check().unwrap();
    let node_ids: Vec<String> = demo.nodes.iter().map(|n| n.id.clone()).collect();
    let sent: Sent = Arc::default();

    let client = Client::connect(&demo.nodes[0].addr).await.unwrap();
    for r in client.create_accounts(accounts()).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    for region in REGIONS {
        for i in (0..3).step_by(2) {
            let fund = pb::Transfer {
                id: format!("fund-{region}-{i}"),
                debit_account_id: format!("bank-{region}"),
                credit_account_id: format!("{region}-{i}"),
                amount: 10_000,
                ledger: "USD".into(),
                ..Default::default()
            };
            let r = settle(&client, fund.clone()).await;
            sent.lock()
                .unwrap()
                .insert(fund.id.clone(), (fund, Some(r)));
        }
    }

    let mut kills_with_work_in_flight = 0;
    for cycle in 0..cycles {
        let addrs: Vec<String> = demo.nodes.iter().map(|n| n.addr.clone()).collect();
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| tokio::spawn(worker(addrs.clone(), cycle, w, rng.random(), sent.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        let victim = node_ids[rng.random_range(0..node_ids.len())].clone();
        demo.kill9(&victim);
        for w in workers {
            w.abort();
        }
        // What the kill left on the victim's disk: prepared or coordinator records mean it
        // landed between prepare and decision.
        let shards: Vec<u32> = map.shards_of(&victim).iter().map(|s| s.0).collect();
        let stores = ledger_store::open_shards_of(
            &dir.path().join(&victim),
            &shards,
            ledger_store::Limits::default(),
            Some(ledger_shard::keys::entry_group),
        )
        .unwrap();
        let in_flight: usize = stores
            .iter()
            .zip(&shards)
            .map(|(s, shard)| {
                let (p, c) = read::in_flight(s, ShardId(*shard)).unwrap();
                p + c
            })
            .sum();
        drop(stores);
        if in_flight > 0 {
            kills_with_work_in_flight += 1;
        }
        demo.restart(&victim);
    }
    eprintln!("{kills_with_work_in_flight} of {cycles} kills left two-phase commits in flight");
    assert!(
        kills_with_work_in_flight > 0,
        "no kill landed between prepare and decision; rerun with more cycles"
    );

    // Settle every transfer, each through a node picked at random.
    let mut clients = Vec::new();
    for node in &demo.nodes {
        clients.push(Client::connect(&node.addr).await.unwrap());
    }
    let all: Vec<(pb::Transfer, Option<pb::TransferResult>)> =
        sent.lock().unwrap().values().cloned().collect();
    let mut outcomes: HashMap<String, (pb::Transfer, pb::TransferResult)> = HashMap::new();
    let mut acknowledged = 0;
    for (t, answer) in all {
        let via = &clients[rng.random_range(0..clients.len())];
        let settled = settle(via, t.clone()).await;
        if let Some(answer) = answer {
            acknowledged += 1;
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
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut committed_total = 0u64;
    for (t, r) in outcomes.values() {
        if let Some(pb::transfer_result::Outcome::Transfer(c)) = &r.outcome {
            committed_total += c.amount;
            for account in [&t.debit_account_id, &t.credit_account_id] {
                expected
                    .entry(account.clone())
                    .or_default()
                    .push(t.id.clone());
            }
        }
    }
    let mut debits_total = 0u64;
    for a in accounts() {
        let via = &clients[rng.random_range(0..clients.len())];
        let mut got: Vec<String> = via
            .all_entries(&a.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.transfer_id)
            .collect();
        let mut want = expected.remove(&a.id).unwrap_or_default();
        got.sort();
        want.sort();
        assert_eq!(got, want, "statement of {}", a.id);
        debits_total += via.balance(&a.id).await.unwrap().debits_posted;
    }
    assert_eq!(
        debits_total, committed_total,
        "posted debits are the committed transfers"
    );

    // Let recovery finish everywhere, then stop and inspect every node's disk.
    let urls: Vec<String> = demo
        .nodes
        .iter()
        .map(|n| n.metrics.clone().expect("--metrics"))
        .collect();
    let in_flight = two_pc_in_flight_after(&urls, Duration::from_secs(60)).await;
    assert_eq!(
        in_flight, 0.0,
        "seed {seed}: two-phase commits in flight after 60 s"
    );
    demo.stop();
    let stores = Demo::open_stores_of(dir.path());
    let refs: Vec<_> = stores
        .iter()
        .map(|(s, st)| (*s, st as &dyn Store))
        .collect();
    let violations = checks::all(&checks::Snapshot::read_shards(&refs));
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}
