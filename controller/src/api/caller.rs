//! Who is calling: the `Caller` extractor authenticates the bearer token and carries the
//! caller's policy rules; `Caller::require` is the only way to a [`Granted`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::auth::hash_token;
use crate::policy::{self, Granted, SourcedRule, TargetRef};
use crate::state::AppState;
use crate::store::UserRow;

/// An authenticated API caller.
#[derive(Debug)]
pub struct Caller {
    /// The user.
    pub user: UserRow,
    /// Hash of the token used.
    pub token_hash: String,
    /// When that token expires.
    pub token_expires_at: i64,
    /// Rules of every role bound to the user.
    pub rules: Vec<SourcedRule>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthenticated("not logged in: run `postern login`".into())
            })?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::Unauthenticated("expected 'Authorization: Bearer <token>'".into())
        })?;
        let token_hash = hash_token(token.trim());
        let owner = state.store.token_owner(&token_hash).await?.ok_or_else(|| {
            ApiError::Unauthenticated(
                "your API token is invalid or expired: run `postern login`".into(),
            )
        })?;
        if owner.user.locked {
            return Err(ApiError::Forbidden(format!(
                "user '{}' is locked",
                owner.user.name
            )));
        }
        Ok(Caller {
            user: owner.user,
            token_hash,
            token_expires_at: owner.expires_at,
            rules: owner.rules,
        })
    }
}

impl Caller {
    /// The caller's name.
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// Checks an action (on a target, for target actions); a refusal is audited.
    pub async fn require(
        &self,
        state: &AppState,
        action: &str,
        target: Option<TargetRef<'_>>,
    ) -> Result<Granted, ApiError> {
        match policy::check(&self.rules, action, target) {
            Ok(g) => Ok(g),
            Err(denied) => {
                let resource = target
                    .map(|t| format!("target:{}", t.name))
                    .unwrap_or_else(|| action.to_owned());
                state
                    .audit(
                        self.name(),
                        "permission.denied",
                        &resource,
                        "denied",
                        serde_json::json!({"action": action, "reason": denied.reason, "rule": denied.rule}),
                    )
                    .await?;
                Err(ApiError::Forbidden(format!(
                    "permission denied for user '{}': {}",
                    self.name(),
                    denied.reason
                )))
            }
        }
    }

    /// Whether an action would be allowed (no audit): for filtering lists.
    pub fn may(&self, action: &str, target: Option<TargetRef<'_>>) -> bool {
        policy::check(&self.rules, action, target).is_ok()
    }
}
