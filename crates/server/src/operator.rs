//! Operators' credential and audit log, for the admin calls that change allowances (regional
//! quotas).
//!
//! The credential is a bearer token read at start from `admin.token_file`; when that setting
//! is empty, the node uses `<data_dir>/admin.token`, writing a new random token there (mode
//! 0600) the first time, so a single node needs no set-up and its operator reads the token from
//! the file. A call without `authorization: Bearer <token>` is refused `UNAUTHENTICATED`, one
//! with another token `PERMISSION_DENIED`; nothing changes.
//!
//! Every admin call that changes something, and every refused one, is appended to the audit
//! log (`admin.audit_log`, default `<data_dir>/admin-audit.jsonl`) as one JSON object per line
//! and synced to disk before the call is answered: a change the log does not show was not
//! made.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tonic::Status;
use tonic::metadata::MetadataMap;

/// Bytes of randomness in a generated token (hex-encoded in the file).
const TOKEN_BYTES: usize = 32;
/// A token file's content is read up to this many bytes.
const TOKEN_FILE_MAX: u64 = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("admin token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("admin audit log {path}: {reason}")]
    Audit { path: String, reason: String },
}

/// The operator's bearer token.
pub struct Credential {
    token: String,
    pub path: PathBuf,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// Reads the token from `configured`, or from (creating if need be) `default`.
    pub fn load(configured: &Path, default: &Path) -> Result<Self, OperatorError> {
        let (path, create) = if configured.as_os_str().is_empty() {
            (default.to_path_buf(), true)
        } else {
            (configured.to_path_buf(), false)
        };
        let error = |reason: String| OperatorError::Token {
            path: path.display().to_string(),
            reason,
        };
        if create && !path.exists() {
            write_new_token(&path).map_err(|e| error(e.to_string()))?;
        }
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(
                std::fs::File::open(&path).map_err(|e| error(e.to_string()))?,
                TOKEN_FILE_MAX,
            ),
            &mut text,
        )
        .map_err(|e| error(e.to_string()))?;
        let token = text.trim().to_string();
        if token.len() < 16 {
            return Err(error("holds no token of at least 16 characters".into()));
        }
        Ok(Self { token, path })
    }

    /// Checks a call's `authorization` header.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "admin calls need the operator's token: `authorization: Bearer <token>`",
            ));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(token) if equal_in_constant_time(token.as_bytes(), self.token.as_bytes()) => {
                Ok(())
            }
            _ => Err(Status::permission_denied(
                "the admin token given is not the operator's",
            )),
        }
    }
}

fn write_new_token(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; TOKEN_BYTES];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{hex}")?;
    file.sync_all()
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The append-only audit log of admin actions.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<std::fs::File>,
    pub path: PathBuf,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, OperatorError> {
        let error = |e: std::io::Error| OperatorError::Audit {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(error)?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(error)?;
        Ok(Self {
            file: Mutex::new(file),
            path: path.to_path_buf(),
        })
    }

    /// Appends one action and syncs it: `action` (the call), `arguments`, `outcome` ("ok" or
    /// why it was refused), `at_unix_ms`, and the `node` that took it.
    pub fn record(
        &self,
        node: &str,
        action: &str,
        arguments: serde_json::Value,
        outcome: &str,
        at_unix_ms: u64,
    ) -> Result<(), Status> {
        let line = serde_json::json!({
            "at_unix_ms": at_unix_ms,
            "node": node,
            "action": action,
            "arguments": arguments,
            "outcome": outcome,
        });
        let mut file = self.file.lock().expect("poisoned");
        let written = writeln!(file, "{line}").and_then(|()| file.sync_data());
        written.map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the admin audit log");
            Status::internal(format!("the audit log cannot be written: {e}"))
        })
    }
}
