#!/usr/bin/env python3
"""Postern vs its peers on loopback: the orchestrator behind bench/run (see bench/README.md).

Starts the targets (echo, iperf3 server, PostgreSQL database `postern_bench`), the peers
(sshd + `ssh -L`, socat, rathole tls/noise/plain) and Postern (`postern dev` + `postern
connect`), runs every measurement ROUNDS times with the peers interleaved (the order rotates
each round), prints one table and writes bench/results.json. Standard library only.
"""

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
RUN = os.path.join(WORK, "run")
BIN = os.environ["BENCH_BIN_DIR"]
# bench/run points this at the profile-guided build (BENCH_PGO) or, for its training run, at
# the instrumented one; postern-bench always comes from the ordinary release build.
POSTERN = os.environ.get("BENCH_POSTERN") or os.path.join(BIN, "postern")
BUILD_NOTE = os.environ.get("BENCH_BUILD_NOTE", "")
TRAIN = os.environ.get("BENCH_TRAIN") == "1"
PBENCH = os.path.join(BIN, "postern-bench")
RATHOLE = os.environ.get("BENCH_RATHOLE", "")
RATHOLE_NOTE = os.environ.get("BENCH_RATHOLE_NOTE", "")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
IPERF_SECS = int(os.environ.get("BENCH_IPERF_SECS", "4"))
PGBENCH_SECS = int(os.environ.get("BENCH_PGBENCH_SECS", "4"))
CONNS = int(os.environ.get("BENCH_CONNS", "200"))
LOGINS = int(os.environ.get("BENCH_LOGINS", "5"))
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "20"))
REVOKES = int(os.environ.get("BENCH_REVOKES", "67"))
AUDIT_EVENTS = int(os.environ.get("BENCH_AUDIT_EVENTS", "50000"))
CPU_PINGS = int(os.environ.get("BENCH_CPU_PINGS", "10000"))
FLOOR_ROUND_TRIPS = int(os.environ.get("BENCH_FLOOR_ROUND_TRIPS", "50000"))
AUTHZ = int(os.environ.get("BENCH_AUTHZ", "2000"))
IDLE = int(os.environ.get("BENCH_IDLE_CONNS", "10000"))
PG_SCALE = int(os.environ.get("BENCH_PG_SCALE", "10"))
# Session lanes: `postern dev --session-lanes N` and a second set of tunnels through
# `postern connect --lanes N` (rows "Postern tcp, N lanes"); 1 leaves them out.
LANES = int(os.environ.get("BENCH_LANES", "2"))
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
# Set (and checked, with BENCH_ONLY) by bench/run, which then runs this script in a network
# namespace of its own whose loopback has this MTU: every tunnel, not only Postern's QUIC,
# crosses a path of that size.
PATH_MTU = int(os.environ.get("BENCH_PATH_MTU") or 0)
RESULTS = "results.json" if not PATH_MTU else f"results-mtu{PATH_MTU}.json"
PG_DB = "postern_bench"
CTL_DB = "postern_bench_controller"  # the second controller's store (authorizations)

PEERS = ["ssh", "ssh-aes128gcm", "socat", "rathole-tls", "rathole-noise", "rathole-plain"]
ENCRYPTED = ["ssh", "ssh-aes128gcm", "rathole-tls", "rathole-noise"]
LABELS = {
    "direct": "direct (no tunnel)",
    "ssh": "ssh -L (default: chacha20-poly1305)",
    "ssh-aes128gcm": "ssh -L -c aes128-gcm@openssh.com",
    "socat": "socat (plaintext, fork)",
    "rathole-tls": "rathole tls",
    "rathole-noise": "rathole noise",
    "rathole-plain": "rathole plain tcp",
    "postern": "Postern tcp (postern connect)",
    "postern-1500": "Postern tcp, QUIC packets capped for a 1500-byte path MTU",
    "postern-pg": "Postern postgres (wire proxy, statement audit on)",
    "postern-lanes": f"Postern tcp, {LANES} lanes (connect --lanes {LANES}, session_lanes "
                     f"{LANES})",
    "controller": "Postern controller (postern dev, SQLite)",
    "controller-pg": "Postern controller (postern dev --database-url, PostgreSQL)",
}

procs = []  # every process we started: stopped at exit
notes = []
failures = {}  # peer -> why it is missing


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(argv, name, env=None, stdout=None):
    logf = open(os.path.join(RUN, f"{name}.log"), "ab")
    p = subprocess.Popen(argv, stdout=stdout or logf, stderr=logf, stdin=subprocess.DEVNULL,
                         env=env, start_new_session=True)
    p.bench_name = name
    procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in procs:
        procs.remove(p)


def want(k):
    """Is measurement k part of this run (`BENCH_ONLY`)?"""
    return not ONLY or k in ONLY


def cleanup():
    for p in reversed(list(procs)):
        stop(p)
    if PATH_MTU:
        return  # the namespace reaches no PostgreSQL, and this run created no database
    try:
        for db in (PG_DB, CTL_DB):
            psql("DROP DATABASE IF EXISTS " + db, db="postgres", check=False)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def on_signal(signum, _frame):
    log(f"signal {signum}: stopping everything")
    cleanup()
    sys.exit(128 + signum)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_name} exited (code {proc.returncode}); see "
                               f"{RUN}/{proc.bench_name}.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(roots):
    """CPU seconds (user + system, reaped children included) of the process trees."""
    return sum(tree_cpu_split(roots))


def tree_cpu_split(roots):
    """(user, system) CPU seconds, reaped children included, of the process trees."""
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                txt = f.read()
        except OSError:
            continue
        rest = txt[txt.rfind(")") + 2:].split()
        # utime, stime, cutime, cstime
        f = [int(x) for x in rest[11:15]]
        stats[int(d)] = (int(rest[1]), f[0] + f[2], f[1] + f[3])
    children = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    user, system, stack, seen = 0, 0, list(roots), set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        user += stats[pid][1]
        system += stats[pid][2]
        stack += children.get(pid, [])
    return user / CLK_TCK, system / CLK_TCK


def run(argv, timeout, env=None, check=True):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()[-600:]}")
    return r


def psql(sql, db="postgres", check=True):
    return run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db,
                "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=120, check=check)


def echo_ok(port):
    """One round trip through port: is the tunnel up end to end?"""
    try:
        r = run([PBENCH, "connlat", "--addr", f"127.0.0.1:{port}", "--count", "1",
                 "--warmup", "0"], timeout=15)
        return r.returncode == 0
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def wait_echo(port, proc, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_name} exited; see {RUN}/{proc.bench_name}.log")
        if echo_ok(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no echo through 127.0.0.1:{port} after {timeout}s")


# ----------------------------------------------------------------------------------------
# Targets, peers and Postern


class Env:
    def __init__(self):
        self.tunnels = {}  # config -> {"iperf": port, "echo": port, "pg": port}
        self.echo_port = free_port()
        self.iperf_port = free_port()
        self.iperf = None
        self.postern_pid = None
        self.api = None
        self.token = None
        self.postern_env = None
        self.controllers = {}  # config ("controller", "controller-pg") -> (api, token)
        self.ssh_base = None
        self.roots = {"direct": []}  # config -> pids whose process trees carry its traffic

    # targets
    def start_targets(self):
        p = start([PBENCH, "echo", "--listen", f"127.0.0.1:{self.echo_port}"], "echo")
        wait_port(self.echo_port, p)
        self.start_iperf()
        self.tunnels["direct"] = {"iperf": self.iperf_port, "echo": self.echo_port, "pg": 5432}
        if not want("pg"):
            return
        log(f"PostgreSQL: database {PG_DB}, pgbench -i -s {PG_SCALE}")
        psql("DROP DATABASE IF EXISTS " + PG_DB)
        psql("CREATE DATABASE " + PG_DB)
        run(["pgbench", "-i", "-q", "-s", str(PG_SCALE), "-h", "127.0.0.1", "-p", "5432",
             "-U", "postgres", PG_DB], timeout=300)

    def start_iperf(self):
        if self.iperf is not None:
            stop(self.iperf)
        self.iperf = start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
                           "iperf3-server")
        wait_port(self.iperf_port, self.iperf)

    def forward_ports(self):
        return {"iperf": free_port(), "echo": free_port(), "pg": free_port()}

    def target_addr(self, key):
        return f"127.0.0.1:{self.tunnels['direct'][key]}"

    # ssh
    def start_ssh(self):
        d = os.path.join(RUN, "ssh")
        os.makedirs(d)
        for k in ("host_key", "client_key"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, k)], 30)
        shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
        port = free_port()
        cfg = os.path.join(d, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
AllowTcpForwarding yes
MaxStartups 100:30:200
LogLevel ERROR
""")
        os.makedirs("/run/sshd", exist_ok=True)
        p = start(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], "sshd")
        wait_port(port, p)
        sshd = p.pid
        opts = ["-F", "/dev/null", "-i", f"{d}/client_key", "-p", str(port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "LogLevel=ERROR"]
        self.ssh_opts = opts
        self.ssh_base = ["ssh"] + opts + ["root@127.0.0.1"]
        for name, extra in (("ssh", []), ("ssh-aes128gcm", ["-c", "aes128-gcm@openssh.com"])):
            ports = self.forward_ports()
            fwd = []
            for key, lp in ports.items():
                fwd += ["-L", f"127.0.0.1:{lp}:{self.target_addr(key)}"]
            p = start(["ssh"] + opts + extra + ["-N", "-o", "ExitOnForwardFailure=yes"] + fwd
                      + ["root@127.0.0.1"], name)
            wait_echo(ports["echo"], p)
            self.tunnels[name] = ports
            self.roots[name] = [p.pid, sshd]

    # socat
    def start_socat(self):
        ports = self.forward_ports()
        self.roots["socat"] = []
        for key, lp in ports.items():
            p = start(["socat", f"TCP-LISTEN:{lp},bind=127.0.0.1,reuseaddr,fork",
                       f"TCP:{self.target_addr(key)}"], f"socat-{key}")
            self.roots["socat"].append(p.pid)
            wait_port(lp, p)
        self.tunnels["socat"] = ports

    # rathole
    def start_rathole(self):
        d = os.path.join(RUN, "rathole")
        os.makedirs(d)
        keys = run([RATHOLE, "--genkey"], 30).stdout
        m = re.search(r"Private Key:\s*(\S+)\s*Public Key:\s*(\S+)", keys)
        if not m:
            raise RuntimeError(f"cannot parse `rathole --genkey`: {keys!r}")
        private, public = m.group(1), m.group(2)
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{d}/server.key", "-out", f"{d}/server.crt", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"], 30)
        run(["openssl", "pkcs12", "-export", "-out", f"{d}/identity.pfx", "-inkey",
             f"{d}/server.key", "-in", f"{d}/server.crt", "-passout", "pass:bench"], 30)
        for transport in ("tls", "noise", "plain"):
            name = f"rathole-{transport}"
            try:
                ports = self.forward_ports()
                ctrl = free_port()
                kind = "tcp" if transport == "plain" else transport
                server = [f'[server]\nbind_addr = "127.0.0.1:{ctrl}"\n',
                          f'[server.transport]\ntype = "{kind}"\n']
                client = [f'[client]\nremote_addr = "127.0.0.1:{ctrl}"\n',
                          f'[client.transport]\ntype = "{kind}"\n']
                if transport == "tls":
                    server.append(f'[server.transport.tls]\npkcs12 = "{d}/identity.pfx"\n'
                                  'pkcs12_password = "bench"\n')
                    client.append(f'[client.transport.tls]\ntrusted_root = "{d}/server.crt"\n'
                                  'hostname = "localhost"\n')
                if transport == "noise":
                    server.append(f'[server.transport.noise]\nlocal_private_key = "{private}"\n')
                    client.append(f'[client.transport.noise]\nremote_public_key = "{public}"\n')
                for key, lp in ports.items():
                    server.append(f'[server.services.{key}]\ntoken = "bench-{key}"\n'
                                  f'bind_addr = "127.0.0.1:{lp}"\n')
                    client.append(f'[client.services.{key}]\ntoken = "bench-{key}"\n'
                                  f'local_addr = "{self.target_addr(key)}"\n')
                for side, text in (("server", server), ("client", client)):
                    with open(f"{d}/{transport}-{side}.toml", "w") as f:
                        f.write("\n".join(text))
                env = dict(os.environ, RUST_LOG="warn")
                ps = start([RATHOLE, "--server", f"{d}/{transport}-server.toml"],
                           f"{name}-server", env=env)
                pc = start([RATHOLE, "--client", f"{d}/{transport}-client.toml"],
                           f"{name}-client", env=env)
                wait_echo(ports["echo"], pc)
                if ps.poll() is not None:
                    raise RuntimeError("server exited")
                self.tunnels[name] = ports
                self.roots[name] = [ps.pid, pc.pid]
            except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
                failures[name] = str(e)
                log(f"{name} unavailable: {e}")

    # Postern
    def start_dev(self, name, extra=()):
        """A `postern dev` in RUN/NAME; returns its process, API address, token and env."""
        d = os.path.join(RUN, name)
        os.makedirs(d)
        api_port = free_port()
        env = dict(os.environ, POSTERN_CONFIG_DIR=f"{d}/config", RUST_LOG="warn")
        out = open(os.path.join(RUN, f"{name}-dev.out"), "w+")
        p = start([POSTERN, "dev", "--data-dir", f"{d}/data", "--api-addr",
                   f"127.0.0.1:{api_port}", *extra], f"{name}-dev", env=env, stdout=out)
        deadline = time.time() + 120
        while True:
            out.seek(0)
            if "Ctrl-C" in out.read():
                break
            if p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"postern dev did not start; see {RUN}/{name}-dev.log")
            time.sleep(0.1)
        with open(f"{d}/config/profile.json") as f:
            prof = json.load(f)
        return p, prof["addr"], prof["token"], env

    def start_postern(self):
        lanes = ["--session-lanes", str(LANES)] if LANES > 1 else []
        p, self.api, self.token, env = self.start_dev("postern", lanes)
        self.postern_env = env
        self.postern_pid = p.pid
        self.controllers["controller"] = (self.api, self.token)
        for key in ("iperf", "echo", "pg"):
            run([POSTERN, "targets", "create", f"bench-{key}", "--type", "tcp", "--address",
                 self.target_addr(key)], 30, env=env)
        ports = self.forward_ports()
        self.roots["postern"] = [p.pid]
        for key, lp in ports.items():
            pc = start([POSTERN, "connect", f"bench-{key}", "--port", str(lp)],
                       f"postern-connect-{key}", env=env)
            self.roots["postern"].append(pc.pid)
            wait_port(lp, pc)
        wait_echo(ports["echo"], None)
        self.tunnels["postern"] = ports
        # The same, with the QUIC packet size capped for a 1500-byte path (the CLI advertises
        # the cap, so it binds both directions): loopback's 64 KiB MTU flatters UDP.
        lp = free_port()
        pc = start([POSTERN, "connect", "bench-iperf", "--port", str(lp)],
                   "postern-connect-iperf-1500",
                   env=dict(env, POSTERN_QUIC_MAX_UDP_PAYLOAD="1452"))
        self.roots["postern-1500"] = [p.pid, pc.pid]
        wait_port(lp, pc)
        self.tunnels["postern-1500"] = {"iperf": lp}
        # The `postgres` protocol: the worker terminates the wire protocol, logs in with the
        # brokered credential and audits every statement. (The local server trusts, so the
        # stored password is never checked; the statement path is what is measured.)
        run([POSTERN, "targets", "create", "bench-pgproxy", "--type", "postgres", "--address",
             self.target_addr("pg")], 30, env=env)
        r = subprocess.run([POSTERN, "credentials", "set", "bench-pgproxy", "--username",
                            "postgres", "--password-stdin"], input="bench-password\n",
                           capture_output=True, text=True, env=env, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"credentials set failed: {r.stderr}")
        lp = free_port()
        pc = start([POSTERN, "connect", "bench-pgproxy", "--port", str(lp)],
                   "postern-connect-pgproxy", env=env)
        self.roots["postern-pg"] = [p.pid, pc.pid]
        wait_port(lp, pc)
        self.tunnels["postern-pg"] = {"pg": lp}
        # A session spread over LANES connections, each on a thread of its own at both ends
        # (the worker's session lanes share its port): several CPUs for one session.
        if LANES > 1:
            ports = {"iperf": free_port(), "pg": free_port()}
            self.roots["postern-lanes"] = [p.pid]
            for key, lp in ports.items():
                pc = start([POSTERN, "connect", f"bench-{key}", "--port", str(lp), "--lanes",
                            str(LANES)], f"postern-connect-{key}-lanes", env=env)
                self.roots["postern-lanes"].append(pc.pid)
                wait_port(lp, pc)
            self.tunnels["postern-lanes"] = ports

    def start_postern_pg_controller(self):
        """A second `postern dev` whose controller keeps its state in PostgreSQL (a fresh
        database), with the echo target: what authorizations cost on that store."""
        psql("DROP DATABASE IF EXISTS " + CTL_DB)
        psql("CREATE DATABASE " + CTL_DB)
        _, api, token, env = self.start_dev(
            "postern-pgstore",
            ["--database-url", f"postgres://postgres@127.0.0.1:5432/{CTL_DB}"])
        run([POSTERN, "targets", "create", "bench-echo", "--type", "tcp", "--address",
             self.target_addr("echo")], 30, env=env)
        self.controllers["controller-pg"] = (api, token)

    def bench_env(self, token=None):
        return dict(os.environ, POSTERN_BENCH_TOKEN=token or self.token)

    def api_args(self, target, api=None):
        return ["--api", api or self.api, "--target", target]


# ----------------------------------------------------------------------------------------
# Measurements


class Results:
    def __init__(self):
        self.rows = {}  # (group, config) -> list of samples

    def add(self, group, config, value):
        if value is not None:
            self.rows.setdefault((group, config), []).append(value)


GROUPS = [
    # key, title, unit, higher is better
    ("tput1", f"Bulk throughput, 1 TCP connection (iperf3 -t {IPERF_SECS} -O 1, upload)",
     "Gbit/s", True),
    ("tput4", f"Bulk throughput, 4 parallel connections (iperf3 -P 4 -t {IPERF_SECS} -O 1)",
     "Gbit/s", True),
    ("connlat", f"New connection inside an existing tunnel: connect() to first echoed byte "
                f"(median of {CONNS} per round)", "ms", False),
    ("rtt", "One-byte echo round trip inside an established connection (median of 200)", "ms",
     False),
    ("session", "New session / login, to first byte (median per round)", "ms", False),
    ("pgS", f"pgbench -S -c 4 -j 2 -T {PGBENCH_SECS} (select-only, scale {PG_SCALE})", "TPS",
     True),
    ("pgSC", f"pgbench -S -C -c 4 -j 2 -T {PGBENCH_SECS} (new connection per transaction)",
     "TPS", True),
    ("authz", f"Controller authorizations ({AUTHZ} calls, 8 concurrent clients)",
     "per s", True),
    ("idle", f"{IDLE} concurrent idle connections through one worker (postern dev process)",
     "", False),
]


def order(configs, rnd):
    k = rnd % len(configs)
    return configs[k:] + configs[:k]


def iperf(env, config, parallel):
    port = env.tunnels[config]["iperf"]
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(IPERF_SECS), "-O", "1", "-J"]
    if parallel > 1:
        argv += ["-P", str(parallel)]
    roots = env.roots.get(config, [])
    for attempt in range(2):
        try:
            cpu0 = tree_cpu(roots)
            r = run(argv, timeout=IPERF_SECS + 30, check=False)
            cpu = tree_cpu(roots) - cpu0
            data = json.loads(r.stdout) if r.stdout.strip() else {}
            if "error" in data or r.returncode != 0:
                raise RuntimeError(data.get("error") or r.stderr.strip()[-300:])
            moved = sum(i["sum"]["bytes"] for i in data["intervals"]) / 1e9
            per_gb = cpu / moved if roots and moved else None
            return data["end"]["sum_received"]["bits_per_second"] / 1e9, per_gb
        except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            log(f"iperf3 via {config} failed ({e}); restarting the iperf3 server")
            env.start_iperf()
    return None, None


def pgbench(env, config, connect_each):
    port = env.tunnels[config]["pg"]
    argv = ["pgbench", "-n", "-S", "-c", "4", "-j", "2", "-T", str(PGBENCH_SECS), "-h",
            "127.0.0.1", "-p", str(port), "-U", "postgres", PG_DB]
    if connect_each:
        argv.insert(2, "-C")
    try:
        r = run(argv, timeout=PGBENCH_SECS + 60)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"pgbench via {config} failed: {e}")
        return None
    m = re.search(r"tps = ([0-9.]+)", r.stdout)
    return float(m.group(1)) if m else None


def connlat(env, config):
    port = env.tunnels[config]["echo"]
    try:
        r = run([PBENCH, "connlat", "--addr", f"127.0.0.1:{port}", "--count", str(CONNS),
                 "--warmup", "20", "--pings", "200"], timeout=120)
        d = json.loads(r.stdout)
        return d["median"], d["ping"]["median"]
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        log(f"connlat via {config} failed: {e}")
        return None, None


def rtt_cpu(env, config):
    """The tunnel's (user, system) CPU per one-byte echo round trip, µs: CPU_PINGS echoes on
    one connection, the tunnel's process trees read around them."""
    roots = env.roots.get(config)
    if not roots or CPU_PINGS <= 0:
        return None, None
    port = env.tunnels[config]["echo"]
    try:
        u0, s0 = tree_cpu_split(roots)
        run([PBENCH, "connlat", "--addr", f"127.0.0.1:{port}", "--count", "1", "--warmup", "0",
             "--pings", str(CPU_PINGS)], timeout=300)
        u1, s1 = tree_cpu_split(roots)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"echo CPU via {config} failed: {e}")
        return None, None
    return (u1 - u0) * 1e6 / CPU_PINGS, (s1 - s0) * 1e6 / CPU_PINGS


def wall(argv, n, env=None):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        run(argv, timeout=30, env=env)
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def measure_sessions(env, res):
    """Postern: a whole new session in-process and via the CLI; ssh: a full login."""
    try:
        r = run([PBENCH, "session", *env.api_args("bench-echo"), "--count", str(SESSIONS)],
                timeout=120, env=env.bench_env())
        s = json.loads(r.stdout)
        res.add("session", "postern-session", s["total"]["median"])
        res.add("session", "postern-session-cold", s["cold_total"]["median"])
        for phase in ("keygen", "authorize", "handshake", "first_byte", "stream_open",
                      "stream_first_echo"):
            res.add("session-phase", phase, s[phase]["median"])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
        log(f"postern session bench failed: {e}")
    try:
        res.add("session", "postern-cli", wall(
            [POSTERN, "connect", "bench-echo", "--", PBENCH, "connlat", "--addr",
             "127.0.0.1:{port}", "--count", "1", "--warmup", "0"], LOGINS, env=env.postern_env))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"postern connect -- CMD failed: {e}")
    if env.ssh_base is None:
        return  # the training run (BENCH_TRAIN) starts no peers
    try:
        res.add("session", "ssh-login", wall(env.ssh_base + ["true"], LOGINS))
        proxy = " ".join(["ssh"] + env.ssh_opts + ["-W", "%h:%p", "root@127.0.0.1"])
        res.add("session", "ssh-bastion", wall(
            ["ssh"] + env.ssh_opts + ["-o", f"ProxyCommand={proxy}", "root@127.0.0.1", "true"],
            LOGINS))
    except (RuntimeError, subprocess.TimeoutExpired, TypeError) as e:
        log(f"ssh login failed: {e}")


def measure_authz(env, res, rnd):
    for config, (api, token) in order(list(env.controllers.items()), rnd):
        try:
            r = run([PBENCH, "authz", *env.api_args("bench-echo", api), "--count", str(AUTHZ),
                     "--concurrency", "8"], timeout=300, env=env.bench_env(token))
            a = json.loads(r.stdout)
            res.add("authz", config, a["per_sec"])
            res.add("authz-latency", config, a["latency"]["median"])
            if a["errors"]:
                notes.append(f"authz ({config}): {a['errors']} errors in a round")
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            log(f"authz bench ({config}) failed: {e}")


def measure_audit(res):
    """Audit appends through the controller's writer, chain on, SQLite and PostgreSQL."""
    for backend in ("sqlite", "postgres"):
        r = run([PBENCH, "audit", "--backend", backend, "--events", str(AUDIT_EVENTS)],
                timeout=600, check=False)
        try:
            res.add("audit", backend, json.loads(r.stdout)["events_per_sec"])
        except (ValueError, KeyError):
            failures[f"audit-{backend}"] = (r.stderr or r.stdout).strip()[-300:]


def measure_floor(res):
    """quinn-proto alone, in memory: each end's time in it per small round trip."""
    r = run([PBENCH, "--threads", "1", "quic-floor", "--round-trips", str(FLOOR_ROUND_TRIPS)],
            timeout=300, check=False)
    try:
        f = json.loads(r.stdout.strip().splitlines()[-1])
        res.add("floor", "client", f["client_us_per_round_trip"])
        res.add("floor", "worker", f["worker_us_per_round_trip"])
    except (ValueError, KeyError, IndexError):
        failures["quic-floor"] = (r.stderr or r.stdout).strip()[-300:]


def measure_revoke(env, res):
    try:
        r = run([PBENCH, "revoke", *env.api_args("bench-echo"), "--count", str(REVOKES)],
                timeout=180, env=env.bench_env())
        d = json.loads(r.stdout)
        res.add("revoke-p50", "postern", d["cut"]["median"])
        res.add("revoke-p99", "postern", d["cut"]["p99"])
        res.add("revoke-api", "postern", d["api"]["median"])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        log(f"revocation bench failed: {e}")
        notes.append(f"revocation latency failed: {str(e)[:200]}")


def measure_idle(env):
    try:
        r = run([PBENCH, "idle", *env.api_args("bench-echo"), "--conns", str(IDLE),
                 "--pid", str(env.postern_pid)], timeout=300, env=env.bench_env())
        return json.loads(r.stdout)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
        log(f"idle bench failed: {e}")
        return {"error": str(e)}


# ----------------------------------------------------------------------------------------
# Report


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return f"{v:,.0f}"


def summarize(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


SESSION_LABELS = {
    "postern-session": "Postern new session (in-process: key+authorize+QUIC+first byte)",
    "postern-session-cold": "Postern new session, no worker hint (first session to a target)",
    "postern-cli": "Postern `postern connect T -- CMD` wall time (process+session+close)",
    "ssh-login": "ssh login, `ssh host true` wall time (direct to sshd)",
    "ssh-bastion": "ssh login through a bastion (ProxyCommand ssh -W), `true`",
}


def report(env, res, idle, elapsed):
    out = {"meta": {"rounds": ROUNDS, "iperf_secs": IPERF_SECS, "pgbench_secs": PGBENCH_SECS,
                    "path_mtu": PATH_MTU or None,
                    "conns_per_round": CONNS, "pg_scale": PG_SCALE, "elapsed_secs": elapsed,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename,
                    "nproc": os.cpu_count(), "postern_build": BUILD_NOTE or None},
           "groups": {}, "targets": [], "notes": notes, "unavailable": failures}
    lines = []
    w = 66

    def best_peer(gkey, higher):
        vals = {c: statistics.median(s) for (g, c), s in res.rows.items()
                if g == gkey and c in PEERS + ["ssh-login", "ssh-bastion"]}
        if not vals:
            return None, None
        c = (max if higher else min)(vals, key=vals.get)
        return c, vals[c]

    med = {}
    for gkey, title, unit, higher in GROUPS:
        if gkey == "idle":
            continue
        rows = [(c, s) for (g, c), s in res.rows.items() if g == gkey]
        if not rows:
            continue
        bc, bv = best_peer(gkey, higher)
        lines.append("")
        lines.append(f"{title}  [{unit}, {'higher' if higher else 'lower'} is better]")
        cpu_col = gkey in ("tput1", "tput4")
        rtt_col = gkey == "rtt"
        lines.append(f"  {'':{w}} {'median':>10} {'min–max':>19} {'× best peer':>12}"
                     + (f" {'CPU s/GB':>9}" if cpu_col else "")
                     + (f" {'CPU µs user+sys':>16}" if rtt_col else ""))
        grp = {"unit": unit, "higher_is_better": higher, "best_peer": bc, "rows": {}}
        for c, s in rows:
            sm = summarize(s)
            med[(gkey, c)] = sm["median"]
            ratio = sm["median"] / bv if bv else None
            sm["ratio_to_best_peer"] = ratio
            grp["rows"][c] = sm
            label = LABELS.get(c) or SESSION_LABELS.get(c) or c
            mark = " *" if c == bc else ""
            rng = f"{fmt(sm['min'], unit)}–{fmt(sm['max'], unit)}"
            extra = ""
            if cpu_col:
                cpu = res.rows.get((gkey + "-cpu", c))
                sm["tunnel_cpu_s_per_gb"] = statistics.median(cpu) if cpu else None
                extra = f" {(f'{statistics.median(cpu):.2f}' if cpu else '-'):>9}"
            if rtt_col:
                user = res.rows.get(("rtt-cpu-user", c))
                system = res.rows.get(("rtt-cpu-sys", c))
                if user and system:
                    sm["tunnel_cpu_us_per_round_trip"] = {"user": statistics.median(user),
                                                          "system": statistics.median(system)}
                    cell = f"{statistics.median(user):.1f}+{statistics.median(system):.1f}"
                else:
                    cell = "-"
                extra = f" {cell:>16}"
            lines.append(f"  {label[:w]:{w}} {fmt(sm['median'], unit):>10} {rng:>19} "
                         f"{(f'{ratio:.2f}' if ratio else '-'):>12}{extra}{mark}")
        if gkey == "session":
            ph = {c: statistics.median(s) for (g, c), s in res.rows.items()
                  if g == "session-phase"}
            if ph:
                lines.append("    Postern session phases (median ms): " + ", ".join(
                    f"{k} {v:.2f}" for k, v in ph.items()))
                lines.append("    (phases of the hinted sessions: the handshake overlaps authorize, so "
                             "'handshake' is what is left of it after the answer)")
                lines.append("    (stream_open = ConnOpen → worker dials → ConnOk and "
                             "stream_first_echo = the first echo after it, in-process on one "
                             "session, 200 each)")
                grp["postern_phases_ms"] = ph
        if gkey == "authz":
            lat = {c: statistics.median(s) for (g, c), s in res.rows.items()
                   if g == "authz-latency"}
            if lat:
                lines.append("    per-call latency (median of round medians): " + ", ".join(
                    f"{'PostgreSQL' if c == 'controller-pg' else 'SQLite'} {v:.2f} ms"
                    for c, v in lat.items()))
        out["groups"][gkey] = grp
    # idle
    lines.append("")
    lines.append(GROUPS[-1][1])
    if idle and "error" not in idle:
        per = idle["rss_per_conn_bytes"] / 1024
        lines.append(f"  RSS per connection {per:.1f} KiB (RSS {idle['rss_before_kib'] / 1024:.0f}"
                     f" -> {idle['rss_open_kib'] / 1024:.0f} MiB for "
                     f"{idle['measured_conns']} connections; fds {idle['fds_before']} -> "
                     f"{idle['fds_open']}); alive after {5} s hold: {idle['alive']}/"
                     f"{idle['conns']}; opened in {idle['open_secs']:.1f} s")
    else:
        lines.append(f"  failed: {idle.get('error')}" if idle else "  not run")
    out["groups"]["idle"] = idle
    lines.append("")
    rv = {g: s for (g, c), s in res.rows.items() if g.startswith("revoke-")}
    if rv.get("revoke-p50"):
        p50, p99 = statistics.median(rv["revoke-p50"]), max(rv["revoke-p99"])
        lines.append(f"Revocation latency (POST /v1/sessions/ID/cancel → the client's open "
                     f"connection cut; {REVOKES} per round): p50 {p50:.2f} ms (rounds "
                     f"{min(rv['revoke-p50']):.2f}–{max(rv['revoke-p50']):.2f}), p99 "
                     f"{p99:.2f} ms (worst round); the API call itself answers in "
                     f"{statistics.median(rv['revoke-api']):.2f} ms")
        out["groups"]["revoke"] = {"p50_ms": p50, "p99_ms": p99,
                                   "rounds": {k: v for k, v in rv.items()}}
    else:
        lines.append("Revocation latency p50/p99: not measured")
    aud = {c: statistics.median(s) for (g, c), s in res.rows.items() if g == "audit"}
    if aud:
        lines.append("Audit append throughput, hash chain on (events/s, 64 concurrent "
                     "writers, group commit): " + ", ".join(f"{c} {v:,.0f}" for c, v in aud.items()))
        out["groups"]["audit"] = aud
    fl = {c: statistics.median(s) for (g, c), s in res.rows.items() if g == "floor"}
    if fl:
        lines.append(f"quinn-proto alone, per 70-byte request and 110-byte answer (in memory: both "
                     f"ends on one thread, the session's TLS suite and transports, no sockets, "
                     f"runtime or relay; {FLOOR_ROUND_TRIPS:,} round trips): client "
                     f"{fl['client']:.2f} µs, worker {fl['worker']:.2f} µs of CPU per round trip")
        out["groups"]["quic_floor_us"] = fl

    # targets
    def m(g, c):
        return med.get((g, c))

    targets = []

    def target(text, ok, detail):
        targets.append({"target": text, "met": ok, "detail": detail})

    rows = list(itertools.product((("tput1", "1 conn"), ("tput4", "4 conns")),
                                  ("postern",) if PATH_MTU else ("postern", "postern-1500")))
    if LANES > 1:
        rows.append((("tput4", "4 conns"), "postern-lanes"))
    for (g, label), pc in rows:
        p = m(g, pc)
        if pc == "postern-lanes":
            label += f", {LANES} lanes"
        if PATH_MTU:
            label += f", every tunnel on a {PATH_MTU}-byte path"
        elif pc == "postern-1500":
            label += ", 1500-byte path"
        for c, factor in (("ssh", 1.5), ("ssh-aes128gcm", 1.0), ("rathole-tls", 1.0),
                          ("rathole-noise", 1.0)):
            v = m(g, c)
            if p is None or v is None:
                target(f"throughput ({label}) ≥ {factor}× {LABELS[c]}", None, "missing figure")
                continue
            strict = c.startswith("rathole")
            ok = p > v if strict else p >= factor * v
            target(f"throughput ({label}) {'>' if strict else '≥ ' + str(factor) + '×'} "
                   f"{LABELS[c]}", ok, f"{p:.2f} vs {v:.2f} Gbit/s ({p / v:.2f}×)")
    enc = {c: m("connlat", c) for c in ENCRYPTED if m("connlat", c) is not None}
    p = m("connlat", "postern")
    if enc and p is not None:
        bc = min(enc, key=enc.get)
        target("new connection in a session ≤ best encrypted peer", p <= enc[bc],
               f"{p:.3f} ms vs {enc[bc]:.3f} ms ({LABELS[bc]})")
    p, v = m("pgSC", "postern"), m("pgSC", "socat")
    if p is not None and v is not None:
        target("pgbench -S -C through Postern ≥ socat", p >= v, f"{p:.0f} vs {v:.0f} TPS")
    p = m("session", "postern-session")
    if p is not None:
        target("whole new session < 5 ms", p < 5.0,
               f"{p:.2f} ms (in-process, median; worker dialled during authorize)")
    p = m("session", "postern-session-cold")
    if p is not None:
        target("whole new session < 5 ms, first session to a target", p < 5.0,
               f"{p:.2f} ms (in-process, median; worker dialled after authorize)")
    for pc, label in (("postern", "Postern tcp"),
                      ("postern-lanes", f"Postern tcp, {LANES} lanes")):
        p = m("pgS", pc)
        for c in ("ssh", "ssh-aes128gcm", "rathole-tls", "rathole-noise"):
            v = m("pgS", c)
            if p is not None and v is not None:
                target(f"pgbench -S through {label} > {LABELS[c]}", p > v,
                       f"{p:.0f} vs {v:.0f} TPS")
    if idle and "error" not in idle:
        per = idle["rss_per_conn_bytes"] / 1024
        target(f"{IDLE} idle connections, < 32 KiB RSS each, all up",
               per < 32 and idle["alive"] == idle["conns"],
               f"{per:.1f} KiB each, {idle['alive']}/{idle['conns']} up")
    p = m("authz", "controller")
    if p is not None:
        target("≥ 1,000 authorizations/s on SQLite", p >= 1000, f"{p:,.0f}/s")
    p = m("pgS", "postern-pg")
    for c in ("ssh", "ssh-aes128gcm", "rathole-tls", "rathole-noise"):
        v = m("pgS", c)
        if p is not None and v is not None:
            target(f"pgbench -S through Postern postgres > {LABELS[c]}", p > v,
                   f"{p:.0f} vs {v:.0f} TPS (direct {m('pgS', 'direct') or 0:.0f})")
    for c, v in aud.items():
        if c == "sqlite":
            target("audit append ≥ 20,000 events/s on SQLite", v >= 20000, f"{v:,.0f}/s")
    if rv.get("revoke-p50"):
        target("revocation latency p50/p99 (no target set in the issue)", None,
               f"{statistics.median(rv['revoke-p50']):.2f} / {max(rv['revoke-p99']):.2f} ms")
    out["targets"] = targets
    lines.append("")
    lines.append("Targets (issue 10):")
    for t in targets:
        state = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        lines.append(f"  [{state}] {t['target']}: {t['detail']}")
    if failures:
        lines.append("")
        for k, v in failures.items():
            lines.append(f"Unavailable: {k}: {v}")
    for n in notes:
        lines.append(f"Note: {n}")
    lines.append("")
    lines.append("CPU s/GB: CPU seconds used by the tunnel's own processes (ssh + sshd, socat, "
                 "rathole server + client, postern dev + postern connect) per GB moved; the "
                 "2 cores are shared by sender, tunnel and receiver, so this is the cost that "
                 "caps throughput here.")
    if CPU_PINGS > 0:
        lines.append(f"CPU µs user+sys (echo round trip): the same processes' user and system "
                     f"CPU per one-byte echo, over {CPU_PINGS:,} echoes on one connection "
                     f"(both ends of the tunnel together; clock ticks of 10 ms).")
    lines.append(f"* = best peer (ssh, socat, rathole; direct and Postern excluded). Rounds: "
                 f"{ROUNDS}, peers interleaved (order rotated each round); min–max over "
                 f"rounds. Total time {elapsed / 60:.1f} min. JSON: bench/{RESULTS}")
    header = (f"Postern benchmark — {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
              f"loopback" + (f" of MTU {PATH_MTU} (a network namespace)" if PATH_MTU else ""))
    print("\n" + header + "\n" + "=" * len(header) + "\n".join(lines))
    with open(os.path.join(HERE, RESULTS), "w") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------


def train():
    """BENCH_TRAIN=1, bench/run's training run before the profile-guided build: Postern alone
    (no peers), one short round of each measurement that goes through the `postern` binary,
    nothing reported. The instrumented `postern` processes write their profiles as they exit
    (SIGTERM at the end)."""
    env = Env()
    res = Results()
    log("training: targets, postern dev (SQLite and PostgreSQL stores), postern connect")
    env.start_targets()
    env.start_postern()
    env.start_postern_pg_controller()
    failed = []

    def check(what, value):
        if value is None or value == (None, None):
            failed.append(what)

    log("training: new connections and echoes")
    check("connlat", connlat(env, "postern"))
    check("echo CPU", rtt_cpu(env, "postern"))
    log("training: new sessions")
    measure_sessions(env, res)
    log("training: bulk, default and 1500-byte packets, 1 and 4 connections")
    for c in ("postern", "postern-1500"):
        for n in (1, 4):
            check(f"iperf3 -P {n} via {c}", iperf(env, c, n))
    log("training: pgbench -S, tcp and postgres, with and without -C")
    for c in ("postern", "postern-pg") + (("postern-lanes",) if LANES > 1 else ()):
        for each in (False, True):
            check(f"pgbench{' -C' if each else ''} via {c}", pgbench(env, c, each))
    log("training: authorizations and revocations")
    measure_authz(env, res, 0)
    measure_revoke(env, res)
    for group in ("session", "authz", "revoke-p50"):
        if not any(g == group for g, _ in res.rows):
            failed.append(group)
    if failed:
        raise RuntimeError(f"training run: these failed (see bench/work/run/): {failed}")
    log("training: done; stopping Postern (each process writes its profile as it exits)")


def main():
    t0 = time.time()
    shutil.rmtree(RUN, ignore_errors=True)
    os.makedirs(RUN)
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if TRAIN:
        train()
        return
    if BUILD_NOTE:
        notes.append(BUILD_NOTE)
    env = Env()
    res = Results()
    log("starting targets (echo, iperf3, PostgreSQL)")
    env.start_targets()
    log("starting sshd and ssh -L tunnels")
    env.start_ssh()
    log("starting socat")
    env.start_socat()
    if RATHOLE:
        if RATHOLE_NOTE:
            notes.append(f"rathole: {RATHOLE_NOTE}")
        log("starting rathole (tls, noise, plain)")
        env.start_rathole()
    else:
        for t in ("tls", "noise", "plain"):
            failures[f"rathole-{t}"] = RATHOLE_NOTE or "rathole not installed"
    log("starting Postern (postern dev, postern connect)")
    env.start_postern()
    if want("authz"):
        log("starting a second postern dev on PostgreSQL (authorizations)")
        try:
            env.start_postern_pg_controller()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failures["controller-pg"] = str(e)[-300:]

    configs = ["direct"] + [c for c in PEERS if c in env.tunnels] + ["postern"]

    for rnd in range(ROUNDS):
        log(f"round {rnd + 1}/{ROUNDS}")
        if want("connlat"):
            for c in order(configs, rnd):
                first, rtt = connlat(env, c)
                res.add("connlat", c, first)
                res.add("rtt", c, rtt)
                user, system = rtt_cpu(env, c)
                res.add("rtt-cpu-user", c, user)
                res.add("rtt-cpu-sys", c, system)
        if want("session"):
            measure_sessions(env, res)
        if want("tput"):
            # On a path of PATH_MTU, Postern's own row is the capped one.
            lanes = ["postern-lanes"] if "postern-lanes" in env.tunnels else []
            for c in order(configs + ([] if PATH_MTU else ["postern-1500"]) + lanes, rnd):
                for g, n in (("tput1", 1), ("tput4", 4)):
                    gbps, per_gb = iperf(env, c, n)
                    res.add(g, c, gbps)
                    res.add(g + "-cpu", c, per_gb)
        if want("pg"):
            lanes = ["postern-lanes"] if "postern-lanes" in env.tunnels else []
            for c in order(configs + ["postern-pg"] + lanes, rnd):
                res.add("pgS", c, pgbench(env, c, False))
                res.add("pgSC", c, pgbench(env, c, True))
        if want("authz"):
            measure_authz(env, res, rnd)
        if want("revoke"):
            measure_revoke(env, res)
        if want("audit"):
            measure_audit(res)
        if want("floor"):
            measure_floor(res)
    idle = None
    if want("idle") and IDLE > 0:
        log(f"idle scale: {IDLE} connections")
        idle = measure_idle(env)
    if PATH_MTU:
        notes.append(
            f"Path MTU: every process ran in a network namespace whose loopback has MTU "
            f"{PATH_MTU}: TCP tunnels send segments of that size (the kernel's segmentation "
            f"offload still hands them 64 KiB at a time, as a NIC's would), and Postern's MTU "
            f"discovery stops at it.")
    else:
        notes.append(
            "QUIC packet size: 'Postern tcp' lets MTU discovery climb to the loopback route's "
            "MTU (64 KiB), as it would to 9,000 on a jumbo-frame network; the '1500-byte path' "
            "row caps the UDP payload at 1452 B (POSTERN_QUIC_MAX_UDP_PAYLOAD=1452), what an "
            "Ethernet path between hosts allows, while the peers' rows keep 64 KiB (for every "
            "tunnel on a 1500-byte path: BENCH_PATH_MTU=1500 bench/run).")
    report(env, res, idle, time.time() - t0)


if __name__ == "__main__":
    main()
