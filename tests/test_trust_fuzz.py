"""
A model-based fuzz of the client identity with fixed seeds
(L{tests.trustfuzz}): PROXY headers, XCLIENT with every attribute,
XREMOTEIP, XSETCONTEXT, STARTTLS, AUTH, RSET and EHLO in random order,
pipelined or not, on listeners that trust the peer and ones that do not.
Each reply must be the one the model expects (relaying allowed exactly for
a claimed address in C{relay_networks} or a login), XDUMPCONTEXT must show
the claimed identity, and each message delivered must name the claimed
client only: in its Received header, in onward XCLIENT or XFORWARD, and as
the mail log's C{client=}.
"""

import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.testing import inThread
from tests.recorders import LogCapture
from tests.trustfuzz import Outcome, queuedClients, runSessions, startGateway


class TrustFuzzTests(unittest.TestCase):
    timeout = 60
    SEEDS = (20261206, 5, 44)
    SESSIONS = 100

    @defer.inlineCallbacks
    def test_fixedSeeds(self):
        logs = LogCapture(self)
        gw, hops, hopPorts, ports = yield startGateway(self.mktemp())
        for port in hopPorts:
            self.addCleanup(port.stopListening)
        self.addCleanup(gw.stop)
        outcome = Outcome()
        for seed in self.SEEDS:
            yield inThread(runSessions, ports, seed, self.SESSIONS, outcome)
        self.assertEqual(outcome.problems, [])
        deadline = time.monotonic() + 20
        while (sum(len(t["rcpts"]) for h in hops for t in h.transactions) < len(outcome.expected)
               and time.monotonic() < deadline):
            yield task.deferLater(reactor, 0.1, lambda: None)
        for h in hops:
            for c in h.connections:
                c.transport.loseConnection()
        transactions = [t for h in hops for t in h.transactions]
        self.assertEqual(outcome.check(transactions, queuedClients(logs.events)), [])
        self.assertGreater(len(outcome.expected), 20)
        self.assertEqual([e for e in logs.events if "log_failure" in e], [])
