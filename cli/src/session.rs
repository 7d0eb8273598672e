//! The session data path: the client side of ALPN `postern-session/1`.
//!
//! [`new_client_key`] makes the ephemeral key whose SPKI the authorization is bound to;
//! [`open_session`] dials the worker with it (mutual TLS 1.3 over QUIC) and presents the
//! token; [`Session::listen`] serves a local TCP port where every accepted connection becomes
//! one bidirectional QUIC stream. Nothing here calls the controller: once the session is open,
//! each new connection costs one stream open and one round trip to the worker.
//!
//! Tests and the benchmark drive this module in-process, without the `connect` command.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use postern_controller::api::types::Authorization;
use postern_proto::session::{close, ConnOpen, ConnReply, RefusalCode, SessionHello, SessionReply};
use postern_proto::{frame, ALPN_SESSION, PROTOCOL_VERSION};
use postern_worker::pump::{self, PumpError};

/// How long to wait for the worker's QUIC handshake and hello reply.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean close may wait for the worker to acknowledge.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a session could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The ephemeral key or its certificate could not be made.
    #[error("cannot generate the session key: {0}")]
    Key(#[from] rcgen::Error),
    /// The controller's authorization cannot be used (bad CA, address, server name).
    #[error("the session authorization is unusable: {0}")]
    BadAuthorization(String),
    /// TLS could not be configured.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// No local UDP socket.
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[source] io::Error),
    /// The worker could not be reached or the handshake failed.
    #[error("cannot reach worker {worker} at {addr}: {detail}")]
    Unreachable {
        /// Worker name.
        worker: String,
        /// Address dialled.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The worker refused the session.
    #[error("session refused by worker: {message}")]
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// The worker's explanation.
        message: String,
    },
    /// The worker refused one proxied connection.
    #[error("connection refused by worker: {message}")]
    ConnRefused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// The worker's explanation.
        message: String,
    },
    /// The session connection is gone.
    #[error("session ended: {0}")]
    Ended(SessionEnd),
    /// The worker broke the protocol.
    #[error("worker protocol error: {0}")]
    Protocol(String),
}

/// The ephemeral key of one session and its self-signed certificate.
pub struct ClientKey {
    key: rcgen::KeyPair,
    cert: CertificateDer<'static>,
    spki_der: Vec<u8>,
    spki_b64: String,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("spki", &self.spki_b64)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// base64url (no padding) of the DER SubjectPublicKeyInfo: the `client_spki` of
    /// [`postern_controller::api::types::AuthorizeRequest`].
    pub fn spki_b64(&self) -> &str {
        &self.spki_b64
    }

    /// The thumbprint a token bound to this key carries (`cnf`).
    pub fn thumbprint(&self) -> String {
        postern_proto::token::spki_thumbprint(&self.spki_der)
    }

    /// The private key in PKCS#8 PEM, as OpenSSH reads it (`ssh -i`): `postern ssh`
    /// authenticates its SSH hop to the worker with the session's own key.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// Makes a fresh P-256 key and a self-signed certificate for it.
pub fn new_client_key() -> Result<ClientKey, SessionError> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["postern-client".to_owned()])?
        .self_signed(&key)?
        .der()
        .clone();
    // The worker hashes the SPKI of the certificate it sees; rcgen writes the certificate's
    // SPKI with this same encoder, so the bytes are identical.
    let spki_der = rcgen::PublicKeyData::subject_public_key_info(&key);
    let spki_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&spki_der);
    Ok(ClientKey {
        key,
        cert,
        spki_der,
        spki_b64,
    })
}

/// How a session connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The application close code (see [`postern_proto::session::close`]), when the peer
    /// closed it deliberately.
    pub code: Option<u32>,
    /// Why, for a person.
    pub reason: String,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl SessionEnd {
    fn from_error(e: &ConnectionError) -> SessionEnd {
        match e {
            ConnectionError::ApplicationClosed(ac) => {
                let code = u32::try_from(ac.error_code.into_inner()).ok();
                let text = String::from_utf8_lossy(&ac.reason).trim().to_owned();
                let reason = if !text.is_empty() {
                    text
                } else {
                    match code {
                        Some(close::EXPIRED) => "the session expired".into(),
                        Some(close::CANCELLED) => "the session was cancelled".into(),
                        Some(close::SHUTDOWN) => "the worker is shutting down".into(),
                        Some(close::REFUSED) => "the session was refused".into(),
                        Some(close::CLIENT_DONE) => "client done".into(),
                        _ => format!("closed by the worker (code {})", ac.error_code),
                    }
                };
                SessionEnd { code, reason }
            }
            ConnectionError::TimedOut => SessionEnd {
                code: None,
                reason: "the worker stopped answering (timed out)".into(),
            },
            ConnectionError::Reset => SessionEnd {
                code: None,
                reason: "the worker reset the connection (restarted?)".into(),
            },
            ConnectionError::LocallyClosed => SessionEnd {
                code: Some(close::CLIENT_DONE),
                reason: "client done".into(),
            },
            other => SessionEnd {
                code: None,
                reason: other.to_string(),
            },
        }
    }
}

/// An open session: the QUIC connection to the worker, accepted by it.
#[derive(Debug)]
pub struct Session {
    endpoint: Endpoint,
    conn: Connection,
    // The hello stream stays open for the session's life: the worker may use it, and
    // dropping it would finish/stop it.
    _hello: (SendStream, RecvStream),
    session_id: String,
    expires_at: i64,
    connection_limit: Option<u32>,
    /// The worker's session lane this connection landed on, if it has several.
    lane: Option<u32>,
    /// Further connections of the session on threads of their own ([`Session::add_lanes`]),
    /// as they come up: new local connections are spread over these and this one.
    lanes: Arc<std::sync::Mutex<Vec<LaneHandle>>>,
}

/// One further connection of a session, served on a thread of its own.
#[derive(Debug)]
struct LaneHandle {
    conn: Connection,
    /// Local connections for this lane to relay.
    relay: tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>,
}

/// How often a lane dials again when it lands on a worker lane the session uses already.
const LANE_DIAL_ATTEMPTS: usize = 6;

/// Dials the worker named in `auth`, proves possession of `key`, and presents the token.
pub async fn open_session(auth: &Authorization, key: &ClientKey) -> Result<Session, SessionError> {
    open_session_on(None, auth, key).await
}

/// Where a target's worker answered last time: the next session to that target dials it
/// while the controller authorizes, so the QUIC handshake overlaps the authorization. Only
/// the hello needs the new token; an authorization naming another worker (or address, or
/// CA) drops the early connection and dials the right one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct WorkerHint {
    /// The worker's session address (`host:port`).
    pub addr: String,
    /// The TLS server name it answers to.
    pub server_name: String,
    /// The CA its certificate chains to (PEM).
    pub ca_pem: String,
}

impl WorkerHint {
    /// The worker `auth` names.
    pub fn of(auth: &Authorization) -> Self {
        WorkerHint {
            addr: auth.worker.addr.clone(),
            server_name: auth.worker.server_name.clone(),
            ca_pem: auth.ca_pem.clone(),
        }
    }

    fn names_worker_of(&self, auth: &Authorization) -> bool {
        self.addr == auth.worker.addr
            && self.server_name == auth.worker.server_name
            && self.ca_pem == auth.ca_pem
    }
}

/// What a session can set up before its authorization arrives: the QUIC endpoint (~0.3 ms
/// of socket set-up) and, given a [`WorkerHint`], a handshake with the likely worker.
#[derive(Debug)]
pub struct Prepared {
    endpoint: Endpoint,
    early: Option<(WorkerHint, quinn::Connecting)>,
}

/// Prepares a session to an IPv4 worker with `key` (see [`Prepared`]); `None` if no socket
/// can be made now ([`open_session_on`] then makes one itself). A hint whose address is not
/// an IPv4 literal is not dialled early.
pub fn prepare(hint: Option<&WorkerHint>, key: &ClientKey) -> Option<Prepared> {
    let endpoint = postern_worker::udp::endpoint((Ipv4Addr::UNSPECIFIED, 0).into(), None).ok()?;
    let early = hint.and_then(|h| {
        let addr = h
            .addr
            .parse::<SocketAddr>()
            .ok()
            .filter(SocketAddr::is_ipv4)?;
        let connecting = dial(&endpoint, addr, &h.server_name, &h.ca_pem, key).ok()?;
        Some((h.clone(), connecting))
    });
    Some(Prepared { endpoint, early })
}

/// Starts the QUIC handshake with the worker at `addr` as `key`'s holder.
fn dial(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    key: &ClientKey,
) -> Result<quinn::Connecting, SessionError> {
    let mut config = client_config(ca_pem, key)?;
    config.transport_config(Arc::new(worker_transport(addr)));
    endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| SessionError::BadAuthorization(format!("cannot dial the worker: {e}")))
}

/// [`open_session`] with what [`prepare`] set up, where it suits the authorization.
pub async fn open_session_on(
    prepared: Option<Prepared>,
    auth: &Authorization,
    key: &ClientKey,
) -> Result<Session, SessionError> {
    let unreachable = |detail: String| SessionError::Unreachable {
        worker: auth.worker.name.clone(),
        addr: auth.worker.addr.clone(),
        detail,
    };
    let addr = match auth.worker.addr.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => tokio::net::lookup_host(&auth.worker.addr)
            .await
            .map_err(|e| unreachable(format!("cannot resolve the address: {e}")))?
            .next()
            .ok_or_else(|| unreachable("the address resolves to nothing".into()))?,
    };
    let (endpoint, early) = match prepared {
        Some(p)
            if p.endpoint
                .local_addr()
                .is_ok_and(|a| a.is_ipv4() == addr.is_ipv4()) =>
        {
            (p.endpoint, p.early)
        }
        _ => {
            let bind: SocketAddr = if addr.is_ipv6() {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let endpoint =
                postern_worker::udp::endpoint(bind, None).map_err(SessionError::Socket)?;
            (endpoint, None)
        }
    };
    // An early connection to another worker is dropped (and so closed).
    let connecting = match early {
        Some((hint, connecting)) if hint.names_worker_of(auth) => connecting,
        _ => dial(&endpoint, addr, &auth.worker.server_name, &auth.ca_pem, key)?,
    };

    let handshake = async {
        let conn = connecting
            .await
            .map_err(|e| unreachable(connection_error_text(&e)))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| unreachable(connection_error_text(&e)))?;
        let hello = SessionHello {
            grant_pushed: auth.grant_pushed,
            version: PROTOCOL_VERSION,
            token: auth.token.clone(),
        };
        write_frame(&mut send, &hello, &conn).await?;
        let reply: SessionReply = read_frame(&mut recv, &conn).await.map_err(|e| match e {
            // A refusing worker may close the connection before its reply frame arrives;
            // its close reason says the same thing.
            SessionError::Ended(end) if end.code.is_some() => SessionError::Refused {
                code: RefusalCode::Internal,
                message: end.reason,
            },
            other => other,
        })?;
        Ok::<_, SessionError>((conn, send, recv, reply))
    };
    let (conn, send, recv, reply) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", HANDSHAKE_TIMEOUT.as_secs())))??;

    match reply {
        SessionReply::Accepted {
            session_id,
            expires_at,
            connection_limit,
            lane,
        } => Ok(Session {
            endpoint,
            conn,
            _hello: (send, recv),
            session_id: session_id.0,
            expires_at,
            connection_limit,
            lane,
            lanes: Arc::default(),
        }),
        SessionReply::Refused { code, message } => {
            conn.close(VarInt::from_u32(close::CLIENT_DONE), b"refused");
            Err(SessionError::Refused { code, message })
        }
        other => {
            conn.close(VarInt::from_u32(close::PROTOCOL), b"unexpected reply");
            Err(SessionError::Protocol(format!(
                "unexpected reply to the hello: {other:?}"
            )))
        }
    }
}

impl Session {
    /// The session id the worker confirmed.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// When the worker will end the session (Unix seconds).
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// Connections allowed in the session, if limited.
    pub fn connection_limit(&self) -> Option<u32> {
        self.connection_limit
    }

    /// The worker's session lane this connection landed on, if the worker has several.
    pub fn lane(&self) -> Option<u32> {
        self.lane
    }

    /// How many further connections ([`Session::add_lanes`]) are up and taking local
    /// connections.
    pub fn lanes_up(&self) -> usize {
        lock(&self.lanes)
            .iter()
            .filter(|l| !l.relay.is_closed())
            .count()
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Opens one proxied connection to the target: a stream whose bytes reach the target
    /// once this returns.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), SessionError> {
        open_stream(&self.conn).await
    }

    /// Binds `127.0.0.1:port` (0 for any free port) and serves it: see [`Session::serve`].
    pub async fn listen(&self, port: u16) -> io::Result<(SocketAddr, JoinHandle<()>)> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let addr = listener.local_addr()?;
        Ok((addr, self.serve(listener)))
    }

    /// Proxies every connection accepted on `listener` through the session, until the
    /// session ends. A failing connection affects only itself.
    pub fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(accept_loop(listener, self.conn.clone(), self.lanes.clone()))
    }

    /// Spreads the session over up to `more` further connections ("lanes"), each dialled
    /// from a socket and thread of its own, so that a worker with several session lanes
    /// (`session_lanes`) serves the session's connections on several CPUs at both ends.
    /// Returns at once; each lane joins [`Session::serve`]'s rotation when its connection is
    /// up. A lane that lands on a worker lane the session already uses dials again (a few
    /// times); against a worker with one lane, none is kept.
    pub fn add_lanes(&self, auth: &Authorization, key: &Arc<ClientKey>, more: usize) {
        let Some(first) = self.lane else {
            return; // the worker has one lane: more connections would share its thread
        };
        let taken = Arc::new(std::sync::Mutex::new(vec![first]));
        for index in 1..=more {
            let (auth, key, taken, lanes) =
                (auth.clone(), key.clone(), taken.clone(), self.lanes.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("postern-lane-{index}"))
                .spawn(move || run_lane(auth, key, taken, lanes));
            if let Err(e) = spawned {
                tracing::debug!("cannot start session lane {index}: {e}");
            }
        }
    }

    /// Waits until the session connection ends, and says why.
    pub async fn closed(&self) -> SessionEnd {
        SessionEnd::from_error(&self.conn.closed().await)
    }

    /// Ends the session cleanly (`CLIENT_DONE`) and waits briefly for the worker to hear it.
    pub async fn close(self) {
        for lane in lock(&self.lanes).iter() {
            lane.conn
                .close(VarInt::from_u32(close::CLIENT_DONE), b"client done");
        }
        self.conn
            .close(VarInt::from_u32(close::CLIENT_DONE), b"client done");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// A lane of a session (see [`Session::add_lanes`]): a one-thread runtime whose connection
/// to the worker, once on a worker lane of its own, relays the local connections handed to
/// it until the session ends.
fn run_lane(
    auth: Authorization,
    key: Arc<ClientKey>,
    taken: Arc<std::sync::Mutex<Vec<u32>>>,
    lanes: Arc<std::sync::Mutex<Vec<LaneHandle>>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::debug!("cannot start a session lane: {e}"),
    };
    runtime.block_on(async move {
        let mut session = None;
        for _ in 0..LANE_DIAL_ATTEMPTS {
            match open_session_on(None, &auth, &key).await {
                Ok(s) => {
                    let fresh = s.lane.is_some_and(|l| {
                        let mut taken = lock(&taken);
                        let fresh = !taken.contains(&l);
                        if fresh {
                            taken.push(l);
                        }
                        fresh
                    });
                    if fresh {
                        session = Some(s);
                        break;
                    }
                    s.close().await;
                }
                Err(e) => return tracing::debug!("a session lane could not connect: {e}"),
            }
        }
        let Some(session) = session else {
            return tracing::debug!("no free worker lane for a session lane");
        };
        let (relay, mut local) = tokio::sync::mpsc::unbounded_channel();
        lock(&lanes).push(LaneHandle {
            conn: session.conn.clone(),
            relay,
        });
        let mut relays = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                tcp = local.recv() => match tcp.map(TcpStream::from_std) {
                    Some(Ok(tcp)) => {
                        let conn = session.conn.clone();
                        relays.spawn(async move { report(proxy_one(&conn, tcp).await) });
                    }
                    Some(Err(e)) => tracing::debug!("a local connection was lost on its way to a lane: {e}"),
                    None => break,
                },
                _ = session.conn.closed() => break,
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
        // The session's end closes every stream; let the relays report what they carried.
        while relays.join_next().await.is_some() {}
    });
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs how one relayed connection ended.
fn report(outcome: Result<(u64, u64), SessionError>) {
    match outcome {
        Ok((up, down)) => tracing::debug!(up, down, "connection closed"),
        Err(e @ SessionError::ConnRefused { .. }) => crate::errln!("{e}"),
        Err(SessionError::Ended(_)) => {}
        Err(e) => tracing::debug!("connection ended: {e}"),
    }
}

/// Hands `tcp` to the next lane in turn (counting the session's own connection as lane 0):
/// `None` if it is this connection's turn or no lane takes it.
fn next_lane(
    lanes: &std::sync::Mutex<Vec<LaneHandle>>,
    turn: &mut usize,
    tcp: TcpStream,
) -> Option<TcpStream> {
    let lanes = lock(lanes);
    *turn = (*turn + 1) % (lanes.len() + 1);
    let Some(lane) = turn.checked_sub(1).and_then(|i| lanes.get(i)) else {
        return Some(tcp);
    };
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::debug!("cannot hand a local connection to a lane: {e}");
            return None;
        }
    };
    match lane.relay.send(std) {
        Ok(()) => None,
        // The lane has ended (its session with it): relay it here.
        Err(back) => TcpStream::from_std(back.0).ok(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    conn: Connection,
    lanes: Arc<std::sync::Mutex<Vec<LaneHandle>>>,
) {
    let mut turn = 0;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = conn.closed() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accepting a local connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(tcp) = next_lane(&lanes, &mut turn, tcp) else {
            continue;
        };
        let conn = conn.clone();
        tokio::spawn(async move { report(proxy_one(&conn, tcp).await) });
    }
}

/// Relays one local TCP connection over a new stream; returns bytes (up, down).
///
/// Pipelined: the client's first bytes follow `ConnOpen` at once instead of waiting a round
/// trip for `ConnOk`. The worker reads them only after it has dialled the target and
/// answered, so a refused connection loses nothing but its own bytes.
async fn proxy_one(conn: &Connection, mut tcp: TcpStream) -> Result<(u64, u64), SessionError> {
    let _ = tcp.set_nodelay(true);
    let (mut send, mut recv) = send_conn_open(conn).await?;
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let relay_error = |e: PumpError| match conn.close_reason() {
        Some(reason) => SessionError::Ended(SessionEnd::from_error(&reason)),
        None => SessionError::Protocol(format!("relay: {e}")),
    };
    let up = async {
        let mut n = 0;
        pump::into_stream(&mut tcp_read, &mut send, &mut n)
            .await
            .map_err(relay_error)?;
        // The local client finished its side: half-close towards the target.
        let _ = send.finish();
        Ok::<u64, SessionError>(n)
    };
    let down = async {
        read_conn_reply(&mut recv, conn).await?;
        let mut n = 0;
        pump::out_of_stream(&mut recv, &mut tcp_write, &mut n)
            .await
            .map_err(relay_error)?;
        let _ = tcp_write.shutdown().await;
        Ok::<u64, SessionError>(n)
    };
    tokio::try_join!(up, down)
}

async fn open_stream(conn: &Connection) -> Result<(SendStream, RecvStream), SessionError> {
    let (send, mut recv) = send_conn_open(conn).await?;
    read_conn_reply(&mut recv, conn).await?;
    Ok((send, recv))
}

/// A new stream of `conn`, headed by `ConnOpen`.
async fn send_conn_open(conn: &Connection) -> Result<(SendStream, RecvStream), SessionError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| SessionError::Ended(SessionEnd::from_error(&e)))?;
    write_frame(
        &mut send,
        &ConnOpen {
            version: PROTOCOL_VERSION,
        },
        conn,
    )
    .await?;
    Ok((send, recv))
}

/// The worker's answer to `ConnOpen`: `Ok` when the connection is open.
async fn read_conn_reply(recv: &mut RecvStream, conn: &Connection) -> Result<(), SessionError> {
    match read_frame::<ConnReply>(recv, conn).await? {
        ConnReply::Ok => Ok(()),
        ConnReply::Refused { code, message } => Err(SessionError::ConnRefused { code, message }),
        other => Err(SessionError::Protocol(format!(
            "unexpected reply to a connection open: {other:?}"
        ))),
    }
}

pub fn client_config(ca_pem: &str, key: &ClientKey) -> Result<quinn::ClientConfig, SessionError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| {
            SessionError::BadAuthorization(format!("the worker CA is not valid PEM: {e}"))
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(SessionError::BadAuthorization(
            "the authorization carries no worker CA certificate".into(),
        ));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(postern_worker::session_crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![key.cert.clone()], key.private_key())?;
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| {
        SessionError::BadAuthorization(format!("TLS config unusable for QUIC: {e}"))
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The transport a session uses towards the worker at `addr`: [`transport_config`] with
/// packets sized for the path.
pub fn worker_transport(addr: SocketAddr) -> quinn::TransportConfig {
    let mut transport = transport_config();
    postern_worker::udp::tune_for_path(&mut transport, addr);
    transport
}

/// Windows sized for bulk transfer at high bandwidth-delay products, and keep-alives well
/// inside the idle timeout so a quiet psql prompt keeps its session.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(8 << 20))
        // The worker never opens streams towards the client.
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    t
}

async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
    conn: &Connection,
) -> Result<(), SessionError> {
    let bytes = frame::encode(msg).map_err(|e| SessionError::Protocol(e.to_string()))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| match conn.close_reason() {
            Some(reason) => SessionError::Ended(SessionEnd::from_error(&reason)),
            None => SessionError::Protocol(format!("sending a frame: {e}")),
        })
}

async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    conn: &Connection,
) -> Result<T, SessionError> {
    let fail = |e: quinn::ReadExactError| match conn.close_reason() {
        Some(reason) => SessionError::Ended(SessionEnd::from_error(&reason)),
        None => SessionError::Protocol(format!("reading a frame: {e}")),
    };
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(fail)?;
    let len = frame::body_len(header).map_err(|e| SessionError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(fail)?;
    frame::decode(&body).map_err(|e| SessionError::Protocol(e.to_string()))
}

fn connection_error_text(e: &ConnectionError) -> String {
    match e {
        ConnectionError::TimedOut => "no answer (is the worker running and reachable?)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
