//! Targets and workers.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{conflict, json_col, now, to_json, Store, StoreError};
use crate::api::types::{CreateTarget, Target, TargetType, UpdateTarget};

/// Default session length when neither client nor target says.
pub const DEFAULT_DURATION: u64 = 3600;
/// Default maximum session length.
pub const DEFAULT_MAX_DURATION: u64 = 8 * 3600;

/// A worker row.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    /// Name.
    pub name: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// SHA-256 (hex) of its certificate, once registered.
    pub cert_fingerprint: Option<String>,
    /// Session address it reported.
    pub session_addr: Option<String>,
    /// Controller instance holding its control connection.
    pub connected_to: Option<String>,
    /// Last heard from.
    pub last_seen: Option<i64>,
    /// Created.
    pub created_at: i64,
    /// `direct` or `outbound-only` ([`postern_proto::cluster::WorkerMode`]), as it last said.
    pub mode: String,
    /// Sessions it carried at its last heartbeat.
    pub active_sessions: Option<u32>,
    /// Connections it carried at its last heartbeat.
    pub active_connections: Option<u32>,
}

/// What happened to an activation-token registration.
#[derive(Debug)]
pub enum ActivationOutcome {
    /// Registered: the worker's name.
    Registered(String),
    /// No pending worker has this token (unknown, used, or expired).
    Invalid,
}

const TARGET_COLS: &str = "name, kind, address, labels, default_duration, max_duration, connection_limit, worker_filter, enabled, created_at";
const WORKER_COLS: &str = "name, tags, cert_fingerprint, session_addr, connected_to, last_seen, \
     created_at, mode, active_sessions, active_connections";

fn target_from(row: &sqlx::any::AnyRow) -> Result<Target, StoreError> {
    let kind: String = row.try_get("kind")?;
    let kind = match kind.as_str() {
        "tcp" => TargetType::Tcp,
        "ssh" => TargetType::Ssh,
        "postgres" => TargetType::Postgres,
        other => return Err(StoreError::Corrupt(format!("target kind {other}"))),
    };
    let limit: Option<i64> = row.try_get("connection_limit")?;
    Ok(Target {
        name: row.try_get("name")?,
        kind,
        address: row.try_get("address")?,
        labels: json_col(row, "labels")?,
        default_duration_secs: row.try_get::<i64, _>("default_duration")? as u64,
        max_duration_secs: row.try_get::<i64, _>("max_duration")? as u64,
        connection_limit: limit.map(|l| l as u32),
        worker_filter: json_col(row, "worker_filter")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

fn worker_from(row: &sqlx::any::AnyRow) -> Result<WorkerRow, StoreError> {
    Ok(WorkerRow {
        name: row.try_get("name")?,
        tags: json_col(row, "tags")?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        session_addr: row.try_get("session_addr")?,
        connected_to: row.try_get("connected_to")?,
        last_seen: row.try_get("last_seen")?,
        created_at: row.try_get("created_at")?,
        mode: row.try_get("mode")?,
        active_sessions: count_col(row, "active_sessions")?,
        active_connections: count_col(row, "active_connections")?,
    })
}

fn count_col(row: &sqlx::any::AnyRow, col: &str) -> Result<Option<u32>, StoreError> {
    let n: Option<i64> = row.try_get(col)?;
    Ok(n.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
}

impl Store {
    /// Creates a target (already validated by the caller).
    pub async fn create_target(&self, t: &CreateTarget) -> Result<Target, StoreError> {
        let max = t.max_duration_secs.unwrap_or(DEFAULT_MAX_DURATION);
        let default = t.default_duration_secs.unwrap_or(DEFAULT_DURATION).min(max);
        sqlx::query(
            "INSERT INTO targets (name, kind, address, labels, default_duration, max_duration, connection_limit, worker_filter, enabled, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9)",
        )
        .bind(&t.name)
        .bind(t.kind.as_str())
        .bind(&t.address)
        .bind(to_json(&t.labels))
        .bind(default as i64)
        .bind(max as i64)
        .bind(t.connection_limit.map(i64::from))
        .bind(to_json(&t.worker_filter))
        .bind(now())
        .execute(&mut *self.writer().await?)
        .await
        .map_err(|e| conflict(e, || format!("a target named '{}' already exists", t.name)))?;
        self.target(&t.name).await
    }

    /// Looks a target up by name.
    pub async fn target(&self, name: &str) -> Result<Target, StoreError> {
        let sql = format!("SELECT {TARGET_COLS} FROM targets WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => target_from(&r),
            None => Err(self.not_found("target", "targets", name).await),
        }
    }

    /// Every target, by name.
    pub async fn targets(&self) -> Result<Vec<Target>, StoreError> {
        let sql = format!("SELECT {TARGET_COLS} FROM targets ORDER BY name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(target_from).collect()
    }

    /// Applies an update (already validated by the caller).
    pub async fn update_target(&self, name: &str, u: &UpdateTarget) -> Result<Target, StoreError> {
        let mut t = self.target(name).await?;
        if let Some(a) = &u.address {
            t.address.clone_from(a);
        }
        if let Some(l) = &u.labels {
            t.labels.clone_from(l);
        }
        if let Some(m) = u.max_duration_secs {
            t.max_duration_secs = m;
        }
        if let Some(d) = u.default_duration_secs {
            t.default_duration_secs = d;
        }
        t.default_duration_secs = t.default_duration_secs.min(t.max_duration_secs);
        if let Some(c) = u.connection_limit {
            t.connection_limit = (c > 0).then_some(c);
        }
        if let Some(f) = &u.worker_filter {
            t.worker_filter.clone_from(f);
        }
        if let Some(e) = u.enabled {
            t.enabled = e;
        }
        sqlx::query(
            "UPDATE targets SET address = $1, labels = $2, default_duration = $3, max_duration = $4, \
             connection_limit = $5, worker_filter = $6, enabled = $7 WHERE name = $8",
        )
        .bind(&t.address)
        .bind(to_json(&t.labels))
        .bind(t.default_duration_secs as i64)
        .bind(t.max_duration_secs as i64)
        .bind(t.connection_limit.map(i64::from))
        .bind(to_json(&t.worker_filter))
        .bind(i64::from(t.enabled))
        .bind(name)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(t)
    }

    /// Deletes a target and its credential.
    pub async fn delete_target(&self, name: &str) -> Result<(), StoreError> {
        self.target(name).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM credentials WHERE target_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM targets WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores (or replaces) a target's sealed credential.
    pub async fn set_credential(
        &self,
        target: &str,
        kind: &str,
        username: &str,
        sealed: &str,
    ) -> Result<(), StoreError> {
        self.target(target).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM credentials WHERE target_name = $1")
            .bind(target)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO credentials (target_name, kind, username, sealed, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(target)
            .bind(kind)
            .bind(username)
            .bind(sealed)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A target's credential: `(kind, username, sealed secret)`.
    pub async fn credential(
        &self,
        target: &str,
    ) -> Result<Option<(String, String, String)>, StoreError> {
        let row =
            sqlx::query("SELECT kind, username, sealed FROM credentials WHERE target_name = $1")
                .bind(target)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok((
                r.try_get("kind")?,
                r.try_get("username")?,
                r.try_get("sealed")?,
            ))
        })
        .transpose()
    }

    /// Removes a target's credential; false if it had none.
    pub async fn delete_credential(&self, target: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM credentials WHERE target_name = $1")
            .bind(target)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Creates a pending worker with the hash of its activation token.
    pub async fn create_worker(
        &self,
        name: &str,
        tags: &BTreeMap<String, String>,
        activation_hash: &str,
        activation_expires_at: i64,
    ) -> Result<WorkerRow, StoreError> {
        // A worker's name is its TLS name, in which case does not count: two names that
        // differ only in case would reach each other's clients.
        let taken = sqlx::query("SELECT name FROM workers WHERE LOWER(name) = LOWER($1)")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = taken {
            let other: String = row.try_get("name")?;
            return Err(StoreError::Conflict(format!(
                "a worker named '{other}' already exists (worker names are TLS names: case does not count)"
            )));
        }
        sqlx::query(
            "INSERT INTO workers (name, tags, activation_hash, activation_expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(name)
        .bind(to_json(tags))
        .bind(activation_hash)
        .bind(activation_expires_at)
        .bind(now())
        .execute(&mut *self.writer().await?)
        .await
        .map_err(|e| conflict(e, || format!("a worker named '{name}' already exists")))?;
        self.worker(name).await
    }

    /// Looks a worker up by name.
    pub async fn worker(&self, name: &str) -> Result<WorkerRow, StoreError> {
        let sql = format!("SELECT {WORKER_COLS} FROM workers WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => worker_from(&r),
            None => Err(self.not_found("worker", "workers", name).await),
        }
    }

    /// Every worker, by name.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let sql = format!("SELECT {WORKER_COLS} FROM workers ORDER BY name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(worker_from).collect()
    }

    /// Deletes a worker: its certificate stops being trusted at once.
    pub async fn delete_worker(&self, name: &str) -> Result<(), StoreError> {
        self.worker(name).await?;
        sqlx::query("DELETE FROM workers WHERE name = $1")
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Consumes an activation token: the pending worker holding it becomes registered with
    /// the certificate whose fingerprint is given. Single use, atomically.
    pub async fn register_worker(
        &self,
        activation_hash: &str,
        cert_fingerprint: &str,
    ) -> Result<ActivationOutcome, StoreError> {
        let row = sqlx::query(
            "UPDATE workers SET activation_hash = NULL, activation_expires_at = NULL, cert_fingerprint = $1 \
             WHERE activation_hash = $2 AND activation_expires_at > $3 RETURNING name",
        )
        .bind(cert_fingerprint)
        .bind(activation_hash)
        .bind(now())
        .fetch_optional(&mut *self.writer().await?)
        .await?;
        Ok(match row {
            Some(r) => ActivationOutcome::Registered(r.try_get("name")?),
            None => ActivationOutcome::Invalid,
        })
    }

    /// The name of the pending worker holding this unexpired activation token.
    pub async fn pending_worker(
        &self,
        activation_hash: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT name FROM workers WHERE activation_hash = $1 AND activation_expires_at > $2",
        )
        .bind(activation_hash)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok(r.try_get("name")?)).transpose()
    }

    /// The registered worker holding the certificate with this fingerprint.
    pub async fn worker_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<WorkerRow>, StoreError> {
        let sql = format!("SELECT {WORKER_COLS} FROM workers WHERE cert_fingerprint = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(worker_from).transpose()
    }

    /// Records that a controller instance holds the worker's control connection, and where
    /// clients reach it (`session_addr`: its own listener, or that controller's relay when
    /// `mode` is `outbound-only`).
    pub async fn worker_connected(
        &self,
        name: &str,
        instance: &str,
        session_addr: &str,
        mode: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET connected_to = $1, session_addr = $2, last_seen = $3, mode = $4, \
             active_sessions = NULL, active_connections = NULL WHERE name = $5",
        )
        .bind(instance)
        .bind(session_addr)
        .bind(now())
        .bind(mode)
        .bind(name)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Records a heartbeat and the load it reports.
    pub async fn worker_heartbeat(
        &self,
        name: &str,
        sessions: u32,
        connections: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET last_seen = $1, active_sessions = $2, active_connections = $3 \
             WHERE name = $4",
        )
        .bind(now())
        .bind(i64::from(sessions))
        .bind(i64::from(connections))
        .bind(name)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Records a heartbeat.
    pub async fn worker_seen(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET last_seen = $1 WHERE name = $2")
            .bind(now())
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Records that the instance lost the worker (unless another instance took it over).
    pub async fn worker_disconnected(&self, name: &str, instance: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET connected_to = NULL WHERE name = $1 AND connected_to = $2")
            .bind(name)
            .bind(instance)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }
}
