//! No secret ever appears in a log line: a full run of the real binaries — a TLS controller,
//! a worker registered with an activation token, the CLI — with `POSTERN_LOG=debug` (and
//! `-vv` for the CLI), then every line they wrote is searched for the secrets the run used:
//! passwords, the activation token, a brokered database password, API tokens, a session
//! token, the KEK, and any private key.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;

use postern_cli::session::{new_client_key, open_session};
use postern_controller::api::types::{Authorization, AuthorizeRequest};

use super::{api_trusting, cluster_ca, postern, sibling_bin};
use crate::harness::{free_addrs, TempDir};

/// A server binary whose stdout and stderr go to files; SIGTERM'd (then killed) on drop.
struct Server {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    fn spawn(bin: &str, args: &[&str], env: &[(&str, String)], dir: &Path, name: &str) -> Server {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut cmd = Command::new(sibling_bin(bin));
        cmd.args(args)
            .env("POSTERN_LOG", "debug")
            .env_remove("RUST_LOG")
            .env_remove("POSTERN_KEK")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn server");
        Server {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits (≤ 30 s) for a stdout line starting with `prefix` and returns stdout so far.
    fn wait_stdout(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if text.lines().any(|l| l.starts_with(prefix)) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "exited with {status} before printing {prefix:?}:\n{text}\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {prefix:?} within 30 s");
    }

    /// SIGTERM, as a service manager sends, and wait (≤ 10 s) so that logs are complete.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).expect("random");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_secret() {
    let dir = TempDir::new("postern-secrets");
    let d = dir.path();
    let kek = {
        use base64::Engine as _;
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("random");
        base64::engine::general_purpose::STANDARD.encode(k)
    };
    std::fs::write(d.join("kek"), &kek).expect("kek");
    let (api, cluster) = free_addrs();
    std::fs::write(
        d.join("controller.toml"),
        format!(
            "database_url = \"sqlite://{db}\"\napi_listen = \"{api}\"\ncluster_listen = \"{cluster}\"\n\
             kek_file = \"{kek}\"\nbootstrap_admin = true\n",
            db = d.join("postern.db").display(),
            kek = d.join("kek").display(),
        ),
    )
    .expect("config");
    let config_arg = d.join("controller.toml").to_string_lossy().into_owned();
    let mut controller = Server::spawn(
        "postern-controller",
        &["--config", &config_arg],
        &[],
        d,
        "controller",
    );
    let banner = controller.wait_stdout("postern-controller listening");
    let admin_password = banner
        .lines()
        .find_map(|l| l.strip_prefix("Bootstrap admin created: admin / "))
        .expect("bootstrap password printed")
        .trim()
        .to_owned();
    let fingerprint = banner
        .lines()
        .find_map(|l| l.split("cluster CA SHA-256 ").nth(1))
        .expect("fingerprint printed")
        .trim()
        .to_owned();
    let url = format!("https://{api}");
    let ca = cluster_ca(&url, &fingerprint).await;

    let mut cli_logs = String::new();
    let admin_cfg = d.join("cli-admin");
    let cli = |cfg: PathBuf, args: Vec<String>, stdin: String| {
        let cfg = cfg.clone();
        async move {
            let mut all = vec!["-vv".to_owned()];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let r = postern(&cfg, &refs, &stdin).await;
            assert!(r.ok, "postern {all:?}: {}{}", r.stdout, r.stderr);
            r
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let r = cli(
        admin_cfg.clone(),
        s(&[
            "login",
            "--addr",
            &url,
            "--user",
            "admin",
            "--password-stdin",
            "--ca-fingerprint",
            &fingerprint,
        ]),
        format!("{admin_password}\n"),
    )
    .await;
    cli_logs.push_str(&r.stderr);
    let alice_password = random_secret("alice-pw-");
    for (args, stdin) in [
        (
            s(&["users", "create", "alice", "--password-stdin"]),
            format!("{alice_password}\n"),
        ),
        (s(&["roles", "create", "dev"]), String::new()),
        (s(&["roles", "allow", "dev", "connect"]), String::new()),
        (
            s(&["roles", "bind", "dev", "--user", "alice"]),
            String::new(),
        ),
        (
            s(&[
                "targets",
                "create",
                "pg",
                "--type",
                "postgres",
                "--address",
                "127.0.0.1:5432",
            ]),
            String::new(),
        ),
    ] {
        let r = cli(admin_cfg.clone(), args, stdin).await;
        cli_logs.push_str(&r.stderr);
    }
    let brokered = random_secret("brokered-db-pw-");
    let r = cli(
        admin_cfg.clone(),
        s(&[
            "credentials",
            "set",
            "pg",
            "--username",
            "postgres",
            "--password-stdin",
        ]),
        format!("{brokered}\n"),
    )
    .await;
    cli_logs.push_str(&r.stderr);
    let r = cli(
        admin_cfg.clone(),
        s(&["--json", "workers", "create", "w1"]),
        String::new(),
    )
    .await;
    cli_logs.push_str(&r.stderr);
    let created: serde_json::Value = serde_json::from_str(&r.stdout).expect("worker JSON");
    let activation = created["activation_token"]
        .as_str()
        .expect("activation token")
        .to_owned();

    let mut worker = Server::spawn(
        "postern-worker",
        &[],
        &[
            ("POSTERN_CONTROLLER_URL", url.clone()),
            ("POSTERN_ACTIVATION_TOKEN", activation.clone()),
            (
                "POSTERN_DATA_DIR",
                d.join("worker").to_string_lossy().into_owned(),
            ),
            ("POSTERN_SESSION_LISTEN", "127.0.0.1:0".into()),
            ("POSTERN_CONTROLLER_CA_FINGERPRINT", fingerprint.clone()),
        ],
        d,
        "worker",
    );
    let admin_token = profile_token(&admin_cfg);
    let mut admin = api_trusting(&url, &ca);
    admin.token = Some(admin_token.clone());
    super::wait_worker(&admin).await;

    // Alice logs in with the CLI and runs psql through a session (the brokered password
    // travels to the worker at activation).
    let alice_cfg = d.join("cli-alice");
    let r = cli(
        alice_cfg.clone(),
        s(&[
            "login",
            "--addr",
            &url,
            "--user",
            "alice",
            "--password-stdin",
            "--ca-fingerprint",
            &fingerprint,
        ]),
        format!("{alice_password}\n"),
    )
    .await;
    cli_logs.push_str(&r.stderr);
    let r = cli(
        alice_cfg.clone(),
        s(&crate::dev_cli::connect_psql("pg", "select 1")),
        String::new(),
    )
    .await;
    assert_eq!(r.stdout.trim(), "1", "{}", r.stderr);
    cli_logs.push_str(&r.stderr);

    // A session whose token this test knows, carried by the worker.
    let alice_token = profile_token(&alice_cfg);
    let mut alice = api_trusting(&url, &ca);
    alice.token = Some(alice_token.clone());
    let key = new_client_key().expect("key");
    let auth: Authorization = alice
        .ok(
            Method::POST,
            "/v1/targets/pg/authorize",
            Some(&AuthorizeRequest {
                client_spki: key.spki_b64().into(),
                duration_secs: None,
                login: None,
                target_type: None,
            }),
        )
        .await;
    let session = open_session(&auth, &key).await.expect("session");
    let (local, _serve) = session.listen(0).await.expect("listen");
    let out = tokio::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &local.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-Atc", "select 2"])
        .output()
        .await
        .expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    session.close().await;
    let r = cli(alice_cfg.clone(), s(&["logout"]), String::new()).await;
    cli_logs.push_str(&r.stderr);
    // Give the worker's reports a moment, then stop both as a service manager would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop();
    controller.stop();

    let secrets: Vec<(&str, String)> = vec![
        ("admin password", admin_password.clone()),
        ("alice's password", alice_password),
        ("activation token", activation),
        ("brokered database password", brokered),
        ("admin API token", admin_token),
        ("alice's API token", alice_token),
        ("session token", auth.token.clone()),
        (
            "session token signature",
            auth.token.rsplit('.').next().unwrap_or_default().to_owned(),
        ),
        ("KEK", kek),
        ("a private key", "PRIVATE KEY".into()),
    ];
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let controller_stdout: String = read(&controller.stdout)
        .lines()
        // The one line meant to show a secret: the bootstrap password, once, on stdout.
        .filter(|l| !l.starts_with("Bootstrap admin created: admin / "))
        .map(|l| format!("{l}\n"))
        .collect();
    let logs = [
        ("controller stderr", read(&controller.stderr)),
        ("controller stdout", controller_stdout),
        ("worker stderr", read(&worker.stderr)),
        ("worker stdout", read(&worker.stdout)),
        ("CLI stderr", cli_logs),
    ];
    // The run was logged, at debug level, as JSON lines (stderr is not a terminal).
    for (name, text) in &logs[..3] {
        if name.ends_with("stdout") {
            continue;
        }
        assert!(text.lines().count() > 20, "{name} is nearly empty:\n{text}");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
        }
        assert!(
            text.contains("\"level\":\"DEBUG\""),
            "{name}: no debug line"
        );
    }
    assert!(
        logs[0].1.contains("session.activate"),
        "audit events logged"
    );
    for (name, text) in &logs {
        for (what, secret) in &secrets {
            assert!(!secret.is_empty());
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                panic!("{what} appears in the {name}: {line}");
            }
        }
    }
}

fn profile_token(cfg: &Path) -> String {
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.join("profile.json")).expect("profile"))
            .expect("JSON");
    profile["token"].as_str().expect("token").to_owned()
}
