//! The worker's side of the startup towards the real server: which database user it logs in
//! as (the brokered login), the `StartupMessage`, and the authentication exchange
//! (SCRAM-SHA-256, MD5 or cleartext) with the brokered password.

use std::time::Duration;

use bytes::BytesMut;
use postern_proto::cluster::Credential;
use postern_proto::ids::Secret;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::timeout;

use super::codec::{self, Auth, Backend, CancelKey, CodecError, Startup, Tag};
use super::scram::{md5_password, ScramClient, SCRAM_SHA_256};
use super::PgError;
use crate::relay::Counts;
use crate::state::Session;

/// How long the server may take to log the worker in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Startup parameters the worker sets itself, or refuses to pass on.
const OWN_PARAMS: [&str; 3] = ["user", "database", "replication"];

/// Whom the worker logs in as.
pub(super) struct Login {
    /// The database user.
    pub(super) user: String,
    /// The database.
    pub(super) database: String,
    /// The password, if the worker holds one for `user`.
    password: Option<Secret>,
    /// The credential's user, to explain a missing password.
    credential_user: Option<String>,
}

impl Login {
    /// Logs in as `user` with `password`.
    pub(super) fn new(user: String, database: String, password: Option<Secret>) -> Self {
        Self {
            user,
            database,
            password,
            credential_user: None,
        }
    }

    fn password(&self) -> Result<&str, PgError> {
        match (&self.password, &self.credential_user) {
            (Some(p), _) => Ok(p.expose()),
            (None, Some(other)) => Err(PgError::Login(format!(
                "the server asks for a password for database user '{}', but the target's \
                 credential is for '{other}'",
                self.user
            ))),
            (None, None) => Err(PgError::Login(format!(
                "the server asks for a password for database user '{}', but the target has \
                 no credential",
                self.user
            ))),
        }
    }
}

/// The server, logged in and ready for queries.
pub(super) struct Ready {
    /// The server's cancel key.
    pub(super) server_key: Option<CancelKey>,
    /// `ParameterStatus` and notices to pass on, as received.
    pub(super) greeting: Vec<u8>,
    /// The `ReadyForQuery` message.
    pub(super) ready_for_query: Vec<u8>,
    /// Server bytes received after it.
    pub(super) leftover: BytesMut,
}

/// Decides whom to log in as: the session's authorized login, else the brokered
/// credential's user; the database the client asked for, else the user's own.
pub(super) fn brokered_login(session: &Session, startup: &Startup) -> Result<Login, PgError> {
    let (credential_user, password) = match &session.grant.credential {
        Some(Credential::Password { username, password }) => {
            (Some(username.clone()), Some(password.clone()))
        }
        _ => (None, None),
    };
    let user = session
        .claims
        .login
        .clone()
        .or_else(|| credential_user.clone())
        .ok_or_else(|| {
            PgError::Login(
                "the session names no database user and the target has no credential: \
                 connect with `postern psql TARGET --db-user USER` (a connect rule must list \
                 USER in its logins), or have an admin set one with `postern credentials set`"
                    .into(),
            )
        })?;
    let database = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
    // The password belongs to the credential's user only.
    let password = password.filter(|_| credential_user.as_deref() == Some(user.as_str()));
    Ok(Login {
        user,
        database,
        password,
        credential_user,
    })
}

/// Refuses what a session cannot carry: replication connections (their protocol is not
/// the one the proxy relays and audits).
pub(super) fn check_supported(startup: &Startup) -> Result<(), PgError> {
    match startup.param("replication") {
        None | Some("false" | "off" | "no" | "0") => Ok(()),
        Some(_) => Err(PgError::Unsupported(
            "replication connections are not supported through a session".into(),
        )),
    }
}

/// Sends the startup message for `login` (with the client's other parameters) and
/// authenticates; returns once the server is ready for queries.
pub(super) async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(
    server: &mut S,
    login: &Login,
    startup: &Startup,
    counts: &mut Counts,
) -> Result<Ready, PgError> {
    let mut params = vec![
        ("user", login.user.as_str()),
        ("database", login.database.as_str()),
    ];
    params.extend(
        startup
            .params
            .iter()
            .filter(|(name, _)| !OWN_PARAMS.contains(&name.as_str()) && !name.starts_with("_pq_."))
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    let message = codec::startup_message(params);
    timeout(LOGIN_TIMEOUT, async {
        write(server, &message, counts).await?;
        authenticate(server, login, counts).await
    })
    .await
    .map_err(|_| PgError::TargetTimeout("the database server did not log us in within 30 s"))?
}

async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    server: &mut S,
    login: &Login,
    counts: &mut Counts,
) -> Result<Ready, PgError> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut greeting = Vec::new();
    let mut scram: Option<ScramClient> = None;
    let mut scram_verified = false;
    let mut authenticated = false;
    let mut server_key = None;
    let protocol = |why| {
        PgError::TargetProtocol(CodecError::Malformed {
            what: "startup",
            why,
        })
    };
    loop {
        let msg = next_message(server, &mut buf).await?;
        let parsed = codec::parse_backend(&msg).map_err(PgError::TargetProtocol)?;
        match parsed {
            Backend::Auth(_) if authenticated => {
                return Err(protocol("authentication request after AuthenticationOk"))
            }
            Backend::Auth(Auth::Ok) => {
                if scram.is_some() && !scram_verified {
                    return Err(PgError::Login(
                        "the server ended SCRAM without proving it knows the password".into(),
                    ));
                }
                authenticated = true;
            }
            Backend::Auth(Auth::Cleartext) => {
                let reply = codec::password_message(login.password()?.as_bytes());
                write(server, &reply, counts).await?;
            }
            Backend::Auth(Auth::Md5(salt)) => {
                let hash = md5_password(&login.user, login.password()?, salt);
                write(server, &codec::password_message(hash.as_bytes()), counts).await?;
            }
            Backend::Auth(Auth::Sasl(mechanisms)) => {
                if scram.is_some() {
                    return Err(protocol("a second SASL exchange"));
                }
                if !mechanisms.contains(&SCRAM_SHA_256) {
                    return Err(PgError::Login(format!(
                        "the server offers SASL mechanisms {mechanisms:?}; the worker speaks \
                         {SCRAM_SHA_256} without channel binding"
                    )));
                }
                let client = ScramClient::new(login.password()?);
                let reply = codec::sasl_initial_response(SCRAM_SHA_256, &client.client_first());
                write(server, &reply, counts).await?;
                scram = Some(client);
            }
            Backend::Auth(Auth::SaslContinue(server_first)) => {
                let mut client = scram
                    .take()
                    .ok_or_else(|| protocol("SASL challenge without a SASL exchange"))?;
                let server_first = server_first.to_vec();
                // PBKDF2 may take a while at a high iteration count: not on an async thread.
                let (client, reply) = tokio::task::spawn_blocking(move || {
                    let reply = client.client_final(&server_first);
                    (client, reply)
                })
                .await
                .map_err(|e| PgError::Login(format!("SCRAM computation failed: {e}")))?;
                let reply = reply.map_err(|e| PgError::Login(e.to_string()))?;
                write(server, &codec::sasl_response(&reply), counts).await?;
                scram = Some(client);
            }
            Backend::Auth(Auth::SaslFinal(server_final)) => {
                let client = scram
                    .as_ref()
                    .ok_or_else(|| protocol("SASL outcome without a SASL exchange"))?;
                client
                    .verify_server_final(server_final)
                    .map_err(|e| PgError::Login(e.to_string()))?;
                scram_verified = true;
            }
            Backend::Auth(Auth::Unsupported(code)) => {
                return Err(PgError::Login(format!(
                    "the server asks for authentication method {code} ({}); the worker speaks \
                     SCRAM-SHA-256, MD5 and password",
                    method_name(code)
                )))
            }
            Backend::KeyData(key) => server_key = Some(key),
            Backend::Ready(_) if !authenticated => {
                return Err(protocol("ReadyForQuery before AuthenticationOk"))
            }
            Backend::Ready(_) => {
                return Ok(Ready {
                    server_key,
                    greeting,
                    ready_for_query: msg.to_vec(),
                    leftover: buf,
                })
            }
            Backend::Error(fields) => return Err(PgError::TargetRefused(fields)),
            // The worker asked for 3.0 without options: nothing to negotiate.
            Backend::Other(Tag(b'v')) => {}
            Backend::Other(Tag(b'S' | b'N')) => greeting.extend_from_slice(&msg),
            Backend::Other(tag) => {
                return Err(PgError::TargetProtocol(CodecError::UnexpectedTag(tag)))
            }
        }
    }
}

/// Reads the next whole server message.
pub(super) async fn next_message<S: AsyncRead + Unpin>(
    server: &mut S,
    buf: &mut BytesMut,
) -> Result<BytesMut, PgError> {
    loop {
        match codec::check_message(buf, codec::MAX_BACKEND_STARTUP_LEN, codec::is_backend_tag) {
            Ok(Some(len)) => return Ok(buf.split_to(len)),
            Ok(None) => {}
            Err(e) => return Err(PgError::TargetProtocol(e)),
        }
        buf.reserve(16 * 1024);
        let n = server.read_buf(buf).await.map_err(PgError::Target)?;
        if n == 0 {
            return Err(PgError::Target(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the database server closed the connection during startup",
            )));
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(
    server: &mut S,
    bytes: &[u8],
    counts: &mut Counts,
) -> Result<(), PgError> {
    server.write_all(bytes).await.map_err(PgError::Target)?;
    counts.up += bytes.len() as u64;
    Ok(())
}

fn method_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests;
