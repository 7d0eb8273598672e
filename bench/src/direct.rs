//! `postern-bench proto-tunnel`: an experiment, not the CLI's data path. The client side of a
//! session (hello, then one stream per local TCP connection, as `postern connect` speaks it)
//! driven by a single task on quinn-proto directly: one loop owns the UDP socket, the QUIC
//! endpoint and connection, the listener and every forwarded socket, so a round trip costs
//! no task hand-offs, channel sends or connection-lock round trips (what quinn's own driver
//! spends between the socket and a stream). It measures how much of the client's CPU per
//! small round trip that driver costs; the worker side is the real one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future as _;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use bytes::{Buf as _, Bytes, BytesMut};
use quinn::udp::RecvMeta;
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, Event, StreamEvent, StreamId,
    VarInt, WriteError,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncRead as _, AsyncWrite as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use postern_cli::session::{client_config, new_client_key, worker_transport};
use postern_proto::session::{ConnOpen, ConnReply, SessionHello, SessionReply};
use postern_proto::{frame, PROTOCOL_VERSION};

use crate::floor::drain;
use crate::{authorize, ApiArgs};

const CHUNK: usize = 64 * 1024;
const BATCH: usize = 10;
/// Room for one receive's datagram (or GRO batch); four per receive call.
const SLOT: usize = 64 * 1024;

/// One forwarded TCP connection and its stream.
struct Fwd {
    tcp: TcpStream,
    /// The worker's `ConnReply` has arrived (raw bytes follow).
    open: bool,
    /// Bytes of the reply frame so far.
    reply: Vec<u8>,
    /// Stream data not yet written to the socket.
    out: VecDeque<Bytes>,
    /// Socket data the stream did not take yet.
    held: Option<Bytes>,
    buf: Vec<u8>,
    tcp_eof: bool,
    stream_fin: bool,
}

struct Driver {
    endpoint: Endpoint,
    handle: ConnectionHandle,
    conn: Connection,
    udp: Box<dyn quinn::AsyncUdpSocket>,
    worker: SocketAddr,
    listener: TcpListener,
    timer: Pin<Box<tokio::time::Sleep>>,
    hello: Option<StreamId>,
    hello_buf: Vec<u8>,
    token: String,
    active: bool,
    readable: HashSet<StreamId>,
    writable: HashSet<StreamId>,
    fwds: HashMap<StreamId, Fwd>,
    rbuf: Vec<u8>,
    tbuf: Vec<u8>,
    accepted: u64,
}

/// A whole frame at the front of `buf`, if there is one; the bytes after it stay in `buf`.
fn take_frame<T: DeserializeOwned>(buf: &mut Vec<u8>) -> Result<Option<T>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = frame::body_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = frame::decode(&buf[4..4 + len])?;
    buf.drain(..4 + len);
    Ok(Some(msg))
}

impl Driver {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        for _ in 0..64 {
            let mut progress = self.receive(cx)?;
            let now = Instant::now();
            if self.conn.poll_timeout().is_some_and(|at| at <= now) {
                self.conn.handle_timeout(now);
                progress = true;
            }
            while let Some(event) = self.conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(self.handle, event) {
                    self.conn.handle_event(back);
                }
            }
            self.events()?;
            if self.active {
                progress |= self.accept(cx)?;
            }
            progress |= self.forward(cx)?;
            progress |= self.transmit()?;
            if let Some(at) = self.conn.poll_timeout() {
                let at = tokio::time::Instant::from_std(at);
                if self.timer.deadline() != at {
                    self.timer.as_mut().reset(at);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    progress = true;
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Let other work run; come straight back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn receive(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        let mut progress = false;
        loop {
            let mut meta = [RecvMeta::default(); 4];
            let (a, rest) = self.rbuf.split_at_mut(SLOT);
            let (b, rest) = rest.split_at_mut(SLOT);
            let (c, d) = rest.split_at_mut(SLOT);
            let mut bufs = [
                IoSliceMut::new(a),
                IoSliceMut::new(b),
                IoSliceMut::new(c),
                IoSliceMut::new(d),
            ];
            let n = match self.udp.poll_recv(cx, &mut bufs, &mut meta) {
                Poll::Ready(r) => r?,
                Poll::Pending => return Ok(progress),
            };
            progress = true;
            let now = Instant::now();
            for (m, buf) in meta.iter().zip(&bufs).take(n) {
                for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                    match self.endpoint.handle(
                        now,
                        m.addr,
                        m.dst_ip,
                        None,
                        BytesMut::from(datagram),
                        &mut self.tbuf,
                    ) {
                        Some(DatagramEvent::ConnectionEvent(_, event)) => {
                            self.conn.handle_event(event)
                        }
                        Some(DatagramEvent::Response(t)) => {
                            let _ = self.udp.try_send(&quinn::udp::Transmit {
                                destination: self.worker,
                                ecn: None,
                                contents: &self.tbuf[..t.size],
                                segment_size: None,
                                src_ip: None,
                            });
                        }
                        _ => {}
                    }
                    self.tbuf.clear();
                }
            }
        }
    }

    fn events(&mut self) -> Result<()> {
        while let Some(event) = self.conn.poll() {
            match event {
                Event::Connected => {
                    let id = self
                        .conn
                        .streams()
                        .open(Dir::Bi)
                        .context("no stream for the hello")?;
                    let hello = frame::encode(&SessionHello {
                        version: PROTOCOL_VERSION,
                        token: std::mem::take(&mut self.token),
                        grant_pushed: false,
                    })?;
                    self.conn.send_stream(id).write(&hello)?;
                    self.hello = Some(id);
                }
                Event::ConnectionLost { reason } => bail!("session ended: {reason}"),
                Event::Stream(StreamEvent::Readable { id }) => {
                    self.readable.insert(id);
                }
                Event::Stream(StreamEvent::Writable { id }) => {
                    self.writable.insert(id);
                }
                _ => {}
            }
        }
        if let Some(id) = self.hello {
            if !self.active && self.readable.remove(&id) {
                read_into(&mut self.conn, id, &mut self.hello_buf)?;
                match take_frame::<SessionReply>(&mut self.hello_buf)? {
                    Some(SessionReply::Accepted { .. }) => {
                        self.active = true;
                        println!("ready {}", self.listener.local_addr()?);
                    }
                    Some(other) => bail!("session refused: {other:?}"),
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        let mut progress = false;
        while let Poll::Ready(r) = self.listener.poll_accept(cx) {
            progress = true;
            let (tcp, _) = r?;
            tcp.set_nodelay(true)?;
            let Some(id) = self.conn.streams().open(Dir::Bi) else {
                continue; // the worker allows no more streams yet
            };
            let open = frame::encode(&ConnOpen {
                version: PROTOCOL_VERSION,
            })?;
            self.conn.send_stream(id).write(&open)?;
            self.accepted += 1;
            self.fwds.insert(
                id,
                Fwd {
                    tcp,
                    open: false,
                    reply: Vec::new(),
                    out: VecDeque::new(),
                    held: None,
                    buf: vec![0; CHUNK],
                    tcp_eof: false,
                    stream_fin: false,
                },
            );
        }
        Ok(progress)
    }

    fn forward(&mut self, cx: &mut Context<'_>) -> Result<bool> {
        let mut progress = false;
        let mut done = Vec::new();
        for (&id, f) in self.fwds.iter_mut() {
            match step(
                &mut self.conn,
                id,
                f,
                cx,
                &mut self.readable,
                &mut self.writable,
            ) {
                Ok(p) => progress |= p,
                Err(_) => {
                    let _ = self.conn.send_stream(id).reset(VarInt::from_u32(0));
                    let _ = self.conn.recv_stream(id).stop(VarInt::from_u32(0));
                    done.push(id);
                    continue;
                }
            }
            if f.tcp_eof && f.stream_fin && f.out.is_empty() {
                done.push(id);
            }
        }
        for id in done {
            self.fwds.remove(&id);
            progress = true;
        }
        Ok(progress)
    }

    fn transmit(&mut self) -> Result<bool> {
        let mut sent = false;
        let now = Instant::now();
        let max = self.udp.max_transmit_segments().min(BATCH);
        while let Some(t) = self.conn.poll_transmit(now, max, &mut self.tbuf) {
            sent = true;
            let transmit = quinn::udp::Transmit {
                destination: t.destination,
                ecn: None,
                contents: &self.tbuf[..t.size],
                segment_size: t.segment_size,
                src_ip: t.src_ip,
            };
            match self.udp.try_send(&transmit) {
                Ok(()) => {}
                // Dropped: QUIC's loss recovery sends it again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            self.tbuf.clear();
        }
        Ok(sent)
    }
}

/// Reads what stream `id` has into `buf`; `true` if the stream finished.
fn read_into(conn: &mut Connection, id: StreamId, buf: &mut Vec<u8>) -> Result<bool> {
    drain(conn, id, |bytes| buf.extend_from_slice(&bytes))
}

/// One forwarded connection's work: the worker's reply, stream → socket, socket → stream.
fn step(
    conn: &mut Connection,
    id: StreamId,
    f: &mut Fwd,
    cx: &mut Context<'_>,
    readable: &mut HashSet<StreamId>,
    writable: &mut HashSet<StreamId>,
) -> Result<bool> {
    let mut progress = false;
    // Stream → socket, when the socket has taken everything before.
    if f.out.is_empty() && !f.stream_fin && readable.remove(&id) {
        if !f.open {
            f.stream_fin = read_into(conn, id, &mut f.reply)?;
            match take_frame::<ConnReply>(&mut f.reply)? {
                Some(ConnReply::Ok) => {
                    f.open = true;
                    if !f.reply.is_empty() {
                        f.out.push_back(Bytes::from(std::mem::take(&mut f.reply)));
                    }
                }
                Some(other) => bail!("connection refused: {other:?}"),
                None => {}
            }
        } else {
            f.stream_fin = drain(conn, id, |bytes| f.out.push_back(bytes))?;
        }
        progress = true;
    }
    while !f.out.is_empty() {
        let slices: Vec<IoSlice<'_>> = f.out.iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = match Pin::new(&mut f.tcp).poll_write_vectored(cx, &slices) {
            Poll::Ready(r) => r?,
            Poll::Pending => break,
        };
        progress = true;
        while n > 0 {
            let front = f.out.front_mut().context("wrote past the queue")?;
            let take = n.min(front.len());
            front.advance(take);
            n -= take;
            if front.is_empty() {
                f.out.pop_front();
            }
        }
    }
    // Socket → stream, once the worker said yes and while the stream takes it all.
    if !f.open || f.tcp_eof {
        return Ok(progress);
    }
    if let Some(held) = f.held.take() {
        if !writable.remove(&id) {
            f.held = Some(held);
            return Ok(progress);
        }
        f.held = offer(conn, id, held)?;
        if f.held.is_some() {
            return Ok(progress);
        }
        progress = true;
    }
    loop {
        let n = {
            let mut read = ReadBuf::new(&mut f.buf);
            match Pin::new(&mut f.tcp).poll_read(cx, &mut read) {
                Poll::Ready(r) => {
                    r?;
                    read.filled().len()
                }
                Poll::Pending => break,
            }
        };
        progress = true;
        if n == 0 {
            f.tcp_eof = true;
            let _ = conn.send_stream(id).finish();
            break;
        }
        // One copy (this crate has no `unsafe` to read into uninitialised room).
        f.held = offer(conn, id, Bytes::copy_from_slice(&f.buf[..n]))?;
        if f.held.is_some() {
            break;
        }
    }
    Ok(progress)
}

/// Writes `data` to stream `id` as far as flow control lets it; what it did not take.
fn offer(conn: &mut Connection, id: StreamId, data: Bytes) -> Result<Option<Bytes>> {
    let mut chunks = [data];
    match conn.send_stream(id).write_chunks(&mut chunks) {
        Ok(_) | Err(WriteError::Blocked) => {}
        Err(e) => return Err(e.into()),
    }
    let [rest] = chunks;
    Ok((!rest.is_empty()).then_some(rest))
}

pub async fn run(api: &ApiArgs, port: u16) -> Result<Value> {
    let http = reqwest::Client::new();
    let key = new_client_key()?;
    let auth = authorize(&http, api, key.spki_b64()).await?;
    let worker: SocketAddr = tokio::net::lookup_host(&auth.worker.addr)
        .await?
        .next()
        .context("worker address")?;
    let mut config = client_config(&auth.ca_pem, &key)?;
    config.transport_config(Arc::new(worker_transport(worker)));
    let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    udp.connect(worker)?;
    let mut endpoint = Endpoint::new(
        Arc::new(postern_worker::udp::endpoint_config()?),
        None,
        true,
        None,
    );
    let (handle, conn) =
        endpoint.connect(Instant::now(), config, worker, &auth.worker.server_name)?;
    let mut driver = Driver {
        endpoint,
        handle,
        conn,
        udp: Box::new(postern_worker::udp::session_socket(udp)?),
        worker,
        listener: TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?,
        timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600))),
        hello: None,
        hello_buf: Vec::new(),
        token: auth.token.clone(),
        active: false,
        readable: HashSet::new(),
        writable: HashSet::new(),
        fwds: HashMap::new(),
        rbuf: vec![0; 4 * SLOT],
        tbuf: Vec::with_capacity(65_536),
        accepted: 0,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = std::future::poll_fn(|cx| driver.poll(cx)) => r?,
        _ = term.recv() => {}
    }
    let s = driver.conn.stats();
    Ok(json!({
        "connections": driver.accepted,
        "udp_tx_datagrams": s.udp_tx.datagrams,
        "udp_rx_datagrams": s.udp_rx.datagrams,
    }))
}
