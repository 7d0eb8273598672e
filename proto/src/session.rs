//! Client ↔ worker messages (ALPN `postern-session/1`).
//!
//! The first bidirectional stream of a session connection carries [`SessionHello`] and gets a
//! [`SessionReply`]. Every later bidirectional stream is one proxied TCP connection: the client
//! sends [`ConnOpen`], the worker answers [`ConnReply`], then raw bytes flow both ways and a
//! stream finish carries TCP half-close.

use serde::{Deserialize, Serialize};

use crate::ids::SessionId;

/// First frame of a session connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionHello {
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The signed session authorization.
    pub token: String,
    /// The controller said it pushed this session's grant to the worker
    /// (`Authorization::grant_pushed`): the worker waits briefly for it rather than ask.
    #[serde(default)]
    pub grant_pushed: bool,
}

/// The worker's answer to [`SessionHello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionReply {
    /// The session is active on this worker.
    Accepted {
        /// Session id.
        session_id: SessionId,
        /// When the worker ends the session (Unix seconds).
        expires_at: i64,
        /// Maximum number of connections, if any.
        connection_limit: Option<u32>,
        /// Which of the worker's session lanes (one-thread endpoints sharing its session
        /// port) serves this connection, if it has more than one: a client spreading a
        /// session over several connections dials again when two land on the same lane.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lane: Option<u32>,
    },
    /// The session was refused; the connection is closed after this frame.
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// What went wrong, for a person.
        message: String,
    },
}

/// Why a session or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalCode {
    /// The hello frame could not be parsed.
    Malformed,
    /// Protocol version not supported.
    Version,
    /// Token signature invalid or from another controller.
    BadSignature,
    /// Token expired.
    Expired,
    /// Token bound to a different client key.
    KeyMismatch,
    /// Token is for another worker.
    WrongWorker,
    /// The controller refused activation (cancelled, user locked, …).
    Revoked,
    /// The controller could not be reached to activate the session.
    ControllerUnavailable,
    /// Connection limit reached.
    ConnectionLimit,
    /// The target could not be reached.
    TargetUnreachable,
    /// Anything else.
    Internal,
}

/// First frame of each proxied-connection stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnOpen {
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
}

/// The worker's answer to [`ConnOpen`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnReply {
    /// The target connection is open; raw bytes follow.
    Ok,
    /// The connection was refused; the stream ends.
    Refused {
        /// Machine-readable reason.
        code: RefusalCode,
        /// What went wrong, for a person.
        message: String,
    },
}

/// QUIC application close codes on a session connection.
pub mod close {
    /// The client ended the session normally.
    pub const CLIENT_DONE: u32 = 0;
    /// The session was refused at hello.
    pub const REFUSED: u32 = 1;
    /// The session expired.
    pub const EXPIRED: u32 = 2;
    /// The session was cancelled (the reason text says by whom).
    pub const CANCELLED: u32 = 3;
    /// The worker is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// A protocol violation by the peer.
    pub const PROTOCOL: u32 = 5;
}
