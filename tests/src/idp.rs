//! A real OpenID provider for the tests (`tests/idp/provider.js`: panva's `oidc-provider`,
//! installed by `npm ci --prefix tests/idp`), and a headless browser that logs in at it:
//! redirects followed by hand, cookies kept by hand (path-scoped), forms parsed and posted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, Url};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::TempDir;

/// The client secret the tests register at the provider.
pub const CLIENT_SECRET: &str = "postern-test-client-secret-0123456789";
/// The client id.
pub const CLIENT_ID: &str = "postern";

/// One account at the provider.
#[derive(Debug, Clone)]
pub struct Account {
    /// Account id (the `sub`) and login name.
    pub id: &'static str,
    /// Password.
    pub password: &'static str,
    /// `email`.
    pub email: &'static str,
    /// `email_verified`.
    pub verified: bool,
    /// `groups`.
    pub groups: &'static [&'static str],
}

/// The accounts every test provider has.
pub fn accounts() -> Vec<Account> {
    vec![
        Account {
            id: "alice",
            password: "alice-password",
            email: "alice@example.com",
            verified: true,
            groups: &["engineering"],
        },
        Account {
            id: "bob",
            password: "bob-password",
            email: "bob@example.com",
            verified: true,
            groups: &["sales"],
        },
        Account {
            id: "carol",
            password: "carol-password",
            email: "carol@example.com",
            verified: false,
            groups: &["engineering"],
        },
        Account {
            id: "mallory",
            password: "mallory-password",
            email: "mallory@evil.test",
            verified: true,
            groups: &["engineering"],
        },
    ]
}

/// A running `provider.js`; killed on drop.
pub struct Idp {
    /// Its issuer URL (`http://127.0.0.1:PORT`).
    pub issuer: String,
    /// Its port.
    pub port: u16,
    redirect: String,
    child: Option<tokio::process::Child>,
    dir: TempDir,
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

fn idp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("idp")
}

impl Idp {
    /// Starts a provider on a free port whose client `postern` redirects to `redirect`.
    pub async fn start(redirect: &str) -> anyhow::Result<Idp> {
        let mut idp = Idp {
            issuer: String::new(),
            port: 0,
            redirect: redirect.to_owned(),
            child: None,
            dir: TempDir::new("postern-idp"),
        };
        idp.spawn().await?;
        Ok(idp)
    }

    /// Stops the provider and starts a new one on the same port: same issuer and accounts as
    /// configured at start, a new signing key.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await.context("kill the provider")?;
        }
        self.spawn().await
    }

    /// Starts the provider process; a start that does not report ready in time (seen once
    /// on a loaded 2-core machine, the process alive but silent for 30 s) is retried once.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        match self.spawn_once().await {
            Ok(()) => Ok(()),
            Err(first) => {
                eprintln!("the OpenID provider did not start, trying once more: {first:#}");
                self.spawn_once()
                    .await
                    .with_context(|| format!("after a first failed start: {first:#}"))
            }
        }
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let dir = idp_dir();
        if !dir.join("node_modules/oidc-provider").is_dir() {
            bail!("oidc-provider is not installed: run `npm ci --prefix tests/idp`");
        }
        let accounts: serde_json::Map<String, Value> = accounts()
            .into_iter()
            .map(|a| {
                (
                    a.id.to_owned(),
                    json!({"password": a.password, "email": a.email,
                           "email_verified": a.verified, "groups": a.groups}),
                )
            })
            .collect();
        let config = json!({
            "port": self.port,
            "clients": [{
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [self.redirect],
                "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
                "response_types": ["code"],
            }],
            "accounts": accounts,
        });
        let config_path = self.dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string())?;
        let log = std::fs::File::create(self.dir.path().join("stderr.log"))?;
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("provider.js"))
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start node (is Node.js installed?)")?;
        let stdout = child.stdout.take().context("provider stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            // The port of a restarted provider may still be held for a moment.
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("ready ") {
                    return Some(url.to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(issuer) = ready else {
            let err =
                std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
            let _ = child.kill().await;
            bail!("the OpenID provider did not start within 30 s: {err}");
        };
        // Keep draining stdout so the provider never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.port = Url::parse(&issuer)?.port().context("issuer port")?;
        self.issuer = issuer;
        self.child = Some(child);
        Ok(())
    }

    /// Changes an account (e.g. `{"groups": []}`) through the provider's admin endpoint.
    pub async fn update_account(&self, id: &str, changes: Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/accounts/{id}", self.issuer))
            .json(&changes)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "admin update failed: {}",
            r.status()
        );
        Ok(())
    }

    /// Makes the next token answer carry a doctored ID token: `issuer` (re-signed with a
    /// foreign `iss`) or `signature` (signed by an unpublished key).
    pub async fn tamper_next_id_token(&self, mode: &str) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/admin/tamper", self.issuer))
            .json(&json!({ "mode": mode }))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "admin tamper failed: {}",
            r.status()
        );
        Ok(())
    }

    /// The key ids the provider publishes now.
    pub async fn key_ids(&self) -> anyhow::Result<Vec<String>> {
        let jwks: Value = reqwest::get(format!("{}/jwks", self.issuer))
            .await?
            .json()
            .await?;
        Ok(jwks["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A page the headless browser ended on.
#[derive(Debug, Clone)]
pub struct Page {
    /// Its URL.
    pub url: Url,
    /// HTTP status.
    pub status: u16,
    /// Its body.
    pub body: String,
    /// Every URL requested on the way, in order (redirects included).
    pub visited: Vec<Url>,
}

/// A headless browser: one cookie jar, redirects followed by hand.
pub struct Browser {
    http: reqwest::Client,
    /// (name, path) → value.
    cookies: BTreeMap<(String, String), String>,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

impl Browser {
    /// A browser with no cookies.
    pub fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
            cookies: BTreeMap::new(),
        }
    }

    /// GETs `url` and follows redirects.
    pub async fn open(&mut self, url: &str) -> anyhow::Result<Page> {
        let url = Url::parse(url)?;
        self.go(Method::GET, url, None, Vec::new()).await
    }

    /// Follows redirects from `url` but stops before requesting a URL for which `stop`
    /// is true, returning that URL unvisited.
    pub async fn open_until(
        &mut self,
        url: &str,
        stop: impl Fn(&Url) -> bool,
    ) -> anyhow::Result<Url> {
        let mut url = Url::parse(url)?;
        for _ in 0..20 {
            if stop(&url) {
                return Ok(url);
            }
            let resp = self.send(Method::GET, &url, None).await?;
            match resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                Some(l) if resp.status().is_redirection() => url = url.join(l)?,
                _ => bail!("{url} answered {} without reaching the stop", resp.status()),
            }
        }
        bail!("too many redirects")
    }

    /// Fills the first form of `page` with `fields` (over its hidden inputs), submits it and
    /// follows redirects.
    pub async fn submit(&mut self, page: &Page, fields: &[(&str, &str)]) -> anyhow::Result<Page> {
        let (method, action, body) = fill(page, fields)?;
        self.go(method, action, Some(body), page.visited.clone())
            .await
    }

    /// Like [`Browser::submit`], but stops before requesting a URL for which `stop` is
    /// true, and returns that URL unvisited.
    pub async fn submit_until(
        &mut self,
        page: &Page,
        fields: &[(&str, &str)],
        stop: impl Fn(&Url) -> bool,
    ) -> anyhow::Result<Url> {
        let (method, action, body) = fill(page, fields)?;
        let resp = self.send(method, &action, Some(body)).await?;
        match resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
            Some(l) if resp.status().is_redirection() => {
                let next = action.join(l)?;
                self.open_until(next.as_str(), stop).await
            }
            _ => bail!("{action} answered {} without a redirect", resp.status()),
        }
    }

    async fn go(
        &mut self,
        mut method: Method,
        mut url: Url,
        mut body: Option<String>,
        mut visited: Vec<Url>,
    ) -> anyhow::Result<Page> {
        for _ in 0..20 {
            visited.push(url.clone());
            let resp = self.send(method.clone(), &url, body.take()).await?;
            let status = resp.status();
            if status.is_redirection() {
                if let Some(l) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                    url = url.join(l)?;
                    method = Method::GET;
                    continue;
                }
            }
            let body = resp.text().await?;
            return Ok(Page {
                url,
                status: status.as_u16(),
                body,
                visited,
            });
        }
        bail!("too many redirects")
    }

    async fn send(
        &mut self,
        method: Method,
        url: &Url,
        body: Option<String>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self.http.request(method, url.clone());
        let cookie = self.cookie_header(url.path());
        if !cookie.is_empty() {
            req = req.header(COOKIE, cookie);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(b);
        }
        let resp = req.send().await.with_context(|| format!("request {url}"))?;
        for h in resp.headers().get_all(SET_COOKIE) {
            if let Ok(text) = h.to_str() {
                self.store_cookie(text);
            }
        }
        Ok(resp)
    }

    fn cookie_header(&self, path: &str) -> String {
        self.cookies
            .iter()
            .filter(|((_, p), _)| {
                path == p
                    || (path.starts_with(p.as_str())
                        && (p.ends_with('/') || path[p.len()..].starts_with('/')))
            })
            .map(|((n, _), v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn store_cookie(&mut self, header: &str) {
        let mut parts = header.split(';');
        let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
            return;
        };
        let mut path = "/".to_owned();
        let mut expired = value.is_empty();
        for attr in parts {
            let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "path" => path = v.trim().to_owned(),
                "expires" if v.contains("1970") => expired = true,
                "max-age" if v.trim().starts_with('0') || v.trim().starts_with('-') => {
                    expired = true
                }
                _ => {}
            }
        }
        let key = (name.trim().to_owned(), path);
        if expired {
            self.cookies.remove(&key);
        } else {
            self.cookies.insert(key, value.trim().to_owned());
        }
    }
}

/// The request that submitting the first form of `page` with `fields` makes.
fn fill(page: &Page, fields: &[(&str, &str)]) -> anyhow::Result<(Method, Url, String)> {
    let form = Form::parse(&page.body)
        .with_context(|| format!("no form on {} ({}): {}", page.url, page.status, page.body))?;
    let mut values = form.inputs;
    for (k, v) in fields {
        values.retain(|(name, _)| name != k);
        values.push(((*k).to_owned(), (*v).to_owned()));
    }
    let method = if form.method.eq_ignore_ascii_case("get") {
        Method::GET
    } else {
        Method::POST
    };
    Ok((
        method,
        page.url.join(&form.action)?,
        form_urlencode(&values),
    ))
}

/// The first `<form>` of a page: its action, method and named inputs.
struct Form {
    action: String,
    method: String,
    inputs: Vec<(String, String)>,
}

impl Form {
    fn parse(html: &str) -> Option<Form> {
        let start = html.find("<form")?;
        let end = html[start..]
            .find("</form>")
            .map_or(html.len(), |e| start + e);
        let form = &html[start..end];
        let tag_end = form.find('>')?;
        let tag = &form[..tag_end];
        let mut inputs = Vec::new();
        let mut rest = &form[tag_end..];
        while let Some(i) = rest.find("<input") {
            let input = &rest[i..];
            let close = input.find('>').unwrap_or(input.len());
            let t = &input[..close];
            if let Some(name) = attr(t, "name") {
                inputs.push((name, attr(t, "value").unwrap_or_default()));
            }
            rest = &input[close..];
        }
        Some(Form {
            action: attr(tag, "action").unwrap_or_default(),
            method: attr(tag, "method").unwrap_or_else(|| "get".into()),
            inputs,
        })
    }
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let i = tag.find(&needle)? + needle.len();
    let len = tag[i..].find('"')?;
    Some(
        tag[i..i + len]
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

fn form_urlencode(values: &[(String, String)]) -> String {
    let mut s = reqwest::Url::parse("http://x/").expect("static URL");
    s.query_pairs_mut().extend_pairs(values);
    s.query().unwrap_or_default().to_owned()
}

/// Logs `account` in at the IdP from `auth_url`: the login form, then the consent form.
/// Returns the page the browser ends on (the controller's callback page, when all went well).
pub async fn idp_login(auth_url: &str, login: &str, password: &str) -> anyhow::Result<Page> {
    let mut b = Browser::new();
    let page = b.open(auth_url).await?;
    login_and_consent(&mut b, page, login, password).await
}

/// From the IdP's login page on: submits the login form, and the consent form if one comes.
pub async fn login_and_consent(
    b: &mut Browser,
    page: Page,
    login: &str,
    password: &str,
) -> anyhow::Result<Page> {
    anyhow::ensure!(
        page.body.contains("name=\"password\""),
        "not a login page: {}",
        page.body
    );
    let mut page = b
        .submit(&page, &[("login", login), ("password", password)])
        .await?;
    if page.body.contains("<h1>Authorize</h1>") {
        page = b.submit(&page, &[]).await?;
    }
    Ok(page)
}
