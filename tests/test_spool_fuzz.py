"""
A fuzz of the spool across a restart with fixed seeds (L{tests.spoolfuzz}):
messages accepted and left queued, some with recipients done, the stopped
spool damaged at random, and a gateway started on it.  Each message must be
delivered once and whole to the recipients still to do, or set aside in
corrupt/, or be gone only where its queue file was deleted; nothing outside
the spool is touched, nothing is logged as a failure, and the gateway still
delivers a fresh message.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.spoolfuzz import Figures, runSeeds


class SpoolFuzzTests(unittest.TestCase):
    timeout = 60
    SEEDS = (20261206, 21, 120)
    CASES = 4

    @defer.inlineCallbacks
    def test_fixedSeeds(self):
        figures = yield runSeeds(self.mktemp(), self.SEEDS, self.CASES, Figures())
        self.assertEqual(figures.problems, [])
        self.assertEqual((figures.spools, figures.fresh), (len(self.SEEDS) * self.CASES,) * 2)
        self.assertGreater(figures.delivered, 10, str(figures))
        self.assertGreater(figures.quarantined, 3, str(figures))
