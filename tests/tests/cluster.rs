//! The cluster map from the operator's side: `ledgerd init --cluster FILE --node ID` with the
//! real binary. A good file initialises the node; each kind of mistake is refused with what
//! and where, and nothing is written.

use std::path::Path;
use std::process::Command;

use ledger_tests::process::ledgerd_bin;

/// Runs `ledgerd init --cluster <file> --node <node>` in a fresh data directory under `dir`;
/// returns (exit code, stdout + stderr).
fn init(dir: &Path, cluster: &str, node: &str) -> (i32, String) {
    let file = dir.join("cluster.toml");
    std::fs::write(&file, cluster).unwrap();
    let out = Command::new(ledgerd_bin())
        .args(["init", "--cluster"])
        .arg(&file)
        .args(["--node", node, "--data-dir"])
        .arg(dir.join(node))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster.toml");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_example_cluster_file_initialises_each_of_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = init(dir.path(), &example(), "us-1");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "node us-1 in region us, 3 of 12 shards, map version 1 (4 nodes in 3 regions)"
        ),
        "{out}"
    );
    // Initialised once: a second init is refused (`ledgerd start` serves it; see
    // tests/tests/multi_region.rs).
    let (code, out) = init(dir.path(), &example(), "us-1");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is already initialised"), "{out}");
}

#[test]
fn bad_cluster_files_are_refused_with_what_and_where() {
    let cases = [
        (
            "an unknown region",
            example().replace("region = \"ap\"\nowner", "region = \"sa\"\nowner"),
            "ap-1",
            "shard entry \"9-11\" names region \"sa\", which is not among the regions",
        ),
        (
            "a shard owned by no node",
            example().replace("ids = \"9-11\"", "ids = \"9-10\""),
            "ap-1",
            "shard 11 is given by no entry",
        ),
        (
            "duplicate addresses",
            example().replace("127.0.0.1:51052", "127.0.0.1:51051"),
            "eu-1",
            "address 127.0.0.1:51051 is used twice: by node \"eu-1\" and by node \"eu-2\"",
        ),
        (
            "a node id not in the file",
            example(),
            "sa-1",
            "node \"sa-1\" is not in the cluster file (its nodes: eu-1, eu-2, us-1, ap-1)",
        ),
        (
            "an unknown setting",
            example().replace("shards = 12", "shards = 12\nreplicas = 3"),
            "eu-1",
            "unknown field `replicas`",
        ),
    ];
    for (what, file, node, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (code, out) = init(dir.path(), &file, node);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains("cluster file "), "{what}: {out}");
        assert!(out.contains(message), "{what}: {out}");
        assert!(
            !dir.path().join(node).join("meta.redb").exists(),
            "{what}: nothing written"
        );
    }
}

/// Two nodes initialised from files of different map versions: every call between them is
/// refused, naming both nodes and both versions, and the operator sees the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_different_map_versions_refuse_each_other_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let file = |version: u64, ports: &[u16; 4]| {
        format!(
            "version = {version}\nshards = 4\n[[regions]]\nname = \"eu\"\n[[regions]]\nname = \"us\"\n\
             [[nodes]]\nid = \"eu-1\"\nregion = \"eu\"\nclient_address = \"127.0.0.1:{}\"\npeer_address = \"127.0.0.1:{}\"\n\
             [[nodes]]\nid = \"us-1\"\nregion = \"us\"\nclient_address = \"127.0.0.1:{}\"\npeer_address = \"127.0.0.1:{}\"\n\
             [[shard]]\nids = \"0-1\"\nregion = \"eu\"\nowner = \"eu-1\"\n[[shard]]\nids = \"2-3\"\nregion = \"us\"\nowner = \"us-1\"\n",
            ports[0], ports[1], ports[2], ports[3]
        )
    };
    let ports = [port(), port(), port(), port()];
    let mut nodes = Vec::new();
    for (node, version) in [("eu-1", 1), ("us-1", 2)] {
        let cluster = dir.path().join(format!("cluster-{node}.toml"));
        std::fs::write(&cluster, file(version, &ports)).unwrap();
        let data = dir.path().join(node);
        let status = Command::new(ledgerd_bin())
            .args(["init", "--cluster"])
            .arg(&cluster)
            .args(["--node", node, "--data-dir"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success());
        let mut child = Command::new(ledgerd_bin())
            .args(["start", "--data-dir"])
            .arg(&data)
            .env("LEDGER_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.contains(&format!("map version {version}")), "{line}");
        nodes.push(Killed(child));
    }
    let eu = ledger_client::Client::connect(&format!("127.0.0.1:{}", ports[0]))
        .await
        .unwrap();
    let account = ledger_client::pb::Account {
        id: "acct".into(),
        ledger: "USD".into(),
        region: "us".into(),
        ..Default::default()
    };
    let err = eu
        .create_accounts(vec![account])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "map versions differ: node \"eu-1\" called with map version 1, node \"us-1\" holds version 2"
        ),
        "{err}"
    );
    let status = eu.cluster_status().await.unwrap();
    let us = status.nodes.iter().find(|n| n.id == "us-1").unwrap();
    assert_eq!((us.reachable, us.map_version), (true, 2), "{us:?}");
}

/// A child process killed (and reaped) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
