//! The control connection to the controller (QUIC, mutual TLS, ALPN `postern-cluster/1`)
//! and the fail-closed watchdog.
//!
//! One bidirectional stream carries the hellos, then [`WorkerMessage`]s out (activations,
//! reports, heartbeats) and [`ControllerMessage`]s in (activation answers, cancels). The
//! connection is re-established with exponential backoff; sessions survive a drop shorter
//! than the grace period, after which the watchdog ends them all.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use postern_proto::cluster::{
    ControllerHello, ControllerMessage, WorkerHello, WorkerMessage, WorkerMode,
};
use postern_proto::frame::FrameError;
use postern_proto::session::close;
use postern_proto::{token, CONTROLLER_SERVER_NAME, PROTOCOL_VERSION};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout, Instant};

use crate::frames::{read_frame, write_frame, ReadFrameError, WriteFrameError};
use crate::state::{Activation, LinkState, Shared, TrustedKeys};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A control connection up this long counts as stable (see the backoff).
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long queued reports may take to go out when the worker shuts down.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
const REASON_LOST: &str = "worker lost controller";

/// Why a control connection failed or ended; every variant is on the controller side.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// A cluster address could not be resolved.
    #[error("cannot resolve controller address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    /// No local UDP socket for the connection.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The connection attempt could not start.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A step took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A frame could not be read.
    #[error("reading from the controller: {0}")]
    Read(#[from] ReadFrameError),
    /// A frame could not be written.
    #[error("writing to the controller: {0}")]
    Write(#[from] WriteFrameError),
    /// The controller speaks another protocol version.
    #[error("controller speaks protocol version {0}, this worker {PROTOCOL_VERSION}")]
    Version(u32),
    /// The controller finished the control stream.
    #[error("the controller closed the control stream")]
    Finished,
}

/// What the control task needs besides the shared state.
pub(crate) struct ControlTask {
    pub(crate) shared: Arc<Shared>,
    pub(crate) cluster_addrs: Vec<String>,
    pub(crate) client_config: quinn::ClientConfig,
    /// The session address advertised in the hello.
    pub(crate) session_addr: String,
    /// How clients reach this worker, said in the hello.
    pub(crate) mode: WorkerMode,
    /// Outbound-only mode: where the controller's relay streams go.
    pub(crate) relay: Option<Arc<crate::outbound::Relay>>,
    pub(crate) outbox: mpsc::Receiver<WorkerMessage>,
    pub(crate) stop: watch::Receiver<bool>,
    /// When this worker started (its hello says how long ago).
    pub(crate) started: Instant,
    /// Where to ask for the cluster addresses again once none of them answers: the
    /// configuration (its `controller_url`) and the cluster CA.
    pub(crate) addr_source: (crate::config::WorkerConfig, Vec<CertificateDer<'static>>),
}

/// How a served connection ended.
enum Served {
    /// The worker is shutting down.
    Stopped,
    /// The connection was lost after a successful hello.
    Lost {
        /// Why.
        error: ControlError,
        /// How long it had been up.
        lasted: Duration,
    },
}

impl ControlTask {
    /// Keeps a control connection up until told to stop.
    pub(crate) async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        let mut next = 0usize;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let Some(addr) = self
                .cluster_addrs
                .get(next % self.cluster_addrs.len().max(1))
            else {
                tracing::error!("no controller cluster address to connect to");
                return;
            };
            let addr = addr.clone();
            let outcome = self.connect_and_serve(&addr).await;
            self.shared.set_link_down();
            match outcome {
                Ok(Served::Stopped) => return,
                Ok(Served::Lost { error, lasted }) => {
                    tracing::warn!(controller = %addr, "lost the controller: {error}");
                    // A connection that drops right after its hello is a failure too:
                    // only a stable one resets the backoff.
                    if lasted >= STABLE_AFTER {
                        backoff = BACKOFF_FIRST;
                    }
                    // That controller may be gone: try the next one.
                    next = next.wrapping_add(1);
                }
                Err(e)
                    if e.to_string()
                        .contains(postern_proto::cluster::UNKNOWN_WORKER) =>
                {
                    tracing::error!(
                        controller = %addr,
                        "the controller does not know this worker's certificate (the worker was \
                         deleted, or data_dir was registered with another cluster): create it \
                         again (`postern workers create NAME`) and restart this worker with the \
                         new activation_token"
                    );
                    next = next.wrapping_add(1);
                }
                Err(e) => {
                    tracing::warn!(controller = %addr, "cannot reach the controller: {e}");
                    next = next.wrapping_add(1);
                }
            }
            // Every known address tried once more: the controllers may have moved or new
            // ones come, which the API knows (a stop does not wait for its answer).
            if next.is_multiple_of(self.cluster_addrs.len().max(1)) {
                let (config, ca) = &self.addr_source;
                let refreshed = tokio::select! {
                    changed = crate::register::refresh_cluster_addrs(config, ca, &mut self.cluster_addrs) => changed,
                    _ = self.stop.changed() => return,
                };
                if refreshed {
                    next = 0;
                }
            }
            let pause = backoff + jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = sleep(pause) => {}
                _ = self.stop.changed() => return,
            }
        }
    }

    /// Connects to `addr`, exchanges hellos and serves the connection until it ends.
    async fn connect_and_serve(&mut self, addr: &str) -> Result<Served, ControlError> {
        // Until the hellos are done, a stop abandons the attempt at once.
        let mut stop = self.stop.clone();
        let connect = async {
            let remote = resolve(addr).await?;
            let mut endpoint =
                quinn::Endpoint::client(local_bind(remote)).map_err(ControlError::Socket)?;
            endpoint.set_default_client_config(self.client_config.clone());
            let connecting = endpoint.connect(remote, CONTROLLER_SERVER_NAME)?;
            let conn = timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| ControlError::Timeout("connecting"))??;
            Ok::<_, ControlError>((endpoint, conn))
        };
        let (endpoint, conn) = tokio::select! {
            r = connect => r?,
            _ = stop.changed() => return Ok(Served::Stopped),
        };
        let hello = tokio::select! {
            r = self.hello(&conn) => Some(r),
            _ = stop.changed() => None,
        };
        // Relayed clients arrive as streams the controller opens on this connection.
        let relayed = self
            .relay
            .clone()
            .map(|relay| tokio::spawn(relay.accept(conn.clone())));
        let result = match hello {
            None => Ok(Served::Stopped),
            Some(Err(e)) => Err(e),
            Some(Ok((send, recv, frame_limit))) => Ok(self.serve(send, recv, frame_limit).await),
        };
        if let Some(task) = relayed {
            task.abort();
        }
        let reason: &[u8] = match &result {
            Ok(Served::Stopped) => b"worker shutting down",
            _ => b"worker reconnecting",
        };
        conn.close(VarInt::from_u32(0), reason);
        // Let the close (and anything flushed before it) reach the controller.
        let _ = timeout(FLUSH_TIMEOUT, endpoint.wait_idle()).await;
        result
    }

    /// Opens the control stream and exchanges hellos; returns the stream and the largest
    /// frame the controller reads on it.
    async fn hello(
        &self,
        conn: &Connection,
    ) -> Result<(SendStream, RecvStream, usize), ControlError> {
        let (mut send, mut recv) = timeout(CONNECT_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| ControlError::Timeout("opening the control stream"))??;
        let hello = WorkerHello {
            version: PROTOCOL_VERSION,
            session_addr: self.session_addr.clone(),
            active_sessions: self.shared.session_ids(),
            ssh_host_key: Some(self.shared.ssh.host_key_line().to_owned()),
            mode: self.mode,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).ok(),
        };
        write_frame(&mut send, &hello).await?;
        let answer: ControllerHello = timeout(CONNECT_TIMEOUT, read_frame(&mut recv))
            .await
            .map_err(|_| ControlError::Timeout("waiting for the controller's hello"))??;
        let frame_limit = answer.frame_limit();
        self.accept_hello(answer)?;
        tracing::info!(remote = %conn.remote_address(), "connected to the controller");
        Ok((send, recv, frame_limit))
    }

    /// Carries messages both ways until the connection fails or the worker stops.
    async fn serve(
        &mut self,
        mut send: SendStream,
        mut recv: RecvStream,
        frame_limit: usize,
    ) -> Served {
        let since = Instant::now();
        let shared = self.shared.clone();
        let error = tokio::select! {
            e = read_loop(&shared, &mut recv) => e,
            r = write_loop(&shared, &mut send, &mut self.outbox, &mut self.stop, frame_limit) => match r {
                Ok(()) => {
                    let _ = send.finish();
                    // Give the controller a moment to read what was flushed.
                    let _ = timeout(FLUSH_TIMEOUT, send.stopped()).await;
                    return Served::Stopped;
                }
                Err(e) => e,
            },
        };
        Served::Lost {
            error,
            lasted: since.elapsed(),
        }
    }

    fn accept_hello(&self, hello: ControllerHello) -> Result<(), ControlError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(ControlError::Version(hello.version));
        }
        if hello.worker.as_str() != self.shared.name() {
            tracing::warn!(
                registered = self.shared.name(),
                controller = %hello.worker,
                "the controller knows this worker under another name; tokens are checked \
                 against the registered name"
            );
        }
        let keys = hello
            .session_keys
            .iter()
            .filter_map(|text| match token::decode_public_key(text) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!("ignoring a session key from the controller: {e}");
                    None
                }
            })
            .collect::<Vec<_>>();
        if keys.is_empty() {
            tracing::warn!("the controller sent no usable session key; sessions will be refused");
        }
        self.shared.set_keys(TrustedKeys {
            keys,
            issuer: hello.issuer,
        });
        self.shared.set_link_up();
        for id in hello.cancel {
            self.shared.forget_cancelled(&id);
            if self
                .shared
                .end_session(
                    &id,
                    close::CANCELLED,
                    "session is no longer valid",
                    Some("cancelled by the controller"),
                )
                .is_some()
            {
                tracing::info!(session = %id, "session cancelled at reconnect");
            }
        }
        Ok(())
    }
}

/// Reads controller messages until the stream fails; returns why it stopped.
async fn read_loop(shared: &Shared, recv: &mut RecvStream) -> ControlError {
    loop {
        let msg: ControllerMessage = match read_frame(recv).await {
            Ok(msg) => msg,
            // A whole frame of an unknown kind (a newer controller): skip it.
            Err(ReadFrameError::Invalid(FrameError::Malformed(e))) => {
                tracing::warn!("ignoring a message from the controller: {e}");
                continue;
            }
            Err(ReadFrameError::Finished) => return ControlError::Finished,
            Err(e) => return e.into(),
        };
        match msg {
            ControllerMessage::Activated { id, refused, grant } => {
                let answer = match refused {
                    Some(reason) => Activation::Refused(reason),
                    None => Activation::Granted(grant.unwrap_or_default()),
                };
                shared.complete_activation(id, answer);
            }
            ControllerMessage::SessionReady {
                session_id,
                expires_at,
                grant,
            } => shared.session_ready(session_id, expires_at, grant),
            ControllerMessage::EventsAck { event_ids } => {
                if let Some(spool) = shared.spool() {
                    spool.ack(&event_ids);
                }
            }
            ControllerMessage::CancelSession { session_id, reason } => {
                shared.forget_cancelled(&session_id);
                let cut = shared
                    .end_session(&session_id, close::CANCELLED, &reason, None)
                    .unwrap_or(0);
                tracing::info!(session = %session_id, %reason, cut, "session cancelled");
                shared.report(WorkerMessage::CancelAck {
                    session_id,
                    connections_cut: cut,
                });
            }
            ControllerMessage::RecordingStarted { id, refused } => {
                shared
                    .ssh
                    .complete(id, crate::ssh::Answer::RecordingStarted(refused));
            }
            ControllerMessage::SshCertificate {
                id,
                certificate,
                refused,
            } => {
                let answer = certificate.ok_or_else(|| {
                    refused.unwrap_or_else(|| "the controller sent no certificate".into())
                });
                shared
                    .ssh
                    .complete(id, crate::ssh::Answer::Certificate(answer));
            }
            other => tracing::warn!("ignoring an unexpected controller message: {other:?}"),
        }
    }
}

/// Sends queued messages and heartbeats; on stop, flushes the queue and returns `Ok`.
async fn write_loop(
    shared: &Shared,
    send: &mut SendStream,
    outbox: &mut mpsc::Receiver<WorkerMessage>,
    stop: &mut watch::Receiver<bool>,
    frame_limit: usize,
) -> Result<(), ControlError> {
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A new connection: every event not yet acknowledged goes (again).
    if let Some(spool) = shared.spool() {
        spool.restart(frame_limit);
    }
    loop {
        if let Some(spool) = shared.spool() {
            loop {
                let events = spool.next_batch();
                if events.is_empty() {
                    break;
                }
                let frame = crate::spool::Spooled::frame(&events).map_err(WriteFrameError::from)?;
                send.write_all(&frame)
                    .await
                    .map_err(WriteFrameError::from)?;
            }
        }
        let spooled = async {
            match shared.spool() {
                Some(spool) => spool.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = spooled => {}
            msg = outbox.recv() => match msg {
                Some(msg) => send_message(shared, send, &msg).await?,
                None => return Ok(()),
            },
            _ = heartbeat.tick() => {
                let (sessions, connections) = shared.load();
                write_frame(send, &WorkerMessage::Heartbeat { sessions, connections }).await?;
            }
            _ = stop.changed() => {
                let flush = async {
                    while let Ok(msg) = outbox.try_recv() {
                        send_message(shared, send, &msg).await?;
                    }
                    Ok::<_, ControlError>(())
                };
                if let Ok(Err(e)) = timeout(FLUSH_TIMEOUT, flush).await {
                    tracing::debug!("could not flush reports to the controller: {e}");
                }
                return Ok(());
            }
        }
    }
}

async fn send_message(
    shared: &Shared,
    send: &mut SendStream,
    msg: &WorkerMessage,
) -> Result<(), ControlError> {
    if let WorkerMessage::Activate { id, .. } = msg {
        // Queued while the link was down and already answered "unavailable".
        if !shared.activation_awaited(*id) {
            return Ok(());
        }
    }
    write_frame(send, msg).await?;
    Ok(())
}

/// Ends every session once the controller has been unreachable for longer than `grace`.
pub(crate) async fn fail_closed(
    shared: Arc<Shared>,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut link = shared.link();
    loop {
        let state = *link.borrow_and_update();
        let deadline = match state {
            LinkState::Up => None,
            // (An instant beyond the clock's range is never reached.)
            LinkState::Down { since } => since.checked_add(grace),
        };
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = link.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
            _ = expired => {
                let ended = shared.end_all(close::CANCELLED, REASON_LOST, Some(REASON_LOST));
                if ended > 0 {
                    tracing::warn!(
                        sessions = ended,
                        "controller unreachable for longer than the {}s grace period: \
                         ended every session",
                        grace.as_secs_f32()
                    );
                }
                // Still down: look again in a while (or as soon as the link changes).
                tokio::select! {
                    _ = link.changed() => {}
                    _ = sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, ControlError> {
    let resolve_error = |reason: String| ControlError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| resolve_error(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| resolve_error("no address found".into()))
}

/// A local address of the remote's family; loopback for a loopback remote.
fn local_bind(remote: SocketAddr) -> SocketAddr {
    match (remote, remote.ip().is_loopback()) {
        (SocketAddr::V4(_), true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (SocketAddr::V4(_), false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (SocketAddr::V6(_), true) => (Ipv6Addr::LOCALHOST, 0).into(),
        (SocketAddr::V6(_), false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Up to half of `base`, at random, so that workers do not reconnect in step.
fn jitter(base: Duration) -> Duration {
    let r = getrandom::u32().unwrap_or(0);
    base.mul_f64(f64::from(r) / f64::from(u32::MAX) / 2.0)
}
