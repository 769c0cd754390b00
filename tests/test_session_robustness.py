"""
Session robustness without sockets: scoped link-local peers, the pruning
of per-address rate state, and how the session treats verbs it does not
implement.
"""

from twisted.trial import unittest

from relaygw.testing import SessionHarness
from relaygw.trust import peerIP


class ScopedPeerTests(unittest.TestCase):
    def test_peerIP(self):
        self.assertEqual(peerIP("fe80::1%eth0"), "fe80::1")
        self.assertEqual(peerIP("FE80::0:1%2"), "fe80::1")
        self.assertEqual(peerIP("::ffff:192.0.2.1"), "192.0.2.1")

    def test_linkLocalClientServed(self):
        harness = SessionHarness(self.mktemp(), {"relay_networks": ["127.0.0.0/8"]})
        client = harness.connect("fe80::1%eth0", local=("fe80::2%eth0", 25))
        self.addCleanup(client.lose)
        self.assertEqual(client.reply()[0], 220)
        self.assertEqual(client.session.context["remote_ip"], "fe80::1")
        self.assertEqual(client.session.context["local_ip"], "fe80::2")
        self.assertEqual(client.cmd("EHLO x")[0], 250)


class RateStatePruningTests(unittest.TestCase):
    def test_oldAddressesForgotten(self):
        harness = SessionHarness(self.mktemp(), {"connection_rate_per_ip": 5})
        factory = harness.factory
        for n in range(50):
            c = harness.connect("192.0.2.%d" % n)
            c.lose()
        self.assertEqual(len(factory.clients.recentConnects), 50)
        harness.clock.advance(61)
        c = harness.connect("198.51.100.1")
        self.addCleanup(c.lose)
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(list(factory.clients.recentConnects), ["198.51.100.1"])

    def test_rateStillLimited(self):
        harness = SessionHarness(self.mktemp(), {"connection_rate_per_ip": 2})
        got = []
        for _ in range(3):
            c = harness.connect("192.0.2.1")
            self.addCleanup(c.lose)
            got.append(c.reply())
        self.assertEqual([code for code, _ in got], [220, 220, 421])
        self.assertEqual(got[2][1], ["4.7.0 relay.test connection rate limit exceeded, try again later"])


class VerbTableTests(unittest.TestCase):
    def connect(self, **listener):
        harness = SessionHarness(self.mktemp(), listener)
        client = harness.connect()
        self.addCleanup(client.lose)
        self.assertEqual(client.reply()[0], 220)
        return client

    def test_notTwistedESMTP(self):
        from twisted.mail import smtp

        client = self.connect()
        self.assertNotIsInstance(client.session, smtp.SMTP)
        self.assertFalse(hasattr(client.session, "do_UNKNOWN"))

    def test_unknownVerb(self):
        client = self.connect()
        for line in ("UNKNOWN x", "ETRN example.org", "TURN", "X\x00Y"):
            self.assertEqual(client.cmd(line), (500, ["5.5.2 Error: command not recognized"]), line)
        self.assertEqual(client.cmd("NOOP"), (250, ["2.0.0 Ok"]))

    def test_unknownVerbsCountTowardMaxErrors(self):
        client = self.connect(max_errors=3)
        client.send("UNKNOWN x\r\n" * 3 + "NOOP\r\n")
        self.assertEqual([code for code, _ in client.replies()], [500, 500, 500, 421])
        self.assertTrue(client.closed())

    def test_verbsCaseInsensitive(self):
        client = self.connect()
        self.assertEqual(client.cmd("noop")[0], 250)
        self.assertEqual(client.cmd("eHlO x")[0], 250)
