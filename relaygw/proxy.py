"""
PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt) in front of a
listener, strictly (protocol.md section 16).

Twisted's C{haproxy:} wrapper is not used: it lets the greeting out before
the header has arrived, has no trusted-source check and no timeout, drops
headers split across small segments, accepts loose v1 forms, and expects
the header inside TLS.  This wrapper buffers until a complete, valid header
from a trusted balancer has arrived, and only then connects the wrapped
protocol (which may be a TLS layer: the header comes first, then TLS), with
the PROXY source and destination as its peer and host.
"""

import ipaddress
import re
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

log = Logger(namespace="relaygw.proxy")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX = 16 + 4096

_V1 = re.compile(
    rb"^PROXY (TCP4|TCP6) ([0-9A-Fa-f.:]+) ([0-9A-Fa-f.:]+) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})\r\n$"
)


class ProxyError(Exception):
    """The bytes can never become a valid PROXY header."""


class ProxyInfo:
    """
    What a PROXY header said.

    @ivar command: C{"PROXY"} or C{"LOCAL"}.
    @ivar source: the client (L{IPv4Address} or L{IPv6Address}), C{None} for LOCAL.
    @ivar destination: the address the client connected to, C{None} for LOCAL.
    @ivar peer: the real socket peer (the balancer).
    """

    def __init__(self, command, version, source=None, destination=None, peer=None):
        self.command = command
        self.version = version
        self.source = source
        self.destination = destination
        self.peer = peer

    def __repr__(self):
        return "<ProxyInfo v%d %s %r -> %r>" % (self.version, self.command, self.source, self.destination)


def _address(family, text, port):
    try:
        addr = ipaddress.IPv4Address(text) if family == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyError("bad address %r" % (text,))
    if family == 6 and addr.ipv4_mapped is not None:
        return IPv4Address("TCP", str(addr.ipv4_mapped), port)
    cls = IPv4Address if family == 4 else IPv6Address
    return cls("TCP", str(addr), port)


def _parseV1(data):
    end = data.find(b"\r\n")
    if end == -1:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyError("v1 header without CRLF in %d octets" % V1_MAX)
        return None, 0
    line = data[: end + 2]
    if len(line) > V1_MAX:
        raise ProxyError("v1 header too long")
    m = _V1.match(line)
    if not m:
        raise ProxyError("malformed v1 header")
    family = 4 if m.group(1) == b"TCP4" else 6
    sport, dport = int(m.group(4)), int(m.group(5))
    if sport > 65535 or dport > 65535:
        raise ProxyError("bad port")
    src = _address(family, m.group(2).decode("ascii"), sport)
    dst = _address(family, m.group(3).decode("ascii"), dport)
    return ProxyInfo("PROXY", 1, src, dst), len(line)


def _parseV2(data):
    if len(data) < 16:
        return None, 0
    verCmd, famProto, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if verCmd >> 4 != 2:
        raise ProxyError("v2 version %d" % (verCmd >> 4))
    command = verCmd & 0x0F
    if command not in (0, 1):
        raise ProxyError("v2 command %d" % command)
    if 16 + length > V2_MAX:
        raise ProxyError("v2 header too long")
    if len(data) < 16 + length:
        return None, 0
    body = data[16: 16 + length]
    if command == 0:
        return ProxyInfo("LOCAL", 2), 16 + length
    family, transport = famProto >> 4, famProto & 0x0F
    if transport != 1:
        raise ProxyError("v2 PROXY over a non-stream transport")
    if family == 1:
        if length < 12:
            raise ProxyError("v2 INET address block truncated")
        s, d, sp, dp = struct.unpack("!4s4sHH", body[:12])
        src = _address(4, str(ipaddress.IPv4Address(s)), sp)
        dst = _address(4, str(ipaddress.IPv4Address(d)), dp)
    elif family == 2:
        if length < 36:
            raise ProxyError("v2 INET6 address block truncated")
        s, d, sp, dp = struct.unpack("!16s16sHH", body[:36])
        src = _address(6, str(ipaddress.IPv6Address(s)), sp)
        dst = _address(6, str(ipaddress.IPv6Address(d)), dp)
    else:
        raise ProxyError("v2 PROXY with address family %d" % family)
    # TLVs after the address block are skipped by the declared length.
    return ProxyInfo("PROXY", 2, src, dst), 16 + length


def parseHeader(data):
    """
    Parse a PROXY header at the start of C{data}.

    @return: C{(info, consumed)} for a complete valid header, C{(None, 0)}
        while the bytes so far are a valid prefix.
    @raise ProxyError: the bytes can never become a valid header.
    """
    if not data:
        return None, 0
    if data[:1] == b"\r":
        n = min(len(data), 12)
        if data[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("not a PROXY header")
        if len(data) < 12:
            return None, 0
        return _parseV2(data)
    if data[:1] == b"P":
        n = min(len(data), 6)
        if data[:n] != b"PROXY "[:n]:
            raise ProxyError("not a PROXY header")
        return _parseV1(data)
    raise ProxyError("not a PROXY header")


class ProxyProtocolWrapper(ProtocolWrapper):
    """Buffers until a valid header from a trusted peer, then connects the wrapped protocol."""

    proxyInfo = None

    def makeConnection(self, transport):
        # Deliberately not ProtocolWrapper.makeConnection: the wrapped
        # protocol must not see the connection before the header.
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        self._buffer = b""
        peer = transport.getPeer()
        self._peer = peer
        if not self.factory.isTrusted(getattr(peer, "host", "")):
            log.warn("PROXY header refused from untrusted peer {peer}", peer=getattr(peer, "host", peer))
            transport.loseConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self):
        log.warn("no PROXY header from {peer} within {t}s", peer=self._peer.host, t=self.factory.timeout)
        self._timer = None
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self.proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if getattr(self, "_timer", None) is None:
            return  # refused or timed out; the connection is closing
        self._buffer += data
        try:
            info, consumed = parseHeader(self._buffer)
        except ProxyError as e:
            log.warn("bad PROXY header from {peer}: {why}", peer=self._peer.host, why=str(e))
            self._timer.cancel()
            self._timer = None
            self.transport.loseConnection()
            return
        if info is None:
            return
        self._timer.cancel()
        self._timer = None
        info.peer = self._peer
        self.proxyInfo = info
        rest, self._buffer = self._buffer[consumed:], b""
        self.wrappedProtocol.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def connectionLost(self, reason):
        timer = getattr(self, "_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None
        if self.proxyInfo is not None:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)

    def getPeer(self):
        if self.proxyInfo is not None and self.proxyInfo.source is not None:
            return self.proxyInfo.source
        return self.transport.getPeer()

    def getHost(self):
        if self.proxyInfo is not None and self.proxyInfo.destination is not None:
            return self.proxyInfo.destination
        return self.transport.getHost()


class ProxyProtocolFactory(WrappingFactory):
    """
    Requires a PROXY header on every connection, from peers that
    C{isTrusted(ip)} accepts, within C{timeout} seconds.
    """

    protocol = ProxyProtocolWrapper

    def __init__(self, wrappedFactory, isTrusted, timeout=5.0, clock=None):
        WrappingFactory.__init__(self, wrappedFactory)
        self.isTrusted = isTrusted
        self.timeout = timeout
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock


def findProxyInfo(transport):
    """The L{ProxyInfo} of a connection, looking through wrapping layers (TLS)."""
    for _ in range(4):
        if transport is None:
            return None
        info = getattr(transport, "proxyInfo", None)
        if info is not None:
            return info
        transport = getattr(transport, "transport", None)
    return None
