//! `postern audit list`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::AuditEvent;

use super::{ok, Ctx};
use crate::args::AuditCmd;
use crate::output::{print_json, rfc3339, Table};

/// Runs an `audit` subcommand.
pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> Result<ExitCode> {
    let AuditCmd::List {
        user,
        action,
        resource,
        since,
        limit,
    } = cmd;
    let mut query = Vec::new();
    if let Some(u) = user {
        query.push(("actor", u));
    }
    if let Some(a) = action {
        query.push(("action", a));
    }
    if let Some(r) = resource {
        query.push(("resource", r));
    }
    if let Some(s) = since {
        query.push(("since", s.to_string()));
    }
    if let Some(l) = limit {
        query.push(("limit", l.to_string()));
    }
    let events: Vec<AuditEvent> = ctx.api()?.get(&["v1", "audit"], &query).await?;
    if ctx.json {
        print_json(&events)?;
        return ok();
    }
    let mut t = Table::new(&[
        "ID", "TIME", "ACTOR", "ACTION", "RESOURCE", "OUTCOME", "DETAILS",
    ]);
    for e in events {
        t.row(vec![
            e.id.to_string(),
            rfc3339(e.time),
            e.actor,
            e.action,
            e.resource,
            e.outcome,
            details(&e.details),
        ]);
    }
    t.print("No audit events match.");
    ok()
}

/// Compact one-line details; nothing for `null` or `{}`.
fn details(v: &serde_json::Value) -> String {
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
