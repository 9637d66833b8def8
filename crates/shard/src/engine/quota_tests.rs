//! Regional quotas in the engine: grant, spend, settle, fallback, shrink and move (donor
//! first), expiry, duplicates, write-off, crashes. Shard 0 is the home of `a` (its region H);
//! shard 1 is the quota shard of region R, shard 2 that of region R2; `s1*` and `s2*` accounts
//! live on shards 1 and 2.

use std::sync::Arc;

use ledger_domain::{AccountFlags, NewAccount, Rejection, ShardId, Transfer};

use super::{Input, Reply};
use crate::quota::{
    Command, CommandError, CommandReply, MoveTo, QUOTA_SKEW_MARGIN_MS, clearing_id, escrow_id,
    quota_id,
};
use crate::sim::Sim;
use crate::{Options, read};

const HOME: ShardId = ShardId(0);
const R: ShardId = ShardId(1);
const R2: ShardId = ShardId(2);
const LEASE_MS: u64 = 60_000;

fn shard_of(id: &str) -> ShardId {
    let regional = !id.starts_with("!escrow!");
    if id.starts_with("s1") || (regional && id.contains("!R!")) {
        R
    } else if id.starts_with("s2") || (regional && id.contains("!R2!")) {
        R2
    } else {
        HOME
    }
}

fn sim() -> Sim {
    let mut sim = Sim::new(
        3,
        Arc::new(|id: &str| Some(shard_of(id))),
        Options::default(),
    );
    for (id, no_overdraft) in [("a", true), ("src", false), ("s1c", false), ("s2c", false)] {
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
    }
    // a holds 100.
    let token = submit(&mut sim, HOME, transfer("fund", "src", "a", 100));
    assert_eq!(outcome(&sim, token), Ok(100));
    sim
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

fn submit(sim: &mut Sim, shard: ShardId, t: Transfer) -> u64 {
    let token = sim.token();
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

/// A transfer entering region R by the quota path: debit `a`'s quota account of R.
fn spend(sim: &mut Sim, id: &str, credit: &str, amount: u64) -> u64 {
    let mut t = transfer(id, "a", credit, amount);
    t.debit_account_id = quota_id("R", "a");
    let token = submit(sim, R, t);
    settle_messages(sim);
    token
}

fn outcome(sim: &Sim, token: u64) -> Result<u64, Rejection> {
    match &sim.replies[&token] {
        Reply::Transfer(r) => r.outcome(),
        other => panic!("not a transfer reply: {other:?}"),
    }
}

fn command(sim: &mut Sim, shard: ShardId, command: Command) -> CommandReply {
    let token = sim.token();
    sim.batch(shard, vec![Input::Quota { token, command }]);
    match sim.replies.remove(&token) {
        Some(Reply::Quota(reply)) => reply,
        other => panic!("not a quota reply: {other:?}"),
    }
}

fn set(sim: &mut Sim, amount: u64) -> CommandReply {
    let reply = command(
        sim,
        HOME,
        Command::Set {
            account_id: "a".into(),
            region: "R".into(),
            quota_shard: R,
            amount,
            lease_ms: LEASE_MS,
        },
    );
    settle_messages(sim);
    reply
}

/// Delivers messages until none are left (each delivery's answers too).
fn settle_messages(sim: &mut Sim) {
    for _ in 0..20 {
        if sim.deliver_all(1_000) == 0 {
            break;
        }
    }
}

/// Moves time on past the resend interval and ticks every shard, then delivers.
fn tick(sim: &mut Sim, ms: u64) {
    sim.now_ms += ms;
    sim.tick_all();
    settle_messages(sim);
}

/// (debits_pending, debits_posted, credits_pending, credits_posted)
fn balances(sim: &Sim, id: &str) -> (u64, u64, u64, u64) {
    let shard = shard_of(id);
    let a = read::account(&*sim.stores[shard.0 as usize], shard, id)
        .unwrap()
        .unwrap_or_else(|| panic!("{id} exists"));
    let b = a.balances;
    (
        b.debits_pending,
        b.debits_posted,
        b.credits_pending,
        b.credits_posted,
    )
}

fn region_view(sim: &mut Sim, shard: ShardId) -> crate::quota::RegionView {
    match command(
        sim,
        shard,
        Command::Region {
            account_id: "a".into(),
        },
    ) {
        CommandReply::Region(Some(view)) => view,
        other => panic!("no region view: {other:?}"),
    }
}

fn allowance(sim: &mut Sim, region: &str) -> crate::quota::Allowance {
    match command(
        sim,
        HOME,
        Command::Show {
            account_id: "a".into(),
        },
    ) {
        CommandReply::Allowances(list) => list
            .into_iter()
            .find(|a| a.region == region)
            .unwrap_or_else(|| panic!("an allowance of {region}")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_grant_reserves_at_home_and_the_region_spends_and_settles_it() {
    let mut sim = sim();
    assert!(matches!(set(&mut sim, 60), CommandReply::Allowances(_)));
    // At home: a hold of 60 from a to the escrow; a's available balance is 40.
    assert_eq!(balances(&sim, "a"), (60, 0, 0, 100));
    assert_eq!(balances(&sim, &escrow_id("R", "a")), (0, 0, 60, 0));
    // In R: the clearing account paid the quota account 60.
    assert_eq!(balances(&sim, &quota_id("R", "a")), (0, 0, 0, 60));
    assert_eq!(balances(&sim, &clearing_id("R", "a")), (0, 60, 0, 0));
    assert_eq!(allowance(&mut sim, "R").confirmed, 1);

    let token = spend(&mut sim, "t1", "s1c", 25);
    assert_eq!(outcome(&sim, token), Ok(25));
    // Credited in R at once; settled at home once the outbox was delivered.
    assert_eq!(balances(&sim, "s1c"), (0, 0, 0, 25));
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (35, 25, 0, 100));
    assert_eq!(balances(&sim, &escrow_id("R", "a")), (0, 0, 35, 25));
    let view = region_view(&mut sim, R);
    assert_eq!(
        (view.record.spent, view.record.settled, view.in_flight),
        (25, 25, 0)
    );
    assert_eq!(view.available, 35);
    // The home recorded the transfer with its own fields: a 2PC retry of the id from
    // anywhere is answered from that record and applies nothing.
    let retry = submit(&mut sim, HOME, transfer("t1", "a", "s1c", 25));
    settle_messages(&mut sim);
    assert_eq!(outcome(&sim, retry), Ok(25));
    assert_eq!(balances(&sim, "a"), (35, 25, 0, 100));
    assert_eq!(balances(&sim, "s1c"), (0, 0, 0, 25));
}

#[test]
fn a_spend_the_allowance_cannot_cover_is_declined_for_good_and_changes_nothing() {
    let mut sim = sim();
    set(&mut sim, 30);
    let token = spend(&mut sim, "big", "s1c", 31);
    let declined = outcome(&sim, token).unwrap_err();
    assert_eq!(declined, Rejection::QuotaExhausted);
    // The decline is recorded: after a bigger grant, the retry is still declined (it has gone
    // to the home by 2PC, which has the final say).
    set(&mut sim, 90);
    let retry = spend(&mut sim, "big", "s1c", 31);
    assert_eq!(outcome(&sim, retry), Err(declined));
    assert_eq!(balances(&sim, "s1c"), (0, 0, 0, 0));
    // Holds never take the quota path.
    let mut hold = transfer("h1", "a", "s1c", 5);
    hold.debit_account_id = quota_id("R", "a");
    hold.kind = ledger_domain::TransferKind::Pending;
    let token = submit(&mut sim, R, hold);
    assert_eq!(outcome(&sim, token), Err(Rejection::QuotaExhausted));
}

#[test]
fn a_region_without_an_allowance_declines() {
    let mut sim = sim();
    let token = spend(&mut sim, "t1", "s1c", 1);
    assert!(outcome(&sim, token).is_err());
    assert_eq!(balances(&sim, "s1c"), (0, 0, 0, 0));
}

#[test]
fn a_spend_to_another_shard_of_the_region_settles_after_its_two_phase_commit() {
    let mut sim = sim();
    set(&mut sim, 50);
    // R's quota shard is shard 1; s2c is on shard 2 (here standing for another shard of R).
    let token = spend(&mut sim, "t2", "s2c", 20);
    assert_eq!(outcome(&sim, token), Ok(20));
    assert_eq!(balances(&sim, "s2c"), (0, 0, 0, 20));
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (30, 20, 0, 100));
}

#[test]
fn an_allowance_the_account_cannot_cover_is_refused_and_changes_nothing() {
    let mut sim = sim();
    let reply = set(&mut sim, 101);
    assert!(
        matches!(
            reply,
            CommandReply::Refused(CommandError::ExceedsCredits(_))
        ),
        "{reply:?}"
    );
    assert_eq!(balances(&sim, "a"), (0, 0, 0, 100));
    assert!(sim.inbox.is_empty());
}

#[test]
fn a_shrink_gives_back_only_unspent_rights_donor_first() {
    let mut sim = sim();
    set(&mut sim, 60);
    let token = spend(&mut sim, "t1", "s1c", 50);
    assert_eq!(outcome(&sim, token), Ok(50));
    // Shrink to 0 before the settlement arrives: the region gives back its 10 unspent; the
    // 50 spent stay reserved until settled.
    set(&mut sim, 0);
    assert_eq!(balances(&sim, &quota_id("R", "a")), (0, 60, 0, 60));
    let home = allowance(&mut sim, "R");
    assert_eq!((home.released, home.pending.is_none()), (10, true));
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (0, 50, 0, 100));
}

#[test]
fn a_move_grants_the_receiving_region_only_what_the_donor_gave_up() {
    let mut sim = sim();
    set(&mut sim, 60);
    let token = spend(&mut sim, "t1", "s1c", 45);
    assert_eq!(outcome(&sim, token), Ok(45));
    let reply = command(
        &mut sim,
        HOME,
        Command::Move {
            account_id: "a".into(),
            from: "R".into(),
            from_shard: R,
            to: MoveTo {
                region: "R2".into(),
                quota_shard: R2,
                lease_ms: LEASE_MS,
            },
            amount: 30,
        },
    );
    assert!(matches!(reply, CommandReply::Allowances(_)), "{reply:?}");
    // Nothing is granted before the donor answers.
    assert!(
        read::account(&*sim.stores[2], R2, &quota_id("R2", "a"))
            .unwrap()
            .is_none()
    );
    settle_messages(&mut sim);
    // R had 15 unspent: only 15 moved; its 45 spent were settled meanwhile.
    assert_eq!(balances(&sim, &quota_id("R2", "a")), (0, 0, 0, 15));
    assert_eq!(allowance(&mut sim, "R2").outstanding(), 15);
    let r = allowance(&mut sim, "R");
    assert_eq!((r.settled, r.released, r.outstanding()), (45, 15, 0));
    // a's reservation did not shrink in the move: 15 for R2, and 45 posted.
    assert_eq!(balances(&sim, "a"), (15, 45, 0, 100));
    let token = {
        let mut t = transfer("t2", "a", "s2c", 15);
        t.debit_account_id = quota_id("R2", "a");
        let token = submit(&mut sim, R2, t);
        settle_messages(&mut sim);
        token
    };
    assert_eq!(outcome(&sim, token), Ok(15));
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (0, 60, 0, 100));
}

#[test]
fn at_expiry_the_region_stops_spending_and_gives_back_what_it_did_not_spend() {
    let mut sim = sim();
    set(&mut sim, 60);
    let token = spend(&mut sim, "t1", "s1c", 10);
    assert_eq!(outcome(&sim, token), Ok(10));
    tick(&mut sim, LEASE_MS - QUOTA_SKEW_MARGIN_MS);
    let late = spend(&mut sim, "t2", "s1c", 10);
    assert_eq!(outcome(&sim, late), Err(Rejection::QuotaExhausted));
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (0, 10, 0, 100));
    let home = allowance(&mut sim, "R");
    assert_eq!(
        (home.settled, home.released, home.outstanding()),
        (10, 50, 0)
    );
    let record = region_view(&mut sim, R).record;
    assert_eq!((record.closed_returned, record.close_acked), (50, 50));
}

#[test]
fn a_transfer_applied_at_home_first_refuses_its_quota_settlement() {
    let mut sim = sim();
    set(&mut sim, 60);
    // The client's first try went to the home by 2PC (another region, say) ...
    let first = submit(&mut sim, HOME, transfer("t1", "a", "s1c", 20));
    settle_messages(&mut sim);
    assert_eq!(outcome(&sim, first), Ok(20));
    // ... and a retry in R took the quota path there.
    let token = spend(&mut sim, "t1", "s1c", 20);
    assert_eq!(outcome(&sim, token), Ok(20));
    tick(&mut sim, 1_000);
    // a paid once; the refused settlement stays reserved, counted in the allowance.
    let home = allowance(&mut sim, "R");
    assert_eq!(
        (home.settled, home.refused, home.outstanding()),
        (0, 20, 60)
    );
    assert_eq!(balances(&sim, "a"), (60, 20, 0, 100));
    let view = region_view(&mut sim, R);
    assert_eq!((view.record.refused, view.in_flight), (20, 0));
}

#[test]
fn after_a_write_off_a_late_settlement_is_refused() {
    let mut sim = sim();
    set(&mut sim, 60);
    // The region spends but cannot reach the home.
    let mut t = transfer("t1", "a", "s1c", 20);
    t.debit_account_id = quota_id("R", "a");
    let token = submit(&mut sim, R, t);
    assert_eq!(outcome(&sim, token), Ok(20));
    sim.inbox.clear();
    let reply = command(
        &mut sim,
        HOME,
        Command::WriteOff {
            account_id: "a".into(),
            region: "R".into(),
        },
    );
    assert!(matches!(reply, CommandReply::Allowances(_)));
    assert_eq!(balances(&sim, "a"), (0, 0, 0, 100));
    tick(&mut sim, 1_000);
    let home = allowance(&mut sim, "R");
    assert_eq!((home.settled, home.refused), (0, 20));
    assert_eq!(balances(&sim, "a"), (0, 0, 0, 100), "never applied");
}

#[test]
fn settlements_survive_crashes_of_both_sides_and_apply_once() {
    let mut sim = sim();
    set(&mut sim, 60);
    let mut t = transfer("t1", "a", "s1c", 20);
    t.debit_account_id = quota_id("R", "a");
    let token = submit(&mut sim, R, t);
    assert_eq!(outcome(&sim, token), Ok(20));
    sim.inbox.clear(); // the first Settle is lost
    sim.crash(R);
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (40, 20, 0, 100));
    // The home applied it; its answer is lost and the home restarts: the resend is answered
    // as applied, nothing twice.
    let mut t = transfer("t2", "a", "s1c", 5);
    t.debit_account_id = quota_id("R", "a");
    submit(&mut sim, R, t);
    sim.tick_all();
    sim.deliver_all(1); // the Settle reaches the home
    sim.inbox.clear(); // its answer is lost
    sim.crash(HOME);
    tick(&mut sim, 1_000);
    tick(&mut sim, 1_000);
    assert_eq!(balances(&sim, "a"), (35, 25, 0, 100));
    let view = region_view(&mut sim, R);
    assert_eq!((view.record.settled, view.in_flight), (25, 0));
}

#[test]
fn a_change_in_progress_refuses_another() {
    let mut sim = sim();
    set(&mut sim, 60);
    let token = sim.token();
    sim.batch(
        HOME,
        vec![Input::Quota {
            token,
            command: Command::Set {
                account_id: "a".into(),
                region: "R".into(),
                quota_shard: R,
                amount: 10,
                lease_ms: LEASE_MS,
            },
        }],
    );
    sim.inbox.clear(); // the region has not answered the shrink
    let again = set(&mut sim, 20);
    assert_eq!(again, CommandReply::Refused(CommandError::ChangeInProgress));
    // Resent, answered, applied: then a new change is taken.
    tick(&mut sim, 1_000);
    assert!(matches!(set(&mut sim, 20), CommandReply::Allowances(_)));
    assert_eq!(allowance(&mut sim, "R").outstanding(), 20);
}

#[test]
fn a_close_report_lost_before_a_new_grant_is_still_applied() {
    let mut sim = sim();
    set(&mut sim, 60);
    // The lease runs out: the region closes, gives its 60 back, and its report is lost.
    sim.now_ms += LEASE_MS - QUOTA_SKEW_MARGIN_MS;
    sim.batch(R, Vec::new());
    assert!(region_view(&mut sim, R).record.closed);
    sim.inbox.clear();
    // A new grant reopens the region before the report gets through (the home still
    // reserves the 60, so it adds nothing).
    set(&mut sim, 60);
    assert!(!region_view(&mut sim, R).record.closed);
    // The report is resent all the same, and the home releases what came back.
    tick(&mut sim, 1_000);
    let home = allowance(&mut sim, "R");
    assert_eq!(
        (home.released, home.close_released, home.outstanding()),
        (60, 60, 0)
    );
    assert_eq!(balances(&sim, "a"), (0, 0, 0, 100));
    let record = region_view(&mut sim, R).record;
    assert_eq!((record.closed_returned, record.close_acked), (60, 60));
}
