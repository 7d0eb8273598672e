//! Must show 5: 50 parallel TCP connections through one session's local listener all carry
//! their bytes intact (SHA-256 compared), and the worker reports them to the controller.
//! Both ends of the session asked each other for fewer acknowledgements.

use std::time::Duration;

use reqwest::Method;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use postern_cli::session::{new_client_key, open_session};
use postern_controller::api::types::{Authorization, AuthorizeRequest, Session};

use crate::harness::{echo_server, Cluster};

const CONNECTIONS: usize = 50;
const BYTES_EACH: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_connections_keep_their_bytes() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let key = new_client_key().expect("key");
    let auth: Authorization = c
        .admin
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
    let session = open_session(&auth, &key).await.expect("session opens");
    let (local, _serve) = session.listen(0).await.expect("listen");

    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            tokio::spawn(async move {
                let mut data = vec![0u8; BYTES_EACH];
                getrandom::fill(&mut data).expect("random");
                data[0] = i as u8;
                let sent = Sha256::digest(&data);
                let mut sock = tokio::net::TcpStream::connect(local)
                    .await
                    .expect("connect local port");
                let (mut r, mut w) = sock.split();
                let write = async {
                    w.write_all(&data).await.expect("write");
                    w.shutdown().await.expect("half-close");
                };
                let read = async {
                    let mut back = Vec::with_capacity(BYTES_EACH);
                    r.read_to_end(&mut back).await.expect("read");
                    back
                };
                let ((), back) = tokio::join!(write, read);
                assert_eq!(back.len(), BYTES_EACH, "connection {i} lost bytes");
                assert_eq!(
                    Sha256::digest(&back),
                    sent,
                    "connection {i} corrupted bytes"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("connection task");
    }

    // The worker reports each closed connection asynchronously.
    let mut seen = None;
    for _ in 0..100 {
        let s: Session = c.admin.session(&auth.session_id).await;
        if s.connections == CONNECTIONS as i64 {
            seen = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = seen.expect("all 50 connections reported to the controller");
    assert_eq!(s.status, "active");
    assert_eq!(s.bytes_up, (CONNECTIONS * BYTES_EACH) as i64);
    assert_eq!(s.bytes_down, (CONNECTIONS * BYTES_EACH) as i64);
    // Each end asked the other to acknowledge less often (QUIC ACK frequency), and the other
    // took the request: quinn answers a frame it does not accept by closing the connection.
    let stats = session.connection().stats();
    assert!(
        stats.frame_tx.ack_frequency >= 1,
        "the client asked: {stats:?}"
    );
    assert!(
        stats.frame_rx.ack_frequency >= 1,
        "the worker asked: {stats:?}"
    );
    assert!(session.connection().close_reason().is_none());
    session.close().await;
    c.stop().await;
}
