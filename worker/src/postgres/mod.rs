//! The `postgres` proxy: the worker speaks the PostgreSQL wire protocol on each proxied
//! connection of a `postgres` session.
//!
//! 1. [`startup`]: the client's side of the startup. `SSLRequest` and `GSSENCRequest` are
//!    answered `N` (the QUIC hop is already encrypted), and the client is not asked for a
//!    password: the session token has already authenticated the engineer, who holds none.
//! 2. [`auth`]: the worker logs in to the real server as the brokered database user (the
//!    session's `login`, else the credential's user) with SCRAM-SHA-256, MD5 or a cleartext
//!    password, then hands the server's greeting to the client with its own cancel key.
//! 3. [`relay`]: messages both ways. Client messages are framed and checked (each `Query` and
//!    `Parse` becomes an audit event); server output is copied through as it arrives, its
//!    headers checked without holding bodies.
//!
//! A `CancelRequest` (a new connection of the same session) is forwarded to the server with
//! the server's key, and only for a backend this session opened ([`CancelKeys`]).
//! Protocol errors from either side end that connection with an `ErrorResponse` the client
//! shows; nothing here can end the worker or another connection.
//!
//! [`ephemeral`] adds zero standing credentials: with an admin credential, the worker creates
//! a database role for the session only and drops it when the session ends.
//!
//! TLS towards the target is not implemented: the worker connects in clear (the target is
//! meant to be on the worker's private network).

mod auth;
pub mod codec;
mod ephemeral;
mod relay;
mod scram;
mod startup;

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use postern_proto::ids::SessionId;
use quinn::{RecvStream, SendStream};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::relay::Counts;
use crate::state::{Session, Shared};
use codec::{CancelKey, CodecError, ErrorFields};

pub(crate) use ephemeral::EphemeralRoles;

/// Statement text kept in an audit event unless configured otherwise (4 KiB).
const DEFAULT_STATEMENT_LIMIT: usize = 4096;
/// The most `audit_statement_limit` may be: a statement's event must fit the 64 KiB frame
/// that carries it to the controller, and 16 KiB leaves room for JSON's escapes (a quote or
/// a backslash doubles) and the other details. An event that still does not fit (a
/// statement made mostly of control characters, six bytes each) keeps its action and
/// session but not its details ([`crate::spool`]).
const MAX_STATEMENT_LIMIT: usize = 16 * 1024;

/// SQLSTATE of protocol violations.
const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE when the target cannot be logged in to.
const CONNECTION_FAILURE: &str = "08006";
/// SQLSTATE of a refused login.
const INVALID_AUTHORIZATION: &str = "28000";
/// SQLSTATE of a feature the proxy does not offer.
const FEATURE_NOT_SUPPORTED: &str = "0A000";

/// `[postgres]` in the worker config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Longest statement text kept in an audit event, in bytes; longer statements are cut
    /// (at a character boundary) and marked `truncated`.
    #[serde(default = "default_statement_limit")]
    pub audit_statement_limit: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            audit_statement_limit: DEFAULT_STATEMENT_LIMIT,
        }
    }
}

fn default_statement_limit() -> usize {
    DEFAULT_STATEMENT_LIMIT
}

impl PostgresConfig {
    pub(crate) fn validate(&self) -> Result<(), crate::ConfigError> {
        if self.audit_statement_limit > MAX_STATEMENT_LIMIT {
            return Err(crate::ConfigError::Invalid {
                key: "[postgres] audit_statement_limit",
                message: format!(
                    "{} bytes is more than an audit event carries; at most {MAX_STATEMENT_LIMIT}",
                    self.audit_statement_limit
                ),
            });
        }
        Ok(())
    }
}

/// What the postgres proxy keeps across connections: its settings, the cancel keys handed
/// to clients, and the per-session roles.
pub(crate) struct PostgresState {
    config: PostgresConfig,
    cancel: CancelKeys,
    roles: EphemeralRoles,
}

impl PostgresState {
    pub(crate) fn new(config: PostgresConfig) -> Self {
        Self {
            config,
            cancel: CancelKeys::default(),
            roles: EphemeralRoles::default(),
        }
    }
}

impl Default for PostgresState {
    fn default() -> Self {
        Self::new(PostgresConfig::default())
    }
}

/// Why a postgres connection ended early, tagged with the side at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    /// The client broke the protocol (client side).
    #[error("client protocol error: {0}")]
    ClientProtocol(CodecError),
    /// The server broke the protocol (target side).
    #[error("target protocol error: {0}")]
    TargetProtocol(CodecError),
    /// Reading from or writing to the client's stream failed (client side).
    #[error("client error: {0}")]
    Client(io::Error),
    /// Reading from or writing to the target failed (target side).
    #[error("target error: {0}")]
    Target(io::Error),
    /// The client asked for something the proxy does not do (client side).
    #[error("refused: {0}")]
    Unsupported(String),
    /// The client was too slow (client side).
    #[error("client timed out: {0}")]
    ClientTimeout(&'static str),
    /// The target was too slow (target side).
    #[error("target timed out: {0}")]
    TargetTimeout(&'static str),
    /// The target refused the brokered login or the connection (target side).
    #[error("target refused the connection: {}", .0.message)]
    TargetRefused(ErrorFields),
    /// The worker cannot log in to the target (no credential, unsupported method, wrong
    /// server proof): target side or configuration.
    #[error("cannot log in to the target: {0}")]
    Login(String),
    /// Already reported to the client with an `ErrorResponse`; carries the cause.
    #[error("{0}")]
    Told(Box<PgError>),
    /// Failed while relaying, possibly in the middle of a server message: nothing more can
    /// be written to the client, whose stream is reset.
    #[error("{0}")]
    Relaying(Box<PgError>),
}

impl PgError {
    /// The `ErrorResponse` the client should see, if it has not been told yet.
    fn client_message(&self) -> Option<Vec<u8>> {
        let (code, message, hint) = match self {
            PgError::ClientProtocol(e) => (
                PROTOCOL_VIOLATION,
                format!("postern: invalid message from the client: {e}"),
                None,
            ),
            PgError::TargetProtocol(e) => (
                PROTOCOL_VIOLATION,
                format!("postern: invalid message from the database server: {e}"),
                None,
            ),
            PgError::Unsupported(what) => (FEATURE_NOT_SUPPORTED, format!("postern: {what}"), None),
            PgError::ClientTimeout(what) => (PROTOCOL_VIOLATION, format!("postern: {what}"), None),
            PgError::TargetTimeout(what) => (CONNECTION_FAILURE, format!("postern: {what}"), None),
            PgError::Target(e) => (
                CONNECTION_FAILURE,
                format!("postern: lost the database server: {e}"),
                None,
            ),
            PgError::TargetRefused(fields) => {
                let mut fields = fields.clone();
                fields.message =
                    format!("postern: the database server refused: {}", fields.message);
                return Some(codec::error_response(&fields));
            }
            PgError::Login(why) => (
                INVALID_AUTHORIZATION,
                format!("postern: cannot log in to the database server: {why}"),
                Some("the brokered credential is managed with `postern credentials set`"),
            ),
            PgError::Client(_) | PgError::Told(_) | PgError::Relaying(_) => return None,
        };
        Some(codec::fatal(code, &message, hint))
    }
}

/// Serves one proxied connection of a `postgres` session on `tcp`, the dialed target.
/// `Ok` carries why it ended when the client was told (or nothing went wrong); `Err` means
/// the stream should be reset.
pub(crate) async fn serve(
    session: &Arc<Session>,
    shared: &Arc<Shared>,
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counts: &mut Counts,
) -> Result<String, String> {
    let result = serve_connection(session, shared, tcp, send, recv, counts).await;
    let error = match result {
        Ok(reason) => return Ok(reason),
        Err(error) => error,
    };
    tracing::info!(session = %session.id, "postgres connection ended: {error}");
    match error.client_message() {
        Some(bytes) => {
            if send.write_all(&bytes).await.is_ok() {
                counts.down += bytes.len() as u64;
                let _ = send.finish();
                return Ok(error.to_string());
            }
            Err(error.to_string())
        }
        None if matches!(error, PgError::Told(_)) => Ok(error.to_string()),
        None => Err(error.to_string()),
    }
}

async fn serve_connection(
    session: &Arc<Session>,
    shared: &Arc<Shared>,
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counts: &mut Counts,
) -> Result<String, PgError> {
    let pg = &shared.postgres;
    let (first, client_buf) = startup::read_startup(send, recv, counts).await?;
    let startup = match first {
        startup::First::Startup(startup) => startup,
        startup::First::Cancel(key) => return forward_cancel(session, pg, tcp, key).await,
    };
    auth::check_supported(&startup)?;
    let login = match pg.roles.login(session, shared, &startup).await? {
        Some(login) => login,
        None => auth::brokered_login(session, &startup)?,
    };
    let ready = auth::log_in(tcp, &login, &startup, counts).await?;
    let client_key = pg.cancel.issue(&session.id, ready.server_key);
    // Per-session roles log in as the session's own role, a member of the one it was opened for.
    let chosen = session.claims.login.as_deref().unwrap_or(&login.user);
    let greeting = startup::greeting(
        &startup,
        chosen,
        &login.user,
        &ready,
        client_key.as_ref().map(|k| k.key),
    );
    send.write_all(&greeting)
        .await
        .map_err(|e| PgError::Client(e.into()))?;
    counts.down += greeting.len() as u64;
    tracing::info!(
        session = %session.id,
        database = %login.database,
        db_user = %login.user,
        "postgres connection ready"
    );
    let audit = Auditor::new(shared, session, &login.database, &login.user);
    audit.event("postgres.connect", json!({}));
    relay::relay(tcp, send, recv, client_buf, ready.leftover, &audit, counts)
        .await
        .map_err(|e| match e {
            told @ PgError::Told(_) => told,
            other => PgError::Relaying(Box::new(other)),
        })?;
    drop(client_key);
    Ok("closed".to_owned())
}

/// A `CancelRequest`: forwards it with the server's key if this session handed out `key`.
async fn forward_cancel(
    session: &Session,
    pg: &PostgresState,
    tcp: &mut TcpStream,
    key: CancelKey,
) -> Result<String, PgError> {
    let Some(server_key) = pg.cancel.lookup(&session.id, key) else {
        // The server answers nothing to a cancel request either, valid or not.
        tracing::info!(session = %session.id, pid = key.pid, "cancel request with an unknown key ignored");
        return Ok("cancel request with an unknown key ignored".to_owned());
    };
    tcp.write_all(&codec::cancel_request(server_key))
        .await
        .map_err(PgError::Target)?;
    let _ = tcp.shutdown().await;
    tracing::info!(session = %session.id, pid = key.pid, "cancel request forwarded");
    Ok("cancel request forwarded".to_owned())
}

/// Writes audit events of one connection.
pub(crate) struct Auditor {
    shared: Arc<Shared>,
    session_id: SessionId,
    target: String,
    database: String,
    db_user: String,
    limit: usize,
}

impl Auditor {
    fn new(shared: &Arc<Shared>, session: &Session, database: &str, db_user: &str) -> Self {
        Self {
            shared: shared.clone(),
            session_id: session.id.clone(),
            target: session.claims.target.to_string(),
            database: database.to_owned(),
            db_user: db_user.to_owned(),
            limit: shared.postgres.config.audit_statement_limit,
        }
    }

    /// An event with the connection's context added to `details`.
    fn event(&self, action: &str, mut details: serde_json::Value) {
        if let Some(map) = details.as_object_mut() {
            map.insert("target".into(), self.target.clone().into());
            map.insert("database".into(), self.database.clone().into());
            map.insert("db_user".into(), self.db_user.clone().into());
        }
        self.shared.audit(&self.session_id, action, &details);
    }

    /// A statement (`postgres.query` or `postgres.parse`), cut at the configured length.
    /// Its details are serialized from a struct straight into the spool: one per statement.
    fn statement(&self, action: &str, name: Option<&[u8]>, sql: &[u8]) {
        let (text, truncated) = truncate(sql, self.limit);
        let details = StatementDetails {
            database: &self.database,
            db_user: &self.db_user,
            statement: &text,
            statement_bytes: sql.len(),
            statement_name: name.map(String::from_utf8_lossy),
            target: &self.target,
            truncated,
        };
        self.shared.audit(&self.session_id, action, &details);
    }
}

/// A statement's audit details (in the key order a JSON object of them has in the log).
#[derive(serde::Serialize)]
struct StatementDetails<'a> {
    database: &'a str,
    db_user: &'a str,
    statement: &'a str,
    statement_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    statement_name: Option<Cow<'a, str>>,
    target: &'a str,
    truncated: bool,
}

/// `sql` as text of at most `limit` bytes, cut at a character boundary; and whether it was cut.
fn truncate(sql: &[u8], limit: usize) -> (Cow<'_, str>, bool) {
    // Decode a few bytes past the limit only: a cut character decodes as a replacement.
    let head = &sql[..sql.len().min(limit.saturating_add(4))];
    let text = String::from_utf8_lossy(head);
    if sql.len() <= limit {
        return (text, false);
    }
    let mut text = text.into_owned();
    let mut end = limit.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (Cow::Owned(text), true)
}

/// The cancel keys handed to clients: the client sees the server's process id with a secret
/// of the worker's own, which maps to the server's secret for this session only. A client can
/// cancel only queries of backends its own session opened.
#[derive(Default)]
pub(crate) struct CancelKeys {
    keys: Mutex<HashMap<CancelKey, (SessionId, CancelKey)>>,
}

/// A cancel key handed out; forgotten when dropped (the connection has ended).
struct IssuedKey<'a> {
    keys: &'a CancelKeys,
    key: CancelKey,
}

impl CancelKeys {
    fn issue(&self, session: &SessionId, server: Option<CancelKey>) -> Option<IssuedKey<'_>> {
        let server = server?;
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let key = loop {
            let mut secret = [0u8; 4];
            getrandom::fill(&mut secret).expect("the operating system's random source failed");
            let key = CancelKey {
                pid: server.pid,
                secret: i32::from_be_bytes(secret),
            };
            if !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, (session.clone(), server));
        Some(IssuedKey { keys: self, key })
    }

    fn lookup(&self, session: &SessionId, key: CancelKey) -> Option<CancelKey> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(&key)
            .filter(|(owner, _)| owner == session)
            .map(|(_, server)| *server)
    }
}

impl Drop for IssuedKey<'_> {
    fn drop(&mut self) {
        self.keys
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_cut_at_character_boundaries() {
        assert_eq!(truncate(b"select 1", 100), ("select 1".into(), false));
        assert_eq!(truncate(b"select 1", 6), ("select".into(), true));
        // "é" is two bytes: a cut inside it drops it whole.
        assert_eq!(truncate("aé".as_bytes(), 2), ("a".into(), true));
        assert_eq!(truncate("aé".as_bytes(), 3), ("aé".into(), false));
        assert_eq!(truncate(b"\xff\xfe", 1), ("".into(), true));
        assert_eq!(truncate(b"", 0), ("".into(), false));
    }

    #[test]
    fn statement_details_are_the_json_object_they_replace() {
        for name in [None, Some("s1")] {
            let details = StatementDetails {
                database: "db",
                db_user: "u",
                statement: "select '\"é'",
                statement_bytes: 12,
                statement_name: name.map(Cow::from),
                target: "t",
                truncated: false,
            };
            let mut object = json!({"statement": "select '\"é'", "truncated": false,
                "statement_bytes": 12, "target": "t", "database": "db", "db_user": "u"});
            if let Some(name) = name {
                object["statement_name"] = name.into();
            }
            assert_eq!(
                serde_json::to_string(&details).expect("serializes"),
                object.to_string()
            );
        }
    }

    #[test]
    fn cancel_keys_are_scoped_to_their_session() {
        let keys = CancelKeys::default();
        let (a, b) = (SessionId("s_a".into()), SessionId("s_b".into()));
        let server = CancelKey { pid: 42, secret: 7 };
        let issued = keys.issue(&a, Some(server)).expect("issued");
        assert_eq!(issued.key.pid, 42, "the client sees the real backend pid");
        assert_eq!(keys.lookup(&a, issued.key), Some(server));
        assert_eq!(keys.lookup(&b, issued.key), None, "another session");
        assert_eq!(
            keys.lookup(&a, server),
            None,
            "the server's own secret is unknown"
        );
        let key = issued.key;
        drop(issued);
        assert_eq!(
            keys.lookup(&a, key),
            None,
            "forgotten when the connection ends"
        );
    }
}
