//! Operations (issue 8): the API over TLS (a cluster-CA certificate pinned at first login, or
//! a certificate from files trusted with `--ca-file`), `--check-config` on the example
//! configs under `deploy/`, `/metrics` (in `metrics`) and the secret-leak grep of a full run's
//! logs (in `secrets`). The Prometheus text reader is `prom`.

pub(crate) mod metrics;
pub(crate) mod prom;
mod secrets;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::dev_cli::postern_bin;
use crate::harness::{controller_config, Api, ClusterOptions, TempDir};

/// The repository root (`deploy/` lives there).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A binary built next to `postern`.
fn sibling_bin(name: &str) -> PathBuf {
    postern_bin().with_file_name(name)
}

/// What a finished CLI run printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `postern ARGS` with its profile in `config_dir`, feeding `stdin`.
async fn postern(config_dir: &Path, args: &[&str], stdin: &str) -> Run {
    let mut child = tokio::process::Command::new(postern_bin())
        .args(args)
        .env("POSTERN_CONFIG_DIR", config_dir)
        .env_remove("POSTERN_ADDR")
        .env_remove("POSTERN_TOKEN")
        .env_remove("POSTERN_CA_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn postern");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes()).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("postern finished within 60 s")
        .expect("postern ran");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// SHA-256 (hex) of the first certificate of a PEM text.
fn pem_sha256(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM");
    Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cluster CA, fetched without trust and checked against the controller's fingerprint.
async fn cluster_ca(url: &str, fingerprint: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .expect("client")
        .get(format!("{url}/v1/cluster/ca"))
        .send()
        .await
        .expect("GET /v1/cluster/ca")
        .text()
        .await
        .expect("PEM");
    assert_eq!(
        pem_sha256(&pem),
        fingerprint,
        "the CA served is the one logged"
    );
    pem
}

/// An API client trusting only `ca_pem`.
fn api_trusting(url: &str, ca_pem: &str) -> Api {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA PEM");
    let http = reqwest::Client::builder()
        .tls_certs_only(certs)
        .build()
        .expect("client");
    Api::with_http(url, http)
}

/// A worker configuration (built from JSON, so that it names only the keys this test sets).
fn worker_config(value: serde_json::Value) -> postern_worker::WorkerConfig {
    serde_json::from_value(value).expect("worker config")
}

/// Waits (≤ 15 s) until the controller lists a connected worker.
async fn wait_worker(admin: &Api) {
    for _ in 0..300 {
        let workers: Vec<postern_controller::api::types::Worker> = admin
            .ok(reqwest::Method::GET, "/v1/workers", None::<&()>)
            .await;
        if workers.iter().any(|w| w.connected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker did not connect within 15 s");
}

/// A start that fails (here: an audit file that cannot be opened) makes no bootstrap admin:
/// the next start makes one and hands out its password, which logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_no_admin_without_a_password() {
    let dir = TempDir::new("postern-bootstrap");
    let mut config = controller_config(dir.path(), &ClusterOptions::default());
    // A directory no file can be made in, even by root: the configuration check passes (the
    // directory exists), opening the file fails.
    config.audit_file = Some("/proc/self/postern-audit.jsonl".into());
    let Err(err) = postern_controller::start(config).await else {
        panic!("an audit file that cannot be made must fail the start");
    };
    assert!(err.to_string().contains("cannot open audit file"), "{err}");

    let config = controller_config(dir.path(), &ClusterOptions::default());
    let controller = postern_controller::start(config).await.expect("start");
    let boot = controller
        .bootstrap()
        .cloned()
        .expect("the admin is made by the start that succeeds");
    crate::harness::Api::new(&controller.api_url())
        .login(&boot.user, &boot.password)
        .await
        .expect("its password logs in");
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_controller_pins_its_ca_at_login_and_carries_a_session() {
    let dir = TempDir::new("postern-tls");
    let mut config = controller_config(dir.path(), &ClusterOptions::default());
    // No tls_cert_file: a certificate from the cluster CA for localhost, 127.0.0.1 and ::1.
    config.insecure_http = false;
    let controller = postern_controller::start(config)
        .await
        .expect("TLS controller");
    let url = controller.api_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let fingerprint = controller.ca_fingerprint();
    let password = controller.bootstrap().expect("bootstrap").password.clone();

    // Nothing is served in clear any more.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plain = reqwest::get(format!("http://{}/healthz", controller.api_addr())).await;
    assert!(
        !plain.is_ok_and(|r| r.status().is_success()),
        "plain HTTP answered"
    );

    let ca = cluster_ca(&url, &fingerprint).await;
    let admin = api_trusting(&url, &ca)
        .login("admin", &password)
        .await
        .expect("admin login over TLS");
    let created: postern_controller::api::types::CreatedWorker = admin
        .ok(
            reqwest::Method::POST,
            "/v1/workers",
            Some(&serde_json::json!({"name": "w1", "tags": {}})),
        )
        .await;
    // The worker trusts the controller by the fingerprint alone.
    let worker = postern_worker::start(worker_config(serde_json::json!({
        "controller_url": url,
        "activation_token": created.activation_token,
        "data_dir": dir.path().join("worker"),
        "session_listen": "127.0.0.1:0",
        "controller_ca_fingerprint": fingerprint,
    })))
    .await
    .expect("worker registers over HTTPS");
    wait_worker(&admin).await;

    let cfg = dir.path().join("cli");
    let cfg = cfg.as_path();
    let login = [
        "login",
        "--addr",
        &url,
        "--user",
        "admin",
        "--password-stdin",
    ];
    // Not a terminal, no fingerprint: refused, and told what to compare.
    let r = postern(cfg, &login, &format!("{password}\n")).await;
    assert!(!r.ok, "logged in without trusting anything: {}", r.stdout);
    assert!(
        r.stderr.contains(&fingerprint) && r.stderr.contains("--ca-fingerprint"),
        "{}",
        r.stderr
    );
    // A different fingerprint: refused.
    let wrong = "00".repeat(32);
    let r = postern(
        cfg,
        &[&login[..], &["--ca-fingerprint", &wrong]].concat(),
        &format!("{password}\n"),
    )
    .await;
    assert!(!r.ok && r.stderr.contains("not"), "{}", r.stderr);
    // The right one: logged in, and the CA pinned in the profile.
    let r = postern(
        cfg,
        &[&login[..], &["--ca-fingerprint", &fingerprint]].concat(),
        &format!("{password}\n"),
    )
    .await;
    assert!(r.ok, "login: {}{}", r.stdout, r.stderr);
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.join("profile.json")).expect("profile saved"))
            .expect("profile JSON");
    assert_eq!(profile["ca_pem"].as_str(), Some(ca.as_str()), "CA pinned");

    // Later commands trust the pinned CA: authorize and connect through the worker.
    let r = postern(
        cfg,
        &[
            "targets",
            "create",
            "pg",
            "--type",
            "tcp",
            "--address",
            "127.0.0.1:5432",
        ],
        "",
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let r = postern(
        cfg,
        &crate::dev_cli::connect_psql("pg", "select 40 + 2"),
        "",
    )
    .await;
    assert!(
        r.ok,
        "connect over a TLS controller: {}{}",
        r.stdout, r.stderr
    );
    assert_eq!(r.stdout.trim(), "42", "{}", r.stderr);

    // A profile for another controller address does not lend its CA.
    let other = dir.path().join("cli-other");
    let r = postern(
        &other,
        &["--addr", &url, "--token", "pt_none", "whoami"],
        "",
    )
    .await;
    assert!(!r.ok && r.stderr.contains("does not trust"), "{}", r.stderr);

    // The controller's CA changed (here: the profile pins another CA): commands say how to
    // re-pin, and a login with the new fingerprint does.
    let profile_path = cfg.join("profile.json");
    let mut profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&profile_path).expect("profile")).expect("JSON");
    let other_key = rcgen::KeyPair::generate().expect("key");
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    profile["ca_pem"] = other.self_signed(&other_key).expect("CA").pem().into();
    std::fs::write(&profile_path, profile.to_string()).expect("write profile");
    let r = postern(cfg, &["targets", "list"], "").await;
    assert!(
        !r.ok
            && r.stderr
                .contains("--ca-fingerprint SHA256` pins the new one"),
        "{}",
        r.stderr
    );
    let r = postern(
        cfg,
        &[&login[..], &["--ca-fingerprint", &fingerprint]].concat(),
        &format!("{password}\n"),
    )
    .await;
    assert!(r.ok, "re-pin: {}{}", r.stdout, r.stderr);
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&profile_path).expect("profile")).expect("JSON");
    assert_eq!(
        profile["ca_pem"].as_str(),
        Some(ca.as_str()),
        "CA pinned anew"
    );
    assert!(postern(cfg, &["targets", "list"], "").await.ok);

    worker.shutdown().await;
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_from_files_is_trusted_with_ca_file() {
    let dir = TempDir::new("postern-tls-files");
    // An operator's own CA and a server certificate for localhost.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Ops CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("server cert");
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    );
    std::fs::write(&ca_file, ca_cert.pem()).expect("write");
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");

    let mut config = controller_config(dir.path(), &ClusterOptions::default());
    config.insecure_http = false;
    config.tls_cert_file = Some(cert_file);
    config.tls_key_file = Some(key_file);
    let controller = postern_controller::start(config)
        .await
        .expect("controller with tls_cert_file");
    let url = format!("https://localhost:{}", controller.api_addr().port());
    let password = controller.bootstrap().expect("bootstrap").password.clone();

    let cfg = dir.path().join("cli");
    let ca_arg = ca_file.to_string_lossy().into_owned();
    let r = postern(
        &cfg,
        &[
            "login",
            "--addr",
            &url,
            "--ca-file",
            &ca_arg,
            "--user",
            "admin",
            "--password-stdin",
        ],
        &format!("{password}\n"),
    )
    .await;
    assert!(r.ok, "login with --ca-file: {}{}", r.stdout, r.stderr);
    // Pinned: no --ca-file needed any more.
    let r = postern(&cfg, &["whoami"], "").await;
    assert!(
        r.ok && r.stdout.contains("admin"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    // Without the CA, the system's roots do not know it.
    let r = postern(
        &dir.path().join("cli2"),
        &["--addr", &url, "--token", "pt_none", "whoami"],
        "",
    )
    .await;
    assert!(!r.ok && r.stderr.contains("does not trust"), "{}", r.stderr);
    controller.shutdown().await;
}

/// Runs `BIN --check-config FILE`.
fn check_config(bin: &str, file: &Path) -> std::process::Output {
    std::process::Command::new(sibling_bin(bin))
        .arg("--config")
        .arg(file)
        .arg("--check-config")
        .env_remove("POSTERN_KEK")
        .env_remove("POSTERN_DATABASE_URL")
        .env_remove("POSTERN_ACTIVATION_TOKEN")
        .output()
        .expect("run --check-config")
}

/// The `controller.toml: |` / `worker.toml: |` blocks of the Kubernetes ConfigMaps.
fn configmap_block(yaml: &str, key: &str) -> String {
    let start = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| l.trim_end() != start).skip(1);
    let mut out = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        out.push_str(line.strip_prefix("    ").unwrap_or(line));
        out.push('\n');
    }
    assert!(!out.trim().is_empty(), "no {key} block");
    out
}

#[test]
fn example_configs_load_and_unknown_keys_are_named() {
    let root = repo_root();
    let dir = TempDir::new("postern-check-config");
    let k8s = |f: &str| std::fs::read_to_string(root.join("deploy/kubernetes").join(f));
    let mut configs = vec![
        (
            "postern-controller",
            root.join("deploy/config/controller.toml"),
        ),
        ("postern-worker", root.join("deploy/config/worker.toml")),
        (
            "postern-controller",
            root.join("deploy/compose/controller.toml"),
        ),
        ("postern-worker", root.join("deploy/compose/worker.toml")),
    ];
    for (bin, file, key) in [
        ("postern-controller", "controller.yaml", "controller.toml"),
        ("postern-worker", "worker.yaml", "worker.toml"),
    ] {
        let text = configmap_block(&k8s(file).expect("manifest"), key);
        let path = dir.path().join(format!("k8s-{key}"));
        std::fs::write(&path, text).expect("write");
        configs.push((bin, path));
    }
    for (bin, file) in &configs {
        let out = check_config(bin, file);
        assert!(
            out.status.success(),
            "{bin} --check-config {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"));
    }

    // An unknown key, at the top and in a section, is refused by name.
    for (bin, file, extra) in [
        (
            "postern-controller",
            &configs[0].1,
            "\ntls_nmaes = [\"x\"]\n",
        ),
        (
            "postern-worker",
            &configs[1].1,
            "\nmetrics_listn = \"127.0.0.1:1\"\n",
        ),
        (
            "postern-worker",
            &configs[1].1,
            "\n[postgres]\naudit_limit = 1\n",
        ),
    ] {
        let text = std::fs::read_to_string(file).expect("example");
        // A section header must not swallow the key: strip any existing [postgres] table.
        let text = if extra.contains("[postgres]") {
            text.split("\n[postgres]").next().unwrap_or("").to_owned()
        } else {
            // Top-level keys go before the first table.
            match text.find("\n[") {
                Some(i) => format!("{}{extra}{}", &text[..i], &text[i..]),
                None => format!("{text}{extra}"),
            }
        };
        let text = if extra.contains("[postgres]") {
            format!("{text}{extra}")
        } else {
            text
        };
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).expect("write");
        let out = check_config(bin, &bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let key = extra
            .trim()
            .lines()
            .last()
            .and_then(|l| l.split(' ').next())
            .expect("key");
        assert_eq!(out.status.code(), Some(1), "{bin} accepted {key}: {stderr}");
        assert!(stderr.contains(key), "{bin} did not name {key}: {stderr}");
    }

    // A value that parses but is wrong is refused too, with its key.
    let bad = dir.path().join("bad-value.toml");
    std::fs::write(
        &bad,
        "database_url = \"sqlite://x.db\"\napi_listen = \"0.0.0.0:9200\"\ninsecure_http = true\n",
    )
    .expect("write");
    let out = check_config("postern-controller", &bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("insecure_http"));

    // What keeps a controller from starting, or SSO from working, is warned about: no
    // key-encryption key to read, and a login method without its client secret.
    let warned = dir.path().join("warned.toml");
    std::fs::write(
        &warned,
        format!(
            "database_url = \"sqlite://x.db\"\nkek_file = \"{}\"\n\
             [[oidc]]\nname = \"corp\"\nissuer = \"http://127.0.0.1:9/\"\nclient_id = \"c\"\n",
            dir.path().join("no-such-kek").display()
        ),
    )
    .expect("write");
    let out = check_config("postern-controller", &warned);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot read kek_file") && stderr.contains("does not start without it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("'corp' has no client_secret (nor POSTERN_OIDC_CORP_CLIENT_SECRET)"),
        "{stderr}"
    );

    // A key file that holds no key, and an announced address no one can dial, are errors.
    let short_kek = dir.path().join("short-kek");
    std::fs::write(&short_kek, "c2hvcnQ=\n").expect("write");
    for (body, named) in [
        (
            format!("kek_file = \"{}\"\n", short_kek.display()),
            "invalid key-encryption key",
        ),
        (
            "cluster_public_addrs = [\"not an addr\"]\n".to_owned(),
            "cluster_public_addrs",
        ),
        (
            "relay_public_addr = \"nohost\"\n".to_owned(),
            "relay_public_addr",
        ),
    ] {
        let file = dir.path().join("refused.toml");
        std::fs::write(&file, format!("database_url = \"sqlite://x.db\"\n{body}")).expect("write");
        let out = check_config("postern-controller", &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {stderr}");
        assert!(stderr.contains(named), "{body}: {stderr}");
    }
}

/// Two controllers started at once on a new PostgreSQL database, both with
/// `bootstrap_admin` (as the Compose and Kubernetes examples run them): both come up, one
/// of them makes the admin, and its password logs in through either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_started_together_bootstrap_once() {
    // With the key-encryption key given, and with none yet: one of them makes it, the other
    // uses that one.
    for kek_given in [true, false] {
        bootstrap_race(kek_given).await;
    }
}

async fn bootstrap_race(kek_given: bool) {
    let db = crate::harness::PgDb::create().await;
    let dir = TempDir::new("postern-bootstrap-race");
    if kek_given {
        postern_controller::write_private(
            &dir.path().join("kek"),
            &postern_controller::keys::Kek::generate_base64(),
        )
        .expect("kek");
    }
    let options = ClusterOptions {
        database_url: Some(db.url.clone()),
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        postern_controller::start(controller_config(dir.path(), &options)),
        postern_controller::start(controller_config(dir.path(), &options)),
    );
    let (a, b) = (a.expect("first controller"), b.expect("second controller"));
    let boots: Vec<_> = [&a, &b]
        .iter()
        .filter_map(|c| c.bootstrap().cloned())
        .collect();
    assert_eq!(boots.len(), 1, "exactly one bootstraps");
    for c in [&a, &b] {
        Api::new(&format!("http://{}", c.api_addr()))
            .login(&boots[0].user, &boots[0].password)
            .await
            .expect("the admin logs in through either controller");
    }
    a.shutdown().await;
    b.shutdown().await;
    // The key on disk is the one that sealed the database: a controller starts on it.
    let mut again = controller_config(dir.path(), &options);
    again.bootstrap_admin = false;
    postern_controller::start(again)
        .await
        .expect("a controller starts again on the kek_file")
        .shutdown()
        .await;
    db.drop_db().await;
}
