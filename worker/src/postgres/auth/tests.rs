//! The login exchange against scripted servers, in memory.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    msg(b'R', &[&code.to_be_bytes()[..], data].concat())
}

/// The rest of a successful login: `AuthenticationOk`, a parameter, the key, ready.
fn logged_in() -> Vec<u8> {
    [
        auth_request(0, &[]),
        msg(b'S', b"server_version\x0015\0"),
        msg(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]),
        msg(b'Z', b"I"),
    ]
    .concat()
}

/// Reads the startup packet (length-prefixed, no type byte).
async fn read_startup(s: &mut DuplexStream) -> Vec<u8> {
    let len = s.read_u32().await.expect("startup length") as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.expect("startup body");
    body
}

/// Reads one typed message; returns its body.
async fn read_message(s: &mut DuplexStream, tag: u8) -> Vec<u8> {
    assert_eq!(s.read_u8().await.expect("type"), tag);
    let len = s.read_u32().await.expect("length") as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.expect("body");
    body
}

fn login(password: Option<&str>) -> Login {
    Login {
        user: "app".into(),
        database: "db".into(),
        password: password.map(|p| Secret(p.into())),
        credential_user: Some("app".into()),
    }
}

fn startup() -> Startup {
    Startup {
        minor: 0,
        params: vec![
            ("user".into(), "someone-else".into()),
            ("application_name".into(), "psql".into()),
            ("_pq_.option".into(), "x".into()),
        ],
    }
}

/// Runs `log_in` against `server`, a script on the other end of an in-memory pipe.
async fn against<F, Fut>(login: Login, server: F) -> Result<Ready, PgError>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
    let script = tokio::spawn(server(theirs));
    let result = log_in(&mut ours, &login, &startup(), &mut Counts::default()).await;
    drop(ours);
    script.await.expect("server script");
    result
}

#[tokio::test]
async fn md5_login_and_greeting() {
    let ready = against(login(Some("pw")), |mut s| async move {
        let startup = read_startup(&mut s).await;
        // The brokered user and database, the client's other parameters, never `_pq_.`.
        assert_eq!(
            startup,
            b"\0\x03\0\0user\0app\0database\0db\0application_name\0psql\0\0"
        );
        s.write_all(&auth_request(5, &[1, 2, 3, 4]))
            .await
            .expect("write");
        let answer = read_message(&mut s, b'p').await;
        let expected = format!("{}\0", md5_password("app", "pw", [1, 2, 3, 4]));
        assert_eq!(answer, expected.as_bytes());
        s.write_all(&logged_in()).await.expect("write");
    })
    .await
    .expect("logged in");
    assert_eq!(ready.server_key, Some(CancelKey { pid: 7, secret: 9 }));
    assert_eq!(ready.greeting, msg(b'S', b"server_version\x0015\0"));
    assert_eq!(ready.ready_for_query, msg(b'Z', b"I"));
}

#[tokio::test]
async fn cleartext_needs_the_users_own_password() {
    let result = against(login(None), |mut s| async move {
        read_startup(&mut s).await;
        s.write_all(&auth_request(3, &[])).await.expect("write");
    })
    .await;
    let Err(PgError::Login(why)) = result else {
        panic!("expected a login error, got {:?}", result.err());
    };
    assert!(why.contains("credential is for 'app'"), "{why}");
}

/// A server that runs SCRAM with the client, then signs with `server_signature`.
async fn scram_server(mut s: DuplexStream, server_signature: Option<&'static str>) {
    read_startup(&mut s).await;
    s.write_all(&auth_request(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
        .await
        .expect("write");
    let initial = read_message(&mut s, b'p').await;
    let first = std::str::from_utf8(&initial[b"SCRAM-SHA-256\0".len() + 4..]).expect("utf8");
    let nonce = first.rsplit_once("r=").expect("nonce").1;
    let server_first = format!("r={nonce}srv,s={},i=4096", B64.encode(b"salt"));
    s.write_all(&auth_request(11, server_first.as_bytes()))
        .await
        .expect("write");
    let client_final = read_message(&mut s, b'p').await;
    assert!(client_final.starts_with(b"c=biws,r="));
    match server_signature {
        Some(v) => {
            let final_message = format!("v={v}");
            s.write_all(&auth_request(12, final_message.as_bytes()))
                .await
                .expect("write");
        }
        // Skips its proof and says OK.
        None => s.write_all(&logged_in()).await.expect("write"),
    }
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

#[tokio::test]
async fn scram_server_must_prove_it_knows_the_password() {
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let result = against(login(Some("pw")), move |s| scram_server(s, Some(wrong))).await;
    let Err(PgError::Login(why)) = result else {
        panic!("expected a login error, got {:?}", result.err());
    };
    assert!(why.contains("signature is wrong"), "{why}");

    let result = against(login(Some("pw")), |s| scram_server(s, None)).await;
    let Err(PgError::Login(why)) = result else {
        panic!("expected a login error, got {:?}", result.err());
    };
    assert!(why.contains("without proving"), "{why}");
}

#[tokio::test]
async fn refusals_and_unsupported_methods() {
    let result = against(login(Some("pw")), |mut s| async move {
        read_startup(&mut s).await;
        let error = codec::fatal("28P01", "password authentication failed", None);
        s.write_all(&error).await.expect("write");
    })
    .await;
    let Err(PgError::TargetRefused(fields)) = result else {
        panic!("expected the server's refusal, got {:?}", result.err());
    };
    assert_eq!(fields.code, "28P01");

    let result = against(login(Some("pw")), |mut s| async move {
        read_startup(&mut s).await;
        s.write_all(&auth_request(7, &[])).await.expect("write");
    })
    .await;
    let Err(PgError::Login(why)) = result else {
        panic!("expected a login error, got {:?}", result.err());
    };
    assert!(why.contains("GSSAPI"), "{why}");

    // Garbage instead of an answer.
    let result = against(login(Some("pw")), |mut s| async move {
        read_startup(&mut s).await;
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .expect("write");
    })
    .await;
    assert!(
        matches!(result, Err(PgError::TargetProtocol(_))),
        "{:?}",
        result.err()
    );
}
