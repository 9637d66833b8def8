//! A multi-region cluster of real `ledgerd` processes, started with `ledgerd demo` (one child
//! process per node), with the means to kill a node and start it again as an operator would
//! (`ledgerd start --config <path>`), and to read every node's stores once it is stopped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ledger_domain::ShardId;
use ledger_domain::cluster::ClusterFile;
use ledger_store::Embedded;

use crate::process::ledgerd_bin;

/// A node as `ledgerd demo` printed it.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: String,
    pub region: String,
    /// `http://host:port`, for a client.
    pub addr: String,
    pub pid: u32,
    pub config: PathBuf,
    /// Its Prometheus endpoint, with `ledgerd demo --metrics`.
    pub metrics: Option<String>,
}

/// A running `ledgerd demo`.
#[derive(Debug)]
pub struct Demo {
    demo: Child,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    /// Nodes started again by the test (the demo does not restart a node that dies).
    restarted: Vec<(String, Child)>,
}

impl Demo {
    /// `ledgerd demo --regions <regions> --shards-per-node <n> --data-dir <dir> <extra>`;
    /// returns once every node serves.
    pub fn start(dir: &Path, regions: &str, shards_per_node: u32, extra: &[&str]) -> Demo {
        let mut demo = Command::new(ledgerd_bin())
            .args(["demo", "--regions", regions, "--shards-per-node"])
            .arg(shards_per_node.to_string())
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("LEDGER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ledgerd demo");
        let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
        let mut nodes = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("demo output");
            if line.starts_with("demo cluster running") {
                break;
            }
            if let Some(node) = parse_node_line(&line) {
                nodes.push(node);
            }
        }
        assert!(!nodes.is_empty(), "ledgerd demo started no node");
        // Keep draining: the nodes' output passes through the demo's.
        std::thread::spawn(move || for _ in lines {});
        Demo {
            demo,
            dir: dir.to_path_buf(),
            nodes,
            restarted: Vec::new(),
        }
    }

    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// `kill -9` of a node's process.
    pub fn kill9(&mut self, id: &str) {
        if let Some(i) = self.restarted.iter().position(|(n, _)| n == id) {
            let (_, mut child) = self.restarted.remove(i);
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            return;
        }
        let pid = self.node(id).pid.to_string();
        let status = Command::new("kill").args(["-9", &pid]).status().unwrap();
        assert!(status.success(), "kill -9 {pid}");
        // The demo reaps its children; wait until the process is gone or is a zombie with no
        // thread left. Its first thread turns zombie before the others have exited, and the
        // last one to exit closes the files (and releases the stores' locks).
        for _ in 0..500 {
            if !Path::new(&format!("/proc/{pid}")).exists() || exited(&pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("node {id} (pid {pid}) still running 10 s after kill -9");
    }

    /// Starts a killed node again with `ledgerd start --config <its config>`; returns once it
    /// serves.
    pub fn restart(&mut self, id: &str) {
        let config = self.node(id).config.clone();
        let mut child = Command::new(ledgerd_bin())
            .args(["start", "--config"])
            .arg(&config)
            .env("LEDGER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ledgerd start");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert!(
            line.starts_with("ledgerd listening on"),
            "node {id} did not start again: {line:?}"
        );
        let metrics = line
            .split(" | ")
            .find_map(|part| part.trim().strip_prefix("metrics: "))
            .filter(|url| url.starts_with("http"))
            .map(str::to_string);
        let pid = child.id();
        self.restarted.push((id.to_string(), child));
        for node in &mut self.nodes {
            if node.id == id {
                node.pid = pid;
                node.metrics.clone_from(&metrics);
            }
        }
    }

    /// Stops the demo (which stops its nodes) and the nodes started again.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for (_, child) in &mut self.restarted {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        self.restarted.clear();
        let _ = Command::new("kill")
            .args(["-TERM", &self.demo.id().to_string()])
            .status();
        let _ = self.demo.wait();
    }

    /// The cluster file the demo wrote.
    pub fn cluster_file(&self) -> ClusterFile {
        cluster_file_of(&self.dir)
    }

    /// Every node's shard stores in a demo directory, opened from the nodes' data directories
    /// (the cluster must be stopped), with their shard ids.
    pub fn open_stores_of(dir: &Path) -> Vec<(ShardId, Embedded)> {
        let map = cluster_file_of(dir).check().expect("a valid map");
        let mut out = Vec::new();
        for node in &map.nodes {
            let shards: Vec<u32> = map.shards_of(&node.id).iter().map(|s| s.0).collect();
            let stores = ledger_store::open_shards_of(
                &dir.join(&node.id),
                &shards,
                ledger_store::Limits::default(),
                Some(ledger_shard::keys::entry_group),
            )
            .expect("open shards");
            out.extend(shards.into_iter().map(ShardId).zip(stores));
        }
        out
    }
}

fn cluster_file_of(dir: &Path) -> ClusterFile {
    let text = std::fs::read_to_string(dir.join("cluster.toml")).expect("cluster.toml");
    toml::from_str(&text).expect("a cluster file")
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Whether every thread of `pid` has exited (a zombie whose only task left is its first
/// thread's), or the process is gone.
fn exited(pid: &str) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true);
    let threads_left = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    zombie && threads_left <= 1
}

/// `node=<id> region=<r> addr=<host:port> pid=<pid> config=<path>`.
fn parse_node_line(line: &str) -> Option<Node> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    Some(Node {
        id: field("node")?,
        region: field("region")?,
        addr: format!("http://{}", field("addr")?),
        pid: field("pid")?.parse().ok()?,
        config: PathBuf::from(field("config")?),
        metrics: field("metrics"),
    })
}
