//! PostgreSQL targets (issue 9), against a throwaway password-protected PostgreSQL cluster
//! ([`server`]), the real `psql` and `pgbench`, and the real `postern` binary:
//! 1. `postern psql` logs in with SCRAM and a password the engineer never saw; the statement
//!    is audited; Ctrl-C in psql cancels the running query through the session.
//! 2. `pgbench -i` and `pgbench -M prepared -T 5` through a session (MD5 login); statements
//!    of both protocols are audited.
//! 3. A per-session role is created (member of a group role, `VALID UNTIL` the session's
//!    expiry), used, and dropped when the session ends; an expired leftover is swept.
//! 4. A database user not permitted by the roles is refused at authorization, before any
//!    connection to the server.
//! 5. Garbage and oversized startup packets, and a protocol error after login, get an
//!    `ErrorResponse`; the worker stays up and other connections and sessions go on.

mod server;
mod wire;

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

use postern_cli::session::{open_session, Session};
use postern_controller::api::types::{AuditEvent, Authorization};

use crate::dev_cli::postern_bin;
use crate::harness::{Api, ApiFailure, Cluster, TempDir};
use server::*;
use wire::{query, read_all, read_until_ready, startup};

/// Creates a `postgres` target and stores its brokered password credential.
async fn pg_target(c: &Cluster, name: &str, pg: &PgServer, user: &str, password: &str) {
    c.create_target_from(json!({"name": name, "type": "postgres", "address": pg.address()}))
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::PUT,
            &format!("/v1/targets/{name}/credential"),
            Some(&json!({"kind": "password", "username": user, "secret": password})),
        )
        .await;
}

async fn authorize(
    api: &Api,
    target: &str,
    login: Option<&str>,
) -> Result<(Authorization, postern_cli::session::ClientKey), ApiFailure> {
    api.authorize(target, login).await
}

/// Opens a session in-process and serves it on a local port.
async fn open(api: &Api, target: &str, login: Option<&str>) -> (Session, SocketAddr) {
    let (auth, key) = authorize(api, target, login)
        .await
        .unwrap_or_else(|e| panic!("authorize {target}: {e:?}"));
    let session = open_session(&auth, &key).await.expect("open session");
    let (addr, _accept) = session.listen(0).await.expect("local listener");
    (session, addr)
}

/// Runs a PostgreSQL client program against a local session port.
async fn client(program: &str, addr: SocketAddr, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Runs the real `postern` binary against the in-process controller with `token`.
async fn postern(c: &Cluster, token: &str, args: &[&str]) -> Output {
    let config = TempDir::new("postern-pg-cli");
    tokio::process::Command::new(postern_bin())
        .args(args)
        .env("POSTERN_ADDR", &c.admin.base)
        .env("POSTERN_TOKEN", token)
        .env("POSTERN_CONFIG_DIR", config.path())
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run postern")
}

/// Waits (≤ 10 s) for audit events of `action` until `done` holds of them; returns them.
async fn audit_until(
    c: &Cluster,
    action: &str,
    done: impl Fn(&[AuditEvent]) -> bool,
) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    for _ in 0..100 {
        events = c
            .admin
            .ok(
                Method::GET,
                &format!("/v1/audit?action={action}&limit=1000"),
                None::<&()>,
            )
            .await;
        if done(&events) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    events
}

fn statement(e: &AuditEvent) -> &str {
    e.details["statement"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_a_password_the_engineer_never_saw() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start the throwaway PostgreSQL");
    let c = Cluster::start().await.expect("cluster");
    pg_target(&c, "pg", &pg, APP_USER, APP_PASSWORD).await;
    let token = c.admin.token.clone().expect("admin token");

    // The real CLI, the real psql: logged in as `app` with its SCRAM password, which the
    // engineer's side never had.
    let out = postern(
        &c,
        &token,
        &[
            "psql",
            "pg",
            "--",
            "-XAtc",
            "select current_user, current_database()",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "postern psql failed: {stdout}\n{stderr}\n{}",
        pg.log()
    );
    assert_eq!(stdout, "app|app", "stderr: {stderr}");
    assert!(!stdout.contains(APP_PASSWORD) && !stderr.contains(APP_PASSWORD));
    assert!(
        !stderr.contains("NOTICE"),
        "no notice when the users agree: {stderr}"
    );

    // The statement is in the audit log, with who, where and as whom.
    let events = audit_until(&c, "postgres.query", |events| {
        events
            .iter()
            .any(|e| statement(e) == "select current_user, current_database()")
    })
    .await;
    let event = events
        .iter()
        .find(|e| statement(e) == "select current_user, current_database()")
        .unwrap_or_else(|| panic!("statement not audited: {events:#?}"));
    assert_eq!(event.actor, "admin", "{event:?}");
    assert!(event.resource.starts_with("session:"), "{event:?}");
    assert_eq!(event.details["db_user"], "app");
    assert_eq!(event.details["database"], "app");
    assert_eq!(event.details["target"], "pg");
    assert_eq!(event.details["truncated"], false);

    // A long statement is cut at the configured length (4 KiB by default).
    let (_session, addr) = open(&c.admin, "pg", None).await;
    let long = format!("select length('{}')", "x".repeat(6000));
    let out = client(
        "psql",
        addr,
        &["-XAt", "-U", "app", "-d", "app", "-c", &long],
    )
    .await;
    assert_eq!(text(&out).0, "6000", "{:?}", text(&out));
    // A client naming another user is told whom the session logs in as.
    let out = client(
        "psql",
        addr,
        &[
            "-XAt",
            "-U",
            "someone",
            "-d",
            "app",
            "-c",
            "select current_user",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(stdout, "app", "{stderr}");
    assert!(
        stderr.contains(
            "NOTICE:  this Postern session logs in as database user \"app\", not \"someone\""
        ),
        "{stderr}"
    );
    let events = audit_until(&c, "postgres.query", |events| {
        events.iter().any(|e| e.details["truncated"] == true)
    })
    .await;
    let cut = events
        .iter()
        .find(|e| e.details["truncated"] == true)
        .expect("long statement audited");
    assert_eq!(statement(cut).len(), 4096);
    assert_eq!(cut.details["statement_bytes"], long.len());

    // Ctrl-C in psql: its CancelRequest reaches the server through the session.
    let started = Instant::now();
    let child = tokio::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-U", "app", "-d", "app", "-c", "select pg_sleep(60)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let pid = child.id().expect("psql pid");
    // Let the query start before interrupting it.
    let running = audit_until(&c, "postgres.query", |events| {
        events.iter().any(|e| statement(e) == "select pg_sleep(60)")
    })
    .await;
    assert!(
        running
            .iter()
            .any(|e| statement(e) == "select pg_sleep(60)"),
        "sleep never started"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill = tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(kill.success());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql ended after the cancel")
        .expect("psql output");
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "the query was not cancelled: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(45));

    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_a_session_with_md5_login() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start the throwaway PostgreSQL");
    let c = Cluster::start().await.expect("cluster");
    pg_target(&c, "pg-md5", &pg, MD5_USER, MD5_PASSWORD).await;
    let (session, addr) = open(&c.admin, "pg-md5", None).await;

    let out = client(
        "pgbench",
        addr,
        &["-i", "-q", "-s", "1", "-U", MD5_USER, "bench"],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "pgbench -i: {stdout}\n{stderr}");
    let out = client(
        "pgbench",
        addr,
        &[
            "-M", "prepared", "-T", "5", "-c", "2", "-U", MD5_USER, "bench",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "pgbench -T: {stdout}\n{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );

    // Simple-protocol statements of `pgbench -i`, prepared ones of `-M prepared`.
    let queries = audit_until(&c, "postgres.query", |events| {
        events
            .iter()
            .any(|e| statement(e).contains("pgbench_accounts"))
    })
    .await;
    assert!(
        queries
            .iter()
            .any(|e| statement(e).contains("pgbench_accounts") && e.details["db_user"] == MD5_USER),
        "no simple query audited: {queries:#?}"
    );
    let parses = audit_until(&c, "postgres.parse", |events| {
        events
            .iter()
            .any(|e| statement(e).contains("UPDATE pgbench_accounts"))
    })
    .await;
    let parse = parses
        .iter()
        .find(|e| statement(e).contains("UPDATE pgbench_accounts"))
        .unwrap_or_else(|| panic!("no Parse audited: {parses:#?}"));
    assert!(
        !parse.details["statement_name"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "prepared statements are named: {parse:?}"
    );
    assert_eq!(parse.details["database"], "bench");
    drop(session);
    c.stop().await;
}

/// The per-session roles on the server now.
fn session_roles(pg: &PgServer) -> Vec<String> {
    pg.sql(&["SELECT rolname FROM pg_roles WHERE rolname LIKE 'postern\\_s\\_%' ORDER BY 1"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_session_role_is_created_used_and_dropped() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start the throwaway PostgreSQL");
    // What the engineer's sessions may touch belongs to the group role.
    pg.sql(&[
        "CREATE TABLE notes (t text)",
        &format!("ALTER TABLE notes OWNER TO {GROUP_ROLE}"),
        // Left behind by a worker that stopped before its session ended; long expired.
        "CREATE ROLE postern_s_leftover LOGIN VALID UNTIL '2001-01-01 00:00:00+00'",
    ]);
    let c = Cluster::start().await.expect("cluster");
    c.create_target_from(json!({"name": "pg-zsc", "type": "postgres", "address": pg.address()}))
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::PUT,
            "/v1/targets/pg-zsc/credential",
            Some(&json!({"kind": "postgres_admin", "username": ADMIN_USER, "secret": ADMIN_PASSWORD})),
        )
        .await;
    let carol = c.user("carol").await;
    for (path, body) in [
        ("/v1/roles", json!({"name": "analyst"})),
        (
            "/v1/roles/analyst/rules",
            json!({"effect": "allow", "actions": ["connect"], "targets": "pg-zsc", "logins": [GROUP_ROLE]}),
        ),
        ("/v1/roles/analyst/bind", json!({"user": "carol"})),
    ] {
        let _: serde_json::Value = c.admin.ok(Method::POST, path, Some(&body)).await;
    }

    let (session, addr) = open(&carol, "pg-zsc", Some(GROUP_ROLE)).await;
    let role = format!("postern_{}", session.session_id());
    let sql = "INSERT INTO notes VALUES ('hello') RETURNING current_user, session_user";
    let out = client(
        "psql",
        addr,
        &["-XAtq", "-U", "carol", "-d", "postgres", "-c", sql],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", pg.log());
    // Logged in as the session's own role, acting as the group; the client that asked for
    // another user is told.
    assert_eq!(stdout, format!("{GROUP_ROLE}|{role}"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "logs in as its own database role \"{role}\", a member of \"{GROUP_ROLE}\", not \"carol\""
        )),
        "{stderr}"
    );
    // A second connection of the session uses the same role; asking for the group role, as
    // `postern psql --db-user GROUP` does, draws no notice.
    let out = client(
        "psql",
        addr,
        &[
            "-XAt",
            "-U",
            GROUP_ROLE,
            "-d",
            "postgres",
            "-c",
            "select session_user",
        ],
    )
    .await;
    assert_eq!(text(&out).0, role, "{:?}", text(&out));
    assert!(!text(&out).1.contains("logs in as"), "{:?}", text(&out));

    // While the session lives: its role exists, expires with it, and the leftover is gone.
    assert_eq!(session_roles(&pg), std::slice::from_ref(&role));
    let valid_until = pg.sql(&[&format!(
        "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = '{role}'"
    )]);
    assert_eq!(
        valid_until.parse::<i64>().expect("valid until"),
        session.expires_at()
    );
    let created = audit_until(&c, "postgres.role_created", |e| !e.is_empty()).await;
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(created[0].details["role"], role.as_str());
    assert_eq!(created[0].details["group"], GROUP_ROLE);
    assert_eq!(
        created[0].details["expired_roles_dropped"],
        json!(["postern_s_leftover"])
    );

    // The session ends: the role is dropped.
    session.close().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !session_roles(&pg).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(session_roles(&pg), Vec::<String>::new(), "role not dropped");
    let dropped = audit_until(&c, "postgres.role_dropped", |e| !e.is_empty()).await;
    assert_eq!(dropped[0].details["role"], role.as_str(), "{dropped:#?}");
    assert!(dropped[0].details.get("error").is_none(), "{dropped:#?}");
    // What the session did stays, owned by the group.
    assert_eq!(pg.sql(&["SELECT t FROM notes"]), "hello");

    // Without a group role to join, the session is refused with the way out.
    let (_s, addr) = open(&c.admin, "pg-zsc", None).await;
    let out = client("psql", addr, &["-XAt", "-d", "postgres", "-c", "select 1"]).await;
    let (_, stderr) = text(&out);
    assert!(stderr.contains("--db-user GROUP"), "{stderr}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_user_not_permitted_is_refused_at_authorization() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start the throwaway PostgreSQL");
    let c = Cluster::start().await.expect("cluster");
    pg_target(&c, "pg", &pg, APP_USER, APP_PASSWORD).await;
    let bob = c.user("bob").await;
    c.role(
        "pg-app",
        &[json!({"effect": "allow", "actions": ["connect"], "targets": "pg", "logins": ["app"]})],
        json!({"user": "bob"}),
    )
    .await;
    let bob_token = bob.token.clone().expect("bob's token");

    // `reader` exists on the server but no rule names it: refused by the controller.
    let Err(err) = authorize(&bob, "pg", Some(OTHER_USER)).await else {
        panic!("reader is not permitted, yet authorized");
    };
    assert_eq!(err.status, 403);
    assert!(err.message.contains("'reader'"), "{}", err.message);
    let out = postern(
        &c,
        &bob_token,
        &[
            "psql",
            "pg",
            "--db-user",
            OTHER_USER,
            "--",
            "-XAtc",
            "select 1",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("'reader'"), "{stderr}");
    // Before any server round trip: no session exists for bob, so no worker was involved.
    let sessions: Vec<serde_json::Value> =
        c.admin.ok(Method::GET, "/v1/sessions", None::<&()>).await;
    assert!(sessions.iter().all(|s| s["user"] != "bob"), "{sessions:#?}");

    // The permitted one works, for bob's psql too.
    let out = postern(
        &c,
        &bob_token,
        &[
            "psql",
            "pg",
            "--db-user",
            APP_USER,
            "--",
            "-XAtc",
            "select current_user",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, "app");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_get_an_error_response_and_hurt_nobody_else() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start the throwaway PostgreSQL");
    let c = Cluster::start().await.expect("cluster");
    pg_target(&c, "pg", &pg, APP_USER, APP_PASSWORD).await;
    let (session, addr) = open(&c.admin, "pg", None).await;
    // A long-lived connection of another session, before and after the garbage.
    let (_other, other_addr) = open(&c.admin, "pg", None).await;
    let mut victim = tokio::net::TcpStream::connect(other_addr)
        .await
        .expect("connect");
    victim
        .write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .expect("startup");
    read_until_ready(&mut victim).await;

    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(),
            "startup packet length",
        ),
        (
            "oversized",
            [&[0u8, 1, 0, 0][..], &[b'x'; 100]].concat(),
            "startup packet length 65536",
        ),
        (
            "protocol 2",
            vec![0, 0, 0, 9, 0, 2, 0, 0, 0],
            "unsupported frontend protocol 2.0",
        ),
        (
            "unterminated parameters",
            vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'],
            "malformed startup packet",
        ),
    ];
    for (what, bytes, expected) in cases {
        let (mut send, mut recv) = session.open_stream().await.expect("stream");
        send.write_all(&bytes).await.expect("write");
        let reply = read_all(&mut recv).await;
        assert_eq!(reply.first(), Some(&b'E'), "{what}: {reply:?}");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.contains(expected), "{what}: {reply}");
    }

    // A message the client may not send once logged in: an ErrorResponse after the
    // server's greeting, then the end of that connection only.
    let (mut send, mut recv) = session.open_stream().await.expect("stream");
    send.write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .expect("startup");
    send.write_all(&[b'p', 0, 0, 0, 8, b'p', b'w', b'd', 0])
        .await
        .expect("password message");
    let reply = read_all(&mut recv).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.contains("unexpected message type 'p'"),
        "after login: {reply}"
    );
    // An oversized message after login.
    let (mut send, mut recv) = session.open_stream().await.expect("stream");
    send.write_all(&startup(&[("user", "app"), ("database", "app")]))
        .await
        .expect("startup");
    send.write_all(&[b'Q', 0x7f, 0, 0, 0]).await.expect("huge");
    let reply = String::from_utf8_lossy(&read_all(&mut recv).await).into_owned();
    assert!(reply.contains("out of range"), "oversized query: {reply}");

    // The worker is up: the same session, and the other session's open connection, work.
    let out = client(
        "psql",
        addr,
        &["-XAt", "-U", "app", "-d", "app", "-c", "select 42"],
    )
    .await;
    assert_eq!(text(&out).0, "42", "{:?}", text(&out));
    victim
        .write_all(&query("select 7"))
        .await
        .expect("query on the other session");
    let answer = read_until_ready(&mut victim).await;
    // DataRow: one column of length 1, "7".
    assert!(
        answer.windows(5).any(|w| w == [0, 0, 0, 1, b'7']),
        "{answer:?}"
    );
    c.stop().await;
}
