//! Worker ↔ controller messages (ALPN `postern-cluster/1`).
//!
//! The worker opens one bidirectional control stream right after the mutual-TLS handshake
//! and sends [`WorkerHello`]; the controller answers [`ControllerHello`]. From then on both
//! directions carry [`WorkerMessage`] / [`ControllerMessage`] frames; requests and their
//! answers are matched by `id`.

use serde::{Deserialize, Serialize};

use crate::ids::{Secret, SessionId, WorkerName};

/// First frame on the control stream, from the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerHello {
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The address clients should dial for sessions (`host:port`).
    pub session_addr: String,
    /// Sessions the worker carries now (after a reconnect), so the controller can re-sync.
    pub active_sessions: Vec<SessionId>,
    /// The worker's SSH host public key (OpenSSH one-line form), which `postern ssh` pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<String>,
    /// How clients reach the worker: on its own session listener (`direct`, what a worker
    /// that does not say means) or through the controller it is connected to.
    #[serde(default)]
    pub mode: WorkerMode,
    /// How long this worker process has been running, in milliseconds. A session it does not
    /// list that was activated on it before it started was lost with an earlier process
    /// (killed, crashed), which could not report its end: the controller ends it. A worker
    /// that does not say (one from before this field) leaves such sessions to their expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
}

/// How clients reach a worker's sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum WorkerMode {
    /// The worker listens for sessions at the address of its hello.
    #[default]
    Direct,
    /// The worker accepts no inbound connection: clients dial the relay port of the controller
    /// holding its cluster connection, which carries their QUIC datagrams to it over that
    /// connection ([`crate::relay`]).
    OutboundOnly,
}

impl WorkerMode {
    /// The name used in configs, the store and the API (`direct`, `outbound-only`).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerMode::Direct => "direct",
            WorkerMode::OutboundOnly => "outbound-only",
        }
    }
}

/// The controller's answer to [`WorkerHello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerHello {
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The worker's name, as the controller knows it from its certificate.
    pub worker: WorkerName,
    /// Keys whose session tokens the worker accepts (base64url Ed25519).
    pub session_keys: Vec<String>,
    /// Token issuer expected in `iss`.
    pub issuer: String,
    /// Of `active_sessions` in the hello, those no longer valid: end them now.
    pub cancel: Vec<SessionId>,
    /// The largest frame body the controller reads on this control stream
    /// ([`crate::frame::MAX_CONTROL_FRAME`]). A controller that does not say (one from before
    /// the larger control frames) reads [`crate::frame::MAX_FRAME`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame: Option<u32>,
}

impl ControllerHello {
    /// The largest frame body the worker may send on this control stream: what the
    /// controller said, within what workers send ([`crate::frame::MAX_FRAME`] to
    /// [`crate::frame::MAX_CONTROL_FRAME`]).
    pub fn frame_limit(&self) -> usize {
        use crate::frame::{MAX_CONTROL_FRAME, MAX_FRAME};
        self.max_frame.map_or(MAX_FRAME, |n| {
            usize::try_from(n).map_or(MAX_CONTROL_FRAME, |n| n.clamp(MAX_FRAME, MAX_CONTROL_FRAME))
        })
    }
}

/// Frames from the worker after the hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerMessage {
    /// Ask the controller whether the session may start; answered by
    /// [`ControllerMessage::Activated`] with the same `id`.
    Activate {
        /// Request id.
        id: u64,
        /// Session to activate.
        session_id: SessionId,
    },
    /// The worker started a session on the grant of a [`ControllerMessage::SessionReady`]
    /// (without an [`WorkerMessage::Activate`] round trip): the controller marks it active,
    /// checks it once more against the current policy, and cancels it if it may no longer
    /// run.
    SessionStarted {
        /// The session.
        session_id: SessionId,
    },
    /// A proxied connection ended (asynchronous report).
    ConnectionClosed {
        /// Session the connection belonged to.
        session_id: SessionId,
        /// Bytes from client to target.
        bytes_up: u64,
        /// Bytes from target to client.
        bytes_down: u64,
        /// Why it ended, for the record (`client closed`, `target error: …`).
        reason: String,
    },
    /// The session ended on the worker.
    SessionClosed {
        /// The session.
        session_id: SessionId,
        /// Why (`client closed`, `expired`, …).
        reason: String,
    },
    /// Acknowledges a [`ControllerMessage::CancelSession`].
    CancelAck {
        /// The session.
        session_id: SessionId,
        /// How many open connections were cut.
        connections_cut: u32,
    },
    /// Something that happened inside a session and belongs in the audit log (an SQL
    /// statement, an SSH exec).
    Audit {
        /// The session.
        session_id: SessionId,
        /// Action name, e.g. `postgres.query`, `ssh.exec`.
        action: String,
        /// Details (statement text, database, …).
        details: serde_json::Value,
    },
    /// Start recording an SSH shell channel; answered by [`ControllerMessage::RecordingStarted`]
    /// with the same `id`. Until then the shell does not start: an unrecorded shell is refused.
    RecordingStart {
        /// Request id.
        id: u64,
        /// The session.
        session_id: SessionId,
        /// Recording id chosen by the worker (`r_…`).
        recording_id: String,
        /// The asciicast v2 header line (JSON object, no newline).
        header: String,
    },
    /// More of a recording: asciicast v2 event lines, each ending in a newline.
    RecordingData {
        /// The recording.
        recording_id: String,
        /// The event lines.
        events: String,
    },
    /// The recorded channel closed.
    RecordingEnd {
        /// The recording.
        recording_id: String,
    },
    /// Certificate mode: sign an SSH user certificate for a key the worker generated for
    /// this session; answered by [`ControllerMessage::SshCertificate`] with the same `id`.
    SignSshCertificate {
        /// Request id.
        id: u64,
        /// The session.
        session_id: SessionId,
        /// The principal (login) the certificate is for.
        principal: String,
        /// The worker's ephemeral public key (OpenSSH one-line form).
        public_key: String,
    },
    /// Auditable events from the worker's spool (connection closes, `Audit` records), each
    /// with its own id: the controller stores each once and acknowledges with
    /// [`ControllerMessage::EventsAck`]; until then the worker keeps them on disk and sends
    /// them again after a reconnect.
    Events {
        /// The events, oldest first.
        events: Vec<SpooledEvent>,
    },
    /// Keep-alive with load figures.
    Heartbeat {
        /// Sessions carried now.
        sessions: u32,
        /// Connections carried now.
        connections: u32,
    },
}

/// How the body of an `Events` frame begins: serde writes an internally tagged enum's tag
/// first, then the variant's fields.
const EVENTS_TAG: &[u8] = br#"{"type":"events","#;

impl WorkerMessage {
    /// The frame of an `Events` message whose events are given as their JSON texts (each a
    /// serialized [`SpooledEvent`], as a worker spools it): the same bytes as encoding
    /// `WorkerMessage::Events { events }`, without parsing and serializing them again. Up to
    /// [`crate::frame::MAX_CONTROL_FRAME`]: it goes on the worker's control stream.
    pub fn events_frame<'a>(
        events: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<u8>, crate::frame::FrameError> {
        let mut body = EVENTS_TAG.to_vec();
        body.extend_from_slice(br#""events":["#);
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e);
        }
        body.extend_from_slice(b"]}");
        crate::frame::prefixed_within(&body, crate::frame::MAX_CONTROL_FRAME)
    }

    /// Decodes a frame body from a worker. An `Events` frame, which a busy statement audit
    /// sends many of, is read as a plain struct into [`ReceivedEvent`]s: serde reads an
    /// internally tagged enum by first copying the whole message into a buffer of its own,
    /// then reading that (a second parse of every event), and an `Audit` event's details are
    /// kept as the worker's JSON text, which the controller stores as it is.
    pub fn decode_frame(body: &[u8]) -> Result<WorkerFrame, crate::frame::FrameError> {
        #[derive(Deserialize)]
        struct EventsBody<'a> {
            #[serde(borrow)]
            events: Vec<WireEvent<'a>>,
        }
        if body.starts_with(EVENTS_TAG) {
            let b: EventsBody<'_> = serde_json::from_slice(body).map_err(malformed)?;
            let events = b
                .events
                .into_iter()
                .map(ReceivedEvent::from_wire)
                .collect::<Result<_, _>>()
                .map_err(malformed)?;
            return Ok(WorkerFrame::Events(events));
        }
        crate::frame::decode(body).map(WorkerFrame::Message)
    }
}

fn malformed(e: serde_json::Error) -> crate::frame::FrameError {
    crate::frame::FrameError::Malformed(e.to_string())
}

/// A frame from a worker as the controller reads it ([`WorkerMessage::decode_frame`]).
#[derive(Debug)]
pub enum WorkerFrame {
    /// A [`WorkerMessage::Events`] frame.
    Events(Vec<ReceivedEvent>),
    /// Any other message.
    Message(WorkerMessage),
}

/// A spooled event as the controller receives it.
#[derive(Debug)]
pub struct ReceivedEvent {
    /// Unique id, chosen by the worker.
    pub event_id: String,
    /// When it happened (Unix seconds).
    pub time: i64,
    /// The event.
    pub message: ReceivedMessage,
}

/// What a [`ReceivedEvent`] carries.
#[derive(Debug)]
pub enum ReceivedMessage {
    /// A [`WorkerMessage::Audit`], its details as the worker's JSON text.
    Audit {
        /// The session.
        session_id: SessionId,
        /// Action name.
        action: String,
        /// Details, as JSON text.
        details: Box<serde_json::value::RawValue>,
    },
    /// Any other message (a [`WorkerMessage::ConnectionClosed`]).
    Other(WorkerMessage),
}

/// How a serialized `Audit` message begins (the tag first, as serde writes it).
const AUDIT_TAG: &str = r#"{"type":"audit","#;

/// A [`SpooledEvent`] on the wire, its message not yet read.
#[derive(Deserialize)]
struct WireEvent<'a> {
    event_id: String,
    time: i64,
    #[serde(borrow)]
    message: &'a serde_json::value::RawValue,
}

impl ReceivedEvent {
    fn from_wire(w: WireEvent<'_>) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct AuditBody {
            session_id: SessionId,
            action: String,
            details: Box<serde_json::value::RawValue>,
        }
        let text = w.message.get();
        let message = if text.starts_with(AUDIT_TAG) {
            let b: AuditBody = serde_json::from_str(text)?;
            ReceivedMessage::Audit {
                session_id: b.session_id,
                action: b.action,
                details: b.details,
            }
        } else {
            ReceivedMessage::from(serde_json::from_str::<WorkerMessage>(text)?)
        };
        Ok(ReceivedEvent {
            event_id: w.event_id,
            time: w.time,
            message,
        })
    }
}

impl From<WorkerMessage> for ReceivedMessage {
    fn from(msg: WorkerMessage) -> Self {
        match msg {
            WorkerMessage::Audit {
                session_id,
                action,
                details,
            } => ReceivedMessage::Audit {
                session_id,
                action,
                details: raw_json(&details),
            },
            other => ReceivedMessage::Other(other),
        }
    }
}

impl From<SpooledEvent> for ReceivedEvent {
    fn from(e: SpooledEvent) -> Self {
        ReceivedEvent {
            event_id: e.event_id,
            time: e.time,
            message: ReceivedMessage::from(*e.message),
        }
    }
}

/// The close reason a controller gives a worker whose certificate names no worker it has
/// (deleted, or registered with another cluster).
pub const UNKNOWN_WORKER: &str = "unknown or deleted worker";

/// `value` as JSON text.
pub fn raw_json(value: &serde_json::Value) -> Box<serde_json::value::RawValue> {
    // A `Value` always serializes (its map keys are strings).
    serde_json::value::to_raw_value(value)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
}

/// Frames from the controller after the hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControllerMessage {
    /// Answer to [`WorkerMessage::Activate`].
    Activated {
        /// Request id.
        id: u64,
        /// `None` when the session may start; otherwise why not.
        refused: Option<String>,
        /// What the worker needs to carry the session (present when not refused).
        #[serde(default)]
        grant: Option<SessionGrant>,
    },
    /// A session was just authorized for this worker: its grant, pushed before the client
    /// has the token, so that the client's hello needs no activation round trip. The worker
    /// keeps it until the session's expiry or a [`ControllerMessage::CancelSession`], and
    /// reports its use with [`WorkerMessage::SessionStarted`].
    SessionReady {
        /// The session.
        session_id: SessionId,
        /// When the session expires (Unix seconds).
        expires_at: i64,
        /// What the worker needs to carry the session.
        grant: SessionGrant,
    },
    /// Answer to [`WorkerMessage::RecordingStart`].
    RecordingStarted {
        /// Request id.
        id: u64,
        /// `None` when the recording is being stored; otherwise why not.
        refused: Option<String>,
    },
    /// Answer to [`WorkerMessage::SignSshCertificate`].
    SshCertificate {
        /// Request id.
        id: u64,
        /// The certificate (OpenSSH one-line form) when signed.
        certificate: Option<String>,
        /// Why not, when refused.
        refused: Option<String>,
    },
    /// These spooled events are stored: the worker may forget them.
    EventsAck {
        /// Their ids.
        event_ids: Vec<String>,
    },
    /// End a session now, cutting its connections.
    CancelSession {
        /// The session.
        session_id: SessionId,
        /// Reason shown to the client (`cancelled by admin alice`).
        reason: String,
    },
}

/// `POST /v1/workers/register` body: a worker's first contact, over the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The one-time activation token printed by `postern workers create`.
    pub activation_token: String,
    /// PEM certificate signing request for the key the worker generated.
    pub csr_pem: String,
}

/// Answer to [`RegisterRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The worker's name.
    pub worker: WorkerName,
    /// The worker's certificate (PEM), signed by the cluster CA; valid as TLS client
    /// (towards controllers) and server (towards session clients).
    pub cert_pem: String,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// Controller cluster addresses (`host:port`) to dial over QUIC.
    pub cluster_addrs: Vec<String>,
}

/// `GET /v1/cluster`: where the controllers' cluster listeners are. Unauthenticated (the
/// addresses are not secret; the worker still verifies the controller against its pinned
/// CA), so that a registered worker can follow controllers that moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Controller cluster addresses (`host:port`).
    pub cluster_addrs: Vec<String>,
}

/// What the controller hands a worker when it activates a session: what the protocol
/// proxies need and the client must never see. Kept in memory for the session only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionGrant {
    /// The brokered credential for the target, if one is configured.
    #[serde(default)]
    pub credential: Option<Credential>,
}

/// A brokered target credential. `Debug` hides the secrets ([`Secret`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Credential {
    /// A user name and password (PostgreSQL SCRAM-SHA-256 / MD5, SSH password).
    Password {
        /// User name on the target.
        username: String,
        /// The password.
        password: Secret,
    },
    /// An SSH private key (OpenSSH PEM) and the login it opens.
    SshPrivateKey {
        /// Login on the target.
        username: String,
        /// OpenSSH private key, PEM.
        private_key_pem: Secret,
    },
    /// SSH certificate mode: the worker generates a key per session and has the controller's
    /// SSH user CA sign a certificate for it ([`WorkerMessage::SignSshCertificate`]), valid
    /// for the session only; the target trusts the CA (`TrustedUserCAKeys`).
    SshCertificate {
        /// Default login on the target (the certificate's principal unless the session
        /// names another permitted login).
        username: String,
    },
    /// PostgreSQL zero standing credentials: an admin login (`CREATEROLE`, admin option on
    /// the group roles) with which the worker creates a role for each session, a member of
    /// the group role the session's login names, and drops it when the session ends.
    PostgresAdmin {
        /// The admin role.
        username: String,
        /// Its password.
        password: Secret,
    },
}

impl Credential {
    /// The user name the credential authenticates as.
    pub fn username(&self) -> &str {
        match self {
            Credential::Password { username, .. }
            | Credential::SshPrivateKey { username, .. }
            | Credential::SshCertificate { username }
            | Credential::PostgresAdmin { username, .. } => username,
        }
    }
}

/// One auditable event as the worker spools it: a [`WorkerMessage::ConnectionClosed`] or
/// [`WorkerMessage::Audit`], with the id that makes resending it harmless and the time it
/// happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpooledEvent {
    /// Unique id, chosen by the worker.
    pub event_id: String,
    /// When it happened (Unix seconds).
    pub time: i64,
    /// The event.
    pub message: Box<WorkerMessage>,
}

/// A [`SpooledEvent`] serialized from borrowed parts: the same JSON, its message any
/// `Serialize` (an [`AuditRef`]) instead of an owned [`WorkerMessage`].
#[derive(Serialize)]
pub struct SpooledRef<'a, M: Serialize + ?Sized> {
    /// Unique id, chosen by the worker.
    pub event_id: &'a str,
    /// When it happened (Unix seconds).
    pub time: i64,
    /// The event.
    pub message: &'a M,
}

/// A [`WorkerMessage::Audit`] serialized from borrowed parts, its details any `Serialize`:
/// a statement's details go from the worker's own struct to JSON with no `Value` between.
#[derive(Serialize)]
#[serde(tag = "type", rename = "audit")]
pub struct AuditRef<'a, D: Serialize + ?Sized> {
    /// The session.
    pub session_id: &'a str,
    /// Action name.
    pub action: &'a str,
    /// Details.
    pub details: &'a D,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn audit(details: serde_json::Value) -> WorkerMessage {
        WorkerMessage::Audit {
            session_id: SessionId::from("s_1"),
            action: "postgres.query".into(),
            details,
        }
    }

    #[test]
    fn events_frames_decode_as_the_general_decoder_reads_them() {
        let details = serde_json::json!({"statement": "SELECT 'é\n\"'", "n": 1});
        let closed = WorkerMessage::ConnectionClosed {
            session_id: SessionId::from("s_2"),
            bytes_up: 5,
            bytes_down: 6,
            reason: "closed".into(),
        };
        let events = vec![
            SpooledEvent {
                event_id: "e1".into(),
                time: 7,
                message: Box::new(audit(details.clone())),
            },
            SpooledEvent {
                event_id: "e2".into(),
                time: 8,
                message: Box::new(closed.clone()),
            },
        ];
        let msg = WorkerMessage::Events {
            events: events.clone(),
        };
        let body = &frame::encode(&msg).expect("encode")[4..];
        let WorkerFrame::Events(got) = WorkerMessage::decode_frame(body).expect("decode") else {
            panic!("an Events frame read as another message");
        };
        let want: Vec<ReceivedEvent> = events.into_iter().map(ReceivedEvent::from).collect();
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        let ReceivedMessage::Audit { details: raw, .. } = &got[0].message else {
            panic!("not an audit event: {:?}", got[0]);
        };
        let parsed: serde_json::Value = serde_json::from_str(raw.get()).expect("JSON");
        assert_eq!(parsed, details);

        let heartbeat = WorkerMessage::Heartbeat {
            sessions: 2,
            connections: 3,
        };
        let body = &frame::encode(&heartbeat).expect("encode")[4..];
        assert!(matches!(
            WorkerMessage::decode_frame(body),
            Ok(WorkerFrame::Message(WorkerMessage::Heartbeat {
                sessions: 2,
                connections: 3
            }))
        ));
        // Not an `Events` message after all: refused, not misread.
        assert!(WorkerMessage::decode_frame(br#"{"type":"events","evts":[]}"#).is_err());
        assert!(WorkerMessage::decode_frame(br#"{"type":"events","events":[{}]}"#).is_err());
        let bad_audit = br#"{"type":"events","events":[{"event_id":"e","time":1,"message":{"type":"audit","action":"x"}}]}"#;
        assert!(WorkerMessage::decode_frame(bad_audit).is_err());
    }

    #[test]
    fn borrowed_events_serialize_as_owned_ones() {
        let details = serde_json::json!({"statement": "SELECT 1", "truncated": false});
        let owned = SpooledEvent {
            event_id: "e1".into(),
            time: 7,
            message: Box::new(audit(details.clone())),
        };
        let borrowed = SpooledRef {
            event_id: "e1",
            time: 7,
            message: &AuditRef {
                session_id: "s_1",
                action: "postgres.query",
                details: &details,
            },
        };
        assert_eq!(
            serde_json::to_string(&borrowed).expect("serializes"),
            serde_json::to_string(&owned).expect("serializes")
        );
    }

    #[test]
    fn the_control_frame_limit_is_what_the_controller_says_within_bounds() {
        let hello = |max_frame| ControllerHello {
            version: crate::PROTOCOL_VERSION,
            worker: WorkerName::from("w"),
            session_keys: vec![],
            issuer: "i".into(),
            cancel: vec![],
            max_frame,
        };
        assert_eq!(hello(None).frame_limit(), frame::MAX_FRAME);
        let said = u32::try_from(frame::MAX_CONTROL_FRAME).expect("fits");
        assert_eq!(hello(Some(said)).frame_limit(), frame::MAX_CONTROL_FRAME);
        assert_eq!(hello(Some(100)).frame_limit(), frame::MAX_FRAME);
        assert_eq!(
            hello(Some(u32::MAX)).frame_limit(),
            frame::MAX_CONTROL_FRAME
        );
        // What a new controller sends, an old worker (which ignores unknown fields) reads,
        // and a new worker reads back the same.
        let text = serde_json::to_string(&hello(Some(said))).expect("encodes");
        let back: ControllerHello = serde_json::from_str(&text).expect("decodes");
        assert_eq!(back.frame_limit(), frame::MAX_CONTROL_FRAME);
    }
}
