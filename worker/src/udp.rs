//! QUIC endpoints on UDP sockets with large buffers. With the kernel's default (~208 KiB)
//! receive buffer, a busy session dropped hundreds of datagrams per second in the benchmark,
//! each a loss that QUIC's congestion control answers by slowing down.

use std::net::SocketAddr;
use std::sync::Arc;

/// Socket buffer size asked for (the kernel caps it at `net.core.{r,w}mem_max`).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A QUIC endpoint bound to `addr` (a server if `server` is given), with large socket
/// buffers where the kernel allows them.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer still works, only less well under load.
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER) {
        tracing::debug!("cannot enlarge the UDP receive buffer: {e}");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER) {
        tracing::debug!("cannot enlarge the UDP send buffer: {e}");
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}
