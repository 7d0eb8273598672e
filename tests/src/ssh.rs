//! SSH targets (issue 5) against a real OpenSSH `sshd`, driven by the real `postern` binary
//! and the system `ssh`, `scp`, `sftp`, `tmux` and `asciinema`:
//! 1. exec in key mode and in certificate mode, nothing left on the engineer's side;
//! 2. an interactive shell through a pty is recorded, the export is valid asciicast v2;
//! 3. scp and sftp copies arrive intact (SHA-256);
//! 4. a login the roles do not permit is refused clearly; forwarding is refused;
//! 5. cancelling the session ends the interactive shell.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};

use postern_controller::api::types::{
    AuditEvent, CreateTarget, Recording, Session, SshCa, TargetType,
};

use crate::dev_cli::postern_bin;
use crate::harness::{Api, Cluster, ClusterOptions, TempDir};
use crate::sshd::{home_of, Sshd, Tmux, LOGIN};

/// A cluster with two SSH targets on one sshd: `demo-ssh` (brokered key) and `demo-ssh-ca`
/// (certificate mode); `alice` may connect to both as `postern-test` (or `nobody`, whom the
/// target does not let in), not as `root`.
struct Setup {
    c: Cluster,
    sshd: Sshd,
    alice: Api,
    /// The engineer's machine: config dir and TMPDIR of every `postern` run.
    home: TempDir,
}

async fn setup() -> Setup {
    setup_with(ClusterOptions::default()).await
}

async fn setup_with(opts: ClusterOptions) -> Setup {
    let c = Cluster::start_with(opts).await.expect("cluster");
    let ca: SshCa = c.admin.ok(Method::GET, "/v1/ssh/ca", None::<&()>).await;
    assert!(
        ca.public_key.starts_with("ssh-ed25519 "),
        "{}",
        ca.public_key
    );
    let sshd = Sshd::start(Some(&ca.public_key));
    for (name, credential) in [
        (
            "demo-ssh",
            json!({"kind": "ssh_key", "username": LOGIN, "secret": sshd.user_key_pem}),
        ),
        (
            "demo-ssh-ca",
            json!({"kind": "ssh_ca", "username": LOGIN, "secret": ""}),
        ),
    ] {
        let _: serde_json::Value = c
            .admin
            .ok(
                Method::POST,
                "/v1/targets",
                Some(&CreateTarget {
                    name: name.into(),
                    kind: TargetType::Ssh,
                    address: sshd.addr.clone(),
                    labels: Default::default(),
                    default_duration_secs: None,
                    max_duration_secs: None,
                    connection_limit: None,
                    worker_filter: Default::default(),
                }),
            )
            .await;
        let _: serde_json::Value = c
            .admin
            .ok(
                Method::PUT,
                &format!("/v1/targets/{name}/credential"),
                Some(&credential),
            )
            .await;
    }
    let alice = c.user("alice").await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles",
            Some(&json!({"name": "ssh-users"})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/ssh-users/rules",
            Some(&json!({"effect": "allow", "actions": ["connect"], "targets": "demo-ssh*", "logins": [LOGIN, "nobody"]})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/ssh-users/bind",
            Some(&json!({"user": "alice"})),
        )
        .await;
    let home = TempDir::new("postern-engineer");
    std::fs::create_dir_all(home.path().join("tmp")).expect("tmp");
    Setup {
        c,
        sshd,
        alice,
        home,
    }
}

impl Setup {
    /// `postern ARGS` as alice (or `as_admin`), on the engineer's machine.
    fn postern(&self, args: &[&str], as_admin: bool) -> tokio::process::Command {
        let api = if as_admin { &self.c.admin } else { &self.alice };
        let mut cmd = tokio::process::Command::new(postern_bin());
        cmd.args(args)
            .env("POSTERN_ADDR", &api.base)
            .env("POSTERN_TOKEN", api.token.as_deref().unwrap_or_default())
            .env("POSTERN_CONFIG_DIR", self.home.path().join("config"))
            .env("TMPDIR", self.home.path().join("tmp"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// `postern recordings list --json` as the admin.
    async fn list_recordings(&self) -> Vec<Recording> {
        let list = self
            .postern(&["recordings", "list", "--json"], true)
            .output()
            .await
            .expect("recordings list");
        serde_json::from_slice(&list.stdout).expect("json list")
    }

    /// The recordings once there is one and all have ended (the end reaches the controller
    /// shortly after the client has left), or as they are after 5 s.
    async fn finished_recordings(&self) -> Vec<Recording> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let recordings = self.list_recordings().await;
            let ended = !recordings.is_empty() && recordings.iter().all(|r| r.ended_at.is_some());
            if ended || Instant::now() > deadline {
                return recordings;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `postern recordings export ID -o FILE` as the admin: the file and its text.
    async fn export_recording(&self, id: &str) -> (std::path::PathBuf, String) {
        let path = self.home.path().join(format!("{id}.cast"));
        let out = self
            .postern(
                &[
                    "recordings",
                    "export",
                    id,
                    "-o",
                    path.to_str().unwrap_or_default(),
                ],
                true,
            )
            .output()
            .await
            .expect("export");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let cast = std::fs::read_to_string(&path).expect("cast file");
        (path, cast)
    }

    async fn run(&self, args: &[&str]) -> Output {
        let out =
            tokio::time::timeout(Duration::from_secs(300), self.postern(args, false).output())
                .await
                .expect("postern finished within 5 min")
                .expect("run postern");
        println!(
            "$ postern {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn audit(&self, action: &str) -> Vec<AuditEvent> {
        self.c
            .admin
            .ok(
                Method::GET,
                &format!("/v1/audit?action={action}"),
                None::<&()>,
            )
            .await
    }

    /// Waits (≤ 5 s) for an `action` event matching `pred`: the worker reports
    /// asynchronously, so the last events may arrive just after the client exits.
    async fn expect_audit(&self, action: &str, pred: impl Fn(&AuditEvent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.audit(action).await;
            if events.iter().any(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no matching {action} event in {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Nothing of the session is left in the engineer's temporary directory.
    fn assert_no_key_left(&self) {
        let left: Vec<_> = std::fs::read_dir(self.home.path().join("tmp"))
            .expect("tmp")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let config = self.home.path().join("config");
        for entry in std::fs::read_dir(&config).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            assert!(
                !text.contains("PRIVATE KEY"),
                "{:?} holds a key",
                entry.path()
            );
        }
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_key_and_certificate_mode() {
    let s = setup().await;
    for target in ["demo-ssh", "demo-ssh-ca"] {
        let out = s.run(&["ssh", target, "--", "echo hello; id -un"]).await;
        assert!(
            out.status.success(),
            "{target}: {}\nsshd: {}",
            text(&out.stderr),
            s.sshd.log()
        );
        assert_eq!(text(&out.stdout), format!("hello\n{LOGIN}\n"), "{target}");
        s.assert_no_key_left();
    }
    // The exit status travels back, and each exec is audited with its command and status.
    let out = s.run(&["ssh", "demo-ssh", "--", "exit 3"]).await;
    assert_eq!(out.status.code(), Some(3));
    s.expect_audit("ssh.exec", |e| {
        e.actor == "alice"
            && e.details["command"] == "echo hello; id -un"
            && e.details["exit_status"] == 0
    })
    .await;
    s.expect_audit("ssh.exec", |e| {
        e.details["command"] == "exit 3" && e.details["exit_status"] == 3
    })
    .await;
    // A command without a terminal is audited, not recorded; one on a terminal (`ssh -tt
    // host bash` is a shell by another name) is recorded like a shell.
    assert_eq!(s.list_recordings().await.len(), 0);
    let out = s
        .run(&[
            "ssh",
            "demo-ssh",
            "--",
            "-tt",
            "echo on-a-terminal-$((6*7))",
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let recordings = s.finished_recordings().await;
    assert_eq!(recordings.len(), 1, "{recordings:?}");
    let (_, cast) = s.export_recording(&recordings[0].id).await;
    assert!(
        cast.contains("on-a-terminal-42"),
        "output not recorded:\n{cast}"
    );
    s.expect_audit("ssh.exec", |e| {
        e.details["command"] == "echo on-a-terminal-$((6*7))" && e.details["exit_status"] == 0
    })
    .await;
    // Certificate mode: a certificate for the session's login, named after the session.
    s.expect_audit("ssh.certificate", |e| {
        e.details["principal"] == LOGIN && e.actor == "alice"
    })
    .await;
    assert!(
        s.sshd.log().contains("postern:s_"),
        "sshd did not log the cert key id"
    );

    // A damaged key (its armour kept, its body cut) is refused when stored, as the worker
    // would read it, and the stored key stays in use.
    let lines: Vec<&str> = s.sshd.user_key_pem.lines().collect();
    let damaged = [lines[0], lines[1], lines[lines.len() - 1]].join("\n");
    let err =
        s.c.admin
            .call::<serde_json::Value, _>(
                Method::PUT,
                "/v1/targets/demo-ssh/credential",
                Some(&json!({"kind": "ssh_key", "username": LOGIN, "secret": damaged})),
            )
            .await
            .expect_err("a damaged key");
    assert_eq!(err.status, 400, "{}", err.message);
    assert!(
        err.message.contains("the SSH key cannot be read"),
        "{}",
        err.message
    );
    let out = s.run(&["ssh", "demo-ssh", "--", "echo still"]).await;
    assert_eq!(text(&out.stdout), "still\n", "{}", text(&out.stderr));
    s.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpermitted_login_and_forwarding_are_refused() {
    let s = setup().await;
    let out = s
        .run(&["ssh", "demo-ssh", "--login", "root", "--", "id"])
        .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("'root'"),
        "unclear refusal: {err}"
    );
    // A login the roles permit but the target refuses (its key is not authorized there):
    // the engineer is told why, not just "permission denied".
    let out = s
        .run(&["ssh", "demo-ssh", "--login", "nobody", "--", "id"])
        .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the target refused the login as 'nobody'"),
        "unclear failure: {err}"
    );

    // Remote forwarding: refused at once (ExitOnForwardFailure makes ssh say so and stop).
    let out = s
        .run(&[
            "ssh",
            "demo-ssh",
            "--",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:9",
            "echo forwarded",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    // Local forwarding (`-W` opens a direct-tcpip channel): administratively prohibited.
    let out = s.run(&["ssh", "demo-ssh", "--", "-W", &s.sshd.addr]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("administratively prohibited"));
    // Agent forwarding: the command runs, without an agent on the target.
    let agent = s.home.path().join("agent.sock");
    let mut agent_proc = tokio::process::Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&agent)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh-agent");
    wait_for(|| agent.exists(), "ssh-agent socket").await;
    // ssh asks for agent forwarding only when SSH_AUTH_SOCK reaches a live agent.
    let out = s
        .postern(
            &["ssh", "demo-ssh", "--", "-A", "echo agent=$SSH_AUTH_SOCK"],
            false,
        )
        .env("SSH_AUTH_SOCK", &agent)
        .output()
        .await
        .expect("postern ssh -A");
    let _ = agent_proc.kill().await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "agent=\n");
    for request in ["tcpip-forward", "direct-tcpip", "auth-agent"] {
        s.expect_audit("ssh.refused", |e| e.details["request"] == request)
            .await;
    }
    s.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_and_sftp_copy_files_intact() {
    let s = setup().await;
    // 100 MB by default; POSTERN_TEST_SCP_MB lowers it on a slow machine.
    let mb: usize = std::env::var("POSTERN_TEST_SCP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let src = s.home.path().join("big.bin");
    let mut data = vec![0u8; mb * 1024 * 1024];
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("random");
    // Cheap pseudo-random content: SHA-256 in counter mode.
    for (i, chunk) in data.chunks_mut(32).enumerate() {
        let block = Sha256::new()
            .chain_update(seed)
            .chain_update((i as u64).to_le_bytes())
            .finalize();
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    std::fs::write(&src, &data).expect("write source");
    let want = hex(&Sha256::digest(&data));
    drop(data);

    let remote = home_of(LOGIN).join(format!("copy-{}.bin", postern_proto::ids::random_base32(6)));
    let started = Instant::now();
    let dest = format!("demo-ssh:{}", remote.display());
    let out = s
        .run(&[
            "ssh",
            "demo-ssh",
            "--scp",
            "--",
            src.to_str().unwrap_or_default(),
            &dest,
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    println!("scp of {mb} MB took {:?}", started.elapsed());
    assert_eq!(sha256_file(&remote), want, "scp upload corrupted the file");

    // sftp back down.
    let back = s.home.path().join("back.bin");
    let batch = s.home.path().join("batch");
    std::fs::write(
        &batch,
        format!("get {} {}\n", remote.display(), back.display()),
    )
    .expect("batch");
    let out = s
        .run(&[
            "ssh",
            "demo-ssh",
            "--sftp",
            "--",
            "-b",
            batch.to_str().unwrap_or_default(),
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sha256_file(&back), want, "sftp download corrupted the file");
    let _ = std::fs::remove_file(&remote);

    // Both directions at once, at full speed: `cat` on the target echoes the file back.
    let echoed = s.home.path().join("echoed.bin");
    let cat = s
        .postern(&["ssh", "demo-ssh", "--", "cat"], false)
        .stdin(std::fs::File::open(&src).expect("source"))
        .stdout(std::fs::File::create(&echoed).expect("echo file"))
        .status();
    let status = tokio::time::timeout(Duration::from_secs(120), cat)
        .await
        .expect("a stream both ways at once stalled")
        .expect("postern ssh -- cat");
    assert!(status.success());
    assert_eq!(
        sha256_file(&echoed),
        want,
        "cat through the session corrupted the stream"
    );
    s.expect_audit("ssh.subsystem", |e| e.details["name"] == "sftp")
        .await;
    s.assert_no_key_left();
    s.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_is_recorded() {
    let mut s = setup().await;
    let tmux = shell_in_tmux(&s, "rec");
    tmux.wait_for_screen(":~$").await;
    tmux.send("echo marker-$((6*7))");
    tmux.wait_for_screen("marker-42").await;
    tmux.send("exit");
    tmux.wait_gone().await;

    let recordings = s.finished_recordings().await;
    assert_eq!(recordings.len(), 1, "{recordings:?}");
    assert!(recordings[0].ended_at.is_some(), "recording never ended");
    let id = recordings[0].id.clone();
    let (cast_path, cast) = s.export_recording(&id).await;
    let header: serde_json::Value =
        serde_json::from_str(cast.lines().next().unwrap_or_default()).expect("header");
    assert_eq!(header["version"], 2);
    assert_eq!(header["width"], 100);
    assert!(
        cast.contains(r#""i","#) && cast.contains("echo marker"),
        "input not recorded"
    );
    // `postern recordings play` replays what was printed.
    let played = s
        .postern(&["recordings", "play", &id, "--speed", "50"], true)
        .output()
        .await
        .expect("play");
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(text(&played.stdout).contains("marker-42"));
    // A real asciicast reader accepts it and replays what was printed.
    let cat = std::process::Command::new("asciinema")
        .arg("cat")
        .arg(&cast_path)
        .output()
        .expect("asciinema (pip install asciinema)");
    assert!(cat.status.success(), "asciinema cat: {}", text(&cat.stderr));
    assert!(text(&cat.stdout).contains("marker-42"));
    s.expect_audit("ssh.shell", |e| e.actor == "alice").await;

    // The finished recording is sealed in the audit chain: a change to its stored text
    // behind the store's back is what `audit verify` reports.
    s.expect_audit("recording.end", |e| {
        e.details["recording"] == id.as_str()
            && e.details["sha256"].as_str().map(str::len) == Some(64)
            && e.details["size"] == cast.len()
    })
    .await;
    let verify = |c: &crate::harness::Api| {
        let c = c.clone();
        async move {
            c.ok::<postern_controller::api::types::AuditVerification, ()>(
                Method::GET,
                "/v1/audit/verify",
                None,
            )
            .await
        }
    };
    let v = verify(&s.c.admin).await;
    assert!(v.ok, "{v:?}");
    let db = format!("sqlite://{}", s.c.dir.path().join("postern.db").display());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&db)
        .await
        .expect("the controller's database");

    // A recording that ended without its seal (its controller stopped in between) is
    // sealed when a controller starts.
    sqlx::query(
        "INSERT INTO recordings (id, session_id, user_name, target_name, worker_name, started_at, size, content, ended_at) \
         SELECT 'r_unsealed', session_id, user_name, target_name, worker_name, started_at, size, content, ended_at \
         FROM recordings WHERE id = $1",
    )
    .bind(&id)
    .execute(&mut conn)
    .await
    .expect("an ended recording without a seal");
    s.c.controller.take().expect("controller").shutdown().await;
    let restarted = postern_controller::start(crate::harness::controller_config(
        s.c.dir.path(),
        &crate::harness::ClusterOptions::default(),
    ))
    .await
    .expect("the controller starts again");
    let admin = crate::harness::Api::new(&format!("http://{}", restarted.api_addr()))
        .login("admin", &s.c.admin_password)
        .await
        .expect("admin login");
    let mut sealed = false;
    for _ in 0..100 {
        let events: Vec<AuditEvent> = admin
            .ok(Method::GET, "/v1/audit?action=recording.end", None::<&()>)
            .await;
        if events
            .iter()
            .any(|e| e.details["recording"] == "r_unsealed")
        {
            sealed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sealed, "the unsealed recording was not sealed at start");
    let v = verify(&admin).await;
    assert!(v.ok, "{v:?}");
    // Whose the recording is, is sealed too.
    let moved = |user: String, id: String| {
        sqlx::query("UPDATE recordings SET user_name = $1 WHERE id = $2")
            .bind(user)
            .bind(id)
    };
    let owner: String = sqlx::query_scalar("SELECT user_name FROM recordings WHERE id = $1")
        .bind(&id)
        .fetch_one(&mut conn)
        .await
        .expect("owner");
    moved("mallory".into(), id.clone())
        .execute(&mut conn)
        .await
        .expect("tamper");
    let v = verify(&admin).await;
    assert!(
        !v.ok
            && v.reason
                .as_deref()
                .unwrap_or("")
                .contains("names user 'mallory'"),
        "{v:?}"
    );
    moved(owner, id.clone())
        .execute(&mut conn)
        .await
        .expect("put back");
    let v = verify(&admin).await;
    assert!(v.ok, "{v:?}");
    let changed = sqlx::query(
        "UPDATE recording_chunks SET data = replace(data, 'marker-42', 'marker-99') \
         WHERE recording_id = $1",
    )
    .bind(&id)
    .execute(&mut conn)
    .await
    .expect("tamper");
    assert!(changed.rows_affected() > 0, "no chunk held the marker");
    let v = verify(&admin).await;
    assert!(!v.ok, "{v:?}");
    assert!(
        v.reason
            .as_deref()
            .unwrap_or("")
            .contains(&format!("recording {id} was changed")),
        "{v:?}"
    );
    restarted.shutdown().await;
    s.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_session_ends_the_shell() {
    let s = setup().await;
    let tmux = shell_in_tmux(&s, "cancel");
    tmux.wait_for_screen(":~$").await;
    let sessions: Vec<Session> =
        s.c.admin
            .ok(Method::GET, "/v1/sessions?active=true", None::<&()>)
            .await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let cancelled = Instant::now();
    s.c.admin.cancel_session(&sessions[0].id).await;
    tmux.wait_gone().await;
    assert!(cancelled.elapsed() < Duration::from_secs(10));

    // A command without a terminal gets no hang-up from sshd when its client goes: the
    // worker ends it on the target when the session is cut.
    let mark = format!("sleep 47.{}", std::process::id());
    let running = || {
        std::process::Command::new("pgrep")
            // The command itself (`bash -c` execs it), not the local ssh naming it.
            .args(["-f", &format!("^{mark}$")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut client = s
        .postern(&["ssh", "demo-ssh", "--", &mark], false)
        .spawn()
        .expect("postern ssh");
    wait_for(running, "the command to start on the target").await;
    let sessions: Vec<Session> =
        s.c.admin
            .ok(Method::GET, "/v1/sessions?active=true", None::<&()>)
            .await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    s.c.admin.cancel_session(&sessions[0].id).await;
    let status = tokio::time::timeout(Duration::from_secs(10), client.wait())
        .await
        .expect("postern ssh ends with the session")
        .expect("wait");
    assert!(!status.success());
    wait_for(|| !running(), "the command to end on the target").await;
    s.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_whose_recording_reaches_its_size_limit_is_ended() {
    const LIMIT: u64 = 64 * 1024;
    let s = setup_with(ClusterOptions {
        recording_max_bytes: Some(LIMIT),
        ..Default::default()
    })
    .await;
    let tmux = shell_in_tmux(&s, "limit");
    tmux.wait_for_screen(":~$").await;
    // Well past the limit: 200,000 characters printed.
    tmux.send("head -c 200000 /dev/zero | tr '\\0' a");
    tmux.wait_gone().await;

    let sessions: Vec<Session> = s.c.admin.ok(Method::GET, "/v1/sessions", None::<&()>).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let reason = sessions[0].end_reason.clone().unwrap_or_default();
    assert!(
        sessions[0].status != "active" && reason.contains("recording reached the size limit"),
        "{:?}",
        sessions[0]
    );
    let recordings = s.list_recordings().await;
    assert_eq!(recordings.len(), 1, "{recordings:?}");
    let r = &recordings[0];
    assert_eq!(r.end_reason.as_deref(), Some("size limit reached"), "{r:?}");
    assert!(r.size as u64 <= LIMIT && r.size > 0, "{r:?}");
    // What was stored up to the limit is kept and readable.
    let (_, cast) = s.export_recording(&r.id).await;
    assert_eq!(cast.len() as i64, r.size);
    assert!(cast.contains("aaaa"), "the output before the limit is kept");
    s.expect_audit("recording.limit", |e| e.actor == "alice")
        .await;
    s.c.stop().await;
}

/// `postern ssh demo-ssh` as alice in a tmux pane (a real pty).
fn shell_in_tmux(s: &Setup, name: &str) -> Tmux {
    let token = s.alice.token.clone().unwrap_or_default();
    let command = format!(
        "env POSTERN_ADDR={} POSTERN_TOKEN={token} POSTERN_CONFIG_DIR={} TMPDIR={} {} ssh demo-ssh",
        s.alice.base,
        s.home.path().join("config").display(),
        s.home.path().join("tmp").display(),
        postern_bin().display()
    );
    Tmux::start(&s.home.path().join("tmux.sock"), name, &command)
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap_or_default()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
