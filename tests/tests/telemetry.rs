//! Telemetry across processes: a real `ledgerd` exports its spans over OTLP/gRPC to a small
//! receiver started by the test, and serves Prometheus metrics that a scrape reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use ledger_client::{Client, pb};
use ledger_tests::cluster::Demo;
use ledger_tests::process::{Ledgerd, metric, metrics_url, scrape, test_config};
use ledger_tests::wire::{pay_from_first, traced, usd_account, usd_transfer};

/// Spans the receiver keeps; a run here exports a few hundred.
const RECEIVED_SPANS_MAX: usize = 100_000;

/// A span as received, with its resource's attributes.
#[derive(Clone, Debug)]
struct Received {
    span: Span,
    resource: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    if kept.len() < RECEIVED_SPANS_MAX {
                        kept.push(Received {
                            span,
                            resource: resource.clone(),
                        });
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn attr(span: &Span, key: &str) -> String {
    attrs(&span.attributes).remove(key).unwrap_or_default()
}

/// Starts the receiver on 127.0.0.1, port 0; returns its address and what it received.
async fn start_receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let spans = Arc::clone(&receiver.spans);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_ledgerd_exports_a_cross_shard_trace_over_otlp() {
    let (endpoint, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"), 4);
    config.telemetry.otlp_endpoint = endpoint.clone();
    config.telemetry.service_name = "ledgerd-otlp-test".into();
    config.region = "eu-test".into();
    let ledgerd = Ledgerd::start(dir.path(), &config);
    assert!(
        ledgerd
            .summary
            .contains(&format!("traces: OTLP {endpoint}")),
        "the start-up line names the endpoint: {}",
        ledgerd.summary
    );

    // The caller's trace: a span of ours that ledgerd's spans must hang under.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let client = Client::connect(&ledgerd.addr)
        .await
        .unwrap()
        .with_traceparent(&format!("00-{trace_id}-{parent_span}-01"))
        .unwrap();
    let (_, committed) = pay_from_first(&client, 8).await;
    let mut cross = Vec::new();
    for t in committed {
        assert_eq!(
            t.trace_id, trace_id,
            "the transfer records the caller's trace"
        );
        if t.cross_shard {
            cross.push(t.id);
        }
    }
    assert!(!cross.is_empty(), "at least one transfer was cross-shard");
    // SIGTERM: ledgerd flushes its exporter before it exits.
    ledgerd.terminate();

    let spans = received.lock().unwrap().clone();
    let in_trace: Vec<&Received> = spans
        .iter()
        .filter(|r| hex(&r.span.trace_id) == trace_id)
        .collect();
    assert!(!in_trace.is_empty(), "spans of the caller's trace arrived");
    for r in &in_trace {
        assert_eq!(r.resource["service.name"], "ledgerd-otlp-test");
        assert_eq!(r.resource["cloud.region"], "eu-test");
    }
    let find = |name: &str, role: &str, op: &str| -> Span {
        let found: Vec<&Received> = in_trace
            .iter()
            .copied()
            .filter(|r| r.span.name == name && attr(&r.span, "role") == role)
            .filter(|r| attr(&r.span, "op") == op)
            .collect();
        assert_eq!(found.len(), 1, "one {name} ({role}) for {op}");
        found[0].span.clone()
    };
    let requests: Vec<&Span> = in_trace
        .iter()
        .map(|r| &r.span)
        .filter(|s| s.name == "/ledger.v1.LedgerService/Transfer")
        .collect();
    assert_eq!(requests.len(), 7, "one server span per call");
    for request in &requests {
        assert_eq!(
            hex(&request.parent_span_id),
            parent_span,
            "the server span is a child of the caller's span"
        );
        // Recorded for the exporter only (the log layer does not format them on every call).
        assert_eq!(request.kind, SpanKind::Server as i32, "a server span");
        assert_eq!(attr(request, "rpc.system"), "grpc");
    }
    let batches: Vec<&Span> = spans
        .iter()
        .map(|r| &r.span)
        .filter(|s| s.name == "shard.batch")
        .collect();
    let commits: Vec<&Span> = spans
        .iter()
        .map(|r| &r.span)
        .filter(|s| s.name == "store.commit")
        .collect();
    for op in &cross {
        let c_prepare = find("2pc.prepare", "coordinator", op);
        let p_prepare = find("2pc.prepare", "participant", op);
        let c_decide = find("2pc.decide", "coordinator", op);
        let p_decide = find("2pc.decide", "participant", op);
        let route = in_trace
            .iter()
            .map(|r| &r.span)
            .find(|s| s.span_id == c_prepare.parent_span_id)
            .expect("the coordinator's prepare has a parent in the trace");
        assert_eq!(route.name, "router.route");
        assert!(
            requests.iter().any(|r| r.span_id == route.parent_span_id),
            "the routing span is a child of a server span"
        );
        assert_eq!(p_prepare.parent_span_id, c_prepare.span_id);
        assert_eq!(c_decide.parent_span_id, route.span_id);
        assert_eq!(p_decide.parent_span_id, c_decide.span_id);
        assert_ne!(attr(&c_prepare, "shard"), attr(&p_prepare, "shard"));
        for step in [&c_prepare, &p_prepare, &c_decide, &p_decide] {
            let batch = batches
                .iter()
                .find(|b| b.links.iter().any(|l| l.span_id == step.span_id))
                .unwrap_or_else(|| panic!("a batch links to {} of {op}", step.name));
            assert!(
                commits.iter().any(|c| c.parent_span_id == batch.span_id),
                "that batch's store commit is its child"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_reports_transfers_batches_commits_and_two_phase_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"), 4);
    config.telemetry.metrics_listen = "127.0.0.1:0".into();
    let ledgerd = Ledgerd::start(dir.path(), &config);
    let url = metrics_url(&ledgerd);
    // Leaders take their leases just after the start-up line; wait (bounded) until all four lead.
    let mut before = scrape(&url);
    for _ in 0..100 {
        if (0..4)
            .all(|s| metric(&before, "ledger_leader_epoch", &[&format!("shard=\"{s}\"")]) >= 1.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        before = scrape(&url);
    }
    assert!(
        metric(&before, "ledger_leader_epoch", &[r#"shard="3""#]) >= 1.0,
        "{before}"
    );
    assert_eq!(
        metric(
            &before,
            "ledger_transfers_total",
            &[r#"outcome="committed""#]
        ),
        0.0
    );

    let client = Client::connect(&ledgerd.addr).await.unwrap();
    let ids: Vec<String> = (0..16).map(|i| format!("m-{i}")).collect();
    client
        .create_accounts(ids.iter().map(|id| usd_account(id)).collect())
        .await
        .unwrap();
    // Everyone pays m-0 at once: cross-shard ones queue for its lock on m-0's shard.
    let calls = ids.iter().skip(1).map(|id| {
        let client = client.clone();
        let t = usd_transfer(&format!("pay-{id}"), id, &ids[0], 3);
        async move { client.transfer(t).await.unwrap() }
    });
    let results = futures::future::join_all(calls).await;
    let cross = results
        .iter()
        .filter(|r| {
            matches!(&r.outcome, Some(pb::transfer_result::Outcome::Transfer(t)) if t.cross_shard)
        })
        .count();
    assert!(cross > 0, "some payments crossed shards");
    let rejected = client
        .transfer(usd_transfer("to-nowhere", &ids[1], "missing", 1))
        .await
        .unwrap();
    assert!(matches!(
        rejected.outcome,
        Some(pb::transfer_result::Outcome::Rejection(_))
    ));

    // A refused call (no id): counted under its status code, not as OK.
    let refused = client
        .transfer(usd_transfer("", &ids[1], &ids[0], 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ledger_client::Error::Status(s) if s.code() == tonic::Code::InvalidArgument),
        "{refused}"
    );

    let after = scrape(&url);
    assert_eq!(
        metric(
            &after,
            "ledger_transfers_total",
            &[r#"outcome="committed""#]
        ),
        15.0,
        "every committed transfer is counted once"
    );
    // Per-call series: 15 payments and one rejection answered OK, one call refused.
    assert_eq!(
        metric(
            &after,
            "ledger_grpc_requests_total",
            &[r#"method="Transfer""#, r#"code="OK""#]
        ),
        16.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "ledger_grpc_requests_total",
            &[r#"method="Transfer""#, r#"code="INVALID_ARGUMENT""#]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "ledger_grpc_requests_total",
            &[r#"method="CreateAccounts""#, r#"code="OK""#]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "ledger_grpc_request_seconds_count",
            &[r#"method="Transfer""#]
        ),
        17.0
    );
    assert_eq!(
        metric(
            &after,
            "ledger_transfers_total",
            &[
                r#"outcome="rejected""#,
                r#"reason="credit_account_not_found""#
            ]
        ),
        1.0
    );
    let grew = |name: &str, labels: &[&str]| {
        let (b, a) = (metric(&before, name, labels), metric(&after, name, labels));
        assert!(a > b, "{name}{labels:?} moved: {b} -> {a}");
    };
    grew("ledger_batch_inputs_count", &[]);
    grew("ledger_batch_inputs_sum", &[]);
    grew("ledger_commit_seconds_count", &[]);
    grew("ledger_commit_seconds_bucket", &[r#"le="+Inf""#]);
    grew("ledger_2pc_started_total", &[]);
    grew("ledger_2pc_phase_seconds_count", &[r#"phase="prepare""#]);
    grew("ledger_2pc_phase_seconds_count", &[r#"phase="decide""#]);
    grew("ledger_lock_waits_total", &[]);
    grew("ledger_lock_wait_seconds_count", &[]);
    // Every cross-shard payment was coordinated; to-nowhere too if "missing" hashes to
    // another shard than m-1, and then its participant refused it: an abort.
    let started = metric(&after, "ledger_2pc_started_total", &[]);
    let aborts = metric(
        &after,
        "ledger_2pc_aborts_total",
        &[r#"reason="credit_account_not_found""#],
    );
    assert_eq!(
        started - aborts,
        cross as f64,
        "started {started}, aborted {aborts}"
    );
    assert_eq!(
        metric(&after, "ledger_2pc_in_flight", &[]),
        0.0,
        "nothing is left in flight"
    );
    // Each recorded id (15 payments, one final rejection) went into its shard's filter.
    assert!(
        metric(&after, "ledger_transfer_filter_ids", &[]) >= 16.0,
        "{after}"
    );
    assert!(metric(&after, "ledger_process_resident_bytes", &[]) > 0.0);
    assert_eq!(metric(&after, "ledger_commit_conflicts_total", &[]), 0.0);

    // With no exporter a transfer still records its caller's trace id (from `traceparent`),
    // and the answer carries no `traceparent` of its own: no span here has a trace context.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut raw = pb::ledger_service_client::LedgerServiceClient::connect(ledgerd.addr.clone())
        .await
        .unwrap();
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let request = traced(
        usd_transfer("traced-unexported", &ids[1], &ids[2], 1),
        &traceparent,
    );
    let response = raw.transfer(request).await.unwrap();
    assert!(response.metadata().get("traceparent").is_none());
    let got = client
        .get_transfers(vec!["traced-unexported".into()])
        .await
        .unwrap();
    assert_eq!(got.transfers[0].trace_id, trace_id);
    ledgerd.terminate();
}

/// A transfer between accounts of two regions, entering at a node of a third, is one trace:
/// the server spans of the node called and of the node it forwarded to, and the two-phase
/// commit's spans on the coordinator's and the participant's nodes, each exported by its own
/// process (`ledgerd demo`, four processes), all under the caller's trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_region_transfer_is_one_trace_over_every_node_it_touched() {
    let (endpoint, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), "eu:2,us,ap", 2, &["--otlp-endpoint", &endpoint]);
    let ap = Client::connect(&demo.node("ap-1").addr).await.unwrap();
    let accounts = [("eu-payer", "eu"), ("us-payee", "us")].map(|(id, region)| pb::Account {
        region: region.into(),
        ..usd_account(id)
    });
    for r in ap.create_accounts(accounts.to_vec()).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent_span = "b7ad6b7169203331";
    let traced_client = ap
        .clone()
        .with_traceparent(&format!("00-{trace_id}-{parent_span}-01"))
        .unwrap();
    let result = traced_client
        .transfer(usd_transfer("across", "eu-payer", "us-payee", 5))
        .await
        .unwrap();
    let Some(pb::transfer_result::Outcome::Transfer(t)) = result.outcome else {
        panic!("committed: {result:?}")
    };
    assert!(t.cross_shard);
    assert_eq!(
        t.trace_id, trace_id,
        "the coordinator recorded the caller's trace"
    );
    // SIGTERM to every node: each flushes its exporter before it exits.
    demo.stop();

    let spans = received.lock().unwrap().clone();
    let in_trace: Vec<&Received> = spans
        .iter()
        .filter(|r| hex(&r.span.trace_id) == trace_id)
        .collect();
    let node_of = |r: &Received| r.resource["service.instance.id"].clone();
    let on = |name: &str| -> Vec<String> {
        let mut nodes: Vec<String> = in_trace
            .iter()
            .filter(|r| r.span.name == name)
            .map(|r| node_of(r))
            .collect();
        nodes.sort();
        nodes
    };
    assert_eq!(
        on("/ledger.v1.LedgerService/Transfer"),
        ["ap-1"],
        "the call entered at ap-1"
    );
    let forwarded = on("/ledger.internal.v1.PeerService/ForwardTransfers");
    assert_eq!(forwarded.len(), 1, "forwarded once: {forwarded:?}");
    let coordinator = &forwarded[0];
    assert!(
        coordinator.starts_with("eu-"),
        "to the payer's node: {coordinator}"
    );
    let prepares: Vec<(String, String)> = in_trace
        .iter()
        .filter(|r| r.span.name == "2pc.prepare")
        .map(|r| (attr(&r.span, "role"), node_of(r)))
        .collect();
    assert!(
        prepares.contains(&("coordinator".into(), coordinator.clone())),
        "{prepares:?}"
    );
    assert!(
        prepares.contains(&("participant".into(), "us-1".into())),
        "{prepares:?}"
    );
    // One tree: every span's parent is in the trace, except the caller's own span.
    let ids: std::collections::HashSet<Vec<u8>> =
        in_trace.iter().map(|r| r.span.span_id.clone()).collect();
    for r in &in_trace {
        let parent = hex(&r.span.parent_span_id);
        assert!(
            parent == parent_span || ids.contains(&r.span.parent_span_id),
            "{} on {} hangs off {parent}, which is not in the trace",
            r.span.name,
            node_of(r)
        );
    }
    let mut regions: Vec<String> = in_trace
        .iter()
        .map(|r| r.resource["cloud.region"].clone())
        .collect();
    regions.sort();
    regions.dedup();
    assert_eq!(
        regions,
        ["ap", "eu", "us"],
        "spans from every region it touched"
    );
}

/// A quota-path transfer's settlement is in the transfer's trace: the spending region's
/// server spans, and the home's `quota.settle` span (exported by the home's node, later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_path_transfer_and_its_settlement_are_one_trace() {
    let (endpoint, received) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), "eu,ap", 2, &["--otlp-endpoint", &endpoint]);
    let ap = Client::connect(&demo.node("ap-1").addr).await.unwrap();
    let accounts = [("eu-payer", "eu"), ("ap-shop", "ap")].map(|(id, region)| pb::Account {
        region: region.into(),
        ..usd_account(id)
    });
    for r in ap.create_accounts(accounts.to_vec()).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let operator = ap.clone().with_admin_token(&token).unwrap();
    operator
        .set_quota(pb::SetQuotaRequest {
            account_id: "eu-payer".into(),
            region: "ap".into(),
            amount: 100,
            lease_seconds: 3_600,
        })
        .await
        .unwrap();
    let allowance = || async {
        operator
            .get_quotas("eu-payer")
            .await
            .unwrap()
            .quotas
            .pop()
            .unwrap()
    };
    for _ in 0..100 {
        if allowance().await.available == 100 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced_client = ap
        .clone()
        .with_traceparent(&format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .unwrap();
    let result = traced_client
        .transfer(usd_transfer("by-quota", "eu-payer", "ap-shop", 5))
        .await
        .unwrap();
    let Some(pb::transfer_result::Outcome::Transfer(t)) = result.outcome else {
        panic!("committed: {result:?}")
    };
    assert!(t.quota_path, "{t:?}");
    for _ in 0..100 {
        if allowance().await.settled == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(allowance().await.settled, 5);
    demo.stop();

    let spans = received.lock().unwrap().clone();
    let settle: Vec<&Received> = spans
        .iter()
        .filter(|r| hex(&r.span.trace_id) == trace_id && r.span.name == "quota.settle")
        .collect();
    assert_eq!(settle.len(), 1, "one settle span in the transfer's trace");
    assert_eq!(settle[0].resource["service.instance.id"], "eu-1");
    let ids: std::collections::HashSet<Vec<u8>> = spans
        .iter()
        .filter(|r| hex(&r.span.trace_id) == trace_id)
        .map(|r| r.span.span_id.clone())
        .collect();
    assert!(
        ids.contains(&settle[0].span.parent_span_id),
        "the settle span hangs off a span of the transfer's trace"
    );
}
