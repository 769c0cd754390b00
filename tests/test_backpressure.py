"""
Write backpressure and the closing of sessions: a client that pipelines
commands and never reads holds a bounded amount of the gateway's memory,
a closing reply is followed by a lingering close, and a peer that does
not take its closing reply is cut off.  Unit tests on StringTransport with
a task.Clock, and one bounded load test over real loopback sockets.
"""

import dataclasses
import fcntl
import os
import socket
import ssl
import struct
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import flow, wire
from relaygw.modes import DATA
from relaygw.testing import Client, Gateway, SessionHarness, inThread
from tests.sessions import TLSGatewayTestCase, overASocket
from tests.tlsmaterial import clientContext


class FlowControlTests(unittest.TestCase):
    def setUp(self):
        # (These sessions pipeline thousands of NOOPs: no junk command limit.)
        self.harness = SessionHarness(self.mktemp(), {"relay_networks": ["127.0.0.0/8"],
                                                      "junk_command_limit": 100000})
        self.addCleanup(self.harness.close)
        self.client = self.harness.connect()
        self.addCleanup(self.client.lose)
        self.assertEqual(self.client.reply()[0], 220)

    def test_registeredAsStreamingProducer(self):
        self.assertIs(self.client.transport.producer, self.client.session)
        self.assertTrue(self.client.transport.streaming)

    def test_pausedSessionAnswersNothing(self):
        session, transport = self.client.session, self.client.transport
        session.pauseProducing()
        self.client.send(b"NOOP\r\n" * 10)
        self.assertEqual(self.client.replies(), [])
        self.assertEqual(transport.producerState, "producing")
        # More unanswered input than a little: reading stops too.
        self.client.send(b"NOOP\r\n" * 1000)
        self.assertEqual(transport.producerState, "paused")
        session.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([code for code, _ in self.client.replies()], [250] * 1010)

    def test_closingReplyAbortsSilentPeer(self):
        self.assertEqual(self.client.cmd("QUIT")[0], 221)
        transport = self.client.transport
        self.assertTrue(transport.disconnecting)
        # The slot is free at once, not when the peer lets go.
        self.assertEqual(dict(self.harness.factory.clients.perIP), {})
        self.assertIsNone(transport.producer)
        self.harness.clock.advance(flow.CLOSE_TIMEOUT - 0.1)
        self.assertFalse(transport.aborted)
        self.harness.clock.advance(0.1)
        self.assertTrue(transport.aborted)

    def test_lingerDiscardsPipelinedInput(self):
        """Input after a closing reply is read and dropped for a moment, then the connection closes."""
        self.client.send("QUIT\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual([code for code, _ in self.client.replies()], [221])
        transport = self.client.transport
        self.assertFalse(transport.disconnecting)
        self.client.send("NOOP\r\n" * 100)
        self.assertEqual(self.client.replies(), [])
        self.harness.clock.advance(flow.LINGER)
        self.assertTrue(transport.disconnecting)

    def test_tooManyErrorsClosesWithLinger(self):
        self.client.send("BOGUS\r\n" * 25)
        codes = [code for code, _ in self.client.replies()]
        self.assertEqual(codes, [500] * 19 + [500, 421])
        self.harness.clock.advance(flow.LINGER)
        self.assertTrue(self.client.transport.disconnecting)

    def test_idleTimeout(self):
        self.harness.clock.advance(self.harness.config.listeners[0].idle_timeout)
        self.assertEqual(self.client.reply(), (421, ["4.4.2 relay.test idle timeout, closing connection"]))
        self.assertTrue(self.client.transport.disconnecting)


class NonReadingClientsTests(unittest.TestCase):
    """Real sockets: clients that pipeline and never read."""

    CLIENTS = 20
    IDLE = 2

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=({"idle_timeout": self.IDLE, "max_connections_per_ip": 100},))
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    @defer.inlineCallbacks
    def test_boundedAndClosed(self):
        factory = self.gw.service.factories[0]
        socks = []
        sessions = []
        started = factory.sessionStarted

        def record(session):
            sessions.append(session)
            return started(session)

        factory.sessionStarted = record

        def flood():
            for _ in range(self.CLIENTS):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", self.gw.port))
                s.setblocking(False)
                socks.append(s)
            # Send until every client has sent 1 MB or the gateway stops
            # taking input from all of them for a while (bounded by time).
            deadline = time.monotonic() + 10
            line = b"EHLO pipelining.example\r\n" * 2000
            sent = [0] * len(socks)
            stalled = 0.0
            while time.monotonic() < deadline and stalled < 1.0:
                progress = False
                for i, s in enumerate(socks):
                    if sent[i] > 1 << 20:
                        continue
                    try:
                        sent[i] += s.send(line)
                        progress = True
                    except BlockingIOError:
                        pass
                if all(n > 1 << 20 for n in sent):
                    break
                stalled = 0.0 if progress else stalled + 0.01
                time.sleep(0.01 if not progress else 0.001)
            return sent

        try:
            sent = yield inThread(flood)
            # On a loaded machine the reactor may still be accepting.
            deadline = reactor.seconds() + 10
            while len(sessions) < self.CLIENTS and reactor.seconds() < deadline:
                yield task.deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(len(sessions), self.CLIENTS)
            # Each client sent far more than the gateway holds for it.
            self.assertTrue(all(n > 256 * 1024 for n in sent), sent)
            for s in sessions:
                t = s.transport
                held = len(t.dataBuffer) - t.offset + t._tempDataLen + len(s.buf)
                self.assertLessEqual(held, 64 * 1024, held)
            # The idle timer runs from the last command answered, during the flood.
            deadline = reactor.seconds() + self.IDLE + 5
            while any(s.transport.connected for s in sessions) and reactor.seconds() < deadline:
                yield task.deferLater(reactor, 0.1, lambda: None)
            self.assertFalse([s for s in sessions if s.transport.connected])
            self.assertEqual(dict(factory.clients.perIP), {})
            self.assertEqual(factory.sessions, set())
        finally:
            for s in socks:
                s.close()


class ReadOnTests(unittest.TestCase):
    """
    Real sockets: message content that keeps coming is read on within a
    reactor turn, and what waits behind the end of data stays one read.
    """

    @defer.inlineCallbacks
    def test_contentReadOnInputAfterItBounded(self):
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},))
        yield gw.start()
        self.addCleanup(gw.stop)
        factory = gw.service.factories[0]
        readOns, unreadAtEnd = [], []
        readOn = wire.readOn

        def counted(transport):
            data = readOn(transport)
            readOns.append(len(data))
            return data

        self.patch(wire, "readOn", counted)
        started = factory.sessionStarted

        def record(session):
            endOfData, readOnTurn = session._endOfData, session._readOn

            def ended():
                unreadAtEnd.append(session.lineReader.pending)
                return endOfData()

            def turn():
                readOnTurn()
                if session.mode != DATA:  # the turn that read the end of data
                    unreadAtEnd.append(session.lineReader.pending)

            session._endOfData, session._readOn = ended, turn
            return started(session)

        factory.sessionStarted = record
        body = b"".join(b"%06d %s\r\n" % (i, b"x" * 70) for i in range(12000))  # 948,000 octets
        second = body[:79 * 3800]  # (whole lines)

        def talk():
            c = Client(gw.port)
            c.reply()
            for line in ("EHLO x", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"):
                c.cmd(line)
            # The content and its end, then a second message pipelined
            # behind it (300 KB of it waiting when the first one ends).
            c.send(body + b".\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
                   + second + b".\r\nQUIT\r\n")
            return [c.reply()[0] for _ in range(6)]

        codes = yield inThread(talk)
        self.assertEqual(codes, [250, 250, 250, 354, 250, 221])
        # Some of the content was read on, not a read per reactor turn only.
        self.assertTrue([n for n in readOns if n], readOns)
        # Reading on stops at the end of data: behind it, one read at most.
        self.assertLessEqual(max(unreadAtEnd), wire.SERVER_BUFFER)
        deadline = reactor.seconds() + 10
        while len(os.listdir(gw.outbox)) < 2 and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        delivered = sorted(gw.delivered(), key=len)
        self.assertEqual(len(delivered), 2)
        self.assertTrue(delivered[0].endswith(second), delivered[0][-200:])
        self.assertTrue(delivered[1].endswith(body), delivered[1][-200:])


class DataDeadlineTests(unittest.TestCase):
    """
    Message content earns time only at C{min_data_rate} (Postfix's
    C{smtpd_min_data_rate}): a client trickling its content cannot hold a
    session, a spool file and a connection slot for ever.
    """

    def open(self, **listener):
        harness = SessionHarness(self.mktemp(), dict({"relay_networks": ["127.0.0.0/8"]}, **listener))
        self.addCleanup(harness.close)
        client = harness.connect()
        self.addCleanup(client.lose)
        self.assertEqual(client.reply()[0], 220)
        for line in ("EHLO trickle.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
            self.assertEqual(client.cmd(line)[0], 250)
        self.assertEqual(client.cmd("DATA")[0], 354)
        return harness, client

    def trickle(self, harness, client, octets, seconds):
        """Send C{octets} a second for up to C{seconds}; the seconds it took to be told 421, or None."""
        for second in range(1, seconds + 1):
            client.send(b"x" * octets)
            harness.clock.advance(1)
            replies = client.replies()
            if replies:
                self.assertEqual(replies, [(421, ["4.4.2 relay.test timeout receiving message content, "
                                                  "closing connection"])])
                self.assertTrue(client.transport.disconnecting)
                return second
        return None

    def test_tricklingClientTimesOut(self):
        harness, client = self.open()
        # One octet a second earns 1/500 s a second: the 600 s last about 601 s.
        took = self.trickle(harness, client, 1, 1200)
        self.assertIsNotNone(took)
        self.assertTrue(600 <= took <= 603, took)

    @defer.inlineCallbacks
    def test_clientAtTheRateNeverTimesOut(self):
        harness, client = self.open()
        self.assertIsNone(self.trickle(harness, client, 500, 1500))
        client.send(b"\r\n.\r\n")
        code, lines = yield client.whenReply()
        self.assertEqual((code, lines[0][:6]), (250, "2.0.0 "))

    def test_earnedTimeIsCappedAtDataTimeout(self):
        harness, client = self.open(data_timeout=60)
        # 1 MB at once would earn 2,000 s: it earns at most 60 from now.
        client.send(b"x" * (1 << 20))
        harness.clock.advance(59.9)
        self.assertEqual(client.replies(), [])
        harness.clock.advance(0.2)
        self.assertEqual(client.replies()[0][0], 421)

    def test_rateZeroResetsOnAnyContent(self):
        harness, client = self.open(min_data_rate=0, data_timeout=60)
        self.assertIsNone(self.trickle(harness, client, 1, 300))
        harness.clock.advance(60)
        self.assertEqual(client.replies()[0][0], 421)

    @defer.inlineCallbacks
    def test_tricklingClientOverASocket(self):
        def talk(c):
            for line in ("EHLO trickle.example", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"):
                c.cmd(line)
            started = time.monotonic()
            c.sock.settimeout(0.1)
            while time.monotonic() - started < 5:
                c.sock.sendall(b"x")
                try:
                    got = c.sock.recv(4096)
                except socket.timeout:
                    continue
                return time.monotonic() - started, got
            return None, b""

        (took, got), gw = yield overASocket(self, talk, data_timeout=1, relay_networks=["127.0.0.0/8"])
        self.assertEqual(got, b"421 4.4.2 relay.test timeout receiving message content, "
                              b"closing connection\r\n")
        self.assertTrue(0.9 <= took <= 2.0, took)
        self.assertEqual(os.listdir(gw.outbox), [])


class JunkCommandTests(unittest.TestCase):
    """
    NOOP, RSET and VRFY past C{junk_command_limit} (100) since the last
    accepted message count as errors (Postfix's C{smtpd_junk_command_limit}):
    with C{max_errors} (20), the 120th closes the session.
    """

    def setUp(self):
        self.harness = SessionHarness(self.mktemp(), {"relay_networks": ["127.0.0.0/8"]})
        self.addCleanup(self.harness.close)
        self.client = self.harness.connect()
        self.addCleanup(self.client.lose)
        self.assertEqual(self.client.reply()[0], 220)
        self.assertEqual(self.client.cmd("EHLO junk.example")[0], 250)

    def test_noopsPastTheLimitCountAsErrors(self):
        self.client.send(b"NOOP\r\n" * 130)
        replies = self.client.replies()
        self.assertEqual([code for code, _ in replies], [250] * 120 + [421])
        self.assertEqual(replies[-1][1], ["4.7.0 relay.test too many errors, closing connection"])
        self.harness.clock.advance(flow.LINGER)
        self.assertTrue(self.client.transport.disconnecting)

    def test_rsetAndVrfyCountToo(self):
        self.client.send(b"RSET\r\nVRFY postmaster\r\nNOOP\r\nHELP\r\n" * 40)
        codes = [code for code, _ in self.client.replies()]
        # HELP is not junk: 3 junk commands in every 4, the 120th is the 40th round's NOOP.
        self.assertEqual(codes[-1], 421)
        self.assertEqual(len(codes), 40 * 4 - 1 + 1)
        self.assertEqual(codes.count(252), 40)

    @defer.inlineCallbacks
    def test_anAcceptedMessageStartsTheCountAgain(self):
        self.client.send(b"NOOP\r\n" * 100)
        self.assertEqual([code for code, _ in self.client.replies()], [250] * 100)
        for line in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
            self.assertEqual(self.client.cmd(line)[0], 250)
        self.assertEqual(self.client.cmd("DATA")[0], 354)
        self.client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertEqual((yield self.client.whenReply())[0], 250)
        self.client.send(b"NOOP\r\n" * 110)
        self.assertEqual([code for code, _ in self.client.replies()], [250] * 110)

    @defer.inlineCallbacks
    def test_overASocket(self):
        def talk(c):
            return [c.cmd("NOOP") for _ in range(120)] + [c.reply()], c.closed()

        (replies, closed), _ = yield overASocket(self, talk)
        self.assertEqual([code for code, _ in replies], [250] * 120 + [421])
        self.assertEqual(replies[-1][1], ["4.7.0 relay.test too many errors, closing connection"])
        self.assertTrue(closed)


class IdleSessionMemoryTests(unittest.TestCase):
    """
    What an idle connection costs is mostly its session object: its
    attributes stay within CPython's shared-key limit for instance dicts
    (30), past which every session's dict is a table of its own (about
    1.2 KB more for each idle connection).
    """

    @defer.inlineCallbacks
    def test_idleSessionDictIsShared(self):
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},))
        yield gw.start()
        self.addCleanup(gw.stop)

        def talk():
            clients = [Client(gw.port) for _ in range(2)]
            for c in clients:
                self.addCleanup(c.close)
                c.reply()
            c.cmd("EHLO idle.example")

        yield inThread(talk)  # (one session greeted, one after EHLO)
        sessions = gw.service.factories[0].sessions
        self.assertEqual(len(sessions), 2)
        for session in sessions:
            self.assertLessEqual(len(vars(session)), 30)
            self.assertLess(sys.getsizeof(vars(session)), 1024)  # (296 shared; 1,584 a table of its own)


#: ioctl(2): the octets a socket has not had acknowledged yet (Linux).
SIOCOUTQ = 0x5411


def _tcpUnder(transport):
    """The plain TCP transport under a session's transport (through TLS)."""
    while not hasattr(transport, "socket"):
        transport = transport.transport
    return transport


def heldFor(session):
    """
    What the gateway holds for one client that sends and never reads:
    Twisted's write buffer, the unread input, and the replies queued in
    the kernel for the connection.
    """
    tcp = _tcpUnder(session.transport)
    queued = struct.unpack("i", fcntl.ioctl(tcp.socket.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen + session.lineReader.pending + queued


class ImplicitTLSBurstTests(TLSGatewayTestCase):
    """
    A client that pipelines commands and never reads its replies: on a
    plain listener the gateway holds about 70 KB for it (a 16 KB write
    buffer, SO_SNDBUF 8 KB).  An implicit-TLS listener holds it to the same
    bound: the bounds are set on the TCP transport under the TLS layer
    (they were not, and the kernel grew the send buffer to megabytes and
    answered tens of thousands of commands into it).
    """

    tlsListener = {"implicit_tls": True}
    timeout = 60

    #: The most the gateway may hold for one such client (plain: ~70 KB).
    BOUND = 256 * 1024

    @defer.inlineCallbacks
    def test_neverReadingClientBounded(self):
        factory = self.gw.service.factories[0]

        def flood():
            raw = socket.create_connection(("127.0.0.1", self.gw.port), timeout=5)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if not self.tlsListener.get("implicit_tls"):
                c = Client.__new__(Client)
                c.sock, c.buf = raw, b""
                self.assertEqual(c.reply()[0], 220)
                self.assertEqual(c.cmd("STARTTLS")[0], 220)
            sock = clientContext().wrap_socket(raw, server_hostname="relay.test")
            sock.settimeout(2)
            line = b"EHLO pipelining.example\r\n" * 2000
            sent, deadline = 0, time.monotonic() + 10
            try:
                while sent < 8 << 20 and time.monotonic() < deadline:
                    sent += sock.send(line)
            except (socket.timeout, ssl.SSLError, OSError):
                pass
            return sock, sent

        sock, sent = yield inThread(flood)
        self.addCleanup(sock.close)
        yield task.deferLater(reactor, 1, lambda: None)
        [session] = factory.sessions
        held = heldFor(session)
        sndbuf = _tcpUnder(session.transport).socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        answered = session.commandCounts.counts.get("ehlo", [0])[0]
        self.assertLessEqual(held, self.BOUND, "the gateway holds %d octets for one client that never reads "
                             "(SO_SNDBUF %d, %d EHLOs answered; it sent %d)" % (held, sndbuf, answered, sent))


class StartTLSBurstTests(ImplicitTLSBurstTests):
    """The same client after STARTTLS on a plain listener."""

    tlsListener = {}


class HeldMailPolicy:
    """MAIL waits on a Deferred the test fires; everything else accepts at once."""

    def __init__(self):
        self.pending = defer.Deferred()

    def connect(self, ctx):
        return None

    helo = rcpt = data = lambda self, *args: None

    def mail(self, ctx):
        return self.pending


class PendingReplyTests(unittest.TestCase):
    """
    Real sockets: a client that keeps sending while a reply is pending (a
    slow policy check) and never reads holds no more of the gateway's memory
    than one whose replies are backed up.
    """

    @defer.inlineCallbacks
    def test_inputWhileReplyPendingBounded(self):
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"], "junk_command_limit": 100000},))
        yield gw.start()
        self.addCleanup(gw.stop)
        factory = gw.service.factories[0]
        policy = HeldMailPolicy()
        factory.settings = dataclasses.replace(factory.settings, policy=policy)

        def flood():
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.recv(1024)
            s.sendall(b"MAIL FROM:<a@example.org>\r\n")
            s.setblocking(False)
            line = b"NOOP\r\n" * 10000
            sent, stalled, deadline = 0, 0.0, time.monotonic() + 10
            while sent < 2 << 20 and stalled < 1.0 and time.monotonic() < deadline:
                try:
                    sent += s.send(line)
                    stalled = 0.0
                except BlockingIOError:
                    stalled += 0.01
                    time.sleep(0.01)
            return s, sent

        sock, sent = yield inThread(flood)
        self.addCleanup(sock.close)
        yield task.deferLater(reactor, 0.5, lambda: None)  # (what the gateway reads, it has read)
        [session] = factory.sessions
        self.assertIsNotNone(session.waiting)
        held = heldFor(session)
        # (A client whose replies are backed up: about 70 KB.)
        self.assertLessEqual(held, 96 * 1024, "the gateway holds %d octets while MAIL's check is pending "
                             "(the client sent %d)" % (held, sent))
        policy.pending.callback(None)
