"""
A client that shuts its write side (a half-close) after its last commands
still gets every reply to what it sent whole, and then the connection
closes; what it cut short is dropped as at a disconnect.  Over loopback
sockets, on a plain listener and behind a trusted PROXY balancer.
"""

import socket
import time

from tests.messages import startData
from tests.proxyheaders import rawSession, v2
from tests.sessions import GatewayTestCase


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
