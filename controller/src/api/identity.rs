//! Login, users, groups and roles.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;

use super::types::{
    AddMember, CreateGroup, CreateRole, CreateUser, Group, LoginRequest, LoginResponse, Principal,
    Role, Rule, SetPassword, User, WhoAmI,
};
use super::{check_name, ApiError, Caller};
use crate::auth::{check_password, new_password_hash};
use crate::policy::{self, validate_action, validate_glob};
use crate::state::AppState;
use crate::store::UserRow;
use crate::throttle::secs_up;

type ApiResult<T> = Result<Json<T>, ApiError>;

const MIN_PASSWORD: usize = 8;

/// `POST /v1/auth/login`.
pub async fn login(
    State(state): State<AppState>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<LoginResponse> {
    if let Err(wait) = state.login_throttle.begin(&req.user) {
        let secs = secs_up(wait);
        return Err(ApiError::TooManyRequests {
            message: format!(
                "too many failed logins for '{}': try again in {secs} s",
                req.user
            ),
            retry_after: secs,
        });
    }
    let user = state.store.find_user(&req.user).await?;
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    let ok = check_password(req.password.clone(), hash).await?;
    let Some(user) = user.filter(|u| u.password_hash.is_some() && ok) else {
        let wait = state.login_throttle.failed(&req.user).map(secs_up);
        state
            .audit(
                &req.user,
                "auth.login_failed",
                &format!("user:{}", req.user),
                "failure",
                json!({"reason": "bad user name or password", "wait_secs": wait}),
            )
            .await?;
        let mut message = "invalid user name or password".to_owned();
        if let Some(secs) = wait {
            message.push_str(&format!(
                " (after {} failed logins for this name, the next attempt must wait {secs} s)",
                crate::throttle::FREE_FAILURES
            ));
        }
        return Err(ApiError::Unauthenticated(message));
    };
    state.login_throttle.succeeded(&user.name);
    if user.locked {
        state
            .audit(
                &user.name,
                "auth.login_failed",
                &format!("user:{}", user.name),
                "failure",
                json!({"reason": "locked"}),
            )
            .await?;
        return Err(ApiError::Forbidden(format!(
            "user '{}' is locked: ask an admin to unlock it",
            user.name
        )));
    }
    Ok(Json(
        state
            .log_in(user.name, json!({"method": "password"}))
            .await?,
    ))
}

/// `POST /v1/auth/logout`.
pub async fn logout(State(state): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    state.store.delete_token(&caller.token_hash).await?;
    state
        .audit(
            caller.name(),
            "auth.logout",
            &format!("user:{}", caller.name()),
            "success",
            json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/whoami`.
pub async fn whoami(State(state): State<AppState>, caller: Caller) -> ApiResult<WhoAmI> {
    Ok(Json(WhoAmI {
        groups: state.store.user_groups(caller.name()).await?,
        roles: state.store.roles_for_user(caller.name()).await?,
        user: caller.user.name,
        token_expires_at: caller.token_expires_at,
    }))
}

async fn user_view(state: &AppState, u: UserRow) -> Result<User, ApiError> {
    let from_idp = state.store.oidc_memberships(None, Some(&u.name)).await?;
    Ok(User {
        groups: state.store.user_groups(&u.name).await?,
        idp_groups: from_idp.into_iter().map(|(g, _)| g).collect(),
        name: u.name,
        locked: u.locked,
        has_password: u.password_hash.is_some(),
        created_at: u.created_at,
    })
}

/// `GET /v1/users`.
pub async fn list_users(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<User>> {
    caller.require(&state, "users:read", None).await?;
    let mut out = Vec::new();
    for u in state.store.users().await? {
        out.push(user_view(&state, u).await?);
    }
    Ok(Json(out))
}

/// `GET /v1/users/{name}`.
pub async fn show_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<User> {
    caller.require(&state, "users:read", None).await?;
    let u = state.store.user(&name).await?;
    Ok(Json(user_view(&state, u).await?))
}

/// `POST /v1/users`.
pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateUser>,
) -> ApiResult<User> {
    caller.require(&state, "users:write", None).await?;
    check_name("user", &req.name)?;
    let hash = match req.password {
        Some(p) if p.chars().count() < MIN_PASSWORD => {
            return Err(ApiError::BadRequest(format!(
                "password too short: use at least {MIN_PASSWORD} characters"
            )))
        }
        Some(p) => Some(new_password_hash(p).await?),
        None => None,
    };
    let u = state.store.create_user(&req.name, hash.as_deref()).await?;
    state
        .audit(
            caller.name(),
            "user.create",
            &format!("user:{}", u.name),
            "success",
            json!({"password": hash.is_some()}),
        )
        .await?;
    Ok(Json(user_view(&state, u).await?))
}

/// `POST /v1/users/{name}/password`: with `users:write`, sets anyone's password (a reset);
/// a user changes their own by giving the current one. The user's API tokens end with the
/// old password (but the one of a user changing their own).
pub async fn set_password(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<SetPassword>,
) -> ApiResult<User> {
    let own = name == caller.name();
    let current = req.current_password.filter(|_| own);
    if current.is_none() {
        caller.require(&state, "users:write", None).await?;
    }
    if req.password.chars().count() < MIN_PASSWORD {
        return Err(ApiError::BadRequest(format!(
            "password too short: use at least {MIN_PASSWORD} characters"
        )));
    }
    let user = state.store.user(&name).await?;
    if let Some(current) = current {
        let ok = check_password(current, user.password_hash.clone()).await?;
        if !(ok && user.password_hash.is_some()) {
            state
                .audit(
                    caller.name(),
                    "user.password",
                    &format!("user:{name}"),
                    "denied",
                    json!({"reason": "wrong current password"}),
                )
                .await?;
            return Err(ApiError::Forbidden("the current password is wrong".into()));
        }
    }
    let password = req.password;
    let hash = new_password_hash(password).await?;
    let keep = own.then_some(caller.token_hash.as_str());
    state.store.set_password(&name, &hash, keep).await?;
    state
        .audit(
            caller.name(),
            "user.password",
            &format!("user:{name}"),
            "success",
            json!({"own": own}),
        )
        .await?;
    Ok(Json(
        user_view(&state, state.store.user(&name).await?).await?,
    ))
}

/// `DELETE /v1/users/{name}`.
pub async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "users:write", None).await?;
    if name == caller.name() {
        return Err(ApiError::Conflict("you cannot delete yourself".into()));
    }
    crate::revoke::end_user_sessions(&state, &name, "user deleted", caller.name()).await?;
    state.store.delete_user(&name).await?;
    state
        .audit(
            caller.name(),
            "user.delete",
            &format!("user:{name}"),
            "success",
            json!({}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_locked(
    state: AppState,
    caller: Caller,
    name: String,
    locked: bool,
) -> ApiResult<User> {
    caller.require(&state, "users:lock", None).await?;
    if locked && name == caller.name() {
        return Err(ApiError::Conflict("you cannot lock yourself".into()));
    }
    let u = state.store.set_user_locked(&name, locked).await?;
    let action = if locked { "user.lock" } else { "user.unlock" };
    // Recorded first; the sessions end even if the record fails.
    let audited = state
        .audit(
            caller.name(),
            action,
            &format!("user:{name}"),
            "success",
            json!({}),
        )
        .await;
    if locked {
        crate::revoke::end_user_sessions(&state, &name, "user locked", caller.name()).await?;
    }
    audited?;
    Ok(Json(user_view(&state, u).await?))
}

/// `POST /v1/users/{name}/lock`.
pub async fn lock_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<User> {
    set_locked(state, caller, name, true).await
}

/// `POST /v1/users/{name}/unlock`.
pub async fn unlock_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<User> {
    set_locked(state, caller, name, false).await
}

async fn group_view(state: &AppState, name: &str) -> Result<Group, ApiError> {
    let groups = state.store.groups().await?;
    let (name, members) = groups
        .into_iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| ApiError::NotFound(format!("no group named '{name}'")))?;
    let from_idp = state.store.oidc_memberships(Some(&name), None).await?;
    Ok(Group {
        idp_members: from_idp.into_iter().map(|(_, u)| u).collect(),
        name,
        members,
    })
}

/// `GET /v1/groups`.
pub async fn list_groups(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<Group>> {
    caller.require(&state, "groups:read", None).await?;
    let groups = state.store.groups().await?;
    let from_idp = state.store.oidc_memberships(None, None).await?;
    Ok(Json(
        groups
            .into_iter()
            .map(|(name, members)| Group {
                idp_members: from_idp
                    .iter()
                    .filter(|(g, _)| *g == name)
                    .map(|(_, u)| u.clone())
                    .collect(),
                name,
                members,
            })
            .collect(),
    ))
}

/// `POST /v1/groups`.
pub async fn create_group(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateGroup>,
) -> ApiResult<Group> {
    caller.require(&state, "groups:write", None).await?;
    check_name("group", &req.name)?;
    state.store.create_group(&req.name).await?;
    state
        .audit(
            caller.name(),
            "group.create",
            &format!("group:{}", req.name),
            "success",
            json!({}),
        )
        .await?;
    Ok(Json(group_view(&state, &req.name).await?))
}

/// `DELETE /v1/groups/{name}`.
pub async fn delete_group(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "groups:write", None).await?;
    state.store.delete_group(&name).await?;
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "group.delete",
        &format!("group:{name}"),
        json!({}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/groups/{name}/members`.
pub async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<AddMember>,
) -> ApiResult<Group> {
    caller.require(&state, "groups:write", None).await?;
    let from_idp = state.store.add_member(&name, &req.user).await?;
    state
        .audit(
            caller.name(),
            "group.add_member",
            &format!("group:{name}"),
            "success",
            json!({"user": req.user, "kept_from_idp": from_idp}),
        )
        .await?;
    Ok(Json(group_view(&state, &name).await?))
}

/// `DELETE /v1/groups/{name}/members/{user}`.
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, user)): Path<(String, String)>,
) -> ApiResult<Group> {
    caller.require(&state, "groups:write", None).await?;
    state.store.remove_member(&name, &user).await?;
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "group.remove_member",
        &format!("group:{name}"),
        json!({"user": user}),
    )
    .await?;
    Ok(Json(group_view(&state, &name).await?))
}

async fn role_view(state: &AppState, name: &str) -> Result<Role, ApiError> {
    let (rules, bindings) = state.store.role(name).await?;
    Ok(Role {
        name: name.to_owned(),
        rules,
        bindings,
    })
}

/// `GET /v1/roles`.
pub async fn list_roles(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<Role>> {
    caller.require(&state, "roles:read", None).await?;
    let mut out = Vec::new();
    for name in state.store.role_names().await? {
        out.push(role_view(&state, &name).await?);
    }
    Ok(Json(out))
}

/// `GET /v1/roles/{name}`.
pub async fn show_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:read", None).await?;
    Ok(Json(role_view(&state, &name).await?))
}

/// `POST /v1/roles`.
pub async fn create_role(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateRole>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:write", None).await?;
    check_name("role", &req.name)?;
    state.store.create_role(&req.name).await?;
    state
        .audit(
            caller.name(),
            "role.create",
            &format!("role:{}", req.name),
            "success",
            json!({}),
        )
        .await?;
    Ok(Json(role_view(&state, &req.name).await?))
}

/// `DELETE /v1/roles/{name}`.
pub async fn delete_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, "roles:write", None).await?;
    // As with deleting or locking yourself: the role must not be what lets you manage roles
    // (the last admin deleting `admin` could never bind it back).
    let mut kept = state.store.rules_for_user(caller.name()).await?;
    kept.retain(|r| r.role != name);
    if policy::check(&kept, "roles:write", None).is_err() {
        return Err(ApiError::Conflict(format!(
            "role '{name}' is what lets you manage roles: deleting it would lock you out of \
             role management (have another admin delete it, or bind yourself a role that \
             allows roles:write first)"
        )));
    }
    state.store.delete_role(&name).await?;
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "role.delete",
        &format!("role:{name}"),
        json!({}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/roles/{name}/rules`.
pub async fn add_rule(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(rule): Json<Rule>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:write", None).await?;
    let rule = rule.without_repeats();
    if rule.actions.is_empty() {
        return Err(ApiError::BadRequest(
            "a rule needs at least one action".into(),
        ));
    }
    for a in &rule.actions {
        validate_action(a).map_err(ApiError::BadRequest)?;
    }
    // Admin actions (NOUN:VERB) are checked with no target: a rule that also selects
    // targets would never apply to them, its allow granting and its deny refusing nothing.
    let admin: Vec<&str> = rule
        .actions
        .iter()
        .map(String::as_str)
        .filter(|a| a.contains(':'))
        .collect();
    if !admin.is_empty() && (rule.targets.is_some() || !rule.labels.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "{} concern no target, so a rule with a target pattern or labels would never apply \
             to them: put them in a rule without --targets and --label",
            admin.join(", ")
        )));
    }
    if !rule.logins.is_empty() && !rule.actions.iter().any(|a| a == "connect" || a == "*") {
        return Err(ApiError::BadRequest(
            "logins concern connect only: a rule with logins must include connect".into(),
        ));
    }
    if let Some(g) = &rule.targets {
        validate_glob(g)
            .map_err(|e| ApiError::BadRequest(format!("invalid target glob '{g}': {e}")))?;
    }
    let (rules, _) = state.store.role(&name).await?;
    if let Some(at) = rules.iter().position(|r| r.same_as(&rule)) {
        return Err(ApiError::Conflict(format!(
            "role '{name}' already has this rule (#{})",
            at + 1
        )));
    }
    state.store.add_rule(&name, &rule).await?;
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "role.add_rule",
        &format!("role:{name}"),
        json!({"rule": rule}),
    )
    .await?;
    Ok(Json(role_view(&state, &name).await?))
}

/// `DELETE /v1/roles/{name}/rules/{position}`: removes one rule (1-based, as `roles show`
/// numbers them); the rules after it move up.
pub async fn remove_rule(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, position)): Path<(String, i64)>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:write", None).await?;
    // As with unbinding: not the rule that lets the caller manage roles.
    let mut kept = state.store.rules_for_user(caller.name()).await?;
    kept.retain(|r| !(r.role == name && r.position == position));
    if policy::check(&kept, "roles:write", None).is_err() {
        return Err(ApiError::Conflict(format!(
            "rule #{position} of role '{name}' is what lets you manage roles: removing it would \
             lock you out of role management"
        )));
    }
    let rule = state.store.remove_rule(&name, position).await?;
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "role.remove_rule",
        &format!("role:{name}"),
        json!({"position": position, "rule": rule}),
    )
    .await?;
    Ok(Json(role_view(&state, &name).await?))
}

/// `POST /v1/roles/{name}/bind`.
pub async fn bind(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(who): Json<Principal>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:write", None).await?;
    state.store.bind_role(&name, &who).await?;
    state
        .audit(
            caller.name(),
            "role.bind",
            &format!("role:{name}"),
            "success",
            json!({"principal": who}),
        )
        .await?;
    Ok(Json(role_view(&state, &name).await?))
}

/// `POST /v1/roles/{name}/unbind`.
pub async fn unbind(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(who): Json<Principal>,
) -> ApiResult<Role> {
    caller.require(&state, "roles:write", None).await?;
    state.store.unbind_role(&name, &who).await?;
    // As with deleting or locking yourself: an unbinding that takes role management away
    // from the caller (the last admin unbinding `admin` from themselves, or from a group of
    // theirs) is undone and refused; nobody could bind the role back.
    let rules = state.store.rules_for_user(caller.name()).await?;
    if policy::check(&rules, "roles:write", None).is_err() {
        state.store.bind_role(&name, &who).await?;
        return Err(ApiError::Conflict(format!(
            "unbinding role '{name}' would lock you out of role management (have another \
             admin do it, or bind yourself a role that allows roles:write first)"
        )));
    }
    // Recorded; open sessions the change no longer allows end now, not at their expiry.
    crate::revoke::audit_policy_change(
        &state,
        caller.name(),
        "role.unbind",
        &format!("role:{name}"),
        json!({"principal": who}),
    )
    .await?;
    Ok(Json(role_view(&state, &name).await?))
}
