//! Identifier and secret newtypes. Secrets print as `***` in `Debug`.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

id_newtype!(
    /// A session's identifier (`s_` followed by 26 base32 characters of randomness).
    SessionId
);
id_newtype!(
    /// A worker's unique name.
    WorkerName
);
id_newtype!(
    /// A target's unique, human name.
    TargetName
);
id_newtype!(
    /// A user's unique login name.
    UserName
);

impl SessionId {
    /// A fresh random session id.
    pub fn random() -> Self {
        Self(format!("s_{}", random_base32(16)))
    }
}

/// A bearer secret (API token, activation token). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// A fresh secret of 32 random bytes, base32-encoded, with a readable prefix.
    pub fn random(prefix: &str) -> Self {
        Self(format!("{prefix}{}", random_base32(32)))
    }
    /// The secret's text; call only where it must be sent or hashed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `n` random bytes as lowercase RFC 4648 base32 without padding.
pub fn random_base32(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // The OS random source failing is not recoverable in any useful way.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    base32(&bytes)
}

/// A unique id that sorts by creation time: the microseconds since the Unix epoch in 14 hex
/// digits, then 80 bits in base32: 48 random bits drawn once per process and a 32-bit
/// counter (from a random start) that makes ids of one process distinct. Stored ids that
/// arrive in time order land next to each other in a B-tree index (one page written per
/// batch, not one per id, as random ids cost); a statement audit makes one per statement,
/// where asking the OS for random bytes each time cost a system call.
pub fn time_ordered_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static PROCESS: OnceLock<([u8; 6], AtomicU32)> = OnceLock::new();
    let (tag, counter) = PROCESS.get_or_init(|| {
        let mut bytes = [0u8; 10];
        // The OS random source failing is not recoverable in any useful way.
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        let mut tag = [0u8; 6];
        tag.copy_from_slice(&bytes[..6]);
        let start = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
        (tag, AtomicU32::new(start))
    });
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut unique = [0u8; 10];
    unique[..6].copy_from_slice(tag);
    unique[6..].copy_from_slice(&counter.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    format!("{micros:014x}{}", base32(&unique))
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_hides_value() {
        let s = Secret::random("pt_");
        assert_eq!(format!("{s:?}"), "***");
        assert!(s.expose().starts_with("pt_"));
    }

    #[test]
    fn base32_known_vectors() {
        assert_eq!(base32(b"f"), "my");
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    }

    #[test]
    fn time_ordered_ids_are_unique_and_sort_by_time() {
        let first = time_ordered_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let ids: Vec<String> = (0..1_000).map(|_| time_ordered_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 30 && *id > first));
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn session_ids_differ() {
        assert_ne!(SessionId::random(), SessionId::random());
    }
}
