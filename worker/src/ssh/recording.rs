//! Shell recordings in asciicast v2: a header line (JSON object), then one JSON array per
//! event, `[seconds, "o" | "i" | "r", data]`. [`Cast`] is the encoder (no I/O); [`Recorder`]
//! streams its lines to the controller, which stores them by session.
//!
//! Frames to the controller are at most 64 KiB: an event carries at most [`EVENT_DATA`]
//! bytes of text and a chunk at most [`CHUNK`] bytes of lines, so that even text that JSON
//! escapes twice (once in the cast line, once in the frame) stays under the limit.

use std::sync::Arc;
use std::time::Instant;

use postern_proto::cluster::WorkerMessage;
use postern_proto::ids::SessionId;
use postern_proto::session::close;
use serde_json::json;

use super::server::Ctx;
use super::{request, Answer, RequestError};
use crate::state::Shared;

/// Largest text in one event, bytes (split at character boundaries).
const EVENT_DATA: usize = 2 * 1024;
/// Lines sent to the controller at once, bytes.
const CHUNK: usize = 24 * 1024;
/// Lines wait at most this long for more before being sent.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// The asciicast v2 encoder of one channel.
pub(crate) struct Cast {
    start: Instant,
    carry_in: Vec<u8>,
    carry_out: Vec<u8>,
}

impl Cast {
    /// The header line; events are timed from now.
    pub(crate) fn start(
        width: u32,
        height: u32,
        timestamp: i64,
        term: Option<&str>,
        title: &str,
    ) -> (Self, String) {
        // A pty asked for without a size (`ssh -tt` from a pipe) reads as the classic
        // terminal: players take no 0-column screen.
        let mut header = json!({
            "version": 2,
            "width": if width == 0 { 80 } else { width },
            "height": if height == 0 { 24 } else { height },
            "timestamp": timestamp,
            "title": title,
        });
        if let Some(term) = term {
            header["env"] = json!({ "TERM": term });
        }
        let cast = Self {
            start: Instant::now(),
            carry_in: Vec::new(),
            carry_out: Vec::new(),
        };
        (cast, header.to_string())
    }

    /// Event lines (each ending in `\n`) for bytes the engineer typed.
    pub(crate) fn input(&mut self, data: &[u8]) -> Vec<String> {
        let text = take_utf8(&mut self.carry_in, data);
        events(self.elapsed(), "i", &text)
    }

    /// Event lines for bytes the target printed.
    pub(crate) fn output(&mut self, data: &[u8]) -> Vec<String> {
        let text = take_utf8(&mut self.carry_out, data);
        events(self.elapsed(), "o", &text)
    }

    /// The event line for a terminal resize.
    pub(crate) fn resize(&mut self, cols: u32, rows: u32) -> Vec<String> {
        events(self.elapsed(), "r", &format!("{cols}x{rows}"))
    }

    fn elapsed(&self) -> f64 {
        // Microsecond precision, as asciinema writes it.
        (self.start.elapsed().as_micros() as f64) / 1e6
    }
}

/// `[t, kind, text]` lines, the text split into pieces of at most [`EVENT_DATA`] bytes.
fn events(t: f64, kind: &str, text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(EVENT_DATA);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        lines.push(format!("{}\n", json!([t, kind, piece])));
        rest = tail;
    }
    lines
}

/// Decodes `carry ‖ data` as UTF-8, keeping an incomplete trailing sequence in `carry` for
/// the next call; invalid bytes become U+FFFD.
fn take_utf8(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let keep = match std::str::from_utf8(carry) {
        Ok(_) => 0,
        // An incomplete sequence at the very end: keep it for later.
        Err(e) if e.error_len().is_none() => carry.len() - e.valid_up_to(),
        Err(_) => incomplete_tail(carry),
    };
    let tail = carry.split_off(carry.len() - keep);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = tail;
    text
}

/// Length of an incomplete UTF-8 sequence ending `bytes` (0 if none).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let need = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => return 0,
            };
            return if need > back { back } else { 0 };
        }
    }
    0
}

/// A recorded channel: encodes events and streams them to the controller. Dropping it sends
/// what is left and ends the recording.
pub(crate) struct Recorder {
    shared: Arc<Shared>,
    session: SessionId,
    id: String,
    cast: Cast,
    buf: String,
    last_flush: Instant,
}

impl Recorder {
    /// Starts a recording at the controller; a shell may start only once it has.
    pub(crate) async fn start(
        ctx: &Ctx,
        width: u32,
        height: u32,
        term: Option<String>,
    ) -> Result<Recorder, RequestError> {
        let id = format!("r_{}", postern_proto::ids::random_base32(16));
        let title = format!(
            "{}@{} (session {}, user {})",
            ctx.login.as_deref().unwrap_or("?"),
            ctx.session.claims.target,
            ctx.session.id,
            ctx.session.claims.sub
        );
        let (cast, header) = Cast::start(
            width,
            height,
            postern_proto::unix_now(),
            term.as_deref(),
            &title,
        );
        let answer = request(&ctx.shared, |rid| WorkerMessage::RecordingStart {
            id: rid,
            session_id: ctx.session.id.clone(),
            recording_id: id.clone(),
            header,
        })
        .await?;
        match answer {
            Answer::RecordingStarted(None) => Ok(Recorder {
                shared: ctx.shared.clone(),
                session: ctx.session.id.clone(),
                id,
                cast,
                buf: String::new(),
                last_flush: Instant::now(),
            }),
            Answer::RecordingStarted(Some(why)) => Err(RequestError::Refused(why)),
            Answer::Certificate(_) => Err(RequestError::Unavailable(
                "the controller answered another request",
            )),
        }
    }

    pub(crate) fn input(&mut self, data: &[u8]) {
        let lines = self.cast.input(data);
        self.push(lines);
    }

    pub(crate) fn output(&mut self, data: &[u8]) {
        let lines = self.cast.output(data);
        self.push(lines);
    }

    pub(crate) fn resize(&mut self, cols: u32, rows: u32) {
        let lines = self.cast.resize(cols, rows);
        self.push(lines);
    }

    fn push(&mut self, lines: Vec<String>) {
        for line in lines {
            if self.buf.len() + line.len() > CHUNK {
                self.flush();
            }
            self.buf.push_str(&line);
        }
        if self.last_flush.elapsed() >= FLUSH_AFTER {
            self.flush();
        }
    }

    /// Ships the buffered events to the controller.
    pub(crate) fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.buf.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.buf);
        let msg = WorkerMessage::RecordingData {
            recording_id: self.id.clone(),
            events,
        };
        if !self.shared.try_report(msg) {
            // Never silently unrecorded: a recording that cannot be shipped ends the session.
            tracing::error!(recording = %self.id, "cannot queue recording data; ending the session");
            self.shared.end_session(
                &self.session,
                close::CANCELLED,
                "session recording failed",
                Some("recording failed"),
            );
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
        self.shared.report(WorkerMessage::RecordingEnd {
            recording_id: self.id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let mut carry = Vec::new();
        let bytes = "é€😀".as_bytes();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&take_utf8(&mut carry, std::slice::from_ref(b)));
        }
        assert_eq!(out, "é€😀");
        assert!(carry.is_empty());
        assert_eq!(take_utf8(&mut carry, b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn events_are_json_arrays_split_at_the_limit() {
        let text = "x".repeat(EVENT_DATA + 10);
        let lines = events(1.5, "o", &text);
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(lines[0].trim_end()).expect("json");
        assert_eq!(first[0], 1.5);
        assert_eq!(first[1], "o");
        assert_eq!(first[2].as_str().map(str::len), Some(EVENT_DATA));
    }

    #[test]
    fn header_is_asciicast_v2() {
        let (mut cast, header) = Cast::start(100, 30, 1_700_000_000, Some("xterm"), "t");
        let h: serde_json::Value = serde_json::from_str(&header).expect("json");
        assert_eq!(h["version"], 2);
        assert_eq!(h["width"], 100);
        assert_eq!(h["env"]["TERM"], "xterm");
        let lines = cast.resize(120, 40);
        assert!(lines[0].contains("\"r\",\"120x40\""));
        let (_, sizeless) = Cast::start(0, 0, 1_700_000_000, None, "t");
        let h: serde_json::Value = serde_json::from_str(&sizeless).expect("json");
        assert_eq!(
            (h["width"].as_u64(), h["height"].as_u64()),
            (Some(80), Some(24))
        );
    }
}
