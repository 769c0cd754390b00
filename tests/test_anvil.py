"""
Client counts per address for the whole gateway (relaygw.anvil): the
counts themselves on a clock, and worker 0's anvil asked by other workers
over real socket pairs.
"""

import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import anvil
from relaygw.anvil import TOO_FAST, TOO_MANY, Anvil, AnvilClient, ClientCounts


class ClientCountsTests(unittest.TestCase):
    def test_interface(self):
        from zope.interface.verify import verifyObject

        from relaygw.anvil import IClientCounts, _RemoteCounts

        verifyObject(IClientCounts, ClientCounts(task.Clock()))
        verifyObject(IClientCounts, _RemoteCounts(AnvilClient(reactor), "inbound"))

    def test_limitAtOnce(self):
        counts = ClientCounts(task.Clock())
        self.assertEqual([counts.acquire("192.0.2.1", 2, 0) for _ in range(3)], [None, None, TOO_MANY])
        self.assertIsNone(counts.acquire("192.0.2.2", 2, 0))
        counts.release("192.0.2.1")
        counts.release("192.0.2.1")
        self.assertIsNone(counts.acquire("192.0.2.1", 2, 0))
        counts.release("192.0.2.1")
        counts.release("192.0.2.1")
        counts.release("192.0.2.2")
        self.assertEqual(dict(counts.perIP), {})

    def test_ratePerMinute(self):
        clock = task.Clock()
        counts = ClientCounts(clock)
        got = []
        for _ in range(4):
            got.append(counts.acquire("192.0.2.1", 0, 3))
            counts.release("192.0.2.1")
        self.assertEqual(got, [None, None, None, TOO_FAST])
        clock.advance(61)
        self.assertIsNone(counts.acquire("192.0.2.1", 0, 3))


class _Workers:
    """An anvil and C{n} clients, each over a socket pair of its own, in this reactor."""

    def __init__(self, case, n, timeout=None):
        self.anvil = Anvil(reactor)
        self.clients = []
        case.addCleanup(settle)  # (last: worker 0's ends see the clients' go)
        for _ in range(n):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.anvil.attach(reactor, ours)
            ours.close()
            client = AnvilClient.fromEnvironment(reactor, {anvil.ENV: str(theirs.detach())})
            if timeout is not None:
                client.TIMEOUT = timeout
            case.addCleanup(client.transport.loseConnection)
            self.clients.append(client)

    def counts(self, name="inbound"):
        return dict(self.anvil.countsFor(name).perIP)


def settle():
    """A few reactor turns, for the lines in flight to be read."""
    return task.deferLater(reactor, 0.05, lambda: None)


class AnvilTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_limitCountsEveryWorker(self):
        """Two workers' connections from one address count together."""
        w = _Workers(self, 2)
        a, b = (c.countsFor("inbound") for c in w.clients)
        local = w.anvil.countsFor("inbound")
        got = [(yield a.acquire("192.0.2.1", 3, 0)), (yield b.acquire("192.0.2.1", 3, 0)),
               local.acquire("192.0.2.1", 3, 0), (yield b.acquire("192.0.2.1", 3, 0))]
        self.assertEqual(got, [None, None, None, TOO_MANY])
        # Another listener's limit is its own.
        self.assertIsNone((yield w.clients[0].countsFor("submission").acquire("192.0.2.1", 1, 0)))
        for counts in (a, b, b):
            counts.release("192.0.2.1")
        yield settle()
        self.assertEqual(w.counts(), {"192.0.2.1": 1})  # worker 0's own
        local.release("192.0.2.1")
        self.assertEqual(w.counts(), {})

    def test_requestLeavesAtOnce(self):
        """
        A worker's release is in worker 0's socket when the call returns,
        not at the reactor's next turn: the session that released it shuts
        its connection right after, and the client may connect again (to
        worker 0) before that turn.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        client = AnvilClient.fromEnvironment(reactor, {anvil.ENV: str(theirs.detach())})
        self.addCleanup(client.transport.loseConnection)
        client.countsFor("inbound").release("192.0.2.1")
        ours.setblocking(False)
        self.assertEqual(ours.recv(4096), b'["release", "inbound", "192.0.2.1"]\n')

    @defer.inlineCallbacks
    def test_releaseSentIsTakenBeforeARefusal(self):
        """
        Worker 0 takes in a release another worker has sent (and its
        reactor not read yet) before it refuses one of its own connections
        over the limit: the client whose session that worker closed may
        connect again, to worker 0, in the same reactor turn.
        """
        w = _Workers(self, 2)
        a = w.clients[0].countsFor("inbound")
        local = w.anvil.countsFor("inbound")
        self.assertIsNone((yield a.acquire("192.0.2.1", 1, 0)))
        a.release("192.0.2.1")
        # (No reactor turn in between.)
        self.assertIsNone(local.acquire("192.0.2.1", 1, 0))
        self.assertEqual(local.acquire("192.0.2.1", 1, 0), TOO_MANY)
        local.release("192.0.2.1")
        local.release("192.0.2.1")
        yield settle()
        self.assertEqual(w.counts(), {})

    @defer.inlineCallbacks
    def test_rateCountsEveryWorker(self):
        w = _Workers(self, 2)
        a, b = (c.countsFor("inbound") for c in w.clients)
        got = []
        for counts in (a, b, a, b):
            got.append((yield counts.acquire("192.0.2.1", 0, 3)))
            counts.release("192.0.2.1")
        self.assertEqual(got, [None, None, None, TOO_FAST])

    @defer.inlineCallbacks
    def test_aWorkerGoneReleasesItsCounts(self):
        """A worker that dies (its channel closes) no longer holds its clients' places."""
        w = _Workers(self, 2)
        a, b = (c.countsFor("inbound") for c in w.clients)
        for _ in range(2):
            self.assertIsNone((yield a.acquire("192.0.2.1", 3, 0)))
        self.assertIsNone((yield b.acquire("192.0.2.1", 3, 0)))
        self.assertEqual(w.counts(), {"192.0.2.1": 3})
        w.clients[0].transport.loseConnection()
        yield settle()
        self.assertEqual(w.counts(), {"192.0.2.1": 1})
        self.assertIsNone((yield b.acquire("192.0.2.1", 3, 0)))

    @defer.inlineCallbacks
    def test_channelForgetsAddressesReleased(self):
        """
        Worker 0's end of a channel holds only what its worker holds now:
        once the connections and logins of many client addresses have
        ended, nothing of them stays (it would grow with every address the
        worker ever served, for as long as it runs).
        """
        channels = []
        Channel = anvil._Channel

        class Recorded(Channel):
            def __init__(self, *args):
                Channel.__init__(self, *args)
                channels.append(self)

        self.patch(anvil, "_Channel", Recorded)
        w = _Workers(self, 1)
        counts, failures = w.clients[0].countsFor("inbound"), w.clients[0].authFailures
        for i in range(1, 51):
            ip = "192.0.2.%d" % i
            self.assertIsNone((yield counts.acquire(ip, 10, 0)))
            self.assertEqual((yield failures.begin(ip)), 0)
            self.assertIsNone((yield counts.acquire(ip, 10, 0)))
            self.assertFalse((yield failures.end(ip, i % 2)))
            counts.release(ip)
            counts.release(ip)
        yield settle()
        [channel] = channels
        self.assertEqual((dict(channel.held), dict(channel.logins), w.counts()), ({}, {}, {}))

    @defer.inlineCallbacks
    def test_noChannelLetsIn(self):
        """With worker 0 gone, a worker lets connections in (and says so once)."""
        w = _Workers(self, 1)
        client = w.clients[0]
        counts = client.countsFor("inbound")
        self.assertIsNone((yield counts.acquire("192.0.2.1", 1, 0)))
        client.transport.loseConnection()
        yield settle()
        self.assertEqual([counts.acquire("192.0.2.1", 1, 0) for _ in range(3)], [None] * 3)

    @defer.inlineCallbacks
    def test_noAnswerLetsIn(self):
        """Worker 0 that does not answer (stopped, say) holds a connection up for C{TIMEOUT} at most."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        client = AnvilClient.fromEnvironment(reactor, {anvil.ENV: str(theirs.detach())})
        self.addCleanup(client.transport.loseConnection)
        client.TIMEOUT = 0.2
        d = client.countsFor("inbound").acquire("192.0.2.1", 1, 0)
        self.assertFalse(d.called)
        self.assertIsNone((yield d))
        # Its late answer is not taken for the next request's.
        ours.sendall(b'"count"\n')
        later = client.countsFor("inbound").acquire("192.0.2.1", 1, 0)
        yield settle()
        ours.sendall(b"null\n")
        self.assertIsNone((yield later))

    @defer.inlineCallbacks
    def test_garbledAnswerLetsIn(self):
        """An answer that is not JSON counts as none: the connection is let in, the login tried."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        client = AnvilClient.fromEnvironment(reactor, {anvil.ENV: str(theirs.detach())})
        self.addCleanup(client.transport.loseConnection)
        acquired = client.countsFor("inbound").acquire("192.0.2.1", 1, 0)
        begun = client.authFailures.begin("192.0.2.1")
        ours.sendall(b"count\n{\n")
        self.assertEqual(((yield acquired), (yield begun)), (None, 0))

    @defer.inlineCallbacks
    def test_channelLostWhileAskingLetsIn(self):
        """
        Worker 0's channel goes while requests wait for its answers: each
        gets what it would without a channel, the connection let in and the
        login tried (before, every one got None, which AUTH read as locked
        out: 454 4.7.0 to a right password).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client = AnvilClient.fromEnvironment(reactor, {anvil.ENV: str(theirs.detach())})
        acquired = client.countsFor("inbound").acquire("192.0.2.1", 1, 0)
        locked = client.authFailures.lockedOut("192.0.2.1")
        begun = client.authFailures.begin("192.0.2.1")
        ended = client.authFailures.end("192.0.2.1", True)
        ours.close()
        answers = yield defer.gatherResults([acquired, locked, begun, ended])
        self.assertEqual(answers, [None, False, 0, False])
        self.assertFalse(client.connected)

    @defer.inlineCallbacks
    def test_badRequestDropsTheChannel(self):
        """A garbled line drops that worker's channel, and what it counted, and nothing else."""
        w = _Workers(self, 2)
        a, b = (c.countsFor("inbound") for c in w.clients)
        self.assertIsNone((yield a.acquire("192.0.2.1", 3, 0)))
        self.assertIsNone((yield b.acquire("192.0.2.1", 3, 0)))
        w.clients[0].sendLine(b'["acquire", "inbound"]')
        yield settle()
        self.assertFalse(w.clients[0].connected)
        self.assertTrue(w.clients[1].connected)
        self.assertEqual(w.counts(), {"192.0.2.1": 1})

    def test_noChannelInTheEnvironment(self):
        self.assertIsNone(AnvilClient.fromEnvironment(reactor, {}))
        self.assertIsNone(AnvilClient.fromEnvironment(reactor, {anvil.ENV: "not a number"}))


class FailedLoginTests(unittest.TestCase):
    """The AUTH limiter (relaygw.auth.FailureTracker) kept by worker 0 for every worker."""

    @defer.inlineCallbacks
    def fail(self, failures, n):
        wait = yield failures.begin("192.0.2.1")
        self.assertIsNotNone(wait, "locked out after %d failures" % n)
        return (yield failures.end("192.0.2.1", True))

    @defer.inlineCallbacks
    def test_failuresCountEveryWorker(self):
        """Five failures in all, whichever worker saw each, lock the address out for every worker."""
        w = _Workers(self, 2)
        a, b = (c.authFailures for c in w.clients)
        tooMany = []
        for n, failures in enumerate((a, b, a, b, w.anvil.authFailures)):
            tooMany.append((yield self.fail(failures, n)))
        self.assertEqual(tooMany, [False] * 4 + [True])
        for failures in (a, b):
            self.assertTrue((yield failures.lockedOut("192.0.2.1")))
            self.assertIsNone((yield failures.begin("192.0.2.1")))
        self.assertFalse((yield a.lockedOut("192.0.2.2")))

    @defer.inlineCallbacks
    def test_loginsBeingVerifiedCount(self):
        """Attempts in flight on other workers count towards the limit: no more than 5 are ever verified."""
        w = _Workers(self, 2)
        a, b = (c.authFailures for c in w.clients)
        waits = []
        for failures in (a, b, a, b, a, b):
            waits.append((yield failures.begin("192.0.2.1")))
        self.assertEqual(waits[:5], [0] * 5)
        self.assertIsNone(waits[5])
        # The first worker dies with three attempts in flight: they are given back.
        w.clients[0].transport.loseConnection()
        yield settle()
        self.assertEqual(w.anvil.authFailures._inflight, {"192.0.2.1": 2})
        self.assertEqual((yield b.begin("192.0.2.1")), 0)

    @defer.inlineCallbacks
    def test_noChannelLetsTheLoginBeTried(self):
        w = _Workers(self, 1)
        failures = w.clients[0].authFailures
        w.clients[0].transport.loseConnection()
        yield settle()
        self.assertEqual((failures.lockedOut("192.0.2.1"), failures.begin("192.0.2.1"),
                          failures.end("192.0.2.1", True)), (False, 0, False))
