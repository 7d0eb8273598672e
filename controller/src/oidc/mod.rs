//! OpenID Connect single sign-on (DESIGN §2). The controller is the OIDC client (it holds
//! the client secret); the CLI only starts an attempt and polls it for its API token.
//!
//! # Layout
//! - [`config`]: the `[[oidc]]` methods of the controller's config.
//! - [`provider`]: one IdP through `openidconnect`: discovery, PKCE + state + nonce, the code
//!   exchange, the device grant, ID-token verification with a JWKS refetch on an unknown key.
//! - [`claims`]: verified claims → user name and groups, under the method's rules (pure).
//! - [`login`]: finishing a login: just-in-time user linked to (issuer, subject), groups
//!   synchronized, API token issued, everything audited; the device-flow poller.
//!
//! Attempts live in the store (`oidc_attempts`), so that any controller on a shared
//! PostgreSQL can take the IdP's callback and answer the CLI's polls. A device login is polled
//! at the IdP by the controller that started it; if that controller stops, the attempt
//! expires and the user starts again.

pub mod claims;
pub mod config;
pub mod login;
pub mod provider;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::OidcConfig;
pub use provider::{Provider, ProviderError};

/// The callback path the IdP redirects browsers to.
pub const CALLBACK_PATH: &str = "/v1/auth/oidc/callback";

/// The configured OIDC methods.
#[derive(Debug, Default)]
pub struct Oidc {
    providers: Vec<Arc<Provider>>,
}

impl Oidc {
    /// The methods of `configs`; those without a `redirect_url` get the controller's own
    /// callback on `api_addr`.
    pub fn new(configs: &[OidcConfig], api_addr: SocketAddr) -> Result<Self, ProviderError> {
        // Each method's HTTP client needs the process's rustls provider (the controller's
        // start installs it too; `--check-config` comes here first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let providers = configs
            .iter()
            .map(|c| {
                let redirect = c
                    .redirect_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{api_addr}{CALLBACK_PATH}"));
                Provider::new(c.clone(), &redirect).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Oidc { providers })
    }

    /// Checks each method's IdP (discovery), at most `wait` each: the methods that failed,
    /// with why.
    pub async fn check_all(&self, wait: std::time::Duration) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for p in &self.providers {
            let why = match tokio::time::timeout(wait, p.check()).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "the identity provider at {} did not answer within {} s",
                    p.config.issuer,
                    wait.as_secs()
                ),
            };
            failed.push((p.config.name.clone(), why));
        }
        failed
    }

    /// Every method, in configuration order.
    pub fn methods(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.iter()
    }

    /// The method named `name`, or the first one when `name` is `None`.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<Provider>, String> {
        let found = match name {
            Some(n) => self.providers.iter().find(|p| p.config.name == n),
            None => self.providers.first(),
        };
        found.cloned().ok_or_else(|| {
            let names: Vec<&str> = self
                .providers
                .iter()
                .map(|p| p.config.name.as_str())
                .collect();
            match name {
                Some(n) if !names.is_empty() => format!(
                    "no OIDC login method named '{n}'; configured: {}",
                    names.join(", ")
                ),
                _ => "this controller has no OIDC login method configured".to_owned(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_method_whose_issuer_does_not_answer_is_named_by_the_check() {
        // A port nothing listens on: discovery is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let issuer = format!("http://127.0.0.1:{port}");
        let oidc = Oidc::new(
            &[OidcConfig::new("corp", &issuer, "postern", Some("secret"))],
            "127.0.0.1:9200".parse().expect("addr"),
        )
        .expect("methods");
        let failed = oidc.check_all(std::time::Duration::from_secs(5)).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "corp");
        assert!(
            failed[0]
                .1
                .contains(&format!("cannot use the identity provider at {issuer}")),
            "{failed:?}"
        );
    }
}
