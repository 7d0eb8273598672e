//! Bounds on password logins, which anyone who reaches the API can attempt: at most a few
//! argon2 computations at once (each takes ~19 MiB and tens of milliseconds of a core, so a
//! flood of logins must not exhaust the controller's memory or starve its other work), and a
//! growing wait after repeated failures for one user name (password guessing).
//!
//! The wait is per user name, whether or not the user exists (so that it does not tell
//! which do), and per controller. It is not per client address: behind a load balancer every
//! client has the same one. It never locks an account out: the user's right password works
//! again once the wait is over.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Failures for one name that cost no wait.
pub const FREE_FAILURES: u32 = 5;
/// The longest wait between two attempts for one name.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// A name's failures are forgotten this long after its last one.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Names followed at most (~100 bytes each).
const MAX_NAMES: usize = 100_000;
/// How long a login waits for its turn to run argon2 before it is refused as busy.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// A turn to run argon2, held while it runs.
pub struct Turn(#[allow(dead_code)] SemaphorePermit<'static>);

/// Waits for a turn to run argon2; `None` if none came within [`QUEUE_WAIT`].
pub async fn password_turn() -> Option<Turn> {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Semaphore::new(cores.clamp(2, 8))
    });
    match tokio::time::timeout(QUEUE_WAIT, slots.acquire()).await {
        Ok(Ok(permit)) => Some(Turn(permit)),
        _ => None,
    }
}

#[derive(Debug)]
struct Failures {
    count: u32,
    last: Instant,
    until: Instant,
}

/// Failed password logins per user name, and the wait they impose.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    names: Mutex<HashMap<String, Failures>>,
}

impl LoginThrottle {
    /// `Err(wait)` while `name` must wait before its next attempt.
    pub fn check(&self, name: &str) -> Result<(), Duration> {
        self.check_at(name, Instant::now())
    }

    /// Records a failed attempt for `name`; returns the wait it now imposes, if any.
    pub fn failed(&self, name: &str) -> Option<Duration> {
        self.failed_at(name, Instant::now())
    }

    /// A successful login: `name` starts afresh.
    pub fn succeeded(&self, name: &str) {
        self.lock().remove(&key(name));
    }

    fn check_at(&self, name: &str, now: Instant) -> Result<(), Duration> {
        match self.lock().get(&key(name)) {
            Some(f) if f.until > now => Err(f.until - now),
            _ => Ok(()),
        }
    }

    fn failed_at(&self, name: &str, now: Instant) -> Option<Duration> {
        let mut names = self.lock();
        if names.len() >= MAX_NAMES && !names.contains_key(&key(name)) {
            names.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if names.len() >= MAX_NAMES {
                // Keep the names that are waiting; losing the others loses little.
                names.retain(|_, f| f.count >= FREE_FAILURES);
            }
            if names.len() >= MAX_NAMES {
                tracing::warn!(
                    "too many user names with failed logins to follow; not following '{name}'"
                );
                return None;
            }
        }
        let f = names.entry(key(name)).or_insert(Failures {
            count: 0,
            last: now,
            until: now,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        let wait = wait_after(f.count)?;
        f.until = now + wait;
        Some(wait)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The wait after `failures` failures in a row: none for the first [`FREE_FAILURES`], then
/// 1 s, doubling with each failure up to [`MAX_WAIT`].
pub fn wait_after(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_FAILURES)?;
    let secs = 1u64.checked_shl(over).unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_WAIT))
}

/// Names are compared as the store finds users: without regard to case. Overlong ones are
/// cut (no such user exists; they still count).
fn key(name: &str) -> String {
    name.chars().take(128).collect::<String>().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_after_the_free_failures_and_is_capped() {
        assert_eq!(wait_after(FREE_FAILURES - 1), None);
        assert_eq!(wait_after(FREE_FAILURES), Some(Duration::from_secs(1)));
        assert_eq!(wait_after(FREE_FAILURES + 3), Some(Duration::from_secs(8)));
        assert_eq!(wait_after(FREE_FAILURES + 40), Some(MAX_WAIT));
        assert_eq!(wait_after(u32::MAX), Some(MAX_WAIT));
    }

    #[test]
    fn failures_make_one_name_wait_and_a_success_clears_them() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 1..FREE_FAILURES {
            assert_eq!(t.failed_at("Alice", t0), None);
            assert_eq!(t.check_at("alice", t0), Ok(()));
        }
        assert_eq!(t.failed_at("alice", t0), Some(Duration::from_secs(1)));
        assert_eq!(t.check_at("ALICE", t0), Err(Duration::from_secs(1)));
        assert_eq!(t.check_at("bob", t0), Ok(()), "other names are not held up");
        let later = t0 + Duration::from_secs(1);
        assert_eq!(t.check_at("alice", later), Ok(()));
        assert_eq!(t.failed_at("alice", later), Some(Duration::from_secs(2)));
        t.succeeded("alice");
        assert_eq!(t.check_at("alice", later), Ok(()));
        assert_eq!(t.failed_at("alice", later), None, "counted afresh");
    }

    #[test]
    fn failures_are_forgotten_after_an_hour() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.failed_at("carol", t0);
        }
        let later = t0 + FORGET_AFTER;
        assert_eq!(t.failed_at("carol", later), None);
    }

    #[tokio::test]
    async fn argon2_turns_are_bounded() {
        let mut held = Vec::new();
        while let Ok(Some(turn)) =
            tokio::time::timeout(Duration::from_millis(50), password_turn()).await
        {
            held.push(turn);
            assert!(held.len() <= 8, "more than 8 turns at once");
        }
        assert!(held.len() >= 2, "{} turns", held.len());
        drop(held.pop());
        assert!(
            password_turn().await.is_some(),
            "a released turn is given again"
        );
    }
}
