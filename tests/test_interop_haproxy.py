"""
A real HAProxy (send-proxy and send-proxy-v2) in front of two gateways:
mail goes through, the client identity survives the balancer, and health
checks move traffic away from a draining instance.
"""

import os
import shutil
import smtplib
import subprocess
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.testing import Gateway, freePort, inThread, receivedHeader, waitForPort

HAPROXY_DEFAULTS = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
"""

HAPROXY_FRONT = HAPROXY_DEFAULTS + """\
frontend smtp
    bind 127.0.0.1:%(front)d
    default_backend relaygw
backend relaygw
"""

HAPROXY_CFG = HAPROXY_FRONT + """\
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1
    server gw1 127.0.0.1:%(gw1)d send-proxy-v2 check port %(admin1)d
    server gw2 127.0.0.1:%(gw2)d send-proxy check port %(admin2)d
"""


def send(port, subject, source="127.0.0.5"):
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as s:
        s.sendmail("a@example.org", ["b@example.net"], ("Subject: %s\r\n\r\nx\r\n" % subject).encode())


def startHAProxy(testCase, config):
    """
    Run a real HAProxy on C{config} (its text) for C{testCase}, stopped at
    its clean-up.
    """
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(haproxy):
        raise AssertionError("haproxy is not installed (make test installs it)")
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    cfg = os.path.join(directory, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(config)
    proc = subprocess.Popen([haproxy, "-f", cfg, "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    testCase.addCleanup(stopHAProxy, proc)


def stopHAProxy(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


class HAProxyTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "relay_networks": ["127.0.0.0/8"],
                    "drain_timeout": 1}
        self.gws = []
        for i in range(2):
            gw = Gateway(self.mktemp(), listeners=(dict(listener, hostname="gw%d.test" % i),),
                         admin={"endpoint": "tcp:0:interface=127.0.0.1"})
            yield gw.start()
            self.gws.append(gw)
        self.stopped = set()
        self.addCleanup(self._stopGateways)
        self.front = freePort()
        startHAProxy(self, HAPROXY_CFG % {"front": self.front, "gw1": self.gws[0].port, "gw2": self.gws[1].port,
                                          "admin1": self.gws[0].adminPort, "admin2": self.gws[1].adminPort})
        yield inThread(waitForPort, self.front)
        yield inThread(time.sleep, 1.0)  # first health checks

    @defer.inlineCallbacks
    def _stopGateways(self):
        for i, gw in enumerate(self.gws):
            if i not in self.stopped:
                yield gw.stop()

    @defer.inlineCallbacks
    def delivered(self):
        for gw in self.gws:
            if self.gws.index(gw) not in self.stopped:
                yield gw.service.queue.whenIdle()
        return [gw.delivered() for gw in self.gws]

    @defer.inlineCallbacks
    def test_identityThroughBothProxyVersions(self):
        for i in range(4):
            yield inThread(send, self.front, "m%d" % i)
        counts = yield self.delivered()
        self.assertEqual([len(c) for c in counts], [2, 2])  # round robin: v2 to gw1, v1 to gw2
        for msgs in counts:
            for m in msgs:
                self.assertIn(b"(unknown [127.0.0.5])", m)  # the client, not the balancer
                self.assertNotIn(b"proxied by", m)  # the balancer stays out of the trace

    @defer.inlineCallbacks
    def test_drainingInstanceLeavesRotation(self):
        gw1 = self.gws[0]
        stopping = gw1.service.stopService()
        self.stopped.add(0)
        yield inThread(time.sleep, 1.0)  # /healthz says 503; haproxy marks gw1 down
        for i in range(4):
            yield inThread(send, self.front, "after-drain-%d" % i)
        yield stopping
        counts = yield self.delivered()
        self.assertEqual(len(counts[1]), 4)
        self.assertEqual(len(counts[0]), 0)


HAPROXY_ONE = HAPROXY_FRONT + """\
    server gw1 127.0.0.1:%(gw)d send-proxy-v2
"""


class HAProxyRelayTests(unittest.TestCase):
    """
    Through a real HAProxy with send-proxy-v2: the PROXY source is
    the client; being trusted (for the verbs) lets it relay nothing, only
    relay_networks or a login do, and per-IP limits count it.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # 127.0.0.66 is a trusted peer (XCLIENT) outside relay_networks.
        listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "trusted_peers": ["127.0.0.64/26"],
                    "extensions": ["xclient"], "relay_networks": ["127.0.0.0/26"], "max_connections_per_ip": 2}
        self.gw = Gateway(self.mktemp(), listeners=(listener,))
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.front = freePort()
        startHAProxy(self, HAPROXY_ONE % {"front": self.front, "gw": self.gw.port})
        yield inThread(waitForPort, self.front)

    def client(self, source):
        s = smtplib.SMTP(timeout=20, source_address=(source, 0))
        s.connect("127.0.0.1", self.front)
        return s

    @defer.inlineCallbacks
    def test_outsideRefusedInsideRelayed(self):
        def run():
            with self.client("127.0.0.66") as s:
                s.ehlo("spammer.example")
                # Trusted for XCLIENT (its PROXY source is in trusted_peers) ...
                self.assertIn(b"XCLIENT", s.ehlo_resp)
                self.assertEqual(s.mail("spam@spammer.example")[0], 250)
                outside = s.rcpt("victim@gmail.example")
            with self.client("127.0.0.5") as s:
                s.ehlo("inside.example")
                self.assertEqual(s.sendmail("a@example.org", ["victim@gmail.example"],
                                            b"Subject: inside\r\n\r\nok\r\n"), {})
            return outside

        outside = yield inThread(run)
        # ... but it may not relay.
        self.assertEqual(outside, (554, b"5.7.1 <victim@gmail.example>: Relay access denied"))
        yield self.gw.service.queue.whenIdle()
        [msg] = self.gw.delivered()
        # The client is the PROXY source; the balancer is not named.
        self.assertTrue(receivedHeader(msg).startswith(b"Received: from inside.example (unknown [127.0.0.5])\r\n"
                                                       b"\tby relay.test (relaygw) with ESMTP id "), msg)

    def test_perIPLimitCountsTheSource(self):
        def run():
            held = [self.client("127.0.0.31") for _ in range(2)]
            third = smtplib.SMTP(timeout=20, source_address=("127.0.0.31", 0))
            try:
                code, text = third.connect("127.0.0.1", self.front)
            finally:
                third.close()
            other = self.client("127.0.0.32")
            ok = other.noop()
            for s in held + [other]:
                s.quit()
            return (code, text), ok

        def check(result):
            (refused, ok) = result
            self.assertEqual(refused, (421, b"4.7.0 relay.test too many connections, try again later"))
            self.assertEqual(ok[0], 250)

        return inThread(run).addCallback(check)


HAPROXY_SMTPCHK = HAPROXY_DEFAULTS + """\
    timeout check 2s
frontend v2
    bind 127.0.0.1:%(front2)d
    default_backend checked_v2
frontend v1
    bind 127.0.0.1:%(front1)d
    default_backend checked_v1
backend checked_v2
    option smtpchk EHLO lb.test
    default-server inter 100ms fall 1 rise 1
    server gw 127.0.0.1:%(gw)d send-proxy-v2 check
backend checked_v1
    option smtpchk EHLO lb.test
    default-server inter 100ms fall 1 rise 1
    server gw 127.0.0.1:%(gw)d send-proxy check
"""


class HAProxyHealthCheckTests(unittest.TestCase):
    """
    HAProxy's health checks on the mail port itself (`option smtpchk`,
    over the server's send-proxy or send-proxy-v2): the balancer's own
    connections (a version 2 LOCAL header, or a version 1 header naming
    the balancer itself) are not counted as a client's by the per-IP
    limits, so checks every 100 ms keep the server up under a rate limit
    of 5 a minute, while the clients it speaks for are still limited.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "relay_networks": ["127.0.0.0/8"],
                    "connection_rate_per_ip": 5, "max_connections_per_ip": 1}
        self.gw = Gateway(self.mktemp(), listeners=(listener,))
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.fronts = {"v1": freePort(), "v2": freePort()}
        startHAProxy(self, HAPROXY_SMTPCHK % {"front1": self.fronts["v1"], "front2": self.fronts["v2"],
                                              "gw": self.gw.port})
        for port in self.fronts.values():
            yield inThread(waitForPort, port)

    @defer.inlineCallbacks
    def test_checksAreNotCountedAsClients(self):
        # About 25 checks of each kind, from the balancer's own address.
        yield inThread(time.sleep, 2.5)
        for version, port in sorted(self.fronts.items()):
            yield inThread(send, port, "through-" + version)
        yield self.gw.service.queue.whenIdle()
        self.assertEqual(len(self.gw.delivered()), 2)

        def connectOnce():
            s = smtplib.SMTP(timeout=20, source_address=("127.0.0.5", 0))
            try:
                return s.connect("127.0.0.1", self.fronts["v2"])
            finally:
                s.close()

        # The client behind the balancer is still counted: 2 connections above, the 6th within the minute is refused.
        # Each connection is closed at once; the next waits until the gateway has seen it go (through HAProxy), so
        # that max_connections_per_ip (1) cannot refuse it first.
        perIP = self.gw.service.factories[0].clients.perIP
        refused = None
        for _ in range(5):
            deadline = time.monotonic() + 10
            while perIP.get("127.0.0.5") and time.monotonic() < deadline:
                yield task.deferLater(reactor, 0.02, lambda: None)
            code, text = yield inThread(connectOnce)
            if code != 220:
                refused = (code, text)
                break
        self.assertEqual(refused, (421, b"4.7.0 relay.test connection rate limit exceeded, try again later"))
