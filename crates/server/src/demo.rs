//! `ledgerd demo`: a multi-region cluster on this machine, one `ledgerd` process per node.
//!
//! The first run writes a cluster file (`cluster.toml`: the regions, their nodes on free
//! loopback ports, each node's shards) and initialises each node's data directory; later runs
//! with the same directory reuse both, so the data survives. Every run writes each node's
//! config file (`<node>.toml`), which is what `ledgerd start --config <path>` serves: the
//! simulated wide-area delay and the trace endpoint are taken from the run's flags.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use ledger_domain::cluster::{ClusterFile, NodeEntry, RegionEntry, ShardEntry};

use crate::config::{Config, PeerConfig};

/// What `ledgerd demo` runs.
#[derive(Clone, Debug)]
pub struct DemoPlan {
    /// The regions and how many nodes each has.
    pub regions: Vec<(String, usize)>,
    pub shards_per_node: u32,
    pub wan_delay_ms: u64,
    pub otlp_endpoint: String,
    /// Prometheus endpoint of each node on a free port.
    pub metrics: bool,
    pub dir: PathBuf,
}

/// A node of the demo cluster, ready to start.
#[derive(Clone, Debug)]
pub struct DemoNode {
    pub id: String,
    pub region: String,
    pub client_address: String,
    pub config: PathBuf,
}

pub const CLUSTER_FILE: &str = "cluster.toml";
/// The operator's token of the demo cluster, in its directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Parses `eu,us,ap` (each with `nodes_per_region` nodes) or `eu:2,us,ap` (a count per region).
pub fn parse_regions(spec: &str, nodes_per_region: usize) -> Result<Vec<(String, usize)>, String> {
    let mut regions: Vec<(String, usize)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = match part.split_once(':') {
            Some((name, count)) => {
                let count = count
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        format!("--regions: {part:?}: the node count must be a number from 1")
                    })?;
                (name, count)
            }
            None => (part, nodes_per_region),
        };
        if ledger_domain::validate_id("region", name).is_err() {
            return Err(format!(
                "--regions: {name:?} is not a region name ([A-Za-z0-9._:@/-])"
            ));
        }
        if regions.iter().any(|(n, _)| n == name) {
            return Err(format!("--regions: {name:?} is given twice"));
        }
        regions.push((name.to_string(), count));
    }
    if regions.is_empty() {
        return Err("--regions: name at least one region".into());
    }
    if nodes_per_region == 0 {
        return Err("--nodes-per-region must be at least 1".into());
    }
    Ok(regions)
}

/// Writes (first time) the cluster file and the data directories, and (every time) each
/// node's config file. Returns the nodes in the cluster file's order.
pub fn prepare(plan: &DemoPlan) -> Result<Vec<DemoNode>, String> {
    std::fs::create_dir_all(&plan.dir)
        .map_err(|e| format!("{}: cannot create it: {e}", plan.dir.display()))?;
    let cluster_path = plan.dir.join(CLUSTER_FILE);
    let file = if cluster_path.exists() {
        let text = std::fs::read_to_string(&cluster_path)
            .map_err(|e| format!("{}: {e}", cluster_path.display()))?;
        let file: ClusterFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", cluster_path.display()))?;
        tracing::info!(path = %cluster_path.display(), "reusing the demo cluster (its data too)");
        file
    } else {
        let file = new_cluster(plan)?;
        let text = toml::to_string(&file).map_err(|e| e.to_string())?;
        std::fs::write(&cluster_path, text)
            .map_err(|e| format!("{}: {e}", cluster_path.display()))?;
        file
    };
    file.check()
        .map_err(|e| format!("{}: {e}", cluster_path.display()))?;
    // One operator's token for every node (made the first time): an admin call may go to any.
    let token = plan.dir.join(ADMIN_TOKEN_FILE);
    crate::operator::Credential::load(Path::new(""), &token).map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for node in &file.nodes {
        let data_dir = plan.dir.join(&node.id);
        let mut config = Config {
            listen: node
                .client_address
                .parse()
                .map_err(|e| format!("node {}: client address: {e}", node.id))?,
            data_dir: data_dir.clone(),
            node_id: node.id.clone(),
            region: node.region.clone(),
            shards: file.shards,
            peer: PeerConfig {
                wan_delay_ms: plan.wan_delay_ms,
                ..PeerConfig::default()
            },
            ..Config::default()
        };
        config
            .telemetry
            .otlp_endpoint
            .clone_from(&plan.otlp_endpoint);
        config.telemetry.service_name = "ledgerd".into();
        config.admin.token_file.clone_from(&token);
        if plan.metrics {
            config.telemetry.metrics_listen = "127.0.0.1:0".into();
        }
        let config_path = plan.dir.join(format!("{}.toml", node.id));
        let text = toml::to_string(&config).map_err(|e| e.to_string())?;
        std::fs::write(&config_path, text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        if !data_dir.join("meta.redb").exists() {
            crate::init(&config, Some(&cluster_path)).map_err(|e| e.to_string())?;
        }
        nodes.push(DemoNode {
            id: node.id.clone(),
            region: node.region.clone(),
            client_address: node.client_address.clone(),
            config: config_path,
        });
    }
    Ok(nodes)
}

/// A new cluster file: nodes `<region>-<n>` on free loopback ports, `shards_per_node` shards
/// each, owned by their node in its region.
fn new_cluster(plan: &DemoPlan) -> Result<ClusterFile, String> {
    let mut nodes = Vec::new();
    let mut shard_entries = Vec::new();
    let mut next_shard = 0u32;
    for (region, count) in &plan.regions {
        for n in 1..=*count {
            let id = format!("{region}-{n}");
            nodes.push(NodeEntry {
                id: id.clone(),
                region: region.clone(),
                client_address: free_address()?,
                peer_address: free_address()?,
            });
            let last = next_shard + plan.shards_per_node - 1;
            shard_entries.push(ShardEntry {
                ids: format!("{next_shard}-{last}"),
                region: region.clone(),
                owner: id,
            });
            next_shard = last + 1;
        }
    }
    Ok(ClusterFile {
        version: 1,
        shards: next_shard,
        vnodes_per_shard: ledger_domain::Placement::VNODES_PER_SHARD_DEFAULT,
        regions: plan
            .regions
            .iter()
            .map(|(name, _)| RegionEntry { name: name.clone() })
            .collect(),
        nodes,
        shard_entries,
    })
}

/// A loopback address with a port free now (the OS picks it; kept in the cluster file).
fn free_address() -> Result<String, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    Ok(address.to_string())
}

/// The data directory `ledgerd demo` uses when not told.
pub fn default_dir() -> PathBuf {
    Path::new("demo-data").to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_parsed_with_counts_and_refused_by_name() {
        assert_eq!(
            parse_regions("eu:2,us,ap", 1).unwrap(),
            vec![("eu".into(), 2), ("us".into(), 1), ("ap".into(), 1)]
        );
        assert!(parse_regions("eu,eu", 1).unwrap_err().contains("twice"));
        assert!(parse_regions("eu:0", 1).unwrap_err().contains("node count"));
        assert!(parse_regions("", 1).unwrap_err().contains("at least one"));
        assert!(
            parse_regions("e u", 1)
                .unwrap_err()
                .contains("not a region name")
        );
    }

    #[test]
    fn a_new_demo_cluster_is_a_valid_map_with_every_node_owning_its_shards() {
        let dir = tempfile::tempdir().unwrap();
        let plan = DemoPlan {
            regions: parse_regions("eu:2,us,ap", 1).unwrap(),
            shards_per_node: 2,
            wan_delay_ms: 0,
            otlp_endpoint: String::new(),
            metrics: false,
            dir: dir.path().to_path_buf(),
        };
        let map = new_cluster(&plan).unwrap().check().unwrap();
        assert_eq!((map.nodes.len(), map.shard_count()), (4, 8));
        assert_eq!(map.shards_of("eu-2").len(), 2);
    }
}
