"""
DSN (RFC 3461, 3464): the parameters taken with MAIL and RCPT over a
socket, kept in the queue, passed on or honoured by the gateway's own
reports (L{relaygw.relay.dsn}), and the bounce's returned header section.
"""

import email
import errno
import email.policy
import io
import json
import os
import smtplib

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import durable
from relaygw.relay import dsn
from relaygw.relay.dsn import buildBounce, buildReport
from relaygw.relay.nexthop import Result
from relaygw.spoolapi import Envelope
from relaygw.testing import Gateway, freePort, inThread
from tests.relaysetup import FAST, CrashingGateway, RelayTestCase, crashTest, deliveryStatus, waitFor
from tests.recorders import LogCapture
from tests.sessions import GatewayTestCase
from tests.test_diskfull import failing, failReportCommits


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

    def test_datesWithANumericZone(self):
        """
        The report's Date and Arrival-Date end in "+0000": "GMT" is RFC 5322's
        obs-zone, which must not be generated (RFC 3464 takes its date-time).
        """
        bounce = buildBounce(_dsnMessage(), self.failed, "relay.test")
        parsed = email.message_from_bytes(bounce, policy=email.policy.SMTP)
        self.assertRegex(parsed["Date"], r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000$")
        self.assertEqual(_status(bounce)[0]["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")

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


class InboundTests(GatewayTestCase):
    """RFC 3461's parameters over a socket: offered, accepted, each bad value refused as Postfix does."""

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def expect(self, c, line, code, text=None):
        got, lines = c.cmd(line)
        self.assertEqual(got, code, (line, lines))
        if text is not None:
            self.assertEqual(lines[0], text, line)
        return lines

    def test_offered(self):
        """EHLO lists DSN; smtplib sees it."""
        def run():
            s = smtplib.SMTP("127.0.0.1", self.gw.port, timeout=10)
            try:
                s.ehlo("client.example")
                return s.has_extn("dsn")
            finally:
                s.quit()

        return inThread(run).addCallback(self.assertTrue)

    def test_mailParameters(self):
        """RET=FULL|HDRS (any case), ENVID of xtext up to 100 characters; bad values refused 501 5.5.4."""
        def run(c):
            c.cmd("EHLO x")
            for good in ("RET=FULL", "RET=hdrs", "ENVID=QID+2B1", "ENVID=" + "e" * 100, "RET=HDRS ENVID=a+2b"):
                self.expect(c, "MAIL FROM:<a@example.org> " + good, 250)
                self.expect(c, "RSET", 250)
            for bad in ("RET=ALL", "RET", "RET=FULL,HDRS"):
                self.expect(c, "MAIL FROM:<a@example.org> " + bad, 501, "5.5.4 Bad RET parameter syntax")
            for bad in ("ENVID", "ENVID=a+zz", "ENVID=a+", "ENVID=a+0Ab", "ENVID=a+00", "ENVID=" + "e" * 101):
                self.expect(c, "MAIL FROM:<a@example.org> " + bad, 501, "5.5.4 Bad ENVID parameter syntax")
            self.expect(c, "MAIL FROM:<a@example.org> RET=FULL RET=HDRS", 501)
            self.expect(c, "MAIL FROM:<a@example.org> RET=", 501)
            self.expect(c, "MAIL FROM:<a@example.org> BY=120;R", 555, "5.5.4 Unsupported option: BY")

        return self.session(run)

    def test_rcptParameters(self):
        """NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY; ORCPT=addr-type;xtext; bad values 501 5.5.4."""
        def run(c):
            c.cmd("EHLO x")
            self.expect(c, "MAIL FROM:<a@example.org>", 250)
            for n, good in enumerate(("NOTIFY=NEVER", "NOTIFY=success,FAILURE,DELAY", "NOTIFY=DELAY",
                                      "ORCPT=rfc822;b+2Bx@example.net", "NOTIFY=FAILURE ORCPT=RFC822;b@example.net")):
                self.expect(c, "RCPT TO:<b%d@example.net> %s" % (n, good), 250, "2.1.5 Ok")
            for bad in ("NOTIFY", "NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS,,FAILURE", "NOTIFY=ALWAYS", "NOTIFY=,"):
                self.expect(c, "RCPT TO:<c@example.net> " + bad, 501, "5.5.4 Bad NOTIFY parameter syntax")
            for bad in ("ORCPT", "ORCPT=b@example.net", "ORCPT=;b@example.net", "ORCPT=rfc822;", "ORCPT=rfc822;b+0A",
                        "ORCPT=rfc822;b+zz", "ORCPT=rfc822;" + "b" * 494, "ORCPT=rfc(822);b@example.net"):
                self.expect(c, "RCPT TO:<c@example.net> " + bad, 501, "5.5.4 Bad ORCPT parameter syntax")
            self.expect(c, "RCPT TO:<c@example.net> NOTIFY=NEVER NOTIFY=NEVER", 501)
            self.expect(c, "RCPT TO:<c@example.net> FOO=1", 555, "5.5.4 Unsupported option: FOO")
            self.expect(c, "RCPT TO:<c@example.net> RET=FULL", 555, "5.5.4 Unsupported option: RET")

        return self.session(run)


def _sendWithDSN(port, rcpts, mail_options=("RET=HDRS", "ENVID=QID+2B1"), content=None):
    """One message through smtplib with DSN parameters: C{rcpts} maps recipient -> its RCPT options."""
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        s.ehlo("client.example")
        s.mail("a@example.org", list(mail_options))
        for rcpt, options in rcpts.items():
            code, text = s.rcpt(rcpt, list(options))
            assert code == 250, (rcpt, code, text)
        code, text = s.data(content or b"Subject: dsn\r\n\r\nthe body\r\n")
        assert code == 250, (code, text)
    finally:
        s.quit()


class RelayedTests(RelayTestCase):
    """What the parameters do on the way out: passed on, or honoured by the gateway's own reports."""

    def send(self, rcpts, **kw):
        return inThread(_sendWithDSN, self.gw.port, rcpts, **kw)

    @defer.inlineCallbacks
    def test_passedOnWhenOffered(self):
        """A next hop that offers DSN gets NOTIFY, ORCPT, RET and ENVID as xtext, and the gateway reports nothing."""
        hop, port = self.hop(extensions=["PIPELINING", "DSN"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"b@example.net": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B+2Bx@example.net"],
                         "c@example.net": []}, mail_options=["RET=hdrs", "ENVID=QID+2b1"])
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        self.assertIn("MAIL FROM:<a@example.org> RET=HDRS ENVID=QID+2B1", hop.lines)
        self.assertIn("RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@example.net", hop.lines)
        self.assertIn("RCPT TO:<c@example.net>", hop.lines)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(hop.transactions), 1)  # (no success notice: the next hop's to send)

    @defer.inlineCallbacks
    def test_relayedNoticeWhenNotOffered(self):
        """
        A next hop without DSN gets none of the parameters; a recipient that
        asked for NOTIFY=SUCCESS gets a success notice, Action relayed, as
        Postfix sends one, with the ENVID and ORCPT given; the others none.
        """
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"b@example.net": ["NOTIFY=SUCCESS", "ORCPT=rfc822;B+2Bx@example.net"],
                         "c@example.net": ["NOTIFY=FAILURE"], "d@example.net": []})
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        self.assertIn("MAIL FROM:<a@example.org>", hop.lines)
        self.assertIn("RCPT TO:<b@example.net>", hop.lines)
        self.assertFalse([line for line in hop.lines if "NOTIFY" in line or "RET=" in line], hop.lines)
        notice = hop.transactions[1]
        self.assertEqual((notice["mailfrom"], notice["rcpts"]), ("", ["a@example.org"]))
        self.assertIn(b"Subject: Successful Mail Delivery Report\r\n", notice["data"])
        blocks = deliveryStatus(notice["data"])
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "QID+1")
        self.assertEqual(len(blocks), 2, blocks)
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; b@example.net")
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822;B+x@example.net")
        self.assertEqual((blocks[1]["Action"], blocks[1]["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(blocks[1]["Remote-MTA"], "dns; 127.0.0.1")
        self.assertNotIn(b"the body", notice["data"])

    @defer.inlineCallbacks
    def test_noticeWriteENOSPC(self):
        """
        The success notice cannot be queued (ENOSPC, once): the message is
        not sent again, its success was recorded first; the notice is
        queued at the retry, and the message leaves the queue.  Before, the
        retry found no record of the delivery and sent the message again.
        """
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        self.patch(self.gw.service.queue, "retryMin", 0.3)
        faults = failReportCommits(self, self.gw.service.spool)
        yield self.send({"b@example.net": ["NOTIFY=SUCCESS"]})
        yield self.until(lambda: faults)
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty(), timeout=10)
        message, notice = hop.transactions
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 1)
        self.assertEqual((notice["mailfrom"], notice["rcpts"]), ("", ["a@example.org"]))
        self.assertEqual(deliveryStatus(notice["data"])[1]["Action"], "relayed")
        self.assertEqual(len(faults), 1)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_failingAttemptsBackOff(self):
        """
        The notice cannot be queued four times in a row: each attempt
        fails, and the next waits retry_min, then twice as long each time,
        up to retry_max (before: retry_min each time, without end); the
        message is sent once, and leaves with its notice once the disk has
        room.
        """
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        queue = self.gw.service.queue
        self.patch(queue, "retryMin", 0.2)
        self.patch(queue, "retryMax", 0.5)
        failReportCommits(self, self.gw.service.spool, times=4)
        logged = LogCapture(self)
        yield self.send({"b@example.net": ["NOTIFY=SUCCESS"]})
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty(), timeout=10)
        delays = [e["delay"] for e in logged.find("delivery attempt for {qid} failed")]
        self.assertEqual(delays, [0.2, 0.4, 0.5, 0.5])
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 1)
        self.assertEqual(queue.failedAttempts, {})
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_noticeFailsAfterTheBounce(self):
        """
        One attempt owes a bounce and a success notice; the bounce is
        queued, the notice cannot be (ENOSPC, once).  The retry queues the
        notice only: the refused recipient is not tried again and the
        sender gets one bounce, not two.
        """
        hop, port = self.hop(extensions=["PIPELINING"], rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        self.patch(self.gw.service.queue, "retryMin", 0.3)
        spool = self.gw.service.spool
        faults = []
        fault = failing(durable.quick.write, errno.ENOSPC, faults, once=True)
        fault.armed = False
        self.patch(durable.quick, "write", fault)
        newMessage = spool.newMessage
        reports = []

        def secondReportFails(envelope):
            if envelope.mailfrom == "":
                reports.append(envelope)
                fault.armed = len(reports) == 2
            return newMessage(envelope)

        self.patch(spool, "newMessage", secondReportFails)
        yield self.send({"good@example.net": ["NOTIFY=SUCCESS,FAILURE"], "bad@example.net": ["NOTIFY=FAILURE"]})
        yield self.until(lambda: len(hop.transactions) == 3 and self.spoolEmpty(), timeout=10)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(faults), 1)
        self.assertEqual(hop.lines.count("RCPT TO:<bad@example.net>"), 1)
        reports = [deliveryStatus(t["data"])[1]["Action"] for t in hop.transactions if t["mailfrom"] == ""]
        self.assertEqual(sorted(reports), ["failed", "relayed"])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_notifyDecidesTheBounce(self):
        """
        Failed for good: NOTIFY=NEVER, or a NOTIFY without FAILURE, is not
        bounced; NOTIFY=FAILURE and no NOTIFY are, in one bounce.
        """
        refused = "550 5.1.1 no such user"
        hop, port = self.hop(rcpt={r: refused for r in ("never@example.net", "success@example.net",
                                                        "failure@example.net", "plain@example.net")})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"never@example.net": ["NOTIFY=NEVER"], "success@example.net": ["NOTIFY=SUCCESS,DELAY"],
                         "failure@example.net": ["NOTIFY=FAILURE"], "plain@example.net": []})
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        blocks = deliveryStatus(bounce["data"])
        self.assertEqual([b["Final-Recipient"] for b in blocks[1:]],
                         ["rfc822; failure@example.net", "rfc822; plain@example.net"])
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "QID+1")

    @defer.inlineCallbacks
    def test_neverBouncedAtAll(self):
        """Every failed recipient asked for NOTIFY=NEVER: no bounce, and the message leaves the queue."""
        hop, port = self.hop(rcpt={"never@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"never@example.net": ["NOTIFY=NEVER"]})
        yield self.until(self.spoolEmpty)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(hop.transactions, [])
        self.assertIn("RCPT TO:<never@example.net>", hop.lines)

    @defer.inlineCallbacks
    def test_retFullReturnsTheMessage(self):
        """RET=FULL: the bounce returns the whole message (message/rfc822), body and all."""
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"bad@example.net": []}, mail_options=["RET=FULL"])
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        self.assertIn(b"Content-Type: message/rfc822\r\n", bounce["data"])
        self.assertIn(b"\r\nthe body\r\n", bounce["data"])
        self.assertNotIn("Original-Envelope-Id", deliveryStatus(bounce["data"])[0])

    @defer.inlineCallbacks
    def test_retHdrsReturnsHeaders(self):
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send({"bad@example.net": []}, mail_options=["RET=HDRS"])
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        self.assertIn(b"Content-Type: text/rfc822-headers\r\n", bounce["data"])
        self.assertIn(b"Subject: dsn\r\n", bounce["data"])
        self.assertNotIn(b"the body", bounce["data"])

    @defer.inlineCallbacks
    def test_keptAcrossARestart(self):
        """
        Queued while the next hop is down, the parameters survive the
        gateway's restart and go on to the next hop once it is up.
        """
        directory = self.mktemp()
        first = Gateway(directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                        relay={"smarthosts": ["[127.0.0.1]:%d" % freePort()], "retry_min": 60, "retry_max": 60})
        yield first.start()
        self.gw = first
        yield self.send({"b@example.net": ["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;b@example.net"]})
        yield self.until(lambda: first.service.spool.readState(first.service.spool.queueIds()[0]).get("attempts"))
        yield first.stop()
        hop, port = self.hop(extensions=["DSN"])
        second = Gateway(directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                         relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % port]))
        yield second.start()
        self.addCleanup(second.stop)
        self.gw = second
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        self.assertIn("MAIL FROM:<a@example.org> RET=HDRS ENVID=QID+2B1", hop.lines)
        self.assertIn("RCPT TO:<b@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.net", hop.lines)

    @defer.inlineCallbacks
    def test_deliveredNoticeFromAMaildir(self):
        """Delivered to the local Maildir, a NOTIFY=SUCCESS recipient gets a notice with Action delivered."""
        gw = yield self.gateway({})
        outbox = os.path.join(gw.directory, "outbox", "new")
        yield self.send({"b@example.net": ["NOTIFY=SUCCESS"], "c@example.net": ["NOTIFY=NEVER"]})
        yield self.until(lambda: os.path.isdir(outbox) and len(os.listdir(outbox)) == 2 and self.spoolEmpty())
        contents = []
        for name in os.listdir(outbox):
            with open(os.path.join(outbox, name), "rb") as f:
                contents.append(f.read())
        [notice] = [c for c in contents if b"Successful Mail Delivery Report" in c]
        blocks = deliveryStatus(notice[notice.index(b"From: Mail Delivery System"):])
        self.assertEqual([(b["Final-Recipient"], b["Action"]) for b in blocks[1:]],
                         [("rfc822; b@example.net", "delivered")])
        self.assertEqual(blocks[1]["Diagnostic-Code"].split(";")[0], "X-relaygw")


class SuccessNoticeCrashTests(RelayTestCase):
    """A success notice owed survives a crash (kill -9) of the gateway before it is queued."""

    timeout = 90

    def test_owedNoticeQueuedAfterRestart(self):
        """
        r@a.example (NOTIFY=SUCCESS) is relayed by a next hop without DSN
        while the message's other next hop sits on r@b.example's end of
        data; the progress record says r@a.example is done, and the gateway
        is killed.  After the restart the sender gets the success notice
        for r@a.example, which is not sent again; r@b.example is delivered.
        """
        hop, aport = self.hop(extensions=["PIPELINING"])
        slow, bport = self.hop(extensions=["PIPELINING"], silentAtEndFor="r@b.example")
        gateway = CrashingGateway(os.path.abspath(self.mktemp()),
                                  {"smarthosts": ["[127.0.0.1]:%d" % aport], "retry_min": 1, "retry_max": 1,
                                   "tls": "none"},
                                  routes=[{"domains": ["b.example"], "smarthosts": ["[127.0.0.1]:%d" % bport]}])

        def done(path, rcpt):
            try:
                with open(path) as f:
                    return json.load(f)["rcpts"][rcpt]["status"] == "done"
            except (OSError, ValueError, KeyError):
                return False

        def run(gw):
            gw.start()
            _sendWithDSN(gw.port, {"r@a.example": ["NOTIFY=SUCCESS"], "r@b.example": []})
            [qid] = os.listdir(gw.path("queue"))
            waitFor(lambda: done(gw.path("state", qid), "r@a.example"), "r@a.example recorded done")
            gw.kill()
            slow.silentAtEndFor = None
            gw.start()
            waitFor(lambda: not os.listdir(gw.path("queue")) and len(hop.transactions) == 2,
                    "the notice after the restart")

        def check(_):
            message, notice = hop.transactions
            self.assertEqual(message["rcpts"], ["r@a.example"])
            self.assertEqual(hop.lines.count("RCPT TO:<r@a.example>"), 1)
            self.assertEqual((notice["mailfrom"], notice["rcpts"]), ("", ["a@example.org"]))
            blocks = deliveryStatus(notice["data"])
            self.assertEqual([(b["Final-Recipient"], b["Action"]) for b in blocks[1:]],
                             [("rfc822; r@a.example", "relayed")])
            self.assertIn("r@b.example", slow.recipients())

        return crashTest(gateway, run, check)
