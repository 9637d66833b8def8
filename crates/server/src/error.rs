//! The one mapping from request errors to gRPC status. Business rejections are not here: they
//! are per-item results.
//!
//! | error | status | a client should |
//! |---|---|---|
//! | `Invalid` | `INVALID_ARGUMENT`; `BadRequest` names the field; reason `INVALID_REQUEST` | fix the request; nothing changed |
//! | `NotFound` | `NOT_FOUND`; reason `NOT_FOUND` (kind, id) | not retry |
//! | `Unavailable` | `UNAVAILABLE`; reason `SHARD_UNAVAILABLE` (shard) | retry later, with the same transfer ids |
//! | `NotLeader` | `UNAVAILABLE`; reason `NOT_LEADER` (shard, leader node and address) | retry at the leader, with the same transfer ids |
//! | `Precondition` | `FAILED_PRECONDITION`; reason `FAILED_PRECONDITION` | change what the message names first (an operator's command) |
//! | `Internal` | `INTERNAL`; reason `INTERNAL` | report it; retrying with the same ids is safe |
//!
//! Every status carries a `google.rpc.ErrorInfo` (domain `ledger`) with the reason, so a
//! program branches on it rather than on the message.

use std::collections::HashMap;

use ledger_domain::InvalidInput;
use ledger_shard::runtime::{LeaderHint, ShardError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo` domain of this service's errors.
pub const ERROR_DOMAIN: &str = "ledger";
// `google.rpc.ErrorInfo.reason` of each kind of whole-request error; stable.
/// The request is malformed (a `BadRequest` detail names the field); nothing changed.
pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
/// What the call names does not exist (metadata `kind`, `id`).
pub const NOT_FOUND: &str = "NOT_FOUND";
/// A shard is unavailable for now (metadata `shard`): retry with the same transfer ids.
pub const UNAVAILABLE: &str = "SHARD_UNAVAILABLE";
/// The node does not lead the shard (metadata `shard`, and `leader_node` and `leader_address`
/// when known).
pub const NOT_LEADER: &str = "NOT_LEADER";
/// A failure of the node.
pub const INTERNAL: &str = "INTERNAL";
/// The state of what the call names does not allow it now (an operator's command).
pub const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";

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
    /// Another node the call needs did not answer (down, partitioned, or too slow): nothing
    /// was applied there for this call. Retry (same transfer ids).
    #[error("node {node} did not answer: {reason}; retry with the same ids")]
    NodeUnavailable { node: String, reason: String },
    /// Another node refused what this node forwarded to it: its answer, passed on as it is.
    #[error("node {node}: {}", status.message())]
    Peer { node: String, status: Status },
    /// What the call names is not in a state that allows it (an allowance whose change waits
    /// for its region, an account that cannot cover a grant): nothing changed.
    #[error("{0}")]
    Precondition(String),
    /// A bug or a failure of this node (a store that cannot be read, say).
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// The stable `google.rpc.ErrorInfo` reason of this error (programs branch on it; the
    /// message is for people).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => INVALID_REQUEST,
            ApiError::NotFound { .. } => NOT_FOUND,
            ApiError::Unavailable(_) | ApiError::NodeUnavailable { .. } => UNAVAILABLE,
            ApiError::NotLeader { .. } => NOT_LEADER,
            ApiError::Precondition(_) => FAILED_PRECONDITION,
            ApiError::Peer { .. } | ApiError::Internal(_) => INTERNAL,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        if let ApiError::Peer { status, .. } = e {
            // The owner's answer, details and all (a NOT_LEADER hint, a field named).
            return status;
        }
        let code = match &e {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::Unavailable(_)
            | ApiError::NotLeader { .. }
            | ApiError::NodeUnavailable { .. } => Code::Unavailable,
            ApiError::Precondition(_) => Code::FailedPrecondition,
            ApiError::Peer { .. } | ApiError::Internal(_) => Code::Internal,
        };
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        match &e {
            ApiError::Invalid(invalid) => {
                details.add_bad_request_violation(invalid.field.clone(), invalid.reason.clone());
                metadata.insert("field".to_string(), invalid.field.clone());
            }
            ApiError::NotFound { what, id } => {
                metadata.insert("kind".to_string(), (*what).to_string());
                metadata.insert("id".to_string(), id.clone());
            }
            ApiError::Unavailable(ShardError::Unavailable(shard)) => {
                metadata.insert("shard".to_string(), shard.0.to_string());
            }
            ApiError::NotLeader { shard, leader } => {
                metadata.insert("shard".to_string(), shard.to_string());
                if let Some(leader) = leader {
                    metadata.insert("leader_node".into(), leader.node.clone());
                    metadata.insert("leader_address".into(), leader.address.clone());
                }
            }
            ApiError::NodeUnavailable { node, .. } => {
                metadata.insert("node".to_string(), node.clone());
            }
            ApiError::Unavailable(_)
            | ApiError::Precondition(_)
            | ApiError::Peer { .. }
            | ApiError::Internal(_) => {}
        }
        details.set_error_info(e.reason(), ERROR_DOMAIN, metadata);
        Status::with_error_details(code, e.to_string(), details)
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
        let details = busy.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.metadata["shard"].as_str()),
            (UNAVAILABLE, "1")
        );
    }

    /// A malformed request names the field twice over: in a `BadRequest` violation and in the
    /// `ErrorInfo` metadata, with the stable reason `INVALID_REQUEST`.
    #[test]
    fn invalid_input_carries_the_field_in_bad_request_details() {
        let e = ApiError::from(InvalidInput::new("transfers[3].amount", "must be > 0"));
        let status = Status::from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "transfers[3].amount");
        assert_eq!(violations[0].description, "must be > 0");
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, INVALID_REQUEST);
        assert_eq!(info.domain, ERROR_DOMAIN);

        let missing = Status::from(ApiError::NotFound {
            what: "account",
            id: "ghost".into(),
        });
        let details = missing.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, NOT_FOUND);
        assert_eq!(info.metadata["id"], "ghost");
    }
}
