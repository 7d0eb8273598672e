//! `postern roles ...`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::{CreateRole, Effect, Principal, Role, Rule};

use super::{ok, Ctx};
use crate::args::{kv_map, BindArgs, RolesCmd, RuleArgs};
use crate::output::{kv_list, print_json, Table};

/// Runs a `roles` subcommand.
pub async fn run(ctx: &Ctx, cmd: RolesCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    let (role, done): (Role, String) = match cmd {
        RolesCmd::List => {
            let roles: Vec<Role> = api.get(&["v1", "roles"], &[]).await?;
            if ctx.json {
                print_json(&roles)?;
                return ok();
            }
            let mut t = Table::new(&["NAME", "RULES", "BOUND TO"]);
            for r in roles {
                let bound: Vec<String> = r.bindings.iter().map(principal).collect();
                t.row(vec![
                    r.name,
                    r.rules.len().to_string(),
                    crate::output::list(&bound),
                ]);
            }
            t.print("No roles.")?;
            return ok();
        }
        RolesCmd::Show { name } => {
            let r: Role = api.get(&["v1", "roles", &name], &[]).await?;
            (r, String::new())
        }
        RolesCmd::Create { name } => {
            let r: Role = api.post(&["v1", "roles"], &CreateRole { name }).await?;
            let done = format!("Created role {}.", r.name);
            (r, done)
        }
        RolesCmd::Delete { name } => {
            api.delete(&["v1", "roles", &name]).await?;
            if !ctx.json {
                crate::outln!("Deleted role {name}.");
            }
            return ok();
        }
        RolesCmd::Allow(a) => add_rule(&api, Effect::Allow, a).await?,
        RolesCmd::Deny(a) => add_rule(&api, Effect::Deny, a).await?,
        RolesCmd::RemoveRule { name, number } => {
            let r: Role = api
                .delete_json(&["v1", "roles", &name, "rules", &number.to_string()])
                .await?;
            let done = format!("Removed rule #{number} of role {}.", r.name);
            (r, done)
        }
        RolesCmd::Bind(b) => bind(&api, "bind", b).await?,
        RolesCmd::Unbind(b) => bind(&api, "unbind", b).await?,
    };
    if ctx.json {
        print_json(&role)?;
    } else {
        if !done.is_empty() {
            crate::outln!("{done}");
        }
        show(&role)?;
    }
    ok()
}

async fn add_rule(
    api: &crate::client::ApiClient,
    effect: Effect,
    a: RuleArgs,
) -> Result<(Role, String)> {
    let rule = Rule {
        effect,
        actions: a.actions.0,
        targets: a.targets,
        labels: kv_map(&a.labels)?,
        logins: a.logins,
    };
    let done = format!("Added to role {}: {}.", a.role, describe_rule(&rule));
    let role: Role = api.post(&["v1", "roles", &a.role, "rules"], &rule).await?;
    Ok((role, done))
}

async fn bind(api: &crate::client::ApiClient, verb: &str, b: BindArgs) -> Result<(Role, String)> {
    let who = match (b.user, b.group) {
        (Some(u), _) => Principal::User(u),
        (None, Some(g)) => Principal::Group(g),
        (None, None) => anyhow::bail!("give --user or --group"),
    };
    let role: Role = api.post(&["v1", "roles", &b.role, verb], &who).await?;
    let done = if verb == "bind" {
        format!("Bound role {} to {}.", b.role, principal(&who))
    } else {
        format!("Unbound role {} from {}.", b.role, principal(&who))
    };
    Ok((role, done))
}

fn show(r: &Role) -> Result<()> {
    crate::outln!("Role {}", r.name);
    if r.rules.is_empty() {
        crate::outln!("  no rules");
    }
    let mut t = Table::new(&["  #", "EFFECT", "ACTIONS", "TARGETS", "LABELS", "LOGINS"]);
    for (i, rule) in r.rules.iter().enumerate() {
        t.row(vec![
            format!("  {}", i + 1),
            effect(rule.effect).into(),
            rule.actions.join(","),
            rule.targets.clone().unwrap_or_else(|| "*".into()),
            kv_list(&rule.labels),
            // A deny with logins refuses only those logins: it must not read as a blanket one.
            if rule.logins.is_empty() {
                "-".into()
            } else {
                rule.logins.join(",")
            },
        ]);
    }
    if !r.rules.is_empty() {
        crate::out!("{}", t.render());
    }
    let bound: Vec<String> = r.bindings.iter().map(principal).collect();
    crate::outln!("Bound to: {}", crate::output::list(&bound));
    Ok(())
}

/// `allow connect on pg-* with env=prod`.
fn describe_rule(r: &Rule) -> String {
    let mut s = format!(
        "{} {} on {}",
        effect(r.effect),
        r.actions.join(","),
        r.targets.as_deref().unwrap_or("*")
    );
    if !r.labels.is_empty() {
        s.push_str(" with ");
        s.push_str(&kv_list(&r.labels));
    }
    if !r.logins.is_empty() {
        s.push_str(" as ");
        s.push_str(&r.logins.join(","));
    }
    s
}

fn effect(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}

fn principal(p: &Principal) -> String {
    match p {
        Principal::User(u) => format!("user:{u}"),
        Principal::Group(g) => format!("group:{g}"),
    }
}
