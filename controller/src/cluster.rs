//! The cluster listener: workers hold one QUIC mutual-TLS connection each (ALPN
//! `postern-cluster/1`); on it they activate sessions and report connections, and the
//! controller pushes cancellations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use postern_proto::cluster::{
    raw_json, ControllerHello, ControllerMessage, Credential, ReceivedEvent, ReceivedMessage,
    SessionGrant, WorkerFrame, WorkerHello, WorkerMessage, WorkerMode,
};
use postern_proto::frame;
use postern_proto::ids::{Secret, SessionId};

use crate::api::types::Session;
use crate::keys::{fingerprint, KeyError, RootKeys};
use crate::state::AppState;
use crate::store::{now, NewEvent, StoreError};

/// The cluster listener failed or a worker misbehaved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// TLS configuration could not be built.
    #[error("cluster TLS setup failed: {0}")]
    Tls(String),
    /// Binding the UDP socket failed.
    #[error("cannot listen for workers on {addr}: {error}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// Certificate issuance failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A frame was malformed (worker side).
    #[error("worker sent a bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    /// The QUIC stream failed.
    #[error("worker stream failed: {0}")]
    Stream(String),
}

/// Workers whose control connections this controller holds.
#[derive(Debug, Default)]
pub struct Registry {
    links: Mutex<HashMap<String, Link>>,
    /// Cancellations pushed and not yet acknowledged: session id → (worker, who, why).
    cancels: Mutex<HashMap<String, (String, String, String)>>,
    generation: AtomicU64,
    /// Users and workers of sessions whose events workers sent: session id → (user, worker)
    /// (never changes).
    session_users: Mutex<HashMap<String, (String, String)>>,
}

/// Most session users remembered; then the memory starts afresh.
const SESSION_USERS: usize = 10_000;

#[derive(Debug)]
struct Link {
    generation: u64,
    tx: mpsc::UnboundedSender<ControllerMessage>,
    conn: quinn::Connection,
    /// An outbound-only worker: its clients come through [`crate::relay`].
    relayed: bool,
    /// SHA-256 of the certificate the worker connected with: a worker deleted and created
    /// again under its name has another, and gets nothing meant for the new one.
    fingerprint: String,
}

impl Registry {
    fn insert(
        &self,
        name: &str,
        tx: mpsc::UnboundedSender<ControllerMessage>,
        conn: quinn::Connection,
        relayed: bool,
        fingerprint: &str,
    ) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(
            name.to_owned(),
            Link {
                generation,
                tx,
                conn,
                relayed,
                fingerprint: fingerprint.to_owned(),
            },
        );
        if let Some(old) = old {
            old.conn
                .close(0u32.into(), b"replaced by a newer connection");
        }
        generation
    }

    /// Forgets the link of connection `generation`; whether it was still the worker's current
    /// one (not replaced by a newer connection of the same worker).
    fn remove(&self, name: &str, generation: u64) -> bool {
        let mut links = self.lock();
        if links.get(name).is_some_and(|l| l.generation == generation) {
            links.remove(name);
            return true;
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes a cancellation to the worker if this controller holds its connection, and
    /// remembers who revoked it (`actor`) until the worker acknowledges.
    pub fn cancel(&self, worker: &str, session_id: &str, reason: &str, actor: &str) -> bool {
        // Remembered before it is sent, so that an answer cannot come first.
        let earlier = self.pending_cancels().insert(
            session_id.to_owned(),
            (worker.to_owned(), actor.to_owned(), reason.to_owned()),
        );
        let sent = self.lock().get(worker).is_some_and(|l| {
            l.tx.send(ControllerMessage::CancelSession {
                session_id: session_id.into(),
                reason: reason.to_owned(),
            })
            .is_ok()
        });
        if !sent {
            let mut cancels = self.pending_cancels();
            match earlier {
                Some(earlier) => cancels.insert(session_id.to_owned(), earlier),
                None => cancels.remove(session_id),
            };
        }
        sent
    }

    /// Pushes the grant of a session just authorized for `worker`, if this controller holds
    /// its connection from the certificate `fingerprint` (the worker's current one; otherwise
    /// the worker asks at the client's hello, as it always may).
    pub fn session_ready(
        &self,
        worker: &str,
        fingerprint: &str,
        session_id: &str,
        expires_at: i64,
        grant: SessionGrant,
    ) -> bool {
        self.lock().get(worker).is_some_and(|l| {
            l.fingerprint == fingerprint
                && l.tx
                    .send(ControllerMessage::SessionReady {
                        session_id: session_id.into(),
                        expires_at,
                        grant,
                    })
                    .is_ok()
        })
    }

    /// The user and worker of `session_id`, if remembered.
    fn session_user(&self, session_id: &str) -> Option<(String, String)> {
        let users = self.session_users.lock().unwrap_or_else(|p| p.into_inner());
        users.get(session_id).cloned()
    }

    fn remember_session_user(&self, session_id: &str, user: &str, worker: &str) {
        let mut users = self.session_users.lock().unwrap_or_else(|p| p.into_inner());
        if users.len() >= SESSION_USERS {
            users.clear();
        }
        users.insert(session_id.to_owned(), (user.to_owned(), worker.to_owned()));
    }

    /// Who revoked `session_id` and why, if this controller pushed its cancellation to
    /// `worker` (another worker's acknowledgement takes nothing).
    fn take_cancel(&self, worker: &str, session_id: &str) -> Option<(String, String)> {
        let mut cancels = self.pending_cancels();
        if cancels.get(session_id).is_some_and(|(w, _, _)| w == worker) {
            return cancels.remove(session_id).map(|(_, who, why)| (who, why));
        }
        None
    }

    fn pending_cancels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, String, String)>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the worker's control connection (worker deleted).
    pub fn disconnect(&self, worker: &str, reason: &str) {
        if let Some(l) = self.lock().remove(worker) {
            l.conn.close(1u32.into(), reason.as_bytes());
        }
    }

    /// Names of the connected workers.
    pub fn connected(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The cluster connection of `worker` if this controller holds it and the worker is
    /// outbound-only: the connection its relayed clients' datagrams travel on.
    pub fn relay_connection(&self, worker: &str) -> Option<quinn::Connection> {
        let links = self.lock();
        // The name comes from a DNS name: case does not count.
        let link = links.get(worker).or_else(|| {
            links
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(worker))
                .map(|(_, l)| l)
        })?;
        link.relayed.then(|| link.conn.clone())
    }
}

/// Builds the QUIC endpoint workers connect to.
pub fn endpoint(keys: &RootKeys, addr: SocketAddr) -> Result<quinn::Endpoint, ClusterError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(keys.ca_der())
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    let (cert, key) = keys.issue_controller_cert()?;
    let chain: Vec<CertificateDer<'static>> = vec![cert, keys.ca_der()];
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into())
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![postern_proto::ALPN_CLUSTER.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| ClusterError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .map_err(|_| ClusterError::Tls("idle".into()))?,
    ));
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).map_err(|error| ClusterError::Bind { addr, error })
}

/// Accepts worker connections until the endpoint closes.
pub async fn serve(state: AppState, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_worker(state, conn).await,
                Err(e) => tracing::debug!(%remote, error = %e, "worker handshake failed"),
            }
        });
    }
}

async fn serve_worker(state: AppState, conn: quinn::Connection) {
    let Some(fp) = peer_fingerprint(&conn) else {
        conn.close(1u32.into(), b"no client certificate");
        return;
    };
    let opened = match tokio::time::timeout(Duration::from_secs(10), accept_hello(&conn)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            tracing::debug!(remote = %conn.remote_address(), error = %e, "no worker hello");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"no control stream and hello within 10 s");
            return;
        }
    };
    // Looked up once the hello is in (the worker may have been deleted after its handshake).
    let worker = match state.store.worker_by_fingerprint(&fp).await {
        Ok(Some(w)) => w,
        Ok(None) => {
            conn.close(
                1u32.into(),
                postern_proto::cluster::UNKNOWN_WORKER.as_bytes(),
            );
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "store failure on worker connect");
            conn.close(1u32.into(), b"controller store unavailable");
            return;
        }
    };
    let name = worker.name;
    match control_loop(&state, &conn, &name, &fp, opened).await {
        Ok(()) => tracing::info!(worker = %name, "worker disconnected"),
        Err(e) => tracing::warn!(worker = %name, error = %e, "worker connection ended"),
    }
}

/// The control stream a worker opens, and the hello on it.
async fn accept_hello(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream, WorkerHello), ClusterError> {
    let (send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| ClusterError::Stream(e.to_string()))?;
    let hello: WorkerHello = read_frame(&mut recv)
        .await?
        .ok_or_else(|| ClusterError::Stream("control stream closed before hello".into()))?;
    Ok((send, recv, hello))
}

/// Whether the worker `name` still has the certificate `fingerprint` (not deleted, nor
/// deleted and created again under the name since it connected).
async fn still_trusted(state: &AppState, name: &str, fingerprint: &str) -> bool {
    match state.store.worker_by_fingerprint(fingerprint).await {
        Ok(Some(w)) => w.name == name,
        Ok(None) => false,
        // A store hiccup does not cut a worker off: the next check decides.
        Err(e) => {
            tracing::warn!(worker = name, error = %e, "cannot re-check a worker's certificate");
            true
        }
    }
}

async fn control_loop(
    state: &AppState,
    conn: &quinn::Connection,
    name: &str,
    fingerprint: &str,
    (mut send, mut recv, hello): (quinn::SendStream, quinn::RecvStream, WorkerHello),
) -> Result<(), ClusterError> {
    if hello.version != postern_proto::PROTOCOL_VERSION {
        conn.close(1u32.into(), b"unsupported protocol version");
        return Err(ClusterError::Stream(format!(
            "worker speaks version {}",
            hello.version
        )));
    }
    let mut cancel = Vec::new();
    for sid in &hello.active_sessions {
        match state.store.session(sid.as_str()).await {
            Ok(s) if s.status != "terminated" && s.worker == name => {}
            _ => cancel.push(sid.clone()),
        }
    }
    // Clients reach an outbound-only worker through this controller's relay.
    let relayed = hello.mode == WorkerMode::OutboundOnly;
    let session_addr = match (&state.relay_addr, relayed) {
        (_, false) => hello.session_addr.clone(),
        (Some(relay), true) => relay.clone(),
        (None, true) => {
            // Closed with a reason the worker logs; it goes on to its next controller.
            conn.close(
                1u32.into(),
                b"this controller runs no relay (relay_listen): it cannot carry an outbound-only worker",
            );
            return Err(ClusterError::Stream(
                "outbound-only worker refused: no relay_listen configured".into(),
            ));
        }
    };
    let store_err = |e: crate::store::StoreError| ClusterError::Stream(e.to_string());
    state
        .store
        .worker_connected(name, &state.instance, &session_addr, hello.mode.as_str())
        .await
        .map_err(store_err)?;
    if let Some(key) = &hello.ssh_host_key {
        state
            .store
            .set_worker_ssh_host_key(name, key)
            .await
            .map_err(store_err)?;
    }
    let reply = ControllerHello {
        version: postern_proto::PROTOCOL_VERSION,
        worker: name.into(),
        session_keys: vec![postern_proto::token::encode_public_key(
            &state.keys.session_key.verifying_key(),
        )],
        issuer: state.issuer.clone(),
        cancel,
        max_frame: u32::try_from(frame::MAX_CONTROL_FRAME).ok(),
    };
    write_frame(&mut send, &reply).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<ControllerMessage>();
    let generation = state
        .workers
        .insert(name, tx.clone(), conn.clone(), relayed, fingerprint);
    let _ = state
        .audit(
            &format!("worker:{name}"),
            "worker.connect",
            &format!("worker:{name}"),
            "success",
            json!({"session_addr": session_addr, "mode": hello.mode.as_str()}),
        )
        .await;
    tracing::info!(worker = %name, %session_addr, mode = hello.mode.as_str(), "worker connected");
    if let Some(uptime) = hello.uptime_ms {
        let (state, name) = (state.clone(), name.to_owned());
        let started_ms = unix_now_ms().saturating_sub(i64::try_from(uptime).unwrap_or(i64::MAX));
        tokio::spawn(async move {
            match crate::revoke::end_lost_sessions(
                &state,
                &name,
                &hello.active_sessions,
                started_ms,
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(worker = %name, sessions = n, "the worker restarted: ended the sessions its earlier process carried")
                }
                Err(e) => {
                    tracing::error!(worker = %name, error = %e, "cannot end the sessions a restarted worker lost")
                }
            }
        });
    }

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        let frame = read_body(&mut recv, frame::MAX_CONTROL_FRAME)
            .await
            .and_then(|body| {
                body.map(|b| WorkerMessage::decode_frame(&b))
                    .transpose()
                    .map_err(ClusterError::from)
            });
        match frame {
            Ok(Some(WorkerFrame::Events(events))) => {
                state.metrics.worker_contact(name, None);
                events_received(state, name, events, &tx).await
            }
            Ok(Some(WorkerFrame::Message(msg))) => {
                let load = match &msg {
                    WorkerMessage::Heartbeat {
                        sessions,
                        connections,
                    } => Some((*sessions, *connections)),
                    _ => None,
                };
                // Every heartbeat (5 s), the worker's certificate is checked again: a worker
                // deleted through another controller loses this connection too.
                if load.is_some() && !still_trusted(state, name, fingerprint).await {
                    conn.close(1u32.into(), b"worker deleted");
                    break Err(ClusterError::Stream("the worker was deleted".into()));
                }
                state.metrics.worker_contact(name, load);
                handle(state, name, msg, &tx).await
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    writer.abort();
    // A connection that a newer one of the same worker replaced (a worker killed and
    // restarted: its old connection dies only at its idle timeout, after the new one
    // registered) must not mark the worker disconnected: it is connected, through the new one.
    if state.workers.remove(name, generation) {
        state.metrics.worker_gone(name);
        let _ = state.store.worker_disconnected(name, &state.instance).await;
        let _ = state
            .audit(
                &format!("worker:{name}"),
                "worker.disconnect",
                &format!("worker:{name}"),
                "success",
                json!({}),
            )
            .await;
    }
    result
}

async fn handle(
    state: &AppState,
    worker: &str,
    msg: WorkerMessage,
    tx: &mpsc::UnboundedSender<ControllerMessage>,
) {
    match msg {
        WorkerMessage::Activate { id, session_id } => {
            let (state, worker, tx) = (state.clone(), worker.to_owned(), tx.clone());
            // Activations run concurrently: one slow store call must not hold up the others.
            tokio::spawn(async move {
                let (session, outcome) = activate(&state, &worker, &session_id).await;
                let (refused, grant) = match outcome {
                    Ok(grant) => (None, Some(grant)),
                    Err(reason) => (Some(reason), None),
                };
                // The answer goes first: it waits on nothing but the session row, which is
                // already committed (`active`, `activated_at`); the event follows at once.
                let _ = tx.send(ControllerMessage::Activated {
                    id,
                    refused: refused.clone(),
                    grant,
                });
                let details = json!({"worker": worker, "refused": refused, "target": session.as_ref().map(|s| &s.target)});
                let user = session.map(|s| s.user);
                let user = user.as_deref().unwrap_or("unknown");
                let _ =
                    audit_activation(&state, user, &session_id, refused.is_some(), details).await;
            });
        }
        WorkerMessage::SessionStarted { session_id } => {
            let (state, worker) = (state.clone(), worker.to_owned());
            tokio::spawn(async move { session_started(&state, &worker, &session_id).await });
        }
        msg @ (WorkerMessage::ConnectionClosed { .. } | WorkerMessage::Audit { .. }) => {
            // Sent outside the spool (a worker without one): stored as spooled events are.
            let event = ReceivedEvent {
                event_id: postern_proto::ids::time_ordered_id(),
                time: postern_proto::unix_now(),
                message: ReceivedMessage::from(msg),
            };
            if let Err(e) = store_events(state, worker, vec![event]).await {
                tracing::error!(worker, error = %e, "cannot store the worker's report");
            }
        }
        WorkerMessage::SessionClosed { session_id, reason } => {
            // Only the worker carrying a session reports its end.
            if session_user(state, worker, &session_id).await.is_none() {
                tracing::warn!(worker, session = %session_id, "ignoring the end of a session this worker does not carry");
                return;
            }
            if let Ok(true) = state.store.end_session(session_id.as_str(), &reason).await {
                let _ = state
                    .audit(
                        &format!("worker:{worker}"),
                        "session.end",
                        &format!("session:{session_id}"),
                        "success",
                        json!({"reason": reason}),
                    )
                    .await;
            }
        }
        WorkerMessage::CancelAck {
            session_id,
            connections_cut,
        } => {
            // The revocation's outcome, in the name of whoever revoked it, and its latency,
            // when this is the answer of the worker that was asked; any other worker's
            // acknowledgement is its own word.
            let (actor, reason) = match state.workers.take_cancel(worker, session_id.as_str()) {
                Some(asked) => {
                    state.metrics.revocation_acked(session_id.as_str());
                    asked
                }
                None => (format!("worker:{worker}"), String::new()),
            };
            if connections_cut == 0 && actor == crate::revoke::CATCH_UP_ACTOR {
                return;
            }
            let _ = state
                .audit(
                    &actor,
                    "session.connections_cut",
                    &format!("session:{session_id}"),
                    "success",
                    json!({"connections_cut": connections_cut, "worker": worker, "reason": reason}),
                )
                .await;
        }
        WorkerMessage::Events { events } => {
            let events = events.into_iter().map(ReceivedEvent::from).collect();
            events_received(state, worker, events, tx).await
        }
        WorkerMessage::Heartbeat {
            sessions,
            connections,
        } => {
            let _ = state
                .store
                .worker_heartbeat(worker, sessions, connections)
                .await;
        }
        WorkerMessage::RecordingStart {
            id,
            session_id,
            recording_id,
            header,
        } => {
            // Awaited in order: the recording exists before its data is handled.
            let refused =
                crate::recordings::start(state, worker, &session_id, &recording_id, &header).await;
            let _ = tx.send(ControllerMessage::RecordingStarted { id, refused });
        }
        WorkerMessage::RecordingData {
            recording_id,
            events,
        } => crate::recordings::data(state, worker, &recording_id, &events).await,
        WorkerMessage::RecordingEnd { recording_id } => {
            crate::recordings::end(state, worker, &recording_id).await
        }
        WorkerMessage::SignSshCertificate {
            id,
            session_id,
            principal,
            public_key,
        } => {
            let (state, worker, tx) = (state.clone(), worker.to_owned(), tx.clone());
            tokio::spawn(async move {
                let signed = crate::recordings::sign_certificate(
                    &state,
                    &worker,
                    &session_id,
                    &principal,
                    &public_key,
                )
                .await;
                if let Err(why) = &signed {
                    tracing::info!(worker, session = %session_id, "certificate refused: {why}");
                }
                let (certificate, refused) = match signed {
                    Ok(c) => (Some(c), None),
                    Err(why) => (None, Some(why)),
                };
                let _ = tx.send(ControllerMessage::SshCertificate {
                    id,
                    certificate,
                    refused,
                });
            });
        }
        _ => tracing::debug!(worker, "ignoring unknown worker message"),
    }
}

/// Milliseconds since the Unix epoch on this controller's clock.
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Activates session `session_id` on `worker` if it may start there now: the session (if
/// found) and its grant, or why not.
async fn activate(
    state: &AppState,
    worker: &str,
    session_id: &SessionId,
) -> (Option<Session>, Result<SessionGrant, String>) {
    let s = match state.store.session(session_id.as_str()).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return (None, Err("unknown session".into())),
        Err(e) => {
            tracing::error!(error = %e, "activation failed");
            return (None, Err("controller store failure".into()));
        }
    };
    // The brokered credential is read alongside the checks.
    let (refusal, credential) = tokio::join!(
        activation_refusal(state, worker, &s),
        state.store.credential(&s.target)
    );
    let outcome = match refusal.and_then(|r| Ok((r, credential?))) {
        Ok((Some(reason), _)) => Err(reason),
        Ok((None, credential)) => session_grant(state, &s.target, credential).map_err(|e| {
            tracing::error!(error = %e, "cannot prepare the session grant");
            format!("controller cannot prepare the session: {e}")
        }),
        Err(e) => {
            tracing::error!(error = %e, "activation failed");
            Err("controller store failure".into())
        }
    };
    (Some(s), outcome)
}

/// A worker started `session_id` on its pushed grant: the same checks as an activation,
/// after the fact; a session that may not run after all is ended (and so cut at once).
async fn session_started(state: &AppState, worker: &str, session_id: &SessionId) {
    let s = match state.store.session(session_id.as_str()).await {
        Ok(s) => s,
        Err(e) => {
            // The worker only starts sessions this controller pushed: the row exists.
            tracing::error!(error = %e, session = %session_id, "cannot record a session's start");
            return;
        }
    };
    if s.worker != worker {
        // Not this worker's session: nothing of it is this worker's to start or end.
        tracing::warn!(worker, session = %session_id, "ignoring the start of a session of worker '{}'", s.worker);
        return;
    }
    let refused = match activation_refusal(state, worker, &s).await {
        Ok(refused) => refused,
        Err(e) => {
            tracing::error!(error = %e, session = %session_id, "cannot check a started session");
            Some("controller store failure".to_owned())
        }
    };
    let details =
        json!({"worker": worker, "refused": refused, "target": s.target, "pushed_grant": true});
    if let Err(e) = audit_activation(state, &s.user, session_id, refused.is_some(), details).await {
        tracing::error!(error = %e, "cannot audit a session's start");
    }
    if let Some(reason) = refused {
        let ended =
            crate::revoke::end_sessions(state, std::slice::from_ref(&s), &reason, "controller")
                .await;
        if let Err(e) = ended {
            tracing::error!(error = %e, session = %session_id, "cannot end a session that may not run");
        }
    }
}

/// The `session.activate` event of `session_id`, by `user`.
async fn audit_activation(
    state: &AppState,
    user: &str,
    session_id: &SessionId,
    refused: bool,
    details: serde_json::Value,
) -> Result<(), StoreError> {
    let outcome = if refused { "denied" } else { "success" };
    let resource = format!("session:{session_id}");
    state
        .audit(user, "session.activate", &resource, outcome, details)
        .await
}

/// `None` if session `s` may start on this worker now (and it is now marked active), else
/// why not.
async fn activation_refusal(
    state: &AppState,
    worker: &str,
    s: &Session,
) -> Result<Option<String>, StoreError> {
    if s.worker != worker {
        return Ok(Some(format!("session belongs to worker '{}'", s.worker)));
    }
    if s.status == "terminated" {
        return Ok(Some(format!(
            "session has ended: {}",
            s.end_reason.as_deref().unwrap_or_default()
        )));
    }
    if s.expires_at <= now() {
        return Ok(Some("session expired".into()));
    }
    // Users, targets and policy may have changed since authorization: check again.
    if let Some(reason) = crate::revoke::policy_refusal(state, s).await? {
        return Ok(Some(reason));
    }
    if !state.store.activate_session(&s.id).await? {
        return Ok(Some("session can no longer be activated".into()));
    }
    Ok(None)
}

/// Stores a batch of spooled events and acknowledges them once stored (until then the worker
/// keeps them).
async fn events_received(
    state: &AppState,
    worker: &str,
    events: Vec<ReceivedEvent>,
    tx: &mpsc::UnboundedSender<ControllerMessage>,
) {
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    match store_events(state, worker, events).await {
        Ok(()) => {
            let _ = tx.send(ControllerMessage::EventsAck { event_ids: ids });
        }
        Err(e) => {
            tracing::error!(worker, error = %e, "cannot store the worker's events; it sends them again when no acknowledgement comes")
        }
    }
}

/// Stores a batch of spooled worker events, each once (by event id), in one append.
async fn store_events(
    state: &AppState,
    worker: &str,
    events: Vec<ReceivedEvent>,
) -> Result<(), StoreError> {
    let mut batch = Vec::with_capacity(events.len());
    // Closed connections (session, bytes up, bytes down) by their index in `batch`: counted
    // once the append says which events it stored (a resent one is not stored again).
    let mut closed: HashMap<usize, (String, u64, u64)> = HashMap::new();
    for e in events {
        let (actor, action, session_id, details) = match e.message {
            ReceivedMessage::Other(WorkerMessage::ConnectionClosed {
                session_id,
                bytes_up,
                bytes_down,
                reason,
            }) => {
                // Counted on the session only if it is this worker's.
                if session_user(state, worker, &session_id).await.is_some() {
                    closed.insert(
                        batch.len(),
                        (session_id.as_str().to_owned(), bytes_up, bytes_down),
                    );
                }
                (
                    format!("worker:{worker}"),
                    "connection.close".to_owned(),
                    session_id,
                    raw_json(
                        &json!({"bytes_up": bytes_up, "bytes_down": bytes_down, "reason": reason, "worker": worker}),
                    ),
                )
            }
            ReceivedMessage::Audit {
                session_id,
                action,
                details,
            } => {
                let user = session_user(state, worker, &session_id).await;
                let actor = user.unwrap_or_else(|| format!("worker:{worker}"));
                (actor, action, session_id, details)
            }
            ReceivedMessage::Other(other) => {
                tracing::warn!(
                    worker,
                    "ignoring a spooled message that is not an event: {other:?}"
                );
                continue;
            }
        };
        batch.push(NewEvent {
            event_id: Some(e.event_id),
            time: e.time,
            outcome: worker_outcome(&action).into(),
            actor,
            action,
            resource: format!("session:{session_id}"),
            session_id: Some(session_id.0),
            details,
        });
    }
    if batch.is_empty() {
        return Ok(());
    }
    let stored = state.audit_log.append(batch).await?;
    // After the events are stored: a batch whose append failed is sent again and must not
    // have been counted already. Closed connections per session: one update per session.
    let mut per_session: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for index in stored {
        if let Some((session, up, down)) = closed.remove(&index) {
            state.metrics.connection_closed(up, down);
            let figures = per_session.entry(session).or_default();
            figures.0 += 1;
            figures.1 = figures.1.saturating_add(up);
            figures.2 = figures.2.saturating_add(down);
        }
    }
    for (session, (connections, up, down)) in per_session {
        state
            .store
            .record_connections(&session, connections, up, down)
            .await?;
    }
    Ok(())
}

/// The outcome of an event a worker reports, from its action: a refusal (`ssh.refused`,
/// `ssh.shell_refused`) is `denied`, a failure (`ssh.target_failed`) is `failure`, the rest
/// (a statement, a connection closed, an exec) `success`.
fn worker_outcome(action: &str) -> &'static str {
    if action.ends_with("refused") {
        "denied"
    } else if action.ends_with("_failed") {
        "failure"
    } else {
        "success"
    }
}

/// The user of `session`, if it is one `worker` carries: a worker reports only for its own
/// sessions, and one naming another's speaks for itself, not for that session's user.
/// Remembered: a statement audit asks for every batch, and a session's user and worker never
/// change.
async fn session_user(state: &AppState, worker: &str, session: &SessionId) -> Option<String> {
    let (user, carrier) = match state.workers.session_user(session.as_str()) {
        Some(known) => known,
        None => {
            let s = state.store.session(session.as_str()).await.ok()?;
            state
                .workers
                .remember_session_user(session.as_str(), &s.user, &s.worker);
            (s.user, s.worker)
        }
    };
    (carrier == worker).then_some(user)
}

/// What the worker needs for an activated session: the target's brokered credential, unsealed.
pub(crate) fn session_grant(
    state: &AppState,
    target: &str,
    credential: Option<(String, String, String)>,
) -> Result<SessionGrant, String> {
    let Some((kind, username, sealed)) = credential else {
        return Ok(SessionGrant::default());
    };
    let secret = state
        .kek
        .open(&crate::api::credential_purpose(target), &sealed)
        .map_err(|e| e.to_string())?;
    let secret =
        Secret(String::from_utf8(secret).map_err(|_| "stored credential is not text".to_string())?);
    let credential = match kind.as_str() {
        "ssh_key" => Credential::SshPrivateKey {
            username,
            private_key_pem: secret,
        },
        "ssh_ca" => Credential::SshCertificate { username },
        "postgres_admin" => Credential::PostgresAdmin {
            username,
            password: secret,
        },
        _ => Credential::Password {
            username,
            password: secret,
        },
    };
    Ok(SessionGrant {
        credential: Some(credential),
    })
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| fingerprint(c))
}

async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, ClusterError> {
    match read_body(recv, frame::MAX_FRAME).await? {
        Some(body) => Ok(Some(frame::decode(&body)?)),
        None => Ok(None),
    }
}

/// One frame's body of at most `limit` bytes; `None` if the stream finished between frames.
async fn read_body(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<Vec<u8>>, ClusterError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(ClusterError::Stream(e.to_string())),
    }
    let len = frame::body_len_within(header, limit)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| ClusterError::Stream(e.to_string()))?;
    Ok(Some(body))
}

async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), ClusterError> {
    let bytes = frame::encode(msg)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| ClusterError::Stream(e.to_string()))
}

/// How often a controller with several peers checks that it reaches the database.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// With several controllers (more than one cluster address announced): while this one cannot
/// reach the database, it can authorize nothing, activate no session and store no event, so
/// it lets go of its workers after two failed checks in a row (5-10 s) and they connect to
/// another controller (this one refuses them while its store is down). A lone controller
/// keeps them: its sessions go on until the database is back.
pub async fn release_workers_without_store(state: AppState) {
    let mut tick = tokio::time::interval(STORE_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = 0u32;
    loop {
        tick.tick().await;
        let reached = tokio::time::timeout(STORE_CHECK_EVERY, state.store.ping()).await;
        if matches!(reached, Ok(Ok(()))) {
            failed = 0;
            continue;
        }
        failed += 1;
        let held = state.workers.connected();
        if failed >= 2 && !held.is_empty() {
            tracing::warn!(
                workers = held.len(),
                "the database does not answer: letting go of the workers so they connect to another controller"
            );
            for worker in held {
                state
                    .workers
                    .disconnect(&worker, "controller store unavailable");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_outcome;

    #[test]
    fn worker_refusals_and_failures_are_not_audited_as_successes() {
        assert_eq!(worker_outcome("ssh.refused"), "denied");
        assert_eq!(worker_outcome("ssh.shell_refused"), "denied");
        assert_eq!(worker_outcome("ssh.target_failed"), "failure");
        assert_eq!(worker_outcome("postgres.query"), "success");
        assert_eq!(worker_outcome("connection.close"), "success");
    }
}
