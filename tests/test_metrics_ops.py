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


class LargeQueueScrapeTests(unittest.TestCase):
    """
    A scrape with many messages queued costs what the spool and the queue
    manager keep as messages come and go, not a look at every queue file:
    each scrape runs on the reactor thread, between the SMTP sessions.
    """

    MESSAGES = 40

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"defer_all": True}, admin={"endpoint": "tcp:0:interface=127.0.0.1"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

        def send():
            c = Client(self.gw.port)
            try:
                replies = c.transaction(["b@example.net"], "Subject: m\r\n\r\nx\r\n")
                for _ in range(self.MESSAGES - 1):
                    replies += [c.cmd("MAIL FROM:<a@example.org>"), c.cmd("RCPT TO:<b@example.net>"), c.cmd("DATA")]
                    c.send("Subject: m\r\n\r\nx\r\n.\r\n")
                    replies.append(c.reply())
                c.cmd("QUIT")
            finally:
                c.close()
            self.assertEqual([r[0] for r in replies].count(250), 1 + 3 * self.MESSAGES)

        yield inThread(send)

    scrape = OperatorMetricsTests.scrape

    @defer.inlineCallbacks
    def test_scrapeLooksAtNoQueueFile(self):
        import os

        from relaygw import durable

        spool = self.gw.service.spool
        looked = []
        for owner, name in ((os, "listdir"), (os, "stat"), (os, "lstat"), (durable.quick, "exists")):
            def counting(*args, _real=getattr(owner, name), **kw):
                if str(args[0]).startswith(spool.path("queue")) or str(args[0]).startswith(spool.path("hold")):
                    looked.append(args[0])
                return _real(*args, **kw)
            self.patch(owner, name, counting)
        m = yield self.scrape()
        self.assertEqual(m["relaygw_spool_messages", ()], self.MESSAGES)
        self.assertEqual(m["relaygw_queue_messages", (("state", "active"),)], self.MESSAGES)
        self.assertLessEqual(len(looked), 1, looked)  # (the oldest message's file, for its age)

    @defer.inlineCallbacks
    def test_countsFollowOperatorAndHand(self):
        import contextlib
        import io
        import os

        from relaygw.scripts import queue as tool

        spool = self.gw.service.spool
        ids = spool.queueIds()
        with contextlib.redirect_stderr(io.StringIO()):
            for verb, qid in (("delete", ids[1]), ("hold", ids[2])):
                self.assertEqual(tool.main(["--config", self.gw.path, verb, qid], out=io.StringIO()), 0)
        os.unlink(spool.path("queue", ids[0]))  # (by hand: the oldest)
        queue = self.gw.service.queue
        queue.requests.call.cancel()
        queue.requests.poll()  # (the poll that takes relaygw-queue's requests, now rather than within two seconds)
        m = yield self.scrape()
        self.assertEqual(m["relaygw_spool_messages", ()], self.MESSAGES - 2)
        self.assertEqual(m["relaygw_queue_messages", (("state", "held"),)], 1)
        self.assertEqual(m["relaygw_queue_messages", (("state", "active"),)], self.MESSAGES - 3)
