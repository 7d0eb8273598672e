//! From the claims of a verified ID token to a Postern identity: the user name, the groups,
//! and the checks a method requires (claim values, e-mail domains). Pure: tested in memory.

use serde_json::{Map, Value};

use super::config::OidcConfig;
use crate::api::check_name;

/// Who an ID token says the user is, once the method's rules accept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The IdP's stable subject (`sub`).
    pub subject: String,
    /// The Postern user name (the method's user claim).
    pub user: String,
    /// Group names from the groups claim, sorted, without duplicates; names Postern cannot
    /// hold are dropped (and listed in `ignored_groups`).
    pub groups: Vec<String>,
    /// Group names from the claim that are not valid Postern names.
    pub ignored_groups: Vec<String>,
    /// Whether the groups claim was absent (an IdP may leave it out for no groups, or the
    /// method names a claim the IdP never sends).
    pub groups_claim_missing: bool,
}

/// The ID token's claims do not satisfy the method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// `sub` is missing or empty.
    #[error("the ID token has no subject")]
    NoSubject,
    /// The user claim is missing or not a string.
    #[error("the ID token has no '{0}' claim to name the user")]
    NoUserClaim(String),
    /// The user claim's value is not a name Postern accepts.
    #[error("'{value}' (claim '{claim}') is not a valid Postern user name")]
    BadUserName {
        /// The claim.
        claim: String,
        /// Its value.
        value: String,
    },
    /// A required claim is missing or has another value.
    #[error("the ID token's claim '{claim}' must be {expected} but is {actual}")]
    RequiredClaim {
        /// The claim.
        claim: String,
        /// The configured value.
        expected: String,
        /// What the token carries (`absent` if nothing).
        actual: String,
    },
    /// The user's e-mail domain is not allowed.
    #[error("'{user}' is not in an allowed domain ({allowed})")]
    DomainNotAllowed {
        /// The user claim's value.
        user: String,
        /// The allowed domains, comma-separated.
        allowed: String,
    },
    /// The user is named by an e-mail address the IdP says it has not verified.
    #[error("the identity provider says the e-mail address '{0}' is not verified (email_verified is false): it cannot name a Postern user")]
    UnverifiedEmail(String),
    /// The groups claim is neither a list of strings nor a string.
    #[error("the ID token's '{0}' claim is not a list of group names")]
    BadGroups(String),
}

/// Applies a method's rules to the claims of a verified ID token.
pub fn identity(config: &OidcConfig, claims: &Map<String, Value>) -> Result<Identity, ClaimError> {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(ClaimError::NoSubject)?
        .to_owned();
    for (claim, expected) in &config.required_claims {
        let actual = claims.get(claim);
        if actual != Some(expected) {
            return Err(ClaimError::RequiredClaim {
                claim: claim.clone(),
                expected: expected.to_string(),
                actual: actual.map_or_else(|| "absent".to_owned(), Value::to_string),
            });
        }
    }
    let user = claims
        .get(&config.user_claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ClaimError::NoUserClaim(config.user_claim.clone()))?
        .to_lowercase();
    // Whoever can set an unverified address at the IdP could take anyone's name: an address
    // the IdP says is not verified never names a user (an IdP that says nothing is trusted).
    let unverified = claims
        .get("email_verified")
        .is_some_and(|v| *v == Value::Bool(false) || v.as_str() == Some("false"));
    if config.user_claim == "email" && unverified {
        return Err(ClaimError::UnverifiedEmail(user));
    }
    if !config.allowed_domains.is_empty() {
        let domain = user.rsplit_once('@').map(|(_, d)| d);
        let allowed = domain.is_some_and(|d| {
            config
                .allowed_domains
                .iter()
                .any(|a| a.trim_start_matches('@').eq_ignore_ascii_case(d))
        });
        if !allowed {
            return Err(ClaimError::DomainNotAllowed {
                user,
                allowed: config.allowed_domains.join(", "),
            });
        }
    }
    if check_name("user", &user).is_err() {
        return Err(ClaimError::BadUserName {
            claim: config.user_claim.clone(),
            value: user,
        });
    }
    let groups_claim = claims.get(&config.groups_claim);
    let groups_claim_missing = groups_claim.is_none();
    let raw: Vec<String> = match groups_claim {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| ClaimError::BadGroups(config.groups_claim.clone()))?,
        Some(_) => return Err(ClaimError::BadGroups(config.groups_claim.clone())),
    };
    let (mut groups, mut ignored_groups): (Vec<String>, Vec<String>) = raw
        .into_iter()
        .partition(|g| check_name("group", g).is_ok());
    groups.sort();
    groups.dedup();
    ignored_groups.sort();
    ignored_groups.dedup();
    Ok(Identity {
        subject,
        user,
        groups,
        ignored_groups,
        groups_claim_missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn corp() -> OidcConfig {
        let mut c = OidcConfig::new("corp", "https://idp.example", "c", None);
        c.required_claims
            .insert("email_verified".into(), Value::Bool(true));
        c.allowed_domains = vec!["example.com".into()];
        c
    }

    #[test]
    fn maps_user_and_groups() {
        let id = identity(
            &corp(),
            &claims(
                json!({"sub": "u1", "email": "Alice@Example.com", "email_verified": true,
                "groups": ["engineering", "ops", "engineering", "bad group!"]}),
            ),
        )
        .expect("accepted");
        assert_eq!(id.subject, "u1");
        assert_eq!(id.user, "alice@example.com");
        assert_eq!(id.groups, vec!["engineering", "ops"]);
        assert_eq!(id.ignored_groups, vec!["bad group!"]);
        assert!(!id.groups_claim_missing);
    }

    #[test]
    fn a_missing_groups_claim_is_told_from_an_empty_one() {
        let base = json!({"sub": "u1", "email": "a@example.com", "email_verified": true});
        let id = identity(&corp(), &claims(base.clone())).expect("accepted");
        assert!(id.groups.is_empty() && id.groups_claim_missing);
        let mut with_empty = base;
        with_empty["groups"] = json!([]);
        let id = identity(&corp(), &claims(with_empty)).expect("accepted");
        assert!(id.groups.is_empty() && !id.groups_claim_missing);
    }

    #[test]
    fn enforces_required_claims_and_domains() {
        let c = corp();
        let e = identity(
            &c,
            &claims(json!({"sub": "u1", "email": "a@example.com", "email_verified": false})),
        )
        .expect_err("unverified");
        assert!(
            e.to_string()
                .contains("'email_verified' must be true but is false"),
            "{e}"
        );
        let e = identity(&c, &claims(json!({"sub": "u1", "email": "a@example.com"})))
            .expect_err("absent");
        assert!(e.to_string().contains("but is absent"), "{e}");
        let e = identity(
            &c,
            &claims(json!({"sub": "u1", "email": "m@evil.test", "email_verified": true})),
        )
        .expect_err("domain");
        assert!(matches!(e, ClaimError::DomainNotAllowed { .. }), "{e}");
        let e = identity(
            &c,
            &claims(json!({"email": "a@example.com", "email_verified": true})),
        )
        .expect_err("no sub");
        assert_eq!(e, ClaimError::NoSubject);
    }

    #[test]
    fn odd_claims() {
        let c = OidcConfig::new("corp", "https://idp.example", "c", None);
        let e = identity(&c, &claims(json!({"sub": "u1"}))).expect_err("no email");
        assert_eq!(e, ClaimError::NoUserClaim("email".into()));
        let e = identity(
            &c,
            &claims(json!({"sub": "u1", "email": "a@b.c", "groups": [1]})),
        )
        .expect_err("groups");
        assert_eq!(e, ClaimError::BadGroups("groups".into()));
        let id = identity(
            &c,
            &claims(json!({"sub": "u1", "email": "a@b.c", "groups": "ops"})),
        )
        .expect("one group as a string");
        assert_eq!(id.groups, vec!["ops"]);
        let e = identity(&c, &claims(json!({"sub": "u1", "email": "has space@b.c"})))
            .expect_err("bad name");
        assert!(matches!(e, ClaimError::BadUserName { .. }));
    }

    #[test]
    fn an_unverified_address_names_no_user_even_unasked() {
        let c = OidcConfig::new("corp", "https://idp.example", "c", None);
        for verified in [json!(false), json!("false")] {
            let e = identity(
                &c,
                &claims(json!({"sub": "u1", "email": "ceo@b.c", "email_verified": verified})),
            )
            .expect_err("unverified");
            assert_eq!(e, ClaimError::UnverifiedEmail("ceo@b.c".into()));
        }
        for verified in [
            json!({"sub": "u1", "email": "a@b.c", "email_verified": true}),
            json!({"sub": "u1", "email": "a@b.c"}),
        ] {
            identity(&c, &claims(verified)).expect("verified, or not said");
        }
        // Another user claim: the address is not what names the user.
        let mut by_name = c.clone();
        by_name.user_claim = "preferred_username".into();
        let id = identity(
            &by_name,
            &claims(json!({"sub": "u1", "preferred_username": "carol", "email_verified": false})),
        )
        .expect("named otherwise");
        assert_eq!(id.user, "carol");
    }
}
