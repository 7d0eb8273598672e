//! Workers: creation with a one-time activation token, registration by CSR, deletion.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;

use postern_proto::cluster::{RegisterRequest, RegisterResponse};
use postern_proto::ids::Secret;

use super::types::{CreateWorker, CreatedWorker, Worker};
use super::{check_name, ApiError, Caller};
use crate::auth::hash_token;
use crate::keys::KeyError;
use crate::state::AppState;
use crate::store::{now, ActivationOutcome, WorkerRow};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// How long an activation token stays valid.
const ACTIVATION_TTL: i64 = 24 * 3600;

fn view(w: WorkerRow) -> Worker {
    Worker {
        status: if w.cert_fingerprint.is_some() {
            "registered"
        } else {
            "pending"
        }
        .into(),
        connected: w.connected_to.is_some(),
        active_sessions: w.active_sessions.filter(|_| w.connected_to.is_some()),
        active_connections: w.active_connections.filter(|_| w.connected_to.is_some()),
        name: w.name,
        tags: w.tags,
        session_addr: w.session_addr,
        last_seen: w.last_seen,
        created_at: w.created_at,
        mode: w.mode,
    }
}

/// `GET /v1/workers`.
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<Worker>> {
    caller.require(&state, "workers:read", None).await?;
    Ok(Json(
        state.store.workers().await?.into_iter().map(view).collect(),
    ))
}

/// `POST /v1/workers`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateWorker>,
) -> ApiResult<CreatedWorker> {
    caller.require(&state, "workers:write", None).await?;
    check_name("worker", &req.name)?;
    if req.name.contains('@') || req.name.contains('_') {
        return Err(ApiError::BadRequest(format!(
            "invalid worker name '{}': use letters, digits, '.' and '-' only (it becomes a DNS name)",
            req.name
        )));
    }
    let token = Secret::random("pwa_");
    let w = state
        .store
        .create_worker(
            &req.name,
            &req.tags,
            &hash_token(token.expose()),
            now() + ACTIVATION_TTL,
        )
        .await?;
    state
        .audit(
            caller.name(),
            "worker.create",
            &format!("worker:{}", w.name),
            "success",
            json!({"tags": w.tags}),
        )
        .await?;
    Ok(Json(CreatedWorker {
        worker: view(w),
        activation_token: token.expose().to_owned(),
    }))
}

/// `DELETE /v1/workers/{name}`: its sessions end (their connections cut while it still
/// listens), its certificate is no longer trusted, its connection cut.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "workers:write", None).await?;
    state.store.worker(&name).await?;
    crate::revoke::end_worker_sessions(&state, &name, "worker deleted", caller.name()).await?;
    state.store.delete_worker(&name).await?;
    state.workers.disconnect(&name, "worker deleted");
    state
        .audit(
            caller.name(),
            "worker.delete",
            &format!("worker:{name}"),
            "success",
            json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/workers/register`: a worker trades its activation token and CSR for a
/// certificate from the cluster CA. The token is single-use: consumed atomically together
/// with recording the certificate's fingerprint.
pub async fn register(
    State(state): State<AppState>,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<RegisterResponse> {
    let hash = hash_token(req.activation_token.trim());
    let invalid = || async {
        state
            .audit(
                "anonymous",
                "worker.register",
                "worker:?",
                "failure",
                json!({"reason": "invalid activation token"}),
            )
            .await?;
        Err::<Json<RegisterResponse>, _>(ApiError::Unauthenticated(
            "invalid, used or expired activation token: create a new one with `postern workers create NAME`".into(),
        ))
    };
    let Some(name) = state.store.pending_worker(&hash).await? else {
        return invalid().await;
    };
    // A bad CSR must not burn the token: sign before consuming it.
    let (cert_pem, fingerprint) = state
        .keys
        .sign_worker_csr(&req.csr_pem, &name)
        .map_err(|e| match e {
            KeyError::BadCsr(m) => {
                ApiError::BadRequest(format!("invalid certificate signing request: {m}"))
            }
            other => ApiError::Internal(other.to_string()),
        })?;
    match state.store.register_worker(&hash, &fingerprint).await? {
        ActivationOutcome::Registered(_) => {}
        ActivationOutcome::Invalid => return invalid().await,
    }
    state
        .audit(
            &format!("worker:{name}"),
            "worker.register",
            &format!("worker:{name}"),
            "success",
            json!({"fingerprint": fingerprint}),
        )
        .await?;
    Ok(Json(RegisterResponse {
        worker: name.into(),
        cert_pem,
        ca_pem: state.keys.ca_pem.clone(),
        cluster_addrs: state.cluster_addrs.clone(),
    }))
}
