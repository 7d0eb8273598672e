//! State shared by the control loop and the session listener: the keys session tokens are
//! checked against, the sessions this worker carries, activations awaiting the controller's
//! answer, the outbox of messages to the controller, and whether the controller is reachable.
//!
//! Locks are `std` mutexes held for a few statements, never across an `.await`. When two are
//! held, the sessions map is taken before a session's own lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::VerifyingKey;
use postern_proto::cluster::{AuditRef, SessionGrant, WorkerMessage};
use postern_proto::ids::SessionId;
use postern_proto::session::close;
use postern_proto::token::SessionClaims;
use postern_proto::unix_now;
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Messages to the controller queued at most; beyond that, reports are dropped (and logged).
pub(crate) const OUTBOX_CAPACITY: usize = 4096;
/// How long a session's first connection waits for the controller's activation.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a cancelled session id is remembered, so a late connection cannot revive it.
const CANCELLED_MEMORY: Duration = Duration::from_secs(3600);
/// Grants of authorized sessions whose client has not arrived yet, kept at most (beyond
/// that, a session activates with a round trip, as if its grant had not come).
const READY_CAPACITY: usize = 16_384;
/// How long a hello whose client was told the grant was pushed waits for it to arrive (it
/// races the client's hello on another connection; it normally lands within a millisecond).
const READY_WAIT: Duration = Duration::from_millis(50);

/// Keys whose session tokens this worker accepts, from the controller's hello.
pub(crate) struct TrustedKeys {
    pub(crate) keys: Vec<VerifyingKey>,
    pub(crate) issuer: String,
}

/// Whether the control connection is up, and since when it is down.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LinkState {
    Up,
    Down { since: Instant },
}

/// Why a session could not be activated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActivationError {
    /// The controller refused the session (controller side).
    #[error("{0}")]
    Refused(String),
    /// The controller could not be asked or did not answer (controller side).
    #[error("{0}")]
    Unavailable(&'static str),
}

/// Why a connection could not join a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttachError {
    /// The controller cancelled the session.
    #[error("the session was cancelled")]
    Cancelled,
    /// The session is not active on this worker: activate it first.
    #[error("the session is not active on this worker")]
    NotActive,
}

/// Why a proxied connection may not open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenRefusal {
    /// The session has ended.
    #[error("the session has ended: {0}")]
    Ended(String),
    /// The session's connection limit is reached.
    #[error("connection limit of {0} reached for this session")]
    Limit(u32),
}

/// The controller's answer to an activation.
pub(crate) enum Activation {
    /// The session may start; with what the proxies need.
    Granted(SessionGrant),
    /// Refused, with the reason.
    Refused(String),
}

/// Everything the worker's tasks share.
pub(crate) struct Shared {
    name: String,
    keys: RwLock<Option<Arc<TrustedKeys>>>,
    sessions: Mutex<HashMap<SessionId, Arc<Session>>>,
    cancelled: Mutex<HashMap<SessionId, Instant>>,
    /// Grants pushed at authorization (`SessionReady`), until the client arrives: its
    /// session's expiry (Unix seconds) and the grant.
    ready: Mutex<HashMap<SessionId, (i64, SessionGrant)>>,
    /// Woken when a grant is pushed or a session cancelled.
    ready_changed: tokio::sync::Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<Activation>>>,
    next_request: AtomicU64,
    outbox: mpsc::Sender<WorkerMessage>,
    link: watch::Sender<LinkState>,
    /// The SSH proxy's host key and its requests to the controller.
    pub(crate) ssh: crate::ssh::SshShared,
    /// Where auditable reports wait for the controller's acknowledgement.
    spool: Option<crate::spool::Spool>,
    /// The postgres proxy's settings, cancel keys and per-session roles.
    pub(crate) postgres: crate::postgres::PostgresState,
    /// Prometheus metrics.
    pub(crate) metrics: crate::metrics::WorkerMetrics,
}

/// One session carried by this worker: its QUIC connections and its counters.
pub(crate) struct Session {
    pub(crate) id: SessionId,
    /// The target, `host:port`.
    pub(crate) endpoint: String,
    /// The verified claims of the session's token (user, target, protocol, login).
    pub(crate) claims: SessionClaims,
    /// What the controller granted at activation (brokered credential); memory only.
    pub(crate) grant: SessionGrant,
    limit: Option<u32>,
    inner: Mutex<SessionInner>,
}

struct SessionInner {
    conns: Vec<quinn::Connection>,
    /// Proxied connections ever opened (what the limit counts).
    opened: u32,
    /// Proxied connections open now.
    open_streams: u32,
    /// Why the session ended, once it has.
    ended: Option<String>,
    expiry: Option<AbortHandle>,
}

/// A proxied connection counted in its session; dropping it uncounts it.
pub(crate) struct StreamGuard {
    session: Arc<Session>,
}

impl Shared {
    pub(crate) fn new(
        name: String,
        outbox: mpsc::Sender<WorkerMessage>,
        ssh: crate::ssh::SshShared,
    ) -> Self {
        Self {
            name,
            keys: RwLock::new(None),
            sessions: Mutex::new(HashMap::new()),
            cancelled: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            ready_changed: tokio::sync::Notify::new(),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            outbox,
            link: watch::Sender::new(LinkState::Down {
                since: Instant::now(),
            }),
            ssh,
            postgres: crate::postgres::PostgresState::default(),
            spool: None,
            metrics: crate::metrics::WorkerMetrics::new(),
        }
    }

    /// Spools auditable reports to disk until the controller acknowledges them.
    pub(crate) fn with_spool(mut self, spool: crate::spool::Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// The audit spool, if any.
    pub(crate) fn spool(&self) -> Option<&crate::spool::Spool> {
        self.spool.as_ref()
    }

    /// Sets the postgres proxy's settings.
    pub(crate) fn with_postgres(mut self, config: crate::postgres::PostgresConfig) -> Self {
        self.postgres = crate::postgres::PostgresState::new(config);
        self
    }

    /// This worker's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn keys(&self) -> Option<Arc<TrustedKeys>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_keys(&self, keys: TrustedKeys) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(keys));
    }

    // --- the control link -------------------------------------------------------------

    pub(crate) fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    pub(crate) fn set_link_up(&self) {
        self.link.send_replace(LinkState::Up);
    }

    /// Marks the link down (keeping the earlier time if it already was) and fails every
    /// activation still waiting for an answer.
    pub(crate) fn set_link_down(&self) {
        self.link.send_if_modified(|state| match state {
            LinkState::Up => {
                *state = LinkState::Down {
                    since: Instant::now(),
                };
                true
            }
            LinkState::Down { .. } => false,
        });
        lock(&self.pending).clear();
        // A cancellation sent while the link was down would not be heard: grants pushed
        // before it are no longer trusted, and those sessions activate with a round trip.
        lock(&self.ready).clear();
    }

    fn link_is_up(&self) -> bool {
        matches!(*self.link.borrow(), LinkState::Up)
    }

    /// A connection of `session` is over: reports what it carried and why it ended, frees
    /// its slot (`guard`), and ends the session if its connection limit is used up — nothing
    /// more can happen in it (DESIGN §3.5).
    pub(crate) fn connection_closed(
        &self,
        session: &Session,
        guard: StreamGuard,
        up: u64,
        down: u64,
        reason: String,
    ) {
        tracing::debug!(session = %session.id, up, down, %reason, "connection closed");
        self.report(WorkerMessage::ConnectionClosed {
            session_id: session.id.clone(),
            bytes_up: up,
            bytes_down: down,
            reason,
        });
        drop(guard);
        if session.exhausted() {
            self.end_session(
                &session.id,
                close::CANCELLED,
                "connection limit reached",
                Some("connection limit"),
            );
        }
    }

    /// Queues a message for the controller; it is sent when the link is (back) up.
    pub(crate) fn report(&self, msg: WorkerMessage) {
        self.metrics.observe(&msg);
        // Auditable reports go through the spool: kept on disk until acknowledged.
        let msg = match (msg, &self.spool) {
            (
                msg @ (WorkerMessage::ConnectionClosed { .. } | WorkerMessage::Audit { .. }),
                Some(spool),
            ) => {
                spool.push(&msg);
                return;
            }
            (msg, _) => msg,
        };
        self.send(msg);
    }

    /// Reports an audit event of `session` (a [`WorkerMessage::Audit`]) whose details are
    /// serialized from `details` straight into the spool's JSON text.
    pub(crate) fn audit<D: serde::Serialize + ?Sized>(
        &self,
        session: &SessionId,
        action: &str,
        details: &D,
    ) {
        let Some(spool) = &self.spool else {
            let details = serde_json::to_value(details).unwrap_or_default();
            return self.report(WorkerMessage::Audit {
                session_id: session.clone(),
                action: action.to_owned(),
                details,
            });
        };
        self.metrics.audit_event();
        spool.push(&AuditRef {
            session_id: session.as_str(),
            action,
            details,
        });
    }

    fn send(&self, msg: WorkerMessage) {
        if let Err(e) = self.outbox.try_send(msg) {
            let why = e.to_string();
            tracing::warn!(
                "dropping a report to the controller ({why}): {:?}",
                e.into_inner()
            );
        }
    }

    /// Like [`Self::report`], but says whether the message could be queued.
    pub(crate) fn try_report(&self, msg: WorkerMessage) -> bool {
        match self.outbox.try_send(msg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot queue a message to the controller: {e}");
                false
            }
        }
    }

    // --- activation ---------------------------------------------------------------------

    /// Asks the controller whether the session may start.
    pub(crate) async fn activate(
        &self,
        session_id: &SessionId,
    ) -> Result<SessionGrant, ActivationError> {
        if !self.link_is_up() {
            return Err(ActivationError::Unavailable(
                "the worker is not connected to its controller",
            ));
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let msg = WorkerMessage::Activate {
            id,
            session_id: session_id.clone(),
        };
        if self.outbox.try_send(msg).is_err() {
            lock(&self.pending).remove(&id);
            return Err(ActivationError::Unavailable(
                "the worker's queue to its controller is full",
            ));
        }
        let answer = tokio::time::timeout(ACTIVATION_TIMEOUT, rx).await;
        lock(&self.pending).remove(&id);
        match answer {
            Ok(Ok(Activation::Granted(grant))) => Ok(grant),
            Ok(Ok(Activation::Refused(reason))) => Err(ActivationError::Refused(reason)),
            Ok(Err(_)) => Err(ActivationError::Unavailable(
                "the worker lost its controller while activating the session",
            )),
            Err(_) => Err(ActivationError::Unavailable(
                "the controller did not answer the activation within 5 s",
            )),
        }
    }

    /// Keeps the grant the controller pushed for a session it just authorized here.
    pub(crate) fn session_ready(&self, id: SessionId, expires_at: i64, grant: SessionGrant) {
        if lock(&self.cancelled).contains_key(&id) {
            return;
        }
        let mut ready = lock(&self.ready);
        if ready.len() >= READY_CAPACITY {
            let now = unix_now();
            ready.retain(|_, (exp, _)| *exp > now);
            if ready.len() >= READY_CAPACITY {
                tracing::debug!(session = %id, "too many sessions awaiting their client: this one will activate with a round trip");
                return;
            }
        }
        ready.insert(id, (expires_at, grant));
        drop(ready);
        self.ready_changed.notify_waiters();
    }

    /// Starts session `id` on its pushed grant, if there is one, it has not expired and the
    /// controller is reachable (to hear of a revocation); the controller is told that it
    /// started. With `pushed` (the controller told the client it pushed the grant), waits
    /// up to [`READY_WAIT`] for it. `None`: ask the controller ([`Self::activate`]).
    pub(crate) async fn take_ready(&self, id: &SessionId, pushed: bool) -> Option<SessionGrant> {
        let deadline = Instant::now() + if pushed { READY_WAIT } else { Duration::ZERO };
        let (expires_at, grant) = loop {
            let changed = self.ready_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = lock(&self.ready).remove(id) {
                break found;
            }
            if lock(&self.cancelled).contains_key(id)
                || tokio::time::timeout_at(deadline, changed).await.is_err()
            {
                return None;
            }
        };
        if expires_at <= unix_now() || !self.link_is_up() {
            return None;
        }
        self.try_report(WorkerMessage::SessionStarted {
            session_id: id.clone(),
        })
        .then_some(grant)
    }

    /// Is activation request `id` still awaited? (A request queued while the link was down
    /// and already given up on is not sent.)
    pub(crate) fn activation_awaited(&self, id: u64) -> bool {
        lock(&self.pending).contains_key(&id)
    }

    /// Completes activation request `id` with the controller's answer.
    pub(crate) fn complete_activation(&self, id: u64, answer: Activation) {
        match lock(&self.pending).remove(&id) {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => tracing::debug!(id, "answer to an activation no longer awaited"),
        }
    }

    // --- sessions -----------------------------------------------------------------------

    /// Ids of the sessions carried now.
    pub(crate) fn session_ids(&self) -> Vec<SessionId> {
        lock(&self.sessions).keys().cloned().collect()
    }

    /// Sessions and proxied connections carried now.
    pub(crate) fn load(&self) -> (u32, u32) {
        let sessions = lock(&self.sessions);
        let conns = sessions.values().map(|s| lock(&s.inner).open_streams).sum();
        (count(sessions.len()), conns)
    }

    /// Adds `conn` to its session if this worker carries it; otherwise, if the controller
    /// has just `activated` it, creates the session (and its expiry timer).
    pub(crate) fn attach(
        self: &Arc<Self>,
        claims: &SessionClaims,
        conn: &quinn::Connection,
        activated: Option<SessionGrant>,
    ) -> Result<Arc<Session>, AttachError> {
        let mut sessions = lock(&self.sessions);
        if lock(&self.cancelled).contains_key(&claims.sid) {
            return Err(AttachError::Cancelled);
        }
        if let Some(session) = sessions.get(&claims.sid) {
            let mut inner = lock(&session.inner);
            if inner.ended.is_none() {
                inner.conns.push(conn.clone());
                return Ok(session.clone());
            }
        }
        let Some(grant) = activated else {
            return Err(AttachError::NotActive);
        };
        let session = Arc::new(Session {
            id: claims.sid.clone(),
            endpoint: claims.endpoint.clone(),
            claims: claims.clone(),
            grant,
            limit: claims.connection_limit,
            inner: Mutex::new(SessionInner {
                conns: vec![conn.clone()],
                opened: 0,
                open_streams: 0,
                ended: None,
                expiry: None,
            }),
        });
        let shared = self.clone();
        let id = claims.sid.clone();
        let delay = until_unix(claims.exp);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            tracing::info!(session = %id, "session expired");
            shared.end_session(&id, close::EXPIRED, "session expired", Some("expired"));
        });
        lock(&session.inner).expiry = Some(timer.abort_handle());
        sessions.insert(claims.sid.clone(), session.clone());
        Ok(session)
    }

    /// Removes `conn` from its session; the session ends when its last connection does.
    pub(crate) fn detach(&self, session: &Arc<Session>, conn: &quinn::Connection, reason: &str) {
        let ended_now = {
            let mut sessions = lock(&self.sessions);
            let mut inner = lock(&session.inner);
            let stable_id = conn.stable_id();
            inner.conns.retain(|c| c.stable_id() != stable_id);
            if !inner.conns.is_empty() || inner.ended.is_some() {
                false
            } else {
                inner.ended = Some(reason.to_owned());
                if let Some(timer) = inner.expiry.take() {
                    timer.abort();
                }
                if sessions
                    .get(&session.id)
                    .is_some_and(|s| Arc::ptr_eq(s, session))
                {
                    sessions.remove(&session.id);
                }
                true
            }
        };
        if ended_now {
            tracing::info!(session = %session.id, reason, "session closed");
            self.metrics.session_ended();
            self.report(WorkerMessage::SessionClosed {
                session_id: session.id.clone(),
                reason: reason.to_owned(),
            });
        }
    }

    /// Remembers that the controller cancelled `id`, so that it is not (re)started here.
    pub(crate) fn forget_cancelled(&self, id: &SessionId) {
        lock(&self.ready).remove(id);
        {
            let mut cancelled = lock(&self.cancelled);
            let now = Instant::now();
            cancelled.retain(|_, at| now.duration_since(*at) < CANCELLED_MEMORY);
            cancelled.insert(id.clone(), now);
        }
        self.ready_changed.notify_waiters();
    }

    /// Ends session `id`: closes its QUIC connections with `code` and `reason` (which also
    /// ends its relays and target sockets) and, with `report`, tells the controller.
    /// Returns how many proxied connections were cut, or `None` if there is no such session.
    pub(crate) fn end_session(
        &self,
        id: &SessionId,
        code: u32,
        reason: &str,
        report: Option<&str>,
    ) -> Option<u32> {
        let session = lock(&self.sessions).remove(id)?;
        Some(self.end(&session, code, reason, report))
    }

    /// Ends every session; returns how many there were.
    pub(crate) fn end_all(&self, code: u32, reason: &str, report: Option<&str>) -> usize {
        let all: Vec<_> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for session in &all {
            self.end(session, code, reason, report);
        }
        all.len()
    }

    fn end(&self, session: &Session, code: u32, reason: &str, report: Option<&str>) -> u32 {
        let (conns, cut) = {
            let mut inner = lock(&session.inner);
            if inner.ended.is_none() {
                inner.ended = Some(reason.to_owned());
                self.metrics.session_ended();
            }
            if let Some(timer) = inner.expiry.take() {
                timer.abort();
            }
            (std::mem::take(&mut inner.conns), inner.open_streams)
        };
        for conn in conns {
            conn.close(VarInt::from_u32(code), reason.as_bytes());
        }
        if let Some(report) = report {
            self.report(WorkerMessage::SessionClosed {
                session_id: session.id.clone(),
                reason: report.to_owned(),
            });
        }
        cut
    }
}

impl Session {
    /// Counts a new proxied connection, if the session is live and under its limit.
    pub(crate) fn open_stream(self: &Arc<Self>) -> Result<StreamGuard, OpenRefusal> {
        let mut inner = lock(&self.inner);
        if let Some(reason) = &inner.ended {
            return Err(OpenRefusal::Ended(reason.clone()));
        }
        if let Some(limit) = self.limit {
            if inner.opened >= limit {
                return Err(OpenRefusal::Limit(limit));
            }
        }
        inner.opened += 1;
        inner.open_streams += 1;
        Ok(StreamGuard {
            session: self.clone(),
        })
    }

    /// Whether the connection limit is used up and no connection is open any more.
    pub(crate) fn exhausted(&self) -> bool {
        let inner = lock(&self.inner);
        self.limit.is_some_and(|l| inner.opened >= l) && inner.open_streams == 0
    }

    /// Why the session ended, if it has.
    pub(crate) fn ended(&self) -> Option<String> {
        lock(&self.inner).ended.clone()
    }
}

impl StreamGuard {
    /// The target could not be reached: this attempt does not count towards the limit.
    pub(crate) fn release_attempt(&self) {
        let mut inner = lock(&self.session.inner);
        inner.opened = inner.opened.saturating_sub(1);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut inner = lock(&self.session.inner);
        inner.open_streams = inner.open_streams.saturating_sub(1);
    }
}

/// Locks `m`, going on if a panicking thread poisoned it (the data stays consistent: every
/// critical section is a few infallible statements).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Time from now until Unix second `secs` (zero if past).
fn until_unix(secs: i64) -> Duration {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}
