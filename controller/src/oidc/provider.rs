//! One OpenID provider at run time, through the `openidconnect` crate: discovery (cached),
//! the authorization URL (PKCE S256, state, nonce), the code exchange, the device grant, and
//! ID-token verification (signature against the JWKS, issuer, audience, expiry, nonce).
//!
//! openidconnect 4 is built on reqwest 0.12 through oauth2; it is used without its HTTP
//! features, and its requests are forwarded to the workspace's reqwest 0.13 client ([`send`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType,
    CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreErrorResponseType, CoreGenderClaim,
    CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm, CoreResponseMode, CoreResponseType, CoreRevocableToken,
    CoreRevocationErrorResponse, CoreSubjectIdentifierType, CoreTokenIntrospectionResponse,
    CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClaimsVerificationError, Client, ClientId,
    ClientSecret, CsrfToken, DeviceAuthorizationUrl, EmptyAdditionalClaims, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, HttpRequest, HttpResponse, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, ProviderMetadata, RedirectUrl, RequestTokenError, Scope,
    SignatureVerificationError, StandardErrorResponse, TokenResponse as _,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::OidcConfig;

/// Discovery documents are re-read after this long (and at once when a token names a key
/// the cached JWKS does not hold).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// Largest answer read from the IdP.
const MAX_IDP_BODY: usize = 1024 * 1024;

/// Talking to the identity provider failed, or what it sent was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The discovery document (or the JWKS) could not be fetched or is unusable.
    #[error("cannot use the identity provider at {issuer}: {detail}")]
    Discovery {
        /// The configured issuer.
        issuer: String,
        /// What went wrong.
        detail: String,
    },
    /// The IdP does not offer the device authorization grant, or the method disables it.
    #[error("login method '{0}' does not offer the device flow")]
    NoDeviceFlow(String),
    /// The IdP answered a token or device request with an OAuth error.
    #[error("the identity provider refused: {0}")]
    Refused(String),
    /// A request to the IdP failed or its answer did not parse.
    #[error("the identity provider could not be reached or answered badly: {0}")]
    Transport(String),
    /// The token answer carried no ID token.
    #[error("the identity provider sent no ID token")]
    NoIdToken,
    /// The ID token failed verification (signature, issuer, audience, expiry, nonce).
    #[error("the ID token was rejected: {0}")]
    IdToken(String),
}

/// The discovery fields openidconnect's core metadata lacks: the device flow's endpoint, and
/// whether the IdP names itself in its authorization answers (RFC 9207).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ExtraMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorization_response_iss_parameter_supported: Option<bool>,
}
impl AdditionalProviderMetadata for ExtraMetadata {}

type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// The core client with the endpoints discovery provides.
type OidcClient<HasDevice = EndpointNotSet> = Client<
    EmptyAdditionalClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    CoreTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    HasDevice,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// What the browser must be sent to, and the secrets the callback needs to finish.
#[derive(Debug)]
pub struct AuthStart {
    /// The IdP's authorization URL with every parameter.
    pub url: String,
    /// The `state` sent (checked at the callback).
    pub state: CsrfToken,
    /// The `nonce` sent (checked in the ID token).
    pub nonce: Nonce,
    /// The PKCE verifier (sent with the code).
    pub verifier: PkceCodeVerifier,
}

/// One configured OIDC method and its cached discovery document.
#[derive(Debug)]
pub struct Provider {
    /// The method's configuration.
    pub config: OidcConfig,
    redirect: RedirectUrl,
    http: reqwest::Client,
    discovered: tokio::sync::Mutex<Option<(Arc<Metadata>, Instant)>>,
}

impl Provider {
    /// A method whose IdP redirects to `redirect` (its callback URL).
    pub fn new(config: OidcConfig, redirect: &str) -> Result<Self, ProviderError> {
        let bad = |detail: String| ProviderError::Discovery {
            issuer: config.issuer.clone(),
            detail,
        };
        let redirect = RedirectUrl::new(redirect.to_owned())
            .map_err(|e| bad(format!("bad redirect URL: {e}")))?;
        let http = reqwest::Client::builder()
            // Following redirects from an IdP endpoint invites SSRF; the spec needs none.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("postern-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(format!("cannot build an HTTP client: {e}")))?;
        Ok(Provider {
            config,
            redirect,
            http,
            discovered: tokio::sync::Mutex::new(None),
        })
    }

    /// The callback URL the IdP redirects to.
    pub fn redirect_url(&self) -> &str {
        self.redirect.as_str()
    }

    /// The authorization URL for a new code-flow login.
    pub async fn start(&self) -> Result<AuthStart, ProviderError> {
        let md = self.metadata(false).await?;
        let client = self.client(&md);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for s in self.config.scopes.iter().filter(|s| s.as_str() != "openid") {
            request = request.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = request.url();
        Ok(AuthStart {
            url: url.to_string(),
            state,
            nonce,
            verifier,
        })
    }

    /// Whether the IdP's discovery document promises an `iss` in every authorization answer
    /// (RFC 9207), so that an answer without one is not its own.
    pub async fn names_itself_in_answers(&self) -> Result<bool, ProviderError> {
        let md = self.metadata(false).await?;
        Ok(md
            .additional_metadata()
            .authorization_response_iss_parameter_supported
            == Some(true))
    }

    /// Exchanges an authorization code and returns the verified ID token's claims.
    pub async fn exchange(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<Map<String, Value>, ProviderError> {
        let md = self.metadata(false).await?;
        let client = self.client(&md);
        let http = self.http_fn();
        let tokens = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| ProviderError::Refused(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
            .request_async(&http)
            .await
            .map_err(token_error)?;
        self.verify(&tokens, Some(&Nonce::new(nonce.to_owned())))
            .await
    }

    /// Starts a device authorization (RFC 8628).
    pub async fn device_start(&self) -> Result<CoreDeviceAuthorizationResponse, ProviderError> {
        let md = self.metadata(false).await?;
        let client = self.device_client(&md)?;
        let http = self.http_fn();
        let mut request = client.exchange_device_code();
        for s in self.config.scopes.iter().filter(|s| s.as_str() != "openid") {
            request = request.add_scope(Scope::new(s.clone()));
        }
        let details: CoreDeviceAuthorizationResponse =
            request.request_async(&http).await.map_err(token_error)?;
        bounded_poll(details, self.config.device_poll_interval)
    }

    /// Polls the token endpoint until the user approves, refuses, or `timeout` passes; returns
    /// the verified ID token's claims.
    pub async fn device_wait(
        &self,
        details: &CoreDeviceAuthorizationResponse,
        timeout: Duration,
    ) -> Result<Map<String, Value>, ProviderError> {
        let md = self.metadata(false).await?;
        let client = self.device_client(&md)?;
        let http = self.http_fn();
        let tokens: CoreTokenResponse = client
            .exchange_device_access_token(details)
            .map_err(|e| ProviderError::Refused(e.to_string()))?
            .request_async(&http, tokio::time::sleep, Some(timeout))
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => {
                    ProviderError::Refused(match r.error_description() {
                        Some(d) => format!("{}: {d}", r.error()),
                        None => r.error().to_string(),
                    })
                }
                other => ProviderError::Transport(error_chain(&other)),
            })?;
        self.verify(&tokens, None).await
    }

    /// Verifies the ID token of a token answer and returns all its claims. A token signed by
    /// a key the cached JWKS lacks makes the discovery document and JWKS be read again once:
    /// an IdP that rotated its key must not break login. Tokens only ever come from the IdP's
    /// token endpoint over the back channel, so a stranger cannot force refetches.
    async fn verify(
        &self,
        tokens: &CoreTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<Map<String, Value>, ProviderError> {
        let id_token = tokens.id_token().ok_or(ProviderError::NoIdToken)?;
        let mut refreshed = false;
        loop {
            let md = self.metadata(refreshed).await?;
            let client = self.client(&md);
            let verifier = client.id_token_verifier();
            let checked = match nonce {
                Some(n) => id_token.claims(&verifier, n).map(drop),
                // The device grant has no nonce.
                None => id_token
                    .claims(&verifier, |_: Option<&Nonce>| Ok(()))
                    .map(drop),
            };
            match checked {
                Ok(()) => break,
                Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )) if !refreshed => {
                    tracing::info!(issuer = %self.config.issuer, "ID token signed by an unknown key: reading the JWKS again");
                    refreshed = true;
                }
                Err(e) => return Err(ProviderError::IdToken(describe_claims_error(&e))),
            }
        }
        // Verified: its payload can be read as is, with every claim (groups, custom ones).
        let jwt = id_token.to_string();
        let payload = jwt
            .split('.')
            .nth(1)
            .and_then(|p| B64.decode(p).ok())
            .and_then(|p| serde_json::from_slice::<Map<String, Value>>(&p).ok())
            .ok_or_else(|| ProviderError::IdToken("its payload is not a JSON object".into()))?;
        Ok(payload)
    }

    /// The discovery document, read at first use, after [`DISCOVERY_TTL`], or when `refresh`.
    /// Fetches (and caches) the IdP's discovery document: what the first login would, so
    /// that a wrong issuer shows before anyone tries to log in.
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.metadata(false).await.map(|_| ())
    }

    async fn metadata(&self, refresh: bool) -> Result<Arc<Metadata>, ProviderError> {
        let mut cached = self.discovered.lock().await;
        if let Some((md, at)) = cached.as_ref() {
            if !refresh && at.elapsed() < DISCOVERY_TTL {
                return Ok(md.clone());
            }
        }
        let bad = |detail: String| ProviderError::Discovery {
            issuer: self.config.issuer.clone(),
            detail,
        };
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| bad(e.to_string()))?;
        let http = self.http_fn();
        let md = Metadata::discover_async(issuer, &http)
            .await
            .map_err(|e| bad(error_chain(&e)))?;
        let md = Arc::new(md);
        *cached = Some((md.clone(), Instant::now()));
        Ok(md)
    }

    fn client(&self, md: &Metadata) -> OidcClient {
        let client = OidcClient::from_provider_metadata(
            md.clone(),
            ClientId::new(self.config.client_id.clone()),
            self.config
                .client_secret
                .as_ref()
                .map(|s| ClientSecret::new(s.expose().to_owned())),
        );
        client.set_redirect_uri(self.redirect.clone())
    }

    fn device_client(&self, md: &Metadata) -> Result<OidcClient<EndpointSet>, ProviderError> {
        let url = md
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
            .filter(|_| self.config.device_flow)
            .ok_or_else(|| ProviderError::NoDeviceFlow(self.config.name.clone()))?;
        Ok(self.client(md).set_device_authorization_url(url))
    }

    /// The HTTP client openidconnect calls: each request goes through our reqwest.
    fn http_fn(
        &self,
    ) -> impl Fn(HttpRequest) -> futures::future::BoxFuture<'static, Result<HttpResponse, HttpError>>
    {
        let http = self.http.clone();
        move |request| Box::pin(send(http.clone(), request))
    }
}

/// An HTTP exchange with the IdP failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

/// Forwards one of openidconnect's requests to reqwest 0.13 (both speak `http` 1.x types).
async fn send(http: reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request).map_err(|e| HttpError(e.to_string()))?;
    let url = request.url().clone();
    let mut response = http
        .execute(request)
        .await
        .map_err(|e| HttpError(format!("{url}: {}", error_chain(&e))))?;
    let mut builder = openidconnect::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| HttpError(format!("{url}: {e}")))?
    {
        if body.len() + chunk.len() > MAX_IDP_BODY {
            return Err(HttpError(format!("{url}: answer larger than 1 MiB")));
        }
        body.extend_from_slice(&chunk);
    }
    builder.body(body).map_err(|e| HttpError(e.to_string()))
}

/// Bounds on a device login's poll interval, configured (`device_poll_interval`) or the
/// provider's.
pub const MIN_DEVICE_POLL: Duration = Duration::from_secs(1);
/// See [`MIN_DEVICE_POLL`].
pub const MAX_DEVICE_POLL: Duration = Duration::from_secs(60);

/// The device authorization answer with the configured poll interval, or else the provider's
/// own bounded like a configured one: a huge value would hold the login's wait past its expiry
/// (and overflow oauth2's `slow_down` step).
fn bounded_poll(
    details: CoreDeviceAuthorizationResponse,
    configured: Option<Duration>,
) -> Result<CoreDeviceAuthorizationResponse, ProviderError> {
    let interval =
        configured.unwrap_or_else(|| details.interval().clamp(MIN_DEVICE_POLL, MAX_DEVICE_POLL));
    if interval == details.interval() {
        return Ok(details);
    }
    with_interval(details, interval)
}

/// Replaces the poll interval of a device authorization answer (oauth2 offers no setter).
fn with_interval(
    details: CoreDeviceAuthorizationResponse,
    interval: Duration,
) -> Result<CoreDeviceAuthorizationResponse, ProviderError> {
    let mut json =
        serde_json::to_value(&details).map_err(|e| ProviderError::Transport(e.to_string()))?;
    json["interval"] = Value::from(interval.as_secs().max(1));
    serde_json::from_value(json).map_err(|e| ProviderError::Transport(e.to_string()))
}

fn token_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, StandardErrorResponse<CoreErrorResponseType>>,
) -> ProviderError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            ProviderError::Refused(match r.error_description() {
                Some(d) => format!("{}: {d}", r.error()),
                None => r.error().to_string(),
            })
        }
        other => ProviderError::Transport(error_chain(&other)),
    }
}

fn describe_claims_error(e: &ClaimsVerificationError) -> String {
    match e {
        ClaimsVerificationError::SignatureVerification(s) => {
            format!("bad signature ({s})")
        }
        other => other.to_string(),
    }
}

/// An error with its causes, for messages.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(interval: u64) -> CoreDeviceAuthorizationResponse {
        serde_json::from_value(serde_json::json!({
            "device_code": "d",
            "user_code": "U",
            "verification_uri": "https://idp.example/device",
            "expires_in": 600,
            "interval": interval,
        }))
        .expect("a device authorization answer")
    }

    #[test]
    fn the_providers_poll_interval_is_bounded_and_a_configured_one_wins() {
        let secs = |d: CoreDeviceAuthorizationResponse| d.interval().as_secs();
        assert_eq!(secs(bounded_poll(answer(u64::MAX), None).expect("ok")), 60);
        assert_eq!(secs(bounded_poll(answer(0), None).expect("ok")), 1);
        assert_eq!(secs(bounded_poll(answer(5), None).expect("ok")), 5);
        let two = Some(Duration::from_secs(2));
        assert_eq!(secs(bounded_poll(answer(u64::MAX), two).expect("ok")), 2);
    }
}
