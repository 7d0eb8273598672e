//! The audit spool: auditable events (connection closes with their bytes, statements, exec
//! commands) are appended to a local file before they are sent, and forgotten only when the
//! controller acknowledges that it stored them. A controller that crashes or restarts loses
//! none; the controller stores a resent event once (by its id).
//!
//! Events are written to the file in groups, within [`WRITE_DELAY`] of the first of a group
//! (and always before they are sent, and when the spool closes): one `write` per group
//! instead of one per statement (a file `write` cost a busy statement audit as much CPU
//! as the rest of the worker's work on the statement). A worker killed outright can lose
//! the events of its last [`WRITE_DELAY`]; a controller that goes away loses none.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_proto::cluster::{SpooledEvent, SpooledRef, WorkerMessage};
use postern_proto::frame::{FrameError, MAX_FRAME};
use tokio::sync::Notify;

const SPOOL_FILE: &str = "audit-spool.jsonl";
/// Rewrite the file once this many acknowledged events are still in it.
const COMPACT_AFTER: usize = 2_000;
/// The envelope of an `Events` frame, with room to spare.
const ENVELOPE: usize = 1_024;
/// The longest event: alone, it fits a frame that every controller reads (64 KiB). A
/// longer one (an `ssh` exec command of 100 KiB, say) could never be sent: it would come
/// first in every batch after each reconnect and hold back everything spooled after it.
const MAX_LINE: usize = MAX_FRAME - ENVELOPE;
/// How long a sent batch may wait for its acknowledgement; then everything unacknowledged
/// goes again (the controller stores each event id once; it answers nothing for a batch it
/// could not store).
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Least time between the starts of two batches, unless a frame's worth is waiting: a busy
/// statement audit then reaches the controller in batches of hundreds of events (a control
/// frame holds ~50 ms of `pgbench -S`), and each event waits at most this long (it is in the
/// spool file already). Each batch costs the controller a transaction and the worker a
/// frame and its acknowledgement whatever its size: at 10 ms, the controller's two threads
/// and the worker's spent ~3 µs more per audited `pgbench -S` statement (4 of 4 interleaved
/// rounds), ~8% of Postern's CPU per statement. An event that comes after a quiet spell
/// still goes at once.
const MIN_GAP: Duration = Duration::from_millis(50);
/// Most time between an event's spooling and its line's write to the file (what a worker
/// killed outright can lose): one `write` per group of events (at 1 ms, the writer's
/// wake-ups and `write`s cost the worker's thread more than the batches did). Each batch is
/// written before it goes, whatever this says.
pub(crate) const WRITE_DELAY: Duration = Duration::from_millis(10);

/// A line recording acknowledgements (until the next rewrite drops the events).
#[derive(serde::Serialize, serde::Deserialize)]
struct AckLine {
    acked: Vec<String>,
}

/// One spooled event as it is stored and sent: its id and its JSON text (a
/// [`SpooledEvent`]), serialized once when it is spooled; the `Events` frame is put together
/// from these texts ([`Spooled::frame`]) instead of cloning and serializing each event again.
#[derive(Debug, Clone)]
pub(crate) struct Spooled {
    pub(crate) event_id: String,
    line: Arc<[u8]>,
    /// Its place in the order of spooling (this process's).
    seq: u64,
}

impl Spooled {
    /// The `Events` frame (length prefix included) carrying `batch`.
    pub(crate) fn frame(batch: &[Spooled]) -> Result<Vec<u8>, FrameError> {
        WorkerMessage::events_frame(batch.iter().map(|e| &*e.line))
    }
}

/// The spool of one worker.
pub(crate) struct Spool {
    path: PathBuf,
    inner: Mutex<Inner>,
    notify: Notify,
    /// Wakes [`Spool::write_loop`]: lines wait to be written.
    write_wanted: Notify,
}

struct Inner {
    /// Unacknowledged events, oldest first.
    events: VecDeque<Spooled>,
    /// How many at the front were sent on the current control connection.
    sent: usize,
    /// When the last batch went on this connection (acknowledged or not; while `sent > 0`,
    /// the batch awaiting its acknowledgement).
    last_batch: Option<Instant>,
    /// Events acknowledged since the file was last rewritten.
    stale: usize,
    file: Option<File>,
    /// Lines of spooled events not yet written to the file.
    unwritten: Vec<u8>,
    /// The `seq` of the next event spooled.
    next_seq: u64,
    /// The most event text a batch holds: what the controller's frames carry, less the
    /// envelope ([`Spool::restart`]).
    budget: usize,
}

impl Inner {
    /// Writes the lines not yet written.
    fn write_unwritten(&mut self) {
        if self.unwritten.is_empty() {
            return;
        }
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(&self.unwritten) {
                tracing::error!(error = %e, "cannot write the audit spool; its events are kept in memory only");
            }
        }
        self.unwritten.clear();
    }

    /// How long unsent events should wait for [`MIN_GAP`] to end; `None` if they may go now,
    /// or if there are none, or if a batch is in flight (its acknowledgement wakes the
    /// sender).
    fn hold(&self) -> Option<Duration> {
        if self.sent > 0 || self.events.is_empty() {
            return None;
        }
        let left = MIN_GAP.checked_sub(self.last_batch?.elapsed())?;
        let mut waiting = 0;
        for e in &self.events {
            waiting += e.line.len() + 1;
            if waiting > self.budget {
                return None;
            }
        }
        Some(left)
    }
}

/// An audit event of more than [`MAX_LINE`] bytes (its spooled `line`) with its details
/// replaced by how large they were: what happened, to which session, stays in the log.
/// `None` if it is no audit event.
fn without_details(line: &[u8]) -> Option<Vec<u8>> {
    let mut event: SpooledEvent = serde_json::from_slice(line).ok()?;
    let WorkerMessage::Audit {
        session_id, action, ..
    } = *event.message
    else {
        return None;
    };
    tracing::warn!(
        session = %session_id,
        action = %action,
        bytes = line.len(),
        "an audit event too large to send keeps its action but not its details"
    );
    *event.message = WorkerMessage::Audit {
        session_id,
        action,
        details: serde_json::json!({ "details_omitted": { "bytes": line.len() } }),
    };
    serde_json::to_vec(&event).ok()
}

impl Spool {
    /// Opens the spool in `dir`, loading the events a previous run did not get acknowledged.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Spool> {
        let path = dir.join(SPOOL_FILE);
        let mut events = VecDeque::new();
        let mut acked = HashSet::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                // A torn last line (crash mid-write) is skipped, not fatal.
                if let Ok(e) = serde_json::from_str::<SpooledEvent>(&line) {
                    events.push_back(Spooled {
                        event_id: e.event_id,
                        line: line.into_bytes().into(),
                        seq: events.len() as u64,
                    });
                } else if let Ok(a) = serde_json::from_str::<AckLine>(&line) {
                    acked.extend(a.acked);
                }
            }
        }
        events.retain(|e: &Spooled| !acked.contains(&e.event_id));
        let next_seq = events.back().map_or(0, |e| e.seq + 1);
        let spool = Spool {
            path,
            inner: Mutex::new(Inner {
                events,
                next_seq,
                sent: 0,
                last_batch: None,
                stale: 0,
                file: None,
                unwritten: Vec::new(),
                budget: MAX_FRAME - ENVELOPE,
            }),
            notify: Notify::new(),
            write_wanted: Notify::new(),
        };
        spool.rewrite()?;
        Ok(spool)
    }

    /// Spools an auditable message (a [`WorkerMessage`], or an
    /// [`postern_proto::cluster::AuditRef`] that serializes as one): kept until acknowledged,
    /// and in the file within [`WRITE_DELAY`] and before it is sent.
    pub(crate) fn push<M: serde::Serialize + ?Sized>(&self, message: &M) {
        let event_id = postern_proto::ids::time_ordered_id();
        let event = SpooledRef {
            event_id: &event_id,
            time: postern_proto::unix_now(),
            message,
        };
        let mut line = match serde_json::to_vec(&event) {
            Ok(line) if line.len() <= MAX_LINE => line,
            Ok(line) => match without_details(&line) {
                Some(shorter) => shorter,
                None => {
                    tracing::error!(
                        bytes = line.len(),
                        "an event too large to send to the controller is not spooled"
                    );
                    return;
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit event; it is not spooled");
                return;
            }
        };
        line.push(b'\n');
        let (wake, write) = {
            let mut inner = self.lock();
            let write = inner.unwritten.is_empty();
            inner.unwritten.extend_from_slice(&line);
            line.pop();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.events.push_back(Spooled {
                event_id,
                line: line.into(),
                seq,
            });
            // While a batch awaits its acknowledgement the sender has nothing to do: the
            // acknowledgement wakes it. (Waking it for every statement of a busy audit
            // cost a task wake-up, often a thread's, per statement.)
            (inner.sent == 0, write)
        };
        if write {
            self.write_wanted.notify_one();
        }
        if wake {
            self.notify.notify_one();
        }
    }

    /// Writes spooled lines to the file, each within [`WRITE_DELAY`] of its event; runs
    /// as long as the worker does.
    pub(crate) async fn write_loop(&self) {
        loop {
            self.write_wanted.notified().await;
            tokio::time::sleep(WRITE_DELAY).await;
            self.write_now();
        }
    }

    /// Writes the lines not yet written now.
    pub(crate) fn write_now(&self) {
        self.lock().write_unwritten();
    }

    /// Waits until there may be something new to send.
    pub(crate) async fn changed(&self) {
        let (hold, ack_due) = {
            let inner = self.lock();
            let due = inner
                .last_batch
                .filter(|_| inner.sent > 0)
                .map(|t| ACK_WAIT.saturating_sub(t.elapsed()));
            (inner.hold(), due)
        };
        match (hold, ack_due) {
            (Some(left), _) => tokio::time::sleep(left).await,
            (None, Some(left)) => {
                tokio::select! {
                    () = self.notify.notified() => {}
                    () = tokio::time::sleep(left) => {}
                }
            }
            (None, None) => self.notify.notified().await,
        }
    }

    /// A new control connection: everything unacknowledged must be sent again, in frames of
    /// up to `frame_limit` bytes (what its controller reads).
    pub(crate) fn restart(&self, frame_limit: usize) {
        let mut inner = self.lock();
        inner.sent = 0;
        inner.last_batch = None;
        inner.budget = frame_limit.max(MAX_FRAME) - ENVELOPE;
        drop(inner);
        self.notify.notify_one();
    }

    /// The next batch not yet sent on this connection (fits one frame), marked as sent.
    ///
    /// Empty while the previous batch awaits its acknowledgement (up to [`ACK_WAIT`], after
    /// which everything unacknowledged is sent again): the
    /// controller stores one batch at a time, so what arrives meanwhile goes as one batch,
    /// one transaction, instead of one transaction per event (a burst of short connections
    /// kept the controller's store busy long after it ended). Empty too, unless a frame's
    /// worth is waiting, until [`MIN_GAP`] has passed since the previous batch went.
    pub(crate) fn next_batch(&self) -> Vec<Spooled> {
        let mut inner = self.lock();
        // What goes is on disk first.
        inner.write_unwritten();
        if inner.sent > 0 {
            if inner.last_batch.is_some_and(|t| t.elapsed() < ACK_WAIT) {
                return Vec::new();
            }
            // No acknowledgement in time: the controller could not store the batch.
            inner.sent = 0;
        }
        if inner.hold().is_some() {
            return Vec::new();
        }
        let mut batch = Vec::new();
        let mut size = 0;
        while let Some(event) = inner.events.get(inner.sent) {
            let len = event.line.len();
            if !batch.is_empty() && size + len + 1 > inner.budget {
                break;
            }
            size += len + 1;
            batch.push(event.clone());
            inner.sent += 1;
        }
        if !batch.is_empty() {
            inner.last_batch = Some(Instant::now());
        }
        batch
    }

    /// Forgets acknowledged events.
    pub(crate) fn ack(&self, ids: &[String]) {
        let mut pending: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let compact = {
            let mut inner = self.lock();
            inner.write_unwritten();
            let before = inner.events.len();
            // Batches are sent and acknowledged in order, so acknowledged events are the
            // oldest: take them off the front. (Scanning the whole backlog for every
            // acknowledgement made a busy statement audit quadratic.)
            while let Some(e) = inner.events.front() {
                if !pending.remove(e.event_id.as_str()) {
                    break;
                }
                inner.events.pop_front();
                inner.sent = inner.sent.saturating_sub(1);
            }
            if !pending.is_empty() {
                let mut removed_sent = 0;
                let sent = inner.sent;
                let mut index = 0;
                inner.events.retain(|e| {
                    let keep = !pending.contains(e.event_id.as_str());
                    if !keep && index < sent {
                        removed_sent += 1;
                    }
                    index += 1;
                    keep
                });
                inner.sent -= removed_sent;
            }
            inner.stale += before - inner.events.len();
            // Record the acknowledgement, so a restart does not send these again.
            let line = serde_json::to_string(&AckLine {
                acked: ids.iter().map(|s| (*s).to_owned()).collect(),
            })
            .unwrap_or_default();
            if let Some(file) = inner.file.as_mut() {
                let _ = file
                    .write_all(format!("{line}\n").as_bytes())
                    .and_then(|()| file.flush());
            }
            // Nothing left to send: empty the file in place. No rewrite and no fsync, so a
            // steady trickle of connections does not cost one each: whatever a crash leaves
            // of the file (the old lines, or nothing) holds no unacknowledged event, and the
            // controller stores a resent one once.
            if inner.events.is_empty() {
                if let Some(file) = inner.file.as_mut() {
                    match file.set_len(0) {
                        Ok(()) => inner.stale = 0,
                        Err(e) => tracing::warn!(error = %e, "cannot empty the audit spool"),
                    }
                }
            }
            inner.stale >= COMPACT_AFTER
        };
        if compact {
            if let Err(e) = self.rewrite() {
                tracing::warn!(error = %e, "cannot compact the audit spool");
            }
        }
        // What waited for this acknowledgement may go now.
        self.notify.notify_one();
    }

    /// Events waiting for an acknowledgement.
    pub(crate) fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Rewrites the file with the unacknowledged events only (write a temp file, sync it,
    /// rename). The writing and the sync happen without the lock: events go on being spooled
    /// meanwhile (a statement audit spools from the connections' tasks, which the sync must
    /// not stall), and those go into the new file too before it replaces the old one.
    fn rewrite(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let (lines, next) = {
            let inner = self.lock();
            let lines: Vec<Arc<[u8]>> = inner.events.iter().map(|e| e.line.clone()).collect();
            (lines, inner.next_seq)
        };
        let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in &lines {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        let mut inner = self.lock();
        out.clear();
        for e in inner.events.iter().filter(|e| e.seq >= next) {
            out.extend_from_slice(&e.line);
            out.push(b'\n');
        }
        f.write_all(&out)?;
        std::fs::rename(&tmp, &self.path)?;
        inner.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        inner.stale = 0;
        // Every event's line is in the new file (an event acknowledged meanwhile may be too:
        // resent after a restart, it is stored once).
        inner.unwritten.clear();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.write_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::cluster::ControllerHello;
    use postern_proto::frame::MAX_CONTROL_FRAME;
    use postern_proto::ids::SessionId;

    fn closed(n: u64) -> WorkerMessage {
        WorkerMessage::ConnectionClosed {
            session_id: SessionId::from("s_x"),
            bytes_up: n,
            bytes_down: n,
            reason: "closed".into(),
        }
    }

    /// A spool in a fresh directory holding `events` connection closes.
    fn spool_with(events: u64) -> (PathBuf, Spool) {
        let dir =
            std::env::temp_dir().join(format!("spool-{}", postern_proto::ids::random_base32(6)));
        std::fs::create_dir_all(&dir).expect("dir");
        let spool = Spool::open(&dir).expect("open");
        for n in 0..events {
            spool.push(&closed(n));
        }
        (dir, spool)
    }

    #[test]
    fn the_events_frame_is_what_the_controller_decodes() {
        let (dir, spool) = spool_with(3);
        spool.push(&WorkerMessage::Audit {
            session_id: SessionId::from("s_y"),
            action: "postgres.query".into(),
            details: serde_json::json!({"statement": "SELECT '\"é\n'", "truncated": false}),
        });
        let batch = spool.next_batch();
        let frame = Spooled::frame(&batch).expect("fits");
        let len = postern_proto::frame::check(&frame)
            .expect("valid")
            .expect("whole");
        assert_eq!(len, frame.len());
        let WorkerMessage::Events { events } =
            postern_proto::frame::decode(&frame[4..]).expect("decodes")
        else {
            panic!("not an Events frame");
        };
        let ids: Vec<_> = events.iter().map(|e| e.event_id.clone()).collect();
        let want: Vec<_> = batch.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(ids, want);
        // Byte for byte what encoding the decoded message gives.
        assert_eq!(
            postern_proto::frame::encode(&WorkerMessage::Events { events }).expect("encode"),
            frame
        );
        assert!(
            Spooled::frame(&[]).is_ok(),
            "an empty batch is a valid frame too"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_event_too_large_for_a_frame_goes_without_its_details() {
        let (dir, spool) = spool_with(0);
        spool.push(&WorkerMessage::Audit {
            session_id: SessionId::from("s_big"),
            action: "ssh.exec".into(),
            details: serde_json::json!({"command": "x".repeat(300 * 1024)}),
        });
        spool.push(&closed(1));
        let batch = spool.next_batch();
        assert_eq!(batch.len(), 2, "the event after it is not held back");
        let frame = Spooled::frame(&batch).expect("fits");
        assert!(frame.len() <= MAX_FRAME, "{} bytes", frame.len());
        let WorkerMessage::Events { events } =
            postern_proto::frame::decode(&frame[4..]).expect("decodes")
        else {
            panic!("not an Events frame");
        };
        let WorkerMessage::Audit {
            session_id,
            action,
            details,
        } = &*events[0].message
        else {
            panic!("not the audit event: {:?}", events[0]);
        };
        assert_eq!(
            (session_id.as_str(), action.as_str()),
            ("s_big", "ssh.exec")
        );
        let omitted = details["details_omitted"]["bytes"].as_u64().expect("size");
        assert!(omitted > 300 * 1024, "{details}");
        assert_eq!(events[0].event_id, batch[0].event_id);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lines reach the file in groups: by the writer within [`WRITE_DELAY`], and before
    /// their batch is sent.
    #[tokio::test]
    async fn events_reach_the_file_before_they_are_sent_and_soon_anyway() {
        let (dir, spool) = spool_with(0);
        let spool = Arc::new(spool);
        let file = dir.join(SPOOL_FILE);
        let writer = tokio::spawn({
            let spool = spool.clone();
            async move { spool.write_loop().await }
        });
        spool.push(&closed(1));
        let id = spool.lock().events[0].event_id.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&file).expect("read").contains(&id) {
            assert!(
                Instant::now() < deadline,
                "the writer never wrote the event"
            );
            tokio::time::sleep(WRITE_DELAY).await;
        }
        writer.abort();
        let _ = writer.await;
        // No writer now: taking a batch writes it first.
        spool.push(&closed(2));
        let batch = spool.next_batch();
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(batch.iter().all(|e| text.contains(&e.event_id)), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Behind an event never acknowledged, acknowledged ones pile up until the file is
    /// rewritten with the unacknowledged ones only; they survive a restart.
    #[test]
    fn compaction_keeps_exactly_the_unacknowledged() {
        let (dir, spool) = spool_with(1);
        let stuck = spool.next_batch();
        assert_eq!(stuck.len(), 1);
        spool.restart(MAX_CONTROL_FRAME);
        let mut rounds = 0;
        while spool.lock().stale > 0 || rounds == 0 {
            for n in 0..100 {
                spool.push(&closed(n));
            }
            let batch = spool.next_batch();
            let acked: Vec<String> = batch[1..].iter().map(|e| e.event_id.clone()).collect();
            spool.ack(&acked);
            spool.restart(MAX_CONTROL_FRAME);
            rounds += 1;
            assert!(rounds < 100, "never compacted");
        }
        assert!(
            rounds * 100 >= COMPACT_AFTER,
            "compacted after {rounds} rounds"
        );
        spool.push(&closed(7));
        drop(spool);
        let lines = std::fs::read_to_string(dir.join(SPOOL_FILE))
            .expect("read")
            .lines()
            .count();
        assert!(lines < 200, "{lines} lines left after compaction");
        let spool = Spool::open(&dir).expect("reopen");
        let left = spool.next_batch();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].event_id, stuck[0].event_id);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn survives_a_restart_until_acknowledged() {
        let (dir, spool) = spool_with(5);
        let batch = spool.next_batch();
        assert_eq!(batch.len(), 5);
        assert!(
            spool.next_batch().is_empty(),
            "sent events are not sent twice on one connection"
        );
        spool.ack(&[batch[0].event_id.clone(), batch[1].event_id.clone()]);
        drop(spool);

        // A new process: the three unacknowledged events are still there, in order.
        let spool = Spool::open(&dir).expect("reopen");
        assert_eq!(spool.len(), 3);
        let again = spool.next_batch();
        let ids: Vec<_> = again.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(
            ids,
            batch[2..]
                .iter()
                .map(|e| e.event_id.clone())
                .collect::<Vec<_>>()
        );
        // A reconnect resends what was not acknowledged.
        spool.restart(MAX_CONTROL_FRAME);
        assert_eq!(spool.next_batch().len(), 3);
        spool.ack(&ids);
        assert_eq!(spool.len(), 0);
        assert_eq!(Spool::open(&dir).expect("reopen").len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn acknowledgements_in_and_out_of_order_keep_the_rest() {
        let (dir, spool) = spool_with(6);
        let batch = spool.next_batch();
        let id = |i: usize| batch[i].event_id.clone();
        // Out of order (from the middle), then in order (from the front).
        spool.ack(&[id(3)]);
        spool.ack(&[id(1), id(0)]);
        assert_eq!(spool.len(), 3);
        // A new event waits while sent ones are unacknowledged (nothing already sent goes
        // twice on one connection).
        spool.push(&closed(6));
        assert!(spool.next_batch().is_empty(), "a batch is still in flight");
        // After a reconnect, exactly the unacknowledged ones, in order.
        spool.restart(MAX_CONTROL_FRAME);
        let left: Vec<_> = spool.next_batch().into_iter().map(|e| e.event_id).collect();
        assert_eq!(left[..3], [id(2), id(4), id(5)]);
        assert_eq!(left.len(), 4);
        // Once they are acknowledged, the next event goes at once, alone.
        spool.push(&closed(7));
        assert!(
            spool.next_batch().is_empty(),
            "the resent batch is in flight"
        );
        spool.ack(&left);
        assert_eq!(spool.len(), 1);
        // ... and goes alone once the least gap between batches has passed.
        std::thread::sleep(MIN_GAP);
        assert_eq!(spool.next_batch().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_batch_left_unacknowledged_goes_again() {
        let (dir, spool) = spool_with(3);
        let batch = spool.next_batch();
        spool.ack(&[batch[1].event_id.clone()]);
        spool.push(&closed(3));
        assert!(spool.next_batch().is_empty(), "in flight");
        // The sender's loop: wakes (when the acknowledgement is overdue at the latest), asks.
        let waited = Instant::now();
        let again = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let next = spool.next_batch();
                if !next.is_empty() {
                    return next;
                }
                spool.changed().await;
            }
        })
        .await
        .expect("the unacknowledged batch goes again");
        assert!(waited.elapsed() >= ACK_WAIT - Duration::from_millis(50));
        let again: Vec<_> = again.into_iter().map(|e| e.event_id).collect();
        assert_eq!(again.len(), 3);
        assert_eq!(
            again[..2],
            [batch[0].event_id.clone(), batch[2].event_id.clone()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn batches_keep_a_least_gap_unless_a_frame_is_waiting() {
        let (dir, spool) = spool_with(1);
        let first = spool.next_batch();
        assert_eq!(first.len(), 1, "a first event goes at once");
        spool.ack(&[first[0].event_id.clone()]);
        spool.push(&closed(1));
        spool.push(&closed(2));
        assert!(spool.next_batch().is_empty(), "held for the gap");
        // The sender's wait ends when the gap does, with no other wake-up.
        let waited = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), spool.changed())
            .await
            .expect("the wait ends after the gap");
        assert!(waited.elapsed() <= MIN_GAP + Duration::from_millis(500));
        let second = spool.next_batch();
        let second_went = Instant::now();
        assert_eq!(second.len(), 2, "what waited goes as one batch");
        spool.ack(
            &second
                .iter()
                .map(|e| e.event_id.clone())
                .collect::<Vec<_>>(),
        );
        // More than a frame's worth waiting goes without waiting for the gap.
        let big = "x".repeat(4_096);
        let mut n = 0;
        while spool.lock().hold().is_some() || n == 0 {
            spool.push(&WorkerMessage::ConnectionClosed {
                session_id: SessionId::from("s_x"),
                bytes_up: n,
                bytes_down: n,
                reason: big.clone(),
            });
            n += 1;
            assert!(n < 1_000, "a frame's worth never lifted the hold");
        }
        // (~15 events of 4 KiB fill a 64 KiB frame, the size a spool starts with; fewer
        // only if the gap ran out meanwhile.)
        assert!(
            n >= 15 || second_went.elapsed() >= MIN_GAP,
            "the hold lifted after {n} events, before a frame's worth was waiting"
        );
        assert!(!spool.next_batch().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Batches fill the frames the connection's controller reads: 64 KiB for one that does
    /// not say (a controller from before the larger control frames), 256 KiB for one that
    /// says so.
    #[test]
    fn batches_fit_the_frames_the_controller_reads() {
        let (dir, spool) = spool_with(0);
        for n in 0..200 {
            spool.push(&WorkerMessage::ConnectionClosed {
                session_id: SessionId::from("s_x"),
                bytes_up: n,
                bytes_down: n,
                reason: "x".repeat(4_096),
            });
        }
        let ids = |batch: &[Spooled]| batch.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
        let old_controller = ControllerHello::frame_limit(
            &serde_json::from_str(
                r#"{"version":1,"worker":"w","session_keys":[],"issuer":"i","cancel":[]}"#,
            )
            .expect("a hello without max_frame"),
        );
        assert_eq!(old_controller, MAX_FRAME);
        spool.restart(old_controller);
        let small = spool.next_batch();
        let frame = Spooled::frame(&small).expect("fits");
        assert!(frame.len() <= MAX_FRAME + 4, "{} bytes", frame.len());
        assert!(
            small.len() >= 14,
            "{} events: the frame is not filled",
            small.len()
        );
        spool.ack(&ids(&small));
        spool.restart(MAX_CONTROL_FRAME);
        let large = spool.next_batch();
        let frame = Spooled::frame(&large).expect("fits");
        assert!(frame.len() > 3 * MAX_FRAME, "{} bytes", frame.len());
        assert!(
            frame.len() <= MAX_CONTROL_FRAME + 4,
            "{} bytes",
            frame.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
