//! `postern-worker`: loads the config (`--config FILE` or `POSTERN_WORKER_CONFIG`, else the
//! environment alone), applies `POSTERN_*` overrides and runs the worker until Ctrl-C or
//! SIGTERM; with `--check-config`, only checks the configuration.
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use postern_worker::WorkerConfig;

const USAGE: &str = "usage: postern-worker [--config FILE] [--check-config]

Runs a Postern worker. The config file may also be named by POSTERN_WORKER_CONFIG; without
one, the worker is configured from POSTERN_CONTROLLER_URL, POSTERN_DATA_DIR and the other
POSTERN_* variables. --check-config loads and validates the configuration, prints OK and
exits 0, or prints what is wrong and exits 1.
Logs: POSTERN_LOG (e.g. info, debug); human text on a terminal, JSON lines otherwise, on
stderr.";

fn main() -> ExitCode {
    let (config, check_only, path) = match load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if check_only {
        match path {
            Some(path) => println!("OK: {}", path.display()),
            None => println!("OK (from the environment)"),
        }
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(postern_worker::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration, whether only `--check-config` was asked for, and the file read.
fn load_config() -> anyhow::Result<(WorkerConfig, bool, Option<PathBuf>)> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var_os("POSTERN_WORKER_CONFIG").map(PathBuf::from);
    let mut check_only = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check-config" => check_only = true,
            "--version" | "-V" => {
                println!("postern-worker {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => bail!("--config needs a file\n\n{USAGE}"),
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => match other.strip_prefix("--config=") {
                Some(p) => path = Some(PathBuf::from(p)),
                None => bail!("unknown argument {other:?}\n\n{USAGE}"),
            },
        }
    }
    let mut config = match &path {
        Some(path) => WorkerConfig::from_toml_file(path)?,
        None => toml::from_str::<WorkerConfig>("controller_url = \"\"\ndata_dir = \"\"\n")
            .context("built-in defaults")?,
    };
    config.try_apply_env()?;
    if config.controller_url.is_empty() || config.data_dir.as_os_str().is_empty() {
        bail!(
            "no config: pass --config FILE (or set POSTERN_WORKER_CONFIG), or set \
             POSTERN_CONTROLLER_URL and POSTERN_DATA_DIR\n\n{USAGE}"
        );
    }
    config.validate()?;
    Ok((config, check_only, path))
}

/// Human text on a terminal, JSON lines otherwise, on stderr; `POSTERN_LOG` (else
/// `RUST_LOG`, else `info`) filters.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
