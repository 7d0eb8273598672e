//! SSH: the workers' SSH host keys, and shell recordings (asciicast v2 text, appended as the
//! worker streams it).

use sqlx::Row;

use super::{now, Store, StoreError};
use crate::api::types::Recording;

/// A stored recording without its text (the API type is the row).
pub type RecordingRow = Recording;

const RECORDING_COLS: &str =
    "id, session_id, user_name, target_name, worker_name, started_at, ended_at, size";

fn recording_from(row: &sqlx::any::AnyRow) -> Result<Recording, StoreError> {
    Ok(Recording {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        user: row.try_get("user_name")?,
        target: row.try_get("target_name")?,
        worker: row.try_get("worker_name")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        size: row.try_get("size")?,
    })
}

impl Store {
    /// Records the SSH host key a worker reported in its hello.
    pub async fn set_worker_ssh_host_key(&self, worker: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET ssh_host_key = $1 WHERE name = $2")
            .bind(key)
            .bind(worker)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// The SSH host key a worker last reported, if any.
    pub async fn worker_ssh_host_key(&self, worker: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT ssh_host_key FROM workers WHERE name = $1")
            .bind(worker)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("ssh_host_key")?,
            None => None,
        })
    }

    /// Starts a recording with its asciicast header line.
    pub async fn create_recording(
        &self,
        r: &Recording,
        header_line: &str,
    ) -> Result<(), StoreError> {
        let cast = format!("{header_line}\n");
        sqlx::query(
            "INSERT INTO recordings (id, session_id, user_name, target_name, worker_name, started_at, size, content) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&r.id)
        .bind(&r.session_id)
        .bind(&r.user)
        .bind(&r.target)
        .bind(&r.worker)
        .bind(r.started_at)
        .bind(cast.len() as i64)
        .bind(&cast)
        .execute(&mut *self.writer().await?)
        .await
        .map_err(|e| super::conflict(e, || format!("recording '{}' exists already", r.id)))?;
        Ok(())
    }

    /// Appends event lines to a recording still open and written by `worker`; false if
    /// there is no such recording.
    pub async fn append_recording(
        &self,
        id: &str,
        worker: &str,
        lines: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE recordings SET content = content || $1, size = size + $2 \
             WHERE id = $3 AND worker_name = $4 AND ended_at IS NULL",
        )
        .bind(lines)
        .bind(lines.len() as i64)
        .bind(id)
        .bind(worker)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a recording finished.
    pub async fn end_recording(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE recordings SET ended_at = $1 WHERE id = $2 AND worker_name = $3 AND ended_at IS NULL",
        )
        .bind(now())
        .bind(id)
        .bind(worker)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Recordings, oldest first, optionally of one session only.
    pub async fn recordings(&self, session: Option<&str>) -> Result<Vec<Recording>, StoreError> {
        let rows = match session {
            Some(s) => {
                let sql = format!(
                    "SELECT {RECORDING_COLS} FROM recordings WHERE session_id = $1 ORDER BY started_at, id"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(s)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql =
                    format!("SELECT {RECORDING_COLS} FROM recordings ORDER BY started_at, id");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(recording_from).collect()
    }

    /// One recording and its asciicast text.
    pub async fn recording(&self, id: &str) -> Result<(Recording, String), StoreError> {
        let sql = format!("SELECT {RECORDING_COLS}, content FROM recordings WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok((recording_from(&r)?, r.try_get("content")?)),
            None => Err(StoreError::NotFound {
                kind: "recording",
                name: id.to_owned(),
                suggestion: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::api::types::Recording;

    #[tokio::test]
    async fn recordings_and_host_keys_on_both_backends() {
        super::super::tests::on_both(|s| async move {
            let w = s
                .create_worker("w1", &Default::default(), "hash", i64::MAX)
                .await
                .expect("worker");
            assert_eq!(s.worker_ssh_host_key(&w.name).await.expect("key"), None);
            s.set_worker_ssh_host_key("w1", "ssh-ed25519 AAAA")
                .await
                .expect("set");
            assert_eq!(
                s.worker_ssh_host_key("w1").await.expect("key").as_deref(),
                Some("ssh-ed25519 AAAA")
            );
            let r = Recording {
                id: "r_abc".into(),
                session_id: "s_1".into(),
                user: "alice".into(),
                target: "web".into(),
                worker: "w1".into(),
                started_at: 100,
                ended_at: None,
                size: 0,
            };
            s.create_recording(&r, r#"{"version":2}"#)
                .await
                .expect("create");
            assert!(s
                .append_recording("r_abc", "w1", "[0.1,\"o\",\"hi\"]\n")
                .await
                .expect("append"));
            // Only the worker that recorded it may write to it.
            assert!(!s
                .append_recording("r_abc", "w2", "x\n")
                .await
                .expect("append"));
            s.end_recording("r_abc", "w1").await.expect("end");
            assert!(!s
                .append_recording("r_abc", "w1", "late\n")
                .await
                .expect("append"));
            let (row, cast) = s.recording("r_abc").await.expect("read");
            assert_eq!(cast, "{\"version\":2}\n[0.1,\"o\",\"hi\"]\n");
            assert_eq!(row.size, cast.len() as i64);
            assert!(row.ended_at.is_some());
            assert_eq!(s.recordings(Some("s_1")).await.expect("list").len(), 1);
            assert!(s.recordings(Some("s_2")).await.expect("list").is_empty());
            assert!(s.recording("r_nope").await.is_err());
        })
        .await;
    }
}
