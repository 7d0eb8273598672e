//! The audit writer: every event goes through one task that appends in batches (group
//! commit), so that a busy statement audit costs one transaction per batch, not per event.
//! Callers wait until their event is durable. Appended events are mirrored as JSON lines to
//! a file if configured, and announced to followers (`audit tail -f`): locally through a
//! watch channel, to other controllers through PostgreSQL `NOTIFY`.

use std::io::Write as _;
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::store::{Backend, NewEvent, NewSession, Store, StoreError};

/// The PostgreSQL channel that announces new audit events between controllers.
pub const AUDIT_CHANNEL: &str = "postern_audit";
/// Most events appended in one transaction.
const MAX_BATCH: usize = 2_000;

struct Pending {
    events: Vec<NewEvent>,
    /// Session rows stored in the same transaction.
    sessions: Vec<NewSession>,
    /// The indices (in `events`) of the events stored: an event whose `event_id` is stored
    /// already is not stored again.
    done: oneshot::Sender<Result<Vec<usize>, String>>,
}

/// Handle on the audit writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    head: watch::Sender<i64>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({} events)", self.events.len())
    }
}

impl AuditLog {
    /// Starts the writer over `store`, mirroring to `mirror` if given.
    pub async fn start(
        store: Store,
        mirror: Option<PathBuf>,
    ) -> Result<(AuditLog, JoinHandle<()>), StoreError> {
        let (tx, rx) = mpsc::channel(16_384);
        let (head, _) = watch::channel(store.audit_head().await?);
        let mirror = match mirror {
            Some(path) => Some(
                std::os::unix::fs::OpenOptionsExt::mode(
                    std::fs::OpenOptions::new().create(true).append(true),
                    // It can hold SQL statements and commands: readable by its owner only.
                    0o600,
                )
                .open(&path)
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot open audit file {}: {e}",
                        path.display()
                    ))
                })?,
            ),
            None => None,
        };
        let task = tokio::spawn(write_loop(store, rx, head.clone(), mirror));
        Ok((AuditLog { tx, head }, task))
    }

    /// Appends events and waits until they are stored; returns the indices of those stored
    /// now (not those whose `event_id` was stored before).
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<usize>, StoreError> {
        self.append_with(events, Vec::new()).await
    }

    /// Appends events and stores `sessions` in the same transaction; waits until both are.
    /// Returns what [`Self::append`] does.
    pub async fn append_with(
        &self,
        events: Vec<NewEvent>,
        sessions: Vec<NewSession>,
    ) -> Result<Vec<usize>, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                events,
                sessions,
                done,
            })
            .await
            .map_err(|_| StoreError::Unavailable("the audit writer has stopped".into()))?;
        match wait.await {
            Ok(Ok(stored)) => Ok(stored),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("audit append failed: {e}"))),
            Err(_) => Err(StoreError::Unavailable(
                "the audit writer has stopped".into(),
            )),
        }
    }

    /// Follows the chain head (the newest `seq`).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    /// Records that another controller appended up to `seq`.
    pub fn announce(&self, seq: i64) {
        self.head.send_if_modified(|h| {
            let newer = seq > *h;
            if newer {
                *h = seq;
            }
            newer
        });
    }
}

/// A line of the audit file (keys in alphabetical order, as the log's JSON objects have them).
#[derive(serde::Serialize)]
struct MirrorLine<'a> {
    action: &'a str,
    actor: &'a str,
    details: &'a serde_json::value::RawValue,
    event_id: Option<&'a str>,
    outcome: &'a str,
    resource: &'a str,
    seq: i64,
    session_id: Option<&'a str>,
    time: i64,
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    head: watch::Sender<i64>,
    mut mirror: Option<std::fs::File>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut count = batch[0].events.len();
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.events.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // Where each caller's events end in `events`.
        let ends: Vec<usize> = batch
            .iter()
            .scan(0, |end, p| {
                *end += p.events.len();
                Some(*end)
            })
            .collect();
        let events: Vec<NewEvent> = batch
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.events))
            .collect();
        let sessions: Vec<NewSession> = batch
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.sessions))
            .collect();
        let result = store.append_audit_with(&events, &sessions).await;
        match &result {
            Ok(stored) => {
                if let Some(file) = mirror.as_mut() {
                    let mut lines = Vec::new();
                    for &(seq, index) in stored {
                        let e = &events[index];
                        let line = MirrorLine {
                            action: &e.action,
                            actor: &e.actor,
                            details: &e.details,
                            event_id: e.event_id.as_deref(),
                            outcome: &e.outcome,
                            resource: &e.resource,
                            seq,
                            session_id: e.session_id.as_deref(),
                            time: e.time,
                        };
                        if serde_json::to_writer(&mut lines, &line).is_ok() {
                            lines.push(b'\n');
                        }
                    }
                    if let Err(e) = file.write_all(&lines) {
                        tracing::error!(error = %e, "cannot mirror audit events to the audit file");
                    }
                }
                if let Some((seq, _)) = stored.last() {
                    let seq = *seq;
                    head.send_if_modified(|h| {
                        let newer = seq > *h;
                        if newer {
                            *h = seq;
                        }
                        newer
                    });
                    if store.backend() == Backend::Postgres {
                        let _ = store.notify(AUDIT_CHANNEL, &seq.to_string()).await;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, events = events.len(), "audit append failed"),
        }
        // Each caller learns which of its own events were stored.
        let mut stored_of: Vec<Vec<usize>> = vec![Vec::new(); batch.len()];
        if let Ok(stored) = &result {
            let mut owner = 0;
            for &(_, index) in stored {
                while index >= ends[owner] {
                    owner += 1;
                }
                let start = if owner == 0 { 0 } else { ends[owner - 1] };
                stored_of[owner].push(index - start);
            }
        }
        let error = result.err().map(|e| e.to_string());
        for (p, stored) in batch.into_iter().zip(stored_of) {
            let _ = p.done.send(match &error {
                Some(e) => Err(e.clone()),
                None => Ok(stored),
            });
        }
    }
}
