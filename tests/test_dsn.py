"""Tests for L{relaygw.relay.dsn}: the bounce's returned header section."""

import email
import email.policy
import io

from twisted.trial import unittest

from relaygw.relay import dsn
from relaygw.relay.dsn import buildBounce, buildReport
from relaygw.relay.nexthop import Result
from relaygw.spoolapi import Envelope


class _Spooled:
    """A queued message as buildBounce reads it: its envelope and content."""

    queueId = "1A2B3C"
    arrival = 1700000000.0
    mailfrom = "sender@example.net"

    def __init__(self, content, envelope=None):
        self.content = content
        self.size = len(content)
        self.envelope = envelope or Envelope(mailfrom=self.mailfrom, recipients=["r@example.test"])

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


def _status(report):
    """The message/delivery-status part's field groups, parsed."""
    parsed = email.message_from_bytes(report, policy=email.policy.SMTP)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    return [dict(block.items()) for block in status.get_payload()]


_CONTENT = b"Subject: hi\r\nX-A: 1\r\n\r\nthe body\r\n"


def _dsnMessage(mailParams=None, rcptParams=None, content=_CONTENT):
    return _Spooled(content, Envelope(mailfrom="sender@example.net", recipients=["r@example.test"],
                                      mail_params=mailParams or {}, rcpt_params=rcptParams or {}))


class DSNParameterTests(unittest.TestCase):
    """What a report makes of RFC 3461's RET, ENVID, ORCPT and NOTIFY."""

    failed = {"r@example.test": Result(550, "5.1.1", "no such user")}

    def test_envelopeIdAndOriginalRecipient(self):
        """ENVID is the report's Original-Envelope-Id, ORCPT the recipient's Original-Recipient, both decoded."""
        message = _dsnMessage({"ENVID": "QID+2B7"}, {"r@example.test": {"ORCPT": "rfc822;R+2Bx@example.test"}})
        blocks = _status(buildBounce(message, self.failed, "relay.test"))
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "QID+7")
        self.assertEqual(list(blocks[0])[0], "Original-Envelope-Id")  # (first: RFC 3464 section 2.2)
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822;R+x@example.test")
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; r@example.test")

    def test_withoutParametersNoSuchFields(self):
        blocks = _status(buildBounce(_dsnMessage(), self.failed, "relay.test"))
        self.assertNotIn("Original-Envelope-Id", blocks[0])
        self.assertNotIn("Original-Recipient", blocks[1])

    def test_retFullReturnsTheWholeMessage(self):
        """RET=FULL: the message comes back whole, as message/rfc822."""
        bounce = buildBounce(_dsnMessage({"RET": "FULL"}), self.failed, "relay.test")
        parsed = email.message_from_bytes(bounce, policy=email.policy.SMTP)
        [part] = [p for p in parsed.get_payload() if p.get_content_type() == "message/rfc822"]
        self.assertIn(b"\r\n\r\nthe body\r\n", bounce)
        self.assertEqual(part.get_payload()[0]["Subject"], "hi")

    def test_retHdrsAndNoRetReturnHeaders(self):
        """RET=HDRS, and no RET (the gateway's default, as before): the header section only."""
        for params in ({"RET": "HDRS"}, {}):
            bounce = buildBounce(_dsnMessage(params), self.failed, "relay.test")
            self.assertNotIn(b"the body", bounce)
            self.assertIn(b"Content-Type: text/rfc822-headers\r\n", bounce)

    def test_retFullOfALargeMessageReturnsHeaders(self):
        """A message over the return limit (Postfix's bounce_size_limit) comes back as its headers only."""
        content = _CONTENT + b"x" * 100 + b"\r\n" * dsn.RETURN_LIMIT
        bounce = buildBounce(_dsnMessage({"RET": "FULL"}, content=content), self.failed, "relay.test")
        self.assertNotIn(b"the body", bounce)
        self.assertIn(b"Content-Type: text/rfc822-headers\r\n", bounce)

    def test_retFullOfAMessageNoPartMayHold(self):
        """A line over 998 octets cannot go back in an 8bit part: its headers do."""
        content = _CONTENT + b"y" * 1200 + b"\r\n"
        bounce = buildBounce(_dsnMessage({"RET": "FULL"}, content=content), self.failed, "relay.test")
        self.assertNotIn(b"yyyy", bounce)

    def test_successNotice(self):
        """A success notice: its subject, Action relayed, a 2.x.x Status, headers only even with RET=FULL."""
        done = {"r@example.test": Result(250, "2.0.0", "Ok: queued as X", relay="hop.test[127.0.0.1]:25",
                                         reply=True, action="relayed")}
        notice = buildReport(_dsnMessage({"RET": "FULL"}), done, "relay.test", success=True)
        parsed = email.message_from_bytes(notice, policy=email.policy.SMTP)
        self.assertEqual(parsed["Subject"], "Successful Mail Delivery Report")
        blocks = _status(notice)
        self.assertEqual((blocks[1]["Action"], blocks[1]["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(blocks[1]["Remote-MTA"], "dns; hop.test")
        self.assertNotIn(b"the body", notice)


class WantedTests(unittest.TestCase):
    """Which recipients' outcomes a sender asked to hear of (RFC 3461 section 4.1)."""

    def results(self, notify, action="relayed"):
        message = _dsnMessage(rcptParams={"r@example.test": {"NOTIFY": notify}} if notify else {"o@x.test": {}})
        failed = {"r@example.test": Result(550, "5.1.1", "no")}
        done = {"r@example.test": Result(250, "2.0.0", "Ok", action=action)}
        return dsn.wanted(message, failed), dsn.wanted(message, done, success=True)

    def test_default(self):
        """No NOTIFY: a failure is reported, a success is not."""
        self.assertEqual([list(r) for r in self.results(None)], [["r@example.test"], []])

    def test_never(self):
        self.assertEqual(self.results("NEVER"), ({}, {}))

    def test_withoutFailure(self):
        self.assertEqual([list(r) for r in self.results("SUCCESS,DELAY")], [[], ["r@example.test"]])

    def test_failureOnly(self):
        self.assertEqual([list(r) for r in self.results("FAILURE")], [["r@example.test"], []])

    def test_successTheNextHopReports(self):
        """A success whose next hop offered DSN (no action for the gateway): not the gateway's to report."""
        self.assertEqual(self.results("SUCCESS", action=None)[1], {})
