//! The worker's health and metrics listener (`metrics_listen`, plain HTTP, off by default):
//! `/healthz` (the process answers), `/readyz` (the control connection to a controller is up)
//! and `/metrics` (Prometheus, OpenMetrics text).
//!
//! Counters move as reports to the controller are queued (every closed connection carries
//! its bytes); gauges (sessions, connections, spool depth, controller link) are read from the
//! shared state when scraped. One registry per worker: tests run several in one process.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use postern_proto::cluster::WorkerMessage;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::state::{LinkState, Shared};

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = [(&'static str, String); 1];

/// The worker's metrics.
pub(crate) struct WorkerMetrics {
    registry: Registry,
    bytes: Family<Labels, Counter>,
    connections_closed: Counter,
    sessions_closed: Counter,
    revocations: Counter,
    audit_events: Counter,
    sessions_active: Gauge,
    connections_active: Gauge,
    spool_depth: Gauge,
    controller_connected: Gauge,
    controller_down: Gauge<f64, AtomicU64>,
}

impl WorkerMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("postern");
        let bytes = Family::<Labels, Counter>::default();
        registry.register(
            "relayed_bytes",
            "Bytes relayed by closed connections (direction: up = client to target, down)",
            bytes.clone(),
        );
        let connections_closed = Counter::default();
        registry.register(
            "connections_closed",
            "Proxied connections closed",
            connections_closed.clone(),
        );
        let sessions_closed = Counter::default();
        registry.register(
            "sessions_closed",
            "Sessions this worker ended or saw end",
            sessions_closed.clone(),
        );
        let revocations = Counter::default();
        registry.register(
            "revocations",
            "Cancellations received from the controller and carried out",
            revocations.clone(),
        );
        let audit_events = Counter::default();
        registry.register(
            "audit_events",
            "Audit events (closed connections, statements, exec commands, …) queued for the controller",
            audit_events.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Sessions this worker carries",
            sessions_active.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "connections_active",
            "Proxied connections open now",
            connections_active.clone(),
        );
        let spool_depth = Gauge::default();
        registry.register(
            "audit_spool_depth",
            "Audit events spooled on disk and not yet acknowledged by the controller",
            spool_depth.clone(),
        );
        let controller_connected = Gauge::default();
        registry.register(
            "controller_connected",
            "1 while the control connection to a controller is up",
            controller_connected.clone(),
        );
        let controller_down = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "controller_disconnected",
            "How long the control connection has been down (0 while up); sessions end after the grace period",
            Unit::Seconds,
            controller_down.clone(),
        );
        WorkerMetrics {
            registry,
            bytes,
            connections_closed,
            sessions_closed,
            revocations,
            audit_events,
            sessions_active,
            connections_active,
            spool_depth,
            controller_connected,
            controller_down,
        }
    }

    /// An audit event was reported.
    pub(crate) fn audit_event(&self) {
        self.audit_events.inc();
    }

    /// A session ended, however (its client, expiry, a cancellation, fail-closed): counted
    /// here rather than from the report, which a cancelled session does not send.
    pub(crate) fn session_ended(&self) {
        self.sessions_closed.inc();
    }

    /// Counts what a report to the controller says happened.
    pub(crate) fn observe(&self, msg: &WorkerMessage) {
        match msg {
            WorkerMessage::ConnectionClosed {
                bytes_up,
                bytes_down,
                ..
            } => {
                self.connections_closed.inc();
                // Queued for the controller's audit log like a statement.
                self.audit_event();
                self.bytes
                    .get_or_create(&[("direction", "up".to_owned())])
                    .inc_by(*bytes_up);
                self.bytes
                    .get_or_create(&[("direction", "down".to_owned())])
                    .inc_by(*bytes_down);
            }
            WorkerMessage::CancelAck { .. } => {
                self.revocations.inc();
            }
            WorkerMessage::Audit { .. } => self.audit_event(),
            _ => {}
        }
    }

    /// The OpenMetrics text, with the gauges read from `shared`.
    fn render(&self, shared: &Shared) -> String {
        let (sessions, connections) = shared.load();
        self.sessions_active.set(i64::from(sessions));
        self.connections_active.set(i64::from(connections));
        let depth = shared.spool().map_or(0, |s| s.len());
        self.spool_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        let link = *shared.link().borrow();
        match link {
            LinkState::Up => {
                self.controller_connected.set(1);
                self.controller_down.set(0.0);
            }
            LinkState::Down { since } => {
                self.controller_connected.set(0);
                self.controller_down.set(since.elapsed().as_secs_f64());
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::error!(?addr, error = %e, "metrics listener failed");
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let up = matches!(*shared.link().borrow(), LinkState::Up);
    if up {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to a controller",
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)],
        shared.metrics.render(&shared),
    )
        .into_response()
}
