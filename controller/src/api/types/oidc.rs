//! Bodies of the OpenID Connect login routes (`/v1/auth/methods`, `/v1/auth/oidc/…`).

use serde::{Deserialize, Serialize};

use super::LoginResponse;

/// `GET /v1/auth/methods`: how one may log in to this controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthMethods {
    /// Password first, then the OIDC methods in configuration order.
    pub methods: Vec<AuthMethod>,
}

/// One login method.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthMethod {
    /// `password` or `oidc`.
    pub kind: String,
    /// The method's name (`password` for passwords); what `--method` takes.
    pub name: String,
    /// The OIDC issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Whether `postern login --device` works with it.
    #[serde(default)]
    pub device_flow: bool,
}

/// `POST /v1/auth/oidc/start` and `POST /v1/auth/oidc/device`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcStartRequest {
    /// The OIDC method's name; the first configured one if absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Code flow: the port on 127.0.0.1 where the CLI that starts the login listens; the
    /// browser is sent there with the confirmation code once the identity provider is done.
    /// Without it, the callback page shows the code for the person to type in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_port: Option<u16>,
}

/// `POST /v1/auth/oidc/attempts/{id}`: collects a code-flow login's token with the
/// confirmation code its browser received.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfirmRequest {
    /// The confirmation code (case and dashes do not count).
    pub code: String,
}

/// A code-flow login started: open `auth_url`, then poll the attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OidcStart {
    /// The identity provider's authorization URL, for the browser.
    pub auth_url: String,
    /// What `GET /v1/auth/oidc/attempts/{id}` takes. A secret: whoever holds it collects the
    /// token.
    pub attempt_id: String,
    /// The method used.
    pub method: String,
    /// When the attempt expires.
    pub expires_at: i64,
}

/// A device-flow login started: show the URL and code, then poll the attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OidcDeviceStart {
    /// Where the user goes (on any device with a browser).
    pub verification_uri: String,
    /// The same with the code filled in, if the IdP offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// The code the user types there.
    pub user_code: String,
    /// What `GET /v1/auth/oidc/attempts/{id}` takes (a secret).
    pub attempt_id: String,
    /// The method used.
    pub method: String,
    /// When the attempt expires.
    pub expires_at: i64,
}

/// `GET /v1/auth/oidc/attempts/{id}`: where a login stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OidcAttempt {
    /// Waiting for the user at the identity provider.
    Pending {
        /// When the attempt expires.
        expires_at: i64,
    },
    /// Code flow: the identity provider is done; the token goes to whoever presents the
    /// confirmation code the browser received (`POST` to the attempt).
    Confirm {
        /// When the attempt expires.
        expires_at: i64,
    },
    /// Logged in: the API token, handed out once.
    Done(LoginResponse),
    /// The login failed; `message` says why.
    Failed {
        /// What went wrong, for a person.
        message: String,
    },
}
