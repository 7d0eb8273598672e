//! Root keys: the Ed25519 session-signing key and the cluster CA, stored in the database
//! sealed (ChaCha20-Poly1305) under a key-encryption key (KEK) from config, so that several
//! controllers on one database share them and a database dump alone reveals none.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// Root-key handling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The KEK is missing or not 32 base64 bytes.
    #[error("invalid key-encryption key: {0}")]
    BadKek(String),
    /// A stored key does not open under this KEK (wrong KEK for this database?).
    #[error("root key '{0}' cannot be unsealed: is this the KEK this database was created with?")]
    Unseal(String),
    /// Certificate generation or signing failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// A certificate signing request was refused.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The 32-byte key-encryption key.
#[derive(Clone)]
pub struct Kek(LessSafeKeyArc);

#[derive(Clone)]
struct LessSafeKeyArc(Arc<LessSafeKey>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(***)")
    }
}

impl Kek {
    /// Parses a base64 KEK of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|e| KeyError::BadKek(format!("not base64: {e}")))?;
        if bytes.len() != 32 {
            return Err(KeyError::BadKek(format!(
                "{} bytes, expected 32",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| KeyError::BadKek("rejected by the cipher".into()))?;
        Ok(Kek(LessSafeKeyArc(Arc::new(LessSafeKey::new(key)))))
    }

    /// A fresh random KEK, base64.
    pub fn generate_base64() -> String {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes);
        B64.encode(bytes)
    }

    /// Encrypts `plaintext`, bound to `purpose` (AAD), as base64(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let mut buf = plaintext.to_vec();
        // Sealing with a valid key and fresh nonce cannot fail except on absurd lengths.
        let _ = self.0 .0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose.as_bytes()),
            &mut buf,
        );
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        B64.encode(out)
    }

    /// Decrypts what [`Kek::seal`] produced for the same `purpose`.
    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, KeyError> {
        let bad = || KeyError::Unseal(purpose.to_owned());
        let bytes = B64.decode(sealed).map_err(|_| bad())?;
        if bytes.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
             .0
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|_| bad())?;
        Ok(plain.to_vec())
    }
}

fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// The root keys a controller works with.
pub struct RootKeys {
    /// Signs session tokens.
    pub session_key: SigningKey,
    /// The cluster CA's certificate (PEM).
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The SSH user CA of certificate mode.
    pub ssh_user_ca: crate::ssh_ca::SshUserCa,
}

impl std::fmt::Debug for RootKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKeys(***)")
    }
}

pub(crate) const SESSION_KEY: &str = "session-signing";
const CLUSTER_CA: &str = "cluster-ca";

impl RootKeys {
    /// Loads the root keys, generating and storing any that do not exist yet. Safe to race:
    /// the first controller's keys win and the others load them.
    pub async fn load_or_create(store: &Store, kek: &Kek) -> Result<Self, KeyError> {
        let (sealed, _) = match store.root_key(SESSION_KEY).await? {
            Some(k) => k,
            None => {
                let mut seed = [0u8; 32];
                fill_random(&mut seed);
                let public = postern_proto::token::encode_public_key(
                    &SigningKey::from_bytes(&seed).verifying_key(),
                );
                store
                    .insert_root_key(SESSION_KEY, &kek.seal(SESSION_KEY, &seed), &public)
                    .await?
            }
        };
        let seed: [u8; 32] = kek
            .open(SESSION_KEY, &sealed)?
            .try_into()
            .map_err(|_| KeyError::Unseal(SESSION_KEY.into()))?;
        let session_key = SigningKey::from_bytes(&seed);

        let (sealed, ca_pem) = match store.root_key(CLUSTER_CA).await? {
            Some(k) => k,
            None => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, "Postern cluster CA");
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.not_before = rcgen::date_time_ymd(2024, 1, 1);
                params.not_after = rcgen::date_time_ymd(2044, 1, 1);
                let cert = params.self_signed(&key)?;
                let sealed = kek.seal(CLUSTER_CA, key.serialize_pem().as_bytes());
                store
                    .insert_root_key(CLUSTER_CA, &sealed, &cert.pem())
                    .await?
            }
        };
        let key_pem = String::from_utf8(kek.open(CLUSTER_CA, &sealed)?)
            .map_err(|_| KeyError::Unseal(CLUSTER_CA.into()))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
        let ca_der = pem_to_der(&ca_pem).ok_or_else(|| KeyError::Unseal(CLUSTER_CA.into()))?;
        let ssh_user_ca = crate::ssh_ca::SshUserCa::load_or_create(store, kek).await?;
        Ok(RootKeys {
            session_key,
            ca_pem,
            ca_der,
            issuer,
            ssh_user_ca,
        })
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Issues a certificate for a controller's cluster listener, with a fresh key.
    pub fn issue_controller_cert(&self) -> Result<(CertificateDer<'static>, KeyPair), KeyError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec![postern_proto::CONTROLLER_SERVER_NAME.to_owned()])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), key))
    }

    /// Issues a certificate for the HTTPS API with a fresh key, naming `names` (DNS names, or
    /// IP addresses as text). The key lives only in this process's memory, and each start
    /// issues a new one: the CLI and the workers trust the cluster CA, not this certificate.
    pub fn issue_api_cert(
        &self,
        names: &[String],
    ) -> Result<(CertificateDer<'static>, KeyPair), KeyError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("postern-controller", String::as_str),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), key))
    }

    /// Signs a worker's CSR: the certificate names the worker (never what the CSR asks for)
    /// and serves both as its client certificate and its session-listener certificate.
    pub fn sign_worker_csr(
        &self,
        csr_pem: &str,
        worker: &str,
    ) -> Result<(String, String), KeyError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(KeyError::BadCsr("larger than 16 KiB".into()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| KeyError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, worker);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            postern_proto::worker_server_name(worker).try_into()?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }
}

/// Hex SHA-256 of a certificate's DER: how a worker's certificate is recognised.
pub fn fingerprint(der: &[u8]) -> String {
    postern_proto::hex(&Sha256::digest(der))
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_kek() {
        let kek = Kek::from_base64(&Kek::generate_base64()).expect("kek");
        let sealed = kek.seal("p", b"secret");
        assert_eq!(kek.open("p", &sealed).expect("opens"), b"secret");
        assert!(kek.open("other-purpose", &sealed).is_err());
        let other = Kek::from_base64(&Kek::generate_base64()).expect("kek");
        assert!(matches!(other.open("p", &sealed), Err(KeyError::Unseal(_))));
    }

    #[test]
    fn bad_kek_is_refused() {
        assert!(Kek::from_base64("short").is_err());
        assert!(Kek::from_base64(&B64.encode([0u8; 16])).is_err());
    }
}
