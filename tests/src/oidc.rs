//! Issue 4: OpenID Connect login against a real provider (`oidc-provider`, see [`crate::idp`]).
//! Code flow (PKCE, state, nonce) and device flow; groups from the IdP grant access through a
//! role bound to a group, and a group removed at the IdP takes that access away at the next
//! login (open sessions included); every refusal is explained and audited; a provider that
//! restarts with a new signing key still logs people in.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use postern_cli::session::open_session;
use postern_controller::api::types::{
    AuditEvent, AuthMethods, Authorization, LoginResponse, OidcAttempt, OidcDeviceStart, OidcStart,
    WhoAmI,
};
use postern_controller::oidc::OidcConfig;

use crate::harness::{echo_server, free_addrs, Api, ApiFailure, Cluster, ClusterOptions, Traffic};
use crate::idp::{idp_login, login_and_consent, Browser, Idp, CLIENT_ID, CLIENT_SECRET};

mod cli;

/// A cluster whose controller has one OIDC method, `corp`, on a fresh provider.
struct Sso {
    c: Cluster,
    idp: Idp,
    anon: Api,
}

async fn sso(tweak: impl Fn(&mut OidcConfig)) -> Sso {
    // The API's address goes into the redirect URL the provider is started with, so it is
    // picked before the controller binds it; another test may take the port meanwhile (the
    // provider takes ~1 s to start): then everything starts again on new ports.
    for attempt in 1.. {
        let addrs = free_addrs();
        let redirect = format!("http://{}/v1/auth/oidc/callback", addrs.0);
        let idp = Idp::start(&redirect).await.expect("OpenID provider");
        let mut m = OidcConfig::new("corp", &idp.issuer, CLIENT_ID, Some(CLIENT_SECRET));
        m.scopes = vec!["email".into(), "groups".into()];
        m.required_claims
            .insert("email_verified".into(), json!(true));
        m.allowed_domains = vec!["example.com".into()];
        m.device_poll_interval = Some(Duration::from_secs(1));
        m.device_flow = true;
        tweak(&mut m);
        let started = Cluster::start_with(ClusterOptions {
            addrs: Some(addrs),
            oidc: vec![m],
            ..Default::default()
        })
        .await;
        match started {
            Ok(c) => {
                let anon = Api::new(&c.admin.base);
                return Sso { c, idp, anon };
            }
            Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                eprintln!("port taken meanwhile ({e:#}); starting again");
            }
            Err(e) => panic!("cluster: {e:?}"),
        }
    }
    unreachable!("the loop returns or panics")
}

impl Sso {
    async fn start(&self) -> OidcStart {
        self.anon
            .ok(
                Method::POST,
                "/v1/auth/oidc/start",
                Some(&json!({"method": "corp"})),
            )
            .await
    }

    /// A whole code-flow login; `Err` is the attempt's failure message.
    async fn login(&self, login: &str, password: &str) -> Result<Api, String> {
        let s = self.start().await;
        let page = idp_login(&s.auth_url, login, password)
            .await
            .expect("the browser side runs");
        let code = page_code(&page);
        let outcome = wait(&self.anon, &s.attempt_id, code.as_deref()).await;
        match outcome {
            Ok(r) => {
                assert_eq!(page.status, 200, "callback page: {}", page.body);
                assert!(
                    page.body.contains("never give it to anyone"),
                    "{}",
                    page.body
                );
                Ok(self.api_for(&r))
            }
            Err(message) => {
                assert_eq!(page.status, 400, "callback page: {}", page.body);
                Err(message)
            }
        }
    }

    fn api_for(&self, r: &LoginResponse) -> Api {
        let mut api = Api::new(&self.anon.base);
        api.token = Some(r.token.clone());
        api
    }

    async fn failures(&self) -> Vec<AuditEvent> {
        self.c
            .admin
            .ok(
                Method::GET,
                "/v1/audit?action=auth.login_failed",
                None::<&()>,
            )
            .await
    }

    /// Finds an `auth.login_failed` event that says `reason_part`, by `actor`, about the
    /// method `corp` (or an unknown one when the callback matched no attempt).
    async fn assert_failure_audited(&self, actor: &str, reason_part: &str) {
        let events = self.failures().await;
        let e = events
            .iter()
            .rev()
            .find(|e| {
                e.details["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(reason_part))
            })
            .unwrap_or_else(|| panic!("no auth.login_failed saying '{reason_part}': {events:#?}"));
        assert_eq!(e.actor, actor);
        assert_eq!(e.outcome, "failure");
        assert_eq!(e.details["method"], "oidc");
        let provider = if reason_part.contains("matches no login attempt") {
            "unknown"
        } else {
            "corp"
        };
        assert_eq!(e.details["provider"], provider);
    }
}

/// The confirmation code a callback page shows, if it shows one.
fn page_code(page: &crate::idp::Page) -> Option<String> {
    let (_, rest) = page.body.split_once("id=\"confirmation-code\">")?;
    Some(rest.split('<').next()?.to_owned())
}

/// Presents a confirmation code for an attempt: the token, or the API's refusal.
async fn confirm(api: &Api, attempt: &str, code: &str) -> Result<OidcAttempt, ApiFailure> {
    api.call(
        Method::POST,
        &format!("/v1/auth/oidc/attempts/{attempt}"),
        Some(&json!({ "code": code })),
    )
    .await
}

/// Polls an attempt until it is no longer pending (≤ 20 s); one waiting for its confirmation
/// code gets `code`.
async fn wait(api: &Api, attempt: &str, code: Option<&str>) -> Result<LoginResponse, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a: OidcAttempt = api
            .ok(
                Method::GET,
                &format!("/v1/auth/oidc/attempts/{attempt}"),
                None::<&()>,
            )
            .await;
        match a {
            OidcAttempt::Done(r) => return Ok(r),
            OidcAttempt::Failed { message } => return Err(message),
            OidcAttempt::Confirm { .. } => {
                let code = code.expect("a code-flow login waits for its confirmation code");
                return match confirm(api, attempt, code).await {
                    Ok(OidcAttempt::Done(r)) => Ok(r),
                    Ok(OidcAttempt::Failed { message }) => Err(message),
                    other => panic!("confirmation answered {other:?}"),
                };
            }
            OidcAttempt::Pending { .. } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            OidcAttempt::Pending { .. } => panic!("attempt {attempt} still pending after 20 s"),
        }
    }
}

async fn authorize(
    api: &Api,
    target: &str,
) -> Result<(Authorization, postern_cli::session::ClientKey), ApiFailure> {
    api.authorize(target, None).await
}

/// Target `echo` and role `eng` (connect to anything) bound to group `engineering`.
async fn engineering_role(c: &Cluster) {
    c.create_target("echo", &echo_server().await.to_string(), &[])
        .await;
    for (path, body) in [
        ("/v1/groups", json!({"name": "engineering"})),
        ("/v1/roles", json!({"name": "eng"})),
        (
            "/v1/roles/eng/rules",
            json!({"effect": "allow", "actions": ["connect"]}),
        ),
        ("/v1/roles/eng/bind", json!({"group": "engineering"})),
    ] {
        let _: serde_json::Value = c.admin.ok(Method::POST, path, Some(&body)).await;
    }
}

#[tokio::test]
async fn oidc_code_flow_maps_groups_to_roles() {
    let s = sso(|_| {}).await;
    engineering_role(&s.c).await;

    let methods: AuthMethods = s
        .anon
        .ok(Method::GET, "/v1/auth/methods", None::<&()>)
        .await;
    let names: Vec<&str> = methods.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["password", "corp"]);

    // The authorization URL carries PKCE S256, state and nonce.
    let start = s.start().await;
    for part in [
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "scope=openid",
    ] {
        assert!(
            start.auth_url.contains(part),
            "{part} missing: {}",
            start.auth_url
        );
    }

    // Alice (group engineering at the IdP) logs in: created just in time, in her group,
    // and the role bound to the group lets her connect.
    let alice = s
        .login("alice", "alice-password")
        .await
        .expect("alice logs in");
    let me: WhoAmI = alice.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.user, "alice@example.com");
    assert_eq!(me.groups, ["engineering"]);
    assert_eq!(me.roles, ["eng"]);
    let (auth, key) = authorize(&alice, "echo").await.expect("alice may connect");
    let session = open_session(&auth, &key).await.expect("session opens");
    let (local, _) = session.listen(0).await.expect("listen");
    let mut traffic = Traffic::start(local).await;
    assert!(traffic.alive());

    let events: Vec<AuditEvent> =
        s.c.admin
            .ok(Method::GET, "/v1/audit?action=auth.login", None::<&()>)
            .await;
    let login = events
        .iter()
        .find(|e| e.actor == "alice@example.com")
        .expect("login audited");
    assert_eq!(login.details["method"], "oidc");
    assert_eq!(login.details["flow"], "code");
    assert_eq!(login.details["created"], true);

    // Bob (group sales) logs in too, but no role lets him connect.
    let bob = s.login("bob", "bob-password").await.expect("bob logs in");
    let err = authorize(&bob, "echo")
        .await
        .expect_err("bob is not in engineering");
    assert_eq!(err.status, 403, "{}", err.message);
    let me: WhoAmI = bob.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.groups, ["sales"]);
}

#[tokio::test]
async fn oidc_group_removed_at_idp_revokes_access_at_next_login() {
    let s = sso(|_| {}).await;
    engineering_role(&s.c).await;
    // A membership an admin gives by hand is not the IdP's to take away.
    let _: serde_json::Value =
        s.c.admin
            .ok(
                Method::POST,
                "/v1/groups",
                Some(&json!({"name": "local-only"})),
            )
            .await;

    let alice = s.login("alice", "alice-password").await.expect("login");
    let _: serde_json::Value =
        s.c.admin
            .ok(
                Method::POST,
                "/v1/groups/local-only/members",
                Some(&json!({"user": "alice@example.com"})),
            )
            .await;
    let (auth, key) = authorize(&alice, "echo").await.expect("allowed");
    let session = open_session(&auth, &key).await.expect("session");
    let (local, _) = session.listen(0).await.expect("listen");
    let traffic = Traffic::start(local).await;

    // The IdP drops her from engineering; her next login syncs that, and her open session
    // (which only that group allowed) is cut at once.
    s.idp
        .update_account("alice", json!({"groups": []}))
        .await
        .expect("IdP admin");
    let alice = s
        .login("alice", "alice-password")
        .await
        .expect("login again");
    assert!(
        traffic.wait_cut(Duration::from_secs(5)).await.is_some(),
        "the open session survived the group's removal"
    );
    let me: WhoAmI = alice.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.groups, ["local-only"]);
    let err = authorize(&alice, "echo")
        .await
        .expect_err("no longer allowed");
    assert_eq!(err.status, 403);
    let events: Vec<AuditEvent> =
        s.c.admin
            .ok(Method::GET, "/v1/audit?action=auth.login", None::<&()>)
            .await;
    let last = events
        .iter()
        .rev()
        .find(|e| e.actor == "alice@example.com")
        .expect("audited");
    assert_eq!(last.details["groups_removed"], json!(["engineering"]));
    // The group itself stays (others may be in it, roles are bound to it).
    let groups: Vec<serde_json::Value> = s.c.admin.ok(Method::GET, "/v1/groups", None::<&()>).await;
    assert!(groups.iter().any(|g| g["name"] == "engineering"));
}

#[tokio::test]
async fn oidc_device_flow_logs_in_headlessly() {
    let s = sso(|_| {}).await;
    let d: OidcDeviceStart = s
        .anon
        .ok(
            Method::POST,
            "/v1/auth/oidc/device",
            Some(&json!({"method": "corp"})),
        )
        .await;
    assert!(!d.user_code.is_empty());
    assert!(
        d.verification_uri.starts_with(&s.idp.issuer),
        "{}",
        d.verification_uri
    );
    let pending: OidcAttempt = s
        .anon
        .ok(
            Method::GET,
            &format!("/v1/auth/oidc/attempts/{}", d.attempt_id),
            None::<&()>,
        )
        .await;
    assert!(matches!(pending, OidcAttempt::Pending { .. }));

    // Another device with a browser: enter the code, confirm, log in, consent.
    let mut b = Browser::new();
    let page = b
        .open(&format!("{}?user_code={}", d.verification_uri, d.user_code))
        .await
        .expect("verification page");
    let page = b.submit(&page, &[]).await.expect("code submitted");
    assert!(page.body.contains("Confirm"), "{}", page.body);
    let page = b.submit(&page, &[]).await.expect("confirmed");
    let page = login_and_consent(&mut b, page, "alice", "alice-password")
        .await
        .expect("login at the IdP");
    assert!(page.body.contains("Sign-in Success"), "{}", page.body);

    let r = wait(&s.anon, &d.attempt_id, None)
        .await
        .expect("device login done");
    assert_eq!(r.user, "alice@example.com");
    let me: WhoAmI = s
        .api_for(&r)
        .ok(Method::GET, "/v1/whoami", None::<&()>)
        .await;
    assert_eq!(me.groups, ["engineering"]);
    // The token is handed out once.
    let again = wait(&s.anon, &d.attempt_id, None)
        .await
        .expect_err("collected");
    assert!(again.contains("already handed out"), "{again}");
}

#[tokio::test]
async fn oidc_refusals_are_explained_and_audited() {
    let s = sso(|_| {}).await;

    // Wrong password at the IdP.
    let err = s
        .login("alice", "wrong")
        .await
        .err()
        .expect("wrong password");
    assert!(err.contains("invalid user name or password"), "{err}");
    s.assert_failure_audited("anonymous", "invalid user name or password")
        .await;

    // A required claim missing (carol's e-mail is not verified).
    let err = s
        .login("carol", "carol-password")
        .await
        .err()
        .expect("unverified");
    assert!(
        err.contains("'email_verified' must be true but is false"),
        "{err}"
    );
    s.assert_failure_audited("carol@example.com", "email_verified")
        .await;

    // Outside the allowed domains.
    let err = s
        .login("mallory", "mallory-password")
        .await
        .err()
        .expect("domain");
    assert!(err.contains("not in an allowed domain"), "{err}");
    s.assert_failure_audited("mallory@evil.test", "allowed domain")
        .await;

    // An ID token from another issuer (validly signed by the IdP's key).
    s.idp.tamper_next_id_token("issuer").await.expect("tamper");
    let err = s
        .login("alice", "alice-password")
        .await
        .err()
        .expect("issuer");
    assert!(
        err.contains("ID token was rejected") && err.contains("issuer"),
        "{err}"
    );
    s.assert_failure_audited("anonymous", "issuer").await;

    // An ID token with a bad signature.
    s.idp
        .tamper_next_id_token("signature")
        .await
        .expect("tamper");
    let err = s
        .login("alice", "alice-password")
        .await
        .err()
        .expect("signature");
    assert!(err.contains("bad signature"), "{err}");
    s.assert_failure_audited("anonymous", "bad signature").await;

    // An answer without the `iss` this IdP always sends (RFC 9207): not its own.
    refused_callback(
        &s,
        |k, v| (k != "iss").then(|| v.to_owned()),
        "does not name its issuer",
    )
    .await;
    // A tampered state: the callback matches no attempt.
    let (start, callback) = refused_callback(
        &s,
        |k, v| {
            Some(if k == "state" {
                format!("{v}x")
            } else {
                v.to_owned()
            })
        },
        "matches no login attempt",
    )
    .await;

    // The genuine callback still works once; replayed, it is refused.
    let page = Browser::new()
        .open(callback.as_str())
        .await
        .expect("callback");
    assert_eq!(page.status, 200, "{}", page.body);
    wait(&s.anon, &start.attempt_id, page_code(&page).as_deref())
        .await
        .expect("logged in");
    let page = Browser::new()
        .open(callback.as_str())
        .await
        .expect("replay");
    assert_eq!(page.status, 400);
    assert!(page.body.contains("accepted only once"), "{}", page.body);
    s.assert_failure_audited("anonymous", "accepted only once")
        .await;

    // A login that succeeded is audited as such, after all those failures.
    let events: Vec<AuditEvent> =
        s.c.admin
            .ok(Method::GET, "/v1/audit?action=auth.login", None::<&()>)
            .await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.actor == "alice@example.com")
            .count(),
        1
    );
}

/// Logs alice in up to the callback, opens the callback with its query edited (`edit` gives
/// each parameter's new value, `None` drops it), and checks that it is refused saying `says`,
/// and audited. Returns the attempt and its genuine callback, unvisited.
async fn refused_callback(
    s: &Sso,
    edit: impl Fn(&str, &str) -> Option<String>,
    says: &str,
) -> (OidcStart, reqwest::Url) {
    let start = s.start().await;
    let callback = login_until_callback(s, &start).await;
    let pairs: Vec<(String, String)> = callback
        .query_pairs()
        .filter_map(|(k, v)| edit(&k, &v).map(|v| (k.into_owned(), v)))
        .collect();
    let mut edited = callback.clone();
    edited.query_pairs_mut().clear().extend_pairs(&pairs);
    assert_ne!(edited, callback, "the edit changes the callback");
    let page = Browser::new()
        .open(edited.as_str())
        .await
        .expect("callback");
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.contains(says), "{}", page.body);
    s.assert_failure_audited("anonymous", says).await;
    (start, callback)
}

/// Logs alice in at the IdP and returns the callback URL the IdP redirects to, unvisited.
async fn login_until_callback(s: &Sso, start: &OidcStart) -> reqwest::Url {
    let mut b = Browser::new();
    let page = b.open(&start.auth_url).await.expect("login page");
    let consent = b
        .submit(&page, &[("login", "alice"), ("password", "alice-password")])
        .await
        .expect("login");
    assert!(
        consent.body.contains("<h1>Authorize</h1>"),
        "{}",
        consent.body
    );
    let base = s.anon.base.clone();
    b.submit_until(&consent, &[], |u| u.as_str().starts_with(&base))
        .await
        .expect("consent")
}

#[tokio::test]
async fn oidc_login_survives_idp_key_rotation() {
    let mut s = sso(|_| {}).await;
    s.login("alice", "alice-password")
        .await
        .expect("first login");
    let before = s.idp.key_ids().await.expect("jwks");
    s.idp.restart().await.expect("restart the provider");
    let after = s.idp.key_ids().await.expect("jwks");
    assert_ne!(before, after, "the restarted provider signs with a new key");
    // The controller still holds the old JWKS; the unknown key id makes it fetch the new one.
    let alice = s
        .login("alice", "alice-password")
        .await
        .expect("login after rotation");
    let me: WhoAmI = alice.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.user, "alice@example.com");
}

/// Someone who starts a login and sends the link to a victim (whose browser is signed in at
/// the IdP, so the IdP answers at once) does not get the victim's token: it goes only to
/// whoever has the confirmation code the victim's browser received, and guessing cancels the
/// login. With `return_port`, the browser is sent to that port on its own machine.
#[tokio::test]
async fn a_login_link_sent_to_someone_else_gives_the_sender_nothing() {
    let s = sso(|_| {}).await;
    // The victim is signed in at the IdP (an earlier login in this browser).
    let mut victim = Browser::new();
    let first = s.start().await;
    let page = victim.open(&first.auth_url).await.expect("login page");
    let page = login_and_consent(&mut victim, page, "alice", "alice-password")
        .await
        .expect("login");
    wait(&s.anon, &first.attempt_id, page_code(&page).as_deref())
        .await
        .expect("alice's own login");

    let logins = || async {
        let events: Vec<AuditEvent> =
            s.c.admin
                .ok(Method::GET, "/v1/audit?action=auth.login", None::<&()>)
                .await;
        events
            .iter()
            .filter(|e| e.actor == "alice@example.com")
            .count()
    };
    let before = logins().await;

    // The attacker's attempt, opened by the victim's browser: no form, straight back.
    let attack = s.start().await;
    let page = victim.open(&attack.auth_url).await.expect("link opened");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page_code(&page).is_some(), "{}", page.body);
    let polled: OidcAttempt = s
        .anon
        .ok(
            Method::GET,
            &format!("/v1/auth/oidc/attempts/{}", attack.attempt_id),
            None::<&()>,
        )
        .await;
    assert!(matches!(polled, OidcAttempt::Confirm { .. }), "{polled:?}");
    for left in ["2 more tries", "1 more try"] {
        let e = confirm(&s.anon, &attack.attempt_id, "AAAA-AAAA")
            .await
            .expect_err("a wrong code");
        assert_eq!(e.status, 400);
        assert!(e.message.contains(left), "{}", e.message);
    }
    let last = confirm(&s.anon, &attack.attempt_id, "AAAA-AAAA").await;
    assert!(
        matches!(&last, Ok(OidcAttempt::Failed { message }) if message.contains("too many wrong")),
        "{last:?}"
    );
    // The right code is no good now either.
    let late = confirm(
        &s.anon,
        &attack.attempt_id,
        &page_code(&page).unwrap_or_default(),
    )
    .await;
    assert!(matches!(&late, Ok(OidcAttempt::Failed { .. })), "{late:?}");
    s.assert_failure_audited("alice@example.com", "too many wrong")
        .await;
    // No token was made for it: no login of alice's but her own.
    assert_eq!(logins().await, before);

    // With a return port, the browser goes to that port of its own machine with the code.
    let back: OidcStart = s
        .anon
        .ok(
            Method::POST,
            "/v1/auth/oidc/start",
            Some(&json!({"method": "corp", "return_port": 9})),
        )
        .await;
    let to = victim
        .open_until(&back.auth_url, |u| u.port() == Some(9))
        .await
        .expect("sent back");
    assert_eq!(to.host_str(), Some("127.0.0.1"));
    assert_eq!(to.path(), "/postern-login");
    let code = to
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("code");
    let r = wait(&s.anon, &back.attempt_id, Some(&code.to_lowercase()))
        .await
        .expect("the code from the return collects the token");
    assert_eq!(r.user, "alice@example.com");
}

/// An e-mail address that moves to another IdP account: the new account cannot take over the
/// user linked to the old one, and once an admin deletes that user (its links go with it), the
/// old account no longer gets into a user later made under the same name.
#[tokio::test]
async fn a_deleted_users_identity_does_not_come_back_into_a_new_user_of_the_name() {
    let s = sso(|_| {}).await;
    s.login("alice", "alice-password").await.expect("alice");
    s.idp
        .update_account("alice", json!({"email": "alice.old@example.com"}))
        .await
        .expect("alice's address changes");
    s.idp
        .update_account(
            "alice2",
            json!({"password": "alice2-password", "email": "alice@example.com",
                   "email_verified": true, "groups": []}),
        )
        .await
        .expect("a new account gets it");
    let err = s
        .login("alice2", "alice2-password")
        .await
        .err()
        .expect("the name is someone else's");
    assert!(
        err.contains("linked to another single sign-on account"),
        "{err}"
    );

    let _: serde_json::Value =
        s.c.admin
            .ok(Method::DELETE, "/v1/users/alice@example.com", None::<&()>)
            .await;
    let alice2 = s
        .login("alice2", "alice2-password")
        .await
        .expect("the name is free");
    let me: WhoAmI = alice2.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.user, "alice@example.com");
    let old = s
        .login("alice", "alice-password")
        .await
        .expect("the old account logs in");
    let me: WhoAmI = old.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.user, "alice.old@example.com", "not into alice2's user");
}

/// Memberships an IdP's groups claim made are shown as such, and an admin who adds one by
/// hand keeps it: the next login's sync no longer removes it.
#[tokio::test]
async fn an_idp_membership_is_shown_and_can_be_kept_by_hand() {
    let s = sso(|_| {}).await;
    s.login("alice", "alice-password").await.expect("alice");
    let user: postern_controller::api::types::User =
        s.c.admin
            .ok(Method::GET, "/v1/users/alice@example.com", None::<&()>)
            .await;
    assert_eq!(user.groups, ["engineering"]);
    assert_eq!(user.idp_groups, ["engineering"]);
    let group: postern_controller::api::types::Group =
        s.c.admin
            .ok(
                Method::POST,
                "/v1/groups/engineering/members",
                Some(&json!({"user": "alice@example.com"})),
            )
            .await;
    assert_eq!(group.members, ["alice@example.com"]);
    assert!(group.idp_members.is_empty(), "{group:?}");

    s.idp
        .update_account("alice", json!({"groups": []}))
        .await
        .expect("groups removed at the IdP");
    let alice = s
        .login("alice", "alice-password")
        .await
        .expect("alice again");
    let me: WhoAmI = alice.ok(Method::GET, "/v1/whoami", None::<&()>).await;
    assert_eq!(me.groups, ["engineering"], "kept by hand");
}

/// Anyone may start a login, and each start is stored until an hour after it expires: past
/// 50,000 open attempts, starts are refused (503) until some expire.
#[tokio::test]
async fn a_flood_of_login_starts_is_bounded() {
    let s = sso(|_| {}).await;
    // 50,000 open attempts, put straight into the store (as many starts take minutes).
    let url = format!("sqlite://{}", s.c.dir.path().join("postern.db").display());
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("the controller's database");
    let t = postern_proto::unix_now();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) \
         INSERT INTO oidc_attempts (id, method, flow, status, created_at, expires_at) \
         SELECT 'flood' || i, 'corp', 'code', 'pending', $1, $2 FROM n",
    )
    .bind(t)
    .bind(t + 300)
    .execute(&mut conn)
    .await
    .expect("insert");
    let refused = s
        .anon
        .call::<serde_json::Value, _>(
            Method::POST,
            "/v1/auth/oidc/start",
            Some(&json!({"method": "corp"})),
        )
        .await
        .expect_err("refused");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused
            .message
            .contains("too many single sign-on logins are in progress"),
        "{refused:?}"
    );
    // As they expire, logins start again.
    sqlx::query(
        "UPDATE oidc_attempts SET expires_at = $1 WHERE id LIKE 'flood%' AND id <> 'flood1'",
    )
    .bind(t - 1)
    .execute(&mut conn)
    .await
    .expect("expire");
    let started = s.start().await;
    assert!(started.auth_url.starts_with(&s.idp.issuer), "{started:?}");
    s.c.stop().await;
}
