//! A real network partition between regions: node ap-1 runs in a network namespace of its own,
//! joined to the others by a veth pair; taking the link down cuts ap off from eu and us, taking
//! it up heals the cut (iproute2's `ip netns` and `ip link`, as root). During the cut, calls
//! that need ap fail cleanly or wait, the rest of the cluster serves, and nothing is half
//! applied; after healing, every transfer settles, and every node's stores pass the invariant
//! checkers.
//!
//! With regional quotas: ap holds an allowance of an account homed in eu; cut off from eu, ap
//! goes on spending it at local latency, the home waits, and once the cut heals every spend
//! settles at home.
//!
//! It needs root and iproute2 (`.ci/run` installs it). Without the means to make a namespace
//! the test fails, saying why: a cluster test that cannot cut a link would be no test of one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ledger_client::{Client, pb};
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::process::{ledger_bin, ledgerd_bin, two_pc_in_flight_after};
use ledger_tests::wire::usd_transfer;

/// The transfers sent across the cut, each with its answer once it came.
type Sent = Arc<Mutex<Vec<(pb::Transfer, Option<pb::TransferResult>)>>>;

/// A network namespace with a veth pair to the root namespace: `10.<a>.<b>.1` outside,
/// `10.<a>.<b>.2` inside. Removed on drop.
struct Netns {
    name: String,
    outside: String,
    outside_ip: String,
    inside_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn new() -> Result<Netns, String> {
        // Unique per test of this process (they run at once), and per process.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(k < 2, "two namespaces per test process at most");
        let id = std::process::id();
        let name = format!("lgp{}{k}", id % 100_000);
        let (a, b) = (200 + (id / 125) % 50, (id % 125) * 2 + k);
        let ns = Netns {
            outside: format!("{name}o"),
            outside_ip: format!("10.{a}.{b}.1"),
            inside_ip: format!("10.{a}.{b}.2"),
            name,
        };
        let inside = format!("{}i", ns.name);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.outside,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.outside_ip),
            "dev",
            &ns.outside,
        ])?;
        ip(&["link", "set", &ns.outside, "up"])?;
        let inside_cmd = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside_cmd(&[
            "addr",
            "add",
            &format!("{}/24", ns.inside_ip),
            "dev",
            &inside,
        ])?;
        inside_cmd(&["link", "set", &inside, "up"])?;
        inside_cmd(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cut(&self) {
        ip(&["link", "set", &self.outside, "down"]).expect("cut");
    }

    fn heal(&self) {
        ip(&["link", "set", &self.outside, "up"]).expect("heal");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.outside]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A free port on `ip` in the root namespace.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node process; killed on drop.
struct NodeProcess {
    child: Child,
    addr: String,
    metrics: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start(config: &Path, netns: Option<&str>) -> NodeProcess {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(ledgerd_bin());
            c
        }
        None => Command::new(ledgerd_bin()),
    };
    let mut child = command
        .args(["start", "--config"])
        .arg(config)
        .env("LEDGER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ledgerd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |prefix: &str| {
        line.split(" | ")
            .find_map(|p| p.trim().strip_prefix(prefix))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {prefix:?} in {line:?}"))
    };
    NodeProcess {
        addr: format!("http://{}", field("ledgerd listening on ")),
        metrics: field("metrics: "),
        child,
    }
}

/// The cluster file and one config per node: eu-1 and us-1 outside, ap-1 inside.
fn write_cluster(dir: &Path, ns: &Netns) -> Vec<(String, PathBuf)> {
    let outside = &ns.outside_ip;
    let inside = &ns.inside_ip;
    let nodes = [
        (
            "eu-1",
            "eu",
            outside.clone(),
            free_port(outside),
            free_port(outside),
        ),
        (
            "us-1",
            "us",
            outside.clone(),
            free_port(outside),
            free_port(outside),
        ),
        // A fresh namespace: any port is free there.
        ("ap-1", "ap", inside.clone(), 50051, 51051),
    ];
    let mut file = String::from("version = 1\nshards = 6\n");
    for region in ["eu", "us", "ap"] {
        file += &format!("[[regions]]\nname = \"{region}\"\n");
    }
    for (id, region, host, client, peer) in &nodes {
        file += &format!(
            "[[nodes]]\nid = \"{id}\"\nregion = \"{region}\"\nclient_address = \"{host}:{client}\"\npeer_address = \"{host}:{peer}\"\n"
        );
    }
    for (i, (id, region, ..)) in nodes.iter().enumerate() {
        file += &format!(
            "[[shard]]\nids = \"{}-{}\"\nregion = \"{region}\"\nowner = \"{id}\"\n",
            2 * i,
            2 * i + 1
        );
    }
    let cluster = dir.join("cluster.toml");
    std::fs::write(&cluster, file).unwrap();
    let mut out = Vec::new();
    for (id, region, host, client, _) in &nodes {
        let data = dir.join(id);
        let config = format!(
            "listen = \"{host}:{client}\"\ndata_dir = \"{}\"\nnode_id = \"{id}\"\nregion = \"{region}\"\nshards = 6\n\
             [peer]\ncall_timeout_ms = 2000\n[shard]\nprepare_timeout_ms = 3000\nlock_wait_ms_max = 2000\n\
             [telemetry]\nmetrics_listen = \"{host}:0\"\n",
            data.display()
        );
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, config).unwrap();
        let status = Command::new(ledgerd_bin())
            .args(["init", "--config"])
            .arg(&path)
            .arg("--cluster")
            .arg(&cluster)
            .status()
            .unwrap();
        assert!(status.success(), "init {id}");
        out.push((id.to_string(), path));
    }
    out
}

/// Every node's shard stores (two shards a node, as `write_cluster` lays them out), opened
/// once the nodes are stopped.
fn stores_of(
    dir: &Path,
    configs: &[(String, PathBuf)],
) -> Vec<(ledger_domain::ShardId, ledger_store::Embedded)> {
    let mut stores = Vec::new();
    for (i, (id, _)) in configs.iter().enumerate() {
        let shards = [2 * i as u32, 2 * i as u32 + 1];
        let opened = ledger_store::open_shards_of(
            &dir.join(id),
            &shards,
            ledger_store::Limits::default(),
            Some(ledger_shard::keys::entry_group),
        )
        .unwrap();
        stores.extend(shards.map(ledger_domain::ShardId).into_iter().zip(opened));
    }
    stores
}

fn account(id: &str) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        region: id[..2].into(),
        ..Default::default()
    }
}

fn is_committed(r: &pb::TransferResult) -> bool {
    matches!(r.outcome, Some(pb::transfer_result::Outcome::Transfer(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_regions_fails_cleanly_and_everything_settles_after_healing() {
    let ns = Netns::new().unwrap_or_else(|e| {
        panic!("cannot make a network namespace for the partition (needs root and iproute2): {e}")
    });
    let dir = tempfile::tempdir().unwrap();
    let configs = write_cluster(dir.path(), &ns);
    let mut nodes = HashMap::new();
    for (id, config) in &configs {
        let netns = (id == "ap-1").then_some(ns.name.as_str());
        nodes.insert(id.clone(), start(config, netns));
    }
    let eu = Client::connect(&nodes["eu-1"].addr).await.unwrap();
    let accounts = ["eu-a", "eu-b", "eu-c", "us-a", "ap-a"]
        .map(account)
        .to_vec();
    for r in eu.create_accounts(accounts).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    assert!(is_committed(
        &eu.transfer(usd_transfer("warm", "eu-a", "ap-a", 1))
            .await
            .unwrap()
    ));

    // Transfers across the cut, sent all along; their answers (if any) are kept.
    let sent: Sent = Arc::default();
    let sender = {
        let (sent, eu) = (sent.clone(), eu.clone());
        tokio::spawn(async move {
            for n in 0.. {
                let (debit, credit) = if n % 2 == 0 {
                    ("eu-a", "ap-a")
                } else {
                    ("ap-a", "eu-b")
                };
                let t = usd_transfer(&format!("x-{n}"), debit, credit, 1);
                // Known before it is sent: a call cut short by the end of the test may still
                // be applied.
                sent.lock().unwrap().push((t.clone(), None));
                let answer = eu.transfer(t).await.ok();
                sent.lock().unwrap()[n].1 = answer;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    ns.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Across the cut: an error or a retriable rejection, within the deadlines, nothing applied.
    let across = eu.transfer(usd_transfer("cut-1", "eu-a", "ap-a", 5)).await;
    match &across {
        Ok(r) => assert!(!is_committed(r), "committed across a cut: {r:?}"),
        Err(e) => eprintln!("across the cut: {e}"),
    }
    assert!(eu.balance("ap-a").await.is_err(), "ap-a's node is cut off");
    // The rest of the cluster serves (accounts no transfer across the cut touches: one that
    // does may be locked by a leg prepared before the cut, until the cut heals).
    assert!(is_committed(
        &eu.transfer(usd_transfer("eu-us", "eu-c", "us-a", 2))
            .await
            .unwrap()
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ns.heal();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sender.abort();

    // Every transfer settles with the same id; an acknowledged outcome stays what it was.
    let mut all = sent.lock().unwrap().clone();
    all.push((usd_transfer("cut-1", "eu-a", "ap-a", 5), across.ok()));
    let mut committed: HashMap<&str, u64> = HashMap::new();
    for (t, answer) in &all {
        let mut settled = None;
        for _ in 0..100 {
            match eu.transfer(t.clone()).await {
                Ok(r) if !matches!(&r.outcome, Some(pb::transfer_result::Outcome::Rejection(x)) if x.retriable) =>
                {
                    settled = Some(r);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let settled = settled.unwrap_or_else(|| panic!("{} never settled", t.id));
        if let Some(answer) = answer
            && !matches!(&answer.outcome, Some(pb::transfer_result::Outcome::Rejection(x)) if x.retriable)
        {
            assert_eq!(
                settled.outcome, answer.outcome,
                "{} changed its outcome",
                t.id
            );
        }
        if is_committed(&settled) {
            *committed.entry(t.debit_account_id.as_str()).or_default() += t.amount;
        }
    }
    assert!(all.len() > 5, "the sender barely ran");
    let ap = Client::connect(&nodes["ap-1"].addr).await;
    let ap_balance = match ap {
        Ok(ap) => ap.balance("ap-a").await.unwrap(),
        // From the root namespace the inside address is reachable through the veth.
        Err(e) => panic!("cannot reach ap-1 after healing: {e}"),
    };
    assert_eq!(
        ap_balance.debits_posted,
        committed.get("ap-a").copied().unwrap_or(0)
    );

    // Recovery finishes everywhere; then every node's stores pass the checkers.
    let urls: Vec<String> = nodes.values().map(|n| n.metrics.clone()).collect();
    let in_flight = two_pc_in_flight_after(&urls, Duration::from_secs(30)).await;
    assert_eq!(
        in_flight, 0.0,
        "two-phase commits in flight 30 s after healing"
    );
    drop(nodes);
    let stores = stores_of(dir.path(), &configs);
    let refs: Vec<_> = stores
        .iter()
        .map(|(s, st)| (*s, st as &dyn Store))
        .collect();
    let violations = checks::all(&checks::Snapshot::read_shards(&refs));
    assert!(violations.is_empty(), "{violations:#?}");
}

fn committed_transfer(r: &pb::TransferResult) -> &pb::Transfer {
    match &r.outcome {
        Some(pb::transfer_result::Outcome::Transfer(t)) => t,
        other => panic!("not committed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_off_from_the_home_spends_its_allowance_and_settles_after_healing() {
    let ns = Netns::new().unwrap_or_else(|e| {
        panic!("cannot make a network namespace for the partition (needs root and iproute2): {e}")
    });
    let dir = tempfile::tempdir().unwrap();
    let configs = write_cluster(dir.path(), &ns);
    let mut nodes = HashMap::new();
    for (id, config) in &configs {
        let netns = (id == "ap-1").then_some(ns.name.as_str());
        nodes.insert(id.clone(), start(config, netns));
    }
    let eu = Client::connect(&nodes["eu-1"].addr).await.unwrap();
    let token = std::fs::read_to_string(dir.path().join("eu-1/admin.token")).unwrap();
    let operator = eu.clone().with_admin_token(&token).unwrap();
    let payer = pb::Account {
        flags: Some(pb::AccountFlags {
            debits_must_not_exceed_credits: true,
            ..Default::default()
        }),
        ..account("eu-payer")
    };
    for r in eu
        .create_accounts(vec![account("eu-bank"), payer, account("ap-shop")])
        .await
        .unwrap()
    {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    assert!(is_committed(
        &eu.transfer(usd_transfer("fund", "eu-bank", "eu-payer", 1_000))
            .await
            .unwrap()
    ));
    operator
        .set_quota(pb::SetQuotaRequest {
            account_id: "eu-payer".into(),
            region: "ap".into(),
            amount: 500,
            lease_seconds: 3_600,
        })
        .await
        .unwrap();
    let quota = |op: Client| async move {
        op.get_quotas("eu-payer")
            .await
            .unwrap()
            .quotas
            .into_iter()
            .find(|q| q.region == "ap")
            .expect("ap's allowance")
    };
    let mut granted = false;
    for _ in 0..100 {
        let q = quota(operator.clone()).await;
        if q.region_answered && q.available == 500 {
            granted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(granted, "ap never got its allowance");
    // A first spend in ap (which also lets ap-1 learn where both accounts live).
    let ap = Client::connect(&nodes["ap-1"].addr).await.unwrap();
    let first = ap
        .transfer(usd_transfer("q-0", "eu-payer", "ap-shop", 10))
        .await
        .unwrap();
    assert!(committed_transfer(&first).quota_path, "{first:?}");

    ns.cut();
    // Cut off from the home, ap spends within its allowance at once: a client inside ap's
    // namespace (the only side that can reach ap-1 now), the `ledger` CLI.
    for n in 1..=20 {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(ledger_bin())
            .args(["--addr", &nodes["ap-1"].addr, "transfer", "create"])
            .arg(format!("q-{n}"))
            .args([
                "--debit", "eu-payer", "--credit", "ap-shop", "--amount", "10",
            ])
            .args(["--ledger", "USD"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("quota_path"),
            "q-{n}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The home waits: what ap spent stays reserved; nothing is posted at home yet beyond
    // what settled before the cut.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let home = eu.balance("eu-payer").await.unwrap();
    assert!(home.debits_posted <= 10, "{home:?}");
    assert_eq!(home.debits_pending + home.debits_posted, 500, "{home:?}");
    let seen_from_home = quota(operator.clone()).await;
    assert!(!seen_from_home.region_answered, "{seen_from_home:?}");
    ns.heal();

    // Every spend settles at home, once.
    let mut last = None;
    for _ in 0..300 {
        let q = quota(operator.clone()).await;
        let done = q.region_answered && q.in_flight == 0 && q.settled == 210;
        last = Some(q);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let q = last.expect("asked");
    assert!(
        q.settled == 210 && q.in_flight == 0,
        "not settled after healing: {q:?}"
    );
    assert_eq!((q.spent, q.reserved, q.available), (210, 290, 290));
    let home = eu.balance("eu-payer").await.unwrap();
    assert_eq!((home.debits_posted, home.debits_pending), (210, 290));
    assert_eq!(ap.balance("ap-shop").await.unwrap().credits_posted, 210);

    drop(nodes);
    let stores = stores_of(dir.path(), &configs);
    let refs: Vec<_> = stores
        .iter()
        .map(|(s, st)| (*s, st as &dyn Store))
        .collect();
    let snapshot = checks::Snapshot::read_shards(&refs);
    let violations = [checks::all(&snapshot), checks::quotas_settled(&snapshot)].concat();
    assert!(violations.is_empty(), "{violations:#?}");
}
