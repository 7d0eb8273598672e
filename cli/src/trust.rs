//! Which CA to trust for an HTTPS controller at login (DESIGN §10: "a certificate from
//! config, or one from the cluster CA that the CLI pins at first login").
//!
//! In order: `--ca-file` (or a CA already pinned for this controller); the system's roots
//! (a certificate from a public or company CA needs no pin); else trust on first use: the
//! cluster CA is fetched from `/v1/cluster/ca` over an unverified connection, and is trusted
//! only if its SHA-256 equals `--ca-fingerprint` or a person at the terminal accepts it,
//! having compared it with the fingerprint the controller printed at start. The real login
//! then runs over a connection verified against that CA, which the profile keeps.

use anyhow::{anyhow, bail, Context as _, Result};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::client::{ApiClient, ApiError};
use crate::commands::Ctx;
use crate::prompt;

/// The largest CA answer read.
const MAX_CA_BYTES: usize = 64 * 1024;

/// The CA (PEM) to trust for `ctx.addr`, `None` for the system's roots.
pub async fn establish(
    ctx: &Ctx,
    fingerprint: Option<&str>,
    interactive: bool,
) -> Result<Option<String>> {
    let want = match fingerprint {
        Some(f) => Some(normalize_fingerprint(f).ok_or_else(|| {
            anyhow!("--ca-fingerprint must be the 64 hex digits of a SHA-256 (colons allowed)")
        })?),
        None => None,
    };
    if !ctx.addr.starts_with("https://") {
        if want.is_some() {
            bail!("--ca-fingerprint applies to https:// controllers only");
        }
        return Ok(ctx.ca_pem.clone());
    }
    if let Some(pem) = &ctx.ca_pem {
        // The saved pin stands unless a fingerprint given now names another CA: then the
        // controller's CA changed (a new cluster on the same address) and the person re-pins
        // it, on the same terms as a first login (the CA fetched must have that fingerprint).
        let repin = match &want {
            Some(want) => &pem_fingerprint(pem)? != want,
            None => false,
        };
        if !repin {
            return Ok(Some(pem.clone()));
        }
    }
    if want.is_none() {
        match probe(&ApiClient::new(&ctx.addr, None)?).await {
            Ok(()) => return Ok(None),
            Err(ApiError::Untrusted { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let pem = danger_fetch_unverified_ca(&ctx.addr).await?;
    let got = pem_fingerprint(&pem)?;
    match want {
        Some(want) if want == got => {}
        Some(want) => bail!(
            "the controller at {} presents a cluster CA with SHA-256 {got}, not {want}: \
             refusing it (is something between you and the controller?)",
            ctx.addr
        ),
        None if interactive => {
            crate::errln!(
                "The controller at {} uses a certificate from its own cluster CA, which this \
                 machine does not trust yet.\n  CA SHA-256 fingerprint: {got}\n  (the same: {})\n\
                 Compare it with the fingerprint the controller printed at start (\"cluster CA \
                 SHA-256 …\"), which is written the first way.",
                ctx.addr,
                colons(&got)
            );
            let answer = prompt::ask("Trust this CA for this controller? [y/N] ").await?;
            if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
                bail!("not trusted; nothing saved");
            }
        }
        None => bail!(
            "the controller at {} uses a certificate from its own cluster CA, with SHA-256 \
             fingerprint {got}; if that is the fingerprint the controller printed at start, \
             log in again with --ca-fingerprint {got} (or pass --ca-file FILE)",
            ctx.addr
        ),
    }
    probe(&ApiClient::with_ca(&ctx.addr, None, Some(&pem))?)
        .await
        .with_context(|| {
            format!(
                "the controller's certificate does not verify against its cluster CA (is {} \
                 among the controller's tls_names?)",
                ctx.addr
            )
        })?;
    Ok(Some(pem))
}

/// One anonymous call, to see whether the TLS connection is trusted.
async fn probe(api: &ApiClient) -> Result<(), ApiError> {
    api.get::<serde_json::Value>(&["v1", "auth", "methods"], &[])
        .await
        .map(drop)
}

/// Fetches `/v1/cluster/ca` without verifying the server: the caller trusts what it gets
/// only after checking its fingerprint.
async fn danger_fetch_unverified_ca(addr: &str) -> Result<String> {
    let url = format!("{addr}/v1/cluster/ca");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(15))
        .tls_danger_accept_invalid_certs(true)
        .build()
        .context("building an HTTP client")?;
    let mut response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot fetch {url}"))?;
    if !response.status().is_success() {
        bail!(
            "{url} answered {}: is this a Postern controller serving its cluster CA?",
            response.status()
        );
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.context("reading the CA")? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_CA_BYTES {
            bail!("{url}: answer larger than 64 KiB");
        }
    }
    String::from_utf8(body).context("the CA is not text")
}

/// SHA-256 (hex) of the first certificate in `pem`.
pub fn pem_fingerprint(pem: &str) -> Result<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| anyhow!("no PEM certificate in the controller's CA answer"))?;
    Ok(postern_proto::hex(&Sha256::digest(der.as_ref())))
}

/// `sha256:AB:CD…` / `abcd…` → 64 lowercase hex digits (the worker's own parser).
pub use postern_worker::normalize_fingerprint;

fn colons(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalise_and_print() {
        let hex = "0a".repeat(32);
        let pretty = colons(&hex);
        assert!(pretty.starts_with("0A:0A:"));
        assert_eq!(
            normalize_fingerprint(&pretty).as_deref(),
            Some(hex.as_str())
        );
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{hex}")).as_deref(),
            Some(hex.as_str())
        );
        assert_eq!(normalize_fingerprint("0a0a"), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }
}
