//! The session authorization: a compact JWT signed with the controller's Ed25519 key
//! (`{"alg":"EdDSA","typ":"postern-session+jwt"}`), carrying who may reach what, until when,
//! through which worker, and the thumbprint of the client key it is bound to (`cnf`, RFC 7800).
//!
//! The thumbprint is SHA-256 over the DER SubjectPublicKeyInfo of the client's ephemeral key,
//! base64url without padding. The worker computes it from the certificate the client proved
//! possession of in the TLS handshake and compares it with `cnf.spki_s256`: a stolen token
//! alone opens nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{SessionId, TargetName, UserName, WorkerName};

const HEADER: &str = r#"{"alg":"EdDSA","typ":"postern-session+jwt"}"#;
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated between controller and worker when checking `exp` and `nbf`.
pub const LEEWAY_SECS: i64 = 30;

/// The claims of a session authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// Issuer: the controller cluster's identifier.
    pub iss: String,
    /// The user the session belongs to.
    pub sub: UserName,
    /// Session id.
    pub sid: SessionId,
    /// Target name.
    pub target: TargetName,
    /// Target protocol (`tcp`, `ssh`, `postgres`).
    pub protocol: String,
    /// Target endpoint the worker dials, `host:port`.
    pub endpoint: String,
    /// The worker that must carry this session.
    pub worker: WorkerName,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expiry (Unix seconds): the session ends then.
    pub exp: i64,
    /// Maximum number of TCP connections in the session; `None` is unlimited.
    pub connection_limit: Option<u32>,
    /// The login on the target (SSH user, database user) the session was authorized for;
    /// `None` means the brokered credential's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// Confirmation: the client key the token is bound to.
    pub cnf: Confirmation,
}

/// Proof-of-possession binding (RFC 7800 `cnf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url(SHA-256(DER SubjectPublicKeyInfo)) of the client's key.
    pub spki_s256: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts of bounded size with the expected header.
    #[error("malformed session token: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the trusted controller key.
    #[error("session token signature is not from this controller")]
    BadSignature,
    /// `exp` is in the past.
    #[error("session token expired {0} s ago")]
    Expired(i64),
    /// The token is bound to another client key.
    #[error("session token is bound to a different client key")]
    KeyMismatch,
}

/// Signs `claims` into a compact token.
pub fn sign(claims: &SessionClaims, key: &SigningKey) -> String {
    // Serializing plain data with string keys cannot fail.
    let body = serde_json::to_vec(claims).unwrap_or_default();
    let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(body));
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(sig.to_bytes()))
}

/// Verifies signature and expiry, returning the claims. The caller still checks `cnf`
/// against the TLS client key with [`check_binding`].
pub fn verify(token: &str, key: &VerifyingKey, now: i64) -> Result<SessionClaims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(b), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header = B64
        .decode(h)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    if header != HEADER.as_bytes() {
        return Err(TokenError::Malformed("unsupported header"));
    }
    let sig = B64
        .decode(s)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| TokenError::Malformed("signature is not 64 bytes"))?;
    let signing_input = &token[..h.len() + 1 + b.len()];
    key.verify_strict(signing_input.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| TokenError::BadSignature)?;
    let body = B64
        .decode(b)
        .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
    let claims: SessionClaims =
        serde_json::from_slice(&body).map_err(|_| TokenError::Malformed("claims are not valid"))?;
    if claims.exp + LEEWAY_SECS < now {
        return Err(TokenError::Expired(now - claims.exp));
    }
    Ok(claims)
}

/// Checks that the claims are bound to the client key whose DER SPKI is `client_spki`.
pub fn check_binding(claims: &SessionClaims, client_spki: &[u8]) -> Result<(), TokenError> {
    // Both sides are public hashes; a constant-time compare is not needed.
    if claims.cnf.spki_s256 == spki_thumbprint(client_spki) {
        Ok(())
    } else {
        Err(TokenError::KeyMismatch)
    }
}

/// base64url(SHA-256(spki_der)): the `cnf` thumbprint of a client key.
pub fn spki_thumbprint(spki_der: &[u8]) -> String {
    B64.encode(Sha256::digest(spki_der))
}

/// Encodes an Ed25519 public key for configs and API answers (base64url).
pub fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

/// Parses a public key produced by [`encode_public_key`].
pub fn decode_public_key(text: &str) -> Result<VerifyingKey, TokenError> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|_| TokenError::Malformed("public key is not base64url"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| TokenError::Malformed("public key is not 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| TokenError::Malformed("not an Ed25519 key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims(exp: i64, spki: &[u8]) -> SessionClaims {
        SessionClaims {
            iss: "test".into(),
            sub: "alice".into(),
            sid: SessionId::random(),
            target: "db".into(),
            protocol: "tcp".into(),
            endpoint: "127.0.0.1:5432".into(),
            worker: "w1".into(),
            iat: 1000,
            exp,
            connection_limit: None,
            login: None,
            cnf: Confirmation {
                spki_s256: spki_thumbprint(spki),
            },
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key(1);
        let c = claims(2000, b"client-spki");
        let t = sign(&c, &k);
        assert_eq!(verify(&t, &k.verifying_key(), 1500), Ok(c.clone()));
        assert_eq!(check_binding(&c, b"client-spki"), Ok(()));
    }

    #[test]
    fn other_key_is_refused() {
        let t = sign(&claims(2000, b"k"), &key(1));
        assert_eq!(
            verify(&t, &key(2).verifying_key(), 1500),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expired_is_refused() {
        let k = key(1);
        let t = sign(&claims(1000, b"k"), &k);
        assert_eq!(
            verify(&t, &k.verifying_key(), 1000 + LEEWAY_SECS + 5),
            Err(TokenError::Expired(LEEWAY_SECS + 5))
        );
    }

    #[test]
    fn wrong_client_key_is_refused() {
        let c = claims(2000, b"right");
        assert_eq!(check_binding(&c, b"wrong"), Err(TokenError::KeyMismatch));
    }

    #[test]
    fn tampered_claims_are_refused() {
        let k = key(1);
        let t = sign(&claims(2000, b"k"), &k);
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(serde_json::to_vec(&claims(9999, b"k")).expect("json"));
        parts[1] = &forged;
        assert_eq!(
            verify(&parts.join("."), &k.verifying_key(), 1500),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let vk = key(1).verifying_key();
        for g in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.???.***",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(verify(g, &vk, 0), Err(TokenError::Malformed(_))),
                "{g}"
            );
        }
    }

    #[test]
    fn public_key_text_round_trip() {
        let vk = key(3).verifying_key();
        assert_eq!(decode_public_key(&encode_public_key(&vk)), Ok(vk));
        assert!(decode_public_key("nope").is_err());
    }
}
