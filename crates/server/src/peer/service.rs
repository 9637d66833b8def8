//! The answering side of the node-to-node API (`ledger.internal.v1.PeerService`), on the
//! node's peer address. Every call passes the gate ([`super::check_caller`]) first. Commands
//! and reads apply to shards this node leads; anything else is refused with `NOT_LEADER` and
//! the leader it believes in (the map's owner, or with a shared store the lease holder), never
//! passed on (a call is forwarded at most once).

use tonic::{Request, Response, Status};

use ledger_domain::{InvalidInput, ShardId};
use ledger_proto::ledger::internal::v1 as ipb;
use ledger_proto::ledger::internal::v1::peer_service_server::PeerService;
use ledger_proto::{self as wire};
use ledger_shard::protocol::Message;

use crate::error::ApiError;
use crate::router::{Origin, Router};
use crate::telemetry;

pub struct PeerApi {
    router: Router,
}

impl PeerApi {
    pub fn new(router: Router) -> Self {
        Self { router }
    }

    fn check(&self, caller: Option<&ipb::Caller>) -> Result<(), Status> {
        let node = self.router.node();
        super::check_caller(node.map(), node.id(), caller).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn deliver(
        &self,
        request: Request<ipb::DeliverRequest>,
    ) -> Result<Response<ipb::DeliverResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let node = self.router.node();
        let mut not_led: Vec<ipb::ShardLeader> = Vec::new();
        for envelope in request.messages {
            let Some(message) = envelope.message else {
                return Err(Status::invalid_argument(
                    "a shard envelope without a message",
                ));
            };
            let message =
                Message::try_from(message).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let (from, to) = (ShardId(envelope.from_shard), ShardId(envelope.to_shard));
            match node.handle(to) {
                Some(handle) => handle.deliver(from, message),
                // Not led here: dropped, and the sender told who leads (another node of the
                // region, with a shared store); the protocol resends.
                None => {
                    metrics::counter!("ledger_peer_misdelivered_total").increment(1);
                    if !not_led.iter().any(|l| l.shard == to.0) {
                        not_led.push(ipb::ShardLeader {
                            shard: to.0,
                            node_id: node.leaders().leader(to),
                        });
                    }
                }
            }
        }
        Ok(Response::new(ipb::DeliverResponse { not_led }))
    }

    async fn forward_transfers(
        &self,
        request: Request<ipb::ForwardTransfersRequest>,
    ) -> Result<Response<ipb::ForwardTransfersResponse>, Status> {
        let trace_id = telemetry::trace_id_of_call(request.metadata());
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let transfers = request
            .transfers
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let mut t = wire::transfer(t).map_err(|e| e.within(&format!("transfers[{i}]")))?;
                // A quota-path transfer debits the quota account of its debit account
                // (regional quotas): the account it stands for is checked as a user id.
                let checked = match ledger_shard::quota::parse_quota_id(&t.debit_account_id) {
                    Some((_, account)) => ledger_domain::Transfer {
                        debit_account_id: account.to_string(),
                        ..t.clone()
                    }
                    .validate(),
                    None => t.validate(),
                };
                checked.map_err(|e| e.within(&format!("transfers[{i}]")))?;
                t.trace_id.clone_from(&trace_id);
                Ok(t)
            })
            .collect::<Result<Vec<_>, InvalidInput>>()
            .map_err(ApiError::from)?;
        metrics::counter!("ledger_forwarded_in_total", "kind" => "transfers")
            .increment(transfers.len() as u64);
        let results = self
            .router
            .create_transfers(transfers, Origin::Forwarded)
            .await?
            .into_iter()
            .map(crate::router::Answer::into_wire)
            .collect();
        Ok(Response::new(ipb::ForwardTransfersResponse { results }))
    }

    async fn forward_accounts(
        &self,
        request: Request<ipb::ForwardAccountsRequest>,
    ) -> Result<Response<ipb::ForwardAccountsResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let accounts = crate::service::decode_accounts(&self.router, request.accounts)?;
        let results = self.router.create_accounts_here(accounts).await?;
        Ok(Response::new(ipb::ForwardAccountsResponse { results }))
    }

    async fn reserve_ids(
        &self,
        request: Request<ipb::ReserveIdsRequest>,
    ) -> Result<Response<ipb::ReserveIdsResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let calls = request.reservations.into_iter().map(|r| {
            self.router
                .reserve_here(r.account_id, r.placement_key, ShardId(r.home_shard))
        });
        let results = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.map(|rejection| ipb::ReservationResult { rejection }))
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(Response::new(ipb::ReserveIdsResponse { results }))
    }

    async fn locate(
        &self,
        request: Request<ipb::LocateRequest>,
    ) -> Result<Response<ipb::LocateResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let node = self.router.node();
        let mut locations = Vec::with_capacity(request.account_ids.len());
        for id in request.account_ids {
            let Some(located) = self.router.located_here(id.clone()).await? else {
                let directory = node.rings().directory(&id);
                return Err(self.router.not_leader(directory).into());
            };
            locations.push(ipb::Location {
                account_id: id,
                home_shard: located.home.0,
                exists: located.exists,
            });
        }
        Ok(Response::new(ipb::LocateResponse { locations }))
    }

    async fn read_accounts(
        &self,
        request: Request<ipb::ReadAccountsRequest>,
    ) -> Result<Response<ipb::ReadAccountsResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let accounts = self.router.accounts_here(request.accounts).await?;
        Ok(Response::new(ipb::ReadAccountsResponse { accounts }))
    }

    async fn read_entries(
        &self,
        request: Request<ipb::ReadEntriesRequest>,
    ) -> Result<Response<ipb::ReadEntriesResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let at = request
            .account
            .ok_or_else(|| Status::invalid_argument("account: missing"))?;
        let entries = self
            .router
            .entries_here(
                at.account_id,
                ShardId(at.shard),
                request.from_version,
                request.limit as usize,
            )
            .await?;
        Ok(Response::new(ipb::ReadEntriesResponse { entries }))
    }

    async fn status(
        &self,
        request: Request<ipb::StatusRequest>,
    ) -> Result<Response<ipb::StatusResponse>, Status> {
        let request = request.into_inner();
        let node = self.router.node();
        // Any map version: the answer shows the operator a mismatch. An unknown caller is
        // still refused.
        match super::check_caller(node.map(), node.id(), request.caller.as_ref()) {
            Ok(()) | Err(super::CallerError::VersionMismatch { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Response::new(ipb::StatusResponse {
            node_id: node.id().to_string(),
            map_version: node.map().version,
            shards: self.router.shards_here().await?,
        }))
    }

    async fn quota(
        &self,
        request: Request<ipb::QuotaRequest>,
    ) -> Result<Response<ipb::QuotaResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let command = request
            .command
            .ok_or_else(|| Status::invalid_argument("a quota request without a command"))?;
        crate::quota::check(&self.router, &command)?;
        let quotas = crate::quota::run_here(&self.router, ShardId(request.shard), command).await?;
        Ok(Response::new(ipb::QuotaResponse { quotas }))
    }

    async fn find_transfers(
        &self,
        request: Request<ipb::FindTransfersRequest>,
    ) -> Result<Response<ipb::FindTransfersResponse>, Status> {
        let request = request.into_inner();
        self.check(request.caller.as_ref())?;
        let found = self
            .router
            .find_here(request.transfer_ids, request.hold_ids)
            .await?;
        Ok(Response::new(found))
    }
}
