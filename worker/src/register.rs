//! The worker's identity: registered once at the controller with a one-time activation token
//! (a CSR for a key generated here, answered with a certificate from the cluster CA), then
//! kept in the data directory and loaded on every later start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use postern_proto::cluster::{RegisterRequest, RegisterResponse};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config::WorkerConfig;

const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const CA_FILE: &str = "ca.pem";
const WORKER_FILE: &str = "worker.json";
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a registered worker waits for the controller's cluster addresses at start.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(3);

/// Who this worker is: its name, its certificate and key, the cluster CA and where the
/// controllers listen.
pub(crate) struct Identity {
    /// The worker's name, as the controller registered it.
    pub name: String,
    /// Controller cluster addresses (`host:port`).
    pub cluster_addrs: Vec<String>,
    /// The worker's certificate (leaf first).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The worker's private key.
    pub key: PrivateKeyDer<'static>,
    /// The cluster CA: the only root trusted for controllers.
    pub ca: Vec<CertificateDer<'static>>,
}

/// Why the worker could not register or load its identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// No certificate yet and no activation token to get one.
    #[error("worker is not registered: set activation_token (from `postern workers create NAME`; a POSTERN_ACTIVATION_TOKEN_FILE that is missing or empty gives none)")]
    NotRegistered,
    /// A file in the data directory could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file in the data directory has unusable contents.
    #[error("{path} is invalid: {reason}; remove the data directory and register again")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating the key or the certificate signing request failed.
    #[error("cannot generate the worker key: {0}")]
    Key(rcgen::Error),
    /// The controller could not be reached (controller side).
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable {
        /// The registration URL.
        url: String,
        /// The HTTP client's error, with its causes.
        reason: String,
    },
    /// The controller answered with an error (controller side).
    #[error("the controller refused registration ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The controller's message.
        message: String,
    },
    /// The controller's answer is not a usable registration (controller side).
    #[error("the controller's registration answer is invalid: {0}")]
    BadAnswer(String),
    /// The CA to trust the controller's HTTPS certificate by is unusable or does not match
    /// `controller_ca_fingerprint` (controller side).
    #[error("controller CA: {0}")]
    ControllerCa(String),
}

// Not `#[from]`: the message already carries the cause, which must not print twice.
impl From<rcgen::Error> for RegisterError {
    fn from(e: rcgen::Error) -> Self {
        Self::Key(e)
    }
}

/// `worker.json`: what the data directory keeps beside the PEM files.
#[derive(Serialize, Deserialize)]
struct WorkerFile {
    name: String,
    cluster_addrs: Vec<String>,
    /// SHA-256 (hex) of the activation token this identity was registered with: another
    /// token in the configuration means the worker was created anew.
    #[serde(default)]
    token_sha256: Option<String>,
    /// SHA-256 (hex) of the last other token the controller refused (not tried again).
    #[serde(default)]
    refused_token_sha256: Option<String>,
}

/// The controller's error body (`{"error": code, "message": text}`).
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// Loads the identity from `config.data_dir`, registering first if there is none.
pub(crate) async fn load_or_register(config: &WorkerConfig) -> Result<Identity, RegisterError> {
    let dir = &config.data_dir;
    if !dir.join(CERT_FILE).exists() {
        let Some(token) = config.activation_token.as_deref().filter(|t| !t.is_empty()) else {
            return Err(RegisterError::NotRegistered);
        };
        let client = crate::controller_http::client(config, &[], REGISTER_TIMEOUT).await?;
        register(&client, &config.controller_url, token, dir).await?;
        return load(dir);
    }
    if let Some(token) = config.activation_token.as_deref().filter(|t| !t.is_empty()) {
        let hash = Some(token_hash(token));
        let (registered, refused) = tokens_seen(dir);
        if registered != hash && refused != hash {
            // A token this identity was not registered with: the worker was deleted and
            // created again (its old certificate is no longer accepted). Whatever keeps it
            // from registering, the identity there is stays in use; a token the controller
            // refused is remembered, so that it is not tried at every start.
            let attempt = async {
                // The cluster CA saved at the first registration still vouches for the API
                // of the same cluster.
                let saved_ca = load(dir).map(|i| i.ca).unwrap_or_default();
                let client =
                    crate::controller_http::client(config, &saved_ca, REGISTER_TIMEOUT).await?;
                register(&client, &config.controller_url, token, dir).await
            };
            match attempt.await {
                Ok(()) => {
                    tracing::info!("registered again with the new activation_token: the earlier identity in data_dir is replaced");
                    return load(dir);
                }
                Err(e @ RegisterError::Refused { .. }) => {
                    tracing::warn!(
                        "activation_token is not the one this worker registered with, and it \
                         cannot register again with it ({e}); going on with the identity in data_dir"
                    );
                    remember_token(dir, token);
                }
                Err(e) => tracing::warn!(
                    "activation_token is not the one this worker registered with, and \
                     registering again failed ({e}); going on with the identity in data_dir \
                     (tried again at the next start)"
                ),
            }
        }
    }
    let mut identity = load(dir)?;
    refresh_cluster_addrs(config, &identity.ca, &mut identity.cluster_addrs).await;
    Ok(identity)
}

/// The hashes of the activation token the identity in `dir` was registered with and of the
/// last one refused, as far as recorded.
fn tokens_seen(dir: &Path) -> (Option<String>, Option<String>) {
    read_worker_file(dir)
        .map(|f| (f.token_sha256, f.refused_token_sha256))
        .unwrap_or_default()
}

/// Records `token` as the one tried for the identity in `dir` (best effort).
fn remember_token(dir: &Path, token: &str) {
    update_worker_file(dir, "the refused activation token", |file| {
        file.refused_token_sha256 = Some(token_hash(token));
    });
}

/// `worker.json` in `dir`, if it is there and readable.
fn read_worker_file(dir: &Path) -> Option<WorkerFile> {
    let text = std::fs::read(dir.join(WORKER_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Changes `worker.json` in `dir` with `change` (best effort: a failure is logged, naming
/// `what` was to be saved).
fn update_worker_file(dir: &Path, what: &str, change: impl FnOnce(&mut WorkerFile)) {
    let Some(mut file) = read_worker_file(dir) else {
        tracing::warn!("cannot save {what}: {WORKER_FILE} is unreadable");
        return;
    };
    change(&mut file);
    let written = serde_json::to_vec_pretty(&file)
        .map_err(|e| RegisterError::BadAnswer(e.to_string()))
        .and_then(|json| write_file(&dir.join(WORKER_FILE), &json, false));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot save {what}");
    }
}

fn token_hash(token: &str) -> String {
    crate::controller_http::hex_sha256(token.as_bytes())
}

/// Asks the controller where its cluster listeners are now (they may have moved or been
/// added since registration) and saves the answer in `config.data_dir`; whether `addrs`
/// changed. Best effort: on any failure the saved ones are used.
pub(crate) async fn refresh_cluster_addrs(
    config: &WorkerConfig,
    ca: &[CertificateDer<'static>],
    addrs: &mut Vec<String>,
) -> bool {
    let url = format!("{}/v1/cluster", config.controller_url.trim_end_matches('/'));
    let fetch = async {
        let client = crate::controller_http::client(config, ca, REFRESH_TIMEOUT)
            .await
            .map_err(|e| tracing::debug!(error = %e, "no client for the controller API"))
            .ok()?;
        let resp = client.get(&url).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<postern_proto::cluster::ClusterInfo>()
            .await
            .ok()
    };
    let Some(info) = fetch.await.filter(|i| !i.cluster_addrs.is_empty()) else {
        tracing::debug!(%url, "could not refresh cluster addresses; using the saved ones");
        return false;
    };
    if info.cluster_addrs == *addrs {
        return false;
    }
    tracing::info!(addrs = ?info.cluster_addrs, "controller cluster addresses changed");
    update_worker_file(&config.data_dir, "the new cluster addresses", |file| {
        file.cluster_addrs = info.cluster_addrs.clone();
    });
    *addrs = info.cluster_addrs;
    true
}

/// Generates a key, sends a CSR with the activation token and saves the answer.
async fn register(
    client: &reqwest::Client,
    controller_url: &str,
    token: &str,
    dir: &Path,
) -> Result<(), RegisterError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    // The controller decides the name and SANs; the subject only helps a person reading it.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postern-worker");
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let url = format!(
        "{}/v1/workers/register",
        controller_url.trim_end_matches('/')
    );
    tracing::info!(%url, "registering worker");
    let answer = post_register(client, &url, token, csr_pem).await?;

    let name = answer.worker.as_str().to_owned();
    if name.is_empty() {
        return Err(RegisterError::BadAnswer("no worker name".into()));
    }
    if answer.cluster_addrs.is_empty() {
        return Err(RegisterError::BadAnswer("no cluster addresses".into()));
    }
    parse_certs(&answer.cert_pem)
        .map_err(|r| RegisterError::BadAnswer(format!("cert_pem: {r}")))?;
    parse_certs(&answer.ca_pem).map_err(|r| RegisterError::BadAnswer(format!("ca_pem: {r}")))?;

    create_private_dir(dir)?;
    let worker_file = WorkerFile {
        name: name.clone(),
        cluster_addrs: answer.cluster_addrs,
        token_sha256: Some(token_hash(token)),
        refused_token_sha256: None,
    };
    let json = serde_json::to_vec_pretty(&worker_file)
        .map_err(|e| RegisterError::BadAnswer(e.to_string()))?;
    // Every file is written out before any is put in place (a full disk fails the first
    // phase, leaving an identity there is untouched); cert.pem marks the worker as
    // registered, so it goes last.
    let staged = [
        (KEY_FILE, key.serialize_pem().into_bytes(), true),
        (CA_FILE, answer.ca_pem.into_bytes(), false),
        (WORKER_FILE, json, false),
        (CERT_FILE, answer.cert_pem.into_bytes(), false),
    ]
    .into_iter()
    .map(|(file, contents, secret)| stage_file(&dir.join(file), &contents, secret))
    .collect::<Result<Vec<_>, _>>()?;
    for (tmp, path) in staged {
        std::fs::rename(&tmp, &path).map_err(|error| RegisterError::Io { path, error })?;
    }
    tracing::info!(worker = %name, "worker registered");
    Ok(())
}

async fn post_register(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    csr_pem: String,
) -> Result<RegisterResponse, RegisterError> {
    let unreachable = |e: reqwest::Error| {
        let mut reason = error_chain(&e);
        if unknown_issuer(&e) {
            reason.push_str(
                " (the controller's certificate is not from a CA this worker trusts: set \
                 controller_ca_fingerprint, or POSTERN_CONTROLLER_CA_FINGERPRINT, to the CA \
                 SHA-256 that `postern workers create` printed)",
            );
        }
        // A TLS server answering a plain HTTP request reads to hyper as a bad response.
        if let Some(rest) = url.strip_prefix("http://") {
            if reason.contains("invalid HTTP version") {
                let host = rest.split('/').next().unwrap_or(rest);
                reason.push_str(&format!(
                    " (the controller speaks HTTPS: set controller_url to https://{host})"
                ));
            }
        }
        RegisterError::Unreachable {
            url: url.to_owned(),
            reason,
        }
    };
    let request = RegisterRequest {
        activation_token: token.to_owned(),
        csr_pem,
    };
    let response = client
        .post(url)
        .json(&request)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) if !b.message.is_empty() => b.message,
            Ok(b) if !b.error.is_empty() => b.error,
            _ => String::from_utf8_lossy(&body).chars().take(500).collect(),
        };
        return Err(RegisterError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    response
        .json::<RegisterResponse>()
        .await
        .map_err(|e| RegisterError::BadAnswer(error_chain(&e)))
}

/// Reads the identity saved by [`register`].
fn load(dir: &Path) -> Result<Identity, RegisterError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|error| RegisterError::Io { path, error })
    };
    let bad = |file: &str, reason: String| RegisterError::BadFile {
        path: dir.join(file),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(&read(KEY_FILE)?)
        .map_err(|e| bad(KEY_FILE, format!("no private key: {e}")))?;
    let cert_chain = parse_certs_bytes(&read(CERT_FILE)?).map_err(|r| bad(CERT_FILE, r))?;
    let ca = parse_certs_bytes(&read(CA_FILE)?).map_err(|r| bad(CA_FILE, r))?;
    let worker: WorkerFile =
        serde_json::from_slice(&read(WORKER_FILE)?).map_err(|e| bad(WORKER_FILE, e.to_string()))?;
    if worker.cluster_addrs.is_empty() {
        return Err(bad(WORKER_FILE, "no cluster_addrs".into()));
    }
    Ok(Identity {
        name: worker.name,
        cluster_addrs: worker.cluster_addrs,
        cert_chain,
        key,
        ca,
    })
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    parse_certs_bytes(pem.as_bytes())
}

fn parse_certs_bytes(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

/// An exclusive lock on `DIR/worker.lock` (the directory made if missing), or `None` if
/// another process holds it.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<Option<std::fs::File>, RegisterError> {
    create_private_dir(dir)?;
    let path = dir.join("worker.lock");
    let io = |error| RegisterError::Io {
        path: path.clone(),
        error,
    };
    crate::try_lock_file(&path).map_err(io)
}

fn create_private_dir(dir: &Path) -> Result<(), RegisterError> {
    let io = |error| RegisterError::Io {
        path: dir.to_owned(),
        error,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io)
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file;
/// `secret` files are created with mode 0600.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), RegisterError> {
    let (tmp, path) = stage_file(path, contents, secret)?;
    std::fs::rename(&tmp, &path).map_err(|error| RegisterError::Io { path, error })
}

/// Writes `contents` beside `path` (`NAME.tmp`, synced) for a rename into place; the
/// temporary path and `path`.
fn stage_file(
    path: &Path,
    contents: &[u8],
    secret: bool,
) -> Result<(PathBuf, PathBuf), RegisterError> {
    use std::io::Write as _;
    let io = |error| RegisterError::Io {
        path: path.to_owned(),
        error,
    };
    let tmp = path.with_extension("tmp");
    // A leftover from a crash could carry a wider mode than wanted.
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok((tmp, path.to_owned()))
}

/// Whether `e` comes from a TLS handshake that found the server's certificate issued by a CA
/// it does not trust. An `io::Error` shows its inner error's text but leaves it out of the
/// `source()` chain, so inner errors are opened too.
fn unknown_issuer(e: &(dyn std::error::Error + 'static)) -> bool {
    if matches!(
        e.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    ) {
        return true;
    }
    let inner = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    inner.is_some_and(unknown_issuer) || e.source().is_some_and(unknown_issuer)
}

/// An error and its causes on one line (reqwest's own message is terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_controller_certificate_is_found_inside_io_errors() {
        let tls = |e| rustls::Error::InvalidCertificate(e);
        let wrapped = |e: rustls::Error| {
            std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        assert!(unknown_issuer(&wrapped(tls(
            rustls::CertificateError::UnknownIssuer
        ))));
        // Another certificate failure, or none, gets no CA hint.
        assert!(!unknown_issuer(&wrapped(tls(
            rustls::CertificateError::Expired
        ))));
        assert!(!unknown_issuer(&std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        )));
    }
}
