//! Encoders for the messages the proxy writes itself.

use super::{CancelKey, ErrorFields, CANCEL_REQUEST_CODE, PROTOCOL_3_0};

/// The one-byte answer refusing `SSLRequest` and `GSSENCRequest`.
pub const ENCRYPTION_REFUSED: u8 = b'N';

/// `AuthenticationOk`.
pub fn auth_ok() -> Vec<u8> {
    message(b'R', &0u32.to_be_bytes())
}

/// `BackendKeyData`.
pub fn backend_key_data(key: CancelKey) -> Vec<u8> {
    let mut body = key.pid.to_be_bytes().to_vec();
    body.extend_from_slice(&key.secret.to_be_bytes());
    message(b'K', &body)
}

/// `NegotiateProtocolVersion`: the proxy speaks 3.0 and none of `unsupported` options.
pub fn negotiate_protocol_version(unsupported: &[&str]) -> Vec<u8> {
    let mut body = (PROTOCOL_3_0 as i32).to_be_bytes().to_vec();
    body.extend_from_slice(&(unsupported.len() as i32).to_be_bytes());
    for name in unsupported {
        push_cstr(&mut body, name.as_bytes());
    }
    message(b'v', &body)
}

/// An `ErrorResponse` with severity `FATAL`.
pub fn fatal(code: &str, message_text: &str, hint: Option<&str>) -> Vec<u8> {
    error_response(&ErrorFields {
        severity: "FATAL".into(),
        code: code.into(),
        message: message_text.into(),
        detail: None,
        hint: hint.map(str::to_owned),
    })
}

/// An `ErrorResponse` carrying `fields`.
pub fn error_response(fields: &ErrorFields) -> Vec<u8> {
    message(b'E', &fields_body(fields))
}

/// A `NoticeResponse` (severity `NOTICE`, SQLSTATE 01000) with `text` and a hint: what psql
/// prints as `NOTICE: …` and goes on.
pub fn notice(text: &str, hint: &str) -> Vec<u8> {
    message(
        b'N',
        &fields_body(&ErrorFields {
            severity: "NOTICE".into(),
            code: "01000".into(),
            message: text.into(),
            detail: None,
            hint: Some(hint.into()),
        }),
    )
}

/// The field list of an `ErrorResponse` or `NoticeResponse`.
fn fields_body(fields: &ErrorFields) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, value) in [
        (b'S', Some(&fields.severity)),
        (b'V', Some(&fields.severity)),
        (b'C', Some(&fields.code)),
        (b'M', Some(&fields.message)),
        (b'D', fields.detail.as_ref()),
        (b'H', fields.hint.as_ref()),
    ] {
        if let Some(value) = value {
            body.push(kind);
            push_cstr(&mut body, value.as_bytes());
        }
    }
    body.push(0);
    body
}

/// A `StartupMessage` for protocol 3.0.
pub fn startup_message<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (name, value) in params {
        push_cstr(&mut body, name.as_bytes());
        push_cstr(&mut body, value.as_bytes());
    }
    body.push(0);
    length_prefixed(&body)
}

/// A `CancelRequest`.
pub fn cancel_request(key: CancelKey) -> Vec<u8> {
    let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
    body.extend_from_slice(&key.pid.to_be_bytes());
    body.extend_from_slice(&key.secret.to_be_bytes());
    length_prefixed(&body)
}

/// A `PasswordMessage` (cleartext or MD5 hash).
pub fn password_message(password: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(password.len() + 1);
    push_cstr(&mut body, password);
    message(b'p', &body)
}

/// `SASLInitialResponse`.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    push_cstr(&mut body, mechanism.as_bytes());
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

/// `SASLResponse`.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    message(b'p', data)
}

/// `Terminate`.
pub fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// A `Query` (used to manage per-session roles).
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(sql.len() + 1);
    push_cstr(&mut body, sql.as_bytes());
    message(b'Q', &body)
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Appends `s` and a NUL; a NUL inside `s` would end it early, so it is cut there.
fn push_cstr(out: &mut Vec<u8>, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    out.extend_from_slice(&s[..end]);
    out.push(0);
}
