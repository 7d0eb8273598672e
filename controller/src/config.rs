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
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
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
    /// `sqlite://PATH` (default store) or `postgres://…`; may come from
    /// `POSTERN_DATABASE_URL(_FILE)` instead of the file.
    #[serde(default)]
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
    /// UDP address of the session relay for outbound-only workers (clients dial it instead
    /// of the worker); no relay if unset.
    #[serde(default)]
    pub relay_listen: Option<SocketAddr>,
    /// The relay address (`host:port`) given to clients; the bound relay address if unset.
    #[serde(default)]
    pub relay_public_addr: Option<String>,
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
    /// PEM certificate chain for the HTTPS API (with `tls_key_file`). Without it the
    /// controller issues itself a certificate from the cluster CA for `tls_names`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// DNS names and IP addresses the cluster-CA certificate names (the addresses clients
    /// and workers use); `localhost`, `127.0.0.1`, `::1` and a specific `api_listen` IP if empty.
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// OpenID Connect login methods (`[[oidc]]` sections).
    #[serde(default)]
    pub oidc: Vec<crate::oidc::OidcConfig>,
    /// Mirror every audit event as a JSON line to this file (for a SIEM shipper).
    #[serde(default)]
    pub audit_file: Option<PathBuf>,
    /// Largest shell recording stored, bytes of asciicast text; a session whose recording
    /// would grow past it is ended (its shell is never left unrecorded).
    #[serde(default = "default_recording_max_bytes")]
    pub recording_max_bytes: u64,
}

/// 256 MiB: hours of a busy terminal, and a bound on what one shell can make the store hold.
pub const DEFAULT_RECORDING_MAX_BYTES: u64 = 256 << 20;
/// Below this a recording could not hold one batch of a worker's events.
const MIN_RECORDING_MAX_BYTES: u64 = 64 << 10;
/// Longest `token_ttl`: a year and a day.
const MAX_TOKEN_TTL_SECS: u64 = 366 * 86_400;

fn default_recording_max_bytes() -> u64 {
    DEFAULT_RECORDING_MAX_BYTES
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
        postern_proto::parse_duration(&s).map_err(serde::de::Error::custom)
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
            relay_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            relay_public_addr: None,
            kek_file: Some(data_dir.join("kek")),
            token_ttl: default_token_ttl(),
            bootstrap_admin: true,
            insecure_http: true,
            tls_cert_file: None,
            tls_key_file: None,
            tls_names: Vec::new(),
            oidc: Vec::new(),
            audit_file: None,
            recording_max_bytes: DEFAULT_RECORDING_MAX_BYTES,
        }
    }

    /// Reads a TOML file and applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
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

    /// Applies `POSTERN_DATABASE_URL` (or `POSTERN_DATABASE_URL_FILE`), `POSTERN_API_LISTEN`,
    /// `POSTERN_CLUSTER_LISTEN`, `POSTERN_KEK_FILE`, `POSTERN_CLUSTER_PUBLIC_ADDRS` (comma-separated),
    /// `POSTERN_BOOTSTRAP_ADMIN`, `POSTERN_INSECURE_HTTP`, `POSTERN_AUDIT_FILE`,
    /// `POSTERN_TOKEN_TTL`, `POSTERN_TLS_CERT_FILE`, `POSTERN_TLS_KEY_FILE`,
    /// `POSTERN_TLS_NAMES` (comma-separated), `POSTERN_RELAY_LISTEN`,
    /// `POSTERN_RELAY_PUBLIC_ADDR`, `POSTERN_RECORDING_MAX_BYTES`.
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
        // The URL carries the database password: a file (a container or systemd secret)
        // keeps it out of the environment.
        if let Some(path) = get("POSTERN_DATABASE_URL_FILE") {
            self.database_url = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Invalid {
                    key: "POSTERN_DATABASE_URL_FILE".into(),
                    message: format!("cannot read {path}: {e}"),
                })?
                .trim()
                .to_owned();
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
        if let Some(v) = get("POSTERN_CLUSTER_PUBLIC_ADDRS") {
            self.cluster_public_addrs = v
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = get("POSTERN_BOOTSTRAP_ADMIN") {
            self.bootstrap_admin = parse("POSTERN_BOOTSTRAP_ADMIN", &v)?;
        }
        if let Some(v) = get("POSTERN_INSECURE_HTTP") {
            self.insecure_http = parse("POSTERN_INSECURE_HTTP", &v)?;
        }
        if let Some(v) = get("POSTERN_AUDIT_FILE") {
            self.audit_file = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = get("POSTERN_RELAY_LISTEN") {
            self.relay_listen = Some(parse("POSTERN_RELAY_LISTEN", &v)?);
        }
        if let Some(v) = get("POSTERN_RELAY_PUBLIC_ADDR") {
            self.relay_public_addr = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("POSTERN_RECORDING_MAX_BYTES") {
            self.recording_max_bytes = parse("POSTERN_RECORDING_MAX_BYTES", &v)?;
        }
        crate::oidc::config::apply_env(&mut self.oidc, &get);
        crate::tls::apply_env(self, &get);
        if let Some(v) = get("POSTERN_TOKEN_TTL") {
            self.token_ttl =
                postern_proto::parse_duration(&v).map_err(|message| ConfigError::Invalid {
                    key: "POSTERN_TOKEN_TTL".into(),
                    message,
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
        let url = self.database_url.as_str();
        if url.is_empty() {
            return Err(ConfigError::Invalid {
                key: "database_url".into(),
                message: "not set: give it in the file or as POSTERN_DATABASE_URL / \
                          POSTERN_DATABASE_URL_FILE"
                    .into(),
            });
        }
        if !["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(ConfigError::Invalid {
                key: "database_url".into(),
                message: format!("{url:?}: expected sqlite://PATH or postgres://USER@HOST:PORT/DB"),
            });
        }
        // This build's PostgreSQL driver has no TLS (one crypto stack, ring, in the tree).
        if ["require", "verify-ca", "verify-full"]
            .iter()
            .any(|mode| url.contains(&format!("sslmode={mode}")))
        {
            return Err(ConfigError::Invalid {
                key: "database_url".into(),
                message: "TLS to PostgreSQL (sslmode=require/verify-*) is not built in: reach the \
                          database over loopback, a Unix socket or a private network, or through a \
                          TLS tunnel"
                    .into(),
            });
        }
        if let Some(kek) = self.kek_file.as_deref().filter(|p| p.is_dir()) {
            return Err(ConfigError::Invalid {
                key: "kek_file".into(),
                message: format!("{} is a directory, not a key file", kek.display()),
            });
        }
        if let Some(file) = &self.audit_file {
            let dir = file
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if file.is_dir() || !dir.is_dir() {
                return Err(ConfigError::Invalid {
                    key: "audit_file".into(),
                    message: format!(
                        "{}: expected a file in an existing directory",
                        file.display()
                    ),
                });
            }
        }
        crate::tls::validate(self)?;
        crate::oidc::config::validate(&self.oidc)?;
        // The default callback is the API's own address, which a browser cannot be sent to
        // when it is "any address".
        if self.api_listen.ip().is_unspecified() {
            if let Some(m) = self.oidc.iter().find(|m| m.redirect_url.is_none()) {
                return Err(ConfigError::Invalid {
                    key: "oidc.redirect_url".into(),
                    message: format!(
                        "login method '{}' needs a redirect_url: the API listens on {}, which a \
                         browser cannot be sent back to; set it to \
                         https://NAME/v1/auth/oidc/callback, NAME being how people reach the API \
                         (and registered at the identity provider)",
                        m.name, self.api_listen
                    ),
                });
            }
        }
        if !(MIN_RECORDING_MAX_BYTES..=i64::MAX as u64).contains(&self.recording_max_bytes) {
            return Err(ConfigError::Invalid {
                key: "recording_max_bytes".into(),
                message: format!(
                    "{} bytes: expected at least {MIN_RECORDING_MAX_BYTES} (64 KiB)",
                    self.recording_max_bytes
                ),
            });
        }
        let announced = self
            .cluster_public_addrs
            .iter()
            .map(|a| ("cluster_public_addrs", a))
            .chain(
                self.relay_public_addr
                    .iter()
                    .map(|a| ("relay_public_addr", a)),
            );
        for (key, addr) in announced {
            if !is_host_port(addr) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!(
                        "{addr:?}: expected HOST:PORT (a name or address, and a port)"
                    ),
                });
            }
        }
        if !(60..=MAX_TOKEN_TTL_SECS).contains(&self.token_ttl.as_secs()) {
            return Err(ConfigError::Invalid {
                key: "token_ttl".into(),
                message: "must be between 1 minute and 366 days".into(),
            });
        }
        Ok(())
    }
}

/// `host:port` or `[v6]:port`, as workers and clients dial it.
fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains([':', '/', ' ', '[', ']']),
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
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
        for good in ["postern.example.com:9202", "10.0.0.1:9202", "[::1]:9202"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "not an addr",
            "nohost",
            ":9202",
            "h:0",
            "h:99999",
            "::1:9202",
            "h/x:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
        for ttl in [Duration::from_secs(59), Duration::from_secs(u64::MAX)] {
            let bad = ControllerConfig {
                token_ttl: ttl,
                ..ok.clone()
            };
            assert!(bad.validate().is_err(), "token_ttl {ttl:?}");
        }
    }

    #[test]
    fn store_key_and_audit_paths_are_checked() {
        let dir = std::env::temp_dir();
        let base = || ControllerConfig::dev(&dir, "127.0.0.1:9200".parse().expect("addr"));
        let key_of = |c: ControllerConfig| match c.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert!(base().validate().is_ok());
        let mut c = base();
        c.database_url = "mysql://x/y".into();
        assert_eq!(key_of(c), "database_url");
        let mut c = base();
        c.database_url = "postgres://postgres@127.0.0.1:5432/postern".into();
        assert!(c.validate().is_ok());
        let mut c = base();
        c.database_url = "postgres://u@db.internal:5432/postern?sslmode=require".into();
        assert_eq!(key_of(c), "database_url");
        let mut c = base();
        c.kek_file = Some(dir.clone());
        assert_eq!(key_of(c), "kek_file");
        let mut c = base();
        c.api_listen = "0.0.0.0:9200".parse().expect("addr");
        c.insecure_http = false;
        c.oidc = vec![crate::oidc::OidcConfig::new(
            "corp",
            "https://idp.example",
            "c",
            None,
        )];
        assert_eq!(key_of(c.clone()), "oidc.redirect_url");
        c.oidc[0].redirect_url = Some("https://postern.example/v1/auth/oidc/callback".into());
        assert!(c.validate().is_ok());
        for bad in [dir.join("no-such-dir").join("audit.jsonl"), dir.clone()] {
            let mut c = base();
            c.audit_file = Some(bad);
            assert_eq!(key_of(c), "audit_file");
        }
        let mut c = base();
        c.audit_file = Some(dir.join("audit.jsonl"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn recording_size_limit_from_file_and_environment() {
        let c: ControllerConfig =
            toml::from_str("database_url = \"sqlite://x.db\"\n").expect("defaults");
        assert_eq!(c.recording_max_bytes, DEFAULT_RECORDING_MAX_BYTES);
        let mut c =
            ControllerConfig::dev(Path::new("/tmp"), "127.0.0.1:9200".parse().expect("addr"));
        c.apply_env(|k| (k == "POSTERN_RECORDING_MAX_BYTES").then(|| "1048576".into()))
            .expect("a number");
        assert_eq!(c.recording_max_bytes, 1 << 20);
        assert!(c.validate().is_ok());
        let bad = c.apply_env(|k| (k == "POSTERN_RECORDING_MAX_BYTES").then(|| "1MB".into()));
        assert!(
            matches!(bad, Err(ConfigError::Invalid { key, .. }) if key == "POSTERN_RECORDING_MAX_BYTES")
        );
        c.recording_max_bytes = 1000;
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "recording_max_bytes")
        );
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
