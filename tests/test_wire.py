"""
relaygw.wire.send on real loopback connections: straight to the socket when
nothing is queued, in order behind queued octets, and never around a TLS
layer or a non-pass-through wrapper; wire.shutWrite likewise; wire.readOn
reads one more chunk, around read-pass-through wrappers only.
"""

import socket
import time

from twisted.internet import defer, error, protocol, reactor, task, threads
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from relaygw import wire
from relaygw.proxy import ProxyProtocolWrapper


class _PassThrough(ProtocolWrapper):
    writesPassThrough = True


class _Server(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class _Loopback(unittest.TestCase):
    def connect(self, wrap=None, server=None):
        """A real loopback connection; fires with (server protocol, client socket)."""
        factory = protocol.Factory.forProtocol(server or _Server)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, wrap(factory) if wrap else factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)

        def ready(server):
            self.addCleanup(server.transport.loseConnection)
            return server, client

        return factory.connected.addCallback(ready)

    def recv(self, client, n):
        data = b""
        while len(data) < n:
            data += client.recv(n - len(data))
        return data


class SendTests(_Loopback):
    @defer.inlineCallbacks
    def test_idleTransportSendsAtOnce(self):
        server, client = yield self.connect()
        wire.send(server.transport, b"220 ready\r\n")
        # Nothing was left for the reactor: the octets are already on the wire.
        self.assertEqual(server.transport._tempDataBuffer, [])
        self.assertEqual(server.transport.dataBuffer, b"")
        self.assertEqual(self.recv(client, 11), b"220 ready\r\n")

    @defer.inlineCallbacks
    def test_queuedOctetsKeepTheirPlace(self):
        server, client = yield self.connect()
        server.transport.write(b"first\r\n")
        wire.send(server.transport, b"second\r\n")
        self.assertEqual(server.transport._tempDataBuffer, [b"first\r\n", b"second\r\n"])
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.recv(client, 15), b"first\r\nsecond\r\n")

    @defer.inlineCallbacks
    def test_largeWriteIsCompletedByTheTransport(self):
        server, client = yield self.connect()
        data = bytes(range(256)) * 40000  # far more than a socket buffer
        wire.send(server.transport, data)
        got = yield threads.deferToThread(self.recv, client, len(data))
        self.assertEqual(got, data)

    @defer.inlineCallbacks
    def test_passThroughWrapperIsSeenThrough(self):
        def wrap(f):
            wf = WrappingFactory(f)
            wf.protocol = _PassThrough
            return wf

        server, client = yield self.connect(wrap)
        wrapper = server.transport
        wire.send(wrapper, b"250 ok\r\n")
        self.assertEqual(wrapper.transport._tempDataBuffer, [])
        self.assertEqual(self.recv(client, 8), b"250 ok\r\n")

    @defer.inlineCallbacks
    def test_otherWrapperIsNotBypassed(self):
        server, client = yield self.connect(lambda f: WrappingFactory(f))
        wire.send(server.transport, b"250 ok\r\n")
        # An ordinary wrapper may transform writes (TLS does): queued through it.
        self.assertEqual(server.transport.transport._tempDataBuffer, [b"250 ok\r\n"])

    def test_instanceAttributeForwardingIsNotTrusted(self):
        """A wrapper forwarding attribute lookups to a pass-through transport is not one itself."""
        below = ProxyProtocolWrapper.__new__(ProxyProtocolWrapper)
        below.transport = StringTransport()
        tls = ProtocolWrapper.__new__(ProtocolWrapper)
        tls.transport = below
        self.assertTrue(tls.writesPassThrough)  # forwarded by ProtocolWrapper.__getattr__
        self.assertIsNone(wire._plainTCP(tls))

    def test_otherTransportsUseWrite(self):
        t = StringTransport()
        wire.send(t, b"354 go ahead\r\n")
        self.assertEqual(t.value(), b"354 go ahead\r\n")



class TLSWritesTests(_Loopback):
    """wire.tlsWritesAtOnce: after startTLS, a write is encrypted and on the wire before the reactor turns."""

    @defer.inlineCallbacks
    def startTLS(self, atOnce):
        """A loopback connection with TLS started on it; fires with (server protocol, client TLS socket)."""
        from twisted.internet import ssl as tssl

        from tests.tlsmaterial import certificate, clientContext, commonName, newKey, pem

        key = newKey()
        cert = certificate(commonName("relay.test"), commonName("relay.test"), key, key, 1)
        options = tssl.PrivateCertificate.loadPEM(pem(cert) + pem(key)).options()
        server, client = yield self.connect()
        server.transport.startTLS(options)
        if atOnce:
            wire.tlsWritesAtOnce(server.transport)
        tls = yield threads.deferToThread(clientContext().wrap_socket, client)
        self.addCleanup(tls.close)
        # The server has finished its handshake once it reads application data.
        pinged = defer.Deferred()
        server.dataReceived = pinged.callback
        tls.sendall(b".")
        self.assertEqual((yield pinged), b".")
        return server, tls

    @defer.inlineCallbacks
    def test_writtenAtOnce(self):
        server, tls = yield self.startTLS(atOnce=True)
        server.transport.write(b"250 ok\r\n")
        server.transport.writeSequence([b"250 ", b"again\r\n"])
        # Read while the reactor waits for this test: it has no turn to send in.
        tls.settimeout(5)
        got = b""
        while len(got) < 19:
            got += tls.recv(100)
        self.assertEqual(got, b"250 ok\r\n250 again\r\n")
        self.assertNotIn(server.transport, reactor.getWriters())

    @defer.inlineCallbacks
    def test_withoutItAReactorTurnIsNeeded(self):
        """What it saves: without it the reply waits for the reactor's next turns."""
        server, tls = yield self.startTLS(atOnce=False)
        server.transport.write(b"250 ok\r\n")
        tls.settimeout(0.3)
        self.assertRaises(socket.timeout, tls.recv, 100)
        tls.settimeout(5)
        got = yield threads.deferToThread(tls.recv, 100)
        self.assertEqual(got, b"250 ok\r\n")

    @defer.inlineCallbacks
    def test_queuedRecordsKeepTheirPlace(self):
        """Records the socket did not take are queued, and those after them wait behind them."""
        server, tls = yield self.startTLS(atOnce=True)
        wire.boundBuffers(server.transport)  # a small send buffer
        data = b"x" * 300000  # more than the socket takes at once
        server.transport.write(data)
        self.assertIn(server.transport, reactor.getWriters())  # the rest is queued
        server.transport.write(b"\r\nend\r\n")

        def readAll():
            got = b""
            while not got.endswith(b"\r\nend\r\n"):
                got += tls.recv(65536)
            return got

        got = yield threads.deferToThread(readAll)
        self.assertEqual(got, data + b"\r\nend\r\n")

    def test_plainTransportUntouched(self):
        t = StringTransport()
        wire.tlsWritesAtOnce(t)
        t.write(b"x")
        self.assertEqual(t.value(), b"x")


class ShutWriteTests(_Loopback):
    """wire.shutWrite: the write side is shut at once when nothing is queued, else after it."""

    def eof(self, client):
        data = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return data
            data += chunk

    @defer.inlineCallbacks
    def test_idleTransportShutAtOnce(self):
        server, client = yield self.connect()
        wire.send(server.transport, b"221 bye\r\n")
        wire.shutWrite(wire.halfCloseable(server.transport))
        # Shut in this turn: never registered for writing.
        self.assertNotIn(server.transport, reactor.getWriters())
        self.assertTrue(server.transport._writeDisconnected)
        self.assertEqual(self.eof(client), b"221 bye\r\n")
        # The read side still works (a lingering close reads until the client's EOF).
        client.sendall(b"late\r\n")
        self.assertIn(server.transport, reactor.getReaders())

    @defer.inlineCallbacks
    def test_queuedOctetsGoOutFirst(self):
        server, client = yield self.connect()
        server.transport.write(b"x" * 100)  # (queued for the reactor's turn)
        wire.shutWrite(wire.halfCloseable(server.transport))
        self.assertFalse(server.transport._writeDisconnected)
        self.assertIn(server.transport, reactor.getWriters())
        received = yield threads.deferToThread(self.eof, client)
        self.assertEqual(received, b"x" * 100)
        self.assertTrue(server.transport._writeDisconnected)


class _ReadsThrough(ProtocolWrapper):
    readsPassThrough = True


class _Recorder(_Server):
    def connectionMade(self):
        self.lost = defer.Deferred()
        _Server.connectionMade(self)

    def connectionLost(self, reason):
        self.lost.callback(reason.type)


class ReadOnTests(_Loopback):
    """wire.readOn: one more read now, from a plain TCP socket only; the end of the stream is left to the reactor."""

    @defer.inlineCallbacks
    def connectPaused(self, wrap=None, server=None):
        """A connection whose transport the reactor does not read from (the session does, with readOn)."""
        server, client = yield self.connect(wrap, server)
        tcp = server.transport
        while not isinstance(tcp, wire._PLAIN_TCP):
            tcp = tcp.transport
        tcp.pauseProducing()
        tcp.bufferSize = 16384
        return server, client, tcp

    def waiting(self, tcp, n):
        """Wait (bounded) until C{n} octets wait on the server's socket."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if len(tcp.socket.recv(n, socket.MSG_PEEK)) >= n:
                    return
            except BlockingIOError:
                pass
            time.sleep(0.01)
        self.fail("%d octets never arrived" % n)

    @defer.inlineCallbacks
    def test_readsWhatWaitsOneReadAtATime(self):
        server, client, tcp = yield self.connectPaused()
        data = bytes(range(256)) * 160  # 40960 octets
        client.sendall(data)
        self.waiting(tcp, len(data))
        reads = [wire.readOn(server.transport) for _ in range(4)]
        self.assertEqual([len(r) for r in reads], [16384, 16384, 8192, 0])
        self.assertEqual(b"".join(reads), data)

    @defer.inlineCallbacks
    def test_endOfStreamLeftToTheReactor(self):
        server, client, tcp = yield self.connectPaused(server=_Recorder)
        client.shutdown(socket.SHUT_WR)
        self.assertEqual(wire.readOn(server.transport), b"")
        self.assertFalse(server.lost.called)
        tcp.resumeProducing()  # the reactor reads again, and finds the end
        self.assertIs((yield server.lost), error.ConnectionDone)

    @defer.inlineCallbacks
    def test_throughReadPassThroughWrappersOnly(self):
        def wrap(protocolClass):
            def make(f):
                wf = WrappingFactory(f)
                wf.protocol = protocolClass
                return wf
            return make

        server, client, tcp = yield self.connectPaused(wrap(_ReadsThrough))
        client.sendall(b"MAIL FROM:<a@example.com>\r\n")
        self.waiting(tcp, 27)
        self.assertEqual(wire.readOn(server.transport), b"MAIL FROM:<a@example.com>\r\n")
        # A wrapper whose reads may be changed (TLS), or that only says its
        # writes pass through, is not read around.
        server, client, tcp = yield self.connectPaused(wrap(_PassThrough))
        client.sendall(b"x")
        self.waiting(tcp, 1)
        self.assertEqual(wire.readOn(server.transport), b"")
        self.assertTrue(ProxyProtocolWrapper.readsPassThrough)

    def test_otherTransportsReadNothing(self):
        self.assertEqual(wire.readOn(StringTransport()), b"")
