//! One relayed session channel. The server callbacks hand everything the engineer sends
//! (data, EOF, requests) to an ordered queue that one task writes to the target; a second
//! task carries the target's output, EOF and exit status back and hands the target's request
//! replies to the callbacks. The channel's exec command is audited with its exit status when
//! it ends.
//!
//! Why a queue: russh grants the engineer window as data arrives and pushes back only by
//! holding up its connection task. If the callbacks waited for the target's window, the
//! engineer's window adjustments (for target → engineer data) would wait too, and a stream
//! flowing both ways at once (`cat` through the session) would stall for good. So the
//! callbacks never wait; instead, while more than [`BACKLOG`] bytes are queued, the server
//! shrinks the window it grants to a trickle ([`TRICKLE_WINDOW`], see
//! `server::Hop::adjust_window`), which bounds the queue and keeps every task moving.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use russh::server::{self, Msg};
use russh::{client, Channel, ChannelId, ChannelMsg, ChannelWriteHalf, Pty, Sig};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::recording::Recorder;
use super::server::Ctx;

/// Engineer → target bytes queued per channel beyond which the engineer's window shrinks.
const BACKLOG: usize = 8 * 1024 * 1024;
/// The window granted to the engineer while a channel is backlogged: small, but never zero,
/// so that each trickle of data is a chance to open it again once the target caught up.
pub(crate) const TRICKLE_WINDOW: u32 = 4 * 1024;

/// What the engineer sent, in order, for the target.
pub(crate) enum Up {
    Data(Bytes),
    ExtendedData(u32, Bytes),
    Eof,
    Close,
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: Vec<(Pty, u32)>,
    },
    Env(String, String),
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    WindowChange(u32, u32, u32, u32),
    Signal(Sig),
}

/// Bytes queued towards the target.
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
}

/// Default terminal size recorded when the client asked for no pty.
const DEFAULT_SIZE: (u32, u32) = (80, 24);
/// A recorded channel quiet for this long ships what it has buffered.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// What the callbacks and the target → engineer task share about a channel.
#[derive(Default)]
struct Meta {
    pty: Option<(u32, u32, String)>,
    recorder: Option<Recorder>,
    command: Option<String>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
}

/// The engineer-facing callbacks' view of a relayed channel.
pub(crate) struct ChannelLink {
    up: mpsc::UnboundedSender<Up>,
    backlog: Arc<Backlog>,
    replies: mpsc::UnboundedReceiver<bool>,
    meta: Arc<Mutex<Meta>>,
}

impl ChannelLink {
    /// Whether more engineer → target data is queued than [`BACKLOG`]: then the window the
    /// engineer is granted shrinks to a trickle until the target catches up.
    pub(crate) fn backlogged(&self) -> bool {
        self.backlog.bytes.load(Ordering::Acquire) > BACKLOG
    }

    /// Queues `msg` for the target; false if the target channel is gone.
    pub(crate) fn send(&self, msg: Up) -> bool {
        self.up.send(msg).is_ok()
    }

    /// Queues data for the target (never waits: see the module comment).
    pub(crate) fn send_data(&self, ext: Option<u32>, data: Bytes) -> bool {
        self.backlog.bytes.fetch_add(data.len(), Ordering::AcqRel);
        let msg = match ext {
            None => Up::Data(data),
            Some(ext) => Up::ExtendedData(ext, data),
        };
        self.send(msg)
    }

    /// Waits for the target's reply to the last forwarded request.
    pub(crate) async fn reply(&mut self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.replies.recv()).await,
            Ok(Some(true))
        )
    }

    pub(crate) fn set_pty(&mut self, term: &str, cols: u32, rows: u32) {
        self.meta().pty = Some((cols, rows, term.to_owned()));
    }

    /// Terminal size and type for the recording header.
    pub(crate) fn pty(&self) -> (u32, u32, Option<String>) {
        match &self.meta().pty {
            Some((cols, rows, term)) => (*cols, *rows, Some(term.clone())),
            None => (DEFAULT_SIZE.0, DEFAULT_SIZE.1, None),
        }
    }

    /// Whether the engineer asked for a terminal on this channel.
    pub(crate) fn on_terminal(&self) -> bool {
        self.meta().pty.is_some()
    }

    pub(crate) fn set_recorder(&mut self, recorder: Recorder) {
        self.meta().recorder = Some(recorder);
    }

    pub(crate) fn set_exec(&mut self, command: String) {
        self.meta().command = Some(command);
    }

    /// Records what the engineer typed, if the channel is recorded.
    pub(crate) fn input(&self, data: &[u8]) {
        if let Some(r) = self.meta().recorder.as_mut() {
            r.input(data);
        }
    }

    /// Records a terminal resize, if the channel is recorded.
    pub(crate) fn resized(&self, cols: u32, rows: u32) {
        if let Some(r) = self.meta().recorder.as_mut() {
            r.resize(cols, rows);
        }
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        lock(&self.meta)
    }
}

/// Links the engineer's `channel` to the target's; returns the callbacks' side and the
/// two relay tasks (engineer → target, target → engineer).
pub(crate) fn link(
    ctx: Arc<Ctx>,
    channel: Channel<Msg>,
    handle: server::Handle,
    target: Channel<client::Msg>,
    connection: watch::Receiver<()>,
) -> (
    ChannelLink,
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let id = channel.id();
    // Engineer → target messages reach the callbacks; the read half is not needed.
    let (_, to_client) = channel.split();
    let (from_target, to_target) = target.split();
    // The target's replies to forwarded requests, in order.
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let meta = Arc::new(Mutex::new(Meta::default()));
    let link = ChannelLink {
        up: up_tx,
        backlog: backlog.clone(),
        replies: reply_rx,
        meta: meta.clone(),
    };
    let up = upstream(up_rx, connection, to_target, backlog);
    let down = downstream(ctx, id, from_target, to_client, handle, reply_tx, meta);
    (link, up, down)
}

/// Engineer → target: writes the queued messages in order, each waiting for the target's
/// window. When the engineer's connection goes (the session was cut, or its client left)
/// before the channel was closed, the target is asked to end the channel's command and the
/// channel is closed ([`hang_up`]): a command without a terminal gets no hang-up of its own
/// from sshd and would run on. So this task is not aborted with the connection: it learns
/// of its end from `connection` (whose sender the connection's handler holds), also while
/// it waits on a write the target does not take.
async fn upstream(
    mut queue: mpsc::UnboundedReceiver<Up>,
    mut connection: watch::Receiver<()>,
    to_target: ChannelWriteHalf<client::Msg>,
    backlog: Arc<Backlog>,
) {
    loop {
        let written = tokio::select! {
            biased;
            msg = queue.recv() => match msg {
                Some(msg) => {
                    tokio::select! {
                        more = relay(&to_target, msg, &backlog) => Ok(more),
                        // Only the handler's end wakes this: nothing is ever sent.
                        _ = connection.changed() => Err(Gone),
                    }
                }
                // Every sender is gone, and no `Close` came first.
                None => Err(Gone),
            },
            _ = connection.changed() => Err(Gone),
        };
        match written {
            Ok(true) => {}
            Ok(false) => break,
            Err(Gone) => {
                hang_up(&to_target).await;
                break;
            }
        }
    }
    // Nothing drains the queue any more: stop throttling the engineer.
    backlog.bytes.store(0, Ordering::Release);
}

/// The engineer's side went without closing the channel.
struct Gone;

/// How long telling the target that the engineer is gone may take.
const HANG_UP_GRACE: Duration = Duration::from_secs(2);

/// Asks the target to end the channel's command (SIGTERM), then closes the channel.
async fn hang_up(to_target: &ChannelWriteHalf<client::Msg>) {
    let told = async {
        let _ = to_target.signal(Sig::TERM).await;
        let _ = to_target.close().await;
    };
    let _ = tokio::time::timeout(HANG_UP_GRACE, told).await;
}

/// Writes one queued message to the target; false once the channel is closed or the target
/// is gone.
async fn relay(to_target: &ChannelWriteHalf<client::Msg>, msg: Up, backlog: &Backlog) -> bool {
    let written: Result<(), russh::Error> = match msg {
        Up::Data(data) | Up::ExtendedData(_, data) if data.is_empty() => Ok(()),
        Up::Data(data) => {
            let n = data.len();
            let r = to_target.data_bytes(data).await;
            drained(backlog, n);
            r
        }
        Up::ExtendedData(ext, data) => {
            let n = data.len();
            let r = to_target.extended_data_bytes(ext, data).await;
            drained(backlog, n);
            r
        }
        Up::Eof => to_target.eof().await,
        Up::Close => {
            let _ = to_target.close().await;
            return false;
        }
        Up::Pty {
            term,
            cols,
            rows,
            pix_width,
            pix_height,
            modes,
        } => {
            to_target
                .request_pty(true, &term, cols, rows, pix_width, pix_height, &modes)
                .await
        }
        // Sent without want-reply by OpenSSH; the target's AcceptEnv decides.
        Up::Env(name, value) => to_target.set_env(false, name, value).await,
        Up::Shell => to_target.request_shell(true).await,
        Up::Exec(command) => to_target.exec(true, command).await,
        Up::Subsystem(name) => to_target.request_subsystem(true, name).await,
        Up::WindowChange(c, r, pw, ph) => to_target.window_change(c, r, pw, ph).await,
        Up::Signal(sig) => to_target.signal(sig).await,
    };
    if written.is_err() {
        tracing::debug!("target channel gone while relaying from the engineer");
    }
    written.is_ok()
}

fn drained(backlog: &Backlog, n: usize) {
    backlog.bytes.fetch_sub(n, Ordering::AcqRel);
}

/// Target → engineer: data, end of data, exit status, replies; then the audit.
async fn downstream(
    ctx: Arc<Ctx>,
    id: ChannelId,
    mut from_target: russh::ChannelReadHalf,
    to_client: ChannelWriteHalf<Msg>,
    handle: server::Handle,
    replies: mpsc::UnboundedSender<bool>,
    meta: Arc<Mutex<Meta>>,
) {
    let _audit = ExecAudit {
        ctx: ctx.clone(),
        meta: meta.clone(),
    };
    loop {
        // A quiet shell still has its last output shipped to the recording store.
        let msg = match tokio::time::timeout(IDLE_FLUSH, from_target.wait()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(_) => {
                if let Some(r) = lock(&meta).recorder.as_mut() {
                    r.flush();
                }
                continue;
            }
        };
        let sent = match msg {
            ChannelMsg::Data { data } => {
                output(&meta, &data);
                to_client.data_bytes(data).await.is_ok()
            }
            ChannelMsg::ExtendedData { data, ext } => {
                output(&meta, &data);
                to_client.extended_data_bytes(ext, data).await.is_ok()
            }
            ChannelMsg::Eof => to_client.eof().await.is_ok(),
            ChannelMsg::ExitStatus { exit_status } => {
                lock(&meta).exit_status = Some(exit_status);
                to_client.exit_status(exit_status).await.is_ok()
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                lock(&meta).exit_signal = Some(format!("{signal_name:?}"));
                handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
                    .is_ok()
            }
            ChannelMsg::XonXoff { client_can_do } => {
                handle.xon_xoff_request(id, client_can_do).await.is_ok()
            }
            ChannelMsg::Success => replies.send(true).is_ok(),
            ChannelMsg::Failure => replies.send(false).is_ok(),
            ChannelMsg::Close => break,
            _ => true,
        };
        if !sent {
            tracing::debug!("engineer channel gone while relaying from the target");
            break;
        }
    }
    let _ = to_client.close().await;
}

/// Tells the engineer why the channel cannot be relayed, then closes it.
pub(crate) async fn fail(handle: server::Handle, id: ChannelId, why: String) {
    let message = format!("postern: cannot open a channel on the target: {why}\r\n");
    let _ = handle.extended_data(id, 1, Bytes::from(message)).await;
    let _ = handle.exit_status_request(id, 255).await;
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

fn output(meta: &Mutex<Meta>, data: &[u8]) {
    if let Some(r) = lock(meta).recorder.as_mut() {
        r.output(data);
    }
}

/// Audits an exec command with its exit status when the channel ends, however it ends;
/// ending the recording (dropping the recorder) comes with it.
struct ExecAudit {
    ctx: Arc<Ctx>,
    meta: Arc<Mutex<Meta>>,
}

impl Drop for ExecAudit {
    fn drop(&mut self) {
        let mut meta = lock(&self.meta);
        meta.recorder = None;
        if let Some(command) = meta.command.take() {
            self.ctx.audit(
                "ssh.exec",
                json!({
                    "command": command,
                    "exit_status": meta.exit_status,
                    "exit_signal": meta.exit_signal,
                    "login": self.ctx.login,
                }),
            );
        }
    }
}

fn lock(m: &Mutex<Meta>) -> std::sync::MutexGuard<'_, Meta> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
