//! `postern connect TARGET [--port N] [-- CMD ARGS...]`: authorize, open the session, serve a
//! local port, and either wait for Ctrl-C or run CMD against the port.

use std::io::IsTerminal as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{ExitCode, ExitStatus};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::net::TcpListener;

use postern_controller::api::types::{Authorization, AuthorizeRequest};

use super::Ctx;
use crate::args::ConnectArgs;
use crate::output::relative;
use crate::session::{new_client_key, open_session_on, prepare, Session, WorkerHint};

/// What a session command asks for: `postern connect`, and the wrappers that run a client
/// through a session (`postern psql`).
pub(super) struct SessionRequest {
    /// Target name.
    pub(super) target: String,
    /// Local port; any free one if absent.
    pub(super) port: Option<u16>,
    /// Session length in seconds; the target's default if absent.
    pub(super) duration: Option<u64>,
    /// Login on the target (database user, SSH user) to authorize.
    pub(super) login: Option<String>,
    /// QUIC connections to spread the session over ([`Session::add_lanes`]).
    pub(super) lanes: u8,
    /// Command to run against the local port (`{port}`, `{host}` substituted); none serves
    /// until Ctrl-C.
    pub(super) command: Vec<String>,
}

/// Runs `postern connect`.
pub async fn run(ctx: &Ctx, args: ConnectArgs) -> Result<ExitCode> {
    run_session(
        ctx,
        SessionRequest {
            target: args.target,
            port: args.port,
            duration: args.duration,
            login: None,
            lanes: args.lanes,
            command: args.command,
        },
    )
    .await
}

/// Authorizes and opens a session, serves it on a local port, and waits for Ctrl-C or runs
/// the request's command.
pub(super) async fn run_session(ctx: &Ctx, args: SessionRequest) -> Result<ExitCode> {
    // Take over SIGINT/SIGTERM before anything else: with a command running, Ctrl-C belongs
    // to it (psql cancels its query), not to us.
    let mut signals = Signals::new()?;
    // Bind first: a busy port should fail before a session is authorized (and audited).
    let port = args.port.unwrap_or(0);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr().context("reading the local address")?;
    let setup = async {
        let key = std::sync::Arc::new(new_client_key()?);
        let api = ctx.api()?;
        // The session's endpoint is made while the controller answers.
        let path = ["v1", "targets", &args.target, "authorize"];
        let request = AuthorizeRequest {
            client_spki: key.spki_b64().to_owned(),
            duration_secs: args.duration,
            login: args.login.clone(),
            target_type: None,
        };
        // While the controller answers: the session's endpoint, and a handshake with the
        // worker that carried this target last time.
        let hint = load_hint(ctx, &args.target);
        let (auth, prepared) = tokio::join!(api.post(&path, &request), async {
            prepare(hint.as_ref(), &key)
        });
        let auth: Authorization = auth?;
        let session = open_session_on(prepared, &auth, &key).await?;
        let seen = WorkerHint::of(&auth);
        if hint.as_ref() != Some(&seen) {
            save_hint(ctx, &args.target, seen);
        }
        session.add_lanes(&auth, &key, usize::from(args.lanes).saturating_sub(1));
        anyhow::Ok((auth, session))
    };
    let (auth, session) = tokio::select! {
        r = setup => r?,
        _ = signals.int.recv() => return Ok(ExitCode::from(130)),
        _ = signals.term.recv() => return Ok(ExitCode::from(143)),
    };
    let _accept = session.serve(listener);
    announce(ctx, &auth, &session, addr, &args.command)?;
    // The controller shortens a session asked for longer than the target allows: say so.
    if let Some(asked) = args.duration {
        let granted = session
            .expires_at()
            .saturating_sub(postern_proto::unix_now());
        if granted.saturating_add(60) < i64::try_from(asked).unwrap_or(i64::MAX) {
            crate::errln!(
                "note: the session lasts {}, the longest {} allows (asked for {})",
                crate::output::short_duration(granted.max(0).unsigned_abs()),
                auth.target,
                crate::output::short_duration(asked)
            );
        }
    }

    if args.command.is_empty() {
        wait_for_end(session, &mut signals).await
    } else {
        run_command(session, addr, &args.command, &mut signals).await
    }
}

/// Where each target's worker answered last, by controller and target: a cache in the
/// config dir, so a problem reading or writing it costs only the early dial.
const HINTS_FILE: &str = "workers.json";
/// Targets remembered at most.
const HINTS_KEPT: usize = 64;

fn load_hints(ctx: &Ctx) -> std::collections::HashMap<String, WorkerHint> {
    std::fs::read(ctx.config_dir.join(HINTS_FILE))
        .ok()
        .and_then(|body| serde_json::from_slice(&body).ok())
        .unwrap_or_default()
}

fn hint_key(ctx: &Ctx, target: &str) -> String {
    format!("{} {target}", ctx.addr)
}

fn load_hint(ctx: &Ctx, target: &str) -> Option<WorkerHint> {
    load_hints(ctx).remove(&hint_key(ctx, target))
}

fn save_hint(ctx: &Ctx, target: &str, hint: WorkerHint) {
    let mut hints = load_hints(ctx);
    while hints.len() >= HINTS_KEPT {
        let Some(any) = hints.keys().next().cloned() else {
            break;
        };
        hints.remove(&any);
    }
    hints.insert(hint_key(ctx, target), hint);
    let saved = serde_json::to_vec(&hints)
        .map_err(anyhow::Error::from)
        .and_then(|body| {
            crate::profile::create_private_dir(&ctx.config_dir)?;
            crate::profile::write_private_file(&ctx.config_dir.join(HINTS_FILE), &body)
        });
    if let Err(e) = saved {
        tracing::debug!("cannot remember the target's worker: {e:#}");
    }
}

fn announce(
    ctx: &Ctx,
    auth: &Authorization,
    session: &Session,
    addr: SocketAddr,
    command: &[String],
) -> Result<()> {
    if ctx.json {
        // One line, so a script can read it as soon as the port is served.
        crate::outln!(
            "{}",
            json!({
                "session_id": session.session_id(),
                "port": addr.port(),
                "address": addr.to_string(),
                "expires_at": session.expires_at(),
                "target": auth.target,
            })
        );
        return Ok(());
    }
    let limit = match session.connection_limit() {
        Some(1) => ", 1 connection allowed".to_owned(),
        Some(n) => format!(", {n} connections allowed"),
        None => String::new(),
    };
    let text = format!(
        "Session {} to {} ({}) via worker {}, expires {}{limit}",
        session.session_id(),
        auth.target,
        auth.protocol.as_str(),
        auth.worker.name,
        relative(session.expires_at()),
    );
    match command.first() {
        None => {
            crate::outln!(
                "{text}\nListening on {addr} — connect your client there. Ctrl-C ends the session."
            );
        }
        Some(program) => {
            crate::errln!("{text}\nListening on {addr}; the session ends when `{program}` exits.");
        }
    }
    Ok(())
}

/// No command: serve until Ctrl-C, SIGTERM or the worker ends the session.
async fn wait_for_end(session: Session, signals: &mut Signals) -> Result<ExitCode> {
    tokio::select! {
        _ = signals.int.recv() => {}
        _ = signals.term.recv() => {}
        end = session.closed() => {
            crate::errln!("session ended: {end}");
            return Ok(ExitCode::FAILURE);
        }
    }
    crate::errln!("Ending session {}.", session.session_id());
    session.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Runs the command with `{port}` and `{host}` substituted; its exit ends the session.
async fn run_command(
    session: Session,
    addr: SocketAddr,
    command: &[String],
    signals: &mut Signals,
) -> Result<ExitCode> {
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let argv: Vec<String> = command
        .iter()
        .map(|a| a.replace("{port}", &port).replace("{host}", &host))
        .collect();
    let Some((program, rest)) = argv.split_first() else {
        session.close().await;
        return Ok(ExitCode::SUCCESS);
    };
    supervise(session, program, rest, signals).await
}

/// Runs `program` while the session lasts: its exit ends the session, and the session's end
/// (cancel, expiry) ends it. SIGINT belongs to the program; SIGTERM ends both.
pub(super) async fn supervise(
    session: Session,
    program: &str,
    args: &[String],
    signals: &mut Signals,
) -> Result<ExitCode> {
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            session.close().await;
            return Err(e).with_context(|| format!("cannot run `{program}`"));
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.with_context(|| format!("waiting for `{program}`"))?,
            // The terminal sent SIGINT to the whole foreground group; the command decides.
            _ = signals.int.recv() => continue,
            _ = signals.term.recv() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                session.close().await;
                return Ok(ExitCode::from(143));
            }
            end = session.closed() => {
                // The command may hold the terminal in raw mode (ssh, psql's pager), where a
                // line feed does not return the cursor: end the line both ways.
                if std::io::stderr().is_terminal() {
                    crate::errout!("\r\nsession ended: {end}\r\n");
                } else {
                    crate::errln!("session ended: {end}");
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Ok(ExitCode::FAILURE);
            }
        }
    };
    session.close().await;
    Ok(exit_code(status))
}

/// The command's exit code, or 128 + signal when a signal killed it (as shells report it).
fn exit_code(status: ExitStatus) -> ExitCode {
    if let Some(code) = status.code() {
        return ExitCode::from((code & 0xff) as u8);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return ExitCode::from((128 + sig).clamp(0, 255) as u8);
        }
    }
    ExitCode::FAILURE
}

/// SIGINT and SIGTERM, taken over for the life of the command.
pub(super) struct Signals {
    pub(super) int: SignalStream,
    pub(super) term: SignalStream,
}

impl Signals {
    pub(super) fn new() -> Result<Signals> {
        Ok(Signals {
            int: SignalStream::interrupt()?,
            term: SignalStream::terminate()?,
        })
    }
}

#[cfg(unix)]
pub(super) struct SignalStream(tokio::signal::unix::Signal);

#[cfg(unix)]
impl SignalStream {
    fn interrupt() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self(
            signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        ))
    }
    fn terminate() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self(
            signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
        ))
    }
    pub(super) async fn recv(&mut self) {
        if self.0.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
pub(super) struct SignalStream(bool);

#[cfg(not(unix))]
impl SignalStream {
    fn interrupt() -> Result<Self> {
        Ok(Self(true))
    }
    fn terminate() -> Result<Self> {
        Ok(Self(false))
    }
    pub(super) async fn recv(&mut self) {
        if self.0 {
            let _ = tokio::signal::ctrl_c().await;
        } else {
            std::future::pending::<()>().await;
        }
    }
}
