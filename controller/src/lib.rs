//! # postern-controller
//!
//! The controller knows users, targets and policy, authorizes sessions, and holds the
//! workers' control connections.
//!
//! # Layout
//! - [`config`]: the TOML config with `POSTERN_*` overrides.
//! - [`store`]: SQLite/PostgreSQL persistence (sqlx `Any`), migrations.
//! - [`keys`]: root keys sealed under the KEK: session-signing key, cluster CA.
//! - [`auth`]: passwords (argon2id) and API tokens.
//! - [`policy`]: the RBAC engine (pure).
//! - [`api`]: the `/v1` HTTP API (axum); [`api::types`] are its JSON bodies.
//! - [`cluster`]: the QUIC listener for workers (activation, reports, cancellation pushes).
//! - [`relay`]: the UDP relay that carries clients' QUIC datagrams to outbound-only workers.
//! - [`state`]: what handlers share.
//! - [`ssh_ca`]: the SSH user CA of certificate mode.
//! - [`recordings`]: worker requests of the SSH proxy: shell recordings, certificates.
//! - [`oidc`]: OpenID Connect single sign-on (code flow with PKCE, device flow, JIT users).
//! - [`tls`]: the API over TLS (certificate from files or from the cluster CA).
//! - [`metrics`]: Prometheus metrics at `/metrics`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod recordings;
pub mod relay;
pub mod revoke;
pub mod ssh_ca;
pub mod state;
pub mod store;
pub mod throttle;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;

pub use config::ControllerConfig;

use crate::api::types::{Effect, Principal, Rule};
use crate::keys::{Kek, RootKeys};
use crate::state::{AppState, Inner};
use crate::store::Store;

/// Starting the controller failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Root keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// The cluster listener could not start.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// A listener or file could not be opened.
    #[error("{0}")]
    Io(String),
}

/// The admin account created on first start when `bootstrap_admin` is set.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// User name (`admin`).
    pub user: String,
    /// Generated password.
    pub password: String,
}

/// A running controller.
#[derive(Debug)]
pub struct ControllerHandle {
    api_addr: SocketAddr,
    api_tls: bool,
    cluster_addr: SocketAddr,
    relay_addr: Option<SocketAddr>,
    bootstrap: Option<Bootstrap>,
    state: AppState,
    endpoint: quinn::Endpoint,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    audit_task: JoinHandle<()>,
    /// On SQLite, the lock that keeps a second controller off the database.
    _db_lock: Option<std::fs::File>,
}

impl ControllerHandle {
    /// The bound HTTP API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }
    /// The API's base URL: `https://ADDR`, or `http://ADDR` with `insecure_http`.
    pub fn api_url(&self) -> String {
        let scheme = if self.api_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.api_addr)
    }
    /// SHA-256 (hex) of the cluster CA certificate, which clients pin.
    pub fn ca_fingerprint(&self) -> String {
        tls::ca_fingerprint(&self.state.keys)
    }
    /// The bound cluster (QUIC) address.
    pub fn cluster_addr(&self) -> SocketAddr {
        self.cluster_addr
    }
    /// The bound relay (UDP) address for outbound-only workers, if it runs one.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }
    /// The admin created on this start, if any.
    pub fn bootstrap(&self) -> Option<&Bootstrap> {
        self.bootstrap.as_ref()
    }
    /// The store (for tests and `postern dev`).
    pub fn store(&self) -> &Store {
        &self.state.store
    }
    /// Stops the listeners and waits for the tasks.
    pub async fn shutdown(self) {
        for b in &self.background {
            b.abort();
        }
        let _ = self.shutdown.send(true);
        self.endpoint
            .close(0u32.into(), b"controller shutting down");
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // The audit writer stops once every holder of the state is gone; give events in
        // flight a moment to land before the store closes.
        let store = self.state.store.clone();
        drop(self.state);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.audit_task).await;
        store.close().await;
    }
}

/// Starts the controller: opens the store, loads root keys, binds both listeners.
pub async fn start(mut config: ControllerConfig) -> Result<ControllerHandle, StartError> {
    config.validate()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db_lock = lock_sqlite(&config.database_url)?;
    let found_kek = read_kek(&config)?;
    let store = Store::open(&config.database_url).await?;
    let kek = load_kek(found_kek, &store).await?;
    let keys = RootKeys::load_or_create(&store, &kek).await?;
    let issuer = store.cluster_id().await?;

    let endpoint = cluster::endpoint(&keys, config.cluster_listen)?;
    let cluster_addr = endpoint
        .local_addr()
        .map_err(|e| StartError::Io(e.to_string()))?;
    let cluster_addrs = if config.cluster_public_addrs.is_empty() {
        if cluster_addr.ip().is_unspecified() {
            tracing::warn!(
                "cluster listener on {cluster_addr} without cluster_public_addrs: workers will \
                 be told to dial {cluster_addr}; set cluster_public_addrs to addresses they can reach"
            );
        }
        vec![cluster_addr.to_string()]
    } else {
        config.cluster_public_addrs.clone()
    };
    let relay_socket = config
        .relay_listen
        .map(relay::bind)
        .transpose()
        .map_err(|e| StartError::Io(e.to_string()))?;
    let relay_addr = relay_socket
        .as_ref()
        .map(tokio::net::UdpSocket::local_addr)
        .transpose()
        .map_err(|e| StartError::Io(e.to_string()))?;
    if let Some(bound) = relay_addr.filter(|a| a.ip().is_unspecified()) {
        if config.relay_public_addr.is_none() {
            tracing::warn!(
                "relay on {bound} without relay_public_addr: clients of outbound-only workers \
                 will be told to dial {bound}; set relay_public_addr to an address they can reach"
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|e| {
            StartError::Io(format!(
                "cannot listen for the API on {}: {e}",
                config.api_listen
            ))
        })?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| StartError::Io(e.to_string()))?;
    let api_listener = if config.insecure_http {
        tls::ApiListener::Plain(listener)
    } else {
        let api_tls =
            tls::server_config(&config, &keys).map_err(|e| StartError::Io(e.to_string()))?;
        match &api_tls.source {
            tls::CertSource::ClusterCa { names } => tracing::info!(
                ?names,
                ca_fingerprint = %tls::ca_fingerprint(&keys),
                "API served over TLS with a certificate from the cluster CA; clients pin the CA at first login"
            ),
            _ => tracing::info!("API served over TLS with tls_cert_file"),
        }
        let browser_distrusts = matches!(api_tls.source, tls::CertSource::ClusterCa { .. });
        if let Some(m) = config.oidc.iter().find(|m| m.redirect_url.is_none()) {
            if browser_distrusts {
                tracing::warn!(
                    method = %m.name,
                    "single sign-on sends browsers back to https://{api_addr}/v1/auth/oidc/callback, \
                     whose certificate comes from the cluster CA, which browsers do not trust: set \
                     tls_cert_file, or redirect_url to a proxy with a trusted certificate"
                );
            }
        }
        // The IdP must send the browser back over HTTPS.
        for method in &mut config.oidc {
            if method.redirect_url.is_none() {
                method.redirect_url = Some(format!("https://{api_addr}/v1/auth/oidc/callback"));
            }
        }
        tls::ApiListener::Tls(
            tls::TlsListener::new(listener, api_tls.config)
                .map_err(|e| StartError::Io(e.to_string()))?,
        )
    };
    let oidc = oidc::Oidc::new(&config.oidc, api_addr).map_err(|e| {
        StartError::Config(config::ConfigError::Invalid {
            key: "oidc".into(),
            message: e.to_string(),
        })
    })?;
    let (audit_log, audit_task) =
        audit::AuditLog::start(store.clone(), config.audit_file.clone()).await?;
    // Last of what can fail: a one-time admin password must not be made (and printed) by a
    // start that then fails, since the next start finds the admin and makes none (a bad
    // `audit_file` left an admin nobody had the password of).
    let bootstrap = if config.bootstrap_admin {
        match bootstrap_admin(&store, &audit_log).await {
            Ok(b) => b,
            Err(e) => {
                audit_task.abort();
                return Err(e);
            }
        }
    } else {
        None
    };
    let state = AppState::new(Inner {
        audit_log,
        metrics: metrics::ControllerMetrics::new(),
        store,
        keys,
        kek,
        issuer,
        token_ttl: config.token_ttl,
        // At most i64::MAX: validated with the config.
        recording_max_bytes: i64::try_from(config.recording_max_bytes).unwrap_or(i64::MAX),
        login_throttle: Default::default(),
        instance: format!("controller-{}", postern_proto::ids::random_base32(8)),
        cluster_addrs,
        relay_addr: relay_addr.map(|bound| {
            config
                .relay_public_addr
                .clone()
                .unwrap_or_else(|| bound.to_string())
        }),
        workers: Default::default(),
        oidc,
    });
    // A wrong issuer shows in the log at start, not at the first login. An IdP that is down
    // now does not keep the controller from serving everything else.
    if !config.oidc.is_empty() {
        let state = state.clone();
        tokio::spawn(async move {
            for (method, why) in state.oidc.check_all(Duration::from_secs(10)).await {
                tracing::warn!(
                    method,
                    "single sign-on method '{method}' cannot be used yet: {why}"
                );
            }
        });
    }
    let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
    let api = tokio::spawn({
        let router = api::router(state.clone());
        async move {
            let stop = async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            };
            if let Err(e) = tls::serve(api_listener, router, stop).await {
                tracing::error!(error = %e, "API server failed");
            }
        }
    });
    let cluster = tokio::spawn(cluster::serve(state.clone(), endpoint.clone()));
    // Loops that run for the controller's life; aborted at shutdown.
    let mut background = vec![
        tokio::spawn(revoke::sweep_expired(state.clone())),
        tokio::spawn({
            let state = state.clone();
            async move { recordings::seal_unsealed(&state).await }
        }),
    ];
    if state.store.backend() == store::Backend::Postgres {
        background.push(tokio::spawn(revoke::listen_for_cancels(
            state.clone(),
            config.database_url.clone(),
        )));
        if state.cluster_addrs.len() > 1 {
            background.push(tokio::spawn(cluster::release_workers_without_store(
                state.clone(),
            )));
        }
    }
    if let Some(socket) = relay_socket {
        background.push(tokio::spawn(relay::serve(state.clone(), socket)));
    }
    tracing::info!(%api_addr, %cluster_addr, relay = ?state.relay_addr, "controller started");
    Ok(ControllerHandle {
        api_addr,
        api_tls: !config.insecure_http,
        cluster_addr,
        relay_addr,
        bootstrap,
        state,
        endpoint,
        shutdown,
        tasks: vec![api, cluster],
        audit_task,
        background,
        _db_lock: db_lock,
    })
}

/// Starts the controller and runs it until `shutdown` completes.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let handle = start(config).await?;
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

/// The key-encryption key found, or made where a bootstrapping controller makes it: only once
/// the database opened, and only for a database holding no keys (a new key would not open
/// them, and an operator might keep the wrong one).
async fn load_kek(found: FoundKek<'_>, store: &Store) -> Result<Kek, StartError> {
    match found {
        FoundKek::Read(kek) => Ok(kek),
        FoundKek::ToMake(path) => {
            let cannot =
                |e: std::io::Error| StartError::Io(format!("cannot write {}: {e}", path.display()));
            if store.root_key(keys::SESSION_KEY).await?.is_some() {
                // Another controller starting beside this one made the file before it
                // stored its keys; otherwise the key that sealed them is missing.
                if let Some(made) = read_made_kek(path)? {
                    return Ok(made);
                }
                return Err(StartError::Io(format!(
                    "{} does not exist, but the database already holds keys sealed with a \
                     key-encryption key: restore that kek_file (a new one cannot open them)",
                    path.display()
                )));
            }
            // Written whole beside it, then linked into place: of two controllers making it
            // at once, one links and the other reads what that one made.
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".{}", postern_proto::ids::random_base32(8)));
            let tmp = path.with_file_name(name);
            let kek = Kek::generate_base64();
            write_private(&tmp, &kek).map_err(cannot)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(Kek::from_base64(&kek)?),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_made_kek(path)?
                    .ok_or_else(|| StartError::Io(format!("{} vanished", path.display()))),
                Err(e) => Err(cannot(e)),
            }
        }
    }
}

/// The key in `path` if the file is there now.
fn read_made_kek(path: &std::path::Path) -> Result<Option<Kek>, StartError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(Kek::from_base64(&text)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(kek_file_error(path, e)),
    }
}

/// Why `kek_file` gave no key.
fn kek_file_error(path: &std::path::Path, e: std::io::Error) -> StartError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        // Raw bytes rather than their base64: a file that is there but holds no key.
        return keys::KeyError::BadKek(format!(
            "{} is not text: expected the base64 of 32 random bytes (head -c 32 /dev/urandom | base64)",
            path.display()
        ))
        .into();
    }
    StartError::Io(format!("cannot read kek_file {}: {e}", path.display()))
}

/// Checks that the controller will have its key-encryption key (`--check-config`), without
/// making one.
pub fn check_kek(config: &ControllerConfig) -> Result<(), StartError> {
    read_kek(config).map(|_| ())
}

/// What [`read_kek`] found.
enum FoundKek<'a> {
    /// From `POSTERN_KEK` or `kek_file`.
    Read(Kek),
    /// No `kek_file` yet: only a bootstrapping (dev) controller invents its KEK, there.
    ToMake(&'a std::path::Path),
}

/// The key-encryption key from `POSTERN_KEK` or `kek_file`, or where a bootstrapping
/// controller is to make it.
fn read_kek(config: &ControllerConfig) -> Result<FoundKek<'_>, StartError> {
    if let Ok(k) = std::env::var("POSTERN_KEK") {
        return Ok(FoundKek::Read(Kek::from_base64(&k)?));
    }
    let Some(path) = &config.kek_file else {
        return Err(StartError::Io(
            "no key-encryption key: set kek_file or POSTERN_KEK".into(),
        ));
    };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(FoundKek::Read(Kek::from_base64(&text)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && config.bootstrap_admin => {
            Ok(FoundKek::ToMake(path))
        }
        Err(e) => Err(kek_file_error(path, e)),
    }
}

/// On SQLite, takes `DB-controller.lock` beside the database file: one controller per SQLite
/// database (a second one would take workers' connections without seeing the first's
/// sessions, and cancels through it would reach no one; several controllers need PostgreSQL).
fn lock_sqlite(database_url: &str) -> Result<Option<std::fs::File>, StartError> {
    let Some(db) = store::sqlite_file(database_url) else {
        return Ok(None);
    };
    // Beside the file itself, whatever link or relative path names it.
    let db = std::fs::canonicalize(db)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| db.to_owned());
    let path = format!("{db}-controller.lock");
    match postern_proto::try_lock_file(std::path::Path::new(&path)) {
        Ok(Some(lock)) => Ok(Some(lock)),
        Ok(None) => Err(StartError::Io(format!(
            "another controller is running on the SQLite database {db} (it holds {path}): one \
             controller per SQLite database; several controllers share a PostgreSQL database"
        ))),
        // A directory SQLite cannot use either: its own error says so.
        Err(_) => Ok(None),
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// Creates `admin` with role `admin` (`allow *`) if the store has no users yet.
async fn bootstrap_admin(
    store: &Store,
    audit_log: &audit::AuditLog,
) -> Result<Option<Bootstrap>, StartError> {
    if !store.users().await?.is_empty() {
        return Ok(None);
    }
    let password = postern_proto::ids::random_base32(15);
    let hash = auth::hash_password(&password).map_err(StartError::Io)?;
    match store.create_user("admin", Some(&hash)).await {
        Ok(_) => {}
        // Another controller starting on the same new database made it first: that one
        // bootstraps (and prints the password).
        Err(store::StoreError::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    if store.require_role("admin").await.is_err() {
        store.create_role("admin").await?;
        store
            .add_rule(
                "admin",
                &Rule {
                    effect: Effect::Allow,
                    actions: vec!["*".into()],
                    targets: None,
                    labels: Default::default(),
                    logins: Vec::new(),
                },
            )
            .await?;
    }
    store
        .bind_role("admin", &Principal::User("admin".into()))
        .await?;
    audit_log
        .append(vec![store::NewEvent::now(
            "system",
            "user.bootstrap",
            "user:admin",
            "success",
            json!({"role": "admin"}),
        )])
        .await?;
    Ok(Some(Bootstrap {
        user: "admin".into(),
        password,
    }))
}
