//! Reading and writing `proto::frame` frames on QUIC streams.

use postern_proto::frame::{self, FrameError};
use quinn::{ReadExactError, RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFrameError {
    /// The peer finished the stream before a whole frame arrived.
    #[error("stream ended before a whole frame arrived")]
    Finished,
    /// The stream or connection failed.
    #[error("{}", read_failure(.0))]
    Transport(#[from] quinn::ReadError),
    /// The frame is too large or not the expected message: the peer's fault.
    #[error("{0}")]
    Invalid(#[from] FrameError),
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteFrameError {
    /// The message cannot be encoded (too large).
    #[error("{0}")]
    Encode(#[from] FrameError),
    /// The stream or connection failed.
    #[error("{}", write_failure(.0))]
    Transport(#[from] quinn::WriteError),
}

/// quinn's "connection lost" with why: the reason a controller gives when it closes the
/// connection ("worker deleted", "this controller runs no relay …") is in the cause.
fn read_failure(e: &quinn::ReadError) -> String {
    match e {
        quinn::ReadError::ConnectionLost(why) => format!("connection lost: {why}"),
        other => other.to_string(),
    }
}

/// [`read_failure`] for a write.
fn write_failure(e: &quinn::WriteError) -> String {
    match e {
        quinn::WriteError::ConnectionLost(why) => format!("connection lost: {why}"),
        other => other.to_string(),
    }
}

/// Reads one frame: the 4-byte length, then a body of at most [`frame::MAX_FRAME`] bytes.
pub(crate) async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<T, ReadFrameError> {
    let mut header = [0u8; 4];
    read_exact(recv, &mut header).await?;
    let len = frame::body_len(header)?;
    let mut body = vec![0u8; len];
    read_exact(recv, &mut body).await?;
    Ok(frame::decode(&body)?)
}

/// Writes one frame.
pub(crate) async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), WriteFrameError> {
    let bytes = frame::encode(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), ReadFrameError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(_) => ReadFrameError::Finished,
        ReadExactError::ReadError(e) => ReadFrameError::Transport(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_says_why() {
        let closed = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(1),
            reason: b"worker deleted"[..].into(),
        });
        let read = ReadFrameError::from(quinn::ReadError::ConnectionLost(closed.clone()));
        assert_eq!(
            read.to_string(),
            "connection lost: closed by peer: worker deleted (code 1)"
        );
        let write = WriteFrameError::from(quinn::WriteError::ConnectionLost(closed));
        assert!(write.to_string().contains("worker deleted"), "{write}");
    }
}
