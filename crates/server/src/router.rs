//! Routing: every call is split by shard, and each part goes to the shard's leader: through
//! its queue when this node leads it, else in one call per node to the node that does (one
//! hop; a forwarded call is never forwarded again). Reads of committed state go straight to
//! the shards' stores, here or on their nodes (docs/design/0002-cluster.md, Routing).
//!
//! Writes go through the leaders' queues; reads see only committed (durable) state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use futures::future::join_all;
use tracing::Instrument;

use ledger_domain::{
    HoldStatus, InvalidInput, NewAccount, Rejection, ShardId, Transfer, TransferKind,
    TransferRecord,
};
use ledger_proto::ledger::internal::v1 as ipb;
use ledger_proto::{self as wire, pb};
use ledger_shard::directory::Located;
use ledger_shard::engine::{Reply, TransferReply};
use ledger_shard::node::Node;
use ledger_shard::quota;
use ledger_shard::read;
use ledger_shard::route::{self, Coordinator};
use ledger_shard::trace::TraceParent;
use ledger_shard::{codec, keys};

use crate::error::ApiError;
use crate::peer::PeerClients;

/// Entries per ListEntries page when the client does not say.
pub const PAGE_SIZE_DEFAULT: u32 = 100;
pub const PAGE_SIZE_MAX: u32 = 1_000;

/// Who made a call: a client (whose commands may be forwarded once), or another node (whose
/// forwarded commands are applied here or refused with `NOT_LEADER`, never forwarded again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
    Forwarded,
}

#[derive(Clone)]
pub struct Router {
    node: Arc<Node>,
    peers: Option<PeerClients>,
    batch_size_max: usize,
    /// This node's region: the home of accounts created without one.
    region: String,
}

/// What a lookup by id found on every node: transfer records and holds, with their shards.
#[derive(Default)]
struct Found {
    transfers: HashMap<String, (TransferRecord, Option<HoldStatus>, ShardId)>,
    holds: HashMap<String, (HoldStatus, ShardId)>,
}

impl Found {
    /// Keeps a transfer record found on `shard`. An id may be recorded twice with regional
    /// quotas: by a region's quota shard (debiting the account's quota account) and by the
    /// account's home (the settlement, or the ordinary path). The home's record is the one
    /// shown; a quota shard's is shown as the account's (the transfer is settled later), and
    /// its "not covered" record, which only sent the transfer the ordinary way, not at all.
    fn keep(
        &mut self,
        id: String,
        mut record: TransferRecord,
        hold: Option<HoldStatus>,
        shard: ShardId,
    ) {
        let regional = quota::parse_quota_id(&record.request.debit_account_id)
            .map(|(_, account)| account.to_string());
        if let Some(account) = regional {
            if record.result == Err(Rejection::QuotaExhausted) || self.transfers.contains_key(&id) {
                return;
            }
            if let Ok(committed) = &mut record.result {
                committed.debit_account_id.clone_from(&account);
            }
            record.request.debit_account_id = account;
        }
        self.transfers.insert(id, (record, hold, shard));
    }
}

impl Router {
    pub fn new(node: Arc<Node>, peers: Option<PeerClients>, batch_size_max: usize) -> Self {
        let region = node
            .map()
            .node(node.id())
            .map(|n| n.region.clone())
            .unwrap_or_default();
        Self {
            node,
            peers,
            batch_size_max,
            region,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn check_batch(&self, field: &str, len: usize) -> Result<(), ApiError> {
        if len > self.batch_size_max {
            return Err(InvalidInput::new(
                field,
                format!("has {len} items; the limit is {}", self.batch_size_max),
            )
            .into());
        }
        Ok(())
    }

    /// The home region an account asks for: its own, else this node's. An unknown one is
    /// refused, naming the regions there are.
    pub fn region_for(&self, field: &str, region: String) -> Result<String, InvalidInput> {
        if region.is_empty() {
            return Ok(self.region.clone());
        }
        if self.node.map().regions.contains(&region) {
            return Ok(region);
        }
        Err(InvalidInput::new(
            field,
            format!(
                "is {region:?}, not a region of this cluster ({})",
                self.node.map().regions.join(", ")
            ),
        ))
    }

    /// The region of a shard, for an account's wire form.
    pub fn region_of(&self, shard: ShardId) -> &str {
        &self.node.map().shards[shard.0 as usize].region
    }

    /// The other nodes, for a node of a cluster.
    pub fn peers(&self) -> Option<&PeerClients> {
        self.peers.as_ref()
    }

    /// Runs `read`, a read of stores: at once for a node's own stores (embedded, memory: no
    /// network), on the blocking pool for a store a region's nodes share (FoundationDB: a round
    /// trip that must not hold one of the threads calls and leaders run on).
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Router) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if !self.node.leaders().shared() {
            return read(self);
        }
        let router = self.clone();
        tokio::task::spawn_blocking(move || read(&router))
            .await
            .map_err(|e| ApiError::Internal(e.into()))?
    }

    fn peers_or_err(&self) -> Result<&PeerClients, ApiError> {
        self.peers.as_ref().ok_or_else(|| {
            ApiError::Internal("a shard of another node, but this node has no peers".into())
        })
    }

    /// The node believed to lead `shard`: the map's owner, or with a shared store the lease
    /// holder last heard of.
    fn leader(&self, shard: ShardId) -> String {
        self.node.leaders().leader(shard)
    }

    /// The error for a forwarded command whose shard this node does not lead, naming the node
    /// believed to (none while this node's own term may be starting).
    pub fn not_leader(&self, shard: ShardId) -> ApiError {
        let leader = self.leader(shard);
        ApiError::NotLeader {
            shard: shard.0,
            leader: self
                .node
                .map()
                .node(&leader)
                .filter(|n| n.id != self.node.id())
                .map(|n| ledger_shard::runtime::LeaderHint {
                    node: n.id.clone(),
                    address: n.client_address.clone(),
                }),
        }
    }

    // ---- accounts ------------------------------------------------------------------------

    /// Creates validated accounts, each in its home region (`region`, checked), and returns
    /// per-item outcomes in order. An id is reserved on its directory shard first when the
    /// account lives on another shard.
    pub async fn create_accounts(
        &self,
        accounts: Vec<(NewAccount, String)>,
    ) -> Result<Vec<pb::AccountResult>, ApiError> {
        let rings = self.node.rings();
        let mut out: Vec<Option<pb::AccountResult>> = vec![None; accounts.len()];
        let homes: Vec<ShardId> = accounts
            .iter()
            .map(|(a, region)| {
                rings
                    .home(region, &a.placement_key)
                    .expect("the region was checked")
            })
            .collect();
        // 1. Reserve ids on their directory shards, grouped by the node that leads them.
        let mut reservations: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (account, _)) in accounts.iter().enumerate() {
            let directory = rings.directory(&account.id);
            if homes[i] != directory {
                reservations
                    .entry(self.leader(directory))
                    .or_default()
                    .push(i);
            }
        }
        let calls = reservations.into_iter().map(|(node, items)| {
            let (accounts, homes) = (&accounts, &homes);
            async move {
                let results = self.reserve(&node, &items, accounts, homes).await?;
                Ok::<_, ApiError>(items.into_iter().zip(results))
            }
        });
        for result in join_all(calls).await {
            for (i, rejection) in result? {
                if let Some(rejection) = rejection {
                    out[i] = Some(account_rejected(&accounts[i].0.id, rejection));
                }
            }
        }
        // 2. Create each account on its home shard, grouped by the node that leads it.
        let mut creations: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in (0..accounts.len()).filter(|i| out[*i].is_none()) {
            creations.entry(self.leader(homes[i])).or_default().push(i);
        }
        let calls = creations.into_iter().map(|(node, items)| {
            let accounts = &accounts;
            async move {
                let results = if node == self.node.id() {
                    let here = items.iter().map(|i| accounts[*i].clone()).collect();
                    self.create_accounts_here(here).await?
                } else {
                    let wire = items
                        .iter()
                        .map(|i| wire::new_account_to_wire(&accounts[*i].0, &accounts[*i].1))
                        .collect();
                    self.peers_or_err()?.forward_accounts(&node, wire).await?
                };
                Ok::<_, ApiError>(items.into_iter().zip(results))
            }
        });
        for result in join_all(calls).await {
            for (i, result) in result? {
                if let Some(pb::account_result::Outcome::Account(a)) = &result.outcome {
                    self.node.remember_home(&a.id, ShardId(a.shard));
                }
                out[i] = Some(result);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every account answered"))
            .collect())
    }

    /// Reserves the ids of `items` on their directory shards, which `node` leads.
    async fn reserve(
        &self,
        node: &str,
        items: &[usize],
        accounts: &[(NewAccount, String)],
        homes: &[ShardId],
    ) -> Result<Vec<Option<pb::Rejection>>, ApiError> {
        if node != self.node.id() {
            let reservations = items
                .iter()
                .map(|i| ipb::Reservation {
                    account_id: accounts[*i].0.id.clone(),
                    placement_key: accounts[*i].0.placement_key.clone(),
                    home_shard: homes[*i].0,
                })
                .collect();
            return self.peers_or_err()?.reserve_ids(node, reservations).await;
        }
        let calls = items.iter().map(|i| {
            let account = &accounts[*i].0;
            self.reserve_here(account.id.clone(), account.placement_key.clone(), homes[*i])
        });
        join_all(calls).await.into_iter().collect()
    }

    /// Reserves `id` on its directory shard, which this node leads; `Some`: refused.
    pub async fn reserve_here(
        &self,
        id: String,
        placement_key: String,
        home: ShardId,
    ) -> Result<Option<pb::Rejection>, ApiError> {
        let directory = self.node.rings().directory(&id);
        let handle = self
            .node
            .handle(directory)
            .ok_or_else(|| self.not_leader(directory))?;
        match handle
            .reserve_forward(id.clone(), placement_key, home)
            .await?
        {
            Reply::Forward(Ok(())) => {
                self.node.remember_home(&id, home);
                Ok(None)
            }
            Reply::Forward(Err(reason)) => Ok(Some(wire::rejection(reason))),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates accounts in their regions on their home shards, which this node leads (ids
    /// already reserved).
    pub async fn create_accounts_here(
        &self,
        accounts: Vec<(NewAccount, String)>,
    ) -> Result<Vec<pb::AccountResult>, ApiError> {
        let calls = accounts.into_iter().map(|(account, region)| async move {
            let home = self
                .node
                .rings()
                .home(&region, &account.placement_key)
                .expect("a region of the map");
            let handle = self
                .node
                .handle(home)
                .ok_or_else(|| self.not_leader(home))?;
            let id = account.id.clone();
            let outcome =
                match handle.create_account(account).await? {
                    Reply::Account(Ok(account)) => pb::account_result::Outcome::Account(
                        wire::account(&account, home.0, self.region_of(home)),
                    ),
                    Reply::Account(Err(reason)) => {
                        pb::account_result::Outcome::Rejection(wire::rejection(reason))
                    }
                    other => return Err(unexpected(&other)),
                };
            Ok(pb::AccountResult {
                id,
                outcome: Some(outcome),
            })
        });
        join_all(calls).await.into_iter().collect()
    }

    // ---- transfers -----------------------------------------------------------------------

    /// Applies validated transfers; one result per item, in order. Items are grouped by
    /// coordinating shard, so each local shard gets one command per request and each other
    /// node one forwarded call.
    pub async fn create_transfers(
        &self,
        transfers: Vec<Transfer>,
        origin: Origin,
    ) -> Result<Vec<Answer>, ApiError> {
        let span = route_span(transfers.len());
        self.create_transfers_quota_first(transfers, origin, &span)
            .instrument(span.clone())
            .await
    }

    /// Regional quotas (docs/design/0004-regional-quotas.md): a client's posted transfer whose
    /// debit account is homed in another region goes first to this region's quota shard of
    /// that account, as a debit of the account's quota account. What the quota shard declines
    /// (recorded there, so a retry here is declined again) goes the ordinary way.
    async fn create_transfers_quota_first(
        &self,
        mut transfers: Vec<Transfer>,
        origin: Origin,
        span: &tracing::Span,
    ) -> Result<Vec<Answer>, ApiError> {
        let mut coordinators = self.coordinators(&transfers).await?;
        if origin != Origin::Client || self.peers.is_none() {
            return self.dispatch(transfers, coordinators, origin, span).await;
        }
        // Posted, without an expected debit version, coordinated in another region: its debit
        // account is homed there.
        let candidates: Vec<(usize, ShardId)> = transfers
            .iter()
            .zip(&coordinators)
            .enumerate()
            .filter_map(|(i, (t, coordinator))| {
                let home = coordinator.shard()?;
                let plain = t.kind == TransferKind::Posted && t.expected_debit_version.is_none();
                if !plain || self.region_of(home) == self.region {
                    return None;
                }
                Some((i, self.quota_shard(&self.region, &t.debit_account_id)?))
            })
            .collect();
        if candidates.is_empty() {
            return self.dispatch(transfers, coordinators, origin, span).await;
        }
        let mut originals = Vec::with_capacity(candidates.len());
        for &(i, quota_shard) in &candidates {
            originals.push((transfers[i].clone(), coordinators[i]));
            let account = &transfers[i].debit_account_id;
            transfers[i].debit_account_id = quota::quota_id(&self.region, account);
            coordinators[i] = Coordinator::Shard(quota_shard);
        }
        let mut answers = self.dispatch(transfers, coordinators, origin, span).await?;
        let mut declined = (Vec::new(), Vec::new(), Vec::new());
        for (&(i, _), (original, coordinator)) in candidates.iter().zip(originals) {
            let answer = std::mem::replace(
                &mut answers[i],
                Answer::There(pb::TransferResult::default()),
            );
            let mut result = answer.into_wire();
            match &mut result.outcome {
                Some(pb::transfer_result::Outcome::Rejection(r))
                    if r.reason == Rejection::QuotaExhausted.code() as i32 =>
                {
                    declined.0.push(i);
                    declined.1.push(original);
                    declined.2.push(coordinator);
                    continue;
                }
                Some(pb::transfer_result::Outcome::Transfer(t)) => {
                    t.debit_account_id = original.debit_account_id;
                    t.quota_path = true;
                }
                _ => {}
            }
            answers[i] = Answer::There(result);
        }
        metrics::counter!("ledger_quota_path_total", "path" => "quota")
            .increment((candidates.len() - declined.0.len()) as u64);
        if !declined.0.is_empty() {
            metrics::counter!("ledger_quota_path_total", "path" => "fallback")
                .increment(declined.0.len() as u64);
            let (indices, transfers, coordinators) = declined;
            let more = self.dispatch(transfers, coordinators, origin, span).await?;
            for (i, answer) in indices.into_iter().zip(more) {
                answers[i] = answer;
            }
        }
        Ok(answers)
    }

    /// The quota shard of `account` in `region`: the shard its id hashes to on the region's
    /// ring.
    pub fn quota_shard(&self, region: &str, account: &str) -> Option<ShardId> {
        self.node.rings().home(region, account)
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The home shards of accounts (`None`: no such account, or its directory shard's node
    /// did not answer).
    pub async fn homes_of(&self, ids: &[&str]) -> Result<Vec<Option<ShardId>>, ApiError> {
        let ids: Vec<Option<&str>> = ids.iter().map(|id| Some(*id)).collect();
        self.homes(&ids, &[]).await
    }

    /// Sends each transfer to its coordinating shard (`coordinators`, in order).
    async fn dispatch(
        &self,
        transfers: Vec<Transfer>,
        coordinators: Vec<Coordinator>,
        origin: Origin,
        span: &tracing::Span,
    ) -> Result<Vec<Answer>, ApiError> {
        let mut out: Vec<Option<Answer>> = (0..transfers.len()).map(|_| None).collect();
        // Counts first, so each shard's vectors are allocated once at their size (growing them
        // by doubling copied every transfer several times in a request of thousands).
        let mut counts: HashMap<ShardId, usize> = HashMap::new();
        for shard in coordinators.iter().filter_map(Coordinator::shard) {
            *counts.entry(shard).or_default() += 1;
        }
        let mut by_shard: HashMap<ShardId, (Vec<usize>, Vec<Transfer>)> = counts
            .into_iter()
            .map(|(shard, n)| (shard, (Vec::with_capacity(n), Vec::with_capacity(n))))
            .collect();
        for ((i, transfer), coordinator) in transfers.into_iter().enumerate().zip(coordinators) {
            match coordinator {
                Coordinator::Shard(shard) => {
                    let (indices, items) = by_shard.entry(shard).or_default();
                    indices.push(i);
                    items.push(transfer);
                }
                Coordinator::HoldMissing(reason) => {
                    out[i] = Some(Answer::Here(hold_missing(transfer, reason)));
                }
            }
        }
        span.record("shards", by_shard.len());
        // Shards of other nodes: one call per node.
        let mut remote: BTreeMap<String, (Vec<usize>, Vec<Transfer>)> = BTreeMap::new();
        let mut local = Vec::new();
        for (shard, (indices, items)) in by_shard {
            if self.node.is_local(shard) {
                local.push((shard, indices, items));
            } else if origin == Origin::Forwarded {
                return Err(self.not_leader(shard));
            } else {
                let (all_indices, all_items) = remote.entry(self.leader(shard)).or_default();
                all_indices.extend(indices);
                all_items.extend(items);
            }
        }
        let local_calls = local.into_iter().map(|(shard, indices, items)| async move {
            let handle = self.node.handle(shard).expect("led here");
            let replies = handle.create_transfers(items).await?;
            let results = replies
                .into_iter()
                .map(|reply| match reply {
                    Reply::Transfer(reply) => Ok(Answer::Here(reply)),
                    other => Err(reply_error(other)),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, ApiError>((indices, results))
        });
        let remote_calls = remote
            .into_iter()
            .map(|(node, (indices, items))| async move {
                let wire = items.into_iter().map(forwarded_wire).collect();
                let results = self.peers_or_err()?.forward_transfers(&node, wire).await?;
                let results: Vec<Answer> = results.into_iter().map(Answer::There).collect();
                Ok::<_, ApiError>((indices, results))
            });
        let (local, remote) = futures::join!(join_all(local_calls), join_all(remote_calls));
        for result in local.into_iter().chain(remote) {
            let (indices, results) = result?;
            for (i, result) in indices.into_iter().zip(results) {
                out[i] = Some(result);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect())
    }

    /// Not an `async fn`: one would hold the transfer and the instrumented body that holds it
    /// again, and a small call's futures are moved into a box per request.
    pub fn create_transfer(
        &self,
        transfer: Transfer,
    ) -> impl Future<Output = Result<Answer, ApiError>> + Send + '_ {
        let span = route_span(1);
        async move {
            // The common case first: a new transfer whose debit account this node leads.
            let plain = matches!(transfer.kind, TransferKind::Posted | TransferKind::Pending);
            if plain
                && let Some(shard) = self.node.home(&transfer.debit_account_id)
                && let Some(handle) = self.node.handle(shard)
                && (self.peers.is_none() || self.node.home(&transfer.credit_account_id).is_some())
            {
                tracing::Span::current().record("shards", 1);
                return match handle.create_transfer(transfer).await? {
                    Reply::Transfer(reply) => Ok(Answer::Here(reply)),
                    other => Err(reply_error(other)),
                };
            }
            let mut results = self
                .create_transfers_quota_first(
                    vec![transfer],
                    Origin::Client,
                    &tracing::Span::current(),
                )
                .await?;
            Ok(results.pop().expect("one result"))
        }
        .instrument(span)
    }

    /// The shard that coordinates each transfer: its debit account's. A post or void leaves
    /// the accounts to its hold, found by id on whichever shard recorded it (as is a post or
    /// void already recorded, answered where it was).
    async fn coordinators(&self, transfers: &[Transfer]) -> Result<Vec<Coordinator>, ApiError> {
        let resolves = route::resolves;
        let mut found = Found::default();
        if transfers.iter().any(resolves) {
            let ids: Vec<String> = transfers
                .iter()
                .filter(|t| resolves(t))
                .flat_map(|t| [t.id.clone(), t.pending_id.clone()])
                .collect();
            let holds = transfers
                .iter()
                .filter(|t| resolves(t))
                .map(|t| t.pending_id.clone())
                .collect();
            found = self.find(ids, holds).await?;
        }
        let lookups: Vec<route::Found> = transfers
            .iter()
            .map(|t| {
                if !resolves(t) {
                    return route::Found::default();
                }
                route::Found {
                    recorded_at: found.transfers.get(&t.id).map(|(_, _, shard)| *shard),
                    hold_debit: found
                        .holds
                        .get(&t.pending_id)
                        .map(|(hold, _)| hold.debit_account_id.as_str()),
                    pending_recorded: found.transfers.contains_key(&t.pending_id),
                }
            })
            .collect();
        // Debit accounts: each hold's, or the transfer's own.
        let debits: Vec<Option<&str>> = transfers
            .iter()
            .zip(&lookups)
            .map(|(t, lookup)| route::coordinating_account(t, lookup))
            .collect();
        // Credit accounts too, when this node may not know them: the engine would otherwise
        // wait for the lookup with its whole shard (`Read::Locate`); here only this call waits.
        let credits: Vec<&str> = if self.peers.is_some() {
            transfers
                .iter()
                .filter_map(|t| {
                    if !resolves(t) {
                        return Some(t.credit_account_id.as_str());
                    }
                    found
                        .holds
                        .get(&t.pending_id)
                        .map(|(hold, _)| hold.credit_account_id.as_str())
                })
                .filter(|id| self.node.home(id).is_none())
                .collect()
        } else {
            Vec::new()
        };
        // A quota account lives on its region's quota shard of the account it stands for.
        let quota_shards: Vec<Option<ShardId>> = transfers
            .iter()
            .map(|t| {
                quota::parse_quota_id(&t.debit_account_id)
                    .and_then(|(region, account)| self.quota_shard(region, account))
            })
            .collect();
        let debits: Vec<Option<&str>> = debits
            .into_iter()
            .zip(&quota_shards)
            .map(|(debit, quota)| debit.filter(|_| quota.is_none()))
            .collect();
        let homes = self.homes(&debits, &credits).await?;
        transfers
            .iter()
            .zip(&lookups)
            .zip(homes.into_iter().zip(quota_shards))
            .map(|((t, lookup), (home, quota))| {
                if let Some(shard) = quota {
                    return Ok(Coordinator::Shard(shard));
                }
                route::coordinator(t, lookup, home).map_err(|account| {
                    ApiError::Internal(format!("account {account:?} was not located").into())
                })
            })
            .collect()
    }

    /// The home shard of each account named (`None` where none is named), in order: known
    /// here for most, the rest asked of other nodes in one call per node, with `also` (ids to
    /// learn the homes of, not returned).
    async fn homes(
        &self,
        ids: &[Option<&str>],
        also: &[&str],
    ) -> Result<Vec<Option<ShardId>>, ApiError> {
        let mut homes: Vec<Option<ShardId>> = ids
            .iter()
            .map(|id| id.and_then(|id| self.node.home(id)))
            .collect();
        let unknown = ids
            .iter()
            .zip(&homes)
            .filter(|(id, home)| id.is_some() && home.is_none())
            .filter_map(|(id, _)| *id)
            .chain(also.iter().copied());
        let located = self.locate_many(unknown).await?;
        if !located.is_empty() {
            for (id, home) in ids.iter().zip(&mut homes) {
                if let Some(id) = id
                    && home.is_none()
                {
                    *home = located.get(id).copied();
                }
            }
        }
        Ok(homes)
    }

    /// The home shards of accounts: known here, or asked of the nodes that lead their
    /// directory shards (one call per node, for all of a request's ids at once).
    async fn locate_many<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<HashMap<&'a str, ShardId>, ApiError> {
        let mut homes = HashMap::new();
        let mut ask: BTreeMap<String, Vec<&'a str>> = BTreeMap::new();
        for id in ids {
            if homes.contains_key(id) {
                continue;
            }
            match self.node.home(id) {
                Some(home) => {
                    homes.insert(id, home);
                }
                None => {
                    let directory = self.node.rings().directory(id);
                    let asked = ask.entry(self.leader(directory)).or_default();
                    if !asked.contains(&id) {
                        asked.push(id);
                    }
                }
            }
        }
        let calls = ask.into_iter().map(|(node, ids)| async move {
            let owned = ids.iter().map(|id| id.to_string()).collect();
            let locations = self.peers_or_err()?.locate(&node, owned).await?;
            Ok::<_, ApiError>(ids.into_iter().zip(locations))
        });
        for result in join_all(calls).await {
            for (id, location) in result? {
                let home = ShardId(location.home_shard);
                if location.exists {
                    self.node.remember_home(id, home);
                }
                homes.insert(id, home);
            }
        }
        Ok(homes)
    }

    /// Transfers and holds by id, on every shard: the stores this node reads, and one call to
    /// each node believed to lead one of the others (it answers for every store it reads), all
    /// at once. A node that does not answer makes the lookup unavailable (never a false "not
    /// found").
    async fn find(
        &self,
        transfer_ids: Vec<String>,
        hold_ids: Vec<String>,
    ) -> Result<Found, ApiError> {
        let mut found = Found::default();
        let (transfer_ids, hold_ids) = (&transfer_ids, &hold_ids);
        let asked: std::collections::BTreeSet<String> = (0..self.node.shard_count())
            .map(ShardId)
            .filter(|s| self.node.store(*s).is_none())
            .map(|s| self.leader(s))
            .collect();
        let remote = self.peers.iter().flat_map(|peers| {
            asked.iter().map(move |node| {
                let (transfer_ids, hold_ids) = (transfer_ids.clone(), hold_ids.clone());
                async move { peers.find_transfers(node, transfer_ids, hold_ids).await }
            })
        });
        let here = self.find_here(transfer_ids.clone(), hold_ids.clone());
        let (here, remote) = futures::join!(here, join_all(remote));
        for answer in std::iter::once(here).chain(remote) {
            let answer = answer?;
            for f in answer.transfers {
                let record = codec::decode("transfer", &f.record).map_err(internal)?;
                let hold = if f.hold.is_empty() {
                    None
                } else {
                    Some(codec::decode("hold", &f.hold).map_err(internal)?)
                };
                found.keep(f.id, record, hold, ShardId(f.shard));
            }
            for f in answer.holds {
                let hold = codec::decode("hold", &f.record).map_err(internal)?;
                found.holds.insert(f.id, (hold, ShardId(f.shard)));
            }
        }
        Ok(found)
    }

    /// What the shards whose stores this node reads hold of `transfer_ids` and `hold_ids`, as
    /// stored (for another node's lookup).
    pub async fn find_here(
        &self,
        transfer_ids: Vec<String>,
        hold_ids: Vec<String>,
    ) -> Result<ipb::FindTransfersResponse, ApiError> {
        self.read(move |router| router.find_in_stores(&transfer_ids, &hold_ids))
            .await
    }

    fn find_in_stores(
        &self,
        transfer_ids: &[String],
        hold_ids: &[String],
    ) -> Result<ipb::FindTransfersResponse, ApiError> {
        let mut response = ipb::FindTransfersResponse::default();
        for shard in self.node.readable_shards() {
            let store = self.node.store(shard).expect("readable here");
            for id in transfer_ids {
                let stored = store.get(&keys::transfer(shard, id)).map_err(internal)?;
                if let Some(record) = stored {
                    let hold = store.get(&keys::hold(shard, id)).map_err(internal)?;
                    response.transfers.push(ipb::Found {
                        id: id.clone(),
                        shard: shard.0,
                        record,
                        hold: hold.unwrap_or_default(),
                    });
                }
            }
            for id in hold_ids {
                if let Some(record) = store.get(&keys::hold(shard, id)).map_err(internal)? {
                    response.holds.push(ipb::Found {
                        id: id.clone(),
                        shard: shard.0,
                        record,
                        hold: Vec::new(),
                    });
                }
            }
        }
        Ok(response)
    }

    // ---- reads ---------------------------------------------------------------------------

    /// Accounts by id, in order; `None` for an id no account has.
    pub async fn accounts(&self, ids: &[String]) -> Result<Vec<Option<pb::Account>>, ApiError> {
        let named: Vec<Option<&str>> = ids.iter().map(|id| Some(id.as_str())).collect();
        let homes: Vec<ShardId> = self
            .homes(&named, &[])
            .await?
            .into_iter()
            .zip(ids)
            .map(|(home, id)| {
                home.ok_or_else(|| {
                    ApiError::Internal(format!("account {id:?} was not located").into())
                })
            })
            .collect::<Result<_, _>>()?;
        let mut out = vec![None; ids.len()];
        let mut here = Vec::new();
        let mut remote: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, shard) in homes.iter().enumerate() {
            match self.node.store(*shard) {
                Some(_) => here.push(i),
                None => remote.entry(self.leader(*shard)).or_default().push(i),
            }
        }
        let at = |items: &[usize]| -> Vec<ipb::AccountAt> {
            items
                .iter()
                .map(|i| ipb::AccountAt {
                    account_id: ids[*i].clone(),
                    shard: homes[*i].0,
                })
                .collect()
        };
        let local = {
            let wanted = at(&here);
            async move {
                let found = self.accounts_here(wanted).await?;
                Ok::<_, ApiError>((here, found))
            }
        };
        let calls = remote.into_iter().map(|(node, items)| {
            let wanted = at(&items);
            async move {
                let found = self.peers_or_err()?.read_accounts(&node, wanted).await?;
                Ok::<_, ApiError>((items, found))
            }
        });
        let (local, remote) = futures::join!(local, join_all(calls));
        for answer in std::iter::once(local).chain(remote) {
            let (items, found) = answer?;
            // The accounts found, by id; the ids asked may repeat.
            let found: HashMap<String, pb::Account> =
                found.into_iter().map(|a| (a.id.clone(), a)).collect();
            for i in items {
                out[i] = found.get(&ids[i]).cloned();
            }
        }
        Ok(out)
    }

    /// One account, or `None`.
    pub async fn account(&self, id: &str) -> Result<Option<pb::Account>, ApiError> {
        let mut accounts = self.accounts(&[id.to_string()]).await?;
        Ok(accounts.pop().flatten())
    }

    /// Accounts of shards whose stores this node reads (its own, or another node's read).
    pub async fn accounts_here(
        &self,
        wanted: Vec<ipb::AccountAt>,
    ) -> Result<Vec<pb::Account>, ApiError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |router| {
            let mut out = Vec::new();
            for at in &wanted {
                let shard = ShardId(at.shard);
                let store = router
                    .node
                    .store(shard)
                    .ok_or_else(|| router.not_leader(shard))?;
                if let Some(account) = read::account(&**store, shard, &at.account_id)? {
                    out.push(wire::account(&account, shard.0, router.region_of(shard)));
                }
            }
            Ok(out)
        })
        .await
    }

    /// A transfer by id, with its hold if it made one.
    pub async fn transfers(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<(TransferRecord, Option<HoldStatus>)>>, ApiError> {
        let mut found = self.find(ids.to_vec(), Vec::new()).await?;
        Ok(ids
            .iter()
            .map(|id| {
                found
                    .transfers
                    .remove(id)
                    .map(|(record, hold, _)| (record, hold))
            })
            .collect())
    }

    /// Up to `limit` entries of an account on `shard` from `from_version` on.
    pub async fn entries(
        &self,
        account_id: &str,
        shard: ShardId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<pb::Entry>, ApiError> {
        if self.node.store(shard).is_some() {
            return self
                .entries_here(account_id.to_string(), shard, from_version, limit)
                .await;
        }
        let request = ipb::ReadEntriesRequest {
            caller: None,
            account: Some(ipb::AccountAt {
                account_id: account_id.to_string(),
                shard: shard.0,
            }),
            from_version,
            limit: limit as u32,
        };
        self.peers_or_err()?
            .read_entries(&self.leader(shard), request)
            .await
    }

    pub async fn entries_here(
        &self,
        account_id: String,
        shard: ShardId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<pb::Entry>, ApiError> {
        self.read(move |router| {
            let store = router
                .node
                .store(shard)
                .ok_or_else(|| router.not_leader(shard))?;
            Ok(
                read::entries(&**store, shard, &account_id, from_version, limit)?
                    .iter()
                    .map(wire::entry)
                    .collect(),
            )
        })
        .await
    }

    /// Where account `id` lives, if its directory shard is led here (another node's lookup).
    pub async fn located_here(&self, id: String) -> Result<Option<Located>, ApiError> {
        self.read(move |router| Ok(router.node.located_here(&id)?))
            .await
    }

    /// The status of the shards this node leads, from their stores.
    pub async fn shards_here(&self) -> Result<Vec<pb::ShardStatus>, ApiError> {
        self.read(|router| crate::admin::shards_here(&router.node))
            .await
    }
}

/// A post/void whose hold exists nowhere. Not recorded: the hold may yet be created.
fn hold_missing(transfer: Transfer, reason: Rejection) -> TransferReply {
    metrics::counter!(
        "ledger_transfers_total",
        "shard" => "none",
        "outcome" => "rejected",
        "reason" => reason.name()
    )
    .increment(1);
    let record = TransferRecord {
        request: transfer,
        result: Err(reason),
    };
    TransferReply::new(record, None)
}

/// A transfer as forwarded to another node: the request alone (its trace id travels in the
/// call's trace context, and the node that applies it records its own).
fn forwarded_wire(mut transfer: Transfer) -> pb::Transfer {
    transfer.trace_id.clear();
    wire::transfer_into_wire(transfer)
}

/// A transfer's answer: a shard's here, or another node's (already in its wire form). Turned
/// into the wire form by the service, after the request's shards have all answered.
#[derive(Debug)]
pub enum Answer {
    Here(TransferReply),
    There(pb::TransferResult),
}

impl Answer {
    pub fn into_wire(self) -> pb::TransferResult {
        match self {
            Answer::Here(reply) => transfer_result(reply),
            Answer::There(result) => result,
        }
    }
}

/// The wire form of a shard's answer to a transfer.
fn transfer_result(reply: TransferReply) -> pb::TransferResult {
    let mut result = wire::transfer_result(reply.record, reply.hold.as_ref());
    result.replayed = reply.replayed;
    if !reply.differing.is_empty()
        && let Some(pb::transfer_result::Outcome::Rejection(rejection)) = &mut result.outcome
    {
        rejection.message = format!(
            "{}: it differs in {}",
            rejection.message,
            reply.differing.join(", ")
        );
        rejection.differing_fields = reply.differing.iter().map(|f| f.to_string()).collect();
    }
    result
}

fn account_rejected(id: &str, rejection: pb::Rejection) -> pb::AccountResult {
    pb::AccountResult {
        id: id.to_string(),
        outcome: Some(pb::account_result::Outcome::Rejection(rejection)),
    }
}

/// The routing span of a transfer call: finding each item's coordinating shard and waiting
/// for the shards' answers. Shard batches link to it. Made only inside a sampled trace: an
/// unsampled call would pay for a span nobody sees (the shards then link to the call's span).
fn route_span(items: usize) -> tracing::Span {
    if TraceParent::current().is_some_and(|p| p.sampled) {
        tracing::info_span!("router.route", items, shards = tracing::field::Empty)
    } else {
        tracing::Span::none()
    }
}

fn reply_error(reply: Reply) -> ApiError {
    match reply {
        Reply::Unavailable(reason) => {
            ApiError::Unavailable(ledger_shard::runtime::ShardError::Unreachable(reason))
        }
        other => unexpected(&other),
    }
}

fn unexpected(reply: &Reply) -> ApiError {
    ApiError::Internal(format!("unexpected reply from a shard: {reply:?}").into())
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Internal(Box::new(e))
}
