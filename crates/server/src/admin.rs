//! `ledger.v1.AdminService`: what an operator asks of the cluster. `ClusterStatus` is answered
//! by the node called: its map, and from each node (itself from its stores, the others by one
//! `Status` call each, all at once) its map version and its shards' leases and two-phase
//! commits in flight. A node that does not answer is shown as unreachable, with why.

use futures::future::join_all;
use tonic::{Request, Response, Status};

use ledger_proto::pb;
use ledger_proto::pb::admin_service_server::AdminService;
use ledger_shard::node::Node;
use ledger_shard::read;

use crate::error::ApiError;
use crate::router::Router;

pub struct Admin {
    router: Router,
}

impl Admin {
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

/// The status of the shards `node` leads, from their stores.
pub fn shards_here(node: &Node) -> Result<Vec<pb::ShardStatus>, ApiError> {
    let map = node.map();
    let mut out = Vec::new();
    for shard in node.local_shards() {
        let store = node.store(shard).expect("led here");
        let lease = read::lease(&**store, shard)?;
        let (prepared, coordinating) = read::in_flight(&**store, shard)?;
        let place = &map.shards[shard.0 as usize];
        out.push(pb::ShardStatus {
            shard: shard.0,
            region: place.region.clone(),
            owner: place.owner.clone(),
            leader: lease.as_ref().map(|l| l.node.clone()).unwrap_or_default(),
            epoch: lease.map(|l| l.epoch).unwrap_or(0),
            coordinating: coordinating as u32,
            prepared: prepared as u32,
        });
    }
    Ok(out)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let node = self.router.node();
        let map = node.map();
        let mut shards: Vec<pb::ShardStatus> = (0..map.shard_count())
            .map(|shard| {
                let place = &map.shards[shard as usize];
                pb::ShardStatus {
                    shard,
                    region: place.region.clone(),
                    owner: place.owner.clone(),
                    ..Default::default()
                }
            })
            .collect();
        let mut nodes: Vec<pb::NodeStatus> = map
            .nodes
            .iter()
            .map(|n| pb::NodeStatus {
                id: n.id.clone(),
                region: n.region.clone(),
                client_address: n.client_address.clone(),
                peer_address: n.peer_address.clone(),
                ..Default::default()
            })
            .collect();
        let mut answers = vec![(node.id().to_string(), Ok((map.version, shards_here(node)?)))];
        if let Some(peers) = self.router.peers() {
            let calls = peers.nodes().map(|id| async move {
                let answer = peers.status(id).await.map(|s| (s.map_version, s.shards));
                (id.to_string(), answer)
            });
            answers.extend(join_all(calls).await);
        }
        for (id, answer) in answers {
            let Some(status) = nodes.iter_mut().find(|n| n.id == id) else {
                continue;
            };
            match answer {
                Ok((version, led)) => {
                    status.reachable = true;
                    status.map_version = version;
                    for s in led {
                        if let Some(slot) = shards.get_mut(s.shard as usize) {
                            *slot = s;
                        }
                    }
                }
                Err(e) => status.error = e.to_string(),
            }
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            answered_by: node.id().to_string(),
            map_version: map.version,
            regions: map.regions.clone(),
            nodes,
            shards,
        }))
    }
}
