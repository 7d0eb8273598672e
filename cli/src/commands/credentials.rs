//! `postern credentials set|show|delete`: the brokered credential a target's sessions use.
//! The secret goes to the controller once and is never printed or read back.

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};

use postern_controller::api::types::{CredentialInfo, CredentialKind, SetCredential, SshCa};

use super::{ok, Ctx};
use crate::args::CredentialsCmd;
use crate::output::print_json;
use crate::prompt;

/// Runs a `credentials` subcommand.
pub async fn run(ctx: &Ctx, cmd: CredentialsCmd) -> Result<ExitCode> {
    let api = ctx.api()?;
    match cmd {
        CredentialsCmd::Set {
            target,
            username,
            password_stdin,
            ssh_key,
            ssh_ca,
            per_session_roles,
        } => {
            if ssh_ca {
                return set_ssh_ca(ctx, &target, username).await;
            }
            // The target first: a mistyped name is the error to report, before the secret
            // is read (and found empty, or typed for nothing). (Any other refusal of the look
            // is left to the write, which may be allowed without it.)
            if let Err(e) = api
                .get::<serde_json::Value>(&["v1", "targets", &target], &[])
                .await
            {
                if e.is_not_found() {
                    return Err(e.into());
                }
            }
            let (kind, secret) = match ssh_key {
                Some(path) => {
                    let pem = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read SSH key {}", path.display()))?;
                    (CredentialKind::SshKey, pem)
                }
                None if password_stdin && per_session_roles => {
                    (CredentialKind::PostgresAdmin, prompt::read_line().await?)
                }
                None if password_stdin => (CredentialKind::Password, prompt::read_line().await?),
                None => bail!("give --password-stdin or --ssh-key FILE"),
            };
            if secret.is_empty() {
                bail!("the secret is empty");
            }
            let info: CredentialInfo = api
                .put(
                    &["v1", "targets", &target, "credential"],
                    &SetCredential {
                        kind,
                        username,
                        secret,
                    },
                )
                .await?;
            show(ctx, &info, "Stored")
        }
        CredentialsCmd::Show { target } => {
            let info: CredentialInfo = api
                .get(&["v1", "targets", &target, "credential"], &[])
                .await?;
            show(ctx, &info, "Credential")
        }
        CredentialsCmd::Delete { target } => {
            api.delete(&["v1", "targets", &target, "credential"])
                .await?;
            if !ctx.json {
                crate::outln!("Removed the credential of target {target}.");
            }
            ok()
        }
    }
}

fn show(ctx: &Ctx, info: &CredentialInfo, verb: &str) -> Result<ExitCode> {
    if ctx.json {
        print_json(info)?;
    } else {
        let kind = match info.kind {
            CredentialKind::Password => "password",
            CredentialKind::SshKey => "SSH key",
            CredentialKind::SshCa => "SSH certificate (controller CA)",
            CredentialKind::PostgresAdmin => "PostgreSQL admin (per-session roles)",
        };
        crate::outln!(
            "{verb}: {kind} for user '{}' on target {}.",
            info.username,
            info.target
        );
    }
    ok()
}

/// Certificate mode: no secret is stored; prints the CA key the target must trust.
async fn set_ssh_ca(ctx: &Ctx, target: &str, username: String) -> Result<ExitCode> {
    let api = ctx.api()?;
    let info: CredentialInfo = api
        .put(
            &["v1", "targets", target, "credential"],
            &SetCredential {
                kind: CredentialKind::SshCa,
                username,
                secret: String::new(),
            },
        )
        .await?;
    let ca: SshCa = api.get(&["v1", "ssh", "ca"], &[]).await?;
    if ctx.json {
        print_json(&serde_json::json!({"credential": info, "ssh_ca": ca.public_key}))?;
    } else {
        crate::outln!(
            "Stored: SSH certificate mode for user '{}' on target {}.\n\
             Trust the Postern SSH user CA on the target (sshd_config `TrustedUserCAKeys FILE`,\n\
             FILE holding this line):\n{}",
            info.username,
            info.target,
            ca.public_key
        );
    }
    ok()
}
