"""
A client that shuts its write side (a half-close) after its last commands
still gets every reply to what it sent whole, and then the connection
closes; what it cut short is dropped as at a disconnect.  Over loopback
sockets, on a plain listener, behind a trusted PROXY balancer, and over
TLS (STARTTLS and implicit), where a close_notify ends the input too.
"""

import dataclasses
import socket
import time

from OpenSSL import SSL
from twisted.internet import defer

from relaygw.testing import Client, inThread
from tests.messages import startData
from tests.proxyheaders import rawSession, v2
from tests.sessions import GatewayTestCase, TLSGatewayTestCase
from tests.test_backpressure import HeldMailPolicy
from tests.tlsclient import RecordClient, clientHello


def readAll(sock, timeout=10.0):
    """Everything the server sends until it closes (C{None} if it has not closed within C{timeout})."""
    sock.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except ConnectionResetError:
            return None
        if not chunk:
            return data
        data += chunk
    return None


def codes(data):
    """The codes of the replies in C{data}, one per reply."""
    return [int(line[:3]) for line in data.decode("latin-1").split("\r\n") if line[3:4] == " "]


class HalfCloseTests(GatewayTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}

    def waitDelivered(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.gw.delivered()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.gw.delivered())

    def test_lastGroupAnswered(self):
        """
        Content, end of data and QUIT, then SHUT_WR: the 250 (the message
        is queued) and the 221 still come, then the end of the stream.
        """

        def run(c):
            startData(c)
            c.send(b"Subject: half\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            return c.buf + (readAll(c.sock) or b"<still open>"), self.waitDelivered(1)

        def check(result):
            data, delivered = result
            self.assertEqual(codes(data), [250, 221], data)
            self.assertEqual(delivered, 1)

        return self.session(run).addCallback(check)

    def test_withoutQuit(self):
        """Pipelined commands and no QUIT: each is answered, then the gateway closes."""

        def run(c):
            c.send(b"EHLO x\r\nNOOP\r\nRSET\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            return readAll(c.sock)

        def check(data):
            self.assertIsNotNone(data, "the connection was left open")
            self.assertEqual(codes(data), [250, 250, 250], data)

        return self.session(run).addCallback(check)

    def test_messageCutShort(self):
        """Input that ends inside DATA: no 250, nothing queued, and the connection closes."""

        def run(c):
            startData(c)
            c.send(b"Subject: cut\r\n\r\nno end of data\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            data = readAll(c.sock)
            time.sleep(0.5)
            return data, self.gw.service.spool.queueIds(), self.gw.delivered()

        def check(result):
            data, queued, delivered = result
            self.assertEqual(data, b"")
            self.assertFalse(queued)
            self.assertEqual(delivered, [])

        return self.session(run).addCallback(check)


class HalfCloseBehindProxyTests(GatewayTestCase):
    listener = {"relay_networks": ["192.0.2.0/24"], "proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]}

    def test_lastGroupAnswered(self):
        """The same through the PROXY wrapper: the session behind it hears of the half-close."""
        from twisted.internet.threads import deferToThread

        def run():
            s = rawSession(self.gw.port, v2(src="192.0.2.7"))
            self.addCleanup(s.close)
            s.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            time.sleep(0.3)  # (DATA's 354 first: what follows is content)
            s.sendall(b"Subject: proxied\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            s.shutdown(socket.SHUT_WR)
            return readAll(s)

        def check(data):
            self.assertIsNotNone(data, "the connection was left open")
            self.assertEqual(codes(data), [220, 250, 250, 250, 354, 250, 221], data)

        return deferToThread(run).addCallback(check)

    def test_beforeTheHeader(self):
        """A balancer that shuts its write side before a whole header: closed, nothing written."""
        from twisted.internet.threads import deferToThread

        def run():
            s = rawSession(self.gw.port, v2(src="192.0.2.7")[:10])
            self.addCleanup(s.close)
            s.shutdown(socket.SHUT_WR)
            return readAll(s)

        return deferToThread(run).addCallback(self.assertEqual, b"")


class TLSHalfCloseTests(TLSGatewayTestCase):
    """
    Over STARTTLS: a client that ends its input after its last commands,
    with a close_notify, a TCP half-close or both, still gets every reply
    to what it sent whole (as in the clear, and as Postfix answers), then
    the gateway's close_notify and the end of the stream.  Twisted's TLS
    layer closed at once and the replies still to come (the 250 of the
    message, which was queued all the same, and the 221) were lost.
    """

    tlsListener = {"relay_networks": ["127.0.0.0/8"]}

    def waitDelivered(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.gw.delivered()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.gw.delivered())

    #: Whether the greeting comes inside TLS.
    implicit = False
    #: The highest TLS version the client offers (C{None}: its highest).
    maximum = None

    def tlsSocket(self):
        """A socket for the client's TLS handshake: a greeted session past STARTTLS."""
        raw = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
        self.addCleanup(raw.close)
        return self.starttls(raw)

    def starttls(self, raw):
        c = Client.__new__(Client)
        c.sock, c.buf = raw, b""
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(c.cmd("EHLO x")[0], 250)
        self.assertEqual(c.cmd("STARTTLS")[0], 220)
        return raw

    def tlsClient(self):
        """A greeted session over TLS, as a L{RecordClient}."""
        c = RecordClient(self.tlsSocket(), maximum=self.maximum)
        if self.implicit:
            self.assertEqual(c.reply()[:4], b"220 ")
        return c

    def openData(self, c, rcpt=b"b@example.net"):
        for line in (b"EHLO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<" + rcpt + b">", b"DATA"):
            reply = c.cmd(line)
            self.assertIn(reply[:3], (b"250", b"354"), (line, reply))

    def lastGroup(self, closeNotify, shutWrite):
        """The end of a message and QUIT, then the input ends as asked, all in one write."""

        def run():
            c = self.tlsClient()
            self.openData(c)
            c.send(b"Subject: tls half\r\n\r\nbody\r\n.\r\nQUIT\r\n", closeNotify=closeNotify, shutWrite=shutWrite)
            data, how = c.readAll()
            return data, how, c.closeNotified, self.waitDelivered(1)

        def check(result):
            data, how, closeNotified, delivered = result
            self.assertEqual(codes(data), [250, 221], data)
            self.assertEqual(how, "eof")
            self.assertTrue(closeNotified)
            self.assertEqual(delivered, 1)

        return inThread(run).addCallback(check)

    def test_closeNotify(self):
        return self.lastGroup(closeNotify=True, shutWrite=False)

    def test_shutWrite(self):
        return self.lastGroup(closeNotify=False, shutWrite=True)

    def test_closeNotifyAndShutWrite(self):
        return self.lastGroup(closeNotify=True, shutWrite=True)

    def test_withoutQuit(self):
        """Pipelined commands and a close_notify: each is answered, then the gateway ends TLS and closes."""

        def run():
            c = self.tlsClient()
            c.send(b"EHLO x\r\nNOOP\r\nRSET\r\n", closeNotify=True)
            return c.readAll() + (c.closeNotified,)

        def check(result):
            data, how, closeNotified = result
            self.assertEqual(codes(data), [250, 250, 250], data)
            self.assertEqual(how, "eof")
            self.assertTrue(closeNotified)

        return inThread(run).addCallback(check)

    def test_messageCutShort(self):
        """A close_notify inside DATA: no 250, nothing queued, and the connection closes."""

        def run():
            c = self.tlsClient()
            self.openData(c)
            c.send(b"Subject: cut\r\n\r\nno end of data\r\n", closeNotify=True, shutWrite=True)
            data, how = c.readAll()
            time.sleep(0.5)
            return data, how, self.gw.service.spool.queueIds(), self.gw.delivered()

        def check(result):
            data, how, queued, delivered = result
            self.assertEqual((data, how), (b"", "eof"))
            self.assertFalse(queued)
            self.assertEqual(delivered, [])

        return inThread(run).addCallback(check)

    def test_quitWithoutCloseNotify(self):
        """
        A client that reads the 221 and the gateway's close_notify and
        then waits for the gateway to close, without a close_notify of its
        own: the connection closes at once after them (an end of stream,
        as Postfix closes), where it waited for the client's close_notify
        and was reset after 2 s, logged as a peer that did not take its
        closing reply.
        """

        def run():
            c = self.tlsClient()
            c.send(b"QUIT\r\n")
            started = time.monotonic()
            data, how = c.readAll(timeout=5)
            return data, how, c.closeNotified, time.monotonic() - started

        def check(result):
            data, how, closeNotified, seconds = result
            self.assertEqual(codes(data), [221], data)
            self.assertTrue(closeNotified)
            self.assertEqual(how, "eof")
            self.assertLess(seconds, 1.0)

        return inThread(run).addCallback(check)

    def test_endDuringHandshake(self):
        """
        A client that shuts its write side after its ClientHello: no
        handshake can finish, so the connection closes at once (a FIN, not
        a reset) and the session ends.
        """

        def run():
            raw = self.tlsSocket()
            raw.sendall(clientHello())
            raw.shutdown(socket.SHUT_WR)
            return readAll(raw)

        def check(data):
            self.assertIsNotNone(data, "the connection was left open or reset")
            self.assertEqual(self.gw.service.factories[0].sessions, set())

        return inThread(run).addCallback(check)


class TLS12HalfCloseTests(TLSHalfCloseTests):
    """The same over TLS 1.2, where a close_notify once meant the end of both directions."""

    maximum = SSL.TLS1_2_VERSION


class ImplicitTLSHalfCloseTests(TLSHalfCloseTests):
    """The same on an implicit TLS listener."""

    tlsListener = {"relay_networks": ["127.0.0.0/8"], "implicit_tls": True}
    implicit = True

    def tlsSocket(self):
        raw = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
        self.addCleanup(raw.close)
        return raw


class ProxyTLSHalfCloseTests(TLSHalfCloseTests):
    """STARTTLS behind a trusted PROXY balancer: the TLS layer goes in under the PROXY wrapper."""

    tlsListener = {"relay_networks": ["192.0.2.0/24"], "proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]}

    def tlsSocket(self):
        raw = rawSession(self.gw.port, v2(src="192.0.2.7"))
        self.addCleanup(raw.close)
        return self.starttls(raw)


class ProxyImplicitTLSHalfCloseTests(TLSHalfCloseTests):
    """Implicit TLS behind a trusted PROXY balancer: the PROXY wrapper passes the end of the stream on."""

    tlsListener = {"relay_networks": ["192.0.2.0/24"], "proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"],
                   "implicit_tls": True}
    implicit = True

    def tlsSocket(self):
        raw = rawSession(self.gw.port, v2(src="192.0.2.7"))
        self.addCleanup(raw.close)
        return raw


def residentKB():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


class AfterCloseNotifyTests(TLSGatewayTestCase):
    """
    Nothing may follow a client's close_notify: what a client sends after
    it, while the session still has a reply to give (a slow policy check
    here), is dropped as it comes, not held for the session.
    """

    tlsListener = {"relay_networks": ["127.0.0.0/8"]}

    @defer.inlineCallbacks
    def test_octetsAfterCloseNotifyDropped(self):
        factory = self.gw.service.factories[0]
        policy = HeldMailPolicy()
        factory.settings = dataclasses.replace(factory.settings, policy=policy)
        record = b"\x17\x03\x03\x40\x00" + b"\x00" * 0x4000
        flood = 64 << 20

        def run():
            raw = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
            self.addCleanup(raw.close)
            c = Client.__new__(Client)
            c.sock, c.buf = raw, b""
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("STARTTLS")[0], 220)
            c = RecordClient(raw)
            c.send(b"MAIL FROM:<a@example.org>\r\n", closeNotify=True)
            raw.settimeout(2)
            sent, before, deadline = 0, residentKB(), time.monotonic() + 20
            try:
                while sent < flood and time.monotonic() < deadline:
                    raw.sendall(record * 16)
                    sent += len(record) * 16
            except OSError:
                pass
            time.sleep(0.5)  # (what the gateway reads, it has read)
            return c, sent, residentKB() - before

        c, sent, grown = yield inThread(run)
        self.assertLess(grown, 16 * 1024, "the gateway grew by %d KB as the client sent %d MB after its close_notify"
                        % (grown, sent >> 20))
        policy.pending.callback(None)
        data, how = yield inThread(c.readAll)
        self.assertEqual((codes(data), how), ([250], "eof"))
