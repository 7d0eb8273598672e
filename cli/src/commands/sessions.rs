//! `postern sessions ...`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::{Session, Worker};

use super::{ok, Ctx};
use crate::args::SessionsCmd;
use crate::output::{bytes, opt, print_fields, print_json, relative, when, Table};

/// Runs a `sessions` subcommand.
pub async fn run(ctx: &Ctx, cmd: SessionsCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        SessionsCmd::List {
            active,
            user,
            target,
        } => {
            let mut query = Vec::new();
            if active {
                query.push(("active", "true".to_owned()));
            }
            if let Some(u) = &user {
                query.push(("user", u.clone()));
            }
            if let Some(t) = &target {
                query.push(("target", t.clone()));
            }
            let sessions: Vec<Session> = api.get(&["v1", "sessions"], &query).await?;
            if sessions.is_empty() {
                super::unknown_names(
                    &api,
                    &[("users", user.as_deref()), ("targets", target.as_deref())],
                )
                .await;
            }
            if ctx.json {
                print_json(&sessions)?;
                return ok();
            }
            let mut t = Table::new(&[
                "ID",
                "USER",
                "TARGET",
                "WORKER",
                "STATUS",
                "CREATED",
                "EXPIRES",
                "CLOSED CONNS",
                "UP",
                "DOWN",
            ]);
            for s in sessions {
                let expires = if s.status == "terminated" {
                    "-".into()
                } else {
                    relative(s.expires_at)
                };
                t.row(vec![
                    s.id,
                    s.user,
                    s.target,
                    s.worker,
                    s.status,
                    relative(s.created_at),
                    expires,
                    s.connections.to_string(),
                    bytes(s.bytes_up),
                    bytes(s.bytes_down),
                ]);
            }
            t.print("No sessions.")?;
        }
        SessionsCmd::Show { id } => {
            let s: Session = api.get(&["v1", "sessions", &id], &[]).await?;
            show(ctx, &s)?;
            if !ctx.json {
                timeline(&api, &id).await?;
            }
        }
        SessionsCmd::Cancel { id } => {
            let s: Session = api.post_empty(&["v1", "sessions", &id, "cancel"]).await?;
            if !ctx.json {
                // Whether a controller holds its worker now (if the caller may look).
                let connected = api
                    .get::<Vec<Worker>>(&["v1", "workers"], &[])
                    .await
                    .ok()
                    .and_then(|all| all.into_iter().find(|w| w.name == s.worker))
                    .map(|w| w.connected);
                let done = format!("Cancelled session {} ({} to {})", s.id, s.user, s.target);
                if connected == Some(false) {
                    crate::outln!(
                        "{done}. Its worker {} is not connected to any controller: it ends the \
                         session when it reconnects, or on its own once its grace period \
                         without a controller is over.",
                        s.worker
                    );
                } else {
                    crate::outln!(
                        "{done}; its connections are being closed (`postern sessions show {}` \
                         counts them once the worker reports them).",
                        s.id
                    );
                }
            }
            show(ctx, &s)?;
        }
    }
    ok()
}

fn show(ctx: &Ctx, s: &Session) -> Result<()> {
    if ctx.json {
        return print_json(s);
    }
    print_fields(&[
        ("Id", s.id.clone()),
        ("User", s.user.clone()),
        ("Target", s.target.clone()),
        ("Worker", s.worker.clone()),
        ("Status", s.status.clone()),
        ("Login", opt(s.login.clone())),
        ("Created", when(s.created_at)),
        ("Activated", opt(s.activated_at.map(when))),
        // An ended session expires no more ("in 1h" would read as still running).
        (
            "Expires",
            if s.ended_at.is_some() {
                "-".into()
            } else {
                when(s.expires_at)
            },
        ),
        ("Ended", opt(s.ended_at.map(when))),
        ("End reason", opt(s.end_reason.clone())),
        // The worker reports a connection (and its bytes) as it closes.
        ("Closed connections", s.connections.to_string()),
        ("Bytes up (closed)", bytes(s.bytes_up)),
        ("Bytes down (closed)", bytes(s.bytes_down)),
    ])?;
    Ok(())
}

/// The session's audit timeline (authorization, activation, each connection with bytes,
/// statements, exec commands, how it ended), for those allowed to read the audit log.
async fn timeline(api: &crate::client::ApiClient, id: &str) -> Result<()> {
    let query = [("session", id.to_owned()), ("limit", "10000".to_owned())];
    let events: Vec<postern_controller::api::types::AuditEvent> =
        match api.get(&["v1", "audit"], &query).await {
            Ok(events) => events,
            Err(_) => return Ok(()), // no audit:read: the summary above is all this user may see
        };
    crate::outln!();
    crate::outln!("Timeline:");
    let mut t = crate::output::Table::new(&["TIME", "ACTOR", "EVENT", "DETAILS"]);
    for e in events {
        t.row(vec![
            crate::output::rfc3339(e.time),
            e.actor,
            e.action,
            super::audit::details(&e.details),
        ]);
    }
    t.print("(no events)")
}
