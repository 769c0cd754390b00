"""
Socket-level tuning shared by the SMTP server and the delivery client.

SMTP is a conversation of short commands and replies, each sent whole.
Twisted's TCP transport queues every write for the next reactor turn: it
registers the socket for writing, wakes up, sends, and unregisters again
(two C{epoll_ctl} calls and a logged-context dispatch per reply).  A reply
almost always fits into the socket's send buffer, so L{send} writes it
straight to the socket when nothing is queued before it, and leaves only
what the kernel did not take to the transport.  L{tlsWritesAtOnce} does
the same for a connection after STARTTLS.  On the way in, L{readOn} lets a
session read message content on within one reactor turn, where Twisted
reads once per turn.
"""

import socket

from twisted.internet import tcp
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

try:
    from twisted.internet._newtls import _BypassTLS
except ImportError:
    _BypassTLS = None

_PLAIN_TCP = (tcp.Server, tcp.Client)


def noDelay(transport):
    """
    TCP_NODELAY: SMTP sends whole commands and replies; Nagle's algorithm
    only holds the next one back until the peer's delayed ACK (tens of ms a
    round, which STARTTLS's extra records made visible).
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


def _plainTCP(transport, passThrough="writesPassThrough"):
    """
    The plain TCP transport under C{transport} (through wrappers whose
    class says C{writesPassThrough}, or C{readsPassThrough} for reads, such
    as the PROXY protocol one), or C{None} when there is none.
    """
    # The class says so, not the instance: ProtocolWrapper (TLS included)
    # forwards unknown attributes to the transport below it.
    while getattr(type(transport), passThrough, False):
        transport = transport.transport
    return transport if type(transport) in _PLAIN_TCP else None


def readOn(transport):
    """
    One more read (of the transport's read size) from the plain TCP socket
    under C{transport}, now rather than at the reactor's next turn.  C{b""}
    when nothing is waiting, at the end of the stream or on an error (the
    socket stays readable, so the reactor sees those at its next turn), or
    for any other transport (TLS: its layer reads records itself).
    """
    tcp = _plainTCP(transport, "readsPassThrough")
    if tcp is None or tcp.TLS or not tcp.connected or tcp.disconnecting:
        return b""
    try:
        return tcp.socket.recv(tcp.bufferSize)
    except OSError:
        return b""


def _nothingQueued(tcp):
    """Whether octets written to C{tcp}'s socket now would go out in order (and may go out at all)."""
    return bool(
        tcp.connected
        and not tcp.disconnecting
        and not tcp._writeDisconnected
        and not tcp.dataBuffer
        and not tcp._tempDataBuffer
    )


def _sendNow(tcp, data):
    """The octets of C{data} the socket of C{tcp} does not take at once (all of them on an error)."""
    try:
        sent = tcp.socket.send(data)
    except OSError:
        # EAGAIN or a dead peer: Twisted's write path reports it in its turn.
        sent = 0
    return data[sent:]


def send(transport, data):
    """Write C{data} to C{transport}: at once when safe, else queued as usual."""
    tcp = _plainTCP(transport)
    if tcp is not None and not tcp.TLS and _nothingQueued(tcp):
        data = _sendNow(tcp, data)
        if not data:
            return
    transport.write(data)


def receiveNow(transport):
    """
    What the stream socket under C{transport} (TCP, or a UNIX socket pair
    between processes; no TLS) holds now, read at once rather than at the
    reactor's next turn: C{b""} when nothing is waiting, at the end of the
    stream or on an error (the socket stays readable, so the reactor sees
    those at its next turn).
    """
    if not isinstance(transport, tcp.Connection) or transport.TLS or not transport.connected \
            or transport.disconnecting:
        return b""
    try:
        return transport.socket.recv(transport.bufferSize)
    except OSError:
        return b""


def sendNow(transport, data):
    """
    Write C{data} to a stream socket transport of any family (TCP, or a
    UNIX socket pair between processes) at once when nothing is queued
    before it, else queued as usual: for a message that must leave before
    what this process writes next to another socket (L{send} takes only
    plain TCP, through the SMTP server's wrappers).
    """
    if isinstance(transport, tcp.Connection) and not transport.TLS and _nothingQueued(transport):
        data = _sendNow(transport, data)
        if not data:
            return
    transport.write(data)


def tlsWritesAtOnce(transport):
    """
    After C{startTLS} on the plain TCP transport under C{transport}: what
    the session writes is encrypted and sent at once, as L{send} does for
    plain replies.  Twisted's TLS layer holds each write for the reactor's
    next turn (to gather small writes), then queues the records on the
    connection for the turn after (registering it for writing, sending,
    unregistering): a timer, two turns and two C{epoll_ctl} calls for
    every reply, where SMTP answers one command at a time.
    """
    transport = _plainTCP(transport)
    if transport is None or not transport.TLS:
        return
    tls = transport.protocol
    records = getattr(tls, "transport", None)
    if not (isinstance(tls, BufferingTLSTransport) and _BypassTLS is not None and isinstance(records, _BypassTLS)):
        return  # (another Twisted: its own write path, as it is)
    # TLSMemoryBIOProtocol's own write, without BufferingTLSTransport's
    # aggregation (nothing is held, so the two never reorder).
    tls.write = TLSMemoryBIOProtocol.write.__get__(tls)
    tls.writeSequence = lambda data: tls.write(b"".join(data))
    # The records go through the transport startTLS gave the TLS layer
    # (Twisted's _BypassTLS), which queues them on the TCP connection.
    queue = records.write

    def write(data):
        if _nothingQueued(transport):
            data = _sendNow(transport, data)
            if not data:
                return
        queue(data)

    records.write = write


def halfCloseable(transport):
    """
    The plain TCP transport under C{transport} (through pass-through
    wrappers) when its write side can be shut on its own (no TLS layer
    above or in it), else C{None}.
    """
    tcp = _plainTCP(transport)
    if tcp is None or tcp.TLS or not tcp.connected or tcp.disconnecting:
        return None
    return tcp


def shutWrite(tcp):
    """
    C{tcp.loseWriteConnection()} (C{tcp} from L{halfCloseable}), done at
    once when nothing waits to be written: Twisted registers the socket for
    writing and shuts it only at its next turn, two C{epoll_ctl} calls and
    a dispatch for every connection that ends.
    """
    if tcp.dataBuffer or tcp._tempDataBuffer or tcp.producer is not None:
        tcp.loseWriteConnection()
        return
    # What the transport's doWrite does once its buffer has drained.
    tcp._writeDisconnecting = tcp._writeDisconnected = True
    tcp._closeWriteConnection()


#: Per-connection buffering for the SMTP server: the transport reads this
#: much at a time, and pauses its producer (the session) when this much of
#: its writes wait for the peer.
SERVER_BUFFER = 16 * 1024
#: The kernel's send buffer for an SMTP server connection (Linux doubles
#: it): replies are small, and a peer that never reads should not get
#: megabytes of them answered first.
SERVER_SNDBUF = 8 * 1024


def boundBuffers(transport, size=SERVER_BUFFER):
    """
    Set the read size and the write-pause threshold of the plain TCP
    transport under C{transport} (through pass-through wrappers, and the
    TLS layer of an implicit-TLS listener) to C{size}, so that a peer that
    sends but never reads holds at most about twice that in the gateway
    (and a bounded send buffer in the kernel).
    """
    while isinstance(transport, TLSMemoryBIOProtocol):  # (its records go to the TCP transport below)
        transport = transport.transport
    transport = _plainTCP(transport)
    if transport is not None:
        transport.bufferSize = size
        # A fixed send buffer (the kernel doubles it) instead of one that
        # grows to megabytes for a peer that never reads.
        try:
            transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
        except OSError:
            pass
