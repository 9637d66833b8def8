//! Model-based test: random operations against a two-shard cluster of real engines (over
//! memory stores, messages delivered by the test) and against the reference ledger. Every
//! outcome and, at the end, every balance and version must agree, and the invariant checkers
//! must find nothing. Crashes are injected in the middle of cross-shard transfers; the client
//! then retries the same id, as a real client would, and the result must still be "applied
//! exactly once".
//!
//! Transfer ids are unique per coordinating shard (the debit account's; see "Idempotency scope"
//! in docs/ARCHITECTURE.md), so the generated ids carry their shard: `t7` is used only with
//! debit accounts on shard 0 and `x1-t7` only on shard 1. This test found that scope: reusing
//! an id with a debit account on another shard is not detected.

use std::sync::Arc;

use proptest::prelude::*;

use ledger_domain::{AccountFlags, NewAccount, Rejection, ShardId, Transfer, TransferKind};
use ledger_shard::engine::{Input, Reply};
use ledger_shard::sim::Sim;
use ledger_shard::{Options, read};
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::reference::Reference;

const ACCOUNTS: [(&str, &str, bool); 5] = [
    ("a", "USD", true),
    ("b", "USD", false),
    ("s1-c", "USD", true),
    ("s1-d", "USD", false),
    ("s1-e", "EUR", false),
];

fn shard_of(id: &str) -> ShardId {
    if id.starts_with("s1") {
        ShardId(1)
    } else {
        ShardId(0)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Transfer {
        id: u8,
        debit: usize,
        credit: usize,
        amount: u64,
        pending: bool,
        timeout_k: u32,
        expect: Option<u64>,
    },
    Post {
        id: u8,
        shard: u32,
        pending: u8,
        amount: u64,
    },
    Void {
        id: u8,
        shard: u32,
        pending: u8,
    },
    Advance {
        k: u64,
    },
    /// Crash `shard` after `after` protocol messages of the next transfer.
    Crash {
        shard: u32,
        after: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, 0usize..5, 0usize..5, 1u64..400, any::<bool>(), 0u32..3, prop::option::weighted(0.1, 0u64..4))
            .prop_map(|(id, debit, credit, amount, pending, timeout_k, expect)| Op::Transfer {
                id, debit, credit, amount, pending, timeout_k, expect
            }),
        2 => (0u8..24, 0u32..2, 0u8..24, 0u64..300)
            .prop_map(|(id, shard, pending, amount)| Op::Post { id, shard, pending, amount }),
        1 => (0u8..24, 0u32..2, 0u8..24).prop_map(|(id, shard, pending)| Op::Void { id, shard, pending }),
        1 => (1u64..3).prop_map(|k| Op::Advance { k }),
        2 => (0u32..2, 0usize..4).prop_map(|(shard, after)| Op::Crash { shard, after }),
    ]
}

struct Harness {
    sim: Sim,
    reference: Reference,
    crash: Option<(ShardId, usize)>,
    /// Deliver each shard's queued messages in one batch (`Sim::deliver_grouped`) instead of
    /// one batch per message.
    grouped: bool,
    /// Lose every this-many-th message (the protocol's resends must make up for it).
    lose_every: Option<usize>,
    sent: usize,
}

impl Harness {
    fn new(grouped: bool, lose_every: Option<usize>) -> Self {
        // retry 0: every tick resends, so recovery needs no time to pass (time moves only at
        // Advance, identically for the model).
        let options = Options {
            retry_ms: 0,
            prepared_query_ms: 0,
            ..Options::default()
        };
        let mut sim = Sim::new(2, Arc::new(|id: &str| Some(shard_of(id))), options);
        let mut reference = Reference::default();
        reference.now_ms = sim.now_ms;
        for (id, ledger, no_overdraft) in ACCOUNTS {
            let spec = NewAccount {
                id: id.into(),
                ledger: ledger.into(),
                placement_key: id.into(),
                flags: AccountFlags {
                    debits_must_not_exceed_credits: no_overdraft,
                    ..Default::default()
                },
                ..Default::default()
            };
            let token = sim.token();
            sim.batch(
                shard_of(id),
                vec![Input::CreateAccount {
                    token,
                    account: spec.clone(),
                }],
            );
            reference.create_account(spec);
        }
        Harness {
            sim,
            reference,
            crash: None,
            grouped,
            lose_every,
            sent: 0,
        }
    }

    /// Delivers what is queued (and what that sends), one way or the other.
    fn deliver(&mut self) {
        for _ in 0..1_000 {
            if self.sim.inbox.is_empty() {
                return;
            }
            if let Some(every) = self.lose_every {
                let sent = &mut self.sent;
                self.sim.inbox.retain(|_| {
                    *sent += 1;
                    // A scrambled counter: losses follow no period a resend could match.
                    !(*sent as u64)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .rotate_left(17)
                        .is_multiple_of(every as u64)
                });
            }
            if self.grouped {
                self.sim.deliver_grouped(1);
            } else {
                let queued = self.sim.inbox.len();
                self.sim.deliver_all(queued);
            }
        }
    }

    /// Runs ticks and deliveries until no message is left and nothing is in flight.
    fn settle(&mut self) {
        for _ in 0..200 {
            self.sim.tick_all();
            self.deliver();
            let quiet = self.sim.inbox.is_empty()
                && (0..2).all(|i| {
                    read::in_flight(&*self.sim.stores[i], ShardId(i as u32)).unwrap() == (0, 0)
                });
            if quiet {
                return;
            }
        }
        panic!("the cluster did not settle");
    }

    /// What the router does for a post/void: find the hold's shard, or answer unrecorded.
    fn route(&self, t: &Transfer) -> Result<ShardId, Rejection> {
        if !matches!(
            t.kind,
            TransferKind::PostPending | TransferKind::VoidPending
        ) {
            return Ok(shard_of(&t.debit_account_id));
        }
        for i in 0..2 {
            if read::transfer(&*self.sim.stores[i], ShardId(i as u32), &t.id)
                .unwrap()
                .is_some()
            {
                return Ok(ShardId(i as u32));
            }
        }
        for i in 0..2 {
            let shard = ShardId(i);
            if let Some(hold) =
                read::hold(&*self.sim.stores[i as usize], shard, &t.pending_id).unwrap()
            {
                return Ok(shard_of(&hold.debit_account_id));
            }
        }
        let exists = (0..2).any(|i| {
            read::transfer(&*self.sim.stores[i], ShardId(i as u32), &t.pending_id)
                .unwrap()
                .is_some()
        });
        Err(if exists {
            Rejection::PendingTransferNotPending
        } else {
            Rejection::PendingTransferNotFound
        })
    }

    /// Submits a transfer like a client: wait for the reply; if the leader died with it,
    /// retry the same id.
    fn transfer(&mut self, t: &Transfer) -> Result<u64, Rejection> {
        let shard = self.route(t)?;
        let mut crash = self.crash.take();
        for _attempt in 0..20 {
            let token = self.sim.token();
            self.sim.batch(
                shard,
                vec![Input::CreateTransfer {
                    token,
                    transfer: t.clone(),
                    trace: None,
                }],
            );
            if let Some((victim, after)) = crash.take() {
                for _ in 0..after {
                    self.sim.deliver_all(1);
                }
                self.sim.crash(victim);
            }
            for _ in 0..50 {
                if let Some(Reply::Transfer(reply)) = self.sim.replies.get(&token) {
                    let result = reply.outcome();
                    if matches!(result, Err(r) if r.is_retriable()) {
                        break; // retry the same id
                    }
                    self.settle();
                    return result;
                }
                if self.sim.inbox.is_empty() {
                    self.sim.tick_all();
                    if self.sim.inbox.is_empty() && !self.sim.replies.contains_key(&token) {
                        break; // the waiter was lost with a crashed leader: retry
                    }
                }
                self.deliver();
            }
            self.settle();
        }
        panic!("transfer {} never got an answer", t.id);
    }

    fn apply(&mut self, op: Op) {
        let tid = |shard: u32, n: u8| {
            if shard == 1 {
                format!("x1-t{n}")
            } else {
                format!("t{n}")
            }
        };
        let base = |shard: u32, id: u8| Transfer {
            id: tid(shard, id),
            ..Transfer::default()
        };
        let t = match op {
            Op::Transfer {
                id,
                debit,
                credit,
                amount,
                pending,
                timeout_k,
                expect,
            } => Transfer {
                debit_account_id: ACCOUNTS[debit].0.into(),
                credit_account_id: ACCOUNTS[credit].0.into(),
                amount,
                ledger: "USD".into(),
                kind: if pending {
                    TransferKind::Pending
                } else {
                    TransferKind::Posted
                },
                timeout_seconds: if pending { timeout_k * 1_000 } else { 0 },
                expected_debit_version: expect,
                ..base(shard_of(ACCOUNTS[debit].0).0, id)
            },
            Op::Post {
                id,
                shard,
                pending,
                amount,
            } => Transfer {
                kind: TransferKind::PostPending,
                pending_id: tid(shard, pending),
                amount,
                ..base(shard, id)
            },
            Op::Void { id, shard, pending } => Transfer {
                kind: TransferKind::VoidPending,
                pending_id: tid(shard, pending),
                ..base(shard, id)
            },
            Op::Advance { k } => {
                self.sim.now_ms += k * 1_000_000;
                self.reference.advance(k * 1_000_000);
                self.settle();
                return;
            }
            Op::Crash { shard, after } => {
                self.crash = Some((ShardId(shard), after));
                return;
            }
        };
        if t.validate().is_err() {
            return; // The API refuses it before any shard sees it.
        }
        let expected = self.reference.transfer(&t);
        let got = self.transfer(&t);
        assert_eq!(got, expected, "transfer {t:?}");
    }

    fn check_final(&self) {
        for (id, model) in &self.reference.accounts {
            let shard = shard_of(id);
            let real = read::account(&*self.sim.stores[shard.0 as usize], shard, id)
                .unwrap()
                .unwrap();
            assert_eq!(real.balances, model.balances, "balances of {id}");
            assert_eq!(real.version, model.version, "version of {id}");
        }
        let stores: Vec<&dyn Store> = self.sim.stores.iter().map(|s| &**s as &dyn Store).collect();
        let violations = checks::all(&checks::Snapshot::read(&stores));
        assert!(violations.is_empty(), "{violations:#?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engines_agree_with_the_reference_ledger(
        ops in prop::collection::vec(op(), 1..60),
        grouped in any::<bool>(),
        lose_every in prop::option::of(3usize..8),
    ) {
        let mut h = Harness::new(grouped, lose_every);
        // Fund the no-overdraft accounts so debits from them can succeed.
        for (i, (id, _, _)) in ACCOUNTS.iter().enumerate().filter(|(_, a)| a.2) {
            let fund = Transfer {
                id: format!("fund{i}"),
                debit_account_id: "b".into(),
                credit_account_id: (*id).into(),
                amount: 1_000,
                ledger: "USD".into(),
                ..Transfer::default()
            };
            let expected = h.reference.transfer(&fund);
            prop_assert_eq!(h.transfer(&fund), expected);
        }
        for op in ops {
            h.apply(op);
        }
        h.check_final();
    }
}
