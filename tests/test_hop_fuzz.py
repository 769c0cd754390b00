"""
A fuzz of the delivery client against a misbehaving next hop with fixed
seeds (L{tests.hopfuzz}): each recipient reported delivered was taken in a
transaction the next hop answered 250 at its end of data, with the content
whole; one failed for good only after a 5xx (or over the next hop's SIZE);
the client never pipelines without PIPELINING, sends content before the
354, goes on after a 421 or uses an extension not offered, never sends
its password in plaintext under tls = may nor MAIL without the AUTH it
was given, says EHLO first after STARTTLS and XCLIENT; every delivery
ends, no connection is left open, nothing is logged as a failure.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.hopfuzz import Figures, runSeeds


class HopFuzzTests(unittest.TestCase):
    timeout = 120
    SEEDS = (20261206, 7, 8)
    CASES = 25

    @defer.inlineCallbacks
    def test_fixedSeeds(self):
        figures = yield runSeeds(self.mktemp(), self.SEEDS, self.CASES, Figures())
        self.assertEqual(figures.problems, [])
        self.assertEqual(figures.cases, len(self.SEEDS) * self.CASES)
        # (the misbehaviour is frequent enough for every kind of outcome to occur)
        self.assertGreater(figures.delivered, 50, str(figures))
        self.assertGreater(figures.deferred, 50, str(figures))
        self.assertGreater(figures.bounced, 20, str(figures))
