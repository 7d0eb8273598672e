//! Issue 6: the audit log. A controller killed with SIGKILL while a worker produces events
//! loses none and stores none twice; filters return exactly what matches; `postern audit
//! export` writes JSON lines; `postern audit verify` passes on an untouched log and names
//! a tampered event; users without `audit:read` read nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_cli::session::{new_client_key, open_session};
use postern_controller::api::types::{
    AuditEvent, AuditVerification, Authorization, AuthorizeRequest, CreatedWorker,
};
use postern_worker::WorkerConfig;

use crate::dev_cli::postern_bin;
use crate::harness::{echo_server, free_addrs, Api, Cluster, TempDir};

/// `postern-controller` as a real process, killed on drop.
struct ControllerProcess(Child);

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `postern-controller --config` and returns it with the bootstrap password, if it
/// printed one.
fn spawn_controller(config: &std::path::Path) -> (ControllerProcess, Option<String>) {
    let bin = postern_bin().with_file_name("postern-controller");
    let mut child = Command::new(&bin)
        .args(["--config"])
        .arg(config)
        .env("POSTERN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn postern-controller");
    let stdout = child.stdout.take();
    let process = ControllerProcess(child);
    let mut password = None;
    let mut lines = BufReader::new(stdout.expect("stdout")).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("Bootstrap admin created: admin / ") {
            password = Some(rest.trim().to_owned());
        }
        if line.starts_with("postern-controller listening") {
            // Keep draining stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
            return (process, password);
        }
    }
    panic!("postern-controller did not start");
}

async fn wait_api(base: &str) {
    // reqwest is built without a crypto provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    for _ in 0..100 {
        if reqwest::get(format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("controller API did not come up at {base}");
}

/// One short connection through the session: write, read the echo, close.
async fn one_connection(local: SocketAddr, n: usize) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(local).await else {
        return false;
    };
    let msg = format!("hello {n}");
    let mut back = vec![0u8; msg.len()];
    s.write_all(msg.as_bytes()).await.is_ok()
        && s.read_exact(&mut back).await.is_ok()
        && back == msg.as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_controller_loses_no_event_and_stores_none_twice() {
    let dir = TempDir::new("postern-audit-kill");
    let (api_addr, cluster_addr) = free_addrs();
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{db}\"\napi_listen = \"{api_addr}\"\ncluster_listen = \"{cluster_addr}\"\n\
             kek_file = \"{kek}\"\nbootstrap_admin = true\ninsecure_http = true\n",
            db = dir.path().join("postern.db").display(),
            kek = dir.path().join("kek").display(),
        ),
    )
    .expect("config");
    let base = format!("http://{api_addr}");
    let (controller, password) = spawn_controller(&config);
    wait_api(&base).await;
    let admin = Api::new(&base)
        .login("admin", &password.expect("bootstrap password printed"))
        .await
        .expect("login");

    let created: CreatedWorker = admin
        .ok(Method::POST, "/v1/workers", Some(&json!({"name": "w1"})))
        .await;
    let worker = postern_worker::start(WorkerConfig {
        controller_url: base.clone(),
        activation_token: Some(created.activation_token),
        data_dir: dir.path().join("worker"),
        session_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        public_addr: None,
        session_lanes: 1,
        mode: Default::default(),
        grace_period: Duration::from_secs(30),
        postgres: Default::default(),
        controller_ca_file: None,
        controller_ca_fingerprint: None,
        metrics_listen: None,
    })
    .await
    .expect("worker");
    let echo = echo_server().await;
    let _: serde_json::Value = admin
        .ok(
            Method::POST,
            "/v1/targets",
            Some(&json!({"name": "echo", "type": "tcp", "address": echo.to_string()})),
        )
        .await;
    for _ in 0..100 {
        let w: Vec<postern_controller::api::types::Worker> =
            admin.ok(Method::GET, "/v1/workers", None::<&()>).await;
        if w.iter().any(|w| w.connected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = new_client_key().expect("key");
    let auth: Authorization = admin
        .ok(
            Method::POST,
            "/v1/targets/echo/authorize",
            Some(&AuthorizeRequest {
                client_spki: key.spki_b64().into(),
                duration_secs: None,
                login: None,
                target_type: None,
            }),
        )
        .await;
    let session = open_session(&auth, &key).await.expect("session");
    let (local, _) = session.listen(0).await.expect("listen");

    // Load: 300 short connections, 10 at a time; the controller dies with SIGKILL a third
    // of the way through and comes back a moment later.
    const TOTAL: usize = 300;
    let mut controller = Some(controller);
    let mut done = 0;
    for batch in 0..(TOTAL / 10) {
        if batch == 10 {
            drop(controller.take()); // SIGKILL: `Child::kill` sends it
        }
        if batch == 15 {
            controller = Some(spawn_controller(&config).0);
        }
        let tasks: Vec<_> = (0..10)
            .map(|i| tokio::spawn(one_connection(local, batch * 10 + i)))
            .collect();
        for t in tasks {
            assert!(
                t.await.expect("task"),
                "a connection failed while the controller was away"
            );
            done += 1;
        }
    }
    assert_eq!(done, TOTAL);
    wait_api(&base).await;

    // Every connection's close event arrives, exactly once.
    let mut closes = Vec::new();
    for _ in 0..200 {
        closes = admin
            .ok::<Vec<AuditEvent>, ()>(
                Method::GET,
                &format!(
                    "/v1/audit?session={}&action=connection.close&limit=10000",
                    auth.session_id
                ),
                None,
            )
            .await;
        if closes.len() >= TOTAL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closes.len(), TOTAL, "connection.close events stored");
    let mut per_bytes: HashMap<i64, usize> = HashMap::new();
    for e in &closes {
        *per_bytes
            .entry(e.details["bytes_up"].as_i64().unwrap_or(-1))
            .or_default() += 1;
    }
    assert!(
        per_bytes.keys().all(|b| *b > 0),
        "every event counts its bytes: {per_bytes:?}"
    );
    let v: AuditVerification = admin.ok(Method::GET, "/v1/audit/verify", None::<&()>).await;
    assert!(v.ok, "{v:?}");
    session.close().await;
    worker.shutdown().await;
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_export_verify_and_permissions() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    c.create_target("other", &echo.to_string(), &[]).await;
    let bob = c.user("bob").await;
    // bob: a denial on `other`; admin: a session on `echo` with two connections.
    let key = new_client_key().expect("key");
    let body = AuthorizeRequest {
        client_spki: key.spki_b64().into(),
        duration_secs: None,
        login: None,
        target_type: None,
    };
    assert!(bob
        .call::<Authorization, _>(Method::POST, "/v1/targets/other/authorize", Some(&body))
        .await
        .is_err());
    let auth: Authorization = c
        .admin
        .ok(Method::POST, "/v1/targets/echo/authorize", Some(&body))
        .await;
    let session = open_session(&auth, &key).await.expect("session");
    let (local, _) = session.listen(0).await.expect("listen");
    assert!(one_connection(local, 1).await && one_connection(local, 2).await);
    session.close().await;

    let all: Vec<AuditEvent> = c
        .admin
        .ok(Method::GET, "/v1/audit?limit=10000", None::<&()>)
        .await;
    let check = |query: &str, pred: &dyn Fn(&AuditEvent) -> bool| {
        let expected: Vec<i64> = all.iter().filter(|e| pred(e)).map(|e| e.seq).collect();
        (format!("/v1/audit?limit=10000&{query}"), expected)
    };
    let session_id = auth.session_id.clone();
    let cases = [
        check("actor=bob", &|e| e.actor == "bob"),
        check("action=session.", &|e| e.action.starts_with("session.")),
        check(&format!("session={session_id}"), &|e| {
            e.session_id.as_deref() == Some(session_id.as_str())
        }),
        check("target=other", &|e| e.resource == "target:other"),
    ];
    for (path, expected) in cases {
        assert!(
            !expected.is_empty(),
            "{path}: the scenario made no such event"
        );
        // Events keep arriving (connection closes); compare on the ones known above.
        let got: Vec<AuditEvent> = c.admin.ok(Method::GET, &path, None::<&()>).await;
        let got: Vec<i64> = got
            .iter()
            .map(|e| e.seq)
            .filter(|s| *s <= all.last().map(|e| e.seq).unwrap_or(0))
            .collect();
        assert_eq!(got, expected, "{path}");
    }
    // A limit outside 1..=100000 is refused, not quietly changed.
    for bad in ["0", "-5", "100001"] {
        let err = c
            .admin
            .call::<Vec<AuditEvent>, ()>(Method::GET, &format!("/v1/audit?limit={bad}"), None)
            .await
            .expect_err("refused");
        assert_eq!(err.status, 400, "limit={bad}: {}", err.message);
        assert!(
            err.message.contains("expected 1 to 100000"),
            "{}",
            err.message
        );
    }
    // The target filter also finds the events inside the target's sessions.
    let echo_events: Vec<AuditEvent> = c
        .admin
        .ok(
            Method::GET,
            "/v1/audit?target=echo&limit=10000",
            None::<&()>,
        )
        .await;
    assert!(
        echo_events.iter().any(|e| e.action == "session.activate"),
        "target filter misses session events"
    );

    // Export through the real CLI: valid JSON lines, the same events.
    let out = Command::new(postern_bin())
        .args(["audit", "export", "--format", "jsonl", "--user", "bob"])
        .env("POSTERN_ADDR", &c.admin.base)
        .env(
            "POSTERN_TOKEN",
            c.admin.token.as_deref().unwrap_or_default(),
        )
        .env("POSTERN_CONFIG_DIR", c.dir.path().join("cli"))
        .output()
        .expect("postern audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l["actor"] == "bob"), "export filter");

    // `postern audit verify` through the real CLI: it prints the head to keep as an anchor,
    // which a later verify checks.
    let cli = |args: &[&str], token: &str| {
        let out = Command::new(postern_bin())
            .args(args)
            .env("POSTERN_ADDR", &c.admin.base)
            .env("POSTERN_TOKEN", token)
            .env("POSTERN_CONFIG_DIR", c.dir.path().join("cli"))
            .output()
            .expect("run postern");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let token = c.admin.token.clone().unwrap_or_default();
    let (code, stdout, _) = cli(&["audit", "verify"], &token);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("verifies"), "{stdout}");
    let head = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Head: "))
        .unwrap_or_else(|| panic!("no head printed: {stdout}"))
        .to_owned();
    let (code, stdout, _) = cli(&["audit", "verify", "--anchor", &head], &token);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("still has the anchored hash"), "{stdout}");
    let (seq, _) = head.split_once(':').expect("SEQ:HASH");
    let forged = format!("{seq}:{}", "ab".repeat(32));
    let (code, stdout, _) = cli(&["audit", "verify", "--anchor", &forged], &token);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("BROKEN: event #{seq} ")),
        "{stdout}"
    );
    let (code, _, stderr) = cli(&["audit", "verify", "--anchor", "12"], &token);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("expected SEQ:HASH"), "{stderr}");

    // `export --limit N` writes the newest N; a file is replaced only by a complete export.
    let file = c.dir.path().join("export.jsonl");
    let path = file.to_str().expect("utf-8 path");
    let (code, _, stderr) = cli(&["audit", "export", "--limit", "2", "-o", path], &token);
    assert_eq!(code, Some(0), "{stderr}");
    let kept = std::fs::read_to_string(&file).expect("export file");
    assert_eq!(kept.lines().count(), 2, "{kept}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "export readable by others: {mode:o}");
    }
    let (code, _, stderr) = cli(&["audit", "export", "-o", path], "pt_not_a_token");
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("export file"),
        kept,
        "a refused export changed the file"
    );
    let (code, _, stderr) = cli(&["audit", "list", "--since", "1m", "--until", "1h"], &token);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("later than --until"), "{stderr}");

    // No audit:read, no audit.
    let err = bob
        .call::<Vec<AuditEvent>, ()>(Method::GET, "/v1/audit", None)
        .await
        .expect_err("bob may not read");
    assert_eq!(err.status, 403);
    assert!(err.message.contains("audit:read"), "{}", err.message);
    c.stop().await;
}
