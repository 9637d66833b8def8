//! A multi-region cluster of real `ledgerd` processes (`ledgerd demo`: three regions, one of
//! them with two nodes): accounts homed in each region, transfers of every path (same shard,
//! cross-shard on one node, cross-node in one region, cross-region) entering at any node,
//! reads from any node, a node killed and started again as an operator would, and the
//! invariants checked over every node's stores once the cluster is stopped.

use std::collections::BTreeMap;

use ledger_client::{Client, pb};
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::cluster::Demo;
use ledger_tests::process::ledger_bin;
use ledger_tests::wire::usd_transfer;

const REGIONS: &str = "eu:2,us,ap";

fn account(id: &str, region: &str, placement_key: &str) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        region: region.into(),
        placement_key: placement_key.into(),
        ..Default::default()
    }
}

fn committed(result: &pb::TransferResult) -> &pb::Transfer {
    match &result.outcome {
        Some(pb::transfer_result::Outcome::Transfer(t)) => t,
        other => panic!("not committed: {other:?}"),
    }
}

async fn client(demo: &Demo, node: &str) -> Client {
    Client::connect(&demo.node(node).addr).await.unwrap()
}

/// Every account's (region, shard, debits_posted, credits_posted), as one node answers.
async fn balances(client: &Client, ids: &[String]) -> BTreeMap<String, (String, u32, u64, u64)> {
    let response = client.get_accounts(ids.to_vec()).await.unwrap();
    assert!(response.not_found.is_empty(), "{:?}", response.not_found);
    response
        .accounts
        .into_iter()
        .map(|a| {
            (
                a.id.clone(),
                (a.region, a.shard, a.debits_posted, a.credits_posted),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_of_every_path_between_regions_from_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), REGIONS, 2, &[]);
    assert_eq!(demo.nodes.len(), 4);
    let map = demo.cluster_file().check().unwrap();
    let eu1 = client(&demo, "eu-1").await;

    // Accounts homed in each region, all created through eu-1; "eu-pair-*" share a shard.
    let mut accounts = vec![
        account("eu-pair-a", "eu", "eu-pair"),
        account("eu-pair-b", "eu", "eu-pair"),
    ];
    for region in ["eu", "us", "ap"] {
        for i in 0..4 {
            accounts.push(account(&format!("{region}-{i}"), region, ""));
        }
    }
    let results = eu1.create_accounts(accounts.clone()).await.unwrap();
    for r in &results {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    let ids: Vec<String> = accounts.iter().map(|a| a.id.clone()).collect();

    // Every account is on a shard of its region, and every node says the same.
    let seen = balances(&eu1, &ids).await;
    for (id, (region, shard, _, _)) in &seen {
        assert!(id.starts_with(region.as_str()), "{id} is homed in {region}");
        assert_eq!(&map.shards[*shard as usize].region, region, "{id}");
    }
    for node in ["eu-2", "us-1", "ap-1"] {
        let other = client(&demo, node).await;
        assert_eq!(balances(&other, &ids).await, seen, "as {node} sees them");
    }
    assert_eq!(
        seen["eu-pair-a"].1, seen["eu-pair-b"].1,
        "a shared placement key"
    );

    // The operator's view from any node: every node reachable under map version 1, every
    // shard led by its owner.
    let status = client(&demo, "ap-1").await.cluster_status().await.unwrap();
    assert_eq!(
        (status.answered_by.as_str(), status.map_version),
        ("ap-1", 1)
    );
    assert_eq!(status.regions, ["eu", "us", "ap"]);
    for n in &status.nodes {
        assert!(n.reachable && n.map_version == 1, "{n:?}");
    }
    assert_eq!(status.shards.len(), map.shards.len());
    for s in &status.shards {
        assert_eq!(s.leader, s.owner, "{s:?}");
        assert!(s.epoch >= 1, "{s:?}");
    }

    // A region not in the cluster is refused, naming the field.
    let err = eu1
        .create_accounts(vec![account("x", "sa", "")])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("accounts[0].region"), "{err}");

    // One transfer per path, each entering at a node that leads neither account where possible.
    let owner = |id: &str| map.shards[seen[id].1 as usize].owner.clone();
    let same_node_other_shard = (0..4)
        .map(|i| format!("eu-{i}"))
        .find(|id| owner(id) == owner("eu-0") && seen[id].1 != seen["eu-0"].1);
    let other_eu_node = (0..4)
        .map(|i| format!("eu-{i}"))
        .find(|id| owner(id) != owner("eu-0"));
    let mut paths = vec![
        (
            "same-shard",
            "eu-pair-a".to_string(),
            "eu-pair-b".to_string(),
            "ap-1",
        ),
        (
            "cross-region",
            "eu-0".to_string(),
            "us-0".to_string(),
            "ap-1",
        ),
        (
            "cross-region-2",
            "us-1".to_string(),
            "ap-1".to_string(),
            "eu-2",
        ),
        (
            "cross-region-3",
            "ap-2".to_string(),
            "eu-1".to_string(),
            "us-1",
        ),
    ];
    if let Some(id) = same_node_other_shard {
        paths.push(("cross-shard", "eu-0".into(), id, "us-1"));
    }
    if let Some(id) = other_eu_node {
        paths.push(("cross-node", "eu-0".into(), id, "eu-1"));
    }
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (n, (path, debit, credit, entry)) in paths.iter().enumerate() {
        let via = client(&demo, entry).await;
        let amount = 10 + n as u64;
        let id = format!("t-{path}");
        let result = via
            .transfer(usd_transfer(&id, debit, credit, amount))
            .await
            .unwrap();
        let t = committed(&result);
        assert_eq!(t.amount, amount, "{path}");
        expected.entry(debit.clone()).or_default().0 += amount;
        expected.entry(credit.clone()).or_default().1 += amount;
        // A retry with the same id through another node is answered, not applied again.
        let again = eu1
            .transfer(usd_transfer(&id, debit, credit, amount))
            .await
            .unwrap();
        assert!(again.replayed, "{path}: {again:?}");
    }

    // A hold across regions, posted through a third node.
    let hold = pb::Transfer {
        flags: Some(pb::TransferFlags {
            pending: true,
            ..Default::default()
        }),
        ..usd_transfer("hold-1", "us-2", "ap-3", 70)
    };
    committed(&client(&demo, "eu-2").await.transfer(hold).await.unwrap());
    let post = pb::Transfer {
        id: "post-1".into(),
        pending_id: "hold-1".into(),
        amount: 50,
        flags: Some(pb::TransferFlags {
            post_pending: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let posted = client(&demo, "ap-1").await.transfer(post).await.unwrap();
    assert_eq!(committed(&posted).amount, 50);
    expected.entry("us-2".into()).or_default().0 += 50;
    expected.entry("ap-3".into()).or_default().1 += 50;

    // Balances from any node; lookups by id from any node.
    for node in ["eu-1", "eu-2", "us-1", "ap-1"] {
        let via = client(&demo, node).await;
        let now = balances(&via, &ids).await;
        for (id, (debits, credits)) in &expected {
            assert_eq!(
                (now[id].2, now[id].3),
                (*debits, *credits),
                "{id} seen from {node}"
            );
        }
        let found = via
            .get_transfers(vec![
                "t-cross-region".into(),
                "post-1".into(),
                "nope".into(),
            ])
            .await
            .unwrap();
        assert_eq!(found.transfers.len(), 2, "from {node}: {found:?}");
        assert_eq!(found.not_found, vec!["nope".to_string()]);
        let entries = via.all_entries("us-0").await.unwrap();
        assert_eq!(entries.len(), 1, "us-0's statement from {node}");
    }

    demo.stop();
    let stores = Demo::open_stores_of(dir.path());
    let refs: Vec<_> = stores
        .iter()
        .map(|(s, st)| (*s, st as &dyn Store))
        .collect();
    let snapshot = checks::Snapshot::read_shards(&refs);
    let violations = checks::all(&snapshot);
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_takes_only_its_shards_and_in_flight_transfers_finish_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(dir.path(), REGIONS, 2, &[]);
    let eu1 = client(&demo, "eu-1").await;
    let accounts: Vec<pb::Account> = ["eu-a", "eu-b", "us-a", "ap-a"]
        .iter()
        .map(|id| account(id, &id[..2], ""))
        .collect();
    eu1.create_accounts(accounts).await.unwrap();
    committed(
        &eu1.transfer(usd_transfer("warm", "eu-a", "us-a", 1))
            .await
            .unwrap(),
    );

    demo.kill9("us-1");
    // The operator sees it (and `ledger cluster status` exits with 4, unavailable).
    let status = eu1.cluster_status().await.unwrap();
    for n in &status.nodes {
        assert_eq!(n.reachable, n.id != "us-1", "{n:?}");
    }
    for s in &status.shards {
        assert_eq!(s.leader.is_empty(), s.owner == "us-1", "{s:?}");
    }
    let cli = std::process::Command::new(ledger_bin())
        .args(["--addr", &demo.node("eu-1").addr, "cluster", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(cli.status.code(), Some(4), "{text}");
    assert!(
        text.contains("node us-1 region=us") && text.contains("UNREACHABLE"),
        "{text}"
    );
    // What needs us-1 fails cleanly; nothing else notices.
    let down = eu1.balance("us-a").await;
    assert!(down.is_err(), "us-a's node is down: {down:?}");
    committed(
        &eu1.transfer(usd_transfer("eu-ap", "eu-a", "ap-a", 2))
            .await
            .unwrap(),
    );
    let across = eu1.transfer(usd_transfer("eu-us", "eu-a", "us-a", 3)).await;
    let applied_before_restart = match &across {
        Ok(result) => matches!(
            result.outcome,
            Some(pb::transfer_result::Outcome::Transfer(_))
        ),
        Err(_) => false,
    };
    assert!(
        !applied_before_restart,
        "committed with its participant down: {across:?}"
    );

    demo.restart("us-1");
    // The same id again, until it has a final answer (a passing rejection, such as the first
    // try's abort not yet acknowledged by the restarted node, says to retry): applied once.
    let mut retried = None;
    for _ in 0..100 {
        let r = eu1
            .transfer(usd_transfer("eu-us", "eu-a", "us-a", 3))
            .await
            .unwrap();
        match &r.outcome {
            Some(pb::transfer_result::Outcome::Rejection(x)) if x.retriable => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            _ => {
                retried = Some(r);
                break;
            }
        }
    }
    let retried = retried.expect("a final answer once us-1 is back");
    committed(&retried);
    let us = client(&demo, "us-1").await;
    let balance = us.balance("us-a").await.unwrap();
    assert_eq!(balance.credits_posted, 4, "{retried:?}");
    // No lock left on either account: a new transfer between them commits.
    committed(
        &eu1.transfer(usd_transfer("after", "us-a", "eu-a", 1))
            .await
            .unwrap(),
    );
    // Every two-phase commit finishes, as the operator sees it.
    let mut in_flight = u32::MAX;
    for _ in 0..300 {
        let status = eu1.cluster_status().await.unwrap();
        in_flight = status
            .shards
            .iter()
            .map(|s| s.coordinating + s.prepared)
            .sum();
        if in_flight == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        in_flight, 0,
        "two-phase commits in flight 30 s after the restart"
    );

    demo.stop();
    let stores = Demo::open_stores_of(dir.path());
    let refs: Vec<_> = stores
        .iter()
        .map(|(s, st)| (*s, st as &dyn Store))
        .collect();
    let violations = checks::all(&checks::Snapshot::read_shards(&refs));
    assert!(violations.is_empty(), "{violations:#?}");
}
