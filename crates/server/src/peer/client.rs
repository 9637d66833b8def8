//! The calling side of the node-to-node API: one long-lived HTTP/2 channel per peer, one
//! bounded outbox of engine messages per peer drained by a sender task into `Deliver` calls,
//! and the calls a router makes (forwarded commands, reads, lookups), each bounded in time and
//! in number in flight per peer (docs/design/0002-cluster.md, Transport).
//!
//! ```text
//!  shard leader ──send──► outbox (bounded; full: drop, count) ──► sender task ──Deliver──► peer
//!  router ──forward / read / locate──► permit (calls_in_flight_max) ──call (timeout)──► peer
//! ```
//!
//! With `wan_delay_ms` set, a message or call to a node of another region is held back that
//! long before it leaves, and a call's answer that long again: a simulated wide-area link.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use ledger_domain::ShardId;
use ledger_domain::cluster::ClusterMap;
use ledger_proto::ledger::internal::v1 as ipb;
use ledger_proto::ledger::internal::v1::peer_service_client::PeerServiceClient;
use ledger_shard::directory::Located;
use ledger_shard::leaders::Leaders;
use ledger_shard::node::Remote;
use ledger_shard::protocol::Message;
use ledger_shard::runtime::BoxFuture;
use ledger_shard::trace::TraceParent;

use crate::config::PeerConfig;
use crate::error::ApiError;

/// A connection to a peer sends an HTTP/2 ping this often, and is given up (the next call
/// connects again) when one goes unanswered this long: a connection that lost bytes to a cut
/// network would otherwise carry nothing until the operating system gave up on it. Found by
/// the transport tests: with the client library's default (20 s) a one-way cut left the
/// link dead for half a minute after it healed.
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub(super) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A queued engine message and when it may leave (now, or after the simulated delay).
struct Queued {
    envelope: ipb::ShardEnvelope,
    due: Instant,
}

/// One other node: its channel, its outbox, and what it costs to reach.
struct Peer {
    id: String,
    address: String,
    client: PeerServiceClient<Channel>,
    outbox: mpsc::Sender<Queued>,
    calls: Semaphore,
    /// The simulated one-way delay to it (zero within a region).
    delay: Duration,
    /// Whether its last call or delivery failed.
    unreachable: AtomicBool,
}

/// Every other node of the map, as this node reaches them. Clones share the peers.
#[derive(Clone)]
pub struct PeerClients {
    local: String,
    caller: ipb::Caller,
    map: Arc<ClusterMap>,
    peers: Arc<BTreeMap<String, Arc<Peer>>>,
    call_timeout: Duration,
    /// A forwarded command may wait for a two-phase commit on the peer: it gets as long as
    /// the client's call could (`request_timeout_ms`).
    forward_timeout: Duration,
    /// Who leads each shard: where messages and calls for it go.
    leaders: Arc<Leaders>,
}

impl std::fmt::Debug for PeerClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClients")
            .field("local", &self.local)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PeerClients {
    /// Connects (lazily: the first call connects, a failed one reconnects) to every other node
    /// of `map`, and starts one sender task per peer on the current tokio runtime.
    pub fn start(
        map: &ClusterMap,
        local: &str,
        config: &PeerConfig,
        forward_timeout: Duration,
        leaders: Arc<Leaders>,
    ) -> Result<Self, String> {
        Self::start_with(
            map,
            local,
            config,
            forward_timeout,
            leaders,
            &Endpoint::connect_lazy,
        )
    }

    /// As [`PeerClients::start`], with each peer's channel made by `connect` from its
    /// endpoint (the transport tests connect through simulated sockets).
    pub fn start_with(
        map: &ClusterMap,
        local: &str,
        config: &PeerConfig,
        forward_timeout: Duration,
        leaders: Arc<Leaders>,
        connect: &dyn Fn(&Endpoint) -> Channel,
    ) -> Result<Self, String> {
        let region = map
            .node(local)
            .map(|n| n.region.clone())
            .ok_or_else(|| format!("node {local:?} is not in the map"))?;
        let call_timeout = Duration::from_millis(config.call_timeout_ms);
        let mut peers = BTreeMap::new();
        for node in map.nodes.iter().filter(|n| n.id != local) {
            let endpoint = Endpoint::from_shared(format!("http://{}", node.peer_address))
                .map_err(|e| format!("node {}: peer address {}: {e}", node.id, node.peer_address))?
                .connect_timeout(call_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            let client = PeerServiceClient::new(connect(&endpoint));
            let delay = if node.region == region {
                Duration::ZERO
            } else {
                Duration::from_millis(config.wan_delay_ms)
            };
            let (outbox, rx) = mpsc::channel(config.outbox_messages_max);
            let peer = Arc::new(Peer {
                id: node.id.clone(),
                address: node.peer_address.clone(),
                client,
                outbox,
                calls: Semaphore::new(config.calls_in_flight_max),
                delay,
                unreachable: AtomicBool::new(false),
            });
            let caller = super::caller_of(map, local);
            tokio::spawn(send_loop(
                Arc::clone(&peer),
                caller,
                rx,
                Arc::clone(&leaders),
                config.deliver_batch_max,
                call_timeout,
            ));
            metrics::gauge!("ledger_peer_unreachable", "peer" => node.id.clone()).set(0.0);
            peers.insert(node.id.clone(), peer);
        }
        Ok(Self {
            local: local.to_string(),
            caller: super::caller_of(map, local),
            map: Arc::new(map.clone()),
            peers: Arc::new(peers),
            call_timeout,
            forward_timeout: forward_timeout.max(call_timeout),
            leaders,
        })
    }

    /// The peer believed to lead `shard`; `None` if it is this node.
    fn leader(&self, shard: ShardId) -> Option<&Arc<Peer>> {
        if shard.0 >= self.map.shard_count() {
            return None;
        }
        self.peers.get(&self.leaders.leader(shard))
    }

    fn peer(&self, node: &str) -> Result<&Arc<Peer>, ApiError> {
        self.peers.get(node).ok_or_else(|| {
            ApiError::Internal(format!("node {node:?} is not a peer of {}", self.local).into())
        })
    }

    /// Whether each peer answered its last call (for the cluster status).
    pub fn reachability(&self) -> Vec<(String, bool)> {
        self.peers
            .values()
            .map(|p| (p.id.clone(), !p.unreachable.load(Ordering::Relaxed)))
            .collect()
    }

    /// One call to `node`: waits for a permit, holds it back by the simulated delay, sends it
    /// with the current trace context and a deadline, and counts it. A forwarded command's
    /// deadline is the client's, and its running out says the peer is slow, not unreachable.
    async fn call<T, R, F, Fut>(
        &self,
        node: &str,
        method: &'static str,
        message: T,
        send: F,
    ) -> Result<R, ApiError>
    where
        F: FnOnce(PeerServiceClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let peer = self.peer(node)?;
        let _permit = peer.calls.acquire().await.expect("never closed");
        let forwarded = method.starts_with("Forward");
        let timeout = if forwarded {
            self.forward_timeout
        } else {
            self.call_timeout
        };
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        if let Some(parent) = TraceParent::current()
            && let Ok(value) = parent.header().parse()
        {
            request.metadata_mut().insert("traceparent", value);
        }
        metrics::counter!("ledger_peer_calls_total", "peer" => peer.id.clone(), "method" => method)
            .increment(1);
        if !peer.delay.is_zero() {
            tokio::time::sleep(peer.delay).await;
        }
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, send(peer.client.clone(), request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")));
        metrics::histogram!("ledger_peer_call_seconds", "peer" => peer.id.clone(), "method" => method)
            .record(started.elapsed().as_secs_f64());
        if !peer.delay.is_zero() {
            tokio::time::sleep(peer.delay).await;
        }
        match answer {
            Ok(response) => {
                peer.answered(true, String::new);
                Ok(response.into_inner())
            }
            Err(status) => {
                self.learn(node, &status, forwarded);
                Err(peer_error(peer, status, forwarded))
            }
        }
    }

    /// What a failed call says about who leads: a `NOT_LEADER` answer names the leader (kept
    /// for the shard's next calls and messages); no answer at all moves this node's belief
    /// in `node`'s shards on to the next node of their region.
    fn learn(&self, node: &str, status: &Status, forwarded: bool) {
        let info = status.get_error_details().error_info().cloned();
        match info {
            Some(info) if info.reason == crate::error::NOT_LEADER => {
                let shard = info.metadata.get("shard").and_then(|s| s.parse().ok());
                if let (Some(shard), Some(leader)) = (shard, info.metadata.get("leader_node")) {
                    self.leaders.heard(ShardId(shard), leader);
                }
            }
            Some(_) => {}
            // A forwarded command out of time may be waiting for a two-phase commit there.
            None if status.code() == Code::Unavailable
                || (status.code() == Code::DeadlineExceeded && !forwarded) =>
            {
                self.leaders.unanswered(node);
            }
            None => {}
        }
    }

    pub async fn forward_transfers(
        &self,
        node: &str,
        transfers: Vec<ledger_proto::pb::Transfer>,
    ) -> Result<Vec<ledger_proto::pb::TransferResult>, ApiError> {
        let count = transfers.len();
        let request = ipb::ForwardTransfersRequest {
            caller: Some(self.caller.clone()),
            transfers,
        };
        let response = self
            .call(node, "ForwardTransfers", request, |mut c, r| async move {
                c.forward_transfers(r).await
            })
            .await?;
        check_count(node, "transfer results", count, response.results.len())?;
        Ok(response.results)
    }

    pub async fn forward_accounts(
        &self,
        node: &str,
        accounts: Vec<ledger_proto::pb::Account>,
    ) -> Result<Vec<ledger_proto::pb::AccountResult>, ApiError> {
        let count = accounts.len();
        let request = ipb::ForwardAccountsRequest {
            caller: Some(self.caller.clone()),
            accounts,
        };
        let response = self
            .call(node, "ForwardAccounts", request, |mut c, r| async move {
                c.forward_accounts(r).await
            })
            .await?;
        check_count(node, "account results", count, response.results.len())?;
        Ok(response.results)
    }

    pub async fn reserve_ids(
        &self,
        node: &str,
        reservations: Vec<ipb::Reservation>,
    ) -> Result<Vec<Option<ledger_proto::pb::Rejection>>, ApiError> {
        let count = reservations.len();
        let request = ipb::ReserveIdsRequest {
            caller: Some(self.caller.clone()),
            reservations,
        };
        let response = self
            .call(node, "ReserveIds", request, |mut c, r| async move {
                c.reserve_ids(r).await
            })
            .await?;
        check_count(node, "reservations", count, response.results.len())?;
        Ok(response.results.into_iter().map(|r| r.rejection).collect())
    }

    pub async fn read_accounts(
        &self,
        node: &str,
        accounts: Vec<ipb::AccountAt>,
    ) -> Result<Vec<ledger_proto::pb::Account>, ApiError> {
        let request = ipb::ReadAccountsRequest {
            caller: Some(self.caller.clone()),
            accounts,
        };
        let response = self
            .call(node, "ReadAccounts", request, |mut c, r| async move {
                c.read_accounts(r).await
            })
            .await?;
        Ok(response.accounts)
    }

    pub async fn read_entries(
        &self,
        node: &str,
        request: ipb::ReadEntriesRequest,
    ) -> Result<Vec<ledger_proto::pb::Entry>, ApiError> {
        let request = ipb::ReadEntriesRequest {
            caller: Some(self.caller.clone()),
            ..request
        };
        let response = self
            .call(node, "ReadEntries", request, |mut c, r| async move {
                c.read_entries(r).await
            })
            .await?;
        Ok(response.entries)
    }

    pub async fn find_transfers(
        &self,
        node: &str,
        transfer_ids: Vec<String>,
        hold_ids: Vec<String>,
    ) -> Result<ipb::FindTransfersResponse, ApiError> {
        let request = ipb::FindTransfersRequest {
            caller: Some(self.caller.clone()),
            transfer_ids,
            hold_ids,
        };
        self.call(node, "FindTransfers", request, |mut c, r| async move {
            c.find_transfers(r).await
        })
        .await
    }

    /// A peer's map version and the status of the shards it leads.
    /// Runs an operator's quota command on a shard `node` leads.
    pub async fn quota(
        &self,
        node: &str,
        shard: ShardId,
        command: ipb::quota_request::Command,
    ) -> Result<ipb::QuotaResponse, ApiError> {
        let request = ipb::QuotaRequest {
            caller: Some(self.caller.clone()),
            shard: shard.0,
            command: Some(command),
        };
        self.call(node, "Quota", request, |mut c, r| async move {
            c.quota(r).await
        })
        .await
    }

    pub async fn status(&self, node: &str) -> Result<ipb::StatusResponse, ApiError> {
        let request = ipb::StatusRequest {
            caller: Some(self.caller.clone()),
        };
        self.call(node, "Status", request, |mut c, r| async move {
            c.status(r).await
        })
        .await
    }

    /// The other nodes, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// Asks the node that leads `directory` where `ids` live.
    pub async fn locate(
        &self,
        node: &str,
        ids: Vec<String>,
    ) -> Result<Vec<ipb::Location>, ApiError> {
        let count = ids.len();
        let request = ipb::LocateRequest {
            caller: Some(self.caller.clone()),
            account_ids: ids,
        };
        let response = self
            .call(node, "Locate", request, |mut c, r| async move {
                c.locate(r).await
            })
            .await?;
        check_count(node, "locations", count, response.locations.len())?;
        Ok(response.locations)
    }

    /// The node believed to lead `shard`.
    fn leader_of(&self, shard: ShardId) -> String {
        self.leaders.leader(shard)
    }
}

fn check_count(node: &str, what: &str, sent: usize, got: usize) -> Result<(), ApiError> {
    if sent == got {
        return Ok(());
    }
    Err(ApiError::Internal(
        format!("node {node} answered {got} {what} for {sent}").into(),
    ))
}

impl Peer {
    /// Records whether the peer answered; logs and counts the change to unreachable once.
    fn answered(&self, answered: bool, error: impl FnOnce() -> String) {
        let was_unreachable = self.unreachable.swap(!answered, Ordering::Relaxed);
        // Unchanged: it was unreachable and still is, or answered and still does.
        if was_unreachable != answered {
            return;
        }
        metrics::gauge!("ledger_peer_unreachable", "peer" => self.id.clone()).set(if answered {
            0.0
        } else {
            1.0
        });
        if answered {
            tracing::info!(peer = %self.id, address = %self.address, "peer reachable again");
        } else {
            tracing::warn!(peer = %self.id, address = %self.address, error = %error(), "peer unreachable; what it was sent is resent by the protocol, calls fail with UNAVAILABLE");
        }
    }
}

/// A failed call: the peer's own refusal passes through as it is (a client sees the owner's
/// answer: a rejection of its input, `NOT_LEADER`, ...); no answer makes the call unavailable.
fn peer_error(peer: &Peer, status: Status, forwarded: bool) -> ApiError {
    let unanswered = matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    ) && status.details().is_empty();
    if unanswered {
        // A forwarded command that ran out of time may be waiting for a two-phase commit
        // there: the peer is slow to answer this one, not known to be unreachable.
        let slow = forwarded && status.code() == Code::DeadlineExceeded;
        if !slow {
            peer.answered(false, || status.message().to_string());
        }
        metrics::counter!("ledger_peer_unanswered_total", "peer" => peer.id.clone()).increment(1);
        return ApiError::NodeUnavailable {
            node: peer.id.clone(),
            reason: status.message().to_string(),
        };
    }
    peer.answered(true, String::new);
    ApiError::Peer {
        node: peer.id.clone(),
        status,
    }
}

impl Remote for PeerClients {
    fn send(&self, to: ShardId, from: ShardId, message: Message) {
        let Some(peer) = self.leader(to) else {
            // Led here after all (a term starting or just ended): the protocol resends.
            metrics::counter!("ledger_peer_dropped_total", "peer" => self.local.clone(), "reason" => "led_here")
                .increment(1);
            return;
        };
        let queued = Queued {
            envelope: ipb::ShardEnvelope {
                from_shard: from.0,
                to_shard: to.0,
                message: Some((&message).into()),
            },
            due: Instant::now() + peer.delay,
        };
        if peer.outbox.try_send(queued).is_err() {
            metrics::counter!("ledger_peer_dropped_total", "peer" => peer.id.clone(), "reason" => "outbox_full")
                .increment(1);
        }
    }

    fn locate(&self, directory: ShardId, id: String) -> BoxFuture<Option<Located>> {
        let node = self.leader_of(directory);
        let this = self.clone();
        Box::pin(async move {
            let locations = this.locate(&node, vec![id]).await.ok()?;
            let location = locations.into_iter().next()?;
            Some(Located {
                home: ShardId(location.home_shard),
                exists: location.exists,
            })
        })
    }
}

/// Drains one peer's outbox into `Deliver` calls, oldest first, each message no earlier than
/// its due time. A call that fails drops its messages (the protocol resends them).
async fn send_loop(
    peer: Arc<Peer>,
    caller: ipb::Caller,
    mut rx: mpsc::Receiver<Queued>,
    leaders: Arc<Leaders>,
    batch_max: usize,
    timeout: Duration,
) {
    let sent = metrics::counter!("ledger_peer_messages_sent_total", "peer" => peer.id.clone());
    let bytes = metrics::counter!("ledger_peer_bytes_sent_total", "peer" => peer.id.clone());
    let dropped = metrics::counter!("ledger_peer_dropped_total", "peer" => peer.id.clone(), "reason" => "unanswered");
    let latency = metrics::histogram!("ledger_peer_send_seconds", "peer" => peer.id.clone());
    // A message not yet due, taken off the queue while filling the previous call.
    let mut held: Option<Queued> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        tokio::time::sleep_until(first.due).await;
        let now = Instant::now();
        let mut messages = vec![first.envelope];
        while messages.len() < batch_max {
            match rx.try_recv() {
                Ok(q) if q.due <= now => messages.push(q.envelope),
                Ok(q) => {
                    held = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        let count = messages.len() as u64;
        let request = ipb::DeliverRequest {
            caller: Some(caller.clone()),
            messages,
        };
        bytes.increment(prost::Message::encoded_len(&request) as u64);
        let mut call = Request::new(request);
        call.set_timeout(timeout);
        let started = Instant::now();
        let mut client = peer.client.clone();
        let result = tokio::time::timeout(timeout, client.deliver(call)).await;
        latency.record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(response)) => {
                sent.increment(count);
                peer.answered(true, String::new);
                for led in response.into_inner().not_led {
                    leaders.heard(ShardId(led.shard), &led.node_id);
                }
            }
            Ok(Err(status)) if status.code() == Code::InvalidArgument => {
                // It answered, and refused what this node sent as malformed: a disagreement
                // of builds, never healed by resending.
                dropped.increment(count);
                peer.answered(true, String::new);
                tracing::error!(peer = %peer.id, error = %status.message(), "the peer refused engine messages as malformed");
            }
            Ok(Err(status)) => {
                dropped.increment(count);
                peer.answered(false, || status.message().to_string());
                leaders.unanswered(&peer.id);
            }
            Err(_) => {
                dropped.increment(count);
                peer.answered(false, || "no answer in time".to_string());
                leaders.unanswered(&peer.id);
            }
        }
    }
}
