//! Traces in process: a client span's context travels in `traceparent` into ledgerd; the
//! server's request span is its child, the shard's batch span links to the request span, the
//! store commit is a child of the batch, and the transfer records the trace id.
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

fn account(id: &str) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        ..Default::default()
    }
}

fn transfer(id: &str, debit: &str, credit: &str) -> pb::Transfer {
    pb::Transfer {
        id: id.into(),
        debit_account_id: debit.into(),
        credit_account_id: credit.into(),
        amount: 1,
        ledger: "USD".into(),
        ..Default::default()
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
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

    let ids: Vec<String> = (0..8).map(|i| format!("acct-{i}")).collect();
    client
        .create_accounts(ids.iter().map(|id| account(id)).collect())
        .await
        .unwrap();
    // One transfer per call from acct-0 to each other account: some same-shard, some
    // cross-shard (4 shards).
    let mut cross = 0;
    for (n, id) in ids.iter().enumerate().skip(1) {
        let result = client
            .transfer(transfer(&format!("t-{n}"), &ids[0], id))
            .await
            .unwrap();
        let Some(pb::transfer_result::Outcome::Transfer(t)) = result.outcome else {
            panic!("committed: {result:?}")
        };
        assert_eq!(
            t.trace_id,
            trace_id.to_string(),
            "the result carries the trace id"
        );
        cross += usize::from(t.cross_shard);
    }
    assert!(cross > 0, "at least one transfer was cross-shard");
    let got = client.get_transfers(vec!["t-1".into()]).await.unwrap();
    assert_eq!(
        got.transfers[0].trace_id,
        trace_id.to_string(),
        "GetTransfers returns the trace id the transfer was created under"
    );
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
    let requests: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "/ledger.v1.LedgerService/Transfer")
        .collect();
    assert_eq!(requests.len(), 7, "one server span per Transfer call");
    for r in &requests {
        assert_eq!(r.span_context.trace_id(), trace_id, "same trace");
        assert_eq!(r.parent_span_id, client_span_id, "child of the client span");
    }
    let batches = named(&spans, "shard.batch");
    let linked: Vec<&&SpanData> = batches
        .iter()
        .filter(|b| {
            b.links.iter().any(|l| {
                requests
                    .iter()
                    .any(|r| r.span_context.span_id() == l.span_context.span_id())
            })
        })
        .collect();
    assert!(
        linked.len() >= 7,
        "every transfer's batch links to its request span (links, not parents): {} of {}",
        linked.len(),
        batches.len()
    );
    let commits = named(&spans, "store.commit");
    for batch in &linked {
        assert!(
            commits
                .iter()
                .any(|c| c.parent_span_id == batch.span_context.span_id()),
            "the store commit is a child of its batch"
        );
    }
    drop(provider);
}
