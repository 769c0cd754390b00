"""
ESMTP conformance (protocol.md checklist 1-2, 12-43): greeting, EHLO, core
commands, limits, enhanced codes.  The session's behaviour runs on a
StringTransport with a task.Clock (SessionTestCase); smtplib runs over a
real loopback socket.
"""

import os
import re
import smtplib
import time


from relaygw.testing import inThread
from tests.sessions import GatewayTestCase, SessionTestCase

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


class GreetingTests(SessionTestCase):
    def test_greetingHasNoEnhancedCode(self):
        c = self.client()
        line = c.line()
        self.assertTrue(line.startswith("220 relay.test ESMTP"), line)
        self.assertFalse(ENHANCED.match(line[4:]))

    def test_ehloKeywords(self):
        def run(c):
            code, lines = c.cmd("EHLO client.example")
            self.assertEqual(code, 250)
            self.assertEqual(lines[0], "relay.test")
            self.assertEqual(lines[1:], ["PIPELINING", "SIZE 26214400", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN"])
            for verb in ("XCLIENT", "XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"):
                self.assertNotIn(verb, " ".join(lines))

        return self.session(run)

    def test_heloSingleLine(self):
        def run(c):
            self.assertEqual(c.cmd("HELO client.example"), (250, ["relay.test"]))

        return self.session(run)

    def test_heloWithoutArgument(self):
        def run(c):
            self.assertEqual(c.cmd("EHLO")[0], 501)
            code, lines = c.cmd("HELO")
            self.assertEqual(code, 501)
            self.assertTrue(lines[0].startswith("5.5.4 "))

        return self.session(run)

    def test_verbsCaseInsensitive(self):
        def run(c):
            self.assertEqual(c.cmd("ehlo x")[0], 250)
            self.assertEqual(c.cmd("mail FROM:<a@example.org>"), (250, ["2.1.0 Ok"]))
            code, lines = c.cmd("rCpT to:<b@example.net>")
            self.assertEqual((code, lines[0][:6]), (554, "5.7.1 "))

        return self.session(run)


class TransactionTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_mailWithoutHelo(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>"), (250, ["2.1.0 Ok"]))

        return self.session(run)

    def test_nullSenderAndNestedMail(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<>")[0], 250)
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>"), (503, ["5.5.1 Error: nested MAIL command"]))

        return self.session(run)

    def test_spaceAfterColonTolerated(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM: <a@example.org>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO: <b@example.net>")[0], 250)

        return self.session(run)

    def test_badSenderSyntax(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<a b@example.org>")[1][0][:6], "5.1.7 ")
            self.assertEqual(c.cmd("MAIL FROM:<a@>")[0], 501)
            self.assertEqual(c.cmd("MAIL TO:<a@example.org>")[1][0][:6], "5.5.4 ")

        return self.session(run)

    def test_unknownParameters(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> FOO=bar"), (555, ["5.5.4 Unsupported option: FOO"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> AUTH=<>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<b@example.net> FOO=bar"), (555, ["5.5.4 Unsupported option: FOO"]))

        return self.session(run)

    def test_rcptSequenceAndSyntax(self):
        def run(c):
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>"), (503, ["5.5.1 Error: need MAIL command"]))
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@@example.net>")[1][0][:6], "5.1.3 ")
            self.assertEqual(c.cmd("RCPT TO:<postmaster>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>"), (250, ["2.1.5 Ok"]))

        return self.session(run)

    def test_longLocalPartTaken(self):
        """
        A local part past RFC 5321's 64 octets (SRS and VERP senders run
        past it) is taken, as Postfix takes it: the RFC asks for no limit
        where possible.  A domain past 255 octets names no host.
        """
        srs = "SRS0=HHH=TT=example.org=" + "bounces+" + "a1b2c3d4" * 12
        long = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".example"

        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<%s@example.org>" % srs), (250, ["2.1.0 Ok"]))
            self.assertEqual(c.cmd("RCPT TO:<%s@example.net>" % ("r" * 200)), (250, ["2.1.5 Ok"]))
            self.assertEqual(c.cmd("RCPT TO:<b@%s>" % long), (501, ["5.1.3 Bad recipient address syntax"]))

        return self.session(run)

    def test_numericDomainRefused(self):
        """
        A domain of digits and dots (an IPv4 address without its brackets)
        names no host (RFC 1123 section 2.1): refused as Postfix refuses it,
        not accepted to bounce after a DNS lookup; a numeric label beside
        letters is fine.
        """
        def run(c):
            for domain in ("192.0.2.1", "123.", "1.2.3.4.5"):
                self.assertEqual(c.cmd("MAIL FROM:<a@%s>" % domain), (501, ["5.1.7 Bad sender address syntax"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@123.example>")[0], 250)
            for domain in ("192.0.2.1", "123.", "1.2.3.4.5"):
                self.assertEqual(c.cmd("RCPT TO:<b@%s>" % domain), (501, ["5.1.3 Bad recipient address syntax"]))
            self.assertEqual(c.cmd("RCPT TO:<b@example.123>")[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<b@[192.0.2.1]>")[0], 250)

        return self.session(run)

    def test_localPartBeginningWithHyphenRefused(self):
        """
        A local part that begins with C{-}, quoted or not, after a source
        route or not, is refused as Postfix refuses it (C{allow_min_user =
        no}): a Postfix next hop would refuse it after the gateway had taken
        the message (a sender's refusal bounces every recipient), and such an
        address passed to a command downstream reads as an option.
        """
        def run(c):
            for path in ("-a@example.org", '"-a"@example.org', '"\\-a"@example.org', "@r.example:-a@example.org"):
                self.assertEqual(c.cmd("MAIL FROM:<%s>" % path), (501, ["5.1.7 Bad sender address syntax"]), path)
            self.assertEqual(c.cmd("MAIL FROM:<a-b@example.org>")[0], 250)
            for path in ("-@example.net", '"-x"@example.net', "@r.example,@s.example:-x@example.net"):
                self.assertEqual(c.cmd("RCPT TO:<%s>" % path), (501, ["5.1.3 Bad recipient address syntax"]), path)
            self.assertEqual(c.cmd('RCPT TO:<"a -x"@example.net>')[0], 250)

        return self.session(run)

    def test_dataWithoutRecipients(self):
        def run(c):
            self.assertEqual(c.cmd("DATA"), (503, ["5.5.1 Error: need MAIL command"]))
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("DATA"), (554, ["5.5.1 Error: no valid recipients"]))

        return self.session(run)

    def test_ehloInsideTransactionResets(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("EHLO again")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 503)

        return self.session(run)

    def test_rsetNoopKeepHelo(self):
        def run(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RSET"), (250, ["2.0.0 Ok"]))
            self.assertEqual(c.cmd("NOOP whatever"), (250, ["2.0.0 Ok"]))
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 503)
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)

        return self.session(run)

    def test_vrfyHelpUnknown(self):
        def run(c):
            self.assertEqual(c.cmd("VRFY")[1][0][:6], "5.5.4 ")
            self.assertEqual(c.cmd("VRFY someone")[0], 252)
            self.assertEqual(c.cmd("HELP")[0], 214)
            self.assertEqual(c.cmd("FROBNICATE"), (500, ["5.5.2 Error: command not recognized"]))
            self.assertEqual(c.cmd("NOOP")[0], 250)

        return self.session(run)

    def test_quitClosesAndIgnoresLaterInput(self):
        def run(c):
            c.send("QUIT\r\nNOOP\r\n")
            code, lines = c.reply()
            self.assertEqual((code, lines[0][:6]), (221, "2.0.0 "))
            self.assertTrue(c.closed())
            self.assertEqual(c.buf, b"")

        return self.session(run)

    def test_tooManyRecipients(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            for i in range(100):
                self.assertEqual(c.cmd("RCPT TO:<r%d@example.net>" % i)[0], 250)
            self.assertEqual(c.cmd("RCPT TO:<over@example.net>"), (452, ["4.5.3 Error: too many recipients"]))

        return self.session(run)

    def test_nonAsciiAddress(self):
        def run(c):
            c.send("MAIL FROM:<j\xf6rg@example.org>\r\n")
            self.assertEqual(c.reply()[0], 553)
            c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<\xfc@example.net>\r\n")
            self.assertEqual(c.reply()[0], 250)
            code, lines = c.reply()
            self.assertEqual((code, lines[0][:6]), (553, "5.6.7 "))

        return self.session(run)

    def test_nonAsciiParameter(self):
        """
        A non-ASCII octet in an ESMTP parameter (a DSN ENVID or ORCPT, which
        must be xtext) is a syntax error, 501 5.5.4 (RFC 5321's
        esmtp-value is ASCII): not 553 5.6.7, which says the address is
        non-ASCII when it is not.
        """
        def run(c):
            code, lines = c.cmd("MAIL FROM:<a@example.org> ENVID=caf\xe9")
            self.assertEqual((code, lines[0][:6]), (501, "5.5.4 "))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)
            code, lines = c.cmd("RCPT TO:<b@example.net> ORCPT=rfc822;\xfc@example.net")
            self.assertEqual((code, lines[0][:6]), (501, "5.5.4 "))

        return self.session(run)

    def test_everyReplyHasEnhancedCode(self):
        commands = ["EHLO x", "MAIL FROM:<a@example.org>", "MAIL FROM:<a@example.org>", "RCPT TO:<>",
                    "RCPT TO:<b@example.net>", "VRFY x", "NOOP", "RSET", "HELP", "BOGUS", "DATA", "QUIT"]

        def run(c):
            for cmd in commands:
                code, lines = c.cmd(cmd)
                if cmd.startswith("EHLO"):
                    continue
                for line in lines:
                    self.assertTrue(ENHANCED.match(line), (cmd, line))
                    self.assertEqual(line[0], str(code)[0], (cmd, line))

        return self.session(run)


class QueuedOrderTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_answeredBeforeDelivery(self):
        """
        The client has its 250 before the queue manager hears of the
        message: what one grouped commit made durable is answered before
        any of it starts on its way out.
        """
        seen = []

        def queued(queueId, message):
            seen.append((queueId, c.transport.value()))

        self.harness.factory.onQueued = queued
        c = self.client()
        c.reply()
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send("Subject: x\r\n\r\nbody\r\n.\r\n")
        [(queueId, written)] = seen
        self.assertTrue(written.endswith(b"250 2.0.0 Ok: queued as %s\r\n" % queueId.encode()), written)


class SizeTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"], "max_message_size": 10000}

    def test_declaredSize(self):
        def run(c):
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> SIZE=10001"),
                             (552, ["5.3.4 Message size exceeds fixed limit"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> SIZE=abc")[1][0][:6], "5.5.4 ")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> SIZE=10000")[0], 250)

        return self.session(run)

    def test_repeatedParameterRefused(self):
        """A keyword given twice is refused, whichever of its values is the bad one: none is guessed."""
        def run(c):
            c.cmd("EHLO x")
            for args in ("SIZE=abc SIZE=100", "SIZE=100 SIZE=abc", "SIZE=10001 SIZE=100", "size=100 SIZE=100",
                         "BODY=BINARYMIME BODY=7BIT", "BODY=7BIT SIZE=10 body=8BITMIME"):
                self.assertEqual(c.cmd("MAIL FROM:<a@example.org> " + args),
                                 (501, ["5.5.4 Syntax: %s given twice" % args.split()[-1].split("=")[0].upper()]),
                                 args)
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>"), (503, ["5.5.1 Error: need MAIL command"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> SIZE=100 BODY=7BIT")[0], 250)

        return self.session(run)

    def test_bodyOverLimitReadToEndAndRefused(self):
        def run(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send(("x" * 99 + "\r\n") * 200 + "MAIL FROM:<evil@example.org>\r\n.\r\n")
            self.assertEqual(c.reply(), (552, ["5.3.4 Error: message too big"]))
            self.assertEqual(c.cmd("NOOP")[0], 250)

        self.session(run)
        self.assertEqual(self.sink.messages, [])

    def test_bodyParameters(self):
        def run(c):
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")[0], 250)
            c.cmd("RSET")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> BODY=7BIT")[0], 250)
            c.cmd("RSET")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")[0:1], (555,))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org> BODY"), (501, ["5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME"]))

        return self.session(run)

    def test_quotedGreaterThanWithParameters(self):
        """A quoted local part holding C{>}, parameters after the path: accepted (was 501 5.1.7 and 5.1.3)."""
        def run(c):
            self.assertEqual(c.cmd('MAIL FROM:<"a>b"@example.org> SIZE=10 BODY=8BITMIME')[0], 250)
            self.assertEqual(c.cmd('RCPT TO:<"x>y"@example.net> NOTIFY=NEVER')[0], 250)

        return self.session(run)


class LimitTests(SessionTestCase):
    listener = {"max_errors": 5, "idle_timeout": 1}

    def test_overlongCommandOneReplyThenContinue(self):
        def run(c):
            c.send("NOOP " + "x" * 5000 + "\r\nNOOP\r\n")
            self.assertEqual(c.reply(), (500, ["5.5.2 Error: line too long"]))
            self.assertEqual(c.reply(), (250, ["2.0.0 Ok"]))

        return self.session(run)

    def test_overlongWithoutNewlineBounded(self):
        def run(c):
            c.send("x" * 200000)
            self.assertEqual(c.reply(), (500, ["5.5.2 Error: line too long"]))
            c.send("\r\nNOOP\r\n")
            self.assertEqual(c.reply(), (250, ["2.0.0 Ok"]))

        return self.session(run)

    def test_bareLFCommandProcessed(self):
        def run(c):
            c.send("NOOP\n")
            self.assertEqual(c.reply(), (250, ["2.0.0 Ok"]))

        return self.session(run)

    def test_tooManyErrors(self):
        def run(c):
            for i in range(4):
                self.assertEqual(c.cmd("BOGUS")[0], 500)
            c.send("BOGUS\r\n")
            self.assertEqual(c.reply()[0], 500)
            code, lines = c.reply()
            self.assertEqual((code, lines[0][:6]), (421, "4.7.0 "))
            self.assertTrue(c.closed())

        return self.session(run)

    def test_idleTimeout(self):
        def run(c):
            self.clock.advance(1)
            code, lines = c.reply()
            self.assertEqual((code, lines[0][:6]), (421, "4.4.2 "))
            self.assertTrue(c.closed())

        return self.session(run)


class EarlyTalkerTests(SessionTestCase):
    listener = {"greet_delay": 0.5}

    def test_inputBeforeGreeting(self):
        c = self.client()
        c.send("EHLO eager\r\n")
        self.clock.advance(0.5)
        code, lines = c.reply()
        self.assertEqual((code, lines[0][:6]), (554, "5.5.0 "))
        self.assertTrue(c.closed())

    def test_inputBeforeGreetingNotReadOn(self):
        """
        A client that talks before the greeting (it is refused 554 whole) is
        read no further past 4 KB while the greeting waits: it held up to
        256 KB, 320 KB a client measured, ten times a client in session.
        """
        c = self.client()
        c.send("x" * 5000)
        self.assertEqual(c.session.transport.producerState, "paused")
        self.clock.advance(0.5)
        self.assertEqual(c.reply()[0], 554)


class OversizeContentTests(GatewayTestCase):
    """
    Content past max_message_size is refused at its end (552 5.3.4): what
    was stored of it goes from the spool as soon as the limit is passed,
    not when the client has sent the rest (a client holding back its final
    dot held the spool's room meanwhile).
    """

    listener = {"relay_networks": ["127.0.0.0/8"], "max_message_size": 300 * 1024}

    def test_storedContentGoesAtTheLimit(self):
        tmp = self.gw.service.spool.path("tmp")

        def run(c):
            c.cmd("EHLO big.example")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send(("x" * 998 + "\r\n") * 400)  # 400 KB, no end yet
            time.sleep(1)
            held = os.listdir(tmp)
            c.send(".\r\n")
            return held, c.reply()

        def check(result):
            held, end = result
            self.assertEqual(held, [])
            self.assertEqual(end[0], 552)
            self.assertEqual(end[1][0][:6], "5.3.4 ")
            self.assertEqual(os.listdir(tmp), [])

        return self.session(run).addCallback(check)


class SmtplibTests(GatewayTestCase):
    """smtplib, a real client, over a loopback socket; the message is delivered through the queue manager."""

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_sendmailArrives(self):
        body = b"Subject: t\r\n\r\n8-bit \xe9\xff body\r\n.leading dot\r\n"

        def run():
            with smtplib.SMTP("127.0.0.1", self.gw.port) as s:
                s.sendmail("a@example.org", ["b@example.net"], body)

        d = inThread(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())

        def check(_):
            msgs = self.gw.delivered()
            self.assertEqual(len(msgs), 1)
            self.assertTrue(msgs[0].endswith(body), msgs[0])
            self.assertIn(b"Received: from [127.0.0.1] (unknown [127.0.0.1])", msgs[0])
            self.assertIn(b"by relay.test (relaygw) with ESMTP id", msgs[0])

        return d.addCallback(check)


class HopCountTests(GatewayTestCase):
    """
    A message whose Received headers, with the one this hop adds, reach
    hopcount_limit (50, Postfix's) is refused 554 5.4.6 at its end: a mail
    loop (two relays sending to each other) ends there instead of going
    round for ever.
    """

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_loopRefused(self):
        def message(hops):
            header = "".join("Received: from h%d.example\r\n\tby h%d.example; date\r\n" % (n, n + 1)
                             for n in range(hops))
            return header + "Subject: hops\r\n\r\nReceived: in the body is no hop\r\n"

        def run(c):
            replies = []
            self.assertEqual(c.cmd("EHLO x")[0], 250)
            for hops in (49, 48):
                self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)
                self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
                self.assertEqual(c.cmd("DATA")[0], 354)
                c.send(message(hops).encode() + b".\r\n")
                replies.append(c.reply())
            deadline = time.monotonic() + 10
            while self.gw.service.spool.queueIds() and time.monotonic() < deadline:
                time.sleep(0.05)
            return replies, self.gw.delivered()

        def check(result):
            replies, delivered = result
            self.assertEqual(replies[0], (554, ["5.4.6 Error: too many hops (a mail loop?)"]))
            self.assertEqual(replies[1][0], 250)
            [message] = delivered  # the one with 48
            self.assertEqual(message.count(b"\nReceived: from h"), 48)

        return self.session(run).addCallback(check)


class ClientValueRefusalsTests(GatewayTestCase):
    """The refusals of a greeting name over 255 octets and of a path that is a source route alone, over a socket."""

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_exactReplies(self):
        name = ("b" * 62 + ".") * 4 + "abcd"  # 256 octets

        def run(c):
            return [c.cmd("EHLO " + name), c.cmd("HELO " + name), c.cmd("EHLO " + name[:-1]),
                    c.cmd("MAIL FROM:<@relay.example:>"), c.cmd("MAIL FROM:<a@example.org>"),
                    c.cmd("RCPT TO:<@relay.example,@b.example:>")]

        def check(replies):
            self.assertEqual(replies, [
                (501, ["5.5.4 Syntax: EHLO hostname of at most 255 octets"]),
                (501, ["5.5.4 Syntax: HELO hostname of at most 255 octets"]),
                (250, replies[2][1]),
                (501, ["5.1.7 Bad sender address syntax"]),
                (250, ["2.1.0 Ok"]),
                (501, replies[5][1]),
            ])
            self.assertTrue(replies[5][1][0].startswith("5.1.3 "), replies[5])

        return self.session(run).addCallback(check)


class ReceivedDateTests(GatewayTestCase):
    """
    The Received header's date-time (RFC 5321 section 4.4) has RFC 5322's
    numeric zone: "GMT" is obs-zone, which RFC 5322 section 4 says MUST NOT
    be generated.
    """

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_numericZone(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.gw.port) as s:
                s.sendmail("a@example.org", ["b@example.net"], b"Subject: date\r\n\r\nbody\r\n")

        def check(_):
            [message] = self.gw.delivered()
            header = message[:message.index(b"Subject: date")]
            self.assertRegex(header, rb"for <b@example\.net>; [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} "
                                     rb"\d\d:\d\d:\d\d \+0000\r\n\Z")

        d = inThread(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())
        return d.addCallback(check)
