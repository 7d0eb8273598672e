//! OpenID Connect login routes: the methods list, starting a code-flow or device-flow
//! attempt, the IdP's callback (a page for the browser), and the attempt the CLI polls.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::types::{
    AuthMethod, AuthMethods, LoginResponse, OidcAttempt, OidcConfirmRequest, OidcDeviceStart,
    OidcStart, OidcStartRequest,
};
use super::ApiError;
use crate::oidc::login::{self, Failure, TOKEN_SEAL_PURPOSE};
use crate::oidc::{Provider, ProviderError};
use crate::state::AppState;
use crate::store::{now, AttemptRow, Claim, Confirmed, NewAttempt, CONFIRM_EXPIRED};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// How long a code-flow attempt waits for its callback.
const CODE_ATTEMPT_TTL: i64 = 5 * 60;
/// Unexpired attempts a controller's store holds at most: anyone may start a login, and each
/// start stores a row until an hour after it expires.
const MAX_OPEN_ATTEMPTS: i64 = 50_000;
/// The longest a device-flow attempt waits, whatever the IdP allows.
const DEVICE_ATTEMPT_MAX_TTL: i64 = 15 * 60;

/// `GET /v1/auth/methods`.
pub async fn methods(State(state): State<AppState>) -> Json<AuthMethods> {
    let mut methods = vec![AuthMethod {
        kind: "password".into(),
        name: "password".into(),
        issuer: None,
        device_flow: false,
    }];
    methods.extend(state.oidc.methods().map(|p| AuthMethod {
        kind: "oidc".into(),
        name: p.config.name.clone(),
        issuer: Some(p.config.issuer.clone()),
        device_flow: p.config.device_flow,
    }));
    Json(AuthMethods { methods })
}

/// `POST /v1/auth/oidc/start`: a code-flow login (PKCE S256, state, nonce).
pub async fn start(
    State(state): State<AppState>,
    Json(req): Json<OidcStartRequest>,
) -> ApiResult<OidcStart> {
    if req.return_port == Some(0) {
        return Err(ApiError::BadRequest(
            "return_port must be a port of 127.0.0.1 (1-65535)".into(),
        ));
    }
    let p = method(&state, req.method.as_deref(), "code").await?;
    room_for_an_attempt(&state).await?;
    let begun = match p.start().await {
        Ok(b) => b,
        Err(e) => return Err(refuse_start(&state, &p, "code", e).await?),
    };
    let attempt_id = new_attempt_id();
    let expires_at = now() + CODE_ATTEMPT_TTL;
    state
        .store
        .insert_oidc_attempt(&NewAttempt {
            id: &attempt_id,
            method: &p.config.name,
            flow: "code",
            state_hash: Some(&state_hash(begun.state.secret())),
            nonce: Some(begun.nonce.secret()),
            pkce_verifier: Some(begun.verifier.secret()),
            return_port: req.return_port,
            expires_at,
        })
        .await?;
    Ok(Json(OidcStart {
        auth_url: begun.url,
        attempt_id,
        method: p.config.name.clone(),
        expires_at,
    }))
}

/// Refuses a new attempt while [`MAX_OPEN_ATTEMPTS`] are open (a flood of starts).
async fn room_for_an_attempt(state: &AppState) -> Result<(), ApiError> {
    if state.store.unexpired_oidc_attempts().await? >= MAX_OPEN_ATTEMPTS {
        tracing::warn!("{MAX_OPEN_ATTEMPTS} single sign-on logins are open: refusing more");
        return Err(ApiError::Unavailable(
            "too many single sign-on logins are in progress: try again in a few minutes".into(),
        ));
    }
    Ok(())
}

/// `POST /v1/auth/oidc/device`: a device-flow login; the controller polls the IdP.
pub async fn device(
    State(state): State<AppState>,
    Json(req): Json<OidcStartRequest>,
) -> ApiResult<OidcDeviceStart> {
    if req.return_port.is_some() {
        return Err(ApiError::BadRequest(
            "return_port is for the code flow (POST /v1/auth/oidc/start)".into(),
        ));
    }
    let p = method(&state, req.method.as_deref(), "device").await?;
    let Some(slot) = login::device_wait_slot() else {
        return Err(ApiError::Unavailable(
            "too many device logins are in progress on this controller: try again in a few minutes"
                .into(),
        ));
    };
    room_for_an_attempt(&state).await?;
    let details = match p.device_start().await {
        Ok(d) => d,
        Err(e) => return Err(refuse_start(&state, &p, "device", e).await?),
    };
    let attempt_id = new_attempt_id();
    let ttl = i64::try_from(details.expires_in().as_secs()).unwrap_or(DEVICE_ATTEMPT_MAX_TTL);
    let expires_at = now() + ttl.clamp(30, DEVICE_ATTEMPT_MAX_TTL);
    state
        .store
        .insert_oidc_attempt(&NewAttempt {
            id: &attempt_id,
            method: &p.config.name,
            flow: "device",
            state_hash: None,
            nonce: None,
            pkce_verifier: None,
            return_port: None,
            expires_at,
        })
        .await?;
    let answer = OidcDeviceStart {
        verification_uri: details.verification_uri().to_string(),
        verification_uri_complete: details
            .verification_uri_complete()
            .map(|u| u.secret().to_owned()),
        user_code: details.user_code().secret().to_owned(),
        attempt_id: attempt_id.clone(),
        method: p.config.name.clone(),
        expires_at,
    };
    login::spawn_device_wait(state.clone(), p, attempt_id, details, expires_at, slot);
    Ok(Json(answer))
}

/// `GET /v1/auth/oidc/attempts/{id}`: pending, done (the token, handed out once), failed.
pub async fn attempt(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<OidcAttempt> {
    let gone = || {
        ApiError::NotFound(
            "no such login attempt (it expired or never existed): start again".into(),
        )
    };
    let a = state.store.oidc_attempt(&id).await?.ok_or_else(gone)?;
    let answer = match a.status.as_str() {
        "pending" | "exchanging" if a.expires_at > now() => OidcAttempt::Pending {
            expires_at: a.expires_at,
        },
        "pending" | "exchanging" => {
            let f = Failure::anonymous(
                "the login attempt expired before the identity provider answered: start again",
            );
            if state.store.fail_oidc_attempt(&a.id, &f.message).await? {
                login::fail(&state, None, &a.method, &a.flow, &f).await?;
            }
            OidcAttempt::Failed { message: f.message }
        }
        // A code-flow login's token goes only to whoever has the code the browser received.
        "done" if a.confirm_hash.is_some() && a.expires_at > now() => OidcAttempt::Confirm {
            expires_at: a.expires_at,
        },
        "done" if a.confirm_hash.is_some() => {
            let failed = state.store.fail_confirmation(&a, CONFIRM_EXPIRED).await?;
            confirmation_failed(&state, &a.method, failed).await?
        }
        "done" => match state.store.collect_oidc_attempt(&a.id).await? {
            Some(row) => OidcAttempt::Done(handed_out(&state, row)?),
            None => collected(),
        },
        "collected" => collected(),
        _ => OidcAttempt::Failed {
            message: a.message.unwrap_or_else(|| "the login failed".into()),
        },
    };
    Ok(Json(answer))
}

/// `POST /v1/auth/oidc/attempts/{id}` `{"code"}`: a code-flow login's token, for the code its
/// browser received (the CLI that started the login gets it on its loopback port, or the
/// person types it in). Wrong codes count; the third cancels the login.
pub async fn confirm(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<OidcConfirmRequest>,
) -> ApiResult<OidcAttempt> {
    let code = normalize_code(&req.code);
    match state
        .store
        .confirm_oidc_attempt(&id, &state_hash(&code))
        .await?
    {
        Confirmed::Collected(row) => Ok(Json(confirmed(&state, &row).await?)),
        Confirmed::Wrong(left) => Err(ApiError::BadRequest(format!(
            "wrong confirmation code: type the code the browser shows ({left} more {})",
            if left == 1 { "try" } else { "tries" }
        ))),
        failed @ Confirmed::Failed { .. } => {
            let method = state.store.oidc_attempt(&id).await?.map(|a| a.method);
            let method = method.as_deref().unwrap_or("unknown");
            Ok(Json(confirmation_failed(&state, method, failed).await?))
        }
        // Not waiting for a code: say where it stands.
        Confirmed::NotWaiting => attempt(State(state), Path(id)).await,
    }
}

/// The API token of a code-flow login whose confirmation code was right, audited as
/// `auth.login` with how the IdP vouched for the user, unless the user was locked or deleted
/// since.
async fn confirmed(state: &AppState, row: &AttemptRow) -> Result<OidcAttempt, ApiError> {
    let user = row.user_name.clone().unwrap_or_default();
    let refusal = match state.store.find_user(&user).await? {
        Some(u) if u.locked => Some(format!(
            "user '{user}' is locked: ask an admin to unlock it"
        )),
        Some(_) => None,
        None => Some(format!(
            "user '{user}' was deleted during the login: start again"
        )),
    };
    if let Some(message) = refusal {
        let f = Failure {
            user: Some(user),
            message,
        };
        login::fail(state, None, &row.method, "code", &f).await?;
        return Ok(OidcAttempt::Failed { message: f.message });
    }
    let mut details: serde_json::Value = row
        .login_details
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or_else(|| serde_json::json!({"method": "oidc", "flow": "code"}));
    if let Some(map) = details.as_object_mut() {
        map.insert("confirmed".into(), true.into());
    }
    Ok(OidcAttempt::Done(state.log_in(user, details).await?))
}

/// Audits a code-flow login that failed at its confirmation (if this call failed it) and
/// answers as the attempt's poll does.
async fn confirmation_failed(
    state: &AppState,
    method: &str,
    failed: Confirmed,
) -> Result<OidcAttempt, ApiError> {
    match failed {
        Confirmed::Failed { message, user } => {
            let f = Failure {
                user,
                message: message.to_owned(),
            };
            login::fail(state, None, method, "code", &f).await?;
            Ok(OidcAttempt::Failed { message: f.message })
        }
        _ => Ok(OidcAttempt::Failed {
            message: "the login failed: start again".into(),
        }),
    }
}

/// The token of a collected attempt, unsealed.
fn handed_out(state: &AppState, row: AttemptRow) -> Result<LoginResponse, ApiError> {
    Ok(LoginResponse {
        token: unseal(state, row.token_sealed.as_deref().unwrap_or_default())?,
        user: row.user_name.unwrap_or_default(),
        expires_at: row.token_expires_at.unwrap_or_default(),
    })
}

fn unseal(state: &AppState, sealed: &str) -> Result<String, ApiError> {
    state
        .kek
        .open(TOKEN_SEAL_PURPOSE, sealed)
        .ok()
        .and_then(|t| String::from_utf8(t).ok())
        .ok_or_else(|| ApiError::Internal("cannot unseal a login token".into()))
}

/// A confirmation code as the controller keeps it: upper case, without dashes or spaces.
fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// A new confirmation code: 40 random bits as 8 base32 letters and digits.
fn new_confirm_code() -> String {
    normalize_code(&postern_proto::ids::random_base32(5))
}

fn collected() -> OidcAttempt {
    OidcAttempt::Failed {
        message: "this login's token was already handed out: start again".into(),
    }
}

/// What the IdP appends to the redirect (RFC 6749 §4.1.2, RFC 9207 `iss`).
#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    iss: Option<String>,
}

/// What the browser gets after the IdP's redirect.
#[derive(Debug)]
pub enum CallbackPage {
    /// The login failed: why.
    Failed(String),
    /// The identity provider is done: the confirmation code goes to the terminal that started
    /// the login, by a redirect to its loopback port, or typed in from this page.
    Confirm {
        /// The user logged in.
        user: String,
        /// The code.
        code: String,
        /// The CLI's port on 127.0.0.1, if it listens.
        return_port: Option<u16>,
        /// The attempt's `state`, which the CLI knows from the authorization URL: it tells the
        /// browser's return from a request anything else on the machine could make.
        state: String,
    },
}

impl IntoResponse for CallbackPage {
    /// The callback answers a browser, so with a page rather than an [`ApiError`] body: 400
    /// when the login failed; a redirect to the CLI's loopback port, or a page with the
    /// code to type in, when it succeeded.
    fn into_response(self) -> Response {
        let (status, title, body) = match self {
            CallbackPage::Failed(message) => (
                StatusCode::BAD_REQUEST,
                "Postern login failed",
                format!("<p>{}</p>", html_escape(&message)),
            ),
            CallbackPage::Confirm {
                code,
                return_port: Some(port),
                state,
                ..
            } => {
                let mut to = LOOPBACK_RETURN.clone();
                let _ = to.set_port(Some(port));
                to.query_pairs_mut()
                    .append_pair("code", &code)
                    .append_pair("state", &state);
                return (
                    StatusCode::SEE_OTHER,
                    [(axum::http::header::LOCATION, to.to_string())],
                )
                    .into_response();
            }
            CallbackPage::Confirm { user, code, .. } => (
                StatusCode::OK,
                "Confirm your Postern login",
                format!(
                    "<p>You are signed in as {} at the identity provider. To finish logging in, \
                     type this code in the terminal where you ran <code>postern login</code>:</p>\
                     <p style=\"font-size:2em\"><code id=\"confirmation-code\">{}</code></p>\
                     <p><strong>Only type it in a terminal you started yourself, and never give it \
                     to anyone:</strong> whoever enters it logs in as you.</p>",
                    html_escape(&user),
                    html_escape(&display_code(&code)),
                ),
            ),
        };
        let page = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body><h1>{title}</h1>{body}</body></html>"
        );
        (status, Html(page)).into_response()
    }
}

/// Where the browser returns to a CLI that listens (its port set per attempt).
static LOOPBACK_RETURN: std::sync::LazyLock<reqwest::Url> = std::sync::LazyLock::new(|| {
    reqwest::Url::parse("http://127.0.0.1/postern-login").expect("a constant, valid URL")
});

/// A code as shown to a person: `ABCD-EFGH`.
fn display_code(code: &str) -> String {
    match code.split_at_checked(4) {
        Some((a, b)) if !b.is_empty() => format!("{a}-{b}"),
        _ => code.to_owned(),
    }
}

/// `GET /v1/auth/oidc/callback`: the IdP sends the browser here with `code` and `state`.
/// The state picks the attempt; the attempt is claimed once (a replayed callback is
/// refused); the code is exchanged with the PKCE verifier and the ID token verified.
pub async fn callback(
    State(state): State<AppState>,
    Query(q): Query<CallbackQuery>,
) -> Result<CallbackPage, ApiError> {
    let refuse = |message: &str| CallbackPage::Failed(message.to_owned());
    let Some(st) = q.state.as_deref().filter(|s| !s.is_empty()) else {
        let f = Failure::anonymous("the callback carries no state");
        login::fail(&state, None, "unknown", "code", &f).await?;
        return Ok(refuse(&f.message));
    };
    let Some(a) = state.store.oidc_attempt_by_state(&state_hash(st)).await? else {
        let f = Failure::anonymous(
            "the callback's state matches no login attempt (tampered with, or expired): start again with `postern login --oidc`",
        );
        login::fail(&state, None, "unknown", "code", &f).await?;
        return Ok(refuse(&f.message));
    };
    let p = match state.oidc.get(Some(&a.method)) {
        Ok(p) => p,
        Err(m) => {
            let f = Failure::anonymous(m);
            login::fail(&state, Some(&a.id), &a.method, "code", &f).await?;
            return Ok(refuse(&f.message));
        }
    };
    match state.store.claim_oidc_attempt(&a.id).await? {
        Claim::Claimed => {}
        Claim::AlreadyUsed => {
            // Not failing the attempt: the first callback owns it.
            let f = Failure::anonymous(
                "this login was already completed: a callback is accepted only once (replayed?)",
            );
            login::fail(&state, None, &a.method, "code", &f).await?;
            return Ok(refuse(&f.message));
        }
        Claim::Expired => {
            let f = Failure::anonymous("the login attempt expired: start again");
            login::fail(&state, Some(&a.id), &a.method, "code", &f).await?;
            return Ok(refuse(&f.message));
        }
    }
    let result = exchange(&state, &p, &a, &q).await;
    match result {
        Ok(verified) => {
            let code = new_confirm_code();
            let waiting = state
                .store
                .verify_oidc_attempt(
                    &a.id,
                    &verified.user,
                    &verified.details.to_string(),
                    &state_hash(&code),
                )
                .await?;
            if !waiting {
                let f = Failure::anonymous(
                    "the login attempt expired while the identity provider answered: start again",
                );
                login::fail(&state, None, &a.method, "code", &f).await?;
                return Ok(refuse(&f.message));
            }
            // Who the IdP vouched for, and what changed (groups): audited now, as the token
            // comes only with the code.
            state
                .audit(
                    &verified.user,
                    "auth.login_verified",
                    &format!("oidc:{}", a.method),
                    "success",
                    verified.details.clone(),
                )
                .await?;
            Ok(CallbackPage::Confirm {
                user: verified.user,
                code,
                return_port: a.return_port.and_then(|p| u16::try_from(p).ok()),
                state: st.to_owned(),
            })
        }
        Err(f) => {
            login::fail(&state, Some(&a.id), &a.method, "code", &f).await?;
            Ok(refuse(&f.message))
        }
    }
}

async fn exchange(
    state: &AppState,
    p: &Provider,
    a: &crate::store::AttemptRow,
    q: &CallbackQuery,
) -> Result<login::Verified, Failure> {
    match &q.iss {
        // RFC 9207: an IdP that names itself must be the one this attempt went to.
        Some(iss) if iss.trim_end_matches('/') != p.config.issuer.trim_end_matches('/') => {
            return Err(Failure::anonymous(format!(
                "the callback comes from issuer '{iss}', not '{}'",
                p.config.issuer
            )));
        }
        Some(_) => {}
        // One that promises to name itself always does.
        None if p.names_itself_in_answers().await? => {
            return Err(Failure::anonymous(format!(
                "the callback does not name its issuer, which '{}' always does (RFC 9207): refused",
                p.config.issuer
            )));
        }
        None => {}
    }
    if let Some(error) = &q.error {
        return Err(Failure::anonymous(match &q.error_description {
            Some(d) => format!("the identity provider refused the login: {error}: {d}"),
            None => format!("the identity provider refused the login: {error}"),
        }));
    }
    let code = q
        .code
        .as_deref()
        .ok_or_else(|| Failure::anonymous("the callback carries no code"))?;
    let (Some(verifier), Some(nonce)) = (&a.pkce_verifier, &a.nonce) else {
        return Err(Failure::anonymous(
            "the login attempt is not a code-flow attempt",
        ));
    };
    let claims = p.exchange(code, verifier, nonce).await?;
    login::verify(state, p, "code", &claims).await
}

async fn method(
    state: &AppState,
    name: Option<&str>,
    flow: &str,
) -> Result<std::sync::Arc<Provider>, ApiError> {
    match state.oidc.get(name) {
        Ok(p) => Ok(p),
        Err(m) => {
            let f = Failure::anonymous(m.clone());
            login::fail(state, None, name.unwrap_or("unknown"), flow, &f).await?;
            Err(ApiError::NotFound(m))
        }
    }
}

/// Audits a login that could not start (IdP down, no device flow) and says why.
async fn refuse_start(
    state: &AppState,
    p: &Provider,
    flow: &str,
    e: ProviderError,
) -> Result<ApiError, ApiError> {
    let unsupported = matches!(e, ProviderError::NoDeviceFlow(_));
    let f = Failure::from(e);
    login::fail(state, None, &p.config.name, flow, &f).await?;
    Ok(if unsupported {
        ApiError::BadRequest(f.message)
    } else {
        ApiError::Unavailable(f.message)
    })
}

fn new_attempt_id() -> String {
    format!("oa_{}", postern_proto::ids::random_base32(20))
}

fn state_hash(state: &str) -> String {
    B64.encode(Sha256::digest(state.as_bytes()))
}

/// `s` as HTML text (also inside attribute values).
pub fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}
