//! `ledger`: the command-line client. Talks gRPC to `ledgerd` (default 127.0.0.1:50051).
//!
//! Errors print as one line, `ledger: <what>: <details>`, on stderr; the exit code says which
//! kind ([`EXIT_CODES`], shown by `ledger --help`).

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use ledger_client::{Client, pb, reason_name};

/// What `ledger --help` says of exit codes; [`Exit`] holds the numbers.
const EXIT_CODES: &str = "Exit codes:
  0  done
  1  rejected by the ledger (the reason is printed; a retriable one says so)
  2  bad input (a usage error, or the ledger refused the request as malformed)
  3  not found (an account or transfer id the ledger does not know)
  4  unavailable (ledgerd not reachable, or a shard leader changing; retry with the same ids)
  5  any other error";

/// The exit codes of [`EXIT_CODES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Done = 0,
    Rejected = 1,
    BadInput = 2,
    NotFound = 3,
    Unavailable = 4,
    Other = 5,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

#[derive(Parser)]
#[command(
    name = "ledger",
    version,
    about = "Command-line client for ledgerd: accounts, transfers, holds, balances, statements",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Address of ledgerd (host:port, or a URL).
    #[arg(
        long,
        env = "LEDGER_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// W3C traceparent to send with every call (to join a trace you already have). Without it
    /// each run of `ledger` starts a new trace; transfers record its trace id.
    #[arg(long, env = "TRACEPARENT", global = true)]
    traceparent: Option<String>,
    /// The operator's token file, for `ledger quota` (ledgerd's `admin.token_file`; by default
    /// it writes one into its data directory).
    #[arg(
        long,
        env = "LEDGER_ADMIN_TOKEN_FILE",
        default_value = "./data/admin.token",
        global = true
    )]
    admin_token_file: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// A fresh sampled `traceparent`: 128 random bits of trace id, 64 of span id (std's random
/// hasher keys; trace ids need to be unique, not secret).
fn new_traceparent() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        h.finish().max(1)
    };
    format!("00-{:016x}{:016x}-{:016x}-01", random(), random(), random())
}

#[derive(Subcommand)]
enum Command {
    /// Accounts: create, get.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Transfers: create (posted), get.
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// Holds (pending transfers): create, post, void.
    #[command(subcommand)]
    Hold(HoldCommand),
    /// An account's balances, and what it can spend now (available).
    Balance {
        /// The account id.
        account_id: String,
    },
    /// An account's statement (entries, oldest first).
    Statement {
        /// The account id.
        account_id: String,
        /// Entries per page; all pages are fetched.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// The cluster: nodes, shards, leaders.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Regional quotas (operators): show, set, move, revoke, write-off. Needs the operator's
    /// token (--admin-token-file).
    #[command(subcommand)]
    Quota(QuotaCommand),
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// An account's allowances per region: reserved at home, spent, settled, in flight,
    /// epochs, expiry.
    Show {
        /// The account id.
        account_id: String,
    },
    /// Sets what the account's home reserves for a region (a grant, or a shrink the region
    /// makes first) and renews the lease.
    Set {
        /// The account id.
        account_id: String,
        /// The region that may spend it (not the account's home region).
        #[arg(long)]
        region: String,
        /// What the home reserves for the region, in minor units: its unspent rights plus
        /// what it spent and has not settled.
        #[arg(long)]
        amount: u64,
        /// Seconds until the region stops spending it.
        #[arg(long, default_value_t = 3_600)]
        lease_seconds: u64,
    },
    /// Moves unspent rights from one region to another (the donor gives them up first).
    Move {
        /// The account id.
        account_id: String,
        /// The region giving rights up.
        #[arg(long)]
        from: String,
        /// The region receiving them.
        #[arg(long)]
        to: String,
        /// How much to move, in minor units (at most what the donor has not spent moves).
        #[arg(long)]
        amount: u64,
        /// Seconds until the receiving region stops spending it.
        #[arg(long, default_value_t = 3_600)]
        lease_seconds: u64,
    },
    /// Takes back every unspent right of a region.
    Revoke {
        /// The account id.
        account_id: String,
        /// The region.
        #[arg(long)]
        region: String,
    },
    /// Releases what the home reserves for a region that cannot report; its later
    /// settlements are refused.
    WriteOff {
        /// The account id.
        account_id: String,
        /// The region.
        #[arg(long)]
        region: String,
        /// Why (written to the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The map, each node's reachability and map version, each shard's leader and epoch and
    /// its two-phase commits in flight, as the node called sees them.
    Status,
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account (again with the same fields: answers the existing one).
    Create {
        /// The account id: 1-128 characters of A-Z a-z 0-9 . _ : @ / -
        id: String,
        /// Asset or currency code, e.g. USD: transfers move value within one ledger.
        #[arg(long)]
        ledger: String,
        /// Refuse debits beyond credits (counting holds).
        #[arg(long)]
        no_overdraft: bool,
        /// Refuse credits beyond debits.
        #[arg(long)]
        credits_must_not_exceed_debits: bool,
        /// Overdraft allowed with --no-overdraft, in minor units.
        #[arg(long)]
        credit_limit: Option<u64>,
        /// Accounts sharing a placement key share a shard (defaults to the id).
        #[arg(long)]
        placement_key: Option<String>,
        /// The account's home region, fixed once created (default: the region of the node
        /// called).
        #[arg(long)]
        region: Option<String>,
        /// Metadata, key=value (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// Show accounts: balances, version, flags, shard.
    Get {
        /// Account ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Args)]
struct NewTransfer {
    /// The transfer id, the idempotency key: sending it again with the same fields answers
    /// the recorded outcome. Generated (and printed) if omitted.
    id: Option<String>,
    /// The account debited (the money leaves it).
    #[arg(long)]
    debit: String,
    /// The account credited (the money goes to it).
    #[arg(long)]
    credit: String,
    /// A positive whole number of minor units: 2500 for 25.00.
    #[arg(long, value_parser = parse_amount, allow_hyphen_values = true)]
    amount: u64,
    /// The ledger (currency) of both accounts, e.g. USD.
    #[arg(long)]
    ledger: String,
    /// A reason code of your own, stored with the transfer.
    #[arg(long, default_value_t = 0)]
    code: u32,
    /// Apply only if the debit account is still at this version (from `account get`).
    #[arg(long)]
    expected_debit_version: Option<u64>,
    /// Apply only if the credit account is still at this version (from `account get`).
    #[arg(long)]
    expected_credit_version: Option<u64>,
    /// Metadata, key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum TransferCommand {
    /// Move an amount from one account to another now.
    Create(NewTransfer),
    /// Show transfers by id: committed ones, or the recorded rejection of a refused one.
    Get {
        /// Transfer ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Reserve an amount (debits_pending / credits_pending grow).
    Create {
        #[command(flatten)]
        transfer: NewTransfer,
        /// Seconds until the hold expires on its own (0 = never).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
    },
    /// Post a hold, fully or partly.
    Post {
        /// The hold's (pending transfer's) id.
        pending_id: String,
        /// The id of this posting transfer (its idempotency key). Generated if omitted.
        #[arg(long)]
        id: Option<String>,
        /// Amount to post, in minor units; all of the hold if omitted (the rest is released).
        #[arg(long, value_parser = parse_amount, allow_hyphen_values = true)]
        amount: Option<u64>,
    },
    /// Release a hold.
    Void {
        /// The hold's (pending transfer's) id.
        pending_id: String,
        /// The id of this voiding transfer (its idempotency key). Generated if omitted.
        #[arg(long)]
        id: Option<String>,
    },
}

/// What a bad `--amount` gets: the unit, with an example.
const AMOUNT_RULE: &str = "amount must be a positive whole number of minor units (2500 for 25.00)";

fn parse_amount(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(amount) if amount > 0 => Ok(amount),
        _ => Err(AMOUNT_RULE.to_string()),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn generated_id(prefix: &str) -> String {
    #[allow(clippy::disallowed_methods)] // a CLI id, not engine time
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}-{}", std::process::id())
}

impl NewTransfer {
    fn into_wire(self, flags: pb::TransferFlags, timeout_seconds: u32) -> pb::Transfer {
        pb::Transfer {
            id: self.id.unwrap_or_else(|| generated_id("cli")),
            debit_account_id: self.debit,
            credit_account_id: self.credit,
            amount: self.amount,
            ledger: self.ledger,
            code: self.code,
            flags: Some(flags),
            timeout_seconds,
            expected_debit_version: self.expected_debit_version,
            expected_credit_version: self.expected_credit_version,
            metadata: self.metadata.into_iter().collect::<HashMap<_, _>>(),
            ..Default::default()
        }
    }
}

fn print_account(a: &pb::Account) {
    let flags = a.flags.unwrap_or_default();
    println!(
        "account {} ledger={} region={} shard={} version={} debits_pending={} debits_posted={} \
         credits_pending={} credits_posted={} created_at={}{}{}",
        a.id,
        a.ledger,
        a.region,
        a.shard,
        a.version,
        a.debits_pending,
        a.debits_posted,
        a.credits_pending,
        a.credits_posted,
        rfc3339(a.created_at_unix_ms),
        if flags.debits_must_not_exceed_credits {
            " no_overdraft"
        } else {
            ""
        },
        if flags.credits_must_not_exceed_debits {
            " credits_must_not_exceed_debits"
        } else {
            ""
        },
    );
}

fn print_transfer(t: &pb::Transfer) {
    let flags = t.flags.unwrap_or_default();
    let kind = if flags.pending {
        "hold"
    } else if flags.post_pending {
        "post"
    } else if flags.void_pending {
        "void"
    } else {
        "transfer"
    };
    let hold = pb::HoldState::try_from(t.hold_state)
        .ok()
        .filter(|s| *s != pb::HoldState::Unspecified)
        .map(|s| {
            format!(
                " hold_state={}",
                s.as_str_name()
                    .trim_start_matches("HOLD_STATE_")
                    .to_lowercase()
            )
        })
        .unwrap_or_default();
    let pending = if t.pending_id.is_empty() {
        String::new()
    } else {
        format!(" pending_id={}", t.pending_id)
    };
    println!(
        "{kind} {} {} -> {} amount={} ledger={} code={}{pending}{hold} committed_at={}{}{}{}",
        t.id,
        t.debit_account_id,
        t.credit_account_id,
        t.amount,
        t.ledger,
        t.code,
        rfc3339(t.committed_at_unix_ms),
        if t.cross_shard { " cross_shard" } else { "" },
        if t.quota_path { " quota_path" } else { "" },
        if t.trace_id.is_empty() {
            String::new()
        } else {
            format!(" trace_id={}", t.trace_id)
        },
    );
}

/// Prints a transfer result; returns whether it was committed.
fn print_result(r: &pb::TransferResult) -> bool {
    let replayed = if r.replayed {
        " (replayed: the outcome recorded for this id; nothing was applied now)"
    } else {
        ""
    };
    match &r.outcome {
        Some(pb::transfer_result::Outcome::Transfer(t)) => {
            print_transfer(t);
            if r.replayed {
                println!(
                    "replayed {}: the outcome recorded for this id; nothing was applied now",
                    r.id
                );
            }
            true
        }
        Some(pb::transfer_result::Outcome::Rejection(rej)) => {
            print_rejection(&r.id, rej, replayed);
            false
        }
        None => {
            println!("no outcome for {}", r.id);
            false
        }
    }
}

fn print_rejection(id: &str, rej: &pb::Rejection, replayed: &str) {
    let retry = if rej.retriable {
        " (retriable: retry with the same id)"
    } else {
        ""
    };
    println!(
        "rejected {id}: {} ({}){retry}{replayed}",
        reason_name(rej.reason),
        rej.message
    );
}

/// Unix milliseconds as RFC 3339 in UTC, e.g. `2026-12-07T14:03:09.120Z`.
fn rfc3339(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1_000, unix_ms % 1_000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3_600, rem % 3_600 / 60, rem % 60);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar), as in Howard
    // Hinnant's `civil_from_days`; unsigned, since the epoch is the earliest time shown.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{ms:03}Z")
}

/// A transfer's exit code: done if committed, else rejected.
fn exit_of(committed: bool) -> Exit {
    if committed {
        Exit::Done
    } else {
        Exit::Rejected
    }
}

async fn execute(
    client: &Client,
    command: Command,
    cli_token_file: &std::path::Path,
) -> Result<Exit, ledger_client::Error> {
    match command {
        Command::Account(AccountCommand::Create {
            id,
            ledger,
            no_overdraft,
            credits_must_not_exceed_debits,
            credit_limit,
            placement_key,
            region,
            metadata,
        }) => {
            let account = pb::Account {
                id,
                ledger,
                flags: Some(pb::AccountFlags {
                    debits_must_not_exceed_credits: no_overdraft,
                    credits_must_not_exceed_debits,
                }),
                placement_key: placement_key.unwrap_or_default(),
                region: region.unwrap_or_default(),
                metadata: metadata.into_iter().collect(),
                credit_limit,
                ..Default::default()
            };
            let results = client.create_accounts(vec![account]).await?;
            let mut exit = Exit::Done;
            for r in results {
                match r.outcome {
                    Some(pb::account_result::Outcome::Account(a)) => print_account(&a),
                    Some(pb::account_result::Outcome::Rejection(rej)) => {
                        print_rejection(&r.id, &rej, "");
                        exit = Exit::Rejected;
                    }
                    None => exit = Exit::Other,
                }
            }
            Ok(exit)
        }
        Command::Account(AccountCommand::Get { ids }) => {
            let found = client.get_accounts(ids).await?;
            found.accounts.iter().for_each(print_account);
            for id in &found.not_found {
                println!("not found: {id}");
            }
            Ok(if found.not_found.is_empty() {
                Exit::Done
            } else {
                Exit::NotFound
            })
        }
        Command::Transfer(TransferCommand::Create(t)) => {
            let result = client
                .transfer(t.into_wire(pb::TransferFlags::default(), 0))
                .await?;
            Ok(exit_of(print_result(&result)))
        }
        Command::Transfer(TransferCommand::Get { ids }) => {
            let found = client.get_transfers(ids).await?;
            found.transfers.iter().for_each(print_transfer);
            for r in &found.rejected {
                if let Some(pb::transfer_result::Outcome::Rejection(rej)) = &r.outcome {
                    print_rejection(&r.id, rej, "");
                }
            }
            for id in &found.not_found {
                println!("not found: {id}");
            }
            Ok(if !found.not_found.is_empty() {
                Exit::NotFound
            } else if !found.rejected.is_empty() {
                Exit::Rejected
            } else {
                Exit::Done
            })
        }
        Command::Hold(HoldCommand::Create { transfer, timeout }) => {
            let flags = pb::TransferFlags {
                pending: true,
                ..Default::default()
            };
            let result = client.transfer(transfer.into_wire(flags, timeout)).await?;
            Ok(exit_of(print_result(&result)))
        }
        Command::Hold(HoldCommand::Post {
            pending_id,
            id,
            amount,
        }) => {
            let t = pb::Transfer {
                id: id.unwrap_or_else(|| generated_id("post")),
                pending_id,
                amount: amount.unwrap_or(0),
                flags: Some(pb::TransferFlags {
                    post_pending: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            Ok(exit_of(print_result(&client.transfer(t).await?)))
        }
        Command::Hold(HoldCommand::Void { pending_id, id }) => {
            let t = pb::Transfer {
                id: id.unwrap_or_else(|| generated_id("void")),
                pending_id,
                flags: Some(pb::TransferFlags {
                    void_pending: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            Ok(exit_of(print_result(&client.transfer(t).await?)))
        }
        Command::Balance { account_id } => {
            let b = client.balance(&account_id).await?;
            println!(
                "balance {} ledger={} available={} debits_pending={} debits_posted={} \
                 credits_pending={} credits_posted={} version={}",
                b.account_id,
                b.ledger,
                b.available,
                b.debits_pending,
                b.debits_posted,
                b.credits_pending,
                b.credits_posted,
                b.version
            );
            Ok(Exit::Done)
        }
        Command::Cluster(ClusterCommand::Status) => {
            let status = client.cluster_status().await?;
            println!(
                "cluster map version {} ({} regions: {}), answered by {}",
                status.map_version,
                status.regions.len(),
                status.regions.join(", "),
                status.answered_by
            );
            let mut exit = Exit::Done;
            for n in &status.nodes {
                if n.reachable {
                    println!(
                        "node {} region={} addr={} peer={} reachable map_version={}",
                        n.id, n.region, n.client_address, n.peer_address, n.map_version
                    );
                } else {
                    println!(
                        "node {} region={} addr={} peer={} UNREACHABLE ({})",
                        n.id, n.region, n.client_address, n.peer_address, n.error
                    );
                    exit = Exit::Unavailable;
                }
            }
            for s in &status.shards {
                let leader = if s.leader.is_empty() {
                    "unknown".to_string()
                } else {
                    format!("{} epoch={}", s.leader, s.epoch)
                };
                println!(
                    "shard {} region={} owner={} leader={leader} coordinating={} prepared={}",
                    s.shard, s.region, s.owner, s.coordinating, s.prepared
                );
            }
            Ok(exit)
        }
        Command::Quota(command) => {
            let token = std::fs::read_to_string(cli_token_file).map_err(|e| {
                ledger_client::Error::Status(tonic::Status::unauthenticated(format!(
                    "cannot read the admin token file {}: {e} (set --admin-token-file)",
                    cli_token_file.display()
                )))
            })?;
            let client = client.clone().with_admin_token(&token)?;
            let response = match command {
                QuotaCommand::Show { account_id } => client.get_quotas(&account_id).await?,
                QuotaCommand::Set {
                    account_id,
                    region,
                    amount,
                    lease_seconds,
                } => {
                    client
                        .set_quota(pb::SetQuotaRequest {
                            account_id,
                            region,
                            amount,
                            lease_seconds,
                        })
                        .await?
                }
                QuotaCommand::Move {
                    account_id,
                    from,
                    to,
                    amount,
                    lease_seconds,
                } => {
                    client
                        .move_quota(pb::MoveQuotaRequest {
                            account_id,
                            from_region: from,
                            to_region: to,
                            amount,
                            lease_seconds,
                        })
                        .await?
                }
                QuotaCommand::Revoke { account_id, region } => {
                    client
                        .revoke_quota(pb::RevokeQuotaRequest { account_id, region })
                        .await?
                }
                QuotaCommand::WriteOff {
                    account_id,
                    region,
                    reason,
                } => {
                    client
                        .write_off_quota(pb::WriteOffQuotaRequest {
                            account_id,
                            region,
                            reason,
                        })
                        .await?
                }
            };
            print_quotas(&response);
            Ok(Exit::Done)
        }
        Command::Statement {
            account_id,
            page_size,
        } => {
            let mut token = String::new();
            loop {
                let page = client.entries(&account_id, page_size, token).await?;
                for e in &page.entries {
                    let side = if e.side == pb::Side::Debit as i32 {
                        "debit"
                    } else {
                        "credit"
                    };
                    let kind = pb::EntryKind::try_from(e.kind)
                        .map(|k| {
                            k.as_str_name()
                                .trim_start_matches("ENTRY_KIND_")
                                .to_lowercase()
                        })
                        .unwrap_or_default();
                    println!(
                        "#{} {} {side} {kind} amount={} at={} -> debits_pending={} \
                         debits_posted={} credits_pending={} credits_posted={}",
                        e.version,
                        e.transfer_id,
                        e.amount,
                        rfc3339(e.committed_at_unix_ms),
                        e.debits_pending,
                        e.debits_posted,
                        e.credits_pending,
                        e.credits_posted
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(Exit::Done);
                }
                token = page.next_page_token;
            }
        }
    }
}

fn print_quotas(q: &pb::QuotasResponse) {
    println!(
        "quotas of {} (home region {}): {} region(s)",
        q.account_id,
        q.home_region,
        q.quotas.len()
    );
    for r in &q.quotas {
        let region_side = if r.region_answered {
            format!(
                "spent={} available={} in_flight={} region_epoch={}{}",
                r.spent,
                r.available,
                r.in_flight,
                r.region_epoch,
                if r.closed { " closed" } else { "" }
            )
        } else {
            "region: no answer".to_string()
        };
        println!(
            "quota {} reserved={} granted={} settled={} released={} refused={} epoch={} \
             confirmed={} expires={}{} {region_side}",
            r.region,
            r.reserved,
            r.granted,
            r.settled,
            r.released,
            r.refused,
            r.epoch,
            r.confirmed_epoch,
            rfc3339(r.expires_at_unix_ms),
            if r.pending.is_empty() {
                String::new()
            } else {
                format!(" pending={}", r.pending)
            },
        );
    }
}

/// Prints `e` as one line and returns its exit code.
fn report(e: &ledger_client::Error) -> Exit {
    use tonic::Code;
    use tonic_types::StatusExt;
    match e {
        ledger_client::Error::Connect { addr, reason } => {
            eprintln!(
                "ledger: ledgerd is not reachable at {addr} ({reason}). Start it with \
                 `ledgerd start` (from a source checkout: `cargo run --release --bin ledgerd -- \
                 start`), or point --addr or LEDGER_ADDR at a running ledgerd."
            );
            Exit::Unavailable
        }
        ledger_client::Error::Status(status) => {
            let (exit, kind) = match status.code() {
                Code::InvalidArgument | Code::OutOfRange => (Exit::BadInput, "invalid request"),
                Code::NotFound => (Exit::NotFound, "not found"),
                Code::FailedPrecondition => (Exit::Rejected, "refused"),
                Code::Unauthenticated | Code::PermissionDenied => (Exit::Other, "not allowed"),
                Code::Unavailable => (Exit::Unavailable, "unavailable, retry later"),
                Code::DeadlineExceeded => (Exit::Unavailable, "timed out, retry later"),
                _ => (Exit::Other, "error"),
            };
            let details = status.get_error_details();
            let violations = details
                .bad_request()
                .map(|b| b.field_violations.as_slice())
                .unwrap_or_default();
            if violations.is_empty() {
                eprintln!("ledger: {kind}: {}", status.message());
            } else {
                for v in violations {
                    eprintln!("ledger: {kind}: {}: {}", v.field, v.description);
                }
            }
            exit
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let traceparent = cli.traceparent.clone().unwrap_or_else(new_traceparent);
        let client = match Client::connect(&cli.addr)
            .await
            .and_then(|c| c.with_traceparent(&traceparent))
        {
            Ok(c) => c,
            Err(e) => return report(&e).into(),
        };
        match execute(&client, cli.command, &cli.admin_token_file).await {
            Ok(exit) => exit.into(),
            Err(e) => report(&e).into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn amounts_are_positive_whole_minor_units() {
        assert_eq!(parse_amount("2500"), Ok(2500));
        for bad in ["-5", "10.50", "0", "", "25,00", "1e3"] {
            assert_eq!(parse_amount(bad), Err(AMOUNT_RULE.to_string()), "{bad:?}");
        }
    }

    #[test]
    fn every_option_and_subcommand_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !["help", "version"].contains(&id) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "ledger",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
