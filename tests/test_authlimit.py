"""
The AUTH brute-force limiter: failures count per claimed client address
across connections, the lock-out is checked before anything is verified,
and the delay comes before the verification.  Sessions on StringTransport
with a task.Clock, and a recording credentials checker.
"""

import base64
import os
import socket
import struct
import time

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from relaygw import auth
from relaygw.testing import Gateway, SessionHarness, inThread


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()


@implementer(ICredentialsChecker)
class RecordingChecker:
    """alice/s3cret; records when each verification was asked for."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, clock):
        self.clock = clock
        self.calls = []

    def requestAvatarId(self, credentials):
        self.calls.append((self.clock.seconds(), credentials.username))
        if (credentials.username, credentials.password) == (b"alice", b"s3cret"):
            return defer.succeed("alice")
        return defer.fail(UnauthorizedLogin())


class TrackerTests(unittest.TestCase):
    def test_attemptsInFlightCount(self):
        """However many connections try at once, only C{limit} are verified per window."""
        tracker = auth.FailureTracker(task.Clock(), limit=3)
        for _ in range(3):
            self.assertFalse(tracker.lockedOut("192.0.2.1"))
            tracker.attempt("192.0.2.1")
        self.assertTrue(tracker.lockedOut("192.0.2.1"))
        self.assertFalse(tracker.lockedOut("192.0.2.2"))
        tracker.done("192.0.2.1", failed=False)
        self.assertFalse(tracker.lockedOut("192.0.2.1"))

    def test_noDelayWithoutFailures(self):
        tracker = auth.FailureTracker(task.Clock())
        self.assertEqual(tracker.attempt("peer"), 0)
        tracker.done("peer", failed=True)
        self.assertEqual(tracker.attempt("peer"), 0.5)


class LimiterSessionTests(unittest.TestCase):
    def setUp(self):
        self.harness = SessionHarness(self.mktemp(), {"auth_plaintext": True, "always_allow": False,
                                                      "relay_networks": []})
        self.checker = RecordingChecker(self.harness.clock)
        self.harness.factory.portal = Portal(auth.RelayRealm(), [self.checker])

    def connect(self, peer="192.0.2.7"):
        client = self.harness.connect(peer)
        self.addCleanup(client.lose)
        self.assertEqual(client.reply()[0], 220)
        return client

    def fail(self, client):
        """One failed guess: send it, let the delay pass, return the reply."""
        client.send(plain("alice", "wrong") + "\r\n")
        self.harness.clock.advance(10)
        return client.reply()

    def test_lockedOutAcrossConnections(self):
        first = self.connect()
        got = [self.fail(first)[0] for _ in range(5)]
        self.assertEqual(got, [535, 535, 535, 535, 421])
        self.assertTrue(first.closed())
        self.assertEqual(len(self.checker.calls), 5)
        second = self.connect()
        # The right password now is refused too, and nothing is verified.
        self.assertEqual(second.cmd(plain("alice", "s3cret")),
                         (454, ["4.7.0 Too many failed authentications from this address, try again later"]))
        self.assertEqual(second.cmd("AUTH LOGIN")[0], 454)
        self.assertEqual(len(self.checker.calls), 5)
        # Another client address is not affected.
        other = self.connect("192.0.2.8")
        self.assertEqual(other.cmd(plain("alice", "s3cret"))[0], 235)
        # After the window, the address may try again.
        self.harness.clock.advance(601)
        self.assertEqual(self.connect().cmd(plain("alice", "s3cret"))[0], 235)

    def test_delayBeforeVerification(self):
        client = self.connect()
        self.assertEqual(client.cmd(plain("alice", "wrong"))[0], 535)
        self.assertEqual(len(self.checker.calls), 1)
        client.send(plain("alice", "s3cret") + "\r\n")
        # After one failure the next verification waits half a second ...
        self.assertEqual((client.replies(), len(self.checker.calls)), ([], 1))
        self.harness.clock.advance(0.4)
        self.assertEqual(len(self.checker.calls), 1)
        self.harness.clock.advance(0.1)
        # ... and its reply comes as soon as it is verified.
        self.assertEqual(len(self.checker.calls), 2)
        self.assertEqual(client.reply()[0], 235)

    def test_parallelGuessesBounded(self):
        """Twenty connections guessing at once get five verifications in all."""
        clients = [self.connect() for _ in range(20)]
        replies = []
        for _ in range(3):
            for c in clients:
                if not c.closed():
                    c.send(plain("alice", "guess") + "\r\n")
            self.harness.clock.advance(10)
            for c in clients:
                replies.extend(code for code, _ in c.replies())
        self.assertEqual(len(self.checker.calls), 5)
        self.assertEqual(replies.count(535) + replies.count(421), 5)
        self.assertEqual(replies.count(454), len(replies) - 5)

    def test_claimedAddressCounts(self):
        """Behind XCLIENT the claimed client is counted, not the proxy."""
        tracker = self.harness.factory.authFailures
        for _ in range(5):
            tracker.record("198.51.100.9")
        client = self.connect("192.0.2.7")
        client.session.context.update(remote_ip="198.51.100.9")
        self.assertEqual(client.cmd(plain("alice", "s3cret"))[0], 454)

    def test_lineErrorEndsExchange(self):
        client = self.connect()
        self.assertEqual(client.cmd("AUTH PLAIN"), (334, [""]))
        client.send("A" * 13000 + "\r\n")
        self.assertEqual(client.reply(), (500, ["5.5.6 Authentication exchange line is too long"]))
        self.assertEqual(client.cmd("NOOP"), (250, ["2.0.0 Ok"]))


class HashingCapTests(unittest.TestCase):
    def test_concurrencyCapped(self):
        """Hashes run in threads, at most C{concurrency} at once; the rest wait their turn."""
        path = self.mktemp()
        auth.PasswordFile(path).set("alice", "s3cret")
        checker = auth.HashedPasswordChecker(path)
        from twisted.cred.credentials import UsernamePassword

        ds = [checker.requestAvatarId(UsernamePassword(b"alice", b"guess%d" % i)) for i in range(5)]
        self.assertEqual(checker._hashing.tokens, 0)
        self.assertEqual(len(checker._hashing.waiting), 5 - checker.concurrency)
        ds.append(checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret")))
        results = defer.DeferredList(ds, consumeErrors=True)

        def check(results):
            self.assertEqual([ok for ok, _ in results], [False] * 5 + [True])
            self.assertEqual(results[-1][1], "alice")
            self.assertEqual(checker._hashing.tokens, checker.concurrency)

        return results.addCallback(check)


class AnsweredLater:
    """A failure tracker answering each question a moment later, as worker 0 answers another worker."""

    def __init__(self, tracker):
        self.tracker = tracker

    def __getattr__(self, name):
        call = getattr(self.tracker, name)
        return lambda *args, **kw: task.deferLater(reactor, 0.05, call, *args, **kw)


class GoneClientTests(unittest.TestCase):
    """Real sockets: a guess whose client has gone while it waited for a hashing turn is not verified."""

    def test_goneClientsGetNoHash(self):
        return self.guessAndLeave(askLater=False)

    def test_goneClientsGetNoHashAskingWorkerZero(self):
        """Nor when the lock-out is asked of worker 0, answering after the client has gone."""
        return self.guessAndLeave(askLater=True)

    @defer.inlineCallbacks
    def guessAndLeave(self, askLater):
        users = os.path.abspath(self.mktemp())
        auth.PasswordFile(users).set("alice", "s3cret")
        gw = Gateway(self.mktemp(), listeners=({"credentials": users, "auth_plaintext": True},))
        yield gw.start()
        self.addCleanup(gw.stop)
        factory = gw.service.factories[0]
        if askLater:
            factory.authFailures = AnsweredLater(factory.authFailures)
        hashed = []
        verify = auth.verifyPassword

        def slow(password, encoded):  # (in a hashing thread)
            hashed.append(password)
            time.sleep(0.2)
            return verify(password, encoded)

        self.patch(auth, "verifyPassword", slow)
        guesses = 12

        def guessAndLeave():
            # Each guess from an address of its own (no lock-out), then a reset.
            for i in range(guesses):
                s = socket.socket()
                s.bind(("127.0.5.%d" % (i + 1), 0))
                s.connect(("127.0.0.1", gw.port))
                s.settimeout(5)
                s.recv(1024)
                s.sendall((plain("alice", "guess%d" % i) + "\r\n").encode())
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

        yield inThread(guessAndLeave)
        deadline = time.monotonic() + guesses * 0.2 + 5
        while (factory.sessions or factory.closing) and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(factory.sessions, set())
        yield task.deferLater(reactor, 0.2, lambda: None)  # (the last answers of the tracker)

        def login():
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            try:
                s.recv(1024)
                started = time.monotonic()
                s.sendall((plain("alice", "s3cret") + "\r\n").encode())
                return s.recv(1024)[:3], time.monotonic() - started
            finally:
                s.close()

        code, seconds = yield inThread(login)
        self.assertEqual(code, b"235")
        # Only the guesses that got a turn while their clients were there were hashed
        # (two at once), not one for each client long gone.
        self.assertLessEqual(len(hashed), 5, len(hashed))
        self.assertLess(seconds, 1.0)
