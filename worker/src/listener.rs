//! The session listener (QUIC, ALPN `postern-session/1`): accepts client connections, admits
//! a session on its first stream (token signature, expiry, worker, client-key binding, then
//! activation at the controller) and hands every later stream to [`crate::relay`].
//!
//! Each connection runs in its own task: a bad client affects nobody else.

use std::sync::Arc;
use std::time::Duration;

use postern_proto::session::{close, RefusalCode, SessionHello, SessionReply};
use postern_proto::token::{self, SessionClaims, TokenError};
use postern_proto::{unix_now, PROTOCOL_VERSION};
use quinn::{Connection, ConnectionError, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::Instrument as _;

use crate::frames::{read_frame, write_frame, ReadFrameError};
use crate::state::{ActivationError, AttachError, Session, Shared};

/// How long a client may take to open its hello stream and send the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal may take to reach the client before the connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// How long connection tasks get to finish (and report) when the worker shuts down.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
const REASON_SHUTDOWN: &str = "worker shutting down";

/// A session refused at hello: the code and message the client is told.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Refusal {
    code: RefusalCode,
    message: String,
}

impl Refusal {
    fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Why a hello did not lead to a session.
#[derive(Debug, thiserror::Error)]
enum HelloError {
    /// The session is refused; the client is told why (client side, or the controller's
    /// refusal).
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// The client went away or broke the stream (client side).
    #[error("client gone: {0}")]
    Gone(String),
}

/// Concurrent connections (streams) a session may open at first, and at most: the allowance
/// grows as they are used.
pub(crate) const INITIAL_STREAMS: u32 = 128;
pub(crate) const MAX_STREAMS: u32 = 10_000;

/// Accepts session connections until `stop`, then ends every session and closes the
/// endpoint.
///
/// `per_path`: the listener's server config when clients arrive over real UDP, so each
/// connection's packet size can follow its own route (`None` behind the outbound relay,
/// whose addresses are not routes).
/// `lane`: which of the worker's session lanes this endpoint is, when it has several
/// (told to each client in its acceptance).
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    per_path: Option<Arc<quinn::ServerConfig>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    lane: Option<u32>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let span = tracing::info_span!("session_conn", remote = %incoming.remote_address());
                    conns.spawn(handle(incoming, per_path.clone(), shared.clone(), lane).instrument(span));
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    shared.end_all(close::SHUTDOWN, REASON_SHUTDOWN, Some(REASON_SHUTDOWN));
    endpoint.close(
        VarInt::from_u32(close::SHUTDOWN),
        REASON_SHUTDOWN.as_bytes(),
    );
    // Connection tasks see their connection close and report what they carried.
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = timeout(SHUTDOWN_DRAIN, drain).await;
    conns.abort_all();
    let _ = timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// One client connection, from handshake to close.
async fn handle(
    incoming: quinn::Incoming,
    per_path: Option<Arc<quinn::ServerConfig>>,
    shared: Arc<Shared>,
    lane: Option<u32>,
) {
    let connecting = match per_path {
        Some(base) => {
            let mut config = (*base).clone();
            let transport = crate::tls::session_transport_for(incoming.remote_address());
            config.transport_config(Arc::new(transport));
            incoming.accept_with(Arc::new(config))
        }
        None => incoming.accept(),
    };
    let conn = match connecting {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!("session handshake failed: {e}");
            return;
        }
    };
    let Some(spki) = crate::tls::client_spki(&conn) else {
        // The verifier makes a certificate mandatory; this is only a safety net.
        conn.close(VarInt::from_u32(close::PROTOCOL), b"no client certificate");
        return;
    };
    let session = match admit(&conn, &spki, &shared, lane).await {
        Ok(session) => session,
        Err(HelloError::Refused(refusal)) => {
            tracing::info!(code = ?refusal.code, "session refused: {}", refusal.message);
            return;
        }
        Err(HelloError::Gone(e)) => {
            tracing::debug!("client left during hello: {e}");
            // A no-op if the connection is already closed.
            conn.close(
                VarInt::from_u32(close::PROTOCOL),
                b"incomplete session hello",
            );
            return;
        }
    };
    serve_streams(&conn, &session, &shared).await;
}

/// Reads the hello, checks the token and activates the session; on refusal, tells the
/// client and closes the connection.
async fn admit(
    conn: &Connection,
    spki: &[u8],
    shared: &Arc<Shared>,
    lane: Option<u32>,
) -> Result<Arc<Session>, HelloError> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return Err(HelloError::Gone(e.to_string())),
        Err(_) => {
            conn.close(
                VarInt::from_u32(close::REFUSED),
                b"no session hello within 10 s",
            );
            return Err(HelloError::Gone("no hello stream within 10 s".into()));
        }
    };
    let outcome =
        match tokio::time::timeout_at(deadline, read_frame::<SessionHello>(&mut recv)).await {
            Ok(Ok(hello)) => check_hello(conn, spki, shared, hello).await,
            Ok(Err(ReadFrameError::Invalid(e))) => Err(HelloError::Refused(Refusal::new(
                RefusalCode::Malformed,
                format!("malformed session hello: {e}"),
            ))),
            Ok(Err(e)) => Err(HelloError::Gone(e.to_string())),
            Err(_) => Err(HelloError::Refused(Refusal::new(
                RefusalCode::Malformed,
                "no complete session hello within 10 s",
            ))),
        };
    match outcome {
        Ok((session, claims)) => {
            let reply = SessionReply::Accepted {
                session_id: claims.sid.clone(),
                expires_at: claims.exp,
                connection_limit: claims.connection_limit,
                lane,
            };
            if let Err(e) = write_frame(&mut send, &reply).await {
                // The connection's close is noticed by the stream loop, which detaches it.
                tracing::debug!("could not send the session acceptance: {e}");
            }
            let _ = send.finish();
            tracing::info!(session = %claims.sid, user = %claims.sub, target = %claims.target, "session accepted");
            Ok(session)
        }
        Err(HelloError::Refused(refusal)) => {
            let reply = SessionReply::Refused {
                code: refusal.code,
                message: refusal.message.clone(),
            };
            if write_frame(&mut send, &reply).await.is_ok() && send.finish().is_ok() {
                // Closing at once could discard the reply: wait until the client has it.
                let _ = timeout(REFUSAL_LINGER, send.stopped()).await;
            }
            conn.close(VarInt::from_u32(close::REFUSED), refusal.message.as_bytes());
            Err(HelloError::Refused(refusal))
        }
        Err(gone) => Err(gone),
    }
}

/// Checks the hello and its token, then activates the session (unless this worker already
/// carries it) and attaches `conn` to it.
async fn check_hello(
    conn: &Connection,
    spki: &[u8],
    shared: &Arc<Shared>,
    hello: SessionHello,
) -> Result<(Arc<Session>, SessionClaims), HelloError> {
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            RefusalCode::Version,
            format!(
                "protocol version {} is not supported; this worker speaks version {PROTOCOL_VERSION}",
                hello.version
            ),
        )
        .into());
    }
    let claims = verify_token(shared, &hello.token, spki)?;
    let grant_pushed = hello.grant_pushed;
    // A further connection of a session this worker carries (a client reconnecting) joins
    // it without asking the controller again. A session authorized moments ago usually has
    // its grant here already, pushed by the controller at authorization: no round trip.
    let mut activated = None;
    let mut asked = false;
    let session = loop {
        match shared.attach(&claims, conn, activated.take()) {
            Ok(session) => break session,
            Err(AttachError::NotActive) if !asked => {
                asked = true;
                let grant = match shared.take_ready(&claims.sid, grant_pushed).await {
                    Some(grant) => grant,
                    None => shared.activate(&claims.sid).await.map_err(|e| match e {
                        ActivationError::Refused(reason) => {
                            Refusal::new(RefusalCode::Revoked, reason)
                        }
                        ActivationError::Unavailable(why) => Refusal::new(
                            RefusalCode::ControllerUnavailable,
                            format!("cannot activate the session: {why}"),
                        ),
                    })?,
                };
                activated = Some(grant);
            }
            Err(e) => return Err(Refusal::new(RefusalCode::Revoked, e.to_string()).into()),
        }
    };
    Ok((session, claims))
}

/// Verifies the token against the controller's keys and this connection's client key.
fn verify_token(shared: &Shared, token_text: &str, spki: &[u8]) -> Result<SessionClaims, Refusal> {
    let Some(keys) = shared.keys() else {
        return Err(Refusal::new(
            RefusalCode::ControllerUnavailable,
            "worker has not reached its controller yet",
        ));
    };
    let now = unix_now();
    let mut verified = Err(TokenError::BadSignature);
    for key in &keys.keys {
        verified = token::verify(token_text, key, now);
        if !matches!(verified, Err(TokenError::BadSignature)) {
            break;
        }
    }
    let claims = verified.map_err(|e| match e {
        TokenError::BadSignature => Refusal::new(RefusalCode::BadSignature, e.to_string()),
        TokenError::Expired(_) => Refusal::new(RefusalCode::Expired, e.to_string()),
        TokenError::KeyMismatch => Refusal::new(RefusalCode::KeyMismatch, e.to_string()),
        other => Refusal::new(RefusalCode::Malformed, other.to_string()),
    })?;
    if claims.iss != keys.issuer {
        return Err(Refusal::new(
            RefusalCode::BadSignature,
            format!(
                "session token was issued by {:?}, not by this worker's controller ({:?})",
                claims.iss, keys.issuer
            ),
        ));
    }
    // `verify` tolerates clock skew; the session itself ends at `exp` sharp.
    if claims.exp <= now {
        return Err(Refusal::new(RefusalCode::Expired, "session expired"));
    }
    if claims.worker.as_str() != shared.name() {
        return Err(Refusal::new(
            RefusalCode::WrongWorker,
            format!(
                "session token is for worker {}, not for this worker ({})",
                claims.worker,
                shared.name()
            ),
        ));
    }
    token::check_binding(&claims, spki).map_err(|_| {
        Refusal::new(
            RefusalCode::KeyMismatch,
            "session token is bound to a different client key",
        )
    })?;
    Ok(claims)
}

/// Serves the session's proxied connections until the QUIC connection closes, then
/// detaches it from the session.
async fn serve_streams(conn: &Connection, session: &Arc<Session>, shared: &Arc<Shared>) {
    let mut streams = JoinSet::new();
    let mut allowed = INITIAL_STREAMS;
    let reason = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(crate::relay::serve_stream(
                        conn.clone(),
                        session.clone(),
                        shared.clone(),
                        send,
                        recv,
                    ));
                    // Half the allowance in use: allow four times as many, well before the
                    // client has to wait for it.
                    if streams.len() * 2 > allowed as usize && allowed < MAX_STREAMS {
                        allowed = (allowed * 4).min(MAX_STREAMS);
                        conn.set_max_concurrent_bi_streams(VarInt::from_u32(allowed));
                    }
                }
                Err(e) => break describe_close(&e),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    };
    // Relays watch the connection and end promptly now that it is closed.
    while streams.join_next().await.is_some() {}
    shared.detach(session, conn, &reason);
}

/// Why a session connection closed, for the record.
pub(crate) fn describe_close(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(close::CLIENT_DONE) =>
        {
            "client closed".into()
        }
        ConnectionError::ApplicationClosed(c) => format!(
            "client closed with code {}: {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        ConnectionError::TimedOut => "client timed out".into(),
        ConnectionError::Reset => "client reset the connection".into(),
        ConnectionError::LocallyClosed => "closed by the worker".into(),
        other => format!("connection lost: {other}"),
    }
}
