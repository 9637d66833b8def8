//! Traces in process: a client span's context travels in `traceparent` into ledgerd; the
//! server's request span is its child, the routing span the request's; the shard's batch span
//! links to the routing span, the store commit is a child of the batch, and the transfer records
//! the trace id. A cross-shard transfer adds both participants' prepare, decide and apply spans,
//! joined across shards by the trace context in the protocol's messages.
//!
//! Spans are collected with OpenTelemetry's in-memory exporter (no collector can run here).

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use ledger_client::{Client, pb};
use ledger_tests::process::{InProcess, test_config};
use ledger_tests::wire::{pay_from_first, traced, usd_transfer};

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn attr(span: &SpanData, key: &str) -> String {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
        .unwrap_or_default()
}

/// The one span named `name` with role `role` for transfer `op`.
fn phase<'a>(spans: &'a [SpanData], name: &str, role: &str, op: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == name && attr(s, "role") == role && attr(s, "op") == op)
        .collect();
    assert_eq!(found.len(), 1, "one {name} ({role}) for {op}: {found:#?}");
    found[0]
}

/// The batch spans that link to `span`, each with a store commit as its child.
fn committed_by<'a>(spans: &'a [SpanData], span: &SpanData) -> Vec<&'a SpanData> {
    let id = span.span_context.span_id();
    let batches: Vec<&SpanData> = named(spans, "shard.batch")
        .into_iter()
        .filter(|b| b.links.iter().any(|l| l.span_context.span_id() == id))
        .collect();
    for b in &batches {
        assert!(
            named(spans, "store.commit")
                .iter()
                .any(|c| c.parent_span_id == b.span_context.span_id()),
            "the store commit is a child of its batch"
        );
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_is_one_trace_from_client_to_store_commit() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("test"))
        .with_filter(EnvFilter::new(
            "info,h2=off,hyper=off,hyper_util=off,tower=off,tonic=off",
        ));
    tracing_subscriber::registry().with(layer).init();

    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;

    let client_span = tracing::info_span!("client.transfers", otel.kind = "client");
    let client_cx = client_span.context().span().span_context().clone();
    assert!(client_cx.is_valid(), "the OpenTelemetry layer is installed");
    let trace_id: TraceId = client_cx.trace_id();
    let client_span_id: SpanId = client_cx.span_id();
    let traceparent = format!("00-{trace_id}-{client_span_id}-01");
    let client = Client::connect(&server.addr)
        .await
        .unwrap()
        .with_traceparent(&traceparent)
        .unwrap();

    // One transfer per call from acct-0 to each other account: some same-shard, some
    // cross-shard (4 shards).
    let (ids, committed) = pay_from_first(&client, 8).await;
    let mut cross = Vec::new();
    for t in committed {
        assert_eq!(
            t.trace_id,
            trace_id.to_string(),
            "the result carries the trace id"
        );
        if t.cross_shard {
            cross.push(t.id);
        }
    }
    assert!(!cross.is_empty(), "at least one transfer was cross-shard");
    let got = client.get_transfers(vec!["t-1".into()]).await.unwrap();
    assert_eq!(
        got.transfers[0].trace_id,
        trace_id.to_string(),
        "GetTransfers returns the trace id the transfer was created under"
    );
    // The server answers with its own span's traceparent, in the caller's trace.
    let mut raw = pb::ledger_service_client::LedgerServiceClient::connect(server.addr.clone())
        .await
        .unwrap();
    let request = traced(usd_transfer("t-raw", &ids[0], &ids[1], 1), &traceparent);
    let response = raw.transfer(request).await.unwrap();
    let answered = response
        .metadata()
        .get("traceparent")
        .expect("a traceparent on the response")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        answered.starts_with(&format!("00-{trace_id}-")),
        "{answered}"
    );
    assert!(
        !answered.contains(&client_span_id.to_string()),
        "the server's own span"
    );
    // A call whose caller did not sample its trace: none of its spans is recorded, and the
    // batch that commits it gets no span of its own.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let unsampled_parent = format!("00-{unsampled}-b7ad6b7169203331-00");
    let request = traced(
        usd_transfer("t-unsampled", &ids[0], &ids[1], 1),
        &unsampled_parent,
    );
    raw.transfer(request).await.unwrap();
    drop(client_span); // ends the client span: exported
    server.stop().await;
    let provider = tokio::task::spawn_blocking(move || {
        provider.force_flush().unwrap();
        provider
    })
    .await
    .unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let client_spans = named(&spans, "client.transfers");
    assert_eq!(client_spans.len(), 1);
    assert!(
        spans
            .iter()
            .all(|s| s.span_context.trace_id().to_string() != unsampled),
        "nothing of the unsampled call is recorded"
    );
    let batches = named(&spans, "shard.batch");
    assert!(!batches.is_empty());
    for b in batches {
        assert!(
            !b.links.is_empty()
                && b.links
                    .iter()
                    .all(|l| l.span_context.trace_id() == trace_id),
            "a batch span exists only inside a sampled trace, and links to it: {b:?}"
        );
    }
    let requests: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "/ledger.v1.LedgerService/Transfer")
        .collect();
    assert_eq!(requests.len(), 8, "one server span per Transfer call");
    let mut routes = Vec::new();
    for r in &requests {
        assert_eq!(r.span_context.trace_id(), trace_id, "same trace");
        assert_eq!(r.parent_span_id, client_span_id, "child of the client span");
        let route: Vec<&SpanData> = named(&spans, "router.route")
            .into_iter()
            .filter(|s| s.parent_span_id == r.span_context.span_id())
            .collect();
        assert_eq!(route.len(), 1, "one routing span per request");
        assert!(
            !committed_by(&spans, route[0]).is_empty(),
            "the transfer's batch links to its routing span (links, not parents)"
        );
        routes.push(route[0]);
    }

    // A cross-shard transfer: both participants' phases, with parentage across shards.
    for op in &cross {
        let c_prepare = phase(&spans, "2pc.prepare", "coordinator", op);
        let p_prepare = phase(&spans, "2pc.prepare", "participant", op);
        let c_decide = phase(&spans, "2pc.decide", "coordinator", op);
        let p_decide = phase(&spans, "2pc.decide", "participant", op);
        let c_apply = phase(&spans, "2pc.apply", "coordinator", op);
        let p_apply = phase(&spans, "2pc.apply", "participant", op);
        let route = c_prepare.parent_span_id;
        assert!(
            routes.iter().any(|r| r.span_context.span_id() == route),
            "the coordinator's prepare is a child of the routing span"
        );
        assert_eq!(c_decide.parent_span_id, route);
        assert_eq!(p_prepare.parent_span_id, c_prepare.span_context.span_id());
        assert_eq!(p_decide.parent_span_id, c_decide.span_context.span_id());
        assert_eq!(c_apply.parent_span_id, c_decide.span_context.span_id());
        assert_eq!(p_apply.parent_span_id, p_decide.span_context.span_id());
        assert_ne!(
            attr(c_prepare, "shard"),
            attr(p_prepare, "shard"),
            "two shards took part"
        );
        assert_eq!(attr(c_prepare, "outcome"), "prepared");
        assert_eq!(attr(p_prepare, "outcome"), "prepared");
        assert_eq!(attr(c_decide, "decision"), "commit");
        assert_eq!(attr(c_decide, "outcome"), "acked");
        assert_eq!(attr(p_decide, "outcome"), "applied");
        for s in [c_prepare, p_prepare, c_decide, p_decide] {
            assert_eq!(s.span_context.trace_id(), trace_id, "one trace: {s:?}");
        }
        // Each shard's step is made durable by a batch that links to it.
        for s in [c_prepare, p_prepare, c_decide, p_decide] {
            assert!(
                !committed_by(&spans, s).is_empty(),
                "a batch with a store commit links to {} ({})",
                s.name,
                attr(s, "role")
            );
        }
    }
    drop(provider);
}
