//! The API over TLS (DESIGN §10): rustls (ring), TLS 1.3 only, with the certificate from
//! `tls_cert_file`/`tls_key_file`, or else one the controller issues itself from the cluster
//! CA for `tls_names` at every start (its key never leaves memory). Clients trust the cluster
//! CA: the CLI pins it at first login (`GET /v1/cluster/ca`, checked against the fingerprint
//! the controller logs), workers are given it (`controller_ca_file` or
//! `controller_ca_fingerprint`). Plain HTTP is for `postern dev` and loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Router;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, ControllerConfig};
use crate::keys::{fingerprint, KeyError, RootKeys};
use crate::state::AppState;

/// A client gets this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// Names under this suffix belong to the cluster's own certificates (workers, the cluster
/// listener): an API certificate must never carry one.
const INTERNAL_SUFFIX: &str = ".postern.internal";

/// The API's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Issuing a certificate from the cluster CA failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// rustls refused the certificate or key.
    #[error("API TLS configuration: {0}")]
    Rustls(String),
}

/// Where the API's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertSource {
    /// `tls_cert_file` and `tls_key_file`.
    Files,
    /// Issued from the cluster CA for these names.
    ClusterCa {
        /// The names in the certificate.
        names: Vec<String>,
    },
}

/// The API's rustls configuration and where its certificate came from.
#[derive(Debug, Clone)]
pub struct ApiTls {
    /// The server configuration.
    pub config: Arc<ServerConfig>,
    /// The certificate's origin.
    pub source: CertSource,
}

/// Checks the TLS settings against each other and against `insecure_http`.
pub(crate) fn validate(config: &ControllerConfig) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: key.into(),
        message,
    };
    match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(_), None) => {
            return Err(invalid(
                "tls_key_file",
                "tls_cert_file is set: set tls_key_file too".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls_cert_file",
                "tls_key_file is set: set tls_cert_file too".into(),
            ))
        }
        _ => {}
    }
    if config.insecure_http && config.tls_cert_file.is_some() {
        return Err(invalid(
            "insecure_http",
            "insecure_http serves plain HTTP: remove it to serve tls_cert_file".into(),
        ));
    }
    for name in &config.tls_names {
        if name.trim().is_empty() || name.contains(char::is_whitespace) {
            return Err(invalid("tls_names", format!("invalid name {name:?}")));
        }
        if name.to_ascii_lowercase().ends_with(INTERNAL_SUFFIX) {
            return Err(invalid(
                "tls_names",
                format!("{name}: names under {INTERNAL_SUFFIX} are reserved for the cluster"),
            ));
        }
    }
    Ok(())
}

/// `POSTERN_TLS_CERT_FILE`, `POSTERN_TLS_KEY_FILE`, `POSTERN_TLS_NAMES` (comma-separated).
pub(crate) fn apply_env(config: &mut ControllerConfig, get: &impl Fn(&str) -> Option<String>) {
    if let Some(v) = get("POSTERN_TLS_CERT_FILE") {
        config.tls_cert_file = (!v.is_empty()).then(|| v.into());
    }
    if let Some(v) = get("POSTERN_TLS_KEY_FILE") {
        config.tls_key_file = (!v.is_empty()).then(|| v.into());
    }
    if let Some(v) = get("POSTERN_TLS_NAMES") {
        config.tls_names = v
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
    }
}

/// The names a cluster-CA certificate carries when `tls_names` is empty.
pub fn default_names(api_listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let ip = api_listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

/// Builds the API's TLS configuration from the files, or from the cluster CA.
pub fn server_config(config: &ControllerConfig, keys: &RootKeys) -> Result<ApiTls, TlsError> {
    let (chain, key, source) = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => (read_chain(cert)?, read_key(key)?, CertSource::Files),
        _ => {
            let names = if config.tls_names.is_empty() {
                default_names(config.api_listen)
            } else {
                config.tls_names.clone()
            };
            let (cert, key) = keys.issue_api_cert(&names)?;
            let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
            // The CA goes in the chain so that a client can see what to pin.
            (
                vec![cert, keys.ca_der()],
                key,
                CertSource::ClusterCa { names },
            )
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ApiTls {
        config: Arc::new(tls),
        source,
    })
}

/// Checks that `cert` holds a certificate chain and `key` the key that goes with it
/// (`--check-config`).
pub fn check_files(cert: &Path, key: &Path) -> Result<(), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(read_chain(cert)?, read_key(key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(())
}

/// SHA-256 of the cluster CA certificate (hex): what an operator compares at first login.
pub fn ca_fingerprint(keys: &RootKeys) -> String {
    fingerprint(keys.ca_der().as_ref())
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no certificate in PEM".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(format!("no private key: {e}")))
}

/// `GET /v1/cluster/ca`: the cluster CA certificate (PEM). Public: a certificate is no
/// secret, and a client fetching it without trust must check its fingerprint.
pub async fn cluster_ca(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/x-pem-file")],
        state.keys.ca_pem.clone(),
    )
}

/// The API's bound listener: plain TCP (loopback only, validated) or TLS.
pub enum ApiListener {
    /// Plain HTTP.
    Plain(TcpListener),
    /// HTTPS.
    Tls(TlsListener),
}

/// Serves `router` on `listener` until `stop` completes.
pub async fn serve(
    listener: ApiListener,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener {
        ApiListener::Plain(l) => {
            // As over TLS: a reply's last segment must not wait for the client's ACK.
            let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, router).with_graceful_shutdown(stop).await
        }
        ApiListener::Tls(l) => axum::serve(l, router).with_graceful_shutdown(stop).await,
    }
}

/// A TCP listener whose connections come out TLS-established. Handshakes run in their own
/// tasks (bounded in number and time), so a slow client never holds up the others.
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `config`.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let accept_task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            incoming,
            local_addr,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> ControllerConfig {
        let mut c = ControllerConfig::dev(Path::new("/tmp"), "127.0.0.1:0".parse().expect("addr"));
        c.insecure_http = false;
        c
    }

    #[test]
    fn tls_settings_are_checked() {
        assert!(validate(&config()).is_ok());
        let mut c = config();
        c.tls_cert_file = Some("cert.pem".into());
        assert!(
            matches!(validate(&c), Err(ConfigError::Invalid { key, .. }) if key == "tls_key_file")
        );
        c.tls_key_file = Some("key.pem".into());
        assert!(validate(&c).is_ok());
        c.insecure_http = true;
        assert!(validate(&c).is_err());
        let mut c = config();
        c.tls_names = vec!["w1.worker.postern.internal".into()];
        assert!(validate(&c).is_err());
    }

    #[test]
    fn env_names_and_defaults() {
        let mut c = config();
        apply_env(&mut c, &|k| {
            (k == "POSTERN_TLS_NAMES").then(|| "a.example, 10.0.0.5".into())
        });
        assert_eq!(c.tls_names, ["a.example", "10.0.0.5"]);
        assert_eq!(
            default_names("10.1.2.3:9200".parse().expect("addr")),
            ["localhost", "127.0.0.1", "::1", "10.1.2.3"]
        );
        assert_eq!(
            default_names("0.0.0.0:9200".parse().expect("addr")).len(),
            3
        );
    }
}
