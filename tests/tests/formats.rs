//! Records an earlier build wrote are read back by this one (`ledger_shard::codec`: each record
//! carries its layout's format number).
//!
//! The fixture holds every kind of record a shard writes, as a build whose coordinator records
//! were at format 1 encoded them (decision as `Option<bool>`). postcard is not
//! self-describing: read with today's layout, that build's "commit" decodes as "abort". The
//! test opens a data directory holding those records, reads each kind back, then restarts the
//! shards on them and lets the interrupted two-phase commits finish: the decided one must
//! commit, the undecided one must abort (presumed abort).

use std::sync::Arc;

use ledger_domain::{HoldState, Rejection, ShardId};
use ledger_shard::engine::Locate;
use ledger_shard::protocol::Decision;
use ledger_shard::sim::Sim;
use ledger_shard::{Options, read, runtime};
use ledger_store::{Embedded, Memory, Store, WriteBatch};

const S0: ShardId = ShardId(0);
const S1: ShardId = ShardId(1);

/// The fixture's records by shard.
fn fixture() -> Vec<WriteBatch> {
    let text = include_str!("../fixtures/records-format1.txt");
    let mut batches = vec![WriteBatch::default(), WriteBatch::default()];
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let [shard, key, value] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("bad fixture line {line:?}")
        };
        batches[shard.parse::<usize>().unwrap()].put(unhex(key), unhex(value));
    }
    batches
}

fn locate() -> Locate {
    Arc::new(|id: &str| Some(if id.starts_with("s1") { S1 } else { S0 }))
}

fn balances(store: &dyn Store, shard: ShardId, id: &str) -> (u64, u64, u64, u64, u64) {
    let a = read::account(store, shard, id).unwrap().unwrap();
    let b = a.balances;
    (
        b.debits_pending,
        b.debits_posted,
        b.credits_pending,
        b.credits_posted,
        a.version,
    )
}

#[test]
fn a_data_directory_of_an_earlier_format_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = |shard: u32| dir.path().join(format!("shard-{shard:04}.redb"));
    for (shard, batch) in fixture().into_iter().enumerate() {
        Embedded::open(&path(shard as u32))
            .unwrap()
            .commit(&batch)
            .unwrap();
    }
    let s0 = Embedded::open(&path(0)).unwrap();
    let s1 = Embedded::open(&path(1)).unwrap();

    // Accounts, with the holds, the cross-shard debits and x3's prepared leg counted.
    assert_eq!(balances(&s0, S0, "a"), (5, 23, 0, 0, 6));
    assert_eq!(balances(&s0, S0, "b"), (0, 0, 5, 11, 4));
    assert_eq!(balances(&s1, S1, "s1-c"), (0, 0, 0, 9, 1));
    // Transfer records: committed, refused, a hold and its post.
    let (t1, _) = read::transfer(&s0, S0, "t1").unwrap().unwrap();
    assert_eq!(t1.result.unwrap().amount, 7);
    let (t2, _) = read::transfer(&s0, S0, "t2").unwrap().unwrap();
    assert_eq!(t2.result, Err(Rejection::CreditAccountNotFound));
    let (_, h1) = read::transfer(&s0, S0, "h1").unwrap().unwrap();
    let h1 = h1.expect("a committed hold has a status");
    assert_eq!((h1.state, h1.amount), (HoldState::Pending, 5));
    assert!(h1.expires_at_ms.is_some());
    assert_eq!(
        read::hold(&s0, S0, "h2").unwrap().unwrap().state,
        HoldState::Posted
    );
    // Statements.
    let entries = read::entries(&s0, S0, "a", 1, 100).unwrap();
    let ids: Vec<_> = entries.iter().map(|e| e.transfer_id.as_str()).collect();
    assert_eq!(ids, ["t1", "h1", "h2", "p2", "x1", "x2"]);
    // What a new leader loads: x2 decided commit (format 1 said `Some(true)`), x3 undecided,
    // each shard holding the other's prepared leg.
    let r0 = runtime::load(&s0, S0).unwrap();
    let r1 = runtime::load(&s1, S1).unwrap();
    let decisions = |r: &ledger_shard::engine::Recovered| -> Vec<(String, Option<Decision>)> {
        r.coordinations
            .iter()
            .map(|c| (c.attempt.op.clone(), c.decision))
            .collect()
    };
    assert_eq!(decisions(&r0), [("x2".to_string(), Some(Decision::Commit))]);
    assert_eq!(decisions(&r1), [("x3".to_string(), None)]);
    assert_eq!(r0.prepared.len(), 1);
    assert_eq!(r0.prepared[0].leg.transfer_id, "x3");
    assert_eq!(r1.prepared[0].leg.transfer_id, "x2");
    assert_eq!(r0.holds.len(), 2);
    assert_eq!(r0.accounts.len() + r1.accounts.len(), 4);

    // Restarted on these records, the shards finish what was in flight.
    let stores = fixture()
        .into_iter()
        .map(|batch| {
            let store = Memory::new();
            store.commit(&batch).unwrap();
            Arc::new(store)
        })
        .collect();
    let mut sim = Sim::with_stores(stores, locate(), Options::default());
    sim.now_ms += Options::default().prepare_timeout_ms;
    for _ in 0..4 {
        sim.tick_all();
        sim.deliver_grouped(10);
    }
    assert_eq!(
        balances(&*sim.stores[1], S1, "s1-c"),
        (0, 0, 0, 12, 2),
        "x2 committed"
    );
    assert_eq!(
        balances(&*sim.stores[0], S0, "b"),
        (0, 0, 5, 11, 4),
        "x3 aborted: nothing credited"
    );
    assert_eq!(balances(&*sim.stores[1], S1, "s1-d"), (0, 0, 0, 0, 0));
    for (shard, store) in sim.stores.iter().enumerate() {
        let in_flight = read::in_flight(&**store, ShardId(shard as u32)).unwrap();
        assert_eq!(in_flight, (0, 0), "shard {shard}: nothing left in flight");
    }
}
