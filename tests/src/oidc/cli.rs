//! `postern login --oidc` (the browser opened through `$BROWSER`) and `postern login
//! --device`, as the real binary runs them.

use std::time::Duration;

use postern_controller::api::types::WhoAmI;

use super::{sso, Sso};
use crate::idp::{login_and_consent, Browser};

/// Runs `postern login ARGS` against the cluster with its own profile directory; hands each
/// stderr line to `on_line` until it returns a URL to log in at, then logs alice in there and
/// waits for the command. Returns its stdout.
async fn cli_login(
    s: &Sso,
    dir: &crate::harness::TempDir,
    args: &[&str],
    browser: Option<&std::path::Path>,
    on_line: impl Fn(&str) -> Option<String>,
) -> String {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cmd = tokio::process::Command::new(crate::dev_cli::postern_bin());
    cmd.args(["--addr", &s.anon.base, "login"])
        .args(args)
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .env_remove("BROWSER")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(b) = browser {
        cmd.env("BROWSER", b);
    }
    let mut child = cmd.spawn().expect("spawn postern login");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        let mut seen = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = on_line(&line) {
                return url;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        panic!("postern login printed no URL:\n{seen}");
    })
    .await
    .expect("postern login prints a URL");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut b = Browser::new();
    let mut page = b.open(&url).await.expect("IdP page");
    if page.body.contains("user_code") {
        // Device flow: the code form (filled in), then the confirmation.
        page = b.submit(&page, &[]).await.expect("code");
        page = b.submit(&page, &[]).await.expect("confirm");
        login_and_consent(&mut b, page, "alice", "alice-password")
            .await
            .expect("login at the IdP");
    } else {
        // Code flow: the browser is sent back to the CLI's port on 127.0.0.1. Another
        // program there, which cannot know the attempt's state, gets a 404 and costs the
        // login nothing.
        let consent = b
            .submit(&page, &[("login", "alice"), ("password", "alice-password")])
            .await
            .expect("login at the IdP");
        let back = b
            .submit_until(&consent, &[], |u| u.path() == "/postern-login")
            .await
            .expect("sent back to the CLI");
        assert_eq!(back.host_str(), Some("127.0.0.1"), "{back}");
        let mut forged = back.clone();
        forged.set_query(Some("code=AAAAAAAA&state=forged"));
        let status = reqwest::get(forged.as_str())
            .await
            .expect("forged")
            .status();
        assert_eq!(status, 404);
        let page = b.open(back.as_str()).await.expect("the return");
        assert!(page.body.contains("Logged in to Postern"), "{}", page.body);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("postern login ends")
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "postern login failed: {stdout}");
    stdout
}

#[tokio::test]
async fn oidc_cli_login_opens_the_browser_and_device_login_waits() {
    let s = sso(|_| {}).await;
    let dir = crate::harness::TempDir::new("postern-oidc-cli");

    // --oidc: the CLI opens $BROWSER with the login URL (here a script that records it).
    let seen = dir.path().join("browser-url");
    let browser = dir.path().join("browser.sh");
    std::fs::write(
        &browser,
        format!(
            "#!/bin/sh\necho \"$1\" > {}.tmp && mv {0}.tmp {0}\n",
            seen.display()
        ),
    )
    .expect("browser script");
    std::fs::set_permissions(
        &browser,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let seen_for_lines = seen.clone();
    let out = cli_login(&s, &dir, &["--oidc"], Some(&browser), move |line| {
        if !line.contains("Opened your browser") {
            return None;
        }
        for _ in 0..100 {
            if let Ok(url) = std::fs::read_to_string(&seen_for_lines) {
                return Some(url.trim().to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the browser was not started");
    })
    .await;
    assert!(
        out.contains("Logged in to") && out.contains("alice@example.com"),
        "{out}"
    );
    // Not std's blocking `output()`: the controller runs on this test's runtime.
    let whoami = tokio::process::Command::new(crate::dev_cli::postern_bin())
        .args(["whoami", "--json"])
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .output()
        .await
        .expect("postern whoami");
    let me: WhoAmI = serde_json::from_slice(&whoami.stdout).unwrap_or_else(|e| {
        panic!(
            "postern whoami: {e}: {}",
            String::from_utf8_lossy(&whoami.stderr)
        )
    });
    assert_eq!(me.user, "alice@example.com");
    assert_eq!(me.groups, ["engineering"]);

    // --no-browser: the page shows the confirmation code, typed in at the CLI's prompt.
    no_browser_login(&s, &dir).await;

    // --device: the CLI prints the URL and the code, and waits.
    let out = cli_login(&s, &dir, &["--device", "--method", "corp"], None, |line| {
        line.trim()
            .strip_prefix("(or open ")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    })
    .await;
    assert!(out.contains("alice@example.com"), "{out}");
}

/// `postern login --oidc --no-browser`: the URL printed, opened elsewhere; the code the page
/// shows typed in (a wrong one first: refused, and asked again).
async fn no_browser_login(s: &Sso, dir: &crate::harness::TempDir) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut child = tokio::process::Command::new(crate::dev_cli::postern_bin())
        .args(["--addr", &s.anon.base, "login", "--oidc", "--no-browser"])
        .env("POSTERN_CONFIG_DIR", dir.path().join("config-typed"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn postern login");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.trim().strip_prefix("http") {
                return format!("http{url}");
            }
        }
        panic!("postern login printed no URL");
    })
    .await
    .expect("a URL");
    let (tx, mut rest) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    let mut b = Browser::new();
    let page = b.open(&url).await.expect("IdP page");
    let page = login_and_consent(&mut b, page, "alice", "alice-password")
        .await
        .expect("login at the IdP");
    let code = page
        .body
        .split_once("id=\"confirmation-code\">")
        .and_then(|(_, r)| r.split('<').next())
        .expect("the page shows the code")
        .to_owned();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"WRONG-CODE\n").await.expect("type");
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = rest.recv().await {
            if line.contains("wrong confirmation code") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("the wrong code is refused");
    assert!(refused.contains("2 more tries"), "{refused}");
    stdin
        .write_all(format!("{}\n", code.to_lowercase()).as_bytes())
        .await
        .expect("type");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("postern login ends")
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "postern login failed: {stdout}");
    assert!(stdout.contains("alice@example.com"), "{stdout}");
}
