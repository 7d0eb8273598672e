//! Must show (issue 7), across real network namespaces the test creates and removes:
//! `pub` holds the controller and the client, `priv` the worker and a TCP echo target, joined
//! by a veth pair; nftables in `priv` drop every connection opened from outside (replies to
//! what `priv` opened itself get in). Every piece is a real process (`postern-controller`,
//! `postern-worker`, `postern`, `socat`) run with `ip netns exec`.
//!
//! 1. The client in `pub` cannot reach the target, and reaches it through Postern via the
//!    outbound-only worker.
//! 2. Stopping that worker makes new authorizations fail with "no worker available";
//!    starting a second matching worker restores service.
//! 3. A cancel cuts the relayed connection; with the controller killed, the worker fails
//!    closed after its grace period.
//!
//! Without the rights to create namespaces the test fails and says so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::lab::{
    Lab, Net, NsTraffic, Proc, API_PORT, API_PROXY_PORT, CLUSTER_PORT, CUT_BOUND, ECHO_PORT,
    RELAY_PORT,
};
use crate::dev_cli::postern_bin;
use crate::harness::TempDir;

fn need(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{program}` is missing: install {package} (.ci/run does)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_only_worker_serves_a_network_nothing_can_connect_into() {
    need("ip", "iproute2");
    need("nft", "nftables");
    need("socat", "socat");
    let dir = TempDir::new("postern-netns");
    let net = Net::create().unwrap_or_else(|e| {
        panic!(
            "cannot create the network namespaces this test needs (it must run as root or with \
             CAP_NET_ADMIN): {e}"
        )
    });
    let lab = Lab {
        dir,
        bin: postern_bin(),
        net,
    };
    let (pub_ip, priv_ip) = (lab.net.pub_ip.clone(), lab.net.priv_ip.clone());
    let target = format!("{priv_ip}:{ECHO_PORT}");

    // The target: a TCP echo on `priv`'s own address.
    let _echo = Proc(
        lab.net
            .cmd(
                &lab.net.private,
                Path::new("socat"),
                &[
                    &format!("TCP-LISTEN:{ECHO_PORT},bind={priv_ip},fork,reuseaddr"),
                    "PIPE",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the echo target"),
    );
    // The controller in `pub`, and the API forwarder workers register through.
    std::fs::write(
        lab.dir.path().join("controller.toml"),
        format!(
            "database_url = \"sqlite://{db}\"\n\
             api_listen = \"127.0.0.1:{API_PORT}\"\n\
             cluster_listen = \"{pub_ip}:{CLUSTER_PORT}\"\n\
             cluster_public_addrs = [\"{pub_ip}:{CLUSTER_PORT}\"]\n\
             relay_listen = \"{pub_ip}:{RELAY_PORT}\"\n\
             kek_file = \"{kek}\"\n\
             bootstrap_admin = true\n\
             insecure_http = true\n",
            db = lab.dir.path().join("postern.db").display(),
            kek = lab.dir.path().join("kek").display(),
        ),
    )
    .expect("controller config");
    let (controller, password) = lab.controller();
    let _api_proxy = Proc(
        lab.net
            .cmd(
                &lab.net.public,
                Path::new("socat"),
                &[
                    &format!("TCP-LISTEN:{API_PROXY_PORT},bind={pub_ip},fork,reuseaddr"),
                    &format!("TCP:127.0.0.1:{API_PORT}"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the API forwarder"),
    );
    let login = lab.postern(
        &[
            "login",
            "--addr",
            &format!("http://127.0.0.1:{API_PORT}"),
            "--user",
            "admin",
            "--password-stdin",
        ],
        Some(&format!("{}\n", password.expect("bootstrap password"))),
    );
    assert!(
        login.status.success(),
        "login: {}",
        String::from_utf8_lossy(&login.stderr)
    );

    // 1. Until `priv` is closed, `pub` reaches the target (the set-up works); once it is,
    //    the target answers inside `priv` only.
    let mut up = false;
    for _ in 0..50 {
        up = lab.echo_from(&lab.net.public, &target);
        if up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "before the firewall, pub reaches the echo target");
    lab.net
        .firewall(lab.dir.path())
        .unwrap_or_else(|e| panic!("cannot install the firewall of priv: {e}"));
    assert!(
        lab.echo_from(&lab.net.private, &target),
        "the echo target answers inside priv"
    );
    assert!(
        !lab.echo_from(&lab.net.public, &target),
        "the client's network must not reach the target directly"
    );

    let _ = lab.json(&[
        "targets",
        "create",
        "echo",
        "--type",
        "tcp",
        "--address",
        &target,
        "--worker-filter",
        "net=private",
    ]);
    let worker1 = lab.start_worker("w-priv-1").await;
    let client = lab.connect().expect("a session through the relay");
    let mut traffic = NsTraffic::start(&lab, client.port).await;
    assert!(traffic.alive());
    let session = lab.json(&["sessions", "show", &client.id]);
    assert_eq!(session["worker"], "w-priv-1");

    // 2. The worker stops: its session ends, and new authorizations say why.
    worker1.terminate();
    assert!(
        traffic.wait_cut(Duration::from_secs(10)).await.is_some(),
        "the stopped worker's session must end"
    );
    drop(client);
    let refused = lab.connect().expect_err("no worker left");
    assert!(
        refused.contains("no worker available for target 'echo'"),
        "unclear refusal: {refused}"
    );
    let _worker2 = lab.start_worker("w-priv-2").await;

    // 3. A cancel cuts the relayed connection, and the client says why.
    let client = lab
        .connect()
        .expect("service restored by the second worker");
    let traffic = NsTraffic::start(&lab, client.port).await;
    let id = client.id.clone();
    let t0 = Instant::now();
    let _ = lab.json(&["sessions", "cancel", &id]);
    let cut = traffic
        .wait_cut(CUT_BOUND * 5)
        .await
        .expect("the cancel cut the relayed connection");
    assert!(
        cut.duration_since(t0) < CUT_BOUND,
        "cut after {:?}",
        cut.duration_since(t0)
    );
    let row = lab.json(&["sessions", "show", &id]);
    assert_eq!(row["status"], "terminated");
    assert!(
        row["end_reason"]
            .as_str()
            .unwrap_or("")
            .contains("cancelled by admin"),
        "{row}"
    );
    let (code, said) = client
        .exited(Duration::from_secs(5))
        .expect("postern connect ends with its session");
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("session ended: cancelled by admin"),
        "the client must say why: {said}"
    );

    // ... and the worker fails closed: with the controller gone (and the relayed path with
    // it), the worker ends its sessions once its link has been down for the grace period,
    // and says so when a controller is back.
    let client = lab.connect().expect("another session");
    let mut traffic = NsTraffic::start(&lab, client.port).await;
    assert!(traffic.alive());
    drop(controller);
    assert!(
        traffic.wait_cut(Duration::from_secs(5)).await.is_some(),
        "the relayed path goes with its controller"
    );
    // The worker notices the loss within its control connection's 10 s idle timeout, then
    // waits out the 3 s grace period; the client's own timeout (30 s) comes later.
    tokio::time::sleep(Duration::from_secs(18)).await;
    let (_controller, _) = lab.controller();
    lab.connected("w-priv-2").await;
    let mut row = serde_json::Value::Null;
    for _ in 0..50 {
        row = lab.json(&["sessions", "show", &client.id]);
        if row["status"] == "terminated" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(row["status"], "terminated", "{row}");
    assert_eq!(row["end_reason"], "worker lost controller", "{row}");
    drop(client);
    // The restarted controller relays new sessions again.
    let client = lab.connect().expect("a session after the restart");
    let mut traffic = NsTraffic::start(&lab, client.port).await;
    assert!(traffic.alive());
}
