//! OIDC store tests, on SQLite and PostgreSQL.

use super::*;
use crate::store::tests::on_both;

fn attempt<'a>(id: &'a str, state_hash: &'a str, expires_at: i64) -> NewAttempt<'a> {
    NewAttempt {
        id,
        method: "corp",
        flow: "code",
        state_hash: Some(state_hash),
        nonce: Some("n"),
        pkce_verifier: Some("v"),
        return_port: None,
        expires_at,
    }
}

#[tokio::test]
async fn attempts_are_claimed_once_and_collected_once() {
    on_both(|s| async move {
        let t = now();
        s.insert_oidc_attempt(&attempt("a1", "h1", t + 300))
            .await
            .expect("insert");
        s.insert_oidc_attempt(&attempt("a2", "h2", t - 1))
            .await
            .expect("insert expired");
        assert_eq!(
            s.unexpired_oidc_attempts().await.expect("count"),
            1,
            "only what has not expired counts"
        );
        let a = s
            .oidc_attempt_by_state("h1")
            .await
            .expect("q")
            .expect("found");
        assert_eq!((a.id.as_str(), a.status.as_str()), ("a1", "pending"));
        assert_eq!(
            s.claim_oidc_attempt("a1").await.expect("claim"),
            Claim::Claimed
        );
        assert_eq!(
            s.claim_oidc_attempt("a1").await.expect("claim"),
            Claim::AlreadyUsed
        );
        assert_eq!(
            s.claim_oidc_attempt("a2").await.expect("claim"),
            Claim::Expired
        );
        assert!(s
            .complete_oidc_attempt("a1", "alice", "sealed", t + 3600)
            .await
            .expect("complete"));
        let done = s.collect_oidc_attempt("a1").await.expect("collect");
        assert_eq!(done.and_then(|r| r.token_sealed).as_deref(), Some("sealed"));
        assert!(s.collect_oidc_attempt("a1").await.expect("again").is_none());
        let row = s.oidc_attempt("a1").await.expect("q").expect("row");
        assert_eq!(row.status, "collected");
        assert!(row.token_sealed.is_none() && row.pkce_verifier.is_none());
        assert!(s.fail_oidc_attempt("a2", "expired").await.expect("fail"));
        assert!(!s.fail_oidc_attempt("a2", "again").await.expect("fail"));
        // A failed attempt gets no token.
        assert!(!s
            .complete_oidc_attempt("a2", "alice", "sealed", t + 3600)
            .await
            .expect("complete"));
    })
    .await;
}

#[tokio::test]
async fn a_code_flow_login_waits_for_its_confirmation_code() {
    on_both(|s| async move {
        let t = now();
        for (id, hash, expires) in [
            ("c1", "hc1", t + 300),
            ("c2", "hc2", t + 300),
            ("c3", "hc3", t - 1),
        ] {
            s.insert_oidc_attempt(&attempt(id, hash, expires))
                .await
                .expect("insert");
            assert!(s
                .verify_oidc_attempt(id, "alice", "{\"flow\":\"code\"}", "right")
                .await
                .expect("verified"));
            // Nothing to hand out without the code.
            assert!(s.collect_oidc_attempt(id).await.expect("collect").is_none());
        }
        let got = s
            .confirm_oidc_attempt("c1", "right")
            .await
            .expect("confirm");
        assert!(
            matches!(&got, Confirmed::Collected(r)
                if r.user_name.as_deref() == Some("alice")
                && r.login_details.as_deref() == Some("{\"flow\":\"code\"}")),
            "{got:?}"
        );
        let again = s.confirm_oidc_attempt("c1", "right").await.expect("again");
        assert!(matches!(again, Confirmed::NotWaiting), "{again:?}");

        for left in [2, 1] {
            let wrong = s.confirm_oidc_attempt("c2", "wrong").await.expect("wrong");
            assert!(
                matches!(wrong, Confirmed::Wrong(n) if n == left),
                "{wrong:?}"
            );
        }
        let last = s.confirm_oidc_attempt("c2", "wrong").await.expect("last");
        assert!(
            matches!(&last, Confirmed::Failed { message, user: Some(u) }
                if *message == CONFIRM_EXHAUSTED && u == "alice"),
            "{last:?}"
        );
        let row = s.oidc_attempt("c2").await.expect("q").expect("row");
        assert_eq!(row.status, "failed");
        assert!(row.login_details.is_none());
        let late = s.confirm_oidc_attempt("c2", "right").await.expect("late");
        assert!(matches!(late, Confirmed::NotWaiting), "{late:?}");

        // The right code after the expiry fails the attempt.
        let expired = s
            .confirm_oidc_attempt("c3", "right")
            .await
            .expect("expired");
        assert!(
            matches!(&expired, Confirmed::Failed { message, .. } if *message == CONFIRM_EXPIRED),
            "{expired:?}"
        );
        // A verified attempt is not verified again.
        assert!(!s
            .verify_oidc_attempt("c3", "bob", "{}", "other")
            .await
            .expect("closed"));
    })
    .await;
}

#[tokio::test]
async fn groups_sync_leaves_local_memberships_alone() {
    on_both(|s| async move {
        let iss = "https://idp.example";
        s.create_user("alice", None).await.expect("user");
        s.create_group("local").await.expect("group");
        s.add_member("local", "alice").await.expect("member");
        s.link_oidc_identity(iss, "sub-1", "alice", "corp")
            .await
            .expect("link");
        assert_eq!(
            s.oidc_linked_user(iss, "sub-1")
                .await
                .expect("q")
                .as_deref(),
            Some("alice")
        );

        // The IdP lists a new group (created) and the local one (not taken over).
        let (added, removed) = s
            .sync_oidc_groups("alice", iss, &["eng".into(), "local".into()])
            .await
            .expect("sync");
        assert_eq!((added, removed), (vec!["eng".to_owned()], vec![]));
        assert_eq!(s.user_groups("alice").await.expect("q"), ["eng", "local"]);

        // The IdP drops both: only its own membership goes.
        let (added, removed) = s.sync_oidc_groups("alice", iss, &[]).await.expect("sync");
        assert_eq!((added, removed), (vec![], vec!["eng".to_owned()]));
        assert_eq!(s.user_groups("alice").await.expect("q"), ["local"]);

        // Back again, then an admin removes it by hand: the next sync adds it again.
        s.sync_oidc_groups("alice", iss, &["eng".into()])
            .await
            .expect("sync");
        s.remove_member("eng", "alice").await.expect("remove");
        let (added, _) = s
            .sync_oidc_groups("alice", iss, &["eng".into()])
            .await
            .expect("sync");
        assert_eq!(added, ["eng"]);
    })
    .await;
}
