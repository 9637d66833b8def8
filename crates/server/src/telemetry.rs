//! Telemetry: structured logs (text or JSON) and OpenTelemetry traces exported over OTLP.
//!
//! ```text
//!  client ── traceparent ──► trace_fn: "grpc.request" span, parent = the caller's context
//!                              └─ handler ─ router ─► shard queue (caller's span context)
//!                                                      └─ "shard.batch" span (sampled
//!                                                         traces only), one link per
//!                                                         sampled caller ─ "store.commit"
//! ```
//!
//! With no OTLP endpoint the OpenTelemetry layer is not installed at all, so spans cost what a
//! `tracing` span with only the log layer costs, and nothing looks up a span's trace context
//! (there is none; [`ledger_shard::trace::set_exporting`]). The trace id a transfer is recorded
//! with then comes from the caller's `traceparent`, if any ([`trace_id_of_call`]).

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Telemetry settings (`[telemetry]` in the config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint for traces, e.g. `http://127.0.0.1:4317`. Empty: no export.
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0.0-1.0. A caller's sampling decision is followed.
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Log lines: "text" (human-readable) or "json".
    pub log_format: LogFormat,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9464`; port 0
    /// picks a free port (printed at start-up). Empty: no endpoint.
    pub metrics_listen: String,
}

/// `Config` is `Eq`; the one float here is never NaN once validated (NaN is not in 0..=1).
impl Eq for TelemetryConfig {}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
            service_name: "ledgerd".into(),
            log_format: LogFormat::Text,
            metrics_listen: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio: {} is not between 0 and 1",
                self.sampling_ratio
            ));
        }
        let endpoint = &self.otlp_endpoint;
        let has_scheme = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !has_scheme {
            return Err(format!(
                "telemetry.otlp_endpoint: `{}` must start with http:// or https://",
                self.otlp_endpoint
            ));
        }
        if self.service_name.is_empty() {
            return Err("telemetry.service_name: must not be empty".into());
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "telemetry.metrics_listen: `{}` is not an address like 127.0.0.1:9464",
                self.metrics_listen
            ));
        }
        Ok(())
    }
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (blocking: call from a blocking thread).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

/// HTTP/2 internals would otherwise export hundreds of spans per call.
const OTEL_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tower=off,tonic=off";

/// Installs the global subscriber: logs to stderr, and with an endpoint an OpenTelemetry layer
/// exporting over OTLP. Call inside the tokio runtime (the exporter's channel lives there).
pub fn init(
    config: &TelemetryConfig,
    log_filter: &str,
    region: &str,
    node_id: &str,
) -> Result<Telemetry, String> {
    config.validate()?;
    let filter =
        EnvFilter::try_new(log_filter).map_err(|e| format!("log filter `{log_filter}`: {e}"))?;
    let logs = match config.log_format {
        // Colours only on a terminal: a log file or journald would get escape codes, and
        // styling each span's field names cost about 1 400 instructions per call.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let (otel, provider) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler(config.sampling_ratio))
            .with_resource(resource(&config.service_name, region, node_id))
            .build();
        // Per-span extras cost CPU on every span, sampled or not, and on every poll of an
        // instrumented future (inactivity timing, context activation): all off. Nothing here
        // reads OpenTelemetry's current context; spans carry their parents explicitly.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ledgerd"))
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_target(false)
            .with_context_activation(false)
            .with_filter(EnvFilter::new(OTEL_FILTER));
        (Some(layer), Some(provider))
    };
    let exporting = otel.is_some();
    tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    ledger_shard::trace::set_exporting(exporting);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Telemetry { provider })
}

/// Follows the caller's decision; new traces are kept with probability `ratio`.
pub fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

pub fn resource(service_name: &str, region: &str, node_id: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes([
            KeyValue::new("cloud.region", region.to_string()),
            KeyValue::new("service.instance.id", node_id.to_string()),
        ])
        .build()
}

/// The span of one gRPC call, a child of the caller's context when the request carries a W3C
/// `traceparent`. Used as tonic's `trace_fn`. Its `otel.name` (the method) and `trace_id`
/// fields go on every log line written inside the call.
pub fn request_span(request: &http::Request<()>) -> tracing::Span {
    request_span_for(request, ledger_shard::trace::exporting())
}

/// [`request_span`], for a process that exports spans (`exporting`) or not.
///
/// `otel.kind` and `rpc.system` are for the exporter alone (the span's kind, an attribute), so
/// they are recorded only when spans are exported: the log layer formats every field of every
/// span when the span is made, and these two (the same on every call) were about 4 300 of the
/// 66 000 instructions ledgerd spent per health check (`crates/bench/instructions.sh`,
/// docs/benchmarks.md). Recorded before the span's context is first read, which is when the
/// OpenTelemetry layer fixes its kind. Without an exporter the span has no context of its own,
/// so only the caller's trace id is recorded.
fn request_span_for(request: &http::Request<()>, exporting: bool) -> tracing::Span {
    let parent = TraceContextPropagator::new()
        .extract(&opentelemetry_http::HeaderExtractor(request.headers()));
    let remote = parent.span().span_context().clone();
    let span = tracing::info_span!(
        "grpc.request",
        otel.kind = tracing::field::Empty,
        otel.name = %request.uri().path(),
        rpc.system = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if exporting {
        span.record("otel.kind", "server");
        span.record("rpc.system", "grpc");
        if remote.is_valid() {
            let _ = span.set_parent(parent);
        }
        let own = span.context().span().span_context().clone();
        if own.is_valid() {
            span.record("trace_id", own.trace_id().to_string());
            return span;
        }
    }
    if remote.is_valid() {
        span.record("trace_id", remote.trace_id().to_string());
    }
    span
}

/// Puts the server span's W3C `traceparent` on a response, so a caller that did not start a
/// trace can still find the one its call made.
pub fn set_response_traceparent<T>(response: &mut tonic::Response<T>) {
    if let Some(parent) = ledger_shard::trace::TraceParent::current()
        && let Ok(value) = parent.header().parse()
    {
        response.metadata_mut().insert("traceparent", value);
    }
}

/// The trace id to record with a transfer: the current span's (when spans are exported), else
/// the caller's `traceparent`, else empty.
pub fn trace_id_of_call(metadata: &tonic::metadata::MetadataMap) -> String {
    if let Some(own) = ledger_shard::trace::TraceParent::current() {
        return own.span_context().trace_id().to_string();
    }
    metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_trace_id)
        .unwrap_or_default()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed and
/// not all zeros.
pub fn parse_trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            parse_trace_id(ok).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_trace_id(bad), None, "{bad}");
        }
    }

    /// Log lines written inside a call name the method, while the fields only the exporter
    /// reads (`otel.kind`, `rpc.system`) are recorded, and so formatted, only when exporting.
    #[test]
    fn a_call_logs_its_method_and_the_exporter_fields_only_when_exporting() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let request = http::Request::builder()
            .uri("/ledger.v1.LedgerService/Transfer")
            .body(())
            .unwrap();
        for exporting in [false, true] {
            let lines = Lines::default();
            let writer = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                let span = request_span_for(&request, exporting);
                span.in_scope(|| tracing::info!("inside the call"));
            });
            let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            assert!(logged.contains("inside the call"), "{logged}");
            assert!(
                logged.contains("otel.name=/ledger.v1.LedgerService/Transfer"),
                "{logged}"
            );
            for field in ["otel.kind=\"server\"", "rpc.system=\"grpc\""] {
                assert_eq!(logged.contains(field), exporting, "{field} in {logged}");
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = TelemetryConfig::default();
        assert!(ok.validate().is_ok());
        let ratio = TelemetryConfig {
            sampling_ratio: 1.5,
            ..ok.clone()
        };
        assert!(ratio.validate().unwrap_err().contains("sampling_ratio"));
        let endpoint = TelemetryConfig {
            otlp_endpoint: "127.0.0.1:4317".into(),
            ..ok
        };
        assert!(endpoint.validate().unwrap_err().contains("otlp_endpoint"));
        let metrics = TelemetryConfig {
            metrics_listen: "localhost".into(),
            ..TelemetryConfig::default()
        };
        assert!(metrics.validate().unwrap_err().contains("metrics_listen"));
    }
}
