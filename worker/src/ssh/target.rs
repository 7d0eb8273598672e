//! The target-facing side: the worker's own SSH connection to the target, logged in with the
//! brokered credential (private key, password, or a certificate the controller signs for a
//! key made for this session). The target's host key is learnt on first use per `host:port`
//! and must not change afterwards (`ssh_known_hosts` in the data directory).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postern_proto::cluster::{Credential, WorkerMessage};
use russh::client::{self, AuthResult};
use russh::keys::{
    Certificate, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::Channel;

use super::server::Ctx;
use super::{request, Answer, RequestError};

/// How long reaching and logging in to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Channel window towards the target; see the server side's.
const WINDOW: u32 = 8 * 1024 * 1024;

/// Why the worker could not log in to the target (target or controller side).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TargetError {
    /// No credential is configured for the target.
    #[error("target '{0}' has no brokered credential: an admin sets one with `postern credentials set {0}`")]
    NoCredential(String),
    /// The session has no login to use.
    #[error("no login for this session")]
    NoLogin,
    /// The target's address is not `host:port`.
    #[error("invalid target address '{0}'")]
    BadAddress(String),
    /// The target could not be reached or the SSH handshake failed (target side).
    #[error("cannot reach target {endpoint}: {reason}")]
    Unreachable {
        /// The target.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The target's host key differs from the one learnt earlier (target side).
    #[error("the host key of target {0} has changed: refusing to log in (remove its line from the worker's ssh_known_hosts if the change is expected)")]
    HostKeyChanged(String),
    /// The target refused the login (target side), with a hint for the credential used.
    #[error("the target refused the login as '{0}'{1}")]
    LoginRefused(String, &'static str),
    /// The brokered key cannot be used.
    #[error("the brokered SSH key is unusable: {0}")]
    BadKey(String),
    /// The controller did not sign a certificate (controller side).
    #[error("no SSH certificate from the controller: {0}")]
    Certificate(#[from] RequestError),
}

/// A logged-in connection to the target.
pub(crate) struct Target {
    handle: client::Handle<TargetHandler>,
}

impl Target {
    /// Opens a session channel on the target.
    pub(crate) async fn open_channel(&self) -> Result<Channel<client::Msg>, russh::Error> {
        self.handle.channel_open_session().await
    }
}

/// Connects and logs in to the session's target.
pub(crate) async fn connect(ctx: &Ctx) -> Result<Target, TargetError> {
    let session = &ctx.session;
    let credential = session
        .grant
        .credential
        .as_ref()
        .ok_or_else(|| TargetError::NoCredential(session.claims.target.to_string()))?;
    let login = ctx.login.clone().ok_or(TargetError::NoLogin)?;
    let endpoint = session.endpoint.clone();
    let (host, port) = split_endpoint(&endpoint)?;
    let unreachable = |reason: String| TargetError::Unreachable {
        endpoint: endpoint.clone(),
        reason,
    };
    let config = client::Config {
        client_id: russh::SshId::Standard("SSH-2.0-Postern".into()),
        window_size: WINDOW,
        channel_buffer_size: 256,
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let changed = Arc::new(Mutex::new(None));
    let handler = TargetHandler {
        host: host.clone(),
        port,
        known_hosts: ctx.shared.ssh.known_hosts.clone(),
        changed: changed.clone(),
    };
    let connecting = async {
        let tcp = tokio::net::TcpStream::connect(endpoint.as_str())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        client::connect_stream(Arc::new(config), tcp, handler)
            .await
            .map_err(|e| {
                match changed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                {
                    Some(()) => TargetError::HostKeyChanged(endpoint.clone()),
                    None => unreachable(e.to_string()),
                }
            })
    };
    let mut handle = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| unreachable("no answer within 15 s".into()))??;
    let auth = match credential {
        Credential::SshPrivateKey {
            private_key_pem, ..
        } => {
            let key = russh::keys::decode_secret_key(private_key_pem.expose(), None)
                .map_err(|e| TargetError::BadKey(e.to_string()))?;
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .flatten();
            handle
                .authenticate_publickey(&login, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
        }
        Credential::Password { password, .. } => {
            handle
                .authenticate_password(&login, password.expose())
                .await
        }
        Credential::SshCertificate { .. } => {
            let (key, cert) = certificate(ctx, &login).await?;
            handle
                .authenticate_openssh_cert(&login, Arc::new(key), cert)
                .await
        }
        _ => return Err(TargetError::BadKey("unsupported credential kind".into())),
    };
    // In certificate mode the usual cause is a target that does not trust the CA yet.
    let hint = match credential {
        Credential::SshCertificate { .. } => {
            " (certificate mode: its sshd must list the controller's SSH CA, from `postern \
             credentials set TARGET --ssh-ca` or GET /v1/ssh/ca, in TrustedUserCAKeys, and the \
             login must exist there)"
        }
        _ => "",
    };
    match auth {
        Ok(AuthResult::Success) => Ok(Target { handle }),
        Ok(AuthResult::Failure { .. }) => Err(TargetError::LoginRefused(login, hint)),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Certificate mode: a fresh key for this session and the controller's certificate for it.
async fn certificate(ctx: &Ctx, login: &str) -> Result<(PrivateKey, Certificate), TargetError> {
    let key = super::new_ed25519_key().map_err(TargetError::BadKey)?;
    let public_key = key
        .public_key()
        .to_openssh()
        .map_err(|e| TargetError::BadKey(e.to_string()))?;
    let answer = request(&ctx.shared, |id| WorkerMessage::SignSshCertificate {
        id,
        session_id: ctx.session.id.clone(),
        principal: login.to_owned(),
        public_key,
    })
    .await?;
    let text = match answer {
        Answer::Certificate(Ok(text)) => text,
        Answer::Certificate(Err(why)) => return Err(RequestError::Refused(why).into()),
        Answer::RecordingStarted(_) => {
            return Err(RequestError::Unavailable("the controller answered another request").into())
        }
    };
    let cert = Certificate::from_openssh(&text)
        .map_err(|e| TargetError::BadKey(format!("certificate from the controller: {e}")))?;
    Ok((key, cert))
}

fn split_endpoint(endpoint: &str) -> Result<(String, u16), TargetError> {
    let bad = || TargetError::BadAddress(endpoint.to_owned());
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host.to_owned(), port))
}

/// Checks the target's host key against the one learnt on first use.
struct TargetHandler {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    /// Set when the key changed, so the error can say so.
    changed: Arc<Mutex<Option<()>>>,
}

impl TargetHandler {
    fn check(&self, key: &PublicKey) -> bool {
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(
                    host = %self.host,
                    port = self.port,
                    fingerprint = %key.fingerprint(Default::default()),
                    "learning the target's SSH host key"
                );
                if let Err(e) = russh::keys::known_hosts::learn_known_hosts_path(
                    &self.host,
                    self.port,
                    key,
                    &self.known_hosts,
                ) {
                    tracing::warn!("cannot remember the target's host key: {e}");
                }
                true
            }
            Err(russh::keys::Error::KeyChanged { .. }) => {
                *self.changed.lock().unwrap_or_else(PoisonError::into_inner) = Some(());
                false
            }
            Err(e) => {
                tracing::warn!("cannot read the worker's ssh_known_hosts: {e}");
                false
            }
        }
    }
}

impl client::Handler for TargetHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => PublicKey::from(cert.public_key().clone()),
        };
        Ok(self.check(&key))
    }
}
