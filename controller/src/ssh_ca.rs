//! The SSH user CA of certificate mode (DESIGN §2): an Ed25519 root key, sealed under the KEK
//! like the other root keys, that signs short-lived user certificates for keys the workers
//! generate per session. Targets trust it through `TrustedUserCAKeys`.

use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};

use crate::keys::{Kek, KeyError};
use crate::store::Store;

const SSH_USER_CA: &str = "ssh-user-ca";
/// Certificates start to be valid this long before they are signed (clock skew).
const BACKDATE_SECS: i64 = 60;

/// The SSH user CA.
pub struct SshUserCa {
    key: PrivateKey,
    public_line: String,
}

impl std::fmt::Debug for SshUserCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshUserCa")
            .field("public_key", &self.public_line)
            .finish_non_exhaustive()
    }
}

/// What a certificate is for.
#[derive(Debug)]
pub struct CertRequest<'a> {
    /// The worker's key (OpenSSH one-line form).
    pub public_key: &'a str,
    /// The only principal (login) the certificate is valid for.
    pub principal: &'a str,
    /// Key id, shown in the target's logs (`postern:SESSION:USER`).
    pub key_id: &'a str,
    /// Valid until (Unix seconds): the session's expiry.
    pub valid_before: i64,
}

impl SshUserCa {
    /// Loads the CA key, generating and storing it on first use. Safe to race: the first
    /// controller's key wins and the others load it.
    pub async fn load_or_create(store: &Store, kek: &Kek) -> Result<Self, KeyError> {
        let unseal = || KeyError::Unseal(SSH_USER_CA.into());
        let (sealed, _) = match store.root_key(SSH_USER_CA).await? {
            Some(k) => k,
            None => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed)
                    .map_err(|e| KeyError::BadKek(format!("no randomness: {e}")))?;
                let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
                let text = key.to_openssh(LineEnding::LF).map_err(|_| unseal())?;
                let public = key.public_key().to_openssh().map_err(|_| unseal())?;
                store
                    .insert_root_key(
                        SSH_USER_CA,
                        &kek.seal(SSH_USER_CA, text.as_bytes()),
                        &public,
                    )
                    .await?
            }
        };
        let text = String::from_utf8(kek.open(SSH_USER_CA, &sealed)?).map_err(|_| unseal())?;
        let key = PrivateKey::from_openssh(text).map_err(|_| unseal())?;
        let public_line = key.public_key().to_openssh().map_err(|_| unseal())?;
        Ok(Self { key, public_line })
    }

    /// The CA public key, OpenSSH one-line form.
    pub fn public_key(&self) -> &str {
        &self.public_line
    }

    /// Signs a user certificate valid from a minute ago until `valid_before`, for one
    /// principal, with the `permit-pty` extension only (no forwarding, no user rc).
    pub fn sign(&self, req: &CertRequest<'_>, now: i64) -> Result<String, String> {
        let subject = PublicKey::from_openssh(req.public_key)
            .map_err(|e| format!("invalid public key: {e}"))?;
        let after = u64::try_from(now - BACKDATE_SECS).unwrap_or(0);
        let before = u64::try_from(req.valid_before).unwrap_or(0);
        if before <= after + BACKDATE_SECS as u64 {
            return Err("the session has expired".into());
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let mut builder = Builder::new(nonce.to_vec(), subject.key_data().clone(), after, before)
            .map_err(|e| e.to_string())?;
        let mut serial = [0u8; 8];
        getrandom::fill(&mut serial).map_err(|e| format!("no randomness: {e}"))?;
        builder
            .serial(u64::from_le_bytes(serial))
            .and_then(|b| b.cert_type(CertType::User))
            .and_then(|b| b.key_id(req.key_id))
            .and_then(|b| b.valid_principal(req.principal))
            .and_then(|b| b.extension("permit-pty", ""))
            .map_err(|e| e.to_string())?;
        let cert = builder.sign(&self.key).map_err(|e| e.to_string())?;
        cert.to_openssh().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_a_user_certificate_for_one_principal() {
        let ca = SshUserCa {
            key: PrivateKey::from(Ed25519Keypair::from_seed(&[1u8; 32])),
            public_line: String::new(),
        };
        let subject = PrivateKey::from(Ed25519Keypair::from_seed(&[2u8; 32]));
        let line = subject.public_key().to_openssh().expect("public");
        let now = 1_800_000_000;
        let text = ca
            .sign(
                &CertRequest {
                    public_key: &line,
                    principal: "deploy",
                    key_id: "postern:s_x:alice",
                    valid_before: now + 600,
                },
                now,
            )
            .expect("signed");
        let cert = ssh_key::Certificate::from_openssh(&text).expect("parses");
        assert_eq!(cert.valid_principals(), ["deploy".to_owned()]);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_before(), (now + 600) as u64);
        assert!(cert.extensions().contains_key("permit-pty"));
        assert!(!cert.extensions().contains_key("permit-port-forwarding"));
        let expired = CertRequest {
            public_key: &line,
            principal: "deploy",
            key_id: "k",
            valid_before: now - 1,
        };
        assert!(ca.sign(&expired, now).is_err());
    }
}
