//! Must show 2: a user with no role is refused with a message naming the missing permission
//! and an audit event records it; a deny rule beats an allow rule; typos get a suggestion.

use reqwest::Method;
use serde_json::json;

use postern_controller::api::types::{AuditEvent, Authorization, Decision};

use crate::harness::{Api, ApiFailure, Cluster};

async fn authorize(api: &Api, target: &str) -> Result<Authorization, ApiFailure> {
    api.authorize(target, None).await.map(|(auth, _)| auth)
}

/// `policy check USER TARGET`, asked by the admin.
async fn decide(c: &Cluster, user: &str, target: &str) -> Decision {
    c.admin
        .ok(
            Method::GET,
            &format!("/v1/policy/check?user={user}&target={target}"),
            None::<&()>,
        )
        .await
}

#[tokio::test]
async fn refusals_are_explained_audited_and_deny_wins() {
    let c = Cluster::start().await.expect("cluster");
    c.create_target("pg-prod", "127.0.0.1:5432", &[("env", "prod")])
        .await;
    c.create_target("pg-staging", "127.0.0.1:5432", &[("env", "staging")])
        .await;
    let bob = c.user("bob").await;

    // No role: refused, naming the permission, and audited.
    let err = authorize(&bob, "pg-prod")
        .await
        .expect_err("bob has no role");
    assert_eq!(err.status, 403);
    assert!(
        err.message
            .contains("missing permission 'connect' on target 'pg-prod'"),
        "unclear refusal: {}",
        err.message
    );
    let events: Vec<AuditEvent> = c
        .admin
        .ok(Method::GET, "/v1/audit?action=session.denied", None::<&()>)
        .await;
    let denial = events
        .iter()
        .find(|e| e.actor == "bob")
        .expect("denial audited");
    assert_eq!(denial.resource, "target:pg-prod");
    assert_eq!(denial.outcome, "denied");

    // Admin-only actions are refused too, with the permission named.
    let err = bob
        .call::<serde_json::Value, _>(Method::POST, "/v1/users", Some(&json!({"name": "eve"})))
        .await
        .expect_err("bob cannot create users");
    assert_eq!(err.status, 403);
    assert!(err.message.contains("'users:write'"), "{}", err.message);

    // An allow rule lets bob in.
    let _: serde_json::Value = c
        .admin
        .ok(Method::POST, "/v1/roles", Some(&json!({"name": "dev"})))
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/dev/rules",
            Some(&json!({"effect": "allow", "actions": ["connect"], "targets": "pg-*"})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/dev/bind",
            Some(&json!({"user": "bob"})),
        )
        .await;
    let granted = authorize(&bob, "pg-prod")
        .await
        .expect("allowed by role dev");
    assert_eq!(granted.target, "pg-prod");

    // A deny rule on env=prod, through a group, beats it; staging stays allowed.
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/groups",
            Some(&json!({"name": "contractors"})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/groups/contractors/members",
            Some(&json!({"user": "bob"})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(Method::POST, "/v1/roles", Some(&json!({"name": "no-prod"})))
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/no-prod/rules",
            Some(&json!({"effect": "deny", "actions": ["connect"], "labels": {"env": "prod"}})),
        )
        .await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/no-prod/bind",
            Some(&json!({"group": "contractors"})),
        )
        .await;
    let err = authorize(&bob, "pg-prod").await.expect_err("deny wins");
    assert_eq!(err.status, 403);
    assert!(
        err.message.contains("denied by role 'no-prod' rule #1"),
        "{}",
        err.message
    );
    authorize(&bob, "pg-staging")
        .await
        .expect("staging still allowed");

    // `policy check` explains both decisions.
    let d = decide(&c, "bob", "pg-prod").await;
    assert!(!d.allowed);
    assert_eq!(
        d.rule.as_deref(),
        Some("role 'no-prod' rule #1 (deny connect [env=prod])")
    );
    let d = decide(&c, "bob", "pg-staging").await;
    assert!(d.allowed, "{}", d.reason);
    assert!(d.reason.contains("role 'dev' rule #1"), "{}", d.reason);

    // A typo gets a suggestion, not a bare 404 (among the targets bob may see: pg-prod,
    // denied to him, is not one).
    let err = authorize(&bob, "pg-stagin")
        .await
        .expect_err("no such target");
    assert_eq!(err.status, 404);
    assert!(
        err.message.contains("did you mean 'pg-staging'"),
        "{}",
        err.message
    );

    // Bad input is refused with a clear message.
    let err = bob
        .call::<serde_json::Value, _>(
            Method::POST,
            "/v1/targets/pg-staging/authorize",
            Some(&json!({"client_spki": "!!!"})),
        )
        .await
        .expect_err("bad key");
    assert_eq!(err.status, 400);
    assert!(err.message.contains("client_spki"), "{}", err.message);
    c.stop().await;
}

/// As deleting or locking yourself is refused, so is taking role management away from
/// yourself: nobody could bind it back. Another admin may do it.
#[tokio::test]
async fn an_admin_cannot_take_role_management_from_themselves() {
    let c = Cluster::start().await.expect("cluster");
    let me = json!({"user": "admin"});
    let err = c
        .admin
        .call::<serde_json::Value, _>(Method::POST, "/v1/roles/admin/unbind", Some(&me))
        .await
        .expect_err("unbinding the caller's own admin role");
    assert_eq!(err.status, 409);
    assert!(err.message.contains("lock you out"), "{}", err.message);
    let err = c
        .admin
        .call::<serde_json::Value, ()>(Method::DELETE, "/v1/roles/admin", None)
        .await
        .expect_err("deleting the caller's own admin role");
    assert_eq!(err.status, 409);
    assert!(err.message.contains("lock you out"), "{}", err.message);
    // Nothing changed: the admin still manages roles.
    let role: serde_json::Value = c
        .admin
        .ok(Method::GET, "/v1/roles/admin", None::<&()>)
        .await;
    assert_eq!(role["bindings"], json!([{"user": "admin"}]), "{role}");

    // A second admin may take the role from the first.
    let carol = c.user("carol").await;
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/admin/bind",
            Some(&json!({"user": "carol"})),
        )
        .await;
    let _: serde_json::Value = carol
        .ok(Method::POST, "/v1/roles/admin/unbind", Some(&me))
        .await;
    let err = c
        .admin
        .call::<serde_json::Value, _>(Method::POST, "/v1/users", Some(&json!({"name": "eve"})))
        .await
        .expect_err("admin is no admin any more");
    assert_eq!(err.status, 403);
    c.stop().await;
}

/// A target's limits are checked as they are set: session lengths from 1 s to a year, a
/// default within the maximum, a connection limit of at least 1 on create (0 on update
/// removes it), each with a clear 400 and nothing stored.
#[tokio::test]
async fn target_limits_are_checked_when_set() {
    let c = Cluster::start().await.expect("cluster");
    let create = |extra: serde_json::Value| {
        let mut body = json!({"name": "t1", "type": "tcp", "address": "127.0.0.1:5432"});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    };
    for (extra, says) in [
        (json!({"max_duration_secs": 0}), "at least 1 s"),
        (
            json!({"max_duration_secs": 14_400_000_000_000_000_u64}),
            "longer than a year",
        ),
        (
            json!({"default_duration_secs": 32_400, "max_duration_secs": 3_600}),
            "longer than the max duration",
        ),
        (json!({"connection_limit": 0}), "at least 1"),
    ] {
        let err = c
            .admin
            .call::<serde_json::Value, _>(Method::POST, "/v1/targets", Some(&create(extra.clone())))
            .await
            .expect_err("refused");
        assert_eq!(err.status, 400, "{extra}: {}", err.message);
        assert!(err.message.contains(says), "{extra}: {}", err.message);
    }
    let err = c
        .admin
        .call::<serde_json::Value, ()>(Method::GET, "/v1/targets/t1", None)
        .await
        .expect_err("nothing was created");
    assert_eq!(err.status, 404);

    let t: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/targets",
            Some(&create(json!({"connection_limit": 2}))),
        )
        .await;
    assert_eq!(t["connection_limit"], 2);
    let err = c
        .admin
        .call::<serde_json::Value, _>(
            Method::PATCH,
            "/v1/targets/t1",
            Some(&json!({"default_duration_secs": 400 * 24 * 3600})),
        )
        .await
        .expect_err("a default longer than the maximum");
    assert_eq!(err.status, 400, "{}", err.message);
    let err = c
        .admin
        .call::<serde_json::Value, _>(Method::PATCH, "/v1/targets/t1", Some(&json!({})))
        .await
        .expect_err("a change of nothing");
    assert_eq!(err.status, 400, "{}", err.message);
    assert!(err.message.contains("nothing to change"), "{}", err.message);
    // A lower maximum alone takes the default down with it; 0 removes the connection limit.
    let t: serde_json::Value = c
        .admin
        .ok(
            Method::PATCH,
            "/v1/targets/t1",
            Some(&json!({"max_duration_secs": 60, "connection_limit": 0})),
        )
        .await;
    assert_eq!(
        (
            t["max_duration_secs"].clone(),
            t["default_duration_secs"].clone()
        ),
        (json!(60), json!(60))
    );
    assert!(t["connection_limit"].is_null(), "{t}");
    c.stop().await;
}

/// "Did you mean" names only targets the caller may see: a user with no role learns no
/// target's name from a typo.
#[tokio::test]
async fn suggestions_name_only_targets_the_caller_may_see() {
    let c = Cluster::start().await.expect("cluster");
    c.create_target("pg-prod", "127.0.0.1:5432", &[]).await;
    let bob = c.user("bob").await;
    for path in ["/v1/targets/pg-prd", "/v1/targets/pg-prd/credential"] {
        let err = bob
            .call::<serde_json::Value, ()>(Method::GET, path, None)
            .await
            .expect_err("no such target");
        assert_eq!(err.status, 404, "{path}");
        assert!(!err.message.contains("pg-prod"), "{path}: {}", err.message);
    }
    let err = authorize(&bob, "pg-prd").await.expect_err("no such target");
    assert_eq!(err.status, 404);
    assert!(!err.message.contains("pg-prod"), "{}", err.message);
    // The admin, who sees it, gets the suggestion.
    let err = c
        .admin
        .call::<serde_json::Value, ()>(Method::GET, "/v1/targets/pg-prd", None)
        .await
        .expect_err("no such target");
    assert!(
        err.message.contains("did you mean 'pg-prod'"),
        "{}",
        err.message
    );
    c.stop().await;
}

/// Passwords can be set after all: an admin resets anyone's (their logins end), a user
/// changes their own with the current one; every refusal is clear and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_reset_by_admins_and_changed_by_their_users() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let c = Cluster::start().await.expect("cluster");
    let bob = c.user("bob").await;
    let old = "pw-bob-long-enough";
    let set = |password: &str, current: Option<&str>| json!({"password": password, "current_password": current});
    for (body, status, says) in [
        (set("new-pw-bob-1", None), 403, "users:write"),
        (
            set("new-pw-bob-1", Some("wrong-one")),
            403,
            "current password is wrong",
        ),
        (set("short", Some(old)), 400, "too short"),
    ] {
        let err = bob
            .call::<serde_json::Value, _>(Method::POST, "/v1/users/bob/password", Some(&body))
            .await
            .expect_err("refused");
        assert_eq!(err.status, status, "{body}: {}", err.message);
        assert!(err.message.contains(says), "{body}: {}", err.message);
    }
    bob.login("bob", old).await.expect("nothing changed yet");
    let _: serde_json::Value = bob
        .ok(
            Method::POST,
            "/v1/users/bob/password",
            Some(&set("new-pw-bob-1", Some(old))),
        )
        .await;
    let _: serde_json::Value = bob.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert!(
        bob.login("bob", old).await.is_err(),
        "the old password is gone"
    );
    bob.login("bob", "new-pw-bob-1")
        .await
        .expect("the new one logs in");

    // An admin's reset, through the CLI: bob's logins end, the new password works.
    let mut child = Command::new(crate::dev_cli::postern_bin())
        .args(["users", "set-password", "bob", "--password-stdin"])
        .env("POSTERN_ADDR", &c.admin.base)
        .env(
            "POSTERN_TOKEN",
            c.admin.token.as_deref().unwrap_or_default(),
        )
        .env("POSTERN_CONFIG_DIR", c.dir.path().join("cli"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("postern users set-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"reset-by-admin-2\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = bob
        .call::<serde_json::Value, ()>(Method::GET, "/v1/whoami", None)
        .await
        .expect_err("bob's token ended with the reset");
    assert_eq!(err.status, 401);
    bob.login("bob", "reset-by-admin-2")
        .await
        .expect("the reset password logs in");
    c.stop().await;
}

/// A client that can use only one type of target (`postern ssh`) says so, and a target of
/// another type is refused before a session is made (it used to leave a pending session).
#[tokio::test]
async fn a_target_of_another_type_is_refused_before_a_session_is_made() {
    use postern_controller::api::types::{AuthorizeRequest, TargetType};

    let c = Cluster::start().await.expect("cluster");
    c.create_target("pg", "127.0.0.1:5432", &[]).await;
    let key = postern_cli::session::new_client_key().expect("client key");
    let mut body = AuthorizeRequest {
        client_spki: key.spki_b64().into(),
        duration_secs: None,
        login: None,
        target_type: Some(TargetType::Ssh),
    };
    let err = c
        .admin
        .call::<serde_json::Value, _>(Method::POST, "/v1/targets/pg/authorize", Some(&body))
        .await
        .expect_err("a tcp target for postern ssh");
    assert_eq!(err.status, 400);
    assert!(
        err.message
            .contains("'pg' is a tcp target, not ssh: use `postern connect pg`"),
        "{}",
        err.message
    );
    let sessions: Vec<serde_json::Value> =
        c.admin.ok(Method::GET, "/v1/sessions", None::<&()>).await;
    assert!(sessions.is_empty(), "{sessions:?}");
    // Asking for the right type (or none) makes one.
    body.target_type = Some(TargetType::Tcp);
    let _: serde_json::Value = c
        .admin
        .ok(Method::POST, "/v1/targets/pg/authorize", Some(&body))
        .await;
    let sessions: Vec<serde_json::Value> =
        c.admin.ok(Method::GET, "/v1/sessions", None::<&()>).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    c.stop().await;
}

/// One rule can be taken out of a role; the rules after it move up, and the policy reads the
/// new numbering. Not the rule that lets the caller manage roles, and not one that is not there.
#[tokio::test]
async fn a_rule_can_be_removed_by_its_number() {
    let c = Cluster::start().await.expect("cluster");
    let _bob = c.user("bob").await;
    let rule =
        |targets: &str| json!({"effect": "allow", "actions": ["connect"], "targets": targets});
    c.role(
        "dev",
        &[rule("a-*"), rule("b-*"), rule("c-*")],
        json!({"user": "bob"}),
    )
    .await;
    let role: serde_json::Value = c
        .admin
        .ok(Method::DELETE, "/v1/roles/dev/rules/2", None::<&()>)
        .await;
    let globs: Vec<&str> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["targets"].as_str())
        .collect();
    assert_eq!(globs, ["a-*", "c-*"]);
    // The policy numbers what is left 1, 2.
    c.create_target("c-1", "127.0.0.1:5432", &[]).await;
    let d = decide(&c, "bob", "c-1").await;
    assert!(d.allowed, "{}", d.reason);
    assert!(d.reason.contains("role 'dev' rule #2"), "{}", d.reason);
    let err = c
        .admin
        .call::<serde_json::Value, ()>(Method::DELETE, "/v1/roles/dev/rules/3", None)
        .await
        .expect_err("there is no third rule now");
    assert_eq!(err.status, 404, "{}", err.message);
    let err = c
        .admin
        .call::<serde_json::Value, ()>(Method::DELETE, "/v1/roles/admin/rules/1", None)
        .await
        .expect_err("the admin's own rule");
    assert_eq!(err.status, 409, "{}", err.message);
    // The same rule twice is refused, naming the one there, whatever the order or repeats
    // of its actions.
    let err = c
        .admin
        .call::<serde_json::Value, _>(Method::POST, "/v1/roles/dev/rules", Some(&rule("c-*")))
        .await
        .expect_err("a rule the role has");
    assert_eq!(err.status, 409, "{}", err.message);
    assert!(err.message.contains("#2"), "{}", err.message);
    let both = |actions: serde_json::Value| json!({"effect": "allow", "actions": actions, "targets": "d-*"});
    let role: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/dev/rules",
            Some(&both(json!(["read", "connect", "connect"]))),
        )
        .await;
    assert_eq!(
        role["rules"][2]["actions"],
        json!(["read", "connect"]),
        "{role}"
    );
    let err = c
        .admin
        .call::<serde_json::Value, _>(
            Method::POST,
            "/v1/roles/dev/rules",
            Some(&both(json!(["connect", "read"]))),
        )
        .await
        .expect_err("the same rule, its actions in another order");
    assert_eq!(err.status, 409, "{}", err.message);
    c.stop().await;
}

/// A deny rule naming a login refuses it even when it is the brokered credential's own user
/// (the login a session gets when the client names none), and ends the sessions already
/// running as it; a rule scoping admin actions to targets, which could never apply, is
/// refused.
#[tokio::test]
async fn a_denied_login_is_refused_and_cut_even_as_the_credentials_own_user() {
    let c = Cluster::start().await.expect("cluster");
    c.create_target_from(json!({"name": "pg1", "type": "postgres", "address": "127.0.0.1:5432"}))
        .await;
    let _: serde_json::Value = c
        .admin
        .call(
            Method::PUT,
            "/v1/targets/pg1/credential",
            Some(&json!({"kind": "password", "username": "postgres", "secret": "x"})),
        )
        .await
        .expect("credential");
    // A credential the target's protocol cannot use is refused when set, not at first use.
    c.create_target("plain", "127.0.0.1:5432", &[]).await;
    for (path, body, says) in [
        (
            "/v1/targets/pg1/credential",
            json!({"kind": "ssh_key", "username": "u", "secret": "-----BEGIN OPENSSH PRIVATE KEY-----"}),
            "a postgres target, which takes a password",
        ),
        (
            "/v1/targets/plain/credential",
            json!({"kind": "password", "username": "u", "secret": "x"}),
            "a tcp target, which takes no credential",
        ),
    ] {
        let err = c
            .admin
            .call::<serde_json::Value, _>(Method::PUT, path, Some(&body))
            .await
            .expect_err("a credential the target cannot use");
        assert_eq!(err.status, 400, "{}", err.message);
        assert!(err.message.contains(says), "{}", err.message);
    }
    let bob = c.user("bob").await;
    c.role(
        "dev",
        &[json!({"effect": "allow", "actions": ["connect"], "targets": "pg*", "logins": ["app_ro"]})],
        json!({"user": "bob"}),
    )
    .await;
    // As the credential's own user (no login named): allowed, and the session says so.
    let auth = authorize(&bob, "pg1")
        .await
        .expect("the credential's own login");
    let session: serde_json::Value = c.admin.session(&auth.session_id).await;
    assert_eq!(session["login"], "postgres", "{session}");

    // A deny naming that login: the running session ends, a new one is refused.
    let _: serde_json::Value = c
        .admin
        .ok(
            Method::POST,
            "/v1/roles/dev/rules",
            Some(&json!({"effect": "deny", "actions": ["connect"], "targets": "pg1", "logins": ["postgres"]})),
        )
        .await;
    let session: serde_json::Value = c.admin.session(&auth.session_id).await;
    assert_eq!(session["status"], "terminated", "{session}");
    assert_eq!(session["end_reason"], "policy changed", "{session}");
    let err = authorize(&bob, "pg1").await.expect_err("denied by login");
    assert_eq!(err.status, 403);
    assert!(
        err.message
            .contains("connect as 'postgres' on target 'pg1' is denied by role 'dev' rule #2"),
        "{}",
        err.message
    );
    // The login the allow rule names still works.
    bob.authorize("pg1", Some("app_ro"))
        .await
        .expect("app_ro is not denied");
    // policy check answers the same, for the credential's login and a named one.
    let d = decide(&c, "bob", "pg1").await;
    assert!(!d.allowed, "{}", d.reason);
    assert!(d.reason.contains("connect as 'postgres'"), "{}", d.reason);
    let d: Decision = c
        .admin
        .ok(
            Method::GET,
            "/v1/policy/check?user=bob&target=pg1&login=app_ro",
            None::<&()>,
        )
        .await;
    assert!(d.allowed, "{}", d.reason);

    // Admin actions scoped to targets would never apply: refused.
    let err = c
        .admin
        .call::<serde_json::Value, _>(
            Method::POST,
            "/v1/roles/dev/rules",
            Some(&json!({"effect": "deny", "actions": ["sessions:cancel"], "targets": "pg1"})),
        )
        .await
        .expect_err("a target-scoped admin action");
    assert_eq!(err.status, 400);
    assert!(
        err.message.contains("sessions:cancel concern no target"),
        "{}",
        err.message
    );
    c.stop().await;
}

/// A user who may not see others' sessions gets the same answer for another user's session
/// id as for one that does not exist (the refusal is still audited).
#[tokio::test]
async fn others_session_ids_are_not_disclosed() {
    let c = Cluster::start().await.expect("cluster");
    c.create_target("pg", "127.0.0.1:5432", &[]).await;
    let (auth, _) = c
        .admin
        .authorize("pg", None)
        .await
        .expect("admin's session");
    let bob = c.user("bob").await;
    let mut answers = Vec::new();
    for id in [auth.session_id.as_str(), "s_doesnotexist"] {
        for (method, path) in [
            (Method::GET, format!("/v1/sessions/{id}")),
            (Method::POST, format!("/v1/sessions/{id}/cancel")),
        ] {
            let err = bob
                .call::<serde_json::Value, ()>(method, &path, None)
                .await
                .expect_err("not bob's");
            answers.push((err.status, err.message.replace(id, "ID")));
        }
    }
    assert_eq!(answers[0..2], answers[2..4], "{answers:?}");
    assert_eq!(answers[0].0, 404);
    let session: serde_json::Value = c.admin.session(&auth.session_id).await;
    assert_ne!(session["status"], "terminated", "bob's cancel did nothing");
    c.stop().await;
}

/// Password guessing: after a few failures for one name, each attempt for that name must
/// wait (twice as long after each further failure), even with the right password; other
/// names are not held up, and a login after the wait starts the count afresh.
#[tokio::test]
async fn repeated_failed_logins_make_that_name_wait() {
    let c = Cluster::start().await.expect("cluster");
    let _alice = c.user("alice").await;
    let anon = Api::new(&c.admin.base);
    let wrong = |i: u32| format!("wrong-password-{i}");
    for i in 1..=5 {
        let e = anon.login("alice", &wrong(i)).await.err().expect("refused");
        let e = e.to_string();
        assert!(e.contains("invalid user name or password"), "{e}");
        assert_eq!(e.contains("must wait 1 s"), i == 5, "attempt {i}: {e}");
    }
    // The right password now waits too: nothing is checked until the wait is over.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/auth/login", c.admin.base))
        .json(&json!({"user": "alice", "password": "pw-alice-long-enough"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        body["message"],
        "too many failed logins for 'alice': try again in 1 s"
    );
    // Other users log in as usual.
    c.user("bob").await;
    // After the wait the right password works, and the count starts again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    anon.login("alice", "pw-alice-long-enough")
        .await
        .expect("logs in after the wait");
    let e = anon.login("alice", &wrong(6)).await.err().expect("refused");
    assert!(!e.to_string().contains("wait"), "{e}");

    let events: Vec<AuditEvent> = c
        .admin
        .ok(
            Method::GET,
            "/v1/audit?action=auth.login_failed",
            None::<&()>,
        )
        .await;
    let waits: Vec<_> = events
        .iter()
        .filter(|e| e.actor == "alice")
        .map(|e| e.details["wait_secs"].clone())
        .collect();
    assert_eq!(waits.len(), 6, "{events:#?}");
    assert_eq!(
        waits.iter().filter(|w| **w == json!(1)).count(),
        1,
        "{waits:?}"
    );
    // Guesses sent at once are held as if sent one after another.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..30 {
        let anon = anon.clone();
        burst.spawn(async move {
            anon.login("bob", &format!("guess-{i}"))
                .await
                .err()
                .map(|e| e.to_string())
        });
    }
    let answers = burst.join_all().await;
    let checked = answers
        .iter()
        .flatten()
        .filter(|e| e.contains("invalid user name or password"))
        .count();
    let held = answers
        .iter()
        .flatten()
        .filter(|e| e.contains("too many failed logins"))
        .count();
    assert_eq!((checked, held), (5, 25), "{answers:#?}");
    c.stop().await;
}
