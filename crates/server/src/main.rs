//! `ledgerd`: the ledger server. `ledgerd start` serves on 127.0.0.1:50051 with its data in
//! ./data, initialising a single-node cluster on first start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ledger_server::{Config, StoreKind, demo, telemetry};

/// mimalloc instead of the system allocator: the request path allocates per call (gRPC frames,
/// codec buffers, overlay keys) from many threads, and glibc's malloc spent about a fifth of
/// ledgerd's CPU there. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before returning it to the kernel, unless the
/// `MIMALLOC_PURGE_DELAY` environment variable says otherwise. Its default (1 s) returned the
/// memory of each checkpointed overlay, and the next overlay faulted it back in, page by page
/// (some as 2 MiB transparent huge pages, zeroed per fault): about 1 400 faults a second at
/// one transfer per call, and 4-16% of `ledgerd`'s CPU per transfer in batches. Overlays are
/// replaced every few seconds under load, so they now reuse that memory; an idle node still
/// gives it back. The cost is resident memory: about 90 MiB more at peak with a million
/// accounts (docs/benchmarks.md).
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// mimalloc's option number of `purge_delay` (`mi_option_purge_delay` in its `mimalloc.h`, the
/// same in its v2 and v3); a test checks it against the option's default.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc's option number of `allow_thp` (`mi_option_allow_thp` in its v3 `mimalloc.h`, the
/// version the `mimalloc` crate builds); a test checks it against the option's default.
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;

#[allow(unsafe_code)]
mod mimalloc_options {
    use std::ffi::{c_int, c_long};

    // Exported by the mimalloc library that `mimalloc::MiMalloc` links in.
    unsafe extern "C" {
        #[cfg(test)]
        fn mi_option_get(option: c_int) -> c_long;
        fn mi_option_set(option: c_int, value: c_long);
    }

    #[cfg(test)]
    pub fn get(option: c_int) -> c_long {
        // SAFETY: reads an option; mimalloc accepts any option number below its last one and
        // these are constants of its header.
        unsafe { mi_option_get(option) }
    }

    pub fn set(option: c_int, value: c_long) {
        // SAFETY: sets an option named by a constant of mimalloc's header to a plain integer;
        // mimalloc's options may be set from any thread at any time.
        unsafe { mi_option_set(option, value) }
    }
}

/// Applies [`ALLOCATOR_PURGE_DELAY_MS`], and turns transparent huge pages off for the process,
/// each unless the environment sets mimalloc's own variable for it.
///
/// Why no huge pages: memory the allocator gave back and takes again, and memory it touches for
/// the first time, is faulted in by the kernel, which zeroes a whole 2 MiB page per fault when
/// the range may be a huge page. At one transfer per call that zeroing (`clear_page_erms`) was
/// 10-13% of `ledgerd`'s CPU in some runs; with 4 KiB pages `ledgerd` used 7-10% less CPU per
/// transfer, its p99 fell from 29-31 to 19-22 ms, and the peak memory with a million accounts
/// from 805 to 698 MiB, while workload (a) did not change (docs/benchmarks.md). The
/// kernel setting (`/sys/kernel/mm/transparent_hugepage`) is left alone: this asks it only for
/// this process (`PR_SET_THP_DISABLE`), which also covers memory mapped before `main`.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        mimalloc_options::set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS);
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        mimalloc_options::set(MI_OPTION_ALLOW_THP, 0);
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            // Only speed is at stake: go on with the kernel's setting.
            eprintln!("ledgerd: cannot turn transparent huge pages off for this process: {e}");
        }
    }
}

#[derive(Parser)]
#[command(
    name = "ledgerd",
    version,
    about = "A sharded, durable double-entry ledger server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start serving (initialises an empty data directory first).
    Start(Settings),
    /// Initialise a data directory (shard count, region) without serving.
    Init(InitSettings),
    /// Validate the configuration (file, environment, flags) and print it.
    CheckConfig(Settings),
    /// Run a multi-region cluster on this machine, one ledgerd process per node, until
    /// interrupted (initialised on the first run; later runs reuse its data).
    Demo(DemoArgs),
}

/// `ledgerd demo`.
#[derive(clap::Args)]
struct DemoArgs {
    /// The regions, comma-separated; `eu:2` gives a region its own node count.
    #[arg(long, default_value = "eu,us,ap")]
    regions: String,
    /// Nodes in each region without a count of its own.
    #[arg(long, default_value_t = 1)]
    nodes_per_region: usize,
    /// Shards each node leads.
    #[arg(long, default_value_t = 4)]
    shards_per_node: u32,
    /// Simulated one-way delay between regions, in milliseconds (0: none).
    #[arg(long, default_value_t = 0)]
    wan_delay_ms: u64,
    /// Where the cluster file, the node configs and the nodes' data go [default: ./demo-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// OTLP/gRPC endpoint every node exports traces to [default: none]
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Give each node a Prometheus endpoint on a free port (shown on its line).
    #[arg(long)]
    metrics: bool,
}

/// What `ledgerd init` uses: where the data goes and what is fixed at initialisation. Each
/// overrides the config file, and is overridden by its flag; environment variables sit between
/// the file and the flags.
#[derive(clap::Args)]
struct InitSettings {
    /// TOML config file (settings as in `ledgerd check-config` output).
    #[arg(long, env = "LEDGER_CONFIG")]
    config: Option<PathBuf>,
    /// `init` only: the cluster file (regions, nodes, shards; see deploy/cluster.toml); this
    /// node is `--node`. Without it, the directory is a single node's.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Data directory of the embedded store [default: ./data]
    #[arg(long, env = "LEDGER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of shards, fixed when the data directory is initialised [default: 16]
    #[arg(long, env = "LEDGER_SHARDS")]
    shards: Option<u32>,
    /// This node's name, written into shard leases; with --cluster, a node of the file
    /// [default: node-1]
    #[arg(long, alias = "node", env = "LEDGER_NODE_ID")]
    node_id: Option<String>,
    /// This node's region, recorded in the shard map at init [default: local]
    #[arg(long, env = "LEDGER_REGION")]
    region: Option<String>,
    /// Log filter (tracing env-filter syntax) [default: info]
    #[arg(long, env = "LEDGER_LOG")]
    log: Option<String>,
}

/// Settings of `start` and `check-config`: those of `init`, and how to serve.
#[derive(clap::Args)]
struct Settings {
    #[command(flatten)]
    init: InitSettings,
    /// gRPC listen address [default: 127.0.0.1:50051]
    #[arg(long, env = "LEDGER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Storage backend [default: embedded]. `fdb`: FoundationDB (a ledgerd built with the
    /// `fdb` feature, and --fdb-cluster-file). `memory` keeps nothing across restarts.
    #[arg(long, env = "LEDGER_STORE")]
    store: Option<StoreKind>,
    /// With --store fdb: the cluster file of this region's FoundationDB cluster
    #[arg(long, env = "LEDGER_FDB_CLUSTER_FILE")]
    fdb_cluster_file: Option<PathBuf>,
    /// With --store fdb: the ledger's subspace in that cluster [default: ledger]
    #[arg(long, env = "LEDGER_FDB_CLUSTER_NAME")]
    fdb_cluster_name: Option<String>,
    /// Most items per batch call [default: 8190]
    #[arg(long, env = "LEDGER_BATCH_SIZE_MAX")]
    batch_size_max: Option<usize>,
    /// Largest gRPC message accepted, in bytes [default: 16777216]
    #[arg(long, env = "LEDGER_MESSAGE_SIZE_MAX_BYTES")]
    message_size_max_bytes: Option<usize>,
    /// Log line format: text or json [default: text]
    #[arg(long, env = "LEDGER_LOG_FORMAT")]
    log_format: Option<ledger_server::telemetry::LogFormat>,
    /// OTLP/gRPC endpoint to export traces to, e.g. http://127.0.0.1:4317 [default: none, no export]
    #[arg(long, env = "LEDGER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0-1.0; a caller's decision is followed [default: 1.0]
    #[arg(long, env = "LEDGER_TRACE_SAMPLING_RATIO")]
    trace_sampling_ratio: Option<f64>,
    /// service.name of exported spans [default: ledgerd]
    #[arg(long, env = "LEDGER_SERVICE_NAME")]
    service_name: Option<String>,
    /// Prometheus endpoint address, e.g. 127.0.0.1:9464 (port 0: any free port) [default: none]
    #[arg(long, env = "LEDGER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

impl InitSettings {
    /// The config of the file (or the defaults) with these settings over it.
    fn resolve(&self) -> Result<Config, String> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(v) = &self.data_dir {
            config.data_dir.clone_from(v);
        }
        if let Some(v) = self.shards {
            config.shards = v;
        }
        if let Some(v) = &self.node_id {
            config.node_id.clone_from(v);
        }
        if let Some(v) = &self.region {
            config.region.clone_from(v);
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

impl Settings {
    fn resolve(&self) -> Result<Config, String> {
        let mut config = self.init.resolve()?;
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.store {
            config.store = v;
        }
        if let Some(v) = &self.fdb_cluster_file {
            config.fdb.cluster_file.clone_from(v);
        }
        if let Some(v) = &self.fdb_cluster_name {
            config.fdb.cluster_name.clone_from(v);
        }
        if let Some(v) = self.batch_size_max {
            config.batch_size_max = v;
        }
        if let Some(v) = self.message_size_max_bytes {
            config.message_size_max_bytes = v;
        }
        if let Some(v) = self.log_format {
            config.telemetry.log_format = v;
        }
        if let Some(v) = &self.otlp_endpoint {
            config.telemetry.otlp_endpoint.clone_from(v);
        }
        if let Some(v) = self.trace_sampling_ratio {
            config.telemetry.sampling_ratio = v;
        }
        if let Some(v) = &self.service_name {
            config.telemetry.service_name.clone_from(v);
        }
        if let Some(v) = &self.metrics_listen {
            config.telemetry.metrics_listen.clone_from(v);
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

enum Mode {
    Start,
    Init,
    CheckConfig,
}

fn main() -> ExitCode {
    // Before the runtime starts its threads.
    tune_allocator();
    let cli = Cli::parse();
    if let Command::Demo(args) = &cli.command {
        return demo(args);
    }
    let (init, mode, resolved) = match &cli.command {
        Command::Start(s) => (&s.init, Mode::Start, s.resolve()),
        Command::Init(s) => (s, Mode::Init, s.resolve()),
        Command::CheckConfig(s) => (&s.init, Mode::CheckConfig, s.resolve()),
        Command::Demo(_) => unreachable!("handled above"),
    };
    let filter = init.log.clone().unwrap_or_else(|| "info".into());
    let config = match resolved {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ledgerd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(mode, Mode::Start) {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&filter))
            .with_writer(std::io::stderr)
            .init();
    }
    match mode {
        Mode::CheckConfig => {
            print!(
                "{}",
                toml::to_string_pretty(&config).expect("config serialises")
            );
            return ExitCode::SUCCESS;
        }
        Mode::Init => {
            return match ledger_server::init(&config, init.cluster.as_deref()) {
                Ok(opened) => {
                    let node = opened
                        .map
                        .node(&opened.node)
                        .expect("the node is in its map");
                    let (nodes, regions) = (opened.map.nodes.len(), opened.map.regions.len());
                    let cluster = if nodes == 1 {
                        "a single node".to_string()
                    } else {
                        let plural = if regions == 1 { "" } else { "s" };
                        format!("{nodes} nodes in {regions} region{plural}")
                    };
                    println!(
                        "initialised {}: node {} in region {}, {} of {} shards, map version {} ({cluster})",
                        config.data_dir.display(),
                        node.id,
                        node.region,
                        opened.map.shards_of(&node.id).len(),
                        opened.meta.shard_count,
                        opened.map.version,
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ledgerd: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Mode::Start => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let telemetry =
            match telemetry::init(&config.telemetry, &filter, &config.region, &config.node_id) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("ledgerd: {e}");
                    return ExitCode::from(2);
                }
            };
        let code = serve(config).await;
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        code
    })
}

async fn serve(config: Config) -> ExitCode {
    {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down: finishing in-flight batches");
        };
        let metrics = match start_metrics(&config.telemetry.metrics_listen).await {
            Ok(metrics) => metrics,
            Err(e) => {
                eprintln!("ledgerd: {e}");
                return ExitCode::from(1);
            }
        };
        let store = config.store;
        let data_dir = config.data_dir.clone();
        let fdb = config.fdb.clone();
        let traces = if config.telemetry.otlp_endpoint.is_empty() {
            "off".to_string()
        } else {
            format!(
                "OTLP {} (sampling {})",
                config.telemetry.otlp_endpoint, config.telemetry.sampling_ratio
            )
        };
        let result = ledger_server::run(config, None, shutdown, |started| {
            let store = match store {
                StoreKind::Embedded => format!("embedded (redb) in {}", data_dir.display()),
                StoreKind::Fdb => format!(
                    "FoundationDB ({}, subspace {})",
                    fdb.cluster_file.display(),
                    fdb.cluster_name
                ),
                StoreKind::Memory => "memory (NOT durable)".into(),
            };
            // One summary line, also on stdout so scripts can wait for it.
            let leading = if started.shared {
                "preferred leader of"
            } else {
                "leading"
            };
            let cluster = match started.peer_listen {
                Some(peer) => format!(
                    "node {} in region {} (peers on {peer}), {leading} {} of {} shards, {} nodes, map version {}",
                    started.node,
                    started.region,
                    started.shards_led,
                    started.meta.shard_count,
                    started.nodes,
                    started.map_version
                ),
                None => started.meta.cluster_id.clone(),
            };
            println!(
                "ledgerd listening on {} | store: {store} | shards: {} | cluster: {cluster} | traces: {traces} | metrics: {metrics}",
                started.listen, started.meta.shard_count
            );
        })
        .await;
        match result {
            Ok(()) => {
                tracing::info!("stopped: every shard finished its batch in flight");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ledgerd: {e}");
                ExitCode::from(1)
            }
        }
    }
}

/// `ledgerd demo`: prepares the cluster, starts one child per node, prints a line per node,
/// and stops them all when interrupted. A child that dies is not restarted.
fn demo(args: &DemoArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("LEDGER_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let regions = match demo::parse_regions(&args.regions, args.nodes_per_region) {
        Ok(regions) => regions,
        Err(e) => {
            eprintln!("ledgerd demo: {e}");
            return ExitCode::from(2);
        }
    };
    if args.shards_per_node == 0 {
        eprintln!("ledgerd demo: --shards-per-node must be at least 1");
        return ExitCode::from(2);
    }
    let plan = demo::DemoPlan {
        regions,
        shards_per_node: args.shards_per_node,
        wan_delay_ms: args.wan_delay_ms,
        otlp_endpoint: args.otlp_endpoint.clone().unwrap_or_default(),
        metrics: args.metrics,
        dir: args.data_dir.clone().unwrap_or_else(demo::default_dir),
    };
    let nodes = match demo::prepare(&plan) {
        Ok(nodes) => nodes,
        Err(e) => {
            eprintln!("ledgerd demo: {e}");
            return ExitCode::from(1);
        }
    };
    if plan.wan_delay_ms > 0 {
        tracing::info!(
            wan_delay_ms = plan.wan_delay_ms,
            "simulated one-way delay between regions"
        );
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("ledgerd demo: cannot find this program to start the nodes: {e}");
            return ExitCode::from(1);
        }
    };
    let mut children = Vec::new();
    for node in &nodes {
        let mut child = match std::process::Command::new(&exe)
            .arg("start")
            .arg("--config")
            .arg(&node.config)
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("ledgerd demo: cannot start node {}: {e}", node.id);
                stop_all(&mut children);
                return ExitCode::from(1);
            }
        };
        // Its first line says it is serving; the rest of its output is passed through.
        let stdout = child.stdout.take().expect("piped");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let started = std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::stdout());
        });
        if !started {
            eprintln!(
                "ledgerd demo: node {} did not start (its error is above)",
                node.id
            );
            children.push(child);
            stop_all(&mut children);
            return ExitCode::from(1);
        }
        // With --metrics, where its Prometheus endpoint is (from its start-up line).
        let metrics = line
            .split(" | ")
            .find_map(|part| part.trim().strip_prefix("metrics: "))
            .filter(|url| url.starts_with("http"))
            .map(|url| format!(" metrics={url}"))
            .unwrap_or_default();
        println!(
            "node={} region={} addr={} pid={} config={}{metrics}",
            node.id,
            node.region,
            node.client_address,
            child.id(),
            node.config.display()
        );
        children.push(child);
    }
    println!(
        "demo cluster running: {} nodes in {} regions; Ctrl-C stops it",
        nodes.len(),
        plan.regions.len()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    stop_all(&mut children);
    println!("demo cluster stopped");
    ExitCode::SUCCESS
}

/// SIGTERM to every child still running, then waits for each (SIGKILL after 10 s).
fn stop_all(children: &mut [std::process::Child]) {
    for child in children.iter_mut() {
        if child.try_wait().ok().flatten().is_some() {
            continue; // Already gone (and now reaped).
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for child in children.iter_mut() {
        for _ in 0..200 {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Binds the Prometheus endpoint (if configured), installs the recorder and serves it in the
/// background. Returns what the start-up line shows.
async fn start_metrics(listen: &str) -> Result<String, String> {
    if listen.is_empty() {
        return Ok("off".into());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("telemetry.metrics_listen: cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("telemetry.metrics_listen: {e}"))?;
    let handle = ledger_server::prometheus::install()?;
    tokio::spawn(ledger_server::prometheus::serve(listener, handle));
    Ok(format!("http://{addr}/metrics"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option numbers name `purge_delay` (its default is 1 000 ms in mimalloc v3, 10 in v2)
    /// and `allow_thp` (on by default on Linux), and tuning sets both: the delay reads back, and
    /// the kernel reports huge pages off for the process. A renumbered option fails here. (One
    /// test: `tune_allocator` sets both, and tests run in parallel.)
    #[test]
    fn the_allocator_options_set_are_the_ones_meant() {
        let purge_from_env = std::env::var_os("MIMALLOC_PURGE_DELAY").is_some();
        let thp_from_env = std::env::var_os("MIMALLOC_ALLOW_THP").is_some();
        if purge_from_env || thp_from_env {
            eprintln!(
                "SKIPPED: MIMALLOC_PURGE_DELAY or MIMALLOC_ALLOW_THP is set in this environment"
            );
            return;
        }
        assert!(
            [1_000, 10].contains(&mimalloc_options::get(MI_OPTION_PURGE_DELAY)),
            "option {MI_OPTION_PURGE_DELAY} is not purge_delay at its default"
        );
        if rustix::thread::transparent_huge_pages_are_disabled() == Ok(false) {
            assert_eq!(
                mimalloc_options::get(MI_OPTION_ALLOW_THP),
                1,
                "option {MI_OPTION_ALLOW_THP} is not allow_thp at its default"
            );
        }
        tune_allocator();
        assert_eq!(
            mimalloc_options::get(MI_OPTION_PURGE_DELAY),
            ALLOCATOR_PURGE_DELAY_MS
        );
        assert_eq!(mimalloc_options::get(MI_OPTION_ALLOW_THP), 0);
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled(),
            Ok(true)
        );
    }
}
