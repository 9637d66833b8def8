//! What a run measured, and how it is printed.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::workload::Op;

/// Latencies a client keeps before adding them to its histogram, all at once. A histogram
/// with three significant digits up to ten minutes is about 170 KiB; 256 clients' histograms
/// did not stay in cache, so adding one latency at a time cost a cache miss per request
/// (1.5% of the bench's CPU at workload (b)). A run of them lands in the few buckets that
/// requests' latencies share, and those stay in cache while it does.
pub const LATENCY_RUN: usize = 1_024;

/// One client's tally; merged at the end.
#[derive(Debug)]
pub struct Tally {
    /// Per-request latency, microseconds.
    latency_us: Histogram<u64>,
    /// Latencies not yet in `latency_us`: at most [`LATENCY_RUN`].
    latency_run: Vec<u64>,
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
            latency_run: Vec::with_capacity(LATENCY_RUN),
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
    pub fn merge(&mut self, mut other: Tally) {
        self.add_latency_run();
        other.add_latency_run();
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

    /// Counts a committed operation: what it adds to the posted and pending totals the audit
    /// compares with the ledger's.
    pub fn committed(&mut self, op: &Op) {
        self.committed += 1;
        match op {
            Op::Posted { amount, .. } => self.posted_sum += amount,
            Op::Hold { amount, .. } => self.pending_sum += amount,
            Op::Post { amount, .. } => {
                self.posted_sum += amount;
                self.pending_sum -= amount;
            }
        }
    }

    pub fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency_run.push(us);
        if self.latency_run.len() == LATENCY_RUN {
            self.add_latency_run();
        }
    }

    /// The latency at quantile `q`, in microseconds.
    pub fn latency_at(&mut self, q: f64) -> u64 {
        self.add_latency_run();
        self.latency_us.value_at_quantile(q)
    }

    fn add_latency_run(&mut self) {
        for us in self.latency_run.drain(..) {
            let _ = self.latency_us.record(us);
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1_000.0)
}

pub fn print(target: &str, tally: &mut Tally, elapsed: Duration, extra: &[(String, String)]) {
    let secs = elapsed.as_secs_f64();
    tally.add_latency_run();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Latencies kept back in a run still count: merging and printing add them, whether the run
    /// filled up or not.
    #[test]
    fn every_recorded_latency_reaches_the_histogram() {
        let mut a = Tally::default();
        for us in 1..=(LATENCY_RUN as u64 + 10) {
            a.record(Duration::from_micros(us));
        }
        let mut b = Tally::default();
        b.record(Duration::from_millis(5));
        let mut total = Tally::default();
        total.merge(a);
        total.merge(b);
        total.add_latency_run();
        assert_eq!(total.latency_us.len(), LATENCY_RUN as u64 + 11);
        assert!(total.latency_us.equivalent(total.latency_us.max(), 5_000));
        assert_eq!(total.latency_us.min(), 1);
    }
}
