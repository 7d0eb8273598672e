//! The PostgreSQL codec on arbitrary bytes: framing, parsing and boundary tracking must
//! never panic, and never claim more bytes than they were given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_worker::postgres::codec::{
    check_message, check_startup, is_backend_tag, is_frontend_tag, parse_backend, parse_data_row,
    parse_frontend, parse_startup, Boundaries, MAX_BACKEND_LEN, MAX_BACKEND_STARTUP_LEN,
    MAX_FRONTEND_LEN,
};

fuzz_target!(|data: &[u8]| {
    // A client's first packet.
    if let Ok(Some(len)) = check_startup(data) {
        assert!(len <= data.len());
        let _ = parse_startup(&data[..len]);
    }
    // Client messages once logged in.
    let mut rest = data;
    while let Ok(Some(len)) = check_message(rest, MAX_FRONTEND_LEN, is_frontend_tag) {
        assert!((5..=rest.len()).contains(&len));
        let _ = parse_frontend(&rest[..len]);
        rest = &rest[len..];
    }
    // Server messages during the startup (and the admin connection's rows).
    let mut rest = data;
    while let Ok(Some(len)) = check_message(rest, MAX_BACKEND_STARTUP_LEN, is_backend_tag) {
        assert!((5..=rest.len()).contains(&len));
        let _ = parse_backend(&rest[..len]);
        let _ = parse_data_row(&rest[..len]);
        rest = &rest[len..];
    }
    // Server output relayed in chunks of a size the input picks.
    let step = data.first().map_or(1, |&n| usize::from(n).max(1));
    let mut boundaries = Boundaries::new(MAX_BACKEND_LEN, is_backend_tag);
    let mut pending = Vec::new();
    for chunk in data.chunks(step) {
        pending.extend_from_slice(chunk);
        match boundaries.scan(&pending, false) {
            Ok(n) => {
                assert!(n <= pending.len());
                pending.drain(..n);
            }
            Err((n, _)) => {
                assert!(n <= pending.len());
                break;
            }
        }
    }
});
