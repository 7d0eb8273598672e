//! The `/v1` HTTP API (axum). Routes and permissions are listed in `docs/API.md`.

mod caller;
mod error;
mod identity;
mod oidc;
mod recordings;
mod sessions;
mod targets;
pub mod types;
mod worker_choice;
mod workers;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;

pub use caller::Caller;
pub use error::{check_name, ApiError};
pub use oidc::html_escape;
pub(crate) use targets::credential_purpose;

use crate::state::AppState;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The API router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/cluster", get(cluster_info))
        .route("/v1/cluster/ca", get(crate::tls::cluster_ca))
        .route("/metrics", get(crate::metrics::serve))
        .route("/v1/auth/login", post(identity::login))
        .route("/v1/auth/logout", post(identity::logout))
        .route("/v1/auth/methods", get(oidc::methods))
        .route("/v1/auth/oidc/start", post(oidc::start))
        .route("/v1/auth/oidc/device", post(oidc::device))
        .route("/v1/auth/oidc/callback", get(oidc::callback))
        .route(
            "/v1/auth/oidc/attempts/{id}",
            get(oidc::attempt).post(oidc::confirm),
        )
        .route("/v1/whoami", get(identity::whoami))
        .route(
            "/v1/users",
            get(identity::list_users).post(identity::create_user),
        )
        .route(
            "/v1/users/{name}",
            get(identity::show_user).delete(identity::delete_user),
        )
        .route("/v1/users/{name}/password", post(identity::set_password))
        .route("/v1/users/{name}/lock", post(identity::lock_user))
        .route("/v1/users/{name}/unlock", post(identity::unlock_user))
        .route(
            "/v1/groups",
            get(identity::list_groups).post(identity::create_group),
        )
        .route(
            "/v1/groups/{name}",
            axum::routing::delete(identity::delete_group),
        )
        .route("/v1/groups/{name}/members", post(identity::add_member))
        .route(
            "/v1/groups/{name}/members/{user}",
            axum::routing::delete(identity::remove_member),
        )
        .route(
            "/v1/roles",
            get(identity::list_roles).post(identity::create_role),
        )
        .route(
            "/v1/roles/{name}",
            get(identity::show_role).delete(identity::delete_role),
        )
        .route("/v1/roles/{name}/rules", post(identity::add_rule))
        .route(
            "/v1/roles/{name}/rules/{position}",
            delete(identity::remove_rule),
        )
        .route("/v1/roles/{name}/bind", post(identity::bind))
        .route("/v1/roles/{name}/unbind", post(identity::unbind))
        .route("/v1/targets", get(targets::list).post(targets::create))
        .route(
            "/v1/targets/{name}",
            get(targets::show)
                .patch(targets::update)
                .delete(targets::delete),
        )
        .route(
            "/v1/targets/{name}/authorize",
            post(targets::authorize).layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::metrics::observe_authorize,
            )),
        )
        .route(
            "/v1/targets/{name}/credential",
            get(targets::show_credential)
                .put(targets::set_credential)
                .delete(targets::delete_credential),
        )
        .route("/v1/workers", get(workers::list).post(workers::create))
        .route("/v1/workers/register", post(workers::register))
        .route("/v1/workers/{name}", axum::routing::delete(workers::delete))
        .route("/v1/sessions", get(sessions::list))
        .route("/v1/sessions/{id}", get(sessions::show))
        .route("/v1/sessions/{id}/cancel", post(sessions::cancel))
        .route("/v1/policy/check", get(sessions::policy_check))
        .route("/v1/audit", get(sessions::audit))
        .route("/v1/audit/verify", get(sessions::verify_audit))
        .route("/v1/recordings", get(recordings::list))
        .route("/v1/recordings/{id}", get(recordings::cast))
        .route("/v1/ssh/ca", get(recordings::ssh_ca))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<&'static str, ApiError> {
    state
        .store
        .cluster_id()
        .await
        .map_err(|e| ApiError::Unavailable(format!("store not ready: {e}")))?;
    Ok("ok")
}

async fn cluster_info(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<postern_proto::cluster::ClusterInfo> {
    axum::Json(postern_proto::cluster::ClusterInfo {
        cluster_addrs: state.cluster_addrs.clone(),
    })
}
