//! The Prometheus endpoint: `GET /metrics` on its own listener (`telemetry.metrics_listen`).
//!
//! The recorder is the `metrics` facade's global one, so every crate records through the
//! `metrics` macros (the shard's series are listed in `ledger_shard::metrics`). hyper's
//! HTTP/1.1 server answers: one request per connection, bounded header bytes, bounded
//! connections, bounded time. (The exporter's own listener binds an address it does not report
//! back, so `ledgerd` could not listen on port 0 and say where.)

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The most bytes of a scrape request buffered (request line and headers; hyper's least).
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Scrapes served at once; more wait for a slot.
pub const CONNECTIONS_MAX: usize = 16;
/// A scrape connection that has not sent its request by then is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Seconds: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Counts per batch: powers of two up to the largest batch.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

/// Installs the global recorder (once per process) and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Prefix("ledger_batch_".into()), COUNT_BUCKETS)
        })
        .map_err(|e| format!("metrics: {e}"))?;
    builder
        .install_recorder()
        .map_err(|e| format!("metrics: cannot install the recorder: {e}"))
}

/// Serves scrapes on `listener` until the task is dropped, and keeps histograms compact.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let response = respond(&request, &handle);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(REQUEST_BYTES_MAX)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, connection).await;
        });
    }
}

fn respond<B>(request: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            record_process_memory();
            (StatusCode::OK, handle.render())
        }
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "try /metrics\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `ledger_process_resident_bytes`: the process's resident memory, read at scrape time from
/// `VmRSS` in `/proc/self/status` (in KiB whatever the page size, unlike `statm`'s pages).
fn record_process_memory() {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    if let Some(bytes) = status.as_deref().and_then(resident_bytes) {
        metrics::gauge!("ledger_process_resident_bytes").set(bytes as f64);
    }
}

/// The `VmRSS` line of a `/proc/PID/status` text, in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then(|| value.checked_mul(1024))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_from_the_status_text() {
        let status = "Name:\tledgerd\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes(status), Some(123_456 * 1024));
        assert_eq!(resident_bytes("Name:\tledgerd\n"), None);
        assert_eq!(
            resident_bytes("VmRSS:\t12 MB\n"),
            None,
            "an unknown unit is not guessed"
        );
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(
            resident_bytes(&own).unwrap() > 1 << 20,
            "this test process uses over 1 MiB"
        );
    }
}

#[cfg(test)]
mod endpoint_tests {
    use std::io::{Read, Write};

    use super::*;

    /// One request over a fresh connection; returns the status line and the body.
    fn request(addr: std::net::SocketAddr, head: &str) -> (String, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_are_answered_and_other_requests_refused() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("ledger_test_scrapes_total").increment(3);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, handle));
        let results = tokio::task::spawn_blocking(move || {
            let get = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            let other = request(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
            let post = request(
                addr,
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            );
            let huge = format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(REQUEST_BYTES_MAX * 2)
            );
            (get, other, post, request(addr, &huge))
        })
        .await
        .unwrap();
        server.abort();
        let (get, other, post, huge) = results;
        assert!(get.0.starts_with("HTTP/1.1 200"), "{get:?}");
        assert!(get.1.contains("ledger_test_scrapes_total 3"), "{get:?}");
        assert!(other.0.starts_with("HTTP/1.1 404"), "{other:?}");
        assert!(post.0.starts_with("HTTP/1.1 405"), "{post:?}");
        assert!(
            !huge.0.starts_with("HTTP/1.1 200"),
            "a request past {REQUEST_BYTES_MAX} header bytes is not served: {huge:?}"
        );
    }
}
