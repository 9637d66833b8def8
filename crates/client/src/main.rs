//! `ledger`: the command-line client. Talks gRPC to `ledgerd` (default 127.0.0.1:50051).
//!
//! Exit codes: 0 done, 1 rejected by the ledger (the reason is printed), 2 error (bad usage,
//! unreachable server, invalid argument).

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use ledger_client::{Client, pb, reason_name};

#[derive(Parser)]
#[command(name = "ledger", version, about = "Command-line client for ledgerd")]
struct Cli {
    /// Server address.
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
    /// An account's balances.
    Balance { account_id: String },
    /// An account's statement (entries, oldest first).
    Statement {
        account_id: String,
        /// Entries per page; all pages are fetched.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    Create {
        id: String,
        /// Asset or currency code, e.g. USD.
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
        /// Metadata, key=value (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    Get {
        ids: Vec<String>,
    },
}

#[derive(Args)]
struct NewTransfer {
    /// The transfer id (idempotency key). Generated and printed if omitted.
    id: Option<String>,
    #[arg(long)]
    debit: String,
    #[arg(long)]
    credit: String,
    /// Minor units (cents).
    #[arg(long)]
    amount: u64,
    #[arg(long)]
    ledger: String,
    #[arg(long, default_value_t = 0)]
    code: u32,
    #[arg(long)]
    expected_debit_version: Option<u64>,
    #[arg(long)]
    expected_credit_version: Option<u64>,
    #[arg(long = "meta", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum TransferCommand {
    Create(NewTransfer),
    Get { ids: Vec<String> },
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
        /// The id of this posting transfer. Generated if omitted.
        #[arg(long)]
        id: Option<String>,
        /// Amount to post; all of the hold if omitted.
        #[arg(long)]
        amount: Option<u64>,
    },
    /// Release a hold.
    Void {
        pending_id: String,
        #[arg(long)]
        id: Option<String>,
    },
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
        "account {} ledger={} shard={} version={} debits_pending={} debits_posted={} \
         credits_pending={} credits_posted={}{}{}",
        a.id,
        a.ledger,
        a.shard,
        a.version,
        a.debits_pending,
        a.debits_posted,
        a.credits_pending,
        a.credits_posted,
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
        "{kind} {} {} -> {} amount={} ledger={} code={}{pending}{hold} committed_at_ms={}{}{}",
        t.id,
        t.debit_account_id,
        t.credit_account_id,
        t.amount,
        t.ledger,
        t.code,
        t.committed_at_unix_ms,
        if t.cross_shard { " cross_shard" } else { "" },
        if t.trace_id.is_empty() {
            String::new()
        } else {
            format!(" trace_id={}", t.trace_id)
        },
    );
}

/// Prints a transfer result; returns whether it was committed.
fn print_result(r: &pb::TransferResult) -> bool {
    match &r.outcome {
        Some(pb::transfer_result::Outcome::Transfer(t)) => {
            print_transfer(t);
            true
        }
        Some(pb::transfer_result::Outcome::Rejection(rej)) => {
            let retry = if rej.retriable {
                " (retriable: retry with the same id)"
            } else {
                ""
            };
            println!(
                "rejected {}: {} ({}){retry}",
                r.id,
                reason_name(rej.reason),
                rej.message
            );
            false
        }
        None => {
            println!("no outcome for {}", r.id);
            false
        }
    }
}

async fn execute(client: &Client, command: Command) -> Result<bool, ledger_client::Error> {
    match command {
        Command::Account(AccountCommand::Create {
            id,
            ledger,
            no_overdraft,
            credits_must_not_exceed_debits,
            credit_limit,
            placement_key,
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
                metadata: metadata.into_iter().collect(),
                credit_limit,
                ..Default::default()
            };
            let results = client.create_accounts(vec![account]).await?;
            let mut ok = true;
            for r in results {
                match r.outcome {
                    Some(pb::account_result::Outcome::Account(a)) => print_account(&a),
                    Some(pb::account_result::Outcome::Rejection(rej)) => {
                        println!(
                            "rejected {}: {} ({})",
                            r.id,
                            reason_name(rej.reason),
                            rej.message
                        );
                        ok = false;
                    }
                    None => ok = false,
                }
            }
            Ok(ok)
        }
        Command::Account(AccountCommand::Get { ids }) => {
            let found = client.get_accounts(ids).await?;
            found.accounts.iter().for_each(print_account);
            for id in &found.not_found {
                println!("not found: {id}");
            }
            Ok(found.not_found.is_empty())
        }
        Command::Transfer(TransferCommand::Create(t)) => {
            let result = client
                .transfer(t.into_wire(pb::TransferFlags::default(), 0))
                .await?;
            Ok(print_result(&result))
        }
        Command::Transfer(TransferCommand::Get { ids }) => {
            let found = client.get_transfers(ids).await?;
            found.transfers.iter().for_each(print_transfer);
            for id in &found.not_found {
                println!("not found: {id}");
            }
            Ok(found.not_found.is_empty())
        }
        Command::Hold(HoldCommand::Create { transfer, timeout }) => {
            let flags = pb::TransferFlags {
                pending: true,
                ..Default::default()
            };
            let result = client.transfer(transfer.into_wire(flags, timeout)).await?;
            Ok(print_result(&result))
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
            Ok(print_result(&client.transfer(t).await?))
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
            Ok(print_result(&client.transfer(t).await?))
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
            Ok(true)
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
                        "#{} {} {side} {kind} amount={} -> debits_pending={} debits_posted={} \
                         credits_pending={} credits_posted={}",
                        e.version,
                        e.transfer_id,
                        e.amount,
                        e.debits_pending,
                        e.debits_posted,
                        e.credits_pending,
                        e.credits_posted
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(true);
                }
                token = page.next_page_token;
            }
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
            Err(e) => {
                eprintln!("ledger: {e}");
                return ExitCode::from(2);
            }
        };
        match execute(&client, cli.command).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("ledger: {e}");
                ExitCode::from(2)
            }
        }
    })
}
