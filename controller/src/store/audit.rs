//! The audit log: append-only and hash-chained.
//!
//! Each event stores its position `seq`, the previous event's hash and its own:
//! `hash = SHA-256(JSON [seq, time, actor, action, resource, outcome, session_id, event_id,
//! details, prev_hash])` in lowercase hex, over the stored text. Appends first update the
//! one-row `audit_head` table, which takes SQLite's write lock or PostgreSQL's row lock, so
//! that appends from any connection or controller form one chain. Events that carry an
//! `event_id` (from workers, which resend until acknowledged) are stored once.

use std::collections::HashSet;

use postern_proto::cluster::raw_json;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{json_col, now, Backend, NewSession, Store, StoreError};
use crate::api::types::{AuditAnchor, AuditEvent, AuditQuery, AuditVerification};

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Unique id chosen by the producer (workers), to store resent events once.
    pub event_id: Option<String>,
    /// When it happened (Unix seconds).
    pub time: i64,
    /// Who acted.
    pub actor: String,
    /// What happened.
    pub action: String,
    /// On what.
    pub resource: String,
    /// `success`, `failure`, `denied`.
    pub outcome: String,
    /// The session it belongs to, if any.
    pub session_id: Option<String>,
    /// Details, as JSON text (what is stored and hashed).
    pub details: Box<RawValue>,
}

impl NewEvent {
    /// An event happening now; the session is taken from a `session:ID` resource or a
    /// `session` detail.
    pub fn now(
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        details: serde_json::Value,
    ) -> Self {
        let session_id = resource
            .strip_prefix("session:")
            .map(str::to_owned)
            .or_else(|| {
                details
                    .get("session")
                    .and_then(|s| s.as_str())
                    .map(str::to_owned)
            });
        NewEvent {
            event_id: None,
            time: now(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            outcome: outcome.to_owned(),
            session_id,
            details: raw_json(&details),
        }
    }
}

/// A `recording.end` event: its row id, chain position and details.
struct Seal {
    id: i64,
    seq: i64,
    details: serde_json::Value,
}

/// What an event's hash covers: seq, time, actor, action, resource, outcome, session_id,
/// event_id, details, prev_hash. A tuple serializes as the JSON array `[seq, time, …]`, byte
/// for byte what `json!([…]).to_string()` gives, without building a `Value` first.
type Canonical<'a> = (
    i64,
    i64,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
);

/// Appends an event's canonical text to `out` and returns its chain hash (the SHA-256 of
/// that text, lowercase hex).
fn write_canonical(out: &mut Vec<u8>, canonical: Canonical<'_>) -> Result<String, StoreError> {
    let start = out.len();
    serde_json::to_writer(&mut *out, &canonical)
        .map_err(|e| StoreError::Corrupt(format!("cannot serialize an audit event: {e}")))?;
    Ok(postern_proto::hex(&Sha256::digest(&out[start..])))
}

/// The chain hash of one event, from its stored fields.
fn chain_hash(canonical: Canonical<'_>) -> Result<String, StoreError> {
    write_canonical(&mut Vec::with_capacity(512), canonical)
}

/// The canonical text of an event appended to `rows`, then its hash added as the array's
/// last element; returns the hash.
fn push_chained_row(rows: &mut Vec<u8>, canonical: Canonical<'_>) -> Result<String, StoreError> {
    let hash = write_canonical(rows, canonical)?;
    rows.pop(); // the closing bracket
    rows.extend_from_slice(b",\"");
    rows.extend_from_slice(hash.as_bytes());
    rows.extend_from_slice(b"\"]");
    Ok(hash)
}

const EVENT_COLS: &str = "id, seq, time, actor, action, resource, outcome, session_id, event_id, details, prev_hash, hash";

impl Store {
    /// Appends one event now.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.append_audit(&[NewEvent::now(
            actor,
            action,
            resource,
            outcome,
            details.clone(),
        )])
        .await
        .map(|_| ())
    }

    /// Appends events to the chain in one transaction; an event whose `event_id` is stored
    /// already is skipped. Returns, for each event actually stored, its `seq` and its index in
    /// `events`.
    pub async fn append_audit(&self, events: &[NewEvent]) -> Result<Vec<(i64, usize)>, StoreError> {
        self.append_audit_with(events, &[]).await
    }

    /// [`Self::append_audit`], storing `sessions` in the same transaction first (a session
    /// row and the event that authorized it commit together).
    pub async fn append_audit_with(
        &self,
        events: &[NewEvent],
        sessions: &[NewSession],
    ) -> Result<Vec<(i64, usize)>, StoreError> {
        let mut tx = self.begin_write().await?;
        // First a write: it takes the lock that serializes appends (see the module doc), and
        // reads the head under it.
        let head = sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut *tx)
            .await?;
        for s in sessions {
            s.insert(&mut tx).await?;
        }
        let (mut seq, mut hash): (i64, String) = (head.try_get("seq")?, head.try_get("hash")?);
        // Producer ids already stored (resent events): one read per batch, under the lock.
        let ids: Vec<&str> = events
            .iter()
            .filter_map(|e| e.event_id.as_deref())
            .collect();
        let mut seen = if ids.is_empty() {
            HashSet::new()
        } else {
            stored_event_ids_on(&mut tx, self.backend(), &ids).await?
        };
        // The batch's rows as one JSON array, each row an event's canonical text (what its
        // hash covers) with the hash added: one statement and one parameter for the whole
        // batch, which the database takes apart. (Eleven parameters per event cost more,
        // through sqlx's `Any` layer, than the database's reading of the JSON.)
        let mut rows = Vec::with_capacity(events.len() * 512 + 2);
        rows.push(b'[');
        let mut stored = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            if let Some(id) = &e.event_id {
                if !seen.insert(id.clone()) {
                    continue;
                }
            }
            if rows.len() > 1 {
                rows.push(b',');
            }
            let next = seq + 1;
            hash = push_chained_row(
                &mut rows,
                (
                    next,
                    e.time,
                    &e.actor,
                    &e.action,
                    &e.resource,
                    &e.outcome,
                    e.session_id.as_deref(),
                    e.event_id.as_deref(),
                    e.details.get(),
                    &hash,
                ),
            )?;
            seq = next;
            stored.push((seq, index));
        }
        rows.push(b']');
        if !stored.is_empty() {
            let rows = String::from_utf8(rows)
                .map_err(|e| StoreError::Corrupt(format!("audit rows are not text: {e}")))?;
            // SQLite's `jsonb_each` parses the text once and hands each row over in binary
            // form, which `->>` reads without parsing it again.
            let sql = match self.backend() {
                Backend::Sqlite => {
                    "INSERT INTO audit_events (seq, time, actor, action, resource, outcome, session_id, event_id, details, prev_hash, hash) \
                     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, value->>8, value->>9, value->>10 \
                     FROM jsonb_each($1)"
                }
                Backend::Postgres => {
                    "INSERT INTO audit_events (seq, time, actor, action, resource, outcome, session_id, event_id, details, prev_hash, hash) \
                     SELECT (e->>0)::bigint, (e->>1)::bigint, e->>2, e->>3, e->>4, e->>5, e->>6, e->>7, e->>8, e->>9, e->>10 \
                     FROM json_array_elements($1::json) AS e"
                }
            };
            sqlx::query(sql).bind(rows).execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Audit events matching the query, oldest first among the newest `limit` (or, with
    /// `after_seq`, the oldest `limit` after it).
    pub async fn audit_events(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 100_000);
        let action = q.action.clone().unwrap_or_default();
        let (action_exact, action_prefix) = if action.ends_with('.') {
            (String::new(), format!("{action}%"))
        } else {
            (action, String::new())
        };
        let order = if q.after_seq.is_some() { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT {EVENT_COLS} FROM audit_events \
             WHERE ($1 = '' OR actor = $1) AND ($2 = '' OR action = $2) AND ($3 = '' OR action LIKE $3) \
               AND ($4 = '' OR resource LIKE $4) AND time >= $5 AND time <= $6 \
               AND ($7 = '' OR session_id = $7) \
               AND ($8 = '' OR resource = 'target:' || $8 OR session_id IN (SELECT id FROM sessions WHERE target_name = $8)) \
               AND seq > $9 \
             ORDER BY seq {order} LIMIT $10"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(q.actor.clone().unwrap_or_default())
            .bind(action_exact)
            .bind(action_prefix)
            .bind(
                q.resource
                    .as_ref()
                    .map(|r| format!("%{r}%"))
                    .unwrap_or_default(),
            )
            .bind(q.since.unwrap_or(0))
            .bind(q.until.unwrap_or(i64::MAX))
            .bind(q.session.clone().unwrap_or_default())
            .bind(q.target.clone().unwrap_or_default())
            .bind(q.after_seq.unwrap_or(0))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut out = rows
            .iter()
            .map(event_from)
            .collect::<Result<Vec<_>, StoreError>>()?;
        if q.after_seq.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// The recordings the controller has sealed (`recording.end` events of its own).
    pub async fn sealed_recordings(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .recording_seals(i64::MAX)
            .await?
            .into_iter()
            .filter_map(|s| s.details["recording"].as_str().map(str::to_owned))
            .collect())
    }

    /// The controller's own `recording.end` events (a worker's carry an event id) up to
    /// chain position `up_to`, oldest first.
    async fn recording_seals(&self, up_to: i64) -> Result<Vec<Seal>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, seq, details FROM audit_events \
             WHERE action = $1 AND event_id IS NULL AND seq <= $2 ORDER BY seq",
        )
        .bind(crate::recordings::RECORDING_END)
        .bind(up_to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Seal {
                    id: r.try_get("id")?,
                    seq: r.try_get("seq")?,
                    details: serde_json::from_str(&r.try_get::<String, _>("details")?)
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The newest `seq` stored.
    pub async fn audit_head(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("seq")?)
    }

    /// Walks the whole chain and reports the first event that breaks it; with `anchor`, the
    /// event at its position must also have its hash. Sealed recordings are checked against
    /// their seals.
    pub async fn verify_audit(
        &self,
        anchor: Option<&AuditAnchor>,
    ) -> Result<AuditVerification, StoreError> {
        const PAGE: i64 = 5_000;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let (head_seq, head_hash): (i64, String) = (head.try_get("seq")?, head.try_get("hash")?);
        let unchained: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE seq IS NULL OR hash IS NULL")
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
        let broken = |seq: i64, id: Option<i64>, reason: String| AuditVerification {
            ok: false,
            checked: seq.max(0),
            first_bad_seq: Some(seq),
            first_bad_id: id,
            reason: Some(reason),
            head_hash: None,
            head_seq: None,
        };
        if unchained > 0 {
            let row = sqlx::query(
                "SELECT id FROM audit_events WHERE seq IS NULL OR hash IS NULL ORDER BY id LIMIT 1",
            )
            .fetch_one(&self.pool)
            .await?;
            let id: i64 = row.try_get("id")?;
            return Ok(broken(
                0,
                Some(id),
                format!("event id {id} has been taken out of the chain (no position or hash)"),
            ));
        }
        let (mut expect_seq, mut prev) = (1i64, String::new());
        loop {
            let sql = format!(
                "SELECT {EVENT_COLS} FROM audit_events WHERE seq >= $1 AND seq <= $3 ORDER BY seq LIMIT $2"
            );
            // Up to the head read first: events appended meanwhile are the next verify's.
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(expect_seq)
                .bind(PAGE)
                .bind(head_seq)
                .fetch_all(&self.pool)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let seq: i64 = r.try_get("seq")?;
                let id: i64 = r.try_get("id")?;
                if seq != expect_seq {
                    return Ok(broken(
                        expect_seq,
                        None,
                        format!("event #{expect_seq} is missing (the next stored is #{seq})"),
                    ));
                }
                let stored_prev: Option<String> = r.try_get("prev_hash")?;
                let stored_hash: Option<String> = r.try_get("hash")?;
                let details: String = r.try_get("details")?;
                let computed = chain_hash((
                    seq,
                    r.try_get("time")?,
                    &r.try_get::<String, _>("actor")?,
                    &r.try_get::<String, _>("action")?,
                    &r.try_get::<String, _>("resource")?,
                    &r.try_get::<String, _>("outcome")?,
                    r.try_get::<Option<String>, _>("session_id")?.as_deref(),
                    r.try_get::<Option<String>, _>("event_id")?.as_deref(),
                    &details,
                    stored_prev.as_deref().unwrap_or_default(),
                ))?;
                if stored_prev.as_deref() != Some(prev.as_str()) {
                    return Ok(broken(seq, Some(id), format!("event #{seq} (id {id}) does not follow event #{}: its previous-hash differs", seq - 1)));
                }
                if stored_hash.as_deref() != Some(computed.as_str()) {
                    return Ok(broken(seq, Some(id), format!("event #{seq} (id {id}) was altered: its content does not match its hash")));
                }
                if anchor.is_some_and(|a| a.seq == seq && a.hash != computed) {
                    return Ok(broken(seq, Some(id), format!("event #{seq} (id {id}) is not the one anchored: the chain was rewritten at or before it")));
                }
                prev = computed;
                expect_seq += 1;
            }
        }
        let last = expect_seq - 1;
        if last != head_seq || prev != head_hash {
            return Ok(broken(
                last + 1,
                None,
                format!("the chain ends at event #{last} but its head records #{head_seq}: events were removed from the end"),
            ));
        }
        // Events past the head (read after them, so that an append meanwhile cannot look
        // like one): the head was set back.
        let newest: Option<i64> = sqlx::query("SELECT MAX(seq) AS m FROM audit_events")
            .fetch_one(&self.pool)
            .await?
            .try_get("m")?;
        let head_now = self.audit_head().await?;
        if let Some(newest) = newest.filter(|n| *n > head_now) {
            return Ok(broken(
                head_now + 1,
                None,
                format!("events up to #{newest} are stored past the chain's head #{head_now}: the head was set back"),
            ));
        }
        if let Some(a) = anchor.filter(|a| a.seq > last) {
            return Ok(broken(
                last + 1,
                None,
                format!("the chain ends at event #{last}, before the anchored #{}: it was cut and its head rewritten", a.seq),
            ));
        }
        // Finished recordings are sealed by a `recording.end` event holding their SHA-256
        // and whose they are.
        for Seal { id, seq, details } in self.recording_seals(last).await? {
            let (Some(recording), Some(sealed)) =
                (details["recording"].as_str(), details["sha256"].as_str())
            else {
                continue;
            };
            let reason = match self.recording_digest(recording).await {
                Ok((row, _, now)) if now == sealed => {
                    let differs = [
                        ("user", &row.user),
                        ("target", &row.target),
                        ("session", &row.session_id),
                    ]
                    .into_iter()
                    .find(|(key, value)| {
                        details[*key].as_str().is_some_and(|s| s != value.as_str())
                    });
                    match differs {
                        None => continue,
                        Some((key, value)) => format!(
                            "recording {recording} now names {key} '{value}', not the '{}' that event #{seq} sealed",
                            details[key].as_str().unwrap_or_default()
                        ),
                    }
                }
                Ok(_) => format!("recording {recording} was changed after it ended: its text no longer has the SHA-256 that event #{seq} holds"),
                Err(StoreError::NotFound { .. }) => format!("recording {recording}, sealed by event #{seq}, is missing"),
                Err(e) => return Err(e),
            };
            return Ok(broken(seq, Some(id), reason));
        }
        Ok(AuditVerification {
            ok: true,
            checked: last,
            first_bad_seq: None,
            first_bad_id: None,
            reason: None,
            head_hash: (last > 0).then_some(prev),
            head_seq: (last > 0).then_some(last),
        })
    }
}

fn event_from(r: &sqlx::any::AnyRow) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        id: r.try_get("id")?,
        seq: r.try_get::<Option<i64>, _>("seq")?.unwrap_or(0),
        time: r.try_get("time")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        resource: r.try_get("resource")?,
        outcome: r.try_get("outcome")?,
        session_id: r.try_get("session_id")?,
        details: json_col(r, "details")?,
        hash: r.try_get::<Option<String>, _>("hash")?.unwrap_or_default(),
    })
}

/// Which of these producer ids are already stored, read through `conn` (the append's
/// transaction): one query for all of them, the ids passed as one JSON array.
async fn stored_event_ids_on(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    event_ids: &[&str],
) -> Result<HashSet<String>, StoreError> {
    let ids = serde_json::to_string(event_ids)
        .map_err(|e| StoreError::Corrupt(format!("cannot serialize event ids: {e}")))?;
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT event_id FROM audit_events WHERE event_id IN (SELECT value FROM json_each($1))"
        }
        Backend::Postgres => {
            "SELECT event_id FROM audit_events WHERE event_id IN (SELECT json_array_elements_text($1::json))"
        }
    };
    let rows = sqlx::query(sql).bind(ids).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| Ok(row.try_get::<String, _>("event_id")?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash covers the canonical text the chain has always used (`json!([…])`), so
    /// chains stored before still verify.
    #[test]
    fn chain_hash_text_is_the_json_array() {
        let cases = [
            (
                "alice",
                Some("s_1"),
                None,
                r#"{"statement":"SELECT 'é\n\"x\"'"}"#,
            ),
            ("worker:w1", None, Some("ev-1"), "{}"),
            ("\u{1}\\tab\t", None, None, ""),
        ];
        for (actor, session, event, details) in cases {
            let canonical = serde_json::json!([
                7,
                -3,
                actor,
                "postgres.query",
                "session:s_1",
                "success",
                session,
                event,
                details,
                "prev"
            ]);
            let want = Sha256::digest(canonical.to_string().as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            let got = chain_hash((
                7,
                -3,
                actor,
                "postgres.query",
                "session:s_1",
                "success",
                session,
                event,
                details,
                "prev",
            ))
            .expect("serializes");
            assert_eq!(got, want, "{actor:?}");
        }
    }
}
