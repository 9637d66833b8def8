//! Engine unit tests: feed events, assert the exact writes, replies and messages.

use std::sync::Arc;

use ledger_domain::{
    AccountFlags, HoldState, NewAccount, Rejection, ShardId, Transfer, TransferKind,
};
use ledger_store::Store;

use super::reads::location_value;
use super::{Input, Read, Reply};
use crate::protocol::{Decision, Message};
use crate::sim::Sim;
use crate::{Options, keys, read};

const S0: ShardId = ShardId(0);
const S1: ShardId = ShardId(1);

/// Accounts whose id starts with `s1` live on shard 1, the rest on shard 0.
fn sim() -> Sim {
    sim_with(Options::default())
}

fn sim_with(options: Options) -> Sim {
    Sim::new(2, Arc::new(|id: &str| Some(shard_of(id))), options)
}

fn shard_of(id: &str) -> ShardId {
    if id.starts_with("s1") { S1 } else { S0 }
}

fn open(sim: &mut Sim, id: &str, no_overdraft: bool) {
    let token = sim.token();
    let account = NewAccount {
        id: id.into(),
        ledger: "USD".into(),
        placement_key: id.into(),
        flags: AccountFlags {
            debits_must_not_exceed_credits: no_overdraft,
            ..Default::default()
        },
        ..Default::default()
    };
    sim.batch(shard_of(id), vec![Input::CreateAccount { token, account }]);
    assert!(matches!(sim.replies[&token], Reply::Account(Ok(_))));
}

fn transfer(id: &str, debit: &str, credit: &str, amount: u64) -> Transfer {
    Transfer {
        id: id.into(),
        debit_account_id: debit.into(),
        credit_account_id: credit.into(),
        amount,
        ledger: "USD".into(),
        ..Transfer::default()
    }
}

/// Submits a transfer to its debit shard and returns the token.
fn submit(sim: &mut Sim, t: Transfer) -> u64 {
    let token = sim.token();
    let shard = shard_of(&t.debit_account_id);
    sim.batch(
        shard,
        vec![Input::CreateTransfer {
            token,
            transfer: t,
            trace: None,
        }],
    );
    token
}

fn outcome(sim: &Sim, token: u64) -> Option<Result<u64, Rejection>> {
    match sim.replies.get(&token)? {
        Reply::Transfer(r) => Some(r.outcome()),
        other => panic!("not a transfer reply: {other:?}"),
    }
}

fn balance(sim: &Sim, id: &str) -> (u64, u64, u64, u64, u64) {
    let shard = shard_of(id);
    let a = read::account(&*sim.stores[shard.0 as usize], shard, id)
        .unwrap()
        .unwrap();
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
fn single_shard_transfer_is_one_commit_without_messages() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let token = sim.token();
    let out = sim.batch(
        S0,
        vec![Input::CreateTransfer {
            token,
            transfer: transfer("t1", "a", "b", 7),
            trace: None,
        }],
    );
    assert!(out.messages.is_empty());
    // Two accounts, two entries, one transfer record; epoch + two account-version preconditions.
    assert_eq!(out.writes.writes.len(), 5);
    assert_eq!(out.writes.preconditions.len(), 3);
    assert_eq!(outcome(&sim, token), Some(Ok(7)));
    assert_eq!(balance(&sim, "a"), (0, 7, 0, 0, 1));
    assert_eq!(balance(&sim, "b"), (0, 0, 0, 7, 1));
}

#[test]
fn replay_returns_the_original_and_different_fields_are_rejected() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let first = submit(&mut sim, transfer("t1", "a", "b", 7));
    let again = submit(&mut sim, transfer("t1", "a", "b", 7));
    let other = submit(&mut sim, transfer("t1", "a", "b", 8));
    assert_eq!(outcome(&sim, first), Some(Ok(7)));
    assert_eq!(outcome(&sim, again), Some(Ok(7)));
    assert_eq!(
        outcome(&sim, other),
        Some(Err(Rejection::ExistsWithDifferentFields))
    );
    assert_eq!(balance(&sim, "a").1, 7, "applied once");
}

/// After a restart the leader's filter of recorded ids is filled from the store: retries of
/// ids recorded before the restart (applied or refused) must still find their outcomes, not be
/// taken for new ids and applied; new ids are applied.
#[test]
fn ids_recorded_before_a_restart_are_found_through_the_filled_filter() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    open(&mut sim, "poor", true);
    let ids: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    for id in &ids {
        submit(&mut sim, transfer(id, "a", "b", 2));
    }
    let refused = submit(&mut sim, transfer("refused", "poor", "b", 5));
    let reason = outcome(&sim, refused).unwrap().unwrap_err();
    sim.crash(S0);
    let filter = sim.engines[0].id_filter().expect("a filter by default");
    assert!(filter.is_complete());
    for id in &ids {
        let retry = submit(&mut sim, transfer(id, "a", "b", 2));
        assert_eq!(outcome(&sim, retry), Some(Ok(2)), "{id}");
    }
    let retry = submit(&mut sim, transfer("refused", "poor", "b", 5));
    assert_eq!(outcome(&sim, retry), Some(Err(reason)));
    assert_eq!(balance(&sim, "a").1, 100, "each applied once");
    let new = submit(&mut sim, transfer("t-new", "a", "b", 1));
    assert_eq!(outcome(&sim, new), Some(Ok(1)));
    assert_eq!(balance(&sim, "a").1, 101);
    // Recorded by this term, so in the filter: a retry in a later batch finds it too.
    let again = submit(&mut sim, transfer("t-new", "a", "b", 1));
    assert_eq!(outcome(&sim, again), Some(Ok(1)));
    assert_eq!(balance(&sim, "a").1, 101);
}

/// A filter past its design load is rebuilt bigger, filled from the store, and swapped in:
/// through every step, and after a restart that starts small again, retries of recorded ids
/// find their outcomes and nothing is applied twice.
#[test]
fn the_filter_grows_past_its_design_load_without_losing_an_id() {
    let options = Options {
        transfer_filter_initial_bytes: 64, // one block: 42 ids at the design load
        transfer_filter_bytes: 512,
        ..Options::default()
    };
    let mut sim = sim_with(options);
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let mut sizes = Vec::new();
    for i in 0..400 {
        let token = submit(&mut sim, transfer(&format!("t{i}"), "a", "b", 1));
        assert_eq!(outcome(&sim, token), Some(Ok(1)));
        // Every id so far, retried, keeps its outcome while filters are made and swapped.
        if i % 7 == 0 {
            for j in (0..=i).step_by(13) {
                let retry = submit(&mut sim, transfer(&format!("t{j}"), "a", "b", 1));
                assert_eq!(outcome(&sim, retry), Some(Ok(1)), "t{j} after t{i}");
            }
        }
        sizes.push(sim.engines[0].id_filter().unwrap().bytes());
    }
    assert_eq!(balance(&sim, "a").1, 400, "each applied once");
    sizes.dedup();
    // 64 -> 256 (room for twice 43 ids) -> 512 (the most; 341 ids at the design load, then full).
    assert_eq!(sizes, [64, 256, 512]);
    sim.crash(S0);
    assert_eq!(
        sim.engines[0].id_filter().unwrap().bytes(),
        64,
        "a new term starts small"
    );
    for i in 0..400 {
        let retry = submit(&mut sim, transfer(&format!("t{i}"), "a", "b", 1));
        assert_eq!(outcome(&sim, retry), Some(Ok(1)));
    }
    assert_eq!(
        balance(&sim, "a").1,
        400,
        "each applied once, after the restart too"
    );
    assert!(sim.engines[0].id_filter().unwrap().bytes() > 64);
}

/// A new term's first filter is made for the ids recorded as of the last lease renewal
/// (`keys::id_count`, which the runtime writes with it), so a restart fills one filter of the
/// right size instead of a small one and then a rebuilt one.
#[test]
fn a_new_term_sizes_its_first_filter_for_the_ids_recorded_before() {
    let options = Options {
        transfer_filter_initial_bytes: 64,
        transfer_filter_bytes: 1 << 20,
        ..Options::default()
    };
    let mut sim = sim_with(options);
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    for i in 0..300 {
        let token = submit(&mut sim, transfer(&format!("t{i}"), "a", "b", 1));
        assert_eq!(outcome(&sim, token), Some(Ok(1)));
    }
    let recorded = sim.engines[0].ids_recorded();
    assert!((300..600).contains(&recorded), "{recorded}");
    let mut batch = ledger_store::WriteBatch::default();
    batch.put(keys::id_count(S0), recorded.to_be_bytes().to_vec());
    sim.stores[0].commit(&batch).unwrap();
    sim.crash(S0);
    let filter = sim.engines[0].id_filter().unwrap();
    assert_eq!(filter.bytes(), super::id_filter::bytes_for(recorded));
    assert!(filter.design_capacity() >= 2 * recorded, "room to grow");
    assert_eq!(
        sim.engines[0].ids_recorded(),
        recorded,
        "never below the count it began from"
    );
    for i in (0..300).step_by(7) {
        let retry = submit(&mut sim, transfer(&format!("t{i}"), "a", "b", 1));
        assert_eq!(outcome(&sim, retry), Some(Ok(1)));
    }
    assert_eq!(balance(&sim, "a").1, 300, "each applied once");
    // A damaged count only loses the sizing: the term starts with the configured size.
    let mut batch = ledger_store::WriteBatch::default();
    batch.put(keys::id_count(S0), vec![1, 2, 3]);
    sim.stores[0].commit(&batch).unwrap();
    sim.crash(S0);
    assert_eq!(sim.engines[0].id_filter().unwrap().bytes(), 64);
    let retry = submit(&mut sim, transfer("t0", "a", "b", 1));
    assert_eq!(outcome(&sim, retry), Some(Ok(1)));
}

/// While a bigger filter is being filled the old one goes on answering, ids recorded
/// meanwhile go into both, and the bigger one is used only once complete.
#[test]
fn a_bigger_filter_is_used_only_once_filled() {
    let options = Options {
        transfer_filter_initial_bytes: 64,
        transfer_filter_bytes: 1 << 20,
        ..Options::default()
    };
    let mut sim = sim_with(options);
    sim.fill_later = true;
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let mut i = 0;
    while sim.unfilled.is_empty() {
        let token = submit(&mut sim, transfer(&format!("t{i}"), "a", "b", 1));
        assert_eq!(outcome(&sim, token), Some(Ok(1)));
        i += 1;
    }
    let bigger = Arc::clone(&sim.unfilled[0].1);
    assert!(!bigger.is_complete());
    // Recorded while the bigger one waits for its scan: both filters get them.
    for j in i..i + 20 {
        submit(&mut sim, transfer(&format!("t{j}"), "a", "b", 1));
    }
    assert_eq!(
        sim.engines[0].id_filter().unwrap().bytes(),
        64,
        "not swapped unfilled"
    );
    for j in (0..i + 20).step_by(3) {
        let retry = submit(&mut sim, transfer(&format!("t{j}"), "a", "b", 1));
        assert_eq!(outcome(&sim, retry), Some(Ok(1)), "t{j}");
    }
    assert!((i..i + 20).all(|j| bigger.may_contain(&format!("t{j}"))));
    sim.fill_filters();
    submit(&mut sim, transfer("after", "a", "b", 1));
    assert!(
        sim.engines[0].id_filter().unwrap().bytes() > 64,
        "swapped once filled"
    );
    for j in 0..i + 20 {
        let retry = submit(&mut sim, transfer(&format!("t{j}"), "a", "b", 1));
        assert_eq!(outcome(&sim, retry), Some(Ok(1)), "t{j}");
    }
    assert_eq!(balance(&sim, "a").1, i + 21, "each applied once");
}

#[test]
fn a_retry_under_another_trace_is_the_same_request_and_keeps_the_first_trace_id() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    for (id, credit) in [("same", "b"), ("cross", "s1-b")] {
        if credit != "b" {
            open(&mut sim, credit, false);
        }
        let mut first = transfer(id, "a", credit, 3);
        first.trace_id = "0af7651916cd43dd8448eb211c80319c".into();
        let mut retry = first.clone();
        retry.trace_id = "ffffffffffffffffffffffffffffffff".into();
        let t1 = submit(&mut sim, first);
        sim.deliver_all(100);
        let t2 = submit(&mut sim, retry);
        sim.deliver_all(100);
        for token in [t1, t2] {
            let Reply::Transfer(reply) = &sim.replies[&token] else {
                panic!("not a transfer reply")
            };
            assert_eq!(reply.outcome(), Ok(3), "{id}");
            assert_eq!(
                reply.record.request.trace_id, "0af7651916cd43dd8448eb211c80319c",
                "{id}: the record keeps the trace it was created under"
            );
        }
        let shard = shard_of("a");
        let (stored, _) = read::transfer(&*sim.stores[shard.0 as usize], shard, id)
            .unwrap()
            .unwrap();
        assert_eq!(stored.request.trace_id, "0af7651916cd43dd8448eb211c80319c");
    }
    assert_eq!(balance(&sim, "a").1, 6, "each applied once");
}

#[test]
fn final_rejections_are_recorded_and_replayed() {
    let mut sim = sim();
    open(&mut sim, "a", true);
    open(&mut sim, "b", false);
    let t = transfer("t1", "a", "b", 5);
    let first = submit(&mut sim, t.clone());
    assert_eq!(outcome(&sim, first), Some(Err(Rejection::ExceedsCredits)));
    // Fund "a"; the same id still answers with its first, final outcome.
    submit(&mut sim, transfer("fund", "b", "a", 100));
    let again = submit(&mut sim, t);
    assert_eq!(outcome(&sim, again), Some(Err(Rejection::ExceedsCredits)));
}

#[test]
fn cross_shard_transfer_walks_the_protocol() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    let token = sim.token();
    let t = transfer("x1", "a", "s1-b", 9);

    // Coordinator: debit "a" < credit "s1-b", so it locks "a", logs, and sends Prepare.
    let out = sim.batch(
        S0,
        vec![Input::CreateTransfer {
            token,
            transfer: t,
            trace: None,
        }],
    );
    assert_eq!(out.writes.writes.len(), 1, "only the coordinator record");
    assert!(sim.stores[0].get(&keys::coord(S0, "x1")).unwrap().is_some());
    assert!(matches!(&out.messages[..], [(S1, Message::Prepare(leg))] if leg.account_id == "s1-b"));
    assert!(
        !sim.replies.contains_key(&token),
        "no reply before the decision"
    );

    // Participant: locks, logs the prepared record, answers Prepared.
    sim.deliver_all(1);
    assert_eq!(read::in_flight(&*sim.stores[1], S1).unwrap(), (1, 0));
    assert!(matches!(
        sim.inbox.front(),
        Some((
            S0,
            S1,
            Message::Prepared {
                version_after: 1,
                ..
            }
        ))
    ));

    // Coordinator: decides commit (applies the debit, records the transfer) and sends Decide.
    sim.deliver_all(1);
    assert_eq!(balance(&sim, "a"), (0, 9, 0, 0, 1));
    assert_eq!(
        balance(&sim, "s1-b"),
        (0, 0, 0, 0, 0),
        "credit waits for the decision"
    );
    assert!(matches!(
        sim.inbox.front(),
        Some((
            S1,
            S0,
            Message::Decide {
                decision: Decision::Commit,
                ..
            }
        ))
    ));

    // Participant applies and acks; coordinator forgets the record and replies.
    sim.deliver_all(2);
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 9, 1));
    assert_eq!(outcome(&sim, token), Some(Ok(9)));
    assert_eq!(read::in_flight(&*sim.stores[0], S0).unwrap(), (0, 0));
    assert_eq!(read::in_flight(&*sim.stores[1], S1).unwrap(), (0, 0));
}

#[test]
fn participant_refusal_aborts_and_records_the_reason() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    let token = submit(&mut sim, transfer("x1", "a", "s1-missing", 9));
    sim.deliver_all(10);
    assert_eq!(
        outcome(&sim, token),
        Some(Err(Rejection::CreditAccountNotFound))
    );
    assert_eq!(balance(&sim, "a"), (0, 0, 0, 0, 0));
    assert_eq!(read::in_flight(&*sim.stores[0], S0).unwrap(), (0, 0));
}

#[test]
fn coordinator_crash_before_decision_is_presumed_abort() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    let token = submit(&mut sim, transfer("x1", "a", "s1-b", 9));
    sim.deliver_all(1); // participant prepared; its Prepared is in the inbox
    sim.inbox.clear(); // ... and lost with the coordinator's crash
    sim.crash(S0);
    sim.tick_all(); // the recovered coordinator aborts the undecided record
    assert!(matches!(
        sim.inbox.front(),
        Some((
            S1,
            S0,
            Message::Decide {
                decision: Decision::Abort,
                ..
            }
        ))
    ));
    sim.deliver_all(10);
    assert!(
        !sim.replies.contains_key(&token),
        "the caller of the dead leader gets no reply"
    );
    assert_eq!(
        read::in_flight(&*sim.stores[1], S1).unwrap(),
        (0, 0),
        "lock released"
    );
    assert_eq!(read::in_flight(&*sim.stores[0], S0).unwrap(), (0, 0));
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 0, 0));
    // A retry of the same id (the abort was retriable, so nothing recorded) now commits.
    let retry = submit(&mut sim, transfer("x1", "a", "s1-b", 9));
    sim.deliver_all(10);
    assert_eq!(outcome(&sim, retry), Some(Ok(9)));
}

#[test]
fn coordinator_crash_after_decision_resends_it() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    submit(&mut sim, transfer("x1", "a", "s1-b", 9));
    sim.deliver_all(2); // prepared, then decided; the Decide is in the inbox
    sim.inbox.clear();
    sim.crash(S0);
    sim.tick_all();
    sim.deliver_all(10);
    assert_eq!(
        balance(&sim, "s1-b"),
        (0, 0, 0, 9, 1),
        "I6: the decision reaches the participant"
    );
    assert_eq!(read::in_flight(&*sim.stores[0], S0).unwrap(), (0, 0));
}

#[test]
fn participant_asks_for_a_lost_decision() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    submit(&mut sim, transfer("x1", "a", "s1-b", 9));
    sim.deliver_all(2);
    sim.inbox.clear(); // the Decide is lost
    sim.crash(S1); // and the participant restarts holding its prepared lock
    sim.tick_all();
    assert!(
        sim.inbox
            .iter()
            .any(|(to, _, m)| *to == S0 && matches!(m, Message::QueryDecision { .. }))
    );
    sim.deliver_all(10);
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 9, 1));
}

#[test]
fn locked_account_makes_single_shard_transfers_wait() {
    let mut sim = sim();
    open(&mut sim, "s1-a", false);
    open(&mut sim, "s1-c", false);
    open(&mut sim, "b", false);
    // b -> s1-a is cross-shard; the participant locks s1-a.
    submit(&mut sim, transfer("x1", "b", "s1-a", 5));
    sim.deliver_all(1);
    // A single-shard transfer on shard 1 touching s1-a waits for the lock.
    let waiting = submit(&mut sim, transfer("t2", "s1-a", "s1-c", 2));
    assert!(!sim.replies.contains_key(&waiting));
    sim.deliver_all(10);
    assert_eq!(
        outcome(&sim, waiting),
        Some(Ok(2)),
        "ran once the lock was released"
    );
    assert_eq!(balance(&sim, "s1-a"), (0, 2, 0, 5, 2));
}

#[test]
fn lock_wait_is_bounded() {
    let mut sim = sim();
    open(&mut sim, "s1-a", false);
    open(&mut sim, "s1-c", false);
    open(&mut sim, "b", false);
    submit(&mut sim, transfer("x1", "b", "s1-a", 5));
    sim.deliver_all(1);
    sim.inbox.clear(); // the coordinator never hears back: the lock stays
    let waiting = submit(&mut sim, transfer("t2", "s1-a", "s1-c", 2));
    sim.now_ms += sim.options.lock_wait_ms_max;
    sim.batch(S1, Vec::new());
    assert_eq!(outcome(&sim, waiting), Some(Err(Rejection::LockTimeout)));
    // Nothing was recorded for t2: a retry later is free to succeed.
    assert!(
        sim.stores[1]
            .get(&keys::transfer(S1, "t2"))
            .unwrap()
            .is_none()
    );
}

#[test]
fn holds_post_void_and_expire() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let hold = |id: &str, amount, timeout| Transfer {
        kind: TransferKind::Pending,
        timeout_seconds: timeout,
        ..transfer(id, "a", "b", amount)
    };
    let resolve = |id: &str, pending: &str, kind, amount| Transfer {
        id: id.into(),
        pending_id: pending.into(),
        kind,
        amount,
        ..Transfer::default()
    };
    submit(&mut sim, hold("h1", 10, 0));
    assert_eq!(balance(&sim, "a"), (10, 0, 0, 0, 1));
    let post = submit(&mut sim, resolve("p1", "h1", TransferKind::PostPending, 4));
    assert_eq!(outcome(&sim, post), Some(Ok(4)));
    assert_eq!(
        balance(&sim, "a"),
        (0, 4, 0, 0, 2),
        "partial post releases the rest"
    );
    let again = submit(&mut sim, resolve("p2", "h1", TransferKind::VoidPending, 0));
    assert_eq!(
        outcome(&sim, again),
        Some(Err(Rejection::PendingTransferAlreadyPosted))
    );

    submit(&mut sim, hold("h2", 3, 0));
    let void = submit(&mut sim, resolve("v1", "h2", TransferKind::VoidPending, 0));
    assert_eq!(outcome(&sim, void), Some(Ok(3)));
    assert_eq!(balance(&sim, "b"), (0, 0, 0, 4, 4));

    submit(&mut sim, hold("h3", 6, 2));
    sim.now_ms += 2_000;
    sim.batch(S0, Vec::new());
    assert_eq!(balance(&sim, "a").0, 0, "expired hold released");
    let hold_status = read::hold(&*sim.stores[0], S0, "h3").unwrap().unwrap();
    assert_eq!(hold_status.state, HoldState::Expired);
    let late = submit(&mut sim, resolve("p3", "h3", TransferKind::PostPending, 0));
    assert_eq!(
        outcome(&sim, late),
        Some(Err(Rejection::PendingTransferExpired))
    );
}

#[test]
fn cross_shard_hold_expires_through_the_protocol() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    let t = Transfer {
        kind: TransferKind::Pending,
        timeout_seconds: 1,
        ..transfer("h", "a", "s1-b", 6)
    };
    submit(&mut sim, t);
    sim.deliver_all(10);
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 6, 0, 1));
    sim.now_ms += 1_000;
    sim.batch(S0, Vec::new());
    sim.deliver_all(10);
    assert_eq!(balance(&sim, "a"), (0, 0, 0, 0, 2));
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 0, 2));
}

#[test]
fn expected_versions_gate_the_transfer() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let stale = Transfer {
        expected_debit_version: Some(3),
        ..transfer("t1", "a", "b", 1)
    };
    let token = submit(&mut sim, stale);
    assert_eq!(
        outcome(&sim, token),
        Some(Err(Rejection::DebitVersionMismatch))
    );
    let fresh = Transfer {
        expected_debit_version: Some(0),
        expected_credit_version: Some(0),
        ..transfer("t2", "a", "b", 1)
    };
    let token = submit(&mut sim, fresh);
    assert_eq!(outcome(&sim, token), Some(Ok(1)));
}

#[test]
fn stale_epoch_commit_is_rejected_by_the_store() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    // A stale engine keeps running after a new leader took the next epoch.
    let stale_epoch = sim.engines[0].epoch();
    let mut stale = std::mem::replace(&mut sim.engines[0], {
        let store: Arc<dyn Store> = sim.stores[0].clone();
        // Another node may take the lease only once it has expired.
        let live = crate::runtime::acquire_lease(&*store, S0, "other", sim.now_ms, 1);
        assert!(matches!(live, Err(crate::runtime::LeaseError::Held { .. })));
        let later = sim.now_ms + Options::default().lease_ms;
        let lease = crate::runtime::acquire_lease(&*store, S0, "other", later, 1).unwrap();
        assert_eq!(lease.epoch, stale_epoch + 1);
        let recovered = crate::runtime::load(&*store, S0).unwrap();
        super::Engine::new(
            S0,
            lease.epoch,
            Options::default(),
            Arc::new(|id: &str| Some(shard_of(id))),
            recovered,
        )
    });
    stale.begin(sim.now_ms);
    stale
        .handle(Input::CreateTransfer {
            token: 99,
            transfer: transfer("t1", "a", "b", 1),
            trace: None,
        })
        .unwrap();
    crate::sim::fetch(&mut stale, &*sim.stores[0]);
    let out = stale.finish();
    let err = sim.stores[0].commit(&out.writes).unwrap_err();
    assert!(
        matches!(err, ledger_store::CommitError::Conflict { .. }),
        "{err}"
    );
    assert_eq!(
        balance(&sim, "a"),
        (0, 0, 0, 0, 0),
        "the fenced commit wrote nothing"
    );
}

/// Spans of the two-phase commit, lock waits and recovery, collected in memory. The engine runs
/// on this thread only (the simulation), so a thread-local subscriber sees every span.
mod spans {
    use opentelemetry::trace::{SpanId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::trace::TraceParent;

    fn attr(span: &SpanData, key: &str) -> String {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_default()
    }

    /// The one span named `name` with role `role` for operation `op`.
    fn find<'a>(spans: &'a [SpanData], name: &str, role: &str, op: &str) -> &'a SpanData {
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.name == name && attr(s, "role") == role && attr(s, "op") == op)
            .collect();
        assert_eq!(found.len(), 1, "one {name} ({role}) for {op}: {found:#?}");
        found[0]
    }

    fn id(span: &SpanData) -> SpanId {
        span.span_context.span_id()
    }

    fn submit_traced(sim: &mut Sim, t: Transfer, trace: TraceParent) -> u64 {
        let token = sim.token();
        let shard = shard_of(&t.debit_account_id);
        let input = Input::CreateTransfer {
            token,
            transfer: t,
            trace: Some(trace),
        };
        sim.batch(shard, vec![input]);
        token
    }

    #[test]
    fn two_phase_commit_lock_wait_and_recovery_spans_join_the_callers_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);

        let mut sim = sim();
        open(&mut sim, "a", false);
        open(&mut sim, "s1-b", false);
        open(&mut sim, "s1-c", false);
        let caller = tracing::info_span!("caller");
        let trace = TraceParent::of_span(&caller).expect("the OpenTelemetry layer is on");
        let caller_id = SpanId::from_bytes(trace.span_id);

        // x1: prepared on shard 1, where a local transfer then waits for s1-b's lock.
        let x1 = submit_traced(&mut sim, transfer("x1", "a", "s1-b", 9), trace);
        sim.deliver_all(1);
        let l1 = submit_traced(&mut sim, transfer("l1", "s1-c", "s1-b", 1), trace);
        assert!(!sim.replies.contains_key(&l1), "l1 waits for the lock");
        sim.deliver_all(10);
        assert_eq!(outcome(&sim, x1), Some(Ok(9)));
        assert_eq!(outcome(&sim, l1), Some(Ok(1)));

        // x2: decided, then both shards restart before the decision arrives.
        let _x2 = submit_traced(&mut sim, transfer("x2", "a", "s1-b", 4), trace);
        sim.deliver_all(2);
        sim.inbox.clear();
        let restart = tracing::info_span!("shard.recover");
        let restart_id = restart.in_scope(|| {
            sim.crash(S0);
            sim.crash(S1);
            TraceParent::of_span(&restart).expect("sampled").span_id
        });
        drop(restart);
        sim.tick_all();
        sim.deliver_all(10);
        assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 14, 3));
        drop(caller);
        let spans = exporter.get_finished_spans().unwrap();
        // The restart is a trace of its own; everything else is in the caller's.
        for s in spans.iter().filter(|s| s.name != "shard.recover") {
            assert_eq!(
                s.span_context.trace_id().to_bytes(),
                trace.trace_id,
                "every span is in the caller's trace: {s:?}"
            );
        }

        // The protocol of x1, coordinator (shard 0) and participant (shard 1).
        let c_prepare = find(&spans, "2pc.prepare", "coordinator", "x1");
        let p_prepare = find(&spans, "2pc.prepare", "participant", "x1");
        let c_decide = find(&spans, "2pc.decide", "coordinator", "x1");
        let p_decide = find(&spans, "2pc.decide", "participant", "x1");
        let c_apply = find(&spans, "2pc.apply", "coordinator", "x1");
        let p_apply = find(&spans, "2pc.apply", "participant", "x1");
        assert_eq!(c_prepare.parent_span_id, caller_id);
        assert_eq!(attr(c_prepare, "outcome"), "prepared");
        assert_eq!(
            p_prepare.parent_span_id,
            id(c_prepare),
            "the Prepare message carries the coordinator's prepare span"
        );
        assert_eq!(attr(p_prepare, "shard"), "1");
        assert_eq!(c_decide.parent_span_id, caller_id);
        assert_eq!(attr(c_decide, "decision"), "commit");
        assert_eq!(attr(c_decide, "outcome"), "acked");
        assert_eq!(p_decide.parent_span_id, id(c_decide));
        assert_eq!(attr(p_decide, "decision"), "commit");
        assert_eq!(attr(p_decide, "outcome"), "applied");
        assert_eq!(c_apply.parent_span_id, id(c_decide));
        assert_eq!(p_apply.parent_span_id, id(p_decide));

        let wait = find(&spans, "lock.wait", "local", "l1");
        assert_eq!(wait.parent_span_id, caller_id);
        assert_eq!(attr(wait, "lock"), "a:s1-b");
        assert_eq!(attr(wait, "outcome"), "acquired");
        assert!(
            wait.end_time >= p_decide.start_time,
            "the wait lasted until x1's decision released the lock"
        );

        // x2's recovery: both shards' recover spans, linked to the restart.
        let c_recover = find(&spans, "2pc.recover", "coordinator", "x2");
        let p_recover = find(&spans, "2pc.recover", "participant", "x2");
        assert_eq!(c_recover.parent_span_id, caller_id);
        assert!(attr(c_recover, "action").contains("resend the commit decision"));
        assert_eq!(attr(c_recover, "outcome"), "acked");
        assert_eq!(attr(p_recover, "decision"), "commit");
        assert_eq!(attr(p_recover, "outcome"), "decided");
        for r in [c_recover, p_recover] {
            assert!(
                r.links
                    .iter()
                    .any(|l| l.span_context.span_id().to_bytes() == restart_id),
                "linked to the restart's shard.recover span"
            );
        }
        let p_decide2 = find(&spans, "2pc.decide", "participant", "x2");
        assert_eq!(
            p_decide2.parent_span_id,
            id(c_recover),
            "the resent decision carries the recovery span"
        );
    }
}

/// A late duplicate `Prepare` in the same batch as its attempt's `Decide` is ignored: the
/// decision's done marker is not yet in the store, and preparing again would lock the account
/// under a prepared record that a resent `Decide` (after a lost `Acked`) would apply twice.
#[test]
fn a_late_prepare_in_the_batch_of_its_decision_is_ignored() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    let token = submit(&mut sim, transfer("x1", "a", "s1-b", 9));
    let (_, from, prepare) = sim.inbox.front().cloned().expect("a Prepare");
    assert!(matches!(prepare, Message::Prepare(_)));
    sim.deliver_all(2); // Prepare -> Prepared -> Decide queued
    let (to, _, decide) = sim.inbox.pop_front().expect("a Decide");
    assert!(matches!(
        (to, &decide),
        (
            S1,
            Message::Decide {
                decision: Decision::Commit,
                ..
            }
        )
    ));
    let out = sim.batch(
        S1,
        vec![
            Input::Peer {
                from,
                message: decide,
            },
            Input::Peer {
                from,
                message: prepare,
            },
        ],
    );
    assert!(
        !out.messages
            .iter()
            .any(|(_, m)| matches!(m, Message::Prepared { .. })),
        "no second Prepared: {out:?}"
    );
    assert_eq!(
        read::in_flight(&*sim.stores[1], S1).unwrap(),
        (0, 0),
        "no prepared record left behind"
    );
    sim.deliver_all(10);
    assert_eq!(outcome(&sim, token), Some(Ok(9)));
    assert_eq!(balance(&sim, "s1-b"), (0, 0, 0, 9, 1));
}

/// A directory record (forward) reserves its id for one placement key: in the batch that
/// wrote it, in later batches (read from the store: the engine keeps none in memory) and after
/// the shard restarts. The same key is accepted again; another key, or an account of that id
/// on the directory shard itself, is refused.
#[test]
fn a_forward_reserves_its_id_in_its_batch_later_and_after_a_restart() {
    let mut sim = sim();
    let reserve = |sim: &mut Sim, id: &str, key: &str| {
        let token = sim.token();
        let input = Input::ReserveForward {
            token,
            id: id.into(),
            placement_key: key.into(),
            home: S1,
        };
        (token, input)
    };
    let create = |sim: &mut Sim, id: &str| {
        let token = sim.token();
        let account = NewAccount {
            id: id.into(),
            ledger: "USD".into(),
            placement_key: id.into(),
            ..Default::default()
        };
        (token, Input::CreateAccount { token, account })
    };
    let forward = |sim: &Sim, token| match &sim.replies[&token] {
        Reply::Forward(r) => *r,
        other => panic!("not a forward reply: {other:?}"),
    };
    let account = |sim: &Sim, token| match &sim.replies[&token] {
        Reply::Account(r) => r.as_ref().map(|_| ()).map_err(|r| *r),
        other => panic!("not an account reply: {other:?}"),
    };
    // One batch: the reservation, then the same id with another key, the same key again, and
    // an account of that id placed on the directory shard.
    let (first, a) = reserve(&mut sim, "m1", "g1");
    let (other_key, b) = reserve(&mut sim, "m1", "g2");
    let (same_key, c) = reserve(&mut sim, "m1", "g1");
    let (here, d) = create(&mut sim, "m1");
    let out = sim.batch(S0, vec![a, b, c, d]);
    assert_eq!(out.writes.writes.len(), 1, "one directory record");
    assert_eq!(forward(&sim, first), Ok(()));
    assert_eq!(
        forward(&sim, other_key),
        Err(Rejection::ExistsWithDifferentFields)
    );
    assert_eq!(forward(&sim, same_key), Ok(()));
    assert_eq!(
        account(&sim, here),
        Err(Rejection::ExistsWithDifferentFields)
    );
    // Later batches read the record from the store; so does a new leader after a restart.
    for restart in [false, true] {
        if restart {
            sim.crash(S0);
        }
        let (other_key, b) = reserve(&mut sim, "m1", "g3");
        let (same_key, c) = reserve(&mut sim, "m1", "g1");
        let (here, d) = create(&mut sim, "m1");
        let out = sim.batch(S0, vec![b, c, d]);
        assert!(out.writes.writes.is_empty(), "nothing new to write");
        assert_eq!(
            forward(&sim, other_key),
            Err(Rejection::ExistsWithDifferentFields),
            "restart: {restart}"
        );
        assert_eq!(forward(&sim, same_key), Ok(()), "restart: {restart}");
        assert_eq!(
            account(&sim, here),
            Err(Rejection::ExistsWithDifferentFields),
            "restart: {restart}"
        );
    }
    // An id with no record is free.
    let (free, e) = create(&mut sim, "m2");
    sim.batch(S0, vec![e]);
    assert_eq!(account(&sim, free), Ok(()));
}

/// A post whose hold is in the store waits for the runtime to fetch it; the transfer behind it
/// in the same batch needs no read, yet must wait too: it spends what the post credits, and
/// run first it would be refused (`exceeds_credits`).
#[test]
fn a_step_waiting_for_the_store_keeps_the_order_of_inputs() {
    let mut sim = sim();
    open(&mut sim, "bank", false);
    open(&mut sim, "a", true);
    open(&mut sim, "b", false);
    let hold = Transfer {
        kind: TransferKind::Pending,
        ..transfer("h", "bank", "a", 10)
    };
    submit(&mut sim, hold);
    let post = Transfer {
        id: "p".into(),
        pending_id: "h".into(),
        kind: TransferKind::PostPending,
        ..Transfer::default()
    };
    let (post_token, spend_token) = (sim.token(), sim.token());
    let engine = &mut sim.engines[0];
    engine.begin(sim.now_ms);
    for (token, transfer) in [
        (post_token, post),
        (spend_token, transfer("t", "a", "b", 10)),
    ] {
        let input = Input::CreateTransfer {
            token,
            transfer,
            trace: None,
        };
        engine.handle(input).unwrap();
    }
    assert!(engine.is_stalled());
    let wanted = engine.take_wanted();
    assert_eq!(
        wanted,
        [Read::Hold("h".into())],
        "only the hold is not known"
    );
    let values = wanted.into_iter().map(|read| {
        let value = sim.stores[0].get(&read.key(S0).unwrap()).unwrap();
        (read, value)
    });
    engine.supply(values.collect::<Vec<_>>()).unwrap();
    assert!(!engine.is_stalled());
    assert!(engine.take_wanted().is_empty());
    let out = engine.finish();
    sim.stores[0].commit(&out.writes).unwrap();
    let results: Vec<_> = out
        .replies
        .iter()
        .map(|(token, reply)| match reply {
            Reply::Transfer(r) => (*token, r.outcome().ok()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(results, [(post_token, Some(10)), (spend_token, Some(10))]);
    assert_eq!(balance(&sim, "b"), (0, 0, 0, 10, 1));
}

/// A retry of a transfer whose cross-shard attempt was aborted, while the participant has yet
/// to ack the abort, is answered at once with the abort's passing reason (it used to join the
/// aborted attempt and never be answered); after the ack a retry starts a new attempt.
#[test]
fn a_retry_while_an_abort_awaits_its_ack_is_answered_at_once() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", false);
    let first = submit(&mut sim, transfer("t", "a", "s1-b", 5));
    sim.inbox.clear(); // The Prepare is lost: the participant is down.
    sim.now_ms += sim.options.prepare_timeout_ms;
    sim.tick_all();
    assert!(matches!(outcome(&sim, first), Some(Err(r)) if r.is_retriable()));
    sim.inbox.clear(); // And so is the abort decision.
    let retry = submit(&mut sim, transfer("t", "a", "s1-b", 5));
    assert!(
        matches!(outcome(&sim, retry), Some(Err(r)) if r.is_retriable()),
        "answered at once: {:?}",
        sim.replies.get(&retry)
    );
    // The participant is back: the abort is resent and acked, and a retry commits.
    sim.now_ms += sim.options.retry_ms;
    sim.tick_all();
    sim.deliver_grouped(10);
    let last = submit(&mut sim, transfer("t", "a", "s1-b", 5));
    sim.deliver_grouped(10);
    assert_eq!(outcome(&sim, last), Some(Ok(5)));
    assert_eq!(balance(&sim, "s1-b").3, 5);
}

/// The story: under contention, resends of a Prepare queued behind a locked account ran after
/// their coordinator had given their attempt up, each taking the lock until the coordinator,
/// asked, said abort; the retried transfer's newer attempt waited behind them, and with the
/// queue full was refused `account_busy` for as long as they kept coming (found by
/// `ledger-sim`, seed 1658, in a burst of concurrent transfers). A Prepare of a newer attempt
/// now releases an older attempt of the same operation at once, and drops its queued resends.
#[test]
fn a_newer_attempt_releases_an_older_one_of_the_same_operation() {
    let mut sim = sim();
    open(&mut sim, "s1-b", false);
    let leg = |seq| crate::protocol::Leg {
        attempt: crate::protocol::Attempt {
            op: "t".into(),
            epoch: 1,
            seq,
        },
        account_id: "s1-b".into(),
        ledger: "USD".into(),
        change: ledger_domain::Change {
            side: ledger_domain::Side::Credit,
            pending_add: 0,
            pending_sub: 0,
            posted_add: 5,
        },
        expected_version: None,
        transfer_id: "t".into(),
        entry_kind: ledger_domain::EntryKind::Posted,
        code: 0,
        trace: None,
    };
    let prepare = |seq| Input::Peer {
        from: S0,
        message: Message::Prepare(leg(seq)),
    };
    // Attempt 1 is prepared here; its coordinator has since given it up.
    sim.batch(S1, vec![prepare(1)]);
    assert_eq!(read::in_flight(&*sim.stores[1], S1).unwrap(), (1, 0));
    sim.inbox.clear();
    // Attempt 2 of the same transfer is prepared at once; attempt 1 is released as aborted.
    let out = sim.batch(S1, vec![prepare(2)]);
    assert!(
        matches!(&out.messages[..], [(S0, Message::Prepared { attempt, .. })] if attempt.seq == 2),
        "{:?}",
        out.messages
    );
    assert_eq!(
        read::in_flight(&*sim.stores[1], S1).unwrap(),
        (1, 0),
        "attempt 2 alone is prepared"
    );
    // A late resend of attempt 1 changes nothing; attempt 2 commits.
    let out = sim.batch(S1, vec![prepare(1)]);
    assert!(out.messages.is_empty(), "{:?}", out.messages);
    let decide = Message::Decide {
        attempt: leg(2).attempt,
        decision: Decision::Commit,
        committed_at_ms: 0,
        trace: None,
    };
    sim.batch(
        S1,
        vec![Input::Peer {
            from: S0,
            message: decide,
        }],
    );
    assert_eq!(balance(&sim, "s1-b").3, 5);
    assert_eq!(read::in_flight(&*sim.stores[1], S1).unwrap(), (0, 0));
}

/// A credit account the node's directory does not know is a location the engine waits for,
/// as for a stored value, before it changes anything; supplied, the transfer goes to that
/// shard. A lookup that failed answers the transfer `Unavailable` and records nothing.
#[test]
fn the_engine_waits_for_a_location_it_does_not_know() {
    let mut sim = Sim::new(
        2,
        Arc::new(|id: &str| (!id.starts_with("far")).then(|| shard_of(id))),
        Options::default(),
    );
    open(&mut sim, "a", false);
    let engine = &mut sim.engines[0];
    engine.begin(sim.now_ms);
    let (found, lost) = (1_000, 1_001);
    for (token, credit) in [(found, "far-1"), (lost, "far-2")] {
        let input = Input::CreateTransfer {
            token,
            transfer: transfer(&format!("t-{credit}"), "a", credit, 5),
            trace: None,
        };
        engine.handle(input).unwrap();
    }
    assert!(engine.is_stalled());
    let mut wanted = engine.take_wanted();
    wanted.sort();
    assert_eq!(
        wanted,
        [Read::Locate("far-1".into()), Read::Locate("far-2".into())]
    );
    engine
        .supply([
            (Read::Locate("far-1".into()), location_value(Some(S1))),
            (Read::Locate("far-2".into()), location_value(None)),
        ])
        .unwrap();
    assert!(!engine.is_stalled());
    let out = engine.finish();
    assert!(
        matches!(&out.messages[..], [(S1, Message::Prepare(leg))] if leg.account_id == "far-1"),
        "{:?}",
        out.messages
    );
    assert!(
        matches!(&out.replies[..], [(token, Reply::Unavailable(_))] if *token == lost),
        "{:?}",
        out.replies
    );
    assert!(
        !out.writes
            .writes
            .iter()
            .any(|w| format!("{w:?}").contains("t-far-2")),
        "nothing recorded for the transfer whose lookup failed"
    );
}

/// Inputs that need no store read run at once; an engine that reads the store for a replay
/// (no filter) asks for the id's record and answers the replay once it is supplied.
#[test]
fn without_a_filter_every_id_is_fetched_and_a_replay_answered_from_it() {
    let mut sim = sim_with(Options {
        transfer_filter_bytes: 0,
        ..Options::default()
    });
    open(&mut sim, "a", false);
    open(&mut sim, "b", false);
    let first = submit(&mut sim, transfer("t1", "a", "b", 7));
    let engine = &mut sim.engines[0];
    engine.begin(sim.now_ms);
    let input = Input::CreateTransfer {
        token: 1_000,
        transfer: transfer("t1", "a", "b", 7),
        trace: None,
    };
    engine.handle(input).unwrap();
    assert_eq!(engine.take_wanted(), [Read::Transfer("t1".into())]);
    let record = sim.stores[0].get(&keys::transfer(S0, "t1")).unwrap();
    assert!(record.is_some());
    engine
        .supply([(Read::Transfer("t1".into()), record)])
        .unwrap();
    let out = engine.finish();
    assert!(out.writes.writes.is_empty(), "a replay writes nothing");
    let [(1_000, Reply::Transfer(replay))] = out.replies.as_slice() else {
        panic!("{:?}", out.replies)
    };
    assert_eq!(outcome(&sim, first), Some(Ok(7)));
    assert_eq!(replay.record.result.as_ref().unwrap().amount, 7);
    assert_eq!(balance(&sim, "a").1, 7, "applied once");
}

/// One scenario of cross-shard transfers (prepares lost and resent together), holds posted,
/// voided and expired across shards, and a coordinator crash mid-protocol: every batch's
/// writes, replies and messages, in order. Nothing in them may depend on a hash seed or the
/// wall clock, so two runs (each with freshly seeded maps) write the same journal.
fn deterministic_scenario() -> Vec<String> {
    let mut sim = sim();
    sim.journal = Some(Vec::new());
    for id in ["a", "c", "s1-b", "s1-d"] {
        open(&mut sim, id, false);
    }
    // Four coordinations on each shard at once; their Prepares are lost, so the next tick
    // resends all of them (in an order the engine decides).
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(submit(
            &mut sim,
            transfer(&format!("x{i}"), "a", "s1-b", 5 + i),
        ));
        tokens.push(submit(
            &mut sim,
            transfer(&format!("y{i}"), "s1-d", "c", 7 + i),
        ));
    }
    sim.inbox.clear();
    sim.now_ms += sim.options.retry_ms;
    sim.tick_all();
    sim.deliver_grouped(10);
    assert!(tokens.iter().all(|t| sim.replies.contains_key(t)));
    // Holds: a cross-shard one that expires, one posted across shards, a local one voided.
    let hold = |id: &str, debit: &str, credit: &str, timeout| Transfer {
        kind: TransferKind::Pending,
        timeout_seconds: timeout,
        ..transfer(id, debit, credit, 3)
    };
    submit(&mut sim, hold("h-expire", "a", "s1-b", 1));
    submit(&mut sim, hold("h-post", "a", "s1-d", 0));
    submit(&mut sim, hold("h-void", "a", "c", 0));
    sim.deliver_grouped(4);
    let resolve = |id: &str, pending: &str, kind| Transfer {
        id: id.into(),
        pending_id: pending.into(),
        kind,
        ..Transfer::default()
    };
    submit(&mut sim, resolve("p", "h-post", TransferKind::PostPending));
    submit(&mut sim, resolve("v", "h-void", TransferKind::VoidPending));
    // The coordinator crashes with the post's protocol in flight.
    sim.deliver_all(1);
    sim.crash(S0);
    sim.now_ms += 1_000;
    sim.tick_all();
    sim.deliver_grouped(10);
    sim.now_ms += sim.options.prepare_timeout_ms;
    sim.tick_all();
    sim.deliver_grouped(10);
    sim.journal.take().unwrap()
}

#[test]
fn the_same_scenario_gives_the_same_outputs_message_for_message() {
    let first = deterministic_scenario();
    let second = deterministic_scenario();
    assert!(
        first.iter().filter(|b| b.contains("Prepare(")).count() >= 8,
        "the scenario sends prepares: {first:#?}"
    );
    assert_eq!(first.len(), second.len(), "as many batches");
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_eq!(a, b, "batch {i} differs");
    }
}

/// The simulation found this: a transfer's coordinator had committed and answered a retry
/// with its recorded success, but the decision had not reached the participant yet (a
/// partition cut it off), so the credit account still held the prepared lock and not the
/// money. A transfer debiting that account was then judged against the balance without the
/// credit and rejected for good (`exceeds_credits`, recorded, returned to every retry), though
/// the money it needed had been acknowledged to another client first. A rejection that
/// follows from balances now waits for a lock held on the account and is judged again once
/// the cross-shard transfer is done.
#[test]
fn a_balance_rejection_waits_for_a_credit_already_acknowledged() {
    let mut sim = sim();
    open(&mut sim, "a", false);
    open(&mut sim, "s1-b", true);
    open(&mut sim, "s1-c", false);
    let first = submit(&mut sim, transfer("t1", "a", "s1-b", 100));
    // Prepare, Prepared: the coordinator commits; its Decide is lost on the way.
    sim.deliver_all(2);
    assert!(matches!(
        sim.inbox.pop_front(),
        Some((S1, S0, Message::Decide { .. }))
    ));
    assert!(sim.inbox.is_empty());
    assert_eq!(
        outcome(&sim, first),
        None,
        "answered only once acknowledged"
    );
    // A retry is answered from the coordinator's record: the transfer is acknowledged.
    let retry = submit(&mut sim, transfer("t1", "a", "s1-b", 100));
    assert_eq!(outcome(&sim, retry), Some(Ok(100)));
    assert_eq!(balance(&sim, "s1-b").3, 0, "the credit is not applied yet");

    // Spending that credit on the participant's shard waits for it instead of failing.
    let spend = submit(&mut sim, transfer("t2", "s1-b", "s1-c", 60));
    assert_eq!(outcome(&sim, spend), None);
    // The participant asks, the coordinator decides again, the credit applies, the lock goes.
    for _ in 0..20 {
        sim.now_ms += sim.options.prepared_query_ms.max(sim.options.retry_ms);
        sim.tick_all();
        sim.deliver_all(100);
    }
    assert_eq!(outcome(&sim, spend), Some(Ok(60)));
    assert_eq!(balance(&sim, "s1-b"), (0, 60, 0, 100, 2));
}
