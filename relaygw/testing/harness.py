"""
SMTP sessions without sockets (L{SessionHarness}): each on a
L{StringTransport} (L{HarnessTransport}) with a L{task.Clock}, driven by
a L{SessionClient}; STARTTLS is a real TLS handshake in memory and a
PROXY listener's connections start with a header through its wrapper.
"""

import dataclasses
import os
import ssl
import time

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from relaygw import config as _config
from relaygw.service import GatewayService
from relaygw.testing.gateway import configText


class SessionHarness:
    """
    SMTP sessions without sockets: each on a L{StringTransport}, with a
    L{task.Clock} for its timers, built by a listener whose config is given
    as a dict (the keys of a C{[[listener]]} table).  The spool is real (a
    temporary directory); its disk thread reports through the real reactor,
    so a test that sends a message waits for its Deferred.

    @param policy: an L{relaygw.policy.IPolicy} instead of the listener's.
    @param sink: an L{relaygw.sink.IMessageSink} instead of the spool
        (L{relaygw.testing.memorysink.MemorySink} keeps messages in memory
        and commits at once).
    @param portal: a cred portal instead of the listener's.

    A listener with C{proxy_protocol} also gets the PROXY wrapper the
    gateway puts in front of it (its header timer on the harness clock):
    L{connect} with C{proxy=} sends a header through it.
    """

    def __init__(self, directory, listener=None, clock=None, policy=None, sink=None, portal=None, **kw):
        from twisted.internet import reactor, task

        self.clock = clock or task.Clock()
        self.directory = directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "relaygw.toml")
        with open(self.path, "w") as f:
            f.write(configText(directory, listeners=(dict(listener or {}),), **kw))
        self.config = _config.load(self.path)
        self.service = GatewayService(self.config, reactor)
        self.service.spool.open()
        self.factory = self.service.factories[0]
        self.factory.reactor = self.clock
        self.factory.clients.clock = self.clock
        if policy is not None:
            self.factory.settings = dataclasses.replace(self.factory.settings, policy=policy)
        if portal is not None:
            self.factory.portal = portal
        if sink is not None:
            self.factory.sink = sink
        from relaygw.auth import FailureTracker

        self.factory.authFailures = FailureTracker(clock=self.clock)
        # Queued messages are recorded, not delivered.
        self.queued = []
        self.factory.onQueued = lambda queueId, message: self.queued.append(queueId)
        self.proxyFactory = None
        listenerConfig = self.factory.listener
        if listenerConfig.proxy_protocol:
            from relaygw.proxy import ProxyProtocolFactory

            # Built as GatewayService builds it for the listener.
            self.proxyFactory = ProxyProtocolFactory(self.factory, self.factory.settings.trust.balancer,
                                                     listenerConfig.proxy_timeout, self.clock)

    def close(self):
        """The test is over: the spool's disk thread ends once its work is done."""
        self.service.committer.stop()

    def connect(self, peer="127.0.0.1", port=40000, local=("127.0.0.1", 25), proxy=None):
        """
        A new session from C{peer}:C{port}; returns its L{SessionClient}.

        @param proxy: for a C{proxy_protocol} listener, the octets a balancer
            at C{peer} sends first (a PROXY header, or anything else): they go
            through the listener's PROXY wrapper, which starts the session
            only once it has read a valid header.
        """
        from twisted.internet.address import IPv4Address, IPv6Address

        def address(host, p):
            return (IPv6Address if ":" in host else IPv4Address)("TCP", host, p)

        peerAddress = address(peer, port)
        transport = HarnessTransport(peerAddress=peerAddress, hostAddress=address(*local))
        transport.clock = self.clock
        if proxy is None:
            session = self.factory.buildProtocol(peerAddress)
            outermost = session
        else:
            if self.proxyFactory is None:
                raise ValueError("the listener does not take PROXY headers")
            outermost = self.proxyFactory.buildProtocol(peerAddress)
            session = outermost.wrappedProtocol
        session.callLater = self.clock.callLater
        transport.protocol = outermost
        outermost.makeConnection(transport)
        client = SessionClient(session, transport)
        if proxy is not None:
            client.send(proxy)
        return client

    def spooled(self, queueId):
        """
        A message the sessions queued (see C{queued}), read back through the
        spool's public API: C{(message, content)}, the
        L{relaygw.spoolapi.ISpooledMessage} (its C{envelope} as stored) and
        the content as it goes onward (the Received header first).
        """
        message = self.service.spool.load(queueId)
        with message.openBody() as f:
            return message, f.read()


class HarnessTransport(StringTransport):
    """
    A L{StringTransport} that records STARTTLS and aborts.

    C{protocol} is the protocol the octets from the client go to (the
    session, or a wrapper around it).  C{startTLS} only records the context
    factory; L{insertTLS} (which L{SessionClient.starttls} calls when the
    client begins its handshake) then puts the gateway's TLS layer below
    C{protocol}, as L{relaygw.tls.startTLS} does on a TCP transport: the
    session's writes are encrypted and its handshake notification is the
    real one.  That layer gathers small writes until the next turn of
    C{clock} (the harness's), as it does until the reactor's next turn.
    Unlike over a socket, the layer goes in when the client starts its
    handshake, not at C{startTLS}: anything the session wrote in between
    would be read in clear.
    """

    tlsStarted = None
    aborted = False
    protocol = None
    #: The clock of the TLS layer's next turn (it gathers small writes until then).
    clock = None
    #: The server's L{twisted.protocols.tls.TLSMemoryBIOProtocol} once inserted.
    tls = None

    def startTLS(self, contextFactory):
        self.tlsStarted = contextFactory

    def insertTLS(self):
        """Put a server TLS layer with the recorded context factory below C{protocol}."""
        from zope.interface import directlyProvides

        from twisted.internet.interfaces import ISSLTransport
        from relaygw.tls import HalfCloseableTLSFactory

        if self.tlsStarted is None:
            raise AssertionError("the session did not start TLS")
        tlsFactory = HalfCloseableTLSFactory(self.tlsStarted, False, None, clock=self.clock)
        tls = tlsFactory.protocol(tlsFactory, self.protocol, False)
        self.protocol = self.tls = tls
        self.getHandle = tls.getHandle
        self.getPeerCertificate = tls.getPeerCertificate
        directlyProvides(self, ISSLTransport)
        tls.makeConnection(_Wire(self))
        return tls

    def write(self, data):
        if self.tls is not None:
            self.tls.write(data)
        else:
            StringTransport.write(self, data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        if self.tls is not None and not self.tls.disconnecting:
            self.tls.loseConnection()
        else:
            StringTransport.loseConnection(self)

    def abortConnection(self):
        if self.tls is not None and not self.tls.disconnecting:
            self.tls.abortConnection()
        else:
            self.aborted = True
            StringTransport.loseConnection(self)


class _Wire:
    """What the TLS layer writes to: the records go straight into the L{HarnessTransport}."""

    def __init__(self, transport):
        self.transport = transport

    def write(self, data):
        StringTransport.write(self.transport, data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        StringTransport.loseConnection(self.transport)

    def abortConnection(self):
        self.transport.aborted = True
        StringTransport.loseConnection(self.transport)

    def __getattr__(self, name):
        return getattr(self.transport, name)


class SessionClient:
    """
    The client side of one harness session: send lines, read replies; after
    L{starttls}, through a real TLS session in memory.
    """

    #: The client's C{ssl.SSLObject} once L{starttls} completed its handshake.
    tls = None

    def __init__(self, session, transport):
        self.session = session
        self.transport = transport
        self._pending = b""
        self._partial = []
        self._replies = []
        self._lost = False

    def _deliver(self, data):
        """Octets from the client's side of the wire to the outermost protocol."""
        protocol = self.transport.protocol or self.session
        protocol.dataReceived(data)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        if self.tls is not None:
            self.tls.write(data)
            data = self._outgoing.read()
        self._deliver(data)

    def _wire(self):
        """What the server wrote since the last call, as octets on the wire."""
        out = self.transport.value()
        self.transport.clear()
        return out

    def take(self):
        """Everything written since the last call, as bytes (decrypted after L{starttls})."""
        if self.tls is not None:
            # Twisted's TLS layer writes what it gathered at the next turn.
            self.transport.clock.advance(0)
        wire = self._wire()
        if self.tls is not None:
            self._incoming.write(wire)
            wire = b""
            while True:
                try:
                    chunk = self.tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if not chunk:
                    break
                wire += chunk
        out = self._pending + wire
        self._pending = b""
        return out

    def starttls(self, context=None, hostname="relay.test"):
        """
        The client's side of STARTTLS once the server said 220: a real TLS
        handshake in memory, L{ssl.SSLObject} (with C{context}; by default
        one that checks no certificate) against Twisted's TLS layer, which
        L{HarnessTransport.insertTLS} puts below the session.  Replies not
        read yet stay readable.  Returns the client's C{SSLObject}.
        """
        self._parse()  # whatever came before is plaintext
        self.transport.insertTLS()
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        for _ in range(20):  # a handshake is a few round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if not self._exchange():
                raise AssertionError("the TLS handshake stalled")
        else:
            raise AssertionError("the TLS handshake did not finish")
        self._exchange()  # the client's last flight (TLS 1.3 Finished) reaches the server
        self.tls = tls
        return tls

    def _exchange(self):
        """Move handshake records both ways once; whether any moved."""
        out = self._outgoing.read()
        if out:
            self._deliver(out)
        wire = self._wire()
        if wire:
            self._incoming.write(wire)
        return bool(out or wire)

    def _parse(self):
        data = self.take()
        lines = self._partial
        while b"\r\n" in data:
            line, data = data.split(b"\r\n", 1)
            line = line.decode("latin-1")
            lines.append(line[4:])
            if line[3:4] != "-":
                self._replies.append((int(line[:3]), lines))
                lines = []
        self._partial = lines
        self._pending = data

    def replies(self):
        """Every complete reply not read yet, as C{(code, [texts])}."""
        self._parse()
        out, self._replies = self._replies, []
        return out

    def reply(self):
        """The next reply not read yet (it must have been sent)."""
        self._parse()
        if not self._replies:
            raise AssertionError("no reply was sent")
        return self._replies.pop(0)

    def cmd(self, line):
        """Send C{line} and return the next reply (it must have come at once)."""
        self.send(line + "\r\n")
        return self.reply()

    def whenReply(self, timeout=10.0):
        """
        A Deferred firing with the next reply once it is sent: for replies
        that wait on something outside the session (the spool's disk
        thread at the end of DATA, password hashing for AUTH).  It fails
        with an AssertionError after C{timeout} seconds without one.
        """
        from twisted.internet import reactor, task

        @defer.inlineCallbacks
        def wait():
            deadline = time.monotonic() + timeout
            while True:
                self._parse()
                if self._replies:
                    return self._replies.pop(0)
                if time.monotonic() > deadline:
                    raise AssertionError("no reply within %s s" % (timeout,))
                yield task.deferLater(reactor, 0.005, lambda: None)

        return wait()

    def line(self):
        """
        The next raw line sent (without CRLF), like
        L{relaygw.testing.client.Client.line}: for tests of the reply format
        itself.  Replies read with L{reply} must have been read whole before.
        """
        if self._replies or self._partial:
            raise AssertionError("a reply was already parsed; read it with reply()")
        data = self.take()
        if b"\r\n" not in data:
            self._pending = data
            raise AssertionError("no line was sent")
        line, self._pending = data.split(b"\r\n", 1)
        return line.decode("latin-1")

    def closed(self, wait=None):
        """
        Whether the session has ended (its closing reply sent), like
        L{relaygw.testing.client.Client.closed}; without a session (a PROXY
        wrapper refused the connection), whether the connection was closed.
        """
        if self.session.transport is None:
            return self.transport.disconnecting
        return self.session.mode == "closed"

    @property
    def buf(self):
        """Octets sent but not yet read as replies (as L{relaygw.testing.client.Client.buf})."""
        self._parse()
        return self._pending

    def lose(self):
        """The client goes away."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if not self._lost:
            self._lost = True
            (self.transport.protocol or self.session).connectionLost(Failure(ConnectionDone()))
