//! SSH: the workers' SSH host keys, and shell recordings (asciicast v2 text, appended as the
//! worker streams it).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now, Store, StoreError};
use crate::api::types::Recording;

/// A stored recording without its text (the API type is the row).
pub type RecordingRow = Recording;

const RECORDING_COLS: &str =
    "id, session_id, user_name, target_name, worker_name, started_at, ended_at, size, end_reason";

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
        end_reason: row.try_get("end_reason")?,
    })
}

/// What became of event lines sent for a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored.
    Stored,
    /// No open recording of that id written by that worker: nothing stored.
    Unknown,
    /// They would take the recording past its size limit: nothing stored, and the
    /// recording is ended (`end_reason` says so).
    LimitReached,
}

/// `end_reason` of a recording stopped at its size limit.
pub const SIZE_LIMIT_REASON: &str = "size limit reached";

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

    /// Appends event lines to a recording still open and written by `worker`, unless they
    /// would take it past `max_size` bytes. Each call stores one chunk, keyed by its offset
    /// in the cast: the cost of an append does not grow with the recording.
    pub async fn append_recording(
        &self,
        id: &str,
        worker: &str,
        lines: &str,
        max_size: i64,
    ) -> Result<Appended, StoreError> {
        let len = lines.len() as i64;
        let mut tx = self.begin_write().await?;
        let grown = sqlx::query(
            "UPDATE recordings SET size = size + $1 \
             WHERE id = $2 AND worker_name = $3 AND ended_at IS NULL AND size + $1 <= $4 \
             RETURNING size",
        )
        .bind(len)
        .bind(id)
        .bind(worker)
        .bind(max_size)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = grown {
            let size: i64 = row.try_get("size")?;
            if len == 0 {
                // Nothing to keep (and its offset would be the next chunk's).
                tx.commit().await?;
                return Ok(Appended::Stored);
            }
            sqlx::query(
                "INSERT INTO recording_chunks (recording_id, byte_offset, data) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(size - len)
            .bind(lines)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Appended::Stored);
        }
        // Not stored: a full recording is ended here, so that nothing more is taken for it.
        let full = sqlx::query(
            "UPDATE recordings SET ended_at = $1, end_reason = $2 \
             WHERE id = $3 AND worker_name = $4 AND ended_at IS NULL",
        )
        .bind(now())
        .bind(SIZE_LIMIT_REASON)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if full.rows_affected() == 1 {
            Appended::LimitReached
        } else {
            Appended::Unknown
        })
    }

    /// Marks a recording finished; whether this call finished it.
    pub async fn end_recording(&self, id: &str, worker: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE recordings SET ended_at = $1 WHERE id = $2 AND worker_name = $3 AND ended_at IS NULL",
        )
        .bind(now())
        .bind(id)
        .bind(worker)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
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

    /// One recording's row, with `columns`.
    async fn recording_row(&self, id: &str, columns: &str) -> Result<AnyRow, StoreError> {
        let sql = format!("SELECT {columns} FROM recordings WHERE id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "recording",
                name: id.to_owned(),
                suggestion: None,
            })
    }

    /// One recording, without its text.
    pub async fn recording_info(&self, id: &str) -> Result<Recording, StoreError> {
        recording_from(&self.recording_row(id, RECORDING_COLS).await?)
    }

    /// A recording without its text, and the size and SHA-256 (hex) of the text as
    /// [`Self::recording`] returns it.
    pub async fn recording_digest(
        &self,
        id: &str,
    ) -> Result<(Recording, usize, String), StoreError> {
        use sha2::Digest as _;
        let (recording, cast) = self.recording(id).await?;
        let sha256 = postern_proto::hex(&sha2::Sha256::digest(cast.as_bytes()));
        Ok((recording, cast.len(), sha256))
    }

    /// One recording and its asciicast text.
    pub async fn recording(&self, id: &str) -> Result<(Recording, String), StoreError> {
        let r = self
            .recording_row(id, &format!("{RECORDING_COLS}, content"))
            .await?;
        let mut cast: String = r.try_get("content")?;
        let chunks = sqlx::query(
            "SELECT data FROM recording_chunks WHERE recording_id = $1 ORDER BY byte_offset",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        for chunk in &chunks {
            cast.push_str(chunk.try_get("data")?);
        }
        Ok((recording_from(&r)?, cast))
    }
}

#[cfg(test)]
mod tests {
    use super::{Appended, SIZE_LIMIT_REASON};
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
                end_reason: None,
            };
            s.create_recording(&r, r#"{"version":2}"#)
                .await
                .expect("create");
            let mut expected = "{\"version\":2}\n".to_owned();
            // Many batches come back whole and in order (they are stored apart).
            for i in 0..30 {
                let line = format!("[{i}.5,\"o\",\"line {i}\"]\n");
                assert_eq!(
                    s.append_recording("r_abc", "w1", &line, 1 << 20)
                        .await
                        .expect("append"),
                    Appended::Stored
                );
                expected.push_str(&line);
            }
            // Only the worker that recorded it may write to it.
            assert_eq!(
                s.append_recording("r_abc", "w2", "x\n", 1 << 20)
                    .await
                    .expect("append"),
                Appended::Unknown
            );
            s.end_recording("r_abc", "w1").await.expect("end");
            assert_eq!(
                s.append_recording("r_abc", "w1", "late\n", 1 << 20)
                    .await
                    .expect("append"),
                Appended::Unknown
            );
            let (row, cast) = s.recording("r_abc").await.expect("read");
            assert_eq!(cast, expected);
            assert_eq!(row.size, cast.len() as i64);
            assert!(row.ended_at.is_some());
            assert_eq!(row.end_reason, None);

            // A batch that would pass the limit is not stored, and ends the recording: what
            // it held before stays, nothing after it is taken.
            let full = Recording {
                id: "r_full".into(),
                ..r.clone()
            };
            s.create_recording(&full, r#"{"version":2}"#)
                .await
                .expect("create");
            assert_eq!(
                s.append_recording("r_full", "w1", "", 1 << 20)
                    .await
                    .expect("append nothing"),
                Appended::Stored
            );
            let header = "{\"version\":2}\n".len() as i64;
            let limit = header + 10;
            assert_eq!(
                s.append_recording("r_full", "w1", "123456789\n", limit)
                    .await
                    .expect("append"),
                Appended::Stored,
                "exactly at the limit is stored"
            );
            assert_eq!(
                s.append_recording("r_full", "w1", "x\n", limit)
                    .await
                    .expect("append"),
                Appended::LimitReached
            );
            assert_eq!(
                s.append_recording("r_full", "w1", "y\n", i64::MAX)
                    .await
                    .expect("append"),
                Appended::Unknown,
                "a recording ended at its limit takes nothing more"
            );
            let (row, cast) = s.recording("r_full").await.expect("read");
            assert_eq!(cast, "{\"version\":2}\n123456789\n");
            assert_eq!(row.size, limit);
            assert!(row.ended_at.is_some());
            assert_eq!(row.end_reason.as_deref(), Some(SIZE_LIMIT_REASON));
            assert_eq!(s.recording_info("r_full").await.expect("info").size, limit);
            assert_eq!(s.recordings(Some("s_1")).await.expect("list").len(), 2);
            assert!(s.recordings(Some("s_2")).await.expect("list").is_empty());
            assert!(s.recording("r_nope").await.is_err());
        })
        .await;
    }
}
