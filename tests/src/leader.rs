//! One shard leader on the test's tokio runtime, over a store the test chooses, with two
//! accounts ("a" and "b", USD, no overdraft limits) to move money between.

use std::sync::Arc;

use ledger_domain::cluster::{ClusterMap, NodeInfo};
use ledger_domain::{NewAccount, ShardId};
use ledger_shard::engine::Reply;
use ledger_shard::leaders::Leaders;
use ledger_shard::node::Node;
use ledger_shard::runtime::ShardHandle;
use ledger_shard::{Options, SystemClock};
use ledger_store::Store;

/// Starts a one-shard node on `store` and opens accounts "a" and "b" on it.
pub async fn with_two_accounts(store: Arc<dyn Store>, options: Options) -> (Node, ShardHandle) {
    let me = NodeInfo {
        id: "test".into(),
        region: "local".into(),
        client_address: "127.0.0.1:0".into(),
        peer_address: String::new(),
    };
    let map = ClusterMap::single_node(1, 4, me).unwrap();
    let leaders = Arc::new(Leaders::new(&map, "test", false));
    let node = Node::start(
        "test",
        map,
        vec![(ShardId(0), store)],
        options,
        Arc::new(SystemClock),
        None,
        leaders,
    )
    .unwrap();
    let shard = node.handle(ShardId(0)).expect("led here").clone();
    for id in ["a", "b"] {
        let account = NewAccount {
            id: id.into(),
            ledger: "USD".into(),
            placement_key: id.into(),
            ..Default::default()
        };
        assert!(matches!(
            shard.create_account(account).await.unwrap(),
            Reply::Account(Ok(_))
        ));
    }
    (node, shard)
}
