//! Sessions.

use sqlx::Row;

use super::{now, Store, StoreError};
use crate::api::types::{Session, SessionQuery};

/// A session about to be stored.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Id.
    pub id: String,
    /// User.
    pub user: String,
    /// Target.
    pub target: String,
    /// Worker.
    pub worker: String,
    /// Expiry.
    pub expires_at: i64,
    /// The login it runs as on the target, if it has one.
    pub login: Option<String>,
}

impl NewSession {
    /// Stores it as a pending session through `conn` (a transaction's, say).
    pub(crate) async fn insert(&self, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (id, user_name, target_name, worker_name, status, created_at, expires_at, login) \
             VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7)",
        )
        .bind(&self.id)
        .bind(&self.user)
        .bind(&self.target)
        .bind(&self.worker)
        .bind(now())
        .bind(self.expires_at)
        .bind(self.login.as_deref())
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// A stored session (the API type is the row).
pub type SessionRow = Session;

const SESSION_COLS: &str = "id, user_name, target_name, worker_name, status, created_at, expires_at, activated_at, ended_at, end_reason, connections, bytes_up, bytes_down, login";

fn session_from(row: &sqlx::any::AnyRow) -> Result<Session, StoreError> {
    Ok(Session {
        id: row.try_get("id")?,
        user: row.try_get("user_name")?,
        target: row.try_get("target_name")?,
        worker: row.try_get("worker_name")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        activated_at: row.try_get("activated_at")?,
        ended_at: row.try_get("ended_at")?,
        end_reason: row.try_get("end_reason")?,
        connections: row.try_get("connections")?,
        bytes_up: row.try_get("bytes_up")?,
        bytes_down: row.try_get("bytes_down")?,
        login: row.try_get("login")?,
    })
}

impl Store {
    /// Stores a pending session.
    pub async fn insert_session(&self, s: &NewSession) -> Result<(), StoreError> {
        let mut conn = self.writer().await?;
        s.insert(&mut conn).await
    }

    /// Looks a session up.
    pub async fn session(&self, id: &str) -> Result<Session, StoreError> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => session_from(&r),
            None => Err(StoreError::NotFound {
                kind: "session",
                name: id.to_owned(),
                suggestion: None,
            }),
        }
    }

    /// Sessions matching the query, newest first (at most 1000).
    pub async fn sessions(&self, q: &SessionQuery) -> Result<Vec<Session>, StoreError> {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions \
             WHERE ($1 = 0 OR status IN ('pending', 'active')) \
               AND ($2 = '' OR user_name = $2) AND ($3 = '' OR target_name = $3) \
             ORDER BY created_at DESC, id LIMIT 1000"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(q.active.unwrap_or(false)))
            .bind(q.user.clone().unwrap_or_default())
            .bind(q.target.clone().unwrap_or_default())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_from).collect()
    }

    /// Marks a pending or active session active (idempotent for a reconnecting client).
    /// Returns false when the session is not in a state that may be activated.
    pub async fn activate_session(&self, id: &str) -> Result<bool, StoreError> {
        let t = now();
        let done = sqlx::query(
            "UPDATE sessions SET status = 'active', activated_at = COALESCE(activated_at, $1) \
             WHERE id = $2 AND status IN ('pending', 'active') AND expires_at > $1",
        )
        .bind(t)
        .bind(id)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Adds closed connections (how many, and their bytes) to their session's figures.
    pub async fn record_connections(
        &self,
        id: &str,
        connections: u64,
        bytes_up: u64,
        bytes_down: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET connections = connections + $1, bytes_up = bytes_up + $2, bytes_down = bytes_down + $3 WHERE id = $4",
        )
        .bind(connections as i64)
        .bind(bytes_up as i64)
        .bind(bytes_down as i64)
        .bind(id)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Ends a session unless it has ended already; returns whether this call ended it.
    pub async fn end_session(&self, id: &str, reason: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET status = 'terminated', ended_at = $1, end_reason = $2 \
             WHERE id = $3 AND status <> 'terminated'",
        )
        .bind(now())
        .bind(reason)
        .bind(id)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sessions that ended at or after `since` on some worker: `(id, worker, end reason)`,
    /// the newest 10,000 at most.
    pub async fn sessions_ended_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, worker_name, end_reason FROM sessions \
             WHERE status = 'terminated' AND ended_at >= $1 AND worker_name <> '' \
             ORDER BY ended_at DESC LIMIT 10000",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("id")?,
                    r.try_get("worker_name")?,
                    r.try_get::<Option<String>, _>("end_reason")?
                        .unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Ends every live session whose expiry has passed; returns how many.
    pub async fn expire_sessions(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET status = 'terminated', ended_at = $1, end_reason = 'expired' \
             WHERE status <> 'terminated' AND expires_at <= $1",
        )
        .bind(now)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }

    /// Sends a PostgreSQL notification (no-op on SQLite, which has a single controller).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if self.backend == super::Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&mut *self.writer().await?)
                .await?;
        }
        Ok(())
    }
}
