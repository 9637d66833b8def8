//! The one mapping from request errors to gRPC status. Business rejections are not here: they
//! are per-item results.

use ledger_domain::InvalidInput;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: names the field. Nothing was changed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    NotFound(String),
    /// A shard leader is changing or the node is stopping. Retry (same transfer ids).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<ledger_shard::runtime::ShardError> for ApiError {
    fn from(e: ledger_shard::runtime::ShardError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<ledger_shard::ReadError> for ApiError {
    fn from(e: ledger_shard::ReadError) -> Self {
        ApiError::Internal(e.to_string())
    }
}
