//! State shared by the API handlers and the cluster listener.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::api::types::LoginResponse;
use crate::audit::AuditLog;
use crate::auth::new_api_token;
use crate::cluster::Registry;
use crate::keys::{Kek, RootKeys};
use crate::store::{now, NewEvent, NewSession, Store, StoreError};

/// Cheap-to-clone handle on the controller's shared state.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

/// The shared state.
#[derive(Debug)]
pub struct Inner {
    /// The store.
    pub store: Store,
    /// Root keys.
    pub keys: RootKeys,
    /// Key-encryption key: seals brokered credentials.
    pub kek: Kek,
    /// Token issuer: the cluster id.
    pub issuer: String,
    /// Lifetime of login tokens.
    pub token_ttl: Duration,
    /// Largest shell recording stored, bytes.
    pub recording_max_bytes: i64,
    /// Failed password logins per user name.
    pub login_throttle: crate::throttle::LoginThrottle,
    /// This controller process's identity in `workers.connected_to`.
    pub instance: String,
    /// Cluster addresses announced to registering workers.
    pub cluster_addrs: Vec<String>,
    /// Where clients dial this controller's relay for outbound-only workers (`host:port`);
    /// `None` when it runs no relay.
    pub relay_addr: Option<String>,
    /// Workers whose control connection this controller holds.
    pub workers: Registry,
    /// The OpenID Connect login methods.
    pub oidc: crate::oidc::Oidc,
    /// The audit writer.
    pub audit_log: AuditLog,
    /// Prometheus metrics.
    pub metrics: crate::metrics::ControllerMetrics,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Wraps the state.
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    /// Appends an audit event (also mirrored to the log).
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        details: serde_json::Value,
    ) -> Result<(), StoreError> {
        self.audit_with(Vec::new(), actor, action, resource, outcome, details)
            .await
    }

    /// [`Self::audit`], storing `sessions` in the same transaction.
    pub async fn audit_with(
        &self,
        sessions: Vec<NewSession>,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        details: serde_json::Value,
    ) -> Result<(), StoreError> {
        tracing::info!(target: "postern::audit", actor, action, resource, outcome, %details);
        self.audit_log
            .append_with(
                vec![NewEvent::now(actor, action, resource, outcome, details)],
                sessions,
            )
            .await
            .map(|_| ())
    }

    /// Logs `user` in: a new API token, audited as `auth.login` with `details` (how).
    pub async fn log_in(
        &self,
        user: String,
        details: serde_json::Value,
    ) -> Result<LoginResponse, StoreError> {
        let (token, hash) = new_api_token();
        let expires_at =
            now().saturating_add(i64::try_from(self.token_ttl.as_secs()).unwrap_or(i64::MAX));
        self.store.insert_token(&hash, &user, expires_at).await?;
        let resource = format!("user:{user}");
        self.audit(&user, "auth.login", &resource, "success", details)
            .await?;
        Ok(LoginResponse {
            token: token.expose().to_owned(),
            user,
            expires_at,
        })
    }
}
