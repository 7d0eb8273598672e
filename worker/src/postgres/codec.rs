//! The PostgreSQL wire protocol (version 3.0), sans-IO: framing (`check_*` says whether a
//! whole packet is in a buffer, and how long it is), parsing of the few messages the proxy
//! looks inside, and encoders for the messages it writes itself. Nothing here reads or
//! writes a socket; the async layer in [`super`] does.
//!
//! Every length is checked against a limit before anything is allocated or skipped: a
//! startup packet is at most [`MAX_STARTUP_LEN`], a client message at most
//! [`MAX_FRONTEND_LEN`], a server message at most [`MAX_BACKEND_LEN`].

use std::fmt;

/// Largest startup packet accepted (the server's own limit is 10 000 bytes).
pub const MAX_STARTUP_LEN: usize = 10 * 1024;
/// Largest message accepted from a client (a `Query`, `Parse` or `CopyData`).
pub const MAX_FRONTEND_LEN: usize = 64 * 1024 * 1024;
/// Largest message accepted from a server (a `DataRow` may hold a 1 GiB value).
pub const MAX_BACKEND_LEN: usize = (1 << 30) + 64 * 1024;
/// Largest server message accepted while authenticating (no result rows yet).
pub const MAX_BACKEND_STARTUP_LEN: usize = 1024 * 1024;

/// Protocol version 3.0 as a startup code.
const PROTOCOL_3_0: u32 = 3 << 16;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// A message type byte, shown as a character when printable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why bytes are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A startup packet's length is below 8 bytes or above [`MAX_STARTUP_LEN`].
    #[error("startup packet length {0} is out of range (8 to {MAX_STARTUP_LEN} bytes)")]
    StartupLength(u32),
    /// The startup packet asks for a protocol this proxy does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: this proxy speaks 3.0")]
    Version {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A message's length is below 4 or above the limit for its direction.
    #[error("message of type {tag} has length {len}, out of range (4 to {max} bytes)")]
    Length {
        /// Message type.
        tag: Tag,
        /// The length field.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// A message type that is not expected here.
    #[error("unexpected message type {0}")]
    UnexpectedTag(Tag),
    /// The body of a message does not have the expected shape.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// A cancellation key: the backend process id and its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    /// Backend process id.
    pub pid: i32,
    /// Secret key.
    pub secret: i32,
}

/// The first packet of a client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartupPacket {
    /// `SSLRequest`: answered with `N`.
    SslRequest,
    /// `GSSENCRequest`: answered with `N`.
    GssEncRequest,
    /// `CancelRequest` for the query running on a backend.
    Cancel(CancelKey),
    /// `StartupMessage`.
    Startup(Startup),
}

/// A `StartupMessage`: protocol 3.x and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Minor protocol version asked for (3.`minor`); the proxy answers 3.0.
    pub minor: u16,
    /// Parameters in order (`user`, `database`, `application_name`, …).
    pub params: Vec<(String, String)>,
}

impl Startup {
    /// The value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A client message the proxy looks inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frontend<'a> {
    /// Simple query: the SQL text (in the client's encoding).
    Query {
        /// The statement(s).
        sql: &'a [u8],
    },
    /// Extended protocol: prepare a statement.
    Parse {
        /// Statement name; empty for the unnamed statement.
        name: &'a [u8],
        /// The statement.
        sql: &'a [u8],
    },
    /// The client ends the connection.
    Terminate,
    /// Any other valid client message (relayed as is).
    Other(Tag),
}

/// A server message the proxy acts on while the connection starts up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend<'a> {
    /// `Authentication*`.
    Auth(Auth<'a>),
    /// `BackendKeyData`.
    KeyData(CancelKey),
    /// `ReadyForQuery` with the transaction status.
    Ready(u8),
    /// `ErrorResponse`.
    Error(ErrorFields),
    /// `ParameterStatus`, `NoticeResponse` and the like: relayed as is.
    Other(Tag),
}

/// An authentication request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth<'a> {
    /// Authenticated.
    Ok,
    /// Send the password in clear.
    Cleartext,
    /// Send the MD5 hash of the password with this salt.
    Md5([u8; 4]),
    /// SASL with one of these mechanisms.
    Sasl(Vec<&'a str>),
    /// SASL challenge.
    SaslContinue(&'a [u8]),
    /// SASL outcome.
    SaslFinal(&'a [u8]),
    /// A method the proxy cannot do (Kerberos, GSSAPI, SSPI).
    Unsupported(i32),
}

/// The fields of an `ErrorResponse` or `NoticeResponse` the proxy shows or rewrites.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`: severity, localized.
    pub severity: String,
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`: the message.
    pub message: String,
    /// `D`: detail.
    pub detail: Option<String>,
    /// `H`: hint.
    pub hint: Option<String>,
}

// --- framing -------------------------------------------------------------------------------

/// Is a whole startup packet at the start of `buf`? `Some(len)` with its length, `None` if
/// more bytes are needed.
pub fn check_startup(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(len) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
        return Err(CodecError::StartupLength(len));
    }
    let len = len as usize;
    Ok((buf.len() >= len).then_some(len))
}

/// Parses a whole startup packet (as delimited by [`check_startup`]).
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, CodecError> {
    let malformed = |why| CodecError::Malformed {
        what: "startup packet",
        why,
    };
    let code = read_u32(packet, 4).ok_or(malformed("shorter than 8 bytes"))?;
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => {
            Err(malformed("encryption request with a body"))
        }
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let (Some(pid), Some(secret), 8) = (read_u32(body, 0), read_u32(body, 4), body.len())
            else {
                return Err(malformed("cancel request is not 16 bytes long"));
            };
            Ok(StartupPacket::Cancel(CancelKey {
                pid: pid as i32,
                secret: secret as i32,
            }))
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(CodecError::Version { major, minor });
            }
            let params = parse_params(body).ok_or(malformed(
                "parameters are not NUL-terminated UTF-8 name/value pairs",
            ))?;
            Ok(StartupPacket::Startup(Startup { minor, params }))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    loop {
        let (name, rest) = cstr(body)?;
        if name.is_empty() {
            return rest.is_empty().then_some(params);
        }
        let (value, rest) = cstr(rest)?;
        params.push((
            String::from_utf8(name.to_vec()).ok()?,
            String::from_utf8(value.to_vec()).ok()?,
        ));
        body = rest;
    }
}

/// Is a whole tagged message at the start of `buf`? `Some(len)` with its length (type byte
/// included), `None` if more bytes are needed. `allowed` says which types may appear here.
pub fn check_message(
    buf: &[u8],
    max: usize,
    allowed: fn(u8) -> bool,
) -> Result<Option<usize>, CodecError> {
    let Some(body_len) = check_header(buf, max, allowed)? else {
        return Ok(None);
    };
    let len = 5 + body_len;
    Ok((buf.len() >= len).then_some(len))
}

/// Checks the 5-byte header at the start of `buf`; returns the body length.
fn check_header(
    buf: &[u8],
    max: usize,
    allowed: fn(u8) -> bool,
) -> Result<Option<usize>, CodecError> {
    let (Some(&tag), Some(len)) = (buf.first(), read_u32(buf, 1)) else {
        return Ok(None);
    };
    if !allowed(tag) {
        return Err(CodecError::UnexpectedTag(Tag(tag)));
    }
    if len < 4 || len as usize > max {
        return Err(CodecError::Length {
            tag: Tag(tag),
            len,
            max,
        });
    }
    Ok(Some(len as usize - 4))
}

/// Message types a client may send once the connection is up.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C' | b'c' | b'D' | b'd' | b'E' | b'F' | b'f' | b'H' | b'P' | b'Q' | b'S' | b'X'
    )
}

/// Message types a server may send.
pub fn is_backend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'1' | b'2'
            | b'3'
            | b'A'
            | b'C'
            | b'c'
            | b'D'
            | b'd'
            | b'E'
            | b'G'
            | b'H'
            | b'I'
            | b'K'
            | b'n'
            | b'N'
            | b'R'
            | b's'
            | b'S'
            | b't'
            | b'T'
            | b'v'
            | b'V'
            | b'W'
            | b'Z'
    )
}

/// Follows message boundaries in a stream without holding message bodies: the proxy copies
/// server output through as it arrives and still knows where a message ends (to put its own
/// `ErrorResponse` there) and that every header is sane.
#[derive(Debug, Clone)]
pub struct Boundaries {
    max: usize,
    allowed: fn(u8) -> bool,
    /// Body bytes of the current message not seen yet.
    remaining: usize,
}

impl Boundaries {
    /// A stream starting at a message boundary.
    pub fn new(max: usize, allowed: fn(u8) -> bool) -> Self {
        Self {
            max,
            allowed,
            remaining: 0,
        }
    }

    /// Is the stream at a message boundary now?
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Walks `buf` (the bytes following those scanned before) and returns how many of them
    /// may be passed on: whole checked headers and body bytes. An incomplete header at the
    /// end is left for the next call. With `stop_at_boundary`, stops at the first message
    /// boundary. On a bad header, returns the offset where it starts with the error.
    pub fn scan(
        &mut self,
        buf: &[u8],
        stop_at_boundary: bool,
    ) -> Result<usize, (usize, CodecError)> {
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                self.remaining -= take;
                pos += take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
            }
            if stop_at_boundary {
                return Ok(pos);
            }
            match check_header(&buf[pos..], self.max, self.allowed) {
                Ok(Some(body_len)) => {
                    pos += 5;
                    self.remaining = body_len;
                }
                Ok(None) => return Ok(pos),
                Err(e) => return Err((pos, e)),
            }
        }
    }
}

// --- parsing -------------------------------------------------------------------------------

/// Parses a whole client message (as delimited by [`check_message`]).
pub fn parse_frontend(msg: &[u8]) -> Result<Frontend<'_>, CodecError> {
    let (tag, body) = split_message(msg)?;
    match tag {
        b'Q' => {
            let malformed = CodecError::Malformed {
                what: "Query",
                why: "the statement is not NUL-terminated",
            };
            let (sql, rest) = cstr(body).ok_or(malformed.clone())?;
            if !rest.is_empty() {
                return Err(malformed);
            }
            Ok(Frontend::Query { sql })
        }
        b'P' => {
            let malformed = |why| CodecError::Malformed { what: "Parse", why };
            let (name, rest) = cstr(body).ok_or(malformed("the name is not NUL-terminated"))?;
            let (sql, rest) = cstr(rest).ok_or(malformed("the statement is not NUL-terminated"))?;
            let n = read_u16(rest, 0).ok_or(malformed("no parameter count"))?;
            if rest.len() != 2 + 4 * n as usize {
                return Err(malformed("parameter types do not match their count"));
            }
            Ok(Frontend::Parse { name, sql })
        }
        b'X' => Ok(Frontend::Terminate),
        other => Ok(Frontend::Other(Tag(other))),
    }
}

/// Parses a whole server message received while the connection starts up.
pub fn parse_backend(msg: &[u8]) -> Result<Backend<'_>, CodecError> {
    let (tag, body) = split_message(msg)?;
    match tag {
        b'R' => parse_auth(body).map(Backend::Auth),
        b'K' => match (read_u32(body, 0), read_u32(body, 4), body.len()) {
            (Some(pid), Some(secret), 8) => Ok(Backend::KeyData(CancelKey {
                pid: pid as i32,
                secret: secret as i32,
            })),
            _ => Err(CodecError::Malformed {
                what: "BackendKeyData",
                why: "not 8 bytes long",
            }),
        },
        b'Z' => match body {
            [status @ (b'I' | b'T' | b'E')] => Ok(Backend::Ready(*status)),
            _ => Err(CodecError::Malformed {
                what: "ReadyForQuery",
                why: "bad transaction status",
            }),
        },
        b'E' => parse_error_fields(body).map(Backend::Error),
        other => Ok(Backend::Other(Tag(other))),
    }
}

fn parse_auth(body: &[u8]) -> Result<Auth<'_>, CodecError> {
    let malformed = |why| CodecError::Malformed {
        what: "Authentication request",
        why,
    };
    let code = read_u32(body, 0).ok_or(malformed("no request code"))?;
    let data = &body[4..];
    match code {
        0 | 3 if !data.is_empty() => Err(malformed("unexpected data")),
        0 => Ok(Auth::Ok),
        3 => Ok(Auth::Cleartext),
        5 => match <[u8; 4]>::try_from(data) {
            Ok(salt) => Ok(Auth::Md5(salt)),
            Err(_) => Err(malformed("MD5 salt is not 4 bytes")),
        },
        10 => {
            let mut mechanisms = Vec::new();
            let mut rest = data;
            loop {
                let (name, tail) = cstr(rest).ok_or(malformed("unterminated SASL mechanism"))?;
                if name.is_empty() {
                    break;
                }
                let name =
                    std::str::from_utf8(name).map_err(|_| malformed("SASL mechanism not UTF-8"))?;
                mechanisms.push(name);
                rest = tail;
            }
            Ok(Auth::Sasl(mechanisms))
        }
        11 => Ok(Auth::SaslContinue(data)),
        12 => Ok(Auth::SaslFinal(data)),
        other => Ok(Auth::Unsupported(other as i32)),
    }
}

/// Parses a whole `DataRow`: each column's value, `None` for NULL.
pub fn parse_data_row(msg: &[u8]) -> Result<Vec<Option<&[u8]>>, CodecError> {
    let malformed = |why| CodecError::Malformed {
        what: "DataRow",
        why,
    };
    let (tag, body) = split_message(msg)?;
    if tag != b'D' {
        return Err(CodecError::UnexpectedTag(Tag(tag)));
    }
    let n = read_u16(body, 0).ok_or(malformed("no column count"))?;
    let mut rest = &body[2..];
    let mut values = Vec::with_capacity(usize::from(n).min(rest.len() / 4));
    for _ in 0..n {
        let len = read_u32(rest, 0).ok_or(malformed("truncated column length"))? as i32;
        rest = &rest[4..];
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        let value = rest.get(..len).ok_or(malformed("truncated column value"))?;
        values.push(Some(value));
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(malformed("bytes after the last column"));
    }
    Ok(values)
}

/// Parses the fields of an `ErrorResponse` or `NoticeResponse` body.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, CodecError> {
    let malformed = CodecError::Malformed {
        what: "ErrorResponse",
        why: "fields are not NUL-terminated",
    };
    let mut fields = ErrorFields::default();
    let mut rest = body;
    loop {
        let (&kind, tail) = rest.split_first().ok_or(malformed.clone())?;
        if kind == 0 {
            return Ok(fields);
        }
        let (value, tail) = cstr(tail).ok_or(malformed.clone())?;
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'D' => fields.detail = Some(value),
            b'H' => fields.hint = Some(value),
            _ => {}
        }
        rest = tail;
    }
}

fn split_message(msg: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    match (msg.first(), read_u32(msg, 1)) {
        (Some(&tag), Some(len)) if len as usize + 1 == msg.len() => Ok((tag, &msg[5..])),
        _ => Err(CodecError::Malformed {
            what: "message",
            why: "length field does not match the message",
        }),
    }
}

/// Splits a NUL-terminated string off the front of `buf`.
fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

mod encode;
#[cfg(test)]
mod tests;

pub use encode::*;
