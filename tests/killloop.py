"""
A kill -9 loop against real twistd processes, and the recording next hop it
counts deliveries with.

Clients send uniquely tagged messages and note every one the gateway
acknowledged with 250; the gateway relays to L{RecordingHop}, which counts
each tag it receives; now and then every gateway process is killed with
SIGKILL (at a random moment) and started again, sometimes with another
worker count.  At the end the gateway delivers what is left, and the
figures say what was lost (acknowledged, never delivered) and how many
extra copies arrived, per kill.

Run outside the test suite (bounded by cycles and time)::

    .venv/bin/python -m tests.killloop --cycles 100 --minutes 10
"""

import argparse
import collections
import json
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

from relaygw.testing import configText, freePort, waitForPort


class _HopHandler(socketserver.StreamRequestHandler):
    """One next-hop SMTP session: answers in order, so pipelined commands just work."""

    def reply(self, text):
        self.wfile.write(text.encode("ascii") + b"\r\n")

    def handle(self):
        hop = self.server.hop
        with hop.lock:
            hop.connections += 1
        try:
            self.reply("220 hop.test ESMTP")
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    self.reply("250-hop.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    self.reply("250 2.0.0 Ok")
                elif verb == b"DATA":
                    self.reply("354 go ahead")
                    tag = None
                    while True:
                        line = self.rfile.readline()
                        if not line or line == b".\r\n":
                            break
                        if tag is None and line.startswith(b"Subject: "):
                            tag = line[9:].strip().decode("ascii", "replace")
                    if not line:
                        return
                    hop.received(tag)
                    if hop.delay:
                        time.sleep(hop.delay)
                    self.reply("250 2.0.0 Ok: queued")
                elif verb == b"QUIT":
                    self.reply("221 2.0.0 Bye")
                    return
                else:
                    self.reply("502 5.5.2 unknown")
        except OSError:
            return


class RecordingHop:
    """
    A next hop on loopback that counts every message (by its Subject tag)
    at the end of its data, then answers 250 after C{delay} seconds.
    """

    def __init__(self, delay=0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.connections = 0
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _HopHandler)
        server.daemon_threads = True
        server.hop = self
        self.server = server
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def received(self, tag):
        with self.lock:
            self.counts[tag] += 1

    def total(self):
        with self.lock:
            return sum(self.counts.values())

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.counts)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def sendTagged(port, tag, timeout=10):
    """One message with Subject C{tag}; True once the gateway said 250 to it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            f = s.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if not line:
                        raise EOFError
                    if line[3:4] != b"-":
                        return int(line[:3])

            if reply() != 220:
                return False
            s.sendall(b"EHLO killloop.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            if (reply(), reply(), reply(), reply()) != (250, 250, 250, 354):
                return False
            s.sendall(b"Subject: %s\r\n\r\nbody of %s\r\n.\r\n" % (tag.encode(), tag.encode()))
            ok = reply() == 250
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            return ok
    except (OSError, EOFError, ValueError):
        return False


class Gateway:
    """twistd relaygw processes on one config, killed and started again."""

    def __init__(self, directory, port, hopPort, concurrency, env, workers=1, log=None):
        self.directory = directory
        self.port = port
        self.hopPort = hopPort
        self.concurrency = concurrency
        self.env = env
        self.log = log or open(os.path.join(directory, "twistd.log"), "ab")
        self.proc = None
        self.workers = workers

    def configure(self, workers):
        self.workers = workers
        with open(os.path.join(self.directory, "relaygw.toml"), "w") as f:
            f.write(configText(self.directory, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % self.port, "relay_networks": ["127.0.0.0/8"],
                "drain_timeout": 2},), relay={
                "smarthosts": ["[127.0.0.1]:%d" % self.hopPort], "tls": "none", "retry_min": 1, "retry_max": 2,
                "destination_concurrency": self.concurrency},
                process={"workers": workers} if workers > 1 else None))

    def start(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.proc = subprocess.Popen([twistd, "-n", "--pidfile=", "relaygw", "--config",
                                      os.path.join(self.directory, "relaygw.toml")],
                                     cwd=self.directory, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        waitForPort(self.port, timeout=30)
        # Every worker owns its partition (and listens right after).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(self.pids()) < self.workers:
            time.sleep(0.05)

    def pids(self):
        """The live gateway processes, from the spool's lock files."""
        out = set()
        spool = os.path.join(self.directory, "spool")
        for sub in [""] + ["w%d" % i for i in range(16)]:
            path = os.path.join(spool, sub, "lock")
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and _alive(pid):
                out.add(pid)
        return out

    def kill(self):
        """SIGKILL every process of the gateway at once (a crash, not a drain)."""
        victims = self.pids() | {self.proc.pid}
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
            time.sleep(0.02)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def queued(self):
        """Messages still in the spool (every partition)."""
        n = 0
        for root, dirs, files in os.walk(os.path.join(self.directory, "spool")):
            if os.path.basename(root) == "queue":
                n += len(files)
        return n


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run(directory, cycles, workerPlan, seconds=None, clients=4, concurrency=2, hopDelay=0.0,
        runFor=(0.4, 1.2), env=None, log=None, rate=80.0, drainSeconds=120):
    """
    The loop: C{cycles} kills (fewer if C{seconds} run out), the worker
    count of cycle I being C{workerPlan[I % len(workerPlan)]}.  Returns the
    figures (a dict).
    """
    env = dict(env or os.environ)
    hop = RecordingHop(hopDelay)
    port = freePort()
    gw = Gateway(directory, port, hop.port, concurrency, env, log=log)
    acked, lock = [], threading.Lock()
    stop = threading.Event()
    counter = iter(range(10 ** 9))

    def client(n):
        pause = clients / rate  # (the clients together send at most `rate` messages a second)
        while not stop.is_set():
            began = time.monotonic()
            with lock:
                tag = "m%07d" % next(counter)
            ok = sendTagged(port, tag, timeout=5)
            time.sleep(max(0.0, pause - (time.monotonic() - began)))
            if ok:
                with lock:
                    acked.append(tag)
            else:
                time.sleep(0.02)  # down: try again in a moment

    started = time.monotonic()
    perKill = []
    changes = 0
    try:
        gw.configure(workerPlan[0])
        gw.start()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        cycle = 0
        while cycle < cycles and (seconds is None or time.monotonic() - started < seconds):
            time.sleep(random.uniform(*runFor))
            before = hop.snapshot()
            gw.kill()
            cycle += 1
            # Extra copies caused by this kill: counted once the messages
            # in flight at the kill have been delivered again (measured at
            # the next kill, or at the end).
            perKill.append(before)
            workers = workerPlan[cycle % len(workerPlan)]
            if workers != gw.workers:
                changes += 1
            gw.configure(workers)
            gw.start()
        stop.set()
        for t in threads:
            t.join(15)
        # Let the gateway deliver everything it holds.
        deadline = time.monotonic() + drainSeconds
        while time.monotonic() < deadline and gw.queued():
            time.sleep(0.2)
        time.sleep(1.0)
        gw.stop()
        final = hop.snapshot()
    finally:
        stop.set()
        try:
            gw.stop()
        finally:
            hop.close()
    with lock:
        ackedSet = set(acked)
    lost = sorted(tag for tag in ackedSet if final[tag] == 0)
    extra = sum(n - 1 for n in final.values() if n > 1)
    # Per kill: the copies of messages the hop already had at the kill
    # that arrived again afterwards (before the next kill).
    extraPerKill = []
    marks = perKill + [final]
    for i, before in enumerate(perKill):
        after = marks[i + 1]
        extraPerKill.append(sum(max(0, after[t] - before[t]) for t in before if before[t] >= 1))
    return {
        "cycles": len(perKill),
        "worker_changes": changes,
        "seconds": round(time.monotonic() - started, 1),
        "acknowledged": len(ackedSet),
        "delivered_distinct": len([t for t in final if final[t]]),
        "lost": len(lost),
        "lost_tags": lost[:20],
        "extra_copies": extra,
        "max_copies": max(final.values() or [0]),
        "max_extra_per_kill": max(extraPerKill or [0]),
        "extra_per_kill": extraPerKill,
        "in_flight_bound": concurrency * max(workerPlan),
        "still_queued": gw.queued(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", default="1,2,2,1,2", help="worker counts, cycled")
    parser.add_argument("--concurrency", type=int, default=2, help="destination_concurrency")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hop-delay", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=80.0, help="messages per second, all clients together")
    parser.add_argument("--drain-seconds", type=float, default=300, help="at most this long to deliver the rest")
    parser.add_argument("--directory", default=None)
    args = parser.parse_args(argv)
    directory = args.directory or tempfile.mkdtemp(prefix="relaygw-killloop-")
    os.makedirs(directory, exist_ok=True)
    figures = run(directory, args.cycles, [int(w) for w in args.workers.split(",")], seconds=args.minutes * 60,
                  clients=args.clients, concurrency=args.concurrency, hopDelay=args.hop_delay, rate=args.rate,
                  drainSeconds=args.drain_seconds)
    figures.pop("extra_per_kill")
    print(json.dumps(figures, indent=1))
    return 0 if figures["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
