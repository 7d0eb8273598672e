//! Which worker carries a new session (pure, so that the rules are tested in memory).
//!
//! A candidate is a worker that is live — a controller holds its connection and heard from
//! it recently, and it has an address for clients — and whose tags satisfy the target's
//! worker filter. Direct workers are preferred over outbound-only ones (a relayed session
//! costs the controller a hop); among the preferred, the choice is random, which spreads
//! sessions and moves on from a worker that went down as soon as it stops being live.

use std::collections::BTreeMap;

use postern_proto::cluster::WorkerMode;

use crate::store::WorkerRow;

/// A worker is live if a controller heard from it this recently (heartbeats come every 5 s).
pub(crate) const WORKER_FRESH_SECS: i64 = 30;

/// The worker for a target with `filter` at time `now` (Unix seconds), given a random number
/// `pick`; otherwise, why none (a sentence for the "no worker available" answer).
pub(crate) fn choose(
    workers: Vec<WorkerRow>,
    filter: &BTreeMap<String, String>,
    now: i64,
    pick: u32,
) -> Result<WorkerRow, String> {
    let matching: Vec<WorkerRow> = workers
        .into_iter()
        .filter(|w| w.cert_fingerprint.is_some())
        .filter(|w| filter.iter().all(|(k, v)| w.tags.get(k) == Some(v)))
        .collect();
    let tags = if filter.is_empty() {
        String::new()
    } else {
        let f: Vec<String> = filter.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with tags {}", f.join(","))
    };
    if matching.is_empty() {
        return Err(format!("no registered worker{tags}"));
    }
    let names: Vec<String> = matching.iter().map(|w| w.name.clone()).collect();
    let mut live_ones: Vec<WorkerRow> = matching.into_iter().filter(|w| is_live(w, now)).collect();
    if live_ones.is_empty() {
        return Err(format!(
            "none of the workers{tags} ({}) is connected",
            names.join(", ")
        ));
    }
    let direct = WorkerMode::Direct.as_str();
    if live_ones.iter().any(|w| w.mode == direct) {
        live_ones.retain(|w| w.mode == direct);
    }
    let i = pick as usize % live_ones.len();
    Ok(live_ones.swap_remove(i))
}

/// A controller holds its connection (a controller that died without saying so is caught by
/// the heartbeat's age), and it has an address for clients.
fn is_live(w: &WorkerRow, now: i64) -> bool {
    w.connected_to.is_some()
        && w.session_addr.as_deref().is_some_and(|a| !a.is_empty())
        && w.last_seen.is_some_and(|s| s >= now - WORKER_FRESH_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, mode: &str, tags: &[(&str, &str)], holder: Option<&str>) -> WorkerRow {
        WorkerRow {
            name: name.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cert_fingerprint: Some(format!("fp-{name}")),
            session_addr: Some("10.0.0.1:9203".into()),
            connected_to: holder.map(str::to_owned),
            last_seen: Some(1_000),
            created_at: 0,
            mode: mode.into(),
            active_sessions: None,
            active_connections: None,
        }
    }

    const NOW: i64 = 1_010;

    fn env(v: &str) -> BTreeMap<String, String> {
        [("env".to_string(), v.to_string())].into()
    }

    #[test]
    fn prefers_direct_workers_and_falls_back_to_relayed_ones() {
        for pick in 0..4 {
            let all = vec![
                worker("relayed", "outbound-only", &[("env", "prod")], Some("c1")),
                worker("direct", "direct", &[("env", "prod")], Some("c1")),
            ];
            let w = choose(all, &env("prod"), NOW, pick).expect("a worker");
            assert_eq!(w.name, "direct");
        }
        let only_relayed = vec![
            worker("relayed", "outbound-only", &[("env", "prod")], Some("c1")),
            worker("direct", "direct", &[("env", "prod")], None),
        ];
        let w = choose(only_relayed, &env("prod"), NOW, 1).expect("a worker");
        assert_eq!(w.name, "relayed");
    }

    #[test]
    fn only_live_matching_workers_are_chosen() {
        let mut stale = worker("stale", "direct", &[("env", "prod")], Some("c2"));
        stale.last_seen = Some(900);
        let all = vec![
            worker("other-env", "direct", &[("env", "dev")], Some("c2")),
            stale,
            // Registered, tags match, but no address for clients (yet).
            {
                let mut w = worker("no-addr", "direct", &[("env", "prod")], Some("c1"));
                w.session_addr = Some(String::new());
                w
            },
            worker("down", "direct", &[("env", "prod")], None),
            worker("b", "outbound-only", &[("env", "prod")], Some("c2")),
        ];
        for pick in 0..5 {
            let w = choose(all.clone(), &env("prod"), NOW, pick).expect("a worker");
            assert_eq!(
                w.name, "b",
                "the only live match, held by another controller"
            );
        }
    }

    #[test]
    fn says_why_no_worker_is_available() {
        let none = choose(
            vec![worker("w", "direct", &[("env", "dev")], Some("c2"))],
            &env("prod"),
            NOW,
            0,
        )
        .expect_err("no match");
        assert_eq!(none, "no registered worker with tags env=prod");
        let down = choose(
            vec![worker("w1", "outbound-only", &[("env", "prod")], None)],
            &env("prod"),
            NOW,
            0,
        )
        .expect_err("down");
        assert_eq!(
            down,
            "none of the workers with tags env=prod (w1) is connected"
        );
    }
}
