//! The data directory: cluster metadata (`meta.redb`) and one store file per shard
//! (`shard-0000.redb`, ...). The first start on an empty directory initialises a single-node
//! cluster; a directory that holds something else is refused with a clear message.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use ledger_domain::cluster::{ClusterFile, ClusterMap, MapError, NodeInfo};
use ledger_domain::{Placement, ShardId};
use ledger_shard::codec;
use ledger_store::{Embedded, Expect, Memory, Store, WriteBatch};

use crate::config::{Config, ConfigError, StoreKind};

const META_KEY: &[u8] = b"cluster";
/// The cluster map (`ledger_domain::cluster::ClusterMap`) and this node's id in it. A directory
/// initialised before maps existed has neither: it is a single node's, and its map is made from
/// its metadata at start.
const MAP_KEY: &[u8] = b"map";
const NODE_KEY: &[u8] = b"node";
const META_FILE: &str = "meta.redb";
/// Key of the data format marker in `meta.redb`: a big-endian u32.
const FORMAT_KEY: &[u8] = b"format";

/// The on-disk format this build writes. Raise it whenever a build writes something an older
/// build would misread (it then refuses the directory instead), and keep reading the formats
/// from [`DATA_FORMAT_OLDEST`] up.
///
/// - 1: entries one row each (2026-11-24 to 2026-12-01; directories from before 2026-11-24
///   hold transfer records without a trace id, which no later build decodes: see
///   docs/ARCHITECTURE.md, Known gaps).
/// - 2: entries packed in chunks (`ledger_store::embedded`, packed groups); an older build would not see them.
pub const DATA_FORMAT: u32 = 2;
/// The oldest format this build reads (and upgrades in place).
pub const DATA_FORMAT_OLDEST: u32 = 1;

/// Cluster metadata, written once at init.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub shard_count: u32,
    pub vnodes_per_shard: u32,
    /// The shard map: each shard's home region.
    pub shards: Vec<ShardInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub shard: u32,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// A shard's stored state could not be read at start.
    #[error("store: {0}")]
    Read(#[from] ledger_shard::ReadError),
    /// `ledgerd init` with the memory store (nothing to initialise).
    #[error("init applies to the embedded and FoundationDB stores only")]
    InitNeedsEmbedded,
    /// `store = "fdb"` in a ledgerd built without FoundationDB support.
    #[error(
        "store = \"fdb\": this ledgerd was built without FoundationDB support; build it with \
         `cargo build --release --bin ledgerd --features fdb` (needs libfdb_c), or use the \
         embedded store"
    )]
    FdbNotBuilt,
    /// The FoundationDB cluster could not be opened.
    #[error("FoundationDB: {0}")]
    Fdb(#[source] ledger_store::Error),
    /// The listener or the gRPC server failed.
    #[error("serving: {0}")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The cluster file cannot be read or parsed.
    #[error("cluster file {path}: {reason}")]
    ClusterFile { path: String, reason: String },
    /// The cluster file is wrong: what and where.
    #[error("cluster file {path}: {source}")]
    Map {
        path: String,
        #[source]
        source: MapError,
    },
}

/// What `open` and `init` found or made: the metadata, the cluster map and this node's id.
#[derive(Clone, Debug)]
pub struct Opened {
    pub meta: ClusterMeta,
    pub map: ClusterMap,
    pub node: String,
}

/// The stores of the shards this node leads, with their shard ids.
pub type Stores = Vec<(ShardId, Arc<dyn Store>)>;

/// Stores the nodes of a region share, by shard: what FoundationDB gives every node of its
/// region (tests share memory stores between nodes in one process).
pub type SharedStores = Arc<dyn Fn(ShardId) -> Arc<dyn Store> + Send + Sync>;

/// What `open` found: the metadata, map and node id; the stores of the shards this node may
/// lead; and whether the nodes of its region share them (leadership then moves by lease).
pub struct Opening {
    pub opened: Opened,
    pub stores: Stores,
    pub shared: bool,
}

/// Opens the data directory and the stores: the shards the map gives this node, from its own
/// files; or every shard of its region, from `shared` or FoundationDB (shared by the region's
/// nodes).
pub fn open(
    config: &Config,
    shared: Option<&SharedStores>,
    now_ms: u64,
) -> Result<Opening, StartError> {
    let opened = match (config.store, shared) {
        (_, Some(_)) | (StoreKind::Embedded | StoreKind::Fdb, None) => {
            open_meta(config, None, now_ms)?
        }
        (StoreKind::Memory, None) => {
            let map = single_node_map(config, config.shards, Placement::VNODES_PER_SHARD_DEFAULT)?;
            let meta = meta_of(&map, config, now_ms);
            let stores = (0..meta.shard_count)
                .map(|shard| (ShardId(shard), Arc::new(Memory::new()) as Arc<dyn Store>));
            return Ok(Opening {
                opened: Opened {
                    meta,
                    map,
                    node: config.node_id.clone(),
                },
                stores: stores.collect(),
                shared: false,
            });
        }
    };
    let region = opened
        .map
        .node(&opened.node)
        .map(|n| n.region.clone())
        .unwrap_or_default();
    let of_region: Vec<u32> = (0..opened.map.shard_count())
        .filter(|s| opened.map.shards[*s as usize].region == region)
        .collect();
    let (stores, shared) = match (shared, config.store) {
        (Some(shared), _) => {
            let stores = of_region
                .iter()
                .map(|s| (ShardId(*s), shared(ShardId(*s))))
                .collect();
            (stores, true)
        }
        (None, StoreKind::Fdb) => (open_fdb_stores(config, &of_region)?, true),
        (None, _) => {
            let led: Vec<u32> = opened
                .map
                .shards_of(&opened.node)
                .iter()
                .map(|s| s.0)
                .collect();
            (open_stores(config, &led)?, false)
        }
    };
    Ok(Opening {
        opened,
        stores,
        shared,
    })
}

/// The stores of the region's shards in its FoundationDB cluster (the cluster map and this
/// node's metadata stay in the data directory). The client's network thread must be running
/// (`ledger_store_fdb::Network`, started by `run`).
#[cfg(feature = "fdb")]
fn open_fdb_stores(config: &Config, led: &[u32]) -> Result<Stores, StartError> {
    let f = &config.fdb;
    let db = ledger_store_fdb::open_database(&ledger_store_fdb::FdbOptions {
        cluster_file: f.cluster_file.clone(),
        cluster_name: f.cluster_name.clone(),
        timeout_ms: i32::try_from(f.transaction_timeout_ms).unwrap_or(i32::MAX),
        retry_limit: i32::try_from(f.transaction_retry_limit).unwrap_or(i32::MAX),
    })
    .map_err(StartError::Fdb)?;
    Ok(led
        .iter()
        .map(|shard| {
            let store = ledger_store_fdb::FdbStore::new(Arc::clone(&db), &f.cluster_name, *shard);
            (ShardId(*shard), Arc::new(store) as Arc<dyn Store>)
        })
        .collect())
}

#[cfg(not(feature = "fdb"))]
fn open_fdb_stores(_config: &Config, _led: &[u32]) -> Result<Stores, StartError> {
    Err(StartError::FdbNotBuilt)
}

/// `ledgerd init`: writes the metadata and the cluster map (from `cluster`, the cluster file,
/// else a single node's), and refuses an initialised directory.
pub fn init(config: &Config, cluster: Option<&Path>, now_ms: u64) -> Result<Opened, StartError> {
    if config.data_dir.join(META_FILE).exists() {
        return Err(StartError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: "is already initialised; `ledgerd start` uses it as it is".into(),
        });
    }
    let map = match cluster {
        Some(path) => Some(read_cluster_file(path, &config.node_id)?),
        None => None,
    };
    open_meta(config, map, now_ms)
}

/// Reads and checks a cluster file; `node` must be one of its nodes.
pub fn read_cluster_file(path: &Path, node: &str) -> Result<ClusterMap, StartError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| StartError::ClusterFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let file: ClusterFile = toml::from_str(&text).map_err(|e| StartError::ClusterFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let map_error = |source| StartError::Map {
        path: shown.clone(),
        source,
    };
    let map = file.check().map_err(map_error)?;
    map.require_node(node).map_err(map_error)?;
    Ok(map)
}

/// The map of a single node owning every shard, in the configured region.
fn single_node_map(
    config: &Config,
    shards: u32,
    vnodes_per_shard: u32,
) -> Result<ClusterMap, StartError> {
    let node = NodeInfo {
        id: config.node_id.clone(),
        region: config.region.clone(),
        client_address: config.listen.to_string(),
        peer_address: String::new(),
    };
    ClusterMap::single_node(shards, vnodes_per_shard, node).map_err(|source| StartError::Map {
        path: "(single node)".into(),
        source,
    })
}

fn meta_of(map: &ClusterMap, config: &Config, now_ms: u64) -> ClusterMeta {
    ClusterMeta {
        cluster_id: format!("{}-{now_ms}", config.node_id),
        shard_count: map.shard_count(),
        vnodes_per_shard: map.vnodes_per_shard,
        shards: (0..map.shard_count())
            .map(|shard| ShardInfo {
                shard,
                region: map.shards[shard as usize].region.clone(),
            })
            .collect(),
    }
}

/// Opens (creating if new) `meta.redb`: the metadata, the map and this node's id. A new
/// directory gets `map` (a cluster file's) or a single node's map.
fn open_meta(config: &Config, map: Option<ClusterMap>, now_ms: u64) -> Result<Opened, StartError> {
    let dir = &config.data_dir;
    let fail = |reason: String| StartError::DataDir {
        path: dir.display().to_string(),
        reason,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(fail("exists and is not a directory".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
    let meta_path = dir.join(META_FILE);
    let fresh = !meta_path.exists();
    if fresh {
        let other = std::fs::read_dir(dir)
            .map_err(|e| fail(format!("cannot list it: {e}")))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| !name.starts_with('.'));
        if let Some(name) = other {
            return Err(fail(format!(
                "is not empty (it holds {name:?}) and has no {META_FILE}, so it is not a ledger \
                 data directory; choose an empty or new directory"
            )));
        }
        probe_writable(dir).map_err(|e| fail(format!("is not writable: {e}")))?;
    }
    let meta_store = Embedded::open(&meta_path).map_err(|e| fail(e.to_string()))?;
    let stored = |key: &[u8]| meta_store.get(key).map_err(|e| fail(e.to_string()));
    let damaged = |e: codec::DecodeError| fail(format!("{META_FILE} is damaged: {e}"));
    let opened = match stored(META_KEY)? {
        Some(bytes) => {
            let meta = codec::decode::<ClusterMeta>("cluster metadata", &bytes).map_err(damaged)?;
            let (map, node) = match (stored(MAP_KEY)?, stored(NODE_KEY)?) {
                (Some(map), Some(node)) => (
                    codec::decode::<ClusterMap>("cluster map", &map).map_err(damaged)?,
                    codec::decode::<String>("node id", &node).map_err(damaged)?,
                ),
                // Initialised before maps: a single node's.
                _ => (
                    single_node_map(config, meta.shard_count, meta.vnodes_per_shard)?,
                    config.node_id.clone(),
                ),
            };
            Opened { meta, map, node }
        }
        None => {
            let map = match map {
                Some(map) => map,
                None => {
                    single_node_map(config, config.shards, Placement::VNODES_PER_SHARD_DEFAULT)?
                }
            };
            let meta = meta_of(&map, config, now_ms);
            let mut batch = WriteBatch::default();
            batch.expect(META_KEY.to_vec(), Expect::Absent);
            batch.put(META_KEY.to_vec(), codec::encode(&meta));
            batch.put(MAP_KEY.to_vec(), codec::encode(&map));
            batch.put(NODE_KEY.to_vec(), codec::encode(&config.node_id));
            batch.put(FORMAT_KEY.to_vec(), DATA_FORMAT.to_be_bytes().to_vec());
            meta_store.commit(&batch).map_err(|e| fail(e.to_string()))?;
            Opened {
                meta,
                map,
                node: config.node_id.clone(),
            }
        }
    };
    check_format(&meta_store).map_err(fail)?;
    if !fresh && opened.meta.shard_count != config.shards {
        tracing::warn!(
            configured = config.shards,
            initialised = opened.meta.shard_count,
            "the shard count is fixed at init; using the initialised count"
        );
    }
    Ok(opened)
}

/// Opens the stores of the shards this node leads.
fn open_stores(config: &Config, led: &[u32]) -> Result<Stores, StartError> {
    let dir = &config.data_dir;
    // A floor keeps tiny configurations usable.
    let shards = led.len().max(1);
    let limits = ledger_store::Limits {
        cache_bytes: (config.store_cache_bytes / shards).max(4 << 20),
        overlay_bytes: (config.store_overlay_bytes / shards).max(1 << 20),
        ..ledger_store::Limits::default()
    };
    // Entries (statement lines) are written once, in version order: checkpoints pack them.
    let stores =
        ledger_store::open_shards_of(dir, led, limits, Some(ledger_shard::keys::entry_group))
            .map_err(|e| StartError::DataDir {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?
            .into_iter()
            .zip(led)
            .map(|(s, shard)| (ShardId(*shard), Arc::new(s) as Arc<dyn Store>))
            .collect();
    Ok(stores)
}

/// Refuses a directory written in a format this build does not read, before any shard store
/// is opened; marks an older readable one with [`DATA_FORMAT`], since this build's writes
/// (packed entries) need a reader of that format from now on. A directory initialised before
/// the marker existed (2026-12-02) has none and is format 1 or 2, both readable.
fn check_format(meta_store: &Embedded) -> Result<(), String> {
    let found = match meta_store.get(FORMAT_KEY).map_err(|e| e.to_string())? {
        None => None,
        Some(bytes) => Some(
            <[u8; 4]>::try_from(bytes.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| format!("{META_FILE} is damaged: its format marker is {bytes:?}"))?,
        ),
    };
    match found {
        Some(format) if format > DATA_FORMAT => Err(format!(
            "was written by a newer ledgerd (data format {format}; this build reads formats \
             {DATA_FORMAT_OLDEST} to {DATA_FORMAT}): run that version or a later one"
        )),
        Some(format) if format < DATA_FORMAT_OLDEST => Err(format!(
            "is in data format {format}, which this build no longer reads (it reads \
             {DATA_FORMAT_OLDEST} to {DATA_FORMAT})"
        )),
        Some(DATA_FORMAT) => Ok(()),
        _ => {
            let mut batch = WriteBatch::default();
            batch.put(FORMAT_KEY.to_vec(), DATA_FORMAT.to_be_bytes().to_vec());
            meta_store.commit(&batch).map_err(|e| e.to_string())?;
            tracing::info!(format = DATA_FORMAT, previous = ?found, "data directory marked with this build's data format");
            Ok(())
        }
    }
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(probe)
}

#[cfg(all(test, not(feature = "fdb")))]
mod tests {
    use super::*;

    /// A build without FoundationDB support refuses `store = "fdb"` at start, saying how to
    /// get one, instead of serving from some other store.
    #[test]
    fn a_build_without_fdb_refuses_the_fdb_store_and_says_how_to_build_one() {
        let dir = tempfile::tempdir().unwrap();
        let cluster_file = dir.path().join("fdb.cluster");
        std::fs::write(&cluster_file, "ledger:test@127.0.0.1:4500\n").unwrap();
        let mut config = Config {
            store: StoreKind::Fdb,
            data_dir: dir.path().join("data"),
            shards: 2,
            ..Config::default()
        };
        config.fdb.cluster_file = cluster_file;
        config.validate().unwrap();
        let refused = open(&config, None, 0).map(|_| ()).unwrap_err();
        assert!(matches!(refused, StartError::FdbNotBuilt), "{refused}");
        assert!(refused.to_string().contains("--features fdb"), "{refused}");
    }
}
