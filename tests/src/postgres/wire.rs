//! Raw PostgreSQL wire bytes for the protocol-error tests: a client that does not behave.

use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// Reads everything the worker sends on a stream until it finishes it.
pub(super) async fn read_all(recv: &mut quinn::RecvStream) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("the worker answers and ends the stream")
        .expect("read")
}

pub(super) fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

pub(super) fn query(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// Reads server messages until `ReadyForQuery`; returns all bytes read.
pub(super) async fn read_until_ready(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = async {
        loop {
            // Walk whole messages; stop after a 'Z'.
            let mut pos = 0;
            while buf.len() >= pos + 5 {
                let len = u32::from_be_bytes(buf[pos + 1..pos + 5].try_into().expect("4 bytes"));
                let end = pos + 1 + len as usize;
                if buf.len() < end {
                    break;
                }
                assert_ne!(buf[pos], b'E', "error from the server: {buf:?}");
                if buf[pos] == b'Z' {
                    return;
                }
                pos = end;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("ReadyForQuery within 10 s");
    buf
}
