//! `ledger-bench`: throughput and latency of the ledger (and of a PostgreSQL ledger on the
//! same workload, side by side), with every commit durable. Runs are bounded by time and count.
//! See docs/benchmarks.md for the workloads and the figures.

// Measuring wall-clock time is this tool's job; the injected-clock rule is for the engines.
#![allow(clippy::disallowed_methods)]

mod cluster;
mod ledger;
mod otlp_sink;
mod postgres;
mod report;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use ledger_client::Client;
use report::Tally;
use workload::{Accounts, Knobs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Ledger,
    Postgres,
    Both,
}

/// The store of the ledgerd the bench starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Store {
    /// Durable (the default): every commit's log record is fsynced before it is answered.
    Embedded,
    /// Nothing durable: what the rest of a call costs, so durability's share by difference.
    Memory,
}

#[derive(Parser, Debug)]
#[command(
    name = "ledger-bench",
    version,
    about = "Benchmark the ledger (and PostgreSQL) with durable commits"
)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "ledger")]
    target: Target,
    /// A running ledgerd; without it the bench starts its own on a temporary data directory.
    #[arg(long)]
    addr: Option<String>,
    /// Shards of the ledgerd the bench starts.
    #[arg(long, default_value_t = 16)]
    shards: u32,
    /// Data directory for the ledgerd the bench starts (default: a temporary one here).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Store of the ledgerd the bench starts [default: embedded].
    #[arg(long, value_enum)]
    store: Option<Store>,
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// The first N accounts are hot.
    #[arg(long, default_value_t = 0)]
    hot_accounts: usize,
    /// Percent of transfers whose debit account is hot.
    #[arg(long, default_value_t = 0)]
    hot_percent: u32,
    /// Choose accounts with a Zipf distribution of this exponent (default: uniform).
    #[arg(long)]
    zipf: Option<f64>,
    /// Percent of transfers between accounts on different shards.
    #[arg(long, default_value_t = 0)]
    cross_percent: u32,
    /// Transfers per request (1 uses the single-transfer call).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// HTTP/2 connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Percent of operations that are holds or posts of holds.
    #[arg(long, default_value_t = 0)]
    pending_percent: u32,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop after this many transfers.
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
    /// Seconds of health-check calls to measure the gRPC ceiling (small calls only; 0 = skip):
    /// half before the workload and half after, so a machine whose speed drifts during the run
    /// is compared with its mean.
    #[arg(long, default_value_t = 4)]
    ceiling_secs: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Export traces from the ledgerd the bench starts, sampling this share of requests
    /// (0.0-1.0), to a span-counting OTLP sink in the bench. Default: tracing off.
    #[arg(long)]
    trace_sampling: Option<f64>,
    /// Measure a cluster instead: start `ledgerd demo --regions <REGIONS>` (e.g. `eu:2,us,ap`)
    /// and measure each path a transfer can take (same shard, cross-shard, cross-node,
    /// cross-region), `--duration` seconds each, with single-transfer calls.
    #[arg(long, value_name = "REGIONS")]
    cluster: Option<String>,
    /// With --cluster: the simulated one-way delay between regions, in milliseconds.
    #[arg(long, default_value_t = 0)]
    wan_delay_ms: u64,
    /// With --cluster: shards each node leads.
    #[arg(long, default_value_t = 2)]
    shards_per_node: u32,
}

fn knobs(args: &Args) -> Knobs {
    Knobs {
        accounts: args.accounts,
        hot_accounts: args.hot_accounts,
        hot_percent: args.hot_percent,
        zipf: args.zipf,
        cross_percent: args.cross_percent,
        batch: args.batch.max(1),
        pending_percent: args.pending_percent.min(100),
        seed: args.seed,
    }
}

fn limit(args: &Args) -> Arc<ledger::Limit> {
    Arc::new(ledger::Limit {
        until: Instant::now() + Duration::from_secs(args.duration),
        budget: Arc::new(AtomicI64::new(
            i64::try_from(args.count).unwrap_or(i64::MAX),
        )),
    })
}

fn run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("r{:x}", now.as_millis())
}

async fn connect(addr: &str) -> Result<Client, String> {
    for _ in 0..50 {
        if let Ok(c) = Client::connect(addr).await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("cannot connect to {addr}"))
}

/// Returns transfers/s.
async fn bench_ledger(args: &Args) -> Result<f64, String> {
    let sink = match (args.trace_sampling, &args.addr) {
        (Some(_), Some(_)) => {
            return Err(
                "--trace-sampling applies to the ledgerd the bench starts (no --addr)".into(),
            );
        }
        (Some(ratio), None) => Some((ratio, otlp_sink::start().await?)),
        (None, _) => None,
    };
    let mut flags: Vec<String> = match &sink {
        Some((ratio, (endpoint, _))) => vec![
            "--otlp-endpoint".into(),
            endpoint.clone(),
            "--trace-sampling-ratio".into(),
            ratio.to_string(),
        ],
        None => Vec::new(),
    };
    match (args.store, &args.addr) {
        (Some(_), Some(_)) => {
            return Err("--store applies to the ledgerd the bench starts (no --addr)".into());
        }
        (Some(Store::Memory), None) => flags.extend(["--store".into(), "memory".into()]),
        (Some(Store::Embedded) | None, _) => {}
    }
    let server = match &args.addr {
        Some(_) => None,
        None => Some(ledger::Server::start(
            args.shards,
            args.data_dir.clone(),
            &flags,
        )?),
    };
    let addr = args
        .addr
        .clone()
        .map(|a| ledger_client::uri_of(&a))
        .or_else(|| server.as_ref().map(|s| s.addr.clone()))
        .expect("an address");
    let client = connect(&addr).await?;
    let knobs = Arc::new(knobs(args));
    let mut accounts = Accounts::new(&knobs);
    ledger::setup(&client, &mut accounts).await?;
    let accounts = Arc::new(accounts);
    let mut channels = Vec::new();
    for _ in 0..args.connections.clamp(1, args.clients.max(1)) {
        let endpoint =
            tonic::transport::Endpoint::from_shared(addr.clone()).map_err(|e| e.to_string())?;
        channels.push(endpoint.connect().await.map_err(|e| e.to_string())?);
    }
    let measure_ceiling = knobs.batch == 1 && args.ceiling_secs > 0;
    let ceiling_half = Duration::from_millis(args.ceiling_secs * 500);
    let ceiling_before = if measure_ceiling {
        Some(ledger::ceiling(&channels, args.clients, ceiling_half).await)
    } else {
        None
    };
    let run = run_id();
    let limit = limit(args);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|n| {
            tokio::spawn(ledger::client_loop(
                channels[n % channels.len()].clone(),
                knobs.clone(),
                accounts.clone(),
                run.clone(),
                n,
                limit.clone(),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for t in futures::future::join_all(tasks).await {
        tally.merge(t.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    let rate = tally.transfers as f64 / elapsed.as_secs_f64();
    let mut extra = Vec::new();
    if let Some(before) = ceiling_before {
        let after = ledger::ceiling(&channels, args.clients, ceiling_half).await;
        let c = (before + after) / 2.0;
        extra.push((
            format!("gRPC ceiling (health Check, {} clients)", args.clients),
            format!(
                "{c:.0} calls/s ({before:.0} before the run, {after:.0} after); this run reached {:.0}% of it",
                100.0 * rate / c
            ),
        ));
    }
    if let Some((rss, peak)) = server.as_ref().and_then(|s| ledger::memory_of(s.pid())) {
        extra.push((
            "ledgerd memory".into(),
            format!("{} MiB resident, {} MiB peak", rss >> 20, peak >> 20),
        ));
    }
    if let Some((ratio, (_, spans))) = &sink {
        extra.push((
            "traces".into(),
            format!(
                "exported, sampling {ratio}; {} spans received by the sink so far",
                spans.load(std::sync::atomic::Ordering::Relaxed)
            ),
        ));
    }
    if let Some(server) = &server {
        // In `ledgerd`'s own words, so that a run against the wrong store shows.
        extra.push(("ledgerd store".into(), server.store.clone()));
    }
    let checked = ledger::check(&client, &accounts, &tally).await;
    extra.push((
        "check".into(),
        checked.clone().unwrap_or_else(|e| format!("FAILED: {e}")),
    ));
    report::print("ledger", &mut tally, elapsed, &extra);
    checked.map(|_| rate)
}

async fn bench_postgres(args: &Args) -> Result<f64, String> {
    let pg = postgres::Postgres::start()?;
    let admin = pg.connect().await?;
    let knobs = Arc::new(knobs(args));
    let accounts = Arc::new(Accounts::new(&knobs));
    postgres::setup(&admin, &accounts).await?;
    let run = run_id();
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(pg.connect().await?);
    }
    let limit = limit(args);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, c)| {
            tokio::spawn(postgres::client_loop(
                c,
                knobs.clone(),
                accounts.clone(),
                run.clone(),
                n,
                limit.clone(),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for t in futures::future::join_all(tasks).await {
        tally.merge(t.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    let mut extra = Vec::new();
    if let Some((rss, _)) = pg.pid().and_then(ledger::memory_of) {
        extra.push((
            "postmaster memory".into(),
            format!("{} MiB resident (backends not counted)", rss >> 20),
        ));
    }
    let checked = postgres::check(&admin, &tally).await;
    extra.push((
        "check".into(),
        checked.clone().unwrap_or_else(|e| format!("FAILED: {e}")),
    ));
    report::print(
        "postgresql (row locks in account order, fsync on)",
        &mut tally,
        elapsed,
        &extra,
    );
    checked.map(|_| tally.transfers as f64 / elapsed.as_secs_f64())
}

fn cluster_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(regions) = &args.cluster {
        let plan = cluster::Plan {
            regions: regions.clone(),
            shards_per_node: args.shards_per_node,
            wan_delay_ms: args.wan_delay_ms,
            clients: args.clients,
            duration: Duration::from_secs(args.duration),
            seed: args.seed,
        };
        return match cluster_runtime().block_on(cluster::run(plan)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ledger-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    println!(
        "workload: accounts={} hot={}@{}% {} cross_shard={}% batch={} clients={} holds={}% duration<={}s count<={}",
        args.accounts,
        args.hot_accounts,
        args.hot_percent,
        args.zipf.map_or("uniform".into(), |s| format!("zipf({s})")),
        args.cross_percent,
        args.batch,
        args.clients,
        args.pending_percent,
        args.duration,
        if args.count == u64::MAX {
            "unbounded".into()
        } else {
            args.count.to_string()
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let ledger = if args.target != Target::Postgres {
            Some(bench_ledger(&args).await)
        } else {
            None
        };
        let pg = if args.target != Target::Ledger {
            Some(bench_postgres(&args).await)
        } else {
            None
        };
        let mut ok = true;
        for result in [&ledger, &pg].into_iter().flatten() {
            if let Err(e) = result {
                eprintln!("ledger-bench: {e}");
                ok = false;
            }
        }
        if let (Some(Ok(l)), Some(Ok(p))) = (&ledger, &pg) {
            println!("ratio ledger / postgresql: {:.1}x", l / p);
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}
