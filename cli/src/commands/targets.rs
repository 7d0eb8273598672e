//! `postern targets ...`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::{CreateTarget, Target, TargetType, UpdateTarget};

use super::{ok, Ctx};
use crate::args::{kv_map, TargetKind, TargetsCmd};
use crate::output::{kv_list, opt, print_fields, print_json, rfc3339, short_duration, Table};

/// Runs a `targets` subcommand.
pub async fn run(ctx: &Ctx, cmd: TargetsCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        TargetsCmd::List => {
            let targets: Vec<Target> = api.get(&["v1", "targets"], &[]).await?;
            if ctx.json {
                return print_json(&targets).map(|()| ExitCode::SUCCESS);
            }
            let mut t = Table::new(&[
                "NAME", "TYPE", "ADDRESS", "LABELS", "MAX", "LIMIT", "ENABLED",
            ]);
            for x in targets {
                t.row(vec![
                    x.name,
                    x.kind.as_str().into(),
                    x.address,
                    kv_list(&x.labels),
                    short_duration(x.max_duration_secs),
                    opt(x.connection_limit),
                    yes_no(x.enabled),
                ]);
            }
            t.print("No targets.")?;
        }
        TargetsCmd::Show { name } => {
            let target: Target = api.get(&["v1", "targets", &name], &[]).await?;
            show(ctx, &target)?;
        }
        TargetsCmd::Create(a) => {
            let body = CreateTarget {
                name: a.name,
                kind: kind(a.kind),
                address: a.address,
                labels: kv_map(&a.common.labels)?,
                default_duration_secs: a.common.default_duration,
                max_duration_secs: a.common.max_duration,
                connection_limit: a.common.connection_limit,
                worker_filter: kv_map(&a.common.worker_filter)?,
            };
            let target: Target = api.post(&["v1", "targets"], &body).await?;
            if !ctx.json {
                crate::outln!("Created target {}.", target.name);
            }
            show(ctx, &target)?;
        }
        TargetsCmd::Update(a) => {
            let c = a.common;
            let body = UpdateTarget {
                address: a.address,
                labels: (!c.labels.is_empty())
                    .then(|| kv_map(&c.labels))
                    .transpose()?,
                default_duration_secs: c.default_duration,
                max_duration_secs: c.max_duration,
                connection_limit: c.connection_limit,
                worker_filter: (!c.worker_filter.is_empty())
                    .then(|| kv_map(&c.worker_filter))
                    .transpose()?,
                enabled: match (a.enable, a.disable) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            if body.is_empty() {
                anyhow::bail!(
                    "nothing to change: give what to set (--address, --label, --default-duration, \
                     --max-duration, --connection-limit, --worker-filter, --enable or --disable)"
                );
            }
            let target: Target = api.patch(&["v1", "targets", &a.name], &body).await?;
            if !ctx.json {
                crate::outln!("Updated target {}.", target.name);
            }
            show(ctx, &target)?;
        }
        TargetsCmd::Delete { name } => {
            api.delete(&["v1", "targets", &name]).await?;
            if !ctx.json {
                crate::outln!("Deleted target {name}.");
            }
        }
    }
    ok()
}

fn show(ctx: &Ctx, t: &Target) -> Result<()> {
    if ctx.json {
        return print_json(t);
    }
    print_fields(&[
        ("Name", t.name.clone()),
        ("Type", t.kind.as_str().into()),
        ("Address", t.address.clone()),
        ("Labels", kv_list(&t.labels)),
        ("Default duration", short_duration(t.default_duration_secs)),
        ("Max duration", short_duration(t.max_duration_secs)),
        (
            "Connection limit",
            t.connection_limit
                .map_or_else(|| "unlimited".into(), |n| n.to_string()),
        ),
        ("Worker filter", kv_list(&t.worker_filter)),
        ("Enabled", yes_no(t.enabled)),
        ("Created", rfc3339(t.created_at)),
    ])?;
    Ok(())
}

fn kind(k: TargetKind) -> TargetType {
    match k {
        TargetKind::Tcp => TargetType::Tcp,
        TargetKind::Ssh => TargetType::Ssh,
        TargetKind::Postgres => TargetType::Postgres,
    }
}

pub(super) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}
