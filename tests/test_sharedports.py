"""
relaygw.sharedports: the listening sockets the main process passes on to
its workers, and the reactor waiting on them with EPOLLEXCLUSIVE.  Real
sockets and the real reactor; the twistd tests in test_lifecycle show two
processes sharing one accept queue.
"""

import json
import os
import select
import socket

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from relaygw.sharedports import ENV, FIRST_FD, SharedSockets, acceptExclusively
from relaygw.workers import ReusePortEndpoint


def listeningSocket():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    return s


def isOpen(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def atFd(sock, fd):
    """Duplicate C{sock} onto descriptor C{fd} (as spawnProcess's childFDs does for a worker)."""
    os.dup2(sock.fileno(), fd)
    return fd


class InheritedSocketTests(unittest.TestCase):
    """A worker takes the socket the main process passed on for an address, and only a listening one."""

    def setUp(self):
        # Descriptors well above anything the test process has open.
        self.fds = []
        self.addCleanup(lambda: [isOpen(fd) and os.close(fd) for fd in self.fds])

    def inherited(self, sock):
        fd = atFd(sock, 900 + len(self.fds))
        self.fds.append(fd)
        return fd

    def test_takesTheListeningSocketForItsAddress(self):
        listening = listeningSocket()
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        fd = self.inherited(listening)
        shared = SharedSockets({ENV: json.dumps({"127.0.0.1 %d" % port: fd})})
        self.assertIsNone(shared.take("127.0.0.1", port + 1, socket.AF_INET))
        sock = shared.take("127.0.0.1", port, socket.AF_INET)
        self.assertEqual(sock.getsockname()[1], port)
        self.assertEqual(sock.fileno(), fd)
        self.assertIsNone(shared.take("127.0.0.1", port, socket.AF_INET))  # once
        sock.close()

    def assertRefused(self, fd, interface, port, family=socket.AF_INET):
        """The inherited C{fd} named for this address is not taken, and is closed."""
        shared = SharedSockets({ENV: json.dumps({"%s %d" % (interface, port): fd})})
        self.assertIsNone(shared.take(interface, port, family))
        self.assertFalse(isOpen(fd))

    def test_notAListeningSocketIsClosedAndRefused(self):
        connected = socket.socket()
        self.addCleanup(connected.close)
        self.assertRefused(self.inherited(connected), "127.0.0.1", 2525)

    def test_socketOnAnotherPortIsRefused(self):
        listening = listeningSocket()
        self.addCleanup(listening.close)
        self.assertRefused(self.inherited(listening), "127.0.0.1", listening.getsockname()[1] + 1)

    def test_notASocketIsClosedAndRefused(self):
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        self.assertRefused(r, "127.0.0.1", 2525)

    def test_wrongFamilyIsRefused(self):
        listening = listeningSocket()
        self.addCleanup(listening.close)
        self.assertRefused(self.inherited(listening), "::1", 2525, socket.AF_INET6)

    def test_garbledEnvironmentInheritsNothing(self):
        for value in ("{", "[3]", json.dumps({"127.0.0.1 25": "3"}), json.dumps({"127.0.0.1 25": 1})):
            self.assertIsNone(SharedSockets({ENV: value}).take("127.0.0.1", 25, socket.AF_INET), value)

    def test_unusedInheritedSocketsAreClosed(self):
        listening = listeningSocket()
        self.addCleanup(listening.close)
        fd = self.inherited(listening)
        shared = SharedSockets({ENV: json.dumps({"127.0.0.1 1": fd})})
        shared.closeUnused()
        self.assertFalse(isOpen(fd))
        self.assertIsNone(shared.take("127.0.0.1", 1, socket.AF_INET))


class PassedOnTests(unittest.TestCase):
    """The main process passes on each port it listens on, numbered from descriptor 3."""

    def test_forChild(self):
        shared = SharedSockets({})
        self.assertEqual(shared.forChild(), ({}, {}))
        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", 0, shared=shared)
        port = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        self.addCleanup(port.stopListening)
        fds, env = shared.forChild()
        self.assertEqual(fds, {FIRST_FD: port.fileno()})
        self.assertEqual(json.loads(env[ENV]), {"127.0.0.1 0": FIRST_FD})

    def test_portNoLongerListeningIsNotPassedOn(self):
        shared = SharedSockets({})
        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", 0, shared=shared)
        port = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        d = port.stopListening()
        d.addCallback(lambda _: self.assertEqual(shared.forChild(), ({}, {})))
        return d

    def test_workerAdoptsThePassedOnSocket(self):
        """What the worker's endpoint listens on is the main process's socket, not a new one."""
        listening = listeningSocket()
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        fd = atFd(listening, 950)
        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", port,
                                     shared=SharedSockets({ENV: json.dumps({"127.0.0.1 %d" % port: fd})}))
        adopted = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        self.addCleanup(adopted.stopListening)
        self.assertFalse(isOpen(fd))  # adopted (a duplicate), then closed
        self.assertEqual(os.fstat(adopted.fileno()).st_ino, os.fstat(listening.fileno()).st_ino)


def epollEvents(reactor, fd):
    """The event mask C{reactor}'s epoll instance has for C{fd}, from /proc/self/fdinfo."""
    with open("/proc/self/fdinfo/%d" % reactor._poller.fileno()) as f:
        for line in f:
            if line.startswith("tfd:"):
                fields = line.split()
                if int(fields[1]) == fd:
                    return int(fields[3], 16)
    return None


class ExclusiveWakeupTests(unittest.TestCase):
    """Each process waits on a shared listening socket with EPOLLEXCLUSIVE: one wakes per connection."""

    def setUp(self):
        if not isinstance(getattr(reactor, "_poller", None), select.epoll):
            raise unittest.SkipTest("the epoll reactor is not in use")

    def test_listeningPortIsExclusive(self):
        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", 0)
        port = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        self.addCleanup(port.stopListening)
        events = epollEvents(reactor, port.fileno())
        self.assertEqual(events & select.EPOLLEXCLUSIVE, select.EPOLLEXCLUSIVE)
        self.assertEqual(events & select.EPOLLIN, select.EPOLLIN)

    def test_stopsReadingAsUsual(self):
        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", 0)
        port = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        fd = port.fileno()
        d = port.stopListening()
        self.assertIsNone(epollEvents(reactor, fd))
        return d

    def test_aPortNotReadingIsLeftAlone(self):
        listening = listeningSocket()
        self.addCleanup(listening.close)

        class NotReading:
            def fileno(self):
                return listening.fileno()

        self.assertFalse(acceptExclusively(reactor, NotReading()))
        self.assertIsNone(epollEvents(reactor, listening.fileno()))

    def test_exclusiveAgainOnceTheBudgetResumes(self):
        """
        The descriptor budget pauses a full worker's listening port and
        resumes it later: the reactor registers it afresh, and it waits
        with EPOLLEXCLUSIVE again (without it, every new connection on the
        shared socket would wake this worker too).
        """
        from types import SimpleNamespace

        from relaygw.descriptors import ConnectionBudget

        endpoint = ReusePortEndpoint(reactor, "127.0.0.1", 0)
        port = self.successResultOf(endpoint.listen(protocol.Factory.forProtocol(protocol.Protocol)))
        self.addCleanup(port.stopListening)
        held = SimpleNamespace(n=0)
        budget = ConnectionBudget([SimpleNamespace(max_connections=10)], 0, ports=[port], limit=2 * 10 + 64)
        budget.factories.append(SimpleNamespace(connectionsHeld=lambda: held.n, full=lambda: False, ports=[port]))
        self.assertEqual(budget.connections, 10)
        held.n = 10
        budget.changed()
        self.assertIsNone(epollEvents(reactor, port.fileno()))  # paused
        held.n = 9
        budget.changed()
        events = epollEvents(reactor, port.fileno())
        self.assertEqual(events & select.EPOLLEXCLUSIVE, select.EPOLLEXCLUSIVE)
        self.assertEqual(events & select.EPOLLIN, select.EPOLLIN)
