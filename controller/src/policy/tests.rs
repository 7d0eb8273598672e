use super::*;

fn rule(effect: Effect, actions: &[&str], targets: Option<&str>, labels: &[(&str, &str)]) -> Rule {
    Rule {
        effect,
        actions: actions.iter().map(|s| s.to_string()).collect(),
        targets: targets.map(str::to_owned),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        logins: Vec::new(),
    }
}

fn sourced(role: &str, rules: Vec<Rule>) -> Vec<SourcedRule> {
    rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| SourcedRule {
            role: role.into(),
            position: i as i64 + 1,
            rule,
        })
        .collect()
}

fn target<'a>(name: &'a str, labels: &'a BTreeMap<String, String>) -> Option<TargetRef<'a>> {
    Some(TargetRef { name, labels })
}

#[test]
fn no_rules_denies_naming_the_permission() {
    let labels = BTreeMap::new();
    let d = check(&[], "connect", target("db", &labels)).expect_err("denied");
    assert!(
        d.reason
            .contains("missing permission 'connect' on target 'db'"),
        "{}",
        d.reason
    );
    assert_eq!(d.rule, None);
}

#[test]
fn glob_allows_matching_names_only() {
    let rules = sourced(
        "dev",
        vec![rule(Effect::Allow, &["connect"], Some("pg-*"), &[])],
    );
    let labels = BTreeMap::new();
    let g = check(&rules, "connect", target("pg-prod", &labels)).expect("allowed");
    assert_eq!(g.rule(), "role 'dev' rule #1 (allow connect on pg-*)");
    assert!(check(&rules, "connect", target("redis", &labels)).is_err());
    assert!(check(&rules, "read", target("pg-prod", &labels)).is_err());
}

#[test]
fn deny_beats_allow() {
    let mut rules = sourced("dev", vec![rule(Effect::Allow, &["*"], None, &[])]);
    rules.extend(sourced(
        "guard",
        vec![rule(Effect::Deny, &["connect"], None, &[("env", "prod")])],
    ));
    let prod: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
    let d = check(&rules, "connect", target("db", &prod)).expect_err("denied");
    assert_eq!(
        d.rule.as_deref(),
        Some("role 'guard' rule #1 (deny connect [env=prod])")
    );
    let staging: BTreeMap<_, _> = [("env".to_string(), "staging".to_string())].into();
    assert!(check(&rules, "connect", target("db", &staging)).is_ok());
}

#[test]
fn labels_must_all_match() {
    let rules = sourced(
        "r",
        vec![rule(
            Effect::Allow,
            &["connect"],
            None,
            &[("env", "prod"), ("team", "pay")],
        )],
    );
    let one: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
    assert!(check(&rules, "connect", target("db", &one)).is_err());
    let both: BTreeMap<_, _> = [
        ("env".to_string(), "prod".to_string()),
        ("team".to_string(), "pay".to_string()),
    ]
    .into();
    assert!(check(&rules, "connect", target("db", &both)).is_ok());
}

#[test]
fn admin_actions_and_noun_wildcards() {
    let rules = sourced(
        "ops",
        vec![rule(Effect::Allow, &["users:*", "audit:read"], None, &[])],
    );
    assert!(check(&rules, "users:write", None).is_ok());
    assert!(check(&rules, "audit:read", None).is_ok());
    assert!(check(&rules, "targets:write", None).is_err());
    // A rule scoped to targets never grants admin actions.
    let scoped = sourced("s", vec![rule(Effect::Allow, &["*"], Some("*"), &[])]);
    assert!(check(&scoped, "users:write", None).is_err());
    let labels = BTreeMap::new();
    assert!(check(&scoped, "connect", target("x", &labels)).is_ok());
}

#[test]
fn star_allows_everything() {
    let rules = sourced("admin", vec![rule(Effect::Allow, &["*"], None, &[])]);
    let labels = BTreeMap::new();
    assert!(check(&rules, "workers:write", None).is_ok());
    assert!(check(&rules, "connect", target("anything", &labels)).is_ok());
}

#[test]
fn action_validation() {
    for ok in [
        "*",
        "connect",
        "read",
        "users:*",
        "sessions:cancel",
        "audit:read",
        "users:lock",
        "roles:w*",
    ] {
        assert!(validate_action(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "conect",
        "users:",
        "bogus:read",
        "users:Write",
        "targets:wrte",
        "audit:write",
        "roles:x*",
    ] {
        assert!(validate_action(bad).is_err(), "{bad}");
    }
    let err = validate_action("targets:wrte").expect_err("misspelt");
    assert!(
        err.contains("targets takes targets:write, targets:*"),
        "{err}"
    );
    assert!(validate_glob("pg-[").is_err());
    assert!(validate_glob("pg-*").is_ok());
    assert!(validate_glob("").is_err());
    assert!(validate_glob("  ").is_err());
}

#[test]
fn logins_must_be_listed_and_deny_by_login_is_narrow() {
    let mut allow = rule(Effect::Allow, &["connect"], Some("db-*"), &[]);
    allow.logins = vec!["readonly".into(), "app".into()];
    let mut deny = rule(Effect::Deny, &["connect"], None, &[]);
    deny.logins = vec!["app".into()];
    let rules = sourced("r", vec![allow, deny]);
    let labels = BTreeMap::new();
    let t = TargetRef {
        name: "db-1",
        labels: &labels,
    };
    // The login-specific deny does not refuse connecting as such...
    assert!(check(&rules, "connect", Some(t)).is_ok());
    // ...only that login.
    assert!(check_login(&rules, t, "readonly").is_ok());
    let d = check_login(&rules, t, "app").expect_err("denied");
    assert!(
        d.reason.contains("denied by role 'r' rule #2"),
        "{}",
        d.reason
    );
    let d = check_login(&rules, t, "postgres").expect_err("not listed");
    assert!(
        d.reason
            .contains("login 'postgres' on target 'db-1' is not permitted"),
        "{}",
        d.reason
    );
}
