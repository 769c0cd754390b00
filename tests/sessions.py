"""
Test cases that give each test a gateway to talk SMTP to: over loopback
sockets (L{GatewayTestCase}) or one session at a time on a StringTransport
and task.Clock (L{SessionTestCase}), each also with a self-signed TLS
listener and STARTTLS; L{overASocket} for one session over a socket.
"""

from twisted.internet import defer
from twisted.trial import unittest

from relaygw.testing import Client, Gateway, MemorySink, SessionHarness, inThread
from tests.tlsmaterial import clientContext, selfSignedListener


class GatewayTestCase(unittest.TestCase):
    """Starts a gateway with C{listener} overrides for each test."""

    listener = {}
    relay = None

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=(dict(self.listener),), relay=self.relay)
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def client(self):
        c = Client(self.gw.port)
        self.addCleanup(c.close)
        return c

    def session(self, f):
        """Run C{f(client)} in a thread after the greeting was read."""

        def run():
            c = self.client()
            code, _ = c.reply()
            self.assertEqual(code, 220)
            return f(c)

        return inThread(run)


class TLSGatewayTestCase(GatewayTestCase):
    tlsListener = {}

    @defer.inlineCallbacks
    def setUp(self):
        selfSignedListener(self)
        yield GatewayTestCase.setUp(self)

    def starttls(self, c, cert=None):
        """STARTTLS on raw client C{c}; returns the TLS socket wrapped into the client."""
        self.assertEqual(c.cmd("STARTTLS"), (220, ["2.0.0 Ready to start TLS"]))
        c.sock = clientContext(cert).wrap_socket(c.sock, server_hostname="relay.test")
        return c


class SessionTestCase(unittest.TestCase):
    """
    One SMTP session per client on a StringTransport with a task.Clock
    (L{SessionHarness}), no sockets: C{listener} overrides, and accepted
    messages kept in C{self.sink} (a L{MemorySink}).  C{session(f)} runs
    C{f(client)} after the greeting, as L{GatewayTestCase.session} does
    over a socket.

    With C{realSpool} set, accepted messages go to the harness's real
    spool instead (C{self.sink} is None), which adds the Received header:
    read them back with L{spooled}; the end-of-data reply then waits for
    the disk thread (L{tests.messages.queueMessage}).
    """

    listener = {}
    realSpool = False

    def setUp(self):
        self.sink = None if self.realSpool else MemorySink()
        self.harness = SessionHarness(self.mktemp(), dict(self.listener), sink=self.sink)
        self.addCleanup(self.harness.close)
        self.clock = self.harness.clock

    def spooled(self, n=1):
        """The messages queued so far, C{[(message, content)]}, asserting there are C{n}."""
        self.assertEqual(len(self.harness.queued), n, self.harness.queued)
        return [self.harness.spooled(queueId) for queueId in self.harness.queued]

    def client(self):
        c = self.harness.connect()
        self.addCleanup(c.lose)
        return c

    def session(self, f):
        c = self.client()
        code, _ = c.reply()
        self.assertEqual(code, 220)
        return f(c)


class TLSSessionTestCase(SessionTestCase):
    """
    L{SessionTestCase} on a listener with a self-signed certificate for
    relay.test (C{tlsListener} overrides); C{starttls(c)} runs STARTTLS with
    a real TLS handshake in memory (L{SessionClient.starttls}).
    """

    tlsListener = {}

    def setUp(self):
        selfSignedListener(self)
        SessionTestCase.setUp(self)

    def starttls(self, c, cert=None):
        """STARTTLS on harness client C{c}, then the client's handshake; returns C{c}."""
        self.assertEqual(c.cmd("STARTTLS"), (220, ["2.0.0 Ready to start TLS"]))
        c.starttls(clientContext(cert))
        return c


@defer.inlineCallbacks
def overASocket(test, talk, **listener):
    """
    Start a gateway with C{listener}'s settings and run C{talk(client)}
    in a thread once the client has its greeting: C{(its result, the
    gateway)}.
    """
    gw = Gateway(test.mktemp(), listeners=(listener,))
    yield gw.start()
    test.addCleanup(gw.stop)

    def run():
        c = Client(gw.port)
        try:
            c.reply()
            return talk(c)
        finally:
            c.close()

    return (yield inThread(run)), gw
