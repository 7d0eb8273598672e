//! # postern-cli
//!
//! The `postern` command line for engineers, admins and auditors, and `postern dev`, which
//! runs a controller and a worker in one process on loopback.
//!
//! # Layout
//! - [`args`]: the clap command tree and small value parsers.
//! - [`profile`]: the saved profile (controller URL, token, user), mode 0600.
//! - [`client`]: the `/v1` HTTP API client and its person-readable errors.
//! - [`session`]: the client side of a session (ephemeral key, QUIC to the worker, local
//!   listener); public so that tests and the benchmark can open sessions in-process.
//! - [`output`]: tables, JSON and time formatting.
//! - [`commands`]: one module per noun; [`commands::run`] dispatches.
//! - [`dev`]: `postern dev`.
//! - `prompt`: reading a user name or password from the terminal (echo off) or stdin.
//! - [`trust`]: which CA to trust for an HTTPS controller; pinning its cluster CA at login.
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod commands;
pub mod dev;
pub mod output;
pub mod profile;
mod prompt;
pub mod session;
pub mod trust;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Parses `args` (program name first), runs the command, prints any error, and gives the
/// process exit code: 0 on success, 1 on error, 2 on a usage error, or the exit code of the
/// command `postern connect -- CMD` ran.
pub fn main_entry<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // One crypto provider for the process (reqwest is built without one). Err means a
    // provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = match args::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(mut e) => {
            suggest_double_dash(&mut e);
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    init_tracing(cli.global.verbose);
    let json = cli.global.json;

    // A session client is one relay loop: on one thread it wakes no second one per packet
    // (the benchmark measured 46% of a small-query session's CPU in cross-thread wake-ups).
    // `postern dev` runs its controller on one runtime thread and its worker on another
    // (`dev::WorkerRuntime`), as two processes would (SQLite and blocking work have threads
    // of their own): on two cores, one runtime of two threads, whose tasks hop between
    // them, cost the worker a third more CPU per small query in wake-ups.
    // `TOKIO_WORKER_THREADS` gives each more.
    let built = match cli.command {
        args::Command::Dev(_) => dev_runtime("postern-controller"),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            crate::errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // A blocked stdin reader (an interrupted password prompt) must not keep us alive.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(code) => code,
        // The reader asked for no more (`| head`): like any Unix tool, stop without a word.
        Err(e) if e.is::<output::StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                print_error_json(&e);
            } else {
                print_error(&e);
            }
            ExitCode::FAILURE
        }
    }
}

/// `postern connect pg psql …`: a word clap does not expect after the target of a command
/// that runs one (`connect`, `psql`, `ssh`) is most likely that command, which belongs after
/// `--`. Clap already suggests `--` for words that start with `-`.
fn suggest_double_dash(e: &mut clap::Error) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let suggested = match e.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(tips)) => !tips.is_empty(),
        other => other.is_some(),
    };
    if e.kind() != ErrorKind::UnknownArgument || suggested {
        return;
    }
    let usage = e.get(ContextKind::Usage).map(ToString::to_string);
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return;
    };
    if arg.starts_with('-') || !usage.is_some_and(|u| u.contains("[-- <")) {
        return;
    }
    let tip = format!("to run '{arg}' in the session, put it after '--': TARGET -- {arg} …");
    e.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![tip.into()]),
    );
}

/// Prints `error: <message>` and its causes on stderr, each cause once: a cause whose text
/// the line above already holds (a library that repeats its source in its own message) adds
/// nothing.
pub fn print_error(e: &anyhow::Error) {
    crate::errln!("{}", error_text(e));
}

fn error_text(e: &anyhow::Error) -> String {
    let mut text = format!("error: {e}");
    for line in causes(e) {
        text.push_str(&format!("\n  caused by: {line}"));
    }
    text
}

/// `e`'s causes, each once: a cause whose text the one above already holds adds nothing.
fn causes(e: &anyhow::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut above = e.to_string();
    for cause in e.chain().skip(1) {
        let line = cause.to_string();
        if !above.contains(&line) {
            out.push(line.clone());
        }
        above = line;
    }
    out
}

/// With `--json`: the error as one JSON object on stderr, `{"error": {"message", "causes",
/// and for a controller's refusal "status" and "code"}}`, so a script reads the reason as
/// it reads the results (stdout stays empty).
pub fn print_error_json(e: &anyhow::Error) {
    crate::errln!("{}", error_json(e));
}

fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let mut error = serde_json::json!({
        "message": e.to_string(),
        "causes": causes(e),
    });
    if let Some(client::ApiError::Api { status, code, .. }) =
        e.chain().find_map(|c| c.downcast_ref::<client::ApiError>())
    {
        error["status"] = (*status).into();
        error["code"] = code.as_str().into();
    }
    serde_json::json!({ "error": error })
}

fn init_tracing(verbose: u8) {
    // rustls-platform-verifier logs every certificate the system's roots do not know at
    // error level, before `postern login` offers to pin the controller's own CA (the normal
    // first login): that verdict is ours to report, so its lines show only with -vv.
    let default = match verbose {
        0 => "warn,rustls_platform_verifier=off",
        1 => "info,rustls_platform_verifier=off",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// A runtime of `postern dev`: one thread (`TOKIO_WORKER_THREADS` gives more), named.
pub(crate) fn dev_runtime(thread_name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.thread_name(thread_name).enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("database \"x\" does not exist: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::other("database \"x\" does not exist");
        // A library error that repeats its source's text: the source adds nothing.
        let e = anyhow::Error::new(Repeats(io())).context("cannot open the store");
        assert_eq!(
            error_text(&e),
            "error: cannot open the store\n  caused by: database \"x\" does not exist: \
             database \"x\" does not exist"
        );
        // Distinct causes all show, in order.
        let e = anyhow::Error::new(io())
            .context("connecting")
            .context("starting");
        assert_eq!(
            error_text(&e),
            "error: starting\n  caused by: connecting\n  caused by: database \"x\" does not exist"
        );
    }

    #[test]
    fn a_json_error_carries_the_causes_and_the_controllers_code() {
        let refusal = client::ApiError::Api {
            status: 403,
            code: "forbidden".into(),
            message: "permission denied".into(),
        };
        let e = anyhow::Error::new(refusal).context("cannot list sessions");
        let json = error_json(&e);
        assert_eq!(json["error"]["message"], "cannot list sessions");
        assert_eq!(
            json["error"]["causes"],
            serde_json::json!(["permission denied"])
        );
        assert_eq!(json["error"]["status"], 403);
        assert_eq!(json["error"]["code"], "forbidden");
        // Not the controller's: no status or code.
        let json = error_json(&anyhow::anyhow!("no profile"));
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "no profile", "causes": []}})
        );
    }

    #[test]
    fn a_command_without_double_dash_gets_the_tip() {
        let rendered = |argv: &[&str]| {
            let mut e = args::Cli::try_parse_from(argv).expect_err("a usage error");
            suggest_double_dash(&mut e);
            e.render().to_string()
        };
        let text = rendered(&["postern", "connect", "pg", "psql", "-h", "x"]);
        assert!(
            text.contains("tip: to run 'psql' in the session, put it after '--': TARGET -- psql"),
            "{text}"
        );
        // Commands that run nothing get no such tip, and clap's own tip for `-c` stays.
        assert!(!rendered(&["postern", "targets", "list", "extra"]).contains("tip:"));
        let text = rendered(&["postern", "psql", "pg", "-c", "select 1"]);
        assert!(
            text.contains("use '-- -c'") && !text.contains("in the session"),
            "{text}"
        );
    }

    #[test]
    fn a_closed_stdout_is_told_apart_from_other_write_failures() {
        let closed = output::stdout_error(std::io::ErrorKind::BrokenPipe.into());
        assert!(closed.context("listing").is::<output::StdoutClosed>());
        let full = output::stdout_error(std::io::Error::from_raw_os_error(28));
        assert!(!full.is::<output::StdoutClosed>());
        assert!(error_text(&full).starts_with("error: writing to stdout\n  caused by: "));
    }
}
