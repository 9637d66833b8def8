//! One shard leader on the test's tokio runtime, over a store the test chooses, with two
//! accounts ("a" and "b", USD, no overdraft limits) to move money between.

use std::sync::Arc;

use ledger_domain::{NewAccount, Placement, ShardId};
use ledger_shard::engine::Reply;
use ledger_shard::node::Node;
use ledger_shard::runtime::ShardHandle;
use ledger_shard::{Options, SystemClock};
use ledger_store::Store;

/// Starts a one-shard node on `store` and opens accounts "a" and "b" on it.
pub async fn with_two_accounts(store: Arc<dyn Store>, options: Options) -> (Node, ShardHandle) {
    let node = Node::start(
        "test",
        Placement::new(1, 4),
        vec![store],
        options,
        Arc::new(SystemClock),
    )
    .unwrap();
    let shard = node.handle(ShardId(0)).clone();
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
