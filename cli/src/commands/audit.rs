//! `postern audit list | tail [-f] | verify | export`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use postern_controller::api::types::{AuditEvent, AuditVerification};

use super::{ok, Ctx};
use crate::args::{AuditCmd, AuditFilter};
use crate::client::ApiClient;
use crate::output::{print_json, rfc3339, Table};

/// How long one follow request waits for new events before asking again.
const FOLLOW_WAIT_SECS: u64 = 25;
/// Page size when exporting.
const EXPORT_PAGE: i64 = 5_000;

/// Runs an `audit` subcommand.
pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        AuditCmd::List(filter) => {
            let events: Vec<AuditEvent> = api.get(&["v1", "audit"], &query(&filter)).await?;
            if events.is_empty() {
                super::unknown_names(
                    &api,
                    &[
                        ("users", filter.user.as_deref()),
                        ("targets", filter.target.as_deref()),
                    ],
                )
                .await;
                if let Some(action) = &filter.action {
                    unknown_action(&api, action).await;
                }
            }
            show(ctx, &events, "No audit events match.")
        }
        AuditCmd::Tail { follow, mut filter } => {
            filter.limit = filter.limit.or(Some(20));
            let events: Vec<AuditEvent> = api.get(&["v1", "audit"], &query(&filter)).await?;
            if !follow {
                return show(ctx, &events, "No audit events match.");
            }
            if !events.is_empty() || ctx.json {
                show(ctx, &events, "")?;
            }
            // The header goes above the first events, once.
            let mut header_shown = !events.is_empty();
            let mut after = match events.last() {
                Some(e) => e.seq,
                None => head(&api).await?,
            };
            loop {
                let mut q = query(&AuditFilter {
                    limit: Some(1_000),
                    since: None,
                    ..filter.clone()
                });
                q.push(("after_seq", after.to_string()));
                q.push(("wait", FOLLOW_WAIT_SECS.to_string()));
                let events: Vec<AuditEvent> = tokio::select! {
                    r = api.get(&["v1", "audit"], &q) => r?,
                    _ = tokio::signal::ctrl_c() => return ok(),
                };
                if let Some(last) = events.last() {
                    after = last.seq;
                    if ctx.json {
                        for e in &events {
                            crate::outln!("{}", serde_json::to_string(e)?);
                        }
                    } else if header_shown {
                        crate::out!("{}", table(&events).render_rows());
                    } else {
                        crate::out!("{}", table(&events).render());
                        header_shown = true;
                    }
                }
            }
        }
        AuditCmd::Verify => {
            let v: AuditVerification = api.get(&["v1", "audit", "verify"], &[]).await?;
            if ctx.json {
                print_json(&v)?;
            } else if v.ok {
                crate::outln!("OK: the audit chain of {} events verifies.", v.checked);
            } else {
                crate::outln!(
                    "BROKEN: {}",
                    v.reason
                        .as_deref()
                        .unwrap_or("the audit chain does not verify")
                );
            }
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCmd::Export { output, filter, .. } => {
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let failed = |e: std::io::Error| match &output {
                Some(path) => anyhow::Error::new(e).context(format!("writing {}", path.display())),
                None => crate::output::stdout_error(e),
            };
            // Page through the chain oldest first, so exports of any size stay bounded.
            let mut after = 0i64;
            let mut written = 0usize;
            loop {
                let mut q = query(&AuditFilter {
                    limit: Some(EXPORT_PAGE),
                    ..filter.clone()
                });
                q.push(("after_seq", after.to_string()));
                let events: Vec<AuditEvent> = api.get(&["v1", "audit"], &q).await?;
                for e in &events {
                    writeln!(out, "{}", serde_json::to_string(e)?).map_err(failed)?;
                }
                written += events.len();
                match events.last() {
                    Some(last) if events.len() as i64 == EXPORT_PAGE => after = last.seq,
                    _ => break,
                }
            }
            out.flush().map_err(failed)?;
            if let Some(path) = output {
                crate::errln!("Exported {written} events to {}.", path.display());
            }
            ok()
        }
    }
}

/// After an empty list filtered by `action`: says so if no event at all has that action, so
/// that a mistyped one is not read as "nothing happened".
async fn unknown_action(api: &ApiClient, action: &str) {
    let any: Result<Vec<AuditEvent>, _> = api
        .get(
            &["v1", "audit"],
            &[("action", action.to_owned()), ("limit", "1".to_owned())],
        )
        .await;
    if any.is_ok_and(|events| events.is_empty()) {
        crate::errln!(
            "note: no audit event has the action '{action}' (yet: a worker's events reach the \
             controller within a second or so); actions look like session.authorize or \
             auth.login (`postern audit list` shows them), and a prefix ends in '.' (session.)"
        );
    }
}

/// The newest chain position (0 for an empty log).
async fn head(api: &ApiClient) -> Result<i64> {
    let newest: Vec<AuditEvent> = api
        .get(&["v1", "audit"], &[("limit", "1".to_owned())])
        .await?;
    Ok(newest.last().map(|e| e.seq).unwrap_or(0))
}

fn query(f: &AuditFilter) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    let pairs = [
        ("actor", &f.user),
        ("target", &f.target),
        ("session", &f.session),
        ("action", &f.action),
        ("resource", &f.resource),
    ];
    for (k, v) in pairs {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    if let Some(s) = f.since {
        q.push(("since", s.to_string()));
    }
    if let Some(u) = f.until {
        q.push(("until", u.to_string()));
    }
    if let Some(l) = f.limit {
        q.push(("limit", l.to_string()));
    }
    q
}

fn show(ctx: &Ctx, events: &[AuditEvent], empty: &str) -> Result<ExitCode> {
    if ctx.json {
        print_json(&events)?;
    } else {
        table(events).print(empty)?;
    }
    ok()
}

fn table(events: &[AuditEvent]) -> Table {
    let mut t = Table::new(&[
        "SEQ", "TIME", "ACTOR", "ACTION", "RESOURCE", "OUTCOME", "DETAILS",
    ]);
    for e in events {
        t.row(vec![
            e.seq.to_string(),
            rfc3339(e.time),
            e.actor.clone(),
            e.action.clone(),
            e.resource.clone(),
            e.outcome.clone(),
            details(&e.details),
        ]);
    }
    t
}

/// Compact one-line details; nothing for `null` or `{}`.
pub(crate) fn details(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}
