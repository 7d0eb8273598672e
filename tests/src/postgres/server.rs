//! A throwaway PostgreSQL 15 cluster that asks for passwords (SCRAM-SHA-256, and MD5 for one
//! user), unlike the trust-auth server this machine runs: the only way to prove that the
//! worker injects the brokered password. It runs as the `postgres` OS user (the server
//! refuses root) in a temporary directory, on a free loopback port, and is stopped and
//! removed on drop, panics included.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where Debian puts the server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The OS user the server runs as.
const PG_OS_USER: &str = "postgres";

/// The superuser's password (never given to the worker).
pub const SUPERUSER_PASSWORD: &str = "super-secret-never-shown";
/// A SCRAM user owning database `app`.
pub const APP_USER: &str = "app";
/// Its password: only the controller (sealed) and the worker (in memory) know it.
pub const APP_PASSWORD: &str = "app-pw-the-engineer-never-sees";
/// A user whose password is stored as MD5 and who must log in with MD5 (pg_hba).
pub const MD5_USER: &str = "md5user";
/// Its password.
pub const MD5_PASSWORD: &str = "md5-pw-the-engineer-never-sees";
/// A user that exists on the server but is not permitted by the test's roles.
pub const OTHER_USER: &str = "reader";
/// An admin (CREATEROLE) for per-session roles.
pub const ADMIN_USER: &str = "postern_admin";
/// Its password.
pub const ADMIN_PASSWORD: &str = "admin-pw-the-engineer-never-sees";
/// The group role per-session roles join.
pub const GROUP_ROLE: &str = "analysts";

/// A running throwaway cluster.
pub struct PgServer {
    dir: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

impl PgServer {
    /// initdb, configure, start, and create the test users and databases. Blocking.
    pub fn start() -> PgServer {
        let dir = std::env::temp_dir().join(format!(
            "postern-pg-{}",
            postern_proto::ids::random_base32(8)
        ));
        std::fs::create_dir_all(dir.join("sock")).expect("create the cluster dir");
        // From here on, Drop stops the server and removes the directory.
        let mut server = PgServer { dir, port: 0 };
        let dir = server.dir.clone();
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write pwfile");
        if is_root() {
            run(Command::new("chown").args(["-R", PG_OS_USER]).arg(&dir));
        }
        let data = dir.join("data");
        run(as_pg_user("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--no-instructions", "--auth=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display())));
        // First match wins: the socket (set-up only, reachable by root and postgres) trusts;
        // TCP asks MD5 of one user and SCRAM of everyone else.
        let hba = format!(
            "local all all trust\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        server.port = free_port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            server.port,
            dir.join("sock").display()
        );
        run(as_pg_user("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"]));
        let setup = [
            format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
            format!("CREATE DATABASE {APP_USER} OWNER {APP_USER}"),
            format!("CREATE ROLE {OTHER_USER} LOGIN PASSWORD 'reader-pw'"),
            format!("CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}'"),
            format!("CREATE ROLE {GROUP_ROLE} NOLOGIN"),
            format!("GRANT {GROUP_ROLE} TO {ADMIN_USER} WITH ADMIN OPTION"),
            format!(
                "SET password_encryption = 'md5'; \
                 CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'"
            ),
            format!("CREATE DATABASE bench OWNER {MD5_USER}"),
        ];
        server.sql(&setup.iter().map(String::as_str).collect::<Vec<_>>());
        server
    }

    /// The address a target names.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs statements as the superuser over the socket, each in its own transaction;
    /// returns psql's unaligned output.
    pub fn sql(&self, statements: &[&str]) -> String {
        let mut cmd = Command::new(format!("{PG_BIN}/psql"));
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(self.dir.join("sock"))
            .args(["-p", &self.port.to_string(), "-d", "postgres"]);
        for statement in statements {
            cmd.args(["-c", statement]);
        }
        let out = run(&mut cmd);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = as_pg_user("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server binary run as the `postgres` OS user when we are root (it refuses to run as
/// root), directly otherwise.
fn as_pg_user(program: &str) -> Command {
    let path = Path::new(PG_BIN).join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").port()
}
