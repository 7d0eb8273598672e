//! Issue 3: live revocation. Traffic-carrying connections are cut (well within 1 s) after a
//! cancel, a user lock, a target deletion, a role unbinding; expiry and connection limits;
//! fail-closed and surviving a controller restart; a cancel through a second controller on
//! the same PostgreSQL; the audit trail of each.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use postern_cli::session::{open_session, Session};
use postern_controller::api::types::{AuditEvent, Authorization, Session as SessionRow};

use crate::harness::{
    controller_config, echo_server, free_addrs, Api, ApiFailure, Cluster, ClusterOptions, PgDb,
    Traffic,
};
use crate::operations::metrics::{scrape, scrape_until};
use crate::operations::prom::{value, Samples};

/// Generous sanity bound for a revocation to cut an open connection (the real figure is the
/// benchmark's).
const CUT_BOUND: Duration = Duration::from_secs(1);

async fn authorize(
    api: &Api,
    target: &str,
) -> Result<(Authorization, postern_cli::session::ClientKey), ApiFailure> {
    api.authorize(target, None).await
}

/// Opens a session as `api`'s user and starts traffic through it.
async fn live_session(api: &Api, target: &str) -> (Session, Traffic, String) {
    let (auth, key) = authorize(api, target).await.expect("authorized");
    let session = open_session(&auth, &key).await.expect("session opens");
    let (local, _) = session.listen(0).await.expect("listen");
    let traffic = Traffic::start(local).await;
    (session, traffic, auth.session_id)
}

/// A user `name` with a role `name-role` allowing connect to every target.
async fn user_with_role(c: &Cluster, name: &str) -> Api {
    let api = c.user(name).await;
    let role = format!("{name}-role");
    let _: serde_json::Value = c
        .admin
        .ok(Method::POST, "/v1/roles", Some(&json!({"name": role})))
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            &format!("/v1/roles/{role}/rules"),
            Some(&json!({"effect": "allow", "actions": ["connect"]})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            &format!("/v1/roles/{role}/bind"),
            Some(&json!({"user": name})),
        )
        .await;
    api
}

async fn session_row(admin: &Api, id: &str) -> SessionRow {
    admin.session(id).await
}

/// Waits until the audit log holds an event matching `pred` (≤ 5 s).
async fn audited(admin: &Api, action: &str, pred: impl Fn(&AuditEvent) -> bool) -> AuditEvent {
    for _ in 0..100 {
        let events: Vec<AuditEvent> = admin
            .ok(
                Method::GET,
                &format!("/v1/audit?action={action}&limit=1000"),
                None::<&()>,
            )
            .await;
        if let Some(e) = events.into_iter().find(|e| pred(e)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {action} audit event as expected");
}

/// Runs `revoke`, then checks the traffic was cut within the bound, the client was told
/// `reason`, and the session row says so.
async fn assert_cut(
    c: &Cluster,
    session: Session,
    traffic: Traffic,
    id: &str,
    reason: &str,
    revoke: impl std::future::Future<Output = ()>,
) {
    // The controller checks a session started on a pushed grant after the fact: until that
    // check is done, it (rather than the revocation) may be what ends the session, with
    // its own reason.
    let resource = format!("session:{id}");
    audited(&c.admin, "session.activate", |e| e.resource == resource).await;
    let t0 = Instant::now();
    revoke.await;
    let cut = traffic
        .wait_cut(CUT_BOUND * 5)
        .await
        .expect("the open connection was not cut");
    let took = cut.saturating_duration_since(t0);
    assert!(took < CUT_BOUND, "connection cut only after {took:?}");
    let end = tokio::time::timeout(Duration::from_secs(2), session.closed())
        .await
        .expect("session closed");
    assert!(
        end.reason.contains(reason),
        "client told '{}', expected '{reason}'",
        end.reason
    );
    let row = session_row(&c.admin, id).await;
    assert_eq!(row.status, "terminated");
    assert!(
        row.end_reason.as_deref().unwrap_or("").contains(reason),
        "{row:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_cut_open_connections() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    c.create_target("echo2", &echo.to_string(), &[]).await;

    // 1. An admin cancels the session.
    let alice = user_with_role(&c, "alice").await;
    let (s, t, id) = live_session(&alice, "echo").await;
    assert_cut(&c, s, t, &id, "cancelled by admin admin", async {
        c.admin.cancel_session(&id).await;
    })
    .await;
    let e = audited(&c.admin, "session.connections_cut", |e| {
        e.resource == format!("session:{id}")
    })
    .await;
    assert_eq!(e.actor, "admin", "the audit names who revoked");
    assert_eq!(e.details["connections_cut"], 1);
    audited(&c.admin, "session.cancel", |e| {
        e.resource == format!("session:{id}") && e.actor == "admin"
    })
    .await;

    // 2. Locking the user ends all their sessions and refuses new ones.
    let bob = user_with_role(&c, "bob").await;
    let (s, t, id) = live_session(&bob, "echo").await;
    assert_cut(&c, s, t, &id, "user locked", async {
        let _: serde_json::Value = c
            .admin
            .ok(Method::POST, "/v1/users/bob/lock", None::<&()>)
            .await;
    })
    .await;
    let e = audited(&c.admin, "session.revoke", |e| {
        e.resource == format!("session:{id}")
    })
    .await;
    assert_eq!(
        (e.actor.as_str(), e.details["reason"].as_str()),
        ("admin", Some("user locked"))
    );
    // The change comes first in the log, then the revocation it caused.
    let lock = audited(&c.admin, "user.lock", |e| e.resource == "user:bob").await;
    assert!(
        lock.seq < e.seq,
        "user.lock #{} after session.revoke #{}",
        lock.seq,
        e.seq
    );
    let cut = audited(&c.admin, "session.connections_cut", |e| {
        e.resource == format!("session:{id}")
    })
    .await;
    assert_eq!(cut.details["connections_cut"], 1);
    let refused = authorize(&bob, "echo")
        .await
        .expect_err("locked user cannot authorize");
    assert!(
        refused.status == 401 || refused.status == 403,
        "{refused:?}"
    );

    // 3. Deleting the target ends its sessions.
    let carol = user_with_role(&c, "carol").await;
    let (s, t, id) = live_session(&carol, "echo2").await;
    assert_cut(&c, s, t, &id, "target deleted", async {
        let _: serde_json::Value = c
            .admin
            .ok(Method::DELETE, "/v1/targets/echo2", None::<&()>)
            .await;
    })
    .await;
    assert_eq!(
        authorize(&carol, "echo2")
            .await
            .expect_err("target is gone")
            .status,
        404
    );

    // 4. Unbinding the user's only role ends the sessions it allowed.
    let dave = user_with_role(&c, "dave").await;
    let (s, t, id) = live_session(&dave, "echo").await;
    assert_cut(&c, s, t, &id, "policy changed", async {
        let _: serde_json::Value = c
            .admin
            .ok(
                Method::POST,
                "/v1/roles/dave-role/unbind",
                Some(&json!({"user": "dave"})),
            )
            .await;
    })
    .await;
    assert_eq!(
        authorize(&dave, "echo")
            .await
            .expect_err("no role any more")
            .status,
        403
    );
    // Alice's sessions were not touched by dave's policy change.
    let (s, mut t, _) = live_session(&alice, "echo").await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/dave-role/rules",
            Some(&json!({"effect": "deny", "actions": ["connect"]})),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.alive(), "an unrelated session was cut");
    s.close().await;
    c.stop().await;
}

/// A session spread over two QUIC connections (`postern connect --lanes 2`) to a worker with
/// two session lanes: the second connection lands on the other lane, local connections take
/// turns between the two, and a cancel cuts every one of them as one session's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_two_lanes_carries_on_both_and_is_cut_whole() {
    let c = Cluster::start_with(ClusterOptions {
        session_lanes: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let (auth, key) = authorize(&c.admin, "echo").await.expect("authorized");
    let session = open_session(&auth, &key).await.expect("session opens");
    assert!(
        session.lane().is_some(),
        "a worker with two lanes names the lane"
    );
    session.add_lanes(&auth, &std::sync::Arc::new(key), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.lanes_up() < 1 {
        assert!(Instant::now() < deadline, "the second lane never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (local, _) = session.listen(0).await.expect("listen");
    // Each echoes once before `start` returns: four connections, two over each lane.
    let mut traffic = Vec::new();
    for _ in 0..4 {
        traffic.push(Traffic::start(local).await);
    }
    assert!(traffic.iter_mut().all(Traffic::alive));

    let t0 = Instant::now();
    c.admin.cancel_session(&auth.session_id).await;
    for t in traffic {
        let cut = t
            .wait_cut(CUT_BOUND * 5)
            .await
            .expect("a connection of the session was not cut");
        assert!(cut.saturating_duration_since(t0) < CUT_BOUND);
    }
    let end = tokio::time::timeout(Duration::from_secs(2), session.closed())
        .await
        .expect("session closed");
    assert!(end.reason.contains("cancelled"), "{}", end.reason);
    let e = audited(&c.admin, "session.connections_cut", |e| {
        e.resource == format!("session:{}", auth.session_id)
    })
    .await;
    assert_eq!(
        e.details["connections_cut"], 4,
        "the worker counts both lanes' connections as the session's"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_connection_limit() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target_from(json!({"name": "short", "type": "tcp", "address": echo.to_string(), "max_duration_secs": 2})).await;
    c.create_target_from(json!({"name": "single", "type": "tcp", "address": echo.to_string(), "connection_limit": 1})).await;

    // A 2 s session ends by itself.
    let t0 = Instant::now();
    let (session, traffic, id) = live_session(&c.admin, "short").await;
    let cut = traffic
        .wait_cut(Duration::from_secs(6))
        .await
        .expect("expired session cut");
    let lived = cut.duration_since(t0);
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(4),
        "lived {lived:?}"
    );
    let end = session.closed().await;
    assert!(end.reason.contains("expired"), "{}", end.reason);
    let mut row = session_row(&c.admin, &id).await;
    for _ in 0..50 {
        if row.status == "terminated" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        row = session_row(&c.admin, &id).await;
    }
    assert_eq!(
        (row.status.as_str(), row.end_reason.as_deref()),
        ("terminated", Some("expired"))
    );

    // A connection limit of 1 refuses the second connection, clearly.
    let (session, mut first, id) = live_session(&c.admin, "single").await;
    match session.open_stream().await {
        Err(e) => assert!(
            e.to_string().contains("connection limit of 1 reached"),
            "{e}"
        ),
        Ok(_) => panic!("a second connection was admitted over the limit"),
    }
    assert!(first.alive(), "the first connection must go on");
    drop(first);
    // When the only allowed connection ends, so does the session.
    let end = tokio::time::timeout(Duration::from_secs(5), session.closed())
        .await
        .expect("session ends with its last connection");
    assert!(end.reason.contains("connection limit"), "{}", end.reason);
    let _ = id;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_fails_closed_and_survives_a_quick_restart() {
    // Long enough for QUIC's handshake retransmission to find the restarted controller.
    let grace = Duration::from_secs(5);
    let addrs = free_addrs();
    let mut c = Cluster::start_with(ClusterOptions {
        grace,
        addrs: Some(addrs),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;

    // A second controller on the same SQLite database is refused while the first runs.
    let refused =
        postern_controller::start(controller_config(c.dir.path(), &ClusterOptions::default()))
            .await
            .expect_err("two controllers on one SQLite database");
    assert!(
        refused
            .to_string()
            .contains("another controller is running on the SQLite database"),
        "{refused}"
    );

    // Restart within the grace period: the session survives.
    let (session, mut traffic, _) = live_session(&c.admin, "echo").await;
    c.controller.take().expect("controller").shutdown().await;
    // Started without its key-encryption key, a bootstrapping controller does not make a
    // new one for a database whose keys an old one sealed.
    let kek = c.dir.path().join("kek");
    let kept = c.dir.path().join("kek.kept");
    std::fs::rename(&kek, &kept).expect("move the kek away");
    let refused =
        postern_controller::start(controller_config(c.dir.path(), &ClusterOptions::default()))
            .await
            .expect_err("no kek for a database with keys");
    assert!(
        refused.to_string().contains("restore that kek_file"),
        "{refused}"
    );
    assert!(!kek.exists(), "a new kek was written");
    std::fs::rename(&kept, &kek).expect("put the kek back");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        traffic.alive(),
        "sessions go on while the controller is briefly away"
    );
    let config = controller_config(
        c.dir.path(),
        &ClusterOptions {
            grace,
            addrs: Some(addrs),
            ..Default::default()
        },
    );
    c.controller = Some(
        postern_controller::start(config)
            .await
            .expect("controller restarts"),
    );
    c.wait_worker_connected().await.expect("worker reconnects");
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    assert!(
        traffic.alive(),
        "a restart within the grace period must not end sessions"
    );

    // Gone for longer than the grace period: the worker ends every session.
    c.controller.take().expect("controller").shutdown().await;
    let t0 = Instant::now();
    tokio::time::sleep(grace / 2).await;
    assert!(traffic.alive(), "cut before the grace period was over");
    let cut = traffic
        .wait_cut(grace * 3)
        .await
        .expect("the worker fails closed");
    assert!(
        cut.duration_since(t0) >= grace - Duration::from_millis(100),
        "cut too early"
    );
    let end = session.closed().await;
    assert!(end.reason.contains("lost controller"), "{}", end.reason);
    c.stop().await;
}

/// Two controllers on one new PostgreSQL database (same KEK file): the first, started with
/// `first`'s options, logs in as a database role of its own (which [`PgDb::admit_role`] can
/// keep out), holds the worker and has an `echo` target; the second, with `second`'s
/// options, does not bootstrap. The database, the cluster, the second controller and an
/// admin client of it.
async fn two_controllers(
    first: ClusterOptions,
    second: ClusterOptions,
) -> (PgDb, Cluster, postern_controller::ControllerHandle, Api) {
    let mut db = PgDb::create().await;
    let first_url = db.owner_role().await;
    let c = Cluster::start_with(ClusterOptions {
        database_url: Some(first_url),
        ..first
    })
    .await
    .expect("first controller + worker on PostgreSQL");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let mut second_config = controller_config(
        c.dir.path(),
        &ClusterOptions {
            database_url: Some(db.url.clone()),
            ..second
        },
    );
    second_config.bootstrap_admin = false;
    let second = postern_controller::start(second_config)
        .await
        .expect("second controller");
    let admin2 = Api::new(&format!("http://{}", second.api_addr()))
        .login("admin", &c.admin_password)
        .await
        .expect("login on the second");
    (db, c, second, admin2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_a_second_controller_reaches_the_worker() {
    let (db, c, second, admin2) =
        two_controllers(ClusterOptions::default(), ClusterOptions::default()).await;

    let (session, traffic, id) = live_session(&c.admin, "echo").await;
    let t0 = Instant::now();
    admin2.cancel_session(&id).await;
    let cut = traffic
        .wait_cut(CUT_BOUND * 5)
        .await
        .expect("cancel through the second controller cut the connection");
    assert!(
        cut.duration_since(t0) < CUT_BOUND,
        "took {:?}",
        cut.duration_since(t0)
    );
    let end = session.closed().await;
    assert!(end.reason.contains("cancelled by admin"), "{}", end.reason);

    // A cancel whose notification the first controller's listener misses (its connection
    // gone, the database taking no new one) still reaches the worker once the listener is
    // back: it reads what ended while it was away.
    let (session, mut traffic, id) = live_session(&c.admin, "echo").await;
    db.admit_role(false).await;
    admin2.cancel_session(&id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(traffic.alive(), "cut while no listener could be told");
    db.admit_role(true).await;
    traffic
        .wait_cut(Duration::from_secs(15))
        .await
        .expect("the cancel missed while the listener was away reached the worker");
    let end = session.closed().await;
    assert!(end.reason.contains("cancelled by admin"), "{}", end.reason);

    // A worker deleted through the second controller loses its connection to the first
    // within a heartbeat (5 s): its certificate is checked again then.
    let _: serde_json::Value = admin2
        .ok(Method::DELETE, "/v1/workers/w1", None::<&()>)
        .await;
    let disconnected = async {
        loop {
            let events: Vec<AuditEvent> = c
                .admin
                .ok(
                    Method::GET,
                    "/v1/audit?action=worker.disconnect&limit=100",
                    None::<&()>,
                )
                .await;
            if events.iter().any(|e| e.resource == "worker:w1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), disconnected)
        .await
        .expect("the deleted worker's connection to the first controller ends");
    second.shutdown().await;
    c.stop().await;
    db.drop_db().await;
}

/// The worker receives a session's grant at authorization and starts it without asking the
/// controller; what ends or forbids the session before its client arrives still keeps it
/// from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_before_its_client_arrives_never_starts() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let erin = user_with_role(&c, "erin").await;

    // Started on the pushed grant (the hello, sent at once, may arrive before the push: the
    // worker waits for it): active, and audited as such.
    let (auth, key) = authorize(&erin, "echo").await.expect("authorized");
    assert!(
        auth.grant_pushed,
        "the controller holds the worker's connection"
    );
    let session = open_session(&auth, &key).await.expect("session opens");
    let (local, _) = session.listen(0).await.expect("listen");
    let mut traffic = Traffic::start(local).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(traffic.alive(), "traffic flows");
    let e = audited(&c.admin, "session.activate", |e| {
        e.resource == format!("session:{}", auth.session_id)
    })
    .await;
    assert_eq!(
        (e.outcome.as_str(), e.details["pushed_grant"].as_bool()),
        ("success", Some(true)),
        "{e:?}"
    );
    assert_eq!(
        session_row(&c.admin, &auth.session_id).await.status,
        "active"
    );
    session.close().await;

    // Cancelled between authorization and the client's hello.
    let (auth, key) = authorize(&erin, "echo").await.expect("authorized");
    c.admin.cancel_session(&auth.session_id).await;
    let err = open_session(&auth, &key)
        .await
        .expect_err("a cancelled session must not start");
    assert!(
        matches!(err, postern_cli::session::SessionError::Refused { .. })
            && err.to_string().contains("cancelled"),
        "{err}"
    );

    // The user's role unbound in that window.
    let (auth, key) = authorize(&erin, "echo").await.expect("authorized");
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/erin-role/unbind",
            Some(&json!({"user": "erin"})),
        )
        .await;
    let err = open_session(&auth, &key)
        .await
        .expect_err("a session its policy no longer allows must not start");
    assert!(
        matches!(err, postern_cli::session::SessionError::Refused { .. }),
        "{err}"
    );
    let row = session_row(&c.admin, &auth.session_id).await;
    assert_eq!(row.status, "terminated", "{row:?}");
    c.stop().await;
}

/// Deleting a worker ends its sessions and cuts their open connections at once, instead of
/// leaving them to run until the worker's grace period and listed active until expiry. A
/// worker created again under the name registers anew with its new activation token, on the
/// data directory the deleted one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_worker_ends_its_sessions() {
    let mut c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let (session, traffic, id) = live_session(&c.admin, "echo").await;
    assert_cut(&c, session, traffic, &id, "worker deleted", async {
        let _: serde_json::Value = c
            .admin
            .ok(Method::DELETE, "/v1/workers/w1", None::<&()>)
            .await;
    })
    .await;
    let gone = || async {
        for _ in 0..200 {
            let workers: Vec<postern_controller::api::types::Worker> =
                c.admin.ok(Method::GET, "/v1/workers", None::<&()>).await;
            if !workers.iter().any(|w| w.connected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the worker is still listed connected after 10 s");
    };
    if let Some(w) = c.worker.take() {
        w.shutdown().await;
    }
    let created: postern_controller::api::types::CreatedWorker = c
        .admin
        .ok(
            Method::POST,
            "/v1/workers",
            Some(&json!({"name": "w1", "tags": {}})),
        )
        .await;
    let dir = c.dir.path().join("worker");
    let start = |token: &str| {
        postern_worker::start(crate::harness::worker_config(
            &c.admin.base,
            &dir,
            Some(token.to_owned()),
        ))
    };
    let worker = start(&created.activation_token)
        .await
        .expect("the worker starts with its new token");
    c.wait_worker_connected()
        .await
        .expect("re-registered with the new token");
    worker.shutdown().await;
    gone().await;
    // Restarted with the same (now used) token, or with one that is no good, it goes on with
    // the identity it has.
    for token in [created.activation_token.as_str(), "pwa_not_a_token"] {
        let worker = start(token).await.expect("the worker starts");
        c.wait_worker_connected().await.expect("connected again");
        worker.shutdown().await;
        gone().await;
    }
    c.stop().await;
}

/// A worker restarted while its old connection still lingers (killed, then started again
/// at once: here, a second process of the same worker, then the first one gone) stays
/// connected: the old connection's end, after the new one registered, used to mark the
/// worker disconnected for good, and every authorization then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_connection_does_not_disconnect_the_worker() {
    let mut c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let connects = || async {
        let events: Vec<AuditEvent> = c
            .admin
            .ok(
                Method::GET,
                "/v1/audit?action=worker.connect&limit=100",
                None::<&()>,
            )
            .await;
        events.len()
    };
    let before = connects().await;
    // One data directory takes one worker: a second start on it is refused, saying why.
    let refused = postern_worker::start(crate::harness::worker_config(
        &c.admin.base,
        &c.dir.path().join("worker"),
        None,
    ))
    .await
    .expect_err("a second worker on the same data directory");
    assert!(
        refused
            .to_string()
            .contains("another worker is running with the data directory"),
        "{refused}"
    );
    // The same identity in a data directory of its own.
    let copy = c.dir.path().join("worker-copy");
    std::fs::create_dir_all(&copy).expect("copy dir");
    for entry in std::fs::read_dir(c.dir.path().join("worker")).expect("worker dir") {
        let path = entry.expect("entry").path();
        if path.is_file() && path.file_name() != Some("worker.lock".as_ref()) {
            std::fs::copy(&path, copy.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let second = postern_worker::start(crate::harness::worker_config(&c.admin.base, &copy, None))
        .await
        .expect("a second worker process with the same identity");
    // Once the second has replaced the first's connection, the first goes away before it
    // reconnects (its first retry waits 200 ms).
    for _ in 0..250 {
        if connects().await > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(first) = c.worker.take() {
        first.shutdown().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.wait_worker_connected().await.expect("still connected");
    let (session, traffic, _) = live_session(&c.admin, "echo").await;
    drop(traffic);
    session.close().await;
    second.shutdown().await;
    c.stop().await;
}

/// A worker speaks only for its own sessions: another registered worker that reports the end
/// or the start of a session it does not carry ends nothing (both used to end it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_end_another_workers_session() {
    use postern_proto::cluster::WorkerMessage;
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let (session, _traffic, id) = live_session(&c.admin, "echo").await;

    // A second worker, registered, whose identity the test then speaks with itself.
    let mut w2 = FakeWorker::start(&c, "w2", json!({})).await;
    w2.send(&WorkerMessage::SessionClosed {
        session_id: postern_proto::ids::SessionId(id.clone()),
        reason: "forged".into(),
    })
    .await;
    // Nor does a start it reports for it (its refusal, "belongs to worker w1", ended it).
    w2.send(&WorkerMessage::SessionStarted {
        session_id: postern_proto::ids::SessionId(id.clone()),
    })
    .await;
    let before = session_row(&c.admin, &id).await;
    // Its reports about that session are its own word: an audit event naming it is recorded
    // as w2's, not as the session's user's, and a closed connection is not counted on it.
    for forged in [
        WorkerMessage::Audit {
            session_id: postern_proto::ids::SessionId(id.clone()),
            action: "postgres.query".into(),
            details: json!({"statement": "forged"}),
        },
        WorkerMessage::ConnectionClosed {
            session_id: postern_proto::ids::SessionId(id.clone()),
            bytes_up: 1_000_000,
            bytes_down: 1_000_000,
            reason: "forged".into(),
        },
    ] {
        w2.send(&forged).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events: Vec<AuditEvent> = c
            .admin
            .ok(Method::GET, &format!("/v1/audit?session={id}"), None::<&()>)
            .await;
        let seen = |action: &str| {
            events
                .iter()
                .any(|e| e.action == action && e.actor == "worker:w2")
        };
        if (seen("postgres.query") && seen("connection.close"))
            || std::time::Instant::now() > deadline
        {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let query = events
        .iter()
        .find(|e| e.action == "postgres.query")
        .unwrap_or_else(|| panic!("the forged event is recorded: {events:#?}"));
    assert_eq!(query.actor, "worker:w2", "{query:?}");

    let row = session_row(&c.admin, &id).await;
    assert_eq!(row.status, "active", "{row:?}");
    assert_eq!(
        (row.connections, row.bytes_up, row.bytes_down),
        (before.connections, before.bytes_up, before.bytes_down),
        "w2's closed connection is not counted on w1's session"
    );
    w2.close();
    drop(session);
    c.stop().await;
}

/// The revocation's acknowledgement is the asked worker's: another worker acknowledging a
/// cancellation it was not sent is its own word in the audit log and does not stop the
/// revocation-latency clock; the asked worker's acknowledgement then does, in the name of
/// whoever revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_asked_worker_acknowledges_a_revocation() {
    use postern_proto::cluster::WorkerMessage;
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    // A target only w2 may serve; w2 and w3 are the test's own, so nothing answers a
    // cancellation until the test does.
    c.create_target_from(
        json!({"name": "echo", "type": "tcp", "address": echo.to_string(),
                         "worker_filter": {"fake": "w2"}}),
    )
    .await;
    let mut w2 = FakeWorker::start(&c, "w2", json!({"fake": "w2"})).await;
    let mut w3 = FakeWorker::start(&c, "w3", json!({})).await;
    let (auth, _key) = authorize(&c.admin, "echo").await.expect("authorized on w2");
    let id = auth.session_id;
    let acked = |c: &Samples| value(c, "postern_revocation_duration_seconds_count");
    let before = acked(&scrape(&c.admin.base).await);
    c.admin.cancel_session(&id).await;

    let ack = |cut| WorkerMessage::CancelAck {
        session_id: postern_proto::ids::SessionId(id.clone()),
        connections_cut: cut,
    };
    w3.send(&ack(7)).await;
    let foreign = audited(&c.admin, "session.connections_cut", |e| {
        e.resource == format!("session:{id}") && e.details["worker"] == "w3"
    })
    .await;
    assert_eq!(foreign.actor, "worker:w3", "{foreign:?}");
    let after_foreign = acked(&scrape(&c.admin.base).await);
    assert_eq!(after_foreign, before, "w3's acknowledgement is not timed");

    w2.send(&ack(0)).await;
    let answer = audited(&c.admin, "session.connections_cut", |e| {
        e.resource == format!("session:{id}") && e.details["worker"] == "w2"
    })
    .await;
    assert_eq!(answer.actor, "admin", "{answer:?}");
    let timed = acked(
        &scrape_until(&c.admin.base, "w2's acknowledgement timed", |m| {
            acked(m) > before
        })
        .await,
    );
    assert_eq!(timed, before + 1.0, "w2's acknowledgement is timed");
    w2.close();
    w3.close();
    c.stop().await;
}

/// A registered worker whose identity the test speaks with itself on the controller's
/// cluster port: its hello, then whatever the test sends.
struct FakeWorker {
    conn: quinn::Connection,
    send: quinn::SendStream,
    /// Kept open: the controller's messages to the worker are not read.
    _recv: quinn::RecvStream,
}

impl FakeWorker {
    /// Registers a worker `name` with `tags` (a real worker registers it and is shut down,
    /// leaving its identity behind) and says hello as it.
    async fn start(c: &Cluster, name: &str, tags: serde_json::Value) -> FakeWorker {
        use postern_proto::cluster::{ControllerHello, WorkerHello, WorkerMode};
        use rustls_pki_types::pem::PemObject as _;
        let created: serde_json::Value = c
            .admin
            .ok(
                Method::POST,
                "/v1/workers",
                Some(&json!({"name": name, "tags": tags})),
            )
            .await;
        let token = created["activation_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let dir = c.dir.path().join(name);
        let real = postern_worker::start(crate::harness::worker_config(
            &c.admin.base,
            &dir,
            Some(token),
        ))
        .await
        .expect("the worker registers");
        real.shutdown().await;
        let pem = |f: &str| std::fs::read(dir.join(f)).expect("identity file");
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem("cert.pem"))
            .collect::<Result<_, _>>()
            .expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem("key.pem")).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pki_types::CertificateDer::pem_slice_iter(&pem("ca.pem")) {
            roots.add(ca.expect("ca")).expect("root");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .expect("client cert");
        tls.alpn_protocols = vec![postern_proto::ALPN_CLUSTER.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        let cluster_addr = c.controller.as_ref().expect("controller").cluster_addr();
        let conn = endpoint
            .connect(cluster_addr, postern_proto::CONTROLLER_SERVER_NAME)
            .expect("connect")
            .await
            .expect("the worker's certificate is accepted");
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        let hello = WorkerHello {
            version: postern_proto::PROTOCOL_VERSION,
            session_addr: "127.0.0.1:9".into(),
            active_sessions: Vec::new(),
            ssh_host_key: None,
            mode: WorkerMode::Direct,
            uptime_ms: None,
        };
        let hello = postern_proto::frame::encode(&hello).expect("frame");
        send.write_all(&hello).await.expect("hello");
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.expect("answer");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut body).await.expect("answer");
        let _: ControllerHello = serde_json::from_slice(&body).expect("controller hello");
        FakeWorker {
            conn,
            send,
            _recv: recv,
        }
    }

    async fn send(&mut self, msg: &postern_proto::cluster::WorkerMessage) {
        let frame = postern_proto::frame::encode(msg).expect("frame");
        self.send.write_all(&frame).await.expect("send");
    }

    fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// A controller that comes back with its cluster listener somewhere else is found again: a
/// worker that has tried every address it knows asks the API (its `controller_url`) where
/// the cluster listeners are now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_finds_a_cluster_listener_that_moved() {
    let (api, cluster) = free_addrs();
    let mut c = Cluster::start_with(ClusterOptions {
        addrs: Some((api, cluster)),
        ..Default::default()
    })
    .await
    .expect("cluster");
    c.controller.take().expect("controller").shutdown().await;
    let (_, moved) = free_addrs();
    c.controller = Some(
        postern_controller::start(controller_config(
            c.dir.path(),
            &ClusterOptions {
                addrs: Some((api, moved)),
                ..Default::default()
            },
        ))
        .await
        .expect("controller back with another cluster port"),
    );
    let found = async {
        loop {
            let workers: Vec<postern_controller::api::types::Worker> =
                c.admin.ok(Method::GET, "/v1/workers", None::<&()>).await;
            if workers.iter().any(|w| w.connected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(40), found)
        .await
        .expect("the worker found the moved cluster listener");
    let saved = std::fs::read_to_string(c.dir.path().join("worker").join("worker.json"))
        .expect("worker.json");
    assert!(saved.contains(&moved.to_string()), "{saved}");
    c.stop().await;
}

/// With several controllers, one that cannot reach its database lets go of its workers,
/// which connect to another: sessions are authorized and carried through that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_its_database_hands_its_workers_over() {
    let (a, b) = (free_addrs(), free_addrs());
    let announced = vec![a.1.to_string(), b.1.to_string()];
    let (db, c, second, admin2) = two_controllers(
        ClusterOptions {
            addrs: Some(a),
            cluster_public_addrs: announced.clone(),
            ..Default::default()
        },
        ClusterOptions {
            addrs: Some(b),
            cluster_public_addrs: announced,
            ..Default::default()
        },
    )
    .await;

    // The first controller's database goes away (for it alone).
    db.admit_role(false).await;
    let handed_over = async {
        loop {
            let events: Vec<AuditEvent> = admin2
                .ok(
                    Method::GET,
                    "/v1/audit?action=worker.connect&limit=100",
                    None::<&()>,
                )
                .await;
            // Only the second controller can store events now.
            if events.iter().any(|e| e.resource == "worker:w1") && events.len() >= 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(40), handed_over)
        .await
        .expect("the worker connected to the second controller");
    let (session, mut traffic, _) = live_session(&admin2, "echo").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(traffic.alive(), "a session through the second controller");
    drop(session);
    db.admit_role(true).await;
    second.shutdown().await;
    c.stop().await;
    db.drop_db().await;
}
