//! Live revocation (DESIGN §5): ending sessions and cutting their open connections.
//!
//! Whatever ends a session — an admin's cancel, a user lock, a target deleted or disabled, a
//! policy change — goes through [`end_sessions`]: the store row ends first (so no worker can
//! activate it again), then a `CancelSession` is pushed to the worker carrying it. When this
//! controller does not hold that worker's control connection, the push travels through
//! PostgreSQL `NOTIFY` to the controller that does.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::types::{Session, SessionQuery};
use crate::policy::{self, SourcedRule, TargetRef};
use crate::state::AppState;
use crate::store::{now, Backend, StoreError};

/// The PostgreSQL channel cancellations travel on between controllers.
pub const CANCEL_CHANNEL: &str = "postern_cancel";

/// How often expired sessions are swept into `terminated`.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A cancellation for another controller to deliver.
#[derive(Debug, Serialize, Deserialize)]
struct CancelNote {
    worker: String,
    session_id: String,
    reason: String,
    actor: String,
}

/// Ends each session (unless already ended) with `reason`, pushes the cancellation to its
/// worker and audits it as done by `actor`. Returns how many sessions this call ended.
pub async fn end_sessions(
    state: &AppState,
    sessions: &[Session],
    reason: &str,
    actor: &str,
) -> Result<usize, StoreError> {
    let mut ended = 0;
    for s in sessions {
        if !state.store.end_session(&s.id, reason).await? {
            continue;
        }
        ended += 1;
        let delivered = push_cancel(state, &s.worker, &s.id, reason, actor).await;
        state
            .audit(
                actor,
                "session.revoke",
                &format!("session:{}", s.id),
                "success",
                json!({"reason": reason, "user": s.user, "target": s.target, "worker": s.worker, "delivered": delivered}),
            )
            .await?;
    }
    Ok(ended)
}

/// Delivers a cancellation to the worker: directly if this controller holds its control
/// connection, otherwise through PostgreSQL NOTIFY. Returns how it went, for the audit log.
pub async fn push_cancel(
    state: &AppState,
    worker: &str,
    session_id: &str,
    reason: &str,
    actor: &str,
) -> &'static str {
    let delivery = deliver_cancel(state, worker, session_id, reason, actor).await;
    state.metrics.revoked(delivery);
    delivery
}

async fn deliver_cancel(
    state: &AppState,
    worker: &str,
    session_id: &str,
    reason: &str,
    actor: &str,
) -> &'static str {
    if state.metrics.time_revocation(session_id, || {
        state.workers.cancel(worker, session_id, reason, actor)
    }) {
        return "pushed";
    }
    if state.store.backend() == Backend::Postgres {
        let note = CancelNote {
            worker: worker.to_owned(),
            session_id: session_id.to_owned(),
            reason: reason.to_owned(),
            actor: actor.to_owned(),
        };
        match state
            .store
            .notify(
                CANCEL_CHANNEL,
                &serde_json::to_string(&note).unwrap_or_default(),
            )
            .await
        {
            Ok(()) => return "notified",
            Err(e) => {
                tracing::error!(error = %e, "cannot notify other controllers of a cancellation")
            }
        }
    }
    // The worker is not connected anywhere: it will learn at its next hello (its sessions
    // are re-checked then) or fail closed.
    "worker not connected"
}

/// Ends every pending or active session of `user`.
pub async fn end_user_sessions(
    state: &AppState,
    user: &str,
    reason: &str,
    actor: &str,
) -> Result<usize, StoreError> {
    let sessions = state
        .store
        .sessions(&SessionQuery {
            active: Some(true),
            user: Some(user.to_owned()),
            target: None,
        })
        .await?;
    end_sessions(state, &sessions, reason, actor).await
}

/// Ends every pending or active session carried by `worker` (pushing each cancellation to
/// it while it is still connected).
pub async fn end_worker_sessions(
    state: &AppState,
    worker: &str,
    reason: &str,
    actor: &str,
) -> Result<usize, StoreError> {
    let sessions = worker_sessions(state, worker).await?;
    end_sessions(state, &sessions, reason, actor).await
}

/// The pending and active sessions carried by `worker`.
async fn worker_sessions(state: &AppState, worker: &str) -> Result<Vec<Session>, StoreError> {
    let mut sessions = state
        .store
        .sessions(&SessionQuery {
            active: Some(true),
            ..Default::default()
        })
        .await?;
    sessions.retain(|s| s.worker == worker);
    Ok(sessions)
}

/// The reason a session lost with a worker's earlier process ends with.
pub const WORKER_RESTARTED: &str =
    "worker restarted: the session was lost with its earlier process";

/// Ends the sessions that `worker` lost with an earlier process of it that ended without
/// saying so (killed, crashed): active there, activated before the process now connecting
/// started (`started_ms`, on this controller's clock; activation times are whole seconds, so
/// with a two-second margin) and not among those it carries (`held`). A process that only
/// reconnected started before all of its sessions, so none of them qualify: it reports the
/// ends of those it closed itself.
pub async fn end_lost_sessions(
    state: &AppState,
    worker: &str,
    held: &[postern_proto::ids::SessionId],
    started_ms: i64,
) -> Result<usize, StoreError> {
    let mut sessions = worker_sessions(state, worker).await?;
    sessions.retain(|s| {
        s.status == "active"
            && s.activated_at
                .is_some_and(|at| at.saturating_add(2).saturating_mul(1000) <= started_ms)
            && !held.iter().any(|h| h.as_str() == s.id)
    });
    end_sessions(state, &sessions, WORKER_RESTARTED, "controller").await
}

/// Ends every pending or active session to `target`.
pub async fn end_target_sessions(
    state: &AppState,
    target: &str,
    reason: &str,
    actor: &str,
) -> Result<usize, StoreError> {
    let sessions = state
        .store
        .sessions(&SessionQuery {
            active: Some(true),
            user: None,
            target: Some(target.to_owned()),
        })
        .await?;
    end_sessions(state, &sessions, reason, actor).await
}

/// Audits a change to roles, rules, bindings or groups by `actor` (a success), then ends the
/// open sessions it no longer allows ([`reevaluate`]): they end even if the record fails,
/// whose error comes after.
pub async fn audit_policy_change(
    state: &AppState,
    actor: &str,
    action: &str,
    resource: &str,
    details: serde_json::Value,
) -> Result<(), StoreError> {
    let audited = state
        .audit(actor, action, resource, "success", details)
        .await;
    reevaluate(state, actor).await?;
    audited
}

/// Re-evaluates every live session against the current policy and ends those it no longer
/// allows ("policy changed"). Called after any change to roles, rules, bindings, groups.
pub async fn reevaluate(state: &AppState, actor: &str) -> Result<usize, StoreError> {
    let live = state
        .store
        .sessions(&SessionQuery {
            active: Some(true),
            ..Default::default()
        })
        .await?;
    let mut doomed = Vec::new();
    for s in live {
        if !still_allowed(state, &s).await? {
            doomed.push(s);
        }
    }
    end_sessions(state, &doomed, "policy changed", actor).await
}

async fn still_allowed(state: &AppState, s: &Session) -> Result<bool, StoreError> {
    Ok(policy_refusal(state, s).await?.is_none())
}

/// Why the current state no longer allows session `s` (its user locked or gone, its target
/// gone or disabled, or policy no longer granting `connect`), or `None` if it still does.
/// One check for activation and for re-evaluation after a change.
pub async fn policy_refusal(state: &AppState, s: &Session) -> Result<Option<String>, StoreError> {
    // Three independent reads, at once: this is on the path of every session's set-up.
    let target = async {
        match state.store.target(&s.target).await {
            Ok(t) => Ok(Some(t)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let (user, target, rules, credential) = tokio::try_join!(
        state.store.find_user(&s.user),
        target,
        state.store.rules_for_user(&s.user),
        // Only a session with a login has it checked (a tcp session has none).
        async {
            match s.login {
                Some(_) => state.store.credential(&s.target).await,
                None => Ok(None),
            }
        },
    )?;
    match user {
        Some(u) if !u.locked => {}
        Some(_) => return Ok(Some(format!("user '{}' is locked", s.user))),
        None => return Ok(Some(format!("user '{}' no longer exists", s.user))),
    }
    let Some(target) = target else {
        return Ok(Some(format!("target '{}' no longer exists", s.target)));
    };
    if !target.enabled {
        return Ok(Some(format!("target '{}' is disabled", s.target)));
    }
    let rules: Vec<SourcedRule> = rules;
    let tref = TargetRef {
        name: &target.name,
        labels: &target.labels,
    };
    if let Err(d) = policy::check(&rules, "connect", Some(tref)) {
        return Ok(Some(d.reason));
    }
    // The login it runs as, checked as at authorization (a deny rule naming it, added since,
    // ends it).
    let own = credential_login(credential.as_ref());
    Ok(s.login
        .as_deref()
        .and_then(|login| policy::session_login(&rules, tref, login, own).err())
        .map(|d| d.reason))
}

/// The login of a target's brokered credential (`kind`, user name, sealed secret), if it
/// is one: a per-session-role admin credential is never a login of its own.
pub(crate) fn credential_login(credential: Option<&(String, String, String)>) -> Option<&str> {
    credential
        .filter(|(kind, _, _)| kind != "postgres_admin")
        .map(|(_, user, _)| user.as_str())
}

/// Delivers cancellations that other controllers NOTIFY to the workers this controller
/// holds, and relays their audit-head announcements to local followers. Runs for the
/// controller's life on PostgreSQL, reconnecting (and catching up) when its connection goes.
pub async fn listen_for_cancels(state: AppState, database_url: String) {
    enum Step {
        Received(Result<Option<sqlx::postgres::PgNotification>, sqlx::Error>),
        Ping,
    }
    let mut listener = listen(&database_url).await;
    // When the connection last proved alive: a connection can be dead a while (a database
    // host gone without a reset) before a read finds out, so it is pinged too.
    let mut alive = now();
    let mut ping = tokio::time::interval(LISTEN_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = tokio::select! {
            received = listener.try_recv() => Step::Received(received),
            _ = ping.tick() => Step::Ping,
        };
        // `try_recv` says when the connection was lost: notifications sent until it is
        // back are gone, so what they would have said is read from the store instead.
        let lost = match step {
            Step::Received(Ok(Some(n))) => {
                alive = now();
                notified(&state, &n);
                continue;
            }
            Step::Received(Ok(None)) => "the connection was lost".to_owned(),
            Step::Received(Err(e)) => e.to_string(),
            Step::Ping => {
                let answered = tokio::time::timeout(
                    LISTEN_CONNECT_TIMEOUT,
                    sqlx::query("SELECT 1").execute(&mut listener),
                )
                .await;
                match answered {
                    Ok(Ok(_)) => {
                        alive = now();
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer to a ping".to_owned(),
                }
            }
        };
        let since = alive - CATCH_UP_MARGIN_SECS;
        tracing::warn!(reason = %lost, "cancellation listener interrupted; reconnecting");
        drop(listener);
        listener = listen(&database_url).await;
        alive = now();
        catch_up(&state, since).await;
    }
}

/// Who re-sent a cancellation after the listener was away. Most sessions it re-sends had
/// ended on their worker already: an acknowledgement that cut nothing is not audited.
pub const CATCH_UP_ACTOR: &str = "controller (missed cancellation)";

/// How far before the listener's connection last proved alive its catch-up looks (a
/// notification may have been on its way).
const CATCH_UP_MARGIN_SECS: i64 = 60;

/// How often the listener's connection is pinged.
const LISTEN_PING_EVERY: Duration = Duration::from_secs(30);

/// How long one attempt to connect the listener may take.
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A listener on the cancellation and audit channels, once the database takes one.
async fn listen(database_url: &str) -> sqlx::postgres::PgListener {
    loop {
        // Bounded: sqlx's own connect retries some refusals for up to 30 s.
        let connect = tokio::time::timeout(
            LISTEN_CONNECT_TIMEOUT,
            sqlx::postgres::PgListener::connect(database_url),
        );
        match connect.await.unwrap_or(Err(sqlx::Error::PoolTimedOut)) {
            Ok(mut l) => match l
                .listen_all([CANCEL_CHANNEL, crate::audit::AUDIT_CHANNEL])
                .await
            {
                Ok(()) => return l,
                Err(e) => tracing::error!(error = %e, "cannot LISTEN for cancellations"),
            },
            Err(e) => tracing::error!(error = %e, "cannot connect to LISTEN for cancellations"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// After the listener was away: sessions that ended since `since` on workers this controller
/// holds are cancelled on them (a worker that ended one already just acknowledges), and
/// followers of the audit log learn its head.
async fn catch_up(state: &AppState, since: i64) {
    for attempt in 1..=10 {
        match state.store.sessions_ended_since(since).await {
            Ok(ended) => {
                let held = state.workers.connected();
                let mut sent = 0;
                for (id, worker, reason) in ended {
                    if held.iter().any(|w| w.eq_ignore_ascii_case(&worker))
                        && state.workers.cancel(&worker, &id, &reason, CATCH_UP_ACTOR)
                    {
                        sent += 1;
                    }
                }
                if sent > 0 {
                    tracing::info!(
                        sessions = sent,
                        "re-sent the cancellations the listener may have missed"
                    );
                }
                if let Ok(head) = state.store.audit_head().await {
                    state.audit_log.announce(head);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot read the sessions ended while the listener was away");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Acts on a notification: a new audit head, or a cancellation for a worker this controller
/// may hold.
fn notified(state: &AppState, n: &sqlx::postgres::PgNotification) {
    if n.channel() == crate::audit::AUDIT_CHANNEL {
        if let Ok(seq) = n.payload().parse::<i64>() {
            state.audit_log.announce(seq);
        }
        return;
    }
    match serde_json::from_str::<CancelNote>(n.payload()) {
        Ok(note) => {
            if state.metrics.time_revocation(&note.session_id, || {
                state
                    .workers
                    .cancel(&note.worker, &note.session_id, &note.reason, &note.actor)
            }) {
                tracing::info!(session = %note.session_id, worker = %note.worker, "delivered a cancellation from another controller");
            }
        }
        Err(e) => tracing::warn!(error = %e, "ignoring a malformed cancellation notice"),
    }
}

/// Marks sessions whose expiry has passed as `terminated` ("expired"), including pending
/// ones no worker ever activated. Workers end them on their own timers; this keeps the
/// record true when no worker reports.
pub async fn sweep_expired(state: AppState) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = state.store.expire_sessions(now()).await {
            tracing::warn!(error = %e, "cannot sweep expired sessions");
        }
    }
}
