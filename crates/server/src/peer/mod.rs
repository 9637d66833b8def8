//! The node-to-node API: its calling side ([`PeerClients`]), its answering side ([`PeerApi`]),
//! and the gate: every `ledger.internal.v1` call names its caller and the map
//! version it was made under, and is refused unless the caller is a node of this node's map
//! and the versions agree (docs/design/0002-cluster.md, Transport). A refusal names both
//! sides, so an operator sees which node holds which map.

mod client;
mod service;
#[cfg(test)]
mod transport_tests;

pub use client::PeerClients;
pub use service::PeerApi;

use ledger_domain::cluster::ClusterMap;
use ledger_proto::ledger::internal::v1 as pb;
use tonic::Status;

/// Why an internal call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// The call names no caller.
    #[error("an internal call must name its caller (node id and map version)")]
    Missing,
    /// The caller is not a node of this node's map.
    #[error("node {caller:?} is not in the cluster map of node {local:?} (map version {version})")]
    UnknownNode {
        caller: String,
        local: String,
        version: u64,
    },
    /// The caller holds another version of the map.
    #[error(
        "map versions differ: node {caller:?} called with map version {caller_version}, node {local:?} holds version {local_version}"
    )]
    VersionMismatch {
        caller: String,
        caller_version: u64,
        local: String,
        local_version: u64,
    },
}

impl From<CallerError> for Status {
    fn from(e: CallerError) -> Status {
        Status::failed_precondition(e.to_string())
    }
}

/// Checks the caller of an internal call against this node's map.
pub fn check_caller(
    map: &ClusterMap,
    local: &str,
    caller: Option<&pb::Caller>,
) -> Result<(), CallerError> {
    let caller = caller.ok_or(CallerError::Missing)?;
    if map.node(&caller.node_id).is_none() {
        return Err(CallerError::UnknownNode {
            caller: caller.node_id.clone(),
            local: local.to_string(),
            version: map.version,
        });
    }
    if caller.map_version != map.version {
        return Err(CallerError::VersionMismatch {
            caller: caller.node_id.clone(),
            caller_version: caller.map_version,
            local: local.to_string(),
            local_version: map.version,
        });
    }
    Ok(())
}

/// What this node puts on its own internal calls.
pub fn caller_of(map: &ClusterMap, local: &str) -> pb::Caller {
    pb::Caller {
        node_id: local.to_string(),
        map_version: map.version,
    }
}

#[cfg(test)]
mod tests {
    use ledger_domain::cluster::NodeInfo;

    use super::*;

    fn map(version: u64) -> ClusterMap {
        let node = |id: &str, port: u16| NodeInfo {
            id: id.into(),
            region: "eu".into(),
            client_address: format!("127.0.0.1:{port}"),
            peer_address: format!("127.0.0.1:{}", port + 1000),
        };
        let mut map = ClusterMap::single_node(4, 64, node("eu-1", 50051)).unwrap();
        map.nodes.push(node("eu-2", 50052));
        map.version = version;
        map
    }

    #[test]
    fn a_call_under_the_same_map_from_a_known_node_passes() {
        let map = map(7);
        let caller = caller_of(&map, "eu-2");
        assert_eq!(check_caller(&map, "eu-1", Some(&caller)), Ok(()));
    }

    /// Each refusal names both nodes (and both versions), and is `FAILED_PRECONDITION`.
    #[test]
    fn mismatched_versions_and_unknown_callers_are_refused_naming_both() {
        let local = map(7);
        let stale = caller_of(&map(6), "eu-2");
        let err = check_caller(&local, "eu-1", Some(&stale)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "map versions differ: node \"eu-2\" called with map version 6, node \"eu-1\" holds version 7"
        );
        assert_eq!(Status::from(err).code(), tonic::Code::FailedPrecondition);

        let stranger = pb::Caller {
            node_id: "us-9".into(),
            map_version: 7,
        };
        let err = check_caller(&local, "eu-1", Some(&stranger)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"us-9\" is not in the cluster map of node \"eu-1\" (map version 7)"
        );
        assert_eq!(
            check_caller(&local, "eu-1", None),
            Err(CallerError::Missing)
        );
    }
}
