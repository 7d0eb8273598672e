//! `postern-bench`: the in-process half of `bench/run` (see `bench/README.md`).
//!
//! Every subcommand prints one JSON object on stdout (`echo` and `tunnel` print a `ready`
//! line first and serve until killed). Times are in milliseconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

mod direct;
mod floor;

use postern_cli::session::{
    client_config, new_client_key, open_session, open_session_on, prepare, Session, WorkerHint,
};
use postern_controller::api::types::{Authorization, AuthorizeRequest};
use postern_proto::session::{ConnOpen, ConnReply, SessionHello, SessionReply};
use postern_proto::{frame, PROTOCOL_VERSION};

/// Limit on any single network step, so that a broken peer fails the run instead of hanging.
const STEP: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "Benchmark helper for bench/run")]
struct Cli {
    /// Tokio worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the controller is, who we are, which target.
#[derive(Args, Clone)]
struct ApiArgs {
    /// Controller URL, e.g. http://127.0.0.1:9200.
    #[arg(long)]
    api: String,
    /// Admin API token (from the environment, to keep it out of `ps`).
    #[arg(long, env = "POSTERN_BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// Target name.
    #[arg(long)]
    target: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Audit appends through the controller's writer (hash chain on): EVENTS events from 64
    /// concurrent writers, on a fresh SQLite file or a fresh PostgreSQL database.
    Audit {
        #[arg(long, value_parser = ["sqlite", "postgres"])]
        backend: String,
        #[arg(long, default_value_t = 50_000)]
        events: usize,
    },
    /// TCP echo server (TCP_NODELAY) until killed.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sequential new connections to ADDR: connect() to the first echoed byte back; then
    /// PINGS one-byte round trips on one established connection.
    Connlat {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        #[arg(long, default_value_t = 0)]
        pings: usize,
    },
    /// Whole new sessions: key + authorize + QUIC handshake/hello/activation + a local TCP
    /// connection's first echoed byte.
    Session {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// `POST /v1/targets/T/authorize` rate from CONCURRENCY clients.
    Authz {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Revocation: `POST /v1/sessions/ID/cancel` on a session with an open connection, until
    /// the client sees that connection cut; COUNT times.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// CONNS idle connections through one worker (process PID): RSS per connection, and
    /// whether all are still up after HOLD seconds.
    Idle {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Streams per session (the worker allows 10,000 concurrent streams per session,
        /// one of which is the hello stream).
        #[arg(long, default_value_t = 5_000)]
        per_session: usize,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 5)]
        hold_secs: u64,
    },
    /// quinn-proto alone, both ends in one thread, datagrams in memory: the time each end
    /// spends in it per request/response round trip, with the session's TLS suite and
    /// transports (no sockets, runtime or relay; see bench/README.md).
    QuicFloor {
        #[arg(long, default_value_t = 100_000)]
        round_trips: usize,
        /// Request size, bytes (a `pgbench -S` query is ~70).
        #[arg(long, default_value_t = 70)]
        request: usize,
        /// Response size, bytes (its answer is ~110).
        #[arg(long, default_value_t = 110)]
        response: usize,
    },
    /// Experiment: the client side of a session on one task driving quinn-proto directly
    /// (no quinn driver), serving 127.0.0.1:PORT until SIGTERM.
    ProtoTunnel {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        port: u16,
    },
    /// A session with a tunable client transport (experiments; the worker side is as built),
    /// serving 127.0.0.1:PORT until SIGTERM, then printing the QUIC connection's stats.
    Tunnel {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        port: u16,
        /// MTU discovery upper bound (UDP payload bytes); quinn's default is 1452.
        #[arg(long)]
        max_mtu: Option<u16>,
        /// Disable UDP GSO.
        #[arg(long)]
        no_gso: bool,
        /// Congestion controller: cubic (quinn's default), newreno, bbr.
        #[arg(long, default_value = "cubic")]
        cc: String,
        /// Per-stream receive window, bytes (the CLI uses 8 MiB).
        #[arg(long, default_value_t = 8 << 20)]
        stream_window: u32,
        /// Connection receive and send window, bytes (the CLI uses 32 MiB).
        #[arg(long, default_value_t = 32 << 20)]
        window: u32,
        /// Copy buffer per direction, bytes (the CLI uses 64 KiB).
        #[arg(long, default_value_t = 64 << 10)]
        copy_buf: usize,
        /// Ask the worker to acknowledge only every N+1 ack-eliciting packets (QUIC ACK
        /// frequency extension); quinn's default is 1.
        #[arg(long)]
        ack_threshold: Option<u32>,
        /// With --ack-threshold: the most the worker may delay an acknowledgement, ms.
        #[arg(long)]
        ack_delay_ms: Option<u64>,
    },
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    let out = rt.block_on(async {
        match cli.cmd {
            Cmd::Audit { backend, events } => audit(&backend, events).await,
            Cmd::Echo { listen } => echo(listen).await,
            Cmd::Connlat {
                addr,
                count,
                warmup,
                pings,
            } => connlat(addr, count, warmup, pings).await,
            Cmd::Session { api, count } => sessions(&api, count).await,
            Cmd::Authz {
                api,
                count,
                concurrency,
            } => authz(&api, count, concurrency).await,
            Cmd::Revoke { api, count } => revoke(&api, count).await,
            Cmd::Idle {
                api,
                conns,
                per_session,
                pid,
                hold_secs,
            } => idle(&api, conns, per_session, pid, hold_secs).await,
            Cmd::QuicFloor {
                round_trips,
                request,
                response,
            } => floor::run(round_trips, request, response),
            Cmd::ProtoTunnel { api, port } => direct::run(&api, port).await,
            Cmd::Tunnel {
                api,
                port,
                max_mtu,
                no_gso,
                cc,
                stream_window,
                window,
                copy_buf,
                ack_threshold,
                ack_delay_ms,
            } => {
                let t = Tuning {
                    max_mtu,
                    no_gso,
                    cc,
                    stream_window,
                    window,
                    copy_buf,
                    ack_threshold,
                    ack_delay_ms,
                };
                tunnel(&api, port, t).await
            }
        }
    })?;
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Echo target and per-connection latency

async fn echo(listen: SocketAddr) -> Result<Value> {
    let listener = TcpListener::bind(listen).await?;
    println!("ready {}", listener.local_addr()?);
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let mut buf = [0u8; 4096];
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if sock.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// One echo round trip on a stream-like pair; fails after [`STEP`].
async fn ping<R, W>(r: &mut R, w: &mut W) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(STEP, async {
        w.write_all(b"x").await?;
        w.flush().await?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await?;
        anyhow::Ok(())
    })
    .await
    .context("no echo within 10 s")?
}

async fn first_byte(addr: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.split();
    ping(&mut r, &mut w).await?;
    Ok(t.elapsed())
}

async fn connlat(addr: SocketAddr, count: usize, warmup: usize, pings: usize) -> Result<Value> {
    for _ in 0..warmup {
        first_byte(addr).await?;
    }
    let mut ms = Vec::with_capacity(count);
    for _ in 0..count {
        ms.push(first_byte(addr).await?.as_secs_f64() * 1e3);
    }
    let mut out = summary(ms);
    if pings > 0 {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (mut r, mut w) = s.split();
        ping(&mut r, &mut w).await?;
        let mut rtt = Vec::with_capacity(pings);
        for _ in 0..pings {
            let t = Instant::now();
            ping(&mut r, &mut w).await?;
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out["ping"] = summary(rtt);
    }
    Ok(out)
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    json!({"n": v.len(), "median": q(0.5), "p10": q(0.1), "p90": q(0.9), "p99": q(0.99),
           "min": v.first(), "max": v.last()})
}

// ---------------------------------------------------------------------------------------
// Controller API

async fn authorize(http: &reqwest::Client, api: &ApiArgs, spki: &str) -> Result<Authorization> {
    post(
        http,
        api,
        &format!("/v1/targets/{}/authorize", api.target),
        &AuthorizeRequest {
            client_spki: spki.to_owned(),
            duration_secs: None,
            login: None,
            target_type: None,
        },
    )
    .await
}

async fn post<B: Serialize, T: DeserializeOwned>(
    http: &reqwest::Client,
    api: &ApiArgs,
    path: &str,
    body: &B,
) -> Result<T> {
    let resp = http
        .post(format!("{}{path}", api.api.trim_end_matches('/')))
        .bearer_auth(&api.token)
        .json(body)
        .timeout(STEP)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("POST {path}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

async fn sessions(api: &ApiArgs, count: usize) -> Result<Value> {
    let http = reqwest::Client::new();
    let (mut key_ms, mut auth_ms, mut hs_ms, mut fb_ms, mut total_ms) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut cold_ms, mut cold_hs_ms) = (vec![], vec![]);
    let (mut open_ms, mut echo_ms) = (vec![], vec![]);
    let mut hint: Option<WorkerHint> = None;
    // One warm-up session (connection pool, lazy statics) not counted. Then, alternately, a
    // session as `postern connect` opens one to a target it has used before (the worker it
    // named last time is dialled while the controller authorizes) and one with no such hint
    // ("cold": dialled after the authorization).
    for i in 0..=2 * count {
        let cold = i % 2 == 0;
        let t0 = Instant::now();
        let key = new_client_key()?;
        let t1 = Instant::now();
        let use_hint = if cold { None } else { hint.as_ref() };
        let (auth, prepared) = tokio::join!(authorize(&http, api, key.spki_b64()), async {
            prepare(use_hint, &key)
        });
        let auth = auth?;
        let t2 = Instant::now();
        let session = open_session_on(prepared, &auth, &key).await?;
        let t3 = Instant::now();
        hint = Some(WorkerHint::of(&auth));
        let (addr, serve) = session.listen(0).await?;
        let fb = first_byte(addr).await?;
        let t4 = Instant::now();
        serve.abort();
        if i == 2 * count {
            // The last session also times new connections inside it, without the local TCP
            // hop: open_stream (ConnOpen → worker dials the target → ConnOk), then one echo.
            for _ in 0..200 {
                let t = Instant::now();
                let (mut send, mut recv) = session.open_stream().await?;
                let opened = t.elapsed();
                ping(&mut recv, &mut send).await?;
                open_ms.push(opened.as_secs_f64() * 1e3);
                echo_ms.push((t.elapsed() - opened).as_secs_f64() * 1e3);
            }
        }
        session.close().await;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        if i == 0 {
            continue;
        }
        if cold {
            cold_ms.push(ms(t0, t4));
            cold_hs_ms.push(ms(t2, t3));
        } else {
            key_ms.push(ms(t0, t1));
            auth_ms.push(ms(t1, t2));
            hs_ms.push(ms(t2, t3));
            fb_ms.push(fb.as_secs_f64() * 1e3);
            total_ms.push(ms(t0, t4));
        }
    }
    Ok(json!({
        "total": summary(total_ms), "keygen": summary(key_ms), "authorize": summary(auth_ms),
        "handshake": summary(hs_ms), "first_byte": summary(fb_ms),
        "cold_total": summary(cold_ms), "cold_handshake": summary(cold_hs_ms),
        "stream_open": summary(open_ms), "stream_first_echo": summary(echo_ms),
    }))
}

async fn authz(api: &ApiArgs, count: usize, concurrency: usize) -> Result<Value> {
    let http = reqwest::Client::new();
    let key = new_client_key()?;
    let spki: Arc<str> = key.spki_b64().into();
    for _ in 0..20 {
        authorize(&http, api, &spki).await?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, api, spki) = (http.clone(), api.clone(), spki.clone());
        let (next, errors, lat) = (next.clone(), errors.clone(), lat.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let t = Instant::now();
                match authorize(&http, &api, &spki).await {
                    Ok(_) => lat
                        .lock()
                        .expect("lock")
                        .push(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("authorize failed: {e:#}");
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    let lat = std::mem::take(&mut *lat.lock().expect("lock"));
    let ok = lat.len();
    Ok(json!({
        "ok": ok, "errors": errors.load(Ordering::Relaxed), "secs": secs,
        "per_sec": ok as f64 / secs, "concurrency": concurrency, "latency": summary(lat),
    }))
}

async fn revoke(api: &ApiArgs, count: usize) -> Result<Value> {
    let http = reqwest::Client::new();
    let (mut cut_ms, mut api_ms) = (vec![], vec![]);
    for _ in 0..count {
        let key = new_client_key()?;
        let auth = authorize(&http, api, key.spki_b64()).await?;
        let session = open_session(&auth, &key).await?;
        let (mut send, mut recv) = session.open_stream().await?;
        ping(&mut recv, &mut send).await?;
        let t = Instant::now();
        let cancel = {
            let (http, api, id) = (http.clone(), api.clone(), auth.session_id.clone());
            tokio::spawn(async move {
                let r: Result<Value> = post(
                    &http,
                    &api,
                    &format!("/v1/sessions/{id}/cancel"),
                    &json!({}),
                )
                .await;
                r.map(|_| t.elapsed())
            })
        };
        let mut b = [0u8; 1];
        let seen = tokio::time::timeout(STEP, recv.read(&mut b)).await;
        let cut = t.elapsed();
        if !matches!(seen, Ok(Err(_)) | Ok(Ok(None))) {
            bail!("the connection was not cut within 10 s of the cancel: {seen:?}");
        }
        api_ms.push(cancel.await??.as_secs_f64() * 1e3);
        cut_ms.push(cut.as_secs_f64() * 1e3);
        drop((send, recv));
        session.close().await;
    }
    Ok(json!({"cut": summary(cut_ms), "api": summary(api_ms)}))
}

// ---------------------------------------------------------------------------------------
// Scale: idle connections through one worker

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn idle(
    api: &ApiArgs,
    conns: usize,
    per_session: usize,
    pid: u32,
    hold_secs: u64,
) -> Result<Value> {
    let http = reqwest::Client::new();
    let n_sessions = conns.div_ceil(per_session.max(1));
    let mut sessions = Vec::new();
    for _ in 0..n_sessions {
        let key = new_client_key()?;
        let auth = authorize(&http, api, key.spki_b64()).await?;
        sessions.push(Arc::new(open_session(&auth, &key).await?));
    }
    // Warm-up: some streams per session (allocator arenas, task structures), kept open.
    let warm = 100 * n_sessions;
    let mut streams = open_many(&sessions, warm).await?;
    for (s, r) in streams.iter_mut() {
        ping(r, s).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, fds0) = (rss_kib(pid)?, fd_count(pid));

    let t = Instant::now();
    let more = open_many(&sessions, conns.saturating_sub(warm)).await?;
    let open_secs = t.elapsed().as_secs_f64();
    streams.extend(more);
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let (rss1, fds1) = (rss_kib(pid)?, fd_count(pid));

    // Are they all still up? One echo round trip on each, 256 at a time.
    let sem = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for (mut s, mut r) in streams {
        let permit = sem.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let ok = ping(&mut r, &mut s).await.is_ok();
            drop(permit);
            (ok, s, r)
        });
    }
    let mut alive = 0;
    let mut kept = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (ok, s, r) = r?;
        alive += usize::from(ok);
        kept.push((s, r));
    }
    let rss2 = rss_kib(pid)?;
    let added = conns.saturating_sub(warm);
    let per_conn = (rss1.saturating_sub(rss0) as f64 * 1024.0) / added.max(1) as f64;
    drop(kept);
    for s in sessions {
        if let Ok(s) = Arc::try_unwrap(s) {
            s.close().await;
        }
    }
    Ok(json!({
        "conns": conns, "sessions": n_sessions, "alive": alive, "open_secs": open_secs,
        "rss_before_kib": rss0, "rss_open_kib": rss1, "rss_after_ping_kib": rss2,
        "fds_before": fds0, "fds_open": fds1, "measured_conns": added,
        "rss_per_conn_bytes": per_conn,
    }))
}

/// Opens `n` proxied connections spread over `sessions`, 64 at a time.
async fn open_many(sessions: &[Arc<Session>], n: usize) -> Result<Vec<(SendStream, RecvStream)>> {
    let sem = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let session = sessions[i % sessions.len()].clone();
        let permit = sem.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let r = tokio::time::timeout(STEP, session.open_stream()).await;
            drop(permit);
            r
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r?.context("opening a stream timed out")??);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Experimental tunnel: the CLI's session protocol with a tunable client transport

struct Tuning {
    max_mtu: Option<u16>,
    no_gso: bool,
    cc: String,
    stream_window: u32,
    window: u32,
    copy_buf: usize,
    ack_threshold: Option<u32>,
    ack_delay_ms: Option<u64>,
}

async fn tunnel(api: &ApiArgs, port: u16, t: Tuning) -> Result<Value> {
    let http = reqwest::Client::new();
    let key = new_client_key()?;
    let auth = authorize(&http, api, key.spki_b64()).await?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(t.stream_window))
        .receive_window(VarInt::from_u32(t.window))
        .send_window(u64::from(t.window))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .enable_segmentation_offload(!t.no_gso);
    if let Some(mtu) = t.max_mtu {
        let mut d = quinn::MtuDiscoveryConfig::default();
        d.upper_bound(mtu);
        transport.mtu_discovery_config(Some(d));
    }
    if let Some(threshold) = t.ack_threshold {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(threshold));
        if let Some(ms) = t.ack_delay_ms {
            ack.max_ack_delay(Some(Duration::from_millis(ms)));
        }
        transport.ack_frequency_config(Some(ack));
    }
    match t.cc.as_str() {
        "cubic" => {}
        "newreno" => {
            transport.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            ));
        }
        "bbr" => {
            transport
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        other => bail!("unknown congestion controller {other}"),
    }
    let mut config = client_config(&auth.ca_pem, &key)?;
    config.transport_config(Arc::new(transport));
    let addr: SocketAddr = tokio::net::lookup_host(&auth.worker.addr)
        .await?
        .next()
        .context("worker address")?;
    let endpoint = quinn::Endpoint::client((Ipv4Addr::UNSPECIFIED, 0).into())?;
    let t0 = Instant::now();
    let conn = endpoint
        .connect_with(config, addr, &auth.worker.server_name)?
        .await?;
    let quic_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (mut hs, mut hr) = conn.open_bi().await?;
    hs.write_all(&frame::encode(&SessionHello {
        grant_pushed: false,
        version: PROTOCOL_VERSION,
        token: auth.token.clone(),
    })?)
    .await?;
    match read_frame::<SessionReply>(&mut hr).await? {
        SessionReply::Accepted { .. } => {}
        other => bail!("session refused: {other:?}"),
    }
    let hello_ms = t0.elapsed().as_secs_f64() * 1e3 - quic_ms;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    println!("ready {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (tcp, _) = r?;
                tokio::spawn(proxy(conn.clone(), tcp, t.copy_buf));
            }
            _ = term.recv() => break,
            e = conn.closed() => bail!("session ended: {e}"),
        }
    }
    let s = conn.stats();
    conn.close(VarInt::from_u32(0), b"done");
    let _ = hs.finish();
    Ok(json!({
        "quic_handshake_ms": quic_ms, "hello_activation_ms": hello_ms,
        "current_mtu": s.path.current_mtu, "rtt_us": s.path.rtt.as_micros() as u64,
        "cwnd": s.path.cwnd, "congestion_events": s.path.congestion_events,
        "lost_packets": s.path.lost_packets, "sent_packets": s.path.sent_packets,
        "udp_tx_datagrams": s.udp_tx.datagrams, "udp_tx_bytes": s.udp_tx.bytes,
        "udp_tx_ios": s.udp_tx.ios, "udp_rx_datagrams": s.udp_rx.datagrams,
        "udp_rx_bytes": s.udp_rx.bytes, "udp_rx_ios": s.udp_rx.ios,
        "ack_frames_rx": s.frame_rx.acks, "ack_frames_tx": s.frame_tx.acks,
        "stream_frames_rx": s.frame_rx.stream, "stream_frames_tx": s.frame_tx.stream,
    }))
}

async fn proxy(conn: Connection, mut tcp: TcpStream, copy_buf: usize) -> Result<()> {
    tcp.set_nodelay(true)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame::encode(&ConnOpen {
        version: PROTOCOL_VERSION,
    })?)
    .await?;
    match read_frame::<ConnReply>(&mut recv).await? {
        ConnReply::Ok => {}
        other => bail!("connection refused: {other:?}"),
    }
    let mut stream = tokio::io::join(recv, send);
    tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, copy_buf, copy_buf).await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let mut body = vec![0u8; frame::body_len(header)?];
    recv.read_exact(&mut body).await?;
    Ok(frame::decode(&body)?)
}

/// Appends `events` audit events through `AuditLog` (what every API handler and worker report
/// goes through) from 64 concurrent writers, and reports events per second.
async fn audit(backend: &str, events: usize) -> Result<Value> {
    use postern_controller::audit::AuditLog;
    use postern_controller::store::{NewEvent, Store};
    let dir = std::env::temp_dir().join(format!("postern-bench-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    let db = format!("postern_bench_audit_{}", std::process::id());
    let url = match backend {
        "sqlite" => format!("sqlite://{}", dir.join("audit.db").display()),
        _ => {
            sqlx::any::install_default_drivers();
            let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(admin).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
                .execute(&mut c)
                .await?;
            format!("postgres://postgres@127.0.0.1:5432/{db}")
        }
    };
    let store = Store::open(&url).await?;
    let (log, _task) = AuditLog::start(store.clone(), None).await?;
    const WRITERS: usize = 64;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let log = log.clone();
        let n = events / WRITERS + usize::from(w < events % WRITERS);
        tasks.spawn(async move {
            for i in 0..n {
                let e = NewEvent::now(
                    "bench",
                    "postgres.query",
                    "session:s_bench",
                    "success",
                    json!({"statement": "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "n": i}),
                );
                log.append(vec![e]).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    let verified = store.verify_audit(None).await?;
    store.close().await;
    if backend == "postgres" {
        let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&mut c)
        .await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({"backend": backend, "events": events, "secs": secs,
              "events_per_sec": events as f64 / secs, "chain_ok": verified.ok, "checked": verified.checked}))
}
