//! Must show 1: `postern dev`, then `postern connect demo-postgres -- psql … -c 'select 1'`
//! prints 1 — the real binary, the real psql, the real PostgreSQL on this machine.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::TempDir;

/// The `postern` binary next to this test binary (`cargo build --bins` puts it there).
pub fn postern_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("postern");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        bin.display()
    );
    bin
}

/// `postern connect TARGET -- psql … -Atc SQL` against the local server's `postgres`
/// database through the session's port: the arguments after `postern`.
pub fn connect_psql<'a>(target: &'a str, sql: &'a str) -> [&'a str; 14] {
    [
        "connect",
        target,
        "--",
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        "{port}",
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-Atc",
        sql,
    ]
}

/// `postern dev` running in the background, killed on drop.
struct Dev {
    child: Child,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(dir: &TempDir) -> (Dev, String) {
    start_dev_with(dir, &[])
}

fn start_dev_with(dir: &TempDir, extra: &[&str]) -> (Dev, String) {
    let mut child = Command::new(postern_bin())
        .args(["dev", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--api-addr", "127.0.0.1:0"])
        .args(extra)
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn postern dev");
    let stdout = child.stdout.take();
    // From here on, Drop kills and reaps the process on every path, panics included.
    let dev = Dev { child };
    let stdout = stdout.expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("[postern dev] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
                if line.contains("Ctrl-C") {
                    return (dev, banner);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    panic!("postern dev did not come up; it printed:\n{banner}");
}

fn postern(dir: &TempDir, args: &[&str]) -> std::process::Output {
    Command::new(postern_bin())
        .args(args)
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .stdin(Stdio::null())
        .output()
        .expect("run postern")
}

#[test]
fn dev_then_connect_runs_real_psql_through_the_worker() {
    let dir = TempDir::new("postern-dev-cli");
    let (_dev, banner) = start_dev(&dir);
    assert!(
        banner.contains("admin"),
        "banner names the admin login:\n{banner}"
    );
    assert!(
        banner.contains("postern connect demo-postgres"),
        "banner says what to try:\n{banner}"
    );

    let out = postern(&dir, &connect_psql("demo-postgres", "select 1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "connect failed: {stdout}\n{stderr}");
    assert_eq!(
        stdout.trim(),
        "1",
        "psql output through the session; stderr: {stderr}"
    );

    // The session is recorded, and ends with the command, with its traffic counted.
    let mut last = serde_json::Value::Null;
    for _ in 0..50 {
        let out = postern(&dir, &["sessions", "list", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sessions: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("sessions json");
        last = sessions[0].clone();
        if last["status"] == "terminated" && last["connections"] == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last["target"], "demo-postgres");
    assert_eq!(
        last["status"], "terminated",
        "session did not end with the command: {last}"
    );
    assert_eq!(last["connections"], 1, "{last}");
    assert!(
        last["bytes_down"].as_i64().unwrap_or(0) > 0,
        "no bytes counted: {last}"
    );

    // demo-pg: the same server as a `postgres` target, logged in for the engineer, each
    // statement audited.
    let out = postern(&dir, &["psql", "demo-pg", "--", "-XAtc", "select 41 + 1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{stderr}"
    );
    let mut audited = String::new();
    for _ in 0..50 {
        let out = postern(
            &dir,
            &["audit", "list", "--action", "postgres.query", "--json"],
        );
        audited = String::from_utf8_lossy(&out.stdout).into_owned();
        if audited.contains("select 41 + 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(audited.contains("select 41 + 1"), "{audited}");

    // A session asked for longer than the target allows is shortened, and the user told.
    let out = postern(
        &dir,
        &["connect", "demo-postgres", "-d", "100h", "--", "true"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the longest demo-postgres allows (asked for 4d 4h)"),
        "{stderr}"
    );
    let out = postern(
        &dir,
        &["connect", "demo-postgres", "-d", "30m", "--", "true"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("note:"),
        "{stderr}"
    );

    // A mistyped target gets a clear error and a non-zero exit.
    let out = postern(&dir, &["connect", "demo-postgre", "--", "true"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean 'demo-postgres'"), "{stderr}");

    // A mistyped target is what `credentials set` reports, not the (here empty) secret.
    let out = postern(
        &dir,
        &[
            "credentials",
            "set",
            "demo-postgre",
            "--username",
            "u",
            "--password-stdin",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean 'demo-postgres'"), "{stderr}");

    // A filter naming nobody says so, with the suggestion, rather than only "nothing".
    for args in [
        &["sessions", "list", "--user", "admn"][..],
        &["audit", "list", "--target", "demo-postgre"][..],
    ] {
        let out = postern(&dir, args);
        assert!(out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("did you mean"), "{args:?}: {stderr}");
    }
    // So does an action no event has.
    let out = postern(&dir, &["audit", "list", "--action", "sesion.authorize"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no audit event has the action 'sesion.authorize'"),
        "{stderr}"
    );
    let out = postern(&dir, &["audit", "list", "--action", "session.authorize"]);
    assert!(out.status.success() && out.stderr.is_empty());
    let out = postern(&dir, &["recordings", "list", "--session", "s_nope"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("s_nope"), "{stderr}");
    // With --json an error is JSON too: one object on stderr, nothing on stdout.
    let out = postern(&dir, &["--json", "sessions", "show", "s_nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(err["error"]["status"], 404, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("s_nope")),
        "{err}"
    );
    assert!(
        err["error"]["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{err}"
    );

    // A reader that stops reading (`postern audit list | head`) ends the command quietly:
    // no panic, no error, whichever way it prints. The pipe's read end is closed before
    // the command starts, so its first write fails.
    let session = last["id"].as_str().expect("session id").to_owned();
    for args in [
        &["audit", "list"][..],
        &["audit", "export"][..],
        &["sessions", "show", &session][..],
        &["roles", "show", "admin"][..],
        &["targets", "list", "--json"][..],
    ] {
        let out = into_closed_pipe(&dir, args, Stream::Stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{args:?} into a closed pipe: {:?}\n{stderr}",
            out.status
        );
    }
    // Nor does a stderr that went away (`postern … 2>&1 | true`) turn a note or an error
    // into a panic: the command ends as it would have, its message lost.
    for (args, code) in [
        (&["audit", "list", "--action", "no.such.action"][..], 0),
        (&["sessions", "show", "s_nope"][..], 1),
    ] {
        let out = into_closed_pipe(&dir, args, Stream::Stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?} with stderr closed");
    }
}

/// Which output of a command goes into a pipe nobody reads.
enum Stream {
    Stdout,
    Stderr,
}

/// Runs `postern ARGS` of the dev instance in `dir` with `closed` going into a pipe whose
/// read end is closed before it starts (its first write fails); the other output is kept.
fn into_closed_pipe(dir: &TempDir, args: &[&str], closed: Stream) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut command = Command::new(postern_bin());
    command
        .args(args)
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .stdin(Stdio::null());
    match closed {
        Stream::Stdout => command.stdout(writer).stderr(Stdio::piped()),
        Stream::Stderr => command.stdout(Stdio::piped()).stderr(writer),
    };
    command.output().expect("run postern")
}

/// `postern dev --database-url`: the same dev stack with the controller's state in
/// PostgreSQL; a session through it lands in that database.
#[test]
fn dev_keeps_its_state_in_postgresql_when_asked() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(crate::harness::PgDb::create());
    let dir = TempDir::new("postern-dev-pg");
    {
        let (_dev, _) = start_dev_with(&dir, &["--database-url", &db.url]);
        let out = postern(&dir, &connect_psql("demo-postgres", "select 2"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "connect failed: {stdout}\n{stderr}");
        assert_eq!(stdout.trim(), "2", "{stderr}");
        let sessions: i64 = rt.block_on(async {
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url)
                .await
                .expect("connect to the dev database");
            sqlx::Row::get(
                &sqlx::query(
                    "SELECT COUNT(*) AS n FROM sessions WHERE target_name = 'demo-postgres'",
                )
                .fetch_one(&mut conn)
                .await
                .expect("count sessions"),
                "n",
            )
        });
        assert_eq!(sessions, 1, "the session is stored in PostgreSQL");
    }
    rt.block_on(db.drop_db());

    // Anything but a PostgreSQL URL is refused, clearly.
    let out = Command::new(postern_bin())
        .args([
            "dev",
            "--api-addr",
            "127.0.0.1:0",
            "--database-url",
            "mysql://x/y",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .env("POSTERN_CONFIG_DIR", dir.path().join("config2"))
        .stdin(Stdio::null())
        .output()
        .expect("run postern dev");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("takes a PostgreSQL URL"), "{stderr}");
}

/// `postern --json connect TARGET` left running, and the session id of the line it printed.
fn json_connect(dir: &TempDir, target: &str) -> (Child, String) {
    let mut connect = Command::new(postern_bin())
        .args(["--json", "connect", target])
        .env("POSTERN_CONFIG_DIR", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn postern connect");
    let mut line = String::new();
    let read = connect
        .stdout
        .take()
        .map(|out| BufReader::new(out).read_line(&mut line));
    let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    match (read, info["session_id"].as_str()) {
        (Some(Ok(n)), Some(id)) if n > 0 => {
            let id = id.to_owned();
            (connect, id)
        }
        _ => {
            let _ = connect.kill();
            let _ = connect.wait();
            panic!("postern connect printed no session: {line:?}");
        }
    }
}

#[test]
fn an_interrupted_connect_closes_its_session() {
    let dir = TempDir::new("postern-dev-kill");
    let (_dev, _) = start_dev(&dir);
    let (mut connect, id) = json_connect(&dir, "demo-postgres");

    // SIGTERM, as a service manager or `kill` would send.
    let status = Command::new("kill")
        .args(["-TERM", &connect.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = connect.wait().expect("connect exits");
    assert!(
        exited.code().is_some(),
        "connect died of the signal instead of closing cleanly"
    );

    let mut last = serde_json::Value::Null;
    for _ in 0..50 {
        let out = postern(&dir, &["sessions", "show", &id, "--json"]);
        last = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if last["status"] == "terminated" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        last["status"], "terminated",
        "session left open after SIGTERM: {last}"
    );
}

/// A second `postern dev` on the same data directory is refused, and the first carries on
/// (it used to take the worker's registration over and leave the first one's worker
/// disconnected).
#[test]
fn a_second_dev_on_the_same_data_dir_is_refused() {
    let dir = TempDir::new("postern-dev-twice");
    let (_dev, _) = start_dev(&dir);
    let out = Command::new(postern_bin())
        .args(["dev", "--api-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("POSTERN_CONFIG_DIR", dir.path().join("config2"))
        .stdin(Stdio::null())
        .output()
        .expect("run a second postern dev");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another `postern dev` is running"),
        "{stderr}"
    );
    let out = postern(&dir, &["--json", "workers", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let workers: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(workers[0]["connected"], true, "{workers}");

    // Deleting a worker that never registered says what that did.
    let out = postern(&dir, &["workers", "create", "spare"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = postern(&dir, &["workers", "delete", "spare"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("activation token can no longer be used"),
        "{stdout}"
    );
}

/// A session whose worker was killed (it could not report the end) ends when the worker's
/// next process connects, instead of staying `active` until it expires.
#[test]
fn a_killed_workers_sessions_end_when_it_comes_back() {
    let dir = TempDir::new("postern-dev-restart");
    let (dev, _) = start_dev(&dir);
    let (mut connect, id) = json_connect(&dir, "demo-postgres");
    let show = |id: &str| -> serde_json::Value {
        let out = postern(&dir, &["sessions", "show", id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let mut last = serde_json::Value::Null;
    for _ in 0..50 {
        last = show(&id);
        if last["status"] == "active" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if last["status"] != "active" {
        let _ = connect.kill();
        let _ = connect.wait();
        panic!("the session of postern connect is not active: {last}");
    }
    // Activation times are whole seconds: the next process must start clearly after.
    std::thread::sleep(Duration::from_millis(2500));
    drop(dev); // SIGKILL: nothing is reported
    let _ = connect.kill();
    let _ = connect.wait();

    let (_dev, _) = start_dev(&dir);
    for _ in 0..100 {
        last = show(&id);
        if last["status"] == "terminated" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last["status"], "terminated", "{last}");
    assert!(
        last["end_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("worker restarted")),
        "{last}"
    );
}
