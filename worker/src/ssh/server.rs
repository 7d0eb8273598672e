//! The engineer-facing SSH server: accepts only the session's client key, logs in to the
//! target once the engineer is authenticated, and answers channel requests with the target's
//! own answers. Forwarding of any kind is refused and audited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::Connection;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, PublicKeyOffer, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::channel::{self, ChannelLink, Up};
use super::recording::Recorder;
use super::target::{self, Target};
use crate::state::{Session, Shared};

/// How long the target may take to answer a channel request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of a channel's window towards the engineer's client, and of the client → worker
/// message buffer: large enough that a bulk copy is not held up by round trips.
const WINDOW: u32 = 8 * 1024 * 1024;

/// Why the SSH connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    /// The SSH protocol failed (client side).
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
}

/// What every part of one SSH connection needs to know.
pub(crate) struct Ctx {
    pub(crate) session: Arc<Session>,
    pub(crate) shared: Arc<Shared>,
    /// The login on the target: the authorized one, else the credential's own user.
    pub(crate) login: Option<String>,
}

impl Ctx {
    /// Sends an audit event for this session.
    pub(crate) fn audit(&self, action: &str, details: serde_json::Value) {
        self.shared.audit(&self.session.id, action, &details);
    }
}

/// Runs the SSH server on `stream` until the client leaves or the QUIC connection closes;
/// returns why it ended.
pub(crate) async fn run<S>(
    conn: Connection,
    session: Arc<Session>,
    shared: Arc<Shared>,
    stream: S,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let login = session.claims.login.clone().or_else(|| {
        session
            .grant
            .credential
            .as_ref()
            .map(|c| c.username().to_owned())
    });
    let config = server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Postern".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![shared.ssh.host_key.clone()],
        // The session has its own expiry; the QUIC connection has its keep-alives.
        inactivity_timeout: None,
        window_size: WINDOW,
        channel_buffer_size: 256,
        nodelay: true,
        ..Default::default()
    };
    let ctx = Arc::new(Ctx {
        session,
        shared,
        login,
    });
    let handler = Hop {
        ctx,
        thumbprint: expected_thumbprint(&conn),
        target: None,
        links: HashMap::new(),
        tasks: JoinSet::new(),
        connection: watch::channel(()).0,
    };
    let running = match server::run_stream(Arc::new(config), stream, handler).await {
        Ok(running) => running,
        Err(e) => return format!("ssh handshake failed: {e}"),
    };
    tokio::select! {
        r = running => match r {
            Ok(()) => "closed".to_owned(),
            Err(e) => e.to_string(),
        },
        e = conn.closed() => crate::listener::describe_close(&e),
    }
}

/// SHA-256 thumbprint of the session's client key, from the QUIC handshake.
fn expected_thumbprint(conn: &Connection) -> Option<String> {
    crate::tls::client_spki(conn).map(|spki| postern_proto::token::spki_thumbprint(&spki))
}

/// The DER SubjectPublicKeyInfo of an `ecdsa-sha2-nistp256` key, from its SEC1 point: the
/// form the session's `cnf` thumbprint is computed over.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65-byte point) }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut spki = PREFIX.to_vec();
    spki.extend_from_slice(point);
    spki
}

/// The russh handler of one engineer connection.
struct Hop {
    ctx: Arc<Ctx>,
    thumbprint: Option<String>,
    target: Option<Result<Arc<Target>, String>>,
    links: HashMap<ChannelId, ChannelLink>,
    /// Target → engineer tasks; dropped (aborted) with the connection (the engineer → target
    /// ones end on their own, see `channel::upstream`).
    tasks: JoinSet<()>,
    /// Dropped with the connection, which the engineer → target tasks see.
    connection: watch::Sender<()>,
}

impl Hop {
    /// Whether `key` is the session's client key.
    fn is_session_key(&self, key: &russh::keys::PublicKey) -> bool {
        let Some(expected) = &self.thumbprint else {
            return false;
        };
        let Some(russh::keys::ssh_key::public::EcdsaPublicKey::NistP256(point)) =
            key.key_data().ecdsa()
        else {
            return false;
        };
        let spki = p256_spki(point.as_bytes());
        &postern_proto::token::spki_thumbprint(&spki) == expected
    }

    /// Forwards a request that wants a reply and relays the target's answer (here, in the
    /// callback: russh keeps one want-reply flag per channel, so a later request would
    /// swallow a deferred answer).
    async fn forward_and_reply(
        &mut self,
        channel: ChannelId,
        session: &mut server::Session,
        request: Up,
    ) -> Result<bool, russh::Error> {
        let ok = match self.links.get_mut(&channel) {
            Some(link) if link.send(request) => link.reply(REPLY_TIMEOUT).await,
            _ => false,
        };
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(ok)
    }

    /// Starts recording `channel` (a shell, or `command` on a terminal); whether it may go
    /// on. An interaction that cannot be recorded is refused, with the reason on the
    /// channel's stderr (DESIGN §6).
    async fn start_recording(
        &mut self,
        channel: ChannelId,
        session: &mut server::Session,
        command: Option<&str>,
    ) -> Result<bool, russh::Error> {
        let Some(link) = self.links.get(&channel) else {
            session.channel_failure(channel)?;
            return Ok(false);
        };
        let (width, height, term) = link.pty();
        match Recorder::start(&self.ctx, width, height, term).await {
            Ok(recorder) => {
                if let Some(link) = self.links.get_mut(&channel) {
                    link.set_recorder(recorder);
                }
                Ok(true)
            }
            Err(e) => {
                let what = if command.is_some() {
                    "command"
                } else {
                    "shell"
                };
                tracing::warn!(session = %self.ctx.session.id, "{what} refused: {e}");
                self.ctx.audit(
                    "ssh.shell_refused",
                    json!({"error": e.to_string(), "command": command}),
                );
                let message =
                    format!("postern: {what} refused: the session cannot be recorded: {e}\r\n");
                let _ = session.extended_data(channel, 1, Bytes::from(message));
                session.channel_failure(channel)?;
                Ok(false)
            }
        }
    }

    fn refuse(&self, request: &str, details: serde_json::Value) {
        tracing::info!(session = %self.ctx.session.id, request, "ssh forwarding refused");
        let mut details = details;
        if let Some(map) = details.as_object_mut() {
            map.insert("request".into(), json!(request));
        }
        self.ctx.audit("ssh.refused", details);
    }
}

impl server::Handler for Hop {
    type Error = HopError;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.is_session_key(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.is_session_key(key.public_key) {
            return Ok(Auth::reject());
        }
        // The login was decided by the authorization; the user name on this hop is ignored.
        tracing::debug!(session = %self.ctx.session.id, hop_user = user, "ssh client authenticated");
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, _session: &mut server::Session) -> Result<(), Self::Error> {
        let target = target::connect(&self.ctx).await.map(Arc::new);
        if let Err(e) = &target {
            tracing::info!(session = %self.ctx.session.id, "cannot log in to the target: {e}");
            self.ctx
                .audit("ssh.target_failed", json!({"error": e.to_string()}));
        }
        self.target = Some(target.map_err(|e| e.to_string()));
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        let opened = match &self.target {
            Some(Ok(target)) => target.open_channel().await.map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not logged in to the target".to_owned()),
        };
        reply.accept().await;
        match opened {
            Ok(target_channel) => {
                let (link, up, down) = channel::link(
                    self.ctx.clone(),
                    channel,
                    session.handle(),
                    target_channel,
                    self.connection.subscribe(),
                );
                self.links.insert(id, link);
                // Not aborted with the connection: it tells the target when that goes.
                tokio::spawn(up);
                self.tasks.spawn(down);
            }
            Err(e) => {
                let handle = session.handle();
                self.tasks.spawn(channel::fail(handle, id, e));
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        self.refuse(
            "direct-tcpip",
            json!({"host": host_to_connect, "port": port_to_connect}),
        );
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-streamlocal", json!({"path": socket_path}));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11", json!({}));
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("tcpip-forward", json!({"address": address, "port": *port}));
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("streamlocal-forward", json!({"path": socket_path}));
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("auth-agent", json!({}));
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11-req", json!({}));
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get_mut(&channel) {
            link.set_pty(term, col_width, row_height);
        }
        let request = Up::Pty {
            term: term.to_owned(),
            cols: col_width,
            rows: row_height,
            pix_width,
            pix_height,
            modes: modes.to_vec(),
        };
        self.forward_and_reply(channel, session, request).await?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.send(Up::Env(variable_name.into(), variable_value.into()));
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if !self.start_recording(channel, session, None).await? {
            return Ok(());
        }
        self.ctx
            .audit("ssh.shell", json!({"login": self.ctx.login}));
        self.forward_and_reply(channel, session, Up::Shell).await?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        // A command on a terminal (`ssh -t host bash`) is as interactive as a shell, and is
        // recorded like one; without a terminal it is audited with its exit status.
        let on_terminal = self
            .links
            .get(&channel)
            .is_some_and(ChannelLink::on_terminal);
        if on_terminal
            && !self
                .start_recording(channel, session, Some(&command))
                .await?
        {
            return Ok(());
        }
        if let Some(link) = self.links.get_mut(&channel) {
            link.set_exec(command);
        }
        self.forward_and_reply(channel, session, Up::Exec(data.to_vec()))
            .await?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        self.ctx.audit(
            "ssh.subsystem",
            json!({"name": name, "login": self.ctx.login}),
        );
        self.forward_and_reply(channel, session, Up::Subsystem(name.into()))
            .await?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.resized(col_width, row_height);
            link.send(Up::WindowChange(
                col_width, row_height, pix_width, pix_height,
            ));
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.send(Up::Signal(signal));
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.input(data);
            if !link.send_data(None, Bytes::copy_from_slice(data)) {
                tracing::debug!("target channel gone while relaying data");
            }
        }
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        code: u32,
        data: &[u8],
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.send_data(Some(code), Bytes::copy_from_slice(data));
        }
        Ok(())
    }

    /// The window the engineer gets next: normal, or a trickle while the channel's data
    /// waits for a slow target (see `channel`'s module comment).
    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        match self.links.get(&channel) {
            Some(link) if link.backlogged() => channel::TRICKLE_WINDOW,
            _ => WINDOW,
        }
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.get(&channel) {
            link.send(Up::Eof);
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut server::Session,
    ) -> Result<(), Self::Error> {
        if let Some(link) = self.links.remove(&channel) {
            link.send(Up::Close);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p256_spki_matches_rcgen() {
        let key = rcgen::KeyPair::generate().expect("key");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let point = rcgen::PublicKeyData::der_bytes(&key);
        assert_eq!(p256_spki(point), spki);
    }
}
