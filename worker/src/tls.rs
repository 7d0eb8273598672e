//! TLS and QUIC configurations: the mutual-TLS client towards the controller, the session
//! server towards clients, and the client-certificate verifier that accepts any key whose
//! possession the handshake proves.

use std::sync::Arc;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::register::Identity;

/// Why a TLS or QUIC configuration could not be built from the worker's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the certificate, key or CA.
    #[error("worker TLS configuration: {0}")]
    Rustls(rustls::Error),
    /// The configuration lacks the cipher suite QUIC needs for its initial packets.
    #[error("worker QUIC configuration: {0}")]
    Quic(NoInitialCipherSuite),
}

// Not `#[from]`: the messages already carry the cause, which must not print twice.
impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        Self::Rustls(e)
    }
}

impl From<NoInitialCipherSuite> for TlsError {
    fn from(e: NoInitialCipherSuite) -> Self {
        Self::Quic(e)
    }
}

/// ring, with TLS 1.3's AES-128-GCM suite first (ring's default order puts AES-256-GCM
/// first). A QUIC session encrypts and decrypts every packet with it: AES-128 takes 10 rounds
/// per block to AES-256's 14, and is what `ssh -c aes128-gcm@openssh.com` uses. The other
/// suites stay, after it, for peers that do not offer it.
pub fn session_crypto() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The client side of the control connection: presents the worker certificate and trusts
/// only the cluster CA.
pub(crate) fn control_client_config(identity: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &identity.ca {
        roots.add(ca.clone())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(session_crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![postern_proto::ALPN_CLUSTER.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(std::time::Duration::from_secs(2)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(10_000))))
        // In outbound-only mode the controller opens one stream per relayed client.
        .max_concurrent_bidi_streams(VarInt::from_u32(10_000));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The session listener: the worker certificate, a mandatory client certificate of any
/// issuer, and windows sized for bulk transfers.
pub(crate) fn session_server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = session_crypto();
    let verifier = Arc::new(AnyClientKeyDangerVerifier::new(&provider));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![postern_proto::ALPN_SESSION.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(session_transport()));
    Ok(config)
}

/// The session listener's transport: windows sized for bulk transfers, and keep-alives well
/// inside the idle timeout. The listener adds the packet size for each client's path
/// ([`crate::udp::tune_for_path`]).
pub(crate) fn session_transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        // Grown on demand up to `crate::listener::MAX_STREAMS`: quinn sets up state for every
        // stream it allows at once, and allowing 10,000 from the start cost ~0.5 ms of every
        // session's handshake.
        .max_concurrent_bidi_streams(VarInt::from_u32(crate::listener::INITIAL_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(std::time::Duration::from_secs(5)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(30_000))));
    transport
}

/// [`session_transport`] with packets sized for the path to the client at `peer`.
pub fn session_transport_for(peer: std::net::SocketAddr) -> TransportConfig {
    let mut transport = session_transport();
    crate::udp::tune_for_path(&mut transport, peer);
    transport
}

/// The DER SubjectPublicKeyInfo of the certificate the client presented (and proved
/// possession of) on `conn`, if any.
pub(crate) fn client_spki(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    Some(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Accepts any client certificate, from any issuer, without checking names or dates.
///
/// This is safe **only** because a session is admitted solely on a token whose `cnf` names
/// the client's key: the certificate carries no authority here, it only transports the key.
/// What this verifier must (and does) check is the handshake signature, which proves that
/// the client holds the private key of that certificate.
#[derive(Debug)]
pub(crate) struct AnyClientKeyDangerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyClientKeyDangerVerifier {
    pub(crate) fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for AnyClientKeyDangerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The key is read from the certificate later; refuse one that cannot be parsed now,
        // while the client still gets a TLS alert that says so.
        X509Certificate::from_der(end_entity.as_ref()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The proof of possession of the client key: never skip this.
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    //! In-memory TLS handshakes against the client-key verifier.

    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::client::ResolvesClientCert;
    use rustls::sign::CertifiedKey;
    use rustls::{ClientConnection, ServerConnection};
    use rustls_pki_types::PrivateKeyDer;

    type TestResult<T> = Result<T, Box<dyn std::error::Error>>;

    fn der_key(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(key.serialize_der().into())
    }

    /// A server with the verifier and a CA-signed certificate; returns it and its CA.
    fn server() -> TestResult<(rustls::ServerConfig, CertificateDer<'static>)> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["w1.worker.postern.internal".to_owned()])?
            .signed_by(&key, &issuer)?;
        let config = rustls::ServerConfig::builder_with_provider(session_crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(AnyClientKeyDangerVerifier::new(&session_crypto())))
            .with_single_cert(vec![cert.der().clone()], der_key(&key))?;
        Ok((config, ca_cert.der().clone()))
    }

    /// Presents `cert` but signs with `signer`: a certificate without its key.
    #[derive(Debug)]
    struct Presents(Arc<CertifiedKey>);

    impl ResolvesClientCert for Presents {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    /// Runs a handshake; returns the server's verdict and, if it accepted, the suite agreed.
    fn handshake(
        cert_key: &KeyPair,
        signing_key: &KeyPair,
    ) -> TestResult<Result<rustls::CipherSuite, rustls::Error>> {
        let (server_config, ca) = server()?;
        let cert = CertificateParams::new(vec!["client".to_owned()])?.self_signed(cert_key)?;
        let signer = session_crypto()
            .key_provider
            .load_private_key(der_key(signing_key))?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let client_config = rustls::ClientConfig::builder_with_provider(session_crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(Presents(certified)));
        let name = "w1.worker.postern.internal".try_into()?;
        let mut client = ClientConnection::new(Arc::new(client_config), name)?;
        let mut server = ServerConnection::new(Arc::new(server_config))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf)?;
            }
            server.read_tls(&mut buf.as_slice())?;
            if let Err(e) = server.process_new_packets() {
                return Ok(Err(e));
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf)?;
            }
            client.read_tls(&mut buf.as_slice())?;
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                let suite = server.negotiated_cipher_suite().ok_or("no suite agreed")?;
                return Ok(Ok(suite.suite()));
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn any_self_signed_client_key_is_accepted() -> TestResult<()> {
        let key = KeyPair::generate()?;
        assert!(handshake(&key, &key)?.is_ok());
        Ok(())
    }

    #[test]
    fn sessions_agree_on_aes_128_gcm() -> TestResult<()> {
        let key = KeyPair::generate()?;
        assert_eq!(
            handshake(&key, &key)?,
            Ok(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        Ok(())
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() -> TestResult<()> {
        let (cert_key, other) = (KeyPair::generate()?, KeyPair::generate()?);
        let verdict = handshake(&cert_key, &other)?;
        assert!(
            matches!(
                verdict,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                ))
            ),
            "{verdict:?}"
        );
        Ok(())
    }
}
