//! Starting real servers for tests: in process (`ledger_server::run` on port 0) or as a child
//! `ledgerd` process that a crash test can `kill -9`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ledger_server::Config;
use tokio::sync::oneshot;

/// A server running inside the test process.
#[derive(Debug)]
pub struct InProcess {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    /// Starts `ledgerd` on 127.0.0.1 port 0 with `config` (listen address ignored).
    pub async fn start(mut config: Config) -> InProcess {
        config.listen = "127.0.0.1:0".parse().expect("address");
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            ledger_server::run(config, Some(listener), shutdown, move |_| {
                let _ = ready_tx.send(());
            })
            .await
            .expect("server runs");
        });
        ready.await.expect("server started");
        InProcess {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and waits until its shard leaders have finished.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A config for tests: embedded store in `dir`, few shards, short protocol timers.
pub fn test_config(dir: &Path, shards: u32) -> Config {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        shards,
        ..Config::default()
    };
    config.shard.retry_ms = 100;
    config.shard.prepared_query_ms = 300;
    config.shard.lock_wait_ms_max = 2_000;
    config.shard.prepare_timeout_ms = 3_000;
    config.shard.lease_ms = 3_000;
    config
}

/// The `ledgerd` binary next to this test binary (target/<profile>/ledgerd), built if missing.
pub fn ledgerd_bin() -> PathBuf {
    workspace_bin("ledgerd")
}

/// The `ledger` CLI binary, built if missing.
pub fn ledger_bin() -> PathBuf {
    workspace_bin("ledger")
}

/// A binary of the workspace next to this test binary, (re)built first so a test never runs a
/// stale binary (`cargo test -p ledger-tests` alone would not rebuild it).
///
/// The build selects what `cargo test --workspace` builds (every package, with its tests), so
/// cargo resolves the dependencies' features as it did for the test run and reuses what that
/// run compiled: only the binaries are linked. Built alone (`cargo build -p ledger-server`),
/// a binary's dependencies resolve without the dev-dependencies' features, and a second copy
/// of most of the dependency tree was compiled inside the test run.
pub fn workspace_bin(name: &str) -> PathBuf {
    // Once per test process: one build makes every binary.
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*built {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build");
        assert!(status.success(), "building the workspace's binaries failed");
        *built = true;
    }
    profile_dir.join(name)
}

/// A `ledgerd` child process.
#[derive(Debug)]
pub struct Ledgerd {
    child: Child,
    pub addr: String,
    /// The start-up summary line (listen address, store, shards, traces, metrics).
    pub summary: String,
}

impl Ledgerd {
    /// Starts `ledgerd start` with `config` written to a file in `dir`; waits until it listens.
    pub fn start(dir: &Path, config: &Config) -> Ledgerd {
        let config_path = dir.join("ledgerd.toml");
        let mut config = config.clone();
        config.listen = "127.0.0.1:0".parse().expect("address");
        std::fs::write(&config_path, toml::to_string(&config).expect("toml"))
            .expect("write config");
        let mut child = Command::new(ledgerd_bin())
            .args(["start", "--config"])
            .arg(&config_path)
            .env("LEDGER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ledgerd");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ledgerd stdout");
        let addr = line
            .strip_prefix("ledgerd listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from ledgerd: {line:?}"));
        Ledgerd {
            addr: format!("http://{addr}"),
            summary: line.trim().to_string(),
            child,
        }
    }

    /// `kill -9`: no chance to flush or finish anything.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if self.child.try_wait().expect("wait").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }
}

impl Drop for Ledgerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a stopped node's shard files (replaying its log) for the checkers.
pub fn open_shards(dir: &Path, shards: u32) -> Vec<ledger_store::Embedded> {
    ledger_store::open_shards(
        dir,
        shards,
        ledger_store::Limits::default(),
        Some(ledger_shard::keys::entry_group),
    )
    .expect("open shards")
}

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(url: &str) -> String {
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("not a metrics URL: {url}"));
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ledgerd\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
pub fn metric(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// The metrics URL `ledgerd` gave in its start-up summary (`telemetry.metrics_listen` set).
pub fn metrics_url(ledgerd: &Ledgerd) -> String {
    ledgerd
        .summary
        .split("metrics: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|url| url.trim_end_matches([',', ';']).to_string())
        .unwrap_or_else(|| panic!("no metrics URL in {}", ledgerd.summary))
}

/// Polls the nodes' `/metrics` until none has a two-phase commit in flight
/// (`ledger_2pc_in_flight`) or `limit` has passed; returns the count last seen (0: all done).
pub async fn two_pc_in_flight_after(urls: &[String], limit: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut in_flight = 0.0;
        for url in urls {
            let url = url.clone();
            let body = tokio::task::spawn_blocking(move || scrape(&url))
                .await
                .expect("scrape");
            in_flight += metric(&body, "ledger_2pc_in_flight", &[]);
        }
        if in_flight == 0.0 || tokio::time::Instant::now() >= deadline {
            return in_flight;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
