//! Request builders and small call sequences shared by the API-level tests.

use ledger_client::{Client, pb};

/// A USD account with default flags.
pub fn usd_account(id: &str) -> pb::Account {
    pb::Account {
        id: id.into(),
        ledger: "USD".into(),
        ..Default::default()
    }
}

/// A posted USD transfer.
pub fn usd_transfer(id: &str, debit: &str, credit: &str, amount: u64) -> pb::Transfer {
    pb::Transfer {
        id: id.into(),
        debit_account_id: debit.into(),
        credit_account_id: credit.into(),
        amount,
        ledger: "USD".into(),
        ..Default::default()
    }
}

/// A gRPC request carrying `message` with a W3C `traceparent` header, as a traced caller sends it.
pub fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent.parse().expect("a valid header value"),
    );
    request
}

/// Opens USD accounts `acct-0` .. `acct-{n-1}`, then pays 1 from `acct-0` to each other one in
/// a call of its own (`t-1` ..). Returns the account ids and the committed transfers, in order;
/// with several shards some of them cross shards.
pub async fn pay_from_first(client: &Client, n: usize) -> (Vec<String>, Vec<pb::Transfer>) {
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    client
        .create_accounts(ids.iter().map(|id| usd_account(id)).collect())
        .await
        .unwrap();
    let mut committed = Vec::new();
    for (i, id) in ids.iter().enumerate().skip(1) {
        let result = client
            .transfer(usd_transfer(&format!("t-{i}"), &ids[0], id, 1))
            .await
            .unwrap();
        let Some(pb::transfer_result::Outcome::Transfer(t)) = result.outcome else {
            panic!("committed: {result:?}")
        };
        committed.push(t);
    }
    (ids, committed)
}

/// The seed of a randomised test: `LEDGER_SEED`, else the clock (printed by the test, so a run
/// can be reproduced).
pub fn seed() -> u64 {
    std::env::var("LEDGER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            #[allow(clippy::disallowed_methods)] // a seed for the test, printed for reproduction
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_nanos() as u64
        })
}

/// Sends a transfer until it gets a final answer, as a client would: the same id again after
/// an error or a retriable rejection (safe: the id is the idempotency key), for at most 20 s.
pub async fn settle(client: &Client, t: pb::Transfer) -> pb::TransferResult {
    for _ in 0..200 {
        match client.transfer(t.clone()).await {
            Ok(r) => match &r.outcome {
                Some(pb::transfer_result::Outcome::Rejection(rej)) if rej.retriable => {}
                _ => return r,
            },
            Err(e) => eprintln!("retrying {}: {e}", t.id),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{} never settled", t.id);
}
