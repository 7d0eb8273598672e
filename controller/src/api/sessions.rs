//! Sessions (list, show, cancel), policy explanation, audit queries.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::json;

use super::types::{
    AuditAnchor, AuditEvent, AuditQuery, AuditVerification, Decision, PolicyCheckQuery, Session,
    SessionQuery,
};
use super::{ApiError, Caller};
use crate::policy::{self, SourcedRule, TargetRef};
use crate::state::AppState;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `GET /v1/sessions`: the caller's own sessions, or everyone's with `sessions:read`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(mut q): Query<SessionQuery>,
) -> ApiResult<Vec<Session>> {
    if !caller.may("sessions:read", None) {
        match &q.user {
            Some(u) if u != caller.name() => {
                caller.require(&state, "sessions:read", None).await?;
            }
            _ => q.user = Some(caller.name().to_owned()),
        }
    }
    Ok(Json(state.store.sessions(&q).await?))
}

async fn visible_session(
    state: &AppState,
    caller: &Caller,
    id: &str,
    action: &str,
) -> Result<Session, ApiError> {
    let s = state.store.session(id).await?;
    if s.user != caller.name() {
        if !caller.may("sessions:read", None) {
            // Refused (and audited as such), but answered as an unknown id: a caller who may
            // not see others' sessions does not learn which ids exist.
            let _denied = caller.require(state, "sessions:read", None).await;
            return Err(crate::store::StoreError::NotFound {
                kind: "session",
                name: id.to_owned(),
                suggestion: None,
            }
            .into());
        }
        caller.require(state, action, None).await?;
    }
    Ok(s)
}

/// `GET /v1/sessions/{id}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Session> {
    Ok(Json(
        visible_session(&state, &caller, &id, "sessions:read").await?,
    ))
}

/// `POST /v1/sessions/{id}/cancel`: ends the session and cuts its open connections.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Session> {
    let s = visible_session(&state, &caller, &id, "sessions:cancel").await?;
    if s.status == "terminated" {
        return Err(ApiError::Conflict(format!(
            "session {id} has already ended ({})",
            s.end_reason.unwrap_or_default()
        )));
    }
    let reason = if s.user == caller.name() {
        format!("cancelled by {}", caller.name())
    } else {
        format!("cancelled by admin {}", caller.name())
    };
    state.store.end_session(&id, &reason).await?;
    let pushed = crate::revoke::push_cancel(&state, &s.worker, &id, &reason, caller.name()).await;
    state
        .audit(
            caller.name(),
            "session.cancel",
            &format!("session:{id}"),
            "success",
            json!({"user": s.user, "target": s.target, "worker": s.worker, "pushed": pushed}),
        )
        .await?;
    Ok(Json(state.store.session(&id).await?))
}

/// `GET /v1/policy/check?user=&target=&action=`: which rule decides, and why.
pub async fn policy_check(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PolicyCheckQuery>,
) -> ApiResult<Decision> {
    caller.require(&state, "roles:read", None).await?;
    state.store.user(&q.user).await?;
    let target = state.store.target(&q.target).await?;
    let action = q.action.unwrap_or_else(|| "connect".into());
    policy::validate_action(&action).map_err(ApiError::BadRequest)?;
    let rules: Vec<SourcedRule> = state.store.rules_for_user(&q.user).await?;
    let tref = TargetRef {
        name: &target.name,
        labels: &target.labels,
    };
    // For connect, the login too, as authorize checks it.
    let credential = state.store.credential(&target.name).await?;
    let own = crate::revoke::credential_login(credential.as_ref());
    let login = q.login.as_deref().or(own).filter(|_| action == "connect");
    // Admin actions (NOUN:VERB) concern no target: checked as the API checks them.
    let admin = action.contains(':');
    let verdict =
        policy::check(&rules, &action, (!admin).then_some(tref)).and_then(|granted| match login {
            Some(login) => policy::session_login(&rules, tref, login, own).map(|()| granted),
            None => Ok(granted),
        });
    let action = match login {
        Some(login) => format!("{action} as '{login}'"),
        None => action,
    };
    Ok(Json(match verdict {
        Ok(g) => Decision {
            allowed: true,
            reason: if admin {
                format!("'{action}' is allowed for '{}' by {}", q.user, g.rule())
            } else {
                format!(
                    "'{action}' on target '{}' is allowed for '{}' by {}",
                    target.name,
                    q.user,
                    g.rule()
                )
            },
            rule: Some(g.rule().to_owned()),
            action,
        },
        Err(d) => Decision {
            allowed: false,
            reason: format!("user '{}': {}", q.user, d.reason),
            rule: d.rule,
            action,
        },
    }))
}

/// `GET /v1/audit`. With `after_seq` and `wait`, a long poll: answers as soon as a matching
/// event after that position is stored (pushed by the writer, not polled), or after `wait`
/// seconds with nothing.
pub async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Vec<AuditEvent>> {
    caller.require(&state, "audit:read", None).await?;
    if let Some(n) = q.limit.filter(|n| !(1..=100_000).contains(n)) {
        return Err(ApiError::BadRequest(format!(
            "limit {n}: expected 1 to 100000 events"
        )));
    }
    let wait = q.wait.unwrap_or(0).min(60);
    if q.after_seq.is_none() || wait == 0 {
        return Ok(Json(state.store.audit_events(&q).await?));
    }
    let mut head = state.audit_log.subscribe();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        head.borrow_and_update();
        let events = state.store.audit_events(&q).await?;
        if !events.is_empty() {
            return Ok(Json(events));
        }
        match tokio::time::timeout_at(deadline, head.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Json(Vec::new())),
        }
    }
}

/// Query of `GET /v1/audit/verify`.
#[derive(Debug, serde::Deserialize)]
pub struct VerifyQuery {
    /// `SEQ:HASH` ([`AuditAnchor`]) the chain must still hold.
    #[serde(default)]
    anchor: Option<String>,
}

/// `GET /v1/audit/verify`: walks the hash chain. The walk is recorded as an event of its
/// own, after the fact: a log that cannot take that event still gets its report read.
pub async fn verify_audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<VerifyQuery>,
) -> ApiResult<AuditVerification> {
    caller.require(&state, "audit:read", None).await?;
    let anchor = q
        .anchor
        .as_deref()
        .map(str::parse::<AuditAnchor>)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("anchor {e}")))?;
    let report = state.store.verify_audit(anchor.as_ref()).await?;
    let recorded = state
        .audit(
            caller.name(),
            "audit.verify",
            "audit",
            if report.ok { "success" } else { "failure" },
            json!({
                "checked": report.checked,
                "first_bad_seq": report.first_bad_seq,
                "reason": report.reason,
                "anchor": anchor.map(|a| a.to_string()),
            }),
        )
        .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, "cannot record the audit.verify event; its report is sent anyway");
    }
    Ok(Json(report))
}
