//! `postern login`, `logout`, `whoami`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use serde_json::json;

use postern_controller::api::types::{LoginRequest, LoginResponse, WhoAmI};

use super::{ok, Ctx};
use crate::args::LoginArgs;
use crate::client::{ApiClient, ApiError};
use crate::output::{list, print_fields, print_json, relative, when};
use crate::prompt;

/// Logs in (password, or single sign-on with `--oidc`/`--device`) and saves the token in
/// the profile.
pub async fn login(ctx: &Ctx, args: LoginArgs) -> Result<ExitCode> {
    let interactive = prompt::stdin_is_tty() && !args.password_stdin;
    let ca_pem = crate::trust::establish(ctx, args.ca_fingerprint.as_deref(), interactive).await?;
    let ctx = &Ctx {
        ca_pem,
        ..ctx.clone()
    };
    if args.list_methods {
        return super::oidc_login::list_methods(ctx).await;
    }
    if args.oidc || args.device || args.method.is_some() {
        return super::oidc_login::login(ctx, &args).await;
    }
    let tty = prompt::stdin_is_tty();
    let user = match args.user.or_else(|| ctx.profile.user.clone()) {
        Some(u) => u,
        None if tty && !args.password_stdin => prompt::ask("User: ").await?,
        None => bail!("--user is required when stdin is not a terminal"),
    };
    if user.trim().is_empty() {
        bail!("no user name given");
    }
    let password = if tty && !args.password_stdin {
        prompt::ask_password(&format!("Password for {user}: ")).await?
    } else {
        prompt::read_line().await?
    };
    if password.is_empty() {
        bail!("no password given (to sign in through single sign-on, `postern login --oidc`)");
    }
    let resp = login_request(&ctx.anon_api()?, &user, password).await?;
    save_login(ctx, resp)
}

/// Saves a login's token in the profile and says so.
pub(super) fn save_login(ctx: &Ctx, resp: LoginResponse) -> Result<ExitCode> {
    let mut profile = ctx.profile.clone();
    profile.addr = Some(ctx.addr.clone());
    profile.token = Some(resp.token);
    profile.user = Some(resp.user.clone());
    profile.ca_pem = ctx.ca_pem.clone();
    profile.save(&ctx.config_dir)?;
    if ctx.json {
        print_json(&json!({
            "addr": ctx.addr,
            "user": resp.user,
            "expires_at": resp.expires_at,
        }))?;
    } else {
        crate::outln!(
            "Logged in to {} as {} (token expires {})",
            ctx.addr,
            resp.user,
            relative(resp.expires_at)
        );
    }
    ok()
}

/// `POST /v1/auth/login`; shared with `postern dev`.
pub(crate) async fn password_login(
    addr: &str,
    user: &str,
    password: String,
) -> Result<LoginResponse, ApiError> {
    login_request(&ApiClient::new(addr, None)?, user, password).await
}

async fn login_request(
    api: &ApiClient,
    user: &str,
    password: String,
) -> Result<LoginResponse, ApiError> {
    api.post(
        &["v1", "auth", "login"],
        &LoginRequest {
            user: user.to_owned(),
            password,
        },
    )
    .await
}

/// Revokes the token at the controller and forgets it.
pub async fn logout(ctx: &Ctx) -> Result<ExitCode> {
    if ctx.token.is_none() {
        if !ctx.json {
            crate::outln!("Not logged in.");
        }
        return ok();
    }
    let revoked = match ctx.api()?.post_no_content(&["v1", "auth", "logout"]).await {
        Ok(()) | Err(ApiError::Unauthenticated) => true,
        Err(e) => {
            crate::errln!("warning: could not revoke the token at the controller: {e}");
            false
        }
    };
    if ctx.token_from_profile {
        let mut profile = ctx.profile.clone();
        profile.token = None;
        profile.save(&ctx.config_dir)?;
    }
    if ctx.json {
        print_json(&json!({ "addr": ctx.addr, "revoked": revoked }))?;
    } else if ctx.token_from_profile {
        crate::outln!("Logged out of {}.", ctx.addr);
    } else {
        crate::outln!("Token revoked (it came from --token or POSTERN_TOKEN, not the profile).");
    }
    ok()
}

/// Shows the token's user, groups and roles.
pub async fn whoami(ctx: &Ctx) -> Result<ExitCode> {
    let me: WhoAmI = ctx.api()?.get(&["v1", "whoami"], &[]).await?;
    if ctx.json {
        print_json(&me)?;
    } else {
        print_fields(&[
            ("User", me.user),
            ("Controller", ctx.addr.clone()),
            ("Groups", list(&me.groups)),
            ("Roles", list(&me.roles)),
            ("Token expires", when(me.token_expires_at)),
        ])?;
    }
    ok()
}
