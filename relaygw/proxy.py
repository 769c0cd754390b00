# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol (HAProxy, versions 1 and 2) in front of a listener.

A load balancer that speaks PROXY sends one header before the client's own
bytes; the header names the client (source) and the address it connected to
(destination).  L{ProxyProtocolFactory} wraps a listener's factory so that
the wrapped protocol is connected only once a complete, valid header has
arrived from a trusted balancer, and then sees the header's addresses as
C{transport.getPeer()} and C{transport.getHost()}.

L{parseHeader} is a pure, strict parser.  Twisted's
C{twisted.protocols.haproxy} is not used: its wrapper starts the wrapped
protocol before the header, has no trust check or timeout and drops
fragmented headers, and its parsers accept loose version 1 forms.
"""

import ipaddress
import struct

import attr
from zope.interface import directlyProvides, implementer, providedBy

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from relaygw.logs import Logger
from relaygw.trust import isEndpoint

log = Logger()

V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # octets, CRLF included
MAX_HEADER = 4096  # octets; longer version 2 headers are refused

_V1_CHARS = frozenset(b"PROXYTCP46 0123456789abcdefABCDEF.:")
_V2_COMMANDS = {0: "LOCAL", 1: "PROXY"}
# (family << 4 | transport) -> (address class, address block length)
_V2_STREAM = {
    0x11: (ipaddress.IPv4Address, 4),
    0x21: (ipaddress.IPv6Address, 16),
}


class ProxyError(Exception):
    """
    A PROXY header that is malformed or refused; C{str()} is a short reason
    fit for a log line.
    """


@attr.s(frozen=True, slots=True)
class ProxyInfo:
    """
    What a PROXY header said.

    @ivar command: C{"PROXY"} (addresses are the client's) or C{"LOCAL"}
        (version 2 only: a balancer's own connection, e.g. a health check;
        use the real connection's addresses).
    @ivar version: 1 or 2.
    @ivar source: the client's address (C{IPv4Address} or C{IPv6Address},
        type C{"TCP"}, canonical host text), or C{None} for LOCAL.
    @ivar destination: the address the client connected to, or C{None}.
    @ivar peer: the real socket peer (the balancer); set by the wrapper,
        C{None} from L{parseHeader}.
    """

    command = attr.ib()
    version = attr.ib()
    source = attr.ib(default=None)
    destination = attr.ib(default=None)
    peer = attr.ib(default=None)


def _twistedAddress(addr, port, version):
    """
    A Twisted TCP address for an L{ipaddress} address, IPv4-mapped IPv6
    turned into IPv4.  An address no connection has (L{isEndpoint}: the
    unspecified, multicast and broadcast addresses) is a balancer's
    mistake, refused as XCLIENT C{ADDR=} refuses it, not a client's
    identity for relaying, per-IP limits and Received.
    """
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not isEndpoint(addr):
        raise ProxyError("v%d: %s is not an address a connection has" % (version, addr))
    if addr.version == 4:
        return IPv4Address("TCP", str(addr), port)
    return IPv6Address("TCP", str(addr), port)


def _v1Port(text):
    """A version 1 port: decimal, no leading zero, 0-65535."""
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyError("v1: bad port")
    port = int(text)
    if port > 65535:
        raise ProxyError("v1: port out of range")
    return port


def _v1Address(text, family):
    """A version 1 address of the stated family, strictly parsed."""
    try:
        return family(text)
    except ValueError:
        raise ProxyError("v1: bad address for its protocol") from None


def _parseV1(data):
    """
    Parse a version 1 header at the start of C{data} (which starts with a
    prefix of C{b"PROXY "}).
    """
    if not V1_PREFIX.startswith(data[:6]):
        raise ProxyError("not a PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    # The line so far, without its CRLF; a trailing lone CR may be half of it.
    line = data[:end] if end != -1 else data[:V1_MAX].removesuffix(b"\r")
    if b"\n" in line:
        raise ProxyError("v1: line ends in bare LF")
    if b"\r" in line:
        raise ProxyError("v1: bare CR")
    proto = line[6:11]
    if not (b"TCP4 ".startswith(proto) or b"TCP6 ".startswith(proto)):
        raise ProxyError("v1: protocol is not TCP4 or TCP6")
    if any(c not in _V1_CHARS for c in line):
        raise ProxyError("v1: bad character")
    if end == -1:
        if len(data) >= V1_MAX:
            raise ProxyError("v1: no CRLF within 107 octets")
        return None, 0
    fields = line.decode("ascii").split(" ")
    if len(fields) != 6 or "" in fields:
        raise ProxyError("v1: need six fields separated by single spaces")
    _, proto, src, dst, sport, dport = fields
    if proto == "TCP4":
        family = ipaddress.IPv4Address
    elif proto == "TCP6":
        family = ipaddress.IPv6Address
    else:
        raise ProxyError("v1: protocol is not TCP4 or TCP6")
    info = ProxyInfo(
        command="PROXY",
        version=1,
        source=_twistedAddress(_v1Address(src, family), _v1Port(sport), 1),
        destination=_twistedAddress(_v1Address(dst, family), _v1Port(dport), 1),
    )
    return info, end + 2


def _parseV2(data):
    """
    Parse a version 2 header at the start of C{data} (which starts with a
    prefix of the version 2 signature).
    """
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyError("not a PROXY header")
    if len(data) > 12:
        if data[12] >> 4 != 2:
            raise ProxyError("v2: version is not 2")
        command = _V2_COMMANDS.get(data[12] & 0x0F)
        if command is None:
            raise ProxyError("v2: unknown command")
    if len(data) > 13:
        family, transport = data[13] >> 4, data[13] & 0x0F
        if family > 3 or transport > 2:
            raise ProxyError("v2: unknown address family or transport")
        if command == "PROXY" and data[13] not in _V2_STREAM:
            raise ProxyError("v2: PROXY is only accepted over TCP/IPv4 or TCP/IPv6")
    if len(data) < 16:
        return None, 0
    (length,) = struct.unpack("!H", data[14:16])
    total = 16 + length
    if total > MAX_HEADER:
        raise ProxyError("v2: header longer than %d octets" % (MAX_HEADER,))
    if command == "PROXY":
        addrClass, size = _V2_STREAM[data[13]]
        if length < 2 * size + 4:
            raise ProxyError("v2: length does not cover the addresses")
    if len(data) < total:
        return None, 0
    if command == "LOCAL":
        return ProxyInfo(command="LOCAL", version=2), total
    block = data[16:total]
    src = addrClass(block[:size])
    dst = addrClass(block[size : 2 * size])
    sport, dport = struct.unpack("!HH", block[2 * size : 2 * size + 4])
    # Skip the TLVs (type, 2-octet length, value); they must fill the rest exactly.
    offset = 2 * size + 4
    while offset < length:
        if length - offset < 3:
            raise ProxyError("v2: truncated TLV")
        (tlvLength,) = struct.unpack_from("!H", block, offset + 1)
        offset += 3 + tlvLength
        if offset > length:
            raise ProxyError("v2: TLV longer than the header")
    info = ProxyInfo(
        command="PROXY",
        version=2,
        source=_twistedAddress(src, sport, 2),
        destination=_twistedAddress(dst, dport, 2),
    )
    return info, total


def parseHeader(data):
    """
    Parse the PROXY header at the start of C{data}.

    @param data: the bytes received so far.
    @type data: L{bytes}

    @return: C{(info, consumed)} with a L{ProxyInfo} and the header's length
        in octets when C{data} starts with a complete valid header;
        C{(None, 0)} when C{data} is a valid beginning that needs more bytes.

    @raise ProxyError: when C{data} can never become a valid header.  This is
        decided as early as the bytes allow.
    """
    if not data:
        return None, 0
    if data[0:1] == b"P":
        return _parseV1(data)
    if data[0:1] == b"\r":
        return _parseV2(data)
    raise ProxyError("not a PROXY header")


def findProxyInfo(transport):
    """
    The L{ProxyInfo} of the connection under C{transport}, found by walking
    C{transport}, C{transport.transport}, ... a few levels down (so that a
    protocol under a TLS layer finds it too), or C{None}.
    """
    for _ in range(5):
        if transport is None:
            return None
        info = getattr(transport, "proxyInfo", None)
        if isinstance(info, ProxyInfo):
            return info
        transport = getattr(transport, "transport", None)
    return None


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """
    Reads the PROXY header, then connects the wrapped protocol and gets out
    of the way.

    The wrapped protocol is connected only after a complete valid header from
    a trusted socket peer; it then sees the header's source and destination
    as C{getPeer()} and C{getHost()} (for LOCAL, the real ones).

    @ivar proxyInfo: the L{ProxyInfo}, with C{peer} set to the socket peer,
        once the header has been read; C{None} before.
    """

    proxyInfo = None
    #: Writes reach the socket unchanged (L{relaygw.wire.send} may bypass us).
    writesPassThrough = True
    #: Once the wrapped protocol is connected, reads reach it unchanged too
    #: (L{relaygw.wire.readOn} may bypass us).
    readsPassThrough = True
    _connected = False
    _closing = False
    _timer = None

    def makeConnection(self, transport):
        """
        Take the transport, but leave the wrapped protocol unconnected until
        the header is read.
        """
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self):
        """
        Refuse an untrusted socket peer at once; otherwise wait (a bounded
        time) for the header.
        """
        self.factory.registerProtocol(self)
        self.factory.waiting += 1
        self.factory.onChange()
        self._buffer = b""
        peer = self.transport.getPeer()
        if not self.factory.isTrusted(getattr(peer, "host", None)):
            self._refuse("socket peer is not a trusted balancer")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self):
        self._timer = None
        self._refuse("no complete header within %gs" % (self.factory.timeout,))

    def _refuse(self, reason):
        """Log one line and close without writing anything."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peer = self.transport.getPeer()
        log.warn(
            "PROXY protocol: closing connection from [{host}]:{port}: {reason}",
            host=getattr(peer, "host", "?"),
            port=getattr(peer, "port", 0),
            reason=reason,
        )
        self.transport.loseConnection()

    def dataReceived(self, data):
        """
        Before the header: buffer and parse.  After it: pass through.
        """
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        try:
            info, consumed = parseHeader(self._buffer)
        except ProxyError as e:
            self._refuse(str(e))
            return
        if info is None:
            if len(self._buffer) > MAX_HEADER:  # parseHeader should prevent this
                self._refuse("header too long")
            return
        rest, self._buffer = self._buffer[consumed:], b""
        self._timer.cancel()
        self._timer = None
        self.proxyInfo = attr.evolve(info, peer=self.transport.getPeer())
        self._connected = True
        self.factory.waiting -= 1  # (the session counts it from here)
        self.wrappedProtocol.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self):
        """The PROXY source, or the socket peer before the header or for LOCAL."""
        if self.proxyInfo is not None and self.proxyInfo.source is not None:
            return self.proxyInfo.source
        return self.transport.getPeer()

    def getHost(self):
        """The PROXY destination, or the socket's own address."""
        if self.proxyInfo is not None and self.proxyInfo.destination is not None:
            return self.proxyInfo.destination
        return self.transport.getHost()

    def _halfCloseable(self):
        """
        The session, if it is connected and takes half-closes itself; by its
        class, as a wrapper between (a TLS layer) claims the interfaces of
        its transport (this wrapper) and forwards what it lacks back to it.
        """
        wrapped = self.wrappedProtocol if self._connected else None
        return wrapped if IHalfCloseableProtocol.implementedBy(type(wrapped)) else None

    def readConnectionLost(self):
        """The peer shut its write side: the session answers what it sent, or (no session yet, TLS) close."""
        session = self._halfCloseable()
        if session is None:
            self.transport.loseConnection()
        else:
            session.readConnectionLost()

    def writeConnectionLost(self):
        session = self._halfCloseable()
        if session is not None:
            session.writeConnectionLost()

    def handshakeCompleted(self):
        """
        A TLS layer started under this wrapper (STARTTLS) finished its
        handshake: tell the session, which the layer does not see.
        """
        wrapped = self.wrappedProtocol if self._connected else None
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()

    def connectionLost(self, reason):
        """
        Stop the header timer; tell the wrapped protocol only if it was ever
        connected.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.factory.unregisterProtocol(self)
        # The session's transport is gone (as TLSMemoryBIOProtocol says of itself).
        self.connected = False
        if self._connected:
            self.wrappedProtocol.connectionLost(reason)
        else:
            self.factory.waiting -= 1
            self.factory.onChange()
        self.wrappedProtocol = None


class ProxyProtocolFactory(WrappingFactory):
    """
    Wraps a listener's factory: connections must start with a PROXY header
    (version 1 or 2) from a trusted balancer.

    @ivar isTrusted: called with the socket peer's IP text; false means the
        connection is closed at once, with nothing sent.
    @ivar timeout: seconds to wait for a complete header.
    @ivar clock: an L{IReactorTime}; the global reactor when not given.
    @ivar waiting: connections open that have not sent their header yet.
    @ivar onChange: called when one of those comes or goes.
    """

    protocol = ProxyProtocolWrapper

    def __init__(self, wrappedFactory, isTrusted, timeout=5.0, clock=None, onChange=lambda: None):
        WrappingFactory.__init__(self, wrappedFactory)
        self.isTrusted = isTrusted
        self.timeout = timeout
        self._clock = clock
        self.waiting = 0
        self.onChange = onChange

    @property
    def clock(self):
        """The clock for header timers (the reactor, imported when first needed)."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock
