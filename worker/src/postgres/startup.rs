//! The client's side of the startup: encryption requests answered `N`, then the
//! `StartupMessage` or a `CancelRequest`; and the greeting the client gets once the worker
//! has logged in to the server.

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncReadExt as _;
use tokio::time::timeout;

use super::auth::Ready;
use super::codec::{self, CancelKey, Startup, StartupPacket};
use super::PgError;
use crate::relay::Counts;

/// How long a client may take to send its startup packet (encryption requests included).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Encryption requests accepted before the startup message (libpq sends at most two).
const MAX_ENCRYPTION_REQUESTS: usize = 2;

/// What the client's first packets ask for.
pub(super) enum First {
    /// A session connection.
    Startup(Startup),
    /// Cancel the query running on a backend.
    Cancel(CancelKey),
}

/// Reads the client's startup, answering encryption requests with `N`. Returns what it asks
/// for and any bytes the client sent after it.
pub(super) async fn read_startup(
    send: &mut SendStream,
    recv: &mut RecvStream,
    counts: &mut Counts,
) -> Result<(First, BytesMut), PgError> {
    let read = async {
        let mut buf = BytesMut::with_capacity(1024);
        let mut refused = 0;
        loop {
            let len = loop {
                match codec::check_startup(&buf).map_err(PgError::ClientProtocol)? {
                    Some(len) => break len,
                    None => read_more(recv, &mut buf, codec::MAX_STARTUP_LEN).await?,
                }
            };
            let packet = codec::parse_startup(&buf[..len]).map_err(PgError::ClientProtocol)?;
            buf.advance(len);
            counts.up += len as u64;
            match packet {
                StartupPacket::SslRequest | StartupPacket::GssEncRequest
                    if refused < MAX_ENCRYPTION_REQUESTS =>
                {
                    refused += 1;
                    send.write_all(&[codec::ENCRYPTION_REFUSED])
                        .await
                        .map_err(|e| PgError::Client(e.into()))?;
                    counts.down += 1;
                }
                StartupPacket::Startup(startup) => return Ok((First::Startup(startup), buf)),
                StartupPacket::Cancel(key) => return Ok((First::Cancel(key), buf)),
                _ => {
                    return Err(PgError::ClientProtocol(codec::CodecError::Malformed {
                        what: "startup",
                        why: "too many encryption requests",
                    }))
                }
            }
        }
    };
    timeout(STARTUP_TIMEOUT, read)
        .await
        .map_err(|_| PgError::ClientTimeout("no complete startup packet within 30 s"))?
}

/// Reads more client bytes into `buf`, which may hold at most `max`.
async fn read_more(recv: &mut RecvStream, buf: &mut BytesMut, max: usize) -> Result<(), PgError> {
    buf.reserve(max.saturating_sub(buf.len()).min(64 * 1024));
    let n = recv.read_buf(buf).await.map_err(PgError::Client)?;
    if n == 0 {
        return Err(PgError::Client(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the client closed the connection during startup",
        )));
    }
    Ok(())
}

/// What the client gets once the worker is logged in: `NegotiateProtocolVersion` if it asked
/// for more than 3.0, `AuthenticationOk` (it was never asked for a password), the server's
/// parameters and notices, the cancel key of the worker's own, and `ReadyForQuery`.
/// `chosen` is the database user the session was opened for, `login_user` the one the worker
/// logged in as: the same, or the session's own role, a member of `chosen`.
pub(super) fn greeting(
    startup: &Startup,
    chosen: &str,
    login_user: &str,
    ready: &Ready,
    client_key: Option<CancelKey>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ready.greeting.len() + 64);
    let options: Vec<&str> = startup
        .params
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("_pq_."))
        .collect();
    if startup.minor > 0 || !options.is_empty() {
        out.extend_from_slice(&codec::negotiate_protocol_version(&options));
    }
    out.extend_from_slice(&codec::auth_ok());
    // The client named another user than the session was opened for (psql's -U, or the OS
    // user it sends by default): say so, rather than run as someone else without a word.
    if let Some(asked) = startup.param("user").filter(|u| *u != chosen) {
        let acting = if login_user == chosen {
            format!("database user \"{chosen}\",")
        } else {
            format!("its own database role \"{login_user}\", a member of \"{chosen}\",")
        };
        out.extend_from_slice(&codec::notice(
            &format!("this Postern session logs in as {acting} not \"{asked}\""),
            "the session's database user is chosen when it is opened: \
             postern psql TARGET --db-user USER",
        ));
    }
    out.extend_from_slice(&ready.greeting);
    if let Some(key) = client_key {
        out.extend_from_slice(&codec::backend_key_data(key));
    }
    out.extend_from_slice(&ready.ready_for_query);
    out
}
