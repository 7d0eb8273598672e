//! Users, API tokens, groups, roles (rules and bindings).

use sqlx::Row;

use super::{conflict, json_col, now, to_json, Store, StoreError};
use crate::api::types::{Principal, Rule};
use crate::policy::SourcedRule;

/// A user row.
#[derive(Debug, Clone)]
pub struct UserRow {
    /// Login name.
    pub name: String,
    /// argon2id PHC string, if a password is set.
    pub password_hash: Option<String>,
    /// Locked users can do nothing.
    pub locked: bool,
    /// Creation time.
    pub created_at: i64,
}

/// Who an API token belongs to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    /// The user.
    pub user: UserRow,
    /// Token expiry.
    pub expires_at: i64,
    /// Rules of every role bound to the user, directly or through a group.
    pub rules: Vec<SourcedRule>,
}

/// The roles bound to the user named by the SQL expression `user`, directly or through a
/// group: a subquery, for `role_name IN …`.
fn roles_bound_to(user: &str) -> String {
    format!(
        "(SELECT b.role_name FROM role_bindings b \
          WHERE (b.principal_kind = 'user' AND b.principal_name = {user}) \
             OR (b.principal_kind = 'group' AND b.principal_name IN \
                 (SELECT group_name FROM group_members WHERE user_name = {user})))"
    )
}

fn user_from(row: &sqlx::any::AnyRow) -> Result<UserRow, StoreError> {
    Ok(UserRow {
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        locked: row.try_get::<i64, _>("locked")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Creates a user.
    pub async fn create_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
    ) -> Result<UserRow, StoreError> {
        sqlx::query(
            "INSERT INTO users (name, password_hash, locked, created_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(name)
        .bind(password_hash)
        .bind(now())
        .execute(&mut *self.writer().await?)
        .await
        .map_err(|e| conflict(e, || format!("a user named '{name}' already exists")))?;
        self.user(name).await
    }

    /// Looks a user up by name.
    pub async fn user(&self, name: &str) -> Result<UserRow, StoreError> {
        match self.find_user(name).await? {
            Some(u) => Ok(u),
            None => Err(self.not_found("user", "users", name).await),
        }
    }

    /// Looks a user up by name, `None` if absent.
    pub async fn find_user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query(
            "SELECT name, password_hash, locked, created_at FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from).transpose()
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows =
            sqlx::query("SELECT name, password_hash, locked, created_at FROM users ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(user_from).collect()
    }

    /// Deletes a user with their tokens, memberships and bindings.
    pub async fn delete_user(&self, name: &str) -> Result<(), StoreError> {
        self.user(name).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM api_tokens WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        // Its IdP identities too: left linked, one would log in as a later user of the name.
        for table in ["group_members", "oidc_group_members", "oidc_identities"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE user_name = $1"
            )))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "DELETE FROM role_bindings WHERE principal_kind = 'user' AND principal_name = $1",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Locks or unlocks a user; locking also revokes their API tokens.
    pub async fn set_user_locked(&self, name: &str, locked: bool) -> Result<UserRow, StoreError> {
        self.user(name).await?;
        sqlx::query("UPDATE users SET locked = $1 WHERE name = $2")
            .bind(i64::from(locked))
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await?;
        if locked {
            sqlx::query("DELETE FROM api_tokens WHERE user_name = $1")
                .bind(name)
                .execute(&mut *self.writer().await?)
                .await?;
        }
        self.user(name).await
    }

    /// Sets a user's password hash and ends their API tokens but `keep` (the hash of the
    /// token of the user changing their own password), in one transaction.
    pub async fn set_password(
        &self,
        name: &str,
        hash: &str,
        keep: Option<&str>,
    ) -> Result<(), StoreError> {
        self.user(name).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
            .bind(hash)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM api_tokens WHERE user_name = $1 AND token_hash <> $2")
            .bind(name)
            .bind(keep.unwrap_or(""))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores an API token by its hash.
    pub async fn insert_token(
        &self,
        hash: &str,
        user: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (token_hash, user_name, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(user)
            .bind(now())
            .bind(expires_at)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// The owner of an unexpired token, recording its use.
    pub async fn token_owner(&self, hash: &str) -> Result<Option<TokenOwner>, StoreError> {
        let t = now();
        // The owner and their rules in one read (every API call makes it): a row per rule,
        // or one row with no rule.
        let sql = format!(
            "SELECT u.name, u.password_hash, u.locked, u.created_at, t.expires_at, t.last_used_at, \
                    r.role_name, r.position, r.rule \
             FROM api_tokens t JOIN users u ON u.name = t.user_name \
             LEFT JOIN role_rules r ON r.role_name IN {} \
             WHERE t.token_hash = $1 AND t.expires_at > $2 \
             ORDER BY r.role_name, r.position",
            roles_bound_to("u.name")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash)
            .bind(t)
            .fetch_all(&self.pool)
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        // Record last use at minute granularity: one write per token per minute, not per call.
        let last: Option<i64> = row.try_get("last_used_at")?;
        if last.is_none_or(|l| t - l >= 60) {
            sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE token_hash = $2")
                .bind(t)
                .bind(hash)
                .execute(&mut *self.writer().await?)
                .await?;
        }
        let mut rules = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Some(role) = r.try_get::<Option<String>, _>("role_name")? {
                rules.push(SourcedRule {
                    role,
                    position: r.try_get("position")?,
                    rule: json_col(r, "rule")?,
                });
            }
        }
        Ok(Some(TokenOwner {
            user: user_from(row)?,
            expires_at: row.try_get("expires_at")?,
            rules,
        }))
    }

    /// Deletes one token.
    pub async fn delete_token(&self, hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM api_tokens WHERE token_hash = $1")
            .bind(hash)
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Creates a group.
    pub async fn create_group(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO groups (name, created_at) VALUES ($1, $2)")
            .bind(name)
            .bind(now())
            .execute(&mut *self.writer().await?)
            .await
            .map_err(|e| conflict(e, || format!("a group named '{name}' already exists")))?;
        Ok(())
    }

    /// Fails with NotFound unless the group exists.
    pub async fn require_group(&self, name: &str) -> Result<(), StoreError> {
        let row = sqlx::query("SELECT name FROM groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(self.not_found("group", "groups", name).await),
        }
    }

    /// Every group name with its members.
    pub async fn groups(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let groups = sqlx::query("SELECT name FROM groups ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let members =
            sqlx::query("SELECT group_name, user_name FROM group_members ORDER BY user_name")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            let name: String = g.try_get("name")?;
            let mut m = Vec::new();
            for row in &members {
                if row.try_get::<String, _>("group_name")? == name {
                    m.push(row.try_get("user_name")?);
                }
            }
            out.push((name, m));
        }
        Ok(out)
    }

    /// Deletes a group with its memberships and bindings.
    pub async fn delete_group(&self, name: &str) -> Result<(), StoreError> {
        self.require_group(name).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM group_members WHERE group_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM role_bindings WHERE principal_kind = 'group' AND principal_name = $1",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM groups WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds a user to a group.
    /// A membership an IdP's groups claim made is kept by hand from then on (true): the sync
    /// at login no longer removes it.
    pub async fn add_member(&self, group: &str, user: &str) -> Result<bool, StoreError> {
        self.require_group(group).await?;
        self.user(user).await?;
        let taken_over =
            sqlx::query("DELETE FROM oidc_group_members WHERE group_name = $1 AND user_name = $2")
                .bind(group)
                .bind(user)
                .execute(&mut *self.writer().await?)
                .await?;
        if taken_over.rows_affected() == 1 {
            return Ok(true);
        }
        sqlx::query("INSERT INTO group_members (group_name, user_name) VALUES ($1, $2)")
            .bind(group)
            .bind(user)
            .execute(&mut *self.writer().await?)
            .await
            .map_err(|e| conflict(e, || format!("'{user}' is already a member of '{group}'")))?;
        Ok(false)
    }

    /// Removes a user from a group.
    pub async fn remove_member(&self, group: &str, user: &str) -> Result<(), StoreError> {
        self.require_group(group).await?;
        let done =
            sqlx::query("DELETE FROM group_members WHERE group_name = $1 AND user_name = $2")
                .bind(group)
                .bind(user)
                .execute(&mut *self.writer().await?)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "member",
                name: format!("user '{user}' is not a member of group '{group}'"),
                suggestion: None,
            });
        }
        Ok(())
    }

    /// The groups a user belongs to.
    pub async fn user_groups(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT group_name FROM group_members WHERE user_name = $1 ORDER BY group_name",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("group_name")?)).collect()
    }

    /// Creates a role.
    pub async fn create_role(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO roles (name, created_at) VALUES ($1, $2)")
            .bind(name)
            .bind(now())
            .execute(&mut *self.writer().await?)
            .await
            .map_err(|e| conflict(e, || format!("a role named '{name}' already exists")))?;
        Ok(())
    }

    /// Fails with NotFound unless the role exists.
    pub async fn require_role(&self, name: &str) -> Result<(), StoreError> {
        let row = sqlx::query("SELECT name FROM roles WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(_) => Ok(()),
            None => Err(self.not_found("role", "roles", name).await),
        }
    }

    /// Every role name.
    pub async fn role_names(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT name FROM roles ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    /// A role's rules (in order) and bindings.
    pub async fn role(&self, name: &str) -> Result<(Vec<Rule>, Vec<Principal>), StoreError> {
        self.require_role(name).await?;
        let rules =
            sqlx::query("SELECT rule FROM role_rules WHERE role_name = $1 ORDER BY position")
                .bind(name)
                .fetch_all(&self.pool)
                .await?;
        let rules = rules
            .iter()
            .map(|r| json_col(r, "rule"))
            .collect::<Result<_, _>>()?;
        let bindings = sqlx::query(
            "SELECT principal_kind, principal_name FROM role_bindings WHERE role_name = $1 ORDER BY principal_kind, principal_name",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        let bindings = bindings
            .iter()
            .map(|r| {
                let kind: String = r.try_get("principal_kind")?;
                let name: String = r.try_get("principal_name")?;
                Ok(if kind == "group" {
                    Principal::Group(name)
                } else {
                    Principal::User(name)
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((rules, bindings))
    }

    /// Deletes a role with its rules and bindings.
    pub async fn delete_role(&self, name: &str) -> Result<(), StoreError> {
        self.require_role(name).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM role_rules WHERE role_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM role_bindings WHERE role_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM roles WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Appends a rule to a role.
    pub async fn add_rule(&self, role: &str, rule: &Rule) -> Result<(), StoreError> {
        self.require_role(role).await?;
        let mut tx = self.begin_write().await?;
        let next: i64 = sqlx::query(
            "SELECT COALESCE(MAX(position), 0) + 1 AS next FROM role_rules WHERE role_name = $1",
        )
        .bind(role)
        .fetch_one(&mut *tx)
        .await?
        .try_get("next")?;
        sqlx::query("INSERT INTO role_rules (role_name, position, rule) VALUES ($1, $2, $3)")
            .bind(role)
            .bind(next)
            .bind(to_json(rule))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the rule at `position` (1-based) of `role`; the rules after it move up one, so
    /// positions stay 1..=n. Returns the rule removed.
    pub async fn remove_rule(&self, role: &str, position: i64) -> Result<Rule, StoreError> {
        self.require_role(role).await?;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT rule FROM role_rules WHERE role_name = $1 AND position = $2")
            .bind(role)
            .bind(position)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "rule",
                name: format!("#{position} in role '{role}'"),
                suggestion: None,
            })?;
        let rule: Rule = json_col(&row, "rule")?;
        sqlx::query("DELETE FROM role_rules WHERE role_name = $1 AND position = $2")
            .bind(role)
            .bind(position)
            .execute(&mut *tx)
            .await?;
        // Through negative positions: a unique key checked row by row must never see two
        // rules at one position while they move.
        for sql in [
            "UPDATE role_rules SET position = -position WHERE role_name = $1 AND position > $2",
            "UPDATE role_rules SET position = -position - 1 WHERE role_name = $1 AND position < 0",
        ] {
            sqlx::query(sql)
                .bind(role)
                .bind(position)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rule)
    }

    /// Binds a role to a user or group (which must exist).
    pub async fn bind_role(&self, role: &str, who: &Principal) -> Result<(), StoreError> {
        self.require_role(role).await?;
        let (kind, name) = principal_parts(who);
        match who {
            Principal::User(u) => drop(self.user(u).await?),
            Principal::Group(g) => self.require_group(g).await?,
        }
        sqlx::query("INSERT INTO role_bindings (role_name, principal_kind, principal_name) VALUES ($1, $2, $3)")
            .bind(role)
            .bind(kind)
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await
            .map_err(|e| conflict(e, || format!("role '{role}' is already bound to {kind} '{name}'")))?;
        Ok(())
    }

    /// Removes a binding.
    pub async fn unbind_role(&self, role: &str, who: &Principal) -> Result<(), StoreError> {
        self.require_role(role).await?;
        let (kind, name) = principal_parts(who);
        let done = sqlx::query(
            "DELETE FROM role_bindings WHERE role_name = $1 AND principal_kind = $2 AND principal_name = $3",
        )
        .bind(role)
        .bind(kind)
        .bind(name)
        .execute(&mut *self.writer().await?)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "binding",
                name: format!("role '{role}' is not bound to {kind} '{name}'"),
                suggestion: None,
            });
        }
        Ok(())
    }

    /// Every rule that applies to `user` (directly or through a group), with its role name and
    /// 1-based position, in a stable order: what the policy engine evaluates.
    pub async fn rules_for_user(&self, user: &str) -> Result<Vec<SourcedRule>, StoreError> {
        let sql = format!(
            "SELECT r.role_name, r.position, r.rule FROM role_rules r \
             WHERE r.role_name IN {} ORDER BY r.role_name, r.position",
            roles_bound_to("$1")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SourcedRule {
                    role: r.try_get("role_name")?,
                    position: r.try_get("position")?,
                    rule: json_col(r, "rule")?,
                })
            })
            .collect()
    }

    /// Names of the roles bound to `user` directly or through a group.
    pub async fn roles_for_user(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "SELECT DISTINCT role_name FROM {} AS bound ORDER BY role_name",
            roles_bound_to("$1")
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("role_name")?)).collect()
    }
}

fn principal_parts(p: &Principal) -> (&'static str, &str) {
    match p {
        Principal::User(n) => ("user", n.as_str()),
        Principal::Group(n) => ("group", n.as_str()),
    }
}
