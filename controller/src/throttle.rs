//! Bounds on password logins, which anyone who reaches the API can attempt: at most a few
//! argon2 computations at once (each takes ~19 MiB and tens of milliseconds of a core, so a
//! flood of logins must not exhaust the controller's memory or starve its other work), and a
//! growing wait after repeated failures for one user name (password guessing).
//!
//! The wait is per user name as typed (users are found by their exact name), whether or not
//! the user exists (so that it does not tell which do), and per controller; an attempt counts
//! from its start, so guesses sent at once are held like guesses sent one after another. It is not per client address: behind a load balancer every
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
    /// Starts an attempt for `name`: `Err(wait)` while it must wait. The attempt is counted
    /// as a failure from here on ([`Self::succeeded`] forgets it), so that guesses sent at
    /// once cannot all pass before the first of them has failed.
    pub fn begin(&self, name: &str) -> Result<(), Duration> {
        self.begin_at(name, Instant::now())
    }

    /// The wait an attempt that failed leaves for `name`, if any.
    pub fn failed(&self, name: &str) -> Option<Duration> {
        let now = Instant::now();
        match self.lock().get(name) {
            Some(f) if f.until > now => Some(f.until - now),
            _ => None,
        }
    }

    /// A successful login: `name` starts afresh.
    pub fn succeeded(&self, name: &str) {
        self.lock().remove(name);
    }

    fn begin_at(&self, name: &str, now: Instant) -> Result<(), Duration> {
        let mut names = self.lock();
        let key = if names.contains_key(name) || names.len() < MAX_NAMES {
            name
        } else {
            names.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if names.len() >= MAX_NAMES {
                // Keep the names that are waiting; losing the others loses little.
                names.retain(|k, f| f.count >= FREE_FAILURES || k == OVERFLOW);
            }
            if names.len() < MAX_NAMES {
                name
            } else {
                // Every name beyond shares one count: full never means unthrottled.
                OVERFLOW
            }
        };
        let f = names.entry(key.to_owned()).or_insert(Failures {
            count: 0,
            last: now,
            until: now,
        });
        if f.until > now {
            return Err(f.until - now);
        }
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if let Some(wait) = wait_after(f.count) {
            f.until = now + wait;
        }
        Ok(())
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

/// Whole seconds of `wait`, rounded up (what a client must wait at least).
pub fn secs_up(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The count shared by names beyond [`MAX_NAMES`] (no user is named "").
const OVERFLOW: &str = "";

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
        assert_eq!(secs_up(Duration::from_millis(1900)), 2);
        assert_eq!(secs_up(Duration::from_secs(1)), 1);
    }

    #[test]
    fn failures_make_one_name_wait_and_a_success_clears_them() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin_at("alice", t0), Ok(()));
        }
        // The fifth attempt, still running or failed, holds the next one.
        assert_eq!(t.begin_at("alice", t0), Err(Duration::from_secs(1)));
        assert_eq!(t.begin_at("bob", t0), Ok(()), "other names are not held up");
        assert_eq!(
            t.begin_at("Alice", t0),
            Ok(()),
            "names are exact, as users are"
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(t.begin_at("alice", later), Ok(()));
        assert_eq!(t.begin_at("alice", later), Err(Duration::from_secs(2)));
        t.succeeded("alice");
        assert_eq!(t.begin_at("alice", later), Ok(()), "counted afresh");
    }

    #[test]
    fn attempts_at_once_are_counted_before_any_fails() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        let passed = (0..60).filter(|_| t.begin_at("alice", t0).is_ok()).count();
        assert_eq!(passed as u32, FREE_FAILURES);
    }

    #[test]
    fn failures_are_forgotten_after_an_hour() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            let _ = t.begin_at("carol", t0);
        }
        let later = t0 + FORGET_AFTER;
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin_at("carol", later), Ok(()));
        }
    }

    #[test]
    fn names_beyond_the_table_share_one_count() {
        let t = LoginThrottle::default();
        let t0 = Instant::now();
        {
            let mut names = t.lock();
            for i in 0..MAX_NAMES {
                names.insert(
                    format!("u{i}"),
                    Failures {
                        count: FREE_FAILURES + 1,
                        last: t0,
                        until: t0 + MAX_WAIT,
                    },
                );
            }
        }
        let passed = (0..60)
            .filter(|i| t.begin_at(&format!("new{i}"), t0).is_ok())
            .count();
        assert_eq!(passed as u32, FREE_FAILURES, "a full table still throttles");
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
