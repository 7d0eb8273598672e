//! Must show 3: the worker refuses a token bound to another client key, an expired token, a
//! token signed by another controller's key, and garbage in the first frame, each with a
//! clear error to the client; it keeps serving valid sessions afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use reqwest::Method;

use postern_cli::session::{client_config, new_client_key, open_session, ClientKey, SessionError};
use postern_controller::api::types::{Authorization, AuthorizeRequest};
use postern_controller::keys::{Kek, RootKeys};
use postern_proto::session::{RefusalCode, SessionReply};
use postern_proto::token::{self, SessionClaims};

use crate::harness::{echo_server, Cluster};

async fn authorize(c: &Cluster, key: &ClientKey) -> Authorization {
    c.admin
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
        .await
}

fn claims_of(token: &str) -> SessionClaims {
    let body = token.split('.').nth(1).expect("claims part");
    serde_json::from_slice(&B64.decode(body).expect("base64")).expect("claims")
}

fn expect_refused(
    r: Result<postern_cli::session::Session, SessionError>,
    code: RefusalCode,
    text: &str,
) {
    match r {
        Err(SessionError::Refused { code: got, message }) => {
            assert_eq!(got, code, "refusal code ({message})");
            assert!(message.contains(text), "unclear refusal message: {message}");
        }
        Err(other) => panic!("expected a {code:?} refusal, got error {other}"),
        Ok(_) => panic!("expected a {code:?} refusal, but the session opened"),
    }
}

/// Sends raw bytes as the first frame of a session connection; returns the worker's reply.
async fn raw_first_frame(auth: &Authorization, key: &ClientKey, bytes: &[u8]) -> SessionReply {
    let addr: SocketAddr = auth.worker.addr.parse().expect("worker addr");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("bind")).expect("endpoint");
    let conn = endpoint
        .connect_with(
            client_config(&auth.ca_pem, key).expect("config"),
            addr,
            &auth.worker.server_name,
        )
        .expect("dial")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(bytes).await.expect("write");
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.expect("reply header");
    let len = postern_proto::frame::body_len(header).expect("sane length");
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.expect("reply body");
    postern_proto::frame::decode(&body).expect("reply decodes")
}

#[tokio::test]
async fn bad_tokens_and_garbage_are_refused_clearly() {
    let c = Cluster::start().await.expect("cluster");
    let echo = echo_server().await;
    c.create_target("echo", &echo.to_string(), &[]).await;
    let key = new_client_key().expect("key");
    let auth = authorize(&c, &key).await;

    // 1. A stolen token: presented with another key than the one it is bound to.
    let thief = new_client_key().expect("key");
    expect_refused(
        open_session(&auth, &thief).await,
        RefusalCode::KeyMismatch,
        "different client key",
    );

    // 2. Signed by another controller's key.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let forged = Authorization {
        token: token::sign(&claims_of(&auth.token), &stranger),
        ..auth.clone()
    };
    expect_refused(
        open_session(&forged, &key).await,
        RefusalCode::BadSignature,
        "not from this controller",
    );

    // 3. Expired, yet signed by the real key (loaded the way a second controller would).
    let kek = std::fs::read_to_string(c.dir.path().join("kek")).expect("kek file");
    let controller = c.controller.as_ref().expect("controller");
    let keys = RootKeys::load_or_create(controller.store(), &Kek::from_base64(&kek).expect("kek"))
        .await
        .expect("root keys");
    let mut old = claims_of(&auth.token);
    old.exp = postern_proto::unix_now() - 3600;
    let expired = Authorization {
        token: token::sign(&old, &keys.session_key),
        ..auth.clone()
    };
    expect_refused(
        open_session(&expired, &key).await,
        RefusalCode::Expired,
        "expired",
    );

    // 4. Garbage in the first frame: not JSON, then an absurd length prefix.
    let mut garbage = 9u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"\xff\x00garbage");
    match raw_first_frame(&auth, &key, &garbage).await {
        SessionReply::Refused { code, message } => {
            assert_eq!(code, RefusalCode::Malformed, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("garbage accepted: {other:?}"),
    }
    match raw_first_frame(&auth, &key, &u32::MAX.to_be_bytes()).await {
        SessionReply::Refused { code, message } => {
            assert_eq!(code, RefusalCode::Malformed, "{message}")
        }
        other => panic!("oversized frame accepted: {other:?}"),
    }

    // The worker is still up and the genuine session works.
    let session = open_session(&auth, &key)
        .await
        .expect("valid session opens after the refusals");
    let (mut send, mut recv) = session.open_stream().await.expect("stream");
    send.write_all(b"still alive").await.expect("write");
    send.finish().expect("finish");
    let back = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, b"still alive");
    session.close().await;
    c.stop().await;
}

/// A connection to a target that does not answer is refused with the reason, and the
/// attempt is audited (as a failure) like the connections that did open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_is_refused_and_audited() {
    let c = Cluster::start().await.expect("cluster");
    // Port 1 on loopback: nothing listens there.
    c.create_target("down", "127.0.0.1:1", &[]).await;
    let (auth, key) = c.admin.authorize("down", None).await.expect("authorized");
    let session = open_session(&auth, &key).await.expect("session opens");
    match session.open_stream().await {
        Err(SessionError::ConnRefused { code, message }) => {
            assert_eq!(code, RefusalCode::TargetUnreachable, "{message}");
            assert!(
                message.contains("cannot reach target 127.0.0.1:1"),
                "{message}"
            );
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a connection to port 1 opened"),
    }
    let path = format!(
        "/v1/audit?session={}&action=connection.target_failed",
        auth.session_id
    );
    for _ in 0..100 {
        let events: Vec<postern_controller::api::types::AuditEvent> =
            c.admin.ok(Method::GET, &path, None::<&()>).await;
        if let Some(e) = events.first() {
            assert_eq!(e.outcome, "failure", "{e:?}");
            session.close().await;
            c.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no connection.target_failed event");
}
