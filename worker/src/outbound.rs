//! Outbound-only mode (DESIGN §7): the worker binds no socket clients could reach. Its
//! session endpoint — the same quinn server, TLS configuration and listener as in direct
//! mode — runs on a [`VirtualSocket`] whose datagrams come from relay streams that the
//! controller opens on the worker's cluster connection ([`postern_proto::relay`]), one per
//! client address. The controller only forwards those datagrams: the client's QUIC/TLS
//! connection, and so the token check and the `cnf` binding of its key, end here.
//!
//! Each relayed client gets a synthetic address in `fd70:6f73:7465:726e::/64` (a unique
//! local prefix, "postern") that the endpoint sees as the client's; what the endpoint
//! sends to that address goes back down the client's relay stream. The relay is lossy by
//! design, like the UDP it stands for: a full queue drops a datagram rather than buffer
//! without bound, and QUIC's own recovery and congestion control deal with it.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use postern_proto::relay::{code, datagram_header, datagram_len, RelayOpen, MAX_DATAGRAM};
use postern_proto::PROTOCOL_VERSION;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, RecvStream, SendStream, UdpPoller, VarInt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::frames::{read_frame, ReadFrameError};

/// The synthetic prefix of relayed clients' addresses.
const FLOW_PREFIX: [u16; 4] = [0xfd70, 0x6f73, 0x7465, 0x726e];
/// Datagrams from every relayed client waiting for the endpoint.
const INBOX: usize = 4096;
/// Datagrams waiting to go down one client's relay stream.
const FLOW_QUEUE: usize = 1024;
/// How long the controller may take to send a relay stream's header.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay stream ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OutboundError {
    /// The stream's header was missing or wrong (controller side).
    #[error("bad relay stream header: {0}")]
    Header(String),
    /// The stream or the cluster connection failed (controller side).
    #[error("relay stream: {0}")]
    Stream(String),
    /// The controller sent something that is not a relay datagram (controller side).
    #[error("controller broke the relay protocol: {0}")]
    Protocol(String),
}

/// The relay end of an outbound-only worker: the virtual socket and the way in to it.
pub(crate) struct Relay {
    socket: Arc<VirtualSocket>,
    inbox: mpsc::Sender<(SocketAddr, Bytes)>,
    next_flow: AtomicU64,
}

impl Relay {
    /// The session endpoint on a virtual socket, and the relay that feeds it.
    pub(crate) fn endpoint(
        server: quinn::ServerConfig,
    ) -> io::Result<(quinn::Endpoint, Arc<Relay>)> {
        let (inbox, inbox_rx) = mpsc::channel(INBOX);
        let socket = Arc::new(VirtualSocket {
            local: flow_addr(0, 0),
            inbox: Mutex::new(inbox_rx),
            flows: Mutex::new(HashMap::new()),
        });
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let relay = Arc::new(Relay {
            socket,
            inbox,
            next_flow: AtomicU64::new(1),
        });
        Ok((endpoint, relay))
    }

    /// Serves the relay streams the controller opens on the cluster connection `conn` until
    /// it closes.
    pub(crate) async fn accept(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let relay = self.clone();
            tokio::spawn(async move {
                if let Err(e) = relay.serve_stream(send, recv).await {
                    tracing::debug!("relay stream ended: {e}");
                }
            });
        }
    }

    /// One relayed client: datagrams up the stream go to the endpoint, what the endpoint
    /// sends to the client's synthetic address goes down it.
    async fn serve_stream(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), OutboundError> {
        let open: RelayOpen = match timeout(OPEN_TIMEOUT, read_frame(&mut recv)).await {
            Ok(Ok(open)) => open,
            Ok(Err(ReadFrameError::Invalid(e))) => {
                let _ = send.reset(VarInt::from_u32(code::PROTOCOL));
                return Err(OutboundError::Header(e.to_string()));
            }
            Ok(Err(e)) => return Err(OutboundError::Stream(e.to_string())),
            Err(_) => return Err(OutboundError::Header("none within 10 s".into())),
        };
        if open.version != PROTOCOL_VERSION {
            let _ = send.reset(VarInt::from_u32(code::PROTOCOL));
            return Err(OutboundError::Header(format!("version {}", open.version)));
        }
        let port = open
            .client
            .parse::<SocketAddr>()
            .map(|a| a.port())
            .unwrap_or(0);
        let addr = flow_addr(self.next_flow.fetch_add(1, Ordering::Relaxed), port);
        let (tx, mut down) = mpsc::channel::<Bytes>(FLOW_QUEUE);
        self.socket.flows().insert(addr, tx);
        let _flow = FlowGuard {
            socket: &self.socket,
            addr,
        };
        tracing::debug!(client = %open.client, %addr, "relayed client");

        let up = async {
            let mut header = [0u8; 2];
            loop {
                recv.read_exact(&mut header)
                    .await
                    .map_err(|e| OutboundError::Stream(e.to_string()))?;
                let len =
                    datagram_len(header).map_err(|e| OutboundError::Protocol(e.to_string()))?;
                let mut datagram = vec![0u8; len];
                recv.read_exact(&mut datagram)
                    .await
                    .map_err(|e| OutboundError::Stream(e.to_string()))?;
                // A full inbox drops the datagram, as a congested network would.
                let _ = self.inbox.try_send((addr, Bytes::from(datagram)));
            }
        };
        let down = async {
            while let Some(datagram) = down.recv().await {
                let header = datagram_header(datagram.len())
                    .map_err(|e| OutboundError::Protocol(e.to_string()))?;
                send.write_all(&header)
                    .await
                    .map_err(|e| OutboundError::Stream(e.to_string()))?;
                send.write_all(&datagram)
                    .await
                    .map_err(|e| OutboundError::Stream(e.to_string()))?;
            }
            Ok(())
        };
        tokio::select! {
            r = up => r,
            r = down => r,
        }
    }
}

/// Removes a flow's address from the socket when its stream ends.
struct FlowGuard<'a> {
    socket: &'a VirtualSocket,
    addr: SocketAddr,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.socket.flows().remove(&self.addr);
    }
}

/// The synthetic address of relayed client number `n`.
fn flow_addr(n: u64, port: u16) -> SocketAddr {
    let [a, b, c, d] = FLOW_PREFIX;
    let ip = Ipv6Addr::new(
        a,
        b,
        c,
        d,
        (n >> 48) as u16,
        (n >> 32) as u16,
        (n >> 16) as u16,
        n as u16,
    );
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// A UDP socket for quinn whose datagrams travel on relay streams.
#[derive(Debug)]
struct VirtualSocket {
    local: SocketAddr,
    inbox: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    flows: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
}

impl VirtualSocket {
    fn flows(&self) -> MutexGuard<'_, HashMap<SocketAddr, mpsc::Sender<Bytes>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AsyncUdpSocket for VirtualSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let flows = self.flows();
        // A client whose stream is gone: the datagram is lost, as on a network.
        let Some(tx) = flows.get(&transmit.destination) else {
            return Ok(());
        };
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(segment) {
            let _ = tx.try_send(Bytes::copy_from_slice(datagram));
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        let room = bufs.len().min(meta.len());
        let mut filled = 0;
        while filled < room {
            let next = if filled == 0 {
                match inbox.poll_recv(cx) {
                    Poll::Ready(next) => next,
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                inbox.try_recv().ok()
            };
            let Some((addr, datagram)) = next else {
                break;
            };
            let buf = &mut bufs[filled];
            if datagram.len() > buf.len() || datagram.len() > MAX_DATAGRAM {
                // Dropped, as a network would; the next one is waited for as usual.
                continue;
            }
            buf[..datagram.len()].copy_from_slice(&datagram);
            meta[filled] = RecvMeta {
                addr,
                len: datagram.len(),
                stride: datagram.len(),
                ecn: None,
                dst_ip: None,
            };
            filled += 1;
        }
        if filled == 0 {
            // The relay, which holds the sender for as long as the worker runs, is gone: the
            // worker is stopping and nothing more will arrive. Waiting (rather than an
            // error, which quinn logs as one) lets the endpoint close quietly.
            return Poll::Pending;
        }
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Sending never blocks: a full queue drops the datagram instead.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(socket: &VirtualSocket, bufs: &mut [Vec<u8>]) -> Poll<io::Result<Vec<Vec<u8>>>> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); slices.len()];
        socket
            .poll_recv(&mut cx, &mut slices, &mut meta)
            .map_ok(|n| (0..n).map(|i| slices[i][..meta[i].len].to_vec()).collect())
    }

    #[test]
    fn an_oversized_datagram_is_dropped_and_a_gone_relay_is_quiet() {
        let (tx, rx) = mpsc::channel(8);
        let socket = VirtualSocket {
            local: flow_addr(0, 0),
            inbox: Mutex::new(rx),
            flows: Mutex::new(HashMap::new()),
        };
        let from = flow_addr(1, 1);
        let mut bufs = vec![vec![0u8; 16]; 2];
        // Too large for the buffer: dropped, and the one after it still arrives.
        tx.try_send((from, Bytes::from(vec![1u8; 32])))
            .expect("send");
        tx.try_send((from, Bytes::from_static(b"hello")))
            .expect("send");
        match poll(&socket, &mut bufs) {
            Poll::Ready(Ok(got)) => assert_eq!(got, vec![b"hello".to_vec()]),
            other => panic!("expected the second datagram, got {other:?}"),
        }
        // Only an oversized one: nothing to hand over yet, not an error.
        tx.try_send((from, Bytes::from(vec![1u8; 32])))
            .expect("send");
        assert!(poll(&socket, &mut bufs).is_pending());
        // The relay gone (the worker stopping): waiting, not an error quinn would log.
        drop(tx);
        assert!(poll(&socket, &mut bufs).is_pending());
    }
}
