//! The controller's store: one schema on SQLite (default, one file) or PostgreSQL (production,
//! several controllers), through sqlx's `Any` driver so that every query is written once.
//!
//! Only text and 64-bit integers cross the driver boundary (what `Any` maps on both
//! backends); JSON columns are text, times are Unix seconds. Names are primary keys.

mod audit;
mod identity;
mod oidc;
mod resources;
mod sessions;
mod ssh;

use std::borrow::Cow;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{AnyPool, Row};

pub use audit::NewEvent;
pub use identity::{TokenOwner, UserRow};
pub use oidc::{AttemptRow, Claim, Confirmed, NewAttempt, CONFIRM_EXPIRED};
pub use resources::{ActivationOutcome, WorkerRow};
pub use sessions::{NewSession, SessionRow};
pub use ssh::{Appended, RecordingRow, SIZE_LIMIT_REASON};

/// The migrations, one line each, for the folder `migrations/$dir` (both folders hold the
/// same numbered files).
#[rustfmt::skip]
macro_rules! migration_list {
    ($dir:literal) => {
        &[
            (1, "initial", include_str!(concat!("../../../migrations/", $dir, "/0001_initial.sql"))),
            (2, "credentials", include_str!(concat!("../../../migrations/", $dir, "/0002_credentials.sql"))),
            (3, "ssh", include_str!(concat!("../../../migrations/", $dir, "/0003_ssh.sql"))),
            (5, "oidc", include_str!(concat!("../../../migrations/", $dir, "/0005_oidc.sql"))),
            (6, "audit chain", include_str!(concat!("../../../migrations/", $dir, "/0006_audit_chain.sql"))),
            (7, "workers mode", include_str!(concat!("../../../migrations/", $dir, "/0007_workers_mode.sql"))),
            (8, "session login", include_str!(concat!("../../../migrations/", $dir, "/0008_session_login.sql"))),
            (9, "oidc confirm", include_str!(concat!("../../../migrations/", $dir, "/0009_oidc_confirm.sql"))),
            (10, "oidc links of deleted users", include_str!(concat!("../../../migrations/", $dir, "/0010_oidc_links_of_deleted_users.sql"))),
            (11, "oidc login details", include_str!(concat!("../../../migrations/", $dir, "/0011_oidc_login_details.sql"))),
            (12, "recording chunks", include_str!(concat!("../../../migrations/", $dir, "/0012_recording_chunks.sql"))),
        ]
    };
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// `no target named 'x'; did you mean 'y'?`. Things known by an ID (sessions, recordings) or
/// a position (rules) have no name, and a missing relation (a membership, a binding) is
/// described whole by its `name`.
fn not_found(kind: &str, name: &str, suggestion: Option<&str>) -> String {
    let what = match kind {
        "session" | "recording" => format!("no {kind} with ID '{name}'"),
        "rule" => format!("no rule {name}"),
        "member" | "binding" => name.to_owned(),
        _ => format!("no {kind} named '{name}'"),
    };
    match suggestion {
        Some(s) => format!("{what}; did you mean '{s}'?"),
        None => what,
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{}", not_found(kind, name, suggestion.as_deref()))]
    NotFound {
        /// `user`, `target`, …
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The closest existing name, if any is close.
        suggestion: Option<String>,
    },
    /// A thing with that name exists already, or a relation already holds.
    #[error("{0}")]
    Conflict(String),
    /// The database URL is not usable.
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://…")]
    BadUrl(String),
    /// Migrating the schema failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A part of the store (the audit writer) is not available.
    #[error("{0}")]
    Unavailable(String),
    /// A stored value could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// A handle on the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// Reads.
    pool: AnyPool,
    /// Writes. On SQLite, one connection: the process's turn to write, queued fairly, on a
    /// connection whose page cache stays valid between writes. (SQLite lets one connection
    /// write at a time and makes the others poll for the lock, sleeping 1, 2, 5, … ms between
    /// tries (its busy handler): a session's authorization that met the previous session's
    /// end in the store slept milliseconds. And a connection's cache is dropped whenever
    /// another one has written, so writes taking turns on eight connections re-read the
    /// tables' pages from the file each time.) On PostgreSQL, the same pool as reads.
    writes: AnyPool,
    backend: Backend,
}

/// A write transaction ([`Store::begin_write`]).
pub(crate) type WriteTx = sqlx::Transaction<'static, sqlx::Any>;

/// Pool options for `n` connections.
fn pool_of(n: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .acquire_timeout(Duration::from_secs(10))
        .max_connections(n)
}

/// Pool options for `n` connections to a SQLite file.
fn sqlite_pool(n: u32) -> AnyPoolOptions {
    pool_of(n)
        // A local file: no ping round trip before each use (sqlx still pings a connection as
        // it returns to the pool, off the caller's path).
        .test_before_acquire(false)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // A writer of another process (or the migration's) still makes this one wait.
                sqlx::query("PRAGMA busy_timeout = 10000")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("PRAGMA synchronous = NORMAL")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
}

/// `url` without the password it may hold, for messages.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The user information ends at the last '@' before any query (a password may hold '@').
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let Some((userinfo, host)) = location.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split(':').next().unwrap_or_default();
    match query {
        Some(query) => format!("{scheme}://{user}@{host}?{query}"),
        None => format!("{scheme}://{user}@{host}"),
    }
}

/// The file of a `sqlite:` URL (`None` for another database or an in-memory one).
pub fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.contains(":memory:")).then_some(path)
}

/// Creates the database file of a `sqlite:` URL readable by its owner only, if it does not
/// exist yet (it holds password hashes, sealed keys and every audited statement; SQLite
/// gives its `-wal` and `-shm` files the database file's permissions).
fn create_private_file(url: &str) {
    let Some(path) = sqlite_file(url) else {
        return;
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // An existing file is left as it is; any other failure (a missing directory, say) is
    // SQLite's to report when it opens the file.
    let _ = options.open(path);
}

impl Store {
    /// Connects to `url` (`sqlite://path`, `sqlite::memory:`, `postgres://…`) and migrates.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let opened = async {
            Ok::<_, sqlx::Error>(match backend {
                Backend::Sqlite => {
                    // WAL lets readers go on while the one writer writes.
                    let memory = url.contains(":memory:");
                    let url = if url.contains('?') || memory {
                        url.to_owned()
                    } else {
                        format!("{url}?mode=rwc")
                    };
                    if memory {
                        // One connection is the whole database.
                        let pool = sqlite_pool(1).connect(&url).await?;
                        (pool.clone(), pool)
                    } else {
                        create_private_file(&url);
                        let writes = sqlite_pool(1).connect(&url).await?;
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&writes)
                            .await?;
                        (sqlite_pool(8).connect(&url).await?, writes)
                    }
                }
                Backend::Postgres => {
                    let pool = pool_of(16).connect(url).await?;
                    (pool.clone(), pool)
                }
            })
        };
        let (pool, writes) = match opened.await {
            Ok(pools) => pools,
            Err(e) => {
                // A pool that timed out hides why: one plain connection says it (refused,
                // no such database, …).
                let why = match e {
                    sqlx::Error::PoolTimedOut => {
                        match <sqlx::AnyConnection as sqlx::Connection>::connect(url).await {
                            Err(direct) => direct.to_string(),
                            Ok(_) => e.to_string(),
                        }
                    }
                    e => e.to_string(),
                };
                return Err(StoreError::Unavailable(format!(
                    "cannot open the database {}: {why}",
                    without_password(url)
                )));
            }
        };
        let store = Store {
            pool,
            writes,
            backend,
        };
        store.migrator().run(&store.writes).await?;
        Ok(store)
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads first cannot upgrade after
    /// another connection's commit (`SQLITE_BUSY`, without waiting), whereas this one waits
    /// its turn under the busy timeout. PostgreSQL's row locks need no such care.
    async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.writes.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.writes.begin().await,
        }
    }

    /// A connection for a write outside a transaction (on SQLite, the writer, once it is this
    /// one's turn).
    async fn writer(&self) -> Result<PoolConnection<sqlx::Any>, sqlx::Error> {
        self.writes.acquire().await
    }

    /// Whether the database answers (`SELECT 1`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every pooled connection.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writes.close().await;
    }

    fn migrator(&self) -> Migrator {
        let files: &[(i64, &str, &'static str)] = match self.backend {
            Backend::Sqlite => migration_list!("sqlite"),
            Backend::Postgres => migration_list!("postgres"),
        };
        Migrator::with_migrations(
            files
                .iter()
                .map(|(v, d, sql)| {
                    Migration::new(
                        *v,
                        Cow::Borrowed(*d),
                        MigrationType::Simple,
                        sqlx::SqlSafeStr::into_sql_str(*sql),
                        false,
                    )
                })
                .collect(),
        )
    }

    /// The cluster's identifier (the token issuer), created on first use.
    pub async fn cluster_id(&self) -> Result<String, StoreError> {
        let candidate = format!("postern-{}", postern_proto::ids::random_base32(10));
        sqlx::query(
            "INSERT INTO cluster (id, cluster_id, created_at) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&candidate)
        .bind(now())
        .execute(&mut *self.writer().await?)
        .await?;
        let row = sqlx::query("SELECT cluster_id FROM cluster WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("cluster_id")?)
    }

    /// The sealed root key for `purpose` and its public part, if stored.
    pub async fn root_key(&self, purpose: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT sealed, public FROM root_keys WHERE purpose = $1")
            .bind(purpose)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("sealed")?, r.try_get("public")?)))
            .transpose()
    }

    /// Stores a root key unless another controller stored one first; returns what is stored.
    pub async fn insert_root_key(
        &self,
        purpose: &str,
        sealed: &str,
        public: &str,
    ) -> Result<(String, String), StoreError> {
        sqlx::query(
            "INSERT INTO root_keys (purpose, sealed, public, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (purpose) DO NOTHING",
        )
        .bind(purpose)
        .bind(sealed)
        .bind(public)
        .bind(now())
        .execute(&mut *self.writer().await?)
        .await?;
        self.root_key(purpose)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("root key {purpose} vanished")))
    }

    /// Builds a [`StoreError::NotFound`] with the closest name in `table` as a suggestion.
    pub(crate) async fn not_found(
        &self,
        kind: &'static str,
        table: &str,
        name: &str,
    ) -> StoreError {
        let sql = format!("SELECT name FROM {table}");
        let names: Vec<String> = match sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
        {
            Ok(rows) => rows.iter().filter_map(|r| r.try_get("name").ok()).collect(),
            Err(_) => Vec::new(),
        };
        StoreError::NotFound {
            kind,
            name: name.to_owned(),
            suggestion: closest(name, &names),
        }
    }
}

/// The closest of `names` to `wanted`, if it is close enough to be a likely typo.
pub fn closest(wanted: &str, names: &[String]) -> Option<String> {
    names
        .iter()
        .map(|n| {
            // Jaro-Winkler misses a swap in a short name (`wbe`, `gp`), where its match
            // window is a single letter: one edit or swap counts as close too.
            let one_edit = strsim::osa_distance(wanted, n) <= 1 && n.chars().count() >= 2;
            let score = strsim::jaro_winkler(wanted, n).max(if one_edit { 0.85 } else { 0.0 });
            (score, n)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n.clone())
}

/// The current time, Unix seconds.
pub fn now() -> i64 {
    postern_proto::unix_now()
}

fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Maps a unique-constraint violation to [`StoreError::Conflict`] with `message`.
fn conflict(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Db(e),
    }
}

#[cfg(test)]
mod tests;
