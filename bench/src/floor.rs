//! `postern-bench quic-floor`: what quinn-proto itself costs per small request/response, with
//! the session's own TLS suite and transports (`postern_cli::session::worker_transport`,
//! `postern_worker::session_transport_for`), and nothing else: both ends in this one thread,
//! datagrams handed over in memory — no sockets, no async runtime, no relay. Each end's time
//! inside quinn-proto is summed apart, so the figure per end is what a client or worker
//! process cannot spend less than on one round trip however its driver is written.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicServerConfig;
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, ReadError, ServerConfig,
    StreamId,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

use postern_cli::session::{client_config, new_client_key, worker_transport};

const SERVER_NAME: &str = "worker.bench.invalid";
/// Most datagrams taken from a connection per `poll_transmit`, as quinn's driver asks.
const BATCH: usize = 10;
/// Bound on the exchanges that move one message, so a stalled exchange fails the run.
const MAX_EXCHANGES: usize = 1_000;
/// Longest wait for a timer when nothing moves.
const TIMER_WAIT: Duration = Duration::from_millis(20);

/// One end: its endpoint, its connection once there is one, and its time inside quinn-proto.
struct End {
    endpoint: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    addr: SocketAddr,
    busy: Duration,
    buf: Vec<u8>,
}

impl End {
    fn new(endpoint: Endpoint, port: u16) -> Self {
        Self {
            endpoint,
            conn: None,
            addr: (Ipv4Addr::LOCALHOST, port).into(),
            busy: Duration::ZERO,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    fn conn(&mut self) -> Result<&mut Connection> {
        self.conn
            .as_mut()
            .map(|(_, c)| c)
            .context("no connection yet")
    }

    /// Takes in one datagram from `from`; what the endpoint answers itself goes to `out`.
    fn receive(&mut self, from: SocketAddr, datagram: BytesMut, out: &mut VecDeque<BytesMut>) {
        let t = Instant::now();
        let now = t;
        match self
            .endpoint
            .handle(now, from, None, None, datagram, &mut self.buf)
        {
            Some(DatagramEvent::NewConnection(incoming)) => {
                match self.endpoint.accept(incoming, now, &mut self.buf, None) {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) => {
                        if let Some(t) = e.response {
                            out.push_back(BytesMut::from(&self.buf[..t.size]));
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(_, event)) => {
                if let Some((_, conn)) = self.conn.as_mut() {
                    conn.handle_event(event);
                }
            }
            Some(DatagramEvent::Response(t)) => out.push_back(BytesMut::from(&self.buf[..t.size])),
            None => {}
        }
        self.buf.clear();
        self.busy += t.elapsed();
    }

    /// Timers, endpoint bookkeeping and application events, then every datagram the
    /// connection has to send, split into single datagrams, to `out`. Returns whether the
    /// connection was lost.
    fn service(&mut self, out: &mut VecDeque<BytesMut>) -> Option<String> {
        let t = Instant::now();
        let mut lost = None;
        if let Some((handle, conn)) = self.conn.as_mut() {
            let now = Instant::now();
            if conn.poll_timeout().is_some_and(|at| at <= now) {
                conn.handle_timeout(now);
            }
            while let Some(event) = conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(*handle, event) {
                    conn.handle_event(back);
                }
            }
            while let Some(event) = conn.poll() {
                if let Event::ConnectionLost { reason } = event {
                    lost = Some(reason.to_string());
                }
            }
            while let Some(transmit) = conn.poll_transmit(now, BATCH, &mut self.buf) {
                let size = transmit.segment_size.unwrap_or(transmit.size);
                for datagram in self.buf[..transmit.size].chunks(size) {
                    out.push_back(BytesMut::from(datagram));
                }
                self.buf.clear();
            }
        }
        self.busy += t.elapsed();
        lost
    }

    /// Reads whatever `id` holds; returns the byte count.
    fn read(&mut self, id: StreamId) -> Result<usize> {
        let t = Instant::now();
        let mut n = 0;
        drain(self.conn()?, id, |bytes| n += bytes.len()).context("reading the stream")?;
        self.busy += t.elapsed();
        Ok(n)
    }

    fn write(&mut self, id: StreamId, data: &[u8]) -> Result<()> {
        let t = Instant::now();
        let written = self
            .conn()?
            .send_stream(id)
            .write(data)
            .context("writing the stream")?;
        if written != data.len() {
            bail!("stream took {written} of {} bytes", data.len());
        }
        self.busy += t.elapsed();
        Ok(())
    }
}

/// Hands `each` every chunk stream `id` holds now; `true` if the stream has finished.
pub(crate) fn drain(
    conn: &mut Connection,
    id: StreamId,
    mut each: impl FnMut(Bytes),
) -> Result<bool> {
    let mut stream = conn.recv_stream(id);
    let mut chunks = stream.read(true)?;
    let read = loop {
        match chunks.next(usize::MAX) {
            Ok(Some(c)) => each(c.bytes),
            Ok(None) => break Ok(true),
            Err(ReadError::Blocked) => break Ok(false),
            Err(e) => break Err(e.into()),
        }
    };
    let _ = chunks.finalize();
    read
}

/// Moves datagrams both ways until neither end has anything to send.
fn exchange(client: &mut End, server: &mut End) -> Result<()> {
    let mut to_server = VecDeque::new();
    let mut to_client = VecDeque::new();
    for _ in 0..MAX_EXCHANGES {
        if let Some(reason) = client.service(&mut to_server) {
            bail!("client connection lost: {reason}");
        }
        while let Some(d) = to_server.pop_front() {
            server.receive(client.addr, d, &mut to_client);
        }
        if let Some(reason) = server.service(&mut to_client) {
            bail!("server connection lost: {reason}");
        }
        if to_client.is_empty() {
            return Ok(());
        }
        while let Some(d) = to_client.pop_front() {
            client.receive(server.addr, d, &mut to_server);
        }
    }
    bail!("no quiet moment after {MAX_EXCHANGES} exchanges")
}

/// Sends `data` on `id` from `from` and exchanges until `to` has read all of it.
fn deliver(
    from: &mut End,
    to: &mut End,
    id: StreamId,
    data: &[u8],
    client_first: bool,
) -> Result<()> {
    from.write(id, data)?;
    let mut got = 0;
    for _ in 0..MAX_EXCHANGES {
        if client_first {
            exchange(from, to)?;
        } else {
            exchange(to, from)?;
        }
        got += to.read(id)?;
        if got >= data.len() {
            return Ok(());
        }
        // Nothing more moves until a timer of either end (the pacer, a delayed
        // acknowledgement) is due: wait for it, outside the time counted.
        let next = [&mut *from, &mut *to]
            .into_iter()
            .filter_map(|end| end.conn.as_mut().and_then(|(_, c)| c.poll_timeout()))
            .min();
        if let Some(at) = next {
            std::thread::sleep(at.saturating_duration_since(Instant::now()).min(TIMER_WAIT));
        }
    }
    bail!("{got} of {} bytes arrived", data.len())
}

pub fn run(round_trips: usize, request: usize, response: usize) -> Result<Value> {
    let key = new_client_key()?;
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
    let cert_der: CertificateDer<'static> = cert.cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(postern_worker::session_crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)?;
    tls.alpn_protocols = vec![postern_proto::ALPN_SESSION.to_vec()];

    let endpoint_config = Arc::new(postern_worker::udp::endpoint_config()?);
    let mut client = End::new(
        Endpoint::new(endpoint_config.clone(), None, true, None),
        40_001,
    );
    let mut server_config = ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    server_config.transport_config(Arc::new(postern_worker::session_transport_for(client.addr)));
    let mut server = End::new(
        Endpoint::new(endpoint_config, Some(Arc::new(server_config)), true, None),
        40_002,
    );

    let mut config = client_config(&cert.cert.pem(), &key)?;
    config.transport_config(Arc::new(worker_transport(server.addr)));
    client.conn = Some(
        client
            .endpoint
            .connect(Instant::now(), config, server.addr, SERVER_NAME)
            .context("connecting")?,
    );
    let mut opened = None;
    for _ in 0..MAX_EXCHANGES {
        exchange(&mut client, &mut server)?;
        if let Some(id) = client.conn()?.streams().open(Dir::Bi) {
            opened = Some(id);
            break;
        }
    }
    let id = opened.context("the handshake did not finish")?;
    let req = vec![b'Q'; request];
    let resp = vec![b'D'; response];
    deliver(&mut client, &mut server, id, &req, true)?;
    let accepted = server.conn()?.streams().accept(Dir::Bi);
    if accepted != Some(id) {
        bail!("the server saw stream {accepted:?}, not {id}");
    }
    deliver(&mut server, &mut client, id, &resp, false)?;

    let warmup = (round_trips / 10).max(1);
    let mut measured = None;
    for i in 0..warmup + round_trips {
        if i == warmup {
            client.busy = Duration::ZERO;
            server.busy = Duration::ZERO;
            measured = Some((Instant::now(), client.conn()?.stats()));
        }
        deliver(&mut client, &mut server, id, &req, true)?;
        deliver(&mut server, &mut client, id, &resp, false)?;
    }
    let (t0, before) = measured.context("no round trips")?;
    let wall = t0.elapsed();
    let after = client.conn()?.stats();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / round_trips as f64;
    let n = round_trips as f64;
    Ok(json!({
        "round_trips": round_trips,
        "request_bytes": request,
        "response_bytes": response,
        "client_us_per_round_trip": per(client.busy),
        "worker_us_per_round_trip": per(server.busy),
        "wall_us_per_round_trip": per(wall),
        "client_datagrams_sent_per_round_trip": (after.udp_tx.datagrams - before.udp_tx.datagrams) as f64 / n,
        "client_datagrams_received_per_round_trip": (after.udp_rx.datagrams - before.udp_rx.datagrams) as f64 / n,
        "client_acks_sent_per_round_trip": (after.frame_tx.acks - before.frame_tx.acks) as f64 / n,
        "client_acks_received_per_round_trip": (after.frame_rx.acks - before.frame_rx.acks) as f64 / n,
        "mtu": after.path.current_mtu,
    }))
}
