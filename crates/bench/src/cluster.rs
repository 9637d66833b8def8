//! The bench against a cluster: `ledger-bench --cluster eu:2,us,ap --wan-delay-ms 50` starts
//! `ledgerd demo` (one process per node), opens accounts in every region, and measures each
//! path a transfer can take, one after the other: throughput and p50/p99/p99.9 latency of
//! single-transfer calls, each sent to the node that leads its debit account (or, for the last
//! path, to a node of a third region), next to the wide-area round trips the path needs.
//! Then regional quotas: accounts homed elsewhere get allowances in the last region, sized to
//! demand, and their debits entering that region are measured against same-region transfers
//! called at the same node, with the share that took the quota path and the settlement lag
//! (a probe: a quota-path transfer's ack to its entry in the home's statement).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use ledger_client::{Client, pb};

use crate::ledger::sibling_binary;
use crate::report::{self, Tally};

/// Accounts placed by id in each region.
const ACCOUNTS_PER_REGION: usize = 64;

/// What the cluster bench runs.
pub struct Plan {
    pub regions: String,
    pub shards_per_node: u32,
    pub wan_delay_ms: u64,
    pub clients: usize,
    pub duration: Duration,
    pub seed: u64,
}

/// A `ledgerd demo` the bench started; stopped (with its nodes) on drop.
struct Demo {
    child: Child,
    /// (node id, region, address)
    nodes: Vec<(String, String, String)>,
    dir: tempfile::TempDir,
}

impl Demo {
    fn start(plan: &Plan) -> Result<Demo, String> {
        let dir = tempfile::Builder::new()
            .prefix("ledger-bench-cluster-")
            .tempdir_in(".")
            .map_err(|e| e.to_string())?;
        let bin = sibling_binary("ledgerd")?;
        let mut child = Command::new(&bin)
            .args(["demo", "--regions", &plan.regions, "--shards-per-node"])
            .arg(plan.shards_per_node.to_string())
            .arg("--wan-delay-ms")
            .arg(plan.wan_delay_ms.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .env("LEDGER_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut nodes = Vec::new();
        for line in lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            if line.starts_with("demo cluster running") {
                break;
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|p| p.strip_prefix(&format!("{name}=")))
                    .map(str::to_string)
            };
            if let (Some(id), Some(region), Some(addr)) =
                (field("node"), field("region"), field("addr"))
            {
                nodes.push((id, region, format!("http://{addr}")));
            }
        }
        std::thread::spawn(move || for _ in lines {});
        if nodes.is_empty() {
            return Err("ledgerd demo started no node".into());
        }
        Ok(Demo { child, nodes, dir })
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A path and the pairs of accounts (debit, credit, node to call) that take it.
struct Path {
    name: &'static str,
    /// Wide-area round trips a transfer on this path needs.
    round_trips: u64,
    pairs: Vec<(String, String, usize)>,
}

pub async fn run(plan: Plan) -> Result<(), String> {
    let demo = Demo::start(&plan)?;
    println!(
        "cluster: {} nodes ({}), simulated one-way delay between regions {} ms",
        demo.nodes.len(),
        plan.regions,
        plan.wan_delay_ms
    );
    let mut clients = Vec::new();
    for (_, _, addr) in &demo.nodes {
        clients.push(Client::connect(addr).await.map_err(|e| e.to_string())?);
    }
    let status = clients[0]
        .cluster_status()
        .await
        .map_err(|e| e.to_string())?;
    let node_index = |id: &str| demo.nodes.iter().position(|(n, _, _)| n == id);
    let region_of_node = |i: usize| demo.nodes[i].1.clone();

    // Accounts: per region, ACCOUNTS_PER_REGION placed by id and four pairs sharing a
    // placement key: enough that clients seldom wait for each other's locks, which would
    // measure contention rather than the path.
    let mut accounts = Vec::new();
    for region in &status.regions {
        for i in 0..ACCOUNTS_PER_REGION {
            accounts.push(account(&format!("b-{region}-{i}"), region, ""));
        }
        for i in 0..4 {
            for side in ["a", "b"] {
                let key = format!("p-{region}-{i}");
                accounts.push(account(&format!("{key}-{side}"), region, &key));
            }
        }
    }
    let ids: Vec<String> = accounts.iter().map(|a| a.id.clone()).collect();
    for chunk in accounts.chunks(64) {
        for r in clients[0]
            .create_accounts(chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?
        {
            if !matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))) {
                return Err(format!("creating account {}: {r:?}", r.id));
            }
        }
    }
    let found = clients[0]
        .get_accounts(ids.clone())
        .await
        .map_err(|e| e.to_string())?;
    // id -> (shard, owner node index, region)
    let mut place: BTreeMap<String, (u32, usize, String)> = BTreeMap::new();
    for a in found.accounts {
        let owner = &status.shards[a.shard as usize].owner;
        let node = node_index(owner).ok_or_else(|| format!("no node {owner}"))?;
        place.insert(a.id.clone(), (a.shard, node, a.region.clone()));
    }

    // Every node learns where every account lives (what it would after its first transfer
    // with each): the paths below are measured in that steady state.
    for client in &clients {
        client
            .get_accounts(ids.clone())
            .await
            .map_err(|e| e.to_string())?;
    }

    let mut paths = vec![
        Path {
            name: "same shard",
            round_trips: 0,
            pairs: Vec::new(),
        },
        Path {
            name: "cross-shard, same node",
            round_trips: 0,
            pairs: Vec::new(),
        },
        Path {
            name: "cross-node, same region",
            round_trips: 0,
            pairs: Vec::new(),
        },
        Path {
            name: "cross-region (called at the debit's node)",
            round_trips: 2,
            pairs: Vec::new(),
        },
        Path {
            name: "cross-region (called in a third region)",
            round_trips: 3,
            pairs: Vec::new(),
        },
    ];
    for (d, (ds, dn, dr)) in &place {
        for (c, (cs, cn, cr)) in &place {
            if d == c {
                continue;
            }
            let path = if ds == cs {
                0
            } else if dn == cn {
                1
            } else if dr == cr {
                2
            } else {
                3
            };
            paths[path].pairs.push((d.clone(), c.clone(), *dn));
            if path == 3
                && let Some(third) = (0..demo.nodes.len())
                    .find(|n| region_of_node(*n) != *dr && region_of_node(*n) != *cr)
            {
                paths[4].pairs.push((d.clone(), c.clone(), third));
            }
        }
    }

    let clients = Arc::new(clients);
    for (p, path) in paths.into_iter().enumerate() {
        if path.pairs.is_empty() {
            println!(
                "path: {}: no pair of accounts takes it in this cluster; skipped",
                path.name
            );
            continue;
        }
        let pairs = Arc::new(path.pairs);
        // One transfer per entry node first: each node learns where the accounts live.
        for (i, (debit, credit, node)) in pairs.iter().enumerate().take(32) {
            let t = transfer(&format!("warm-{p}-{i}"), debit, credit);
            clients[*node]
                .transfer(t)
                .await
                .map_err(|e| e.to_string())?;
        }
        let (mut tally, elapsed, _) = measure(&plan, &clients, &pairs, p).await?;
        let bound = path.round_trips * 2 * plan.wan_delay_ms;
        let extra = vec![(
            "wide-area bound".to_string(),
            format!(
                "{} round trips x {} ms = {bound} ms (plus the local work: fsyncs, calls)",
                path.round_trips,
                2 * plan.wan_delay_ms
            ),
        )];
        report::print(&format!("path: {}", path.name), &mut tally, elapsed, &extra);
    }
    quotas(&plan, &demo, &clients, &status, &place).await
}

/// Runs `plan.clients` clients for `plan.duration`, each sending single-transfer calls for
/// random pairs of `pairs` to the pair's node. Returns the tally, the time taken and how many
/// commits took the quota path.
async fn measure(
    plan: &Plan,
    clients: &Arc<Vec<Client>>,
    pairs: &Arc<Vec<(String, String, usize)>>,
    p: usize,
) -> Result<(Tally, Duration, u64), String> {
    let until = Instant::now() + plan.duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..plan.clients)
        .map(|n| {
            let (clients, pairs) = (Arc::clone(clients), Arc::clone(pairs));
            let seed = plan.seed ^ ((p as u64) << 32) ^ n as u64;
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut tally = Tally::default();
                let mut quota_path = 0u64;
                let mut k = 0u64;
                while Instant::now() < until {
                    let (debit, credit, node) = &pairs[rng.random_range(0..pairs.len())];
                    let t = transfer(&format!("t-{p}-{n}-{k}"), debit, credit);
                    k += 1;
                    let sent = Instant::now();
                    let result = clients[*node].transfer(t).await;
                    tally.record(sent.elapsed());
                    tally.transfers += 1;
                    match result {
                        Ok(pb::TransferResult {
                            outcome: Some(pb::transfer_result::Outcome::Transfer(t)),
                            ..
                        }) => {
                            tally.committed += 1;
                            quota_path += u64::from(t.quota_path);
                        }
                        Ok(_) => *tally.rejections.entry("rejected".into()).or_default() += 1,
                        Err(_) => tally.errors += 1,
                    }
                }
                (tally, quota_path)
            })
        })
        .collect();
    let mut tally = Tally::default();
    let mut quota_path = 0;
    for t in futures::future::join_all(tasks).await {
        let (t, q) = t.map_err(|e| e.to_string())?;
        tally.merge(t);
        quota_path += q;
    }
    Ok((tally, started.elapsed(), quota_path))
}

/// Debit accounts of other regions per region granted an allowance in the spending region.
const QUOTA_DEBITS_PER_REGION: usize = 32;
/// Each allowance: more than the run can spend (amounts are 1).
const QUOTA_AMOUNT: u64 = 1_000_000_000;
/// Settlement-lag samples the probe takes.
const LAG_SAMPLES: usize = 200;

/// The quota path against same-region transfers, in the last region of the map.
async fn quotas(
    plan: &Plan,
    demo: &Demo,
    clients: &Arc<Vec<Client>>,
    status: &pb::ClusterStatusResponse,
    place: &BTreeMap<String, (u32, usize, String)>,
) -> Result<(), String> {
    let Some(region) = status.regions.last().cloned() else {
        return Ok(());
    };
    if status.regions.len() < 2 {
        println!("path: quota: one region, no allowance to grant; skipped");
        return Ok(());
    }
    let entry = demo
        .nodes
        .iter()
        .position(|(_, r, _)| *r == region)
        .ok_or("no node in the spending region")?;
    // Credits: the spending region's accounts on the entry node.
    let credits: Vec<&String> = place
        .iter()
        .filter(|(id, (_, node, r))| *node == entry && *r == region && id.starts_with("b-"))
        .map(|(id, _)| id)
        .collect();
    let mut debits: Vec<&String> = Vec::new();
    for other in status.regions.iter().filter(|r| **r != region) {
        debits.extend(
            place
                .iter()
                .filter(|(id, (_, _, r))| r == other && id.starts_with("b-"))
                .map(|(id, _)| id)
                .take(QUOTA_DEBITS_PER_REGION),
        );
    }
    let token = std::fs::read_to_string(demo.dir.path().join("admin.token"))
        .map_err(|e| format!("the demo's admin token: {e}"))?;
    let operator = clients[entry]
        .clone()
        .with_admin_token(&token)
        .map_err(|e| e.to_string())?;
    // The probe's own account, homed in the first region: its statement holds only the probe's
    // settlements.
    let probe = "lag-probe".to_string();
    let home_region = status.regions[0].clone();
    clients[0]
        .create_accounts(vec![account(&probe, &home_region, "")])
        .await
        .map_err(|e| e.to_string())?;
    let probe_shard = clients[0]
        .get_accounts(vec![probe.clone()])
        .await
        .map_err(|e| e.to_string())?
        .accounts
        .first()
        .map(|a| a.shard)
        .ok_or("the probe account was not created")?;
    let owner = &status.shards[probe_shard as usize].owner;
    let probe_home = demo
        .nodes
        .iter()
        .position(|(id, _, _)| id == owner)
        .ok_or("no node leads the probe's shard")?;
    debits.push(&probe);
    for debit in &debits {
        operator
            .set_quota(pb::SetQuotaRequest {
                account_id: (*debit).clone(),
                region: region.clone(),
                amount: QUOTA_AMOUNT,
                lease_seconds: 3_600,
            })
            .await
            .map_err(|e| format!("granting {debit}: {e}"))?;
    }
    for debit in &debits {
        let mut ready = false;
        for _ in 0..200 {
            let q = operator
                .get_quotas(debit)
                .await
                .map_err(|e| e.to_string())?;
            if q.quotas
                .iter()
                .any(|q| q.region_answered && q.available > 0)
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            return Err(format!("{region} never got its allowance of {debit}"));
        }
    }
    let same_region: Vec<(String, String, usize)> = credits
        .iter()
        .flat_map(|d| {
            credits
                .iter()
                .filter(move |c| *c != d)
                .map(move |c| ((*d).clone(), (*c).clone(), entry))
        })
        .collect();
    let quota_pairs: Vec<(String, String, usize)> = debits
        .iter()
        .filter(|d| ***d != probe)
        .flat_map(|d| {
            credits
                .iter()
                .map(move |c| ((*d).clone(), (*c).clone(), entry))
        })
        .collect();
    if same_region.is_empty() || quota_pairs.is_empty() {
        println!(
            "path: quota: too few accounts on {}; skipped",
            demo.nodes[entry].0
        );
        return Ok(());
    }
    let (mut same, same_elapsed, _) = measure(plan, clients, &Arc::new(same_region), 100).await?;
    report::print(
        &format!(
            "path: same region, called at {} (for the quota path)",
            demo.nodes[entry].0
        ),
        &mut same,
        same_elapsed,
        &[],
    );
    let lag = tokio::spawn(settlement_lag(
        Arc::clone(clients),
        entry,
        probe_home,
        probe.clone(),
        credits[0].clone(),
        plan.duration,
    ));
    let (mut quota, elapsed, quota_path) =
        measure(plan, clients, &Arc::new(quota_pairs), 101).await?;
    let lag = lag.await.map_err(|e| e.to_string())??;
    let share = quota_path as f64 / quota.committed.max(1) as f64;
    let same_p99 = same.latency_at(0.99);
    let quota_p99 = quota.latency_at(0.99);
    let extra = vec![
        (
            "took the quota path".to_string(),
            format!(
                "{quota_path} of {} committed ({:.1}%)",
                quota.committed,
                100.0 * share
            ),
        ),
        ("settlement lag (probe)".to_string(), lag),
        (
            "p99 against same-region p99 (above)".to_string(),
            format!(
                "{:.2} ms / {:.2} ms = {:.2}x",
                quota_p99 as f64 / 1_000.0,
                same_p99 as f64 / 1_000.0,
                quota_p99 as f64 / same_p99.max(1) as f64
            ),
        ),
    ];
    report::print(
        &format!(
            "path: cross-region debit by the quota path of {region}, called at {}",
            demo.nodes[entry].0
        ),
        &mut quota,
        elapsed,
        &extra,
    );
    Ok(())
}

/// Settlement lag: quota-path transfers of `probe` sent one at a time through `entry`, each
/// timed from its acknowledgement to its entry in the statement read at `home` (the node
/// leading the probe's home shard), polled every 2 ms.
async fn settlement_lag(
    clients: Arc<Vec<Client>>,
    entry: usize,
    home: usize,
    probe: String,
    credit: String,
    duration: Duration,
) -> Result<String, String> {
    let until = Instant::now() + duration;
    let mut lags = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut k = 0;
    while Instant::now() < until && (lags.len() as usize) < LAG_SAMPLES {
        let id = format!("lag-{k}");
        k += 1;
        let answer = clients[entry]
            .transfer(transfer(&id, &probe, &credit))
            .await
            .map_err(|e| e.to_string())?;
        let acked = Instant::now();
        match answer.outcome {
            Some(pb::transfer_result::Outcome::Transfer(t)) if t.quota_path => {}
            other => {
                return Err(format!(
                    "the probe's {id} did not take the quota path: {other:?}"
                ));
            }
        }
        loop {
            let page = clients[home]
                .entries(&probe, 1_000, String::new())
                .await
                .map_err(|e| e.to_string())?;
            if page.entries.iter().rev().any(|e| e.transfer_id == id) {
                break;
            }
            if acked.elapsed() > Duration::from_secs(30) {
                let last = page.entries.last().map(|e| e.transfer_id.clone());
                return Err(format!(
                    "{id} not settled in 30 s: {} entries, the last {last:?}",
                    page.entries.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.record(acked.elapsed().as_micros() as u64)
            .map_err(|e| e.to_string())?;
    }
    Ok(format!(
        "p50 {:.1} ms  p99 {:.1} ms  ({} samples)",
        lags.value_at_quantile(0.5) as f64 / 1_000.0,
        lags.value_at_quantile(0.99) as f64 / 1_000.0,
        lags.len()
    ))
}

fn account(id: &str, region: &str, placement_key: &str) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        region: region.into(),
        placement_key: placement_key.into(),
        ..Default::default()
    }
}

fn transfer(id: &str, debit: &str, credit: &str) -> pb::Transfer {
    pb::Transfer {
        id: id.into(),
        debit_account_id: debit.into(),
        credit_account_id: credit.into(),
        amount: 1,
        ledger: "USD".into(),
        ..Default::default()
    }
}
