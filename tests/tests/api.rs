//! End-to-end tests through the real gRPC API of an in-process `ledgerd` (embedded store in a
//! temporary directory, port 0).

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use ledger_client::{Client, pb};
use ledger_store::Store;
use ledger_tests::checks;
use ledger_tests::process::{InProcess, open_shards, test_config};
use ledger_tests::wire::usd_transfer as transfer;

fn account(id: &str, no_overdraft: bool) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        flags: Some(pb::AccountFlags {
            debits_must_not_exceed_credits: no_overdraft,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn committed(r: &pb::TransferResult) -> &pb::Transfer {
    match &r.outcome {
        Some(pb::transfer_result::Outcome::Transfer(t)) => t,
        other => panic!("{}: not committed: {other:?}", r.id),
    }
}

fn rejected(r: &pb::TransferResult) -> pb::RejectionReason {
    match &r.outcome {
        Some(pb::transfer_result::Outcome::Rejection(rej)) => {
            pb::RejectionReason::try_from(rej.reason).expect("known reason")
        }
        other => panic!("{}: not rejected: {other:?}", r.id),
    }
}

async fn create(client: &Client, accounts: Vec<pb::Account>) {
    for r in client.create_accounts(accounts).await.unwrap() {
        assert!(
            matches!(r.outcome, Some(pb::account_result::Outcome::Account(_))),
            "{r:?}"
        );
    }
}

/// Stops the server and runs every invariant checker over its shard files.
async fn stop_and_check(server: InProcess, dir: &std::path::Path, shards: u32) {
    server.stop().await;
    let stores = open_shards(dir, shards);
    let refs: Vec<&dyn Store> = stores.iter().map(|s| s as &dyn Store).collect();
    let violations = checks::all(&checks::Snapshot::read(&refs));
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_accounts_transfers_holds_statement() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    create(
        &client,
        vec![
            account("alice", true),
            account("bob", false),
            account("bank", false),
        ],
    )
    .await;

    // Creating the same account again is idempotent; with other fields it is rejected.
    let again = client
        .create_accounts(vec![account("alice", true)])
        .await
        .unwrap();
    assert!(matches!(
        again[0].outcome,
        Some(pb::account_result::Outcome::Account(_))
    ));
    let changed = client
        .create_accounts(vec![account("alice", false)])
        .await
        .unwrap();
    assert!(
        matches!(&changed[0].outcome, Some(pb::account_result::Outcome::Rejection(r))
        if r.reason == pb::RejectionReason::ExistsWithDifferentFields as i32)
    );

    let r = client
        .transfer(transfer("fund", "bank", "alice", 10_000))
        .await
        .unwrap();
    assert_eq!(committed(&r).amount, 10_000);
    let r = client
        .transfer(transfer("pay", "alice", "bob", 2_500))
        .await
        .unwrap();
    assert_eq!(committed(&r).debit_account_version, 2);
    let r = client
        .transfer(transfer("too-much", "alice", "bob", 7_501))
        .await
        .unwrap();
    assert_eq!(rejected(&r), pb::RejectionReason::ExceedsCredits);

    let hold = pb::Transfer {
        flags: Some(pb::TransferFlags {
            pending: true,
            ..Default::default()
        }),
        timeout_seconds: 3600,
        ..transfer("hold", "alice", "bob", 3_000)
    };
    client.transfer(hold).await.unwrap();
    assert_eq!(
        client.balance("alice").await.unwrap().available,
        4_500,
        "the hold counts"
    );
    let post = pb::Transfer {
        id: "post".into(),
        pending_id: "hold".into(),
        amount: 2_000,
        flags: Some(pb::TransferFlags {
            post_pending: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = client.transfer(post).await.unwrap();
    let t = committed(&r);
    assert_eq!(
        (t.amount, t.debit_account_id.as_str()),
        (2_000, "alice"),
        "accounts inherited"
    );

    let alice = client.balance("alice").await.unwrap();
    assert_eq!(
        (alice.debits_posted, alice.debits_pending, alice.available),
        (4_500, 0, 5_500)
    );
    let bob = client.balance("bob").await.unwrap();
    assert_eq!(bob.credits_posted, 4_500);

    let found = client
        .get_transfers(vec!["hold".into(), "too-much".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(found.transfers.len(), 1);
    assert_eq!(found.transfers[0].hold_state, pb::HoldState::Posted as i32);
    // A refused transfer is found with its recorded rejection; an unknown id is not found.
    assert_eq!(found.rejected.len(), 1);
    assert_eq!(found.rejected[0].id, "too-much");
    assert_eq!(found.not_found, vec!["nope".to_string()]);

    // The statement, two entries a page, oldest first, versions 1..=4.
    let page = client.entries("alice", 2, String::new()).await.unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let all = client.all_entries("alice").await.unwrap();
    let ids: Vec<&str> = all.iter().map(|e| e.transfer_id.as_str()).collect();
    assert_eq!(ids, vec!["fund", "pay", "hold", "post"]);
    assert_eq!(all.last().unwrap().debits_posted, 4_500);

    let missing = client.balance("ghost").await.unwrap_err();
    assert!(matches!(missing, ledger_client::Error::Status(s) if s.code() == Code::NotFound));
    stop_and_check(server, dir.path(), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_whole_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 4);
    config.batch_size_max = 10;
    let server = InProcess::start(config).await;
    let client = Client::connect(&server.addr).await.unwrap();
    create(&client, vec![account("a", false), account("b", false)]).await;
    let good = transfer("ok-1", "a", "b", 5);

    let with = |f: &dyn Fn(&mut pb::Transfer)| {
        let mut t = good.clone();
        f(&mut t);
        t
    };
    let cases: Vec<(&str, pb::Transfer, &str)> = vec![
        ("zero amount", with(&|t| t.amount = 0), "amount"),
        ("empty id", with(&|t| t.id.clear()), "id"),
        ("id with a space", with(&|t| t.id = "a b".into()), "id"),
        ("id too long", with(&|t| t.id = "x".repeat(129)), "id"),
        (
            "same accounts",
            with(&|t| t.credit_account_id = "a".into()),
            "credit_account_id",
        ),
        (
            "no debit account",
            with(&|t| t.debit_account_id.clear()),
            "debit_account_id",
        ),
        (
            "lower-case ledger",
            with(&|t| t.ledger = "usd".into()),
            "ledger",
        ),
        (
            "two flags",
            with(&|t| {
                t.flags = Some(pb::TransferFlags {
                    pending: true,
                    post_pending: true,
                    ..Default::default()
                })
            }),
            "flags",
        ),
        (
            "timeout without hold",
            with(&|t| t.timeout_seconds = 5),
            "timeout_seconds",
        ),
        (
            "pending_id without post/void",
            with(&|t| t.pending_id = "p".into()),
            "pending_id",
        ),
        (
            "post without pending_id",
            with(&|t| {
                t.flags = Some(pb::TransferFlags {
                    post_pending: true,
                    ..Default::default()
                })
            }),
            "pending_id",
        ),
        (
            "too much metadata",
            with(&|t| t.metadata = (0..17).map(|i| (format!("k{i}"), "v".into())).collect()),
            "metadata",
        ),
        // Fields the ledger sets are refused, not dropped without a word.
        (
            "a commit time",
            with(&|t| t.committed_at_unix_ms = 1_700_000_000_000),
            "committed_at_unix_ms",
        ),
        (
            "a trace id",
            with(&|t| t.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into()),
            "trace_id",
        ),
        (
            "a hold state",
            with(&|t| t.hold_state = pb::HoldState::Posted as i32),
            "hold_state",
        ),
        (
            "an account version",
            with(&|t| t.debit_account_version = 3),
            "debit_account_version",
        ),
    ];
    for (what, bad, field) in cases {
        // One bad item spoils the whole batch: the good item before it is not applied either.
        let request = vec![good.clone(), bad];
        let err = client.create_transfers(request).await.unwrap_err();
        let ledger_client::Error::Status(status) = err else {
            panic!("{what}: {err}")
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        assert!(
            status
                .message()
                .starts_with(&format!("transfers[1].{field}")),
            "{what}: {}",
            status.message()
        );
        // The same for programs: a BadRequest violation naming the field, and a stable reason.
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(
            violations[0].field,
            format!("transfers[1].{field}"),
            "{what}"
        );
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "INVALID_REQUEST", "{what}");
    }
    let err = client
        .create_transfers(vec![good.clone(); 11])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ledger_client::Error::Status(s) if s.code() == Code::InvalidArgument && s.message().contains("limit is 10")),
        "{err}"
    );

    let bad_accounts: Vec<(pb::Account, &str)> = vec![
        (
            pb::Account {
                ledger: String::new(),
                ..account("c", false)
            },
            "ledger",
        ),
        (
            pb::Account {
                id: "c d".into(),
                ..account("c", false)
            },
            "id",
        ),
        (
            pb::Account {
                credit_limit: Some(5),
                ..account("c", false)
            },
            "credit_limit",
        ),
        (
            pb::Account {
                credits_posted: 1_000_000,
                ..account("c", false)
            },
            "credits_posted",
        ),
        (
            pb::Account {
                version: 7,
                ..account("c", false)
            },
            "version",
        ),
    ];
    for (bad, field) in bad_accounts {
        let err = client.create_accounts(vec![bad]).await.unwrap_err();
        assert!(
            matches!(&err, ledger_client::Error::Status(s) if s.code() == Code::InvalidArgument
            && s.message().starts_with(&format!("accounts[0].{field}"))),
            "{err}"
        );
    }
    let err = client.entries("a", 5_000, String::new()).await.unwrap_err();
    assert!(
        matches!(&err, ledger_client::Error::Status(s) if s.message().starts_with("page_size")),
        "{err}"
    );
    let err = client.entries("a", 10, "garbage".into()).await.unwrap_err();
    assert!(
        matches!(&err, ledger_client::Error::Status(s) if s.message().starts_with("page_token")),
        "{err}"
    );

    // Nothing changed.
    assert_eq!(client.balance("a").await.unwrap().version, 0);
    assert!(
        client
            .get_accounts(vec!["c".into()])
            .await
            .unwrap()
            .accounts
            .is_empty()
    );
    assert!(
        client
            .get_transfers(vec!["ok-1".into()])
            .await
            .unwrap()
            .transfers
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), 2);
    config.message_size_max_bytes = 64 * 1024;
    let server = InProcess::start(config).await;
    let client = Client::connect(&server.addr).await.unwrap();
    create(&client, vec![account("a", false), account("b", false)]).await;
    // About 100 KiB of metadata in one request.
    let metadata = (0..16)
        .map(|i| (format!("k{i}"), "v".repeat(256)))
        .collect();
    let big = pb::Transfer {
        metadata,
        ..transfer("big", "a", "b", 1)
    };
    let err = client.create_transfers(vec![big; 25]).await.unwrap_err();
    let ledger_client::Error::Status(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(client.balance("a").await.unwrap().version, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_id_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    // Two accounts on different shards, so the retries race through two-phase commit.
    let (a, b) = two_accounts_on_different_shards(&client).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            let t = transfer("once", &a, &b, 7);
            tokio::spawn(async move { client.transfer(t).await.unwrap() })
        })
        .collect();
    for result in futures::future::join_all(tasks).await {
        let r = result.unwrap();
        let t = committed(&r);
        assert_eq!(
            (t.amount, t.debit_account_version, t.cross_shard),
            (7, 1, true)
        );
    }
    assert_eq!(client.balance(&a).await.unwrap().debits_posted, 7);
    assert_eq!(client.balance(&b).await.unwrap().credits_posted, 7);
    stop_and_check(server, dir.path(), 4).await;
}

/// Creates accounts until two land on different shards.
async fn two_accounts_on_different_shards(client: &Client) -> (String, String) {
    let mut shards: Vec<(String, u32)> = Vec::new();
    for i in 0.. {
        let id = format!("acct-{i}");
        let r = client
            .create_accounts(vec![account(&id, false)])
            .await
            .unwrap();
        let Some(pb::account_result::Outcome::Account(a)) = &r[0].outcome else {
            panic!()
        };
        if let Some((other, _)) = shards.iter().find(|(_, s)| *s != a.shard) {
            return (other.clone(), id);
        }
        shards.push((id, a.shard));
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_cross_shard_transfers_on_hot_accounts_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    let hot: Vec<String> = (0..4).map(|i| format!("hot-{i}")).collect();
    create(&client, hot.iter().map(|id| account(id, false)).collect()).await;
    // 16 workers x 25 transfers, every pair of hot accounts in both directions at once.
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let client = client.clone();
            let hot = hot.clone();
            tokio::spawn(async move {
                let mut committed = 0;
                for n in 0..25 {
                    let from = &hot[(w + n) % 4];
                    let to = &hot[(w + n + 1 + w % 3) % 4];
                    let id = format!("w{w}-{n}");
                    loop {
                        let r = client.transfer(transfer(&id, from, to, 1)).await.unwrap();
                        match &r.outcome {
                            Some(pb::transfer_result::Outcome::Rejection(rej)) if rej.retriable => {
                                continue;
                            }
                            Some(pb::transfer_result::Outcome::Transfer(_)) => committed += 1,
                            other => panic!("{id}: {other:?}"),
                        }
                        break;
                    }
                }
                committed
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(workers))
        .await
        .expect("all 400 transfers finished within 60 s: no deadlock");
    let total: u32 = all.into_iter().map(Result::unwrap).sum();
    assert_eq!(total, 400);
    stop_and_check(server, dir.path(), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_keys_keep_related_accounts_on_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 8)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    let with_key = |id: &str| pb::Account {
        placement_key: "merchant-42".into(),
        ..account(id, false)
    };
    create(&client, vec![with_key("m42:fees"), with_key("m42:payouts")]).await;
    let r = client
        .transfer(transfer("t1", "m42:fees", "m42:payouts", 3))
        .await
        .unwrap();
    assert!(
        !committed(&r).cross_shard,
        "same placement key: the single-shard path"
    );
    let got = client
        .get_accounts(vec!["m42:fees".into(), "m42:payouts".into()])
        .await
        .unwrap();
    assert_eq!(got.accounts.len(), 2);
    assert_eq!(got.accounts[0].shard, got.accounts[1].shard);
    // The id is taken for good: the same id with another placement key is refused.
    let clash = client
        .create_accounts(vec![account("m42:fees", false)])
        .await
        .unwrap();
    assert!(
        matches!(&clash[0].outcome, Some(pb::account_result::Outcome::Rejection(r))
        if r.reason == pb::RejectionReason::ExistsWithDifferentFields as i32)
    );
    server.stop().await;
    // After a restart the directory still finds the accounts by id.
    let server = InProcess::start(test_config(dir.path(), 8)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    assert_eq!(
        client.balance("m42:payouts").await.unwrap().credits_posted,
        3
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 2)).await;
    let channel = tonic::transport::Endpoint::from_shared(server.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let request = tonic_health::pb::HealthCheckRequest {
        service: "ledger.v1.LedgerService".into(),
    };
    let status = health.check(request).await.unwrap().into_inner().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!()
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"ledger.v1.LedgerService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn unusable_data_directories_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a ledger").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ledger_server::run(test_config(dir.path(), 2), Some(listener), async {}, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");

    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ledger_server::run(test_config(&file, 2), Some(listener), async {}, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

/// The data format marker in `meta.redb`: written at init, refused when newer than this
/// build reads (before any shard file is opened), and added to a directory from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    ledger_server::init(&test_config(dir.path(), 2), None).unwrap();
    let meta = dir.path().join("meta.redb");
    let format = |meta: &std::path::Path| {
        let store = ledger_store::Embedded::open(meta).unwrap();
        store.get(b"format").unwrap()
    };
    let set_format = |meta: &std::path::Path, value: Option<u32>| {
        let store = ledger_store::Embedded::open(meta).unwrap();
        let mut batch = ledger_store::WriteBatch::default();
        match value {
            Some(v) => batch.put(b"format".to_vec(), v.to_be_bytes().to_vec()),
            None => batch.delete(b"format".to_vec()),
        }
        store.commit(&batch).unwrap();
    };
    let current = ledger_server::DATA_FORMAT.to_be_bytes().to_vec();
    assert_eq!(format(&meta), Some(current.clone()));

    set_format(&meta, Some(ledger_server::DATA_FORMAT + 1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ledger_server::run(test_config(dir.path(), 2), Some(listener), async {}, |_| {})
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("written by a newer ledgerd"), "{text}");
    assert!(
        text.contains(&format!("data format {}", ledger_server::DATA_FORMAT + 1)),
        "{text}"
    );

    // ... and so is one in a format this build no longer reads.
    set_format(&meta, Some(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ledger_server::run(test_config(dir.path(), 2), Some(listener), async {}, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer reads"), "{err}");

    // A directory from before the marker opens, and gets it.
    set_format(&meta, None);
    let server = InProcess::start(test_config(dir.path(), 2)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    create(&client, vec![account("a", false)]).await;
    server.stop().await;
    assert_eq!(format(&meta), Some(current));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_fixes_the_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let meta = ledger_server::init(&test_config(dir.path(), 3), None).unwrap();
    assert_eq!(meta.meta.shard_count, 3);
    let again = ledger_server::init(&test_config(dir.path(), 3), None).unwrap_err();
    assert!(again.to_string().contains("already initialised"), "{again}");
    // A later start asking for 8 shards keeps the 3 it was initialised with.
    let server = InProcess::start(test_config(dir.path(), 8)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    let accounts: Vec<pb::Account> = (0..40).map(|i| account(&format!("x{i}"), false)).collect();
    for r in client.create_accounts(accounts).await.unwrap() {
        let Some(pb::account_result::Outcome::Account(a)) = r.outcome else {
            panic!()
        };
        assert!(a.shard < 3, "{a:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_results_come_back_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("o{i}")).collect();
    create(&client, ids.iter().map(|id| account(id, false)).collect()).await;
    let hold = pb::Transfer {
        flags: Some(pb::TransferFlags {
            pending: true,
            ..Default::default()
        }),
        ..transfer("h", "o1", "o2", 5)
    };
    client.transfer(hold).await.unwrap();
    let post = |id: &str, pending: &str| pb::Transfer {
        id: id.into(),
        pending_id: pending.into(),
        flags: Some(pb::TransferFlags {
            post_pending: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    // Items spread over every shard, some cross-shard, a post, and a post of a missing hold.
    let mut batch: Vec<pb::Transfer> = (0..40)
        .map(|i| {
            transfer(
                &format!("b{i}"),
                &ids[(i * 5 + 1) % 12],
                &ids[(i * 7 + 2) % 12],
                1 + i as u64,
            )
        })
        .filter(|t| t.debit_account_id != t.credit_account_id)
        .collect();
    batch.insert(3, post("p1", "h"));
    batch.insert(7, post("p2", "nope"));
    let results = client.create_transfers(batch.clone()).await.unwrap();
    assert_eq!(results.len(), batch.len());
    for (t, r) in batch.iter().zip(&results) {
        assert_eq!(r.id, t.id, "results are in request order");
        if t.id == "p2" {
            assert_eq!(rejected(r), pb::RejectionReason::PendingTransferNotFound);
        } else {
            let c = committed(r);
            let amount = if t.id == "p1" { 5 } else { t.amount };
            assert_eq!((c.id.as_str(), c.amount), (t.id.as_str(), amount));
        }
    }
    let cross = |r: &pb::TransferResult| matches!(&r.outcome, Some(pb::transfer_result::Outcome::Transfer(t)) if t.cross_shard);
    assert!(results.iter().any(cross), "some items were cross-shard");
    stop_and_check(server, dir.path(), 4).await;
}

/// A refused transfer is recorded: `GetTransfers` returns its rejection; a retry is answered
/// from the record and says it is a replay; the same id with other fields names what differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_outcomes_are_looked_up_and_replays_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(test_config(dir.path(), 4)).await;
    let client = Client::connect(&server.addr).await.unwrap();
    create(&client, vec![account("a", true), account("b", false)]).await;
    let refused = transfer("r-1", "a", "b", 5);
    let first = client.transfer(refused.clone()).await.unwrap();
    assert_eq!(rejected(&first), pb::RejectionReason::ExceedsCredits);
    assert!(!first.replayed, "the first answer is not a replay");

    let found = client
        .get_transfers(vec!["r-1".into(), "ghost".into()])
        .await
        .unwrap();
    assert!(found.transfers.is_empty());
    assert_eq!(found.not_found, ["ghost"]);
    assert_eq!(found.rejected.len(), 1);
    assert_eq!(found.rejected[0].id, "r-1");
    assert_eq!(
        rejected(&found.rejected[0]),
        pb::RejectionReason::ExceedsCredits
    );

    let again = client.transfer(refused.clone()).await.unwrap();
    assert!(again.replayed);
    assert_eq!(rejected(&again), pb::RejectionReason::ExceedsCredits);

    let other = pb::Transfer {
        amount: 6,
        code: 9,
        ..refused
    };
    let refusal = client.transfer(other).await.unwrap();
    assert!(!refusal.replayed);
    let Some(pb::transfer_result::Outcome::Rejection(r)) = &refusal.outcome else {
        panic!("{refusal:?}")
    };
    assert_eq!(
        r.reason,
        pb::RejectionReason::ExistsWithDifferentFields as i32
    );
    assert_eq!(r.differing_fields, ["amount", "code"]);
    assert!(
        r.message.contains("it differs in amount, code"),
        "{}",
        r.message
    );
    server.stop().await;
}

/// A node that does not lead any shard: answers every call as a non-leader does (the server's
/// own `ApiError::NotLeader` mapping), naming `leader` as the leader's address. It stands in
/// for a node of a cluster until `ledgerd` serves one.
struct NotLeader {
    leader: String,
}

impl NotLeader {
    fn status(&self) -> tonic::Status {
        ledger_server::error::ApiError::NotLeader {
            shard: 0,
            leader: Some(ledger_shard::runtime::LeaderHint {
                node: "leader".into(),
                address: self.leader.clone(),
            }),
        }
        .into()
    }
}

#[tonic::async_trait]
impl pb::ledger_service_server::LedgerService for NotLeader {
    async fn create_accounts(
        &self,
        _: tonic::Request<pb::CreateAccountsRequest>,
    ) -> Result<tonic::Response<pb::CreateAccountsResponse>, tonic::Status> {
        Err(self.status())
    }
    async fn get_accounts(
        &self,
        _: tonic::Request<pb::GetAccountsRequest>,
    ) -> Result<tonic::Response<pb::GetAccountsResponse>, tonic::Status> {
        Err(self.status())
    }
    async fn create_transfers(
        &self,
        _: tonic::Request<pb::CreateTransfersRequest>,
    ) -> Result<tonic::Response<pb::CreateTransfersResponse>, tonic::Status> {
        Err(self.status())
    }
    async fn transfer(
        &self,
        _: tonic::Request<pb::Transfer>,
    ) -> Result<tonic::Response<pb::TransferResult>, tonic::Status> {
        Err(self.status())
    }
    async fn get_transfers(
        &self,
        _: tonic::Request<pb::GetTransfersRequest>,
    ) -> Result<tonic::Response<pb::GetTransfersResponse>, tonic::Status> {
        Err(self.status())
    }
    async fn get_balance(
        &self,
        _: tonic::Request<pb::GetBalanceRequest>,
    ) -> Result<tonic::Response<pb::Balance>, tonic::Status> {
        Err(self.status())
    }
    async fn list_entries(
        &self,
        _: tonic::Request<pb::ListEntriesRequest>,
    ) -> Result<tonic::Response<pb::ListEntriesResponse>, tonic::Status> {
        Err(self.status())
    }
}

/// The client follows a `NOT_LEADER` hint to the leader and sends the same call there: the
/// transfer is applied once, by the leader, with its id; reads follow the hint as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_leader_hints_with_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    let leader = InProcess::start(test_config(dir.path(), 4)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let follower_addr = listener.local_addr().unwrap();
    let follower = NotLeader {
        leader: leader.addr.trim_start_matches("http://").to_string(),
    };
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::ledger_service_server::LedgerServiceServer::new(
                follower,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The hint names the leader's address.
    let raw = Client::connect(&format!("http://{follower_addr}"))
        .await
        .unwrap();
    let status = raw
        .raw()
        .get_balance(pb::GetBalanceRequest {
            account_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        ledger_client::leader_hint(&status).as_deref(),
        Some(leader.addr.trim_start_matches("http://"))
    );

    // Through the follower, every call reaches the leader.
    let client = raw;
    create(&client, vec![account("a", false), account("b", false)]).await;
    let first = client
        .transfer(transfer("hinted-1", "a", "b", 7))
        .await
        .unwrap();
    assert_eq!(committed(&first).amount, 7);
    let again = client
        .transfer(transfer("hinted-1", "a", "b", 7))
        .await
        .unwrap();
    assert!(again.replayed, "the same id, answered from its record");
    assert_eq!(client.balance("a").await.unwrap().debits_posted, 7);
    let direct = Client::connect(&leader.addr).await.unwrap();
    assert_eq!(
        direct.balance("b").await.unwrap().credits_posted,
        7,
        "applied once, by the leader"
    );
    serving.abort();
    leader.stop().await;
}
