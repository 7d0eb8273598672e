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
