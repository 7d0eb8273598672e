//! Issue 7: workers in private networks. An outbound-only worker is reached through its
//! controller's relay with the same client code, the token still bound to the client's key;
//! worker selection prefers direct workers and moves on from one that stopped; with two
//! controllers, clients are sent to the one holding the worker, and follow it when the worker
//! moves to the other. The real proof — network namespaces where nothing can connect into
//! the worker's network — is in [`namespaces`].

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_cli::session::{new_client_key, open_session, ClientKey, SessionError};
use postern_controller::api::types::{Authorization, CreatedWorker, Worker};
use postern_proto::cluster::WorkerMode;
use postern_proto::session::RefusalCode;
use postern_worker::{WorkerConfig, WorkerHandle};

use crate::harness::{
    controller_config, echo_server, free_addrs, Api, ApiFailure, Cluster, ClusterOptions, PgDb,
    TempDir, Traffic,
};

mod lab;
mod namespaces;

/// Generous sanity bound for a cancel to cut an open connection.
const CUT_BOUND: Duration = Duration::from_secs(1);

async fn authorize(api: &Api, target: &str) -> Result<(Authorization, ClientKey), ApiFailure> {
    api.authorize(target, None).await
}

/// Registers and starts a worker `name` with `tags` in `mode` against the controller at
/// `api`, and waits until a controller lists it connected.
async fn start_worker(
    admin: &Api,
    dir: &TempDir,
    name: &str,
    tags: &[(&str, &str)],
    mode: WorkerMode,
) -> WorkerHandle {
    let tags: serde_json::Map<String, serde_json::Value> = tags
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let created: CreatedWorker = admin
        .ok(
            Method::POST,
            "/v1/workers",
            Some(&json!({"name": name, "tags": tags})),
        )
        .await;
    let worker = postern_worker::start(WorkerConfig {
        mode,
        ..crate::harness::worker_config(
            &admin.base,
            &dir.path().join(name),
            Some(created.activation_token),
        )
    })
    .await
    .expect("worker starts");
    wait_worker(admin, name, true).await;
    worker
}

/// Waits (≤ 10 s) until `name` is listed as connected (or not).
async fn wait_worker(admin: &Api, name: &str, connected: bool) -> Worker {
    for _ in 0..200 {
        let workers: Vec<Worker> = admin.ok(Method::GET, "/v1/workers", None::<&()>).await;
        if let Some(w) = workers
            .into_iter()
            .find(|w| w.name == name && w.connected == connected)
        {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker {name} not connected={connected} within 10 s");
}

/// Sends 256 KiB through a new connection of the session and checks the echo.
async fn echo_bulk(local: std::net::SocketAddr) {
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut sock = tokio::net::TcpStream::connect(local)
        .await
        .expect("local port");
    let (mut r, mut w) = sock.split();
    let send = async {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut back = Vec::new();
    let recv = async {
        r.read_to_end(&mut back).await.expect("read");
    };
    tokio::join!(send, recv);
    assert!(
        back == data,
        "the echo came back altered ({} bytes)",
        back.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_only_worker_is_reached_through_the_controller_relay() {
    let c = Cluster::start_with(ClusterOptions {
        worker_mode: WorkerMode::OutboundOnly,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let relay = c
        .controller
        .as_ref()
        .and_then(|c| c.relay_addr())
        .expect("the controller runs a relay");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;

    let w = wait_worker(&c.admin, "w1", true).await;
    assert_eq!(w.mode, "outbound-only");
    assert_eq!(w.session_addr.as_deref(), Some(relay.to_string().as_str()));

    // The client is sent to the relay, with the worker's own TLS name, and cannot tell.
    let (auth, key) = authorize(&c.admin, "echo").await.expect("authorized");
    assert_eq!(auth.worker.addr, relay.to_string());
    assert_eq!(auth.worker.server_name, "w1.worker.postern.internal");
    let session = open_session(&auth, &key)
        .await
        .expect("session opens through the relay");
    let (local, _) = session.listen(0).await.expect("listen");
    let mut bulk = tokio::task::JoinSet::new();
    for _ in 0..4 {
        bulk.spawn(echo_bulk(local));
    }
    while let Some(done) = bulk.join_next().await {
        done.expect("parallel connections through the relay");
    }

    // The token is still bound to the client's key: the worker checks it end to end.
    let thief = new_client_key().expect("key");
    match open_session(&auth, &thief).await {
        Err(SessionError::Refused { code, message }) => {
            assert_eq!(code, RefusalCode::KeyMismatch, "{message}")
        }
        Err(e) => panic!("expected a key-mismatch refusal, got {e}"),
        Ok(_) => panic!("a stolen token opened a relayed session"),
    }

    // The worker's heartbeat reports what it carries.
    let mut reported = None;
    for _ in 0..80 {
        let w = wait_worker(&c.admin, "w1", true).await;
        if w.active_sessions == Some(1) {
            reported = w.active_sessions;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reported, Some(1), "heartbeat load shown in workers list");

    // A cancel cuts the relayed connection.
    let traffic = Traffic::start(local).await;
    let t0 = Instant::now();
    c.admin.cancel_session(&auth.session_id).await;
    let cut = traffic
        .wait_cut(CUT_BOUND * 5)
        .await
        .expect("the relayed connection was cut");
    assert!(
        cut.duration_since(t0) < CUT_BOUND,
        "cut after {:?}",
        cut.duration_since(t0)
    );
    let end = session.closed().await;
    assert!(end.reason.contains("cancelled by admin"), "{}", end.reason);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_workers_are_preferred_and_a_stopped_worker_is_passed_over() {
    let mut c = Cluster::start()
        .await
        .expect("cluster with direct worker w1 (no tags)");
    let echo = echo_server().await;
    c.create_target_from(
        json!({"name": "echo", "type": "tcp", "address": echo.to_string(),
                         "worker_filter": {"net": "private"}}),
    )
    .await;
    // w1 has no tags: no worker matches the filter yet.
    let none = authorize(&c.admin, "echo").await.expect_err("no match");
    assert_eq!(none.status, 503);
    assert!(
        none.message
            .contains("no worker available for target 'echo'")
            && none.message.contains("net=private"),
        "{}",
        none.message
    );

    let relayed = start_worker(
        &c.admin,
        &c.dir,
        "relayed",
        &[("net", "private")],
        WorkerMode::OutboundOnly,
    )
    .await;
    let direct = start_worker(
        &c.admin,
        &c.dir,
        "direct",
        &[("net", "private")],
        WorkerMode::Direct,
    )
    .await;
    for _ in 0..6 {
        let (auth, _) = authorize(&c.admin, "echo").await.expect("authorized");
        assert_eq!(auth.worker.name, "direct", "direct workers come first");
    }
    direct.shutdown().await;
    wait_worker(&c.admin, "direct", false).await;
    let (auth, key) = authorize(&c.admin, "echo").await.expect("fails over");
    assert_eq!(auth.worker.name, "relayed");
    let session = open_session(&auth, &key).await.expect("relayed session");
    let (local, _) = session.listen(0).await.expect("listen");
    echo_bulk(local).await;
    session.close().await;

    relayed.shutdown().await;
    wait_worker(&c.admin, "relayed", false).await;
    let none = authorize(&c.admin, "echo").await.expect_err("all stopped");
    assert_eq!(none.status, 503);
    assert!(
        none.message.contains("no worker available")
            && none.message.contains("direct, relayed")
            && none.message.contains("is connected"),
        "{}",
        none.message
    );
    if let Some(w) = c.worker.take() {
        w.shutdown().await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_sent_to_the_controller_holding_the_worker() {
    let db = PgDb::create().await;
    let dir = TempDir::new("postern-relay-ha");
    let opts = ClusterOptions {
        database_url: Some(db.url.clone()),
        ..Default::default()
    };
    // B holds the worker; A is where the client authorizes. Both share the store and KEK.
    postern_controller::write_private(
        &dir.path().join("kek"),
        &postern_controller::keys::Kek::generate_base64(),
    )
    .expect("kek");
    let mut b_config = controller_config(dir.path(), &opts);
    b_config.bootstrap_admin = false;
    let b = postern_controller::start(b_config)
        .await
        .expect("controller B");
    // Workers are told of both controllers, B first.
    let (a_api, a_cluster) = free_addrs();
    let mut a_config = controller_config(
        dir.path(),
        &ClusterOptions {
            addrs: Some((a_api, a_cluster)),
            ..opts.clone()
        },
    );
    a_config.cluster_public_addrs = vec![b.cluster_addr().to_string(), a_cluster.to_string()];
    let a = postern_controller::start(a_config)
        .await
        .expect("controller A");
    let boot = a.bootstrap().cloned().expect("bootstrap admin");
    let admin = Api::new(&format!("http://{}", a.api_addr()))
        .login(&boot.user, &boot.password)
        .await
        .expect("login");
    let worker = start_worker(&admin, &dir, "hidden", &[], WorkerMode::OutboundOnly).await;
    let echo = echo_server().await;
    let _: serde_json::Value = admin
        .ok(
            Method::POST,
            "/v1/targets",
            Some(&json!({"name": "echo", "type": "tcp", "address": echo.to_string()})),
        )
        .await;

    let b_relay = b.relay_addr().expect("B's relay").to_string();
    let w = wait_worker(&admin, "hidden", true).await;
    assert_eq!(w.session_addr.as_deref(), Some(b_relay.as_str()));
    let (auth, key) = authorize(&admin, "echo").await.expect("authorized at A");
    assert_eq!(
        auth.worker.addr, b_relay,
        "sent to B, which holds the worker"
    );
    let session = open_session(&auth, &key).await.expect("session through B");
    let (local, _) = session.listen(0).await.expect("listen");
    echo_bulk(local).await;

    // A's relay does not carry a worker it does not hold: the client cannot get through.
    let mut wrong = auth.clone();
    wrong.worker.addr = a.relay_addr().expect("A's relay").to_string();
    let key2 = new_client_key().expect("key");
    match tokio::time::timeout(Duration::from_secs(20), open_session(&wrong, &key2)).await {
        Ok(Err(SessionError::Unreachable { .. })) => {}
        other => panic!(
            "A's relay carried a worker it does not hold: {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }

    session.close().await;

    // B goes away: the worker moves to A, and clients are now sent to A's relay.
    b.shutdown().await;
    let a_relay = a.relay_addr().expect("A's relay").to_string();
    let mut moved = None;
    for _ in 0..100 {
        let w = wait_worker(&admin, "hidden", true).await;
        if w.session_addr.as_deref() == Some(a_relay.as_str()) {
            moved = w.session_addr;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(moved, Some(a_relay.clone()), "the worker reconnected to A");
    let (auth, key) = authorize(&admin, "echo").await.expect("authorized at A");
    assert_eq!(auth.worker.addr, a_relay);
    let session = open_session(&auth, &key).await.expect("session through A");
    let (local, _) = session.listen(0).await.expect("listen");
    echo_bulk(local).await;
    session.close().await;

    worker.shutdown().await;
    a.shutdown().await;
    db.drop_db().await;
}
