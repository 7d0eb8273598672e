//! The namespace lab of [`super::namespaces`]: two network namespaces joined by a veth
//! pair, the firewall that closes one of them, and the real processes run inside them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::TempDir;

/// The worker's fail-closed grace period in this test.
pub(super) const GRACE: &str = "3s";
/// Generous sanity bound for a cancel to cut an open connection.
pub(super) const CUT_BOUND: Duration = Duration::from_secs(1);
pub(super) const API_PORT: u16 = 9200;
/// The API as workers reach it: a TCP forwarder standing in for the TLS-terminating proxy
/// that a plain-HTTP (loopback-only) controller sits behind.
pub(super) const API_PROXY_PORT: u16 = 9201;
pub(super) const CLUSTER_PORT: u16 = 9202;
pub(super) const RELAY_PORT: u16 = 9203;
pub(super) const ECHO_PORT: u16 = 7000;

/// Two namespaces and the veth pair between them; removed on drop.
pub(super) struct Net {
    pub(super) public: String,
    pub(super) private: String,
    pub(super) pub_ip: String,
    pub(super) priv_ip: String,
}

impl Net {
    /// Creates `pstn-pub-*` and `pstn-priv-*` and a /30 between them. Any failure is
    /// returned as the command's error text.
    pub(super) fn create() -> Result<Net, String> {
        let tag = postern_proto::ids::random_base32(6);
        let r = getrandom::u32().unwrap_or(0);
        let (a, b) = ((r & 0xff) as u8, ((r >> 8) & 0x3f) as u8 * 4);
        let net = Net {
            public: format!("pstn-pub-{tag}"),
            private: format!("pstn-priv-{tag}"),
            pub_ip: format!("10.213.{a}.{}", b + 1),
            priv_ip: format!("10.213.{a}.{}", b + 2),
        };
        run("ip", &["netns", "add", &net.public])?;
        // From here on, Drop removes what exists.
        let net = NetGuard(Some(net));
        let n = net.get();
        run("ip", &["netns", "add", &n.private])?;
        let (va, vb) = (format!("pstn{tag}a"), format!("pstn{tag}b"));
        run(
            "ip",
            &[
                "link", "add", &va, "netns", &n.public, "type", "veth", "peer", "name", &vb,
                "netns", &n.private,
            ],
        )?;
        for (ns, dev, ip) in [(&n.public, &va, &n.pub_ip), (&n.private, &vb, &n.priv_ip)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net.take())
    }

    /// Closes `priv`: it may open connections out, nothing may open one in.
    pub(super) fn firewall(&self, dir: &Path) -> Result<(), String> {
        let rules = dir.join("priv.nft");
        std::fs::write(
            &rules,
            "table inet postern_test {\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy drop;\n\
             \t\tiif \"lo\" accept\n\
             \t\tct state established,related accept\n\
             \t}\n\
             }\n",
        )
        .map_err(|e| e.to_string())?;
        let rules = rules.display().to_string();
        run("ip", &["netns", "exec", &self.private, "nft", "-f", &rules])
    }

    /// `ip netns exec NS program args…`.
    pub(super) fn cmd(&self, ns: &str, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program).args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        for ns in [&self.public, &self.private] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Holds a half-built [`Net`] so that a failed step still removes it.
pub(super) struct NetGuard(Option<Net>);

impl NetGuard {
    fn get(&self) -> &Net {
        self.0.as_ref().expect("net")
    }
    fn take(mut self) -> Net {
        self.0.take().expect("net")
    }
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Runs a set-up command; its stderr is the error.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub(super) struct Proc(pub(super) Child);

impl Proc {
    /// SIGTERM, then wait (≤ 10 s) for it to exit.
    pub(super) fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the test runs, and where.
pub(super) struct Lab {
    pub(super) net: Net,
    pub(super) dir: TempDir,
    pub(super) bin: PathBuf,
}

impl Lab {
    fn binary(&self, name: &str) -> PathBuf {
        self.bin.with_file_name(name)
    }

    /// Starts the controller in `pub`; returns it and the bootstrap password if printed.
    pub(super) fn controller(&self) -> (Proc, Option<String>) {
        let log = std::fs::File::create(self.dir.path().join("controller.log")).expect("log");
        let mut child = self
            .net
            .cmd(
                &self.net.public,
                &self.binary("postern-controller"),
                &[
                    "--config",
                    &self
                        .dir
                        .path()
                        .join("controller.toml")
                        .display()
                        .to_string(),
                ],
            )
            .env("POSTERN_LOG", "info,postern_controller::relay=debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn postern-controller");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc(child);
        let mut password = None;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("Bootstrap admin created: admin / ") {
                password = Some(rest.trim().to_owned());
            }
            if line.starts_with("postern-controller listening") {
                std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
                return (proc, password);
            }
        }
        panic!(
            "postern-controller did not start; see {}",
            self.dir.path().join("controller.log").display()
        );
    }

    /// Starts an outbound-only worker in `priv` with an activation token.
    pub(super) fn worker(&self, name: &str, token: &str) -> Proc {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "controller_url = \"http://{pub_ip}:{API_PROXY_PORT}\"\n\
                 activation_token = \"{token}\"\n\
                 data_dir = \"{data}\"\n\
                 mode = \"outbound-only\"\n\
                 grace_period = \"{GRACE}\"\n",
                pub_ip = self.net.pub_ip,
                data = self.dir.path().join(name).display(),
            ),
        )
        .expect("worker config");
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let child = self
            .net
            .cmd(
                &self.net.private,
                &self.binary("postern-worker"),
                &["--config", &config.display().to_string()],
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postern-worker");
        Proc(child)
    }

    /// `postern ARGS` in `pub`, with the test's profile.
    pub(super) fn postern(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = self
            .net
            .cmd(&self.net.public, &self.bin, args)
            .env("POSTERN_CONFIG_DIR", self.dir.path().join("cli"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postern");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("stdin");
        }
        drop(input);
        child.wait_with_output().expect("postern runs")
    }

    /// `postern --json ARGS`, which must succeed; its JSON output.
    pub(super) fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.postern(&all, None);
        assert!(
            out.status.success(),
            "postern {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits (≤ 20 s) until worker `name` is listed connected; returns its entry.
    pub(super) async fn connected(&self, name: &str) -> serde_json::Value {
        for _ in 0..100 {
            let workers = self.json(&["workers", "list"]);
            if let Some(w) = workers
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["name"] == name && w["connected"] == true)
            {
                return w.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "worker {name} did not connect; see {}",
            self.dir.path().join(format!("{name}.log")).display()
        );
    }

    /// Creates worker `name` (tag net=private), starts it in `priv`, waits until connected.
    pub(super) async fn start_worker(&self, name: &str) -> Proc {
        let created = self.json(&["workers", "create", name, "--tag", "net=private"]);
        let token = created["activation_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let worker = self.worker(name, &token);
        let listed = self.connected(name).await;
        assert_eq!(listed["mode"], "outbound-only");
        assert_eq!(
            listed["session_addr"],
            format!("{}:{RELAY_PORT}", self.net.pub_ip),
            "clients are sent to the controller's relay"
        );
        worker
    }

    /// `postern connect echo` in `pub`, serving until its session ends; on failure, what it
    /// printed.
    pub(super) fn connect(&self) -> Result<Client, String> {
        let mut child = self
            .net
            .cmd(&self.net.public, &self.bin, &["--json", "connect", "echo"])
            .env("POSTERN_CONFIG_DIR", self.dir.path().join("cli"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postern connect");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let proc = Proc(child);
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let Ok(announced) = serde_json::from_str::<serde_json::Value>(&line) else {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut err);
            return Err(err);
        };
        // Keep stderr drained; it ends with why the session ended.
        let (tx, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                println!("[postern connect] {line}");
                let _ = tx.send(line);
            }
        });
        Ok(Client {
            id: announced["session_id"]
                .as_str()
                .expect("session id")
                .to_owned(),
            port: announced["port"].as_u64().expect("port") as u16,
            proc,
            said,
        })
    }

    /// Whether a TCP connection from `ns` to `addr` gets an echo within 3 s.
    pub(super) fn echo_from(&self, ns: &str, addr: &str) -> bool {
        let out = self
            .net
            .cmd(
                ns,
                Path::new("socat"),
                &["-T", "3", "-", &format!("TCP:{addr},connect-timeout=3")],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                if let Some(mut i) = c.stdin.take() {
                    let _ = i.write_all(b"direct\n");
                }
                c.wait_with_output()
            });
        out.is_ok_and(|o| o.stdout == b"direct\n")
    }
}

/// A running `postern connect`.
#[derive(Debug)]
pub(super) struct Client {
    /// The session id it announced.
    pub(super) id: String,
    /// Its local port (in `pub`).
    pub(super) port: u16,
    proc: Proc,
    said: std::sync::mpsc::Receiver<String>,
}

impl Client {
    /// Waits (≤ `bound`) for the command to exit; returns its exit code and what it printed
    /// on stderr.
    pub(super) fn exited(mut self, bound: Duration) -> Option<(Option<i32>, String)> {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                // The reader thread ends with the pipe; give it a moment to pass the rest.
                std::thread::sleep(Duration::from_millis(100));
                let text: Vec<String> = self.said.try_iter().collect();
                return Some((status.code(), text.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Echo traffic through a session's local port in `pub` (a `socat` there), every 20 ms;
/// `cut` resolves when an echo fails or takes longer than 2 s.
pub(super) struct NsTraffic {
    _socat: tokio::process::Child,
    cut: tokio::sync::oneshot::Receiver<Instant>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NsTraffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NsTraffic {
    pub(super) async fn start(lab: &Lab, port: u16) -> NsTraffic {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &lab.net.public, "socat", "STDIO"])
            .arg(format!("TCP:127.0.0.1:{port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn socat");
        let mut input = child.stdin.take().expect("stdin");
        let mut output = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 5];
        input.write_all(b"ping\n").await.expect("first ping");
        tokio::time::timeout(Duration::from_secs(10), output.read_exact(&mut buf))
            .await
            .expect("first echo within 10 s")
            .expect("first echo");
        assert_eq!(&buf, b"ping\n");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let ok = input.write_all(b"ping\n").await.is_ok()
                    && matches!(
                        tokio::time::timeout(Duration::from_secs(2), output.read_exact(&mut buf))
                            .await,
                        Ok(Ok(_))
                    )
                    && &buf == b"ping\n";
                if !ok {
                    let _ = tx.send(Instant::now());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        NsTraffic {
            _socat: child,
            cut: rx,
            task,
        }
    }

    pub(super) fn alive(&mut self) -> bool {
        matches!(
            self.cut.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }

    pub(super) async fn wait_cut(mut self, bound: Duration) -> Option<Instant> {
        tokio::time::timeout(bound, &mut self.cut)
            .await
            .ok()
            .and_then(Result::ok)
    }
}
