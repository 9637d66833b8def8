//! The data directory: cluster metadata (`meta.redb`) and one store file per shard
//! (`shard-0000.redb`, ...). The first start on an empty directory initialises a single-node
//! cluster; a directory that holds something else is refused with a clear message.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use ledger_domain::Placement;
use ledger_shard::codec;
use ledger_store::{Embedded, Expect, Memory, Store, WriteBatch};

use crate::config::{Config, ConfigError, StoreKind};

const META_KEY: &[u8] = b"cluster";
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
    /// `ledgerd init` with a store other than the embedded one (nothing to initialise).
    #[error("init applies to the embedded store only")]
    InitNeedsEmbedded,
    /// The listener or the gRPC server failed.
    #[error("serving: {0}")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub fn open(
    config: &Config,
    now_ms: u64,
) -> Result<(ClusterMeta, Vec<Arc<dyn Store>>), StartError> {
    match config.store {
        StoreKind::Memory => {
            let meta = init_meta(config, now_ms);
            let stores = (0..meta.shard_count).map(|_| Arc::new(Memory::new()) as Arc<dyn Store>);
            Ok((meta.clone(), stores.collect()))
        }
        StoreKind::Embedded => open_embedded(config, now_ms),
    }
}

/// `ledgerd init`: like the first start, but refuses an initialised directory.
pub fn init(config: &Config, now_ms: u64) -> Result<ClusterMeta, StartError> {
    if config.data_dir.join(META_FILE).exists() {
        return Err(StartError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: "is already initialised; `ledgerd start` uses it as it is".into(),
        });
    }
    open_embedded(config, now_ms).map(|(meta, _)| meta)
}

fn init_meta(config: &Config, now_ms: u64) -> ClusterMeta {
    ClusterMeta {
        cluster_id: format!("{}-{now_ms}", config.node_id),
        shard_count: config.shards,
        vnodes_per_shard: Placement::VNODES_PER_SHARD_DEFAULT,
        shards: (0..config.shards)
            .map(|shard| ShardInfo {
                shard,
                region: config.region.clone(),
            })
            .collect(),
    }
}

fn open_embedded(
    config: &Config,
    now_ms: u64,
) -> Result<(ClusterMeta, Vec<Arc<dyn Store>>), StartError> {
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
    let meta = match meta_store.get(META_KEY).map_err(|e| fail(e.to_string()))? {
        Some(bytes) => codec::decode::<ClusterMeta>("cluster metadata", &bytes)
            .map_err(|e| fail(format!("{META_FILE} is damaged: {e}")))?,
        None => {
            let meta = init_meta(config, now_ms);
            let mut batch = WriteBatch::default();
            batch.expect(META_KEY.to_vec(), Expect::Absent);
            batch.put(META_KEY.to_vec(), codec::encode(&meta));
            batch.put(FORMAT_KEY.to_vec(), DATA_FORMAT.to_be_bytes().to_vec());
            meta_store.commit(&batch).map_err(|e| fail(e.to_string()))?;
            meta
        }
    };
    check_format(&meta_store).map_err(fail)?;
    if !fresh && meta.shard_count != config.shards {
        tracing::warn!(
            configured = config.shards,
            initialised = meta.shard_count,
            "the shard count is fixed at init; using the initialised count"
        );
    }
    // A floor keeps tiny configurations usable.
    let shards = meta.shard_count as usize;
    let limits = ledger_store::Limits {
        cache_bytes: (config.store_cache_bytes / shards).max(4 << 20),
        overlay_bytes: (config.store_overlay_bytes / shards).max(1 << 20),
        ..ledger_store::Limits::default()
    };
    // Entries (statement lines) are written once, in version order: checkpoints pack them.
    let stores = ledger_store::open_shards(
        dir,
        meta.shard_count,
        limits,
        Some(ledger_shard::keys::entry_group),
    )
    .map_err(|e| fail(e.to_string()))?
    .into_iter()
    .map(|s| Arc::new(s) as Arc<dyn Store>)
    .collect();
    Ok((meta, stores))
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
