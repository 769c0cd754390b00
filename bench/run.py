"""
relaygw's benchmark: the whole matrix in one command, with Postfix and stock
Twisted measured in the same run as baselines.  Loopback only; every load is
bounded by a message count and a time limit.

    .venv/bin/python -m bench.run            # the full matrix (about 20-25 minutes)
    .venv/bin/python -m bench.run --quick    # 4 KB, c=10 and 100, one run of each

Needs Postfix's smtp-source and smtp-sink (Debian package postfix; `make
bench` installs it).  Writes the table to stdout and, with --write,
to bench/RESULTS.md.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
SOURCE = "/usr/sbin/smtp-source"
SINK = "/usr/sbin/smtp-sink"
#: relaygw worker processes ([process] workers); --workers sets it.
WORKERS = 1
#: How long the recovery measurement waits for the spool to empty.
RECOVERY_WAIT = 600

sys.path.insert(0, ROOT)
from relaygw.testing import PostfixInstance, configText, freePort, waitForPort  # noqa: E402
from relaygw.workers import twistdArgv  # noqa: E402
from relaygw.tls import generateSelfSigned  # noqa: E402


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
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
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

    def __init__(self, argv, cwd, port, env=None):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, preexec_fn=raiseFileLimit)
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


def relaygw(directory, port, variant="plain", sinkPort=None, extra=None, listenerExtra=None):
    """Start a relaygw twistd process for a scenario; returns the Process."""
    os.makedirs(directory, exist_ok=True)
    listener = {"endpoint": "tcp:%d:interface=127.0.0.1:backlog=1024" % port, "hostname": "relay.bench",
                "relay_networks": ["127.0.0.0/8", "192.0.2.0/24"], "max_connections": 20000}
    listener.update(listenerExtra or {})
    if variant == "tls":
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        generateSelfSigned(cert, key, "relay.bench")
        listener.update(tls_certificate=cert, tls_key=key)
    elif variant == "xclient":
        listener.update(trusted_peers=["127.0.0.0/8"], extensions=["xclient"])
    elif variant == "proxy":
        listener.update(proxy_protocol=True, proxy_trusted=["127.0.0.1/32"])
    relay = {"defer_all": True} if sinkPort is None else {
        "smarthosts": ["[127.0.0.1]:%d" % sinkPort], "tls": "none", "destination_concurrency": 20}
    relay.update(extra or {})
    conf = os.path.join(directory, "relaygw.toml")
    with open(conf, "w") as f:
        f.write(configText(directory, listeners=(listener,), relay=relay, log={"level": "warn"},
                           process={"workers": WORKERS} if WORKERS > 1 else None))
    return Process(twistdArgv(conf), directory, port)


def stockTwisted(directory, port):
    os.makedirs(directory, exist_ok=True)
    return Process([PY, os.path.join(HERE, "stock_twisted.py"), str(port), directory], directory, port)


def smtpSource(port, sessions, count, size):
    started = time.monotonic()
    subprocess.run([SOURCE, "-s", str(sessions), "-l", str(size), "-m", str(count), "-f", "a@example.org",
                    "-t", "b@example.net", "127.0.0.1:%d" % port], check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def loadgen(port, sessions, count, size, seconds, variant="plain"):
    argv = [PY, "-m", "bench.loadgen", "--port", str(port), "--sessions", str(sessions), "--count", str(count),
            "--size", str(size), "--seconds", str(seconds)]
    if variant in ("tls", "xclient", "proxy"):
        argv.append("--" + variant)
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.stdout)


class Sink:
    """smtp-sink as the next hop, counting what arrives (its -c counter)."""

    def __init__(self, count):
        self.port = freePort()
        self.count = count
        self.proc = subprocess.Popen([SINK, "-c", "-u", "postfix", "127.0.0.1:%d" % self.port, "1024"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.seen = 0
        self.buf = b""
        waitForPort(self.port)

    def received(self):
        try:
            data = self.proc.stdout.read() or b""
        except BlockingIOError:
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


def countFor(rate, seconds, cap):
    return int(max(50, min(cap, rate * seconds)))


def cell(kind, server, size, sessions, opts, variant="plain"):
    """
    One measurement (median over opts.runs).  kind: accept (queued, no
    delivery) or e2e (through to an smtp-sink next hop).  Returns a dict.
    """
    rates, cpus, hwms, lat50, lat99 = [], [], [], [], []
    # A rough rate, so that a cell lasts about opts.seconds: one session is
    # much slower than many (each message waits for its own fsync).
    guess = {"relaygw": 1200, "postfix": 700, "twisted": 900}[server]
    guess = guess if size < 10000 else guess // 2
    guess = guess if sessions >= 10 else {"relaygw": 300, "postfix": 400, "twisted": 300}[server]
    count = countFor(guess, opts.seconds, opts.cap)
    for _ in range(opts.runs):
        work = tempfile.mkdtemp(prefix="rgb-")
        port, sink, proc, postfix = freePort(), None, None, None
        try:
            if kind == "e2e":
                sink = Sink(count)
            if server == "relaygw":
                proc = relaygw(work, port, variant, sink.port if sink else None)
            elif server == "twisted":
                proc = stockTwisted(work, port)
            else:
                extra = {"defer_transports": "smtp"} if kind == "accept" else {}
                postfix = PostfixInstance(work, port, "[127.0.0.1]:%d" % (sink.port if sink else 9), extra)
                postfix.start()
            pid = proc.pid if proc else None
            if pid:
                settled(pid)
            before = procStats(pid) if pid else (0, 0, 0)
            started = time.monotonic()
            if variant == "plain":
                smtpSource(port, sessions, count, size)
                sent = count
            else:
                result = loadgen(port, sessions, count, size, opts.seconds * 3, variant)
                sent = result["messages"]
            elapsed = time.monotonic() - started
            if sink is not None:
                sink.count = sent  # what was accepted (a time-bounded load may send fewer)
                if not sink.wait(120):
                    raise RuntimeError("the sink got %d of %d messages" % (sink.received(), sent))
                elapsed = time.monotonic() - started
            rates.append(sent / elapsed)
            if pid:
                after = procStats(pid)
                cpus.append((after[0] - before[0]) / sent * 1000)
                hwms.append(after[1])
            # Latency from the end of DATA to the 250, with our own client.
            lat = loadgen(port, sessions, max(50, min(count // 4, 2000)), size, opts.seconds, variant) \
                if (server == "relaygw" or opts.latencyAll) and kind == "accept" else None
            if lat:
                lat50.append(lat["p50_ms"])
                lat99.append(lat["p99_ms"])
        finally:
            for p in (proc, sink):
                if p is not None:
                    p.stop()
            if postfix is not None:
                postfix.stop()
            LEFT.append(work)
    out = {"rate": statistics.median(rates), "min": min(rates), "max": max(rates)}
    if cpus:
        out["cpu_per_1000"] = statistics.median(cpus)
        out["rss_mb"] = max(hwms) / 1024
    if lat50:
        out["p50_ms"] = statistics.median(lat50)
        out["p99_ms"] = statistics.median(lat99)
    return out


def idleConnections(n, opts):
    work = tempfile.mkdtemp(prefix="rgb-")
    port = freePort()
    proc = relaygw(work, port)
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
        env = {"mailfrom": "a@example.org", "mail_params": {}, "recipients": ["b@example.net"],
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


def fmt(c, base=None):
    s = "%.0f (%.0f–%.0f)" % (c["rate"], c["min"], c["max"])
    ratio = "%.2f×" % (c["rate"] / base["rate"]) if base else "–"
    lat = "%.1f / %.1f" % (c["p50_ms"], c["p99_ms"]) if "p50_ms" in c else "–"
    extra = "%.1f" % c["cpu_per_1000"] if "cpu_per_1000" in c else "–"
    rss = "%.0f" % c["rss_mb"] if "rss_mb" in c else "–"
    return s, ratio, lat, rss, extra


def matrix(sizes, conc, variants, opts):
    """Every cell, baselines first within each size and concurrency; returns the table rows."""
    rows = []
    for size in sizes:
        for c in conc:
            base = {k: cell(k, "postfix", size, c, opts) for k in ("accept", "e2e")}
            stock = cell("accept", "twisted", size, c, opts)
            rows.append(("Postfix 3.7 accept+queue", size, c) + fmt(base["accept"]))
            rows.append(("Postfix 3.7 end-to-end", size, c) + fmt(base["e2e"]))
            rows.append(("stock Twisted ESMTP, fsync", size, c) + fmt(stock, base["accept"]))
            for v in variants:
                for kind in ("accept", "e2e"):
                    label = "relaygw %s%s" % ("accept-only" if kind == "accept" else "end-to-end",
                                              "" if v == "plain" else " + " + v)
                    try:
                        r = cell(kind, "relaygw", size, c, opts, v)
                    except Exception as e:  # reported in the table; the matrix goes on
                        rows.append((label, size, c, "failed: %s" % (e,), "–", "–", "–", "–"))
                        print("%-40s %6d %4d  failed: %s" % (label, size, c, e), file=sys.stderr)
                        continue
                    rows.append((label, size, c) + fmt(r, base[kind]))
                    print("%-40s %6d %4d  %s  %s" % ((label, size, c) + fmt(r, base[kind])[:2]), file=sys.stderr)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="relaygw benchmark")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--cap", type=int, default=20000)
    p.add_argument("--sizes", default="4096,102400")
    p.add_argument("--concurrency", default="1,10,100")
    p.add_argument("--variants", default="plain,tls,xclient,proxy")
    p.add_argument("--extras", action="store_true", default=None, help="memory and recovery measurements "
                   "(the default, except with --quick)")
    p.add_argument("--no-extras", dest="extras", action="store_false")
    p.add_argument("--latency-all", dest="latencyAll", action="store_true", default=True)
    p.add_argument("--workers", type=int, default=2, help="relaygw worker processes ([process] workers)")
    p.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    opts = p.parse_args(argv)
    global WORKERS
    WORKERS = opts.workers
    for tool in (SOURCE, SINK, "/usr/sbin/postfix"):
        if not os.path.exists(tool):
            p.error("%s is missing: run `make bench` (or sh scripts/install-peers)" % tool)
    if opts.quick:
        opts.runs, opts.sizes, opts.concurrency, opts.variants = 1, "4096", "10,100", "plain,xclient"
    if opts.extras is None:
        opts.extras = not opts.quick
    raiseFileLimit()
    sizes = [int(s) for s in opts.sizes.split(",")]
    conc = [int(c) for c in opts.concurrency.split(",")]
    variants = opts.variants.split(",")
    started = time.monotonic()
    try:
        rows = matrix(sizes, conc, variants, opts)
    finally:
        cleanUp()
    lines = ["| scenario | size | sessions | msgs/s median (min–max) | vs Postfix | p50 / p99 ms | peak RSS MB "
             "| CPU s / 1000 msgs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %d KB | %d | %s | %s | %s | %s | %s |" % ((r[0], r[1] // 1024, r[2]) + r[3:]))
    table = "\n".join(lines)
    extras = {}
    if opts.extras:
        extras["idle"] = idleConnections(10000, opts)
        extras["big50MB"] = bigMessage(50 * 1024 * 1024)
        extras["big1MB"] = bigMessage(1024 * 1024)
        extras["recovery"] = recovery(100000)
    print(table)
    if extras:
        print(json.dumps(extras, indent=2))
    if opts.write:
        with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
            f.write(report(table, extras, opts, time.monotonic() - started))
    return 0


def report(table, extras, opts, seconds):
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    out = ["# relaygw benchmark results", "",
           "Date: %s. Machine: %d cores, %.0f GiB, Linux %s, Python %s. Loopback only. Runs per cell: %d "
           "(%.0f s target each); whole run %.0f s." % (
               datetime.date.today().isoformat(), os.cpu_count(), mem, platform.release(),
               platform.python_version(), opts.runs, opts.seconds, seconds), "",
           "Method: `python -m bench.run --write`. Plain cells use Postfix's smtp-source (one message per "
           "connection, no PIPELINING); the STARTTLS, XCLIENT and PROXY cells use bench/loadgen.py, which "
           "does the same with those steps added. Accept-only: every message is spooled and fsynced before "
           "the 250, with `[relay] defer_all` so nothing is delivered (Postfix: `defer_transports = smtp`). "
           "End-to-end: through to an smtp-sink next hop, timed until the sink has every message. Latency: "
           "end of DATA to the 250, measured with loadgen at the same concurrency. Ratios are against Postfix "
           "measured in the same run. relaygw ran with %d worker process(es) (`[process] workers`); its CPU "
           "and peak RSS are summed over them. Every cell's files stay until the end of the run (on ext4 "
           "without a journal a new file skips each inode freed in the last 30 s, so one cell's clean-up "
           "would slow the next)." % WORKERS, "", table, ""]
    if extras:
        out += ["## Memory and recovery", "", "```json", json.dumps(extras, indent=2), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
