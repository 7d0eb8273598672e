//! QUIC endpoints on UDP sockets with large buffers, and QUIC packets as large as the path
//! allows.
//!
//! Buffers: with the kernel's default (~208 KiB) receive buffer, a busy session dropped
//! hundreds of datagrams per second in the benchmark, each a loss that QUIC's congestion
//! control answers by slowing down.
//!
//! Packet size: most of a QUIC relay's CPU goes into per-packet work (framing, AEAD set-up,
//! acknowledgement tracking, one system call per batch), so bytes per packet is throughput.
//! Each connection lets quinn's path-MTU discovery (DPLPMTUD, RFC 8899: probes that are
//! never retransmitted, falling back on loss) climb to the MTU of the route the kernel uses
//! towards the peer — 1,500 on Ethernet, 9,000 with jumbo frames — instead of quinn's fixed
//! 1,452-byte ceiling; towards a loopback address (65,536) it starts there. `POSTERN_QUIC_MAX_UDP_PAYLOAD` caps it
//! (1452 gives the figures of a 1500-byte path).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Socket buffer size asked for (the kernel caps it at `net.core.{r,w}mem_max`).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The environment variable that caps the UDP payload (bytes) of every QUIC packet.
pub const MAX_UDP_PAYLOAD_ENV: &str = "POSTERN_QUIC_MAX_UDP_PAYLOAD";
/// quinn's own ceiling, used where the route's MTU is unknown (IPv6, other systems).
const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1452;
/// The least a QUIC path must carry (RFC 9000 §14).
const MIN_UDP_PAYLOAD: u16 = 1200;
/// The most a UDP datagram can carry over IPv4 (65,535 less IP and UDP headers).
const MAX_UDP_PAYLOAD: u16 = 65_507;
/// quinn hands the kernel at most 10 datagrams per GSO batch, and the kernel refuses a batch
/// over 64 KiB: above this size segmentation offload is off (large packets need no batching).
const MAX_GSO_PAYLOAD: u16 = 6_500;
/// Ack-eliciting packets a peer may receive before it must acknowledge (quinn's default is
/// 1: every 2nd packet).
const ACK_ELICITING_THRESHOLD: u32 = 9;
/// The longest a peer may hold an acknowledgement back. Shorter than QUIC's default 25 ms,
/// so that a window of fewer than ten packets (a slow path after a loss) waits at most this
/// long for its acknowledgement, and a lost tail packet is probed for sooner.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// A QUIC endpoint bound to `addr` (a server if `server` is given), with large socket
/// buffers where the kernel allows them, receiving packets up to the configured ceiling.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_on(std::net::UdpSocket::bind(addr)?, server)
}

/// A QUIC endpoint on `socket` (from [`lane_sockets`]): what [`endpoint`] does with a socket
/// it binds itself. Its driver runs on the current runtime.
pub fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config()?,
        server,
        Arc::new(Socket::with_buffers(socket)?),
        Arc::new(quinn::TokioRuntime),
    )
}

/// `lanes` UDP sockets bound to the same address with `SO_REUSEPORT` (the first picks the
/// port if `addr`'s is 0): the kernel hands each one the datagrams of some peers by their
/// addresses, so every connection stays on the socket its first packet reached.
pub fn lane_sockets(addr: SocketAddr, lanes: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket as RawSocket, Type};
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let socket = RawSocket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.bind(&bound.into())?;
        let socket: std::net::UdpSocket = socket.into();
        bound = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// A session endpoint's configuration: the packet size it accepts (a transport parameter;
/// the peer still discovers what the path carries).
pub fn endpoint_config() -> std::io::Result<quinn::EndpointConfig> {
    let mut config = quinn::EndpointConfig::default();
    let accepted = configured_cap()
        .unwrap_or(MAX_UDP_PAYLOAD)
        .max(MIN_UDP_PAYLOAD);
    config
        .max_udp_payload_size(accepted)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(config)
}

/// `socket` as a session endpoint's socket ([`endpoint`] uses the same), for a driver of
/// quinn-proto other than quinn's own (`postern-bench proto-tunnel`). Registers it with the
/// current runtime's reactor.
pub fn session_socket(socket: std::net::UdpSocket) -> io::Result<impl quinn::AsyncUdpSocket> {
    Socket::with_buffers(socket)
}

/// quinn's tokio socket, less two kinds of needless wake-up:
///
/// - after a receive that returned fewer datagrams than it had room for, the socket is known
///   to be drained and waits for the next readiness event instead of asking the kernel again
///   to hear `EAGAIN` (that empty `recvmmsg` was one in three receive calls under a
///   request/response load);
/// - the socket is registered for reading only. A UDP socket turns writable again each time
///   the kernel frees a datagram it sent (on loopback within the send itself), so with
///   writability registered every send brought one more event to the reactor: one more
///   `epoll_wait` per sent datagram. Writability is only waited for after a send hit `EAGAIN`,
///   on a registration of its own ([`Writable`]).
#[derive(Debug)]
struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: quinn::udp::UdpSocketState,
    /// A send hit `EAGAIN` and the socket has not been seen writable since.
    blocked: AtomicBool,
}

impl Socket {
    /// Prepares `socket` for quinn (which also makes it non-blocking) and registers it with
    /// the runtime's reactor.
    fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        Ok(Socket {
            io: register(socket, Interest::READABLE)?,
            state,
            blocked: AtomicBool::new(false),
        })
    }

    /// [`Socket::new`] with large socket buffers where the kernel allows them.
    fn with_buffers(socket: std::net::UdpSocket) -> io::Result<Self> {
        let socket = Socket::new(socket)?;
        let (state, fd) = (&socket.state, socket.io.get_ref());
        // Best effort: a smaller buffer still works, only less well under load.
        if let Err(e) = state.set_recv_buffer_size(fd.into(), SOCKET_BUFFER) {
            tracing::debug!("cannot enlarge the UDP receive buffer: {e}");
        }
        if let Err(e) = state.set_send_buffer_size(fd.into(), SOCKET_BUFFER) {
            tracing::debug!("cannot enlarge the UDP send buffer: {e}");
        }
        Ok(socket)
    }
}

/// Registers `socket` with the runtime's reactor for `interest`.
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // `AsyncFd::with_interest` is deprecated for types whose descriptor might change or
    // close under it (tokio#8587); a `std::net::UdpSocket` owns its descriptor for as long as
    // it lives, which is the contract of the `unsafe` replacement this crate does not use.
    #[allow(deprecated)]
    AsyncFd::with_interest(socket, interest)
}

impl quinn::AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if let Err(e) = &sent {
            if e.kind() == io::ErrorKind::WouldBlock {
                self.blocked.store(true, Ordering::Relaxed);
            }
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match guard.try_io(|fd| self.state.recv(fd.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    if n < bufs.len() {
                        // Readiness that arrived since this guard was taken is kept.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `EAGAIN`: readiness was cleared; wait for the next event.
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// One connection's wait for [`Socket`] to turn writable after a send hit `EAGAIN` (quinn
/// asks before every send: the answer is "yes" unless a send was refused). While it waits it
/// holds a duplicate of the socket's descriptor registered for writability alone, dropped
/// (deregistered) as soon as the socket is writable; registering reports a socket that is
/// already writable at once, so no wake-up is lost between the refused send and the wait.
#[derive(Debug)]
struct Writable {
    socket: Arc<Socket>,
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl quinn::UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.socket.blocked.load(Ordering::Relaxed) {
            this.waiting = None;
            return Poll::Ready(Ok(()));
        }
        let waiting = match this.waiting.take() {
            Some(waiting) => waiting,
            None => match (this.socket.io.get_ref().try_clone())
                .and_then(|dup| register(dup, Interest::WRITABLE))
            {
                Ok(waiting) => waiting,
                Err(e) => {
                    // Out of descriptors, say: rather than fail the connection, let the
                    // runtime run the others and then send again (a retry per turn of the
                    // runtime instead of a wait).
                    tracing::debug!("cannot wait for the UDP socket to turn writable: {e}");
                    this.socket.blocked.store(false, Ordering::Relaxed);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            },
        };
        match waiting.poll_write_ready(cx) {
            Poll::Ready(Ok(mut guard)) => guard.retain_ready(),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                this.waiting = Some(waiting);
                return Poll::Pending;
            }
        }
        this.socket.blocked.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Sizes `transport`'s packets for the path to `peer`: MTU discovery up to what the route
/// carries, and segmentation offload only while packets are small enough to batch.
pub fn tune_for_path(transport: &mut quinn::TransportConfig, peer: SocketAddr) {
    let ceiling = path_ceiling(peer);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(ceiling);
    transport
        .mtu_discovery_config(Some(discovery))
        .enable_segmentation_offload(ceiling <= MAX_GSO_PAYLOAD);
    transport.ack_frequency_config(Some(ack_frequency()));
    // Towards this host itself the route is the whole path: start at its size rather than
    // probe up to it (quinn parses a probe's padding a byte at a time, and a binary search
    // up to 64 KiB cost ~5 ms of CPU on both ends during session set-up). The peer's
    // advertised maximum still bounds it.
    if peer.ip().is_loopback() {
        transport.initial_mtu(ceiling);
        // quinn's initial window is a fixed 14,720 bytes, less than one such packet: size it
        // as RFC 9002 §7.2 does, min(10 × size, max(14,720, 2 × size)).
        let size = u64::from(ceiling);
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window((10 * size).min((2 * size).max(14_720)));
        transport.congestion_controller_factory(Arc::new(cubic));
    }
}

/// What each end asks its peer for (the QUIC ACK-frequency extension, which quinn speaks on
/// both ends): an acknowledgement after every 10th ack-eliciting packet rather than every
/// 2nd, and within [`ACK_DELAY`] of the first unacknowledged one. Requests and answers
/// carry their acknowledgements along, so a relay of small requests (`pgbench -S`) sends no
/// packet that only acknowledges: the worker sent 1.17 datagrams per transaction before and
/// 1.01 after. Bulk transfers are acknowledged once per received batch either way.
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(ACK_DELAY));
    ack
}

/// The largest UDP payload worth probing for towards `peer`.
pub fn path_ceiling(peer: SocketAddr) -> u16 {
    let route = route_payload(peer).unwrap_or(DEFAULT_MAX_UDP_PAYLOAD);
    let cap = configured_cap().unwrap_or(MAX_UDP_PAYLOAD);
    route.min(cap).clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
}

/// `POSTERN_QUIC_MAX_UDP_PAYLOAD`, if set to a number (anything else is reported, once, and
/// ignored). Read once per process.
fn configured_cap() -> Option<u16> {
    static CAP: std::sync::OnceLock<Option<u16>> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        let raw = std::env::var(MAX_UDP_PAYLOAD_ENV).ok()?;
        match raw.trim().parse::<u16>() {
            Ok(v) if v >= MIN_UDP_PAYLOAD => Some(v),
            _ => {
                tracing::warn!(
                    "ignoring {MAX_UDP_PAYLOAD_ENV}={raw:?}: expected a number of bytes from {MIN_UDP_PAYLOAD} to 65527"
                );
                None
            }
        }
    })
}

/// The UDP payload the kernel's route towards `peer` carries: its MTU (`IP_MTU` of a
/// connected socket, which also reflects a learned path MTU) less the IPv4 and UDP headers.
/// `None` for IPv6 and where the kernel cannot say.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn route_payload(peer: SocketAddr) -> Option<u16> {
    if !matches!(peer.ip(), IpAddr::V4(_)) {
        return None;
    }
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(peer).ok()?;
    let mtu = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::IpMtu).ok()?;
    u16::try_from(mtu.saturating_sub(28)).ok()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn route_payload(_peer: SocketAddr) -> Option<u16> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_carry_large_packets_and_turn_batching_off() {
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let lo_mtu: usize = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("loopback MTU")
            .trim()
            .parse()
            .expect("number");
        let expected = (lo_mtu - 28).min(MAX_UDP_PAYLOAD as usize) as u16;
        assert_eq!(route_payload(peer), Some(expected));
        let mut transport = quinn::TransportConfig::default();
        tune_for_path(&mut transport, peer); // must accept whatever the route says
                                             // IPv6 keeps quinn's default.
        assert_eq!(route_payload("[::1]:9".parse().expect("addr")), None);
    }

    /// Receives into `slots` buffers; how many datagrams came.
    async fn recv(socket: &Socket, slots: usize) -> usize {
        use quinn::AsyncUdpSocket as _;
        let mut bufs = vec![[0u8; 2048]; slots];
        let mut iovs: Vec<io::IoSliceMut<'_>> =
            bufs.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
        let mut meta = vec![quinn::udp::RecvMeta::default(); slots];
        let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut iovs, &mut meta));
        tokio::time::timeout(std::time::Duration::from_secs(5), n)
            .await
            .expect("a datagram within 5 s")
            .expect("receive")
    }

    #[tokio::test]
    async fn a_drained_socket_wakes_for_the_next_datagram_and_a_full_batch_reads_on() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let socket = Socket::new(std_socket).expect("socket");
        let to = socket.io.get_ref().local_addr().expect("addr");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind peer");

        // One datagram, room for four: drained, readiness cleared.
        peer.send_to(&[1; 100], to).expect("send");
        assert_eq!(recv(&socket, 4).await, 1);
        // The next one, sent while the receiver waits, still wakes it.
        let late = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            peer.send_to(&[2; 101], to).expect("send");
            peer
        });
        assert_eq!(recv(&socket, 4).await, 1);
        let peer = late.join().expect("sender");
        // Six (of different sizes, so none are coalesced), room for four: a full batch
        // leaves readiness set, and the next call reads the other two.
        for size in 102..108 {
            peer.send_to(&vec![3; size], to).expect("send");
        }
        assert_eq!(recv(&socket, 4).await, 4);
        assert_eq!(recv(&socket, 4).await, 2);
    }

    /// Runs `cmd` (in this thread's network namespace), failing the test if it fails.
    fn run(cmd: &str, args: &[&str]) {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    }

    /// A send the kernel refuses (`EAGAIN`: the send buffer is full) makes the connection
    /// wait, and the socket turning writable wakes it. Loopback frees each datagram within
    /// the send, so the test holds them in a slow queue (tbf, 100 kbit/s) on the loopback of a
    /// network namespace of its own thread. Needs root (CI runs as root).
    #[test]
    fn a_refused_send_waits_until_the_socket_is_writable() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace of this thread's own (needs root)");
            run("ip", &["link", "set", "lo", "up"]);
            run(
                "tc",
                &[
                    "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100kbit", "burst", "1600",
                    "limit", "1000000",
                ],
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let socket = Arc::new(Socket::new(std_socket).expect("socket"));
                // The kernel's least send buffer: a few datagrams fill it.
                socket
                    .state
                    .set_send_buffer_size(socket.io.get_ref().into(), 1)
                    .expect("send buffer");
                let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sink");
                let payload = [7u8; 1000];
                let transmit = quinn::udp::Transmit {
                    destination: sink.local_addr().expect("addr"),
                    ecn: None,
                    contents: &payload,
                    segment_size: None,
                    src_ip: None,
                };
                let mut poller = quinn::AsyncUdpSocket::create_io_poller(socket.clone());
                let mut sent = 0;
                loop {
                    assert!(
                        futures::poll!(std::future::poll_fn(|cx| poller
                            .as_mut()
                            .poll_writable(cx)))
                        .is_ready(),
                        "writable until a send is refused"
                    );
                    match quinn::AsyncUdpSocket::try_send(&*socket, &transmit) {
                        Ok(()) => sent += 1,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("send {sent}: {e}"),
                    }
                    assert!(sent < 1000, "the send buffer never filled");
                }
                // The queue lets one datagram through every ~80 ms: not writable yet.
                let mut writable = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
                assert!(
                    futures::poll!(&mut writable).is_pending(),
                    "after {sent} sends"
                );
                tokio::time::timeout(std::time::Duration::from_secs(10), writable)
                    .await
                    .expect("writable again as the queue drains")
                    .expect("poll");
                quinn::AsyncUdpSocket::try_send(&*socket, &transmit).expect("sends again");
            });
        })
        .join()
        .expect("test thread");
    }
}
