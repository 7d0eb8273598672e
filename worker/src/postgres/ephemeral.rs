//! Zero standing credentials. When a target's credential is an admin login
//! ([`Credential::PostgresAdmin`], a role with `CREATEROLE` and the admin option on the group
//! roles), no engineer-facing database password exists: the worker creates a role for the
//! session only (`postern_<session id>`, `VALID UNTIL` the session's expiry, member of the
//! group role the session's login names, with `role` set to that group so that what the
//! engineer does runs as, and belongs to, the group), logs the session's connections in as
//! it, and drops it when the session ends.
//!
//! The role's password is random, exists only in this worker's memory, and reaches the server
//! as a SCRAM verifier (never in clear, so not in the server's statement log). A role left
//! behind by a worker that stopped before its session ended expires at its `VALID UNTIL`, and
//! is dropped by the next session that creates a role on the same server.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use postern_proto::cluster::Credential;
use postern_proto::ids::{Secret, SessionId};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio::time::timeout;

use super::auth::{self, Login};
use super::codec::{self, Backend, Startup, Tag};
use super::{scram, Auditor, PgError};
use crate::relay::Counts;
use crate::state::{Session, Shared};

/// Prefix of every per-session role (the session id, `s_…`, follows).
const ROLE_PREFIX: &str = "postern_";
/// `LIKE` pattern of the per-session roles (and of no admin role such as `postern_admin`).
const ROLE_PATTERN: &str = "postern\\_s\\_%";
/// How often a role's session is checked for its end.
const END_POLL: Duration = Duration::from_millis(250);
/// How long an admin connection may take, from dial to the last answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// PBKDF2 iterations of the role's SCRAM verifier (PostgreSQL's default).
const VERIFIER_ITERATIONS: u32 = 4096;
/// The database the admin connection uses.
const ADMIN_DATABASE: &str = "postgres";

/// The per-session roles this worker created and has not dropped yet.
#[derive(Default)]
pub(crate) struct EphemeralRoles {
    roles: Mutex<HashMap<SessionId, Arc<OnceCell<SessionRole>>>>,
}

/// A session's own role.
#[derive(Clone)]
struct SessionRole {
    name: String,
    password: Secret,
}

/// The admin credential and what to do with it.
struct Admin {
    endpoint: String,
    user: String,
    password: Secret,
}

impl EphemeralRoles {
    /// The login for a connection of a session whose target uses per-session roles (the
    /// role is created by the session's first connection); `None` for other targets.
    pub(super) async fn login(
        &self,
        session: &Arc<Session>,
        shared: &Arc<Shared>,
        startup: &Startup,
    ) -> Result<Option<Login>, PgError> {
        let Some(Credential::PostgresAdmin { username, password }) = &session.grant.credential
        else {
            return Ok(None);
        };
        let group = session.claims.login.clone().ok_or_else(|| {
            PgError::Login(
                "this target gives each session its own database role: name the group role \
                 to join with `postern psql TARGET --db-user GROUP`"
                    .into(),
            )
        })?;
        if group == *username || group.contains(char::is_control) {
            return Err(PgError::Login(format!(
                "'{group}' cannot be joined by a per-session role"
            )));
        }
        let admin = Admin {
            endpoint: session.endpoint.clone(),
            user: username.clone(),
            password: password.clone(),
        };
        let cell = self
            .roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(session.id.clone())
            .or_default()
            .clone();
        // Concurrent first connections wait for one creation; a failed one is retried by
        // the next connection.
        let role = cell
            .get_or_try_init(|| create(session, shared, &admin, &group))
            .await?
            .clone();
        let database = startup
            .param("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(&group)
            .to_owned();
        Ok(Some(Login::new(role.name, database, Some(role.password))))
    }

    fn forget(&self, session: &SessionId) {
        self.roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(session);
    }
}

/// Creates the session's role and starts the task that drops it when the session ends.
async fn create(
    session: &Arc<Session>,
    shared: &Arc<Shared>,
    admin: &Admin,
    group: &str,
) -> Result<SessionRole, PgError> {
    let name = format!("{ROLE_PREFIX}{}", session.id);
    let password = Secret::random("");
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the operating system's random source failed");
    let iterations = NonZeroU32::new(VERIFIER_ITERATIONS).expect("non-zero");
    let verifier = scram::verifier(password.expose(), &salt, iterations);
    let until = time::OffsetDateTime::from_unix_timestamp(session.claims.exp)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .ok_or_else(|| PgError::Login("the session's expiry is not a valid time".into()))?;
    let statements = [
        format!(
            "CREATE ROLE {} LOGIN NOINHERIT PASSWORD '{verifier}' VALID UNTIL '{until}' IN ROLE {}",
            quote_ident(&name),
            quote_ident(group)
        ),
        format!(
            "ALTER ROLE {} SET role = {}",
            quote_ident(&name),
            quote_literal(group)
        ),
    ];
    let work = async {
        let mut conn = admin.connect().await?;
        let swept = sweep(&mut conn).await?;
        for sql in &statements {
            simple_query(&mut conn, sql).await?;
        }
        conn.close().await;
        Ok(swept)
    };
    let swept = timeout(ADMIN_TIMEOUT, work)
        .await
        .unwrap_or(Err(PgError::TargetTimeout(
            "the database server did not create the session's role within 30 s",
        )))
        .map_err(|e| match e {
            PgError::TargetRefused(fields) => PgError::Login(format!(
                "cannot create the session's database role in '{group}': {}",
                fields.message
            )),
            other => other,
        })?;
    let audit = Auditor::new(shared, session, ADMIN_DATABASE, &admin.user);
    audit.event(
        "postgres.role_created",
        json!({"role": name, "group": group, "valid_until": until, "expired_roles_dropped": swept}),
    );
    tracing::info!(session = %session.id, role = %name, %group, "per-session database role created");
    tokio::spawn(drop_when_ended(
        session.clone(),
        shared.clone(),
        Admin {
            endpoint: admin.endpoint.clone(),
            user: admin.user.clone(),
            password: admin.password.clone(),
        },
        name.clone(),
        audit,
    ));
    Ok(SessionRole { name, password })
}

/// Waits for the session to end, then drops its role.
async fn drop_when_ended(
    session: Arc<Session>,
    shared: Arc<Shared>,
    admin: Admin,
    role: String,
    audit: Auditor,
) {
    while session.ended().is_none() {
        tokio::time::sleep(END_POLL).await;
    }
    shared.postgres.roles.forget(&session.id);
    let sql = format!("DROP ROLE IF EXISTS {}", quote_ident(&role));
    let work = async {
        let mut conn = admin.connect().await?;
        simple_query(&mut conn, &sql).await?;
        conn.close().await;
        Ok(())
    };
    let dropped = timeout(ADMIN_TIMEOUT, work)
        .await
        .unwrap_or(Err(PgError::TargetTimeout(
            "the database server did not drop the session's role within 30 s",
        )));
    match dropped {
        Ok(()) => {
            tracing::info!(session = %session.id, %role, "per-session database role dropped");
            audit.event("postgres.role_dropped", json!({"role": role}));
        }
        Err(e) => {
            // It expires at VALID UNTIL, and the next session on this server drops it.
            tracing::warn!(session = %session.id, %role, "cannot drop the per-session role: {e}");
            audit.event(
                "postgres.role_dropped",
                json!({"role": role, "error": e.to_string()}),
            );
        }
    }
}

/// Drops per-session roles past their expiry (left by a worker that stopped); returns them.
async fn sweep(conn: &mut AdminConn) -> Result<Vec<String>, PgError> {
    let rows = simple_query(
        conn,
        &format!(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE '{ROLE_PATTERN}' \
             AND rolvaliduntil < now()"
        ),
    )
    .await?;
    let mut dropped = Vec::new();
    for name in rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
    {
        match simple_query(conn, &format!("DROP ROLE IF EXISTS {}", quote_ident(&name))).await {
            Ok(_) => dropped.push(name),
            Err(e) => tracing::warn!(role = %name, "cannot drop an expired per-session role: {e}"),
        }
    }
    Ok(dropped)
}

/// A connection logged in as the admin.
struct AdminConn {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Admin {
    /// Dials the server and logs in as the admin.
    async fn connect(&self) -> Result<AdminConn, PgError> {
        let mut tcp = TcpStream::connect(self.endpoint.as_str())
            .await
            .map_err(PgError::Target)?;
        let login = Login::new(
            self.user.clone(),
            ADMIN_DATABASE.to_owned(),
            Some(self.password.clone()),
        );
        let startup = Startup {
            minor: 0,
            params: vec![("application_name".into(), "postern-worker".into())],
        };
        let ready = auth::log_in(&mut tcp, &login, &startup, &mut Counts::default()).await?;
        Ok(AdminConn {
            tcp,
            buf: ready.leftover,
        })
    }
}

impl AdminConn {
    /// Says goodbye (`Terminate`) and closes.
    async fn close(mut self) {
        let _ = self.tcp.write_all(&codec::terminate()).await;
        let _ = self.tcp.shutdown().await;
    }
}

/// Runs one statement; returns the rows (text format) or the server's error.
async fn simple_query(
    conn: &mut AdminConn,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, PgError> {
    conn.tcp
        .write_all(&codec::query(sql))
        .await
        .map_err(PgError::Target)?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let msg = auth::next_message(&mut conn.tcp, &mut conn.buf).await?;
        match msg.first().copied() {
            Some(b'D') => rows.push(
                codec::parse_data_row(&msg)
                    .map_err(PgError::TargetProtocol)?
                    .into_iter()
                    .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
                    .collect(),
            ),
            Some(b'E') => {
                if let Ok(Backend::Error(fields)) = codec::parse_backend(&msg) {
                    error = Some(fields);
                }
            }
            Some(b'Z') => {
                return match error {
                    Some(fields) => Err(PgError::TargetRefused(fields)),
                    None => Ok(rows),
                }
            }
            Some(b'T' | b'C' | b'N' | b'S' | b'I') => {}
            Some(other) => {
                return Err(PgError::TargetProtocol(codec::CodecError::UnexpectedTag(
                    Tag(other),
                )))
            }
            None => {}
        }
    }
}

/// `"name"`, with inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with inner quotes doubled (standard-conforming strings).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("analysts"), "\"analysts\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
