"""
Graceful drain, connection limits (on the session harness), and JSON logs
from a real twistd.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

import relaygw
from relaygw.lifecycle import newSessionId

from relaygw.testing import Client, ScriptedSMTPFactory, configText, freePort, inThread, twistdRunning, waitForPort
from tests.messages import sendOne, startData
from tests.processes import processState, spoolPids, waitUntil
from tests.recorders import LogCapture
from tests.sessions import GatewayTestCase, SessionTestCase
from tests.tlsmaterial import clientContext


class DrainTests(GatewayTestCase):
    """
    A drain over loopback sockets: the listening port closes (a new
    connection is refused), and the message finished during the drain is
    delivered or stays queued.
    """

    listener = {"relay_networks": ["127.0.0.0/8"], "drain_timeout": 5}

    @defer.inlineCallbacks
    def test_midDataFinishesIdleRefusedNewRefused(self):
        port = self.gw.port
        busy = yield inThread(self._startData)
        idle = yield inThread(self._idle)
        stopping = self.gw.service.stopService()
        # Give the drain a moment to close the listener and notify sessions.
        yield task.deferLater(reactor, 0.3, lambda: None)

        def check():
            code, lines = idle.reply()
            self.assertEqual((code, lines[0][:6]), (421, "4.3.2 "))
            self.assertTrue(idle.closed())
            with self.assertRaises(OSError):
                Client(port, timeout=2).reply()
            busy.send("Subject: drain\r\n\r\nfinished during drain\r\n.\r\n")
            code, lines = busy.reply()
            self.assertEqual(code, 250)
            code, lines = busy.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual((code, lines[0][:6]), (421, "4.3.2 "))
            return lines

        yield inThread(check)
        yield stopping
        self.assertFalse(self.gw.service.health()[0])
        spool = self.gw.service.spool
        delivered = len(os.listdir(self.gw.outbox))
        self.assertEqual(delivered + len(spool.queueIds()), 1)
        self.gw.stop = lambda: None

    @defer.inlineCallbacks
    def test_quitAfterTheMessageDuringADrain(self):
        """
        A message finished during the drain, then QUIT: 221, as RFC 5321
        has QUIT answered (it was 421 4.3.2, and the mail log called the
        accepted message's end of data rejected).
        """
        busy = yield inThread(self._startData)
        logged = LogCapture(self)
        stopping = self.gw.service.stopService()
        yield task.deferLater(reactor, 0.3, lambda: None)

        def check():
            busy.send("Subject: drain\r\n\r\nfinished during drain\r\n.\r\n")
            self.assertEqual(busy.reply()[0], 250)
            self.assertEqual(busy.cmd("QUIT")[0], 221)
            self.assertTrue(busy.closed())

        yield inThread(check)
        yield stopping
        self.assertEqual(logged.find("reject:"), [])
        self.assertEqual(len(logged.find("queued from=")), 1)
        self.gw.stop = lambda: None

    def _startData(self):
        c = Client(self.gw.port)
        self.addCleanup(c.close)
        c.reply()
        startData(c)
        return c

    def _idle(self):
        c = Client(self.gw.port)
        self.addCleanup(c.close)
        c.reply()
        c.cmd("EHLO idle")
        return c

    @defer.inlineCallbacks
    def test_drainTimeoutClosesStragglers(self):
        # drain_timeout is 5 s here; use a short one:
        object.__setattr__(self.gw.service.config.listeners[0], "drain_timeout", 0.5)
        busy = yield inThread(self._startData)
        started = time.monotonic()
        yield self.gw.service.stopService()
        self.assertLess(time.monotonic() - started, 3)

        def check():
            code, lines = busy.reply()
            self.assertEqual((code, lines[0][:6]), (421, "4.3.2 "))
            self.assertTrue(busy.closed())

        yield inThread(check)
        self.assertEqual(self.gw.service.spool.queueIds(), [])
        self.gw.stop = lambda: None


class LimitTests(SessionTestCase):
    listener = {"max_connections_per_ip": 2, "max_connections": 3}

    def test_perIPLimit(self):
        held = [self.client() for _ in range(2)]
        for c in held:
            self.assertEqual(c.reply()[0], 220)
        extra = self.client()
        code, lines = extra.reply()
        self.assertEqual((code, lines[0][:6]), (421, "4.7.0 "))
        self.assertTrue(extra.closed())
        extra.lose()
        held[0].cmd("QUIT")
        self.assertTrue(held[0].closed())
        held[0].lose()
        again = self.client()
        self.assertEqual(again.reply()[0], 220)


class RateTests(SessionTestCase):
    listener = {"connection_rate_per_ip": 3}

    def test_connectionRate(self):
        replies = []
        for _ in range(4):
            c = self.client()
            replies.append(c.reply()[0])
            c.lose()
        self.assertEqual(replies, [220, 220, 220, 421])


class _TwistdTestCase(GatewayTestCase.__bases__[0]):
    timeout = 60

    def writeConfig(self, listener=None, **kw):
        """A config with one loopback listener on a free port; returns (directory, port, path)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = freePort()
        conf = os.path.join(directory, "relaygw.toml")
        listener = dict({"endpoint": "tcp:%d:interface=127.0.0.1" % port, "relay_networks": ["127.0.0.0/8"]},
                        **(listener or {}))
        with open(conf, "w") as f:
            f.write(configText(directory, listeners=(listener,), **kw))
        return directory, port, conf

    def runTwistd(self, directory, port, conf, session):
        """
        Start twistd, run C{session(process)} once it listens (it ends with
        a SIGTERM), check that twistd exits after it; returns the output.
        """
        with twistdRunning(conf, directory) as p:
            waitForPort(port)
            session(p)
            # twistd re-raises the signal that stopped it once the drain is done.
            self.assertIn(p.wait(30), (0, -signal.SIGTERM))
        return p.output


class TwistdLifecycleTests(_TwistdTestCase):
    """SIGTERM drains a real twistd process; JSON logs carry the session id."""

    def test_sigtermAndJsonLogs(self):
        directory, port, conf = self.writeConfig({"drain_timeout": 10}, log={"format": "json"})

        def session(p):
            c = Client(port)
            c.reply()
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            p.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            c.send("Subject: t\r\n\r\nx\r\n.\r\n")
            self.assertEqual(c.reply()[0], 250)
            self.assertEqual(c.cmd("NOOP")[0], 421)

        def run():
            out = self.runTwistd(directory, port, conf, session)
            events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            self.assertTrue(events, out)
            queued = [e for e in events if e.get("event") == "queued"]
            self.assertEqual(len(queued), 1)
            self.assertTrue(queued[0]["session"])
            self.assertIn(queued[0]["session"], queued[0]["message"])
            self.assertEqual(queued[0]["recipients"], ["b@example.net"])
            self.assertEqual(queued[0]["level"], "info")
            self.assertTrue(any(e["message"] == "stopped; spool intact" for e in events))

        return inThread(run)


class TwistdWorkersTests(_TwistdTestCase):
    """[process] workers = 2 under a real twistd: both workers serve and log to the same stdout."""

    def test_bothWorkersLogToStdout(self):
        adminPort = freePort()
        directory, port, conf = self.writeConfig(relay={"defer_all": True}, process={"workers": 2},
                                                 admin={"endpoint": "tcp:%d:interface=127.0.0.1" % adminPort})
        sent = 24
        scraped = []

        def session(p):
            import urllib.request

            self.waitForWorker(directory)
            for n in range(sent):
                sendOne(port, subject="m%d" % n)
            # Worker 0's /metrics counts both workers' messages (worker 1's
            # through the snapshot it writes every second).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (not scraped or scraped[-1] != sent):
                time.sleep(0.3)
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % adminPort, timeout=5) as r:
                    text = r.read().decode()
                scraped.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                   if line.startswith("relaygw_messages_accepted_total{")))
            p.send_signal(signal.SIGTERM)

        def run():
            out = self.runTwistd(directory, port, conf, session)
            self.assertNotIn("Traceback", out)
            self.assertIn("started worker 1", out)
            self.assertEqual(out.count(" queued "), sent, out)
            self.assertEqual(scraped[-1], sent, scraped)

        return inThread(run)

    def test_lastRunsCountsLeftOut(self):
        """
        Started again, the gateway's /metrics counts this run's messages
        only: the snapshot worker 1 left at the last run's end is not this
        run's (worker 0 read it before the new worker 1 had written its
        own, and carried its counts on as a worker restarted's).
        """
        adminPort = freePort()
        directory, port, conf = self.writeConfig(relay={"defer_all": True}, process={"workers": 2},
                                                 admin={"endpoint": "tcp:%d:interface=127.0.0.1" % adminPort})
        snapshot = os.path.join(directory, "spool", "w1", "metrics.prom")

        def accepted(text):
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("relaygw_messages_accepted_total{"))

        def scrape():
            import urllib.request

            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % adminPort, timeout=5) as r:
                return accepted(r.read().decode())

        def lastRun(p):
            self.waitForWorker(directory)
            for n in range(200):  # (until worker 1 has taken some)
                sendOne(port, subject="m%d" % n)
                if n % 10 == 9:
                    time.sleep(1.2)
                    with open(snapshot) as f:
                        if accepted(f.read()):
                            break
            p.send_signal(signal.SIGTERM)

        scraped = []

        def thisRun(p):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    scraped.append(scrape())
                    break
                except OSError:
                    time.sleep(0.02)
            self.waitForWorker(directory)
            time.sleep(1.5)  # (worker 1's first snapshots written)
            scraped.append(scrape())
            p.send_signal(signal.SIGTERM)

        def run():
            self.runTwistd(directory, port, conf, lastRun)
            with open(snapshot) as f:
                self.assertTrue(accepted(f.read()))
            out = self.runTwistd(directory, port, conf, thisRun)
            self.assertNotIn("Traceback", out)
            self.assertEqual(scraped, [0, 0])

        return inThread(run)

    def test_snapshotThatCannotBeWrittenSaidOnce(self):
        """
        A worker that cannot write its metrics snapshot (a full disk; here a
        directory in its place, there at the start too) says so once, and
        once that it can again, not every second (before: a warning each
        second for as long as it lasted, and a directory there at the start
        was no cause for worker 0 to fail).
        """
        adminPort = freePort()
        directory, port, conf = self.writeConfig(relay={"defer_all": True}, process={"workers": 2},
                                                 admin={"endpoint": "tcp:%d:interface=127.0.0.1" % adminPort})
        snapshot = os.path.join(directory, "spool", "w1", "metrics.prom")
        os.makedirs(os.path.join(snapshot, "junk"))

        def session(p):
            self.waitForWorker(directory)
            time.sleep(4)
            import shutil

            shutil.rmtree(snapshot)
            waitUntil(lambda: os.path.isfile(snapshot), 10)
            time.sleep(1)
            p.send_signal(signal.SIGTERM)

        def run():
            out = self.runTwistd(directory, port, conf, session)
            self.assertNotIn("Traceback", out)
            self.assertEqual(out.count("cannot write %s" % snapshot), 1, out)
            self.assertEqual(out.count("writing %s again" % snapshot), 1, out)

        return inThread(run)

    def waitForWorker(self, directory):
        """Worker 1 listens once it has opened its spool partition (a second or two after worker 0)."""
        waitUntil(lambda: os.path.isdir(os.path.join(directory, "spool", "w1", "queue")), 20)
        time.sleep(0.5)

    def test_oneAcceptQueue(self):
        """Both workers accept from the one listening socket the main process opened."""
        directory, port, conf = self.writeConfig(relay={"defer_all": True}, process={"workers": 2})
        seen = {}

        def session(p):
            self.waitForWorker(directory)
            seen["sockets"] = listeningSockets(port)
            seen["holders"] = {pid: socketInodes(pid) for pid in spoolPids(directory).values()}
            p.send_signal(signal.SIGTERM)

        def run():
            self.runTwistd(directory, port, conf, session)
            self.assertEqual(len(seen["sockets"]), 1, seen)
            self.assertEqual(len(seen["holders"]), 2, seen)
            for pid, inodes in seen["holders"].items():
                self.assertIn(seen["sockets"][0], inodes, pid)

        return inThread(run)

    def bursts(self, listener, *sizes, command=None):
        """
        Bursts of connections at once from one address to two workers with
        C{listener}'s settings, one after another (L{burst}): a Deferred of
        each burst's reply codes, once both workers are seen to have taken
        some of them.
        """
        directory, port, conf = self.writeConfig(listener=listener, relay={"defer_all": True},
                                                 process={"workers": 2})
        got = []

        def session(p):
            self.waitForWorker(directory)
            for n in sizes:
                if got:
                    # (The workers hear of the last burst's closed sessions a moment after the close.)
                    time.sleep(1)
                got.append(burst(port, n, command))
            p.send_signal(signal.SIGTERM)

        def run():
            out = self.runTwistd(directory, port, conf, session)
            self.assertNotIn("Traceback", out)
            self.assertGreaterEqual(len(sessionProcesses(out)), 2, "one worker took every connection")
            return got

        return inThread(run)

    @defer.inlineCallbacks
    def test_perIPLimitCountsEveryWorker(self):
        """
        A client's connections count together whichever worker takes each:
        of 40 at once from one address, the 2 of C{max_connections_per_ip}
        are greeted (each worker counting its own let up to 4 in), and once
        they have gone 2 more are.
        """
        first, again = yield self.bursts({"max_connections_per_ip": 2}, 40, 40)
        self.assertEqual((first.count(220), first.count(421)), (2, 38), first)
        self.assertEqual(again.count(220), 2, again)

    def test_quitFreesTheSlotBeforeTheClose(self):
        """
        C{max_connections_per_ip} 2 with two workers: two clients from one
        address, each opening its next session only once the gateway has
        answered QUIT and closed the last, are never refused, whichever
        worker had the last session and whichever takes the next (a
        release still queued in a worker's channel when the client saw the
        close had about 1 in 15 of them told 421 4.7.0).
        """
        directory, port, conf = self.writeConfig(listener={"max_connections_per_ip": 2},
                                                 relay={"defer_all": True}, process={"workers": 2})
        codes = []

        def sessions(n):
            for _ in range(n):
                c = Client(port, timeout=15)
                try:
                    code = c.reply()[0]
                    if code == 220:
                        code = c.cmd("QUIT")[0]
                        if not c.closed():
                            code = "not closed"
                except (OSError, EOFError) as e:
                    code = str(e)
                c.close()
                codes.append(code)

        def session(p):
            self.waitForWorker(directory)
            # (150 sessions: their log lines stay within the pipe twistd writes to.)
            clients = [threading.Thread(target=sessions, args=(75,)) for _ in range(2)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            p.send_signal(signal.SIGTERM)

        def run():
            out = self.runTwistd(directory, port, conf, session)
            self.assertNotIn("Traceback", out)
            self.assertGreaterEqual(len(sessionProcesses(out)), 2, "one worker took every connection")
            self.assertEqual([c for c in codes if c != 221], [])
            self.assertEqual(len(codes), 150)

        return inThread(run)

    @defer.inlineCallbacks
    def test_connectionRateCountsEveryWorker(self):
        """
        C{connection_rate_per_ip} 4 a minute: of 30 connections at once
        from one address, 3 are greeted (the first was the check that the
        port listens).
        """
        [codes] = yield self.bursts({"connection_rate_per_ip": 4}, 30)
        self.assertEqual((codes.count(220), codes.count(421)), (3, 27), codes)

    @defer.inlineCallbacks
    def test_claimedClientsCountEveryWorker(self):
        """
        XCLIENT from a balancer both workers trust: the claimed address is
        what counts, across the workers.  Of 20 sessions at once claiming
        one address, 1 goes on; the others are told 421 4.7.0.
        """
        [codes] = yield self.bursts({"max_connections_per_ip": 1, "trusted_peers": ["127.0.0.0/8"],
                                     "extensions": ["xclient"]}, 20, command="XCLIENT ADDR=192.0.2.9")
        self.assertEqual((codes.count(220), codes.count(421)), (1, 19), codes)

    @defer.inlineCallbacks
    def test_failedLoginsCountEveryWorker(self):
        """
        12 wrong passwords at once from one address: 5 are verified (535, or
        421 for the fifth), the others refused unverified (454 4.7.0), whichever worker has
        each (each worker counting its own verified up to 10).
        """
        from tests.authexchange import b64
        from tests.test_auth_smtp import passwordFile

        [codes] = yield self.bursts({"credentials": passwordFile(self), "auth_plaintext": True}, 12,
                                    command="AUTH PLAIN " + b64("\0alice\0wrong"))
        # (The failure that reaches the limit is told 421 4.7.0 and closed.)
        self.assertEqual((codes.count(535) + codes.count(421), codes.count(454)), (5, 7), codes)

    @defer.inlineCallbacks
    def test_destinationConcurrencyIsTheGatewaysWhole(self):
        """
        C{destination_concurrency} 2 with two workers: at most 2 connections
        to the next hop at once, one a worker (each opened 2, 4 in all),
        while 24 messages from both workers go through a next hop that takes
        0.3 s a message.
        """
        hop = ScriptedSMTPFactory(endOfDataDelay=0.3)
        listening = reactor.listenTCP(0, hop, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        directory, port, conf = self.writeConfig(
            relay={"smarthosts": ["[127.0.0.1]:%d" % listening.getHost().port], "tls": "none",
                   "destination_concurrency": 2},
            process={"workers": 2})
        peak = []

        def sample():
            peak.append(sum(1 for c in hop.connections if c.transport.connected))

        sampler = task.LoopingCall(sample)
        sampler.start(0.02)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        sent = 24

        def session(p):
            self.waitForWorker(directory)
            threads = [threading.Thread(target=sendOne, args=(port,), kwargs={"subject": "c%d" % n})
                       for n in range(sent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            waitUntil(lambda: len(hop.transactions) >= sent, 20)
            p.send_signal(signal.SIGTERM)

        out = yield inThread(self.runTwistd, directory, port, conf, session)
        self.assertNotIn("Traceback", out)
        self.assertEqual(len(hop.transactions), sent)
        self.assertEqual(len(sessionProcesses(out)), 2, "one worker took every message")
        self.assertEqual(max(peak), 2, peak)

    def test_stoppedProcessStrandsNoConnection(self):
        """
        With the main process stopped (SIGSTOP), every new connection is
        still served, by worker 1: none waits in a queue of the stopped
        process, as a connection hashed to its own SO_REUSEPORT socket would.
        """
        directory, port, conf = self.writeConfig(relay={"defer_all": True}, process={"workers": 2})
        served = []

        def session(p):
            self.waitForWorker(directory)
            p.send_signal(signal.SIGSTOP)
            try:
                # (A process woken for a connection just as it stops holds
                # that one until another wakes the worker: wait for the stop.)
                waitUntil(lambda: processState(p.pid) == "T", 10)
                for n in range(12):
                    c = Client(port, timeout=5)
                    served.append(c.reply()[0])
                    c.cmd("QUIT")
                    c.close()
            finally:
                p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)

        def run():
            self.runTwistd(directory, port, conf, session)
            self.assertEqual(served, [220] * 12)

        return inThread(run)


def burst(port, n, command=None):
    """
    C{n} connections at once, held until every one has its first reply (or,
    given C{command}, the reply to it after the greeting); those replies' codes.
    """
    codes, ready = [], threading.Barrier(n + 1, timeout=30)

    def one():
        try:
            c = Client(port, timeout=15)
        except OSError as e:
            codes.append(str(e))
            ready.wait()
            return
        try:
            code = c.reply()[0]
            codes.append(c.cmd(command)[0] if command and code == 220 else code)
        except (OSError, EOFError) as e:
            codes.append(str(e))
        ready.wait()
        c.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    return codes


def sessionProcesses(out):
    """
    How many processes served the sessions in twistd's output C{out}: each
    counts its session ids up from a random start of its own.
    """
    ids = sorted({int(i, 16) for i in re.findall(r"\[([0-9a-f]{12})\] (?:connect from|NOQUEUE)", out)})
    return [i for n, i in enumerate(ids) if n == 0 or i - ids[n - 1] > 100000]


def socketInodes(pid):
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listeningSockets(port):
    """The inodes of the listening TCP sockets on 127.0.0.1:C{port} (/proc/net/tcp)."""
    inodes = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "0100007F:%04X" % port and fields[3] == "0A":
                inodes.append(int(fields[9]))
    return inodes


class WorkerShareTests(unittest.TestCase):
    def test_partsAddUpToTheWhole(self):
        """A gateway-wide limit split over the workers: the parts add up to it, each at least 1."""
        from types import SimpleNamespace

        from relaygw.workers import WorkerRole

        def parts(total, workers):
            config = SimpleNamespace(spool=SimpleNamespace(directory=self.mktemp()),
                                     process=SimpleNamespace(workers=workers))
            return [WorkerRole(config, reactor, worker).share(total) for worker in range(workers)]

        self.assertEqual(parts(10, 1), [10])
        self.assertEqual(parts(10, 2), [5, 5])
        self.assertEqual(parts(10, 3), [4, 3, 3])
        self.assertEqual(parts(2, 4), [1, 1, 1, 1])

    def test_aLimitBelowTheWorkersIsNamed(self):
        """Worker 0 says when the parts exceed the whole (each worker opens at least one connection)."""
        from types import SimpleNamespace

        from relaygw.workers import WorkerRole
        from tests.recorders import LogCapture

        log = LogCapture(self)
        config = SimpleNamespace(spool=SimpleNamespace(directory=self.mktemp()), process=SimpleNamespace(workers=3))
        for worker in range(3):
            WorkerRole(config, reactor, worker).share(2)
            WorkerRole(config, reactor, worker).share(3)
        [warning] = log.find("is below workers")
        self.assertEqual((warning["total"], warning["workers"]), (2, 3))


class TwistdReloadTests(_TwistdTestCase):
    """SIGHUP: certificates and the safe parts of the config, without a restart."""

    def test_sighupReloadsConfigAndCertificate(self):
        import ssl

        from relaygw.tls import generateSelfSigned

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        generateSelfSigned(cert, key, "relay.test")
        port = freePort()
        conf = os.path.join(directory, "relaygw.toml")

        def write(hostname):
            with open(conf, "w") as f:
                f.write(configText(directory, listeners=({
                    "endpoint": "tcp:%d:interface=127.0.0.1" % port, "hostname": hostname,
                    "tls_certificate": cert, "tls_key": key},)))

        def peer():
            c = Client(port)
            greeting = c.line()
            c.cmd("EHLO x")
            c.cmd("STARTTLS")
            c.sock = clientContext().wrap_socket(c.sock, server_hostname="relay.test")
            der = c.sock.getpeercert(binary_form=True)
            c.close()
            return greeting, der

        def run():
            write("before.test")
            with twistdRunning(conf, directory) as p:
                waitForPort(port)
                greeting, der1 = peer()
                self.assertTrue(greeting.startswith("220 before.test "), greeting)
                write("after.test")
                os.unlink(cert)
                os.unlink(key)
                generateSelfSigned(cert, key, "relay.test")
                p.send_signal(signal.SIGHUP)
                time.sleep(1)
                greeting, der2 = peer()
                self.assertTrue(greeting.startswith("220 after.test "), greeting)
                self.assertNotEqual(der1, der2)
                with open(cert) as f:
                    self.assertEqual(der2, ssl.PEM_cert_to_DER_cert(f.read()))
            out = p.output
            self.assertIn("reload: listener l0: changed hostname", out)
            # One line for the certificate's reload (there were two), with what was loaded.
            [line] = [line for line in out.splitlines() if cert in line and "reloaded" in line]
            self.assertIn("TLS certificate %s reloaded: " % cert, line)

        return inThread(run)


class SessionIdTests(unittest.TestCase):
    """Session ids: 12 hex digits, a new one for every session, and not the same sequence in every process."""

    def test_distinctAndHex(self):
        ids = [newSessionId() for _ in range(1000)]
        self.assertEqual(len(set(ids)), 1000)
        for i in ids:
            self.assertRegex(i, r"\A[0-9a-f]{12}\Z")

    def test_otherProcessesStartElsewhere(self):
        root = os.path.dirname(os.path.dirname(relaygw.__file__))
        code = "from relaygw.lifecycle import newSessionId; print(newSessionId())"
        starts = {subprocess.check_output([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=root)).strip()
                  for _ in range(3)}
        self.assertEqual(len(starts), 3)
