//! `postern-worker`: loads the config (`--config FILE` or `POSTERN_WORKER_CONFIG`, else the
//! environment alone), applies `POSTERN_*` overrides and runs the worker until Ctrl-C or
//! SIGTERM.
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use postern_worker::WorkerConfig;

const USAGE: &str = "usage: postern-worker [--config FILE]

Runs a Postern worker. The config file may also be named by POSTERN_WORKER_CONFIG; without
one, the worker is configured from POSTERN_CONTROLLER_URL, POSTERN_DATA_DIR and the other
POSTERN_* variables.";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let config = load_config()?;
    postern_worker::run(config, shutdown_signal()).await?;
    Ok(())
}

fn load_config() -> anyhow::Result<WorkerConfig> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var_os("POSTERN_WORKER_CONFIG").map(PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
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
    Ok(config)
}

/// Human text on a terminal, JSON lines otherwise; `RUST_LOG` filters (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
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
