//! Targets, and session authorization (DESIGN §3).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::json;

use postern_proto::ids::SessionId;
use postern_proto::token::{self, Confirmation, SessionClaims};

use super::types::{
    Authorization, AuthorizeRequest, CreateTarget, CredentialInfo, CredentialKind, SetCredential,
    SshAccess, Target, TargetType, UpdateTarget, WorkerEndpoint,
};
use super::{check_name, ApiError, Caller};
use crate::policy::TargetRef;
use crate::state::AppState;
use crate::store::{closest, now, NewSession, StoreError, WorkerRow};

type ApiResult<T> = Result<Json<T>, ApiError>;

fn target_ref(t: &Target) -> TargetRef<'_> {
    TargetRef {
        name: &t.name,
        labels: &t.labels,
    }
}

fn check_address(address: &str) -> Result<(), ApiError> {
    let bad = || ApiError::BadRequest(format!("invalid address '{address}': expected HOST:PORT"));
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        }
    };
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok(())
}

fn check_kind(kind: TargetType) -> Result<(), ApiError> {
    match kind {
        TargetType::Tcp | TargetType::Ssh | TargetType::Postgres => Ok(()),
    }
}

/// `GET /v1/targets`: the targets the caller may read or connect to.
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<Target>> {
    let all = state.store.targets().await?;
    Ok(Json(
        all.into_iter().filter(|t| visible(&caller, t)).collect(),
    ))
}

/// The target named `name`. If there is none, the "did you mean" names only a target the
/// caller may see (read or connect to): a suggestion from all targets told a user with no
/// role the names that `targets list` hid from them.
async fn find_target(state: &AppState, caller: &Caller, name: &str) -> Result<Target, ApiError> {
    match state.store.target(name).await {
        Err(StoreError::NotFound { kind, name, .. }) => {
            let visible: Vec<String> = state
                .store
                .targets()
                .await?
                .into_iter()
                .filter(|t| visible(caller, t))
                .map(|t| t.name)
                .collect();
            Err(StoreError::NotFound {
                kind,
                suggestion: closest(&name, &visible),
                name,
            }
            .into())
        }
        other => Ok(other?),
    }
}

/// Whether `caller` may see `t` (in lists, and in suggestions).
fn visible(caller: &Caller, t: &Target) -> bool {
    caller.may("read", Some(target_ref(t))) || caller.may("connect", Some(target_ref(t)))
}

/// `GET /v1/targets/{name}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Target> {
    let t = find_target(&state, &caller, &name).await?;
    if !caller.may("connect", Some(target_ref(&t))) {
        caller.require(&state, "read", Some(target_ref(&t))).await?;
    }
    Ok(Json(t))
}

/// The longest session a target may allow (a year).
const MAX_SESSION_SECS: u64 = 365 * 24 * 3600;

/// A target's session lengths: each from 1 s to a year, the default within the maximum.
fn check_durations(default: Option<u64>, max: Option<u64>) -> Result<(), ApiError> {
    for (what, secs) in [("default duration", default), ("max duration", max)] {
        match secs {
            Some(0) => {
                return Err(ApiError::BadRequest(format!(
                    "the {what} must be at least 1 s"
                )))
            }
            Some(s) if s > MAX_SESSION_SECS => {
                return Err(ApiError::BadRequest(format!(
                    "the {what} of {s} s is longer than a year ({MAX_SESSION_SECS} s)"
                )))
            }
            _ => {}
        }
    }
    if let (Some(d), Some(m)) = (default, max) {
        if d > m {
            return Err(ApiError::BadRequest(format!(
                "the default duration ({d} s) is longer than the max duration ({m} s)"
            )));
        }
    }
    Ok(())
}

/// `POST /v1/targets`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateTarget>,
) -> ApiResult<Target> {
    caller.require(&state, "targets:write", None).await?;
    check_name("target", &req.name)?;
    check_kind(req.kind)?;
    check_address(&req.address)?;
    check_durations(req.default_duration_secs, req.max_duration_secs)?;
    if req.connection_limit == Some(0) {
        return Err(ApiError::BadRequest(
            "a connection limit must be at least 1 (leave it out for no limit)".into(),
        ));
    }
    let t = state.store.create_target(&req).await?;
    state
        .audit(
            caller.name(),
            "target.create",
            &format!("target:{}", t.name),
            "success",
            json!({"target": t}),
        )
        .await?;
    Ok(Json(t))
}

/// `PATCH /v1/targets/{name}`.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<UpdateTarget>,
) -> ApiResult<Target> {
    caller.require(&state, "targets:write", None).await?;
    if req.is_empty() {
        return Err(ApiError::BadRequest(
            "nothing to change: give at least one field of the target to set".into(),
        ));
    }
    if let Some(a) = &req.address {
        check_address(a)?;
    }
    if req.default_duration_secs.is_some() || req.max_duration_secs.is_some() {
        // A lower maximum alone lowers the default with it; a default asked for must fit.
        let now = state.store.target(&name).await?;
        check_durations(
            req.default_duration_secs,
            Some(req.max_duration_secs.unwrap_or(now.max_duration_secs)),
        )?;
    }
    let t = state.store.update_target(&name, &req).await?;
    // The change is recorded before the session ends it causes, which happen even if the
    // record fails.
    let audited = state
        .audit(
            caller.name(),
            "target.update",
            &format!("target:{name}"),
            "success",
            json!({"change": req}),
        )
        .await;
    if !t.enabled {
        crate::revoke::end_target_sessions(&state, &name, "target disabled", caller.name()).await?;
    } else if req.labels.is_some() {
        // Label changes can take a target out of a role's reach.
        crate::revoke::reevaluate(&state, caller.name()).await?;
    }
    audited?;
    Ok(Json(t))
}

/// `DELETE /v1/targets/{name}`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "targets:write", None).await?;
    state.store.target(&name).await?;
    crate::revoke::end_target_sessions(&state, &name, "target deleted", caller.name()).await?;
    state.store.delete_target(&name).await?;
    state
        .audit(
            caller.name(),
            "target.delete",
            &format!("target:{name}"),
            "success",
            json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/targets/{name}/authorize`: policy check, worker choice, signed session token.
pub async fn authorize(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<AuthorizeRequest>,
) -> ApiResult<Authorization> {
    // Independent reads at once (each is a round trip to the store's threads).
    let (target, workers, credential) = tokio::try_join!(
        find_target(&state, &caller, &name),
        async { Ok(state.store.workers().await?) },
        async { Ok(state.store.credential(&name).await?) }
    )?;
    let resource = format!("target:{}", target.name);
    if let Err(denied) = crate::policy::check(&caller.rules, "connect", Some(target_ref(&target))) {
        state
            .audit(
                caller.name(),
                "session.denied",
                &resource,
                "denied",
                json!({"reason": denied.reason, "rule": denied.rule}),
            )
            .await?;
        return Err(ApiError::Forbidden(format!(
            "permission denied for user '{}': {}",
            caller.name(),
            denied.reason
        )));
    }
    if !target.enabled {
        return Err(ApiError::Conflict(format!(
            "target '{}' is disabled",
            target.name
        )));
    }
    if let Some(wanted) = req.target_type.filter(|t| *t != target.kind) {
        let command = match target.kind {
            TargetType::Ssh => "ssh",
            TargetType::Postgres => "psql",
            TargetType::Tcp => "connect",
        };
        return Err(ApiError::BadRequest(format!(
            "target '{}' is a {} target, not {}: use `postern {command} {}`",
            target.name,
            target.kind.as_str(),
            wanted.as_str(),
            target.name
        )));
    }
    let spki = B64
        .decode(req.client_spki.trim())
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 2048)
        .ok_or_else(|| {
            ApiError::BadRequest(
                "client_spki must be the base64url DER public key of the session key".into(),
            )
        })?;
    let duration = req
        .duration_secs
        .unwrap_or(target.default_duration_secs)
        // (Targets stored before durations were bounded may hold any maximum.)
        .clamp(1, target.max_duration_secs.clamp(1, MAX_SESSION_SECS));
    // The login the session runs as: the one asked for, else the brokered credential's own
    // user (a per-session-role admin credential is never a login of its own). Another login
    // than the credential's must be permitted by name; any login, the credential's own too,
    // is refused by a deny rule naming it.
    let own = crate::revoke::credential_login(credential.as_ref());
    let login = req.login.as_deref().or(own);
    if let Some(login) = login {
        if let Err(denied) =
            crate::policy::session_login(&caller.rules, target_ref(&target), login, own)
        {
            state
                .audit(
                    caller.name(),
                    "session.denied",
                    &resource,
                    "denied",
                    json!({"reason": denied.reason, "rule": denied.rule, "login": login}),
                )
                .await?;
            return Err(ApiError::Forbidden(format!(
                "permission denied for user '{}': {}",
                caller.name(),
                denied.reason
            )));
        }
    }
    let login = login.map(str::to_owned);

    let worker = pick_worker(workers, &target)?;
    let worker_addr = worker.session_addr.clone().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "worker '{}' has not reported its address",
            worker.name
        ))
    })?;
    let ssh = match target.kind {
        TargetType::Ssh => Some(ssh_access(&state, &target, &worker, req.login.as_deref()).await?),
        _ => None,
    };
    let session_id = SessionId::random();
    let iat = now();
    let claims = SessionClaims {
        iss: state.issuer.clone(),
        sub: caller.name().into(),
        sid: session_id.clone(),
        target: target.name.clone().into(),
        protocol: target.kind.as_str().into(),
        endpoint: target.address.clone(),
        worker: worker.name.clone().into(),
        iat,
        exp: iat + duration as i64,
        connection_limit: target.connection_limit,
        login: req.login.clone(),
        cnf: Confirmation {
            spki_s256: token::spki_thumbprint(&spki),
        },
    };
    let signed = token::sign(&claims, &state.keys.session_key);
    // The session row commits with its `session.authorize` event.
    let row = NewSession {
        id: session_id.as_str().to_owned(),
        user: caller.name().to_owned(),
        target: target.name.clone(),
        worker: worker.name.clone(),
        expires_at: claims.exp,
        login,
    };
    state
        .audit_with(
            vec![row],
            caller.name(),
            "session.authorize",
            &resource,
            "success",
            json!({"session": session_id, "worker": worker.name, "expires_at": claims.exp, "login": req.login}),
        )
        .await?;
    // The worker gets the session's grant now, so that the client's hello needs no
    // activation round trip (the worker reports the start; the checks then run again).
    let grant_pushed = match crate::cluster::session_grant(&state, &target.name, credential) {
        Ok(grant) => state.workers.session_ready(
            &worker.name,
            worker.cert_fingerprint.as_deref().unwrap_or_default(),
            session_id.as_str(),
            claims.exp,
            grant,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot prepare the session grant: the worker will ask at activation");
            false
        }
    };
    Ok(Json(Authorization {
        session_id: session_id.0,
        token: signed,
        worker: WorkerEndpoint {
            server_name: postern_proto::worker_server_name(&worker.name),
            name: worker.name,
            addr: worker_addr,
        },
        ca_pem: state.keys.ca_pem.clone(),
        expires_at: claims.exp,
        target: target.name,
        protocol: target.kind,
        connection_limit: target.connection_limit,
        login: req.login,
        ssh,
        grant_pushed,
    }))
}

/// For an `ssh` target: the worker's SSH host key to pin, and the login the worker will use.
async fn ssh_access(
    state: &AppState,
    target: &Target,
    worker: &WorkerRow,
    login: Option<&str>,
) -> Result<SshAccess, ApiError> {
    let host_key = state
        .store
        .worker_ssh_host_key(&worker.name)
        .await?
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "worker '{}' has not reported an SSH host key: it cannot carry SSH sessions (upgrade it)",
                worker.name
            ))
        })?;
    let login = match login {
        Some(l) => l.to_owned(),
        None => state
            .store
            .credential(&target.name)
            .await?
            .map(|(_, user, _)| user)
            .ok_or_else(|| {
                ApiError::Conflict(format!(
                    "target '{}' has no brokered credential: an admin sets one with `postern credentials set {}`",
                    target.name, target.name
                ))
            })?,
    };
    Ok(SshAccess { host_key, login })
}

/// A live worker whose tags satisfy the target's filter, direct ones first
/// ([`super::worker_choice`]).
fn pick_worker(workers: Vec<WorkerRow>, target: &Target) -> Result<WorkerRow, ApiError> {
    let pick = getrandom::u32().map_err(|e| ApiError::Internal(e.to_string()))?;
    super::worker_choice::choose(workers, &target.worker_filter, now(), pick).map_err(|why| {
        ApiError::Unavailable(format!(
            "no worker available for target '{}': {why}; start one (`postern workers create`) \
             or check `postern workers list`",
            target.name
        ))
    })
}

/// Sealing purpose of a target's credential: a sealed secret opens only for its target.
pub(crate) fn credential_purpose(target: &str) -> String {
    format!("credential:{target}")
}

/// `PUT /v1/targets/{name}/credential`: stores the brokered credential, sealed.
pub async fn set_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<SetCredential>,
) -> ApiResult<CredentialInfo> {
    caller.require(&state, "targets:write", None).await?;
    if req.username.is_empty()
        || req.username.len() > 128
        || req.username.contains(char::is_control)
    {
        return Err(ApiError::BadRequest(
            "credential username must be 1-128 printable characters".into(),
        ));
    }
    // Certificate mode stores no secret: the controller's SSH user CA signs per session.
    if req.kind != CredentialKind::SshCa && (req.secret.is_empty() || req.secret.len() > 16 * 1024)
    {
        return Err(ApiError::BadRequest(
            "credential secret must be 1 byte to 16 KiB".into(),
        ));
    }
    if req.kind == CredentialKind::SshKey && !req.secret.contains("PRIVATE KEY") {
        return Err(ApiError::BadRequest(
            "ssh_key secret must be a PEM/OpenSSH private key".into(),
        ));
    }
    if req.kind == CredentialKind::SshKey && ssh_key_is_encrypted(&req.secret) {
        return Err(ApiError::BadRequest(
            "the SSH key is protected by a passphrase, which the worker cannot type: store an \
             unprotected copy (ssh-keygen -p -N '' -f COPY)"
                .into(),
        ));
    }
    // A credential the target's protocol cannot use would be stored, then fail at the first
    // session with a misleading error.
    let target = state.store.target(&name).await?;
    let fits = matches!(
        (target.kind, req.kind),
        (
            TargetType::Postgres,
            CredentialKind::Password | CredentialKind::PostgresAdmin
        ) | (
            TargetType::Ssh,
            CredentialKind::Password | CredentialKind::SshKey | CredentialKind::SshCa
        )
    );
    if !fits {
        let takes = match target.kind {
            TargetType::Postgres => {
                "a password (--password-stdin, with --per-session-roles for an admin)"
            }
            TargetType::Ssh => "a password, an SSH key (--ssh-key) or the SSH CA (--ssh-ca)",
            TargetType::Tcp => "no credential: its bytes go through untouched",
        };
        return Err(ApiError::BadRequest(format!(
            "target '{name}' is a {} target, which takes {takes}",
            target.kind.as_str()
        )));
    }
    // Read as the worker will read it, so a damaged key fails here, not at the next session.
    if req.kind == CredentialKind::SshKey {
        if let Err(e) = russh::keys::decode_secret_key(req.secret.trim(), None) {
            return Err(ApiError::BadRequest(format!(
                "the SSH key cannot be read: {e}"
            )));
        }
    }
    let kind = match req.kind {
        CredentialKind::Password => "password",
        CredentialKind::SshKey => "ssh_key",
        CredentialKind::SshCa => "ssh_ca",
        CredentialKind::PostgresAdmin => "postgres_admin",
    };
    let secret = match req.kind {
        CredentialKind::SshCa => "",
        _ => req.secret.as_str(),
    };
    let sealed = state
        .kek
        .seal(&credential_purpose(&name), secret.as_bytes());
    state
        .store
        .set_credential(&name, kind, &req.username, &sealed)
        .await?;
    state
        .audit(
            caller.name(),
            "credential.set",
            &format!("target:{name}"),
            "success",
            json!({"kind": kind, "username": req.username}),
        )
        .await?;
    Ok(Json(CredentialInfo {
        target: name,
        kind: req.kind,
        username: req.username,
    }))
}

/// Whether an SSH private key is protected by a passphrase (OpenSSH or PEM format).
fn ssh_key_is_encrypted(pem: &str) -> bool {
    match ssh_key::PrivateKey::from_openssh(pem.trim()) {
        Ok(key) => key.is_encrypted(),
        // Older PEM formats: an encrypted one says so in its armour or headers.
        Err(_) => pem.contains("ENCRYPTED"),
    }
}

/// `GET /v1/targets/{name}/credential`: kind and user name, never the secret.
pub async fn show_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<CredentialInfo> {
    let t = find_target(&state, &caller, &name).await?;
    caller.require(&state, "read", Some(target_ref(&t))).await?;
    let (kind, username, _) = state.store.credential(&name).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "target '{name}' has no credential: set one with `postern credentials set {name}`"
        ))
    })?;
    let kind = match kind.as_str() {
        "ssh_key" => CredentialKind::SshKey,
        "ssh_ca" => CredentialKind::SshCa,
        "postgres_admin" => CredentialKind::PostgresAdmin,
        _ => CredentialKind::Password,
    };
    Ok(Json(CredentialInfo {
        target: name,
        kind,
        username,
    }))
}

/// `DELETE /v1/targets/{name}/credential`.
pub async fn delete_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "targets:write", None).await?;
    state.store.target(&name).await?;
    if !state.store.delete_credential(&name).await? {
        return Err(ApiError::NotFound(format!(
            "target '{name}' has no credential"
        )));
    }
    state
        .audit(
            caller.name(),
            "credential.delete",
            &format!("target:{name}"),
            "success",
            json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
