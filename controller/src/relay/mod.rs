//! The session relay for outbound-only workers (DESIGN §7).
//!
//! A worker that may not accept inbound connections keeps only its cluster connection to a
//! controller. Clients are told to dial this controller's relay port (UDP) instead of the
//! worker, with the worker's TLS name as before. The relay does not terminate their QUIC
//! connection: it reads the server name from the client's Initial packets ([`initial`]),
//! which names the worker, and from then on carries the client's datagrams, unread, over a
//! bidirectional stream of that worker's cluster connection ([`postern_proto::relay`]). The
//! worker runs its ordinary session endpoint on them, so TLS, the token check and the `cnf`
//! binding to the client's key all happen end to end between client and worker; the relay
//! adds no plaintext hop and the client cannot tell it from a direct worker.
//!
//! Flows are keyed by the client's address. A flow ends when the worker's stream ends (its
//! connection to this controller is gone) or when the client has sent nothing for
//! [`IDLE`] (longer than the session's QUIC idle timeout). A client that changes address
//! (QUIC migration) is not followed.

pub mod initial;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postern_proto::relay::{code, datagram_header, datagram_len, RelayOpen, MAX_DATAGRAM};
use postern_proto::{frame, PROTOCOL_VERSION};
use quinn::VarInt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::initial::HelloReader;
use crate::state::AppState;

/// A flow ends when its client has sent nothing for this long (sessions keep alive every
/// 5 s and time out after 30 s).
pub const IDLE: Duration = Duration::from_secs(35);
/// How long a client may take to send a whole ClientHello.
const HELLO_WINDOW: Duration = Duration::from_secs(3);
/// How many datagrams a ClientHello may span.
const HELLO_DATAGRAMS: usize = 4;
/// How long a new flow waits for a stream of the worker's cluster connection.
const STREAM_WAIT: Duration = Duration::from_secs(5);
/// Flows (and half-read hellos) a controller carries at most.
const MAX_FLOWS: usize = 16_384;
/// Of which from one IP address (an office behind one NAT address, or one attacker).
const MAX_FLOWS_PER_IP: usize = 1_024;
/// Datagrams queued towards a worker per flow; beyond, they are dropped as a congested
/// network would, and the client's congestion control slows down.
const FLOW_QUEUE: usize = 1024;
/// Bytes queued towards a worker per flow at most (datagrams of up to 64 KiB would otherwise
/// let one flow queue 64 MiB while its worker's stream drains).
const FLOW_QUEUE_BYTES: usize = 2 << 20;
/// Bytes queued towards workers by the flows of one source address at most (one address must
/// not take the relay's whole budget).
const SOURCE_QUEUE_BYTES: usize = 32 << 20;
/// Bytes queued towards workers by all flows together at most.
const RELAY_QUEUE_BYTES: usize = 256 << 20;

/// The suffix of a worker's TLS name ([`postern_proto::worker_server_name`]).
const WORKER_NAME_SUFFIX: &str = ".worker.postern.internal";

/// Why the relay could not start or a flow ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The UDP socket could not be bound.
    #[error("cannot listen for relayed sessions on {addr}: {error}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The worker's cluster connection refused or lost the stream (worker side).
    #[error("worker stream: {0}")]
    Worker(String),
    /// The worker sent something that is not a relay datagram.
    #[error("worker broke the relay protocol: {0}")]
    Protocol(String),
}

/// Binds the relay's UDP socket.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, RelayError> {
    let std = std::net::UdpSocket::bind(addr)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|error| RelayError::Bind { addr, error })?;
    UdpSocket::from_std(std).map_err(|error| RelayError::Bind { addr, error })
}

/// What the relay knows of one client address.
enum Entry {
    /// Its ClientHello is still arriving.
    Hello {
        reader: HelloReader,
        held: Vec<Bytes>,
        since: Instant,
    },
    /// Its datagrams go to a worker.
    Open {
        id: u64,
        tx: mpsc::Sender<Bytes>,
        queued: Arc<Queued>,
    },
}

/// Bytes a flow has queued, within its own bound, its source address's and the relay's.
#[derive(Debug)]
struct Queued {
    flow: AtomicUsize,
    source: Arc<AtomicUsize>,
    relay: Arc<AtomicUsize>,
}

impl Queued {
    fn new(source: Arc<AtomicUsize>, relay: Arc<AtomicUsize>) -> Self {
        Queued {
            flow: AtomicUsize::new(0),
            source,
            relay,
        }
    }

    /// Counts `len` more bytes queued, unless that would pass a bound.
    fn take(&self, len: usize) -> bool {
        let bounds = [
            (&self.flow, FLOW_QUEUE_BYTES),
            (&*self.source, SOURCE_QUEUE_BYTES),
            (&*self.relay, RELAY_QUEUE_BYTES),
        ];
        for (i, (count, bound)) in bounds.iter().enumerate() {
            if count.fetch_add(len, Ordering::Relaxed) + len > *bound {
                for (taken, _) in &bounds[..=i] {
                    taken.fetch_sub(len, Ordering::Relaxed);
                }
                return false;
            }
        }
        true
    }

    /// `len` bytes left the queue.
    fn give(&self, len: usize) {
        for count in [&self.flow, &*self.source, &*self.relay] {
            count.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

/// Queues `datagram` for a flow's task, within the flow's bounds; a full queue drops it, as
/// a congested network would. False when the task has ended.
fn enqueue(tx: &mpsc::Sender<Bytes>, queued: &Queued, datagram: Bytes) -> bool {
    let len = datagram.len();
    if !queued.take(len) {
        return true;
    }
    match tx.try_send(datagram) {
        Ok(()) => true,
        Err(e) => {
            queued.give(len);
            !matches!(e, mpsc::error::TrySendError::Closed(_))
        }
    }
}

/// Ends a flow's queue: nothing more gets in, and what it still holds leaves the flow's, its
/// source address's and the relay's counts with it.
fn close_queue(rx: &mut mpsc::Receiver<Bytes>, queued: &Queued) {
    rx.close();
    while let Ok(d) = rx.try_recv() {
        queued.give(d.len());
    }
}

/// Carries client datagrams to outbound-only workers until the controller stops.
pub async fn serve(state: AppState, socket: UdpSocket) {
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let mut relay = Relay {
        state,
        socket: Arc::new(socket),
        flows: Flows::default(),
        ended: ended_tx,
        next_id: 0,
        queued: Arc::default(),
        sources: HashMap::new(),
    };
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = relay.socket.recv_from(&mut buf) => match received {
                Ok((len, client)) => relay.datagram(client, Bytes::copy_from_slice(&buf[..len])),
                // ICMP errors of earlier sends surface here; the socket lives on.
                Err(e) => tracing::debug!(error = %e, "relay receive failed"),
            },
            Some((client, id)) = ended_rx.recv() => {
                if matches!(relay.flows.get(&client), Some(Entry::Open { id: open, .. }) if *open == id) {
                    relay.flows.remove(&client);
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                relay.flows.retain(|e| {
                    !matches!(e, Entry::Hello { since, .. } if now - *since > HELLO_WINDOW)
                });
                // A source's count goes with its last flow.
                relay.sources.retain(|_, queued| Arc::strong_count(queued) > 1);
            }
        }
    }
}

/// The flows by client address, counted per source IP address.
struct Flows<E> {
    by_client: HashMap<SocketAddr, E>,
    per_ip: HashMap<std::net::IpAddr, usize>,
}

impl<E> Default for Flows<E> {
    fn default() -> Self {
        Flows {
            by_client: HashMap::new(),
            per_ip: HashMap::new(),
        }
    }
}

impl<E> Flows<E> {
    fn get(&self, client: &SocketAddr) -> Option<&E> {
        self.by_client.get(client)
    }

    fn len(&self) -> usize {
        self.by_client.len()
    }

    /// How many flows come from `ip`.
    fn count_from(&self, ip: std::net::IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn insert(&mut self, client: SocketAddr, entry: E) {
        if self.by_client.insert(client, entry).is_none() {
            *self.per_ip.entry(client.ip()).or_default() += 1;
        }
    }

    fn remove(&mut self, client: &SocketAddr) -> Option<E> {
        let entry = self.by_client.remove(client)?;
        self.uncount(client.ip());
        Some(entry)
    }

    fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) {
        let mut gone = Vec::new();
        self.by_client.retain(|client, e| {
            let kept = keep(e);
            if !kept {
                gone.push(client.ip());
            }
            kept
        });
        for ip in gone {
            self.uncount(ip);
        }
    }

    fn uncount(&mut self, ip: std::net::IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// The relay loop's state.
struct Relay {
    state: AppState,
    socket: Arc<UdpSocket>,
    flows: Flows<Entry>,
    /// Flow tasks report here when they end: (client, flow id).
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    next_id: u64,
    /// Bytes queued towards workers by all flows.
    queued: Arc<AtomicUsize>,
    /// Bytes queued per source address, while it has flows.
    sources: HashMap<std::net::IpAddr, Arc<AtomicUsize>>,
}

impl Relay {
    /// One datagram from `client`.
    fn datagram(&mut self, client: SocketAddr, datagram: Bytes) {
        if let Some(Entry::Open { tx, queued, .. }) = self.flows.get(&client) {
            if !enqueue(tx, queued, datagram) {
                self.flows.remove(&client);
            }
            return;
        }
        let (mut reader, mut held, since) = match self.flows.remove(&client) {
            Some(Entry::Hello {
                reader,
                held,
                since,
            }) => (reader, held, since),
            _ if self.flows.len() >= MAX_FLOWS => {
                tracing::debug!(%client, "relay full: datagram dropped");
                return;
            }
            // One address cannot take the relay for itself.
            _ if self.flows.count_from(client.ip()) >= MAX_FLOWS_PER_IP => {
                tracing::debug!(%client, "relay: too many flows from this address, datagram dropped");
                return;
            }
            _ => (HelloReader::default(), Vec::new(), Instant::now()),
        };
        let read = reader.push(&datagram);
        held.push(datagram);
        match read {
            Ok(Some(name)) => {
                if let Some(entry) = self.open_flow(client, &name, held) {
                    self.flows.insert(client, entry);
                }
            }
            Ok(None) if held.len() < HELLO_DATAGRAMS => {
                self.flows.insert(
                    client,
                    Entry::Hello {
                        reader,
                        held,
                        since,
                    },
                );
            }
            Ok(None) => tracing::debug!(%client, "relay dropped a client: ClientHello too long"),
            Err(e) => tracing::debug!(%client, "relay dropped a datagram: {e}"),
        }
    }

    /// Starts carrying `client`'s datagrams (`held` first) to the worker its hello names.
    fn open_flow(&mut self, client: SocketAddr, name: &str, held: Vec<Bytes>) -> Option<Entry> {
        let refuse = |why: &str| {
            tracing::info!(%client, server_name = %name, "relay refused a client: {why}");
        };
        // DNS names compare without regard to case (the hello carries what the client typed).
        let worker = name
            .len()
            .checked_sub(WORKER_NAME_SUFFIX.len())
            .filter(|at| name.is_char_boundary(*at))
            .filter(|at| name[*at..].eq_ignore_ascii_case(WORKER_NAME_SUFFIX))
            .map(|at| &name[..at]);
        let Some(worker) = worker else {
            refuse("not a worker name");
            return None;
        };
        let Some(conn) = self.state.workers.relay_connection(worker) else {
            // The client retries its Initial a few times (the worker may be back by then),
            // then says that the worker cannot be reached.
            refuse("no outbound-only worker of that name is connected to this controller");
            return None;
        };
        let (tx, mut rx) = mpsc::channel(FLOW_QUEUE);
        let source = self.sources.entry(client.ip()).or_default().clone();
        let queued = Arc::new(Queued::new(source, self.queued.clone()));
        for d in held {
            enqueue(&tx, &queued, d);
        }
        self.next_id += 1;
        let id = self.next_id;
        let (socket, ended, worker) = (self.socket.clone(), self.ended.clone(), worker.to_owned());
        let flow_queued = queued.clone();
        tokio::spawn(async move {
            tracing::debug!(%client, %worker, "relaying a client");
            match carry(conn, client, &mut rx, &flow_queued, &socket).await {
                Ok(()) => tracing::debug!(%client, %worker, "relayed client idle: flow ended"),
                Err(e) => tracing::debug!(%client, %worker, "relayed flow ended: {e}"),
            }
            close_queue(&mut rx, &flow_queued);
            let _ = ended.send((client, id));
        });
        Some(Entry::Open { id, tx, queued })
    }
}

/// Carries one client's datagrams over a new stream of the worker's cluster connection
/// until either side ends.
async fn carry(
    conn: quinn::Connection,
    client: SocketAddr,
    from_client: &mut mpsc::Receiver<Bytes>,
    queued: &Queued,
    socket: &UdpSocket,
) -> Result<(), RelayError> {
    let worker_err = |e: &dyn std::fmt::Display| RelayError::Worker(e.to_string());
    // A worker out of streams (flows beyond its stream limit) must not hold this flow, and
    // its queue, forever.
    let (mut send, mut recv) = tokio::time::timeout(STREAM_WAIT, conn.open_bi())
        .await
        .map_err(|_| worker_err(&"the worker has no stream to spare for a new client"))?
        .map_err(|e| worker_err(&e))?;
    let open = frame::encode(&RelayOpen {
        version: PROTOCOL_VERSION,
        client: client.to_string(),
    })
    .map_err(|e| RelayError::Protocol(e.to_string()))?;
    send.write_all(&open).await.map_err(|e| worker_err(&e))?;
    let up = async {
        loop {
            let datagram = match tokio::time::timeout(IDLE, from_client.recv()).await {
                Ok(Some(d)) => {
                    queued.give(d.len());
                    d
                }
                Ok(None) | Err(_) => {
                    let _ = send.reset(VarInt::from_u32(code::IDLE));
                    return Ok(());
                }
            };
            let header =
                datagram_header(datagram.len()).map_err(|e| RelayError::Protocol(e.to_string()))?;
            send.write_all(&header).await.map_err(|e| worker_err(&e))?;
            send.write_all(&datagram)
                .await
                .map_err(|e| worker_err(&e))?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let mut header = [0u8; 2];
            recv.read_exact(&mut header)
                .await
                .map_err(|e| worker_err(&e))?;
            let len = datagram_len(header).map_err(|e| RelayError::Protocol(e.to_string()))?;
            recv.read_exact(&mut buf[..len])
                .await
                .map_err(|e| worker_err(&e))?;
            if let Err(e) = socket.send_to(&buf[..len], client).await {
                tracing::debug!(%client, error = %e, "relay could not send to the client");
            }
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_bytes_are_bounded_per_flow_source_and_relay() {
        let relay = Arc::new(AtomicUsize::new(0));
        let source = Arc::new(AtomicUsize::new(0));
        let a = Queued::new(source.clone(), relay.clone());
        assert!(a.take(FLOW_QUEUE_BYTES - 10));
        assert!(!a.take(11), "past the flow's bound");
        assert!(a.take(10));
        a.give(FLOW_QUEUE_BYTES);
        assert_eq!(
            (
                source.load(Ordering::Relaxed),
                relay.load(Ordering::Relaxed)
            ),
            (0, 0)
        );
        // The flows of one address stop at its bound, whatever the relay has left.
        let of_one: Vec<Queued> = (0..SOURCE_QUEUE_BYTES / FLOW_QUEUE_BYTES + 1)
            .map(|_| Queued::new(source.clone(), relay.clone()))
            .collect();
        let taken = of_one.iter().filter(|f| f.take(FLOW_QUEUE_BYTES)).count();
        assert_eq!(taken, SOURCE_QUEUE_BYTES / FLOW_QUEUE_BYTES);
        assert_eq!(
            of_one.last().map(|f| f.flow.load(Ordering::Relaxed)),
            Some(0),
            "a refused take leaves no count behind"
        );
        for f in &of_one[..taken] {
            f.give(FLOW_QUEUE_BYTES);
        }
        // Many addresses together stop at the relay's bound.
        let flows: Vec<Queued> = (0..RELAY_QUEUE_BYTES / FLOW_QUEUE_BYTES + 1)
            .map(|_| Queued::new(Arc::default(), relay.clone()))
            .collect();
        let taken = flows.iter().filter(|f| f.take(FLOW_QUEUE_BYTES)).count();
        assert_eq!(taken, RELAY_QUEUE_BYTES / FLOW_QUEUE_BYTES);
        assert_eq!(relay.load(Ordering::Relaxed), RELAY_QUEUE_BYTES);
        let last = &flows[flows.len() - 1];
        assert_eq!(
            (
                last.flow.load(Ordering::Relaxed),
                last.source.load(Ordering::Relaxed)
            ),
            (0, 0)
        );
        flows[0].give(FLOW_QUEUE_BYTES);
        assert!(last.take(1000), "room again once a flow drains");
    }

    #[test]
    fn an_ended_flow_gives_back_what_it_still_held() {
        let relay = Arc::new(AtomicUsize::new(0));
        let source = Arc::new(AtomicUsize::new(0));
        let queued = Queued::new(source.clone(), relay.clone());
        let (tx, mut rx) = mpsc::channel(FLOW_QUEUE);
        for len in [1000, 1200, 1452] {
            assert!(enqueue(&tx, &queued, Bytes::from(vec![0u8; len])));
        }
        assert_eq!(relay.load(Ordering::Relaxed), 3652);
        close_queue(&mut rx, &queued);
        let counts =
            || [&queued.flow, &*source, &*relay].map(|count| count.load(Ordering::Relaxed));
        assert_eq!(counts(), [0, 0, 0], "all given back");
        // An ended flow takes nothing more, and counts nothing for it.
        assert!(!enqueue(&tx, &queued, Bytes::from(vec![0u8; 1000])));
        assert_eq!(counts(), [0, 0, 0]);
    }

    #[test]
    fn flows_are_counted_per_source_address() {
        let a = |port| SocketAddr::from(([192, 0, 2, 1], port));
        let b = SocketAddr::from(([192, 0, 2, 2], 1));
        let mut flows = Flows::default();
        flows.insert(a(1), 1);
        flows.insert(a(2), 2);
        flows.insert(a(2), 3); // the same client again: not a new flow
        flows.insert(b, 4);
        assert_eq!(
            (
                flows.len(),
                flows.count_from(a(0).ip()),
                flows.count_from(b.ip())
            ),
            (3, 2, 1)
        );
        assert_eq!(flows.remove(&a(1)), Some(1));
        assert_eq!(flows.remove(&a(1)), None);
        assert_eq!(flows.count_from(a(0).ip()), 1);
        flows.retain(|e| *e != 3);
        assert_eq!((flows.len(), flows.count_from(a(0).ip())), (1, 0));
        assert!(
            !flows.per_ip.contains_key(&a(0).ip()),
            "no count left behind"
        );
        assert_eq!(flows.get(&b), Some(&4));
    }
}
