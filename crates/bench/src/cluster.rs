//! The bench against a cluster: `ledger-bench --cluster eu:2,us,ap --wan-delay-ms 50` starts
//! `ledgerd demo` (one process per node), opens accounts in every region, and measures each
//! path a transfer can take, one after the other: throughput and p50/p99/p99.9 latency of
//! single-transfer calls, each sent to the node that leads its debit account (or, for the last
//! path, to a node of a third region), next to the wide-area round trips the path needs.

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
    _dir: tempfile::TempDir,
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
        Ok(Demo {
            child,
            nodes,
            _dir: dir,
        })
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
        let until = Instant::now() + plan.duration;
        let started = Instant::now();
        let tasks: Vec<_> = (0..plan.clients)
            .map(|n| {
                let (clients, pairs) = (Arc::clone(&clients), Arc::clone(&pairs));
                let seed = plan.seed ^ ((p as u64) << 32) ^ n as u64;
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let mut tally = Tally::default();
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
                            Ok(r)
                                if matches!(
                                    r.outcome,
                                    Some(pb::transfer_result::Outcome::Transfer(_))
                                ) =>
                            {
                                tally.committed += 1;
                            }
                            Ok(_) => *tally.rejections.entry("rejected".into()).or_default() += 1,
                            Err(_) => tally.errors += 1,
                        }
                    }
                    tally
                })
            })
            .collect();
        let mut tally = Tally::default();
        for t in futures::future::join_all(tasks).await {
            tally.merge(t.map_err(|e| e.to_string())?);
        }
        let bound = path.round_trips * 2 * plan.wan_delay_ms;
        let extra = vec![(
            "wide-area bound".to_string(),
            format!(
                "{} round trips x {} ms = {bound} ms (plus the local work: fsyncs, calls)",
                path.round_trips,
                2 * plan.wan_delay_ms
            ),
        )];
        report::print(
            &format!("path: {}", path.name),
            &mut tally,
            started.elapsed(),
            &extra,
        );
    }
    Ok(())
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
