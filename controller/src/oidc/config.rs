//! The `[[oidc]]` sections of the controller's config: one per OpenID Connect login method.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use openidconnect::url::{Host, Url};
use postern_proto::ids::Secret;

use crate::config::ConfigError;

/// One OpenID Connect login method (`[[oidc]]` in the controller's TOML).
///
/// ```toml
/// [[oidc]]
/// name = "corp"
/// issuer = "https://login.example.com"
/// client_id = "postern"
/// client_secret = "…"            # or POSTERN_OIDC_CORP_CLIENT_SECRET
/// scopes = ["email", "groups"]     # `openid` is always requested
/// required_claims = { email_verified = true }
/// allowed_domains = ["example.com"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// What people type after `--method`, and what `postern login` lists.
    pub name: String,
    /// The issuer URL; its discovery document is read from
    /// `ISSUER/.well-known/openid-configuration` and must name the same issuer.
    pub issuer: String,
    /// The controller's client id at the IdP.
    pub client_id: String,
    /// The client secret (the controller is a confidential client). Overridden by
    /// `POSTERN_OIDC_<NAME>_CLIENT_SECRET` (name upper-cased, `-` and `.` as `_`).
    /// Its `Debug` prints `***`.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// Scopes requested besides `openid`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID-token claim that names the Postern user.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The ID-token claim that lists the user's groups (absent: no groups).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Claims the ID token must carry with exactly these values (e.g. `email_verified = true`).
    #[serde(default)]
    pub required_claims: BTreeMap<String, serde_json::Value>,
    /// If not empty, the user claim must be an e-mail address in one of these domains.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// The callback the IdP redirects to; `http://API_ADDR/v1/auth/oidc/callback` if absent.
    #[serde(default)]
    pub redirect_url: Option<String>,
    /// Whether `postern login --device` (RFC 8628) may use this method. Off unless asked for:
    /// whoever starts a device login can send its code to someone else, and the token goes to
    /// the starter once that person approves it (RFC 8628 §5.4); the IdP's approval page is
    /// the only warning.
    #[serde(default)]
    pub device_flow: bool,
    /// How often the controller polls the token endpoint during a device login. Overrides the
    /// IdP's `interval` (some IdPs send none; RFC 8628 then says 5 s).
    #[serde(default, with = "opt_duration")]
    pub device_poll_interval: Option<Duration>,
}

fn default_scopes() -> Vec<String> {
    vec!["email".into(), "profile".into(), "groups".into()]
}
fn default_user_claim() -> String {
    "email".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        postern_proto::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

impl OidcConfig {
    /// A method with the defaults for everything but the names and the client.
    pub fn new(name: &str, issuer: &str, client_id: &str, client_secret: Option<&str>) -> Self {
        OidcConfig {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.map(|s| Secret(s.to_owned())),
            scopes: default_scopes(),
            user_claim: default_user_claim(),
            groups_claim: default_groups_claim(),
            required_claims: BTreeMap::new(),
            allowed_domains: Vec::new(),
            redirect_url: None,
            device_flow: false,
            device_poll_interval: None,
        }
    }

    /// The environment variable that overrides this method's client secret.
    pub fn secret_env_var(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("POSTERN_OIDC_{name}_CLIENT_SECRET")
    }
}

/// Applies `POSTERN_OIDC_<NAME>_CLIENT_SECRET` to each method.
pub fn apply_env(methods: &mut [OidcConfig], get: &impl Fn(&str) -> Option<String>) {
    for m in methods {
        if let Some(secret) = get(&m.secret_env_var()) {
            m.client_secret = Some(Secret(secret));
        }
    }
}

/// Checks what parsing cannot: unique names, URLs, claim names, intervals.
pub fn validate(methods: &[OidcConfig]) -> Result<(), ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid { key, message };
    let mut seen = std::collections::BTreeSet::new();
    for m in methods {
        let key = |field: &str| format!("oidc.{}.{field}", m.name);
        let name_ok = !m.name.is_empty()
            && m.name.len() <= 64
            && m.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(invalid(
                "oidc.name".into(),
                format!(
                    "'{}' is not a method name: use 1-64 letters, digits, '-', '_' or '.'",
                    m.name
                ),
            ));
        }
        if m.name == "password" || !seen.insert(m.name.as_str()) {
            return Err(invalid(
                "oidc.name".into(),
                format!("method name '{}' is reserved or used twice", m.name),
            ));
        }
        let issuer =
            Url::parse(&m.issuer).map_err(|e| invalid(key("issuer"), format!("not a URL: {e}")))?;
        if !matches!(issuer.scheme(), "https" | "http") {
            return Err(invalid(key("issuer"), "must be an https URL".into()));
        }
        if issuer.scheme() == "http" && !is_loopback_host(&issuer) {
            return Err(invalid(
                key("issuer"),
                "plain http is allowed only for a loopback issuer (tests, development)".into(),
            ));
        }
        if let Some(r) = &m.redirect_url {
            Url::parse(r).map_err(|e| invalid(key("redirect_url"), format!("not a URL: {e}")))?;
        }
        if m.client_id.is_empty() {
            return Err(invalid(key("client_id"), "must not be empty".into()));
        }
        if m.user_claim.is_empty() || m.groups_claim.is_empty() {
            return Err(invalid(
                key("user_claim"),
                "claim names must not be empty".into(),
            ));
        }
        if m.device_poll_interval.is_some_and(|d| {
            d < super::provider::MIN_DEVICE_POLL || d > super::provider::MAX_DEVICE_POLL
        }) {
            return Err(invalid(
                key("device_poll_interval"),
                "must be between 1s and 60s".into(),
            ));
        }
    }
    Ok(())
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d == "localhost",
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<OidcConfig>, toml::de::Error> {
        #[derive(Deserialize)]
        struct Wrap {
            oidc: Vec<OidcConfig>,
        }
        toml::from_str::<Wrap>(text).map(|w| w.oidc)
    }

    #[test]
    fn defaults_and_required_claims() {
        let m = parse(
            "[[oidc]]\nname = \"corp\"\nissuer = \"https://idp.example\"\nclient_id = \"c\"\n\
             required_claims = { email_verified = true }\ndevice_poll_interval = \"2s\"\n",
        )
        .expect("parses");
        assert_eq!(m[0].user_claim, "email");
        assert_eq!(m[0].groups_claim, "groups");
        assert_eq!(
            m[0].required_claims.get("email_verified"),
            Some(&serde_json::Value::Bool(true))
        );
        assert_eq!(m[0].device_poll_interval, Some(Duration::from_secs(2)));
        assert!(
            !m[0].device_flow,
            "the device grant is asked for, not assumed"
        );
        assert!(validate(&m).is_ok());
        assert!(parse(
            "[[oidc]]\nname = \"x\"\nissuer = \"https://i\"\nclient_id = \"c\"\nbogus = 1\n"
        )
        .is_err());
    }

    #[test]
    fn refuses_bad_methods() {
        let ok = OidcConfig::new("corp", "https://idp.example", "c", None);
        let mut twice = vec![ok.clone(), ok.clone()];
        assert!(validate(&twice).is_err());
        twice.pop();
        assert!(validate(&twice).is_ok());
        let plain = OidcConfig::new("corp", "http://idp.example", "c", None);
        assert!(validate(&[plain]).is_err());
        let local = OidcConfig::new("corp", "http://127.0.0.1:8080", "c", None);
        assert!(validate(&[local]).is_ok());
        let reserved = OidcConfig::new("password", "https://idp.example", "c", None);
        assert!(validate(&[reserved]).is_err());
    }

    #[test]
    fn secret_from_env() {
        let mut m = vec![OidcConfig::new("corp-sso", "https://i", "c", None)];
        apply_env(&mut m, &|k| {
            (k == "POSTERN_OIDC_CORP_SSO_CLIENT_SECRET").then(|| "s".to_owned())
        });
        assert_eq!(m[0].client_secret.as_ref().map(Secret::expose), Some("s"));
        assert!(
            !format!("{:?}", m[0]).contains("\"s\""),
            "the secret leaks into Debug"
        );
    }
}
