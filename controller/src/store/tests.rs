//! Store tests, run against SQLite and against PostgreSQL (a fresh database per test, dropped
//! afterwards). `POSTERN_TEST_PG` names the server (default: the local one, user postgres).

use std::collections::BTreeMap;

use super::*;
use crate::api::types::{
    AuditQuery, CreateTarget, Effect, Principal, Rule, SessionQuery, TargetType, UpdateTarget,
};

fn pg_admin_url() -> String {
    std::env::var("POSTERN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A throwaway PostgreSQL database, dropped by [`PgDb::drop_db`].
struct PgDb {
    name: String,
    url: String,
}

impl PgDb {
    async fn create() -> PgDb {
        sqlx::any::install_default_drivers();
        let admin = pg_admin_url();
        let name = format!("postern_test_{}", postern_proto::ids::random_base32(8));
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .expect("the local PostgreSQL must be running (POSTERN_TEST_PG)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin);
        PgDb {
            url: format!("{base}/{name}"),
            name,
        }
    }

    async fn drop_db(self) {
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg_admin_url())
            .await
            .expect("connect to drop");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop test database");
    }
}

/// Runs `body` once on a SQLite file store and once on a fresh PostgreSQL database.
pub(super) async fn on_both<F, Fut>(body: F)
where
    F: Fn(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = std::env::temp_dir().join(format!(
        "postern-store-{}",
        postern_proto::ids::random_base32(6)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sqlite = Store::open(&format!("sqlite://{}", dir.join("t.db").display()))
        .await
        .expect("open sqlite");
    #[cfg(unix)]
    for file in ["t.db", "t.db-wal"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(file))
            .expect("database file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} readable by others: {mode:o}");
    }
    assert_eq!(sqlite.backend(), Backend::Sqlite);
    body(sqlite.clone()).await;
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);

    let db = PgDb::create().await;
    let pg = Store::open(&db.url).await.expect("open postgres");
    assert_eq!(pg.backend(), Backend::Postgres);
    body(pg.clone()).await;
    pg.close().await;
    db.drop_db().await;
}

fn target(name: &str) -> CreateTarget {
    CreateTarget {
        name: name.into(),
        kind: TargetType::Tcp,
        address: "127.0.0.1:5432".into(),
        labels: [("env".to_string(), "prod".to_string())].into(),
        default_duration_secs: None,
        max_duration_secs: Some(600),
        connection_limit: Some(3),
        worker_filter: BTreeMap::new(),
    }
}

#[tokio::test]
async fn users_tokens_and_locking() {
    on_both(|s| async move {
        s.create_user("alice", Some("hash")).await.expect("create");
        assert!(matches!(
            s.create_user("alice", None).await,
            Err(StoreError::Conflict(_))
        ));
        match s.user("alcie").await {
            Err(StoreError::NotFound { suggestion, .. }) => {
                assert_eq!(suggestion.as_deref(), Some("alice"))
            }
            other => panic!("expected not found, got {other:?}"),
        }
        s.insert_token("h1", "alice", now() + 60)
            .await
            .expect("token");
        s.insert_token("old", "alice", now() - 1)
            .await
            .expect("token");
        assert_eq!(
            s.token_owner("h1")
                .await
                .expect("q")
                .expect("owner")
                .user
                .name,
            "alice"
        );
        assert!(
            s.token_owner("old").await.expect("q").is_none(),
            "expired token must not work"
        );
        let locked = s.set_user_locked("alice", true).await.expect("lock");
        assert!(locked.locked);
        assert!(
            s.token_owner("h1").await.expect("q").is_none(),
            "locking revokes tokens"
        );
        s.delete_user("alice").await.expect("delete");
        assert!(s.find_user("alice").await.expect("q").is_none());
    })
    .await;
}

#[tokio::test]
async fn groups_roles_and_effective_rules() {
    on_both(|s| async move {
        s.create_user("bob", None).await.expect("user");
        s.create_group("dev").await.expect("group");
        s.add_member("dev", "bob").await.expect("member");
        assert!(matches!(
            s.add_member("dev", "bob").await,
            Err(StoreError::Conflict(_))
        ));
        s.create_role("db").await.expect("role");
        let allow = Rule {
            effect: Effect::Allow,
            actions: vec!["connect".into()],
            targets: Some("pg-*".into()),
            labels: BTreeMap::new(),
            logins: Vec::new(),
        };
        let deny = Rule {
            effect: Effect::Deny,
            actions: vec!["connect".into()],
            targets: None,
            labels: [("env".to_string(), "prod".to_string())].into(),
            logins: Vec::new(),
        };
        s.add_rule("db", &allow).await.expect("rule");
        s.add_rule("db", &deny).await.expect("rule");
        assert!(
            s.rules_for_user("bob").await.expect("rules").is_empty(),
            "unbound role grants nothing"
        );
        s.bind_role("db", &Principal::Group("dev".into()))
            .await
            .expect("bind");
        let rules = s.rules_for_user("bob").await.expect("rules");
        assert_eq!(
            rules,
            vec![
                crate::policy::SourcedRule {
                    role: "db".into(),
                    position: 1,
                    rule: allow.clone()
                },
                crate::policy::SourcedRule {
                    role: "db".into(),
                    position: 2,
                    rule: deny.clone()
                },
            ]
        );
        assert_eq!(s.roles_for_user("bob").await.expect("roles"), vec!["db"]);
        s.remove_member("dev", "bob").await.expect("remove");
        assert!(s.rules_for_user("bob").await.expect("rules").is_empty());
        s.bind_role("db", &Principal::User("bob".into()))
            .await
            .expect("bind user");
        assert_eq!(s.rules_for_user("bob").await.expect("rules").len(), 2);
        s.unbind_role("db", &Principal::User("bob".into()))
            .await
            .expect("unbind");
        assert!(s
            .unbind_role("db", &Principal::User("bob".into()))
            .await
            .is_err());
        s.delete_role("db").await.expect("delete role");
        assert!(s.role_names().await.expect("names").is_empty());
    })
    .await;
}

#[tokio::test]
async fn targets_workers_and_sessions() {
    on_both(|s| async move {
        let t = s.create_target(&target("pg-prod")).await.expect("target");
        assert_eq!(t.connection_limit, Some(3));
        assert_eq!(t.default_duration_secs, 600, "default is capped by the maximum");
        assert!(matches!(s.create_target(&target("pg-prod")).await, Err(StoreError::Conflict(_))));
        let u = s
            .update_target("pg-prod", &UpdateTarget { enabled: Some(false), connection_limit: Some(0), ..Default::default() })
            .await
            .expect("update");
        assert!(!u.enabled);
        assert_eq!(u.connection_limit, None);

        s.create_worker("w1", &BTreeMap::new(), "act", now() + 60).await.expect("worker");
        assert!(
            matches!(s.create_worker("W1", &BTreeMap::new(), "act2", now() + 60).await, Err(StoreError::Conflict(m)) if m.contains("'w1'")),
            "names differing only in case are one TLS name"
        );
        assert_eq!(s.pending_worker("act").await.expect("q").as_deref(), Some("w1"));
        assert!(matches!(s.register_worker("act", "fp1").await.expect("reg"), ActivationOutcome::Registered(n) if n == "w1"));
        assert!(matches!(s.register_worker("act", "fp2").await.expect("reg"), ActivationOutcome::Invalid), "single use");
        assert_eq!(s.worker_by_fingerprint("fp1").await.expect("q").expect("w").name, "w1");
        assert_eq!(s.worker("w1").await.expect("w").mode, "direct", "the default mode");
        s.worker_connected("w1", "c1", "127.0.0.1:9", "outbound-only").await.expect("connected");
        let w = s.worker("w1").await.expect("w");
        assert_eq!((w.connected_to.as_deref(), w.mode.as_str(), w.active_sessions), (Some("c1"), "outbound-only", None));
        s.worker_heartbeat("w1", 3, 7).await.expect("heartbeat");
        let w = s.worker("w1").await.expect("w");
        assert_eq!((w.active_sessions, w.active_connections), (Some(3), Some(7)));
        s.worker_disconnected("w1", "other").await.expect("noop");
        assert!(s.worker("w1").await.expect("w").connected_to.is_some(), "only the holder disconnects");

        let new = NewSession { id: "s_1".into(), user: "bob".into(), target: "pg-prod".into(), worker: "w1".into(), expires_at: now() + 60, login: Some("app".into()) };
        s.insert_session(&new).await.expect("session");
        assert!(s.activate_session("s_1").await.expect("activate"));
        assert!(s.activate_session("s_1").await.expect("again"), "idempotent");
        s.record_connections("s_1", 1, 10, 20).await.expect("conn");
        s.record_connections("s_1", 2, 1, 2).await.expect("conn");
        let active = s.sessions(&SessionQuery { active: Some(true), ..Default::default() }).await.expect("list");
        assert_eq!(active.len(), 1);
        assert_eq!((active[0].connections, active[0].bytes_up, active[0].bytes_down), (3, 11, 22));
        assert!(s.end_session("s_1", "client closed").await.expect("end"));
        assert!(!s.end_session("s_1", "again").await.expect("end"), "ends once");
        assert!(!s.activate_session("s_1").await.expect("activate"), "ended sessions stay ended");
        let ended = s.session("s_1").await.expect("get");
        assert_eq!((ended.status.as_str(), ended.end_reason.as_deref()), ("terminated", Some("client closed")));
        assert_eq!(ended.login.as_deref(), Some("app"), "the login is kept");
        assert!(s.sessions(&SessionQuery { active: Some(true), ..Default::default() }).await.expect("l").is_empty());
        assert_eq!(s.sessions(&SessionQuery { user: Some("bob".into()), ..Default::default() }).await.expect("l").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn audit_and_root_keys() {
    on_both(|s| async move {
        s.audit(
            "alice",
            "auth.login",
            "user:alice",
            "success",
            &serde_json::json!({"m": 1}),
        )
        .await
        .expect("a");
        s.audit(
            "bob",
            "session.denied",
            "target:db",
            "denied",
            &serde_json::json!({}),
        )
        .await
        .expect("a");
        let all = s.audit_events(&AuditQuery::default()).await.expect("q");
        assert_eq!(all.len(), 2);
        assert!(all[0].id < all[1].id, "oldest first");
        let denied = s
            .audit_events(&AuditQuery {
                action: Some("session.".into()),
                ..Default::default()
            })
            .await
            .expect("q");
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].actor, "bob");
        let (sealed, public) = s
            .insert_root_key("k", "sealed-a", "pub-a")
            .await
            .expect("k");
        assert_eq!((sealed.as_str(), public.as_str()), ("sealed-a", "pub-a"));
        let again = s
            .insert_root_key("k", "sealed-b", "pub-b")
            .await
            .expect("k");
        assert_eq!(again.0, "sealed-a", "the first stored key wins");
        let id = s.cluster_id().await.expect("id");
        assert_eq!(
            s.cluster_id().await.expect("id"),
            id,
            "cluster id is stable"
        );
    })
    .await;
}

#[tokio::test]
async fn audit_chain_verifies_and_names_tampering() {
    on_both(|s| async move {
        for i in 0..20 {
            s.audit(
                "alice",
                "auth.login",
                "user:alice",
                "success",
                &serde_json::json!({"n": i}),
            )
            .await
            .expect("append");
        }
        // Text that JSON escapes is stored exactly as it was hashed, and reads back as it was.
        let tricky = "quote \" backslash \\ newline \n tab \t control \u{1} é 🦀 \u{2028}";
        s.audit(
            tricky,
            "postgres.query",
            "session:s_x",
            "success",
            &serde_json::json!({"statement": tricky}),
        )
        .await
        .expect("append");
        let read = s
            .audit_events(&crate::api::types::AuditQuery {
                actor: Some(tricky.into()),
                ..Default::default()
            })
            .await
            .expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].details["statement"], tricky);
        // A worker's resent event is stored once.
        let e = NewEvent {
            event_id: Some("ev-1".into()),
            ..NewEvent::now(
                "worker:w1",
                "connection.close",
                "session:s_1",
                "success",
                serde_json::json!({}),
            )
        };
        assert_eq!(
            s.append_audit(std::slice::from_ref(&e))
                .await
                .expect("append")
                .len(),
            1
        );
        assert_eq!(
            s.append_audit(std::slice::from_ref(&e))
                .await
                .expect("append")
                .len(),
            0,
            "duplicate stored"
        );
        let ok = s.verify_audit(None).await.expect("verify");
        assert!(ok.ok, "{ok:?}");
        assert_eq!(ok.checked, 22);

        // One batch larger than an INSERT statement's rows, resending an id stored before
        // and holding another id twice: each id stored once, in order, chained.
        let mut batch = vec![e.clone()];
        batch.extend((0..1_500).map(|i| NewEvent {
            event_id: Some(format!("batch-{}", i.min(1_498))),
            ..e.clone()
        }));
        let stored = s.append_audit(&batch).await.expect("append batch");
        assert_eq!(stored.len(), 1_499, "ev-1 and one batch-1498 skipped");
        assert_eq!(
            (stored[0].0, stored[1_498].0),
            (23, 1_521),
            "consecutive seq"
        );
        let ok = s.verify_audit(None).await.expect("verify");
        assert!(ok.ok, "{ok:?}");
        assert_eq!(ok.checked, 1_521);
        let head = crate::api::types::AuditAnchor {
            seq: 1_521,
            hash: ok.head_hash.clone().expect("head hash"),
        };
        let at_11 = |hash: &str| crate::api::types::AuditAnchor {
            seq: 11,
            hash: hash.to_owned(),
        };
        let hash_11: String = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = 11")
            .fetch_one(&s.pool)
            .await
            .expect("hash of #11");
        for anchor in [&head, &at_11(&hash_11)] {
            let anchored = s.verify_audit(Some(anchor)).await.expect("verify");
            assert!(anchored.ok, "{anchor}: {anchored:?}");
        }
        let wrong = s
            .verify_audit(Some(&at_11(&"0".repeat(64))))
            .await
            .expect("verify");
        assert_eq!(
            (wrong.ok, wrong.first_bad_seq),
            (false, Some(11)),
            "{wrong:?}"
        );

        // Edit one row behind the store's back: verify names it.
        sqlx::query("UPDATE audit_events SET details = '{\"n\":999}' WHERE seq = 7")
            .execute(&s.pool)
            .await
            .expect("tamper");
        let bad = s.verify_audit(None).await.expect("verify");
        assert!(!bad.ok);
        assert_eq!(bad.first_bad_seq, Some(7), "{bad:?}");
        assert!(
            bad.reason.as_deref().unwrap_or("").contains("#7"),
            "{bad:?}"
        );

        // Put it back (the hash covers the exact text), then delete a row.
        sqlx::query("UPDATE audit_events SET details = '{\"n\":6}' WHERE seq = 7")
            .execute(&s.pool)
            .await
            .expect("restore");
        assert!(
            s.verify_audit(None).await.expect("verify").ok,
            "restored row verifies again"
        );
        sqlx::query("DELETE FROM audit_events WHERE seq = 12")
            .execute(&s.pool)
            .await
            .expect("delete");
        let bad = s.verify_audit(None).await.expect("verify");
        assert_eq!(bad.first_bad_seq, Some(12), "{bad:?}");

        // Removing the newest events is caught by the head.
        sqlx::query("DELETE FROM audit_events WHERE seq >= 12")
            .execute(&s.pool)
            .await
            .expect("truncate");
        let bad = s.verify_audit(None).await.expect("verify");
        assert!(!bad.ok);
        assert!(
            bad.reason
                .as_deref()
                .unwrap_or("")
                .contains("removed from the end"),
            "{bad:?}"
        );

        // Cut the chain and rewrite its head to match, then append anew: the chain verifies
        // on its own, but not against the head anchored before.
        sqlx::query("UPDATE audit_head SET seq = 11, hash = $1 WHERE id = 1")
            .bind(&hash_11)
            .execute(&s.pool)
            .await
            .expect("rewrite head");
        s.append_audit(std::slice::from_ref(&NewEvent {
            event_id: Some("rewritten".into()),
            ..e.clone()
        }))
        .await
        .expect("append after the rewrite");
        assert!(s.verify_audit(None).await.expect("verify").ok);
        let rewritten = s.verify_audit(Some(&head)).await.expect("verify");
        assert!(!rewritten.ok, "{rewritten:?}");
        assert!(
            rewritten
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("anchored #1521"),
            "{rewritten:?}"
        );

        // The head set back over events that are still there.
        let hash_5: String = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = 5")
            .fetch_one(&s.pool)
            .await
            .expect("hash of #5");
        sqlx::query("UPDATE audit_head SET seq = 5, hash = $1 WHERE id = 1")
            .bind(&hash_5)
            .execute(&s.pool)
            .await
            .expect("set the head back");
        let bad = s.verify_audit(None).await.expect("verify");
        assert!(!bad.ok, "{bad:?}");
        assert!(
            bad.reason
                .as_deref()
                .unwrap_or("")
                .contains("past the chain's head #5"),
            "{bad:?}"
        );
    })
    .await;
}

#[test]
fn database_urls_in_messages_hold_no_password() {
    use super::without_password;
    for (url, shown) in [
        ("postgres://u:secret@db:5432/p", "postgres://u@db:5432/p"),
        (
            "postgres://u:p@ss@db/p?sslmode=disable",
            "postgres://u@db/p?sslmode=disable",
        ),
        ("postgres://u@db/p", "postgres://u@db/p"),
        (
            "sqlite:///var/lib/postern/postern.db",
            "sqlite:///var/lib/postern/postern.db",
        ),
    ] {
        assert_eq!(without_password(url), shown, "{url}");
    }
}

#[test]
fn not_found_messages_name_things_the_way_users_type_them() {
    let text = |kind, name: &str, suggestion: Option<&str>| {
        StoreError::NotFound {
            kind,
            name: name.to_owned(),
            suggestion: suggestion.map(str::to_owned),
        }
        .to_string()
    };
    assert_eq!(
        text("target", "pg-prd", Some("pg-prod")),
        "no target named 'pg-prd'; did you mean 'pg-prod'?"
    );
    assert_eq!(text("session", "foo", None), "no session with ID 'foo'");
    assert_eq!(
        text("rule", "#9 in role 'dev'", None),
        "no rule #9 in role 'dev'"
    );
    assert_eq!(
        text("member", "user 'bob' is not a member of group 'ops'", None),
        "user 'bob' is not a member of group 'ops'"
    );
}

#[test]
fn a_typo_in_a_short_name_finds_it() {
    let names: Vec<String> = ["web", "pg", "prod-db", "admin"].map(String::from).to_vec();
    for (typed, meant) in [
        ("wbe", "web"),
        ("gp", "pg"),
        ("prod-bd", "prod-db"),
        ("admn", "admin"),
    ] {
        assert_eq!(closest(typed, &names).as_deref(), Some(meant), "{typed}");
    }
    for far in ["mail", "x", "staging"] {
        assert_eq!(closest(far, &names), None, "{far}");
    }
}
