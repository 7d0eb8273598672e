//! `ApiError`: the one place HTTP status codes are chosen.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::ErrorBody;
use crate::store::StoreError;

/// An API call failed; the message is shown to the user as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed or a value is invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated but not permitted (403).
    #[error("{0}")]
    Forbidden(String),
    /// The named thing does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with what exists (409).
    #[error("{0}")]
    Conflict(String),
    /// A dependency (worker, database) is not available now (503).
    #[error("{0}")]
    Unavailable(String),
    /// Too many attempts: try again after `retry_after` seconds (429, with `Retry-After`).
    #[error("{message}")]
    TooManyRequests {
        /// What to tell the user.
        message: String,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// A bug or an unexpected failure (500); details go to the log, not the client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::Internal("the controller's store failed; see its log".into())
            }
        }
    }
}

impl From<crate::auth::PasswordWork> for ApiError {
    fn from(e: crate::auth::PasswordWork) -> Self {
        match e {
            crate::auth::PasswordWork::Busy => ApiError::Unavailable(e.to_string()),
            crate::auth::PasswordWork::Failed(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let body = ErrorBody {
            error: code.into(),
            message: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, retry_after.into());
        }
        response
    }
}

/// Checks a name people type: 1–64 characters of letters, digits, `.`, `_`, `-`, `@`,
/// starting with a letter or digit.
pub fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {kind} name '{name}': use 1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit"
        )))
    }
}
