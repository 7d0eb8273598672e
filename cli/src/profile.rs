//! The saved profile (`profile.json` in the config dir): which controller, which token, which
//! user. The file is written with mode 0600 in a 0700 directory, atomically (temp + rename),
//! and the token never appears in `Debug` output.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Controller URL used when neither a flag, the environment nor the profile names one.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:9200";

/// What `postern login` remembers.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Controller URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// API token for that controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The user the token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The CA (PEM) pinned at the first HTTPS login to `addr`, trusted for that controller
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("user", &self.user)
            .field("ca_pinned", &self.ca_pem.is_some())
            .finish()
    }
}

impl Profile {
    /// Reads the profile in `dir`; a missing file is an empty profile.
    pub fn load(dir: &Path) -> Result<Profile> {
        let path = dir.join("profile.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the profile {} is not valid JSON; fix or delete it",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Profile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the profile to `dir`, creating the directory (0700) if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        create_private_dir(dir)?;
        let body = serde_json::to_vec_pretty(self).context("encoding the profile")?;
        write_private_file(&dir.join("profile.json"), &body)
    }
}

/// The config dir: `POSTERN_CONFIG_DIR`, else `<user config dir>/postern`.
pub fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("POSTERN_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("postern"))
        .context("no config directory found for this user; set POSTERN_CONFIG_DIR")
}

/// Normalises a controller address: adds `http://` when no scheme is given and drops a
/// trailing slash, so that `127.0.0.1:9200` and `http://127.0.0.1:9200/` compare equal.
pub fn normalize_addr(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes `body` to `path` with mode 0600, through a temp file renamed into place.
pub fn write_private_file(path: &Path, body: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        // The file may predate us with looser permissions: tighten them before writing.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise() {
        assert_eq!(normalize_addr("127.0.0.1:9200"), "http://127.0.0.1:9200");
        assert_eq!(
            normalize_addr("https://pg.example.com/"),
            "https://pg.example.com"
        );
    }

    #[test]
    fn saved_profile_is_private_and_reloads() {
        let dir = std::env::temp_dir().join(format!(
            "postern-profile-test-{}-{}",
            std::process::id(),
            postern_proto::ids::random_base32(6)
        ));
        let sub = dir.join("postern");
        let p = Profile {
            addr: Some("http://127.0.0.1:9200".into()),
            token: Some("pt_x".into()),
            user: Some("alice".into()),
            ca_pem: None,
        };
        p.save(&sub).expect("saves");
        assert_eq!(Profile::load(&sub).expect("loads"), p);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |path: &Path| fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
            assert_eq!(mode(&sub), 0o700);
            assert_eq!(mode(&sub.join("profile.json")), 0o600);
        }
        assert_eq!(
            Profile::load(&dir.join("absent")).expect("empty"),
            Profile::default()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_hides_the_token() {
        let p = Profile {
            addr: None,
            token: Some("pt_secret".into()),
            user: None,
            ca_pem: None,
        };
        assert!(!format!("{p:?}").contains("pt_secret"));
    }
}
