//! `postern psql TARGET [--db NAME] [--db-user U] [-- PSQL ARGS...]`: runs the system `psql`
//! through a session. The worker logs in to the database with the brokered credential; psql
//! is never asked for a password (there is none for the engineer to know).

use std::process::ExitCode;

use anyhow::{bail, Result};

use postern_controller::api::types::{CredentialInfo, CredentialKind, Target, TargetType};

use super::connect::{run_session, SessionRequest};
use super::Ctx;
use crate::args::PsqlArgs;

/// The psql program, unless `POSTERN_PSQL` names another.
const PSQL: &str = "psql";

/// Runs `postern psql`.
pub async fn run(ctx: &Ctx, args: PsqlArgs) -> Result<ExitCode> {
    check_psql_args(&args.psql_args)?;
    // psql speaks to a tcp or postgres target; an ssh one is refused before a session is
    // made for nothing (if the caller may look the target up; the session refuses it anyway).
    if let Ok(target) = ctx
        .api()?
        .get::<Target>(&["v1", "targets", &args.target], &[])
        .await
    {
        if target.kind == TargetType::Ssh {
            bail!(
                "target '{}' is an ssh target, not a database: use `postern ssh {}`",
                target.name,
                target.name
            );
        }
        if target.kind == TargetType::Tcp {
            crate::errln!(
                "note: '{}' is a tcp target: psql runs through it, but its statements are not \
                 audited (a postgres target audits them and brokers the login)",
                target.name
            );
        }
    }
    // psql sends a database name in any case (its default is the OS user's name): without
    // `--db`, ask for the database user's own database, as a direct login would.
    let db_user = match &args.db_user {
        Some(user) => Some(user.clone()),
        None => credential_user(ctx, &args.target).await,
    };
    let program = std::env::var("POSTERN_PSQL").unwrap_or_else(|_| PSQL.to_owned());
    let command = psql_command(
        &program,
        args.db.as_deref(),
        db_user.as_deref(),
        &args.psql_args,
    );
    run_session(
        ctx,
        SessionRequest {
            target: args.target,
            port: args.port,
            duration: args.duration,
            login: args.db_user,
            lanes: 1,
            command,
        },
    )
    .await
}

/// psql is pointed at the session's local port: a host or port of the user's own would
/// connect around the session, unaudited, and still look like a `postern psql` that worked.
fn check_psql_args(extra: &[String]) -> Result<()> {
    for arg in extra {
        let names_server = ["-h", "-p", "--host", "--port"].iter().any(|opt| {
            arg == opt
                || (opt.len() == 2 && arg.starts_with(opt))
                || arg.starts_with(&format!("{opt}="))
        }) || [
            "postgres://",
            "postgresql://",
            "host=",
            "hostaddr=",
            "port=",
        ]
        .iter()
        .any(|p| arg.starts_with(p));
        if names_server {
            bail!(
                "'{arg}': postern psql points psql at the session itself; leave out the host \
                 and port (choose the database and user with --db and --db-user)"
            );
        }
    }
    Ok(())
}

/// The user name of the target's password credential, if the caller may read it (an admin
/// credential for per-session roles names no user to log in as).
async fn credential_user(ctx: &Ctx, target: &str) -> Option<String> {
    let api = ctx.api().ok()?;
    let info: CredentialInfo = api
        .get(&["v1", "targets", target, "credential"], &[])
        .await
        .ok()?;
    (info.kind == CredentialKind::Password).then_some(info.username)
}

/// `psql -h {host} -p {port} [-U USER] [-d DB] ARGS...` (placeholders filled by the session
/// runner).
fn psql_command(
    program: &str,
    db: Option<&str>,
    db_user: Option<&str>,
    extra: &[String],
) -> Vec<String> {
    let mut argv: Vec<String> = [program, "-h", "{host}", "-p", "{port}"]
        .map(str::to_owned)
        .to_vec();
    if let Some(user) = db_user {
        argv.extend(["-U".to_owned(), user.to_owned()]);
    }
    if let Some(db) = db.or(db_user) {
        argv.extend(["-d".to_owned(), db.to_owned()]);
    }
    argv.extend(extra.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_or_port_of_the_users_own_is_refused() {
        let check = |args: &[&str]| {
            check_psql_args(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
        };
        assert!(check(&["-c", "select 'host=1', 2"]).is_ok());
        assert!(check(&["-X", "-v", "ON_ERROR_STOP=1", "-f", "q.sql"]).is_ok());
        for bad in [
            &["-h", "127.0.0.1", "-c", "select 1"][..],
            &["-p", "5432"],
            &["-p5432"],
            &["--host=db"],
            &["--port", "5432"],
            &["postgresql://u@db:5432/app"],
            &["host=db dbname=app"],
        ] {
            let err = check(bad).expect_err("refused");
            assert!(
                err.to_string().contains("leave out the host"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn psql_arguments() {
        let extra = vec!["-c".to_owned(), "select 1".to_owned()];
        assert_eq!(
            psql_command("psql", Some("app"), Some("ro"), &extra),
            ["psql", "-h", "{host}", "-p", "{port}", "-U", "ro", "-d", "app", "-c", "select 1"]
        );
        // The database defaults to the user's own; with no user known, psql decides.
        assert_eq!(
            psql_command("psql", None, Some("ro"), &[]),
            ["psql", "-h", "{host}", "-p", "{port}", "-U", "ro", "-d", "ro"]
        );
        assert_eq!(
            psql_command("psql", None, None, &[]),
            ["psql", "-h", "{host}", "-p", "{port}"]
        );
    }
}
