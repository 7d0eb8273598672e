//! The `ssh` proxy (DESIGN §6): each proxied stream of an `ssh` session carries one SSH
//! connection from the engineer's `ssh`. The worker terminates it (russh server, host key
//! pinned by the CLI through the authorization), logs in to the target itself with the
//! brokered credential (russh client), and relays channel by channel: shell, exec, subsystem
//! (sftp), pty and window changes. Forwarding (agent, TCP, X11, Unix sockets) is refused and
//! audited; shells are recorded (asciicast v2), exec commands audited with their exit status.
//!
//! # Layout
//! - `server`: the engineer-facing side: host key, client-key check, channel callbacks.
//! - `target`: the target-facing side: connection, brokered login, target host key check.
//! - `channel`: one relayed channel: an ordered queue and task towards the target, a task
//!   back to the engineer, flow control, the exec audit.
//! - `recording`: the asciicast v2 encoder and the sink that streams it to the controller.
//! - `stream`: the proxied QUIC stream, with byte counts.
//!
//! The engineer's SSH hop authenticates with the session's own client key (the P-256 key
//! whose certificate proved possession in the QUIC handshake and whose thumbprint the token
//! carries in `cnf`): another local user who reaches the CLI's local port cannot log in.

mod channel;
mod recording;
mod server;
mod stream;
mod target;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postern_proto::cluster::WorkerMessage;
use quinn::{Connection, RecvStream, SendStream};
use russh::keys::PrivateKey;
use tokio::sync::oneshot;

use crate::state::{LinkState, Session, Shared, StreamGuard};

/// How long the controller may take to answer a recording start or a certificate request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// File name of the worker's SSH host key in its data directory.
const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// File name of the target host keys learnt on first use.
const KNOWN_HOSTS_FILE: &str = "ssh_known_hosts";

/// Why the SSH host key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[error("SSH host key {path}: {reason}")]
pub struct HostKeyError {
    path: PathBuf,
    reason: String,
}

/// Why a request to the controller failed (controller side).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// The controller refused.
    #[error("{0}")]
    Refused(String),
    /// The controller could not be asked or did not answer.
    #[error("{0}")]
    Unavailable(&'static str),
}

/// An answer from the controller to one of the SSH proxy's requests.
#[derive(Debug)]
pub(crate) enum Answer {
    /// `RecordingStarted`: `None`, or why the recording cannot be stored.
    RecordingStarted(Option<String>),
    /// `SshCertificate`: the certificate, or why not.
    Certificate(Result<String, String>),
}

/// What the SSH proxy keeps for the worker's life: its host key, where target host keys are
/// remembered, and requests awaiting the controller's answer.
pub(crate) struct SshShared {
    host_key: PrivateKey,
    host_key_line: String,
    known_hosts: PathBuf,
    next_request: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
}

impl SshShared {
    /// Loads the host key from `data_dir`, creating it on first start.
    pub(crate) fn load_or_create(data_dir: &Path) -> Result<Self, HostKeyError> {
        let path = data_dir.join(HOST_KEY_FILE);
        let err = |reason: String| HostKeyError {
            path: path.clone(),
            reason,
        };
        let host_key = match std::fs::read_to_string(&path) {
            Ok(text) => {
                russh::keys::decode_secret_key(&text, None).map_err(|e| err(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = new_ed25519_key().map_err(err)?;
                let text = key
                    .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                    .map_err(|e| err(e.to_string()))?;
                write_private(&path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
                key
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let host_key_line = host_key
            .public_key()
            .to_openssh()
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            host_key,
            host_key_line,
            known_hosts: data_dir.join(KNOWN_HOSTS_FILE),
            next_request: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The host public key, OpenSSH one-line form (reported in the worker hello).
    pub(crate) fn host_key_line(&self) -> &str {
        &self.host_key_line
    }

    /// Completes request `id` with the controller's answer.
    pub(crate) fn complete(&self, id: u64, answer: Answer) {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        match tx {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => tracing::debug!(id, "answer to an SSH request no longer awaited"),
        }
    }
}

/// Sends the request `make(id)` to the controller and waits for its answer.
async fn request(
    shared: &Shared,
    make: impl FnOnce(u64) -> WorkerMessage,
) -> Result<Answer, RequestError> {
    if !matches!(*shared.link().borrow(), LinkState::Up) {
        return Err(RequestError::Unavailable(
            "the worker is not connected to its controller",
        ));
    }
    let ssh = &shared.ssh;
    let id = ssh.next_request.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    let lock = || ssh.pending.lock().unwrap_or_else(PoisonError::into_inner);
    lock().insert(id, tx);
    if !shared.try_report(make(id)) {
        lock().remove(&id);
        return Err(RequestError::Unavailable(
            "the worker's queue to its controller is full",
        ));
    }
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, rx).await;
    lock().remove(&id);
    match answer {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(RequestError::Unavailable(
            "the worker lost its controller while waiting for an answer",
        )),
        Err(_) => Err(RequestError::Unavailable(
            "the controller did not answer within 5 s",
        )),
    }
}

/// Serves one SSH connection of `session` on a proxied stream (already answered `ConnOk`),
/// until the engineer's client or the session ends, then reports the connection closed.
pub(crate) async fn serve(
    conn: Connection,
    session: Arc<Session>,
    shared: Arc<Shared>,
    send: SendStream,
    recv: RecvStream,
    guard: StreamGuard,
) {
    let counter = Arc::new(stream::Counter::default());
    let stream = stream::CountedStream::new(tokio::io::join(recv, send), counter.clone());
    let reason = server::run(conn.clone(), session.clone(), shared.clone(), stream).await;
    let reason = crate::relay::why_ended(&session, &conn, reason);
    let (up, down) = counter.totals();
    shared.connection_closed(&session, guard, up, down, reason);
}

/// A fresh Ed25519 key from the operating system's random source.
pub(crate) fn new_ed25519_key() -> Result<PrivateKey, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    Ok(PrivateKey::from(pair))
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}
