//! `postern-controller --config FILE [--check-config]`: runs a controller until Ctrl-C or
//! SIGTERM, or only checks its configuration.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};

const USAGE: &str = "usage: postern-controller [--config FILE] [--check-config]

Runs a Postern controller. The config file may also be named by POSTERN_CONTROLLER_CONFIG.
--check-config loads and validates the configuration (and the TLS files it names), prints
OK and exits 0, or prints what is wrong and exits 1.
Logs: POSTERN_LOG (e.g. info, debug, postern_controller=debug); human text on a terminal,
JSON lines otherwise, on stderr.";

struct Args {
    config: PathBuf,
    check_only: bool,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_only {
        return match check_config(&args.config) {
            Ok(()) => {
                println!("OK: {}", args.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut config = std::env::var_os("POSTERN_CONTROLLER_CONFIG").map(PathBuf::from);
    let mut check_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => bail!("--config needs a file\n\n{USAGE}"),
            },
            "--check-config" => check_only = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("postern-controller {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => match other.strip_prefix("--config=") {
                Some(p) => config = Some(PathBuf::from(p)),
                None => bail!("unknown argument {other:?}\n\n{USAGE}"),
            },
        }
    }
    let config = config.with_context(|| format!("no config file given\n\n{USAGE}"))?;
    Ok(Args { config, check_only })
}

/// Everything that can be checked without the database: the file, the environment
/// overrides, the values, and that the TLS files hold a certificate chain and a key.
fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = postern_controller::ControllerConfig::load(path)?;
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        postern_controller::tls::check_files(cert, key)?;
    }
    // A key that is not there is a warning (it may be a secret mounted only where the
    // controller runs); one that is there and is no key is an error.
    match postern_controller::check_kek(&config) {
        Ok(()) => {}
        Err(e @ postern_controller::StartError::Keys(_)) => return Err(e.into()),
        Err(e) => eprintln!("warning: {e} (the controller does not start without it)"),
    }
    for method in config.oidc.iter().filter(|m| m.client_secret.is_none()) {
        eprintln!(
            "warning: single sign-on method '{}' has no client_secret (nor {}): the controller \
             logs in as a public client, and an IdP that registered it as a confidential one \
             refuses with invalid_client",
            method.name,
            method.secret_env_var()
        );
    }
    if !config.oidc.is_empty() {
        // Warnings only: an IdP that is down now must not keep the controller from starting
        // (this check runs before every start under systemd).
        let oidc = postern_controller::oidc::Oidc::new(&config.oidc, config.api_listen)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for (method, why) in runtime.block_on(oidc.check_all(std::time::Duration::from_secs(10))) {
            eprintln!("warning: single sign-on method '{method}': {why} (logins with it fail until this is fixed)");
        }
    }
    Ok(())
}

async fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = postern_controller::ControllerConfig::load(path)?;
    let handle = postern_controller::start(config).await?;
    if let Some(boot) = handle.bootstrap() {
        // Shown once, on stdout and never in the log: the store keeps only its hash.
        println!("Bootstrap admin created: {} / {}", boot.user, boot.password);
    }
    let relay = handle
        .relay_addr()
        .map(|a| format!(", relay {a}"))
        .unwrap_or_default();
    println!(
        "postern-controller listening: API {}, cluster {}{relay}, cluster CA SHA-256 {}",
        handle.api_url(),
        handle.cluster_addr(),
        handle.ca_fingerprint()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

/// `POSTERN_LOG` (else `RUST_LOG`, else `info`) filters; human text on a terminal, JSON
/// lines otherwise (for a log shipper), on stderr.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        // PostgreSQL's notices ("relation _sqlx_migrations already exists, skipping" at each
        // start) are not news.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
