//! `postern users ...`.

use std::process::ExitCode;

use anyhow::{bail, Result};

use postern_controller::api::types::{CreateUser, SetPassword, User};

use super::targets::yes_no;
use super::{ok, Ctx};
use crate::args::UsersCmd;
use crate::output::{list, print_fields, print_json, rfc3339, Table};
use crate::prompt;

/// Runs a `users` subcommand.
pub async fn run(ctx: &Ctx, cmd: UsersCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        UsersCmd::List => {
            let users: Vec<User> = api.get(&["v1", "users"], &[]).await?;
            if ctx.json {
                print_json(&users)?;
                return ok();
            }
            let mut t = Table::new(&["NAME", "LOCKED", "PASSWORD", "GROUPS", "CREATED"]);
            for u in users {
                t.row(vec![
                    u.name,
                    yes_no(u.locked),
                    if u.has_password { "set" } else { "-" }.into(),
                    list(&u.groups),
                    rfc3339(u.created_at),
                ]);
            }
            t.print("No users.")?;
        }
        UsersCmd::Show { name } => {
            let user: User = api.get(&["v1", "users", &name], &[]).await?;
            show(ctx, &user)?;
        }
        UsersCmd::Create {
            name,
            password_stdin,
        } => {
            let password = if password_stdin {
                let p = prompt::read_line().await?;
                if p.is_empty() {
                    bail!("--password-stdin was given but stdin held no password");
                }
                Some(p)
            } else {
                None
            };
            let user: User = api
                .post(&["v1", "users"], &CreateUser { name, password })
                .await?;
            if !ctx.json {
                let how = if user.has_password {
                    "with a password"
                } else {
                    "without a password (SSO only, or set one later with `postern users set-password`)"
                };
                crate::outln!("Created user {} {how}.", user.name);
            }
            show(ctx, &user)?;
        }
        UsersCmd::SetPassword {
            name,
            password_stdin,
            current,
        } => {
            let (current_password, password) = if password_stdin {
                let current = if current {
                    Some(prompt::read_line().await?)
                } else {
                    None
                };
                (current, prompt::read_line().await?)
            } else if prompt::stdin_is_tty() {
                let current = if current {
                    Some(prompt::ask_password("Current password: ").await?)
                } else {
                    None
                };
                let new = prompt::ask_password(&format!("New password for {name}: ")).await?;
                if prompt::ask_password("Again: ").await? != new {
                    bail!("the two passwords differ; nothing was changed");
                }
                (current, new)
            } else {
                bail!(
                    "stdin is not a terminal: pass --password-stdin to read the password from it"
                );
            };
            if password.is_empty() {
                bail!("no new password given; nothing was changed");
            }
            let user: User = api
                .post(
                    &["v1", "users", &name, "password"],
                    &SetPassword {
                        password,
                        current_password,
                    },
                )
                .await?;
            if !ctx.json {
                crate::outln!(
                    "Set the password of {}; their other logins have ended.",
                    user.name
                );
            }
            show(ctx, &user)?;
        }
        UsersCmd::Delete { name } => {
            let user: User = api.get(&["v1", "users", &name], &[]).await?;
            api.delete(&["v1", "users", &name]).await?;
            if !ctx.json {
                crate::outln!("Deleted user {name}.");
                if !user.has_password {
                    crate::outln!(
                        "note: a user who logs in with single sign-on is created afresh at their next login; to keep someone out, lock the user (`postern users lock NAME`) rather than delete it"
                    );
                }
            }
        }
        UsersCmd::Lock { name } => {
            let user: User = api.post_empty(&["v1", "users", &name, "lock"]).await?;
            if !ctx.json {
                crate::outln!(
                    "Locked user {}: logins and new sessions are refused, open sessions cancelled.",
                    user.name
                );
            }
            show(ctx, &user)?;
        }
        UsersCmd::Unlock { name } => {
            let user: User = api.post_empty(&["v1", "users", &name, "unlock"]).await?;
            if !ctx.json {
                crate::outln!("Unlocked user {}.", user.name);
            }
            show(ctx, &user)?;
        }
    }
    ok()
}

fn show(ctx: &Ctx, u: &User) -> Result<()> {
    if ctx.json {
        return print_json(u);
    }
    print_fields(&[
        ("Name", u.name.clone()),
        ("Locked", yes_no(u.locked)),
        (
            "Password",
            if u.has_password { "set" } else { "not set" }.into(),
        ),
        ("Groups", super::groups::marked(&u.groups, &u.idp_groups)),
        ("Created", rfc3339(u.created_at)),
    ])?;
    Ok(())
}
