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
    AuthMethod, AuthMethods, LoginResponse, OidcAttempt, OidcDeviceStart, OidcStart,
    OidcStartRequest,
};
use super::ApiError;
use crate::oidc::login::{self, Failure, TOKEN_SEAL_PURPOSE};
use crate::oidc::{Provider, ProviderError};
use crate::state::AppState;
use crate::store::{now, Claim, NewAttempt};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// How long a code-flow attempt waits for its callback.
const CODE_ATTEMPT_TTL: i64 = 5 * 60;
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
    let p = method(&state, req.method.as_deref(), "code").await?;
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

/// `POST /v1/auth/oidc/device`: a device-flow login; the controller polls the IdP.
pub async fn device(
    State(state): State<AppState>,
    Json(req): Json<OidcStartRequest>,
) -> ApiResult<OidcDeviceStart> {
    let p = method(&state, req.method.as_deref(), "device").await?;
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
    login::spawn_device_wait(state.clone(), p, attempt_id, details, expires_at);
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
        "done" => match state.store.collect_oidc_attempt(&a.id).await? {
            Some(row) => {
                let sealed = row.token_sealed.unwrap_or_default();
                let token = state
                    .kek
                    .open(TOKEN_SEAL_PURPOSE, &sealed)
                    .ok()
                    .and_then(|t| String::from_utf8(t).ok())
                    .ok_or_else(|| ApiError::Internal("cannot unseal a login token".into()))?;
                OidcAttempt::Done(LoginResponse {
                    token,
                    user: row.user_name.unwrap_or_default(),
                    expires_at: row.token_expires_at.unwrap_or_default(),
                })
            }
            None => collected(),
        },
        "collected" => collected(),
        _ => OidcAttempt::Failed {
            message: a.message.unwrap_or_else(|| "the login failed".into()),
        },
    };
    Ok(Json(answer))
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

/// The page the browser shows after the IdP's redirect.
#[derive(Debug)]
pub struct CallbackPage {
    ok: bool,
    message: String,
}

impl IntoResponse for CallbackPage {
    /// The callback answers a browser, so with a page rather than an [`ApiError`] body: 200
    /// when the login succeeded, 400 otherwise.
    fn into_response(self) -> Response {
        let (status, title) = if self.ok {
            (StatusCode::OK, "Logged in to Postern")
        } else {
            (StatusCode::BAD_REQUEST, "Postern login failed")
        };
        let body = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body><h1>{title}</h1><p>{}</p></body></html>",
            html_escape(&self.message)
        );
        (status, Html(body)).into_response()
    }
}

/// `GET /v1/auth/oidc/callback`: the IdP sends the browser here with `code` and `state`.
/// The state picks the attempt; the attempt is claimed once (a replayed callback is
/// refused); the code is exchanged with the PKCE verifier and the ID token verified.
pub async fn callback(
    State(state): State<AppState>,
    Query(q): Query<CallbackQuery>,
) -> Result<CallbackPage, ApiError> {
    let refuse = |message: &str| CallbackPage {
        ok: false,
        message: message.to_owned(),
    };
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
        Ok(done) => {
            login::complete(&state, &a.id, &done).await?;
            Ok(CallbackPage {
                ok: true,
                message: format!(
                    "You are logged in as {}. You can close this tab and return to the terminal.",
                    done.user
                ),
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
) -> Result<LoginResponse, Failure> {
    if let Some(iss) = &q.iss {
        // RFC 9207: an IdP that names itself must be the one this attempt went to.
        if iss.trim_end_matches('/') != p.config.issuer.trim_end_matches('/') {
            return Err(Failure::anonymous(format!(
                "the callback comes from issuer '{iss}', not '{}'",
                p.config.issuer
            )));
        }
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
    login::finish(state, p, "code", &claims).await
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

fn html_escape(s: &str) -> String {
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
