//! Trace context inside the shard: what a transfer's trace needs to follow it through batches,
//! across shards and across a restart.
//!
//! A [`TraceParent`] is the W3C trace context (trace id, span id, sampled flag) in a small,
//! serialisable form. It is captured from the caller's span when a command is queued, stored in
//! coordinator and prepared records, and carried in `Prepare` and `Decide` messages, so the
//! participant's spans join the coordinator's trace, here and (once messages travel between
//! nodes) on another node.
//!
//! Phase spans (`2pc.prepare`, `2pc.decide`, `2pc.apply`, `lock.wait`, `2pc.recover`) are only
//! created for a sampled trace. With export off no caller has a valid context, so the cost is
//! one `Option` check per step.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ledger_domain::ShardId;

/// Whether this process may export spans. True unless the process said it installed no
/// OpenTelemetry layer ([`set_exporting`]; `ledgerd` does at start-up), so code that installs its
/// own layer (tests) needs nothing.
static EXPORTING: AtomicBool = AtomicBool::new(true);

/// Tells this module whether an OpenTelemetry layer is installed. Without one no span has a
/// trace context, and the lookup that finds none cost about 800 instructions, several times per
/// transfer call (`crates/bench/instructions.sh`); with `false` the answer is `None` at once.
pub fn set_exporting(exporting: bool) {
    EXPORTING.store(exporting, Ordering::Relaxed);
}

/// Whether spans may have an OpenTelemetry context (see [`set_exporting`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A W3C trace context: which trace, which span is the parent, and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// The context of an OpenTelemetry span, if it is a valid one.
    pub fn of(cx: &SpanContext) -> Option<Self> {
        cx.is_valid().then(|| Self {
            trace_id: cx.trace_id().to_bytes(),
            span_id: cx.span_id().to_bytes(),
            sampled: cx.is_sampled(),
        })
    }

    /// The OpenTelemetry context of a `tracing` span (none unless spans are being exported).
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        if !exporting() {
            return None;
        }
        Self::of(&span.context().span().span_context().clone())
    }

    /// The current span's context: what a caller hands to the shard with its command.
    pub fn current() -> Option<Self> {
        if !exporting() {
            return None; // before finding the current span, which costs as much as the lookup
        }
        Self::of_span(&tracing::Span::current())
    }

    pub fn span_context(&self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            flags,
            true,
            TraceState::default(),
        )
    }

    /// The W3C `traceparent` header value.
    pub fn header(&self) -> String {
        let cx = self.span_context();
        format!(
            "00-{}-{}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        )
    }
}

/// The part a span plays in a cross-shard operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Participant,
    /// A single-shard operation (lock waits only).
    Local,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Participant => "participant",
            Role::Local => "local",
        }
    }
}

/// A span in the trace of `parent`, named `name` (e.g. `2pc.prepare`), or `None` when that
/// trace is not sampled. The span ends when it is dropped; the engine hands spans whose step is
/// done to the runtime, which drops them once the batch that completes the step is durable.
pub(crate) fn phase(
    name: &'static str,
    parent: Option<TraceParent>,
    shard: ShardId,
    role: Role,
    op: &str,
) -> Option<tracing::Span> {
    let parent = parent.filter(|p| p.sampled)?;
    let span = tracing::info_span!(
        parent: None,
        "phase",
        otel.name = name,
        shard = shard.0,
        role = role.as_str(),
        op,
        lock = tracing::field::Empty,
        action = tracing::field::Empty,
        decision = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(parent.span_context());
    let _ = span.set_parent(cx);
    Some(span)
}

/// Links `span` to the current span (a recovery step to its term's `shard.recover` span).
pub(crate) fn link_current(span: &tracing::Span) {
    if !exporting() {
        return;
    }
    let current = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    if current.is_valid() {
        span.add_link(current);
    }
}

/// The context a child of `span` (or a message sent on its behalf) should carry.
pub(crate) fn context_of(
    span: &Option<tracing::Span>,
    fallback: Option<TraceParent>,
) -> Option<TraceParent> {
    span.as_ref().and_then(TraceParent::of_span).or(fallback)
}

/// Records the decision a `2pc.decide` span carries out (`commit` or `abort`).
pub(crate) fn decision(span: &Option<tracing::Span>, decision: crate::protocol::Decision) {
    if let Some(span) = span {
        span.record("decision", decision.name());
    }
}

/// Records how a phase ended (`prepared`, `refused: insufficient_funds`, `commit`, ...).
pub(crate) fn outcome(span: &Option<tracing::Span>, outcome: &str) {
    if let Some(span) = span {
        span.record("outcome", outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let p = TraceParent {
            trace_id: [0x0a; 16],
            span_id: [0xb7; 8],
            sampled: true,
        };
        assert_eq!(
            p.header(),
            "00-0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-b7b7b7b7b7b7b7b7-01"
        );
        assert_eq!(TraceParent::of(&p.span_context()), Some(p));
        let unsampled = TraceParent {
            sampled: false,
            ..p
        };
        assert!(unsampled.header().ends_with("-00"));
        assert!(TraceParent::of(&SpanContext::empty_context()).is_none());
    }

    #[test]
    fn no_span_for_an_unsampled_or_missing_trace() {
        let p = TraceParent {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled: false,
        };
        assert!(phase("2pc.prepare", Some(p), ShardId(0), Role::Coordinator, "t").is_none());
        assert!(phase("2pc.prepare", None, ShardId(0), Role::Coordinator, "t").is_none());
    }
}
