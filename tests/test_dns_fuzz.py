"""
A fuzz of the MX lookup against a DNS server that misbehaves at random,
with fixed seeds (L{tests.dnsfuzz}): every lookup ends in time with next
hops or one of its own failures; no next hop comes from a record of
another name or class, or is a domain's own address when it has MX
records; a permanent failure only when the zone or the server says so;
replies that are all right (or only hostile) give exactly the zone's next
hops, best first.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.dnsfuzz import Figures, runSeeds


class DNSFuzzTests(unittest.TestCase):
    timeout = 120
    SEEDS = (20261207, 3, 4)
    CASES = 30

    @defer.inlineCallbacks
    def test_fixedSeeds(self):
        figures = yield runSeeds(self.mktemp(), self.SEEDS, self.CASES, Figures())
        self.assertEqual(figures.problems, [])
        self.assertEqual(figures.cases, len(self.SEEDS) * self.CASES)
        # (every kind of outcome occurs)
        self.assertGreater(figures.hops, 100, str(figures))
        self.assertGreater(figures.temporary, 20, str(figures))
        self.assertGreater(figures.permanent, 10, str(figures))
