//! The PostgreSQL baseline: the ledger users would otherwise build. A throwaway server from the
//! machine's PostgreSQL binaries (durable: fsync=on, synchronous_commit=on), the usual schema,
//! and each request as one transaction that locks its holds, then its accounts in id order
//! (`SELECT ... FOR UPDATE`), checks idempotency by transfer id, updates balances and versions,
//! and appends transfers and entries.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_postgres::{Client, NoTls};

use crate::ledger::Limit;
use crate::report::Tally;
use crate::workload::{Accounts, Generator, Knobs, Op};

pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
    as_postgres: bool,
}

fn pg_bin_dir() -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL server binaries not found under /usr/lib/postgresql".to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".into())
}

impl Postgres {
    pub fn start() -> Result<Postgres, String> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("ledger-bench-pg-")
            .tempdir_in(".")
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("pg");
        // PostgreSQL refuses to run as root: run it as the `postgres` user then.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
            if !ok.is_ok_and(|s| s.success()) {
                return Err("cannot hand the PostgreSQL directory to the postgres user".into());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let pg = Postgres {
            bin,
            data,
            port,
            _dir: dir,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )?;
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=on \
             -c synchronous_commit=on -c full_page_writes=on -c max_connections=600 -c shared_buffers=512MB",
            pg._dir.path().display()
        );
        let log = pg._dir.path().join("log").display().to_string();
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        )?;
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command
            .args(args)
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub async fn connect(&self) -> Result<Client, String> {
        let config = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&config, NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }
}

pub async fn setup(client: &Client, accounts: &Accounts) -> Result<(), String> {
    client
        .batch_execute(
            "CREATE TABLE accounts (
                id text PRIMARY KEY, ledger text NOT NULL,
                debits_pending bigint NOT NULL DEFAULT 0, debits_posted bigint NOT NULL DEFAULT 0,
                credits_pending bigint NOT NULL DEFAULT 0, credits_posted bigint NOT NULL DEFAULT 0,
                version bigint NOT NULL DEFAULT 0);
             CREATE TABLE transfers (
                id text PRIMARY KEY, debit_account_id text NOT NULL, credit_account_id text NOT NULL,
                amount bigint NOT NULL, ledger text NOT NULL, kind smallint NOT NULL,
                pending_id text, hold_state smallint, created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE entries (
                account_id text NOT NULL, version bigint NOT NULL, transfer_id text NOT NULL,
                amount bigint NOT NULL, PRIMARY KEY (account_id, version));",
        )
        .await
        .map_err(|e| e.to_string())?;
    for chunk in accounts.ids.chunks(50_000) {
        client
            .execute(
                "INSERT INTO accounts (id, ledger) SELECT unnest($1::text[]), 'USD'",
                &[&chunk.to_vec()],
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[derive(Clone, Copy, Default)]
struct Row {
    debits_pending: i64,
    debits_posted: i64,
    credits_pending: i64,
    credits_posted: i64,
    version: i64,
}

/// One request = one transaction. Returns per-op committed?, or the error.
async fn request(
    client: &mut Client,
    ops: &[Op],
    accounts: &Accounts,
) -> Result<Vec<bool>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let ids: Vec<String> = ops.iter().map(|o| o.id().to_string()).collect();
    let existing: BTreeSet<String> = tx
        .query("SELECT id FROM transfers WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Holds first (in id order), then accounts (in id order): one global lock order.
    let mut pending_ids: Vec<String> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Post { pending_id, .. } => Some(pending_id.clone()),
            _ => None,
        })
        .collect();
    pending_ids.sort();
    let mut holds: HashMap<String, (String, String, i64, i16)> = HashMap::new();
    if !pending_ids.is_empty() {
        let rows = tx
            .query(
                "SELECT id, debit_account_id, credit_account_id, amount, hold_state FROM transfers \
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&pending_ids],
            )
            .await?;
        for r in rows {
            holds.insert(r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4)));
        }
    }
    let side = |o: &Op| -> Option<(String, String, i64)> {
        match o {
            Op::Posted {
                debit,
                credit,
                amount,
                ..
            }
            | Op::Hold {
                debit,
                credit,
                amount,
                ..
            } => Some((
                accounts.ids[*debit].clone(),
                accounts.ids[*credit].clone(),
                i64::try_from(*amount).ok()?,
            )),
            Op::Post { pending_id, .. } => holds
                .get(pending_id)
                .map(|(d, c, a, _)| (d.clone(), c.clone(), *a)),
        }
    };
    let mut touched: Vec<String> = ops
        .iter()
        .filter_map(side)
        .flat_map(|(d, c, _)| [d, c])
        .collect();
    touched.sort();
    touched.dedup();
    let mut rows: HashMap<String, Row> = HashMap::new();
    for r in tx
        .query(
            "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted, version \
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&touched],
        )
        .await?
    {
        rows.insert(
            r.get(0),
            Row {
                debits_pending: r.get(1),
                debits_posted: r.get(2),
                credits_pending: r.get(3),
                credits_posted: r.get(4),
                version: r.get(5),
            },
        );
    }
    let (
        mut t_ids,
        mut t_debit,
        mut t_credit,
        mut t_amount,
        mut t_kind,
        mut t_pending,
        mut t_state,
    ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut e_account, mut e_version, mut e_transfer, mut e_amount) =
        (vec![], vec![], vec![], vec![]);
    let mut posted_holds = Vec::new();
    let mut committed = Vec::with_capacity(ops.len());
    for op in ops {
        if existing.contains(op.id()) {
            committed.push(false);
            continue;
        }
        let Some((debit, credit, amount)) = side(op) else {
            committed.push(false);
            continue;
        };
        let (kind, pending, state): (i16, Option<String>, Option<i16>) = match op {
            Op::Posted { .. } => (0, None, None),
            Op::Hold { .. } => (1, None, Some(1)),
            Op::Post { pending_id, .. } => {
                if holds.get(pending_id).is_none_or(|h| h.3 != 1)
                    || posted_holds.contains(pending_id)
                {
                    committed.push(false);
                    continue;
                }
                posted_holds.push(pending_id.clone());
                (2, Some(pending_id.clone()), None)
            }
        };
        for (id, is_debit) in [(&debit, true), (&credit, false)] {
            let row = rows.get_mut(id).expect("locked");
            let (pending, posted) = if is_debit {
                (&mut row.debits_pending, &mut row.debits_posted)
            } else {
                (&mut row.credits_pending, &mut row.credits_posted)
            };
            match kind {
                0 => *posted += amount,
                1 => *pending += amount,
                _ => {
                    *pending -= amount;
                    *posted += amount;
                }
            }
            row.version += 1;
            e_account.push(id.clone());
            e_version.push(row.version);
            e_transfer.push(op.id().to_string());
            e_amount.push(amount);
        }
        t_ids.push(op.id().to_string());
        t_debit.push(debit);
        t_credit.push(credit);
        t_amount.push(amount);
        t_kind.push(kind);
        t_pending.push(pending);
        t_state.push(state);
        committed.push(true);
    }
    let ids: Vec<&String> = rows.keys().collect();
    let col = |f: fn(&Row) -> i64| -> Vec<i64> { ids.iter().map(|id| f(&rows[*id])).collect() };
    tx.execute(
        "UPDATE accounts a SET debits_pending = u.dp, debits_posted = u.dq, credits_pending = u.cp, \
         credits_posted = u.cq, version = u.v \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
         AS u(id, dp, dq, cp, cq, v) WHERE a.id = u.id",
        &[&ids, &col(|r| r.debits_pending), &col(|r| r.debits_posted), &col(|r| r.credits_pending),
          &col(|r| r.credits_posted), &col(|r| r.version)],
    )
    .await?;
    tx.execute(
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, ledger, kind, pending_id, hold_state) \
         SELECT t.id, t.d, t.c, t.a, 'USD', t.k, t.p, t.s \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::smallint[], $6::text[], $7::smallint[]) \
         AS t(id, d, c, a, k, p, s)",
        &[&t_ids, &t_debit, &t_credit, &t_amount, &t_kind, &t_pending, &t_state],
    )
    .await?;
    tx.execute(
        "INSERT INTO entries (account_id, version, transfer_id, amount) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])",
        &[&e_account, &e_version, &e_transfer, &e_amount],
    )
    .await?;
    if !posted_holds.is_empty() {
        tx.execute(
            "UPDATE transfers SET hold_state = 2 WHERE id = ANY($1)",
            &[&posted_holds],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(committed)
}

pub async fn client_loop(
    mut client: Client,
    knobs: Arc<Knobs>,
    accounts: Arc<Accounts>,
    run: String,
    n: usize,
    limit: Arc<Limit>,
) -> Tally {
    let mut generator = Generator::new(&knobs, &run, n);
    let mut tally = Tally::default();
    while Instant::now() < limit.until
        && limit
            .budget
            .fetch_sub(knobs.batch as i64, Ordering::Relaxed)
            > 0
    {
        let ops: Vec<Op> = (0..knobs.batch)
            .map(|_| generator.next(&knobs, &accounts))
            .collect();
        let started = Instant::now();
        let result = request(&mut client, &ops, &accounts).await;
        tally.record(started.elapsed());
        match result {
            Ok(committed) => {
                for (op, ok) in ops.iter().zip(committed) {
                    tally.transfers += 1;
                    if !ok {
                        *tally.rejections.entry("not_applied".into()).or_default() += 1;
                        continue;
                    }
                    tally.committed(op);
                }
            }
            Err(e) => {
                tally.errors += 1;
                if tally.errors == 1 {
                    eprintln!("postgres request failed: {e}");
                }
            }
        }
    }
    tally
}

pub async fn check(client: &Client, tally: &Tally) -> Result<String, String> {
    let row = client
        .query_one(
            "SELECT sum(credits_posted - debits_posted)::bigint, sum(credits_pending - debits_pending)::bigint, \
             sum(debits_posted)::bigint, sum(debits_pending)::bigint FROM accounts",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (posted, pending, debits_posted, debits_pending): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if posted != 0 || pending != 0 {
        return Err(format!("conservation broken: {posted} {pending}"));
    }
    if tally.errors == 0
        && (u64::try_from(debits_posted).ok() != Some(tally.posted_sum)
            || u64::try_from(debits_pending).ok() != Some(tally.pending_sum))
    {
        return Err("totals differ from acknowledged transfers".into());
    }
    Ok("balances conserved; debit totals equal the acknowledged transfers".into())
}
