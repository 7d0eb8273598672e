//! `postern-controller --config FILE`: runs a controller until Ctrl-C or SIGTERM.

use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = match args.as_slice() {
        [_, flag, path] if flag == "--config" => path.clone(),
        _ => std::env::var("POSTERN_CONTROLLER_CONFIG")
            .context("usage: postern-controller --config FILE (or POSTERN_CONTROLLER_CONFIG)")?,
    };
    init_tracing();
    let config = postern_controller::ControllerConfig::load(std::path::Path::new(&path))?;
    let handle = postern_controller::start(config).await?;
    if let Some(boot) = handle.bootstrap() {
        // Shown once: the store keeps only its hash.
        println!("Bootstrap admin created: {} / {}", boot.user, boot.password);
    }
    println!(
        "postern-controller listening: API http://{}, cluster {}",
        handle.api_addr(),
        handle.cluster_addr()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

fn init_tracing() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::io::stdout().is_terminal() {
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
}
