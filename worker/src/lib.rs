//! # postern-worker
//!
//! The worker carries sessions: clients reach it over QUIC with a session token signed by
//! the controller; it checks the token (and that the client holds the key the token is bound
//! to), activates the session at the controller, and relays each proxied connection to the
//! target. It keeps one control connection to the controller, which pushes cancellations,
//! and it fails closed: sessions end when the controller has been unreachable for longer
//! than a grace period.
//!
//! # Layout
//! - `config`: the TOML config and its `POSTERN_*` environment overrides.
//! - `register`: first-start registration (CSR + activation token) and the saved identity.
//! - `tls`: rustls / quinn configurations, including the client-key verifier.
//! - `frames`: reading and writing `proto` frames on QUIC streams.
//! - `state`: what the tasks share: trusted keys, sessions, pending activations, the outbox.
//! - `control`: the control connection to the controller and the fail-closed watchdog.
//! - `listener`: the session listener and the session hello.
//! - `relay`: one proxied TCP connection per QUIC stream.
//! - `outbound`: outbound-only mode: the session endpoint on a virtual socket fed by the
//!   controller's relay over the cluster connection.
//! - [`postgres`]: the PostgreSQL proxy (wire protocol, brokered login, statement audit,
//!   per-session roles); its sans-IO codec is public for the fuzz target.
//! - `controller_http`: the HTTPS client of the controller API and the CA it trusts.
//! - `metrics`: the health and metrics listener (`/healthz`, `/readyz`, `/metrics`).
//! - `ssh`: the SSH proxy (russh server towards the engineer, client towards the target),
//!   shell recording and exec audit.
#![forbid(unsafe_code)]

mod config;
mod control;
mod controller_http;
mod frames;
mod listener;
mod metrics;
mod outbound;
pub mod postgres;
pub mod pump;
mod register;
mod relay;
mod spool;
mod ssh;
mod state;
mod tls;
pub mod udp;

pub use controller_http::normalize_fingerprint;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_proto::cluster::WorkerMode;
use postern_proto::session::close;
use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::{ConfigError, WorkerConfig};
pub use postgres::PostgresConfig;
pub use register::RegisterError;
pub use tls::{session_crypto, session_transport_for, TlsError};

/// How long the listener may take to end its sessions at shutdown.
const LISTENER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the control task may take to flush its reports at shutdown.
const CONTROL_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Registration failed, or the saved identity is unusable.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The identity cannot be turned into TLS configurations.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The SSH host key cannot be loaded or created.
    #[error(transparent)]
    SshHostKey(#[from] ssh::HostKeyError),
    /// The session listener could not bind.
    #[error("cannot listen for sessions on {addr}: {error}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The health and metrics listener could not bind.
    #[error("cannot listen for metrics on {addr}: {error}")]
    MetricsBind {
        /// The configured address.
        addr: SocketAddr,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another worker runs with the same data directory.
    #[error(
        "another worker is running with the data directory {} (it holds worker.lock there): \
         stop it first, or give this one a data_dir of its own",
        .0.display()
    )]
    DataDirInUse(std::path::PathBuf),
    /// The audit spool could not be opened.
    #[error("cannot open the audit spool in {path}: {error}")]
    Spool {
        /// The data directory.
        path: std::path::PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

pub use postern_proto::try_lock_file;

/// A running worker. Dropping it stops the worker in the background; [`Self::shutdown`]
/// stops it and waits.
pub struct WorkerHandle {
    name: String,
    session_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    listener_stop: watch::Sender<bool>,
    control_stop: watch::Sender<bool>,
    listener: Option<JoinHandle<()>>,
    /// Session lanes past the first: each ends (its sender dropped) when its thread does.
    lanes: Vec<tokio::sync::oneshot::Receiver<()>>,
    control: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    /// The lock on the data directory, held while the worker runs.
    _data_dir_lock: std::fs::File,
}

/// Registers if needed, binds the session listener and starts the control connection;
/// returns once the listener accepts connections (the controller may not be reached yet).
pub async fn start(config: WorkerConfig) -> Result<WorkerHandle, WorkerError> {
    let started = tokio::time::Instant::now();
    config.validate()?;
    if controller_http::plain_http_off_loopback(&config.controller_url) {
        tracing::warn!(
            url = %config.controller_url,
            "controller_url is plain HTTP to another machine: the activation token travels in clear; use https://"
        );
    }
    // Two workers on one data directory would share an identity (and take the controller
    // connection from each other in turn) and an audit spool.
    let data_dir_lock = register::lock_data_dir(&config.data_dir)?
        .ok_or_else(|| WorkerError::DataDirInUse(config.data_dir.clone()))?;
    // Bound before registering, so that a taken port fails the start at once.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| WorkerError::MetricsBind { addr, error })?,
        ),
        None => None,
    };
    let identity = register::load_or_register(&config).await?;
    let server_config = tls::session_server_config(&identity)?;
    let client_config = tls::control_client_config(&identity)?;
    let outbound_only = config.mode == WorkerMode::OutboundOnly;
    let mut lane_sockets = Vec::new();
    let (endpoint, relay, per_path) = if outbound_only {
        // No socket at all: clients come through the controller's relay.
        let (endpoint, relay) =
            outbound::Relay::endpoint(server_config).map_err(|error| WorkerError::Bind {
                addr: config.session_listen,
                error,
            })?;
        (endpoint, Some(relay), None)
    } else {
        let per_path = Arc::new(server_config.clone());
        let bind_error = |error| WorkerError::Bind {
            addr: config.session_listen,
            error,
        };
        let endpoint = if config.session_lanes > 1 {
            // Lane 0 here, the others on threads of their own (below), all on one port.
            lane_sockets = udp::lane_sockets(config.session_listen, config.session_lanes as usize)
                .map_err(bind_error)?;
            udp::endpoint_on(lane_sockets.remove(0), Some(server_config))
        } else {
            udp::endpoint(config.session_listen, Some(server_config))
        }
        .map_err(bind_error)?;
        (endpoint, None, Some(per_path))
    };
    let session_addr = endpoint.local_addr().map_err(|error| WorkerError::Bind {
        addr: config.session_listen,
        error,
    })?;
    let advertised = match (&config.public_addr, outbound_only) {
        // The controller answers its relay's address instead.
        (_, true) => String::new(),
        (Some(public), false) => public.clone(),
        (None, false) => session_addr.to_string(),
    };
    if outbound_only && config.session_lanes > 1 {
        tracing::warn!(
            "session_lanes is not used in outbound-only mode: the controller's relay carries \
             this worker's sessions over its one connection"
        );
    }
    if outbound_only && config.public_addr.is_some() {
        tracing::warn!(
            "public_addr is not used in outbound-only mode: clients reach this worker through \
             the controller's relay, and it listens on no port"
        );
    }
    if !outbound_only && config.public_addr.is_none() && session_addr.ip().is_unspecified() {
        tracing::warn!(
            "listening on {session_addr} without public_addr: clients will be told to dial \
             {advertised}; set public_addr to an address they can reach"
        );
    }

    let (outbox_tx, outbox_rx) = mpsc::channel(state::OUTBOX_CAPACITY);
    let ssh = ssh::SshShared::load_or_create(&config.data_dir)?;
    let shared = Arc::new(
        state::Shared::new(identity.name.clone(), outbox_tx, ssh)
            .with_postgres(config.postgres.clone())
            .with_spool(spool::Spool::open(&config.data_dir).map_err(|error| {
                WorkerError::Spool {
                    path: config.data_dir.clone(),
                    error,
                }
            })?),
    );
    let (listener_stop, listener_stop_rx) = watch::channel(false);
    let (control_stop, control_stop_rx) = watch::channel(false);
    // Spooled events reach the file in groups; the last group when the worker stops.
    tokio::spawn({
        let shared = shared.clone();
        let mut stop = control_stop_rx.clone();
        async move {
            if let Some(spool) = shared.spool() {
                tokio::select! {
                    () = spool.write_loop() => {}
                    _ = stop.changed() => spool.write_now(),
                }
            }
        }
    });

    let mut lanes = Vec::new();
    for (i, socket) in lane_sockets.into_iter().enumerate() {
        lanes.push(spawn_lane(
            i + 1,
            socket,
            per_path.clone(),
            shared.clone(),
            listener_stop_rx.clone(),
            config.session_listen,
        )?);
    }
    let listener = tokio::spawn(listener::accept_loop(
        endpoint.clone(),
        per_path,
        shared.clone(),
        listener_stop_rx.clone(),
        (config.session_lanes > 1).then_some(0),
    ));
    let control = tokio::spawn(
        control::ControlTask {
            shared: shared.clone(),
            cluster_addrs: identity.cluster_addrs.clone(),
            client_config,
            session_addr: advertised.clone(),
            mode: config.mode,
            relay,
            outbox: outbox_rx,
            stop: control_stop_rx,
            started,
            addr_source: (config.clone(), identity.ca.clone()),
        }
        .run(),
    );
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = metrics_listener {
        tokio::spawn(metrics::serve(
            listener,
            shared.clone(),
            listener_stop_rx.clone(),
        ));
    }
    let watchdog = tokio::spawn(control::fail_closed(
        shared,
        config.grace_period,
        listener_stop_rx,
    ));
    if outbound_only {
        tracing::info!(
            worker = %identity.name,
            "worker is outbound-only: clients reach it through its controller's relay"
        );
    } else {
        tracing::info!(
            worker = %identity.name,
            %session_addr,
            %advertised,
            "worker listening for sessions"
        );
    }
    Ok(WorkerHandle {
        name: identity.name,
        session_addr,
        metrics_addr,
        endpoint,
        listener_stop,
        control_stop,
        listener: Some(listener),
        lanes,
        control: Some(control),
        watchdog: Some(watchdog),
        _data_dir_lock: data_dir_lock,
    })
}

/// Session lane `index`: a thread of its own running a one-thread runtime, whose endpoint on
/// `socket` accepts the session connections the kernel steers to that socket, until `stop`.
fn spawn_lane(
    index: usize,
    socket: std::net::UdpSocket,
    server: Option<Arc<quinn::ServerConfig>>,
    shared: Arc<state::Shared>,
    stop: watch::Receiver<bool>,
    session_listen: SocketAddr,
) -> Result<tokio::sync::oneshot::Receiver<()>, WorkerError> {
    let addr = socket.local_addr().unwrap_or(session_listen);
    let bind_error = |error| WorkerError::Bind { addr, error };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(bind_error)?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("postern-lane-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let config = server.as_deref().cloned();
                match udp::endpoint_on(socket, config) {
                    Ok(endpoint) => {
                        listener::accept_loop(endpoint, server, shared, stop, Some(index as u32))
                            .await
                    }
                    Err(e) => tracing::error!(lane = index, "session lane failed to start: {e}"),
                }
            });
            drop(done);
        })
        .map_err(bind_error)?;
    Ok(finished)
}

/// Runs the worker until `shutdown` completes, then stops it.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let handle = start(config).await?;
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

impl WorkerHandle {
    /// The address the session listener is bound to.
    pub fn session_addr(&self) -> SocketAddr {
        self.session_addr
    }

    /// The address of the health and metrics listener, if `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The worker's registered name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends every session (close code `SHUTDOWN`), closes the listener, flushes reports to
    /// the controller and stops every task.
    pub async fn shutdown(mut self) {
        self.listener_stop.send_replace(true);
        if let Some(task) = self.listener.take() {
            let lanes = futures::future::join_all(std::mem::take(&mut self.lanes));
            if tokio::time::timeout(LISTENER_STOP_TIMEOUT, async { tokio::join!(task, lanes) })
                .await
                .is_err()
            {
                tracing::warn!("session listener did not stop in time");
            }
        }
        self.control_stop.send_replace(true);
        if let Some(task) = self.control.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(CONTROL_STOP_TIMEOUT, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        if let Some(task) = self.watchdog.take() {
            task.abort();
        }
        tracing::info!(worker = %self.name, "worker stopped");
    }
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("name", &self.name)
            .field("session_addr", &self.session_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // Idempotent: after `shutdown` this changes nothing.
        self.listener_stop.send_replace(true);
        self.control_stop.send_replace(true);
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"worker shutting down");
    }
}
