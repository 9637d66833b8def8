//! Invariant checkers over the stores of a cluster, one function per invariant. Each returns
//! the list of violations (empty = holds), so a test can print all of them.

use std::collections::{BTreeMap, HashMap};

use ledger_domain::{Account, Entry, ShardId};
use ledger_shard::quota::{Allowance, QuotaRecord, Settlement, escrow_id, quota_id};
use ledger_shard::{keys, read};
use ledger_store::Store;

/// Everything the checkers look at, read once.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accounts: Vec<(ShardId, Account)>,
    pub entries: HashMap<String, Vec<Entry>>,
    /// (prepared records, coordinator records) per shard.
    pub in_flight: Vec<(usize, usize)>,
    /// Regional quotas: the homes' allowances, the quota shards' records and outboxes.
    pub allowances: Vec<Allowance>,
    pub quota_records: Vec<QuotaRecord>,
    /// Each waiting settlement with the region of the quota shard that holds it.
    pub outbox: Vec<(String, Settlement)>,
}

impl Snapshot {
    /// The stores of every shard, shard `i` at index `i`.
    pub fn read(stores: &[&dyn Store]) -> Snapshot {
        let shards: Vec<(ShardId, &dyn Store)> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| (ShardId(i as u32), *store))
            .collect();
        Self::read_shards(&shards)
    }

    /// The stores of every shard of a cluster, each with its shard id.
    pub fn read_shards(stores: &[(ShardId, &dyn Store)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (shard, store) in stores {
            let shard = *shard;
            for account in read::all_accounts(*store, shard).expect("accounts") {
                let entries =
                    read::entries(*store, shard, account.id(), 1, usize::MAX).expect("entries");
                s.entries.insert(account.id().to_string(), entries);
                s.accounts.push((shard, account));
            }
            s.in_flight
                .push(read::in_flight(*store, shard).expect("in flight"));
            let (allowances, records, outbox) = quota_state(*store, shard);
            s.allowances.extend(allowances);
            s.quota_records.extend(records);
            s.outbox.extend(outbox);
        }
        s
    }
}

/// One shard's regional-quota records: the allowances it keeps as a home, its quota records,
/// and its outbox with each settlement's region.
#[allow(clippy::type_complexity)]
pub fn quota_state(
    store: &dyn Store,
    shard: ShardId,
) -> (Vec<Allowance>, Vec<QuotaRecord>, Vec<(String, Settlement)>) {
    let scan =
        |(start, end): (Vec<u8>, Vec<u8>)| store.scan(&start, &end, usize::MAX).expect("scan");
    let allowances: Vec<Allowance> = scan(keys::allowances(shard))
        .iter()
        .map(|(_, v)| ledger_shard::codec::decode("allowance", v).expect("decodes"))
        .collect();
    let records: Vec<QuotaRecord> = scan(keys::quotas(shard))
        .iter()
        .map(|(_, v)| ledger_shard::codec::decode("quota record", v).expect("decodes"))
        .collect();
    let outbox = scan(keys::outbox_all(shard))
        .iter()
        .map(|(_, v)| {
            let e: Settlement = ledger_shard::codec::decode("settlement", v).expect("decodes");
            let region = records
                .iter()
                .find(|r| r.account_id == e.transfer.debit_account_id)
                .map(|r| r.region.clone())
                .unwrap_or_default();
            (region, e)
        })
        .collect();
    (allowances, records, outbox)
}

/// I1 conservation: per ledger, credits - debits over all accounts is zero (pending and posted
/// separately). Holds at quiescence: a cross-shard transfer's legs land in separate commits.
pub fn conservation(s: &Snapshot) -> Vec<String> {
    let mut sums: BTreeMap<&str, (i128, i128)> = BTreeMap::new();
    for (_, a) in &s.accounts {
        let b = &a.balances;
        let e = sums.entry(&a.spec.ledger).or_default();
        e.0 += i128::from(b.credits_posted) - i128::from(b.debits_posted);
        e.1 += i128::from(b.credits_pending) - i128::from(b.debits_pending);
    }
    sums.into_iter()
        .filter(|(_, (posted, pending))| *posted != 0 || *pending != 0)
        .map(|(ledger, (posted, pending))| {
            format!("I1 ledger {ledger}: posted sum {posted}, pending sum {pending}")
        })
        .collect()
}

/// I2: no flagged account breaks its flag, counting pending amounts.
pub fn no_overdraft(s: &Snapshot) -> Vec<String> {
    s.accounts
        .iter()
        .filter(|(_, a)| !a.satisfies_flags())
        .map(|(_, a)| format!("I2 account {} breaks its flags: {:?}", a.id(), a.balances))
        .collect()
}

/// I4: each account's entries are numbered 1..=version without gaps, and the last entry's
/// balances are the account's balances.
pub fn versions(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (_, a) in &s.accounts {
        let entries = &s.entries[a.id()];
        let numbers: Vec<u64> = entries.iter().map(|e| e.version).collect();
        let expected: Vec<u64> = (1..=a.version).collect();
        if numbers != expected {
            out.push(format!(
                "I4 account {}: version {} but entries {:?}",
                a.id(),
                a.version,
                numbers
            ));
        } else if entries
            .last()
            .is_some_and(|last| last.balances != a.balances)
        {
            out.push(format!("I4 account {}: last entry balances differ", a.id()));
        }
    }
    out
}

/// No prepared record or coordinator record is left (run after recovery has settled).
pub fn nothing_in_flight(s: &Snapshot) -> Vec<String> {
    s.in_flight
        .iter()
        .enumerate()
        .filter(|(_, (p, c))| *p != 0 || *c != 0)
        .map(|(i, (p, c))| format!("shard {i}: {p} prepared and {c} coordinator records left"))
        .collect()
}

/// I3 exactly once: a transfer id appears at most once in each account's statement.
pub fn exactly_once(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (account, entries) in &s.entries {
        let mut seen: HashMap<(&str, ledger_domain::EntryKind), u32> = HashMap::new();
        for e in entries {
            *seen.entry((&e.transfer_id, e.kind)).or_default() += 1;
        }
        for ((id, kind), n) in seen {
            if n > 1 {
                out.push(format!(
                    "I3 account {account}: {id} ({kind:?}) applied {n} times"
                ));
            }
        }
    }
    out
}

/// I7 regional quotas, for every account A and region R with an allowance: R's limit (what
/// its quota account was granted) is at most what A's home granted; R spent at most its limit
/// (its quota account's flag, I2); the home's reservation (granted - settled - released) is at
/// least what R spent and the home has not yet applied (its outbox past the home's last
/// sequence number), and is what the escrow account holds pending.
pub fn quotas(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let account = |id: &str| s.accounts.iter().map(|(_, a)| a).find(|a| a.id() == id);
    for r in &s.quota_records {
        let home = s
            .allowances
            .iter()
            .find(|a| a.account_id == r.account_id && a.region == r.region);
        let Some(home) = home else {
            out.push(format!(
                "I7 {} in {}: a quota record without the home's allowance",
                r.account_id, r.region
            ));
            continue;
        };
        let limit =
            account(&quota_id(&r.region, &r.account_id)).map_or(0, |q| q.balances.credits_posted);
        if limit > home.granted {
            out.push(format!(
                "I7 {} in {}: the region was granted {limit}, the home only {}",
                r.account_id, r.region, home.granted
            ));
        }
        let Some(reserved) = home
            .granted
            .checked_sub(home.settled)
            .and_then(|g| g.checked_sub(home.released))
        else {
            out.push(format!(
                "I7 {} in {}: settled {} + released {} exceed granted {}",
                r.account_id, r.region, home.settled, home.released, home.granted
            ));
            continue;
        };
        let unsettled: u64 = s
            .outbox
            .iter()
            .filter(|(region, e)| {
                *region == r.region
                    && e.transfer.debit_account_id == r.account_id
                    && e.seq > home.last_seq
            })
            .map(|(_, e)| e.transfer.amount)
            .sum();
        if reserved < unsettled {
            out.push(format!(
                "I7 {} in {}: the home reserves {reserved} but {unsettled} spent is not settled",
                r.account_id, r.region
            ));
        }
    }
    for a in &s.allowances {
        let reserved = a
            .granted
            .saturating_sub(a.settled)
            .saturating_sub(a.released);
        let escrow =
            account(&escrow_id(&a.region, &a.account_id)).map_or(0, |e| e.balances.credits_pending);
        if escrow != reserved {
            out.push(format!(
                "I7 {} in {}: the escrow holds {escrow} pending, the allowance reserves {reserved}",
                a.account_id, a.region
            ));
        }
    }
    out
}

/// At quiescence, every settlement answered: the outboxes are empty, and every region's
/// spending is settled or refused at home.
pub fn quotas_settled(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s
        .outbox
        .iter()
        .map(|(region, e)| {
            format!(
                "settlement {} of {} in {region} ({}) never answered",
                e.seq, e.transfer.debit_account_id, e.transfer.id
            )
        })
        .collect();
    for r in &s.quota_records {
        if r.spent != r.settled + r.refused {
            out.push(format!(
                "{} in {}: spent {}, settled {}, refused {}",
                r.account_id, r.region, r.spent, r.settled, r.refused
            ));
        }
    }
    out
}

/// All of the above.
pub fn all(s: &Snapshot) -> Vec<String> {
    [
        conservation(s),
        no_overdraft(s),
        versions(s),
        nothing_in_flight(s),
        exactly_once(s),
        quotas(s),
    ]
    .concat()
}
