//! What the workers' SSH proxies ask of the controller over the control connection: storing
//! shell recordings (asciicast v2, streamed as the shell runs) and, in certificate mode,
//! signing a user certificate valid for the session only.

use serde_json::json;

use postern_proto::ids::SessionId;

use crate::api::types::Recording;
use crate::policy::{self, SourcedRule, TargetRef};
use crate::revoke;
use crate::ssh_ca::CertRequest;
use crate::state::AppState;
use crate::store::{now, Appended, SessionRow};

/// Largest asciicast header accepted.
const MAX_HEADER: usize = 8 * 1024;

/// Starts recording `recording_id` for a session `worker` carries; `None` when stored,
/// else why not (the worker then refuses the shell).
pub async fn start(
    state: &AppState,
    worker: &str,
    session_id: &SessionId,
    recording_id: &str,
    header: &str,
) -> Option<String> {
    let session = match live_session(state, worker, session_id).await {
        Ok(s) => s,
        Err(why) => return Some(why),
    };
    if !valid_id(recording_id) {
        return Some("invalid recording id".into());
    }
    let parsed: Option<serde_json::Value> = serde_json::from_str(header).ok();
    let is_v2 = parsed
        .as_ref()
        .is_some_and(|h| h.is_object() && h["version"] == 2);
    if header.len() > MAX_HEADER || header.contains('\n') || !is_v2 {
        return Some("the recording header is not an asciicast v2 header".into());
    }
    let row = Recording {
        id: recording_id.to_owned(),
        session_id: session.id.clone(),
        user: session.user.clone(),
        target: session.target.clone(),
        worker: worker.to_owned(),
        started_at: now(),
        ended_at: None,
        size: 0,
        end_reason: None,
    };
    if let Err(e) = state.store.create_recording(&row, header).await {
        tracing::error!(error = %e, "cannot store a recording");
        return Some(format!("the controller cannot store the recording: {e}"));
    }
    let _ = state
        .audit(
            &session.user,
            "recording.start",
            &format!("session:{}", session.id),
            "success",
            json!({"recording": recording_id, "worker": worker}),
        )
        .await;
    None
}

/// Appends event lines to a recording. Lines that would take it past the configured size
/// end it, and its session: a shell is never left running unrecorded.
pub async fn data(state: &AppState, worker: &str, recording_id: &str, events: &str) {
    let appended = state
        .store
        .append_recording(recording_id, worker, events, state.recording_max_bytes)
        .await;
    match appended {
        Ok(Appended::Stored) => {}
        Ok(Appended::Unknown) => tracing::warn!(
            worker,
            recording = recording_id,
            "data for an unknown or finished recording"
        ),
        Ok(Appended::LimitReached) => limit_reached(state, worker, recording_id).await,
        Err(e) => {
            tracing::error!(error = %e, recording = recording_id, "cannot store recording data")
        }
    }
}

/// Ends the session of a recording that reached its size limit (the store has ended the
/// recording), and audits why.
async fn limit_reached(state: &AppState, worker: &str, recording_id: &str) {
    let limit = state.recording_max_bytes;
    tracing::warn!(
        worker,
        recording = recording_id,
        limit,
        "a recording reached its size limit; ending its session"
    );
    let recording = match state.store.recording_info(recording_id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, recording = recording_id, "cannot read a full recording");
            return;
        }
    };
    let _ = state
        .audit(
            &recording.user,
            "recording.limit",
            &format!("session:{}", recording.session_id),
            "failure",
            json!({"recording": recording_id, "size": recording.size, "limit": limit, "worker": worker}),
        )
        .await;
    let reason = format!("its shell recording reached the size limit ({limit} bytes)");
    let session = state.store.session(&recording.session_id).await;
    let ended = match session {
        Ok(s) => revoke::end_sessions(state, std::slice::from_ref(&s), &reason, "controller").await,
        Err(e) => Err(e),
    };
    if let Err(e) = ended {
        tracing::error!(error = %e, session = %recording.session_id, "cannot end the session of a full recording");
    }
    sealed(state, worker, recording_id).await;
}

/// Marks a recording finished.
pub async fn end(state: &AppState, worker: &str, recording_id: &str) {
    match state.store.end_recording(recording_id, worker).await {
        Ok(true) => sealed(state, worker, recording_id).await,
        // Ended already (at its size limit, sealed then), or not this worker's.
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, recording = recording_id, "cannot end a recording"),
    }
}

/// Seals every finished recording that has no seal yet: one whose controller stopped between
/// ending and sealing it, and those finished before recordings were sealed. Run at start.
pub async fn seal_unsealed(state: &AppState) {
    let found = async {
        let sealed = state.store.sealed_recordings().await?;
        let recordings = state.store.recordings(None).await?;
        Ok::<_, crate::store::StoreError>(
            recordings
                .into_iter()
                .filter(|r| r.ended_at.is_some() && !sealed.contains(&r.id))
                .collect::<Vec<_>>(),
        )
    };
    match found.await {
        Ok(unsealed) => {
            for r in unsealed {
                sealed(state, &r.worker, &r.id).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot look for finished recordings without a seal"),
    }
}

/// Audits a finished recording's size and SHA-256 (`recording.end`): the hash chain then
/// covers the recording's text too, and `audit verify` finds a recording changed since.
async fn sealed(state: &AppState, worker: &str, recording_id: &str) {
    let sealed = async {
        let (recording, size, sha256) = state.store.recording_digest(recording_id).await?;
        state
            .audit(
                &recording.user,
                RECORDING_END,
                &format!("session:{}", recording.session_id),
                "success",
                json!({
                    "recording": recording_id,
                    "size": size,
                    "sha256": sha256,
                    "worker": worker,
                    "user": recording.user,
                    "target": recording.target,
                    "session": recording.session_id,
                }),
            )
            .await
    };
    if let Err(e) = sealed.await {
        tracing::error!(error = %e, recording = recording_id, "cannot audit the end of a recording");
    }
}

/// The audit action that seals a finished recording.
pub const RECORDING_END: &str = "recording.end";

/// Signs a certificate for `public_key`, valid until the session expires, for `principal`
/// only: the target's certificate-mode credential user, or a login the user's roles permit.
pub async fn sign_certificate(
    state: &AppState,
    worker: &str,
    session_id: &SessionId,
    principal: &str,
    public_key: &str,
) -> Result<String, String> {
    let session = live_session(state, worker, session_id).await?;
    let store_err = |e: crate::store::StoreError| e.to_string();
    let credential = state
        .store
        .credential(&session.target)
        .await
        .map_err(store_err)?;
    let own = match credential {
        Some((kind, username, _)) if kind == "ssh_ca" => username,
        _ => {
            return Err(format!(
                "target '{}' is not in SSH certificate mode",
                session.target
            ))
        }
    };
    if principal != own {
        let target = state
            .store
            .target(&session.target)
            .await
            .map_err(store_err)?;
        let rules: Vec<SourcedRule> = state
            .store
            .rules_for_user(&session.user)
            .await
            .map_err(store_err)?;
        let tref = TargetRef {
            name: &target.name,
            labels: &target.labels,
        };
        policy::check_login(&rules, tref, principal).map_err(|d| d.reason)?;
    }
    let key_id = format!("postern:{}:{}", session.id, session.user);
    let cert = state.keys.ssh_user_ca.sign(
        &CertRequest {
            public_key,
            principal,
            key_id: &key_id,
            valid_before: session.expires_at,
        },
        now(),
    )?;
    let _ = state
        .audit(
            &session.user,
            "ssh.certificate",
            &format!("session:{}", session.id),
            "success",
            json!({"principal": principal, "key_id": key_id, "valid_before": session.expires_at, "worker": worker}),
        )
        .await;
    Ok(cert)
}

/// The session, if it is active on `worker` and not expired.
async fn live_session(
    state: &AppState,
    worker: &str,
    session_id: &SessionId,
) -> Result<SessionRow, String> {
    let s = state
        .store
        .session(session_id.as_str())
        .await
        .map_err(|e| e.to_string())?;
    if s.worker != worker {
        return Err(format!("session belongs to worker '{}'", s.worker));
    }
    if s.status != "active" {
        return Err(format!("session is {}", s.status));
    }
    if s.expires_at <= now() {
        return Err("session expired".into());
    }
    Ok(s)
}

fn valid_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with("r_")
        && id[2..].chars().all(|c| c.is_ascii_alphanumeric())
        && id.len() > 2
}
