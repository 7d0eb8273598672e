//! `postern dev`: a controller and a worker in this process, on loopback, with SQLite (or
//! the PostgreSQL database of `--database-url`) and generated keys under one data directory; it logs the bootstrap admin in, saves the profile,
//! and makes the demo targets, so that `postern ...` works at once in another terminal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use postern_controller::api::types::{
    CreateTarget, CreateWorker, CreatedWorker, CredentialKind, SetCredential, Target, TargetType,
    Worker,
};

use crate::args::DevArgs;
use crate::client::ApiClient;
use crate::commands::password_login;
use crate::output::print_json;
use crate::profile::{config_dir, create_private_dir, write_private_file, Profile};

/// The worker `postern dev` runs.
pub const DEV_WORKER: &str = "dev-worker";
/// The target `postern dev` creates: the local PostgreSQL, proxied as plain TCP.
pub const DEMO_TARGET: &str = "demo-postgres";
/// The same PostgreSQL as a `postgres` target: the worker logs in as `postgres` (a brokered
/// credential; the engineer never holds it) and audits each statement.
pub const DEMO_PG_TARGET: &str = "demo-pg";
const DEMO_ADDRESS: &str = "127.0.0.1:5432";
/// User name of the bootstrap admin when the controller did not just create it.
const DEFAULT_ADMIN: &str = "admin";

/// The runtime the dev worker runs on: a thread of its own, as if it were its own process
/// (as it is in production). On one runtime thread with the controller, each audited
/// statement's storing (decoding, chaining, the SQLite commit's bookkeeping) queued on the
/// thread that relays the next statement.
struct WorkerRuntime(tokio::runtime::Runtime);

impl WorkerRuntime {
    fn new() -> Result<WorkerRuntime> {
        let runtime =
            crate::dev_runtime("postern-worker").context("cannot start the worker's runtime")?;
        Ok(WorkerRuntime(runtime))
    }

    async fn start(
        &self,
        config: postern_worker::WorkerConfig,
    ) -> Result<postern_worker::WorkerHandle> {
        self.0
            .spawn(postern_worker::start(config))
            .await
            .context("the worker's runtime stopped")?
            .map_err(Into::into)
    }

    async fn shutdown(&self, worker: postern_worker::WorkerHandle) {
        let _ = self.0.spawn(worker.shutdown()).await;
    }

    /// Stops the runtime's thread without waiting (allowed inside the main runtime).
    fn stop(self) {
        self.0.shutdown_background();
    }
}
/// How long a worker with a saved identity gets to reconnect before it is registered afresh.
const RECONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a freshly registered worker gets to connect before a warning.
const REGISTER_WAIT: Duration = Duration::from_secs(10);

/// Runs `postern dev` until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs, json: bool) -> Result<ExitCode> {
    if !args.api_addr.ip().is_loopback() {
        bail!(
            "`postern dev` serves plain HTTP and so listens on loopback only; {} is not a \
             loopback address (use e.g. 127.0.0.1:9200)",
            args.api_addr
        );
    }
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => dirs::data_dir()
            .map(|d| d.join("postern").join("dev"))
            .context("no data directory found for this user; pass --data-dir")?,
    };
    let data_dir = std::path::absolute(&data_dir)
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
    create_private_dir(&data_dir)?;
    // One `postern dev` per data directory: a second one shares the worker's identity and
    // takes its registration over, and the first one's worker stays disconnected. Held until
    // this process exits.
    let _lock = lock_data_dir(&data_dir)?;

    // The controller creates the admin before it binds its listeners: a busy port found
    // only then would lose the admin's one-time password. Check the ports first.
    ensure_tcp_port_free(args.api_addr).await?;
    let mut config = postern_controller::config::ControllerConfig::dev(&data_dir, args.api_addr);
    config.cluster_listen = cluster_listen(args.api_addr);
    if let Some(url) = args.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--database-url takes a PostgreSQL URL (postgres://USER@HOST:PORT/DB); \
                 without it `postern dev` keeps SQLite in its data directory"
            );
        }
        config.database_url = url;
    }
    let controller = postern_controller::start(config)
        .await
        .context("starting the controller")?;
    let api_url = format!("http://{}", controller.api_addr());
    let runtime = match WorkerRuntime::new() {
        Ok(r) => r,
        Err(e) => {
            controller.shutdown().await;
            return Err(e);
        }
    };

    let started = async {
        let (admin, password) = admin_credentials(&data_dir, controller.bootstrap())?;
        let login = password_login(&api_url, &admin, password.clone())
            .await
            .with_context(|| {
                format!(
                    "logging in as {admin} with the password in {}",
                    data_dir.join("admin-password").display()
                )
            })?;
        Profile {
            addr: Some(api_url.clone()),
            token: Some(login.token.clone()),
            user: Some(login.user.clone()),
            ca_pem: None,
        }
        .save(&config_dir()?)?;

        let api = ApiClient::new(&api_url, Some(login.token))?;
        ensure_demo_targets(&api).await?;
        let worker = start_worker(&runtime, &api, &api_url, &data_dir, args.session_lanes).await?;
        anyhow::Ok((admin, password, worker))
    };
    let (admin, password, worker) = match started.await {
        Ok(x) => x,
        Err(e) => {
            runtime.stop();
            controller.shutdown().await;
            return Err(e);
        }
    };

    let session_addr = worker.session_addr();
    if json {
        print_json(&json!({
            "controller": api_url,
            "worker": DEV_WORKER,
            "worker_addr": session_addr.to_string(),
            "data_dir": data_dir,
            "admin_user": admin,
            "admin_password": password,
        }))?;
    } else {
        banner(&api_url, session_addr, &data_dir, &admin, &password);
    }

    wait_for_shutdown_signal().await;
    crate::errln!("Stopping...");
    runtime.shutdown(worker).await;
    runtime.stop();
    controller.shutdown().await;
    crate::errln!("Stopped.");
    Ok(ExitCode::SUCCESS)
}

/// An exclusive lock on `DIR/dev.lock`, or why not.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let path = data_dir.join("dev.lock");
    let locked = postern_worker::try_lock_file(&path)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    match locked {
        Some(file) => Ok(file),
        None => bail!(
            "another `postern dev` is running with the data directory {}; stop it first, or \
             pass --data-dir DIR and --api-addr ADDR for a second one (with its own \
             POSTERN_CONFIG_DIR, or its login replaces the first one's saved profile)",
            data_dir.display()
        ),
    }
}

/// The admin's name and password: just created (saved for next time, 0600), or saved by an
/// earlier run.
fn admin_credentials(
    data_dir: &Path,
    bootstrap: Option<&postern_controller::Bootstrap>,
) -> Result<(String, String)> {
    let file = data_dir.join("admin-password");
    if let Some(b) = bootstrap {
        write_private_file(&file, format!("{}\n", b.password).as_bytes())?;
        return Ok((b.user.clone(), b.password.clone()));
    }
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => {
            Ok((DEFAULT_ADMIN.to_owned(), text.trim_end().to_owned()))
        }
        Ok(_) | Err(_) => bail!(
            "the admin already exists but its password file {} is missing or empty; delete {} \
             to start afresh",
            file.display(),
            data_dir.display()
        ),
    }
}

/// The demo targets, made on the first run: the local PostgreSQL as `tcp` and as `postgres`.
async fn ensure_demo_targets(api: &ApiClient) -> Result<()> {
    ensure_demo_target(api, DEMO_TARGET, TargetType::Tcp).await?;
    if ensure_demo_target(api, DEMO_PG_TARGET, TargetType::Postgres).await? {
        // A password the worker answers with if the server asks; with trust authentication
        // (a fresh local PostgreSQL) it is never asked for.
        let credential = SetCredential {
            kind: CredentialKind::Password,
            username: "postgres".to_owned(),
            secret: postern_proto::ids::random_base32(24),
        };
        api.put::<_, serde_json::Value>(
            &["v1", "targets", DEMO_PG_TARGET, "credential"],
            &credential,
        )
        .await
        .context("setting the demo-pg credential")?;
    }
    Ok(())
}

/// Creates the demo target `name` unless it exists; whether it was created.
async fn ensure_demo_target(api: &ApiClient, name: &str, kind: TargetType) -> Result<bool> {
    match api.get::<Target>(&["v1", "targets", name], &[]).await {
        Ok(_) => Ok(false),
        Err(e) if e.is_not_found() => {
            let body = CreateTarget {
                name: name.to_owned(),
                kind,
                address: DEMO_ADDRESS.to_owned(),
                labels: [("env".to_owned(), "dev".to_owned())].into(),
                default_duration_secs: None,
                max_duration_secs: None,
                connection_limit: None,
                worker_filter: Default::default(),
            };
            api.post::<_, Target>(&["v1", "targets"], &body)
                .await
                .with_context(|| format!("creating the demo target {name}"))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("looking up the demo target {name}")),
    }
}

/// Starts the dev worker with its saved identity; registers it afresh when there is none, or
/// when the saved one no longer gets it connected (the controller's database or cluster port
/// changed, or the worker was deleted).
async fn start_worker(
    runtime: &WorkerRuntime,
    api: &ApiClient,
    api_url: &str,
    data_dir: &Path,
    lanes: u32,
) -> Result<postern_worker::WorkerHandle> {
    let worker_dir: PathBuf = data_dir.join("worker");
    if worker_dir.join("cert.pem").exists() {
        match runtime.start(worker_config(api_url, &worker_dir, None, lanes)).await {
            Ok(worker) if wait_connected(api, RECONNECT_WAIT).await => return Ok(worker),
            Ok(worker) => {
                runtime.shutdown(worker).await;
                crate::errln!("note: {DEV_WORKER} did not reconnect with its saved identity; registering it afresh");
            }
            Err(e) => crate::errln!(
                "note: {DEV_WORKER} could not start with its saved identity ({e}); registering it afresh"
            ),
        }
        std::fs::remove_dir_all(&worker_dir)
            .with_context(|| format!("cannot remove {}", worker_dir.display()))?;
    }
    create_private_dir(&worker_dir)?;
    // A worker of that name without local state cannot be used: replace it.
    let workers: Vec<Worker> = api.get(&["v1", "workers"], &[]).await?;
    if workers.iter().any(|w| w.name == DEV_WORKER) {
        api.delete(&["v1", "workers", DEV_WORKER]).await?;
    }
    let created: CreatedWorker = api
        .post(
            &["v1", "workers"],
            &CreateWorker {
                name: DEV_WORKER.to_owned(),
                tags: [("env".to_owned(), "dev".to_owned())].into(),
            },
        )
        .await
        .context("creating the dev worker")?;
    let config = worker_config(api_url, &worker_dir, Some(created.activation_token), lanes);
    let worker = runtime
        .start(config)
        .await
        .context("starting the dev worker")?;
    if !wait_connected(api, REGISTER_WAIT).await {
        crate::errln!(
            "warning: {DEV_WORKER} has not connected to the controller yet; sessions will fail \
             until it does (see `postern workers list`)"
        );
    }
    Ok(worker)
}

fn worker_config(
    api_url: &str,
    worker_dir: &Path,
    activation_token: Option<String>,
    session_lanes: u32,
) -> postern_worker::WorkerConfig {
    postern_worker::WorkerConfig {
        activation_token,
        session_lanes,
        ..postern_worker::WorkerConfig::loopback(api_url, worker_dir)
    }
}

/// Polls the controller until it reports the dev worker connected, or `limit` passes.
async fn wait_connected(api: &ApiClient, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(workers) = api.get::<Vec<Worker>>(&["v1", "workers"], &[]).await {
            if workers.iter().any(|w| w.name == DEV_WORKER && w.connected) {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster port: two above the API port (9202 next to 9200, as in production), so that a
/// restarted `postern dev` is where its worker remembers it; any free port when the API port
/// is chosen by the system or that port is taken.
fn cluster_listen(api_addr: SocketAddr) -> SocketAddr {
    let any = SocketAddr::new(api_addr.ip(), 0);
    let Some(port) = api_addr
        .port()
        .checked_add(2)
        .filter(|_| api_addr.port() != 0)
    else {
        return any;
    };
    let wanted = SocketAddr::new(api_addr.ip(), port);
    match std::net::UdpSocket::bind(wanted) {
        Ok(_) => wanted,
        Err(_) => any,
    }
}

async fn ensure_tcp_port_free(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "cannot listen on {addr}: {e}; is another `postern dev` running? (pick another \
             port with --api-addr)"
        ),
    }
}

fn banner(api_url: &str, session_addr: SocketAddr, data_dir: &Path, admin: &str, password: &str) {
    let text = format!(
        "Postern dev is running (controller {api_url}, worker {DEV_WORKER} on {session_addr}, \
         data in {})\n\
         Admin login: {admin} / {password}   (a logged-in profile has been saved)\n\
         Try:\n  \
         postern targets list\n  \
         postern connect {DEMO_TARGET} -- psql -h 127.0.0.1 -p {{port}} -U postgres -c 'select 1'\n  \
         postern psql {DEMO_PG_TARGET} -- -c 'select 1'      (logged in for you; each statement audited)\n  \
         postern audit list --action postgres.query\n  \
         postern sessions list\n\
         Ctrl-C stops it.\n",
        data_dir.display()
    );
    // A reader that stopped reading (`postern dev | head`) must not stop the servers.
    let _ = crate::output::write_stdout(format_args!("{text}"));
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
