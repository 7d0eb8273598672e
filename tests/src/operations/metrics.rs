//! `/metrics` on the controller and on the worker parse as Prometheus text, and their counters
//! move with what happens: a granted and a denied authorization, bytes through a session, a
//! revocation and its acknowledgement, the worker's heartbeat.

use std::time::Duration;

use reqwest::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use postern_cli::session::{new_client_key, open_session};
use postern_controller::api::types::{Authorization, AuthorizeRequest};

use super::prom::{parse, value, Samples};
use super::worker_config;
use crate::harness::{controller_config, echo_server, Api, ClusterOptions, TempDir};

pub(crate) async fn scrape(url: &str) -> Samples {
    let resp = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("GET /metrics");
    assert!(
        resp.status().is_success(),
        "{url}/metrics: {}",
        resp.status()
    );
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = resp.text().await.expect("body");
    match parse(&text) {
        Ok(s) => s,
        Err(e) => panic!("{url}/metrics is not Prometheus text: {e}\n{text}"),
    }
}

/// Scrapes until `check` holds (≤ 10 s): reports reach the controller asynchronously.
pub(crate) async fn scrape_until(
    url: &str,
    what: &str,
    check: impl Fn(&Samples) -> bool,
) -> Samples {
    let mut last = Samples::new();
    for _ in 0..100 {
        last = scrape(url).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut keys: Vec<_> = last.iter().map(|(k, v)| format!("{k} {v}")).collect();
    keys.sort();
    panic!("{url}/metrics never showed {what}:\n{}", keys.join("\n"));
}

async fn authorize(
    api: &Api,
    target: &str,
) -> Result<(Authorization, postern_cli::session::ClientKey), u16> {
    let key = new_client_key().expect("key");
    api.call(
        Method::POST,
        &format!("/v1/targets/{target}/authorize"),
        Some(&AuthorizeRequest {
            client_spki: key.spki_b64().into(),
            duration_secs: None,
            login: None,
            target_type: None,
        }),
    )
    .await
    .map(|a| (a, key))
    .map_err(|f| f.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_sessions_and_parse_as_prometheus_text() {
    let dir = TempDir::new("postern-metrics");
    let controller =
        postern_controller::start(controller_config(dir.path(), &ClusterOptions::default()))
            .await
            .expect("controller");
    let base = controller.api_url();
    let boot = controller.bootstrap().expect("bootstrap").clone();
    let admin = Api::new(&base)
        .login(&boot.user, &boot.password)
        .await
        .expect("login");
    let created: postern_controller::api::types::CreatedWorker = admin
        .ok(
            Method::POST,
            "/v1/workers",
            Some(&serde_json::json!({"name": "w1", "tags": {}})),
        )
        .await;
    let worker = postern_worker::start(worker_config(serde_json::json!({
        "controller_url": base,
        "activation_token": created.activation_token,
        "data_dir": dir.path().join("worker"),
        "session_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
    })))
    .await
    .expect("worker");
    let worker_url = format!(
        "http://{}",
        worker.metrics_addr().expect("metrics listener bound")
    );
    super::wait_worker(&admin).await;

    let c0 = scrape(&base).await;
    let w0 = scrape(&worker_url).await;
    let health = reqwest::get(format!("{worker_url}/healthz"))
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    let ready = reqwest::get(format!("{worker_url}/readyz"))
        .await
        .expect("readyz");
    assert!(ready.status().is_success(), "worker connected, not ready");

    // A denied authorization: a user without any role.
    let echo = echo_server().await;
    let _: serde_json::Value = admin
        .ok(
            Method::POST,
            "/v1/targets",
            Some(&serde_json::json!({"name": "echo", "type": "tcp", "address": echo.to_string()})),
        )
        .await;
    let _: serde_json::Value = admin
        .ok(
            Method::POST,
            "/v1/users",
            Some(&serde_json::json!({"name": "mallory", "password": "pw-mallory-long-enough"})),
        )
        .await;
    let mallory = admin
        .login("mallory", "pw-mallory-long-enough")
        .await
        .expect("login");
    assert_eq!(authorize(&mallory, "echo").await.err(), Some(403));

    // A granted one, and bytes through its session.
    let (auth, key) = authorize(&admin, "echo").await.expect("authorized");
    let session = open_session(&auth, &key).await.expect("session");
    let (local, _serve) = session.listen(0).await.expect("listen");
    let payload = vec![7u8; 100_000];
    {
        let mut sock = tokio::net::TcpStream::connect(local)
            .await
            .expect("connect");
        sock.write_all(&payload).await.expect("write");
        sock.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        sock.read_to_end(&mut back).await.expect("read");
        assert_eq!(back.len(), payload.len());
    }
    // While the session is open, the worker counts it.
    scrape_until(&worker_url, "an active session", |w| {
        value(w, "postern_sessions_active") == 1.0
    })
    .await;
    let w1 = scrape_until(&worker_url, "the relayed bytes", |w| {
        value(w, "postern_relayed_bytes_total{direction=\"up\"}")
            >= value(&w0, "postern_relayed_bytes_total{direction=\"up\"}") + 100_000.0
    })
    .await;
    assert!(
        value(&w1, "postern_relayed_bytes_total{direction=\"down\"}") >= 100_000.0,
        "echoed bytes"
    );
    assert_eq!(value(&w1, "postern_controller_connected"), 1.0);
    assert!(w1.contains_key("postern_audit_spool_depth"));
    assert!(w1.contains_key("postern_connections_active"));

    // Revoke it: the controller counts the revocation and, once acknowledged, its latency.
    admin.cancel_session(&auth.session_id).await;
    let end = tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("session cut");
    assert!(end.reason.contains("cancel"), "{}", end.reason);

    let c1 = scrape_until(&base, "the revocation acknowledged", |c| {
        value(c, "postern_revocation_duration_seconds_count")
            > value(&c0, "postern_revocation_duration_seconds_count")
    })
    .await;
    let grew = |series: &str, by: f64| {
        assert!(
            value(&c1, series) >= value(&c0, series) + by,
            "{series}: {} → {}",
            value(&c0, series),
            value(&c1, series)
        );
    };
    grew("postern_authorizations_total{outcome=\"granted\"}", 1.0);
    grew("postern_authorizations_total{outcome=\"denied\"}", 1.0);
    grew("postern_authorize_duration_seconds_count", 2.0);
    grew("postern_revocations_total{delivery=\"pushed\"}", 1.0);
    grew("postern_relayed_bytes_total{direction=\"up\"}", 100_000.0);
    grew("postern_connections_closed_total", 1.0);
    assert_eq!(value(&c1, "postern_workers_connected"), 1.0);
    let age = c1
        .get("postern_worker_last_contact_age_seconds{worker=\"w1\"}")
        .copied()
        .expect("last-contact age of w1");
    assert!((0.0..30.0).contains(&age), "last contact {age} s ago");
    // A histogram's buckets are cumulative and end at +Inf = count.
    assert_eq!(
        value(
            &c1,
            "postern_authorize_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        value(&c1, "postern_authorize_duration_seconds_count")
    );
    let w2 = scrape_until(&worker_url, "the session gone", |w| {
        value(w, "postern_sessions_active") == 0.0
    })
    .await;
    assert!(value(&w2, "postern_revocations_total") >= 1.0);
    // The cancelled session counts as ended, and its closed connection as an audit event.
    assert_eq!(value(&w2, "postern_sessions_closed_total"), 1.0);
    assert!(value(&w2, "postern_audit_events_total") >= 1.0);

    worker.shutdown().await;
    controller.shutdown().await;
}
