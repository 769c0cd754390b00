"""
relaygw.xtext: the RFC 1891 / RFC 3461 section 4 encoding used by XCLIENT,
XSETCONTEXT and onward XCLIENT/XFORWARD (protocol.md section 15, checklist
68 and 81).
"""

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relaygw import xtext

#: Octets that xtext may carry unencoded: 0x21-0x7E except "+" and "=".
XCHARS = bytes(b for b in range(0x21, 0x7F) if b not in (0x2B, 0x3D))


class EncodeTests(unittest.TestCase):
    """Checklist 81: what is escaped, and how."""

    def test_plainCharactersUnchanged(self):
        self.assertEqual(xtext.encode(XCHARS), XCHARS.decode("ascii"))

    def test_plusEqualsSpaceEscaped(self):
        self.assertEqual(xtext.encode(b"a+b=c d"), "a+2Bb+3Dc+20d")

    def test_everyControlOctetEscaped(self):
        for b in range(0x00, 0x21):
            self.assertEqual(xtext.encode(bytes([b])), "+%02X" % b)

    def test_highOctetsEscapedUppercase(self):
        for b in range(0x7F, 0x100):
            encoded = xtext.encode(bytes([b]))
            self.assertEqual(encoded, "+%02X" % b)
            self.assertEqual(encoded, encoded.upper())
        self.assertEqual(xtext.encode(b"\xab\xcd\xef"), "+AB+CD+EF")

    def test_strIsEncodedAsUtf8(self):
        self.assertEqual(xtext.encode("\u20ac"), "+E2+82+AC")
        self.assertEqual(xtext.encode("caf\u00e9"), "caf+C3+A9")

    def test_empty(self):
        self.assertEqual(xtext.encode(b""), "")
        self.assertEqual(xtext.decode(""), b"")

    def test_resultIsAlwaysValidXtext(self):
        # Only xchars and "+" followed by two uppercase hex digits.
        import re

        encoded = xtext.encode(bytes(range(256)))
        self.assertRegex(encoded, r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
        self.assertEqual(len(re.findall(r"\+", encoded)), 256 - len(XCHARS))


class StrictDecodeTests(unittest.TestCase):
    """Strict mode (XSETCONTEXT): malformed escapes are refused."""

    def test_decodesEscapes(self):
        self.assertEqual(xtext.decode("x+2By+3Dz+20w"), b"x+y=z w")
        self.assertEqual(xtext.decode("caf+C3+A9"), "caf\u00e9".encode("utf-8"))

    def test_acceptsStrAndBytes(self):
        self.assertEqual(xtext.decode(b"a+2Bb"), b"a+b")
        self.assertEqual(xtext.decode("a+2Bb"), b"a+b")

    def test_lowercaseHexAndLiteralEqualsTolerated(self):
        # protocol.md section 15: tolerated, as Postfix does.
        self.assertEqual(xtext.decode("x+2by"), b"x+y")
        self.assertEqual(xtext.decode("a=b"), b"a=b")

    def test_malformedEscapesRefused(self):
        for bad in ("+", "a+", "+4", "a+4", "+ZZ", "+G1", "+1G", "++2B", "a+ b", "+-1", "x+2"):
            self.assertRaises(xtext.XtextError, xtext.decode, bad)

    def test_escapeNotReadPastItsTwoDigits(self):
        # "+2B2B" is an escaped "+" followed by the literal "2B".
        self.assertEqual(xtext.decode("+2B2B"), b"+2B")
        self.assertEqual(xtext.decode("+2B+2B"), b"++")

    def test_decodedNulRefused(self):
        for bad in ("+00", "a+00b"):
            self.assertRaises(xtext.XtextError, xtext.decode, bad)
            self.assertRaises(xtext.XtextError, xtext.decode, bad, lenient=True)

    def test_rawOctetsOutsideXcharRefused(self):
        for bad in ("a b", "a\tb", "a\x00b", "a\rb", "a\x7fb", "a\x80b", "caf\u00e9", b"caf\xe9"):
            self.assertRaises(xtext.XtextError, xtext.decode, bad)
            self.assertRaises(xtext.XtextError, xtext.decode, bad, lenient=True)

    def test_errorIsAValueError(self):
        self.assertTrue(issubclass(xtext.XtextError, ValueError))


class LenientDecodeTests(unittest.TestCase):
    """Lenient mode (XCLIENT, checklist 68): a bare "+" is kept as sent."""

    def test_barePlusKept(self):
        self.assertEqual(xtext.decode("nginx+user@example.org", lenient=True), b"nginx+user@example.org")
        self.assertEqual(xtext.decode("a+", lenient=True), b"a+")
        self.assertEqual(xtext.decode("+4", lenient=True), b"+4")
        self.assertEqual(xtext.decode("+ZZ", lenient=True), b"+ZZ")
        self.assertEqual(xtext.decode("++", lenient=True), b"++")

    def test_hexEscapesStillDecoded(self):
        self.assertEqual(xtext.decode("acc+2Buser@example.org", lenient=True), b"acc+user@example.org")
        self.assertEqual(xtext.decode("mx+2Dxt.example.net", lenient=True), b"mx-xt.example.net")
        self.assertEqual(xtext.decode("a++2B", lenient=True), b"a++")

    def test_strictRefusesWhatLenientKeeps(self):
        self.assertRaises(xtext.XtextError, xtext.decode, "nginx+user@example.org")


class RoundTripTests(unittest.TestCase):
    """Checklist 81: decoding reverses encoding."""

    def test_everyNonNulOctet(self):
        data = bytes(range(1, 256))
        self.assertEqual(xtext.decode(xtext.encode(data)), data)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300).filter(lambda b: b"\x00" not in b))
    @example(b"+=")
    @example(b"+2B")
    @example(b" \x01\x7f\xff")
    def test_encodeThenStrictDecode(self, data):
        encoded = xtext.encode(data)
        self.assertTrue(encoded.isascii())
        self.assertEqual(xtext.decode(encoded), data)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200).filter(lambda b: b"\x00" not in b))
    def test_lenientDecodeAgreesOnEncodedInput(self, data):
        # Whatever an encoder produced, lenient decoding reads it the same way.
        self.assertEqual(xtext.decode(xtext.encode(data), lenient=True), data)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=100).filter(lambda s: "\x00" not in s))
    def test_textRoundTripsAsUtf8(self, text):
        self.assertEqual(xtext.decode(xtext.encode(text)).decode("utf-8"), text)

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet=st.sampled_from("+=aZ029BbF-.\x00 \xe9"), max_size=12), st.booleans())
    def test_anyInputDecodesOrRaisesXtextError(self, value, lenient):
        # Never another exception (IndexError, TypeError, ...) whatever a client sends.
        try:
            decoded = xtext.decode(value, lenient=lenient)
        except xtext.XtextError:
            return
        self.assertIsInstance(decoded, bytes)
        self.assertNotIn(b"\x00", decoded)
