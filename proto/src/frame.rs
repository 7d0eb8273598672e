//! Length-prefixed frames: a u32 big-endian length, then that many bytes of JSON.
//!
//! In the manner of mini-redis, reading is split into [`check`] (is a whole frame here, and is
//! its announced length acceptable?) and [`decode`] (parse the body into a typed message), so
//! that both sides' async layers stay a few lines and the decoder is fuzzable in memory.

use serde::{de::DeserializeOwned, Serialize};

/// The largest frame body accepted or produced, except on a worker's control stream.
pub const MAX_FRAME: usize = 64 * 1024;
/// The largest frame body a worker's control stream carries to its controller (both ends
/// authenticated by the cluster's certificates): its audit batches (`Events`), up to 50 ms
/// of a busy statement audit. Each batch costs the controller a transaction and the worker
/// an acknowledgement whatever its size: with 64 KiB batches (~20 ms of `pgbench -S`) the
/// controller's threads spent ~2.5 µs more per audited statement than with 256 KiB (4 of 4
/// interleaved rounds). A controller older than this limit refuses larger frames: upgrade
/// controllers before workers.
pub const MAX_CONTROL_FRAME: usize = 256 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced or produced body is larger than the limit ([`MAX_FRAME`] unless said).
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The body's length.
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The body is not the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    prefixed(&body)
}

/// One frame (length prefix included) of an already encoded body.
pub fn prefixed(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    prefixed_within(body, MAX_FRAME)
}

/// [`prefixed`], for a body of at most `limit` bytes.
pub fn prefixed_within(body: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    if body.len() > limit {
        return Err(FrameError::TooLarge {
            len: body.len(),
            limit,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads the length prefix and returns the body length it announces, if acceptable.
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    body_len_within(header, MAX_FRAME)
}

/// [`body_len`], accepting up to `limit` bytes.
pub fn body_len_within(header: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Is a whole frame at the start of `buf`? Returns its total length (prefix included).
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let mut h = [0u8; 4];
    h.copy_from_slice(header);
    let len = body_len(h)?;
    Ok((buf.len() >= 4 + len).then_some(4 + len))
}

/// Parses a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionHello;

    #[test]
    fn round_trip() {
        let hello = SessionHello {
            grant_pushed: false,
            version: 1,
            token: "abc".into(),
        };
        let bytes = encode(&hello).expect("encodes");
        let total = check(&bytes).expect("valid").expect("complete");
        assert_eq!(total, bytes.len());
        let back: SessionHello = decode(&bytes[4..total]).expect("decodes");
        assert_eq!(back.token, "abc");
    }

    #[test]
    fn partial_frame_is_not_ready() {
        let bytes = encode(&42u32).expect("encodes");
        assert_eq!(check(&bytes[..bytes.len() - 1]).expect("valid"), None);
        assert_eq!(check(&bytes[..2]).expect("valid"), None);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(body_len(header), Err(FrameError::TooLarge { .. })));
        // A worker's control stream carries larger frames, up to its own limit.
        assert_eq!(
            body_len_within(header, MAX_CONTROL_FRAME).ok(),
            Some(MAX_FRAME + 1)
        );
        let over = ((MAX_CONTROL_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            body_len_within(over, MAX_CONTROL_FRAME),
            Err(FrameError::TooLarge { len, limit }) if len == MAX_CONTROL_FRAME + 1 && limit == MAX_CONTROL_FRAME
        ));
        assert!(matches!(check(&header), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        for garbage in [&b"\xff\xfe"[..], b"{", b"[]", b"null", b"\"x\""] {
            let r: Result<SessionHello, _> = decode(garbage);
            assert!(matches!(r, Err(FrameError::Malformed(_))));
        }
    }
}
