//! Passwords (argon2id) and API tokens (32 random bytes, stored as SHA-256).

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use postern_proto::ids::Secret;

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Why a password could not be checked or hashed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordWork {
    /// No turn for argon2 came in time.
    #[error("too many passwords are being checked at once: try again in a moment")]
    Busy,
    /// The work itself failed.
    #[error("{0}")]
    Failed(String),
}

/// Runs `work` on the blocking pool in one of the few turns argon2 may take at once.
async fn in_turn<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PasswordWork> {
    let turn = crate::throttle::password_turn()
        .await
        .ok_or(PasswordWork::Busy)?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        work()
    })
    .await
    .map_err(|e| PasswordWork::Failed(e.to_string()))
}

/// [`verify_password`] in one of argon2's turns (a check that fails to run is a mismatch).
pub async fn check_password(password: String, hash: Option<String>) -> Result<bool, PasswordWork> {
    let checked =
        in_turn(move || verify_password(&password, hash.as_deref().unwrap_or(dummy_hash()))).await;
    match checked {
        Err(PasswordWork::Failed(e)) => {
            tracing::error!(error = %e, "a password check failed");
            Ok(false)
        }
        other => other,
    }
}

/// [`hash_password`] in one of argon2's turns.
pub async fn new_password_hash(password: String) -> Result<String, PasswordWork> {
    in_turn(move || hash_password(&password))
        .await?
        .map_err(PasswordWork::Failed)
}

/// A fixed hash to verify against when the user does not exist, so that timing does not
/// tell whether a user name exists.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("postern-dummy-password").unwrap_or_default())
}

/// A new API token (`pt_…`) and the hash stored for it.
pub fn new_api_token() -> (Secret, String) {
    let token = Secret::random("pt_");
    let hash = hash_token(token.expose());
    (token, hash)
}

/// The stored form of a bearer secret.
pub fn hash_token(token: &str) -> String {
    B64.encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn tokens_are_unique_and_hashed() {
        let (a, ha) = new_api_token();
        let (b, hb) = new_api_token();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(hash_token(a.expose()), ha);
        assert_ne!(ha, hb);
    }
}
