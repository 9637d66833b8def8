//! ledgerd: configuration, start-up (data directory, cluster metadata, stores, shard leaders),
//! routing, and the gRPC services. The binary is a thin layer over [`run`], so tests start real
//! servers on port 0.

mod calls;
pub mod config;
mod data_dir;
pub mod error;
pub mod peer;
pub mod prometheus;
mod router;
mod service;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use ledger_domain::Placement;
use ledger_proto::pb::ledger_service_server::LedgerServiceServer;
use ledger_shard::node::Node;
use ledger_shard::{Clock, SystemClock};

pub use config::{Config, ConfigError, StoreKind};
pub use data_dir::{ClusterMeta, DATA_FORMAT, Opened, ShardInfo, StartError};

/// What `run` reports once it is serving (for the start-up summary and tests).
#[derive(Clone, Debug)]
pub struct Started {
    pub listen: std::net::SocketAddr,
    pub meta: ClusterMeta,
}

/// Initialises an empty data directory (cluster metadata and map; the shard files come at the
/// first start) and returns what it wrote. With `cluster`, the map is that cluster file's and
/// `config.node_id` must be one of its nodes; without, the map is a single node's. Refuses a
/// directory that is already initialised or holds anything else.
pub fn init(config: &Config, cluster: Option<&std::path::Path>) -> Result<Opened, StartError> {
    config.validate()?;
    if config.store != StoreKind::Embedded {
        return Err(StartError::InitNeedsEmbedded);
    }
    data_dir::init(config, cluster, SystemClock.now_ms())
}

/// Opens the data directory, starts every shard leader and serves gRPC on `listener` until
/// `shutdown` resolves. Leaders finish their current batch before it returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), StartError> {
    config.validate()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (opened, stores) = data_dir::open(&config, clock.now_ms())?;
    let meta = opened.meta;
    let placement = Placement::new(meta.shard_count, meta.vnodes_per_shard);
    let node = Node::start(
        &config.node_id,
        placement,
        stores,
        config.shard.clone(),
        clock,
    )?;
    let node = Arc::new(node);
    let router = router::Router::new(Arc::clone(&node), config.batch_size_max);
    let ledger = LedgerServiceServer::new(service::Ledger::new(router))
        .max_decoding_message_size(config.message_size_max_bytes)
        .max_encoding_message_size(config.message_size_max_bytes);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<LedgerServiceServer<service::Ledger>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Serve(e.into()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ledger_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartError::Serve(e.into()))?;

    let listen = listener
        .local_addr()
        .map_err(|e| StartError::Serve(e.into()))?;
    on_started(Started { listen, meta });
    let served = tonic::transport::Server::builder()
        .trace_fn(telemetry::request_span)
        .timeout(std::time::Duration::from_millis(config.request_timeout_ms))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ledger)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    served.map_err(|e| StartError::Serve(e.into()))
}
