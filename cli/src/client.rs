//! The HTTP client of the controller's `/v1` API.
//!
//! Every failure becomes an [`ApiError`] whose text is what a person should read: the
//! controller's own `message` for API errors, and a hint for the usual set-up mistakes (nothing
//! listening, not logged in, expired token).

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::{de::DeserializeOwned, Serialize};

use postern_controller::api::types::ErrorBody;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The controller address is not a URL.
    #[error("'{addr}' is not a controller URL (expected e.g. http://127.0.0.1:9200): {detail}")]
    BadAddr {
        /// The address given.
        addr: String,
        /// Why it does not parse.
        detail: String,
    },
    /// Nothing answered at the address.
    #[error("cannot reach the controller at {addr}: {detail}; is it running? (`postern dev` starts one)")]
    Unreachable {
        /// The controller URL.
        addr: String,
        /// The transport error.
        detail: String,
    },
    /// An `https://` address answered in plain HTTP.
    #[error("the controller at {addr} does not speak HTTPS (it answered in plain HTTP): use {plain} — only `postern dev` serves plain HTTP, on loopback")]
    NotTls {
        /// The controller URL.
        addr: String,
        /// The same with `http://`.
        plain: String,
    },
    /// An `http://` address answered in TLS.
    #[error("the controller at {addr} speaks HTTPS: use {tls} (and `postern login --addr {tls}` to trust its CA)")]
    WantsTls {
        /// The controller URL.
        addr: String,
        /// The same with `https://`.
        tls: String,
    },
    /// The controller's HTTPS certificate is not trusted here.
    #[error("the controller at {addr} presented a certificate this machine does not trust ({detail}): run `postern login --addr {addr}` to pin its CA, or pass --ca-file FILE; if its CA changed, `postern login --addr {addr} --ca-fingerprint SHA256` pins the new one")]
    Untrusted {
        /// The controller URL.
        addr: String,
        /// rustls' reason.
        detail: String,
    },
    /// No token was given or saved.
    #[error("not logged in: run `postern login` (or `postern dev`)")]
    NotLoggedIn,
    /// The token was refused.
    #[error("your session token is invalid or expired: run `postern login` (`postern login --oidc` if you signed in through single sign-on)")]
    Unauthenticated,
    /// The controller answered with an error body.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Machine-readable code (`not_found`, `forbidden`, ...).
        code: String,
        /// The controller's explanation.
        message: String,
    },
    /// A name in the request's path is empty (`postern targets show ''`).
    #[error("an empty name was given{}: name what you mean", after.as_deref().map(|a| format!(" after '{a}'")).unwrap_or_default())]
    EmptyName {
        /// The path segment before it (`targets`, `users`, ...).
        after: Option<String>,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the controller ({context}): {detail}")]
    BadResponse {
        /// Which call.
        context: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl ApiError {
    /// Whether the controller said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Api { status: 404, .. })
    }
}

/// A client of one controller, with or without a token.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    addr: String,
    token: Option<String>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ApiClient {
    /// A client of the controller at `addr` (already normalised, see
    /// [`crate::profile::normalize_addr`]).
    pub fn new(addr: &str, token: Option<String>) -> Result<ApiClient, ApiError> {
        Self::with_ca(addr, token, None)
    }

    /// Like [`ApiClient::new`], trusting only the CA certificates of `ca_pem` (PEM) for
    /// HTTPS instead of the system's roots.
    pub fn with_ca(
        addr: &str,
        token: Option<String>,
        ca_pem: Option<&str>,
    ) -> Result<ApiClient, ApiError> {
        // reqwest is built without a bundled provider; a library caller may not have
        // installed one yet. Installing twice is harmless (the second call returns Err).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bad_addr = |detail: String| ApiError::BadAddr {
            addr: addr.to_owned(),
            detail,
        };
        let base = Url::parse(addr).map_err(|e| bad_addr(e.to_string()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(bad_addr("the scheme must be http or https".into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("postern-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| bad_addr(format!("the CA to trust is not PEM: {e}")))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| bad_addr(format!("cannot build an HTTP client: {e}")))?;
        Ok(ApiClient {
            http,
            base,
            addr: addr.to_owned(),
            token,
        })
    }

    /// The controller URL.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether a token will be sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `GET` a path given as segments (each is percent-encoded), with query pairs.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        let resp = self.send(Method::GET, path, query, None::<&()>).await?;
        json(resp, path).await
    }

    /// `GET` a path whose answer is text, not JSON (an asciicast recording).
    pub async fn get_text(&self, path: &[&str]) -> Result<String, ApiError> {
        let resp = self.send(Method::GET, path, &[], None::<&()>).await?;
        resp.text().await.map_err(|e| ApiError::BadResponse {
            context: format!("/{}", path.join("/")),
            detail: error_chain(&e),
        })
    }

    /// `POST` a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &[&str],
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self.send(Method::POST, path, &[], Some(body)).await?;
        json(resp, path).await
    }

    /// `POST` without a body, expecting a JSON answer.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &[&str]) -> Result<T, ApiError> {
        let resp = self.send(Method::POST, path, &[], None::<&()>).await?;
        json(resp, path).await
    }

    /// `POST` without a body, ignoring the answer's body (204).
    pub async fn post_no_content(&self, path: &[&str]) -> Result<(), ApiError> {
        self.send(Method::POST, path, &[], None::<&()>).await?;
        Ok(())
    }

    /// `PUT` a JSON body.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &[&str],
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self.send(Method::PUT, path, &[], Some(body)).await?;
        json(resp, path).await
    }

    /// `PATCH` a JSON body.
    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &[&str],
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self.send(Method::PATCH, path, &[], Some(body)).await?;
        json(resp, path).await
    }

    /// `DELETE`, expecting 204 (any JSON answer is ignored).
    pub async fn delete(&self, path: &[&str]) -> Result<(), ApiError> {
        self.send(Method::DELETE, path, &[], None::<&()>).await?;
        Ok(())
    }

    /// `DELETE`, expecting a JSON answer.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &[&str]) -> Result<T, ApiError> {
        let resp = self.send(Method::DELETE, path, &[], None::<&()>).await?;
        json(resp, path).await
    }

    /// Builds the URL, sends, and turns any non-2xx answer into an [`ApiError`].
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<reqwest::Response, ApiError> {
        // An empty segment would ask for another route (`/v1/targets/` is the list), which
        // answers with a bare 404 or, worse, something else.
        if let Some(i) = path.iter().position(|s| s.trim().is_empty()) {
            return Err(ApiError::EmptyName {
                after: i.checked_sub(1).map(|j| path[j].to_owned()),
            });
        }
        let url = self.url(path, query)?;
        let mut req = self.http.request(method, url);
        // Only the login calls go without a token; every other route needs one.
        let anonymous = path == ["v1", "auth", "login"]
            || path == ["v1", "auth", "methods"]
            || path.starts_with(&["v1", "auth", "oidc"]);
        if !anonymous {
            let token = self.token.as_deref().ok_or(ApiError::NotLoggedIn)?;
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        let parsed: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        if status == StatusCode::UNAUTHORIZED && !anonymous {
            return Err(ApiError::Unauthenticated);
        }
        Err(match parsed {
            Some(b) => ApiError::Api {
                status: status.as_u16(),
                code: b.error,
                message: b.message,
            },
            None => ApiError::Api {
                status: status.as_u16(),
                code: status.as_str().to_owned(),
                message: format!(
                    "the controller answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).trim()
                ),
            },
        })
    }

    fn url(&self, path: &[&str], query: &[(&str, String)]) -> Result<Url, ApiError> {
        let mut url = self.base.clone();
        {
            let mut segs = url.path_segments_mut().map_err(|()| ApiError::BadAddr {
                addr: self.addr.clone(),
                detail: "cannot hold a path".into(),
            })?;
            segs.pop_if_empty();
            segs.extend(path);
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url)
    }

    fn transport_error(&self, e: reqwest::Error) -> ApiError {
        let chain = error_chain(&e);
        // rustls, reading an HTTP answer as a TLS record.
        if chain.contains("InvalidContentType") && self.addr.starts_with("https://") {
            ApiError::NotTls {
                addr: self.addr.clone(),
                plain: self.addr.replacen("https://", "http://", 1),
            }
        } else if chain.contains("invalid HTTP version") && self.addr.starts_with("http://") {
            // hyper, reading a TLS alert as an HTTP answer.
            ApiError::WantsTls {
                addr: self.addr.clone(),
                tls: self.addr.replacen("http://", "https://", 1),
            }
        } else if e.is_connect() && chain.contains("certificate") {
            ApiError::Untrusted {
                addr: self.addr.clone(),
                detail: root_cause(&e),
            }
        } else if e.is_connect() || e.is_timeout() {
            ApiError::Unreachable {
                addr: self.addr.clone(),
                detail: root_cause(&e),
            }
        } else {
            ApiError::BadResponse {
                context: self.addr.clone(),
                detail: error_chain(&e),
            }
        }
    }
}

async fn json<T: DeserializeOwned>(resp: reqwest::Response, path: &[&str]) -> Result<T, ApiError> {
    let context = || format!("/{}", path.join("/"));
    let bytes = resp.bytes().await.map_err(|e| ApiError::BadResponse {
        context: context(),
        detail: error_chain(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadResponse {
        context: context(),
        detail: e.to_string(),
    })
}

/// reqwest's `Display` hides the cause ("error sending request"); show the whole chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// The innermost cause ("Connection refused (os error 111)"), which is what a person needs.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that reads one request and answers `reply`; its port.
    async fn answers_once(reply: &'static [u8]) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        port
    }

    /// The error of a `GET /v1/targets` to `addr`.
    async fn error_from(addr: &str) -> ApiError {
        let api = ApiClient::new(addr, Some("token".into())).expect("client");
        api.get::<serde_json::Value>(&["v1", "targets"], &[])
            .await
            .expect_err("no answer of the expected kind")
    }

    /// What a plain-HTTP server (`postern dev`) answers to a TLS hello.
    #[tokio::test]
    async fn https_to_a_plain_http_server_says_so() {
        let port = answers_once(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        let err = error_from(&format!("https://127.0.0.1:{port}")).await;
        assert!(matches!(err, ApiError::NotTls { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("use http://127.0.0.1:{port}")),
            "{err}"
        );
    }

    /// What a TLS server answers to a plain HTTP request: a fatal "protocol version" alert,
    /// as rustls sends it.
    #[tokio::test]
    async fn http_to_a_tls_server_says_so() {
        let port = answers_once(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]).await;
        let err = error_from(&format!("http://127.0.0.1:{port}")).await;
        assert!(matches!(err, ApiError::WantsTls { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("use https://127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_empty_name_is_refused_before_any_request() {
        // Nothing listens on port 9: only a check made before sending can answer.
        let api = ApiClient::new("http://127.0.0.1:9", Some("token".into())).expect("client");
        let err = api
            .get::<serde_json::Value>(&["v1", "targets", " "], &[])
            .await
            .expect_err("empty name");
        assert!(
            matches!(&err, ApiError::EmptyName { after: Some(a) } if a == "targets"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "an empty name was given after 'targets': name what you mean"
        );
    }
}
