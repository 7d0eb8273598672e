//! The JSON bodies of the `/v1` HTTP API, shared with the CLI (which depends on this crate).
//! Times are Unix seconds; durations are seconds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod oidc;
pub use oidc::{
    AuthMethod, AuthMethods, OidcAttempt, OidcConfirmRequest, OidcDeviceStart, OidcStart,
    OidcStartRequest,
};

/// Every error answer: `{"error": "not_found", "message": "no target named 'x'; ..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code (`bad_request`, `unauthenticated`, `forbidden`, `not_found`,
    /// `conflict`, `unavailable`, `internal`).
    pub error: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

/// `POST /v1/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

/// Answer to a successful login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    /// The opaque API token (`pt_…`); send as `Authorization: Bearer`.
    pub token: String,
    /// The user logged in.
    pub user: String,
    /// When the token stops working.
    pub expires_at: i64,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAmI {
    /// User name.
    pub user: String,
    /// Groups the user belongs to.
    pub groups: Vec<String>,
    /// Roles bound to the user directly or through a group.
    pub roles: Vec<String>,
    /// When the token used for this call expires.
    pub token_expires_at: i64,
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Locked users cannot log in, call the API or open sessions.
    pub locked: bool,
    /// Whether a password is set.
    pub has_password: bool,
    /// Creation time.
    pub created_at: i64,
    /// Groups.
    pub groups: Vec<String>,
    /// Those of `groups` whose membership came from an identity provider's groups claim: the
    /// next single sign-on login removes it if the claim no longer names the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idp_groups: Vec<String>,
}

/// `POST /v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Login name: letters, digits, `.`, `_`, `-`, `@`; at most 64 characters.
    pub name: String,
    /// Optional password (at least 8 characters).
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/users/{name}/password`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    /// The new password (at least 8 characters).
    pub password: String,
    /// The current one: what lets a user without `users:write` change their own.
    #[serde(default)]
    pub current_password: Option<String>,
}

/// A group and its members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Member user names.
    pub members: Vec<String>,
    /// Those of `members` whose membership came from an identity provider's groups claim (the
    /// next single sign-on login of each removes it if the claim no longer names the group;
    /// adding one by hand keeps it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idp_members: Vec<String>,
}

/// `POST /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Name.
    pub name: String,
}

/// `POST /v1/groups/{name}/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// User to add.
    pub user: String,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants the actions.
    Allow,
    /// Refuses the actions; deny wins over allow.
    Deny,
}

/// One rule of a role. Target actions (`connect`, `read`) apply to the targets selected by
/// `targets` (a name glob, `*` if absent) **and** `labels` (all must match); admin actions
/// (`users:*`, `targets:write`, `sessions:cancel`, `audit:read`, `workers:*`, `*`) ignore them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Allow or deny.
    pub effect: Effect,
    /// Actions, e.g. `["connect"]`, `["users:*"]`, `["*"]`.
    pub actions: Vec<String>,
    /// Target name glob (`pg-*`); absent means every target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// Labels a target must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// For `connect`: the logins on the target (SSH users, database users) the rule covers,
    /// `*` for any. A session as the brokered credential's own user needs none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
}

impl Rule {
    /// The same rule with each action and login once, in their first order.
    pub fn without_repeats(mut self) -> Self {
        let mut seen = std::collections::HashSet::new();
        self.actions.retain(|a| seen.insert(a.clone()));
        seen.clear();
        self.logins.retain(|l| seen.insert(l.clone()));
        self
    }

    /// Whether `other` says the same, whatever the order of its actions and logins.
    pub fn same_as(&self, other: &Rule) -> bool {
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        self.effect == other.effect
            && self.targets == other.targets
            && self.labels == other.labels
            && sorted(&self.actions) == sorted(&other.actions)
            && sorted(&self.logins) == sorted(&other.logins)
    }
}

/// Who a role is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Principal {
    /// A user, by name.
    User(String),
    /// A group, by name.
    Group(String),
}

/// A role with its rules and bindings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Role {
    /// Name.
    pub name: String,
    /// Rules, in the order added.
    pub rules: Vec<Rule>,
    /// Principals the role is bound to.
    pub bindings: Vec<Principal>,
}

/// `POST /v1/roles`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    /// Name.
    pub name: String,
}

/// Target protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    /// Plain TCP.
    Tcp,
    /// SSH (the worker terminates it: brokered login, recorded shells, audited commands).
    Ssh,
    /// PostgreSQL (wire-protocol proxy: brokered login, statement audit).
    Postgres,
}

impl TargetType {
    /// Lowercase name as used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Tcp => "tcp",
            TargetType::Ssh => "ssh",
            TargetType::Postgres => "postgres",
        }
    }
}

/// A target as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// Unique human name.
    pub name: String,
    /// Protocol.
    #[serde(rename = "type")]
    pub kind: TargetType,
    /// `host:port` the worker dials.
    pub address: String,
    /// Labels for policy selection.
    pub labels: BTreeMap<String, String>,
    /// Session length when the client asks for none.
    pub default_duration_secs: u64,
    /// Longest session allowed.
    pub max_duration_secs: u64,
    /// Connections per session; `None` is unlimited.
    pub connection_limit: Option<u32>,
    /// Worker tags a worker must carry to serve this target.
    pub worker_filter: BTreeMap<String, String>,
    /// Disabled targets cannot be authorized.
    pub enabled: bool,
    /// Creation time.
    pub created_at: i64,
}

/// `POST /v1/targets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTarget {
    /// Unique name: letters, digits, `.`, `_`, `-`; at most 64 characters.
    pub name: String,
    /// Protocol.
    #[serde(rename = "type")]
    pub kind: TargetType,
    /// `host:port`.
    pub address: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Default session length (default 1 h, capped by the maximum).
    #[serde(default)]
    pub default_duration_secs: Option<u64>,
    /// Maximum session length (default 8 h).
    #[serde(default)]
    pub max_duration_secs: Option<u64>,
    /// Connections per session.
    #[serde(default)]
    pub connection_limit: Option<u32>,
    /// Worker tags required.
    #[serde(default)]
    pub worker_filter: BTreeMap<String, String>,
}

/// `PATCH /v1/targets/{name}`: fields present are changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTarget {
    /// New address.
    #[serde(default)]
    pub address: Option<String>,
    /// Replaces all labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// New default duration.
    #[serde(default)]
    pub default_duration_secs: Option<u64>,
    /// New maximum duration.
    #[serde(default)]
    pub max_duration_secs: Option<u64>,
    /// New connection limit; `Some(0)` removes the limit.
    #[serde(default)]
    pub connection_limit: Option<u32>,
    /// Replaces the worker filter.
    #[serde(default)]
    pub worker_filter: Option<BTreeMap<String, String>>,
    /// Enable or disable.
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl UpdateTarget {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        let Self {
            address,
            labels,
            default_duration_secs,
            max_duration_secs,
            connection_limit,
            worker_filter,
            enabled,
        } = self;
        address.is_none()
            && labels.is_none()
            && default_duration_secs.is_none()
            && max_duration_secs.is_none()
            && connection_limit.is_none()
            && worker_filter.is_none()
            && enabled.is_none()
    }
}

/// A worker as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    /// Unique name.
    pub name: String,
    /// Tags matched against targets' worker filters.
    pub tags: BTreeMap<String, String>,
    /// `pending` (not yet registered) or `registered`.
    pub status: String,
    /// Whether a controller currently holds its control connection.
    pub connected: bool,
    /// Address clients dial for sessions: the worker's own, or for an `outbound-only` worker
    /// the relay of the controller holding its connection.
    pub session_addr: Option<String>,
    /// Last time a controller heard from it.
    pub last_seen: Option<i64>,
    /// Creation time.
    pub created_at: i64,
    /// `direct` (clients dial the worker) or `outbound-only` (through a controller's relay).
    #[serde(default = "direct_mode")]
    pub mode: String,
    /// Sessions it carries, as of its last heartbeat (while connected).
    #[serde(default)]
    pub active_sessions: Option<u32>,
    /// Proxied connections it carries, as of its last heartbeat (while connected).
    #[serde(default)]
    pub active_connections: Option<u32>,
}

fn direct_mode() -> String {
    "direct".into()
}

/// `POST /v1/workers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorker {
    /// Unique name (becomes part of its certificate's DNS name).
    pub name: String,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Answer to [`CreateWorker`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedWorker {
    /// The worker.
    pub worker: Worker,
    /// One-time activation token, valid for 24 h.
    pub activation_token: String,
}

/// `POST /v1/targets/{name}/authorize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    /// base64url DER SubjectPublicKeyInfo of the client's ephemeral session key.
    pub client_spki: String,
    /// Requested session length; the target's default if absent, capped at its maximum.
    #[serde(default)]
    pub duration_secs: Option<u64>,
    /// Login on the target (SSH user, database user); the brokered credential's user if
    /// absent. Must be permitted by a rule's `logins`.
    #[serde(default)]
    pub login: Option<String>,
    /// The type of target the client can use (`postern ssh` asks for `ssh`): one of another
    /// type is refused before a session is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_type: Option<TargetType>,
}

/// Where and how to reach the worker that carries the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerEndpoint {
    /// Worker name.
    pub name: String,
    /// `host:port` of its session listener.
    pub addr: String,
    /// TLS server name to verify its certificate against.
    pub server_name: String,
}

/// Answer to [`AuthorizeRequest`]: everything the CLI needs to open the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Authorization {
    /// Session id.
    pub session_id: String,
    /// Signed session token for the worker.
    pub token: String,
    /// The worker to dial.
    pub worker: WorkerEndpoint,
    /// PEM of the cluster CA that signed the worker's certificate.
    pub ca_pem: String,
    /// Session expiry.
    pub expires_at: i64,
    /// Target name.
    pub target: String,
    /// Target protocol.
    pub protocol: TargetType,
    /// Connections allowed in the session.
    pub connection_limit: Option<u32>,
    /// The login the session was authorized for, if one was asked for.
    #[serde(default)]
    pub login: Option<String>,
    /// Whether the controller pushed the session's grant to the worker as it answered
    /// (the client tells the worker in its hello; see `SessionHello::grant_pushed`).
    #[serde(default)]
    pub grant_pushed: bool,
    /// For `ssh` targets: what `postern ssh` needs to reach the worker's SSH endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshAccess>,
}

/// The SSH side of an [`Authorization`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshAccess {
    /// The worker's SSH host public key (OpenSSH one-line form), to pin in a one-off
    /// known_hosts file.
    pub host_key: String,
    /// The login the worker will use on the target.
    pub login: String,
}

/// Kind of a brokered credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// User name and password.
    Password,
    /// SSH private key (OpenSSH PEM).
    SshKey,
    /// SSH certificate mode: the controller's SSH user CA signs a certificate per session
    /// (no secret is stored; the target trusts the CA through `TrustedUserCAKeys`).
    SshCa,
    /// PostgreSQL admin (`CREATEROLE`) login: the worker creates a database role per session
    /// (zero standing credentials) and drops it when the session ends.
    PostgresAdmin,
}

/// `PUT /v1/targets/{name}/credential`. The secret is stored sealed and never shown again.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetCredential {
    /// Kind.
    pub kind: CredentialKind,
    /// User name on the target.
    pub username: String,
    /// The password or private key.
    pub secret: String,
}

impl std::fmt::Debug for SetCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetCredential")
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("secret", &"***")
            .finish()
    }
}

/// A target's credential, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialInfo {
    /// Target.
    pub target: String,
    /// Kind.
    pub kind: CredentialKind,
    /// User name on the target.
    pub username: String,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: String,
    /// User.
    pub user: String,
    /// Target.
    pub target: String,
    /// Worker.
    pub worker: String,
    /// `pending`, `active` or `terminated`.
    pub status: String,
    /// Creation (authorization) time.
    pub created_at: i64,
    /// Expiry.
    pub expires_at: i64,
    /// When the worker activated it.
    pub activated_at: Option<i64>,
    /// When it ended.
    pub ended_at: Option<i64>,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Connections that have ended, as reported by the worker.
    pub connections: i64,
    /// Bytes client → target over closed connections.
    pub bytes_up: i64,
    /// Bytes target → client over closed connections.
    pub bytes_down: i64,
    /// The login it runs as on the target (SSH user, database user), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
}

/// Query of `GET /v1/sessions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionQuery {
    /// Only pending or active sessions.
    #[serde(default)]
    pub active: Option<bool>,
    /// Only this user's.
    #[serde(default)]
    pub user: Option<String>,
    /// Only this target's.
    #[serde(default)]
    pub target: Option<String>,
}

/// A shell recording (asciicast v2), without its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recording {
    /// Id (`r_…`).
    pub id: String,
    /// The session it belongs to.
    pub session_id: String,
    /// The session's user.
    pub user: String,
    /// The session's target.
    pub target: String,
    /// The worker that recorded it.
    pub worker: String,
    /// When the shell started.
    pub started_at: i64,
    /// When the shell ended, if it has.
    pub ended_at: Option<i64>,
    /// Size of the asciicast text, bytes.
    pub size: i64,
    /// Why the recording ended before its shell did, if it did: it reached the controller's
    /// `recording_max_bytes` (the session was ended with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

/// Query of `GET /v1/recordings`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordingQuery {
    /// Only this session's recordings.
    #[serde(default)]
    pub session: Option<String>,
}

/// `GET /v1/ssh/ca`: the SSH user CA that signs certificate-mode logins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshCa {
    /// The CA public key (OpenSSH one-line form), for the target's `TrustedUserCAKeys`.
    pub public_key: String,
}

/// Query of `GET /v1/policy/check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyCheckQuery {
    /// User.
    pub user: String,
    /// Target name.
    pub target: String,
    /// Action, `connect` if absent.
    #[serde(default)]
    pub action: Option<String>,
    /// For `connect`: the login (SSH user, database user) to check; the target's brokered
    /// credential's own user if absent, as at authorize.
    #[serde(default)]
    pub login: Option<String>,
}

/// An explained policy decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// The action checked.
    pub action: String,
    /// The rule that decided, as `role NAME rule #N (allow connect on pg-*)`, if any.
    pub rule: Option<String>,
    /// Full explanation for a person.
    pub reason: String,
}

/// An audit event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Row id.
    pub id: i64,
    /// Position in the hash chain (1, 2, …).
    pub seq: i64,
    /// Time (Unix seconds).
    pub time: i64,
    /// Who acted (user name, `worker:NAME`, `system`, or `anonymous`).
    pub actor: String,
    /// What (`auth.login`, `auth.login_failed`, `session.authorize`, `session.denied`, …).
    pub action: String,
    /// On what (`target:pg-prod`, `user:bob`, `session:s_…`).
    pub resource: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    /// The session the event belongs to, if any.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Free-form details.
    pub details: serde_json::Value,
    /// The event's chain hash (hex SHA-256).
    #[serde(default)]
    pub hash: String,
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Only this actor.
    #[serde(default)]
    pub actor: Option<String>,
    /// Only this action (exact, or a prefix ending in `.`).
    #[serde(default)]
    pub action: Option<String>,
    /// Only events whose resource contains this text.
    #[serde(default)]
    pub resource: Option<String>,
    /// Only events of this session.
    #[serde(default)]
    pub session: Option<String>,
    /// Only events about this target (on it, or in its sessions).
    #[serde(default)]
    pub target: Option<String>,
    /// Only events at or after this time.
    #[serde(default)]
    pub since: Option<i64>,
    /// Only events at or before this time.
    #[serde(default)]
    pub until: Option<i64>,
    /// Only events after this chain position, oldest first (for following the log).
    #[serde(default)]
    pub after_seq: Option<i64>,
    /// With `after_seq`: wait up to this many seconds (≤ 60) for a first new event.
    #[serde(default)]
    pub wait: Option<u64>,
    /// At most this many (default 100, newest last).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Answer of `GET /v1/audit/verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerification {
    /// Whether the whole chain verifies.
    pub ok: bool,
    /// Events verified.
    pub checked: i64,
    /// The first position that breaks the chain.
    pub first_bad_seq: Option<i64>,
    /// The row id of that event, when it exists.
    pub first_bad_id: Option<i64>,
    /// What is wrong, for a person.
    pub reason: Option<String>,
    /// The newest event's chain hash, when the chain verifies: kept where the database's
    /// administrators cannot write, it is an [`AuditAnchor`] for later checks.
    #[serde(default)]
    pub head_hash: Option<String>,
    /// The newest event's position, with [`Self::head_hash`] the anchor `SEQ:HASH`.
    #[serde(default)]
    pub head_seq: Option<i64>,
}

/// `SEQ:HASH`, a chain position and the hash `audit verify` reported for it. A hash chain
/// alone cannot show that it was recomputed from some event on; a position's hash recorded
/// outside the database can: the chain verified later must still have it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    /// Chain position.
    pub seq: i64,
    /// Its hash (64 lower-case hex digits).
    pub hash: String,
}

impl std::str::FromStr for AuditAnchor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("'{s}': expected SEQ:HASH, as `postern audit verify` prints them (e.g. 42:9f86d08…, 64 hex digits)")
        };
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq: i64 = seq.trim_start_matches('#').parse().map_err(|_| bad())?;
        let hash = hash.trim().to_ascii_lowercase();
        if seq < 1 || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self { seq, hash })
    }
}

impl std::fmt::Display for AuditAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}
