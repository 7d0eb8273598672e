//! Messages both ways once the connection is up. Client → server: whole messages are framed
//! and checked; each `Query` and `Parse` is audited before it is passed on. Server → client:
//! bytes are copied through as they arrive (a result set is never held), while
//! [`Boundaries`] checks every header and knows where each message ends.
//!
//! A protocol error on either side ends the connection with an `ErrorResponse` written at a
//! message boundary of the server's output, so that the client can read it.

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::codec::{self, Boundaries, CodecError, Frontend};
use super::{Auditor, PgError};
use crate::relay::Counts;

/// Largest read at once in either direction.
const CHUNK: usize = 64 * 1024;
/// How long the server's current message may take to end before the client is told of a
/// client protocol error anyway (by closing without the error).
const BOUNDARY_GRACE: Duration = Duration::from_secs(5);

/// Relays until both sides have finished, or one side fails.
pub(super) async fn relay(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    client_buf: BytesMut,
    server_buf: BytesMut,
    audit: &Auditor,
    counts: &mut Counts,
) -> Result<(), PgError> {
    let (mut server_read, mut server_write) = tcp.split();
    let Counts { up, down } = counts;
    let (abort_tx, abort_rx) = mpsc::channel(1);
    let upstream = async {
        match upstream(recv, &mut server_write, client_buf, audit, up).await {
            Err(PgError::ClientProtocol(e)) => {
                // The downstream half writes the error at a boundary and ends the relay.
                let _ = abort_tx.send(e).await;
                std::future::pending().await
            }
            other => other,
        }
    };
    let downstream = downstream(&mut server_read, send, server_buf, abort_rx, down);
    tokio::try_join!(upstream, downstream).map(|_| ())
}

/// Client → server.
async fn upstream(
    recv: &mut RecvStream,
    server: &mut tokio::net::tcp::WriteHalf<'_>,
    mut buf: BytesMut,
    audit: &Auditor,
    up: &mut u64,
) -> Result<(), PgError> {
    loop {
        // Pass on every whole message at the front of the buffer, in one write.
        let mut pos = 0;
        let mut failure = None;
        let mut needed = 5;
        loop {
            let rest = &buf[pos..];
            match codec::check_message(rest, codec::MAX_FRONTEND_LEN, codec::is_frontend_tag) {
                Ok(Some(len)) => {
                    let msg = &rest[..len];
                    match codec::parse_frontend(msg) {
                        Ok(Frontend::Query { sql }) => audit.statement("postgres.query", None, sql),
                        Ok(Frontend::Parse { name, sql }) => {
                            audit.statement("postgres.parse", Some(name), sql)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                    pos += len;
                }
                Ok(None) => {
                    needed = header_len(rest).map_or(5, |len| len.max(5));
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if pos > 0 {
            server
                .write_all(&buf[..pos])
                .await
                .map_err(PgError::Target)?;
            *up += pos as u64;
            buf.advance(pos);
        }
        if let Some(e) = failure {
            return Err(PgError::ClientProtocol(e));
        }
        buf.reserve(
            needed
                .saturating_sub(buf.len())
                .clamp(CHUNK, codec::MAX_FRONTEND_LEN),
        );
        let n = recv.read_buf(&mut buf).await.map_err(PgError::Client)?;
        if n == 0 {
            if !buf.is_empty() {
                tracing::debug!(
                    bytes = buf.len(),
                    "client finished in the middle of a message"
                );
            }
            // The client finished its side: half-close towards the server.
            return server.shutdown().await.map_err(PgError::Target);
        }
    }
}

/// The total length announced by a message header at the start of `buf`, if it is there.
fn header_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    Some(len as usize + 1)
}

/// Server → client, until the server finishes; on a client protocol error (from the
/// upstream half), writes the client an `ErrorResponse` at the next boundary.
async fn downstream(
    server: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream,
    mut buf: BytesMut,
    mut abort_rx: mpsc::Receiver<CodecError>,
    down: &mut u64,
) -> Result<(), PgError> {
    let mut boundaries = Boundaries::new(codec::MAX_BACKEND_LEN, codec::is_backend_tag);
    let mut abort: Option<CodecError> = None;
    let mut upstream_running = true;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    loop {
        if !buf.is_empty() {
            match boundaries.scan(&buf, abort.is_some()) {
                Ok(n) => forward(send, &mut buf, n, down).await?,
                Err((n, e)) => {
                    forward(send, &mut buf, n, down).await?;
                    return tell(send, PgError::TargetProtocol(e), down).await;
                }
            }
        }
        if let Some(e) = abort.take_if(|_| boundaries.at_boundary()) {
            return tell(send, PgError::ClientProtocol(e), down).await;
        }
        tokio::select! {
            biased;
            e = abort_rx.recv(), if abort.is_none() && upstream_running => match e {
                Some(e) => {
                    abort = Some(e);
                    grace.as_mut().reset(tokio::time::Instant::now() + BOUNDARY_GRACE);
                }
                // The upstream half ended without an error: nothing will come.
                None => upstream_running = false,
            },
            _ = &mut grace, if abort.is_some() => {
                // The server is in the middle of a message: an error now would corrupt the
                // client's stream, so the connection ends without one (`Told` keeps the
                // caller from writing it).
                let cause = abort.take().map_or(PgError::ClientTimeout("no boundary"), PgError::ClientProtocol);
                let _ = send.finish();
                return Err(PgError::Told(Box::new(cause)));
            }
            n = server.read_buf(reserve(&mut buf)) => {
                let n = n.map_err(PgError::Target)?;
                if n == 0 {
                    if let Some(e) = abort.take() {
                        return tell(send, PgError::ClientProtocol(e), down).await;
                    }
                    // The server finished its side: finish the stream towards the client.
                    return send.finish().map_err(|e| PgError::Client(e.into()));
                }
            }
        }
    }
}

fn reserve(buf: &mut BytesMut) -> &mut BytesMut {
    buf.reserve(CHUNK);
    buf
}

/// Writes the first `n` bytes of `buf` to the client.
async fn forward(
    send: &mut SendStream,
    buf: &mut BytesMut,
    n: usize,
    down: &mut u64,
) -> Result<(), PgError> {
    if n == 0 {
        return Ok(());
    }
    send.write_chunk(buf.split_to(n).freeze())
        .await
        .map_err(|e| PgError::Client(e.into()))?;
    *down += n as u64;
    Ok(())
}

/// Writes the client the `ErrorResponse` for `error` and finishes the stream.
async fn tell(send: &mut SendStream, error: PgError, down: &mut u64) -> Result<(), PgError> {
    if let Some(bytes) = error.client_message() {
        send.write_all(&bytes)
            .await
            .map_err(|e| PgError::Client(e.into()))?;
        *down += bytes.len() as u64;
    }
    let _ = send.finish();
    Err(PgError::Told(Box::new(error)))
}
