"""
The SMTP session on StringTransport: ordering with an asynchronous policy
(twisted#8126), DATA framing, the bounded command buffer, and the STARTTLS
injection fix, without sockets.
"""

import dataclasses

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from relaygw.testing import Gateway


class TLSStringTransport(StringTransport):
    tlsStarted = None

    def startTLS(self, contextFactory):
        self.tlsStarted = contextFactory


class SessionTestCase(unittest.TestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}

    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=(dict(self.listener),))
        self.gw.service.spool.open()
        self.factory = self.gw.service.factories[0]
        self.session, self.transport = self.connect()

    def connect(self):
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        session = self.factory.buildProtocol(peer)
        transport = TLSStringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        session.makeConnection(transport)
        self.addCleanup(session.connectionLost, Failure(ConnectionDone()))
        return session, transport

    def take(self):
        out = self.transport.value()
        self.transport.clear()
        return out


class GreetingTests(SessionTestCase):
    def test_greeting(self):
        self.assertEqual(self.take(), b"220 relay.test ESMTP relaygw\r\n")


class AsyncPolicy:
    """MAIL waits on a Deferred the test fires; everything else accepts."""

    def __init__(self):
        self.pending = defer.Deferred()

    def connect(self, ctx):
        return None

    helo = data = connect

    def mail(self, ctx):
        return self.pending

    def rcpt(self, ctx, rcpt):
        return None


class OrderingTests(SessionTestCase):
    def test_pipelinedRepliesStayInOrder(self):
        policy = AsyncPolicy()
        # The session pinned its listener's settings at connect.
        self.session.settings = dataclasses.replace(self.session.settings, policy=policy)
        self.take()
        self.session.dataReceived(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\n")
        # Nothing may be answered while MAIL's policy check is pending:
        # Twisted's stock ESMTP answers the RCPT with 503 here.
        self.assertEqual(self.take(), b"")
        policy.pending.callback(None)
        self.assertEqual(self.take(), b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n")


class DataTests(SessionTestCase):
    @defer.inlineCallbacks
    def test_overlongLineStaysInData(self):
        self.take()
        self.session.dataReceived(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        self.assertEqual(self.take().splitlines()[-1], b"354 End data with <CR><LF>.<CR><LF>")
        self.session.dataReceived(b"x" * 40000 + b"\r\nMAIL FROM:<evil@example.org>\r\nDATA\r\n")
        self.assertEqual(self.take(), b"")  # still in DATA: no replies to body lines
        self.session.dataReceived(b".\r\n")
        yield self.session.waiting
        replies = self.take().splitlines()
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Ok: queued as "), replies)

    def test_commandBufferIsBounded(self):
        self.take()
        for _ in range(20):
            self.session.dataReceived(b"y" * 65536)
        self.assertEqual(self.take(), b"500 5.5.2 Error: line too long\r\n")  # one reply, not twenty
        self.assertLess(len(self.session.buf), 65536 + 1)
        self.session.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(self.take(), b"250 2.0.0 Ok\r\n")


class StartTLSInjectionTests(SessionTestCase):
    def test_plaintextAfterStartTLSDiscarded(self):
        # The session pinned its listener's settings (TLS included) at connect.
        self.session.settings = dataclasses.replace(self.session.settings,
                                                    tls=type("FakeTLS", (), {"contextFactory": object()})())
        self.take()
        self.session.dataReceived(b"EHLO x\r\n")
        self.assertIn(b"250-STARTTLS", self.take())
        self.session.dataReceived(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.take(), b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertEqual(self.session.buf, b"")
        self.assertIsNone(self.session.helo)
