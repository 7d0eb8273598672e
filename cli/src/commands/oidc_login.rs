//! `postern login --oidc` (browser, authorization code flow) and `postern login --device`
//! (device authorization grant): the controller does the OpenID Connect work; the CLI starts
//! an attempt, sends the person to the IdP, and polls the attempt for its API token.

use std::io::{IsTerminal, Write};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};

use postern_controller::api::types::{
    AuthMethods, LoginResponse, OidcAttempt, OidcDeviceStart, OidcStart, OidcStartRequest,
};

use super::{ok, Ctx};
use crate::args::LoginArgs;
use crate::client::ApiClient;
use crate::output::print_json;

/// How often the attempt is polled.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Logs in with single sign-on and saves the token like a password login.
pub async fn login(ctx: &Ctx, args: &LoginArgs) -> Result<ExitCode> {
    let api = ctx.anon_api()?;
    let req = OidcStartRequest {
        method: args.method.clone(),
    };
    let (attempt, expires_at, waiting) = if args.device {
        let d: OidcDeviceStart = api.post(&["v1", "auth", "oidc", "device"], &req).await?;
        eprintln!(
            "To log in with {}, open this URL on any device:\n",
            d.method
        );
        eprintln!("  {}\n", d.verification_uri);
        eprintln!("and enter the code:  {}\n", d.user_code);
        if let Some(full) = &d.verification_uri_complete {
            eprintln!("(or open {full} , which has the code filled in)\n");
        }
        (
            d.attempt_id,
            d.expires_at,
            "Waiting for the login on the other device",
        )
    } else {
        let s: OidcStart = api.post(&["v1", "auth", "oidc", "start"], &req).await?;
        let opened = !args.no_browser && open_browser(&s.auth_url);
        if opened {
            eprintln!(
                "Opened your browser to log in with {}. If it did not open, visit:\n",
                s.method
            );
        } else {
            eprintln!("To log in with {}, open this URL in a browser:\n", s.method);
        }
        eprintln!("  {}\n", s.auth_url);
        (
            s.attempt_id,
            s.expires_at,
            "Waiting for the login in the browser",
        )
    };
    let resp = wait(&api, &attempt, expires_at, waiting).await?;
    super::auth::save_login(ctx, resp)
}

/// `postern login --list-methods`.
pub async fn list_methods(ctx: &Ctx) -> Result<ExitCode> {
    let methods: AuthMethods = ctx.anon_api()?.get(&["v1", "auth", "methods"], &[]).await?;
    if ctx.json {
        print_json(&methods)?;
        return ok();
    }
    for m in &methods.methods {
        match m.kind.as_str() {
            "password" => println!("password\tpostern login --user NAME"),
            _ => println!(
                "{}\tpostern login --method {}{}\t{}",
                m.name,
                m.name,
                if m.device_flow { " [--device]" } else { "" },
                m.issuer.as_deref().unwrap_or("")
            ),
        }
    }
    ok()
}

/// Polls the attempt until it is done or failed, with a spinner on a terminal.
async fn wait(
    api: &ApiClient,
    attempt: &str,
    expires_at: i64,
    waiting: &str,
) -> Result<LoginResponse> {
    let tty = std::io::stderr().is_terminal();
    let frames = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    let clear = |tty: bool| {
        if tty {
            eprint!("\r\x1b[2K");
        }
    };
    loop {
        let state: OidcAttempt = api
            .get(&["v1", "auth", "oidc", "attempts", attempt], &[])
            .await?;
        match state {
            OidcAttempt::Done(resp) => {
                clear(tty);
                return Ok(resp);
            }
            OidcAttempt::Failed { message } => {
                clear(tty);
                bail!("login failed: {message}");
            }
            OidcAttempt::Pending { .. } if postern_proto::unix_now() > expires_at + 5 => {
                clear(tty);
                bail!("the login was not completed in time: run `postern login` again");
            }
            OidcAttempt::Pending { .. } => {}
        }
        // Ten spinner frames per poll.
        for _ in 0..10 {
            if tty {
                eprint!(
                    "\r{} {waiting}… (Ctrl-C to give up)",
                    frames[tick % frames.len()]
                );
                let _ = std::io::stderr().flush();
                tick += 1;
            }
            tokio::time::sleep(POLL_EVERY / 10).await;
        }
    }
}

/// Opens `url` with `$BROWSER` (the first of a `:`-separated list), else `xdg-open`.
/// Returns whether a browser command could be started.
fn open_browser(url: &str) -> bool {
    let from_env = std::env::var("BROWSER").ok().and_then(|b| {
        b.split(':')
            .map(str::trim)
            .find(|c| !c.is_empty())
            .map(str::to_owned)
    });
    let command = from_env.unwrap_or_else(|| "xdg-open".to_owned());
    let mut parts = command.split_whitespace();
    let Some(program) = parts.next() else {
        return false;
    };
    let spawned = std::process::Command::new(program)
        .args(parts)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            // Reap it when it exits; the login does not wait for the browser.
            std::thread::spawn(move || child.wait());
            true
        }
        Err(_) => false,
    }
}
