"""
A stateful fuzz of the inbound session over loopback sockets, with fixed
seeds (L{tests.sessionfuzz}): random but plausible commands, pipelined and
cut at random octets, on listeners that trust the peer for the X-verbs and
ones that do not (with STARTTLS, ALWAYS-ALLOW and C{require_tls} too).
Every reply must be well formed, carry an enhanced status code of its
class where protocol.md section 5 asks for one, come within seconds and
fit the transaction as the client saw it; the next hop must get exactly
one message for each 250 at end of data, to the recipients that got 250
and with the content sent; nothing may be logged as a failure.
"""

import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.testing import inThread
from tests.recorders import LogCapture
from tests.sessionfuzz import Outcome, runSessions, spoolEmpty, startGateway


class SessionFuzzTests(unittest.TestCase):
    timeout = 60
    SEEDS = (20261206, 7, 11)
    SESSIONS = 120
    SECONDS = 2.0

    @defer.inlineCallbacks
    def test_fixedSeeds(self):
        logs = LogCapture(self)
        gw, hop, hopPort, ports = yield startGateway(self.mktemp())
        self.addCleanup(hopPort.stopListening)
        self.addCleanup(gw.stop)
        outcome = Outcome()
        for seed in self.SEEDS:
            yield inThread(runSessions, ports, seed, self.SESSIONS, self.SECONDS, outcome)
        deadline = time.monotonic() + 20
        while not spoolEmpty(gw) and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        for c in hop.connections:
            c.transport.loseConnection()
        self.assertEqual(outcome.check(hop.transactions), [])
        self.assertTrue(outcome.expected and outcome.never, (len(outcome.expected), len(outcome.never)))
        self.assertEqual([e for e in logs.events if "log_failure" in e], [])
