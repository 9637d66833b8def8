//! Driving ledgerd over gRPC: set up the accounts, measure the gRPC ceiling (health Check at
//! the same concurrency), run the workload, and check the books afterwards.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use ledger_client::{Client, pb, reason_name};
use tonic::transport::Channel;

use crate::report::Tally;
use crate::workload::{Accounts, Generator, Knobs, Op};

/// A ledgerd the bench started on a temporary data directory.
pub struct Server {
    child: Child,
    pub addr: String,
    /// The store `ledgerd` says it runs on (its startup line).
    pub store: String,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `ledgerd` with `extra` flags after the bench's own.
    pub fn start(
        shards: u32,
        data_dir: Option<PathBuf>,
        extra: &[String],
    ) -> Result<Server, String> {
        let (dir, path) = match data_dir {
            Some(path) => (None, path),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("ledger-bench-")
                    .tempdir_in(".")
                    .map_err(|e| e.to_string())?;
                let path = dir.path().join("data");
                (Some(dir), path)
            }
        };
        let bin = sibling_binary("ledgerd")?;
        let mut child = Command::new(&bin)
            .args([
                "start",
                "--listen",
                "127.0.0.1:0",
                "--shards",
                &shards.to_string(),
                "--data-dir",
            ])
            .arg(&path)
            .args(extra)
            .env("LEDGER_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .strip_prefix("ledgerd listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| format!("ledgerd did not start: {line:?}"))?;
        let store = line
            .split(" | ")
            .find_map(|part| part.strip_prefix("store: "))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        Ok(Server {
            addr: format!("http://{addr}"),
            store,
            child,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// `ledgerd` next to this binary (same target directory).
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().unwrap_or(Path::new(".")).join(name);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found; build it with `cargo build --release --bin {name}`",
            bin.display()
        ))
    }
}

/// Resident and peak memory of a process, from /proc.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    Some((field("VmRSS:")? * 1024, field("VmHWM:")? * 1024))
}

/// Creates the accounts (in batches) and learns each placement group's shard.
pub async fn setup(client: &Client, accounts: &mut Accounts) -> Result<(), String> {
    for chunk in (0..accounts.ids.len()).collect::<Vec<_>>().chunks(8_000) {
        let batch: Vec<pb::Account> = chunk
            .iter()
            .map(|&i| pb::Account {
                id: accounts.ids[i].clone(),
                ledger: "USD".into(),
                placement_key: accounts.placement_key(i),
                ..Default::default()
            })
            .collect();
        let results = client
            .create_accounts(batch)
            .await
            .map_err(|e| e.to_string())?;
        for (&i, r) in chunk.iter().zip(results) {
            match r.outcome {
                Some(pb::account_result::Outcome::Account(a)) => {
                    accounts.shard_of_group[accounts.group_of[i]] = a.shard;
                }
                other => return Err(format!("creating {}: {other:?}", accounts.ids[i])),
            }
        }
    }
    Ok(())
}

fn wire(op: &Op, accounts: &Accounts) -> pb::Transfer {
    match op {
        Op::Posted {
            id,
            debit,
            credit,
            amount,
        }
        | Op::Hold {
            id,
            debit,
            credit,
            amount,
        } => pb::Transfer {
            id: id.clone(),
            debit_account_id: accounts.ids[*debit].clone(),
            credit_account_id: accounts.ids[*credit].clone(),
            amount: *amount,
            ledger: "USD".into(),
            flags: matches!(op, Op::Hold { .. }).then(|| pb::TransferFlags {
                pending: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        Op::Post { id, pending_id, .. } => pb::Transfer {
            id: id.clone(),
            pending_id: pending_id.clone(),
            flags: Some(pb::TransferFlags {
                post_pending: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// How long or how much to run; `budget` counts transfers left (when bounded by count).
pub struct Limit {
    pub until: Instant,
    pub budget: Arc<AtomicI64>,
}

pub async fn client_loop(
    channel: Channel,
    knobs: Arc<Knobs>,
    accounts: Arc<Accounts>,
    run: String,
    n: usize,
    limit: Arc<Limit>,
) -> Tally {
    let mut raw = pb::ledger_service_client::LedgerServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut generator = Generator::new(&knobs, &run, n);
    let mut tally = Tally::default();
    while Instant::now() < limit.until
        && limit
            .budget
            .fetch_sub(knobs.batch as i64, Ordering::Relaxed)
            > 0
    {
        if knobs.batch == 1 {
            // One transfer per call, as payment services send them: nothing to collect into
            // vectors (the load generator shares the machine; its per-call work counts).
            let op = generator.next(&knobs, &accounts);
            let transfer = wire(&op, &accounts);
            let started = Instant::now();
            let result = raw.transfer(transfer).await;
            tally.record(started.elapsed());
            match result {
                Ok(r) => count(&mut tally, &op, r.into_inner()),
                Err(_) => tally.errors += 1,
            }
            continue;
        }
        let ops: Vec<Op> = (0..knobs.batch)
            .map(|_| generator.next(&knobs, &accounts))
            .collect();
        let transfers: Vec<pb::Transfer> = ops.iter().map(|op| wire(op, &accounts)).collect();
        let started = Instant::now();
        let results = raw
            .create_transfers(pb::CreateTransfersRequest { transfers })
            .await;
        tally.record(started.elapsed());
        let Ok(results) = results else {
            tally.errors += 1;
            continue;
        };
        for (op, r) in ops.iter().zip(results.into_inner().results) {
            count(&mut tally, op, r);
        }
    }
    tally
}

/// Counts one transfer's outcome.
fn count(tally: &mut Tally, op: &Op, r: pb::TransferResult) {
    tally.transfers += 1;
    match r.outcome {
        Some(pb::transfer_result::Outcome::Transfer(_)) => {
            tally.committed(op);
            if tally.sample_ids.len() < 100 && generator_sample(tally.committed) {
                tally.sample_ids.push(op.id().to_string());
            }
        }
        Some(pb::transfer_result::Outcome::Rejection(rej)) => {
            *tally.rejections.entry(reason_name(rej.reason)).or_default() += 1;
        }
        None => tally.errors += 1,
    }
}

fn generator_sample(committed: u64) -> bool {
    committed.is_power_of_two() || committed.is_multiple_of(997)
}

/// gRPC ceiling: health Check calls (a no-op) at the same concurrency, same client process.
pub async fn ceiling(channels: &[Channel], clients: usize, length: Duration) -> f64 {
    let until = Instant::now() + length;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                channels[i % channels.len()].clone(),
            );
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < until {
                    let request = tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    };
                    if health.check(request).await.is_ok() {
                        calls += 1;
                    }
                }
                calls
            })
        })
        .collect();
    let started = Instant::now();
    let calls: u64 = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap_or(0))
        .sum();
    calls as f64 / started.elapsed().as_secs_f64()
}

/// The books after the run: per-ledger conservation, and the committed totals match what the
/// clients were told (every acknowledged transfer applied, exactly once).
pub async fn check(client: &Client, accounts: &Accounts, tally: &Tally) -> Result<String, String> {
    let mut sums = BTreeMap::<&str, (i128, i128)>::new();
    let (mut debits_posted, mut debits_pending) = (0u128, 0u128);
    for chunk in accounts.ids.chunks(8_000) {
        let got = client
            .get_accounts(chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        if !got.not_found.is_empty() {
            return Err(format!("{} accounts missing", got.not_found.len()));
        }
        for a in got.accounts {
            let e = sums.entry("USD").or_default();
            e.0 += i128::from(a.credits_posted) - i128::from(a.debits_posted);
            e.1 += i128::from(a.credits_pending) - i128::from(a.debits_pending);
            debits_posted += u128::from(a.debits_posted);
            debits_pending += u128::from(a.debits_pending);
        }
    }
    if sums
        .values()
        .any(|(posted, pending)| *posted != 0 || *pending != 0)
    {
        return Err(format!("conservation broken: {sums:?}"));
    }
    let mut out = String::from("balances conserved");
    if tally.errors == 0 {
        if debits_posted != u128::from(tally.posted_sum)
            || debits_pending != u128::from(tally.pending_sum)
        {
            return Err(format!(
                "totals differ from acknowledged transfers: posted {debits_posted} vs {}, pending {debits_pending} vs {}",
                tally.posted_sum, tally.pending_sum
            ));
        }
        out.push_str("; debit totals equal the acknowledged transfers (each applied once)");
    } else {
        out.push_str("; totals not compared (some requests failed, outcome unknown)");
    }
    let sample: Vec<String> = tally.sample_ids.iter().take(8_000).cloned().collect();
    let found = client
        .get_transfers(sample.clone())
        .await
        .map_err(|e| e.to_string())?;
    if !found.not_found.is_empty() {
        return Err(format!(
            "acknowledged transfers missing: {:?}",
            found.not_found
        ));
    }
    out.push_str(&format!(
        "; {} sampled acknowledged transfers found",
        sample.len()
    ));
    Ok(out)
}
