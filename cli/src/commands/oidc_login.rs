//! `postern login --oidc` (browser, authorization code flow) and `postern login --device`
//! (device authorization grant): the controller does the OpenID Connect work; the CLI starts
//! an attempt, sends the person to the IdP, and polls the attempt for its API token.
//!
//! A code-flow token goes only to the terminal that started the login: once the IdP is done,
//! the controller sends the browser to this CLI's port on 127.0.0.1 with a confirmation code
//! (or, with `--no-browser`, shows the code for the person to type here), and the CLI
//! collects the token with it. Someone who sends a victim their own login link gets nothing.

use std::io::{IsTerminal, Write};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use postern_controller::api::types::{
    AuthMethods, LoginResponse, OidcAttempt, OidcConfirmRequest, OidcDeviceStart, OidcStart,
    OidcStartRequest,
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
        return_port: None,
    };
    if !args.device {
        return code_login(ctx, &api, args, req).await;
    }
    let (attempt, expires_at, waiting) = {
        let d: OidcDeviceStart = api.post(&["v1", "auth", "oidc", "device"], &req).await?;
        crate::errln!(
            "To log in with {}, open this URL on any device:\n",
            d.method
        );
        crate::errln!("  {}\n", d.verification_uri);
        crate::errln!("and enter the code:  {}\n", d.user_code);
        if let Some(full) = &d.verification_uri_complete {
            crate::errln!("(or open {full} , which has the code filled in)\n");
        }
        (
            d.attempt_id,
            d.expires_at,
            "Waiting for the login on the other device",
        )
    };
    let resp = wait(&api, &attempt, expires_at, waiting, None).await?;
    super::auth::save_login(ctx, resp)
}

/// `postern login --oidc`: the browser comes back to a port of this CLI on 127.0.0.1 with the
/// confirmation code; with `--no-browser` (the browser may be on another machine), the person
/// types the code the callback page shows.
async fn code_login(
    ctx: &Ctx,
    api: &ApiClient,
    args: &LoginArgs,
    mut req: OidcStartRequest,
) -> Result<ExitCode> {
    let listener = if args.no_browser {
        None
    } else {
        let l = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot listen on 127.0.0.1 for the browser's return (try --no-browser)")?;
        req.return_port = Some(l.local_addr()?.port());
        Some(l)
    };
    let s: OidcStart = api.post(&["v1", "auth", "oidc", "start"], &req).await?;
    // The browser's return carries the attempt's state, which is in the URL it was sent to.
    let state = reqwest::Url::parse(&s.auth_url)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "state")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let (codes_tx, codes) = mpsc::channel(4);
    match listener {
        Some(l) => {
            if open_browser(&s.auth_url) {
                crate::errln!(
                    "Opened your browser to log in with {}. If it did not open, visit:\n",
                    s.method
                );
            } else {
                crate::errln!(
                    "To log in with {}, open this URL in a browser on this machine:\n",
                    s.method
                );
            }
            crate::errln!("  {}\n", s.auth_url);
            crate::errln!(
                "(The browser comes back to this terminal on 127.0.0.1: if it runs on another \
                 machine, stop this and use `postern login --oidc --no-browser`.)\n"
            );
            tokio::spawn(browser_returns(l, state, codes_tx));
        }
        None => {
            crate::errln!(
                "To log in with {}, open this URL in a browser:\n\n  {}\n",
                s.method,
                s.auth_url
            );
            crate::errln!("then type here the confirmation code the browser shows.");
            std::thread::spawn(move || typed_codes(&codes_tx));
        }
    }
    let resp = wait(
        api,
        &s.attempt_id,
        s.expires_at,
        "Waiting for the login in the browser",
        Some(codes),
    )
    .await?;
    super::auth::save_login(ctx, resp)
}

/// What asks for a typed confirmation code.
const CODE_PROMPT: &str = "Confirmation code: ";

/// A confirmation code, and the browser's connection to answer if it came by the browser.
type CodeFrom = (String, Option<TcpStream>);

/// Accepts the browser's return on `listener`: each `GET /postern-login?code=…&state=…` with
/// the attempt's `state` passes its code on; anything else (another program on this machine
/// cannot know the state) is answered 404 and costs the login nothing.
async fn browser_returns(listener: TcpListener, state: String, codes: mpsc::Sender<CodeFrom>) {
    let state = std::sync::Arc::new(state);
    while let Ok((stream, _)) = listener.accept().await {
        let (codes, state) = (codes.clone(), state.clone());
        // A browser may open connections it sends nothing on: each is read on its own.
        tokio::spawn(async move {
            let mut stream = stream;
            let read = tokio::time::timeout(Duration::from_secs(10), read_return(&mut stream));
            match read.await {
                Ok(Some((code, returned))) if !state.is_empty() && returned == *state => {
                    let _ = codes.send((code, Some(stream))).await;
                }
                _ => answer_browser(Some(stream), "404 Not Found", "Not found", "").await,
            }
        });
    }
}

/// The `code` and `state` of a request for `/postern-login?…` (at most 8 KiB of it read).
async fn read_return(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let target = head
        .lines()
        .next()?
        .strip_prefix("GET ")?
        .split(' ')
        .next()?;
    let url = reqwest::Url::parse(&format!("http://127.0.0.1{target}")).ok()?;
    if url.path() != "/postern-login" {
        return None;
    }
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.into_owned())
    };
    Some((param("code")?, param("state")?))
}

/// Answers the browser (if the code came from it) with a small page.
async fn answer_browser(stream: Option<TcpStream>, status: &str, title: &str, text: &str) {
    let Some(mut stream) = stream else { return };
    let esc = postern_controller::api::html_escape;
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title></head>\
         <body><h1>{}</h1><p>{}</p></body></html>",
        esc(title),
        esc(title),
        esc(text)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads confirmation codes typed on stdin, one per line, until it ends (the prompt after a
/// wrong code comes with its answer, from [`confirm`]).
fn typed_codes(codes: &mpsc::Sender<CodeFrom>) {
    let mut line = String::new();
    crate::errout!("{CODE_PROMPT}");
    let _ = std::io::stderr().flush();
    loop {
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => {}
            Ok(_) => {
                if codes.blocking_send((line.trim().to_owned(), None)).is_err() {
                    return;
                }
            }
        }
    }
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
            "password" => crate::outln!("password\tpostern login --user NAME"),
            _ => crate::outln!(
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

/// Polls the attempt until it is done or failed, with a spinner on a terminal; a code-flow
/// login collects its token with the first right confirmation code from `codes`.
async fn wait(
    api: &ApiClient,
    attempt: &str,
    expires_at: i64,
    waiting: &str,
    mut codes: Option<mpsc::Receiver<CodeFrom>>,
) -> Result<LoginResponse> {
    // Not over a prompt for a typed code.
    let typed = std::io::stdin().is_terminal() && codes.is_some();
    let tty = std::io::stderr().is_terminal() && !typed;
    let frames = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    let clear = |tty: bool| {
        if tty {
            crate::errout!("\r\x1b[2K");
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
            OidcAttempt::Pending { .. } | OidcAttempt::Confirm { .. }
                if postern_proto::unix_now() > expires_at.saturating_add(5) =>
            {
                clear(tty);
                bail!("the login was not completed in time: run `postern login` again");
            }
            OidcAttempt::Pending { .. } | OidcAttempt::Confirm { .. } => {}
        }
        // Ten spinner frames per poll, or a confirmation code.
        for _ in 0..10 {
            if tty {
                crate::errout!(
                    "\r{} {waiting}… (Ctrl-C to give up)",
                    frames[tick % frames.len()]
                );
                let _ = std::io::stderr().flush();
                tick += 1;
            }
            let code = async {
                match codes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY / 10) => {}
                next = code => match next {
                    Some((code, browser)) => {
                        if let Some(resp) = confirm(api, attempt, &code, browser).await? {
                            clear(tty);
                            return Ok(resp);
                        }
                    }
                    None => {
                        clear(tty);
                        bail!("no confirmation code can come any more (stdin ended): run `postern login --oidc --no-browser` in a terminal, and type the code the browser shows");
                    }
                },
            }
        }
    }
}

/// Presents a confirmation code: the token if it was right; `None` if it was wrong and
/// another may be tried; an error if the login failed. Answers the browser it came from.
async fn confirm(
    api: &ApiClient,
    attempt: &str,
    code: &str,
    browser: Option<TcpStream>,
) -> Result<Option<LoginResponse>> {
    let answer: Result<OidcAttempt, _> = api
        .post(
            &["v1", "auth", "oidc", "attempts", attempt],
            &OidcConfirmRequest {
                code: code.to_owned(),
            },
        )
        .await;
    match answer {
        Ok(OidcAttempt::Done(resp)) => {
            let text = format!(
                "You are logged in as {}. You can close this tab and return to the terminal.",
                resp.user
            );
            answer_browser(browser, "200 OK", "Logged in to Postern", &text).await;
            Ok(Some(resp))
        }
        Ok(OidcAttempt::Failed { message }) => {
            answer_browser(browser, "400 Bad Request", "Postern login failed", &message).await;
            bail!("login failed: {message}")
        }
        Ok(OidcAttempt::Pending { .. } | OidcAttempt::Confirm { .. }) => {
            let text = "the login is not finished at the identity provider yet";
            retry(browser, "Postern login not finished", text).await;
            Ok(None)
        }
        Err(e) => {
            retry(browser, "Postern login failed", &e.to_string()).await;
            Ok(None)
        }
    }
}

/// Says why a code did not log in, to the browser it came from, or on the terminal with the
/// prompt for the next one.
async fn retry(browser: Option<TcpStream>, title: &str, text: &str) {
    if browser.is_some() {
        answer_browser(browser, "400 Bad Request", title, text).await;
        crate::errln!("\n{text}");
    } else {
        crate::errout!("{text}\n{CODE_PROMPT}");
        let _ = std::io::stderr().flush();
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
