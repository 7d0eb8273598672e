//! Controller configuration: a TOML file (unknown keys refused), then `POSTERN_*` environment
//! overrides, validated into types at load time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or an override does not parse.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key or environment variable.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Everything a controller needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `sqlite://PATH` (default store) or `postgres://…`.
    pub database_url: String,
    /// HTTP API listen address.
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// QUIC cluster listen address (workers connect here).
    #[serde(default = "default_cluster_listen")]
    pub cluster_listen: SocketAddr,
    /// Cluster addresses announced to workers; the bound cluster address if empty.
    #[serde(default)]
    pub cluster_public_addrs: Vec<String>,
    /// File holding the base64 key-encryption key. `POSTERN_KEK` (base64) wins over it.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Lifetime of API tokens issued at login.
    #[serde(default = "default_token_ttl", with = "humantime_serde_compat")]
    pub token_ttl: Duration,
    /// Create user `admin` with a random password when the store has no users.
    #[serde(default)]
    pub bootstrap_admin: bool,
    /// Serve the API over plain HTTP. Allowed only on a loopback address.
    #[serde(default)]
    pub insecure_http: bool,
    /// OpenID Connect login methods (`[[oidc]]` sections).
    #[serde(default)]
    pub oidc: Vec<crate::oidc::OidcConfig>,
    /// Mirror every audit event as a JSON line to this file (for a SIEM shipper).
    #[serde(default)]
    pub audit_file: Option<PathBuf>,
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9200))
}
fn default_cluster_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9202))
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl ControllerConfig {
    /// The configuration `postern dev` uses: SQLite and a KEK file under `data_dir`, loopback
    /// listeners, plain HTTP, a bootstrap admin.
    pub fn dev(data_dir: &Path, api_listen: SocketAddr) -> Self {
        ControllerConfig {
            database_url: format!("sqlite://{}", data_dir.join("postern.db").display()),
            api_listen,
            cluster_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_public_addrs: Vec::new(),
            kek_file: Some(data_dir.join("kek")),
            token_ttl: default_token_ttl(),
            bootstrap_admin: true,
            insecure_http: true,
            oidc: Vec::new(),
            audit_file: None,
        }
    }

    /// Reads a TOML file and applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: ControllerConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `POSTERN_DATABASE_URL`, `POSTERN_API_LISTEN`, `POSTERN_CLUSTER_LISTEN`,
    /// `POSTERN_KEK_FILE`, `POSTERN_TOKEN_TTL`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Invalid {
                key: key.into(),
                message: e.to_string(),
            })
        }
        if let Some(v) = get("POSTERN_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = get("POSTERN_API_LISTEN") {
            self.api_listen = parse("POSTERN_API_LISTEN", &v)?;
        }
        if let Some(v) = get("POSTERN_CLUSTER_LISTEN") {
            self.cluster_listen = parse("POSTERN_CLUSTER_LISTEN", &v)?;
        }
        if let Some(v) = get("POSTERN_KEK_FILE") {
            self.kek_file = Some(v.into());
        }
        crate::oidc::config::apply_env(&mut self.oidc, &get);
        if let Some(v) = get("POSTERN_TOKEN_TTL") {
            self.token_ttl = humantime::parse_duration(&v).map_err(|e| ConfigError::Invalid {
                key: "POSTERN_TOKEN_TTL".into(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Checks values that parsing alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.insecure_http && !self.api_listen.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "insecure_http".into(),
                message: format!(
                    "plain HTTP is allowed only on loopback, not on {}",
                    self.api_listen
                ),
            });
        }
        if !self.insecure_http {
            return Err(ConfigError::Invalid {
                key: "insecure_http".into(),
                message: "serving the API over TLS is not implemented yet: set insecure_http = true and listen on loopback behind a TLS-terminating proxy".into(),
            });
        }
        crate::oidc::config::validate(&self.oidc)?;
        if self.token_ttl.as_secs() < 60 {
            return Err(ConfigError::Invalid {
                key: "token_ttl".into(),
                message: "must be at least 1 minute".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let ok: ControllerConfig = toml::from_str(
            "database_url = \"sqlite://x.db\"\ninsecure_http = true\ntoken_ttl = \"2h\"\n",
        )
        .expect("parses");
        assert_eq!(ok.token_ttl, Duration::from_secs(7200));
        assert!(ok.validate().is_ok());
        assert!(toml::from_str::<ControllerConfig>("database_url = \"x\"\nbogus = 1\n").is_err());
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let mut c = ControllerConfig::dev(Path::new("/tmp"), "0.0.0.0:9200".parse().expect("addr"));
        assert!(c.validate().is_err());
        c.apply_env(|k| (k == "POSTERN_API_LISTEN").then(|| "127.0.0.1:1".into()))
            .expect("env");
        assert!(c.validate().is_ok());
        assert!(c.apply_env(|_| Some("nope".into())).is_err());
    }
}
