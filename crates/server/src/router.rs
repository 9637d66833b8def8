//! Routing: every call is split by shard and sent to the shard leaders. This is the one seam
//! where a later multi-node version forwards to another node instead of a local queue.
//!
//! Writes go through the leaders' queues; reads go straight to the shards' stores, which hold
//! only committed (durable) state.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::join_all;
use tracing::Instrument;

use ledger_domain::{
    Account, Entry, HoldStatus, InvalidInput, NewAccount, Rejection, ShardId, Transfer,
    TransferKind, TransferRecord,
};
use ledger_shard::engine::{Reply, TransferReply};
use ledger_shard::node::Node;
use ledger_shard::read;
use ledger_shard::trace::TraceParent;

use crate::error::ApiError;

/// Entries per ListEntries page when the client does not say.
pub const PAGE_SIZE_DEFAULT: u32 = 100;
pub const PAGE_SIZE_MAX: u32 = 1_000;

#[derive(Clone)]
pub struct Router {
    node: Arc<Node>,
    batch_size_max: usize,
}

impl Router {
    pub fn new(node: Arc<Node>, batch_size_max: usize) -> Self {
        Self {
            node,
            batch_size_max,
        }
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

    /// Creates validated accounts, each on its home shard, and returns per-item outcomes.
    pub async fn create_accounts(
        &self,
        accounts: Vec<NewAccount>,
    ) -> Result<Vec<(Result<Account, Rejection>, ShardId)>, ApiError> {
        let calls = accounts.into_iter().map(|a| self.create_account(a));
        join_all(calls).await.into_iter().collect()
    }

    async fn create_account(
        &self,
        account: NewAccount,
    ) -> Result<(Result<Account, Rejection>, ShardId), ApiError> {
        let placement = self.node.placement();
        let home = placement.shard_of(&account.placement_key);
        let directory = placement.shard_of(&account.id);
        if home != directory {
            // The id's directory shard decides whether the id is free, first.
            let reply = self
                .node
                .handle(directory)
                .reserve_forward(account.id.clone(), account.placement_key.clone(), home)
                .await?;
            match reply {
                Reply::Forward(Ok(())) => self.node.remember_forward(&account.id, home),
                Reply::Forward(Err(reason)) => return Ok((Err(reason), home)),
                other => return Err(unexpected(&other)),
            }
        }
        match self.node.handle(home).create_account(account).await? {
            Reply::Account(result) => Ok((result, home)),
            other => Err(unexpected(&other)),
        }
    }

    /// Applies validated transfers; one outcome per item, in order. Items are grouped by shard
    /// so each shard gets one command (and sends one reply) per request.
    pub async fn create_transfers(
        &self,
        transfers: Vec<Transfer>,
    ) -> Result<Vec<TransferReply>, ApiError> {
        let span = route_span(transfers.len());
        self.create_transfers_routed(transfers, &span)
            .instrument(span.clone())
            .await
    }

    async fn create_transfers_routed(
        &self,
        transfers: Vec<Transfer>,
        span: &tracing::Span,
    ) -> Result<Vec<TransferReply>, ApiError> {
        let mut out: Vec<Option<TransferReply>> = (0..transfers.len()).map(|_| None).collect();
        // Homes first, so each shard's vectors are allocated once at their size (growing them
        // by doubling copied every transfer several times in a request of thousands).
        let homes = transfers
            .iter()
            .map(|t| self.home_of_transfer(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut counts: HashMap<ShardId, usize> = HashMap::new();
        for shard in homes.iter().flatten() {
            *counts.entry(*shard).or_default() += 1;
        }
        let mut by_shard: HashMap<ShardId, (Vec<usize>, Vec<Transfer>)> = counts
            .into_iter()
            .map(|(shard, n)| (shard, (Vec::with_capacity(n), Vec::with_capacity(n))))
            .collect();
        for ((i, transfer), home) in transfers.into_iter().enumerate().zip(homes) {
            match home {
                Some(shard) => {
                    let (indices, items) = by_shard.entry(shard).or_default();
                    indices.push(i);
                    items.push(transfer);
                }
                None => out[i] = Some(self.hold_missing(transfer)?),
            }
        }
        span.record("shards", by_shard.len());
        let calls = by_shard
            .into_iter()
            .map(|(shard, (indices, items))| async move {
                let replies = self.node.handle(shard).create_transfers(items).await?;
                Ok::<_, ApiError>((indices, replies))
            });
        for result in join_all(calls).await {
            let (indices, replies) = result?;
            for (i, reply) in indices.into_iter().zip(replies) {
                match reply {
                    Reply::Transfer(reply) => out[i] = Some(reply),
                    other => return Err(unexpected(&other)),
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every item answered"))
            .collect())
    }

    /// A post/void whose hold exists nowhere. Not recorded: the hold may yet be created.
    fn hold_missing(&self, transfer: Transfer) -> Result<TransferReply, ApiError> {
        let reason = if self.transfer(&transfer.pending_id)?.is_some() {
            Rejection::PendingTransferNotPending
        } else {
            Rejection::PendingTransferNotFound
        };
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
        Ok(TransferReply::new(record, None))
    }

    /// Not an `async fn`: one would hold the transfer and the instrumented body that holds it
    /// again, and a small call's futures are moved into a box per request.
    pub fn create_transfer(
        &self,
        transfer: Transfer,
    ) -> impl Future<Output = Result<TransferReply, ApiError>> + Send + '_ {
        let span = route_span(1);
        async move {
            let Some(shard) = self.home_of_transfer(&transfer)? else {
                return self.hold_missing(transfer);
            };
            tracing::Span::current().record("shards", 1);
            match self.node.handle(shard).create_transfer(transfer).await? {
                Reply::Transfer(reply) => Ok(reply),
                other => Err(unexpected(&other)),
            }
        }
        .instrument(span)
    }

    /// The shard that coordinates a transfer: its debit account's. A post or void that leaves
    /// the accounts empty inherits them from the hold, found by its id.
    fn home_of_transfer(&self, transfer: &Transfer) -> Result<Option<ShardId>, ApiError> {
        let resolves = matches!(
            transfer.kind,
            TransferKind::PostPending | TransferKind::VoidPending
        );
        if !resolves {
            return Ok(Some(self.node.locate(&transfer.debit_account_id)));
        }
        // Idempotency first: a post/void id already recorded is answered where it was recorded.
        if let Some((_, _, shard)) = self.find_transfer(&transfer.id)? {
            return Ok(Some(shard));
        }
        Ok(self
            .find_hold(&transfer.pending_id)?
            .map(|hold| self.node.locate(&hold.debit_account_id)))
    }

    fn find_hold(&self, pending_id: &str) -> Result<Option<HoldStatus>, ApiError> {
        for i in 0..self.node.shard_count() {
            let shard = ShardId(i);
            if let Some(hold) = read::hold(&**self.node.store(shard), shard, pending_id)? {
                return Ok(Some(hold));
            }
        }
        Ok(None)
    }

    pub fn account(&self, id: &str) -> Result<Option<(Account, ShardId)>, ApiError> {
        let shard = self.node.locate(id);
        Ok(read::account(&**self.node.store(shard), shard, id)?.map(|a| (a, shard)))
    }

    /// A transfer is recorded on its debit account's shard; without knowing it, look on each.
    pub fn transfer(
        &self,
        id: &str,
    ) -> Result<Option<(TransferRecord, Option<HoldStatus>)>, ApiError> {
        Ok(self
            .find_transfer(id)?
            .map(|(record, hold, _)| (record, hold)))
    }

    fn find_transfer(
        &self,
        id: &str,
    ) -> Result<Option<(TransferRecord, Option<HoldStatus>, ShardId)>, ApiError> {
        for i in 0..self.node.shard_count() {
            let shard = ShardId(i);
            if let Some((record, hold)) = read::transfer(&**self.node.store(shard), shard, id)? {
                return Ok(Some((record, hold, shard)));
            }
        }
        Ok(None)
    }

    pub fn entries(
        &self,
        account_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, ApiError> {
        let shard = self.node.locate(account_id);
        Ok(read::entries(
            &**self.node.store(shard),
            shard,
            account_id,
            from_version,
            limit,
        )?)
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

fn unexpected(reply: &Reply) -> ApiError {
    ApiError::Internal(format!("unexpected reply from a shard: {reply:?}").into())
}
