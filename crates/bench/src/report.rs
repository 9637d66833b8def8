//! What a run measured, and how it is printed.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// One client's tally; merged at the end.
#[derive(Debug)]
pub struct Tally {
    /// Per-request latency, microseconds.
    pub latency_us: Histogram<u64>,
    pub transfers: u64,
    pub committed: u64,
    pub rejections: BTreeMap<String, u64>,
    /// Requests that failed as a whole (outcome unknown).
    pub errors: u64,
    /// Expected totals: posted debits, and holds still pending, over committed transfers.
    pub posted_sum: u64,
    pub pending_sum: u64,
    /// A few committed ids to look up at the end.
    pub sample_ids: Vec<String>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            transfers: 0,
            committed: 0,
            rejections: BTreeMap::new(),
            errors: 0,
            posted_sum: 0,
            pending_sum: 0,
            sample_ids: Vec::new(),
        }
    }
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.latency_us.add(&other.latency_us).expect("same bounds");
        self.transfers += other.transfers;
        self.committed += other.committed;
        for (k, v) in other.rejections {
            *self.rejections.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        self.posted_sum += other.posted_sum;
        self.pending_sum += other.pending_sum;
        self.sample_ids.extend(other.sample_ids);
    }

    pub fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self.latency_us.record(us);
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1_000.0)
}

pub fn print(target: &str, tally: &Tally, elapsed: Duration, extra: &[(String, String)]) {
    let secs = elapsed.as_secs_f64();
    let h = &tally.latency_us;
    println!("target: {target}");
    println!(
        "  transfers: {} in {:.1} s = {:.0} transfers/s ({} requests)",
        tally.transfers,
        secs,
        tally.transfers as f64 / secs,
        h.len()
    );
    println!(
        "  latency per request: p50 {}  p99 {}  p99.9 {}  max {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
    let rejections: Vec<String> = tally
        .rejections
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "  committed: {}  rejected: {}  failed requests: {}",
        tally.committed,
        if rejections.is_empty() {
            "0".into()
        } else {
            rejections.join(" ")
        },
        tally.errors
    );
    for (k, v) in extra {
        println!("  {k}: {v}");
    }
}
