//! OpenID Connect: login attempts, identities linked to users, and the group memberships an
//! IdP's groups claim manages.

use sqlx::Row;

use super::{now, Store, StoreError};

/// A login attempt in progress (or finished, until it expires).
#[derive(Debug, Clone)]
pub struct AttemptRow {
    /// The secret id the CLI polls with.
    pub id: String,
    /// The login method's name.
    pub method: String,
    /// `code` or `device`.
    pub flow: String,
    /// `pending`, `exchanging` (a callback is being handled), `done`, `collected`, `failed`.
    pub status: String,
    /// The code flow's nonce.
    pub nonce: Option<String>,
    /// The code flow's PKCE verifier.
    pub pkce_verifier: Option<String>,
    /// The user logged in (when done).
    pub user_name: Option<String>,
    /// The API token sealed under the KEK (when done, until collected).
    pub token_sealed: Option<String>,
    /// The API token's expiry.
    pub token_expires_at: Option<i64>,
    /// Why the attempt failed.
    pub message: Option<String>,
    /// When the attempt stops being usable.
    pub expires_at: i64,
    /// The CLI's loopback port the browser is sent to with the confirmation code (code flow).
    pub return_port: Option<i64>,
    /// SHA-256 of the confirmation code the CLI must present (a done code-flow attempt).
    pub confirm_hash: Option<String>,
    /// How the user logged in (the `auth.login` details, JSON), until the code is presented.
    pub login_details: Option<String>,
}

/// A new attempt.
#[derive(Debug, Clone)]
pub struct NewAttempt<'a> {
    /// Secret id.
    pub id: &'a str,
    /// Method name.
    pub method: &'a str,
    /// `code` or `device`.
    pub flow: &'a str,
    /// SHA-256 of `state` (code flow).
    pub state_hash: Option<&'a str>,
    /// Nonce (code flow). Stored in clear: useless without the code and the client secret,
    /// and gone within minutes.
    pub nonce: Option<&'a str>,
    /// PKCE verifier (code flow), likewise.
    pub pkce_verifier: Option<&'a str>,
    /// The CLI's loopback port for the confirmation redirect (code flow).
    pub return_port: Option<u16>,
    /// Expiry.
    pub expires_at: i64,
}

/// How presenting a confirmation code for a done code-flow attempt went.
#[derive(Debug, Clone)]
pub enum Confirmed {
    /// The code was right: the attempt (who logged in, and how), now collected.
    Collected(Box<AttemptRow>),
    /// A wrong code; this many more may be tried.
    Wrong(i64),
    /// The code came too late, or was the last wrong one allowed: the attempt failed, with
    /// this message, for the user it names.
    Failed {
        /// Why.
        message: &'static str,
        /// The user the IdP vouched for.
        user: Option<String>,
    },
    /// The attempt is not waiting for a code (not done, collected, failed, or device flow).
    NotWaiting,
}

/// Why an attempt failed after too many wrong confirmation codes.
pub const CONFIRM_EXHAUSTED: &str =
    "too many wrong confirmation codes: the login was cancelled; start again";

/// Why an attempt failed when its code came after its expiry.
pub const CONFIRM_EXPIRED: &str =
    "the login attempt expired before its confirmation code was entered: start again";

/// Wrong confirmation codes an attempt survives.
pub const CONFIRM_TRIES: i64 = 3;

/// How claiming a pending attempt for its callback went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This caller now owns the attempt (status `exchanging`).
    Claimed,
    /// The attempt is past its expiry.
    Expired,
    /// Another callback already used it.
    AlreadyUsed,
}

const ATTEMPT_COLUMNS: &str = "id, method, flow, status, nonce, pkce_verifier, user_name, \
     token_sealed, token_expires_at, message, expires_at, return_port, confirm_hash, login_details";

fn attempt_from(r: &sqlx::any::AnyRow) -> Result<AttemptRow, StoreError> {
    Ok(AttemptRow {
        id: r.try_get("id")?,
        method: r.try_get("method")?,
        flow: r.try_get("flow")?,
        status: r.try_get("status")?,
        nonce: r.try_get("nonce")?,
        pkce_verifier: r.try_get("pkce_verifier")?,
        user_name: r.try_get("user_name")?,
        token_sealed: r.try_get("token_sealed")?,
        token_expires_at: r.try_get("token_expires_at")?,
        message: r.try_get("message")?,
        expires_at: r.try_get("expires_at")?,
        return_port: r.try_get("return_port")?,
        confirm_hash: r.try_get("confirm_hash")?,
        login_details: r.try_get("login_details")?,
    })
}

impl Store {
    /// Attempts that have not expired yet, whatever their state.
    pub async fn unexpired_oidc_attempts(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM oidc_attempts WHERE expires_at > $1")
            .bind(now())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Records a new pending attempt (and forgets attempts expired over an hour ago).
    pub async fn insert_oidc_attempt(&self, a: &NewAttempt<'_>) -> Result<(), StoreError> {
        let t = now();
        sqlx::query("DELETE FROM oidc_attempts WHERE expires_at < $1")
            .bind(t - 3600)
            .execute(&mut *self.writer().await?)
            .await?;
        sqlx::query(
            "INSERT INTO oidc_attempts (id, method, flow, state_hash, nonce, pkce_verifier, status, created_at, expires_at, return_port) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9)",
        )
        .bind(a.id)
        .bind(a.method)
        .bind(a.flow)
        .bind(a.state_hash)
        .bind(a.nonce)
        .bind(a.pkce_verifier)
        .bind(t)
        .bind(a.expires_at)
        .bind(a.return_port.map(i64::from))
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// An attempt by its id.
    pub async fn oidc_attempt(&self, id: &str) -> Result<Option<AttemptRow>, StoreError> {
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM oidc_attempts WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(attempt_from).transpose()
    }

    /// The attempt a callback's `state` belongs to.
    pub async fn oidc_attempt_by_state(
        &self,
        state_hash: &str,
    ) -> Result<Option<AttemptRow>, StoreError> {
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM oidc_attempts WHERE state_hash = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(attempt_from).transpose()
    }

    /// Moves a pending, unexpired attempt to `exchanging`, atomically: of two callbacks with
    /// the same state, only one gets [`Claim::Claimed`].
    pub async fn claim_oidc_attempt(&self, id: &str) -> Result<Claim, StoreError> {
        let t = now();
        let done = sqlx::query(
            "UPDATE oidc_attempts SET status = 'exchanging' \
             WHERE id = $1 AND status = 'pending' AND expires_at > $2",
        )
        .bind(id)
        .bind(t)
        .execute(&mut *self.writer().await?)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        match self.oidc_attempt(id).await? {
            Some(a) if a.status == "pending" => Ok(Claim::Expired),
            Some(_) => Ok(Claim::AlreadyUsed),
            None => Ok(Claim::Expired),
        }
    }

    /// Marks an open attempt done, with the sealed API token waiting for the CLI (the device
    /// flow). False if the attempt was no longer open (failed or expired meanwhile, and so
    /// reported to the CLI).
    pub async fn complete_oidc_attempt(
        &self,
        id: &str,
        user: &str,
        token_sealed: &str,
        token_expires_at: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE oidc_attempts SET status = 'done', user_name = $2, token_sealed = $3, \
             token_expires_at = $4, nonce = NULL, pkce_verifier = NULL \
             WHERE id = $1 AND status IN ('pending', 'exchanging')",
        )
        .bind(id)
        .bind(user)
        .bind(token_sealed)
        .bind(token_expires_at)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks an open code-flow attempt done: the IdP vouched for `user` (`details`: how); the
    /// token is made when the confirmation code whose hash is `confirm_hash` is presented.
    /// False if the attempt was no longer open.
    pub async fn verify_oidc_attempt(
        &self,
        id: &str,
        user: &str,
        details: &str,
        confirm_hash: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE oidc_attempts SET status = 'done', user_name = $2, login_details = $3, \
             confirm_hash = $4, nonce = NULL, pkce_verifier = NULL \
             WHERE id = $1 AND status IN ('pending', 'exchanging')",
        )
        .bind(id)
        .bind(user)
        .bind(details)
        .bind(confirm_hash)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Presents the hash of a confirmation code for a done code-flow attempt: the right one,
    /// in time, collects it (once: the caller then makes the token); each wrong one counts,
    /// and the last allowed, or any after the expiry, fails the attempt.
    pub async fn confirm_oidc_attempt(
        &self,
        id: &str,
        code_hash: &str,
    ) -> Result<Confirmed, StoreError> {
        let Some(row) = self.oidc_attempt(id).await? else {
            return Ok(Confirmed::NotWaiting);
        };
        if row.status != "done" || row.confirm_hash.is_none() {
            return Ok(Confirmed::NotWaiting);
        }
        let t = now();
        if row.expires_at <= t {
            return self.fail_confirmation(&row, CONFIRM_EXPIRED).await;
        }
        // The tries are counted in the same statements, so that codes sent at once get no
        // more than the allowed number between them.
        let collected = sqlx::query(
            "UPDATE oidc_attempts SET status = 'collected', login_details = NULL \
             WHERE id = $1 AND status = 'done' AND confirm_hash = $2 AND confirm_failures < $3 \
             AND expires_at > $4",
        )
        .bind(id)
        .bind(code_hash)
        .bind(CONFIRM_TRIES)
        .bind(t)
        .execute(&mut *self.writer().await?)
        .await?;
        if collected.rows_affected() == 1 {
            return Ok(Confirmed::Collected(Box::new(row)));
        }
        let counted = sqlx::query(
            "UPDATE oidc_attempts SET confirm_failures = confirm_failures + 1 \
             WHERE id = $1 AND status = 'done' AND confirm_failures < $2 \
             RETURNING confirm_failures",
        )
        .bind(id)
        .bind(CONFIRM_TRIES)
        .fetch_optional(&mut *self.writer().await?)
        .await?;
        let failures: i64 = match counted {
            Some(r) => r.try_get("confirm_failures")?,
            None => CONFIRM_TRIES,
        };
        if failures < CONFIRM_TRIES {
            return Ok(Confirmed::Wrong(CONFIRM_TRIES - failures));
        }
        self.fail_confirmation(&row, CONFIRM_EXHAUSTED).await
    }

    /// Fails a done code-flow attempt waiting for its code (once: a second caller gets
    /// [`Confirmed::NotWaiting`]).
    pub async fn fail_confirmation(
        &self,
        row: &AttemptRow,
        message: &'static str,
    ) -> Result<Confirmed, StoreError> {
        let failed = sqlx::query(
            "UPDATE oidc_attempts SET status = 'failed', message = $2, login_details = NULL \
             WHERE id = $1 AND status = 'done'",
        )
        .bind(&row.id)
        .bind(message)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(if failed.rows_affected() == 1 {
            Confirmed::Failed {
                message,
                user: row.user_name.clone(),
            }
        } else {
            Confirmed::NotWaiting
        })
    }

    /// Marks a pending attempt failed with a message for the CLI; false if it was not open.
    pub async fn fail_oidc_attempt(&self, id: &str, message: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE oidc_attempts SET status = 'failed', message = $2, nonce = NULL, \
             pkce_verifier = NULL WHERE id = $1 AND status IN ('pending', 'exchanging')",
        )
        .bind(id)
        .bind(message)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Hands the sealed token of a done attempt out once: returns it and forgets it. Not one
    /// behind a confirmation code ([`Self::confirm_oidc_attempt`]).
    pub async fn collect_oidc_attempt(&self, id: &str) -> Result<Option<AttemptRow>, StoreError> {
        let Some(row) = self.oidc_attempt(id).await? else {
            return Ok(None);
        };
        if row.status != "done" {
            return Ok(None);
        }
        let done = sqlx::query(
            "UPDATE oidc_attempts SET status = 'collected', token_sealed = NULL \
             WHERE id = $1 AND status = 'done' AND confirm_hash IS NULL",
        )
        .bind(id)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok((done.rows_affected() == 1).then_some(row))
    }

    /// The user an IdP identity is linked to.
    pub async fn oidc_linked_user(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT user_name FROM oidc_identities WHERE issuer = $1 AND subject = $2")
                .bind(issuer)
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| Ok(r.try_get("user_name")?)).transpose()
    }

    /// Whether `user` is linked to some identity of `issuer`.
    pub async fn oidc_user_linked_elsewhere(
        &self,
        user: &str,
        issuer: &str,
        subject: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT subject FROM oidc_identities WHERE user_name = $1 AND NOT (issuer = $2 AND subject = $3)",
        )
        .bind(user)
        .bind(issuer)
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// The group memberships an IdP's groups claim manages, as (group, user), sorted; of one
    /// group or one user if given.
    pub async fn oidc_memberships(
        &self,
        group: Option<&str>,
        user: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_name, user_name FROM oidc_group_members \
             WHERE ($1 = '' OR group_name = $1) AND ($2 = '' OR user_name = $2) \
             ORDER BY group_name, user_name",
        )
        .bind(group.unwrap_or_default())
        .bind(user.unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("group_name")?, r.try_get("user_name")?)))
            .collect()
    }

    /// Links an IdP identity to a user (or records another login of it).
    pub async fn link_oidc_identity(
        &self,
        issuer: &str,
        subject: &str,
        user: &str,
        method: &str,
    ) -> Result<(), StoreError> {
        let t = now();
        sqlx::query(
            "INSERT INTO oidc_identities (issuer, subject, user_name, method, created_at, last_login_at) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (issuer, subject) DO UPDATE SET user_name = $3, method = $4, last_login_at = $5",
        )
        .bind(issuer)
        .bind(subject)
        .bind(user)
        .bind(method)
        .bind(t)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Makes `user`'s memberships that came from `issuer` equal `groups`: creates missing
    /// groups, adds missing memberships, removes those the IdP no longer lists. Memberships an
    /// admin made by hand are left alone (and never taken over). Returns (added, removed).
    pub async fn sync_oidc_groups(
        &self,
        user: &str,
        issuer: &str,
        groups: &[String],
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let t = now();
        let mut tx = self.begin_write().await?;
        // Forget IdP-sourced memberships that an admin removed or whose group is gone.
        sqlx::query(
            "DELETE FROM oidc_group_members WHERE user_name = $1 AND NOT EXISTS \
             (SELECT 1 FROM group_members m WHERE m.group_name = oidc_group_members.group_name \
              AND m.user_name = oidc_group_members.user_name)",
        )
        .bind(user)
        .execute(&mut *tx)
        .await?;
        let sourced: Vec<String> = sqlx::query(
            "SELECT group_name FROM oidc_group_members WHERE user_name = $1 AND issuer = $2",
        )
        .bind(user)
        .bind(issuer)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("group_name"))
        .collect::<Result<_, _>>()?;
        let member_of: Vec<String> =
            sqlx::query("SELECT group_name FROM group_members WHERE user_name = $1")
                .bind(user)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("group_name"))
                .collect::<Result<_, _>>()?;
        let mut added = Vec::new();
        for g in groups {
            if member_of.contains(g) {
                continue;
            }
            sqlx::query(
                "INSERT INTO groups (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(g)
            .bind(t)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO group_members (group_name, user_name) VALUES ($1, $2) \
                 ON CONFLICT (group_name, user_name) DO NOTHING",
            )
            .bind(g)
            .bind(user)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO oidc_group_members (group_name, user_name, issuer) VALUES ($1, $2, $3) \
                 ON CONFLICT (group_name, user_name) DO UPDATE SET issuer = $3",
            )
            .bind(g)
            .bind(user)
            .bind(issuer)
            .execute(&mut *tx)
            .await?;
            added.push(g.clone());
        }
        let mut removed = Vec::new();
        for g in sourced.iter().filter(|g| !groups.contains(g)) {
            sqlx::query("DELETE FROM group_members WHERE group_name = $1 AND user_name = $2")
                .bind(g)
                .bind(user)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM oidc_group_members WHERE group_name = $1 AND user_name = $2")
                .bind(g)
                .bind(user)
                .execute(&mut *tx)
                .await?;
            removed.push(g.clone());
        }
        tx.commit().await?;
        Ok((added, removed))
    }
}

#[cfg(test)]
#[path = "oidc_tests.rs"]
mod tests;
