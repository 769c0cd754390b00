"""
/metrics an on-call would chart, scraped over a real socket: delivery
latency histograms (time in queue, time per attempt), the queue by state,
refusals by reply code, spool free bytes and the process collector.
"""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial import unittest

from relaygw.testing import Client, Gateway, ScriptedSMTPFactory, inThread


class OperatorMetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.hop = ScriptedSMTPFactory(rcpt={"later@example.net": "451 4.3.0 Try again later"})
        port = reactor.listenTCP(0, self.hop, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"smarthosts": ["[127.0.0.1]:%d" % port.getHost().port], "tls": "none"},
                          admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def scrape(self):
        def get():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.gw.adminPort, timeout=10) as r:
                return r.read().decode()

        d = inThread(get)
        d.addCallback(lambda text: {(s.name, tuple(sorted(s.labels.items()))): s.value
                                    for f in text_string_to_metric_families(text) for s in f.samples})
        return d

    def session(self, rcpts, data=True):
        def run():
            c = Client(self.gw.port)
            try:
                replies = c.transaction(rcpts, "Subject: m\r\n\r\nx\r\n" if data else None)
                if data:
                    self.assertEqual(replies[-1][0], 250)
                c.cmd("QUIT")
            finally:
                c.close()

        return inThread(run)

    @defer.inlineCallbacks
    def test_latencyQueueStatesRefusalsFreeBytesProcess(self):
        yield self.session(["b@example.net", "later@example.net"])
        yield self.gw.service.queue.whenIdle()
        yield self.session(["not a valid address"], data=False)
        m = yield self.scrape()
        self.assertEqual(m["relaygw_delivery_queue_seconds_count", (("status", "sent"),)], 1)
        self.assertNotIn(("relaygw_delivery_queue_seconds_count", (("status", "deferred"),)), m)
        self.assertEqual(m["relaygw_delivery_attempt_seconds_count", ()], 2)
        self.assertGreater(m["relaygw_delivery_attempt_seconds_sum", ()], 0)
        states = {state: m["relaygw_queue_messages", (("state", state),)]
                  for state in ("active", "deferred", "held", "corrupt")}
        self.assertEqual(states, {"active": 0, "deferred": 1, "held": 0, "corrupt": 0})
        self.assertEqual(m["relaygw_refusals_total", (("code", "501"), ("listener", "l0"))], 1)
        self.assertGreater(m["relaygw_spool_free_bytes", ()], 0)
        self.assertGreater(m["process_resident_memory_bytes", ()], 0)
        self.assertGreater(m["process_open_fds", ()], 0)

    @defer.inlineCallbacks
    def test_heldAndCorruptCounted(self):
        self.gw.service.queue.deferAll = True
        yield self.session(["b@example.net"])
        yield self.session(["c@example.net"])
        [first, second] = self.gw.service.spool.queueIds()
        self.assertTrue(self.gw.service.spool.hold(first))
        self.gw.service.spool.quarantine(second, "test: set aside")
        m = yield self.scrape()
        states = {state: m["relaygw_queue_messages", (("state", state),)]
                  for state in ("active", "deferred", "held", "corrupt")}
        self.assertEqual(states, {"active": 0, "deferred": 0, "held": 1, "corrupt": 1})


class WithoutAdminTests(unittest.TestCase):
    """Without an admin endpoint nothing reads the session's events: counting them costs one empty call."""

    @defer.inlineCallbacks
    def test_sessionEventsUncounted(self):
        from relaygw import listeners

        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},))
        yield gw.start()
        self.addCleanup(gw.stop)
        [factory] = gw.service.listeners.factories
        self.assertIs(factory.stats, listeners._uncounted)
