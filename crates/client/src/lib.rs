//! Rust client for the ledger. Calls are retried on `UNAVAILABLE` (a leader changing or a node
//! restarting) with the same transfer ids, which is always safe: a transfer id is applied at
//! most once. A node that does not lead the shard a call needs answers `UNAVAILABLE` with a
//! `NOT_LEADER` hint naming the leader's address; the call is then sent there, with the same
//! ids (counted among the retries, so hints cannot send a call around forever).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use ledger_proto::pb;
use pb::admin_service_client::AdminServiceClient;
use pb::ledger_service_client::LedgerServiceClient;

/// How many times a call is retried on `UNAVAILABLE` before the error is returned.
pub const RETRIES_MAX: u32 = 8;
const RETRY_BACKOFF_START: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
}

impl Error {
    /// The call's status, if the server answered.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(status) => Some(status),
            Error::Connect { .. } => None,
        }
    }
}

/// The URI of a server address: a bare `host:port` (as `ledgerd` prints it) means plain-text
/// HTTP/2.
pub fn uri_of(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Channels to leaders by address, oldest first.
type Leaders = Vec<(String, LedgerServiceClient<Channel>)>;

/// Leaders' addresses a client keeps a channel to (a cluster's nodes); past it, the oldest is
/// let go.
pub const LEADERS_CACHED_MAX: usize = 64;

#[derive(Clone, Debug)]
pub struct Client {
    inner: LedgerServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    /// Channels to the leaders that hints named, by address, oldest first.
    leaders: std::sync::Arc<std::sync::Mutex<Leaders>>,
    /// W3C `traceparent` sent with every call, so the server's spans (and the transfers it
    /// records) belong to the caller's trace.
    traceparent: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// `authorization: Bearer <token>` for admin calls that need the operator's credential.
    admin_token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:50051`).
    pub async fn connect(addr: &str) -> Result<Client, Error> {
        let err = |reason: String| Error::Connect {
            addr: addr.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(uri_of(addr))
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let channel = endpoint.connect().await.map_err(|e| err(root_cause(&e)))?;
        let admin = AdminServiceClient::new(channel.clone());
        let inner = LedgerServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        Ok(Client {
            inner,
            admin,
            leaders: std::sync::Arc::default(),
            traceparent: None,
            admin_token: None,
        })
    }

    /// Sends `traceparent` (W3C: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`) with
    /// every call from now on.
    pub fn with_traceparent(mut self, traceparent: &str) -> Result<Self, Error> {
        let value = traceparent.parse().map_err(|_| {
            Error::Status(Status::invalid_argument(format!(
                "traceparent `{traceparent}` is not a valid header value"
            )))
        })?;
        self.traceparent = Some(value);
        Ok(self)
    }

    /// Sends the operator's token with admin calls from now on (regional quotas).
    pub fn with_admin_token(mut self, token: &str) -> Result<Self, Error> {
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            Error::Status(Status::invalid_argument(
                "the admin token is not a valid header value",
            ))
        })?;
        self.admin_token = Some(value);
        Ok(self)
    }

    fn admin_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Some(token) = &self.admin_token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// An account's allowances per region (`AdminService.GetQuotas`).
    pub async fn get_quotas(&self, account_id: &str) -> Result<pb::QuotasResponse, Error> {
        let request = self.admin_request(pb::GetQuotasRequest {
            account_id: account_id.to_string(),
        });
        Ok(self.admin.clone().get_quotas(request).await?.into_inner())
    }

    pub async fn set_quota(
        &self,
        request: pb::SetQuotaRequest,
    ) -> Result<pb::QuotasResponse, Error> {
        let request = self.admin_request(request);
        Ok(self.admin.clone().set_quota(request).await?.into_inner())
    }

    pub async fn move_quota(
        &self,
        request: pb::MoveQuotaRequest,
    ) -> Result<pb::QuotasResponse, Error> {
        let request = self.admin_request(request);
        Ok(self.admin.clone().move_quota(request).await?.into_inner())
    }

    pub async fn revoke_quota(
        &self,
        request: pb::RevokeQuotaRequest,
    ) -> Result<pb::QuotasResponse, Error> {
        let request = self.admin_request(request);
        Ok(self.admin.clone().revoke_quota(request).await?.into_inner())
    }

    pub async fn write_off_quota(
        &self,
        request: pb::WriteOffQuotaRequest,
    ) -> Result<pb::QuotasResponse, Error> {
        let request = self.admin_request(request);
        Ok(self
            .admin
            .clone()
            .write_off_quota(request)
            .await?
            .into_inner())
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(tp) = &self.traceparent {
            request.metadata_mut().insert("traceparent", tp.clone());
        }
        request
    }

    pub fn raw(&self) -> LedgerServiceClient<Channel> {
        self.inner.clone()
    }

    pub async fn create_accounts(
        &self,
        accounts: Vec<pb::Account>,
    ) -> Result<Vec<pb::AccountResult>, Error> {
        let request = pb::CreateAccountsRequest { accounts };
        self.retry(|mut c| {
            let request = self.request(request.clone());
            async move { c.create_accounts(request).await }
        })
        .await
        .map(|r| r.results)
    }

    pub async fn get_accounts(&self, ids: Vec<String>) -> Result<pb::GetAccountsResponse, Error> {
        let request = pb::GetAccountsRequest { ids };
        self.retry(|mut c| {
            let request = self.request(request.clone());
            async move { c.get_accounts(request).await }
        })
        .await
    }

    pub async fn create_transfers(
        &self,
        transfers: Vec<pb::Transfer>,
    ) -> Result<Vec<pb::TransferResult>, Error> {
        let request = pb::CreateTransfersRequest { transfers };
        self.retry(|mut c| {
            let request = self.request(request.clone());
            async move { c.create_transfers(request).await }
        })
        .await
        .map(|r| r.results)
    }

    pub async fn transfer(&self, transfer: pb::Transfer) -> Result<pb::TransferResult, Error> {
        self.retry(|mut c| {
            let transfer = self.request(transfer.clone());
            async move { c.transfer(transfer).await }
        })
        .await
    }

    pub async fn get_transfers(&self, ids: Vec<String>) -> Result<pb::GetTransfersResponse, Error> {
        let request = pb::GetTransfersRequest { ids };
        self.retry(|mut c| {
            let request = self.request(request.clone());
            async move { c.get_transfers(request).await }
        })
        .await
    }

    /// The cluster as the node called sees it (`AdminService.ClusterStatus`).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        let request = self.request(pb::ClusterStatusRequest {});
        Ok(self
            .admin
            .clone()
            .cluster_status(request)
            .await?
            .into_inner())
    }

    pub async fn balance(&self, account_id: &str) -> Result<pb::Balance, Error> {
        let request = pb::GetBalanceRequest {
            account_id: account_id.to_string(),
        };
        self.retry(|mut c| {
            let request = self.request(request.clone());
            async move { c.get_balance(request).await }
        })
        .await
    }

    /// One page of an account's statement.
    pub async fn entries(
        &self,
        account_id: &str,
        page_size: u32,
        page_token: String,
    ) -> Result<pb::ListEntriesResponse, Error> {
        let mut c = self.inner.clone();
        let request = pb::ListEntriesRequest {
            account_id: account_id.to_string(),
            page_size,
            page_token,
        };
        Ok(c.list_entries(self.request(request)).await?.into_inner())
    }

    /// The whole statement, page by page.
    pub async fn all_entries(&self, account_id: &str) -> Result<Vec<pb::Entry>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.entries(account_id, 1_000, token).await?;
            out.extend(page.entries);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }
}

impl Client {
    /// Makes a call, retrying on `UNAVAILABLE` (after a growing pause) and following a
    /// `NOT_LEADER` hint to the leader's address (at once), at most [`RETRIES_MAX`] times.
    async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(LedgerServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut target = self.inner.clone();
        let mut backoff = RETRY_BACKOFF_START;
        let mut tries = 0;
        loop {
            match call(target.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == Code::Unavailable && tries < RETRIES_MAX => {
                    tries += 1;
                    match leader_hint(&status).and_then(|address| self.channel_to(&address)) {
                        Some(leader) => target = leader,
                        None => {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// A client of the node at `address` (kept for the next hint; connecting on first use).
    fn channel_to(&self, address: &str) -> Option<LedgerServiceClient<Channel>> {
        let mut leaders = self
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, client)) = leaders.iter().find(|(a, _)| a == address) {
            return Some(client.clone());
        }
        let endpoint = Endpoint::from_shared(uri_of(address))
            .ok()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let client = LedgerServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        if leaders.len() >= LEADERS_CACHED_MAX {
            leaders.remove(0);
        }
        leaders.push((address.to_string(), client.clone()));
        Some(client)
    }
}

/// The leader's client address a `NOT_LEADER` answer names (`google.rpc.ErrorInfo`, domain
/// `ledger`, metadata `leader_address`), if it names one.
pub fn leader_hint(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details.error_info()?;
    (info.domain == "ledger" && info.reason == "NOT_LEADER")
        .then(|| info.metadata.get("leader_address").cloned())
        .flatten()
}

/// The innermost cause of an error ("Connection refused (os error 111)" rather than tonic's
/// "transport error").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The stable name of a rejection reason number, e.g. `exceeds_credits`.
pub fn reason_name(reason: i32) -> String {
    pb::RejectionReason::try_from(reason)
        .map(|r| r.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("reason_{reason}"))
}
