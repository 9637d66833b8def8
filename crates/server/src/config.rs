//! ledgerd's configuration: defaults < file (TOML) < environment (`LEDGER_*`) < flags.
//! Validated into one typed error that names the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ledger_shard::Options as ShardOptions;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// Storage backend: "embedded" (durable, default), "fdb" (FoundationDB, `[fdb]`; needs a
    /// ledgerd built with the `fdb` feature) or "memory" (tests only; loses everything).
    pub store: StoreKind,
    /// Shards created by the first start (init). Fixed afterwards.
    pub shards: u32,
    /// This node's name, written into leases.
    pub node_id: String,
    /// This node's region, recorded as every shard's home region at init.
    pub region: String,
    /// Most items in one CreateAccounts / CreateTransfers / Get* call.
    pub batch_size_max: usize,
    /// Largest accepted gRPC message.
    pub message_size_max_bytes: usize,
    /// Server-side cap on a call's duration (a shorter client deadline wins).
    pub request_timeout_ms: u64,
    /// Page cache of the embedded store for the whole node, split evenly between the shards.
    pub store_cache_bytes: usize,
    /// Logged writes the embedded store holds in memory before checkpointing them into redb,
    /// for the whole node, split evenly between the shards (bigger: cheaper checkpoints, more
    /// memory; each shard may briefly hold up to 2.5 times its share).
    pub store_overlay_bytes: usize,
    pub shard: ShardOptions,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub peer: PeerConfig,
    pub admin: AdminConfig,
    pub fdb: FdbConfig,
}

/// The FoundationDB store (`[fdb]`, with `store = "fdb"`): one FoundationDB cluster per region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FdbConfig {
    /// The cluster file of this region's FoundationDB cluster.
    pub cluster_file: PathBuf,
    /// The ledger's subspace in that cluster (several ledgers may share one cluster).
    pub cluster_name: String,
    /// Each FoundationDB transaction's timeout and retry limit.
    pub transaction_timeout_ms: u32,
    pub transaction_retry_limit: u32,
}

impl Default for FdbConfig {
    fn default() -> Self {
        Self {
            cluster_file: PathBuf::new(),
            cluster_name: "ledger".into(),
            transaction_timeout_ms: 5_000,
            transaction_retry_limit: 10,
        }
    }
}

/// Operators' calls (`[admin]`): their credential and audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding the operator's bearer token. Empty: `<data_dir>/admin.token`, written
    /// with a new random token at the first start.
    pub token_file: PathBuf,
    /// The audit log of admin actions (JSON lines, synced). Empty:
    /// `<data_dir>/admin-audit.jsonl`.
    pub audit_log: PathBuf,
}

impl Config {
    /// The admin token file in use.
    pub fn admin_token_file(&self) -> PathBuf {
        if self.admin.token_file.as_os_str().is_empty() {
            self.data_dir.join("admin.token")
        } else {
            self.admin.token_file.clone()
        }
    }

    /// The admin audit log in use.
    pub fn admin_audit_log(&self) -> PathBuf {
        if self.admin.audit_log.as_os_str().is_empty() {
            self.data_dir.join("admin-audit.jsonl")
        } else {
            self.admin.audit_log.clone()
        }
    }
}

/// The node-to-node API of a cluster node (`[peer]`); a single node has no peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// Engine messages queued for one peer; past it new ones are dropped (and counted): the
    /// two-phase commit resends what is not answered.
    pub outbox_messages_max: usize,
    /// Engine messages in one `Deliver` call at most.
    pub deliver_batch_max: usize,
    /// Calls to one peer in flight at most (forwarded commands, reads, lookups); more wait.
    pub calls_in_flight_max: usize,
    /// How long a call to another node may take before it counts as unanswered.
    pub call_timeout_ms: u64,
    /// A simulated one-way delay on every message and call to a node of another region, to
    /// try a multi-region cluster on one machine. 0: none. Logged at start when set.
    pub wan_delay_ms: u64,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            outbox_messages_max: 65_536,
            deliver_batch_max: 4_096,
            calls_in_flight_max: 256,
            call_timeout_ms: 5_000,
            wan_delay_ms: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Embedded,
    Fdb,
    Memory,
}

/// Limits that protect the node whatever the configuration says.
pub const SHARDS_MAX: u32 = 1_024;
pub const BATCH_SIZE_MAX_LIMIT: usize = 65_536;

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().expect("valid address"),
            data_dir: PathBuf::from("./data"),
            store: StoreKind::Embedded,
            shards: 16,
            node_id: "node-1".into(),
            region: "local".into(),
            batch_size_max: 8_190,
            message_size_max_bytes: 16 * 1024 * 1024,
            request_timeout_ms: 30_000,
            store_cache_bytes: 64 << 20,
            store_overlay_bytes: 128 << 20,
            shard: ShardOptions::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
            peer: PeerConfig::default(),
            admin: AdminConfig::default(),
            fdb: FdbConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: String, reason: String },
    #[error("setting `{setting}`: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: String| Err(ConfigError::Invalid { setting, reason });
        if let Err(reason) = self.telemetry.validate() {
            return invalid("telemetry", reason);
        }
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return invalid(
                "shards",
                format!("must be 1-{SHARDS_MAX}, got {}", self.shards),
            );
        }
        if self.batch_size_max == 0 || self.batch_size_max > BATCH_SIZE_MAX_LIMIT {
            return invalid(
                "batch_size_max",
                format!(
                    "must be 1-{BATCH_SIZE_MAX_LIMIT}, got {}",
                    self.batch_size_max
                ),
            );
        }
        if self.message_size_max_bytes < 64 * 1024 {
            return invalid("message_size_max_bytes", "must be at least 65536".into());
        }
        if ledger_domain::validate_id("node_id", &self.node_id).is_err() {
            return invalid("node_id", "must be 1-128 bytes of [A-Za-z0-9._:@/-]".into());
        }
        let s = &self.shard;
        if s.batch_inputs_max == 0 || s.queue_capacity == 0 || s.lock_waiters_max == 0 {
            return invalid(
                "shard",
                "batch_inputs_max, queue_capacity and lock_waiters_max must be > 0".into(),
            );
        }
        if s.lock_wait_ms_max >= s.prepare_timeout_ms {
            // A participant's lock wait must end before the coordinator gives up on it.
            return invalid(
                "shard.lock_wait_ms_max",
                "must be below shard.prepare_timeout_ms".into(),
            );
        }
        if s.quota_outbox_max == 0 || s.settle_batch_max == 0 {
            return invalid(
                "shard",
                "quota_outbox_max and settle_batch_max must be > 0".into(),
            );
        }
        if s.retry_ms == 0 || s.lease_ms < 3 {
            return invalid(
                "shard.retry_ms",
                "retry_ms must be > 0 and lease_ms >= 3".into(),
            );
        }
        if self.store == StoreKind::Fdb {
            let f = &self.fdb;
            if f.cluster_file.as_os_str().is_empty() {
                return invalid(
                    "fdb.cluster_file",
                    "store = \"fdb\" needs the cluster file of this region's FoundationDB cluster"
                        .into(),
                );
            }
            if !f.cluster_file.is_file() {
                return invalid(
                    "fdb.cluster_file",
                    format!("{} is not a readable file", f.cluster_file.display()),
                );
            }
            if ledger_domain::validate_id("fdb.cluster_name", &f.cluster_name).is_err() {
                return invalid(
                    "fdb.cluster_name",
                    "must be 1-128 bytes of [A-Za-z0-9._:@/-]".into(),
                );
            }
            if f.transaction_timeout_ms == 0 || f.transaction_retry_limit == 0 {
                return invalid(
                    "fdb",
                    "transaction_timeout_ms and transaction_retry_limit must be > 0".into(),
                );
            }
        }
        let p = &self.peer;
        if p.outbox_messages_max == 0
            || p.deliver_batch_max == 0
            || p.calls_in_flight_max == 0
            || p.call_timeout_ms == 0
        {
            return invalid(
                "peer",
                "outbox_messages_max, deliver_batch_max, calls_in_flight_max and call_timeout_ms must be > 0".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// `deploy/ledgerd.toml` says it holds the defaults: it must, setting for setting.
    #[test]
    fn the_sample_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/ledgerd.toml");
        let sample = Config::from_file(&path).unwrap();
        assert_eq!(sample, Config::default());
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "shards = 4\n[shard]\nretry_ms = 100\n").unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(
            (c.shards, c.shard.retry_ms, c.batch_size_max),
            (4, 100, 8_190)
        );
        std::fs::write(&path, "shardz = 4\n").unwrap();
        assert!(matches!(
            Config::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
    }

    /// `store = "fdb"` needs the region's cluster file, and says which setting is missing.
    #[test]
    fn the_fdb_store_needs_a_cluster_file_that_exists() {
        let mut c = Config {
            store: StoreKind::Fdb,
            ..Config::default()
        };
        let missing = c.validate().unwrap_err().to_string();
        assert!(missing.contains("`fdb.cluster_file`"), "{missing}");
        c.fdb.cluster_file = "/nonexistent/fdb.cluster".into();
        let absent = c.validate().unwrap_err().to_string();
        assert!(absent.contains("not a readable file"), "{absent}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fdb.cluster");
        std::fs::write(&file, "ledger:test@127.0.0.1:4500\n").unwrap();
        c.fdb.cluster_file = file;
        c.validate().unwrap();
    }

    #[test]
    fn invalid_settings_are_named() {
        let c = Config {
            shards: 0,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("`shards`"));
    }
}
