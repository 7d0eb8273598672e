//! The session client against a scripted, in-process fake worker (real QUIC, real mutual
//! TLS, a real TCP echo target), so the data path is tested without the worker crate.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::*;
use postern_controller::api::types::{TargetType, WorkerEndpoint};

#[derive(Clone, Copy, PartialEq)]
enum Script {
    Accept,
    RefuseSession,
    RefuseConnections,
}

/// What the fake worker saw: the client key's thumbprint and the token, and how many
/// connections it had accepted by then.
struct Seen {
    accepted: usize,
    thumbprint: String,
    token: String,
    conn: quinn::Connection,
}

/// Like the real worker: any client certificate passes the TLS layer (it must prove its key
/// by signing); the binding to the token is checked by thumbprint afterwards.
#[derive(Debug)]
struct AnyClientKey(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            msg,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn echo_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Starts a fake worker; returns the authorization a controller would hand out for it.
async fn fake_worker(script: Script) -> (Authorization, mpsc::UnboundedReceiver<Seen>) {
    let target = echo_target().await;
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("worker key");
    let server_name = postern_proto::worker_server_name("w1");
    let cert = rcgen::CertificateParams::new(vec![server_name.clone()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("worker cert");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(Arc::new(AnyClientKey(provider)))
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
    tls.alpn_protocols = vec![ALPN_SESSION.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic config");
    let endpoint = Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("endpoint");
    let addr = endpoint.local_addr().expect("worker addr");

    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Some(incoming) = endpoint.accept().await {
            accepted += 1;
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let certs = conn
                    .peer_identity()
                    .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .expect("client certificate");
                let (_, x509) = x509_parser::parse_x509_certificate(&certs[0]).expect("x509");
                let thumbprint = postern_proto::token::spki_thumbprint(x509.public_key().raw);
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return; // a client that dropped its connection before the hello
                };
                let hello: SessionHello = read_frame(&mut recv, &conn).await.expect("hello");
                let _ = seen_tx.send(Seen {
                    accepted,
                    thumbprint,
                    token: hello.token,
                    conn: conn.clone(),
                });
                if script == Script::RefuseSession {
                    let reply = SessionReply::Refused {
                        code: RefusalCode::Expired,
                        message: "the token expired 5m ago".into(),
                    };
                    let _ = write_frame(&mut send, &reply, &conn).await;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                    return;
                }
                let accepted = SessionReply::Accepted {
                    session_id: "s_test".into(),
                    expires_at: 4_000_000_000,
                    connection_limit: None,
                    lane: None,
                };
                write_frame(&mut send, &accepted, &conn)
                    .await
                    .expect("reply");
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        let _: ConnOpen = read_frame(&mut recv, &conn).await.expect("conn open");
                        if script == Script::RefuseConnections {
                            let reply = ConnReply::Refused {
                                code: RefusalCode::ConnectionLimit,
                                message: "connection limit of 1 reached".into(),
                            };
                            let _ = write_frame(&mut send, &reply, &conn).await;
                            let _ = send.finish();
                            let _ = recv.read_to_end(1 << 20).await;
                            return;
                        }
                        write_frame(&mut send, &ConnReply::Ok, &conn)
                            .await
                            .expect("ok");
                        let mut tcp = TcpStream::connect(target).await.expect("target");
                        let mut stream = tokio::io::join(recv, send);
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                    });
                }
            });
        }
    });

    let auth = Authorization {
        session_id: "s_test".into(),
        token: "signed-token".into(),
        worker: WorkerEndpoint {
            name: "w1".into(),
            addr: addr.to_string(),
            server_name,
        },
        ca_pem: ca_cert.pem(),
        expires_at: 4_000_000_000,
        target: "echo".into(),
        protocol: TargetType::Tcp,
        connection_limit: None,
        login: None,
        ssh: None,
        grant_pushed: false,
    };
    (auth, seen_rx)
}

#[tokio::test]
async fn relays_bytes_both_ways_with_half_close() {
    let (auth, mut seen) = fake_worker(Script::Accept).await;
    let key = new_client_key().expect("key");
    let session = open_session(&auth, &key).await.expect("session opens");
    assert_eq!(session.session_id(), "s_test");

    let seen = seen.recv().await.expect("worker saw the hello");
    assert_eq!(
        seen.thumbprint,
        key.thumbprint(),
        "SPKI sent = SPKI presented"
    );
    assert_eq!(seen.token, "signed-token");

    let (addr, _task) = session.listen(0).await.expect("listen");
    assert!(addr.ip().is_loopback());
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&payload).await.expect("write");
        tcp.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.expect("read to end");
        assert!(back == payload, "echoed bytes differ");
    }
    session.close().await;
}

#[tokio::test]
async fn worker_close_reason_reaches_the_client() {
    let (auth, mut seen) = fake_worker(Script::Accept).await;
    let key = new_client_key().expect("key");
    let session = open_session(&auth, &key).await.expect("session opens");
    let worker_side = seen.recv().await.expect("hello").conn;
    worker_side.close(
        VarInt::from_u32(close::CANCELLED),
        b"cancelled by admin alice",
    );
    let end = tokio::time::timeout(Duration::from_secs(5), session.closed())
        .await
        .expect("closed in time");
    assert_eq!(end.code, Some(close::CANCELLED));
    assert_eq!(end.reason, "cancelled by admin alice");
}

#[tokio::test]
async fn session_refusal_is_reported() {
    let (auth, _seen) = fake_worker(Script::RefuseSession).await;
    let key = new_client_key().expect("key");
    let err = open_session(&auth, &key).await.expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("session refused by worker: the token expired"),
        "{err}"
    );
}

#[tokio::test]
async fn connection_refusal_is_reported() {
    let (auth, _seen) = fake_worker(Script::RefuseConnections).await;
    let key = new_client_key().expect("key");
    let session = open_session(&auth, &key).await.expect("session opens");
    let err = session.open_stream().await.expect_err("refused");
    assert!(
        matches!(
            err,
            SessionError::ConnRefused {
                code: RefusalCode::ConnectionLimit,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_worker_with_another_ca_is_not_trusted() {
    let (mut auth, _seen) = fake_worker(Script::Accept).await;
    let (other, _) = fake_worker(Script::Accept).await;
    auth.ca_pem = other.ca_pem;
    let key = new_client_key().expect("key");
    let err = open_session(&auth, &key).await.expect_err("untrusted");
    assert!(matches!(err, SessionError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn an_early_dial_is_used_when_its_hint_names_the_worker() {
    let (auth, mut seen) = fake_worker(Script::Accept).await;
    // The hint names the worker of the authorization: its connection, made before the
    // authorization arrived, carries the session.
    let key = new_client_key().expect("key");
    let prepared = prepare(Some(&WorkerHint::of(&auth)), &key).expect("prepared");
    assert!(
        prepared.early.is_some(),
        "a literal IPv4 hint is dialled early"
    );
    let session = open_session_on(Some(prepared), &auth, &key)
        .await
        .expect("session opens on the early connection");
    assert_eq!(seen.recv().await.expect("hello").accepted, 1);
    session.close().await;

    // A hint naming another address (where nothing answers): that dial is dropped, and the
    // authorization's worker is dialled.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let stale = WorkerHint {
        addr: silent.local_addr().expect("addr").to_string(),
        ..WorkerHint::of(&auth)
    };
    let key = new_client_key().expect("key");
    let session = open_session_on(prepare(Some(&stale), &key), &auth, &key)
        .await
        .expect("session opens despite a stale hint");
    assert_eq!(seen.recv().await.expect("hello").accepted, 2);
    session.close().await;
    assert!(seen.try_recv().is_err(), "one connection per session");
}
