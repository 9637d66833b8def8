//! Leadership moves between the nodes of a region that share their shards' stores, as they do
//! on FoundationDB: three real `ledgerd` servers in this process (`ledger_server::run_shared`,
//! real gRPC between them), two in region eu sharing one memory store per eu shard, one in
//! region us. The map's owner of a shard is only its preferred leader; the lease decides.
//!
//! - eu-1 is paused (every store read and commit of its node waits, as for a process stopped
//!   or cut off from its store): its lease lapses, eu-2 takes its shards, transfers through
//!   eu-2 and us-1 go on (us-1 follows hints across regions); a transfer eu-1 had taken in is
//!   not lost or applied twice; eu-1, woken, has stepped down and does not take its shards back.
//! - eu-2 is stopped: it gives up its leases and eu-1 leads every eu shard.
//!
//! Every acknowledged transfer is in the final balances exactly once, and the invariants hold
//! over the stores.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ledger_client::{Client, pb};
use ledger_domain::ShardId;
use ledger_server::{Config, SharedStores};
use ledger_shard::read;
use ledger_store::{
    CommitError, CommitFuture, Error, Memory, Pairs, ReadFuture, Store, WriteBatch,
};
use ledger_tests::checks;
use ledger_tests::wire::usd_transfer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

const LEASE_MS: u64 = 3_000;
/// How long a call may take to succeed while leadership moves (retried meanwhile).
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// One node's access to the shared stores, which the test can freeze: while paused, every
/// read and commit of that node waits (the other nodes' do not).
#[derive(Clone)]
struct Gate {
    paused: Arc<(Mutex<bool>, Condvar)>,
    open: Arc<watch::Sender<bool>>,
}

impl Gate {
    fn new() -> Self {
        Self {
            paused: Arc::new((Mutex::new(false), Condvar::new())),
            open: Arc::new(watch::channel(true).0),
        }
    }

    fn pause(&self) {
        *self.paused.0.lock().unwrap() = true;
        self.open.send_replace(false);
    }

    fn resume(&self) {
        *self.paused.0.lock().unwrap() = false;
        self.paused.1.notify_all();
        self.open.send_replace(true);
    }

    fn wait_blocking(&self) {
        let (lock, resumed) = &*self.paused;
        let mut paused = lock.lock().unwrap();
        while *paused {
            paused = resumed.wait(paused).unwrap();
        }
    }

    async fn wait(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

struct Gated {
    inner: Arc<Memory>,
    gate: Gate,
}

impl Store for Gated {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.gate.wait_blocking();
        self.inner.get(key)
    }

    fn get_many_async(&self, keys: Vec<Vec<u8>>) -> ReadFuture<'_> {
        Box::pin(async move {
            self.gate.wait().await;
            keys.iter().map(|key| self.inner.get(key)).collect()
        })
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error> {
        self.gate.wait_blocking();
        self.inner.scan(start, end, limit)
    }

    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        self.gate.wait_blocking();
        self.inner.commit(batch)
    }

    fn commit_async(&self, batch: WriteBatch) -> CommitFuture<'_> {
        Box::pin(async move {
            self.gate.wait().await;
            self.inner.commit_owned(batch)
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// A node serving in this process, on a tokio runtime of its own (as its own process would
/// be: a paused node's waiting threads are its own).
struct Running {
    id: &'static str,
    addr: String,
    gate: Gate,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Drop for Running {
    /// A test that fails while a node is paused must not leave threads waiting for ever.
    fn drop(&mut self) {
        self.gate.resume();
    }
}

impl Running {
    async fn stop(mut self) {
        self.gate.resume();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Nodes eu-1 and eu-2 (eu, shards 0-1 and 2-3), us-1 (us, shards 4-5); all stores of a region
/// shared by its nodes. Returns the nodes and every shard's store.
async fn start(dir: &std::path::Path) -> (Vec<Running>, Vec<Arc<Memory>>) {
    let nodes = [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")];
    let mut listeners = Vec::new();
    let mut file = String::from(
        "version = 1\nshards = 6\n[[regions]]\nname = \"eu\"\n[[regions]]\nname = \"us\"\n",
    );
    for (id, region) in nodes {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = listener.local_addr().unwrap();
        let peer = free_port().await;
        file.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\nregion = \"{region}\"\nclient_address = \"{client}\"\npeer_address = \"127.0.0.1:{peer}\"\n"
        ));
        listeners.push(listener);
    }
    file.push_str("[[shard]]\nids = \"0-1\"\nregion = \"eu\"\nowner = \"eu-1\"\n");
    file.push_str("[[shard]]\nids = \"2-3\"\nregion = \"eu\"\nowner = \"eu-2\"\n");
    file.push_str("[[shard]]\nids = \"4-5\"\nregion = \"us\"\nowner = \"us-1\"\n");
    let cluster = dir.join("cluster.toml");
    std::fs::write(&cluster, file).unwrap();
    let stores: Vec<Arc<Memory>> = (0..6).map(|_| Arc::new(Memory::new())).collect();
    let mut running = Vec::new();
    for ((id, region), listener) in nodes.into_iter().zip(listeners) {
        let mut config = ledger_tests::process::test_config(&dir.join(id), 6);
        config.node_id = id.into();
        config.region = region.into();
        config.shard.lease_ms = LEASE_MS;
        config.request_timeout_ms = 2_000;
        config.peer.call_timeout_ms = 500;
        ledger_server::init(&config, Some(&cluster)).expect("init");
        let gate = Gate::new();
        let shared: SharedStores = {
            let (stores, gate) = (stores.clone(), gate.clone());
            Arc::new(move |shard: ShardId| {
                Arc::new(Gated {
                    inner: Arc::clone(&stores[shard.0 as usize]),
                    gate: gate.clone(),
                }) as Arc<dyn Store>
            })
        };
        running.push(serve(id, config, listener, shared, gate).await);
        // Its own shards' leases before the next node starts: a standby that found one not
        // yet taken would take it after its grace, and the test would start from there.
        let owned: &[usize] = match id {
            "eu-1" => &[0, 1],
            "eu-2" => &[2, 3],
            _ => &[4, 5],
        };
        for shard in owned {
            let deadline = tokio::time::Instant::now() + SETTLE_MAX;
            loop {
                let lease = read::lease(&*stores[*shard], ShardId(*shard as u32)).unwrap();
                if lease.is_some_and(|l| l.node == id) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{id} never led {shard}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (running, stores)
}

async fn serve(
    id: &'static str,
    config: Config,
    listener: std::net::TcpListener,
    shared: SharedStores,
    gate: Gate,
) -> Running {
    let addr = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, ready) = oneshot::channel();
    let (done_tx, done) = oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            let shutdown = async {
                let _ = stopped.await;
            };
            ledger_server::run_shared(config, Some(listener), shared, shutdown, move |_| {
                let _ = ready_tx.send(());
            })
            .await
            .expect("server runs");
        });
        let _ = done_tx.send(());
    });
    ready.await.expect("server started");
    Running {
        id,
        addr,
        gate,
        stop: Some(stop),
        done: Some(done),
    }
}

/// Retries `call` while it fails for want of a leader (unavailable, or out of time) until
/// it succeeds or `SETTLE_MAX` has passed.
async fn settled<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ledger_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        match call().await {
            Ok(value) => return value,
            Err(e) => {
                let code = e.status().map(tonic::Status::code);
                let retry = matches!(
                    code,
                    Some(
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                    )
                );
                assert!(retry, "{what}: {e}");
                assert!(tokio::time::Instant::now() < deadline, "{what}: still {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn committed(result: &pb::TransferResult) -> bool {
    matches!(
        result.outcome,
        Some(pb::transfer_result::Outcome::Transfer(_))
    )
}

/// Who leads each eu shard by its lease, as `via` reports.
async fn leaders(via: &Client) -> BTreeMap<u32, String> {
    let status = settled("status", || via.cluster_status()).await;
    status
        .shards
        .into_iter()
        .filter(|s| s.region == "eu" && !s.leader.is_empty())
        .map(|s| (s.shard, s.leader))
        .collect()
}

/// Waits until `via` reports every eu shard of `shards` led by `node`.
async fn led_by(via: &Client, shards: &[u32], node: &str) {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        let now = leaders(via).await;
        if shards
            .iter()
            .all(|s| now.get(s).map(String::as_str) == Some(node))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shards {shards:?} not led by {node}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Ledger {
    /// Per account: (debits, credits) acknowledged.
    expected: BTreeMap<String, (u64, u64)>,
    next: u64,
}

impl Ledger {
    /// Pays `amount` from `debit` to `credit` through `via`, retried with the same id until
    /// it is acknowledged (a lock held across a leader change can time out: a retriable
    /// rejection), and counts it once.
    async fn pay(&mut self, via: &Client, debit: &str, credit: &str, amount: u64) {
        self.next += 1;
        let id = format!("t-{}", self.next);
        let deadline = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            let result = settled(&id, || {
                via.transfer(usd_transfer(&id, debit, credit, amount))
            })
            .await;
            if committed(&result) {
                break;
            }
            let retriable = matches!(
                &result.outcome,
                Some(pb::transfer_result::Outcome::Rejection(r)) if r.retriable
            );
            assert!(retriable, "{id}: {result:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: still {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.count(debit, credit, amount);
    }

    fn count(&mut self, debit: &str, credit: &str, amount: u64) {
        self.expected.entry(debit.to_string()).or_default().0 += amount;
        self.expected.entry(credit.to_string()).or_default().1 += amount;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_to_a_live_node_of_their_region_and_a_woken_leader_is_fenced() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, stores) = start(dir.path()).await;
    let client = |i: usize| Client::connect(&nodes[i].addr);
    let (eu1, eu2, us1) = (
        client(0).await.unwrap(),
        client(1).await.unwrap(),
        client(2).await.unwrap(),
    );

    // Accounts on every eu shard and on the us shards.
    let mut accounts = Vec::new();
    for i in 0..12 {
        accounts.push(pb::Account {
            id: format!("eu-{i}"),
            ledger: "USD".into(),
            region: "eu".into(),
            ..Default::default()
        });
    }
    for i in 0..4 {
        accounts.push(pb::Account {
            id: format!("us-{i}"),
            ledger: "USD".into(),
            region: "us".into(),
            ..Default::default()
        });
    }
    let created = settled("accounts", || us1.create_accounts(accounts.clone())).await;
    let mut shard_of = BTreeMap::new();
    for r in created {
        match r.outcome {
            Some(pb::account_result::Outcome::Account(a)) => {
                shard_of.insert(a.id.clone(), a.shard);
            }
            other => panic!("{other:?}"),
        }
    }
    let eu = |shards: &[u32]| -> Vec<String> {
        shard_of
            .iter()
            .filter(|(id, s)| id.starts_with("eu") && shards.contains(s))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let (of_eu1, of_eu2) = (eu(&[0, 1]), eu(&[2, 3]));
    assert!(
        !of_eu1.is_empty() && !of_eu2.is_empty(),
        "accounts on both nodes' shards: {shard_of:?}"
    );
    led_by(&us1, &[0, 1], "eu-1").await;
    led_by(&us1, &[2, 3], "eu-2").await;
    tracing::info!("owners lead");

    let mut ledger = Ledger {
        expected: BTreeMap::new(),
        next: 0,
    };
    // Every path through every node while the owners lead.
    for via in [&eu1, &eu2, &us1] {
        ledger.pay(via, &of_eu1[0], &of_eu2[0], 10).await;
        ledger.pay(via, &of_eu2[0], "us-0", 20).await;
        ledger.pay(via, "us-1", &of_eu1[0], 30).await;
    }

    // eu-1 pauses with a transfer of its shards in hand.
    tracing::info!("pausing eu-1");
    nodes[0].gate.pause();
    let stuck = usd_transfer("stuck", &of_eu1[0], &of_eu2[0], 7);
    let in_hand = {
        let (eu1, stuck) = (eu1.clone(), stuck.clone());
        tokio::spawn(async move { eu1.transfer(stuck).await })
    };
    // Its lease lapses; eu-2 takes its shards and transfers go on through eu-2 and us-1.
    for round in 0..3 {
        ledger.pay(&eu2, &of_eu1[0], &of_eu2[0], 100 + round).await;
        ledger.pay(&us1, "us-2", &of_eu1[0], 200 + round).await;
        ledger.pay(&us1, &of_eu1[0], "us-3", 300 + round).await;
    }
    led_by(&eu2, &[0, 1, 2, 3], "eu-2").await;
    tracing::info!("eu-2 leads every eu shard; resuming eu-1");

    // eu-1 wakes: the term it paused in has ended, and it answers nothing as the leader.
    nodes[0].gate.resume();
    match in_hand.await.unwrap() {
        Ok(result) => {
            assert!(committed(&result), "{result:?}");
            ledger.count(&of_eu1[0], &of_eu2[0], 7);
        }
        Err(e) => {
            // Not acknowledged (no leader, or out of time): retried with the same id, it is
            // applied once.
            let code = e.status().map(tonic::Status::code);
            assert!(
                matches!(
                    code,
                    Some(
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                    )
                ),
                "{e}"
            );
            let result = settled("stuck", || eu2.transfer(stuck.clone())).await;
            assert!(committed(&result), "{result:?}");
            ledger.count(&of_eu1[0], &of_eu2[0], 7);
        }
    }
    // Through eu-1 again: it forwards to eu-2, and does not take its shards back (the owner
    // is preferred, not privileged).
    for round in 0..3 {
        ledger.pay(&eu1, &of_eu2[0], &of_eu1[0], 400 + round).await;
    }
    tokio::time::sleep(Duration::from_millis(2 * LEASE_MS)).await;
    ledger.pay(&eu1, &of_eu1[0], "us-0", 500).await;
    led_by(&eu1, &[0, 1, 2, 3], "eu-2").await;

    // eu-2 stops: it gives its leases up and eu-1 leads every eu shard.
    tracing::info!("stopping eu-2");
    let eu2_node = nodes.remove(1);
    assert_eq!(eu2_node.id, "eu-2");
    eu2_node.stop().await;
    for round in 0..3 {
        ledger.pay(&eu1, &of_eu2[0], &of_eu1[0], 600 + round).await;
        ledger.pay(&us1, "us-1", &of_eu2[0], 700 + round).await;
    }
    led_by(&eu1, &[0, 1, 2, 3], "eu-1").await;

    // Every acknowledged transfer exactly once, as any live node reads it.
    let ids: Vec<String> = ledger.expected.keys().cloned().collect();
    for via in [&eu1, &us1] {
        let read = settled("balances", || via.get_accounts(ids.clone())).await;
        assert!(read.not_found.is_empty(), "{:?}", read.not_found);
        for a in read.accounts {
            assert_eq!(
                (a.debits_posted, a.credits_posted),
                ledger.expected[&a.id],
                "{}",
                a.id
            );
        }
    }
    for node in nodes {
        node.stop().await;
    }
    let shards: Vec<(ShardId, &dyn Store)> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| (ShardId(i as u32), &**s as &dyn Store))
        .collect();
    let violations = checks::all(&checks::Snapshot::read_shards(&shards));
    assert!(violations.is_empty(), "{violations:#?}");
}
