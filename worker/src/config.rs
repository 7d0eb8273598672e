//! The worker's configuration: a TOML file (`deny_unknown_fields`, human durations such as
//! `"15s"`), then `POSTERN_*` environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The session port clients reach the worker on unless configured otherwise.
const DEFAULT_SESSION_PORT: u16 = 9203;
/// How long the worker keeps sessions alive without its controller.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(15);

/// The worker's configuration. Its `Debug` hides the activation token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// HTTP base URL of the controller API, e.g. `http://127.0.0.1:9200`; used to register.
    pub controller_url: String,
    /// One-time activation token from `postern workers create NAME`; needed only until the
    /// worker is registered.
    #[serde(default)]
    pub activation_token: Option<String>,
    /// Holds `key.pem`, `cert.pem`, `ca.pem` and `worker.json`.
    pub data_dir: PathBuf,
    /// Address of the session listener (QUIC); port 0 picks a free port.
    #[serde(default = "default_session_listen")]
    pub session_listen: SocketAddr,
    /// Address (`host:port`) advertised to clients; defaults to the bound session address.
    #[serde(default)]
    pub public_addr: Option<String>,
    /// Session lanes (1–64, default 1): endpoints sharing the session port (`SO_REUSEPORT`),
    /// each on a thread of its own, so that one session spread over several connections
    /// (`postern connect --lanes N`) is served by several CPUs. Direct mode only.
    #[serde(default = "default_session_lanes")]
    pub session_lanes: u32,
    /// `direct` (default): clients dial `session_listen`. `outbound-only`: the worker listens
    /// on nothing and clients reach it through the relay of the controller it is connected
    /// to (for a worker in a network nothing can connect into); `session_listen` and
    /// `public_addr` are then unused.
    #[serde(default)]
    pub mode: postern_proto::cluster::WorkerMode,
    /// How long sessions survive without the controller before the worker ends them all.
    #[serde(
        default = "default_grace_period",
        deserialize_with = "deserialize_duration"
    )]
    pub grace_period: Duration,
    /// `[postgres]`: the PostgreSQL proxy's settings.
    #[serde(default)]
    pub postgres: crate::postgres::PostgresConfig,
    /// PEM file of the CA(s) that sign the controller API's HTTPS certificate (its cluster CA
    /// or the issuer of its `tls_cert_file`); the system's roots if absent.
    #[serde(default)]
    pub controller_ca_file: Option<PathBuf>,
    /// SHA-256 (hex) of the controller's cluster CA certificate, as the controller logs it:
    /// at registration the worker fetches the CA and trusts it only if it matches.
    #[serde(default)]
    pub controller_ca_fingerprint: Option<String>,
    /// Address of the health and metrics listener (`/healthz`, `/readyz`, `/metrics`, plain
    /// HTTP); off if absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read worker config {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not a valid worker config.
    #[error("invalid worker config {path}: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        error: Box<toml::de::Error>,
    },
    /// A setting is invalid.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// An environment override has an invalid value.
    #[error("invalid value {value:?} in {var}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("controller_url", &self.controller_url)
            .field(
                "activation_token",
                &self.activation_token.as_ref().map(|_| "***"),
            )
            .field("data_dir", &self.data_dir)
            .field("session_listen", &self.session_listen)
            .field("public_addr", &self.public_addr)
            .field("session_lanes", &self.session_lanes)
            .field("mode", &self.mode)
            .field("grace_period", &self.grace_period)
            .field("postgres", &self.postgres)
            .field("controller_ca_file", &self.controller_ca_file)
            .field("controller_ca_fingerprint", &self.controller_ca_fingerprint)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

impl WorkerConfig {
    /// A worker of the controller at `controller_url` keeping its state in `data_dir`, its
    /// session listener on a free loopback port, everything else at its default (what
    /// `postern dev` and the tests run).
    pub fn loopback(controller_url: &str, data_dir: &Path) -> Self {
        WorkerConfig {
            controller_url: controller_url.to_owned(),
            activation_token: None,
            data_dir: data_dir.to_owned(),
            session_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_addr: None,
            session_lanes: default_session_lanes(),
            mode: Default::default(),
            grace_period: default_grace_period(),
            postgres: Default::default(),
            controller_ca_file: None,
            controller_ca_fingerprint: None,
            metrics_listen: None,
        }
    }

    /// Reads a TOML config file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        Ok(Self::load(path.as_ref())?)
    }

    /// Applies `POSTERN_CONTROLLER_URL`, `POSTERN_ACTIVATION_TOKEN` (or
    /// `POSTERN_ACTIVATION_TOKEN_FILE`), `POSTERN_DATA_DIR`, `POSTERN_SESSION_LISTEN`,
    /// `POSTERN_PUBLIC_ADDR`, `POSTERN_SESSION_LANES`, `POSTERN_MODE`, `POSTERN_GRACE_PERIOD`,
    /// `POSTERN_POSTGRES_AUDIT_STATEMENT_LIMIT`, `POSTERN_CONTROLLER_CA_FILE`,
    /// `POSTERN_CONTROLLER_CA_FINGERPRINT` and `POSTERN_METRICS_LISTEN`. A variable
    /// with an invalid value is logged and ignored; use [`Self::try_apply_env`] to refuse it.
    pub fn apply_env(&mut self) {
        if let Err(e) = self.try_apply_env() {
            tracing::warn!("ignoring environment override: {e}");
        }
    }

    /// Like [`Self::apply_env`], but stops at the first invalid value and reports it.
    pub fn try_apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_env_from(|var| std::env::var(var).ok())
    }

    /// Checks what parsing alone cannot: the controller URL, the CA fingerprint, the
    /// statement limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grace_period > MAX_GRACE_PERIOD {
            return Err(ConfigError::Invalid {
                key: "grace_period",
                message: format!(
                    "{} s ({:.1} days) is longer than the most sessions may outlive their \
                     controller (30 days)",
                    self.grace_period.as_secs(),
                    self.grace_period.as_secs_f64() / 86_400.0
                ),
            });
        }
        if !(1..=MAX_SESSION_LANES).contains(&self.session_lanes) {
            return Err(ConfigError::Invalid {
                key: "session_lanes",
                message: format!(
                    "{}: give 1 to {MAX_SESSION_LANES} (one per CPU serves a session's \
                     connections on every CPU)",
                    self.session_lanes
                ),
            });
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: format!("{} exists and is not a directory", self.data_dir.display()),
            });
        }
        if let Some(addr) = &self.public_addr {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                return Err(ConfigError::Invalid {
                    key: "public_addr",
                    message: format!("{addr:?}: expected HOST:PORT with a port from 1 to 65535"),
                });
            }
        }
        self.postgres.validate()?;
        crate::controller_http::validate(self)
    }

    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// The overrides, reading variables through `get` (so they can be tested without
    /// touching the process environment).
    fn apply_env_from(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("POSTERN_CONTROLLER_URL") {
            self.controller_url = v;
        }
        if let Some(v) = get("POSTERN_ACTIVATION_TOKEN") {
            self.activation_token = (!v.is_empty()).then_some(v);
        }
        // A file (a container or systemd secret) keeps the token out of the environment.
        // It is needed for the first start only, so a missing file is no error.
        if let Some(path) = get("POSTERN_ACTIVATION_TOKEN_FILE") {
            match std::fs::read_to_string(&path) {
                Ok(token) => {
                    let token = token.trim();
                    self.activation_token = (!token.is_empty()).then(|| token.to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ConfigError::Env {
                        var: "POSTERN_ACTIVATION_TOKEN_FILE",
                        reason: e.to_string(),
                        value: path,
                    })
                }
            }
        }
        if let Some(v) = get("POSTERN_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("POSTERN_SESSION_LISTEN") {
            self.session_listen = v.parse().map_err(|e| ConfigError::Env {
                var: "POSTERN_SESSION_LISTEN",
                reason: format!("{e} (expected IP:PORT)"),
                value: v,
            })?;
        }
        if let Some(v) = get("POSTERN_PUBLIC_ADDR") {
            self.public_addr = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("POSTERN_SESSION_LANES") {
            self.session_lanes = v.parse().map_err(|e| ConfigError::Env {
                var: "POSTERN_SESSION_LANES",
                reason: format!("{e}"),
                value: v,
            })?;
        }
        if let Some(v) = get("POSTERN_MODE") {
            self.mode = match v.as_str() {
                "direct" => postern_proto::cluster::WorkerMode::Direct,
                "outbound-only" => postern_proto::cluster::WorkerMode::OutboundOnly,
                _ => {
                    return Err(ConfigError::Env {
                        var: "POSTERN_MODE",
                        reason: "expected direct or outbound-only".into(),
                        value: v,
                    })
                }
            };
        }
        if let Some(v) = get("POSTERN_GRACE_PERIOD") {
            self.grace_period =
                postern_proto::parse_duration(&v).map_err(|reason| ConfigError::Env {
                    var: "POSTERN_GRACE_PERIOD",
                    reason,
                    value: v,
                })?;
        }
        if let Some(v) = get("POSTERN_CONTROLLER_CA_FILE") {
            self.controller_ca_file = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = get("POSTERN_CONTROLLER_CA_FINGERPRINT") {
            self.controller_ca_fingerprint = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = get("POSTERN_METRICS_LISTEN") {
            self.metrics_listen = if v.is_empty() {
                None
            } else {
                Some(v.parse().map_err(|e| ConfigError::Env {
                    var: "POSTERN_METRICS_LISTEN",
                    reason: format!("{e} (expected IP:PORT)"),
                    value: v,
                })?)
            };
        }
        if let Some(v) = get("POSTERN_POSTGRES_AUDIT_STATEMENT_LIMIT") {
            self.postgres.audit_statement_limit = v.parse().map_err(|e| ConfigError::Env {
                var: "POSTERN_POSTGRES_AUDIT_STATEMENT_LIMIT",
                reason: format!("{e} (expected a number of bytes)"),
                value: v,
            })?;
        }
        Ok(())
    }
}

/// The most session lanes a worker runs (threads, each with a socket and endpoint).
pub const MAX_SESSION_LANES: u32 = 64;

fn default_session_lanes() -> u32 {
    1
}

fn default_session_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_SESSION_PORT))
}

/// The longest `grace_period`.
const MAX_GRACE_PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);

fn default_grace_period() -> Duration {
    DEFAULT_GRACE_PERIOD
}

/// Parses `"15s"`, `"1m 30s"` and the like.
fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    postern_proto::parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_durations() {
        let c: WorkerConfig =
            toml::from_str("controller_url = \"http://127.0.0.1:9200\"\ndata_dir = \"/tmp/w\"\n")
                .expect("parses");
        assert_eq!(c.grace_period, DEFAULT_GRACE_PERIOD);
        assert_eq!(c.session_listen.to_string(), "127.0.0.1:9203");
        let c: WorkerConfig =
            toml::from_str("controller_url = \"x\"\ndata_dir = \"d\"\ngrace_period = \"1m 5s\"\n")
                .expect("parses");
        assert_eq!(c.grace_period, Duration::from_secs(65));
        assert_eq!(c.mode, postern_proto::cluster::WorkerMode::Direct);
        let c: WorkerConfig =
            toml::from_str("controller_url = \"x\"\ndata_dir = \"d\"\nmode = \"outbound-only\"\n")
                .expect("parses");
        assert_eq!(c.mode, postern_proto::cluster::WorkerMode::OutboundOnly);
        assert!(toml::from_str::<WorkerConfig>(
            "controller_url = \"x\"\ndata_dir = \"d\"\nmode = \"inbound\"\n"
        )
        .is_err());
        assert!(toml::from_str::<WorkerConfig>(
            "controller_url = \"x\"\ndata_dir = \"d\"\nbogus = 1\n"
        )
        .is_err());
    }

    #[test]
    fn env_overrides() {
        let mut c: WorkerConfig =
            toml::from_str("controller_url = \"x\"\ndata_dir = \"d\"\n").expect("parses");
        c.apply_env_from(|v| match v {
            "POSTERN_GRACE_PERIOD" => Some("2s".into()),
            "POSTERN_SESSION_LISTEN" => Some("127.0.0.1:0".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.grace_period, Duration::from_secs(2));
        assert_eq!(c.session_listen.port(), 0);
        let bad = c.apply_env_from(|v| (v == "POSTERN_GRACE_PERIOD").then(|| "soon".into()));
        assert!(matches!(bad, Err(ConfigError::Env { .. })));
    }

    #[test]
    fn paths_and_addresses_are_checked() {
        let base = || -> WorkerConfig {
            toml::from_str("controller_url = \"http://127.0.0.1:9200\"\ndata_dir = \"/tmp/w\"\n")
                .expect("parses")
        };
        let file = std::env::temp_dir().join(format!(
            "postern-cfg-{}",
            postern_proto::ids::random_base32(6)
        ));
        std::fs::write(&file, "not a certificate\n").expect("write");
        let key_of = |c: WorkerConfig| match c.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let mut c = base();
        c.data_dir = file.clone();
        assert_eq!(key_of(c), "data_dir");
        for bad in ["host:99999", "host", ":443", "host:0"] {
            let mut c = base();
            c.public_addr = Some(bad.into());
            assert_eq!(key_of(c), "public_addr", "{bad}");
        }
        let mut c = base();
        c.public_addr = Some("[::1]:9203".into());
        assert!(c.validate().is_ok());
        let mut c = base();
        c.controller_ca_file = Some(file.clone());
        assert_eq!(key_of(c), "controller_ca_file");
        let mut c = base();
        c.controller_ca_file = Some(file.with_extension("missing"));
        assert_eq!(key_of(c), "controller_ca_file");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn the_grace_period_is_bounded() {
        let with = |grace: &str| {
            let mut c: WorkerConfig =
                toml::from_str("controller_url = \"http://127.0.0.1:9200\"\ndata_dir = \"d\"\n")
                    .expect("parses");
            c.apply_env_from(|v| (v == "POSTERN_GRACE_PERIOD").then(|| grace.to_owned()))
                .expect("a duration");
            c.validate()
        };
        assert!(with("30days").is_ok());
        let err = with("5000000000000000h").expect_err("absurd");
        assert!(
            err.to_string().contains("invalid setting grace_period"),
            "{err}"
        );
    }

    #[test]
    fn the_statement_limit_is_bounded() {
        let with = |limit: &str| {
            let mut c: WorkerConfig =
                toml::from_str("controller_url = \"http://127.0.0.1:9200\"\ndata_dir = \"d\"\n")
                    .expect("parses");
            c.apply_env_from(|v| {
                (v == "POSTERN_POSTGRES_AUDIT_STATEMENT_LIMIT").then(|| limit.to_owned())
            })
            .expect("a number");
            c.validate()
        };
        assert!(with("0").is_ok(), "no statement text at all is a choice");
        assert!(with("16384").is_ok());
        let err = with("16385").expect_err("too long to fit an event");
        assert!(
            err.to_string()
                .contains("invalid setting [postgres] audit_statement_limit: 16385"),
            "{err}"
        );
    }
}
