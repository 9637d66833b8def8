//! `ledger.v1.AdminService`: what an operator asks of the cluster. `ClusterStatus` is answered
//! by the node called: its map, and from each node (itself from its stores, the others by one
//! `Status` call each, all at once) its map version and its shards' leases and two-phase
//! commits in flight. A node that does not answer is shown as unreachable, with why.
//!
//! The quota calls (regional quotas) need the operator's credential and write every change,
//! and every refused call, to the audit log ([`crate::operator`]).

use std::sync::Arc;

use futures::future::join_all;
use serde_json::json;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use ledger_domain::InvalidInput;
use ledger_proto::ledger::internal::v1::quota_request::Command as Wire;
use ledger_proto::pb;
use ledger_proto::pb::admin_service_server::AdminService;
use ledger_shard::node::Node;
use ledger_shard::{Clock, SystemClock, read};

use crate::error::ApiError;
use crate::operator::{AuditLog, Credential};
use crate::quota;
use crate::router::Router;

/// The lease a revoke leaves the emptied allowance (it closes at its end).
const REVOKE_LEASE_SECONDS: u64 = 3_600;

pub struct Admin {
    router: Router,
    credential: Arc<Credential>,
    audit: Arc<AuditLog>,
}

impl Admin {
    pub fn new(router: Router, credential: Arc<Credential>, audit: Arc<AuditLog>) -> Self {
        Self {
            router,
            credential,
            audit,
        }
    }

    fn record(
        &self,
        action: &str,
        arguments: &serde_json::Value,
        outcome: &str,
    ) -> Result<(), Status> {
        let node = self.router.node().id().to_string();
        self.audit.record(
            &node,
            action,
            arguments.clone(),
            outcome,
            SystemClock.now_ms(),
        )
    }

    /// Checks the credential; a refusal is written to the audit log.
    fn authorize(
        &self,
        action: &str,
        metadata: &MetadataMap,
        arguments: &serde_json::Value,
    ) -> Result<(), Status> {
        if let Err(status) = self.credential.check(metadata) {
            self.record(action, arguments, &format!("refused: {}", status.message()))?;
            return Err(status);
        }
        Ok(())
    }

    /// Runs a change of an account's allowances at its home: authorized, checked, written to
    /// the audit log before (requested) and after (its outcome).
    async fn change(
        &self,
        action: &str,
        metadata: &MetadataMap,
        arguments: serde_json::Value,
        account_id: &str,
        regions: &[(&'static str, &str)],
        wire: Wire,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        self.authorize(action, metadata, &arguments)?;
        let checked = async {
            quota::check(&self.router, &wire)?;
            let (home, home_region) = quota::home_of(&self.router, account_id).await?;
            if let Some((field, _)) = regions.iter().find(|(_, r)| *r == home_region) {
                return Err(ApiError::from(InvalidInput::new(
                    *field,
                    format!("is {home_region:?}, the account's home region: it needs no allowance"),
                )));
            }
            Ok((home, home_region))
        }
        .await;
        let (home, home_region) = match checked {
            Ok(found) => found,
            Err(e) => {
                self.record(action, &arguments, &format!("refused: {e}"))?;
                return Err(e.into());
            }
        };
        self.record(action, &arguments, "requested")?;
        let outcome = quota::run(&self.router, home, wire).await;
        match &outcome {
            Ok(_) => self.record(action, &arguments, "ok")?,
            Err(e) => self.record(action, &arguments, &format!("refused: {e}"))?,
        }
        let quotas = outcome?;
        Ok(Response::new(pb::QuotasResponse {
            account_id: account_id.to_string(),
            home_region,
            quotas,
        }))
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
        let here = self.router.shards_here().await?;
        let mut answers = vec![(node.id().to_string(), Ok((map.version, here)))];
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

    async fn get_quotas(
        &self,
        request: Request<pb::GetQuotasRequest>,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        let arguments = json!({ "account_id": request.get_ref().account_id });
        self.authorize("GetQuotas", request.metadata(), &arguments)?;
        let r = request.into_inner();
        quota::check(&self.router, &Wire::Show(r.clone()))?;
        Ok(Response::new(
            quota::show(&self.router, &r.account_id).await?,
        ))
    }

    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let arguments = json!({
            "account_id": r.account_id, "region": r.region,
            "amount": r.amount, "lease_seconds": r.lease_seconds,
        });
        let (account, region) = (r.account_id.clone(), r.region.clone());
        let regions = [("region", region.as_str())];
        self.change(
            "SetQuota",
            &metadata,
            arguments,
            &account,
            &regions,
            Wire::Set(r),
        )
        .await
    }

    async fn move_quota(
        &self,
        request: Request<pb::MoveQuotaRequest>,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let arguments = json!({
            "account_id": r.account_id, "from_region": r.from_region,
            "to_region": r.to_region, "amount": r.amount, "lease_seconds": r.lease_seconds,
        });
        let (account, from, to) = (
            r.account_id.clone(),
            r.from_region.clone(),
            r.to_region.clone(),
        );
        let regions = [("from_region", from.as_str()), ("to_region", to.as_str())];
        self.change(
            "MoveQuota",
            &metadata,
            arguments,
            &account,
            &regions,
            Wire::Move(r),
        )
        .await
    }

    async fn revoke_quota(
        &self,
        request: Request<pb::RevokeQuotaRequest>,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let arguments = json!({ "account_id": r.account_id, "region": r.region });
        let set = pb::SetQuotaRequest {
            account_id: r.account_id.clone(),
            region: r.region.clone(),
            amount: 0,
            lease_seconds: REVOKE_LEASE_SECONDS,
        };
        let regions = [("region", r.region.as_str())];
        self.change(
            "RevokeQuota",
            &metadata,
            arguments,
            &r.account_id,
            &regions,
            Wire::Set(set),
        )
        .await
    }

    async fn write_off_quota(
        &self,
        request: Request<pb::WriteOffQuotaRequest>,
    ) -> Result<Response<pb::QuotasResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let arguments = json!({
            "account_id": r.account_id, "region": r.region, "reason": r.reason,
        });
        let (account, region) = (r.account_id.clone(), r.region.clone());
        let regions = [("region", region.as_str())];
        self.change(
            "WriteOffQuota",
            &metadata,
            arguments,
            &account,
            &regions,
            Wire::WriteOff(r),
        )
        .await
    }
}
