//! `postern policy check`.

use std::process::ExitCode;

use anyhow::Result;

use postern_controller::api::types::Decision;

use super::Ctx;
use crate::args::PolicyCmd;
use crate::output::print_json;

/// Runs a `policy` subcommand. A denial exits 1 (like `kubectl auth can-i`), so scripts can
/// test the answer; it is an answer, not an error, so nothing goes to stderr.
pub async fn run(ctx: &Ctx, cmd: PolicyCmd) -> Result<ExitCode> {
    let PolicyCmd::Check {
        user,
        target,
        action,
        login,
    } = cmd;
    let mut query = vec![
        ("user", user.clone()),
        ("target", target.clone()),
        ("action", action),
    ];
    if let Some(login) = login {
        query.push(("login", login));
    }
    let d: Decision = ctx.api()?.get(&["v1", "policy", "check"], &query).await?;
    if ctx.json {
        print_json(&d)?;
    } else {
        let verdict = if d.allowed { "ALLOWED" } else { "DENIED" };
        if d.action.contains(':') {
            // An admin action concerns no target.
            crate::outln!("{verdict}: {user} {}", d.action);
        } else {
            crate::outln!("{verdict}: {user} {} on {target}", d.action);
        }
        crate::outln!(
            "  rule:   {}",
            d.rule.as_deref().unwrap_or("none (nothing allows it)")
        );
        crate::outln!("  reason: {}", d.reason);
    }
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
