"""Metrics and the admin endpoint: unit tests, then /healthz and /metrics over real loopback HTTP."""

import base64
import os
import socket
import subprocess
import sys
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from relaygw import admin
from relaygw.admin import makeAdminSite
from relaygw.metrics import Metrics
from relaygw.testing import Client, Gateway, inThread
from tests.sessions import GatewayTestCase


class MetricsTests(unittest.TestCase):
    def setUp(self):
        self.m = Metrics()

    def value(self, name, **labels):
        return self.m.registry.get_sample_value(name, labels)

    def test_privateRegistry(self):
        """Each instance has its own registry, or the second would raise Duplicated timeseries."""
        other = Metrics()
        self.assertIsNot(other.registry, self.m.registry)
        registry = CollectorRegistry()
        self.assertIs(Metrics(registry).registry, registry)

    def test_connection(self):
        self.m.connection("in", +1)
        self.m.connection("in", +1)
        self.m.connection("in", -1)
        self.assertEqual(self.value("relaygw_connections_open", listener="in"), 1)
        self.assertEqual(self.value("relaygw_connections_total", listener="in"), 2)

    def test_commandsCapped(self):
        for verb in ("MAIL", "MAIL", "XCLIENT", "FROB", "GET"):
            self.m.event("in", "command", verb)
        self.assertEqual(self.value("relaygw_commands_total", listener="in", command="MAIL"), 2)
        self.assertEqual(self.value("relaygw_commands_total", listener="in", command="XCLIENT"), 1)
        self.assertEqual(self.value("relaygw_commands_total", listener="in", command="other"), 2)
        self.assertIsNone(self.value("relaygw_commands_total", listener="in", command="FROB"))

    def test_replyClasses(self):
        for code in (250, 250, 354, 421, 554, 199):
            self.m.event("in", "reply", code)
        for cls, n in (("2xx", 2), ("3xx", 1), ("4xx", 1), ("5xx", 1)):
            self.assertEqual(self.value("relaygw_replies_total", listener="in", **{"class": cls}), n)
        self.assertNotIn(b'class="1xx"', self.m.render())

    def test_tlsAuthVerbs(self):
        self.m.event("in", "tls_handshakes")
        self.m.event("in", "auth", "success")
        self.m.event("in", "auth", "failure")
        self.m.event("in", "auth", "failure")
        self.m.event("in", "verb_used", "XCLIENT")
        self.m.event("in", "verb_refused", "XCLIENT")
        self.m.event("in", "verb_refused", "XSETCONTEXT")
        self.assertEqual(self.value("relaygw_tls_handshakes_total", listener="in"), 1)
        self.assertEqual(self.value("relaygw_auth_total", listener="in", result="success"), 1)
        self.assertEqual(self.value("relaygw_auth_total", listener="in", result="failure"), 2)
        for verb, result in (("XCLIENT", "used"), ("XCLIENT", "refused"), ("XSETCONTEXT", "refused")):
            self.assertEqual(self.value("relaygw_trusted_verbs_total", listener="in", verb=verb,
                                        result=result), 1)
        self.assertIsNone(self.value("relaygw_trusted_verbs_total", listener="in", verb="XSETCONTEXT",
                                     result="used"))

    def test_unknownKindIgnored(self):
        def relaygwLines():
            # The process collector's figures (CPU, memory) move between two renders.
            text = self.m.render()
            text = text.decode() if isinstance(text, bytes) else text
            return [line for line in text.splitlines() if "process_" not in line]

        before = relaygwLines()
        self.m.event("in", "no_such_kind", 1, 2)
        self.m.event("in", "spool_full")
        self.assertEqual(relaygwLines(), before)
        self.assertTrue(any(line.startswith("relaygw_") for line in before))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_queued(self):
        self.m.queued("in", 100, 0.003)
        self.m.queued("in", 50, 0.2)
        self.assertEqual(self.value("relaygw_messages_accepted_total", listener="in"), 2)
        self.assertEqual(self.value("relaygw_message_bytes_total", listener="in"), 150)
        self.assertEqual(self.value("relaygw_fsync_seconds_count"), 2)
        self.assertAlmostEqual(self.value("relaygw_fsync_seconds_sum"), 0.203)
        self.assertEqual(self.value("relaygw_fsync_seconds_bucket", le="0.005"), 1)

    def test_delivery(self):
        self.m.delivery("smtp:mx.example", "ok")
        self.m.delivery("smtp:mx.example", "defer")
        self.m.delivery("smtp:mx.example", "defer")
        self.m.delivery("lmtp:local", "bounce")
        value = lambda hop, result: self.value("relaygw_delivery_attempts_total", nexthop=hop, result=result)
        self.assertEqual(value("smtp:mx.example", "ok"), 1)
        self.assertEqual(value("smtp:mx.example", "defer"), 2)
        self.assertEqual(value("lmtp:local", "bounce"), 1)

    def test_spoolProbeAtScrape(self):
        """The probe runs once per scrape, not when it is set."""
        calls = []
        state = [(7, 42.5)]

        def probe():
            calls.append(1)
            return state[0]

        self.assertNotIn(b"relaygw_spool_messages ", self.m.render())
        self.m.setSpoolProbe(probe)
        self.assertEqual(calls, [])
        text = self.m.render()
        self.assertIn(b"relaygw_spool_messages 7.0\n", text)
        self.assertIn(b"relaygw_spool_oldest_age_seconds 42.5\n", text)
        self.assertEqual(len(calls), 1)
        state[0] = (0, 0.0)
        self.assertEqual(self.value("relaygw_spool_messages"), 0)
        self.assertEqual(self.value("relaygw_spool_oldest_age_seconds"), 0)

    def test_spoolProbeFailure(self):
        """A failing probe drops the spool series and is logged; the rest still renders."""
        self.m.connection("in", +1)
        self.m.setSpoolProbe(lambda: 1 // 0)
        text = self.m.render()
        self.assertIn(b'relaygw_connections_open{listener="in"} 1.0', text)
        self.assertNotIn(b"relaygw_spool_messages ", text)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_neverRaises(self):
        self.m.event("in", "reply", "not-a-number")
        self.m.event("in", "command")
        self.m.connection("in", "x")
        self.m.queued("in", None, 0.1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError, IndexError, TypeError)), 4)
        self.assertIsInstance(self.m.render(), bytes)


class WorkerMetricsTests(unittest.TestCase):
    """With several workers, worker 0's /metrics adds in the others' snapshots."""

    def snapshot(self, metrics):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(metrics.render())
        return path

    def test_countsAddedUp(self):
        from prometheus_client.parser import text_string_to_metric_families

        own, other = Metrics(), Metrics()
        for m, n in ((own, 2), (other, 3)):
            for _ in range(n):
                m.connection("in", +1)
                m.queued("in", 100, 0.001)
        other.connection("other", +1)
        own.setSpoolProbe(lambda: (4, 10.0))
        other.setSpoolProbe(lambda: (1, 30.0))
        own.peers = [self.snapshot(other), self.mktemp()]  # the second is missing: left out
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(own.render().decode()) for s in f.samples}
        self.assertEqual(samples["relaygw_connections_total", (("listener", "in"),)], 5)
        self.assertEqual(samples["relaygw_connections_total", (("listener", "other"),)], 1)
        self.assertEqual(samples["relaygw_connections_open", (("listener", "in"),)], 5)
        self.assertEqual(samples["relaygw_message_bytes_total", (("listener", "in"),)], 500)
        self.assertEqual(samples["relaygw_fsync_seconds_count", ()], 5)
        self.assertEqual(samples["relaygw_fsync_seconds_bucket", (("le", "0.002"),)], 5)
        self.assertEqual(samples["relaygw_spool_messages", ()], 5)
        self.assertEqual(samples["relaygw_spool_oldest_age_seconds", ()], 30.0)

    def test_eachFamilyDescribedOnce(self):
        """
        One HELP and one TYPE line for each name, as the text format wants
        (before: a family of the other worker's _created samples came back
        empty, its HELP and TYPE lines a second time).
        """
        own, other = Metrics(), Metrics()
        for m in (own, other):
            m.connection("in", +1)
            m.queued("in", 100, 0.001)
        own.peers = [self.snapshot(other)]
        lines = own.render().decode().splitlines()
        described = [line.split()[2] for line in lines if line.startswith(("# HELP ", "# TYPE "))]
        self.assertIn("relaygw_connections_created", described)
        self.assertEqual([n for n in set(described) if described.count(n) != 2], [])


    def test_garbledSnapshotLeftOut(self):
        """
        A snapshot cut short or not text (a crash before its blocks reached
        the disk) is left out, and the rest is served (before: nothing was).
        """
        own, other = Metrics(), Metrics()
        own.connection("in", +1)
        other.connection("in", +1)
        garbled = []
        for content in (other.render()[:-10], b"\xff\xfe\x00", b"x{"):
            garbled.append(self.mktemp())
            with open(garbled[-1], "wb") as f:
                f.write(content)
        own.peers = garbled + [self.snapshot(other)]
        self.assertIn(b'relaygw_connections_total{listener="in"} 2.0\n', own.render())
        self.assertEqual(self.flushLoggedErrors(), [])

    def workerSnapshot(self, path, connections):
        """A worker process counting C{connections} connections writes its snapshot to C{path}, then ends."""
        script = ("import sys\nfrom relaygw.metrics import Metrics\nm = Metrics()\n"
                  "for _ in range(int(sys.argv[2])): m.connection('in', +1)\n"
                  "open(sys.argv[1], 'wb').write(m.render())\n")
        subprocess.run([sys.executable, "-c", script, path, str(connections)], check=True, timeout=60)

    def test_countersGoOnWhenAWorkerRestarts(self):
        """
        A worker started again counts from zero; the merged counters go on
        from where its last snapshot left them (before: they fell back, or
        lost what the worker had counted before).
        """
        own = Metrics()
        own.peers = [os.path.abspath(self.mktemp())]

        def merged():
            for line in own.render().decode().splitlines():
                if line.startswith('relaygw_connections_total{listener="in"}'):
                    return float(line.split()[-1])

        seen = []
        for connections in (3, 1, 5):
            self.workerSnapshot(own.peers[0], connections)
            seen.append(merged())
        self.assertEqual(seen, [3, 4, 9])


class Fetcher:
    """GET over loopback with an Agent whose connections are closed in cleanup."""

    def __init__(self, testCase):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        testCase.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def get(self, port, path):
        response = yield self.agent.request(b"GET", b"http://127.0.0.1:%d%s" % (port, path))
        body = yield readBody(response)
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        return response.code, body, ctype


class AdminSiteTests(unittest.TestCase):
    """L{makeAdminSite} on a real loopback port."""

    def setUp(self):
        self.metrics = Metrics()
        self.healthy = (True, "ok")
        site = makeAdminSite(self.metrics, lambda: self.healthy)
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        self.fetcher = Fetcher(self)

    @defer.inlineCallbacks
    def test_healthz(self):
        code, body, ctype = yield self.fetcher.get(self.port, b"/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertTrue(ctype.startswith(b"text/plain"))
        self.healthy = (False, "spool not writable")
        code, body, ctype = yield self.fetcher.get(self.port, b"/healthz")
        self.assertEqual((code, body), (503, b"spool not writable\n"))
        self.assertTrue(ctype.startswith(b"text/plain"))

    @defer.inlineCallbacks
    def test_healthzRaising(self):
        def health():
            raise RuntimeError("boom")

        site = makeAdminSite(self.metrics, health)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        code, body, _ = yield self.fetcher.get(port.getHost().port, b"/healthz")
        self.assertEqual((code, body), (503, b"health check failed\n"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_metricsRaising(self):
        """A render that fails is a failed scrape (500), not a page without series (200 and nothing)."""
        class Broken:
            def collect(self):
                raise RuntimeError("boom")

        self.metrics.registry.register(Broken())
        code, body, ctype = yield self.fetcher.get(self.port, b"/metrics")
        self.assertEqual((code, body), (500, b"metrics unavailable\n"))
        self.assertTrue(ctype.startswith(b"text/plain"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_metrics(self):
        self.metrics.event("in", "command", "EHLO")
        self.metrics.setSpoolProbe(lambda: (3, 1.5))
        code, body, ctype = yield self.fetcher.get(self.port, b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(ctype, CONTENT_TYPE_LATEST.encode("ascii"))
        self.assertIn(b'relaygw_commands_total{command="EHLO",listener="in"} 1.0\n', body)
        self.assertIn(b"relaygw_spool_messages 3.0\n", body)
        self.metrics.event("in", "command", "EHLO")
        code, body, _ = yield self.fetcher.get(self.port, b"/metrics")
        self.assertIn(b'relaygw_commands_total{command="EHLO",listener="in"} 2.0\n', body)

    @defer.inlineCallbacks
    def test_otherPathsNotFound(self):
        for path in (b"/", b"/nothing", b"/metrics/x", b"/healthz/", b"/favicon.ico"):
            code, _, _ = yield self.fetcher.get(self.port, path)
            self.assertEqual(code, 404, path)

    @defer.inlineCallbacks
    def test_absoluteForm(self):
        """
        A request target in absolute form names the same page, as a server
        must accept it (RFC 9112, 3.2.2); before: every such request was a 404.
        """
        for target, status in ((b"http://127.0.0.1/healthz", b"200"), (b"HTTP://admin.example:80/healthz?x", b"200"),
                               (b"http://127.0.0.1", b"404"), (b"http://127.0.0.1/nothing", b"404")):
            received, _ = yield inThread(_readAll, self.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            self.assertEqual(received.split(b" ", 2)[1], status, target)
            if status == b"200":
                self.assertTrue(received.endswith(b"\r\n\r\nok\n"), received)


def _readAll(port, request, timeout=10, pace=None):
    """
    Send C{request} to the admin port (a byte each C{pace} seconds if
    given) and read until the server closes: (what it sent, seconds taken).
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if pace is None:
                s.sendall(request)
            else:
                for octet in request:
                    s.sendall(bytes([octet]))
                    time.sleep(pace)
        except OSError:
            pass  # closed while still sending
        received = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def _closed(s):
    """Whether the server closed or aborted socket C{s} (waiting for it up to the socket's timeout)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


class AdminLimitsTests(unittest.TestCase):
    """What one admin client can cost the worker it shares with SMTP sessions is bounded."""

    def setUp(self):
        site = makeAdminSite(Metrics(), lambda: (True, "ok"))
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @defer.inlineCallbacks
    def test_oneRequestPerConnection(self):
        """Pipelined requests never read: one response is rendered, then the connection closes."""
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        received, _ = yield inThread(_readAll, self.port, request * 200)
        self.assertEqual(received.count(b"HTTP/1.1 200 OK\r\n"), 1)
        self.assertIn(b"\r\nConnection: close\r\n", received)
        self.assertIn(b"relaygw_", received)

    @defer.inlineCallbacks
    def test_slowRequestCutAtTheLifetime(self):
        """A request sent a byte at a time (each resetting the idle timeout) is cut at LIFETIME."""
        self.patch(admin, "LIFETIME", 1.0)
        received, took = yield inThread(_readAll, self.port, b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 40,
                                        pace=0.02)
        self.assertEqual(received, b"")
        self.assertTrue(0.9 <= took < 5, took)

    @defer.inlineCallbacks
    def test_bodyCutOffPastTheLimit(self):
        """
        A chunked body that never ends is kept in memory and cut off past
        MAX_BODY (before: twisted.web spooled it to a temporary file, 1.5 GB
        in 4.5 s, for as long as the connection lasted); a small one is
        read and answered.
        """
        import tempfile

        spooled = []
        real = tempfile.TemporaryFile
        self.patch(tempfile, "TemporaryFile", lambda *a, **kw: spooled.append(1) or real(*a, **kw))
        chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
        head = b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        received, took = yield inThread(_readAll, self.port, head + chunk * 64)
        self.assertEqual(received, b"")
        self.assertLess(took, 5)
        self.assertEqual(spooled, [])
        received, _ = yield inThread(_readAll, self.port, head + chunk + b"0\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 405 "), received[:40])
        self.assertEqual(spooled, [])

    @defer.inlineCallbacks
    def test_idleConnectionsGiveWay(self):
        """
        With every connection taken by clients that sent no whole request,
        a health check still gets its answer: the oldest idle connection
        is closed for it (before, they held it out for LIFETIME seconds).
        """
        self.patch(admin, "MAX_CONNECTIONS", 3)
        idle = [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(3)]
        try:
            idle[1].sendall(b"GET /healthz HTTP/1.1\r\n")  # a partial request is no request yet
            yield deferLater(reactor, 0.2, lambda: None)
            received, _ = yield inThread(_readAll, self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
            self.assertTrue((yield inThread(_closed, idle[0])))  # the oldest was cut off
            idle.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))  # all taken again
            yield deferLater(reactor, 0.2, lambda: None)
            received, _ = yield inThread(_readAll, self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
            self.assertTrue((yield inThread(_closed, idle[1])))  # then the next oldest
            for s in idle[2:]:  # the newer ones are still open
                s.setblocking(False)
                self.assertRaises(BlockingIOError, s.recv, 1)
        finally:
            for s in idle:
                s.close()

    def test_refusedWhenNoneIsIdle(self):
        """At the cap with every connection past its request, a new one is refused (closed at once)."""
        self.patch(admin, "MAX_CONNECTIONS", 2)
        site = makeAdminSite(Metrics(), lambda: (True, "ok"))
        site.open = 2
        self.assertIsNone(site.buildProtocol(None))
        site.open = 1
        self.assertIsNotNone(site.buildProtocol(None))
        self.assertEqual(site.open, 2)


class GatewayAdminTests(GatewayTestCase):
    """The gateway's own admin endpoint follows real SMTP traffic."""

    listener = {"relay_networks": ["127.0.0.0/8"], "trusted_peers": ["192.0.2.0/24"],
                "extensions": ["xclient"]}

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=(dict(self.listener),),
                          admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.fetcher = Fetcher(self)

    @defer.inlineCallbacks
    def test_metricsFollowTraffic(self):
        def traffic(c):
            c.cmd("EHLO x")
            c.cmd("XCLIENT ADDR=192.0.2.1")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            c.send("Subject: m\r\n\r\nhello\r\n.\r\n")
            c.reply()
            c.cmd("QUIT")

        yield self.session(traffic)
        yield self.gw.service.queue.whenIdle()
        code, body, _ = yield self.fetcher.get(self.gw.adminPort, b"/metrics")
        self.assertEqual(code, 200)
        for line in (b'relaygw_messages_accepted_total{listener="l0"} 1.0',
                     b'relaygw_connections_total{listener="l0"} 1.0',
                     b'relaygw_commands_total{command="MAIL",listener="l0"} 1.0',
                     b'relaygw_trusted_verbs_total{listener="l0",result="refused",verb="XCLIENT"} 1.0',
                     b'relaygw_replies_total{class="5xx",listener="l0"} 1.0',
                     b"relaygw_fsync_seconds_count 1.0",
                     b'relaygw_delivery_attempts_total{nexthop="maildir:%s/outbox",result="ok"} 1.0'
                     % self.gw.directory.encode()):
            self.assertIn(line + b"\n", body)

    @defer.inlineCallbacks
    def test_healthz503WhileDraining(self):
        code, body, _ = yield self.fetcher.get(self.gw.adminPort, b"/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        for f in self.gw.service.factories:
            f.draining = True
        code, body, _ = yield self.fetcher.get(self.gw.adminPort, b"/healthz")
        self.assertEqual((code, body), (503, b"draining\n"))


class AuthMetricsTests(GatewayTestCase):
    """AUTH outcomes in /metrics, from real sessions over loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        from relaygw.auth import PasswordFile

        users = os.path.abspath(self.mktemp())
        PasswordFile(users).set("alice", "s3cret")
        self.gw = Gateway(self.mktemp(), listeners=({"credentials": users, "auth_plaintext": True},),
                          admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        for f in self.gw.service.factories:
            f.authFailures.limit = 1  # (locked out after one failure)
        self.fetcher = Fetcher(self)

    @defer.inlineCallbacks
    def test_lockedOutCounted(self):
        """
        An AUTH refused because its address is locked out is counted as
        such, relaygw_auth_total{result="locked"} (before: "other", the
        label for a value from the network outside the known set).
        """
        def login(password):
            def talk(c):
                c.cmd("EHLO x")
                return c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password).decode())[0]

            return self.session(talk)

        self.assertEqual((yield login(b"wrong")), 421)  # (failed, and now locked out)
        self.assertEqual((yield login(b"s3cret")), 454)
        code, body, _ = yield self.fetcher.get(self.gw.adminPort, b"/metrics")
        self.assertIn(b'relaygw_auth_total{listener="l0",result="failure"} 1.0\n', body)
        self.assertIn(b'relaygw_auth_total{listener="l0",result="locked"} 1.0\n', body)
        self.assertNotIn(b'result="other"', body)


class MXMetricsTests(unittest.TestCase):
    """With MX delivery, the next hop's metrics label does not follow the recipient's domain."""

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.names import authority, dns, server

        zone = authority.FileAuthority(None)
        zone.soa = (b"test", dns.Record_SOA(mname=b"ns.test", rname=b"hostmaster.test", serial=1, refresh=3600,
                                            retry=600, expire=86400, minimum=60, ttl=60))
        zone.records = {}
        factory = server.DNSServerFactory(authorities=[zone])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"mx": True, "resolver": "127.0.0.1:%d" % udp.getHost().port},
                          admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.fetcher = Fetcher(self)

    @defer.inlineCallbacks
    def test_nexthopSeriesBounded(self):
        """
        Recipients in 20 domains (none exists: each is bounced) make one
        series per result, not one per domain, which a client would grow
        without end (before: C{nexthop="mx:d0.test"} ... C{"mx:d19.test"}).
        """
        recipients = ["r@d%d.test" % i for i in range(20)]

        def run():
            c = Client(self.gw.port)
            try:
                replies = c.transaction(recipients, "Subject: m\r\n\r\nx\r\n", mailfrom="s@sender.test")
                return [code for code, _ in replies[3:]]
            finally:
                c.close()

        self.assertEqual(set((yield inThread(run))), {250, 354})
        for _ in range(100):
            yield self.gw.service.queue.whenIdle()
            _, body, _ = yield self.fetcher.get(self.gw.adminPort, b"/metrics")
            lines = [line for line in body.decode().splitlines() if line.startswith("relaygw_delivery_attempts_total")]
            if sum(float(line.split()[-1]) for line in lines) >= 20:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        hops = {line.split('nexthop="')[1].split('"')[0] for line in lines}
        self.assertEqual(len(hops), 1, hops)
