//! Value encoding: every stored record is an envelope of one format byte, then the record in
//! postcard (compact serde). The format byte is the record's layout version: a build that
//! changes a record's layout writes a new format number for it and keeps decoding the older
//! ones, so it reads what an older build wrote (records whose layout never changed are all at
//! format 1). Accounts carry their version in front as a big-endian u64 so a commit can expect
//! "still at version v" with a prefix precondition.
//!
//! | record | format | layout |
//! |---|---|---|
//! | account, entry, transfer, hold, forward, done marker, lease, prepared leg | 1 | as first written |
//! | coordinator record | 1 | decision as `Option<bool>` (read only) |
//! | coordinator record | 2 | decision as `Option<Decision>` |
//!
//! postcard is not self-describing: a changed layout read under its old format number decodes
//! to wrong values, not to an error (an `Option<bool>` read as `Option<Decision>` turns commit
//! into abort). Hence a new number for every layout change; `tests/tests/formats.rs` reads
//! records an older build wrote.

use serde::Serialize;
use serde::de::DeserializeOwned;

use ledger_domain::{Account, Amount, Balances, EntryKind, Side};

const FORMAT_V1: u8 = 1;

/// Bytes from the store that do not decode: corruption or a format this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("undecodable record ({what}): {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

/// Room reserved up front in the scratch buffer records are encoded into.
const ENCODE_CAPACITY: usize = 256;

thread_local! {
    /// Records are encoded here, then copied out at their exact size: growing a fresh vector
    /// reallocates and copies (a tenth of the instructions in one profile), and a presized one
    /// keeps its spare room for as long as the store holds the record.
    static SCRATCH: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(ENCODE_CAPACITY));
}

/// `value` in an envelope of format 1.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_after(&[], FORMAT_V1, value)
}

/// `value` in an envelope of `format`: for a record whose layout has changed since format 1.
pub fn encode_format<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    encode_after(&[], format, value)
}

/// `head`, the format byte, then `value`, in a vector of exactly that length.
fn encode_after<T: Serialize>(head: &[u8], format: u8, value: &T) -> Vec<u8> {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.push(format);
        postcard::to_io(value, &mut *scratch).expect("encoding to a Vec cannot fail");
        scratch.as_slice().to_vec()
    })
}

/// Decodes a record of format 1.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    match envelope(what, bytes)? {
        (FORMAT_V1, body) => decode_body(what, body),
        (format, _) => Err(unknown_format(what, format)),
    }
}

/// The format byte and the body of a stored record.
pub fn envelope<'a>(what: &'static str, bytes: &'a [u8]) -> Result<(u8, &'a [u8]), DecodeError> {
    match bytes.split_first() {
        Some((&format, body)) => Ok((format, body)),
        None => Err(DecodeError {
            what,
            reason: "empty value".into(),
        }),
    }
}

/// Decodes the body of an envelope (the layout its format byte names).
pub fn decode_body<T: DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(body).map_err(|e| DecodeError {
        what,
        reason: e.to_string(),
    })
}

/// A format byte this build does not know (written by a newer build, or damaged).
pub fn unknown_format(what: &'static str, format: u8) -> DecodeError {
    DecodeError {
        what,
        reason: format!("unknown format byte {format}"),
    }
}

pub fn version_prefix(version: u64) -> Vec<u8> {
    version.to_be_bytes().to_vec()
}

pub fn encode_account(account: &Account) -> Vec<u8> {
    encode_after(&account.version.to_be_bytes(), FORMAT_V1, account)
}

pub fn decode_account(bytes: &[u8]) -> Result<Account, DecodeError> {
    let err = |reason: &str| DecodeError {
        what: "account",
        reason: reason.into(),
    };
    let (head, body) = bytes
        .split_at_checked(8)
        .ok_or_else(|| err("shorter than its header"))?;
    let account: Account = decode("account", body)?;
    // Assert in pairs: the header written beside the record must agree with it.
    let header = u64::from_be_bytes(head.try_into().expect("8 bytes"));
    if header != account.version {
        return Err(err("version header disagrees with the record"));
    }
    Ok(account)
}

/// An [`ledger_domain::Entry`] that borrows its ids: the engine writes two entries per
/// transfer and would otherwise copy both ids into each. Encodes exactly as `Entry` does (same
/// fields, same order; `entry_ref_encodes_as_entry` holds them together).
#[derive(Serialize)]
pub struct EntryRef<'a> {
    pub account_id: &'a str,
    pub version: u64,
    pub transfer_id: &'a str,
    pub side: Side,
    pub kind: EntryKind,
    pub amount: Amount,
    pub balances: Balances,
    pub committed_at_ms: u64,
    pub code: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_domain::{Entry, NewAccount};

    #[test]
    fn entry_ref_encodes_as_entry() {
        let entry = Entry {
            account_id: "acct-1".into(),
            version: 9,
            transfer_id: "t-7".into(),
            side: Side::Credit,
            kind: EntryKind::PostPending,
            amount: 1_234,
            balances: Balances {
                debits_pending: 1,
                debits_posted: 2,
                credits_pending: 3,
                credits_posted: 4,
            },
            committed_at_ms: 55,
            code: 17,
        };
        let borrowed = EntryRef {
            account_id: &entry.account_id,
            version: entry.version,
            transfer_id: &entry.transfer_id,
            side: entry.side,
            kind: entry.kind,
            amount: entry.amount,
            balances: entry.balances,
            committed_at_ms: entry.committed_at_ms,
            code: entry.code,
        };
        let bytes = encode(&borrowed);
        assert_eq!(bytes, encode(&entry));
        assert_eq!(decode::<Entry>("entry", &bytes).unwrap(), entry);
    }

    #[test]
    fn account_round_trip() {
        let account = Account {
            spec: NewAccount {
                id: "a".into(),
                ledger: "USD".into(),
                ..Default::default()
            },
            balances: Balances {
                credits_posted: 5,
                ..Default::default()
            },
            version: 7,
            created_at_ms: 1,
        };
        let bytes = encode_account(&account);
        assert!(bytes.starts_with(&7u64.to_be_bytes()));
        assert_eq!(decode_account(&bytes).unwrap(), account);
        assert!(decode_account(&bytes[..4]).is_err());
        let mut bad = bytes.clone();
        bad[8] = 99;
        assert!(decode_account(&bad).unwrap_err().reason.contains("format"));
    }
}
