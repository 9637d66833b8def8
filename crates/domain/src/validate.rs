//! Input validation shared by the server (before anything is queued) and the engine (as an
//! assertion). A failure names the field and says why, so a client can fix its request.

use std::collections::BTreeMap;

/// Ids are 1..=128 bytes; longer ids make every key and entry larger.
pub const ID_LEN_MAX: usize = 128;
/// Ledger (asset) codes such as `USD`.
pub const LEDGER_LEN_MAX: usize = 16;
pub const METADATA_ENTRIES_MAX: usize = 16;
pub const METADATA_KEY_LEN_MAX: usize = 64;
pub const METADATA_VALUE_LEN_MAX: usize = 256;

/// A request field that cannot be accepted. Becomes `INVALID_ARGUMENT` at the API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    /// The field path, e.g. `transfers[3].amount`.
    pub field: String,
    pub reason: String,
}

impl InvalidInput {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field path, e.g. `amount` -> `transfers[3].amount`.
    #[must_use]
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

/// Checks an account or transfer id: 1-128 bytes of `[A-Za-z0-9._:@/-]`.
pub fn validate_id(field: &str, id: &str) -> Result<(), InvalidInput> {
    if id.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if id.len() > ID_LEN_MAX {
        return Err(InvalidInput::new(
            field,
            format!("is {} bytes; the limit is {ID_LEN_MAX}", id.len()),
        ));
    }
    if let Some(c) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(InvalidInput::new(
            field,
            format!("contains {c:?}; allowed are A-Z a-z 0-9 and . _ : @ / -"),
        ));
    }
    Ok(())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '/' | '-')
}

pub(crate) fn validate_ledger(field: &str, ledger: &str) -> Result<(), InvalidInput> {
    if ledger.is_empty() {
        return Err(InvalidInput::new(
            field,
            "must not be empty (an asset code such as USD)",
        ));
    }
    if ledger.len() > LEDGER_LEN_MAX {
        return Err(InvalidInput::new(
            field,
            format!("is {} bytes; the limit is {LEDGER_LEN_MAX}", ledger.len()),
        ));
    }
    if !ledger
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(InvalidInput::new(
            field,
            "must be upper-case letters, digits or _",
        ));
    }
    Ok(())
}

pub(crate) fn validate_metadata(
    field: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<(), InvalidInput> {
    if metadata.len() > METADATA_ENTRIES_MAX {
        return Err(InvalidInput::new(
            field,
            format!(
                "has {} entries; the limit is {METADATA_ENTRIES_MAX}",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > METADATA_KEY_LEN_MAX {
            return Err(InvalidInput::new(
                format!("{field}[{key:?}]"),
                format!("key must be 1-{METADATA_KEY_LEN_MAX} bytes"),
            ));
        }
        if value.len() > METADATA_VALUE_LEN_MAX {
            return Err(InvalidInput::new(
                format!("{field}[{key:?}]"),
                format!(
                    "value is {} bytes; the limit is {METADATA_VALUE_LEN_MAX}",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("id", "alice").is_ok());
        assert!(validate_id("id", "acct:eu/42@bank-1.x_y").is_ok());
        assert_eq!(
            validate_id("id", "").unwrap_err().reason,
            "must not be empty"
        );
        assert!(validate_id("id", "a b").unwrap_err().reason.contains("' '"));
        assert!(
            validate_id("id", &"a".repeat(129))
                .unwrap_err()
                .reason
                .contains("129")
        );
        assert!(validate_id("id", &"a".repeat(128)).is_ok());
        assert!(validate_id("id", "é").is_err());
    }

    #[test]
    fn ledgers() {
        assert!(validate_ledger("ledger", "USD").is_ok());
        assert!(validate_ledger("ledger", "usd").is_err());
        assert!(validate_ledger("ledger", "").is_err());
        assert!(validate_ledger("ledger", &"A".repeat(17)).is_err());
    }
}
