//! Which worker a new relayed client wants: the server name (SNI) of the TLS ClientHello in
//! the client's QUIC Initial packets. Sans-IO: datagrams in, a name (or "need more") out.
//!
//! Initial packets are encrypted with keys derived from the client's Destination Connection
//! ID and a salt published in RFC 9001 §5.2: anyone can read them, by design, so reading the
//! ClientHello here learns nothing a network observer could not, and the client↔worker
//! handshake stays end-to-end (the relay never holds a key of that connection). Only QUIC
//! version 1 is understood; a datagram of any other version is refused.

use rustls::quic::{Keys, Version};
use rustls::Side;

/// Version 1 of QUIC (RFC 9000).
const QUIC_V1: u32 = 1;
/// The most ClientHello bytes gathered (a post-quantum key share makes it ~1.3 KB).
const MAX_HELLO: usize = 16 * 1024;
/// RFC 9000 §14.1: a client's Initial datagrams are padded to at least this size.
pub(crate) const MIN_INITIAL_DATAGRAM: usize = 1200;

/// Why no server name could be read from a datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InitialError {
    /// Not a long-header Initial packet (a packet of a connection the relay does not know).
    #[error("not a QUIC Initial packet")]
    NotInitial,
    /// A QUIC version other than 1.
    #[error("unsupported QUIC version {0:#x}")]
    Version(u32),
    /// Shorter than a client's first datagram must be.
    #[error("Initial datagram of {0} bytes, under the {MIN_INITIAL_DATAGRAM} a client must send")]
    Short(usize),
    /// A field runs past the end of the packet.
    #[error("truncated Initial packet")]
    Truncated,
    /// The packet does not decrypt with the Initial keys of its connection ID.
    #[error("Initial packet does not decrypt")]
    Decrypt,
    /// A frame that has no place in a client's Initial packet.
    #[error("unexpected frame type {0:#x} in an Initial packet")]
    Frame(u64),
    /// The CRYPTO data is not a TLS ClientHello.
    #[error("not a TLS ClientHello")]
    NotClientHello,
    /// The ClientHello names no server.
    #[error("the ClientHello carries no server name")]
    NoServerName,
    /// The ClientHello is larger than the relay reads.
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
}

/// The ClientHello bytes of one client, gathered from its Initial datagrams until the server
/// name can be read (a large hello spans several).
#[derive(Debug, Default)]
pub struct HelloReader {
    /// CRYPTO frame data by offset.
    chunks: Vec<(u64, Vec<u8>)>,
}

impl HelloReader {
    /// Takes one datagram; returns the server name once the ClientHello is whole, `None`
    /// while more is needed.
    pub fn push(&mut self, datagram: &[u8]) -> Result<Option<String>, InitialError> {
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            return Err(InitialError::Short(datagram.len()));
        }
        let packet = open_initial(datagram)?;
        crypto_frames(&packet, &mut self.chunks)?;
        let hello = contiguous(&mut self.chunks)?;
        client_hello_server_name(&hello)
    }
}

/// What follows decryption, on arbitrary bytes, for the fuzz target (`controller/fuzz`):
/// the frames of a packet, then the ClientHello their CRYPTO data carries. Random bytes
/// never get past the AEAD of [`HelloReader::push`], so this is where parsing is exercised.
#[doc(hidden)]
pub fn fuzz_decrypted(frames: &[u8]) -> Result<Option<String>, InitialError> {
    let mut chunks = Vec::new();
    crypto_frames(frames, &mut chunks)?;
    let hello = contiguous(&mut chunks)?;
    client_hello_server_name(&hello)
}

/// Decrypts the first (Initial) packet of a datagram; returns its frames.
fn open_initial(datagram: &[u8]) -> Result<Vec<u8>, InitialError> {
    let mut r = Reader::new(datagram);
    let first = r.u8()?;
    // Long header, fixed bit, packet type 0 (Initial in version 1).
    if first & 0xc0 != 0xc0 {
        return Err(InitialError::NotInitial);
    }
    let version = r.u32()?;
    if version != QUIC_V1 {
        return Err(InitialError::Version(version));
    }
    if first & 0x30 != 0 {
        return Err(InitialError::NotInitial);
    }
    let dcid_len = usize::from(r.u8()?);
    if dcid_len > 20 {
        return Err(InitialError::NotInitial);
    }
    let dcid = r.bytes(dcid_len)?;
    let scid_len = usize::from(r.u8()?);
    if scid_len > 20 {
        return Err(InitialError::NotInitial);
    }
    r.bytes(scid_len)?;
    let token_len = r.varint_len()?;
    r.bytes(token_len)?;
    let length = r.varint_len()?;
    let pn_offset = r.pos;
    let end = pn_offset
        .checked_add(length)
        .filter(|e| *e <= datagram.len())
        .ok_or(InitialError::Truncated)?;

    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .ok_or(InitialError::Decrypt)?;
    let keys = Keys::initial(Version::V1, suite.suite, suite.quic, dcid, Side::Server);
    let remote = keys.remote;

    // Header protection (RFC 9001 §5.4): the sample starts 4 bytes after the packet number.
    let sample_len = remote.header.sample_len();
    let sample_at = pn_offset + 4;
    let sample = datagram
        .get(sample_at..sample_at + sample_len)
        .filter(|_| sample_at + sample_len <= end)
        .ok_or(InitialError::Truncated)?;
    let mut packet = datagram.get(..end).ok_or(InitialError::Truncated)?.to_vec();
    let mut first = packet[0];
    let mut pn = [0u8; 4];
    pn.copy_from_slice(&packet[pn_offset..pn_offset + 4]);
    remote
        .header
        .decrypt_in_place(sample, &mut first, &mut pn)
        .map_err(|_| InitialError::Decrypt)?;
    let pn_len = usize::from(first & 0x03) + 1;
    packet[0] = first;
    packet[pn_offset..pn_offset + pn_len].copy_from_slice(&pn[..pn_len]);
    // A client's first packets carry small numbers; with nothing acknowledged yet, the
    // truncated number is the full one (RFC 9000 §A.3 with an expected number of 0).
    let number = pn[..pn_len]
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b));
    let (header, payload) = packet.split_at_mut(pn_offset + pn_len);
    let plain = remote
        .packet
        .decrypt_in_place(number, header, payload)
        .map_err(|_| InitialError::Decrypt)?;
    Ok(plain.to_vec())
}

/// Collects the CRYPTO frames of a decrypted Initial packet into `chunks`.
fn crypto_frames(frames: &[u8], chunks: &mut Vec<(u64, Vec<u8>)>) -> Result<(), InitialError> {
    let mut r = Reader::new(frames);
    while !r.done() {
        let kind = r.varint()?;
        match kind {
            // PADDING, PING.
            0x00 | 0x01 => {}
            // ACK (a retransmitted Initial may acknowledge the server's).
            0x02 | 0x03 => {
                r.varint()?;
                r.varint()?;
                let ranges = r.varint()?;
                r.varint()?;
                for _ in 0..ranges {
                    r.varint()?;
                    r.varint()?;
                }
                if kind == 0x03 {
                    for _ in 0..3 {
                        r.varint()?;
                    }
                }
            }
            // CRYPTO.
            0x06 => {
                let offset = r.varint()?;
                let len = r.varint_len()?;
                let data = r.bytes(len)?;
                let total = chunks.iter().map(|(_, d)| d.len()).sum::<usize>() + len;
                if offset.saturating_add(len as u64) > MAX_HELLO as u64 || total > MAX_HELLO {
                    return Err(InitialError::TooLarge);
                }
                chunks.push((offset, data.to_vec()));
            }
            // CONNECTION_CLOSE: nothing more to read.
            0x1c => return Ok(()),
            other => return Err(InitialError::Frame(other)),
        }
    }
    Ok(())
}

/// The CRYPTO stream from offset 0 as far as it is contiguous.
fn contiguous(chunks: &mut [(u64, Vec<u8>)]) -> Result<Vec<u8>, InitialError> {
    chunks.sort_by_key(|(offset, _)| *offset);
    let mut out = Vec::new();
    for (offset, data) in chunks.iter() {
        let offset = usize::try_from(*offset).map_err(|_| InitialError::TooLarge)?;
        if offset > out.len() {
            break;
        }
        // Retransmissions overlap what is already here: keep only what is new.
        if let Some(new) = data.get(out.len() - offset..) {
            out.extend_from_slice(new);
        }
    }
    Ok(out)
}

/// The server name of a whole ClientHello handshake message; `None` if `hello` is a prefix.
fn client_hello_server_name(hello: &[u8]) -> Result<Option<String>, InitialError> {
    let mut r = Reader::new(hello);
    let Ok(kind) = r.u8() else { return Ok(None) };
    if kind != 1 {
        return Err(InitialError::NotClientHello);
    }
    let Ok(len) = r.u24() else { return Ok(None) };
    if len > MAX_HELLO {
        return Err(InitialError::TooLarge);
    }
    let Ok(body) = r.bytes(len) else {
        return Ok(None);
    };
    let bad = |_| InitialError::NotClientHello;
    let mut r = Reader::new(body);
    r.bytes(2 + 32).map_err(bad)?; // legacy_version, random
    let n = usize::from(r.u8().map_err(bad)?);
    r.bytes(n).map_err(bad)?; // legacy_session_id
    let n = r.u16().map_err(bad)?;
    r.bytes(n).map_err(bad)?; // cipher_suites
    let n = usize::from(r.u8().map_err(bad)?);
    r.bytes(n).map_err(bad)?; // legacy_compression_methods
    let n = r.u16().map_err(bad)?;
    let mut exts = Reader::new(r.bytes(n).map_err(bad)?);
    while !exts.done() {
        let kind = exts.u16().map_err(bad)?;
        let n = exts.u16().map_err(bad)?;
        let data = exts.bytes(n).map_err(bad)?;
        if kind != 0 {
            continue;
        }
        // server_name (RFC 6066 §3): a list of (type, name); type 0 is a DNS host name.
        let mut list = Reader::new(data);
        let n = list.u16().map_err(bad)?;
        let mut names = Reader::new(list.bytes(n).map_err(bad)?);
        while !names.done() {
            let name_type = names.u8().map_err(bad)?;
            let n = names.u16().map_err(bad)?;
            let name = names.bytes(n).map_err(bad)?;
            if name_type == 0 {
                return host_name(name).map(Some);
            }
        }
    }
    Err(InitialError::NoServerName)
}

fn host_name(bytes: &[u8]) -> Result<String, InitialError> {
    let ok = !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(InitialError::NoServerName);
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Reads big-endian fields and QUIC variable-length integers, never past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], InitialError> {
        let end = self.pos.checked_add(n).ok_or(InitialError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(InitialError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, InitialError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, InitialError> {
        let b = self.bytes(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Result<usize, InitialError> {
        let b = self.bytes(3)?;
        Ok((usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    fn u32(&mut self) -> Result<u32, InitialError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// RFC 9000 §16.
    fn varint(&mut self) -> Result<u64, InitialError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for b in self.bytes(len - 1)? {
            v = (v << 8) | u64::from(*b);
        }
        Ok(v)
    }

    fn varint_len(&mut self) -> Result<usize, InitialError> {
        usize::try_from(self.varint()?).map_err(|_| InitialError::Truncated)
    }
}

#[cfg(test)]
mod tests;
