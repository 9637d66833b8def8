//! Shard messages <-> `ledger.internal.v1` protobuf (`proto/ledger/internal/v1/internal.proto`).
//!
//! To the wire cannot fail. From the wire checks every field a message needs and refuses a
//! message that lacks one or names an unknown value (a newer peer's, or damage) with
//! [`WireError`] naming the field: the receiving node drops it, and the protocol's resends
//! recover once both nodes speak the same version.

use ledger_domain::{Change, EntryKind, Rejection, Side};
use ledger_proto::ledger::internal::v1 as pb;

use super::{Attempt, Decision, Leg, Message};
use crate::trace::TraceParent;

/// A message from a peer that this build cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("internal message: field {field}: {reason}")]
pub struct WireError {
    pub field: &'static str,
    pub reason: String,
}

fn missing(field: &'static str) -> WireError {
    WireError {
        field,
        reason: "missing".into(),
    }
}

fn unknown(field: &'static str, value: impl std::fmt::Display) -> WireError {
    WireError {
        field,
        reason: format!("unknown value {value}"),
    }
}

impl From<&Message> for pb::ShardMessage {
    fn from(message: &Message) -> Self {
        use pb::shard_message::Kind;
        let kind = match message {
            Message::Prepare(leg) => Kind::Prepare(leg.into()),
            Message::Prepared {
                attempt,
                version_after,
            } => Kind::Prepared(pb::Prepared {
                attempt: Some(attempt.into()),
                version_after: *version_after,
            }),
            Message::Refused { attempt, reason } => Kind::Refused(pb::Refused {
                attempt: Some(attempt.into()),
                reason: reason.code(),
            }),
            Message::Decide {
                attempt,
                decision,
                committed_at_ms,
                trace,
            } => Kind::Decide(pb::Decide {
                attempt: Some(attempt.into()),
                decision: match decision {
                    Decision::Commit => pb::Decision::Commit,
                    Decision::Abort => pb::Decision::Abort,
                }
                .into(),
                committed_at_unix_ms: *committed_at_ms,
                trace: trace.as_ref().map(Into::into),
            }),
            Message::Acked { attempt } => Kind::Acked(attempt.into()),
            Message::QueryDecision { attempt } => Kind::QueryDecision(attempt.into()),
            Message::Grant {
                account_id,
                region,
                ledger,
                epoch,
                add,
                expires_at_ms,
            } => Kind::Grant(pb::QuotaGrant {
                account_id: account_id.clone(),
                region: region.clone(),
                ledger: ledger.clone(),
                epoch: *epoch,
                add: *add,
                expires_at_unix_ms: *expires_at_ms,
            }),
            Message::Shrink {
                account_id,
                region,
                epoch,
                amount,
                expires_at_ms,
            } => Kind::Shrink(pb::QuotaShrink {
                account_id: account_id.clone(),
                region: region.clone(),
                epoch: *epoch,
                amount: *amount,
                expires_at_unix_ms: *expires_at_ms,
            }),
            Message::QuotaAck {
                account_id,
                region,
                epoch,
                moved,
            } => Kind::QuotaAck(pb::QuotaAck {
                account_id: account_id.clone(),
                region: region.clone(),
                epoch: *epoch,
                moved: *moved,
            }),
            Message::Closed {
                account_id,
                region,
                epoch,
                returned,
            } => Kind::Closed(pb::QuotaClosed {
                account_id: account_id.clone(),
                region: region.clone(),
                epoch: *epoch,
                returned: *returned,
            }),
            Message::CloseAck {
                account_id,
                returned,
            } => Kind::CloseAck(pb::QuotaCloseAck {
                account_id: account_id.clone(),
                returned: *returned,
            }),
            Message::Settle { region, entries } => Kind::Settle(pb::Settle {
                region: region.clone(),
                entries: entries
                    .iter()
                    .map(|s| {
                        let mut transfer = ledger_proto::transfer_to_wire(&s.transfer);
                        let trace_id = std::mem::take(&mut transfer.trace_id);
                        pb::Settlement {
                            seq: s.seq,
                            epoch: s.epoch,
                            transfer: Some(transfer),
                            spent_at_unix_ms: s.spent_at_ms,
                            trace: s.trace.as_ref().map(Into::into),
                            trace_id,
                        }
                    })
                    .collect(),
            }),
            Message::SettleAck { results } => Kind::SettleAck(pb::SettleAck {
                results: results
                    .iter()
                    .map(|r| pb::SettleResult {
                        account_id: r.account_id.clone(),
                        seq: r.seq,
                        amount: r.amount,
                        refused: r.refused.clone().unwrap_or_default(),
                    })
                    .collect(),
            }),
        };
        pb::ShardMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::ShardMessage> for Message {
    type Error = WireError;

    fn try_from(message: pb::ShardMessage) -> Result<Self, WireError> {
        use pb::shard_message::Kind;
        Ok(match message.kind.ok_or_else(|| missing("kind"))? {
            Kind::Prepare(leg) => Message::Prepare(leg.try_into()?),
            Kind::Prepared(p) => Message::Prepared {
                attempt: attempt(p.attempt)?,
                version_after: p.version_after,
            },
            Kind::Refused(r) => Message::Refused {
                attempt: attempt(r.attempt)?,
                reason: Rejection::from_code(r.reason)
                    .ok_or_else(|| unknown("refused.reason", r.reason))?,
            },
            Kind::Decide(d) => Message::Decide {
                attempt: attempt(d.attempt)?,
                decision: match pb::Decision::try_from(d.decision) {
                    Ok(pb::Decision::Commit) => Decision::Commit,
                    Ok(pb::Decision::Abort) => Decision::Abort,
                    _ => return Err(unknown("decide.decision", d.decision)),
                },
                committed_at_ms: d.committed_at_unix_ms,
                trace: d.trace.map(TryInto::try_into).transpose()?,
            },
            Kind::Acked(a) => Message::Acked {
                attempt: attempt(Some(a))?,
            },
            Kind::QueryDecision(a) => Message::QueryDecision {
                attempt: attempt(Some(a))?,
            },
            Kind::Grant(g) => Message::Grant {
                account_id: required("grant.account_id", g.account_id)?,
                region: required("grant.region", g.region)?,
                ledger: required("grant.ledger", g.ledger)?,
                epoch: g.epoch,
                add: g.add,
                expires_at_ms: g.expires_at_unix_ms,
            },
            Kind::Shrink(s) => Message::Shrink {
                account_id: required("shrink.account_id", s.account_id)?,
                region: required("shrink.region", s.region)?,
                epoch: s.epoch,
                amount: s.amount,
                expires_at_ms: s.expires_at_unix_ms,
            },
            Kind::QuotaAck(a) => Message::QuotaAck {
                account_id: required("quota_ack.account_id", a.account_id)?,
                region: required("quota_ack.region", a.region)?,
                epoch: a.epoch,
                moved: a.moved,
            },
            Kind::Closed(c) => Message::Closed {
                account_id: required("closed.account_id", c.account_id)?,
                region: required("closed.region", c.region)?,
                epoch: c.epoch,
                returned: c.returned,
            },
            Kind::CloseAck(c) => Message::CloseAck {
                account_id: required("close_ack.account_id", c.account_id)?,
                returned: c.returned,
            },
            Kind::Settle(s) => Message::Settle {
                region: required("settle.region", s.region)?,
                entries: s
                    .entries
                    .into_iter()
                    .map(|e| {
                        let transfer = e.transfer.ok_or_else(|| missing("settle.transfer"))?;
                        let mut transfer =
                            ledger_proto::transfer(transfer).map_err(|e| WireError {
                                field: "settle.transfer",
                                reason: e.to_string(),
                            })?;
                        transfer.trace_id = e.trace_id;
                        Ok(crate::quota::Settlement {
                            seq: e.seq,
                            epoch: e.epoch,
                            transfer,
                            spent_at_ms: e.spent_at_unix_ms,
                            trace: e.trace.map(TryInto::try_into).transpose()?,
                        })
                    })
                    .collect::<Result<_, WireError>>()?,
            },
            Kind::SettleAck(a) => Message::SettleAck {
                results: a
                    .results
                    .into_iter()
                    .map(|r| {
                        Ok(crate::quota::SettleResult {
                            account_id: required("settle_ack.account_id", r.account_id)?,
                            seq: r.seq,
                            amount: r.amount,
                            refused: (!r.refused.is_empty()).then_some(r.refused),
                        })
                    })
                    .collect::<Result<_, WireError>>()?,
            },
        })
    }
}

fn required(field: &'static str, value: String) -> Result<String, WireError> {
    if value.is_empty() {
        return Err(missing(field));
    }
    Ok(value)
}

impl From<&Attempt> for pb::Attempt {
    fn from(a: &Attempt) -> Self {
        pb::Attempt {
            op: a.op.clone(),
            epoch: a.epoch,
            seq: a.seq,
        }
    }
}

fn attempt(a: Option<pb::Attempt>) -> Result<Attempt, WireError> {
    let a = a.ok_or_else(|| missing("attempt"))?;
    if a.op.is_empty() {
        return Err(missing("attempt.op"));
    }
    Ok(Attempt {
        op: a.op,
        epoch: a.epoch,
        seq: a.seq,
    })
}

impl From<&Leg> for pb::Leg {
    fn from(leg: &Leg) -> Self {
        pb::Leg {
            attempt: Some((&leg.attempt).into()),
            account_id: leg.account_id.clone(),
            ledger: leg.ledger.clone(),
            change: Some(pb::Change {
                side: match leg.change.side {
                    Side::Debit => pb::Side::Debit,
                    Side::Credit => pb::Side::Credit,
                }
                .into(),
                pending_add: leg.change.pending_add,
                pending_sub: leg.change.pending_sub,
                posted_add: leg.change.posted_add,
            }),
            expected_version: leg.expected_version,
            transfer_id: leg.transfer_id.clone(),
            entry_kind: match leg.entry_kind {
                EntryKind::Posted => pb::EntryKind::Posted,
                EntryKind::Pending => pb::EntryKind::Pending,
                EntryKind::PostPending => pb::EntryKind::PostPending,
                EntryKind::VoidPending => pb::EntryKind::VoidPending,
                EntryKind::ExpirePending => pb::EntryKind::ExpirePending,
            }
            .into(),
            code: leg.code,
            trace: leg.trace.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<pb::Leg> for Leg {
    type Error = WireError;

    fn try_from(leg: pb::Leg) -> Result<Self, WireError> {
        let change = leg.change.ok_or_else(|| missing("leg.change"))?;
        let side = match pb::Side::try_from(change.side) {
            Ok(pb::Side::Debit) => Side::Debit,
            Ok(pb::Side::Credit) => Side::Credit,
            _ => return Err(unknown("leg.change.side", change.side)),
        };
        let entry_kind = match pb::EntryKind::try_from(leg.entry_kind) {
            Ok(pb::EntryKind::Posted) => EntryKind::Posted,
            Ok(pb::EntryKind::Pending) => EntryKind::Pending,
            Ok(pb::EntryKind::PostPending) => EntryKind::PostPending,
            Ok(pb::EntryKind::VoidPending) => EntryKind::VoidPending,
            Ok(pb::EntryKind::ExpirePending) => EntryKind::ExpirePending,
            _ => return Err(unknown("leg.entry_kind", leg.entry_kind)),
        };
        if leg.account_id.is_empty() {
            return Err(missing("leg.account_id"));
        }
        Ok(Leg {
            attempt: attempt(leg.attempt)?,
            account_id: leg.account_id,
            ledger: leg.ledger,
            change: Change {
                side,
                pending_add: change.pending_add,
                pending_sub: change.pending_sub,
                posted_add: change.posted_add,
            },
            expected_version: leg.expected_version,
            transfer_id: leg.transfer_id,
            entry_kind,
            code: leg.code,
            trace: leg.trace.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<&TraceParent> for pb::TraceContext {
    fn from(t: &TraceParent) -> Self {
        pb::TraceContext {
            trace_id: t.trace_id.to_vec(),
            span_id: t.span_id.to_vec(),
            sampled: t.sampled,
        }
    }
}

impl TryFrom<pb::TraceContext> for TraceParent {
    type Error = WireError;

    fn try_from(t: pb::TraceContext) -> Result<Self, WireError> {
        let length = |field, got: usize| WireError {
            field,
            reason: format!("{got} bytes"),
        };
        Ok(TraceParent {
            trace_id: t
                .trace_id
                .as_slice()
                .try_into()
                .map_err(|_| length("trace.trace_id", t.trace_id.len()))?,
            span_id: t
                .span_id
                .as_slice()
                .try_into()
                .map_err(|_| length("trace.span_id", t.span_id.len()))?,
            sampled: t.sampled,
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn attempt(op: &str) -> Attempt {
        Attempt {
            op: op.into(),
            epoch: 3,
            seq: 9,
        }
    }

    /// Every kind of message survives encoding to protobuf bytes and back, field for field.
    #[test]
    fn every_message_round_trips_through_protobuf_bytes() {
        let trace = TraceParent {
            trace_id: [7; 16],
            span_id: [5; 8],
            sampled: true,
        };
        let leg = Leg {
            attempt: attempt("x1"),
            account_id: "s1-b".into(),
            ledger: "USD".into(),
            change: Change {
                side: Side::Credit,
                pending_add: 0,
                pending_sub: 4,
                posted_add: 4,
            },
            expected_version: Some(12),
            transfer_id: "p1".into(),
            entry_kind: EntryKind::PostPending,
            code: 77,
            trace: Some(trace),
        };
        let messages = [
            Message::Prepare(leg.clone()),
            Message::Prepare(Leg {
                expected_version: None,
                trace: None,
                ..leg
            }),
            Message::Prepared {
                attempt: attempt("x1"),
                version_after: 13,
            },
            Message::Refused {
                attempt: attempt("!expire:h1"),
                reason: Rejection::ExceedsCredits,
            },
            Message::Decide {
                attempt: attempt("x1"),
                decision: Decision::Commit,
                committed_at_ms: 1_700_000_000_123,
                trace: Some(trace),
            },
            Message::Decide {
                attempt: attempt("x1"),
                decision: Decision::Abort,
                committed_at_ms: 0,
                trace: None,
            },
            Message::Acked {
                attempt: attempt("x1"),
            },
            Message::QueryDecision {
                attempt: attempt("x1"),
            },
            Message::Grant {
                account_id: "alice".into(),
                region: "us".into(),
                ledger: "USD".into(),
                epoch: 4,
                add: 300,
                expires_at_ms: 1_700_000_000_000,
            },
            Message::Shrink {
                account_id: "alice".into(),
                region: "us".into(),
                epoch: 5,
                amount: 100,
                expires_at_ms: 1_700_000_000_000,
            },
            Message::QuotaAck {
                account_id: "alice".into(),
                region: "us".into(),
                epoch: 5,
                moved: 60,
            },
            Message::Closed {
                account_id: "alice".into(),
                region: "us".into(),
                epoch: 5,
                returned: 7,
            },
            Message::CloseAck {
                account_id: "alice".into(),
                returned: 7,
            },
            // A transfer as the service records it: with the trace id of its call.
            Message::Settle {
                region: "us".into(),
                entries: vec![crate::quota::Settlement {
                    seq: 3,
                    epoch: 5,
                    transfer: ledger_domain::Transfer {
                        id: "t1".into(),
                        debit_account_id: "alice".into(),
                        credit_account_id: "shop".into(),
                        amount: 10,
                        ledger: "USD".into(),
                        code: 2,
                        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                        ..ledger_domain::Transfer::default()
                    },
                    spent_at_ms: 1_700_000_000_001,
                    trace: Some(trace),
                }],
            },
            Message::SettleAck {
                results: vec![
                    crate::quota::SettleResult {
                        account_id: "alice".into(),
                        seq: 3,
                        amount: 10,
                        refused: None,
                    },
                    crate::quota::SettleResult {
                        account_id: "alice".into(),
                        seq: 4,
                        amount: 5,
                        refused: Some("duplicate".into()),
                    },
                ],
            },
        ];
        for message in messages {
            let bytes = pb::ShardMessage::from(&message).encode_to_vec();
            let back = pb::ShardMessage::decode(bytes.as_slice()).unwrap();
            assert_eq!(Message::try_from(back).unwrap(), message);
        }
    }

    #[test]
    fn a_message_missing_a_field_or_with_an_unknown_value_is_refused_by_name() {
        let decide = pb::ShardMessage {
            kind: Some(pb::shard_message::Kind::Decide(pb::Decide {
                attempt: Some((&attempt("x1")).into()),
                decision: pb::Decision::Unspecified.into(),
                committed_at_unix_ms: 1,
                trace: None,
            })),
        };
        assert_eq!(
            Message::try_from(decide).unwrap_err().field,
            "decide.decision"
        );
        let refused = pb::ShardMessage {
            kind: Some(pb::shard_message::Kind::Refused(pb::Refused {
                attempt: Some((&attempt("x1")).into()),
                reason: 9_999,
            })),
        };
        assert_eq!(
            Message::try_from(refused).unwrap_err().field,
            "refused.reason"
        );
        let acked = pb::ShardMessage {
            kind: Some(pb::shard_message::Kind::Acked(pb::Attempt::default())),
        };
        assert_eq!(Message::try_from(acked).unwrap_err().field, "attempt.op");
        let empty = pb::ShardMessage { kind: None };
        assert_eq!(Message::try_from(empty).unwrap_err().field, "kind");
    }
}
