"""
PROXY protocol v1/v2 (protocol.md section 16, checklist 3-11): the strict
parser, and a real listener behind it over loopback.
"""

import socket
import struct
import time

from twisted.internet import defer, protocol, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relaygw.proxy import ProxyError, ProxyProtocolFactory, parseHeader
from relaygw.testing import Client, inThread
from tests.test_smtp import GatewayTestCase

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command=1, family=1, transport=1, src="192.0.2.7", dst="198.51.100.1", sport=4567, dport=25,
       tlvs=b"", version=2):
    import ipaddress

    if command == 0:
        body = b""
    elif family == 1:
        body = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    elif family == 2:
        body = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
    else:
        body = b"\x00" * 216
    body += tlvs
    return SIG + bytes([(version << 4) | command, (family << 4) | transport]) + struct.pack("!H", len(body)) + body


class ParserTests(unittest.TestCase):
    def test_v1TCP4(self):
        info, n = parseHeader(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\nEHLO")
        self.assertEqual((info.command, info.source.host, info.source.port, info.destination.port),
                         ("PROXY", "192.0.2.7", 4567, 25))
        self.assertEqual(n, len(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n"))

    def test_v1TCP6Canonical(self):
        info, _ = parseHeader(b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 2001:db8::2 1 2\r\n")
        self.assertEqual(info.source.host, "2001:db8::1")
        self.assertEqual(info.source.type, "TCP")

    def test_v2Inet(self):
        info, n = parseHeader(v2(tlvs=b"\x04\x00\x03abc\x05\x00\x01x") + b"rest")
        self.assertEqual((info.version, info.source.host, info.source.port), (2, "192.0.2.7", 4567))
        self.assertEqual(n, len(v2(tlvs=b"\x04\x00\x03abc\x05\x00\x01x")))

    def test_v2Inet6(self):
        info, _ = parseHeader(v2(family=2, src="2001:db8::11", dst="2001:db8::1"))
        self.assertEqual(info.source.host, "2001:db8::11")

    def test_v2Local(self):
        info, _ = parseHeader(v2(command=0))
        self.assertEqual((info.command, info.source), ("LOCAL", None))

    def test_everyPrefixIncomplete(self):
        for header in (b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n", v2()):
            for i in range(len(header)):
                self.assertEqual(parseHeader(header[:i]), (None, 0), header[:i])
            self.assertIsNotNone(parseHeader(header)[0])

    def test_refusals(self):
        bad = [
            b"GET / HTTP/1.0\r\n", b"EHLO x\r\n", b"\r\n\r\nxx",
            v2(version=1), v2(command=2), v2(family=0), v2(family=3), v2(transport=2),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25" + b" " * 80,  # no CRLF in 107
            b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\n",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 4567 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 04567 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n",
            b"PROXY UNKNOWN\r\n",
            b"PROXY TCP4 192.0.2.007 198.51.100.1 1 25\r\n",
        ]
        for data in bad:
            self.assertRaises(ProxyError, parseHeader, data)


class Greeter(protocol.Protocol):
    def connectionMade(self):
        peer = self.transport.getPeer()
        self.transport.write(b"220 hello %s %d\r\n" % (peer.host.encode(), peer.port))

    def dataReceived(self, data):
        self.factory.received.append(data)


class WrapperTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        inner = protocol.Factory.forProtocol(Greeter)
        inner.received = []
        self.inner = inner
        self.factory = ProxyProtocolFactory(inner, lambda ip: ip == "127.0.0.1", 5, self.clock)

    def connect(self, peer="127.0.0.1"):
        from twisted.internet.address import IPv4Address

        p = self.factory.buildProtocol(IPv4Address("TCP", peer, 1234))
        t = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
        p.makeConnection(t)
        return p, t

    def test_nothingBeforeHeaderThenGreeting(self):
        p, t = self.connect()
        header = b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\nEHLO x\r\n"
        n = len(header) - 8
        for i in range(n - 1):
            p.dataReceived(header[i:i + 1])
            self.assertEqual(t.value(), b"")
        p.dataReceived(header[n - 1:])
        self.assertEqual(t.value(), b"220 hello 192.0.2.7 4567\r\n")
        self.assertEqual(b"".join(self.inner.received), b"EHLO x\r\n")

    def test_timeout(self):
        p, t = self.connect()
        self.clock.advance(5)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")

    def test_untrusted(self):
        p, t = self.connect("192.0.2.99")
        self.assertTrue(t.disconnecting)
        p.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n")
        self.assertEqual(t.value(), b"")

    def test_malformed(self):
        p, t = self.connect()
        p.dataReceived(b"HELO x\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")
        self.assertFalse(self.clock.getDelayedCalls())


def rawSession(port, header, then=b""):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(header + then)
    return s


class ProxyListenerTests(GatewayTestCase):
    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "proxy_timeout": 1,
                "relay_networks": ["192.0.2.0/24"]}

    def test_v1SourceBecomesIdentity(self):
        return self._identity(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n", b"[192.0.2.7]")

    def test_v2SourceBecomesIdentity(self):
        return self._identity(v2(family=2, src="2001:db8::7", dst="2001:db8::1"), b"[IPv6:2001:db8::7]",
                              relays=False)

    def _identity(self, header, expected, relays=True):
        def run():
            s = rawSession(self.gw.port, header)
            c = Client.__new__(Client)
            c.sock, c.buf = s, b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            code = c.cmd("RCPT TO:<b@example.net>")[0]
            self.assertEqual(code, 250 if relays else 554)  # relay_networks judged on the PROXY source
            if relays:
                c.cmd("DATA")
                c.send("Subject: p\r\n\r\nx\r\n.\r\n")
                self.assertEqual(c.reply()[0], 250)

        d = inThread(run)
        if relays:
            d.addCallback(lambda _: self.gw.service.queue.whenIdle())
            d.addCallback(lambda _: self.assertIn(b"(unknown " + expected + b")", self.gw.delivered()[0]))
            d.addCallback(lambda _: self.assertIn(b"(proxied by [127.0.0.1])", self.gw.delivered()[0]))
        return d

    def test_localIsRealPeer(self):
        def run():
            s = rawSession(self.gw.port, v2(command=0))
            c = Client.__new__(Client)
            c.sock, c.buf = s, b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)  # 127.0.0.1 may not relay

        return inThread(run)

    def test_refusedHeadersCloseWithoutGreeting(self):
        def run():
            for data in (b"EHLO x\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 4567\r\n", v2(version=3),
                         b"PROXY UNKNOWN\r\n"):
                s = rawSession(self.gw.port, data)
                s.settimeout(5)
                self.assertEqual(s.recv(100), b"", data)
                s.close()

        return inThread(run)

    def test_truncatedHeaderTimesOut(self):
        def run():
            s = rawSession(self.gw.port, b"PROXY TCP4 192.0.2.7")
            s.settimeout(5)
            started = time.monotonic()
            self.assertEqual(s.recv(100), b"")
            self.assertLess(time.monotonic() - started, 4)
            s.close()

        return inThread(run)

    def test_oneOctetPerSegment(self):
        def run():
            s = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for b in b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n":
                s.send(bytes([b]))
                time.sleep(0.002)
            c = Client.__new__(Client)
            c.sock, c.buf = s, b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)

        return inThread(run)


class UntrustedBalancerTests(GatewayTestCase):
    listener = {"proxy_protocol": True, "proxy_trusted": ["192.0.2.0/24"]}

    def test_untrustedSourceClosed(self):
        def run():
            s = rawSession(self.gw.port, b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n")
            s.settimeout(5)
            self.assertEqual(s.recv(100), b"")

        return inThread(run)


class NonProxyListenerTests(GatewayTestCase):
    def test_headerNeverHonoured(self):
        def run(c):
            code, _ = c.cmd("PROXY TCP4 192.0.2.7 198.51.100.1 4567 25")
            self.assertEqual(code, 500)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class ProxyThenTLSTests(GatewayTestCase):
    """HAProxy's send-proxy in front of implicit TLS: the header first, then the handshake."""

    @defer.inlineCallbacks
    def setUp(self):
        import os

        from relaygw.tls import generateSelfSigned

        d = os.path.abspath(self.mktemp())
        generateSelfSigned(os.path.join(d, "c.pem"), os.path.join(d, "k.pem"), "relay.test")
        self.listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "implicit_tls": True,
                         "tls_certificate": os.path.join(d, "c.pem"), "tls_key": os.path.join(d, "k.pem"),
                         "trusted_peers": ["192.0.2.0/24"], "extensions": ["xdumpcontext"]}
        yield GatewayTestCase.setUp(self)

    def test_headerThenTLS(self):
        from tests.test_starttls import clientContext

        def run():
            s = rawSession(self.gw.port, v2(src="192.0.2.44", sport=1111))
            c = Client.__new__(Client)
            c.sock, c.buf = clientContext().wrap_socket(s, server_hostname="relay.test"), b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            code, lines = c.cmd("XDUMPCONTEXT")  # trusted: the PROXY source is in trusted_peers
            self.assertEqual(code, 250)
            self.assertIn("2.0.0 [connection] remote_ip 192.0.2.44", lines)
            self.assertIn("2.0.0 [connection] proxy_peer_ip 127.0.0.1", lines)
            self.assertTrue(any(l.startswith("2.0.0 [connection] tls TLSv1.") for l in lines), lines)

        return inThread(run)
