//! The `ledger.v1.LedgerService` gRPC service: decode and validate the request (all of it,
//! before anything is applied), call the router, encode per-item results.

use std::future::Future;

use tonic::{Request, Response, Status};

use ledger_domain::ShardId;
use ledger_domain::{InvalidInput, Transfer, validate_id};
use ledger_proto::pb::ledger_service_server::LedgerService;
use ledger_proto::{self as wire, pb};

use crate::calls::{Calls, Method};
use crate::error::ApiError;
use crate::router::{Answer, Origin, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, Router};
use crate::telemetry;

pub struct Ledger {
    router: Router,
    calls: Calls,
}

impl Ledger {
    pub fn new(router: Router) -> Self {
        Self {
            router,
            calls: Calls::new(),
        }
    }
}

/// Decodes and validates one transfer of a batch; `index` names it in an error (the field name
/// is formatted only then: a batch holds thousands of items).
fn decode_transfer(t: pb::Transfer, index: usize) -> Result<Transfer, ApiError> {
    let field = || format!("transfers[{index}]");
    let t = wire::transfer(t).map_err(|e| e.within(&field()))?;
    t.validate().map_err(|e| e.within(&field()))?;
    Ok(t)
}

/// Decodes and validates accounts to create (`accounts[i]` names one in an error), each with
/// its home region (its own, checked, or this node's).
pub(crate) fn decode_accounts(
    router: &Router,
    accounts: Vec<pb::Account>,
) -> Result<Vec<(ledger_domain::NewAccount, String)>, ApiError> {
    accounts
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let field = format!("accounts[{i}]");
            let region = router.region_for(&format!("{field}.region"), a.region.clone())?;
            let account = wire::new_account(a)
                .and_then(ledger_domain::NewAccount::normalize)
                .map_err(|e| e.within(&field))?;
            Ok((account, region))
        })
        .collect::<Result<Vec<_>, InvalidInput>>()
        .map_err(ApiError::from)
}

fn check_ids(router: &Router, field: &str, ids: &[String]) -> Result<(), ApiError> {
    router.check_batch(field, ids.len())?;
    for (i, id) in ids.iter().enumerate() {
        validate_id(&format!("{field}[{i}]"), id)?;
    }
    Ok(())
}

/// The calls' bodies; the trait methods below time and count them.
impl Ledger {
    async fn create_accounts_call(
        &self,
        request: Request<pb::CreateAccountsRequest>,
    ) -> Result<Response<pb::CreateAccountsResponse>, Status> {
        let accounts = request.into_inner().accounts;
        self.router.check_batch("accounts", accounts.len())?;
        let accounts = decode_accounts(&self.router, accounts)?;
        let results = self.router.create_accounts(accounts).await?;
        Ok(Response::new(pb::CreateAccountsResponse { results }))
    }

    async fn get_accounts_call(
        &self,
        request: Request<pb::GetAccountsRequest>,
    ) -> Result<Response<pb::GetAccountsResponse>, Status> {
        let ids = request.into_inner().ids;
        check_ids(&self.router, "ids", &ids)?;
        let mut response = pb::GetAccountsResponse::default();
        let found = self.router.accounts(&ids).await?;
        for (id, account) in ids.into_iter().zip(found) {
            match account {
                Some(account) => response.accounts.push(account),
                None => response.not_found.push(id),
            }
        }
        Ok(Response::new(response))
    }

    async fn create_transfers_call(
        &self,
        request: Request<pb::CreateTransfersRequest>,
    ) -> Result<Response<pb::CreateTransfersResponse>, Status> {
        let trace_id = telemetry::trace_id_of_call(request.metadata());
        let transfers = request.into_inner().transfers;
        self.router.check_batch("transfers", transfers.len())?;
        let transfers = transfers
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let mut t = decode_transfer(t, i)?;
                t.trace_id.clone_from(&trace_id);
                Ok(t)
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let results = self
            .router
            .create_transfers(transfers, Origin::Client)
            .await?
            .into_iter()
            .map(Answer::into_wire)
            .collect();
        let mut response = Response::new(pb::CreateTransfersResponse { results });
        telemetry::set_response_traceparent(&mut response);
        Ok(response)
    }

    /// Decodes and validates at once, so the future (boxed for every request) holds the
    /// domain transfer only, not the request as well (docs/benchmarks.md).
    fn transfer_call(
        &self,
        request: Request<pb::Transfer>,
    ) -> impl Future<Output = Result<Response<pb::TransferResult>, Status>> + Send + '_ {
        let trace_id = telemetry::trace_id_of_call(request.metadata());
        let decoded = wire::transfer(request.into_inner()).and_then(|mut transfer| {
            transfer.validate()?;
            transfer.trace_id = trace_id;
            Ok(transfer)
        });
        async move {
            let transfer = decoded.map_err(ApiError::from)?;
            let result = self.router.create_transfer(transfer).await?;
            let mut response = Response::new(result.into_wire());
            telemetry::set_response_traceparent(&mut response);
            Ok(response)
        }
    }

    async fn get_transfers_call(
        &self,
        request: Request<pb::GetTransfersRequest>,
    ) -> Result<Response<pb::GetTransfersResponse>, Status> {
        let ids = request.into_inner().ids;
        check_ids(&self.router, "ids", &ids)?;
        let mut response = pb::GetTransfersResponse::default();
        let found = self.router.transfers(&ids).await?;
        for (id, found) in ids.into_iter().zip(found) {
            match found {
                Some((record, hold)) if record.result.is_ok() => {
                    let t = wire::committed_transfer(&record, hold.as_ref());
                    response.transfers.extend(t);
                }
                Some((record, _)) => response.rejected.push(wire::transfer_result(record, None)),
                None => response.not_found.push(id),
            }
        }
        Ok(Response::new(response))
    }

    async fn get_balance_call(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        let id = request.into_inner().account_id;
        validate_id("account_id", &id).map_err(ApiError::from)?;
        match self.router.account(&id).await? {
            Some(account) => Ok(Response::new(wire::balance_of_wire(&account))),
            None => Err(ApiError::NotFound {
                what: "account",
                id: id.clone(),
            }
            .into()),
        }
    }

    async fn list_entries_call(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = request.into_inner();
        validate_id("account_id", &r.account_id).map_err(ApiError::from)?;
        let page_size = match r.page_size {
            0 => PAGE_SIZE_DEFAULT,
            n if n > PAGE_SIZE_MAX => {
                return Err(ApiError::from(InvalidInput::new(
                    "page_size",
                    format!("is {n}; the limit is {PAGE_SIZE_MAX}"),
                ))
                .into());
            }
            n => n,
        } as usize;
        let from_version = if r.page_token.is_empty() {
            1
        } else {
            r.page_token
                .parse::<u64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    ApiError::from(InvalidInput::new(
                        "page_token",
                        "is not a token from a previous ListEntries response",
                    ))
                })?
        };
        let Some(account) = self.router.account(&r.account_id).await? else {
            return Err(ApiError::NotFound {
                what: "account",
                id: r.account_id.clone(),
            }
            .into());
        };
        let mut entries = self
            .router
            .entries(
                &r.account_id,
                ShardId(account.shard),
                from_version,
                page_size + 1,
            )
            .await?;
        let next_page_token = if entries.len() > page_size {
            entries.truncate(page_size);
            (entries.last().expect("non-empty").version + 1).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl LedgerService for Ledger {
    async fn create_accounts(
        &self,
        request: Request<pb::CreateAccountsRequest>,
    ) -> Result<Response<pb::CreateAccountsResponse>, Status> {
        self.calls
            .observe(Method::CreateAccounts, self.create_accounts_call(request))
            .await
    }

    async fn get_accounts(
        &self,
        request: Request<pb::GetAccountsRequest>,
    ) -> Result<Response<pb::GetAccountsResponse>, Status> {
        self.calls
            .observe(Method::GetAccounts, self.get_accounts_call(request))
            .await
    }

    async fn create_transfers(
        &self,
        request: Request<pb::CreateTransfersRequest>,
    ) -> Result<Response<pb::CreateTransfersResponse>, Status> {
        self.calls
            .observe(Method::CreateTransfers, self.create_transfers_call(request))
            .await
    }

    async fn transfer(
        &self,
        request: Request<pb::Transfer>,
    ) -> Result<Response<pb::TransferResult>, Status> {
        self.calls
            .observe(Method::Transfer, self.transfer_call(request))
            .await
    }

    async fn get_transfers(
        &self,
        request: Request<pb::GetTransfersRequest>,
    ) -> Result<Response<pb::GetTransfersResponse>, Status> {
        self.calls
            .observe(Method::GetTransfers, self.get_transfers_call(request))
            .await
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        self.calls
            .observe(Method::GetBalance, self.get_balance_call(request))
            .await
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.calls
            .observe(Method::ListEntries, self.list_entries_call(request))
            .await
    }
}
