//! The one mapping from request errors to gRPC status. Business rejections are not here: they
//! are per-item results.
//!
//! | error | status | a client should |
//! |---|---|---|
//! | `Invalid` | `INVALID_ARGUMENT`, naming the field | fix the request; nothing changed |
//! | `NotFound` | `NOT_FOUND` | not retry |
//! | `Unavailable` | `UNAVAILABLE` | retry later, with the same transfer ids |
//! | `NotLeader` | `UNAVAILABLE` + `google.rpc.ErrorInfo` `NOT_LEADER` (shard, leader node and address) | retry at the leader, with the same transfer ids |
//! | `Internal` | `INTERNAL` | report it; retrying with the same ids is safe |

use std::collections::HashMap;

use ledger_domain::InvalidInput;
use ledger_shard::runtime::{LeaderHint, ShardError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo` domain of this service's errors.
pub const ERROR_DOMAIN: &str = "ledger";
/// `ErrorInfo.reason` of a call sent to a node that does not lead the shard.
pub const NOT_LEADER: &str = "NOT_LEADER";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Malformed input: names the field. Nothing was changed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// What the call names does not exist.
    #[error("{what} {id:?} does not exist")]
    NotFound { what: &'static str, id: String },
    /// A shard leader is changing or the node is stopping. Retry (same transfer ids).
    #[error(transparent)]
    Unavailable(ShardError),
    /// This node does not lead the shard the call needs; the hint names the leader if known.
    #[error("{}", ShardError::NotLeader { shard: ledger_domain::ShardId(*shard), leader: leader.clone() })]
    NotLeader {
        shard: u32,
        leader: Option<LeaderHint>,
    },
    /// A bug or a failure of this node (a store that cannot be read, say).
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::Unavailable(_) | ApiError::NotLeader { .. } => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        if let ApiError::NotLeader { shard, leader } = &e {
            let mut metadata = HashMap::from([("shard".to_string(), shard.to_string())]);
            if let Some(leader) = leader {
                metadata.insert("leader_node".into(), leader.node.clone());
                metadata.insert("leader_address".into(), leader.address.clone());
            }
            let details = ErrorDetails::with_error_info(NOT_LEADER, ERROR_DOMAIN, metadata);
            return Status::with_error_details(code, e.to_string(), details);
        }
        Status::new(code, e.to_string())
    }
}

impl From<ShardError> for ApiError {
    fn from(e: ShardError) -> Self {
        match e {
            ShardError::NotLeader { shard, leader } => ApiError::NotLeader {
                shard: shard.0,
                leader,
            },
            other => ApiError::Unavailable(other),
        }
    }
}

impl From<ledger_shard::ReadError> for ApiError {
    fn from(e: ledger_shard::ReadError) -> Self {
        ApiError::Internal(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that reaches a node which does not lead the shard gets `UNAVAILABLE` with the
    /// leader in `google.rpc.ErrorInfo`, so a client can go there (and retry with the same ids).
    #[test]
    fn not_leader_is_unavailable_with_the_leader_in_the_details() {
        let leader = LeaderHint {
            node: "eu-2".into(),
            address: "10.0.0.2:50051".into(),
        };
        let e: ApiError = ShardError::NotLeader {
            shard: ledger_domain::ShardId(7),
            leader: Some(leader),
        }
        .into();
        let status = Status::from(e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("eu-2"), "{}", status.message());
        let details = status.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (NOT_LEADER, ERROR_DOMAIN)
        );
        assert_eq!(info.metadata["shard"], "7");
        assert_eq!(info.metadata["leader_node"], "eu-2");
        assert_eq!(info.metadata["leader_address"], "10.0.0.2:50051");

        let unknown: ApiError = ShardError::NotLeader {
            shard: ledger_domain::ShardId(3),
            leader: None,
        }
        .into();
        let status = Status::from(unknown);
        let details = status.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.metadata.get("leader_node"), None);

        let busy = Status::from(ApiError::from(ShardError::Unavailable(
            ledger_domain::ShardId(1),
        )));
        assert_eq!(busy.code(), Code::Unavailable);
        assert!(busy.get_error_details().error_info().is_none());
    }
}
