"""
The drain on SIGTERM, in order: /healthz 503 at once, still accepting for
drain_delay, then no longer listening (what the kernel had queued gets
421 4.3.2, never a reset; later attempts are refused), and the process
gone within drain_delay + drain_timeout + 5 s, every worker in parallel.
"""

import collections
import ctypes
import errno
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import config
from relaygw.listeners import closeListeningPort, refuseNewHandshakes
from relaygw.testing import Client, Gateway, configText, freePort, inThread, waitForPort
from tests.messages import startData
from tests.processes import childPids, portRefused, processAlive, runTwistd, spoolPids, waitUntil
from tests.recorders import slowCommits
from tests.sessions import GatewayTestCase


def health(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class DrainDelayConfigTests(unittest.TestCase):
    def test_defaultFollowsTheAdminEndpoint(self):
        def delay(text):
            c = config.parse(text)
            return config.drainDelay(c, c.listeners[0])

        base = "[[listener]]\nname = \"a\"\nendpoint = \"tcp:25\"\n"
        self.assertEqual(delay(base), 0)
        admin = "[admin]\nendpoint = \"tcp:8081:interface=127.0.0.1\"\n" + base
        self.assertEqual(delay(admin), config.DRAIN_DELAY)
        self.assertEqual(delay(admin + "drain_delay = 1.5\n"), 1.5)
        with self.assertRaises(config.ConfigError) as caught:
            config.parse(base + "drain_delay = -1\n")
        self.assertIn("drain_delay", str(caught.exception))

    def test_defaultFollowsTheRunningAdminEndpoint(self):
        """
        A reload that removes (or adds) the admin endpoint, which only a
        restart does, leaves the default drain_delay as it was.
        """
        from relaygw.reload import applicable

        base = "[[listener]]\nname = \"a\"\nendpoint = \"tcp:25\"\n"
        admin = config.parse("[admin]\nendpoint = \"tcp:8081:interface=127.0.0.1\"\n" + base)
        plain = config.parse(base)
        for old, new, expected in ((admin, plain, config.DRAIN_DELAY), (plain, admin, 0)):
            applied = applicable(old, new)
            self.assertEqual(config.drainDelay(applied, applied.listeners[0]), expected)


class DrainOrderTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_healthFirstThenStopListening(self):
        adminPort = freePort()
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"], "drain_delay": 1.0,
                                                "drain_timeout": 1},),
                     admin={"endpoint": "tcp:%d:interface=127.0.0.1" % adminPort}, relay={"defer_all": True})
        yield gw.start()
        port = gw.port
        self.assertEqual((yield inThread(health, adminPort)), 200)
        started = time.monotonic()
        stopping = gw.service.stopService()
        # At once: the balancer's health check fails...
        self.assertEqual((yield inThread(health, adminPort)), 503)

        def served():
            c = Client(port)
            try:
                code = c.reply()[0]
                return code, c.cmd("EHLO x")[0]
            finally:
                c.close()

        # ...while a client that still comes is served as usual.
        self.assertEqual((yield inThread(served)), (220, 250))
        yield task.deferLater(reactor, 1.3, lambda: None)
        self.assertTrue((yield inThread(portRefused, port)))
        yield stopping
        self.assertLess(time.monotonic() - started, 1.0 + 1 + 5)

    @defer.inlineCallbacks
    def test_queuedConnectionsGet421NotAReset(self):
        """Connections the kernel completed but nobody accepted yet are answered 421 4.3.2 when the port closes."""
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},))
        yield gw.start()
        self.addCleanup(gw.stop)
        [listening] = gw.service.listeningPorts
        listening.stopReading()  # as if the reactor were busy: connections wait in the backlog
        gw.service.factories[0].draining = True

        def connect():
            return [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(5)]

        socks = yield inThread(connect)
        closeListeningPort(listening)

        def replies():
            out = []
            for s in socks:
                data = b""
                try:
                    while not data.endswith(b"\r\n"):
                        chunk = s.recv(1024)
                        if not chunk:
                            break
                        data += chunk
                except ConnectionResetError:
                    data = b"RESET"
                s.close()
                out.append(data[:9])
            return out

        self.assertEqual((yield inThread(replies)), [b"421 4.3.2"] * 5)
        self.assertTrue((yield inThread(portRefused, gw.port)))

    def test_noHandshakeCompletesOnceClosingStarts(self):
        """
        Once a listening socket starts closing, a new client's handshake is
        left unanswered (it is refused when it tries again) while what was
        queued before is still accepted: nothing can slip into the queue
        between the last accept and the close, to be reset by it.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(queued.close)
        self.assertTrue(refuseNewHandshakes(listening))
        late = socket.socket()
        self.addCleanup(late.close)
        late.settimeout(0.5)
        self.assertRaises(socket.timeout, late.connect, ("127.0.0.1", port))
        accepted, _ = listening.accept()
        accepted.sendall(b"421 4.3.2 closing\r\n")
        self.assertEqual(queued.recv(100), b"421 4.3.2 closing\r\n")
        accepted.close()
        listening.setblocking(False)
        self.assertRaises(BlockingIOError, listening.accept)  # the late one never got in
        listening.close()
        self.assertTrue(portRefused(port))


    def test_aHandshakeAlreadyAnsweredCompletes(self):
        """
        A client whose SYN was answered just before the filter went on gets
        its handshake completed and accepted: dropping its ACK too left it
        connected, as far as it knew, waiting for a greeting that never came.
        (Its SYN-ACK is held back by a filter on the client's socket until
        the listener refuses new handshakes; the listener sends it again a
        second later.)
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        client = socket.socket()
        self.addCleanup(client.close)
        dropAll = (_Instruction * 1)(_Instruction(0x06, 0, 0, 0))
        client.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(_Program(1, dropAll)))
        client.setblocking(False)
        self.assertEqual(client.connect_ex(("127.0.0.1", port)), errno.EINPROGRESS)
        time.sleep(0.1)  # (the SYN answered, the answer dropped at the client)
        self.assertTrue(refuseNewHandshakes(listening))
        client.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        listening.settimeout(4)
        accepted, _ = listening.accept()
        accepted.sendall(b"421 4.3.2 closing\r\n")
        client.setblocking(True)
        client.settimeout(5)
        self.assertEqual(client.recv(100), b"421 4.3.2 closing\r\n")
        accepted.close()


_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27  # (Linux's; the socket module names neither)


class _Instruction(ctypes.Structure):
    """A classic BPF instruction (C{struct sock_filter})."""
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    """C{struct sock_fprog}."""
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def ended(process, directory):
    """Kill C{process} if it still runs; what it logged."""
    if process.poll() is None:
        process.kill()
        process.wait()
    with open(os.path.join(directory, "twistd.log")) as f:
        return f.read()


class TwistdDrainTests(unittest.TestCase):
    timeout = 60

    def test_workersDrainTogetherWithinTheBound(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port, adminPort = freePort(), freePort()
        conf = os.path.join(directory, "relaygw.toml")
        delay, timeout = 2.0, 2.0
        with open(conf, "w") as f:
            f.write(configText(directory, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % port, "relay_networks": ["127.0.0.0/8"],
                "drain_delay": delay, "drain_timeout": timeout},), relay={"defer_all": True},
                process={"workers": 2}, admin={"endpoint": "tcp:%d:interface=127.0.0.1" % adminPort}))

        def run():
            p = runTwistd(conf, directory)
            try:
                waitForPort(port)
                self.assertTrue(waitUntil(lambda: "w1" in spoolPids(directory), 20))
                worker = spoolPids(directory)["w1"]
                time.sleep(0.5)
                # A session in a transaction, that never finishes.
                c = Client(port)
                c.reply()
                c.cmd("EHLO x")
                c.cmd("MAIL FROM:<a@example.org>")
                started = time.monotonic()
                p.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                self.assertEqual(health(adminPort), 503)
                probe = Client(port)
                self.assertEqual(probe.reply()[0], 220)  # still accepting within drain_delay
                probe.close()
                self.assertTrue(waitUntil(lambda: portRefused(port), delay + 2))
                self.assertGreaterEqual(time.monotonic() - started, delay - 0.2)
                code, lines = c.reply()  # the drain timeout ran out
                self.assertEqual((code, lines[0][:5]), (421, "4.3.2"))
                p.wait(delay + timeout + 5)
                elapsed = time.monotonic() - started
                self.assertLess(elapsed, delay + timeout + 5)
                self.assertTrue(waitUntil(lambda: not processAlive(worker), 1))
                c.close()
            finally:
                out = ended(p, directory)
            self.assertEqual(out.count("still accepting for 2.0s (drain_delay)"), 2, out)  # both workers
            self.assertEqual(out.count("stopped; spool intact"), 2, out)

        return inThread(run)

    def twoWorkers(self, drainDelay=0):
        """A config of two workers, deferring all mail, with a 1 s drain: (directory, port, config path)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = freePort()
        conf = os.path.join(directory, "relaygw.toml")
        with open(conf, "w") as f:
            f.write(configText(directory, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % port, "relay_networks": ["127.0.0.0/8"],
                "drain_timeout": 1, "drain_delay": drainDelay},), relay={"defer_all": True}, process={"workers": 2}))
        return directory, port, conf

    def started(self, conf, directory, port):
        """twistd on C{conf}, both workers listening: (the process, worker 1's pid)."""
        p = runTwistd(conf, directory)
        try:
            waitForPort(port)
            self.assertTrue(waitUntil(lambda: "w1" in spoolPids(directory), 20))
            time.sleep(1.0)  # (listening by now)
            [worker] = childPids(p.pid)
        except BaseException:
            ended(p, directory)
            raise
        return p, worker

    def test_connectionsDuringTheStopAreNeverReset(self):
        """
        Clients connecting in a tight loop while two workers stop
        listening: each gets a greeting (220 or 421 4.3.2) or is refused,
        and none is reset (a connection completed between a worker's last
        accept and the last close of the shared socket was).
        """
        directory, port, conf = self.twoWorkers()

        def client(stop, seen):
            while not stop.is_set():
                s = socket.socket()
                s.settimeout(10)
                try:
                    s.connect(("127.0.0.1", port))
                    greeting = s.recv(100)
                    seen[greeting[:3].decode() or "closed"] += 1
                    if greeting.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(100)
                except ConnectionRefusedError:
                    seen["refused"] += 1
                    time.sleep(0.01)
                except ConnectionResetError:
                    seen["reset"] += 1
                except OSError as e:
                    seen[type(e).__name__] += 1
                finally:
                    s.close()

        def run():
            seen = collections.Counter()
            for _ in range(3):
                p = runTwistd(conf, directory)
                try:
                    waitForPort(port)
                    self.assertTrue(waitUntil(lambda: "w1" in spoolPids(directory), 20))
                    time.sleep(0.5)
                    stop = threading.Event()
                    threads = [threading.Thread(target=client, args=(stop, seen)) for _ in range(8)]
                    for t in threads:
                        t.start()
                    time.sleep(0.5)
                    p.send_signal(signal.SIGTERM)
                    time.sleep(1.5)
                    stop.set()
                    for t in threads:
                        t.join(20)
                    p.wait(10)
                finally:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            self.assertEqual(seen["reset"], 0, seen)
            self.assertEqual(set(seen) - {"220", "421", "refused"}, set(), seen)
            self.assertGreater(seen["220"], 0, seen)
            self.assertGreater(seen["refused"], 0, seen)

        return inThread(run)

    def test_anotherStopSignalWhileDraining(self):
        """
        SIGTERM again while the drain goes on (to the main process, and
        straight to a worker, as C{pkill} does): a line says so, and the
        drain goes on to its end; the reactor's own handler tried to stop
        it a second time (a critical traceback).
        """
        directory, port, conf = self.twoWorkers(drainDelay=2)

        def run():
            p, worker = self.started(conf, directory, port)
            try:
                c = Client(port)  # a session in a transaction, until the drain timeout
                c.reply()
                c.cmd("EHLO x")
                c.cmd("MAIL FROM:<a@example.org>")
                p.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                p.send_signal(signal.SIGTERM)
                os.kill(worker, signal.SIGTERM)
                code, lines = c.reply()
                self.assertEqual((code, lines[0][:5]), (421, "4.3.2"))
                c.close()
                p.wait(15)
                self.assertEqual(p.returncode, -signal.SIGTERM)  # (twistd ends with the signal that stopped it)
            finally:
                out = ended(p, directory)
            self.assertEqual(out.count("received SIGTERM while draining; the drain goes on"), 2, out)
            self.assertEqual(out.count("stopped; spool intact"), 2, out)
            self.assertNotIn("Traceback", out)
            self.assertNotIn("critical", out)

        return inThread(run)

    def test_aWorkerStoppedAloneLeavesTheSocketOpen(self):
        """
        One worker told to stop (SIGTERM to it alone) while the main process
        goes on: the shared listening socket stays open to new clients, for
        the main process and for the worker it starts again.
        """
        directory, port, conf = self.twoWorkers()

        def run():
            p, worker = self.started(conf, directory, port)
            try:
                os.kill(worker, signal.SIGTERM)
                self.assertTrue(waitUntil(lambda: not processAlive(worker), 15))
                self.assertTrue(waitUntil(lambda: len(childPids(p.pid)) == 1, 15))  # started again
                time.sleep(1.0)
                greetings = []
                for _ in range(20):
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        greetings.append(s.recv(100)[:3])
                self.assertEqual(greetings, [b"220"] * 20)
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except Exception:
                    p.kill()
                    p.wait()

        return inThread(run)


class CommitAtTheDrainTimeoutTests(GatewayTestCase):
    """
    The drain timeout runs out while a message's commit is under way (its
    final dot read, the disk slow to sync): the session gets the commit's
    reply, then 421 4.3.2 and the close.  (It was told 421 at once while
    the commit went on and queued the message: the client sent it again.)
    """

    listener = {"relay_networks": ["127.0.0.0/8"], "drain_timeout": 0.5}
    relay = {"defer_all": True}

    @defer.inlineCallbacks
    def test_commitAnsweredBeforeTheShutdown(self):
        spool = self.gw.service.spool
        started = slowCommits(self, spool, 1.5)

        def begin():
            c = Client(self.gw.port, timeout=10)
            self.addCleanup(c.close)
            c.reply()
            startData(c)
            c.send("Subject: at the timeout\r\n\r\nbody\r\n.\r\n")
            return c

        c = yield inThread(begin)
        while not started:
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield self.gw.service.stopService()
        self.gw.stop = lambda: None
        code, lines = yield inThread(c.reply)
        queued = spool.queueIds()
        self.assertEqual((code, queued), (250, [lines[0].rsplit(" ", 1)[1]]), lines)
        self.assertEqual((yield inThread(c.reply))[0], 421)
