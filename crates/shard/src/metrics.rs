//! What a shard reports to the metrics recorder (Prometheus, when the server installs one;
//! nothing otherwise). Every series is labelled with its `shard`.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `ledger_transfers_total{outcome, reason}` | counter | transfer replies: `committed`, or `rejected` with the rejection's name |
//! | `ledger_batch_inputs` | histogram | commands and messages per batch (group commit size) |
//! | `ledger_batch_writes` | histogram | store writes per batch |
//! | `ledger_commit_seconds` | histogram | one durable store commit |
//! | `ledger_commit_conflicts_total` | counter | commits refused by a precondition (fenced or stale leader) |
//! | `ledger_commit_failures_total` | counter | commits that failed otherwise (I/O) |
//! | `ledger_leader_epoch` | gauge | the epoch of this node's leader term |
//! | `ledger_leader_terms_total` | counter | leader terms begun (restarts and step-downs) |
//! | `ledger_queue_depth` | gauge | commands waiting in the shard's queue after a batch was drained |
//! | `ledger_lock_waits_total` | counter | operations that had to wait for a locked account or hold |
//! | `ledger_lock_refusals_total` | counter | operations refused because a lock's wait queue was full |
//! | `ledger_lock_wait_seconds` | histogram | how long a waiting operation waited |
//! | `ledger_2pc_started_total` | counter | cross-shard operations this shard coordinated |
//! | `ledger_2pc_in_flight{role}` | gauge | coordinations (`coordinator`) and prepared legs (`participant`) open |
//! | `ledger_2pc_phase_seconds{phase}` | histogram | coordinator's `prepare` (Prepare sent to answer) and `decide` (decision to ack) |
//! | `ledger_2pc_aborts_total{reason}` | counter | coordinations aborted before the commit point, by reason |
//! | `ledger_transfer_filter_ids` | gauge | ids inserted into the leader's transfer-id filter (about: some twice) |
//! | `ledger_transfer_filter_skips_total` | counter | idempotency lookups the filter answered without the store |
//! | `ledger_engine_stalls_total` | counter | steps that waited for a value fetched from the store |
//! | `ledger_store_reads_total` | counter | values the leader fetched from the store for its engine |
//! | `ledger_quota_spent_total` | counter | transfers this quota shard applied by the quota path |
//! | `ledger_quota_outbox_depth` | gauge | settlements waiting for their home's answer |
//! | `ledger_quota_limit{region}`, `ledger_quota_spent{region}`, `ledger_quota_unsettled{region}` | gauge | sums over the quota shard's allowances: granted less given back, spent, spent and not yet answered by the home (per account: `GetQuotas`) |
//! | `ledger_quota_settlement_lag_seconds` | histogram | at home: from the spend's commit to its settlement's |
//! | `ledger_quota_settlements_refused_total{reason}` | counter | at home: settlements refused (`duplicate`, `written_off`, `overdrawn`, `no_allowance`) |
//!
//! Handles are registered once per engine or leader term; recording is an atomic operation.

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use ledger_domain::{Rejection, ShardId};

/// Lock wait is measured on the engine's millisecond clock.
const MS: f64 = 1_000.0;

#[derive(Clone, Debug)]
pub(crate) struct EngineMetrics {
    shard: String,
    pub lock_waits: Counter,
    pub lock_busy: Counter,
    lock_wait_seconds: Histogram,
    pub coordinations_started: Counter,
    coordinating: Gauge,
    prepared: Gauge,
    pub phase_prepare: Histogram,
    pub phase_decide: Histogram,
    pub filter_ids: Gauge,
    pub filter_skips: Counter,
    pub stalls: Counter,
    pub quota_spent: Counter,
    outbox_depth: Gauge,
    settlement_lag_seconds: Histogram,
}

impl EngineMetrics {
    pub fn new(shard: ShardId) -> Self {
        let label = shard.0.to_string();
        Self {
            lock_waits: counter!("ledger_lock_waits_total", "shard" => label.clone()),
            lock_busy: counter!("ledger_lock_refusals_total", "shard" => label.clone()),
            lock_wait_seconds: histogram!("ledger_lock_wait_seconds", "shard" => label.clone()),
            coordinations_started: counter!("ledger_2pc_started_total", "shard" => label.clone()),
            coordinating: gauge!("ledger_2pc_in_flight", "shard" => label.clone(), "role" => "coordinator"),
            prepared: gauge!("ledger_2pc_in_flight", "shard" => label.clone(), "role" => "participant"),
            phase_prepare: histogram!(
                "ledger_2pc_phase_seconds",
                "shard" => label.clone(), "phase" => "prepare"
            ),
            phase_decide: histogram!(
                "ledger_2pc_phase_seconds",
                "shard" => label.clone(), "phase" => "decide"
            ),
            filter_ids: gauge!("ledger_transfer_filter_ids", "shard" => label.clone()),
            filter_skips: counter!("ledger_transfer_filter_skips_total", "shard" => label.clone()),
            stalls: counter!("ledger_engine_stalls_total", "shard" => label.clone()),
            quota_spent: counter!("ledger_quota_spent_total", "shard" => label.clone()),
            outbox_depth: gauge!("ledger_quota_outbox_depth", "shard" => label.clone()),
            settlement_lag_seconds: histogram!(
                "ledger_quota_settlement_lag_seconds",
                "shard" => label.clone()
            ),
            shard: label,
        }
    }

    pub fn lock_wait(&self, ms: u64) {
        self.lock_wait_seconds.record(ms as f64 / MS);
    }

    pub fn in_flight(&self, coordinating: usize, prepared: usize) {
        self.coordinating.set(coordinating as f64);
        self.prepared.set(prepared as f64);
    }

    pub fn outbox_depth(&self, depth: usize) {
        self.outbox_depth.set(depth as f64);
    }

    /// Sums over a quota shard's allowances of `region`.
    pub fn quota_totals(&self, region: &str, limit: u64, spent: u64, unsettled: u64) {
        for (name, value) in [
            ("ledger_quota_limit", limit),
            ("ledger_quota_spent", spent),
            ("ledger_quota_unsettled", unsettled),
        ] {
            gauge!(name, "shard" => self.shard.clone(), "region" => region.to_string())
                .set(value as f64);
        }
    }

    pub fn settlement_lag(&self, ms: u64) {
        self.settlement_lag_seconds.record(ms as f64 / MS);
    }

    pub fn settlement_refused(&self, reason: &'static str) {
        counter!(
            "ledger_quota_settlements_refused_total",
            "shard" => self.shard.clone(),
            "reason" => reason
        )
        .increment(1);
    }

    pub fn abort(&self, reason: Rejection) {
        counter!(
            "ledger_2pc_aborts_total",
            "shard" => self.shard.clone(),
            "reason" => reason.name()
        )
        .increment(1);
    }
}

/// The leader runtime's series, registered at the start of each term.
#[derive(Debug)]
pub(crate) struct RuntimeMetrics {
    shard: String,
    pub batch_inputs: Histogram,
    pub batch_writes: Histogram,
    pub commit_seconds: Histogram,
    pub commit_conflicts: Counter,
    pub commit_failures: Counter,
    pub queue_depth: Gauge,
    pub store_reads: Counter,
    committed: Counter,
    /// Rejections counted in this batch, by reason; flushed once per batch.
    rejected: HashMap<&'static str, u64>,
    committed_in_batch: u64,
}

impl RuntimeMetrics {
    pub fn new(shard: ShardId) -> Self {
        let label = shard.0.to_string();
        Self {
            batch_inputs: histogram!("ledger_batch_inputs", "shard" => label.clone()),
            batch_writes: histogram!("ledger_batch_writes", "shard" => label.clone()),
            commit_seconds: histogram!("ledger_commit_seconds", "shard" => label.clone()),
            commit_conflicts: counter!("ledger_commit_conflicts_total", "shard" => label.clone()),
            commit_failures: counter!("ledger_commit_failures_total", "shard" => label.clone()),
            queue_depth: gauge!("ledger_queue_depth", "shard" => label.clone()),
            store_reads: counter!("ledger_store_reads_total", "shard" => label.clone()),
            committed: counter!(
                "ledger_transfers_total",
                "shard" => label.clone(), "outcome" => "committed", "reason" => ""
            ),
            rejected: HashMap::new(),
            committed_in_batch: 0,
            shard: label,
        }
    }

    /// A new leader term with `epoch`.
    pub fn term(&self, epoch: u64) {
        gauge!("ledger_leader_epoch", "shard" => self.shard.clone()).set(epoch as f64);
        counter!("ledger_leader_terms_total", "shard" => self.shard.clone()).increment(1);
    }

    /// Counts one transfer reply (sent after its batch is durable).
    pub fn transfer(&mut self, result: Result<(), Rejection>) {
        match result {
            Ok(()) => self.committed_in_batch += 1,
            Err(reason) => *self.rejected.entry(reason.name()).or_default() += 1,
        }
    }

    /// Publishes the counts of the batch just replied to.
    pub fn flush(&mut self) {
        if self.committed_in_batch > 0 {
            self.committed
                .increment(std::mem::take(&mut self.committed_in_batch));
        }
        for (reason, n) in self.rejected.drain() {
            counter!(
                "ledger_transfers_total",
                "shard" => self.shard.clone(),
                "outcome" => "rejected",
                "reason" => reason
            )
            .increment(n);
        }
    }
}
