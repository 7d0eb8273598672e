//! Client side of the password methods a PostgreSQL server asks for, sans-IO:
//! SCRAM-SHA-256 (RFC 5802 / 7677, without channel binding, as over a plain connection) and
//! the MD5 challenge.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

/// The SASL mechanism name.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The base64 of the GS2 header `n,,` (no channel binding, no authzid).
const GS2_HEADER_B64: &str = "biws";
/// Most PBKDF2 iterations accepted from a server (PostgreSQL's default is 4096): a hostile
/// target must not make the worker spin.
const MAX_ITERATIONS: u32 = 10_000_000;
/// Bytes of randomness in the client nonce.
const NONCE_LEN: usize = 18;

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScramError {
    /// A server message does not have the expected attributes.
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    /// The server's nonce does not extend ours.
    #[error("the server's SCRAM nonce does not extend the client's")]
    Nonce,
    /// The iteration count is zero or above the limit.
    #[error("the server asks for {0} PBKDF2 iterations (at most {MAX_ITERATIONS} accepted)")]
    Iterations(u64),
    /// The server reported an error (`e=`).
    #[error("the server rejected the SCRAM proof: {0}")]
    Rejected(String),
    /// The server's signature is wrong: it does not know the password.
    #[error("the server's SCRAM signature is wrong: it may not be the real server")]
    ServerSignature,
}

/// A SCRAM-SHA-256 exchange in progress.
pub struct ScramClient {
    password: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    /// Set once the client-final message is sent: what the server must sign.
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// Starts an exchange with a fresh random nonce.
    pub fn new(password: &str) -> Self {
        let mut nonce = [0u8; NONCE_LEN];
        // The OS random source failing is not recoverable in any useful way.
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        Self::with_nonce(password, &B64.encode(nonce))
    }

    /// Starts an exchange with the given nonce (tests use fixed ones).
    pub fn with_nonce(password: &str, nonce: &str) -> Self {
        // SASLprep where it applies; PostgreSQL uses the raw bytes of a password that is not
        // valid for it, and so does this client.
        let password = match stringprep::saslprep(password) {
            Ok(prepared) => prepared.into_owned().into_bytes(),
            Err(_) => password.as_bytes().to_vec(),
        };
        // The user name is empty: PostgreSQL takes it from the startup message.
        Self {
            password,
            client_first_bare: format!("n=,r={nonce}"),
            nonce: nonce.to_owned(),
            expected_server_signature: None,
        }
    }

    /// The client-first message (the `SASLInitialResponse` data).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Takes the server-first message and returns the client-final message. Runs PBKDF2:
    /// call it off the async threads when the iteration count may be large.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => return Err(ScramError::Malformed("mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        let salt = salt
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed("no base64 salt"))?;
        let iterations: u64 = iterations
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed("no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let iterations = u32::try_from(iterations)
            .ok()
            .filter(|i| *i <= MAX_ITERATIONS)
            .and_then(NonZeroU32::new)
            .ok_or(ScramError::Iterations(iterations))?;

        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());

        let without_proof = format!("c={GS2_HEADER_B64},r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();

        let server_key = hmac::sign(&salted_key, b"Server Key");
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        );
        let mut expected = [0u8; 32];
        expected.copy_from_slice(server_signature.as_ref());
        self.expected_server_signature = Some(expected);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server proves it knows the password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let expected = self
            .expected_server_signature
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        for attr in text.split(',') {
            match attr.split_once('=') {
                Some(("e", error)) => return Err(ScramError::Rejected(error.to_owned())),
                Some(("v", signature)) => {
                    let signature = B64
                        .decode(signature)
                        .map_err(|_| ScramError::Malformed("signature is not base64"))?;
                    // Constant time: a timing difference must not tell how much was right.
                    let differ = signature.len() != expected.len()
                        || signature
                            .iter()
                            .zip(expected)
                            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                            != 0;
                    return if differ {
                        Err(ScramError::ServerSignature)
                    } else {
                        Ok(())
                    };
                }
                _ => {}
            }
        }
        Err(ScramError::Malformed("no verifier"))
    }
}

/// A SCRAM-SHA-256 verifier for `password`, as PostgreSQL stores it
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`): given as a role's password,
/// the server stores it as is, and the clear password never reaches the server.
pub fn verifier(password: &str, salt: &[u8], iterations: NonZeroU32) -> String {
    let password = match stringprep::saslprep(password) {
        Ok(prepared) => prepared.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    };
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        &password,
        &mut salted,
    );
    let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&salted_key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&salted_key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key.as_ref()),
        B64.encode(server_key.as_ref())
    )
}

/// The answer to an MD5 challenge: `"md5" || hex(md5(hex(md5(password || user)) || salt))`.
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = postern_proto::hex(&Md5::digest(
        [password.as_bytes(), user.as_bytes()].concat(),
    ));
    let outer = postern_proto::hex(&Md5::digest([inner.as_bytes(), &salt].concat()));
    format!("md5{outer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCRAM-SHA-256 example of RFC 7677 §3 (user "user", password "pencil").
    #[test]
    fn rfc7677_example() {
        let mut c = ScramClient::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
        // The RFC's client-first names the user; PostgreSQL's leaves it empty, so build the
        // exchange with the RFC's bare message to compare the proof.
        c.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = c.client_final(server_first).expect("client final");
        assert_eq!(
            String::from_utf8(client_final).expect("utf8"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("server signature");
        assert_eq!(
            c.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::ServerSignature)
        );
        assert!(matches!(
            c.verify_server_final(b"e=invalid-proof"),
            Err(ScramError::Rejected(_))
        ));
    }

    #[test]
    fn hostile_server_first_messages_are_refused() {
        let mut c = ScramClient::with_nonce("pw", "abc");
        assert_eq!(c.client_first(), b"n,,n=,r=abc");
        assert_eq!(
            c.client_final(b"r=xyz123,s=c2FsdA==,i=4096"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            c.client_final(b"r=abc,s=c2FsdA==,i=4096"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            c.client_final(b"r=abcd,s=c2FsdA==,i=4000000000"),
            Err(ScramError::Iterations(4_000_000_000))
        );
        assert_eq!(
            c.client_final(b"r=abcd,s=c2FsdA==,i=0"),
            Err(ScramError::Iterations(0))
        );
        assert!(c.client_final(b"r=abcd,i=1").is_err());
        assert!(c.client_final(b"\xff").is_err());
        assert!(c.verify_server_final(b"v=x").is_err());
    }

    /// A server holding only the verifier accepts the client's proof, and the client
    /// accepts the server's signature.
    #[test]
    fn verifier_matches_the_client_exchange() {
        let salt = b"0123456789abcdef";
        let iterations = NonZeroU32::new(4096).expect("non-zero");
        let v = verifier("s3cret", salt, iterations);
        let (head, keys) = v.rsplit_once('$').expect("keys");
        assert_eq!(head, format!("SCRAM-SHA-256$4096:{}", B64.encode(salt)));
        let (stored_key, server_key) = keys.split_once(':').expect("two keys");
        let stored_key = B64.decode(stored_key).expect("b64");
        let server_key = B64.decode(server_key).expect("b64");

        let mut client = ScramClient::with_nonce("s3cret", "cnonce");
        let server_first = format!("r=cnonce-snonce,s={},i=4096", B64.encode(salt));
        let client_final =
            String::from_utf8(client.client_final(server_first.as_bytes()).expect("final"))
                .expect("utf8");
        let (without_proof, proof) = client_final.rsplit_once(",p=").expect("proof");
        let auth_message = format!("n=,r=cnonce,{server_first},{without_proof}");
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &stored_key),
            auth_message.as_bytes(),
        );
        let client_key: Vec<u8> = B64
            .decode(proof)
            .expect("b64")
            .iter()
            .zip(signature.as_ref())
            .map(|(p, s)| p ^ s)
            .collect();
        assert_eq!(
            digest::digest(&digest::SHA256, &client_key).as_ref(),
            &stored_key[..],
            "the server would accept the proof"
        );
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &server_key),
            auth_message.as_bytes(),
        );
        client
            .verify_server_final(format!("v={}", B64.encode(server_signature)).as_bytes())
            .expect("the client accepts the server");
    }

    #[test]
    fn md5_answer_matches_postgres() {
        // Computed with Python's hashlib:
        // "md5" + md5(md5(b"secret" + b"alice").hexdigest().encode() + bytes([1, 2, 3, 4]))
        assert_eq!(
            md5_password("alice", "secret", [1, 2, 3, 4]),
            "md598a0412b9c31436fc53776e863350083"
        );
    }
}
