//! Prometheus metrics at `/metrics` (OpenMetrics text), one registry per controller (no
//! global recorder: tests run several controllers in one process).
//!
//! Counters and histograms move where things happen (authorize, revocations, connection
//! reports); gauges that describe the present (active sessions, connected workers, the age of
//! each worker's last message) are computed when scraped.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::api::types::SessionQuery;
use crate::state::AppState;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long an unacknowledged revocation is remembered for its latency.
const REVOCATION_MEMORY: Duration = Duration::from_secs(300);

type Labels = [(&'static str, String); 1];

/// The controller's metrics.
pub struct ControllerMetrics {
    registry: Registry,
    authorizations: Family<Labels, Counter>,
    authorize_seconds: Histogram,
    revocations: Family<Labels, Counter>,
    revocation_seconds: Histogram,
    bytes: Family<Labels, Counter>,
    connections_closed: Counter,
    sessions_active: Gauge,
    workers_connected: Gauge,
    worker_sessions: Family<Labels, Gauge>,
    worker_connections: Family<Labels, Gauge>,
    worker_last_contact: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Per connected worker: when it last said anything, and its last heartbeat's load.
    contacts: Mutex<HashMap<String, Contact>>,
    /// Revocations pushed to a worker and not yet acknowledged: session id → when.
    pending_revocations: Mutex<HashMap<String, Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Contact {
    at: Instant,
    sessions: u32,
    connections: u32,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControllerMetrics")
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("postern");
        let authorizations = Family::<Labels, Counter>::default();
        registry.register(
            "authorizations",
            "Session authorizations by outcome (granted, denied, unauthenticated, not_found, refused, error)",
            authorizations.clone(),
        );
        // 1 ms … ~4 s.
        let authorize_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 13));
        registry.register_with_unit(
            "authorize_duration",
            "Time to answer POST /v1/targets/{name}/authorize",
            Unit::Seconds,
            authorize_seconds.clone(),
        );
        let revocations = Family::<Labels, Counter>::default();
        registry.register(
            "revocations",
            "Sessions revoked (cancel, lock, target or policy change) by how the worker was told (pushed, notified, not_connected)",
            revocations.clone(),
        );
        let revocation_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "revocation_duration",
            "From a revocation's push to the worker's acknowledgement that the connections are cut",
            Unit::Seconds,
            revocation_seconds.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        registry.register(
            "relayed_bytes",
            "Bytes relayed by closed connections, as workers report them (direction: up = client to target, down)",
            bytes.clone(),
        );
        let connections_closed = Counter::default();
        registry.register(
            "connections_closed",
            "Proxied connections closed, as workers report them",
            connections_closed.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Sessions pending or active in the store (the whole cluster)",
            sessions_active.clone(),
        );
        let workers_connected = Gauge::default();
        registry.register(
            "workers_connected",
            "Workers whose control connection this controller holds",
            workers_connected.clone(),
        );
        let worker_sessions = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_sessions_active",
            "Sessions a connected worker carries (its last heartbeat)",
            worker_sessions.clone(),
        );
        let worker_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_connections_active",
            "Proxied connections open on a connected worker (its last heartbeat)",
            worker_connections.clone(),
        );
        let worker_last_contact = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "worker_last_contact_age",
            "Time since a connected worker's last message on its control connection",
            Unit::Seconds,
            worker_last_contact.clone(),
        );
        ControllerMetrics {
            registry,
            authorizations,
            authorize_seconds,
            revocations,
            revocation_seconds,
            bytes,
            connections_closed,
            sessions_active,
            workers_connected,
            worker_sessions,
            worker_connections,
            worker_last_contact,
            contacts: Mutex::new(HashMap::new()),
            pending_revocations: Mutex::new(HashMap::new()),
        }
    }

    /// An authorization was answered with `status` after `elapsed`.
    pub fn authorized(&self, status: u16, elapsed: Duration) {
        let outcome = match status {
            200..=299 => "granted",
            401 => "unauthenticated",
            403 => "denied",
            404 => "not_found",
            500..=599 => "error",
            _ => "refused",
        };
        self.authorizations
            .get_or_create(&[("outcome", outcome.to_owned())])
            .inc();
        self.authorize_seconds.observe(elapsed.as_secs_f64());
    }

    /// A session was revoked; `delivery` says how its worker was told.
    pub fn revoked(&self, delivery: &str) {
        let delivery = match delivery {
            "pushed" => "pushed",
            "notified" => "notified",
            _ => "not_connected",
        };
        self.revocations
            .get_or_create(&[("delivery", delivery.to_owned())])
            .inc();
    }

    /// Times a cancellation that `push` puts on a worker's control stream, returning what
    /// `push` returned (whether it went out). The clock starts before the push, so an
    /// acknowledgement that comes back before `push` returns still finds it.
    pub fn time_revocation(&self, session_id: &str, push: impl FnOnce() -> bool) -> bool {
        let now = Instant::now();
        {
            let mut pending = lock(&self.pending_revocations);
            pending.retain(|_, at| now.duration_since(*at) < REVOCATION_MEMORY);
            pending.insert(session_id.to_owned(), now);
        }
        let pushed = push();
        if !pushed {
            lock(&self.pending_revocations).remove(session_id);
        }
        pushed
    }

    /// The worker acknowledged a cancellation.
    pub fn revocation_acked(&self, session_id: &str) {
        if let Some(at) = lock(&self.pending_revocations).remove(session_id) {
            self.revocation_seconds.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A worker reported a closed connection.
    pub fn connection_closed(&self, bytes_up: u64, bytes_down: u64) {
        self.connections_closed.inc();
        self.bytes
            .get_or_create(&[("direction", "up".to_owned())])
            .inc_by(bytes_up);
        self.bytes
            .get_or_create(&[("direction", "down".to_owned())])
            .inc_by(bytes_down);
    }

    /// A message arrived from `worker` on its control stream; `load` is a heartbeat's
    /// (sessions, connections).
    pub fn worker_contact(&self, worker: &str, load: Option<(u32, u32)>) {
        let mut contacts = lock(&self.contacts);
        let entry = contacts.entry(worker.to_owned()).or_insert(Contact {
            at: Instant::now(),
            sessions: 0,
            connections: 0,
        });
        entry.at = Instant::now();
        if let Some((sessions, connections)) = load {
            entry.sessions = sessions;
            entry.connections = connections;
        }
    }

    /// `worker`'s control connection ended.
    pub fn worker_gone(&self, worker: &str) {
        lock(&self.contacts).remove(worker);
    }

    /// The OpenMetrics text of every metric, with the gauges brought up to date.
    pub fn render(&self, sessions_active: Option<i64>) -> String {
        if let Some(n) = sessions_active {
            self.sessions_active.set(n);
        }
        self.worker_sessions.clear();
        self.worker_connections.clear();
        self.worker_last_contact.clear();
        let contacts = lock(&self.contacts).clone();
        self.workers_connected
            .set(i64::try_from(contacts.len()).unwrap_or(i64::MAX));
        for (worker, c) in contacts {
            let labels = [("worker", worker)];
            self.worker_sessions
                .get_or_create(&labels)
                .set(i64::from(c.sessions));
            self.worker_connections
                .get_or_create(&labels)
                .set(i64::from(c.connections));
            self.worker_last_contact
                .get_or_create(&labels)
                .set(c.at.elapsed().as_secs_f64());
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// `GET /metrics`.
pub async fn serve(State(state): State<AppState>) -> Response {
    let active = state
        .store
        .sessions(&SessionQuery {
            active: Some(true),
            ..Default::default()
        })
        .await
        .map(|s| i64::try_from(s.len()).unwrap_or(i64::MAX));
    if let Err(e) = &active {
        tracing::warn!(error = %e, "metrics: cannot count active sessions");
    }
    (
        [(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)],
        state.metrics.render(active.ok()),
    )
        .into_response()
}

/// Middleware on the authorize route: counts its outcomes and times it.
pub async fn observe_authorize(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .authorized(response.status().as_u16(), started.elapsed());
    response
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_is_timed_from_before_its_push() {
        let m = ControllerMetrics::new();
        // The worker's acknowledgement can come back before the push returns.
        assert!(m.time_revocation("s1", || {
            m.revocation_acked("s1");
            true
        }));
        // A push that did not go out leaves nothing to time.
        assert!(!m.time_revocation("s2", || false));
        m.revocation_acked("s2");
        let text = m.render(None);
        assert!(
            text.contains("postern_revocation_duration_seconds_count 1\n"),
            "one revocation timed in\n{text}"
        );
        assert!(lock(&m.pending_revocations).is_empty());
    }

    #[test]
    fn renders_counters_and_gauges() {
        let m = ControllerMetrics::new();
        m.authorized(200, Duration::from_millis(3));
        m.authorized(403, Duration::from_millis(1));
        m.revoked("pushed");
        assert!(m.time_revocation("s1", || true));
        m.revocation_acked("s1");
        m.connection_closed(10, 20);
        m.worker_contact("w1", Some((2, 3)));
        let text = m.render(Some(4));
        for line in [
            "postern_authorizations_total{outcome=\"granted\"} 1",
            "postern_authorizations_total{outcome=\"denied\"} 1",
            "postern_authorize_duration_seconds_count 2",
            "postern_revocations_total{delivery=\"pushed\"} 1",
            "postern_revocation_duration_seconds_count 1",
            "postern_relayed_bytes_total{direction=\"down\"} 20",
            "postern_sessions_active 4",
            "postern_workers_connected 1",
            "postern_worker_sessions_active{worker=\"w1\"} 2",
            "postern_worker_connections_active{worker=\"w1\"} 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        m.worker_gone("w1");
        assert!(m.render(None).contains("postern_workers_connected 0"));
    }
}
