//! A deposed leader sends nothing from a batch that has nothing to commit.
//!
//! The story: the simulation (a region with a shared store, where another node may take a
//! shard over) woke a deposed leader to copies of messages on their way to its shard. Its
//! batch wrote nothing, so no commit was there to be fenced by its old epoch, and it answered
//! from its memory: as a participant it acknowledged a decision for an attempt that only the
//! new leader had prepared (so the coordinator forgot the attempt, and answered the new
//! leader's query with a presumed abort: the credit was released while the debit stood); as a
//! coordinator it presumed abort for an attempt the new leader had decided to commit. Every
//! such answer broke I6 and the ledger's balances. A leader now checks that it still holds the
//! lease before it sends what a batch without writes says (`runtime::lease::holds`), and
//! steps down if it does not.
//!
//! Here a real shard runtime answers a query for an attempt it never heard of (a presumed
//! abort, sent to the other node's shard) while it holds the lease; once another node has
//! taken the lease, the same query gets no answer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ledger_domain::ShardId;
use ledger_domain::cluster::{ClusterFile, NodeEntry, RegionEntry, ShardEntry};
use ledger_shard::directory::Located;
use ledger_shard::leaders::Leaders;
use ledger_shard::node::{Node, Remote};
use ledger_shard::protocol::{Attempt, Decision, Message};
use ledger_shard::runtime::{BoxFuture, acquire_lease};
use ledger_shard::{Options, SystemClock};
use ledger_store::{Memory, Store};

/// The other node: records what it is sent.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<(ShardId, ShardId, Message)>>,
}

impl Remote for Recorder {
    fn send(&self, to: ShardId, from: ShardId, message: Message) {
        self.sent.lock().unwrap().push((to, from, message));
    }

    fn locate(&self, _directory: ShardId, _id: String) -> BoxFuture<Option<Located>> {
        Box::pin(async { None })
    }
}

fn two_nodes() -> ledger_domain::cluster::ClusterMap {
    let node = |id: &str, port: u16| NodeEntry {
        id: id.into(),
        region: "eu".into(),
        client_address: format!("127.0.0.1:{port}"),
        peer_address: format!("127.0.0.1:{}", port + 1),
    };
    ClusterFile {
        version: 1,
        shards: 2,
        vnodes_per_shard: 4,
        regions: vec![RegionEntry { name: "eu".into() }],
        nodes: vec![node("here", 1000), node("there", 2000)],
        shard_entries: vec![
            ShardEntry {
                ids: "0".into(),
                region: "eu".into(),
                owner: "here".into(),
            },
            ShardEntry {
                ids: "1".into(),
                region: "eu".into(),
                owner: "there".into(),
            },
        ],
    }
    .check()
    .unwrap()
}

/// A participant's query for an attempt shard 0 never coordinated.
fn query(seq: u64) -> Message {
    Message::QueryDecision {
        attempt: Attempt {
            op: format!("unknown-{seq}"),
            epoch: 1,
            seq,
        },
    }
}

/// Decisions sent to shard 1 once there are `at_least`, or after a second.
async fn decisions_sent(remote: &Recorder, at_least: usize) -> usize {
    let count = || {
        remote
            .sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(to, _, m)| *to == ShardId(1) && matches!(m, Message::Decide { .. }))
            .count()
    };
    for _ in 0..100 {
        if count() >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    count()
}

#[tokio::test]
async fn a_deposed_leader_answers_nothing_from_a_batch_without_writes() {
    let store = Arc::new(Memory::new());
    let remote = Arc::new(Recorder::default());
    let map = two_nodes();
    let leaders = Arc::new(Leaders::new(&map, "here", false));
    let node = Node::start(
        "here",
        map,
        vec![(ShardId(0), store.clone() as Arc<dyn Store>)],
        Options::default(),
        Arc::new(SystemClock),
        Some(remote.clone() as Arc<dyn Remote>),
        leaders,
    )
    .unwrap();
    let shard = node.handle(ShardId(0)).expect("led here").clone();

    // While it leads: a presumed abort goes out.
    shard.deliver(ShardId(1), query(1));
    assert_eq!(
        decisions_sent(&remote, 1).await,
        1,
        "no presumed abort sent"
    );
    let sent = remote.sent.lock().unwrap().clone();
    assert!(matches!(
        &sent[0].2,
        Message::Decide {
            decision: Decision::Abort,
            ..
        }
    ));

    // Another node takes the lease (as if this one had been paused past it).
    let far_future = u64::MAX / 2;
    acquire_lease(&*store, ShardId(0), "there", far_future, 10_000).expect("take over");

    // The same kind of query now gets no answer: the leader finds the lease gone and steps
    // down instead of answering from its memory.
    shard.deliver(ShardId(1), query(2));
    assert_eq!(
        decisions_sent(&remote, 2).await,
        1,
        "a deposed leader answered from its memory: {:?}",
        remote.sent.lock().unwrap()
    );
    node.shutdown().await;
}
