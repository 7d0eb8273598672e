//! Finishing an OIDC login once the ID token is verified — the user (created on first login
//! and linked to the IdP's issuer and subject), the groups from the claim, the API token —
//! and failing one; both audited. Also the device-flow poller.

use std::sync::Arc;
use std::time::Duration;

use openidconnect::core::CoreDeviceAuthorizationResponse;
use serde_json::{json, Map, Value};

use super::claims;
use super::provider::{Provider, ProviderError};
use crate::api::types::LoginResponse;
use crate::state::AppState;
use crate::store::{now, Claim, StoreError};

/// The purpose the API token of a finished attempt is sealed under (KEK AAD).
pub const TOKEN_SEAL_PURPOSE: &str = "oidc-attempt-token";

/// A login that did not succeed: why (for the user and the audit log), and who, if known.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The Postern user name, once the ID token named one.
    pub user: Option<String>,
    /// What went wrong, for a person.
    pub message: String,
}

impl Failure {
    /// A failure before the user is known.
    pub fn anonymous(message: impl Into<String>) -> Self {
        Failure {
            user: None,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure during an OIDC login");
        Failure::anonymous("the controller's store failed; see its log")
    }
}

impl From<ProviderError> for Failure {
    fn from(e: ProviderError) -> Self {
        Failure::anonymous(e.to_string())
    }
}

/// A user the IdP vouched for, not yet given a token: who, and how (the `auth.login` details).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The Postern user.
    pub user: String,
    /// How they logged in: method, flow, issuer, subject, groups added and removed.
    pub details: Value,
}

/// Turns the verified claims of an ID token into a logged-in user: [`verify`], then an API
/// token, audited as `auth.login`.
pub async fn finish(
    state: &AppState,
    p: &Provider,
    flow: &str,
    claims: &Map<String, Value>,
) -> Result<LoginResponse, Failure> {
    let v = verify(state, p, flow, claims).await?;
    Ok(state.log_in(v.user, v.details).await?)
}

/// Checks the method's rules on the claims of a verified ID token, finds or creates the user
/// linked to (issuer, subject) and synchronizes the groups that came from this IdP (ending
/// sessions a removed group allowed). No token yet.
pub async fn verify(
    state: &AppState,
    p: &Provider,
    flow: &str,
    claims: &Map<String, Value>,
) -> Result<Verified, Failure> {
    let m = &p.config;
    let id = claims::identity(m, claims).map_err(|e| Failure {
        // Name who it was in the audit log even when the rules refuse them.
        user: claims
            .get(&m.user_claim)
            .and_then(Value::as_str)
            .map(str::to_lowercase),
        message: format!("login refused: {e}"),
    })?;
    let refused = |message: String| Failure {
        user: Some(id.user.clone()),
        message,
    };
    let (user, created) = match state.store.oidc_linked_user(&m.issuer, &id.subject).await? {
        Some(name) => match state.store.find_user(&name).await? {
            Some(u) => (u, false),
            // Deleted by an admin since: their next login brings them back, without groups
            // or roles an admin gave by hand.
            None => (state.store.create_user(&name, None).await?, true),
        },
        None => match state.store.find_user(&id.user).await? {
            Some(_)
                if state
                    .store
                    .oidc_user_linked_elsewhere(&id.user, &m.issuer, &id.subject)
                    .await? =>
            {
                return Err(refused(format!(
                    "the Postern user '{}' is linked to another single sign-on account, not this one of login method '{}': ask an admin (deleting that user frees the name)",
                    id.user, m.name
                )))
            }
            Some(_) => {
                return Err(refused(format!(
                    "a Postern user named '{}' already exists and is not linked to login method '{}': ask an admin to delete it or log in with its password",
                    id.user, m.name
                )))
            }
            None => (state.store.create_user(&id.user, None).await?, true),
        },
    };
    if user.locked {
        return Err(Failure {
            user: Some(user.name.clone()),
            message: format!("user '{}' is locked: ask an admin to unlock it", user.name),
        });
    }
    state
        .store
        .link_oidc_identity(&m.issuer, &id.subject, &user.name, &m.name)
        .await?;
    let (added, removed) = state
        .store
        .sync_oidc_groups(&user.name, &m.issuer, &id.groups)
        .await?;
    if !removed.is_empty() {
        if id.groups_claim_missing {
            // Either the user left every group, or the method names a claim the IdP never
            // sends (then every SSO user loses their groups): worth an operator's look.
            tracing::warn!(
                method = %m.name,
                user = %user.name,
                ?removed,
                "the ID token has no '{}' claim: the user's single sign-on groups were removed; \
                 check groups_claim if the IdP sends groups under another name",
                m.groups_claim
            );
        }
        // A group the IdP no longer lists may have been what allowed an open session.
        crate::revoke::reevaluate(state, &format!("oidc:{}", m.name)).await?;
    }
    Ok(Verified {
        user: user.name,
        details: json!({
            "method": "oidc",
            "provider": m.name,
            "flow": flow,
            "issuer": m.issuer,
            "subject": id.subject,
            "created": created,
            "groups": id.groups,
            "groups_added": added,
            "groups_removed": removed,
            "groups_ignored": id.ignored_groups,
            "groups_claim_missing": id.groups_claim_missing,
        }),
    })
}

/// Seals a finished device login's token into its attempt, for the CLI to collect. An
/// attempt closed meanwhile (it expired and the CLI was told so) gets nothing: the token is
/// revoked.
async fn complete(
    state: &AppState,
    attempt: &str,
    login: &LoginResponse,
) -> Result<(), StoreError> {
    let sealed = state.kek.seal(TOKEN_SEAL_PURPOSE, login.token.as_bytes());
    let completed = state
        .store
        .complete_oidc_attempt(attempt, &login.user, &sealed, login.expires_at)
        .await?;
    if !completed {
        state
            .store
            .delete_token(&crate::auth::hash_token(&login.token))
            .await?;
    }
    Ok(())
}

/// Fails an attempt (if given and still open) and audits `auth.login_failed`.
pub async fn fail(
    state: &AppState,
    attempt: Option<&str>,
    method: &str,
    flow: &str,
    failure: &Failure,
) -> Result<(), StoreError> {
    if let Some(id) = attempt {
        // Already closed (e.g. expired and reported): the audit below still records it.
        let _ = state.store.fail_oidc_attempt(id, &failure.message).await?;
    }
    let actor = failure.user.as_deref().unwrap_or("anonymous");
    state
        .audit(
            actor,
            "auth.login_failed",
            &format!("oidc:{method}"),
            "failure",
            json!({"method": "oidc", "provider": method, "flow": flow, "reason": failure.message}),
        )
        .await
}

/// Device logins a controller process waits for at once (each polls the IdP for up to
/// 15 minutes; anyone may start one).
const DEVICE_WAITS: usize = 256;

/// A place among the device logins in progress, if one is free.
pub fn device_wait_slot() -> Option<tokio::sync::OwnedSemaphorePermit> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(DEVICE_WAITS)))
        .clone()
        .try_acquire_owned()
        .ok()
}

/// Polls the IdP for a device login in the background and finishes (or fails) the attempt;
/// `slot` is held until then.
pub fn spawn_device_wait(
    state: AppState,
    p: Arc<Provider>,
    attempt: String,
    details: CoreDeviceAuthorizationResponse,
    expires_at: i64,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let _slot = slot;
        let left = Duration::from_secs(u64::try_from(expires_at - now()).unwrap_or(1).max(1));
        let result = device_login(&state, &p, &attempt, &details, left).await;
        let outcome = match result {
            Ok(login) => complete(&state, &attempt, &login).await,
            Err(f) => fail(&state, Some(&attempt), &p.config.name, "device", &f).await,
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot record the end of a device login");
        }
    });
}

async fn device_login(
    state: &AppState,
    p: &Provider,
    attempt: &str,
    details: &CoreDeviceAuthorizationResponse,
    left: Duration,
) -> Result<LoginResponse, Failure> {
    let expired =
        || Failure::anonymous("the device login expired before it was approved: start again");
    // oauth2 checks its timeout only between polls, after sleeping a whole interval: the
    // attempt's expiry bounds the wait itself (and so how long it holds its slot).
    let claims = match tokio::time::timeout(left, p.device_wait(details, left)).await {
        Err(_) => return Err(expired()),
        Ok(Ok(c)) => c,
        Ok(Err(ProviderError::Refused(m))) if m.starts_with("expired_token") => {
            return Err(expired())
        }
        Ok(Err(e)) => return Err(e.into()),
    };
    match state.store.claim_oidc_attempt(attempt).await? {
        Claim::Claimed => finish(state, p, "device", &claims).await,
        Claim::Expired => Err(Failure::anonymous("the login attempt expired: start again")),
        Claim::AlreadyUsed => Err(Failure::anonymous("the login attempt was already used")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_logins_wait_in_a_bounded_number() {
        let mut held: Vec<_> = (0..DEVICE_WAITS)
            .map_while(|_| device_wait_slot())
            .collect();
        assert_eq!(held.len(), DEVICE_WAITS);
        assert!(device_wait_slot().is_none(), "one too many");
        held.pop();
        assert!(device_wait_slot().is_some(), "a slot freed is free");
    }
}
