"""
The SMTP session on StringTransport: ordering with an asynchronous policy
(twisted#8126), a greeting the policy refuses, DATA framing, the bounded
command buffer, and the STARTTLS injection fix, without sockets.
"""

import dataclasses

from twisted.internet import defer

from relaygw import codes
from relaygw.testing import receivedHeader
from tests.messages import queueMessage
from tests.sessions import SessionTestCase


class UnitTestCase(SessionTestCase):
    """One session on the harness (the real spool), its replies read as raw octets."""

    listener = {"relay_networks": ["127.0.0.0/8"]}
    realSpool = True

    def setUp(self):
        SessionTestCase.setUp(self)
        self.c = self.client()
        self.session, self.transport = self.c.session, self.c.transport

    def take(self):
        return self.c.take()


class GreetingTests(UnitTestCase):
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


class OrderingTests(UnitTestCase):
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


class RefusingHeloPolicy(AsyncPolicy):
    """Refuses the greeting name C{bad.example}; accepts everything else at once."""

    def helo(self, ctx):
        if ctx.get("ehlo_domain") == "bad.example":
            return codes.SYNTAX.format(what="EHLO hostname")
        return None

    def mail(self, ctx):
        return None


class RefusedHeloTests(UnitTestCase):
    @defer.inlineCallbacks
    def test_refusedNameIsNotTheClients(self):
        """
        A greeting the policy refuses leaves the client's earlier one, as
        Postfix's helo check does: the Received header and onward XCLIENT
        never name a HELO the gateway refused.
        """
        self.session.settings = dataclasses.replace(self.session.settings, policy=RefusingHeloPolicy())
        self.take()
        self.assertEqual(self.c.cmd("EHLO good.example")[0], 250)
        for verb in ("EHLO", "HELO"):
            self.assertEqual(self.c.cmd(verb + " bad.example")[0], 501)
        self.assertEqual([self.session.context.get(k) for k in ("ehlo_domain", "ehlo_string", "protocol")],
                         ["good.example", "ehlo good.example", "ESMTP"])
        yield queueMessage(self.c)
        [queueId] = self.harness.queued
        _, content = self.harness.spooled(queueId)
        self.assertTrue(receivedHeader(content).startswith(b"Received: from good.example (unknown [127.0.0.1])\r\n"
                                                           b"\tby relay.test (relaygw) with ESMTP id "),
                        content)


class DataTests(UnitTestCase):
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


class StartTLSInjectionTests(UnitTestCase):
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
