"""
relaygw's benchmark: relaygw as it ships against a throwaway Postfix doing
the same work, measured in the same run.  Loopback only; every load is
bounded by a message count and a time limit.

    .venv/bin/python -m bench.run            # the matrix (about 15-20 minutes)
    .venv/bin/python -m bench.run --quick    # 4 KB, 100 sessions, one run of each
    .venv/bin/python -m bench.run --quick --compare /tmp/base:before   # A/B against another source tree

relaygw runs on its shipped defaults plus `[process] workers` = the number
of cores (and what a cell needs: a smarthost, the trusted peer for XCLIENT,
the PROXY listener settings, a certificate); Postfix on its defaults plus the
same.  Each cell's ratio is against Postfix doing the same work (plain,
XCLIENT, PROXY or STARTTLS) in the same run, the runs of the two
interleaved.

Needs Postfix's smtp-source and smtp-sink (Debian package postfix; `make
bench` installs it) and a C compiler with OpenSSL's headers for
bench/smtpload.c (otherwise bench/loadgen.py, which costs more CPU per
message than the servers it measures).  Writes the table to stdout and,
with --write, to bench/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
SOURCE = "/usr/sbin/smtp-source"
SINK = "/usr/sbin/smtp-sink"
#: relaygw worker processes ([process] workers); --workers sets it (default: one per core).
WORKERS = os.cpu_count() or 1
#: How long the recovery measurement waits for the spool to empty.
RECOVERY_WAIT = 600
#: The compiled bench/smtpload.c (None: use bench/loadgen.py).
SMTPLOAD = None

sys.path.insert(0, ROOT)
from relaygw.testing import PostfixInstance, configText, freePort, waitForPort  # noqa: E402
from relaygw.workers import twistdArgv  # noqa: E402
from relaygw.tls import generateSelfSigned  # noqa: E402
from relaygw.testing import postfix as _postfix  # noqa: E402

# Postfix's STARTTLS needs its TLS session cache and entropy manager
# (PostfixInstance reads its master.cf template from its own module at each start).
if "tlsmgr" not in _postfix.POSTFIX_MASTER_CF:
    _postfix.POSTFIX_MASTER_CF += "tlsmgr    unix  -  -  n  1000? 1  tlsmgr\n"

#: What each cell's configuration adds to the shipped defaults, as RESULTS.md states it.
RELAYGW_CONFIG = {
    "plain": "defaults + workers={w}",
    "xclient": "defaults + workers={w}, trusted_peers, extensions=[xclient]",
    "proxy": "defaults + workers={w}, proxy_protocol, proxy_trusted",
    "tls": "defaults + workers={w}, tls_self_signed certificate ({cert})",
    "tlsr": "defaults + workers={w}, tls_self_signed certificate ({cert})",
}
POSTFIX_CONFIG = {
    "plain": "defaults + smtpd_peername_lookup=no",
    "xclient": "defaults + smtpd_peername_lookup=no, smtpd_authorized_xclient_hosts",
    "proxy": "defaults + smtpd_peername_lookup=no, smtpd_upstream_proxy_protocol=haproxy",
    "tls": "defaults + smtpd_peername_lookup=no, smtpd_tls_security_level=may, the same certificate",
    "tlsr": "defaults + smtpd_peername_lookup=no, smtpd_tls_security_level=may, the same certificate",
}


def raiseFileLimit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def processTree(pid):
    """C{pid} and its descendants (a gateway with workers is several processes)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in os.listdir("/proc/%d/task" % pids[i]) if os.path.isdir("/proc/%d/task" % pids[i]) else ():
            try:
                with open("/proc/%d/task/%s/children" % (pids[i], task)) as f:
                    pids.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        i += 1
    return pids


def settled(pid, timeout=30):
    """Wait until all of the gateway's worker processes are up and their memory is steady."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = (len(processTree(pid)), procStats(pid)[2])
        if now[0] >= WORKERS and now == last:
            return
        last = now
        time.sleep(0.5)


def procStats(pid):
    """(cpu seconds, peak RSS KB, current RSS KB) of a process and its children, summed."""
    cpu = hwm = rss = 0
    for p in processTree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime + stime, plus the children's that have been waited for
            # (Postfix's short-lived cleanup and smtpd processes).
            cpu += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:  # a process that just ended
            pass
    return cpu, hwm, rss


class Process:
    """A server started for one measurement, stopped by pid afterwards."""

    def __init__(self, argv, cwd, port, env=None, stdout=None):
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if stdout else out,
                                     env=env, preexec_fn=raiseFileLimit)
        if stdout:
            out.close()
        waitForPort(port, timeout=30)
        self.pid = self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Certificate:
    """The bench's certificate: what relaygw's tls_self_signed generates, shared with Postfix."""

    path = key = None

    rsa = False

    @classmethod
    def files(cls):
        if cls.path is None:
            d = tempfile.mkdtemp(prefix="rgb-tls-")
            LEFT.append(d)
            cls.path, cls.key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            generateSelfSigned(cls.path, cls.key, "relay.bench")
            if cls.rsa:  # what relaygw generated before it chose ECDSA P-256, for A/B runs
                cls._rsa()
        return cls.path, cls.key

    @classmethod
    def _rsa(cls):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        with open(cls.path, "rb") as f:
            old = x509.load_pem_x509_certificate(f.read())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer) \
            .public_key(key.public_key()).serial_number(old.serial_number) \
            .not_valid_before(old.not_valid_before_utc).not_valid_after(old.not_valid_after_utc)
        for ext in old.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        with open(cls.path, "wb") as f:
            f.write(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        with open(cls.key, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    @classmethod
    def describe(cls):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        with open(cls.files()[0], "rb") as f:
            key = x509.load_pem_x509_certificate(f.read()).public_key()
        if isinstance(key, rsa.RSAPublicKey):
            return "RSA %d" % key.key_size
        if isinstance(key, ec.EllipticCurvePublicKey):
            return "ECDSA %s" % {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name, key.curve.name)
        return type(key).__name__


def relaygw(directory, port, variant="plain", sinkPort=None, extra=None, listenerExtra=None, tree=ROOT):
    """
    Start relaygw as it ships: the embedded defaults, plus workers and what
    the scenario needs; its log (level info) goes to a file, as it would.
    """
    os.makedirs(directory, exist_ok=True)
    listener = {"endpoint": "tcp:%d:interface=127.0.0.1" % port, "hostname": "relay.bench",
                # The default relay_networks plus the documentation clients that XCLIENT and PROXY
                # announce (Postfix's mynetworks is the same).
                "relay_networks": ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]}
    listener.update(listenerExtra or {})
    if variant in ("tls", "tlsr"):
        cert, key = Certificate.files()
        listener.update(tls_certificate=cert, tls_key=key, tls_self_signed=True)
    elif variant == "xclient":
        listener.update(trusted_peers=["127.0.0.0/8"], extensions=["xclient"])
    elif variant == "proxy":
        listener.update(proxy_protocol=True, proxy_trusted=["127.0.0.1/32"])
    relay = {"defer_all": True} if sinkPort is None else {"smarthosts": ["[127.0.0.1]:%d" % sinkPort]}
    relay.update(extra or {})
    conf = os.path.join(directory, "relaygw.toml")
    with open(conf, "w") as f:
        f.write(configText(directory, listeners=(listener,), relay=relay,
                           process={"workers": WORKERS} if WORKERS > 1 else None))
    env = dict(os.environ, PYTHONPATH=tree)
    return Process(twistdArgv(conf), directory, port, env=env, stdout=os.path.join(directory, "relaygw.log"))


def postfix(directory, port, variant, sinkPort, kind):
    """A throwaway Postfix doing the scenario's work; returns the started PostfixInstance."""
    extra = {"defer_transports": "smtp"} if kind == "accept" else {}
    # relaygw looks up no client host names: neither does Postfix here (the
    # documentation addresses XCLIENT and PROXY announce would wait on DNS).
    extra["smtpd_peername_lookup"] = "no"
    if variant == "proxy":
        extra["smtpd_upstream_proxy_protocol"] = "haproxy"
    elif variant in ("tls", "tlsr"):
        cert, key = Certificate.files()
        extra.update(smtpd_tls_security_level="may", smtpd_tls_cert_file=cert, smtpd_tls_key_file=key)
    # XCLIENT: PostfixInstance already authorizes 127.0.0.0/8 (smtpd_authorized_xclient_hosts).
    instance = PostfixInstance(directory, port, "[127.0.0.1]:%d" % (sinkPort or 9), extra)
    instance.start()
    return instance


def postfixMaster(instance):
    try:
        with open(os.path.join(instance.settings["queue_directory"], "pid", "master.pid")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stockTwisted(directory, port):
    os.makedirs(directory, exist_ok=True)
    return Process([PY, os.path.join(HERE, "stock_twisted.py"), str(port), directory], directory, port)


def smtpSource(port, sessions, count, size):
    subprocess.run([SOURCE, "-s", str(sessions), "-l", str(size), "-m", str(count), "-f", "a@example.org",
                    "-t", "b@example.net", "127.0.0.1:%d" % port], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return count


def buildSmtpLoad():
    """Compile bench/smtpload.c once per run; None if there is no compiler or no OpenSSL headers."""
    out = os.path.join(tempfile.mkdtemp(prefix="rgb-bin-"), "smtpload")
    LEFT.append(os.path.dirname(out))
    try:
        subprocess.run(["cc", "-O2", "-o", out, os.path.join(HERE, "smtpload.c"), "-lssl", "-lcrypto"],
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out


def loadgen(port, sessions, count, size, seconds, variant="plain", resume=False, rate=None):
    """
    Our own client (XCLIENT, PROXY, STARTTLS; end-of-DATA latency): a dict
    with messages, p50_ms, p99_ms.  With C{rate}, sessions start at that
    rate (smtpload only).
    """
    if SMTPLOAD:
        argv = [SMTPLOAD, str(port), str(sessions), str(count), str(size), str(seconds)]
        if rate:
            argv.append("rate=%.0f" % rate)
        if variant in ("tls", "xclient", "proxy"):
            argv.append(variant)
        if variant == "tlsr":
            argv += ["tls", "resume"]
        elif resume and variant == "tls":
            argv.append("resume")
    else:
        argv = [PY, "-m", "bench.loadgen", "--port", str(port), "--sessions", str(sessions), "--count", str(count),
                "--size", str(size), "--seconds", str(seconds)]
        if variant in ("tls", "xclient", "proxy", "tlsr"):
            argv.append("--tls" if variant == "tlsr" else "--" + variant)  # (no resumption)
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, check=True)
    result = json.loads(out.stdout)
    if result["errors"] and not result["messages"]:
        raise RuntimeError("load failed: %s" % (result["firstError"],))
    return result


class Sink:
    """
    smtp-sink as the next hop, counting what arrives (its -c counter).  Its
    output is read all along: a pipe left unread fills after about a
    thousand messages, and smtp-sink then stops reading mail until it is
    drained (every delivery in the run would wait for the end of the load).
    """

    def __init__(self, count):
        self.port = freePort()
        self.count = count
        self.proc = subprocess.Popen([SINK, "-c", "-u", "postfix", "127.0.0.1:%d" % self.port, "1024"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.seen = 0
        self.buf = b""
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        waitForPort(self.port)

    def _drain(self):
        while not self._stopped.wait(0.05):  # 50 ms of counter lines is far below the pipe's 64 KB
            self.received()

    def received(self):
        with self._lock:
            try:
                data = self.proc.stdout.read() or b""
            except (BlockingIOError, ValueError):  # (ValueError: closed at stop)
                data = b""
            self.buf = (self.buf + data)[-400:]
            counts = re.findall(rb"mesg=(\d+)", self.buf)  # smtp-sink -c: "sess=N quit=N mesg=N\r"
            if counts:
                self.seen = int(counts[-1])
            return self.seen

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.received() >= self.count:
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        self._stopped.set()
        self._reader.join(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Spinner:
    """Another process keeping one core busy for at most C{seconds} (the "busy" cells)."""

    def __init__(self, seconds):
        self.proc = subprocess.Popen([PY, "-c", "import time\nd = time.monotonic() + %f\n"
                                      "while time.monotonic() < d:\n    pass\n" % seconds])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


#: Each cell's work directory, removed at the end of the run: on ext4 without
#: a journal a new file skips every inode freed in the last 30 seconds (the
#: dirty expiry), one by one, so one cell's clean-up would slow the next.
LEFT = []


def cleanUp():
    while LEFT:
        shutil.rmtree(LEFT.pop(), ignore_errors=True)


class Server:
    """One column of a comparison: Postfix, relaygw (from a source tree) or stock Twisted."""

    def __init__(self, kind, label, tree=ROOT):
        self.kind, self.label, self.tree = kind, label, tree
        self.rate = {"relaygw": 1500, "postfix": 600, "twisted": 900}[kind]

    def config(self, variant):
        if self.kind == "relaygw":
            return RELAYGW_CONFIG[variant].format(w=WORKERS, cert=Certificate.describe() if variant[:3] == "tls" else "")
        if self.kind == "postfix":
            return "Postfix %s" % POSTFIX_CONFIG[variant]
        return "stock twisted.mail ESMTP, write + fsync"


def measure(server, kind, variant, size, sessions, opts, busy=False, equalRate=None):
    """
    One run of one server: start it (and the sink), send the load, wait for
    the sink, then measure latency with our client at saturation and, with
    C{equalRate}, at that many messages a second; returns a dict.
    """
    guess = server.rate if size < 10000 else server.rate // 3
    count = int(max(50, min(opts.cap, guess * opts.seconds)))
    work = tempfile.mkdtemp(prefix="rgb-")
    port, sink, proc, pf, spinner = freePort(), None, None, None, None
    try:
        if busy:
            spinner = Spinner(opts.seconds * 10 + 120)
        if kind == "e2e":
            sink = Sink(count)
        if server.kind == "relaygw":
            proc = relaygw(work, port, variant, sink.port if sink else None, tree=server.tree)
            pid = proc.pid
            settled(pid)
        elif server.kind == "twisted":
            proc = stockTwisted(work, port)
            pid = proc.pid
        else:
            pf = postfix(work, port, variant, sink.port if sink else None, kind)
            pid = postfixMaster(pf)
        before = procStats(pid) if pid else (0, 0, 0)
        started = time.monotonic()
        if variant == "plain":
            sent = smtpSource(port, sessions, count, size)
        else:
            load = loadgen(port, sessions, count, size, opts.seconds * 3, variant, opts.resume)
            sent = load["messages"]
        elapsed = time.monotonic() - started
        if sink is not None:
            sink.count = sent  # what was accepted (a time-bounded load may send fewer)
            if not sink.wait(120):
                raise RuntimeError("the sink got %d of %d messages" % (sink.received(), sent))
            elapsed = time.monotonic() - started
        out = {"rate": sent / elapsed}
        if variant == "tlsr":
            out["resumed"] = load.get("resumed", 0) / max(1, sent)
        server.rate = max(50, out["rate"])  # the next run lasts about opts.seconds
        if pid:
            after = procStats(pid)
            out["cpu_ms"] = (after[0] - before[0]) / sent * 1000
            if server.kind != "postfix":
                out["rss_mb"] = after[1] / 1024
        # End of DATA to the 250, with our own client, while the next hop takes the mail.
        lat = loadgen(port, sessions, max(100, min(int(out["rate"] * opts.seconds / 2), 5000)), size,
                      opts.seconds, variant, opts.resume)
        out["p50_ms"], out["p99_ms"] = lat["p50_ms"], lat["p99_ms"]
        if sink is not None:
            sink.count = sent + lat["messages"]
            sink.wait(60)
        if equalRate and SMTPLOAD:
            eq = loadgen(port, sessions, max(100, int(equalRate * opts.seconds)), size, opts.seconds * 3, variant,
                         opts.resume, rate=equalRate)
            out["eq_p50_ms"], out["eq_p99_ms"], out["eq_rate"] = eq["p50_ms"], eq["p99_ms"], equalRate
            if sink is not None:
                sink.count += eq["messages"]
                sink.wait(60)
        return out
    finally:
        for p in (proc, sink, spinner):
            if p is not None:
                p.stop()
        if pf is not None:
            pf.stop()
        LEFT.append(work)


def group(servers, kind, variant, size, sessions, opts, busy=False):
    """
    Every server of a comparison, their runs interleaved, the order turned
    round each time (a run that follows another starts while the file
    system still writes back what the first one wrote, and should not
    always be the same server's); returns {label: summary}.
    """
    results = {s.label: [] for s in servers}
    equalRate = None
    for i in range(opts.runs):
        if i == 1 and len(servers) > 1 and all(results.values()):
            # Latency at one load for every server: 80% of the slowest one's first run.
            equalRate = 0.8 * min(runs[0]["rate"] for runs in results.values())
        for s in (servers if i % 2 == 0 else servers[::-1]):
            try:
                results[s.label].append(measure(s, kind, variant, size, sessions, opts, busy, equalRate))
            except Exception as e:  # reported in the table; the matrix goes on
                print("%s %s %s %d %d failed: %s" % (s.label, kind, variant, size, sessions, e), file=sys.stderr)
    out = {}
    for label, runs in results.items():
        if not runs:
            out[label] = None
            continue
        rates = [r["rate"] for r in runs]
        summary = {"rate": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(runs)}
        for k in ("cpu_ms", "p50_ms", "p99_ms", "resumed"):
            if all(k in r for r in runs):
                summary[k] = statistics.median(r[k] for r in runs)
        equal = [r for r in runs if "eq_p99_ms" in r]
        if equal:
            for k in ("eq_p50_ms", "eq_p99_ms", "eq_rate"):
                summary[k] = statistics.median(r[k] for r in equal)
        if all("rss_mb" in r for r in runs):
            summary["rss_mb"] = max(r["rss_mb"] for r in runs)
        out[label] = summary
    return out


def fmt(c, base=None):
    if c is None:
        return ("failed", "–", "–", "–", "–", "–")
    s = "%.0f (%.0f–%.0f)" % (c["rate"], c["min"], c["max"])
    ratio = "**%.2f×**" % (c["rate"] / base["rate"]) if base else "–"
    lat = "%.1f / %.1f" % (c["p50_ms"], c["p99_ms"]) if "p50_ms" in c else "–"
    eq = "%.1f / %.1f at %.0f/s" % (c["eq_p50_ms"], c["eq_p99_ms"], c["eq_rate"]) if "eq_p99_ms" in c else "–"
    cpu = "%.2f" % c["cpu_ms"] if "cpu_ms" in c else "–"
    rss = "%.0f" % c["rss_mb"] if "rss_mb" in c else "–"
    return s, ratio, lat, eq, cpu, rss


def matrix(cells, servers, opts):
    """Every cell, each with Postfix doing the same work; returns the table rows."""
    rows = []
    for kind, variant, size, sessions, busy in cells:
        results = group(servers, kind, variant, size, sessions, opts, busy)
        base = results.get("Postfix 3.7")
        for s in servers:
            r = results[s.label]
            name = "%s %s%s" % (s.label, "end-to-end" if kind == "e2e" else "accept-only",
                                "" if variant == "plain" else " + " + {"tls": "STARTTLS", "xclient": "XCLIENT",
                                                                       "proxy": "PROXY v2",
                                                                       "tlsr": "STARTTLS, resuming"}[variant])
            if busy:
                name += ", one core kept busy"
            if r is not None and "resumed" in r:
                name += " (%.0f%% resumed)" % (r["resumed"] * 100)
            ref = base if s.kind != "postfix" else None
            if ref is None and s is not servers[0] and results.get(servers[0].label):
                ref = results[servers[0].label]  # an A/B run without Postfix: against the first column
            row = (name, s.config(variant), size, sessions) + fmt(r, ref)
            rows.append(row)
            print(" | ".join(str(x) for x in row), file=sys.stderr)
    return rows


def planCells(opts):
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    conc = [int(c) for c in opts.concurrency.split(",") if c]
    cells = []
    for size in sizes:
        for c in conc:
            for v in filter(None, opts.variants.split(",")):
                if v[:3] == "tls" and c < 100 and not opts.tls_all:
                    continue  # the STARTTLS target is at 100 sessions
                for kind in opts.kinds.split(","):
                    cells.append((kind, v, size, c, False))
    for v in (opts.busy.split(",") if opts.busy else ()):
        cells.append(("e2e", v, 4096, 100, True))
    for spec in (opts.extra_cells.split(";") if opts.extra_cells else ()):
        kind, v, size, c = spec.split(",")
        cells.append((kind, v, int(size), int(c), False))
    return cells
def idleConnections(n, opts):
    work = tempfile.mkdtemp(prefix="rgb-")
    port = freePort()
    proc = relaygw(work, port, listenerExtra={"max_connections": 2 * n})
    socks = []
    try:
        settled(proc.pid)
        base = procStats(proc.pid)[2]
        deadline = time.monotonic() + 120
        while len(socks) < n and time.monotonic() < deadline:
            s = socket.socket()
            s.setblocking(True)
            s.connect(("127.0.0.1", port))
            socks.append(s)
            if len(socks) % 500 == 0:
                time.sleep(0.05)
        time.sleep(2)
        rss = procStats(proc.pid)[2]
        greeted = 0
        for s in socks:  # every one is a live SMTP session that got its 220
            s.settimeout(5)
            greeted += s.recv(4, socket.MSG_PEEK) == b"220 "
        return {"connections": len(socks), "greeted": greeted,
                "kb_per_connection": (rss - base) / max(1, len(socks)), "rss_mb": rss / 1024}
    finally:
        for s in socks:
            s.close()
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def bigMessage(size):
    work = tempfile.mkdtemp(prefix="rgb-")
    port = freePort()
    proc = relaygw(work, port, extra={"defer_all": True}, listenerExtra={"max_message_size": 2 * size})
    try:
        settled(proc.pid)
        before = procStats(proc.pid)[1]
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        f = s.makefile("rb")
        f.readline()
        for line in (b"EHLO big\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"):
            s.sendall(line)
            while True:
                reply = f.readline()
                if reply[3:4] != b"-":
                    break
        chunk = (b"y" * 998 + b"\r\n") * 64
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b".\r\n")
        assert f.readline().startswith(b"250"), "not accepted"
        s.close()
        return {"bytes": sent, "peak_rss_mb": procStats(proc.pid)[1] / 1024, "start_rss_mb": before / 1024}
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def queued(work):
    """Messages in the spool, in every worker's partition (worker 0 adopts the unpartitioned ones)."""
    spool = os.path.join(work, "spool")
    areas = [os.path.join(spool, "queue")] + [os.path.join(spool, d, "queue") for d in os.listdir(spool)]
    return sum(len(os.listdir(a)) for a in areas if os.path.isdir(a))


def recovery(n):
    """Start-up with n queued messages: time until the listener answers, and until all are delivered."""
    from relaygw.spool import newQueueId

    work = tempfile.mkdtemp(prefix="rgb-")
    queue = os.path.join(work, "spool", "queue")
    os.makedirs(queue)
    content = b"Subject: recover\r\n\r\n" + b"z" * 1000 + b"\r\n"
    for i in range(n):
        qid = newQueueId()
        env = {"body_size": len(content), "body_crc32": zlib.crc32(content),  # (as relaygw writes them)
               "mailfrom": "a@example.org", "mail_params": {}, "recipients": ["b@example.net"],
               "arrival": time.time(), "context": {"connection": {}, "message": {}}, "queue_id": qid}
        with open(os.path.join(queue, qid), "wb") as f:
            f.write(json.dumps(env).encode() + b"\n" + content)
    os.sync()
    port = freePort()
    started = time.monotonic()
    proc = relaygw(work, port, extra={"defer_all": False})  # the Maildir next hop
    try:
        ready = time.monotonic() - started
        deadline = time.monotonic() + RECOVERY_WAIT
        while queued(work) and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"messages": n, "listening_s": ready, "all_delivered_s": time.monotonic() - started,
                "left": queued(work)}
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)




def main(argv=None):
    global WORKERS, SMTPLOAD
    p = argparse.ArgumentParser(description="relaygw benchmark")
    p.add_argument("--quick", action="store_true", help="4 KB, 100 sessions, plain and XCLIENT, one run each")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--cap", type=int, default=20000)
    p.add_argument("--sizes", default="4096")
    p.add_argument("--concurrency", default="10,100")
    p.add_argument("--variants", default="plain,xclient,proxy,tls,tlsr",
                   help="plain, xclient, proxy, tls (STARTTLS, every session a full handshake), "
                        "tlsr (STARTTLS, the client resuming its last session)")
    p.add_argument("--kinds", default="e2e", help="e2e (through to the next hop) and/or accept (queue only)")
    p.add_argument("--busy", default="plain,xclient,proxy",
                   help="variants measured again (4 KB, 100 sessions) while another process keeps a core busy")
    p.add_argument("--extra-cells", default="e2e,plain,102400,100",
                   help="more cells, KIND,VARIANT,SIZE,SESSIONS separated by ';'")
    p.add_argument("--stock", action="store_true", help="add stock Twisted (plain cells)")
    p.add_argument("--resume", action="store_true", help="the STARTTLS client resumes TLS sessions")
    p.add_argument("--tls-all", action="store_true", help="STARTTLS cells at every concurrency, not only 100")
    p.add_argument("--rsa-cert", action="store_true", help="an RSA 2048 certificate instead of the self-signed default")
    p.add_argument("--compare", action="append", default=[], metavar="TREE[:LABEL]",
                   help="also run relaygw from another source tree (A/B in the same run)")
    p.add_argument("--no-postfix", dest="postfix", action="store_false", help="relaygw only (A/B runs)")
    p.add_argument("--extras", action="store_true", help="memory and recovery measurements")
    p.add_argument("--recovery", type=int, default=100000, help="queued messages for the recovery measurement")
    p.add_argument("--workers", type=int, default=WORKERS, help="relaygw worker processes (default: cores)")
    p.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    opts = p.parse_args(argv)
    WORKERS = opts.workers
    for tool in (SOURCE, SINK, "/usr/sbin/postfix"):
        if not os.path.exists(tool):
            p.error("%s is missing: run `make bench` (or sh scripts/install-peers)" % tool)
    if opts.quick:
        opts.runs, opts.sizes, opts.concurrency, opts.variants = 1, "4096", "100", "plain,xclient"
        opts.busy, opts.extra_cells = "", ""
    raiseFileLimit()
    Certificate.rsa = opts.rsa_cert
    started = time.monotonic()
    SMTPLOAD = buildSmtpLoad()
    if SMTPLOAD is None:
        print("warning: cannot build bench/smtpload.c (cc and OpenSSL's headers: gcc, libssl-dev); the XCLIENT, "
              "PROXY and STARTTLS cells use bench/loadgen.py, which costs more CPU per message", file=sys.stderr)
    servers = ([Server("postfix", "Postfix 3.7")] if opts.postfix else []) + [Server("relaygw", "relaygw")]
    for spec in opts.compare:
        tree, _, label = spec.partition(":")
        servers.append(Server("relaygw", "relaygw (%s)" % (label or tree), os.path.abspath(tree)))
    if opts.stock:
        servers.append(Server("twisted", "stock Twisted"))
    try:
        rows = matrix(planCells(opts), servers, opts)
        table = tableText(rows)
        extras = {}
        if opts.write and opts.extras:  # the table is safe on disk before the longer extras
            writeResults(report(table, extras, opts, time.monotonic() - started))
        if opts.extras:
            extras["idle"] = idleConnections(10000, opts)
            extras["big50MB"] = bigMessage(50 * 1024 * 1024)
            extras["big1MB"] = bigMessage(1024 * 1024)
            extras["recovery"] = recovery(opts.recovery)
        print(table)
        if extras:
            print(json.dumps(extras, indent=2))
        if opts.write:
            writeResults(report(table, extras, opts, time.monotonic() - started))
    finally:
        cleanUp()
    return 0


def tableText(rows):
    lines = ["| scenario | configuration | size | sessions | msgs/s median (min–max) | vs Postfix, same work "
             "| p50 / p99 ms | p50 / p99 ms at an equal load | CPU ms / msg | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %d KB | %d | %s | %s | %s | %s | %s | %s |" % ((r[0], r[1], r[2] // 1024, r[3]) + r[4:]))
    return "\n".join(lines)


def _postfixVersion():
    try:
        out = subprocess.run(["/usr/sbin/postconf", "-d", "mail_version"], capture_output=True, text=True, timeout=30)
        return out.stdout.split("=", 1)[1].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "3.7"


def report(table, extras, opts, seconds):
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    out = ["# relaygw benchmark results", "",
           "Date: %s. Machine: %d cores, %.0f GiB, Linux %s, Python %s. Loopback only. Runs per cell: %d "
           "(%.0f s target each, the two servers' runs interleaved, each first in turn); whole run %.0f s." % (
               datetime.date.today().isoformat(), os.cpu_count(), mem, platform.release(),
               platform.python_version(), opts.runs, opts.seconds, seconds), "",
           "Method: `python -m bench.run %s`. relaygw runs on its shipped defaults (log level info, "
           "text lines to a file, the default backlog, destination_concurrency and every other key as "
           "`relaygw/default.toml` and `config.py` give them) plus `[process] workers` = %d (the cores), a "
           "smarthost (the sink) and what the scenario needs; Postfix runs on its defaults plus the same. "
           "The configuration column says what each adds. Plain cells load both servers with Postfix's "
           "smtp-source (one message per connection, no PIPELINING); the XCLIENT, PROXY and STARTTLS cells "
           "with %s, which does the same (one event loop for every session, as smtp-source) with those "
           "steps added: XCLIENT ADDR and NAME then a "
           "new EHLO per session as nginx sends it, a PROXY v2 header as HAProxy's send-proxy-v2 does, "
           "STARTTLS then a new EHLO%s; \"resuming\" cells offer each session slot's last TLS session again. "
           "End-to-end: through to an smtp-sink next hop (its output read all along, so it never stops "
           "reading mail), timed until the sink "
           "has every message. Ratios are against Postfix doing the same work in the same run. Latency: from the "
           "write carrying the content and its final dot (one write, as smtp-source sends them) to the 250, "
           "measured with smtpload at the same concurrency right after, the next hop still taking the mail: "
           "at saturation (each session starts its next message at once), where the closed loop puts the "
           "wait at whichever step is the server's bottleneck; and at an equal load, where sessions start "
           "at 80%% of the slower server's rate in the cell's first run (the same rate for both, runs 2 on). "
           "CPU: user + system time per message of all of the server's processes "
           "(relaygw's workers; Postfix's master and every daemon it ran). Every 250 follows a completed "
           "sync of the message (relaygw's batch of fdatasyncs through io_uring, then its directory's fsync; "
           "Postfix's fsync)." % (
               " ".join(sys.argv[1:]), WORKERS,
               "bench/smtpload.c" if SMTPLOAD else "bench/loadgen.py (no C compiler here for bench/smtpload.c)",
               " (no session resumption)" if not opts.resume else " (resuming the TLS session)"),
           "", table, "", "## Configurations", "",
           "relaygw, every cell: the embedded defaults (`relaygw/default.toml`, `config.py`) plus:", "",
           "```toml", "[relay]",
           'smarthosts = ["[127.0.0.1]:SINK"]   # the smtp-sink next hop (accept-only cells: defer_all = true)',
           "", "[process]", "workers = %d" % WORKERS, "", "[[listener]]",
           'endpoint = "tcp:PORT:interface=127.0.0.1"   # the default backlog',
           'hostname = "relay.bench"',
           'relay_networks = ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]   # + the clients XCLIENT and PROXY announce',
           '# XCLIENT cells:  trusted_peers = ["127.0.0.0/8"], extensions = ["xclient"]',
           '# PROXY cells:    proxy_protocol = true, proxy_trusted = ["127.0.0.1/32"]',
           "# STARTTLS cells: tls_certificate, tls_key, tls_self_signed = true (the certificate it generates: %s)"
           % Certificate.describe(), "```", "",
           "Postfix %s, every cell: Debian's defaults plus `relaygw.testing.PostfixInstance`'s throwaway instance "
           "(`mynetworks = 127.0.0.0/8 192.0.2.0/24`, `relayhost` = the sink, `smtp_tls_security_level = none`, "
           "`maillog_file`), `smtpd_peername_lookup = no` (relaygw looks up no host names), and per cell "
           "`smtpd_authorized_xclient_hosts = 127.0.0.0/8` (XCLIENT), `smtpd_upstream_proxy_protocol = haproxy` "
           "(PROXY), `smtpd_tls_security_level = may` with relaygw's certificate and key (STARTTLS); accept-only "
           "cells add `defer_transports = smtp`. \"One core kept busy\": another process spins on one core for "
           "the whole cell, for both servers." % _postfixVersion(), ""]
    if extras:
        out += ["## Memory and recovery", "",
                "relaygw as above (one listener with `max_connections` raised for the idle test): 10,000 idle "
                "connections; a 50 MB and a 1 MB message received whole; start-up with %d messages queued "
                "(until the listener answers, and until the Maildir next hop has them all)." % opts.recovery, "",
                "```json", json.dumps(extras, indent=2), "```", ""]
    return "\n".join(out) + _leversSection()


def writeResults(text):
    """Replace bench/RESULTS.md with C{text} (made first: it carries the old file's levers section)."""
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(text)


def _leversSection():
    """The hand-written levers section of the RESULTS.md being replaced, kept as it is."""
    try:
        with open(os.path.join(HERE, "RESULTS.md")) as f:
            text = f.read()
    except OSError:
        return ""
    at = text.find("\n## Levers")
    return text[at:] if at >= 0 else ""


if __name__ == "__main__":
    sys.exit(main())
