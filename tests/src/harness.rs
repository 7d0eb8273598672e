//! A controller and a worker on loopback, in-process, with an admin API client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::de::DeserializeOwned;
use serde::Serialize;

use postern_controller::api::types::{
    CreateTarget, CreateWorker, CreatedWorker, LoginRequest, LoginResponse, TargetType,
};
use postern_controller::{ControllerConfig, ControllerHandle};
use postern_worker::{WorkerConfig, WorkerHandle};

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh empty directory.
    pub fn new(prefix: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("{prefix}-{}", postern_proto::ids::random_base32(8)));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A JSON API client with a bearer token.
#[derive(Clone)]
pub struct Api {
    /// Base URL.
    pub base: String,
    /// Bearer token.
    pub token: Option<String>,
    http: reqwest::Client,
}

/// An API answer that was not 2xx.
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// The `message` of the error body.
    pub message: String,
}

impl Api {
    /// A client for `base` without a token.
    pub fn new(base: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http: reqwest::Client::new(),
        }
    }

    /// A client for `base` using `http` (e.g. one that trusts a private CA).
    pub fn with_http(base: &str, http: reqwest::Client) -> Self {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http,
        }
    }

    /// Logs in and returns a client carrying the token.
    pub async fn login(&self, user: &str, password: &str) -> anyhow::Result<Api> {
        let r: LoginResponse = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                Some(&LoginRequest {
                    user: user.into(),
                    password: password.into(),
                }),
            )
            .await
            .map_err(|f| anyhow::anyhow!("login failed: {f:?}"))?;
        Ok(Api {
            token: Some(r.token),
            ..self.clone()
        })
    }

    /// Calls the API; `Err` carries a non-2xx answer.
    pub async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiFailure> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| ApiFailure {
            status: 0,
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ApiFailure { status, message });
        }
        let text = if text.is_empty() {
            "null".to_owned()
        } else {
            text
        };
        serde_json::from_str(&text).map_err(|e| ApiFailure {
            status,
            message: format!("bad body: {e}: {text}"),
        })
    }

    /// Authorizes a session to `target` (as `login`, if given) with a fresh client key.
    pub async fn authorize(
        &self,
        target: &str,
        login: Option<&str>,
    ) -> Result<
        (
            postern_controller::api::types::Authorization,
            postern_cli::session::ClientKey,
        ),
        ApiFailure,
    > {
        let key = postern_cli::session::new_client_key().expect("client key");
        let body = postern_controller::api::types::AuthorizeRequest {
            client_spki: key.spki_b64().into(),
            duration_secs: None,
            login: login.map(str::to_owned),
            target_type: None,
        };
        let auth = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/targets/{target}/authorize"),
                Some(&body),
            )
            .await?;
        Ok((auth, key))
    }

    /// Session `id` (`GET /v1/sessions/ID`), expecting success.
    pub async fn session<T: DeserializeOwned>(&self, id: &str) -> T {
        self.ok(
            reqwest::Method::GET,
            &format!("/v1/sessions/{id}"),
            None::<&()>,
        )
        .await
    }

    /// Cancels session `id` (`POST /v1/sessions/ID/cancel`), expecting success.
    pub async fn cancel_session(&self, id: &str) -> postern_controller::api::types::Session {
        self.ok(
            reqwest::Method::POST,
            &format!("/v1/sessions/{id}/cancel"),
            None::<&()>,
        )
        .await
    }

    /// `call` for tests that expect success.
    pub async fn ok<T: DeserializeOwned, B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> T {
        match self.call(method.clone(), path, body).await {
            Ok(v) => v,
            Err(f) => panic!("{method} {path} failed: {f:?}"),
        }
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The worker's fail-closed grace period.
    pub grace: Duration,
    /// Store URL; SQLite in the data directory if `None`.
    pub database_url: Option<String>,
    /// API and cluster addresses; free ports if `None` (fixed ones survive a restart).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// OpenID Connect login methods.
    pub oidc: Vec<postern_controller::oidc::OidcConfig>,
    /// How clients reach the worker (`outbound-only`: through the controller's relay).
    pub worker_mode: postern_proto::cluster::WorkerMode,
    /// The controller's `recording_max_bytes`; its default if `None`.
    pub recording_max_bytes: Option<u64>,
    /// The controller's `cluster_public_addrs` (the bound address if empty).
    pub cluster_public_addrs: Vec<String>,
    /// The worker's `session_lanes`.
    pub session_lanes: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            grace: Duration::from_secs(15),
            database_url: None,
            addrs: None,
            oidc: Vec::new(),
            worker_mode: Default::default(),
            recording_max_bytes: None,
            cluster_public_addrs: Vec::new(),
            session_lanes: 1,
        }
    }
}

/// The controller configuration a [`Cluster`] uses.
pub fn controller_config(dir: &Path, opts: &ClusterOptions) -> ControllerConfig {
    let (api, cluster) = opts.addrs.unwrap_or((
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ));
    let mut config = ControllerConfig::dev(dir, api);
    config.cluster_listen = cluster;
    if let Some(url) = &opts.database_url {
        config.database_url = url.clone();
    }
    config.oidc = opts.oidc.clone();
    config.cluster_public_addrs = opts.cluster_public_addrs.clone();
    if let Some(max) = opts.recording_max_bytes {
        config.recording_max_bytes = max;
    }
    config
}

/// [`WorkerConfig::loopback`], registering with `activation_token` if it has no identity
/// yet.
pub fn worker_config(
    controller_url: &str,
    data_dir: &Path,
    activation_token: Option<String>,
) -> WorkerConfig {
    WorkerConfig {
        activation_token,
        ..WorkerConfig::loopback(controller_url, data_dir)
    }
}

/// Two free loopback ports (TCP for the API, UDP for the cluster), for a controller that
/// must come back on the same addresses.
pub fn free_addrs() -> (SocketAddr, SocketAddr) {
    (
        free_port(|a| std::net::TcpListener::bind(a).is_ok()),
        free_port(|a| std::net::UdpSocket::bind(a).is_ok()),
    )
}

/// A free loopback port below the kernel's ephemeral range: a test picks it now and binds
/// it later (or again, after a restart), and meanwhile no `bind(…:0)` anywhere — another
/// test's client, listener or endpoint — can be given it.
fn free_port(binds: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    use std::hash::BuildHasher as _;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let random = std::hash::RandomState::new();
    for attempt in 0u32..1_000 {
        let port = low + (random.hash_one(attempt) % u64::from(high - low)) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if binds(addr) {
            return addr;
        }
    }
    panic!("no free loopback port from {low} to {high}");
}

/// A controller (SQLite in a temp dir) and one registered worker, both in-process.
pub struct Cluster {
    /// The controller.
    pub controller: Option<ControllerHandle>,
    /// The worker.
    pub worker: Option<WorkerHandle>,
    /// Logged-in admin client.
    pub admin: Api,
    /// The bootstrap admin's password.
    pub admin_password: String,
    /// Data directory.
    pub dir: TempDir,
}

impl Cluster {
    /// Starts a controller and a worker named `w1` and waits until the worker is connected.
    pub async fn start() -> anyhow::Result<Cluster> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a controller and a worker named `w1` with these options.
    pub async fn start_with(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = TempDir::new("postern-e2e");
        let config = controller_config(dir.path(), &opts);
        let controller = postern_controller::start(config).await?;
        let boot = controller.bootstrap().cloned().context("bootstrap admin")?;
        let api = Api::new(&format!("http://{}", controller.api_addr()));
        let admin = api.login(&boot.user, &boot.password).await?;
        let created: CreatedWorker = admin
            .ok(
                reqwest::Method::POST,
                "/v1/workers",
                Some(&CreateWorker {
                    name: "w1".into(),
                    tags: Default::default(),
                }),
            )
            .await;
        let worker = postern_worker::start(WorkerConfig {
            mode: opts.worker_mode,
            grace_period: opts.grace,
            session_lanes: opts.session_lanes,
            ..worker_config(
                &api.base,
                &dir.path().join("worker"),
                Some(created.activation_token),
            )
        })
        .await?;
        let cluster = Cluster {
            controller: Some(controller),
            worker: Some(worker),
            admin,
            admin_password: boot.password,
            dir,
        };
        cluster.wait_worker_connected().await?;
        Ok(cluster)
    }

    /// Waits (≤ 10 s) until the controller lists the worker as connected.
    pub async fn wait_worker_connected(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            let workers: Vec<postern_controller::api::types::Worker> = self
                .admin
                .ok(reqwest::Method::GET, "/v1/workers", None::<&()>)
                .await;
            if workers.iter().any(|w| w.connected) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("worker did not connect within 10 s")
    }

    /// Creates a target from a raw `POST /v1/targets` body (fields `create_target` does not
    /// set: a worker filter, durations, a type).
    pub async fn create_target_from(&self, body: serde_json::Value) {
        let _: serde_json::Value = self
            .admin
            .ok(reqwest::Method::POST, "/v1/targets", Some(&body))
            .await;
    }

    /// Creates a tcp target.
    pub async fn create_target(&self, name: &str, address: &str, labels: &[(&str, &str)]) {
        let _: serde_json::Value = self
            .admin
            .ok(
                reqwest::Method::POST,
                "/v1/targets",
                Some(&CreateTarget {
                    name: name.into(),
                    kind: TargetType::Tcp,
                    address: address.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    default_duration_secs: None,
                    max_duration_secs: None,
                    connection_limit: None,
                    worker_filter: Default::default(),
                }),
            )
            .await;
    }

    /// Creates a user with a password and returns a logged-in client for them.
    pub async fn user(&self, name: &str) -> Api {
        let password = format!("pw-{name}-long-enough");
        let _: serde_json::Value = self
            .admin
            .ok(
                reqwest::Method::POST,
                "/v1/users",
                Some(&serde_json::json!({"name": name, "password": password})),
            )
            .await;
        self.admin.login(name, &password).await.expect("user login")
    }

    /// Creates role `name` with `rules` (in order) and binds it to `principal`
    /// (`{"user": …}` or `{"group": …}`).
    pub async fn role(
        &self,
        name: &str,
        rules: &[serde_json::Value],
        principal: serde_json::Value,
    ) {
        let role = |path: &str| format!("/v1/roles{path}");
        let mut calls = vec![(role(""), serde_json::json!({"name": name}))];
        calls.extend(
            rules
                .iter()
                .map(|r| (role(&format!("/{name}/rules")), r.clone())),
        );
        calls.push((role(&format!("/{name}/bind")), principal));
        for (path, body) in calls {
            let _: serde_json::Value = self
                .admin
                .ok(reqwest::Method::POST, &path, Some(&body))
                .await;
        }
    }

    /// Stops both.
    pub async fn stop(mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A throwaway PostgreSQL database on the local server, dropped by [`PgDb::drop_db`].
pub struct PgDb {
    name: String,
    role: Option<String>,
    /// Its URL.
    pub url: String,
}

async fn admin_connection() -> sqlx::AnyConnection {
    <sqlx::AnyConnection as sqlx::Connection>::connect(&pg_admin_url())
        .await
        .expect("connect as admin")
}

fn pg_admin_url() -> String {
    std::env::var("POSTERN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl PgDb {
    /// Creates a fresh database.
    pub async fn create() -> PgDb {
        sqlx::any::install_default_drivers();
        let admin = pg_admin_url();
        let name = format!("postern_e2e_{}", postern_proto::ids::random_base32(8));
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .expect("the local PostgreSQL must be running (POSTERN_TEST_PG)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin);
        PgDb {
            url: format!("{base}/{name}"),
            name,
            role: None,
        }
    }

    /// A login role of its own (not a superuser) that owns the database; the URL to
    /// connect as it. [`Self::admit_role`] can then keep that role out while others go on.
    pub async fn owner_role(&mut self) -> String {
        let role = format!("{}_owner", self.name);
        let mut conn = admin_connection().await;
        for sql in [
            format!("CREATE ROLE {role} LOGIN"),
            format!("ALTER DATABASE {} OWNER TO {role}", self.name),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("owner role");
        }
        self.role = Some(role.clone());
        // The local server trusts loopback logins: the role needs no password.
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{role}@{host}")
    }

    /// Lets the [`Self::owner_role`] connect, or with `false` keeps it out and ends its
    /// connections: the database gone, for the controller that logs in as it alone.
    pub async fn admit_role(&self, allowed: bool) {
        let role = self.role.as_deref().expect("owner_role first");
        let mut conn = admin_connection().await;
        let limit = if allowed { -1 } else { 0 };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER ROLE {role} CONNECTION LIMIT {limit}"
        )))
        .execute(&mut conn)
        .await
        .expect("alter role");
        if !allowed {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            )
            .bind(role)
            .execute(&mut conn)
            .await
            .expect("end the listeners");
        }
    }

    /// Drops the database (and any connections still open to it).
    pub async fn drop_db(self) {
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg_admin_url())
            .await
            .expect("connect to drop");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop test database");
        if let Some(role) = &self.role {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
                .execute(&mut conn)
                .await
                .expect("drop the owner role");
        }
    }
}

/// A TCP connection through a session's local port that keeps echo traffic flowing; its
/// `cut` resolves when the connection dies, with how long after `armed` that was.
pub struct Traffic {
    cut: tokio::sync::oneshot::Receiver<std::time::Instant>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Traffic {
    /// Dropping it closes the connection.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Traffic {
    /// Connects to `local` (a session's listener, in front of an echo target) and pings
    /// every 10 ms, checking each echo, until the connection fails or ends.
    pub async fn start(local: SocketAddr) -> Traffic {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(local)
            .await
            .expect("connect to the session's port");
        // One echo first: the connection is through before anything is revoked.
        sock.write_all(b"ping").await.expect("first ping");
        let mut buf = [0u8; 4];
        sock.read_exact(&mut buf).await.expect("first echo");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let ok = sock.write_all(b"ping").await.is_ok()
                    && sock.read_exact(&mut buf).await.is_ok()
                    && &buf == b"ping";
                if !ok {
                    let _ = tx.send(std::time::Instant::now());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Traffic { cut: rx, task }
    }

    /// Whether the connection is still carrying traffic.
    pub fn alive(&mut self) -> bool {
        matches!(
            self.cut.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }

    /// Waits up to `bound` for the connection to be cut; returns when it was.
    pub async fn wait_cut(mut self, bound: Duration) -> Option<std::time::Instant> {
        tokio::time::timeout(bound, &mut self.cut)
            .await
            .ok()
            .and_then(Result::ok)
    }
}
