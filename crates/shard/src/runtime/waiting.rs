//! Callers waiting for their replies while their batch commits.

use std::collections::BTreeMap;

use foldhash::HashMap;
use tokio::sync::oneshot;

use crate::engine::{Reply, Token};

/// Callers waiting for replies: single commands, or groups that get one reply when all of
/// their items have one. A group of `len` items takes the tokens `group + 1 ..= group + len`,
/// so finding an item's group is a range lookup, not an entry per item.
#[derive(Default)]
pub(super) struct Waiting {
    next: Token,
    ones: HashMap<Token, oneshot::Sender<Reply>>,
    groups: BTreeMap<Token, Group>,
}

struct Group {
    replies: Vec<Option<Reply>>,
    remaining: usize,
    tx: oneshot::Sender<Vec<Reply>>,
}

impl Waiting {
    pub(super) fn one(&mut self, tx: oneshot::Sender<Reply>) -> Token {
        self.next += 1;
        self.ones.insert(self.next, tx);
        self.next
    }

    pub(super) fn group(
        &mut self,
        len: usize,
        tx: oneshot::Sender<Vec<Reply>>,
    ) -> std::ops::RangeInclusive<Token> {
        let group = self.next + 1;
        self.next = group + len as Token;
        let replies = (0..len).map(|_| None).collect();
        self.groups.insert(
            group,
            Group {
                replies,
                remaining: len,
                tx,
            },
        );
        if len == 0 {
            self.finish(group);
        }
        group + 1..=self.next
    }

    pub(super) fn reply(&mut self, token: Token, reply: Reply) {
        if let Some(tx) = self.ones.remove(&token) {
            let _ = tx.send(reply);
            return;
        }
        let Some((&group, g)) = self.groups.range_mut(..token).next_back() else {
            return;
        };
        let index = (token - group - 1) as usize;
        if index >= g.replies.len() || g.replies[index].is_some() {
            debug_assert!(index >= g.replies.len(), "one reply per item");
            return;
        }
        g.replies[index] = Some(reply);
        g.remaining -= 1;
        if g.remaining == 0 {
            self.finish(group);
        }
    }

    fn finish(&mut self, group: Token) {
        let g = self.groups.remove(&group).expect("group");
        let _ = g.tx.send(
            g.replies
                .into_iter()
                .map(|r| r.expect("every item replied"))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_domain::Rejection;

    const BUSY: Rejection = Rejection::AccountBusy;
    const TIMEOUT: Rejection = Rejection::LockTimeout;

    fn answer(reason: Rejection) -> Reply {
        Reply::Forward(Err(reason))
    }

    fn reasons(replies: &[Reply]) -> Vec<Rejection> {
        replies
            .iter()
            .map(|r| match r {
                Reply::Forward(Err(reason)) => *reason,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Groups and single callers interleave; each group gets its replies in item order, once
    /// every item has one, whatever order the engine answered in.
    #[test]
    fn replies_reach_their_callers_in_item_order() {
        let mut waiting = Waiting::default();
        let (one_tx, mut one_rx) = oneshot::channel();
        let single = waiting.one(one_tx);
        let (a_tx, mut a_rx) = oneshot::channel();
        let a: Vec<Token> = waiting.group(3, a_tx).collect();
        let (empty_tx, mut empty_rx) = oneshot::channel();
        assert_eq!(waiting.group(0, empty_tx).count(), 0);
        let (b_tx, mut b_rx) = oneshot::channel();
        let b: Vec<Token> = waiting.group(2, b_tx).collect();
        assert!(
            empty_rx.try_recv().unwrap().is_empty(),
            "an empty group answers at once"
        );

        waiting.reply(b[1], answer(TIMEOUT));
        waiting.reply(a[2], answer(TIMEOUT));
        waiting.reply(a[0], answer(BUSY));
        assert!(
            a_rx.try_recv().is_err(),
            "not before every item has a reply"
        );
        waiting.reply(single, answer(BUSY));
        assert_eq!(reasons(&[one_rx.try_recv().unwrap()]), [BUSY]);
        waiting.reply(a[1], answer(TIMEOUT));
        assert_eq!(reasons(&a_rx.try_recv().unwrap()), [BUSY, TIMEOUT, TIMEOUT]);
        // A token nobody waits for (already answered, or never issued) is ignored.
        waiting.reply(single, answer(BUSY));
        waiting.reply(10_000, answer(BUSY));
        assert!(b_rx.try_recv().is_err());
        waiting.reply(b[0], answer(BUSY));
        assert_eq!(reasons(&b_rx.try_recv().unwrap()), [BUSY, TIMEOUT]);
        assert!(waiting.groups.is_empty() && waiting.ones.is_empty());
    }
}
