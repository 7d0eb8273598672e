//! Byte pumps between a TCP socket and a QUIC stream, shared by the worker's relay and the
//! CLI's local forwarder. Neither direction copies in user space: TCP reads land in buffers
//! that quinn takes as they are (`write_chunk`), and received stream data goes to the socket
//! in the buffers quinn decrypted it into (`read_chunks` + vectored writes), several packets
//! per system call.

use std::io::{self, IoSlice};
use std::pin::Pin;

use bytes::{Buf as _, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};

/// Largest read from a socket at once.
pub const CHUNK: usize = 64 * 1024;
/// Received stream chunks (~one QUIC packet each) a new pump takes per read: small, so an idle
/// connection holds little.
const FIRST_BATCH: usize = 8;
/// Most received chunks written in one system call. A pump whose read fills its room doubles
/// it, up to this: a busy stream on a 1500-byte path brings hundreds of packets per wake-up.
const MAX_BATCH: usize = 256;

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
    // On the heap, so its size does not count in every connection's future.
    let mut chunks = vec![Bytes::new(); FIRST_BATCH];
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
        if n == chunks.len() && n < MAX_BATCH {
            chunks.resize(n * 2, Bytes::new());
        }
    }
}

/// Writes every chunk, in order, with as few vectored writes as the socket allows, then lets
/// go of them (and so of the packet buffers behind them) rather than keep them to the next read.
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
        let pending = &chunks[first..];
        // The slices are built on the stack at each poll, not kept in the future across it.
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_BATCH];
            let count = pending.len().min(MAX_BATCH);
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = IoSlice::new(chunk);
            }
            Pin::new(&mut *to).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
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
    chunks.fill(Bytes::new());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A received packet's buffer, counting when it is let go.
    struct Owned {
        data: Vec<u8>,
        released: Arc<AtomicUsize>,
    }

    impl AsRef<[u8]> for Owned {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }

    impl Drop for Owned {
        fn drop(&mut self) {
            self.released.fetch_add(1, Ordering::SeqCst);
        }
    }

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
        // More chunks than one vectored write takes.
        let parts: Vec<Vec<u8>> = (0..MAX_BATCH + 40)
            .map(|i| vec![i as u8; 1 + (i * 37) % 300])
            .collect();
        let expected: Vec<u8> = parts.concat();
        for limit in [1, 7, 300, 100_000] {
            let released = Arc::new(AtomicUsize::new(0));
            let mut chunks: Vec<Bytes> = parts
                .iter()
                .map(|part| {
                    Bytes::from_owner(Owned {
                        data: part.clone(),
                        released: released.clone(),
                    })
                })
                .collect();
            chunks.insert(3, Bytes::new()); // empty chunks are skipped, not written
            let mut sink = Trickle {
                out: Vec::new(),
                limit,
            };
            write_all_chunks(&mut sink, &mut chunks)
                .await
                .expect("write");
            assert_eq!(sink.out, expected, "limit {limit}");
            assert_eq!(
                released.load(Ordering::SeqCst),
                parts.len(),
                "every written chunk's buffer is let go (limit {limit})"
            );
        }
    }
}
