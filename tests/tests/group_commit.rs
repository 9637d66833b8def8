//! Group commit: concurrent transfers to one shard share durable commits, and none is
//! acknowledged before the commit that carries it has returned.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ledger_domain::{ShardId, Transfer};
use ledger_shard::Options;
use ledger_shard::engine::Reply;
use ledger_store::{CommitError, Error, Memory, Pairs, Store, WriteBatch};

/// A store whose commits take a while (like an fsync) and are counted.
#[derive(Default)]
struct SlowCounted {
    inner: Memory,
    commits: AtomicU64,
    committed_transfers: AtomicU64,
}

impl Store for SlowCounted {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error> {
        self.inner.scan(start, end, limit)
    }
    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        std::thread::sleep(Duration::from_millis(3));
        self.inner.commit(batch)?;
        // Transfer records carry key kind 0x04 after the 5-byte shard prefix.
        let transfers = batch
            .writes
            .iter()
            .filter(|w| matches!(w, ledger_store::Write::Put(k, _) if k.get(5) == Some(&0x04)))
            .count();
        self.committed_transfers
            .fetch_add(transfers as u64, Ordering::SeqCst);
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "slow-memory"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_small_calls_share_commits() {
    let store = Arc::new(SlowCounted::default());
    let (node, shard) = ledger_tests::leader::with_two_accounts(
        store.clone() as Arc<dyn Store>,
        Options::default(),
    )
    .await;
    let before = store.commits.load(Ordering::SeqCst);
    const N: u64 = 400;
    let calls = (0..N).map(|i| {
        let shard = shard.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let t = Transfer {
                id: format!("t{i}"),
                debit_account_id: "a".into(),
                credit_account_id: "b".into(),
                amount: 1,
                ledger: "USD".into(),
                ..Transfer::default()
            };
            let id = t.id.clone();
            let reply = shard.create_transfer(t).await.unwrap();
            assert!(matches!(reply, Reply::Transfer(r) if r.record.result.is_ok()));
            // Acknowledged only once the commit that carried it has returned.
            let key = ledger_shard::keys::transfer(ShardId(0), &id);
            assert!(
                store.inner.get(&key).unwrap().is_some(),
                "{id} acknowledged before durable"
            );
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap();
    }
    let commits = store.commits.load(Ordering::SeqCst) - before;
    assert_eq!(store.committed_transfers.load(Ordering::SeqCst), N);
    assert!(
        commits * 4 <= N,
        "{N} transfers took {commits} commits: not grouped"
    );
    node.shutdown().await;
}
