//! Byte pumps between a TCP socket and a QUIC stream, shared by the worker's relay and the
//! CLI's local forwarder. Neither direction copies in user space: TCP reads land in buffers
//! that quinn takes as they are (`write_chunk`), and received stream data goes to the socket
//! in the buffers quinn decrypted it into (`read_chunks` + vectored writes), several packets
//! per system call.

use std::io::{self, IoSlice};

use bytes::{Buf as _, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest read from a socket at once.
pub const CHUNK: usize = 64 * 1024;
/// Most received stream chunks (~one QUIC packet each) written in one system call.
const BATCH: usize = 32;

/// Which side of a pump failed.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading from the source.
    #[error("{0}")]
    Source(io::Error),
    /// Writing to the sink.
    #[error("{0}")]
    Sink(io::Error),
}

/// Moves `from` into the stream `to` until `from` ends (the stream is left open), counting
/// into `moved` as it goes, so a failure still reports what got through.
pub async fn into_stream<R: AsyncRead + Unpin>(
    from: &mut R,
    to: &mut SendStream,
    moved: &mut u64,
) -> Result<(), PumpError> {
    // Allocated as needed and never initialised, so idle connections keep nothing resident.
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        let n = from.read_buf(&mut buf).await.map_err(PumpError::Source)?;
        if n == 0 {
            return Ok(());
        }
        to.write_chunk(buf.split().freeze())
            .await
            .map_err(|e| PumpError::Sink(e.into()))?;
        *moved += n as u64;
    }
}

/// Moves the stream `from` into `to` until the stream finishes (`to` is left open),
/// counting into `moved`.
pub async fn out_of_stream<W: AsyncWrite + Unpin>(
    from: &mut RecvStream,
    to: &mut W,
    moved: &mut u64,
) -> Result<(), PumpError> {
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    loop {
        let Some(n) = from
            .read_chunks(&mut chunks)
            .await
            .map_err(|e| PumpError::Source(e.into()))?
        else {
            return Ok(());
        };
        let total: usize = chunks[..n].iter().map(Bytes::len).sum();
        write_all_chunks(to, &mut chunks[..n])
            .await
            .map_err(PumpError::Sink)?;
        *moved += total as u64;
    }
}

/// Writes every chunk, in order, with as few vectored writes as the socket allows.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    to: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let mut written = {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let count = chunks.len() - first;
            for (slice, chunk) in slices.iter_mut().zip(&chunks[first..]) {
                *slice = IoSlice::new(chunk);
            }
            to.write_vectored(&slices[..count]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            let take = written.min(chunk.len());
            chunk.advance(take);
            written -= take;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call, to exercise partial writes.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_keep_every_byte_in_order() {
        let parts: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 1 + (i as usize * 37) % 300])
            .collect();
        let expected: Vec<u8> = parts.concat();
        for limit in [1, 7, 300, 100_000] {
            let mut chunks: Vec<Bytes> = parts.iter().cloned().map(Bytes::from).collect();
            chunks.insert(3, Bytes::new()); // empty chunks are skipped, not written
            let mut sink = Trickle {
                out: Vec::new(),
                limit,
            };
            for batch in chunks.chunks_mut(BATCH) {
                write_all_chunks(&mut sink, batch).await.expect("write");
            }
            assert_eq!(sink.out, expected, "limit {limit}");
        }
    }
}
