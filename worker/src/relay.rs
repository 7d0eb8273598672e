//! One proxied TCP connection: a QUIC bidirectional stream headed by `ConnOpen`, answered by
//! `ConnReply`, then bytes both ways until both sides have finished. Half-close travels as
//! stream finish one way and TCP shutdown the other. A failure ends this stream only (it is
//! reset), never the session.

use std::sync::Arc;
use std::time::Duration;

use postern_proto::session::{ConnOpen, ConnReply, RefusalCode};
use postern_proto::PROTOCOL_VERSION;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::frames::{read_frame, write_frame, ReadFrameError};
use crate::pump::{self, PumpError};
use crate::state::{OpenRefusal, Session, Shared, StreamGuard};

/// How long a client may take to send `ConnOpen`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialing the target may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Stream error code (reset / stop) when a relay fails on either side.
const STREAM_ABORTED: VarInt = VarInt::from_u32(1);

/// Why a relay ended early, tagged with the side that failed.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    /// Reading from or writing to the client's stream failed.
    #[error("client error: {0}")]
    Client(std::io::Error),
    /// Reading from or writing to the target failed.
    #[error("target error: {0}")]
    Target(std::io::Error),
}

/// Bytes moved so far: up is client → target.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) up: u64,
    pub(crate) down: u64,
}

/// Serves one stream of a session connection.
pub(crate) async fn serve_stream(
    conn: Connection,
    session: Arc<Session>,
    shared: Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let opened = tokio::select! {
        opened = open(&session, &shared, &mut send, &mut recv) => opened,
        _ = conn.closed() => None,
    };
    let Some((upstream, guard)) = opened else {
        return;
    };
    let mut tcp = match upstream {
        Upstream::Tcp(tcp) => tcp,
        Upstream::Ssh => return crate::ssh::serve(conn, session, shared, send, recv, guard).await,
    };
    let mut counts = Counts::default();
    let outcome = tokio::select! {
        r = proxy(&session, &shared, &mut tcp, &mut send, &mut recv, &mut counts) => r,
        e = conn.closed() => Err(crate::listener::describe_close(&e)),
    };
    let reason = match outcome {
        Ok(reason) => reason,
        Err(error) => {
            let reason = why_ended(&session, &conn, error);
            // Dropping a send stream finishes it cleanly; a failed relay must not look
            // like a clean end to the client.
            let _ = send.reset(STREAM_ABORTED);
            let _ = recv.stop(STREAM_ABORTED);
            reason
        }
    };
    drop(tcp);
    shared.connection_closed(&session, guard, counts.up, counts.down, reason);
}

/// Why a connection of `session` on `conn` ended: the session's or the connection's end if
/// either came, whichever of the relay or the connection noticed first; else `otherwise`.
pub(crate) fn why_ended(session: &Session, conn: &Connection, otherwise: String) -> String {
    match (session.ended(), conn.close_reason()) {
        (Some(ended), _) => format!("session ended: {ended}"),
        (None, Some(closed)) => crate::listener::describe_close(&closed),
        (None, None) => otherwise,
    }
}

/// Where an opened stream's bytes go.
enum Upstream {
    /// Raw bytes to and from the target.
    Tcp(TcpStream),
    /// The stream carries SSH, which the worker itself terminates ([`crate::ssh`]).
    Ssh,
}

/// Reads `ConnOpen`, checks the session's limit, dials the target and answers. Refusals
/// are written to the client here; `None` means there is nothing to relay.
async fn open(
    session: &Arc<Session>,
    shared: &Shared,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Option<(Upstream, StreamGuard)> {
    let header = match timeout(OPEN_TIMEOUT, read_frame::<ConnOpen>(recv)).await {
        Ok(Ok(header)) => header,
        Ok(Err(ReadFrameError::Invalid(e))) => {
            refuse(
                send,
                RefusalCode::Malformed,
                format!("malformed connection header: {e}"),
            )
            .await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!("client left before opening a connection: {e}");
            return None;
        }
        Err(_) => {
            refuse(
                send,
                RefusalCode::Malformed,
                "no connection header within 10 s",
            )
            .await;
            return None;
        }
    };
    if header.version != PROTOCOL_VERSION {
        let message = format!(
            "protocol version {} is not supported; this worker speaks version {PROTOCOL_VERSION}",
            header.version
        );
        refuse(send, RefusalCode::Version, message).await;
        return None;
    }
    let guard = match session.open_stream() {
        Ok(guard) => guard,
        Err(e @ OpenRefusal::Limit(_)) => {
            refuse(send, RefusalCode::ConnectionLimit, e.to_string()).await;
            return None;
        }
        Err(e @ OpenRefusal::Ended(_)) => {
            refuse(send, RefusalCode::Revoked, e.to_string()).await;
            return None;
        }
    };
    if session.claims.protocol == "ssh" {
        // The worker logs in to the target once the engineer's SSH client has authenticated.
        if let Err(e) = write_frame(send, &ConnReply::Ok).await {
            tracing::debug!("client left before the connection opened: {e}");
            return None;
        }
        return Some((Upstream::Ssh, guard));
    }
    let endpoint = &session.endpoint;
    let failure = match timeout(DIAL_TIMEOUT, dial(endpoint.as_str())).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 10 s".to_owned()),
    };
    let tcp = match failure {
        Ok(tcp) => tcp,
        Err(why) => {
            guard.release_attempt();
            // Audited as the closed connections are: an engineer who could not reach the
            // target is part of what happened.
            shared.audit(
                &session.id,
                "connection.target_failed",
                &serde_json::json!({"endpoint": endpoint, "error": why}),
            );
            let message = format!("cannot reach target {endpoint}: {why}");
            refuse(send, RefusalCode::TargetUnreachable, message).await;
            return None;
        }
    };
    if let Err(e) = write_frame(send, &ConnReply::Ok).await {
        tracing::debug!("client left before the connection opened: {e}");
        return None;
    }
    Some((Upstream::Tcp(tcp), guard))
}

/// Connects to `endpoint` (`host:port`; each address in turn), with `TCP_NODELAY` set.
///
/// A connection to a target on this host is established by the time `connect()` returns
/// (the kernel runs the loopback handshake within the call, though a non-blocking socket
/// still answers `EINPROGRESS`): it is used at once instead of after a turn of the event
/// loop to learn that it is writable, which cost each new connection tens of microseconds.
pub(crate) async fn dial(endpoint: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(endpoint).await? {
        match dial_addr(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{endpoint} resolves to no address"),
        )
    }))
}

async fn dial_addr(addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let tcp = TcpStream::from_std(socket.into())?;
    // Established already (a local target), or once the socket turns writable.
    if tcp.peer_addr().is_err() {
        tcp.writable().await?;
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
        tcp.peer_addr()?;
    }
    Ok(tcp)
}

/// Tells the client why its connection was refused and finishes the stream.
async fn refuse(send: &mut SendStream, code: RefusalCode, message: impl Into<String>) {
    let message = message.into();
    tracing::info!(?code, "connection refused: {message}");
    if write_frame(send, &ConnReply::Refused { code, message })
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

/// Runs the session's protocol on an opened TCP connection: `Ok` with why it ended (the
/// client was told all it needs), `Err` when the stream must be reset.
async fn proxy(
    session: &Arc<Session>,
    shared: &Arc<Shared>,
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counts: &mut Counts,
) -> Result<String, String> {
    match session.claims.protocol.as_str() {
        "postgres" => crate::postgres::serve(session, shared, tcp, send, recv, counts).await,
        _ => relay(tcp, send, recv, counts)
            .await
            .map(|()| "closed".to_owned())
            .map_err(|e| e.to_string()),
    }
}

/// Moves bytes both ways until both directions have finished, or one fails.
async fn relay(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    counts: &mut Counts,
) -> Result<(), RelayError> {
    let (mut target_read, mut target_write) = tcp.split();
    let Counts { up, down } = counts;
    let upstream = async {
        pump::out_of_stream(recv, &mut target_write, up)
            .await
            .map_err(|e| match e {
                PumpError::Source(e) => RelayError::Client(e),
                PumpError::Sink(e) => RelayError::Target(e),
            })?;
        // The client finished its side: half-close towards the target.
        target_write.shutdown().await.map_err(RelayError::Target)
    };
    let downstream = async {
        pump::into_stream(&mut target_read, send, down)
            .await
            .map_err(|e| match e {
                PumpError::Source(e) => RelayError::Target(e),
                PumpError::Sink(e) => RelayError::Client(e),
            })?;
        // The target finished its side: finish the stream towards the client.
        send.finish().map_err(|e| RelayError::Client(e.into()))
    };
    tokio::try_join!(upstream, downstream).map(|_| ())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[tokio::test]
    async fn dial_connects_by_address_and_by_name_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut b = [0u8; 5];
                s.read_exact(&mut b).await.expect("read");
                s.write_all(&b).await.expect("echo");
            }
        });
        for endpoint in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let mut tcp = dial(&endpoint).await.expect("dial");
            assert!(
                tcp.nodelay().expect("nodelay"),
                "TCP_NODELAY towards {endpoint}"
            );
            tcp.write_all(b"hello").await.expect("write");
            let mut b = [0u8; 5];
            tcp.read_exact(&mut b).await.expect("read");
            assert_eq!(&b, b"hello");
        }
        server.await.expect("server");
    }

    #[tokio::test]
    async fn dial_reports_a_refused_port_and_an_unknown_name() {
        // A port nothing listens on: bound, then closed.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = dial(&format!("127.0.0.1:{port}"))
            .await
            .expect_err("nothing listens");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(dial("no-such-host.invalid:80").await.is_err());
        assert!(dial("not an address").await.is_err());
    }
}
