"""Tests for L{relaygw.relay.dsn}: the bounce's returned header section."""

import email
import email.policy
import io

from twisted.trial import unittest

from relaygw.relay.dsn import buildBounce
from relaygw.relay.nexthop import Result


class _Spooled:
    """A queued message as buildBounce reads it: its envelope and content."""

    queueId = "1A2B3C"
    arrival = 1700000000.0
    mailfrom = "sender@example.net"

    def __init__(self, content):
        self.content = content

    def openBody(self):
        return io.BytesIO(self.content)


def _returned(content):
    """The bounce of C{content}, parsed, and its text/rfc822-headers part."""
    bounce = buildBounce(_Spooled(content), {"r@example.test": Result(550, "5.1.1", "no such user")}, "relay.test")
    parsed = email.message_from_bytes(bounce, policy=email.policy.SMTP)
    [part] = [p for p in parsed.walk() if p.get_content_type() == "text/rfc822-headers"]
    return bounce, part


class ReturnedHeadersTests(unittest.TestCase):
    def test_headersOnly(self):
        """The header section is returned, the body is not."""
        bounce, part = _returned(b"Subject: hi\r\nX-A: 1\r\n\r\nsecret body\r\n")
        self.assertEqual(part.get_payload(decode=True), b"Subject: hi\r\nX-A: 1\r\n")
        self.assertNotIn(b"secret body", bounce)

    def test_longLineContinued(self):
        """A header line over RFC 5322's 998 octets is continued on the next, a space first: no line is longer."""
        long = b"X-Long: " + b"h" * 10000
        bounce, part = _returned(b"Subject: hi\r\n" + long + b"\r\n\r\nbody\r\n")
        self.assertLessEqual(max(len(line) for line in bounce.split(b"\r\n")), 998)
        returned = part.get_payload(decode=True)
        self.assertEqual(returned.replace(b"\r\n ", b""), b"Subject: hi\r\n" + long + b"\r\n")

    def test_cutAtALineEnd(self):
        """1,000 headers past the 64 KiB cap: the part ends at the end of a whole header line."""
        headers = b"".join(b"X-Header-%04d: %s\r\n" % (n, b"v" * 80) for n in range(1000))
        bounce, part = _returned(headers + b"\r\nbody\r\n")
        returned = part.get_payload(decode=True)
        self.assertLessEqual(len(returned), 65536)
        self.assertTrue(returned.endswith(b"v" * 80 + b"\r\n"), returned[-100:])
        self.assertTrue(headers.startswith(returned))
        self.assertTrue(bounce.endswith(b"--\r\n"))

    def test_eightBitLabelled(self):
        """
        8-bit octets in the returned headers are labelled (Content-Transfer-
        Encoding: 8bit), in the part and the whole report; ASCII is not.
        """
        bounce, part = _returned("Subject: café\r\n\r\nbody\r\n".encode())
        self.assertEqual(part["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(email.message_from_bytes(bounce)["Content-Transfer-Encoding"], "8bit")
        self.assertIn("Subject: café\r\n".encode(), bounce)
        bounce, part = _returned(b"Subject: cafe\r\n\r\nbody\r\n")
        self.assertIsNone(part["Content-Transfer-Encoding"])
        self.assertIsNone(email.message_from_bytes(bounce)["Content-Transfer-Encoding"])

    def test_octetsNoPartMayHold(self):
        """NUL and bare CR, which no 7bit or 8bit part may hold (RFC 2045), are returned as "?"."""
        bounce, part = _returned(b"X-Nul: a\x00b\r\nX-CR: c\rd\r\n\r\nbody\r\n")
        self.assertEqual(part.get_payload(decode=True), b"X-Nul: a?b\r\nX-CR: c?d\r\n")
        self.assertNotIn(b"\x00", bounce)

    def test_longLineKeepsCharactersWhole(self):
        """A long line continued where a UTF-8 character would be cut in two: before it."""
        line = b"X-Long: " + b"h" * 989 + "é".encode() * 10  # (the 998th octet is inside an é)
        bounce, part = _returned(line + b"\r\n\r\nbody\r\n")
        returned = part.get_payload(decode=True)
        returned.decode("utf-8")  # (no character cut)
        self.assertEqual(returned.replace(b"\r\n ", b""), line + b"\r\n")
