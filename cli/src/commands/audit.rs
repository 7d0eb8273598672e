//! `postern audit list | tail [-f] | verify | export`.

use std::process::ExitCode;

use anyhow::{bail, Result};

use postern_controller::api::types::{AuditEvent, AuditVerification};

use super::{ok, Ctx};
use crate::args::{AuditCmd, AuditFilter};
use crate::client::ApiClient;
use crate::output::{print_json, rfc3339, PrivateFile, Table};

/// How long one follow request waits for new events before asking again.
const FOLLOW_WAIT_SECS: u64 = 25;
/// Page size when exporting.
const EXPORT_PAGE: i64 = 5_000;

/// Events `audit list` shows without `--limit`.
const LIST_DEFAULT: i64 = 100;

/// Runs an `audit` subcommand.
pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> Result<ExitCode> {
    let filter = match &cmd {
        AuditCmd::List(f)
        | AuditCmd::Tail { filter: f, .. }
        | AuditCmd::Export { filter: f, .. } => Some(f),
        AuditCmd::Verify { .. } => None,
    };
    if let Some(AuditFilter {
        since: Some(since),
        until: Some(until),
        ..
    }) = filter
    {
        if since > until {
            bail!(
                "--since {} is later than --until {}: no event can match",
                rfc3339(*since),
                rfc3339(*until)
            );
        }
    }
    let api = ctx.api()?;
    match cmd {
        AuditCmd::List(mut filter) => {
            // One more than shown, to know whether the default cut anything.
            let defaulted = filter.limit.is_none();
            filter.limit = filter.limit.or(Some(LIST_DEFAULT + 1));
            let mut events: Vec<AuditEvent> = api.get(&["v1", "audit"], &query(&filter)).await?;
            let cut = defaulted && events.len() as i64 > LIST_DEFAULT;
            if cut {
                // Oldest first: the extra one is the oldest.
                events.remove(0);
            }
            let cut = cut && !ctx.json;
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
            let shown = show(ctx, &events, "No audit events match.")?;
            if cut {
                crate::errln!(
                    "note: these are the newest {LIST_DEFAULT} matching events; --limit N shows \
                     more, `postern audit export` all of them"
                );
            }
            Ok(shown)
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
        AuditCmd::Verify { anchor } => {
            let q: Vec<(&str, String)> = anchor.iter().map(|a| ("anchor", a.to_string())).collect();
            let v: AuditVerification = api.get(&["v1", "audit", "verify"], &q).await?;
            if ctx.json {
                print_json(&v)?;
            } else if v.ok {
                crate::outln!("OK: the audit chain of {} events verifies.", v.checked);
                if let Some(a) = &anchor {
                    crate::outln!("Event #{} still has the anchored hash.", a.seq);
                }
                if let (Some(seq), Some(hash)) = (v.head_seq, &v.head_hash) {
                    crate::outln!("Head: {seq}:{hash}");
                    crate::outln!(
                        "Keep the head where the database's administrators cannot write: \
                         `postern audit verify --anchor {seq}:{hash}` later shows whether any event \
                         up to it was rewritten (a chain recomputed from scratch verifies on its own)."
                    );
                }
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
            // A file is replaced only by a complete export (a refused or failed one leaves
            // what was there).
            let mut file = output.as_deref().map(PrivateFile::create).transpose()?;
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            let mut out: &mut dyn std::io::Write = match file.as_mut() {
                Some(f) => f,
                None => &mut stdout,
            };
            let failed = |e: std::io::Error| match &output {
                Some(path) => anyhow::Error::new(e).context(format!("writing {}", path.display())),
                None => crate::output::stdout_error(e),
            };
            let mut written = 0usize;
            if filter.limit.is_some() {
                // The newest N, oldest first, in one answer (N is at most MAX_LIMIT).
                let events: Vec<AuditEvent> = api.get(&["v1", "audit"], &query(&filter)).await?;
                written = write_lines(&mut out, &events).map_err(failed)?;
            } else {
                // Page through the chain oldest first, so exports of any size stay bounded.
                let mut after = 0i64;
                loop {
                    let mut q = query(&AuditFilter {
                        limit: Some(EXPORT_PAGE),
                        ..filter.clone()
                    });
                    q.push(("after_seq", after.to_string()));
                    let events: Vec<AuditEvent> = api.get(&["v1", "audit"], &q).await?;
                    written += write_lines(&mut out, &events).map_err(failed)?;
                    match events.last() {
                        Some(last) if events.len() as i64 == EXPORT_PAGE => after = last.seq,
                        _ => break,
                    }
                }
            }
            out.flush().map_err(failed)?;
            if let (Some(file), Some(path)) = (file, output) {
                file.commit()?;
                crate::errln!("Exported {written} events to {}.", path.display());
            }
            ok()
        }
    }
}

/// Writes `events` as JSON lines; how many.
fn write_lines(out: &mut dyn std::io::Write, events: &[AuditEvent]) -> std::io::Result<usize> {
    for e in events {
        serde_json::to_writer(&mut *out, e)?;
        out.write_all(b"\n")?;
    }
    Ok(events.len())
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
