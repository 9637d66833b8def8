//! Regional quotas at the API (docs/design/0004-regional-quotas.md): operators' requests
//! checked, turned into shard commands ([`ledger_shard::quota::Command`]) and run by the shard
//! they concern (the account's home, or a region's quota shard), here or on the node that
//! leads it (one forwarded call, `PeerService.Quota`).

use futures::future::join_all;

use ledger_domain::{InvalidInput, ShardId, validate_id};
use ledger_proto::ledger::internal::v1 as ipb;
use ledger_proto::pb;
use ledger_shard::engine::Reply;
use ledger_shard::quota::{
    Allowance, Command, CommandError, CommandReply, MoveTo, Pending, QUOTA_LEASE_MS_MAX,
    QUOTA_SKEW_MARGIN_MS, RegionView,
};

use crate::error::ApiError;
use crate::router::Router;

use ipb::quota_request::Command as Wire;

/// Runs a quota command on `shard`: here if this node leads it, else on the node that does.
pub async fn run(router: &Router, shard: ShardId, wire: Wire) -> Result<Vec<pb::Quota>, ApiError> {
    let node = router.node();
    if node.handle(shard).is_some() {
        return run_here(router, shard, wire).await;
    }
    let peers = router.peers().ok_or_else(|| router.not_leader(shard))?;
    let leader = node.leaders().leader(shard);
    let response = peers.quota(&leader, shard, wire).await?;
    Ok(response.quotas)
}

/// Runs a quota command on a shard this node leads (`NOT_LEADER` otherwise).
pub async fn run_here(
    router: &Router,
    shard: ShardId,
    wire: Wire,
) -> Result<Vec<pb::Quota>, ApiError> {
    let handle = router
        .node()
        .handle(shard)
        .ok_or_else(|| router.not_leader(shard))?;
    let command = command(router, wire)?;
    match handle.quota(command).await? {
        Reply::Quota(CommandReply::Allowances(list)) => Ok(list.iter().map(home_view).collect()),
        Reply::Quota(CommandReply::Region(view)) => Ok(view.iter().map(region_view).collect()),
        Reply::Quota(CommandReply::Refused(error)) => Err(refused(error)),
        other => Err(ApiError::Internal(
            format!("unexpected reply to a quota command: {other:?}").into(),
        )),
    }
}

fn refused(error: CommandError) -> ApiError {
    match error {
        CommandError::AccountNotFound(id) => ApiError::NotFound {
            what: "account",
            id,
        },
        CommandError::Invalid { field, reason } => InvalidInput::new(field, reason).into(),
        other => ApiError::Precondition(other.to_string()),
    }
}

/// The shard command of a checked request.
fn command(router: &Router, wire: Wire) -> Result<Command, ApiError> {
    let shard_of = |field: &str, region: &str, account: &str| {
        router
            .quota_shard(region, account)
            .ok_or_else(|| ApiError::from(unknown_region(router, field, region)))
    };
    Ok(match wire {
        Wire::Set(r) => Command::Set {
            quota_shard: shard_of("region", &r.region, &r.account_id)?,
            account_id: r.account_id,
            region: r.region,
            amount: r.amount,
            lease_ms: r.lease_seconds.saturating_mul(1_000),
        },
        Wire::Move(r) => Command::Move {
            from_shard: shard_of("from_region", &r.from_region, &r.account_id)?,
            to: MoveTo {
                quota_shard: shard_of("to_region", &r.to_region, &r.account_id)?,
                region: r.to_region,
                lease_ms: r.lease_seconds.saturating_mul(1_000),
            },
            account_id: r.account_id,
            from: r.from_region,
            amount: r.amount,
        },
        Wire::WriteOff(r) => Command::WriteOff {
            account_id: r.account_id,
            region: r.region,
        },
        Wire::Show(r) => Command::Show {
            account_id: r.account_id,
        },
        Wire::Region(r) => Command::Region {
            account_id: r.account_id,
        },
    })
}

fn unknown_region(router: &Router, field: &str, region: &str) -> InvalidInput {
    InvalidInput::new(
        field,
        format!(
            "is {region:?}, not a region of this cluster ({})",
            router.node().map().regions.join(", ")
        ),
    )
}

/// Checks a request's fields that need no shard: ids, regions, lease, amounts.
pub fn check(router: &Router, wire: &Wire) -> Result<(), ApiError> {
    let region = |field: &str, region: &str| -> Result<(), ApiError> {
        if router.node().map().regions.iter().any(|r| r == region) {
            Ok(())
        } else {
            Err(unknown_region(router, field, region).into())
        }
    };
    let lease = |field: &str, seconds: u64| -> Result<(), ApiError> {
        let ms = seconds.saturating_mul(1_000);
        if ms <= QUOTA_SKEW_MARGIN_MS || ms > QUOTA_LEASE_MS_MAX {
            return Err(InvalidInput::new(
                field,
                format!(
                    "is {seconds}; it must be more than {} and at most {}",
                    QUOTA_SKEW_MARGIN_MS / 1_000,
                    QUOTA_LEASE_MS_MAX / 1_000
                ),
            )
            .into());
        }
        Ok(())
    };
    match wire {
        Wire::Set(r) => {
            validate_id("account_id", &r.account_id)?;
            region("region", &r.region)?;
            lease("lease_seconds", r.lease_seconds)?;
        }
        Wire::Move(r) => {
            validate_id("account_id", &r.account_id)?;
            region("from_region", &r.from_region)?;
            region("to_region", &r.to_region)?;
            lease("lease_seconds", r.lease_seconds)?;
            if r.from_region == r.to_region {
                return Err(
                    InvalidInput::new("to_region", "is the region the rights move from").into(),
                );
            }
            if r.amount == 0 {
                return Err(InvalidInput::new("amount", "must be > 0").into());
            }
        }
        Wire::WriteOff(r) => {
            validate_id("account_id", &r.account_id)?;
            region("region", &r.region)?;
            if r.reason.trim().is_empty() {
                return Err(InvalidInput::new(
                    "reason",
                    "must say why (it goes into the audit log)",
                )
                .into());
            }
        }
        Wire::Show(r) | Wire::Region(r) => validate_id("account_id", &r.account_id)?,
    }
    Ok(())
}

/// The home shard of an account, and its region; `NOT_FOUND` if it does not exist.
pub async fn home_of(router: &Router, account_id: &str) -> Result<(ShardId, String), ApiError> {
    let home = router
        .homes_of(&[account_id])
        .await?
        .pop()
        .flatten()
        .ok_or_else(|| ApiError::NotFound {
            what: "account",
            id: account_id.to_string(),
        })?;
    Ok((home, router.region_of(home).to_string()))
}

/// The account's allowances: the home's records, each with its region's view if that region's
/// quota shard answered.
pub async fn show(router: &Router, account_id: &str) -> Result<pb::QuotasResponse, ApiError> {
    let (home, home_region) = home_of(router, account_id).await?;
    let request = || pb::GetQuotasRequest {
        account_id: account_id.to_string(),
    };
    let mut quotas = run(router, home, Wire::Show(request())).await?;
    let views = join_all(quotas.iter().map(|q| {
        let shard = router.quota_shard(&q.region, account_id);
        async move {
            let shard = shard?;
            run(router, shard, Wire::Region(request()))
                .await
                .ok()?
                .pop()
        }
    }))
    .await;
    for (quota, view) in quotas.iter_mut().zip(views) {
        if let Some(view) = view {
            quota.region_answered = true;
            quota.spent = view.spent;
            quota.available = view.available;
            quota.in_flight = view.in_flight;
            quota.closed = view.closed;
            quota.region_epoch = view.region_epoch;
        }
    }
    Ok(pb::QuotasResponse {
        account_id: account_id.to_string(),
        home_region,
        quotas,
    })
}

fn home_view(a: &Allowance) -> pb::Quota {
    let pending = match &a.pending {
        None => String::new(),
        Some(Pending::Grant { .. }) => "grant".into(),
        Some(Pending::Shrink { to: None, .. }) => "shrink".into(),
        Some(Pending::Shrink { to: Some(to), .. }) => format!("move to {}", to.region),
    };
    pb::Quota {
        region: a.region.clone(),
        reserved: a.outstanding(),
        granted: a.granted,
        settled: a.settled,
        released: a.released,
        refused: a.refused,
        epoch: a.epoch,
        confirmed_epoch: a.confirmed,
        expires_at_unix_ms: a.expires_at_ms,
        pending,
        written_off_through_epoch: a.written_off_through,
        ..pb::Quota::default()
    }
}

fn region_view(v: &RegionView) -> pb::Quota {
    pb::Quota {
        region: v.record.region.clone(),
        region_answered: true,
        spent: v.record.spent,
        available: v.available,
        in_flight: v.in_flight,
        closed: v.record.closed,
        region_epoch: v.record.epoch,
        expires_at_unix_ms: v.record.expires_at_ms,
        ..pb::Quota::default()
    }
}
