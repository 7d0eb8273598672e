use super::*;

fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
    startup_message(params.iter().copied())
}

#[test]
fn startup_round_trip() {
    let bytes = startup_bytes(&[("user", "alice"), ("database", "db")]);
    assert_eq!(check_startup(&bytes), Ok(Some(bytes.len())));
    // Any prefix is incomplete, never an error.
    for cut in 0..bytes.len() {
        assert_eq!(check_startup(&bytes[..cut]), Ok(None), "prefix of {cut}");
    }
    let StartupPacket::Startup(s) = parse_startup(&bytes).expect("parses") else {
        panic!("not a startup message");
    };
    assert_eq!(s.minor, 0);
    assert_eq!(s.param("user"), Some("alice"));
    assert_eq!(s.param("database"), Some("db"));
    assert_eq!(s.param("options"), None);
}

#[test]
fn encryption_and_cancel_requests() {
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    assert_eq!(parse_startup(&ssl), Ok(StartupPacket::SslRequest));
    let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    assert_eq!(parse_startup(&gss), Ok(StartupPacket::GssEncRequest));
    let key = CancelKey {
        pid: 1234,
        secret: -5,
    };
    let cancel = cancel_request(key);
    assert_eq!(cancel.len(), 16);
    assert_eq!(check_startup(&cancel), Ok(Some(16)));
    assert_eq!(parse_startup(&cancel), Ok(StartupPacket::Cancel(key)));
    // A cancel request of the wrong size, an SSL request with a body.
    let mut long = cancel.clone();
    long.extend_from_slice(&[0; 4]);
    long[3] = 20;
    assert!(matches!(
        parse_startup(&long),
        Err(CodecError::Malformed { .. })
    ));
    let ssl_body = [0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0];
    assert!(parse_startup(&ssl_body).is_err());
}

#[test]
fn bad_startup_packets_are_refused() {
    // Oversized and undersized lengths are refused from the length field alone.
    assert_eq!(
        check_startup(&[0, 0x10, 0, 0]),
        Err(CodecError::StartupLength(0x0010_0000))
    );
    assert_eq!(
        check_startup(&[0, 0, 0, 7]),
        Err(CodecError::StartupLength(7))
    );
    // Garbage: an HTTP request's first bytes read as an absurd length.
    assert!(check_startup(b"GET / HTTP/1.1\r\n").is_err());
    // Protocol 2.0 and unknown codes.
    let v2 = [0, 0, 0, 9, 0, 2, 0, 0, 0];
    assert_eq!(
        parse_startup(&v2),
        Err(CodecError::Version { major: 2, minor: 0 })
    );
    // Missing final NUL, a name without a value, invalid UTF-8.
    let mut bytes = startup_bytes(&[("user", "a")]);
    bytes.pop();
    bytes[3] -= 1;
    assert!(parse_startup(&bytes).is_err());
    let odd = [0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', 0];
    assert!(parse_startup(&odd).is_err());
    let bad_utf8 = [0, 0, 0, 14, 0, 3, 0, 0, 0xff, 0, b'x', 0, 0, 0];
    assert!(parse_startup(&bad_utf8).is_err());
    // 3.2 is parsed (the proxy answers with NegotiateProtocolVersion).
    let mut v32 = startup_bytes(&[("user", "a")]);
    v32[7] = 2;
    assert!(matches!(
        parse_startup(&v32),
        Ok(StartupPacket::Startup(Startup { minor: 2, .. }))
    ));
}

#[test]
fn frontend_messages() {
    let q = query("select 1");
    assert_eq!(
        check_message(&q, MAX_FRONTEND_LEN, is_frontend_tag),
        Ok(Some(q.len()))
    );
    assert_eq!(parse_frontend(&q), Ok(Frontend::Query { sql: b"select 1" }));
    let mut parse = vec![b'P', 0, 0, 0, 0];
    parse.extend_from_slice(b"s1\0select $1\0\0\x01\0\0\0\x17");
    let len = (parse.len() - 1) as u32;
    parse[1..5].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        parse_frontend(&parse),
        Ok(Frontend::Parse {
            name: b"s1",
            sql: b"select $1"
        })
    );
    assert_eq!(parse_frontend(&terminate()), Ok(Frontend::Terminate));
    let sync = [b'S', 0, 0, 0, 4];
    assert_eq!(parse_frontend(&sync), Ok(Frontend::Other(Tag(b'S'))));
    // A Parse whose parameter count lies, a Query without its NUL.
    let mut lying = parse.clone();
    lying[parse.len() - 5] = 2;
    assert!(parse_frontend(&lying).is_err());
    let unterminated = [b'Q', 0, 0, 0, 5, b'x'];
    assert!(parse_frontend(&unterminated).is_err());
}

#[test]
fn frontend_framing_limits() {
    // A password message is not expected once the connection is up.
    assert_eq!(
        check_message(&[b'p', 0, 0, 0, 4], MAX_FRONTEND_LEN, is_frontend_tag),
        Err(CodecError::UnexpectedTag(Tag(b'p')))
    );
    assert!(matches!(
        check_message(&[b'Q', 0, 0, 0, 3], MAX_FRONTEND_LEN, is_frontend_tag),
        Err(CodecError::Length { len: 3, .. })
    ));
    assert!(matches!(
        check_message(&[b'Q', 0x7f, 0, 0, 0], MAX_FRONTEND_LEN, is_frontend_tag),
        Err(CodecError::Length { .. })
    ));
    assert_eq!(
        check_message(&[b'Q', 0, 0], MAX_FRONTEND_LEN, is_frontend_tag),
        Ok(None)
    );
    assert_eq!(
        check_message(&[b'Q', 0, 0, 0, 9, b'x'], MAX_FRONTEND_LEN, is_frontend_tag),
        Ok(None)
    );
    assert_eq!(Tag(0).to_string(), "0x00");
    assert_eq!(Tag(b'Q').to_string(), "'Q'");
}

fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn backend_startup_messages() {
    assert_eq!(parse_backend(&auth_ok()), Ok(Backend::Auth(Auth::Ok)));
    assert_eq!(
        parse_backend(&backend(b'R', &[0, 0, 0, 3])),
        Ok(Backend::Auth(Auth::Cleartext))
    );
    assert_eq!(
        parse_backend(&backend(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])),
        Ok(Backend::Auth(Auth::Md5([1, 2, 3, 4])))
    );
    assert!(parse_backend(&backend(b'R', &[0, 0, 0, 5, 1])).is_err());
    assert_eq!(
        parse_backend(&backend(
            b'R',
            b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
        )),
        Ok(Backend::Auth(Auth::Sasl(vec![
            "SCRAM-SHA-256-PLUS",
            "SCRAM-SHA-256"
        ])))
    );
    assert!(parse_backend(&backend(b'R', b"\0\0\0\x0aSCRAM")).is_err());
    assert_eq!(
        parse_backend(&backend(b'R', b"\0\0\0\x0br=abc")),
        Ok(Backend::Auth(Auth::SaslContinue(b"r=abc")))
    );
    assert_eq!(
        parse_backend(&backend(b'R', &[0, 0, 0, 7])),
        Ok(Backend::Auth(Auth::Unsupported(7)))
    );
    let key = CancelKey { pid: 9, secret: 10 };
    assert_eq!(
        parse_backend(&backend_key_data(key)),
        Ok(Backend::KeyData(key))
    );
    assert_eq!(
        parse_backend(&backend(b'Z', b"I")),
        Ok(Backend::Ready(b'I'))
    );
    assert!(parse_backend(&backend(b'Z', b"Q")).is_err());
    assert_eq!(
        parse_backend(&backend(b'S', b"a\0b\0")),
        Ok(Backend::Other(Tag(b'S')))
    );
    // The length field must match the message exactly.
    let mut short = auth_ok();
    short.pop();
    assert!(parse_backend(&short).is_err());
}

#[test]
fn error_responses_round_trip() {
    let bytes = fatal("08P01", "bad things", Some("try again"));
    assert_eq!(bytes[0], b'E');
    assert_eq!(
        check_message(&bytes, MAX_BACKEND_LEN, is_backend_tag),
        Ok(Some(bytes.len()))
    );
    let Ok(Backend::Error(fields)) = parse_backend(&bytes) else {
        panic!("not an error");
    };
    assert_eq!(fields.severity, "FATAL");
    assert_eq!(fields.code, "08P01");
    assert_eq!(fields.message, "bad things");
    assert_eq!(fields.hint.as_deref(), Some("try again"));
    assert!(parse_error_fields(b"Mno end").is_err());
    // A NUL inside a text is cut, not written as a field end.
    let cut = fatal("X", "a\0b", None);
    let Ok(Backend::Error(fields)) = parse_backend(&cut) else {
        panic!("not an error");
    };
    assert_eq!(fields.message, "a");
}

#[test]
fn boundaries_follow_messages_across_chunks() {
    let mut stream = Vec::new();
    stream.extend(backend(b'T', b"row description"));
    stream.extend(backend(b'D', &[7; 100]));
    stream.extend(backend(b'C', b"SELECT 1\0"));
    stream.extend(backend(b'Z', b"I"));
    // Fed in chunks of every size, the scanner passes everything on, in order, and ends at
    // a boundary.
    for chunk in 1..stream.len() {
        let mut b = Boundaries::new(MAX_BACKEND_LEN, is_backend_tag);
        let mut pending: Vec<u8> = Vec::new();
        let mut passed = 0;
        for piece in stream.chunks(chunk) {
            pending.extend_from_slice(piece);
            let n = b.scan(&pending, false).expect("valid stream");
            passed += n;
            pending.drain(..n);
        }
        assert_eq!(passed, stream.len(), "chunk size {chunk}");
        assert!(b.at_boundary());
    }
}

#[test]
fn boundaries_stop_where_asked_and_at_bad_headers() {
    let mut stream = backend(b'D', &[1; 10]);
    let first = stream.len();
    stream.extend(backend(b'C', b"x\0"));
    let mut b = Boundaries::new(MAX_BACKEND_LEN, is_backend_tag);
    assert_eq!(b.scan(&stream[..7], false), Ok(7));
    assert!(!b.at_boundary());
    // Asked to stop at the next boundary: the rest of the first message only.
    assert_eq!(b.scan(&stream[7..], true), Ok(first - 7));
    assert!(b.at_boundary());
    // A bad header is reported where it starts.
    let mut bad = backend(b'C', b"x\0");
    let ok_len = bad.len();
    bad.extend_from_slice(&[b'?', 0, 0, 0, 4]);
    let mut b = Boundaries::new(MAX_BACKEND_LEN, is_backend_tag);
    assert_eq!(
        b.scan(&bad, false),
        Err((ok_len, CodecError::UnexpectedTag(Tag(b'?'))))
    );
    let mut b = Boundaries::new(16, is_backend_tag);
    assert!(matches!(
        b.scan(&backend(b'D', &[0; 20]), false),
        Err((0, CodecError::Length { .. }))
    ));
}

#[test]
fn data_rows() {
    let row = backend(
        b'D',
        &[0, 2, 0, 0, 0, 2, b'h', b'i', 0xff, 0xff, 0xff, 0xff],
    );
    assert_eq!(parse_data_row(&row), Ok(vec![Some(&b"hi"[..]), None]));
    assert!(parse_data_row(&backend(b'D', &[0, 1, 0, 0, 0, 9, b'x'])).is_err());
    assert!(parse_data_row(&backend(b'D', &[0, 0, 1])).is_err());
    assert!(parse_data_row(&backend(b'D', &[0, 0xff])).is_err());
    assert!(parse_data_row(&backend(b'C', &[0, 0])).is_err());
}

#[test]
fn negotiate_protocol_version_lists_options() {
    let m = negotiate_protocol_version(&["_pq_.x"]);
    assert_eq!(m[0], b'v');
    assert_eq!(&m[5..9], &[0, 3, 0, 0]);
    assert_eq!(&m[9..13], &[0, 0, 0, 1]);
    assert_eq!(&m[13..], b"_pq_.x\0");
}

/// What the fuzz target (`worker/fuzz`) does, on a deterministic stream of inputs, so that
/// CI runs it too: nothing panics, nothing claims more bytes than it was given.
#[test]
fn random_input_never_panics() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000 {
        let len = (next() % 64) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the inputs start with a plausible header, to get past the length checks.
        if round % 2 == 0 && data.len() >= 5 {
            data[0] = b"QPRDEKZSX"[(next() % 9) as usize];
            let body_len = (data.len() - 1) as u32;
            data[1..5].copy_from_slice(&body_len.to_be_bytes());
        } else if round % 3 == 0 && data.len() >= 8 {
            let total = data.len() as u32;
            data[..4].copy_from_slice(&total.to_be_bytes());
            data[4..8].copy_from_slice(&[0, 3, 0, 0]);
        }
        if let Ok(Some(n)) = check_startup(&data) {
            assert!(n <= data.len());
            let _ = parse_startup(&data[..n]);
        }
        if let Ok(Some(n)) = check_message(&data, MAX_FRONTEND_LEN, is_frontend_tag) {
            assert!(n <= data.len());
            let _ = parse_frontend(&data[..n]);
        }
        if let Ok(Some(n)) = check_message(&data, MAX_BACKEND_STARTUP_LEN, is_backend_tag) {
            assert!(n <= data.len());
            let _ = parse_backend(&data[..n]);
            let _ = parse_data_row(&data[..n]);
        }
        let mut b = Boundaries::new(MAX_BACKEND_LEN, is_backend_tag);
        match b.scan(&data, false) {
            Ok(n) | Err((n, _)) => assert!(n <= data.len()),
        }
    }
}
