//! The policy engine: pure functions over rules, so every decision is testable in memory
//! and explainable (`postern policy check`).
//!
//! A rule applies to an action when one of its actions equals it, is `*`, or is `noun:*` for
//! an action `noun:verb`. Target actions (`connect`, `read`) additionally require the rule's
//! selectors (name glob, labels) to match the target; a rule with selectors applies only to
//! target actions. Deny wins over allow; no matching allow means deny.

use std::collections::BTreeMap;

use crate::api::types::{Effect, Rule};

/// A target as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct TargetRef<'a> {
    /// Name.
    pub name: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// A rule with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedRule {
    /// Role name.
    pub role: String,
    /// 1-based position in the role.
    pub position: i64,
    /// The rule.
    pub rule: Rule,
}

/// Proof that a policy check allowed an action. Only [`check`] can make one, so a handler
/// holding a `Granted` has passed the check (the warpgate habit of permission-as-type).
#[derive(Debug, Clone)]
pub struct Granted {
    action: String,
    rule: String,
}

impl Granted {
    /// The action granted.
    pub fn action(&self) -> &str {
        &self.action
    }
    /// The rule that granted it.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// A refusal with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The action refused.
    pub action: String,
    /// The deny rule that matched, if one did.
    pub rule: Option<String>,
    /// Explanation for a person.
    pub reason: String,
}

/// Is `action` allowed, on `target` for target actions?
pub fn check(
    rules: &[SourcedRule],
    action: &str,
    target: Option<TargetRef<'_>>,
) -> Result<Granted, Denied> {
    let applies = |r: &&SourcedRule| rule_applies(&r.rule, action, target);
    // A deny rule that names logins refuses only those logins (see `check_login`).
    let denies = |r: &&SourcedRule| r.rule.effect == Effect::Deny && r.rule.logins.is_empty();
    if let Some(deny) = rules.iter().filter(denies).find(applies) {
        let rule = describe(deny);
        return Err(Denied {
            action: action.to_owned(),
            reason: format!("'{action}'{} is denied by {rule}", on(target)),
            rule: Some(rule),
        });
    }
    if let Some(allow) = rules
        .iter()
        .filter(|r| r.rule.effect == Effect::Allow)
        .find(applies)
    {
        return Ok(Granted {
            action: action.to_owned(),
            rule: describe(allow),
        });
    }
    Err(Denied {
        action: action.to_owned(),
        rule: None,
        reason: format!(
            "missing permission '{action}'{}: no role bound to the user allows it",
            on(target)
        ),
    })
}

/// Is `login` on `target` refused by a deny rule for `connect` that lists it (or `*`)? What
/// a session as the brokered credential's own user must pass (it needs no allow rule naming
/// the login: being allowed to connect is allowing that).
pub fn login_not_denied(
    rules: &[SourcedRule],
    target: TargetRef<'_>,
    login: &str,
) -> Result<(), Denied> {
    let denies = |r: &&SourcedRule| {
        r.rule.effect == Effect::Deny
            && rule_applies(&r.rule, "connect", Some(target))
            && r.rule.logins.iter().any(|l| l == "*" || l == login)
    };
    match rules.iter().find(denies) {
        Some(deny) => {
            let rule = describe(deny);
            let action = format!("connect as '{login}'");
            Err(Denied {
                reason: format!("{action} on target '{}' is denied by {rule}", target.name),
                action,
                rule: Some(rule),
            })
        }
        None => Ok(()),
    }
}

/// The login check of a session as `login` on `target`, whose brokered credential logs in
/// as `own`: the credential's own user must only not be denied by name; any other login must
/// be allowed by name too ([`check_login`]).
pub fn session_login(
    rules: &[SourcedRule],
    target: TargetRef<'_>,
    login: &str,
    own: Option<&str>,
) -> Result<(), Denied> {
    if own == Some(login) {
        login_not_denied(rules, target, login)
    } else {
        check_login(rules, target, login).map(|_| ())
    }
}

/// May the user connect to `target` as `login` (an SSH user, a database user)? An allow rule
/// for `connect` on the target must list the login (or `*`); a deny rule for `connect` on the
/// target that lists it (or `*`) refuses it. Call after `check(…, "connect", …)` allowed.
pub fn check_login(
    rules: &[SourcedRule],
    target: TargetRef<'_>,
    login: &str,
) -> Result<Granted, Denied> {
    login_not_denied(rules, target, login)?;
    let applies = |r: &&SourcedRule| {
        rule_applies(&r.rule, "connect", Some(target))
            && r.rule.logins.iter().any(|l| l == "*" || l == login)
    };
    let action = format!("connect as '{login}'");
    if let Some(allow) = rules
        .iter()
        .filter(|r| r.rule.effect == Effect::Allow)
        .find(applies)
    {
        return Ok(Granted {
            action,
            rule: describe(allow),
        });
    }
    Err(Denied {
        reason: format!(
            "login '{login}' on target '{}' is not permitted: no role's connect rule lists it in its logins",
            target.name
        ),
        action,
        rule: None,
    })
}

fn on(target: Option<TargetRef<'_>>) -> String {
    target
        .map(|t| format!(" on target '{}'", t.name))
        .unwrap_or_default()
}

/// `role NAME rule #N (allow connect on pg-*)`.
pub fn describe(r: &SourcedRule) -> String {
    format!(
        "role '{}' rule #{} ({})",
        r.role,
        r.position,
        summarize(&r.rule)
    )
}

/// `allow connect,read on pg-* [env=prod]`.
pub fn summarize(rule: &Rule) -> String {
    let effect = match rule.effect {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    };
    let mut s = format!("{effect} {}", rule.actions.join(","));
    if let Some(glob) = &rule.targets {
        s.push_str(&format!(" on {glob}"));
    }
    if !rule.labels.is_empty() {
        let labels: Vec<String> = rule
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.push_str(&format!(" [{}]", labels.join(",")));
    }
    if !rule.logins.is_empty() {
        s.push_str(&format!(" as {}", rule.logins.join(",")));
    }
    s
}

/// Whether `action` names a target action (scoped by target selectors).
pub fn is_target_action(action: &str) -> bool {
    !action.contains(':')
}

fn rule_applies(rule: &Rule, action: &str, target: Option<TargetRef<'_>>) -> bool {
    if !rule.actions.iter().any(|a| action_matches(a, action)) {
        return false;
    }
    let scoped = rule.targets.is_some() || !rule.labels.is_empty();
    match (is_target_action(action), target) {
        (true, Some(t)) => selects(rule, t),
        // A target action checked without a target ("may list targets at all?").
        (true, None) => !scoped || rule.effect == Effect::Allow,
        (false, _) => !scoped,
    }
}

fn action_matches(pattern: &str, action: &str) -> bool {
    pattern == "*"
        || pattern == action
        || pattern
            .strip_suffix(":*")
            .is_some_and(|noun| action.split_once(':').is_some_and(|(n, _)| n == noun))
}

fn selects(rule: &Rule, target: TargetRef<'_>) -> bool {
    let name_ok = rule
        .targets
        .as_deref()
        .is_none_or(|glob| glob_matches(glob, target.name));
    name_ok
        && rule
            .labels
            .iter()
            .all(|(k, v)| target.labels.get(k).is_some_and(|tv| tv == v))
}

/// Validates a glob at rule creation so evaluation never meets a bad one.
pub fn validate_glob(glob: &str) -> Result<(), String> {
    if glob.trim().is_empty() {
        return Err("an empty target pattern matches no target (leave it out for all)".into());
    }
    globset::Glob::new(glob)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn glob_matches(glob: &str, name: &str) -> bool {
    globset::Glob::new(glob)
        .map(|g| g.compile_matcher().is_match(name))
        .unwrap_or(false)
}

/// Actions a rule may name.
pub fn validate_action(action: &str) -> Result<(), String> {
    const TARGET: &[&str] = &["connect", "read"];
    /// Each noun with the verbs the API checks.
    const NOUNS: &[(&str, &[&str])] = &[
        ("users", &["read", "write", "lock"]),
        ("groups", &["read", "write"]),
        ("roles", &["read", "write"]),
        ("targets", &["write"]),
        ("workers", &["read", "write"]),
        ("sessions", &["read", "cancel"]),
        ("audit", &["read"]),
        ("recordings", &["read"]),
    ];
    if action == "*" || TARGET.contains(&action) {
        return Ok(());
    }
    let Some((noun, verb)) = action.split_once(':') else {
        return Err(format!(
            "unknown action '{action}': use connect, read, *, or NOUN:VERB with NOUN one of {}",
            NOUNS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ));
    };
    let Some((_, verbs)) = NOUNS.iter().find(|(n, _)| *n == noun) else {
        return Err(format!(
            "unknown action '{action}': '{noun}' is not one of {}",
            NOUNS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ));
    };
    // A pattern (`*`, `r*`) must match a verb; a misspelt verb would match nothing, silently.
    if verb.chars().all(|c| c.is_ascii_lowercase() || c == '*')
        && verbs.iter().any(|v| glob_matches(verb, v))
    {
        return Ok(());
    }
    Err(format!(
        "unknown action '{action}': {noun} takes {}",
        verbs
            .iter()
            .map(|v| format!("{noun}:{v}"))
            .chain([format!("{noun}:*")])
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests;
