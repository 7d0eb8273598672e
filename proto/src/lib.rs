//! # postern-proto
//!
//! Everything the controller, the worker and the CLI must agree on, and nothing that does I/O
//! (in the manner of `quinn-proto`): the session-authorization token, the QUIC frames of the
//! session and cluster protocols, ALPN names, application close codes and shared identifiers.
//!
//! # Layout
//! - [`ids`]: newtypes for identifiers and secrets.
//! - [`token`]: the Ed25519-signed session authorization (a compact JWT, `alg: EdDSA`) and the
//!   client-key thumbprint it is bound to (`cnf`).
//! - [`frame`]: length-prefixed frames (u32 big-endian length, JSON body, 64 KiB limit).
//! - [`session`]: client ↔ worker messages (ALPN `postern-session/1`).
//! - [`cluster`]: worker ↔ controller messages (ALPN `postern-cluster/1`).
//! - [`relay`]: client datagrams carried to an outbound-only worker over its cluster connection.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod frame;
pub mod ids;
pub mod relay;
pub mod session;
pub mod token;

/// ALPN of a client ↔ worker session connection.
pub const ALPN_SESSION: &[u8] = b"postern-session/1";
/// ALPN of the worker ↔ controller cluster connection.
pub const ALPN_CLUSTER: &[u8] = b"postern-cluster/1";
/// Version carried in every hello; bumped together with the ALPN names on breaking changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Lowercase hex of `bytes` (certificate fingerprints, hash-chain links, MD5 passwords).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// The DNS name a worker's certificate carries, and that clients and controllers verify.
pub fn worker_server_name(worker_name: &str) -> String {
    format!("{worker_name}.worker.postern.internal")
}

/// The DNS name every controller's cluster certificate carries.
pub const CONTROLLER_SERVER_NAME: &str = "controller.postern.internal";

/// An exclusive lock on the file `path` (created if missing), held until the file is closed;
/// `None` if another process holds it. One process per data directory (the worker, `postern
/// dev`) or SQLite database (the controller).
pub fn try_lock_file(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

/// A duration in configuration (`90s`, `15m`, `12h`, `7d`, `1h 30m`), with an error that
/// says what was expected.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}': expected a duration such as 90s, 15m, 12h or 7d ({e})"))
}

/// The current time in whole seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
