"""
The trusted verbs talk to the session through IVerbSession only and
return an Outcome: run against a minimal fake session, and the real
session provides the interface.
"""

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relaygw import codes
from relaygw.context import ValidationContext
from relaygw.testing import SessionHarness
from relaygw.verbs import IVerbSession, Outcome, xclient, xdumpcontext, xremoteip, xsetcontext


@implementer(IVerbSession)
class FakeSession:
    hostname = "relay.test"

    def __init__(self, refusal=None):
        self.context = ValidationContext(remote_ip="192.0.2.1", peer_ip="127.0.0.1", auth_user=None)
        self.inTransaction = False
        self.refusal = refusal
        self.calls = []

    def resetIdentity(self, keepAuth=False, helo=None):
        self.calls.append(("reset", keepAuth, helo))

    def rerunConnectPolicy(self):
        self.calls.append(("policy", self.context["remote_ip"]))
        return self.refusal

    def audit(self, verb, changes, renew=False):
        self.calls.append(("audit", verb, sorted(changes), renew))


class OutcomeTests(unittest.TestCase):
    def test_xclient(self):
        session = FakeSession()
        outcome = xclient.run(session, "ADDR=192.0.2.9 HELO=client.example LOGIN=alice")
        self.assertEqual(outcome, Outcome(codes.GREETING.format(host="relay.test")))
        self.assertEqual(session.calls[0], ("reset", True, "client.example"))
        self.assertEqual(session.calls[-1], ("policy", "192.0.2.9"))
        self.assertEqual(session.calls[1][0:2], ("audit", "XCLIENT"))
        self.assertTrue(session.calls[1][3])

    def test_connectPolicyRefusesNewIdentity(self):
        refusal = codes.Reply(554, "5.7.1", "go away")
        session = FakeSession(defer.succeed(refusal))
        got = []
        xremoteip.run(session, "192.0.2.9").addCallback(got.append)
        self.assertEqual(got, [Outcome(refusal, sessionRefused=True)])

    def test_refusalsSayWhy(self):
        session = FakeSession()
        session.inTransaction = True
        for verb in (xclient, xremoteip, xsetcontext):
            outcome = verb.run(session, "a=b")
            self.assertEqual(outcome.reply.code, 503)
            self.assertEqual(outcome.refused, "inside a transaction")
        self.assertEqual(session.calls, [])
        self.assertEqual(xdumpcontext.run(session, "x").refused, "arguments")

    def test_sessionProvidesTheInterface(self):
        harness = SessionHarness(self.mktemp())
        client = harness.connect()
        self.addCleanup(client.lose)
        self.assertTrue(verifyObject(IVerbSession, client.session))
