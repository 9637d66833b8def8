//! Starting real servers for tests: in process (`ledger_server::run` on port 0) or as a child
//! `ledgerd` process that a crash test can `kill -9`.

use std::io::{BufRead, BufReader};
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
            ledger_server::run(config, listener, shutdown, move |_| {
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
    workspace_bin("ledger-server", "ledgerd")
}

/// The `ledger` CLI binary, built if missing.
pub fn ledger_bin() -> PathBuf {
    workspace_bin("ledger-client", "ledger")
}

/// A binary of the workspace next to this test binary, (re)built first so a test never runs a
/// stale binary (`cargo test -p ledger-tests` alone would not rebuild it; this is quick when it
/// is up to date).
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join(name);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|b| b == name) {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", package, "--bin", name]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build");
        assert!(status.success(), "building {name} failed");
        built.push(name.to_string());
    }
    bin
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
