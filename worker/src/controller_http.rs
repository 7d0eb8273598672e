//! The worker's HTTP(S) client of the controller API, used to register and to refresh the
//! cluster addresses. Over HTTPS it trusts, in this order: the CAs of `controller_ca_file`;
//! else, before registration, the cluster CA fetched from `/v1/cluster/ca` if its SHA-256
//! matches `controller_ca_fingerprint`; and, once registered, the saved cluster CA besides
//! the system's roots.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, WorkerConfig};
use crate::register::{error_chain, RegisterError};

/// The largest CA answer read when fetching the cluster CA.
const MAX_CA_BYTES: usize = 64 * 1024;

/// Checks the controller URL and the CA settings.
pub(crate) fn validate(config: &WorkerConfig) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(&config.controller_url).map_err(|e| ConfigError::Invalid {
        key: "controller_url",
        message: format!("{:?} is not a URL: {e}", config.controller_url),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::Invalid {
            key: "controller_url",
            message: "expected https://HOST:PORT (or http:// on loopback)".into(),
        });
    }
    if let Some(path) = &config.controller_ca_file {
        let pem = std::fs::read(path).map_err(|e| ConfigError::Invalid {
            key: "controller_ca_file",
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => {}
            Ok(_) => {
                return Err(ConfigError::Invalid {
                    key: "controller_ca_file",
                    message: format!("{} holds no PEM certificate", path.display()),
                })
            }
            Err(e) => {
                return Err(ConfigError::Invalid {
                    key: "controller_ca_file",
                    message: format!("{}: {e}", path.display()),
                })
            }
        }
    }
    if let Some(fp) = &config.controller_ca_fingerprint {
        if normalize_fingerprint(fp).is_none() {
            return Err(ConfigError::Invalid {
                key: "controller_ca_fingerprint",
                message: "expected the 64 hex digits of a SHA-256 (colons allowed)".into(),
            });
        }
    }
    Ok(())
}

/// Whether `url` sends the activation token in clear text to another machine.
pub(crate) fn plain_http_off_loopback(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    if url.scheme() != "http" {
        return false;
    }
    match url.host_str() {
        Some("localhost") | None => false,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map_or(true, |ip| !ip.is_loopback()),
    }
}

/// `sha256:AB:CD…` / `abcd…` → 64 lowercase hex digits.
pub fn normalize_fingerprint(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .unwrap_or(text);
    let hex: String = text
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

pub(crate) fn hex_sha256(der: &[u8]) -> String {
    postern_proto::hex(&Sha256::digest(der))
}

/// A client of the controller API with the trust described in the module docs.
/// `saved_ca` is the cluster CA saved at registration (empty before).
pub(crate) async fn client(
    config: &WorkerConfig,
    saved_ca: &[CertificateDer<'static>],
    timeout: Duration,
) -> Result<reqwest::Client, RegisterError> {
    // reqwest is built without a provider of its own; ring is the one in this tree.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = config.controller_url.trim_end_matches('/');
    let bad_ca = |reason: String| RegisterError::ControllerCa(reason);
    let mut explicit = Vec::new();
    if let Some(path) = &config.controller_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| bad_ca(format!("cannot read {}: {e}", path.display())))?;
        explicit = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| bad_ca(format!("{}: {e}", path.display())))?;
        if explicit.is_empty() {
            return Err(bad_ca(format!("{}: no certificate", path.display())));
        }
    } else if let (Some(fp), true) = (&config.controller_ca_fingerprint, saved_ca.is_empty()) {
        if url.starts_with("https://") {
            explicit.push(fetch_pinned_ca(url, fp, timeout).await?);
        }
    }
    let saved = saved_ca
        .iter()
        .map(|c| reqwest::Certificate::from_der(c.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_ca(format!("saved ca.pem: {e}")))?;
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .tls_version_min(reqwest::tls::Version::TLS_1_3)
        .user_agent(concat!("postern-worker/", env!("CARGO_PKG_VERSION")));
    builder = if !explicit.is_empty() {
        builder.tls_certs_only(explicit.into_iter().chain(saved))
    } else if !saved.is_empty() {
        builder.tls_certs_merge(saved)
    } else {
        builder
    };
    builder.build().map_err(|e| RegisterError::Unreachable {
        url: url.to_owned(),
        reason: error_chain(&e),
    })
}

/// Fetches `/v1/cluster/ca` without checking the server's certificate, and accepts the CA
/// only if its SHA-256 is `fingerprint`: the fingerprint, not the connection, is what is
/// trusted. Every later request is verified against the returned CA.
async fn fetch_pinned_ca(
    url: &str,
    fingerprint: &str,
    timeout: Duration,
) -> Result<reqwest::Certificate, RegisterError> {
    let want = normalize_fingerprint(fingerprint).ok_or_else(|| {
        RegisterError::ControllerCa("controller_ca_fingerprint is not a SHA-256".into())
    })?;
    let ca_url = format!("{url}/v1/cluster/ca");
    let unreachable = |e: reqwest::Error| RegisterError::Unreachable {
        url: ca_url.clone(),
        reason: error_chain(&e),
    };
    let danger_unverified = reqwest::Client::builder()
        .timeout(timeout)
        .tls_danger_accept_invalid_certs(true)
        .build()
        .map_err(unreachable)?;
    let mut response = danger_unverified
        .get(&ca_url)
        .send()
        .await
        .map_err(unreachable)?;
    let mut pem = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        pem.extend_from_slice(&chunk);
        if pem.len() > MAX_CA_BYTES {
            return Err(RegisterError::ControllerCa(format!(
                "{ca_url}: answer larger than 64 KiB"
            )));
        }
    }
    use rustls_pki_types::pem::PemObject as _;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| RegisterError::ControllerCa(format!("{ca_url}: no PEM certificate")))?;
    let got = hex_sha256(der.as_ref());
    if got != want {
        return Err(RegisterError::ControllerCa(format!(
            "the controller's CA has SHA-256 {got}, not controller_ca_fingerprint {want}"
        )));
    }
    reqwest::Certificate::from_der(der.as_ref())
        .map_err(|e| RegisterError::ControllerCa(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalise() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&hex).as_deref(), Some(hex.as_str()));
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{colons}")).as_deref(),
            Some(hex.as_str())
        );
        assert_eq!(normalize_fingerprint("abcd"), None);
    }

    #[test]
    fn plain_http_is_flagged_off_loopback() {
        assert!(!plain_http_off_loopback("http://127.0.0.1:9200"));
        assert!(!plain_http_off_loopback("http://localhost:9200"));
        assert!(!plain_http_off_loopback("https://postern.example.com"));
        assert!(plain_http_off_loopback("http://10.0.0.1:9200"));
    }
}
