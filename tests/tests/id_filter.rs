//! The transfer-id filter under real concurrency: a shard leader on the tokio runtime grows
//! its filter several times while callers keep recording new ids and retrying old ones, and
//! each bigger filter is filled by a scan on the blocking pool that races with those commits.
//! A filter that lost an id would let a retry of it be applied a second time; this test would
//! see that both in the retry's answer and in the balances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ledger_domain::{ShardId, Transfer, TransferRecord};
use ledger_shard::engine::Reply;
use ledger_shard::{Options, keys, read};
use ledger_store::{CommitError, Error, Memory, Pairs, Store, WriteBatch};

/// A store whose scans of the transfer records (the filter's fill) take a while after reading
/// their page, so commits land meanwhile, and which counts the fills that saw commits land.
#[derive(Default)]
struct SlowFill {
    inner: Memory,
    commits: AtomicU64,
    fill_pages: AtomicU64,
    pages_raced: AtomicU64,
}

impl Store for SlowFill {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.get(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, Error> {
        let page = self.inner.scan(start, end, limit)?;
        if end == keys::transfers(ShardId(0)).1.as_slice() {
            let before = self.commits.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            self.fill_pages.fetch_add(1, Ordering::SeqCst);
            if self.commits.load(Ordering::SeqCst) > before {
                self.pages_raced.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(page)
    }
    fn commit(&self, batch: &WriteBatch) -> Result<(), CommitError> {
        std::thread::sleep(Duration::from_micros(300));
        self.inner.commit(batch)?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "slow-fill-memory"
    }
}

fn transfer(id: &str, amount: u64) -> Transfer {
    Transfer {
        id: id.into(),
        debit_account_id: "a".into(),
        credit_account_id: "b".into(),
        amount,
        ledger: "USD".into(),
        ..Transfer::default()
    }
}

fn record(reply: Reply) -> TransferRecord {
    match reply {
        Reply::Transfer(r) => r.record,
        other => panic!("not a transfer reply: {other:?}"),
    }
}

/// With fills paged through `scan` (the default `for_each_key`), each page slowed so that
/// commits land while it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_answered_from_the_record_while_bigger_filters_fill() {
    let store = Arc::new(SlowFill::default());
    record_and_retry(store.clone() as Arc<dyn Store>).await;
    // The race this test is about did happen: pages of fills during which commits landed.
    let raced = store.pages_raced.load(Ordering::SeqCst);
    let pages = store.fill_pages.load(Ordering::SeqCst);
    assert!(
        pages >= 3 && raced >= 2,
        "fills read {pages} pages, {raced} of them with commits landing meanwhile"
    );
}

/// The same against the embedded store, whose fills take one cut under its lock (the keys in
/// memory) and read the rest from a redb snapshot while commits go on; small overlays make
/// checkpoints frequent, so fills find keys in all three places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_answered_from_the_record_while_bigger_filters_fill_in_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ledger_store::Limits {
        overlay_bytes: 64 << 10,
        ..ledger_store::Limits::default()
    };
    let store = ledger_store::open_shards(dir.path(), 1, limits, Some(keys::entry_group))
        .unwrap()
        .pop()
        .unwrap();
    record_and_retry(Arc::new(store)).await;
}

/// Records 2 400 transfers from 8 callers, each also retrying ids it recorded earlier, through
/// a leader whose filter starts at 64 bytes (room for 42 ids), so it is rebuilt and refilled
/// several times meanwhile; then retries every id once more. Every retry must get its
/// original record back, and the balances must count each transfer once.
async fn record_and_retry(store: Arc<dyn Store>) {
    let options = Options {
        transfer_filter_initial_bytes: 64,
        transfer_filter_bytes: 64 << 10,
        ..Options::default()
    };
    let (node, shard) = ledger_tests::leader::with_two_accounts(Arc::clone(&store), options).await;

    const WORKERS: u64 = 8;
    const PER_WORKER: u64 = 300;
    let workers = (0..WORKERS).map(|w| {
        let shard = shard.clone();
        tokio::spawn(async move {
            let mut recorded: Vec<(String, u64, TransferRecord)> = Vec::new();
            for i in 0..PER_WORKER {
                let id = format!("w{w}-{i}");
                let amount = 1 + (i % 7);
                let first = record(shard.create_transfer(transfer(&id, amount)).await.unwrap());
                assert!(first.result.is_ok(), "{id}: {first:?}");
                recorded.push((id, amount, first));
                // Every third call also retries an id recorded earlier (one of the last few,
                // which the newest filter may hold only through the leader's own inserts).
                if i % 3 == 2 {
                    let (old, amount, original) = &recorded[(i as usize * 7) % recorded.len()];
                    let again =
                        record(shard.create_transfer(transfer(old, *amount)).await.unwrap());
                    assert_eq!(
                        &again, original,
                        "retry of {old} was not answered from its record"
                    );
                }
            }
            recorded
        })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker.unwrap());
    }
    // Once more, every id, after the last filter has filled.
    for (id, amount, original) in &all {
        let again = record(shard.create_transfer(transfer(id, *amount)).await.unwrap());
        assert_eq!(
            &again, original,
            "retry of {id} was not answered from its record"
        );
    }

    let acknowledged: u64 = all.iter().map(|(_, amount, _)| amount).sum();
    let a = read::account(&*store, ShardId(0), "a").unwrap().unwrap();
    let b = read::account(&*store, ShardId(0), "b").unwrap().unwrap();
    assert_eq!(
        a.balances.debits_posted, acknowledged,
        "applied more than once"
    );
    assert_eq!(b.balances.credits_posted, acknowledged);
    assert_eq!(a.version, WORKERS * PER_WORKER, "one change per transfer");
    node.shutdown().await;
}

/// The leader writes how many transfer ids its shard has recorded with each lease renewal
/// (`keys::id_count`), for the next term's first filter; a restart reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_keeps_a_count_of_recorded_ids_for_the_next_term() {
    let store: Arc<dyn Store> = Arc::new(Memory::default());
    let options = Options {
        // Renewed every 100 ms.
        lease_ms: 300,
        ..Options::default()
    };
    let (node, shard) = ledger_tests::leader::with_two_accounts(Arc::clone(&store), options).await;
    for i in 0..250 {
        let r = record(
            shard
                .create_transfer(transfer(&format!("t{i}"), 1))
                .await
                .unwrap(),
        );
        assert!(r.result.is_ok());
    }
    let count = || {
        store
            .get(&keys::id_count(ShardId(0)))
            .unwrap()
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    // Renewals come with the leader's ticks: wait for one after the last transfer (10 s at most).
    for _ in 0..500 {
        if count().is_some_and(|n| n >= 250) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(count().is_some_and(|n| n >= 250), "count {:?}", count());
    node.shutdown().await;
    let recovered = ledger_shard::runtime::load(&*store, ShardId(0)).unwrap();
    assert_eq!(Some(recovered.ids_recorded), count());
}
