"""
relaygw.sasl: the pure SASL PLAIN/LOGIN exchange, with exact refusals,
round trips and a property test that any client line yields an outcome.
"""

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relaygw import codes, sasl


def b64(text):
    return base64.b64encode(text.encode("utf-8"))


class ExchangeTests(unittest.TestCase):
    def test_plainInitial(self):
        e = sasl.Exchange.begin("plain " + sasl.encodePlain("alice", "s3cret"))
        self.assertEqual(e.first(), sasl.Credentials("alice", "s3cret", ""))

    def test_plainChallenge(self):
        e = sasl.Exchange.begin("PLAIN")
        self.assertEqual(e.first(), sasl.Challenge(""))
        self.assertEqual(e.respond(b64("admin\0alice\0pw")), sasl.Credentials("alice", "pw", "admin"))

    def test_login(self):
        e = sasl.Exchange.begin("LOGIN")
        self.assertEqual(e.first(), sasl.Challenge("VXNlcm5hbWU6"))
        self.assertEqual(e.respond(b64("alice")), sasl.Challenge("UGFzc3dvcmQ6"))
        self.assertEqual(e.respond(b64("s3cret")), sasl.Credentials("alice", "s3cret"))

    def test_loginInitialUser(self):
        e = sasl.Exchange.begin("LOGIN " + b64("alice").decode())
        self.assertEqual(e.first(), sasl.Challenge("UGFzc3dvcmQ6"))

    def test_refusals(self):
        self.assertEqual(sasl.Exchange.begin("PLAIN").respond(b"*"), sasl.Refused(codes.AUTH_CANCELLED))
        self.assertEqual(sasl.Exchange.begin("PLAIN").respond(b"!!!"), sasl.Refused(codes.AUTH_BAD_BASE64))
        self.assertEqual(sasl.Exchange.begin("PLAIN").respond(b64("alice\0pw")), sasl.Refused(codes.AUTH_FAILED))
        self.assertEqual(sasl.Exchange.begin("PLAIN").respond(b"="), sasl.Refused(codes.AUTH_FAILED))
        for args, expected in (("", (501, "5.5.4")), ("CRAM-MD5", (504, "5.5.4"))):
            with self.assertRaises(sasl.SASLError) as caught:
                sasl.Exchange.begin(args)
            self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), expected)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=30), st.text(min_size=1, max_size=30).filter(lambda t: "\0" not in t),
           st.text(min_size=1, max_size=30).filter(lambda t: "\0" not in t))
    def test_plainRoundTrip(self, authzid, user, password):
        authzid = authzid.replace("\0", "")
        e = sasl.Exchange.begin("PLAIN " + sasl.encodePlain(user, password, authzid))
        self.assertEqual(e.first(), sasl.Credentials(user, password, authzid))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["PLAIN", "LOGIN"]), st.lists(st.binary(max_size=80), min_size=1, max_size=4))
    def test_anyLinesGiveOutcomes(self, mechanism, lines):
        e = sasl.Exchange.begin(mechanism)
        outcome = e.first()
        for line in lines:
            if not isinstance(outcome, sasl.Challenge):
                break
            outcome = e.respond(line)
            self.assertIsInstance(outcome, (sasl.Challenge, sasl.Credentials, sasl.Refused))
