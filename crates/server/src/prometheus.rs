//! The Prometheus endpoint: `GET /metrics` on its own listener (`telemetry.metrics_listen`).
//!
//! The recorder is the `metrics` facade's global one, so every crate records through the
//! `metrics` macros (the shard's series are listed in `ledger_shard::metrics`). The endpoint
//! is a deliberately small HTTP/1.1 responder: one request per connection, bounded request
//! size, bounded connections, bounded time.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The most bytes of a scrape request read (request line and headers).
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
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &handle)).await;
        });
    }
}

async fn respond(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
        if request.len() > REQUEST_BYTES_MAX {
            return write(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            record_process_memory();
            write(&mut stream, "200 OK", &handle.render()).await
        }
        (Some("GET"), Some(_)) => write(&mut stream, "404 Not Found", "try /metrics\n").await,
        _ => write(&mut stream, "405 Method Not Allowed", "").await,
    }
}

async fn write(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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
