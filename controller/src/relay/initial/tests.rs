//! Real client Initial datagrams, from a quinn client dialling a socket that never answers.

use std::sync::Arc;
use std::time::Duration;

use super::*;

/// The first `n` datagrams a quinn client sends when dialling `server_name` with `alpn`.
async fn client_initials(server_name: &str, alpn: Vec<Vec<u8>>, n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = alpn;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic config");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            sink.local_addr().expect("addr"),
            server_name,
        )
        .expect("connect");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_535];
    while out.len() < n {
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
            .await
            .expect("a datagram from the client")
            .expect("recv");
        out.push(buf[..len].to_vec());
    }
    drop(connecting);
    endpoint.close(0u32.into(), b"");
    out
}

#[tokio::test]
async fn reads_the_server_name_of_a_real_client_initial() {
    let d = client_initials(
        "w1.worker.postern.internal",
        vec![b"postern-session/1".to_vec()],
        1,
    )
    .await;
    let mut reader = HelloReader::default();
    assert_eq!(
        reader.push(&d[0]),
        Ok(Some("w1.worker.postern.internal".to_owned()))
    );
}

#[tokio::test]
async fn gathers_a_hello_that_spans_two_datagrams() {
    // Enough ALPN names to push the ClientHello past one 1200-byte datagram, as a
    // post-quantum key share does.
    let alpn = (0..40)
        .map(|i| format!("postern-padding-protocol/{i:02}").into_bytes())
        .collect();
    let d = client_initials("big.worker.postern.internal", alpn, 2).await;
    let mut reader = HelloReader::default();
    assert_eq!(reader.push(&d[0]), Ok(None), "the first half is not enough");
    assert_eq!(
        reader.push(&d[1]),
        Ok(Some("big.worker.postern.internal".to_owned()))
    );
}

#[tokio::test]
async fn refuses_what_is_not_a_readable_initial() {
    let d = client_initials("w1.worker.postern.internal", vec![b"x".to_vec()], 1).await;
    let mut tampered = d[0].clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        HelloReader::default().push(&tampered),
        Err(InitialError::Decrypt)
    );
    assert_eq!(
        HelloReader::default().push(&d[0][..600]),
        Err(InitialError::Short(600))
    );
    // A short-header packet: a connection the relay does not know.
    let mut short = vec![0x40u8; 1200];
    short[1] = 7;
    assert_eq!(
        HelloReader::default().push(&short),
        Err(InitialError::NotInitial)
    );
    let mut other_version = d[0].clone();
    other_version[1..5].copy_from_slice(&0x6b33_43cfu32.to_be_bytes());
    assert_eq!(
        HelloReader::default().push(&other_version),
        Err(InitialError::Version(0x6b33_43cf))
    );
    // Garbage of the right size never panics, before or after decryption.
    for seed in 0u8..=255 {
        let junk: Vec<u8> = (0..1300u32)
            .map(|i| (i as u8).wrapping_mul(seed) ^ 0xc0)
            .collect();
        let _ = HelloReader::default().push(&junk);
        let _ = fuzz_decrypted(&junk);
        let _ = fuzz_decrypted(&junk[..usize::from(seed)]);
    }
    // A CRYPTO frame at offset 0 holding a hello cut short asks for more; whole, it names.
    let hello = client_hello(b"w7.worker.postern.internal");
    let frame = |data: &[u8]| {
        let mut f = vec![0x06, 0x00, 0x40 | (data.len() >> 8) as u8, data.len() as u8];
        f.extend_from_slice(data);
        f
    };
    assert_eq!(fuzz_decrypted(&frame(&hello[..40])), Ok(None));
    assert_eq!(
        fuzz_decrypted(&frame(&hello)),
        Ok(Some("w7.worker.postern.internal".to_owned()))
    );
    assert_eq!(
        fuzz_decrypted(&[0x08, 0x00]),
        Err(InitialError::Frame(0x08)),
        "a STREAM frame has no place in an Initial"
    );
}

/// A minimal TLS ClientHello naming `server`.
fn client_hello(server: &[u8]) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((server.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(server.len() as u16).to_be_bytes());
    sni.extend_from_slice(server);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hello = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hello.extend_from_slice(&body);
    hello
}
