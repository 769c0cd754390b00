"""The gateway's changes to its reactor (L{relaygw.eventloop}), on reactors of their own."""

import errno
import socket
import time

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python import context
from twisted.python import log as legacyLog
from twisted.trial import unittest

from relaygw import eventloop


class _Reader:
    """A readable end of a socket pair, as the reactor sees a connection."""

    def __init__(self, sock, failing=False):
        self.sock = sock
        self.failing = failing
        self.read = b""
        self.systems = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "reader-%d" % (self.fileno(),)

    def doRead(self):
        self.systems.append(context.get(legacyLog.ILogContext)["system"])
        self.read += self.sock.recv(100)
        if self.failing:
            raise ValueError("the connection's read failed")

    def connectionLost(self, reason):
        if self.failing:
            raise KeyError("and so did its clean-up")


class DispatchTests(unittest.TestCase):
    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self._close, self.reactor)

    @staticmethod
    def _close(reactor):
        reactor._poller.close()
        reactor.waker.connectionLost(None)

    def _pair(self, failing=False):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reader = _Reader(ours, failing)
        self.reactor.addReader(reader)
        self.addCleanup(lambda: reader in self.reactor.getReaders() and self.reactor.removeReader(reader))
        theirs.send(b"x")
        return reader

    def test_eventsGoStraightToTheConnection(self):
        """
        A read event reaches the connection with no legacy log context
        around it (the stock reactor sets C{system} to the connection's log
        prefix for each event).
        """
        self.assertTrue(eventloop.dispatchDirectly(self.reactor))
        reader = self._pair()
        self.reactor.doIteration(1.0)
        self.assertEqual(reader.read, b"x")
        self.assertEqual(reader.systems, ["-"])

    def test_stockDispatchSetsTheContext(self):
        """What L{test_eventsGoStraightToTheConnection} takes away: the stock reactor's per-event context."""
        reader = self._pair()
        self.reactor.doIteration(1.0)
        self.assertEqual(reader.systems, [reader.logPrefix()])

    def test_escapedErrorLoggedAndTheLoopGoesOn(self):
        """
        An error that escapes the reactor's own handling of a connection
        (its clean-up raising after its read did) is logged once, and the
        other connections' events of the same poll are still handled.
        """
        eventloop.dispatchDirectly(self.reactor)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        failing, healthy = self._pair(failing=True), self._pair()
        self.reactor.doIteration(1.0)
        self.assertEqual((failing.read, healthy.read), (b"x", b"x"))
        escaped = [e for e in events if e.get("log_namespace") == "relaygw.eventloop"]
        self.assertEqual(len(escaped), 1)
        self.assertIsInstance(escaped[0]["log_failure"].value, KeyError)
        self.assertIs(escaped[0]["selectable"], failing)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # (the reactor's own log of the read)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertNotIn(failing, self.reactor.getReaders())
        self.assertIn(healthy, self.reactor.getReaders())

    def test_otherReactorsLeftAsTheyAre(self):
        """A reactor that is not epoll's keeps its own dispatch."""
        other = SelectReactor()
        self.addCleanup(other.waker.connectionLost, None)
        before = other.doIteration
        self.assertFalse(eventloop.dispatchDirectly(other))
        self.assertEqual(other.doIteration, before)


class _NoWatchPoller:
    """An epoll object that cannot register descriptors other than C{allowed} (the kernel out of memory)."""

    def __init__(self, poller, allowed):
        self.poller = poller
        self.allowed = allowed
        self.refused = 0

    def register(self, fd, *args):
        if fd not in self.allowed:
            self.refused += 1
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return self.poller.register(fd, *args)

    def __getattr__(self, name):
        return getattr(self.poller, name)


class _Greeter(protocol.Protocol):
    lost = None

    def connectionMade(self):
        self.transport.write(b"220 hello\r\n")

    def connectionLost(self, reason):
        self.lost = reason


class UnwatchableTests(unittest.TestCase):
    def test_connectionClosedWithOneLine(self):
        """
        A connection the kernel will not watch (C{epoll_ctl} failing
        with C{ENOMEM}) is closed, its protocol told, with one log line
        and no traceback; the listening port goes on accepting (before:
        Twisted logged a traceback from its accept loop, and the
        connection was left to the garbage collector, its protocol never
        told).
        """
        reactor = EPollReactor()
        self.addCleanup(DispatchTests._close, reactor)
        eventloop.dispatchDirectly(reactor)
        self.assertTrue(eventloop.closeUnwatchable(reactor))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        greeters = []
        factory = protocol.Factory.forProtocol(_Greeter)
        factory.buildProtocol = lambda addr: greeters.append(_Greeter()) or greeters[-1]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(lambda: port.stopListening() and reactor.runUntilCurrent())
        poller = reactor._poller = _NoWatchPoller(reactor._poller, {port.fileno(), reactor.waker.fileno()})
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        for _ in range(5):
            reactor.doIteration(0.1)
            reactor.runUntilCurrent()
        self.assertEqual(len(greeters), 1)
        self.assertGreater(poller.refused, 0)
        self.assertIsNotNone(greeters[0].lost)
        self.assertEqual(greeters[0].lost.value.errno, errno.ENOMEM)
        client.settimeout(5)
        self.assertEqual(client.recv(100), b"")  # (closed, not left open)
        said = [e for e in events if e.get("log_namespace") == "relaygw.eventloop"]
        self.assertEqual([e["log_level"].name for e in said], ["error"])
        self.assertIn("ENOMEM", said[0]["log_format"].format(**said[0]))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIn(port, reactor.getReaders())


class MonotonicClockTests(unittest.TestCase):
    def test_timersMoveOverWithTheirDelay(self):
        """Afterwards the reactor's clock is the monotonic one, and a timer set before still has its delay ahead."""
        reactor = EPollReactor()
        self.addCleanup(DispatchTests._close, reactor)
        call = reactor.callLater(100, lambda: None)
        eventloop.onMonotonicClock(reactor)
        self.assertIs(reactor.seconds, time.monotonic)
        self.assertLess(abs(call.getTime() - time.monotonic() - 100), 1)
        later = reactor.callLater(50, lambda: None)
        self.assertLess(abs(later.getTime() - time.monotonic() - 50), 1)
