"""
A fuzz of the config file with fixed seeds (L{tests.configfuzz}): the
shipped examples mutated, cut and damaged.  In process, every refusal is
made of C{file: key: what is wrong (expected ...)} lines and nothing else
gets out of the check; with twistd, C{--check-config}, start and a SIGHUP
to a running gateway judge each case alike (the same lines, no
traceback), and the gateway still accepts mail after each.
"""

from twisted.trial import unittest

from tests.configfuzz import Fuzzer


class ConfigFuzzTests(unittest.TestCase):
    timeout = 300

    def test_inProcess(self):
        fuzzer = Fuzzer(self.mktemp())
        problems = []
        for seed in (20261207, 3, 5):
            problems += fuzzer.run(seed, 1500, 20)
        self.assertEqual(problems, [])
        self.assertTrue(0 < fuzzer.refused < fuzzer.cases, (fuzzer.refused, fuzzer.cases))

    def test_checkStartAndReloadAgree(self):
        fuzzer = Fuzzer(self.mktemp(), processes=True)
        try:
            problems = fuzzer.run(20261226, 8, 200)
        finally:
            code = fuzzer.close()
        self.assertEqual(problems, [])
        self.assertTrue(0 < fuzzer.refused < fuzzer.cases, (fuzzer.refused, fuzzer.cases))
        self.assertIn(code, (0, -15))
