//! Shell recordings (`recordings:read`) and the SSH user CA's public key.

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::types::{Recording, RecordingQuery, SshCa};
use super::{ApiError, Caller};
use crate::state::AppState;

/// `GET /v1/recordings[?session=ID]`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<RecordingQuery>,
) -> Result<Json<Vec<Recording>>, ApiError> {
    caller.require(&state, "recordings:read", None).await?;
    Ok(Json(state.store.recordings(q.session.as_deref()).await?))
}

/// `GET /v1/recordings/{id}`: the asciicast v2 text (`application/x-asciicast`).
pub async fn cast(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&state, "recordings:read", None).await?;
    let (recording, text) = state.store.recording(&id).await?;
    state
        .audit(
            caller.name(),
            "recording.read",
            &format!("session:{}", recording.session_id),
            "success",
            json!({"recording": recording.id}),
        )
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/x-asciicast")], text))
}

/// `GET /v1/ssh/ca`: the public key targets put in `TrustedUserCAKeys` for certificate mode.
pub async fn ssh_ca(State(state): State<AppState>, _caller: Caller) -> Json<SshCa> {
    Json(SshCa {
        public_key: state.keys.ssh_user_ca.public_key().to_owned(),
    })
}
