"""The admin endpoint: /healthz and /metrics over real HTTP, moving as traffic says."""

import re
import urllib.error
import urllib.request

from twisted.internet import defer

from relaygw.metrics import Metrics
from relaygw.testing import Gateway, inThread
from tests.test_smtp import GatewayTestCase
from twisted.trial import unittest


def fetch(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
            return r.status, r.read().decode(), r.headers.get("content-type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("content-type")


def sample(text, name, **labels):
    want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


class MetricsUnitTests(unittest.TestCase):
    def test_methodsMoveSeries(self):
        m = Metrics()
        m.connection("in", +1)
        m.connection("in", +1)
        m.connection("in", -1)
        m.event("in", "command", "MAIL")
        m.event("in", "command", "FROB")
        m.event("in", "reply", 554)
        m.event("in", "verb_refused", "XCLIENT")
        m.event("in", "no_such_kind", 1)
        m.queued("in", 100, 0.001)
        m.delivery("smtp:x", "ok")
        m.setSpoolProbe(lambda: (7, 42.0))
        text = m.render().decode()
        self.assertEqual(sample(text, "relaygw_connections_open", listener="in"), 1)
        self.assertEqual(sample(text, "relaygw_connections_total", listener="in"), 2)
        self.assertEqual(sample(text, "relaygw_commands_total", listener="in", command="other"), 1)
        self.assertEqual(sample(text, "relaygw_replies_total", listener="in", **{"class": "5xx"}), 1)
        self.assertEqual(sample(text, "relaygw_trusted_verbs_total", listener="in", verb="XCLIENT",
                                result="refused"), 1)
        self.assertEqual(sample(text, "relaygw_message_bytes_total", listener="in"), 100)
        self.assertEqual(sample(text, "relaygw_delivery_attempts_total", nexthop="smtp:x", result="ok"), 1)
        self.assertEqual(sample(text, "relaygw_spool_messages"), 7)
        self.assertEqual(sample(text, "relaygw_spool_oldest_age_seconds"), 42)

    def test_neverRaises(self):
        m = Metrics()
        m.event("in", "reply", "not-a-number")
        m.connection(None, "x")
        # Both were caught and logged, not raised.
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)


class AdminEndpointTests(GatewayTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"], "trusted_peers": ["192.0.2.0/24"],
                "extensions": ["xclient"]}

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=(dict(self.listener),),
                          admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    @defer.inlineCallbacks
    def test_healthzAndMetricsFollowTraffic(self):
        status, body, _ = yield inThread(fetch, self.gw.adminPort, "/healthz")
        self.assertEqual((status, body), (200, "ok\n"))
        status, before, ctype = yield inThread(fetch, self.gw.adminPort, "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("text/plain"))

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
        status, after, _ = yield inThread(fetch, self.gw.adminPort, "/metrics")
        self.assertEqual(sample(after, "relaygw_messages_accepted_total", listener="l0"), 1)
        self.assertEqual(sample(after, "relaygw_connections_total", listener="l0"), 1)
        self.assertEqual(sample(after, "relaygw_commands_total", listener="l0", command="MAIL"), 1)
        self.assertEqual(sample(after, "relaygw_trusted_verbs_total", listener="l0", verb="XCLIENT",
                                result="refused"), 1)
        self.assertEqual(sample(after, "relaygw_replies_total", listener="l0", **{"class": "5xx"}), 1)
        self.assertEqual(sample(after, "relaygw_delivery_attempts_total",
                                nexthop="maildir:%s/outbox" % self.gw.directory, result="ok"), 1)
        self.assertGreater(sample(after, "relaygw_message_bytes_total", listener="l0"), 5)
        self.assertEqual(sample(after, "relaygw_fsync_seconds_count"), 1)
        status, body, _ = yield inThread(fetch, self.gw.adminPort, "/nothing")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_healthz503WhileDraining(self):
        for f in self.gw.service.factories:
            f.draining = True
        status, body, _ = yield inThread(fetch, self.gw.adminPort, "/healthz")
        self.assertEqual((status, body), (503, "draining\n"))
