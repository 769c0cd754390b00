"""
PROXY protocol v1/v2 (protocol.md section 16, checklist 3-11): the strict
parser (examples and properties), the wrapper on a fake transport and clock,
a bare wrapper on real loopback connections (plain and header-then-TLS), a
gateway listener behind it on the session harness, and a gateway listener
with PROXY and implicit TLS on a loopback socket.
"""

import os
import socket
import ssl
import struct
import subprocess
import sys

from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from relaygw.proxy import (
    ProxyError,
    ProxyInfo,
    ProxyProtocolFactory,
    ProxyProtocolWrapper,
    findProxyInfo,
    parseHeader,
)
from relaygw.testing import Client, inThread
from relaygw.trust import isEndpoint
from tests.proxyheaders import SIG, rawSession, v2
from tests.sessions import GatewayTestCase, SessionTestCase, TLSGatewayTestCase
from tests.tlsmaterial import altNames, certificate, clientContext, commonName, newKey, pem

V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n"


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


class ParserTests(unittest.TestCase):
    def test_v1TCP4(self):
        info, n = parseHeader(V1 + b"EHLO")
        self.assertEqual((info.command, info.version, info.source, info.destination, info.peer),
                         ("PROXY", 1, IPv4Address("TCP", "192.0.2.7", 4567),
                          IPv4Address("TCP", "198.51.100.1", 25), None))
        self.assertEqual(n, len(V1))

    def test_v1TCP6Canonical(self):
        info, _ = parseHeader(b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 2001:db8::2 1 2\r\n")
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::1", 1))
        self.assertEqual(info.destination, IPv6Address("TCP", "2001:db8::2", 2))

    def test_v1TCP6MappedIsIPv4(self):
        info, _ = parseHeader(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.1 0 65535\r\n")
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.7", 0))
        self.assertEqual(info.destination, IPv4Address("TCP", "198.51.100.1", 65535))

    def test_v2Inet(self):
        header = v2(tlvs=tlv(0x04, b"abc") + tlv(0x05, b"x") + tlv(0x20, b""))
        info, n = parseHeader(header + b"rest")
        self.assertEqual((info.command, info.version, info.source, info.destination),
                         ("PROXY", 2, IPv4Address("TCP", "192.0.2.7", 4567), IPv4Address("TCP", "198.51.100.1", 25)))
        self.assertEqual(n, len(header))

    def test_v2Inet6WithTLVs(self):
        header = v2(family=2, src="2001:db8:0:0::11", dst="2001:db8::1", sport=1, dport=587,
                    tlvs=tlv(0x01, b"smtp") + tlv(0xE0, b"\x00" * 300))
        info, n = parseHeader(header + b"EHLO x\r\n")
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::11", 1))
        self.assertEqual(info.destination, IPv6Address("TCP", "2001:db8::1", 587))
        self.assertEqual(n, len(header))

    def test_v2Inet6MappedIsIPv4(self):
        info, _ = parseHeader(v2(family=2, src="::ffff:192.0.2.7", dst="2001:db8::1"))
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.7", 4567))

    def test_v2Local(self):
        info, n = parseHeader(v2(command=0) + b"x")
        self.assertEqual((info.command, info.version, info.source, info.destination), ("LOCAL", 2, None, None))
        self.assertEqual(n, 16)

    def test_v2LocalIgnoresAddresses(self):
        """LOCAL with an address block (and junk after it) still means: use the real connection."""
        header = bytearray(v2(tlvs=b"\xff"))
        header[12] = 0x20
        info, n = parseHeader(bytes(header))
        self.assertEqual((info.command, info.source, n), ("LOCAL", None, len(header)))

    def test_everyPrefixIncomplete(self):
        headers = (V1, b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n", v2(),
                   v2(family=2, src="2001:db8::1", dst="2001:db8::2", tlvs=tlv(0x04, b"pad")), v2(command=0))
        for header in headers:
            for i in range(len(header)):
                self.assertEqual(parseHeader(header[:i]), (None, 0), header[:i])
            info, n = parseHeader(header)
            self.assertIsNotNone(info)
            self.assertEqual(n, len(header))

    def test_refusals(self):
        """Checklist 7-9, and the v2 framing limits."""
        local = bytearray(v2(command=0))
        local[13] = 0x41  # family 4 does not exist, even for LOCAL
        bad = {
            "garbage": b"GET / HTTP/1.0\r\n",
            "smtp": b"EHLO x\r\n",
            "lowercase": b"proxy TCP4 192.0.2.7 198.51.100.1 4567 25\r\n",
            "v2 bad signature": b"\r\n\r\nxx",
            "v2 version 1": v2(version=1),
            "v2 version 3": v2(version=3),
            "v2 command 2": v2(command=2),
            "v2 PROXY UNSPEC": v2(family=0, transport=0),
            "v2 PROXY UNSPEC STREAM": v2(family=0),
            "v2 PROXY UNIX": v2(family=3),
            "v2 PROXY DGRAM": v2(transport=2),
            "v2 PROXY INET6 DGRAM": v2(family=2, transport=2, src="2001:db8::1", dst="2001:db8::2"),
            "v2 LOCAL unknown family": bytes(local),
            "v2 length short of INET": SIG + b"\x21\x11\x00\x0b" + b"\x00" * 11,
            "v2 length short of INET6": SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12,
            "v2 over 4096": SIG + b"\x21\x11\x10\x00",
            "v2 truncated TLV": v2(tlvs=b"\x04\x00"),
            "v2 TLV past the end": v2(tlvs=b"\x04\x00\x05abc"),
            "v1 no CRLF in 107": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25" + b" " * 80,
            "v1 108 with CRLF": b"PROXY TCP6 " + b"0" * 95 + b"\r\n",
            "v1 LF only": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\n",
            "v1 bare CR": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r25\r\n",
            "v1 double space": b"PROXY TCP4 192.0.2.7  198.51.100.1 4567 25\r\n",
            "v1 trailing space": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25 \r\n",
            "v1 tab": b"PROXY TCP4\t192.0.2.7 198.51.100.1 4567 25\r\n",
            "v1 missing port": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567\r\n",
            "v1 extra field": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25 1\r\n",
            "v1 leading zero port": b"PROXY TCP4 192.0.2.7 198.51.100.1 04567 25\r\n",
            "v1 port 00": b"PROXY TCP4 192.0.2.7 198.51.100.1 00 25\r\n",
            "v1 port 65536": b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
            "v1 port 99999": b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 99999\r\n",
            "v1 TCP4 with IPv6": b"PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n",
            "v1 TCP6 with IPv4": b"PROXY TCP6 192.0.2.7 2001:db8::1 1 25\r\n",
            "v1 leading zero octet": b"PROXY TCP4 192.0.2.007 198.51.100.1 1 25\r\n",
            "v1 octet 256": b"PROXY TCP4 192.0.2.256 198.51.100.1 1 25\r\n",
            "v1 scoped IPv6": b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25\r\n",
            "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
            "v1 UNKNOWN with addresses": b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 1 25\r\n",
            "v1 TCP5": b"PROXY TCP5 192.0.2.7 198.51.100.1 1 25\r\n",
            "v1 no protocol": b"PROXY \r\n",
            # Addresses no connection has, refused as XCLIENT ADDR= refuses them.
            "v1 unspecified source": b"PROXY TCP4 0.0.0.0 198.51.100.1 1 25\r\n",
            "v1 broadcast source": b"PROXY TCP4 255.255.255.255 198.51.100.1 1 25\r\n",
            "v1 multicast destination": b"PROXY TCP4 192.0.2.7 224.0.0.1 1 25\r\n",
            "v1 unspecified IPv6 source": b"PROXY TCP6 :: 2001:db8::1 1 25\r\n",
            "v1 mapped unspecified source": b"PROXY TCP6 ::ffff:0.0.0.0 2001:db8::1 1 25\r\n",
            "v2 multicast source": v2(src="239.1.2.3"),
            "v2 unspecified destination": v2(dst="0.0.0.0"),
            "v2 multicast IPv6 source": v2(family=2, src="ff02::1", dst="2001:db8::2"),
        }
        for name, data in bad.items():
            try:
                parseHeader(data)
            except ProxyError as e:
                self.assertTrue(str(e), name)
            else:
                self.fail("%s: %r accepted" % (name, data))

    def test_decidedEarly(self):
        """Hopeless prefixes are refused at once, without waiting for more bytes."""
        for data in (b"E", b"\x00", b"PROXy", b"\r\n\r\n\x00\r\nQ!", SIG + b"\x11", SIG + b"\x22",
                     SIG + b"\x21\x31", SIG + b"\x21\x12", SIG + b"\x21\x11\xff\xff", SIG + b"\x21\x11\x00\x0b",
                     b"PROXY UNK", b"PROXY TCP4 192.0.2.7\n", b"PROXY TCP4 192.0.2.7 x"):
            self.assertRaises(ProxyError, parseHeader, data)


def connectionEnds(v):
    """Addresses a connection can have (L{relaygw.trust.isEndpoint}), of IP version C{v}."""
    return st.ip_addresses(v=v).filter(lambda a: isEndpoint(a.ipv4_mapped or a if v == 6 else a))


addressPairs = st.one_of(
    st.tuples(st.just("TCP4"), connectionEnds(4), connectionEnds(4)),
    st.tuples(st.just("TCP6"), connectionEnds(6), connectionEnds(6)),
)
ports = st.integers(0, 65535)


def canonical(addr):
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class ParserPropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(addressPairs, ports, ports, st.binary(max_size=20))
    def test_v1RoundTrip(self, pair, sport, dport, rest):
        proto, src, dst = pair
        header = ("PROXY %s %s %s %d %d\r\n" % (proto, src.exploded, dst, sport, dport)).encode()
        info, n = parseHeader(header + rest)
        self.assertEqual(n, len(header))
        self.assertEqual((info.source.host, info.source.port), (canonical(src), sport))
        self.assertEqual((info.destination.host, info.destination.port), (canonical(dst), dport))
        for i in range(len(header)):
            self.assertEqual(parseHeader(header[:i]), (None, 0))

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.tuples(st.just(1), connectionEnds(4), connectionEnds(4)),
                     st.tuples(st.just(2), connectionEnds(6), connectionEnds(6))),
           ports, ports, st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
    def test_v2RoundTrip(self, triple, sport, dport, tlvs):
        family, src, dst = triple
        header = v2(family=family, src=str(src), dst=str(dst), sport=sport, dport=dport,
                    tlvs=b"".join(tlv(k, v) for k, v in tlvs))
        info, n = parseHeader(header + b"EHLO")
        self.assertEqual(n, len(header))
        self.assertEqual((info.source.host, info.source.port), (canonical(src), sport))
        self.assertEqual((info.destination.host, info.destination.port), (canonical(dst), dport))
        for i in range(len(header)):
            self.assertEqual(parseHeader(header[:i]), (None, 0))

    @settings(max_examples=1000, deadline=None)
    @given(st.one_of(st.binary(max_size=200),
                     st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                     st.binary(max_size=120).map(lambda b: SIG + b)),
           st.binary(max_size=50))
    def test_anyBytes(self, data, more):
        """
        Arbitrary bytes only ever give a result or L{ProxyError}; a refusal
        stays a refusal and a result stays the same result whatever follows.
        """
        try:
            info, n = parseHeader(data)
        except ProxyError:
            self.assertRaises(ProxyError, parseHeader, data + more)
            return
        if info is None:
            self.assertEqual(n, 0)
            self.assertLess(len(data), 4096)
        else:
            self.assertTrue(0 < n <= len(data))
            self.assertEqual(parseHeader(data + more), (info, n))
            self.assertEqual(parseHeader(data[:n]), (info, n))


class Greeter(protocol.Protocol):
    """Greets with the peer it sees (C{220 hello <host> <port>}), then echoes."""

    def connectionMade(self):
        self.factory.connected.append(self)
        peer = self.transport.getPeer()
        self.transport.write(b"220 hello %s %d\r\n" % (peer.host.encode(), peer.port))

    def dataReceived(self, data):
        self.factory.received.append(data)
        self.transport.write(data)

    def connectionLost(self, reason):
        self.factory.lost.append(self)


def greeterFactory():
    f = protocol.Factory.forProtocol(Greeter)
    f.connected, f.received, f.lost = [], [], []
    return f


class WrapperTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.inner = greeterFactory()
        self.asked = []

        def isTrusted(ip):
            self.asked.append(ip)
            return ip == "127.0.0.1"

        self.factory = ProxyProtocolFactory(self.inner, isTrusted, 5, self.clock)

    def connect(self, peer="127.0.0.1"):
        p = self.factory.buildProtocol(IPv4Address("TCP", peer, 1234))
        t = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234),
                            hostAddress=IPv4Address("TCP", "127.0.0.1", 2525))
        p.makeConnection(t)
        return p, t

    def test_nothingBeforeHeaderThenGreeting(self):
        """Checklist 3 and 6: one octet per segment, no greeting until the last."""
        p, t = self.connect()
        self.assertEqual(self.asked, ["127.0.0.1"])
        for i in range(len(V1) - 1):
            p.dataReceived(V1[i:i + 1])
            self.assertEqual(t.value(), b"")
            self.assertEqual(self.inner.connected, [])
            self.assertIsNone(findProxyInfo(p))
        self.assertEqual(p.getPeer(), IPv4Address("TCP", "127.0.0.1", 1234))
        p.dataReceived(V1[-1:])
        self.assertEqual(t.value(), b"220 hello 192.0.2.7 4567\r\n")
        self.assertEqual(len(self.inner.connected), 1)
        self.assertEqual(p.getPeer(), IPv4Address("TCP", "192.0.2.7", 4567))
        self.assertEqual(p.getHost(), IPv4Address("TCP", "198.51.100.1", 25))
        self.assertEqual(p.proxyInfo.peer, IPv4Address("TCP", "127.0.0.1", 1234))
        self.assertIs(findProxyInfo(self.inner.connected[0].transport), p.proxyInfo)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(t.disconnecting)

    def test_bytesAfterHeaderDelivered(self):
        p, t = self.connect()
        p.dataReceived(v2() + b"EHLO x\r\n")
        self.assertEqual(self.inner.received, [b"EHLO x\r\n"])
        p.dataReceived(b"QUIT\r\n")
        self.assertEqual(self.inner.received, [b"EHLO x\r\n", b"QUIT\r\n"])
        self.assertEqual(t.value(), b"220 hello 192.0.2.7 4567\r\nEHLO x\r\nQUIT\r\n")

    def test_localIsRealPeer(self):
        """Checklist 5: v2 LOCAL gives the real peer and host."""
        p, t = self.connect()
        p.dataReceived(v2(command=0))
        self.assertEqual(t.value(), b"220 hello 127.0.0.1 1234\r\n")
        self.assertEqual(p.getHost(), IPv4Address("TCP", "127.0.0.1", 2525))
        self.assertEqual(p.proxyInfo.command, "LOCAL")

    def test_timeout(self):
        """Checklist 10: no header in time, closed, no greeting, one log line."""
        p, t = self.connect()
        p.dataReceived(b"PROXY TCP4 192.0.2.7")
        self.clock.advance(4.9)
        self.assertFalse(t.disconnecting)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.inner.connected, [])
        self.assertEqual(len(events), 1)
        self.assertIn("127.0.0.1", events[0]["log_format"].format(**events[0]))
        p.dataReceived(b" 198.51.100.1 4567 25\r\n")  # too late
        self.assertEqual((t.value(), self.inner.connected), (b"", []))

    def test_untrusted(self):
        """Checklist 10: a header from an untrusted socket peer is never read."""
        with capturedLogs() as events:
            p, t = self.connect("192.0.2.99")
        self.assertEqual(self.asked, ["192.0.2.99"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        p.dataReceived(V1)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.inner.connected, [])
        self.assertIsNone(p.proxyInfo)
        self.assertEqual(len(events), 1)
        self.assertIn("192.0.2.99", events[0]["log_format"].format(**events[0]))

    def test_malformed(self):
        """Checklist 7: a bad header closes, logs one line, stops the timer."""
        p, t = self.connect()
        with capturedLogs() as events:
            p.dataReceived(b"HELO x\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.inner.connected, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(events), 1)
        p.dataReceived(V1)
        self.assertEqual((t.value(), self.inner.connected), (b"", []))

    def test_lostBeforeHeader(self):
        """The wrapped protocol, never connected, is never told of a loss."""
        p, t = self.connect()
        p.dataReceived(V1[:10])
        self.assertEqual(len(self.factory.protocols), 1)
        p.connectionLost(None)
        self.assertEqual(self.factory.protocols, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.inner.lost, [])

    def test_lostAfterHeader(self):
        p, t = self.connect()
        p.dataReceived(V1)
        p.connectionLost(None)
        self.assertEqual(self.inner.lost, self.inner.connected)
        self.assertEqual(self.factory.protocols, {})

    def test_findProxyInfoWalksLayers(self):
        info = ProxyInfo("PROXY", 1)

        class Layer:
            def __init__(self, below):
                self.transport = below

        bottom = Layer(None)
        bottom.proxyInfo = info
        self.assertIs(findProxyInfo(Layer(Layer(bottom))), info)
        self.assertIsNone(findProxyInfo(Layer(Layer(None))))
        self.assertIsNone(findProxyInfo(StringTransport()))
        self.assertIsNone(findProxyInfo(None))

    def test_defaultClockIsReactor(self):
        f = ProxyProtocolFactory(self.inner, lambda ip: True)
        self.assertIs(f.clock, reactor)

    def test_importDoesNotInstallReactor(self):
        code = "import sys, relaygw.proxy; print('twisted.internet.reactor' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.assertEqual(out.stdout.strip(), b"False")


class _TrackedWrapper(ProxyProtocolWrapper):
    """Fires C{factory.closed} when the server side of a connection is gone."""

    def connectionLost(self, reason):
        ProxyProtocolWrapper.connectionLost(self, reason)
        self.factory.closed.callback(None)


def selfSigned():
    """A throwaway self-signed certificate for C{localhost}: (PEM cert, PEM key)."""
    key = newKey()
    name = commonName("localhost")
    cert = certificate(name, name, key, key, 1, altNames(x509.DNSName("localhost")))
    return pem(cert), pem(key)


def readLine(sock):
    """Read up to and including the first CRLF (or to EOF)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class LoopbackTests(unittest.TestCase):
    """The bare wrapper on real loopback connections, clients in a thread."""

    timeout = 30

    def listen(self, wrapped, trusted=True):
        self.inner = wrapped
        factory = ProxyProtocolFactory(wrapped, lambda ip: trusted and ip == "127.0.0.1", 5, reactor)
        factory.protocol = _TrackedWrapper
        factory.closed = defer.Deferred()
        self.factory = factory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_greetingOnlyAfterHeader(self):
        inner = greeterFactory()
        portNumber = self.listen(inner)

        def client():
            with socket.create_connection(("127.0.0.1", portNumber), timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(0.3)
                self.assertRaises(socket.timeout, s.recv, 100)  # nothing before the header
                s.sendall(V1[:7])
                self.assertRaises(socket.timeout, s.recv, 100)
                s.settimeout(10)
                s.sendall(V1[7:] + b"ping\r\n")
                return readLine(s), readLine(s)

        greeting, echo = yield inThread(client)
        self.assertEqual(greeting, b"220 hello 192.0.2.7 4567\r\n")
        self.assertEqual(echo, b"ping\r\n")
        yield self.factory.closed
        self.assertEqual(len(inner.lost), 1)

    @defer.inlineCallbacks
    def assertClosedSilently(self, data, trusted=True):
        """After C{data} the connection closes without a byte sent, and the inner protocol never connects."""
        inner = greeterFactory()
        portNumber = self.listen(inner, trusted=trusted)

        def client():
            with socket.create_connection(("127.0.0.1", portNumber), timeout=10) as s:
                try:
                    s.sendall(data)
                except OSError:
                    pass  # already closed: fine
                try:
                    return s.recv(100)
                except ConnectionResetError:
                    return b""

        self.assertEqual((yield inThread(client)), b"")
        yield self.factory.closed
        self.assertEqual(inner.connected, [])

    def test_untrustedClosedSilently(self):
        return self.assertClosedSilently(V1, trusted=False)

    def test_malformedClosedSilently(self):
        return self.assertClosedSilently(b"PROXY TCP4 192.0.2.7 198.51.100.1 04567 25\r\nEHLO x\r\n")

    @defer.inlineCallbacks
    def test_proxyThenTLS(self):
        """HAProxy C{send-proxy} before implicit TLS: the header in clear, then the handshake."""
        certPEM, keyPEM = selfSigned()
        inner = greeterFactory()
        tlsFactory = TLSMemoryBIOFactory(PrivateCertificate.loadPEM(certPEM + keyPEM).options(), False, inner)
        portNumber = self.listen(tlsFactory)
        context = ssl.create_default_context(cadata=certPEM.decode("ascii"))

        def client():
            raw = socket.create_connection(("127.0.0.1", portNumber), timeout=10)
            raw.sendall(v2(family=2, src="2001:db8::7", dst="2001:db8::25", sport=40000, dport=465))
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                greeting = readLine(s)
                s.sendall(b"ping\r\n")
                return greeting, readLine(s), s.version()

        greeting, echo, version = yield inThread(client)
        self.assertEqual(greeting, b"220 hello 2001:db8::7 40000\r\n")
        self.assertEqual(echo, b"ping\r\n")
        self.assertTrue(version.startswith("TLSv1"))
        [greeter] = inner.connected
        info = findProxyInfo(greeter.transport)
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::7", 40000))
        self.assertEqual(info.peer.host, "127.0.0.1")
        self.assertEqual(greeter.transport.getHost(), IPv6Address("TCP", "2001:db8::25", 465))
        yield self.factory.closed
        self.assertEqual(inner.lost, [greeter])


class ProxyListenerTests(SessionTestCase):
    """A listener behind its PROXY wrapper, on the session harness (the header timer on its clock)."""

    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "proxy_timeout": 1,
                "relay_networks": ["192.0.2.0/24"]}
    realSpool = True

    def connect(self, data):
        """A connection from the balancer (127.0.0.1) that starts with C{data}."""
        c = self.harness.connect(proxy=data)
        self.addCleanup(c.lose)
        return c

    def test_v1SourceBecomesIdentity(self):
        return self._identity(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n", b"[192.0.2.7]")

    def test_v2SourceBecomesIdentity(self):
        return self._identity(v2(family=2, src="2001:db8::7", dst="2001:db8::1"), b"[IPv6:2001:db8::7]",
                              relays=False)

    @defer.inlineCallbacks
    def _identity(self, header, expected, relays=True):
        c = self.connect(header)
        self.assertEqual(c.reply()[0], 220)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.org>")
        code = c.cmd("RCPT TO:<b@example.net>")[0]
        self.assertEqual(code, 250 if relays else 554)  # relay_networks judged on the PROXY source
        if relays:
            c.cmd("DATA")
            c.send("Subject: p\r\n\r\nx\r\n.\r\n")
            self.assertEqual((yield c.whenReply())[0], 250)
            [(_, msg)] = self.spooled()
            self.assertIn(b"(unknown " + expected + b")", msg)
            # The balancer stays out of the trace header (received_shows_peer = false).
            self.assertNotIn(b"proxied by", msg)

    def test_localIsRealPeer(self):
        c = self.connect(v2(command=0))
        self.assertEqual(c.reply()[0], 220)
        c.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)  # 127.0.0.1 may not relay

    def test_refusedHeadersCloseWithoutGreeting(self):
        for data in (b"EHLO x\r\n", b"PROXY TCP4 192.0.2.7 198.51.100.1 4567\r\n", v2(version=3),
                     b"PROXY UNKNOWN\r\n"):
            c = self.connect(data)
            self.assertEqual((c.take(), c.closed()), (b"", True), data)

    def test_truncatedHeaderTimesOut(self):
        c = self.connect(b"PROXY TCP4 192.0.2.7")
        self.clock.advance(0.9)
        self.assertFalse(c.closed())
        self.clock.advance(0.1)  # proxy_timeout = 1 s
        self.assertEqual((c.take(), c.closed()), (b"", True))

    def test_oneOctetPerSegment(self):
        c = self.connect(b"")
        for b in b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n":
            c.send(bytes([b]))
        self.assertEqual(c.reply()[0], 220)


class UntrustedBalancerTests(SessionTestCase):
    listener = {"proxy_protocol": True, "proxy_trusted": ["192.0.2.0/24"]}

    def test_untrustedSourceClosed(self):
        c = self.harness.connect(proxy=b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n")
        self.addCleanup(c.lose)
        self.assertEqual((c.take(), c.closed()), (b"", True))


class NonProxyListenerTests(SessionTestCase):
    def test_headerNeverHonoured(self):
        def run(c):
            code, _ = c.cmd("PROXY TCP4 192.0.2.7 198.51.100.1 4567 25")
            self.assertEqual(code, 500)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class ProxyThenTLSTests(GatewayTestCase):
    """
    HAProxy's send-proxy in front of implicit TLS: the header first, then the
    handshake, over a loopback socket through the listener's own PROXY and
    TLS wrappers (the session harness builds no implicit TLS).
    """

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


class ProxyStartTLSTests(TLSGatewayTestCase):
    """STARTTLS on a PROXY listener, over a loopback socket: the TLS layer goes in under the PROXY wrapper."""

    tlsListener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "require_tls": True,
                   "trusted_peers": ["192.0.2.0/24"], "extensions": ["xdumpcontext"]}

    def test_handshakeReachesSession(self):
        def run():
            c = Client.__new__(Client)
            c.sock, c.buf = rawSession(self.gw.port, V1), b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("EHLO x")[0], 250)
            self.starttls(c)
            code, lines = c.cmd("EHLO x")
            self.assertEqual(code, 250)
            self.assertNotIn("STARTTLS", lines)
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)  # require_tls is met
            self.assertEqual(c.cmd("STARTTLS")[0], 503)
            code, lines = c.cmd("XDUMPCONTEXT")
            self.assertIn("2.0.0 [connection] remote_ip 192.0.2.7", lines)
            self.assertTrue(any(l.startswith("2.0.0 [connection] tls TLSv1.") for l in lines), lines)

        return inThread(run)


class ProxyConnectionEndTests(GatewayTestCase):
    """A session behind PROXY is let go once its connection has gone, however it ends."""

    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "relay_networks": ["192.0.2.0/24"]}

    def test_droppedAndClosedSessionsLetGo(self):
        factory = self.gw.service.factories[0]

        def run():
            for quit in (False, True):
                c = Client(self.gw.port)
                self.addCleanup(c.close)
                c.send(V1)
                self.assertEqual(c.reply()[0], 220)
                c.cmd("EHLO x")
                if quit:
                    self.assertEqual(c.cmd("QUIT")[0], 221)
                    self.assertTrue(c.closed())
                c.close()

        def held():
            return factory.connectionsHeld(), len(factory.closing)

        @defer.inlineCallbacks
        def check(_):
            for _ in range(50):  # (at most 5 seconds)
                if held() == (0, 0):
                    break
                yield task.deferLater(reactor, 0.1, lambda: None)
            # Neither the dropped session nor the one that quit is held as closing for ever.
            self.assertEqual(held(), (0, 0))

        return inThread(run).addCallback(check)
