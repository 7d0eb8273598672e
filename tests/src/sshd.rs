//! A real OpenSSH `sshd` on a free loopback port, with a throwaway config, host key,
//! `AuthorizedKeysFile` and `TrustedUserCAKeys`, killed on drop; the OS user it lets in; and
//! a tmux pane to drive an interactive shell through a real pty.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::TempDir;

/// The OS user the tests log in as on the target.
pub const LOGIN: &str = "postern-test";

/// A running `sshd`.
pub struct Sshd {
    child: Child,
    /// Its address, `127.0.0.1:PORT`.
    pub addr: String,
    /// Private key (OpenSSH PEM) whose public half is in `LOGIN`'s authorized keys.
    pub user_key_pem: String,
    /// Its throwaway directory (config, keys, log).
    pub dir: TempDir,
}

impl Sshd {
    /// Starts `sshd` trusting `ca_public_key` (if any) as a user CA.
    pub fn start(ca_public_key: Option<&str>) -> Sshd {
        ensure_user(LOGIN);
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let dir = TempDir::new("postern-sshd");
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("user_key"));
        std::fs::create_dir_all(d.join("authorized_keys")).expect("authorized_keys dir");
        std::fs::copy(
            d.join("user_key.pub"),
            d.join("authorized_keys").join(LOGIN),
        )
        .expect("authorized key");
        std::fs::write(d.join("ca.pub"), ca_public_key.unwrap_or("")).expect("ca.pub");
        let port = free_port();
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {d}/host_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys/%u\n\
             TrustedUserCAKeys {d}/ca.pub\n\
             StrictModes no\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin no\n\
             AllowAgentForwarding yes\n\
             AllowTcpForwarding yes\n\
             Subsystem sftp internal-sftp\n\
             LogLevel VERBOSE\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
        let log = std::fs::File::create(d.join("sshd.log")).expect("sshd log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/sbin/sshd (is openssh-server installed?)");
        let user_key_pem = std::fs::read_to_string(d.join("user_key")).expect("user key");
        let sshd = Sshd {
            child,
            addr: format!("127.0.0.1:{port}"),
            user_key_pem,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&sshd.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on {}; its log:\n{}",
                sshd.addr,
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `user` with a home directory if missing, and makes sure the account is not
/// locked (sshd without PAM refuses locked accounts, even with a key).
fn ensure_user(user: &str) {
    let exists = Command::new("id")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        // A concurrent test may have created it meanwhile: check again after.
        let _ = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash", user])
            .status();
    }
    let _ = Command::new("usermod").args(["-p", "*", user]).status();
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "postern-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen failed for {}", path.display());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The home directory of `user`.
pub fn home_of(user: &str) -> PathBuf {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    PathBuf::from(line.trim().split(':').nth(5).unwrap_or("/tmp"))
}

/// A command in a tmux pane (a real pty) on a private tmux server, killed on drop.
pub struct Tmux {
    socket: PathBuf,
    name: String,
}

impl Tmux {
    /// Runs `command` in a 100x30 pane of session `name`, the server listening on `socket`.
    pub fn start(socket: &Path, name: &str, command: &str) -> Tmux {
        let ok = std::process::Command::new("tmux")
            .arg("-S")
            .arg(socket)
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "100",
                "-y",
                "30",
                "-s",
                name,
            ])
            .arg(command)
            .status()
            .expect("tmux")
            .success();
        assert!(ok, "tmux new-session failed");
        Tmux {
            socket: socket.to_owned(),
            name: name.to_owned(),
        }
    }

    fn tmux(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("tmux");
        cmd.arg("-S").arg(&self.socket);
        cmd
    }

    /// The pane's text, or `None` once the session is gone.
    pub fn screen(&self) -> Option<String> {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .ok()?;
        out.status.success().then(|| text(&out.stdout))
    }

    /// Types `line` and Enter.
    pub fn send(&self, line: &str) {
        let _ = self
            .tmux()
            .args(["send-keys", "-t", &self.name, "-l", line])
            .status();
        let _ = self
            .tmux()
            .args(["send-keys", "-t", &self.name, "Enter"])
            .status();
    }

    /// Waits (≤ 30 s) until `what` is on screen.
    pub async fn wait_for_screen(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen().unwrap_or_default();
            if screen.contains(what) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} on screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (≤ 10 s) until the command has exited.
    pub async fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.screen().is_some() {
            assert!(
                Instant::now() < deadline,
                "the shell is still there:\n{}",
                self.screen().unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}
