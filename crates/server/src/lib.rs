//! ledgerd: configuration, start-up (data directory, cluster metadata, stores, shard leaders),
//! routing, and the gRPC services. The binary is a thin layer over [`run`], so tests start real
//! servers on port 0.

mod admin;
mod calls;
pub mod config;
mod data_dir;
pub mod demo;
pub mod error;
pub mod operator;
pub mod peer;
pub mod prometheus;
mod quota;
mod router;
mod service;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use futures::FutureExt;

use ledger_proto::ledger::internal::v1::peer_service_server::PeerServiceServer;
use ledger_proto::pb::admin_service_server::AdminServiceServer;
use ledger_proto::pb::ledger_service_server::LedgerServiceServer;
use ledger_shard::leaders::Leaders;
use ledger_shard::node::{Node, Remote};
use ledger_shard::{Clock, SystemClock};

pub use config::{Config, ConfigError, StoreKind};
pub use data_dir::{ClusterMeta, DATA_FORMAT, Opened, ShardInfo, SharedStores, StartError};

/// How long a stopping node waits for its connections to finish before it stops anyway.
pub const SHUTDOWN_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// What `run` reports once it is serving (for the start-up summary and tests).
#[derive(Clone, Debug)]
pub struct Started {
    pub listen: std::net::SocketAddr,
    /// The node-to-node API's address (a node of a cluster of several nodes).
    pub peer_listen: Option<std::net::SocketAddr>,
    pub meta: ClusterMeta,
    pub node: String,
    pub region: String,
    /// The shards this node leads (with a shared store: those the map prefers it for), and the
    /// nodes of its map.
    pub shards_led: usize,
    /// The nodes of a region share its shards' stores: leases decide who leads.
    pub shared: bool,
    pub nodes: usize,
    pub map_version: u64,
}

/// Initialises an empty data directory (cluster metadata and map; the shard files come at the
/// first start) and returns what it wrote. With `cluster`, the map is that cluster file's and
/// `config.node_id` must be one of its nodes; without, the map is a single node's. Refuses a
/// directory that is already initialised or holds anything else.
pub fn init(config: &Config, cluster: Option<&std::path::Path>) -> Result<Opened, StartError> {
    config.validate()?;
    if config.store == StoreKind::Memory {
        return Err(StartError::InitNeedsEmbedded);
    }
    data_dir::init(config, cluster, SystemClock.now_ms())
}

/// Opens the data directory, starts the leaders of the shards this node leads and serves gRPC
/// until `shutdown` resolves: the client API on `listener` (`None`: the node's client address
/// in its map, or `listen` for a single node), and for a node of a cluster, the node-to-node
/// API on its peer address. Leaders finish their current batch before it returns.
pub async fn run(
    config: Config,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), StartError> {
    serve(config, listener, None, shutdown, on_started).await
}

/// As [`run`], with the stores of the node's region's shards taken from `shared`, which the
/// region's nodes share (as they share FoundationDB): any node of the region may lead any of
/// its shards, and the leases decide which does (docs/design/0005-foundationdb.md). The
/// cluster map and the node's identity still come from the data directory.
pub async fn run_shared(
    config: Config,
    listener: Option<TcpListener>,
    shared: SharedStores,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), StartError> {
    serve(config, listener, Some(shared), shutdown, on_started).await
}

async fn serve(
    config: Config,
    listener: Option<TcpListener>,
    shared: Option<SharedStores>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(Started) + Send,
) -> Result<(), StartError> {
    config.validate()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // FoundationDB's client thread, for as long as the stores are used.
    #[cfg(feature = "fdb")]
    let _fdb_network = (config.store == StoreKind::Fdb).then(ledger_store_fdb::Network::start);
    let opening = data_dir::open(&config, shared.as_ref(), clock.now_ms())?;
    let stores = opening.stores;
    let Opened { meta, map, node } = opening.opened;
    let leaders = Arc::new(Leaders::new(&map, &node, opening.shared));
    let me = map
        .node(&node)
        .cloned()
        .ok_or_else(|| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: format!("its node id {node:?} is not in its cluster map"),
        })?;
    let cluster = map.nodes.len() > 1;
    let serve_err = |e: Box<dyn std::error::Error + Send + Sync>| StartError::Serve(e);
    let bind = |address: &str, what: &str| {
        let what = what.to_string();
        let address = address.to_string();
        async move {
            TcpListener::bind(&address)
                .await
                .map_err(|e| serve_err(format!("cannot listen on {address} ({what}): {e}").into()))
        }
    };
    let listener = match listener {
        Some(listener) => listener,
        None if cluster => {
            if config.listen.to_string() != me.client_address {
                tracing::warn!(
                    listen = %config.listen,
                    client_address = %me.client_address,
                    "a node of a cluster serves on its map's client address; the listen setting is not used"
                );
            }
            bind(&me.client_address, "client address").await?
        }
        None => bind(&config.listen.to_string(), "listen").await?,
    };
    let peer_listener = if cluster {
        Some(bind(&me.peer_address, "peer address").await?)
    } else {
        None
    };
    let peers = if cluster {
        let forward_timeout = std::time::Duration::from_millis(config.request_timeout_ms);
        let peers = peer::PeerClients::start(
            &map,
            &node,
            &config.peer,
            forward_timeout,
            Arc::clone(&leaders),
        )
        .map_err(|e| serve_err(e.into()))?;
        if config.peer.wan_delay_ms > 0 {
            tracing::info!(
                wan_delay_ms = config.peer.wan_delay_ms,
                "simulated one-way delay to nodes of other regions"
            );
        }
        Some(peers)
    } else {
        None
    };
    let credential = operator::Credential::load(
        &config.admin.token_file,
        &config.data_dir.join("admin.token"),
    )
    .map_err(|e| StartError::Serve(e.into()))?;
    let audit = operator::AuditLog::open(&config.admin_audit_log())
        .map_err(|e| StartError::Serve(e.into()))?;
    let remote = peers.clone().map(|p| Arc::new(p) as Arc<dyn Remote>);
    let shards_led = if opening.shared {
        map.shards_of(&node).len()
    } else {
        stores.len()
    };
    let node_id = node.clone();
    let node = Node::start(
        &node,
        map.clone(),
        stores,
        config.shard.clone(),
        clock,
        remote,
        leaders,
    )?;
    let node = Arc::new(node);
    let router = router::Router::new(Arc::clone(&node), peers, config.batch_size_max);
    let ledger = LedgerServiceServer::new(service::Ledger::new(router.clone()))
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
    let peer_listen = match &peer_listener {
        Some(l) => Some(l.local_addr().map_err(|e| StartError::Serve(e.into()))?),
        None => None,
    };
    on_started(Started {
        listen,
        peer_listen,
        meta,
        node: node_id,
        region: me.region.clone(),
        shards_led,
        shared: opening.shared,
        nodes: map.nodes.len(),
        map_version: map.version,
    });
    let shutdown = shutdown.shared();
    let stopping = shutdown.clone();
    let client_api = tonic::transport::Server::builder()
        .trace_fn(telemetry::request_span)
        .timeout(std::time::Duration::from_millis(config.request_timeout_ms))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ledger)
        .add_service(AdminServiceServer::new(admin::Admin::new(
            router.clone(),
            Arc::new(credential),
            Arc::new(audit),
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone());
    let peer_api = async {
        let Some(peer_listener) = peer_listener else {
            return Ok(());
        };
        let api = PeerServiceServer::new(peer::PeerApi::new(router))
            .max_decoding_message_size(config.message_size_max_bytes)
            .max_encoding_message_size(config.message_size_max_bytes);
        tonic::transport::Server::builder()
            .trace_fn(telemetry::request_span)
            .timeout(std::time::Duration::from_millis(config.request_timeout_ms))
            .add_service(api)
            .serve_with_incoming_shutdown(TcpListenerStream::new(peer_listener), shutdown)
            .await
    };
    // Draining waits for open connections, and one to a peer behind a cut network would keep
    // it waiting for minutes: past SHUTDOWN_DRAIN_MAX the servers are dropped as they are.
    let drained = async { tokio::join!(client_api, peer_api) };
    let forced = async {
        stopping.await;
        tokio::time::sleep(SHUTDOWN_DRAIN_MAX).await;
    };
    let (served, peer_served) = tokio::select! {
        results = drained => results,
        () = forced => {
            tracing::warn!(
                seconds = SHUTDOWN_DRAIN_MAX.as_secs(),
                "connections still open after the drain limit; stopping without them"
            );
            (Ok(()), Ok(()))
        }
    };
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    served.map_err(|e| StartError::Serve(e.into()))?;
    peer_served.map_err(|e| StartError::Serve(e.into()))
}
