"""
AUTH (RFC 4954, checklist 51-55) and ALWAYS-ALLOW on sessions without
sockets (after STARTTLS with a real TLS handshake in memory), and swaks
-tls -a as a real client over a loopback socket.
"""

import os
import shutil
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from relaygw.auth import PasswordFile
from relaygw.testing import inThread
from tests.authexchange import authReply, b64
from tests.recorders import LogCapture
from tests.sessions import SessionTestCase, TLSGatewayTestCase, TLSSessionTestCase, overASocket


def passwordFile(testcase):
    users = os.path.abspath(testcase.mktemp())
    PasswordFile(users).set("alice", "s3cret")
    return users


class AuthTestCase(TLSSessionTestCase):
    extra = {}

    def setUp(self):
        self.tlsListener = dict({"credentials": passwordFile(self)}, **self.extra)
        TLSSessionTestCase.setUp(self)

    def plainClient(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        return c

    def tlsClient(self):
        """A client after EHLO, STARTTLS and EHLO again, AUTH offered."""
        c = self.plainClient()
        c.cmd("EHLO x")
        self.starttls(c)
        code, lines = c.cmd("EHLO x")
        self.assertIn("AUTH PLAIN LOGIN", lines)
        return c

    def auth(self, c, line):
        return authReply(self.harness, c, line)


class AuthTests(AuthTestCase):
    realSpool = True

    @defer.inlineCallbacks
    def test_plaintextRefused(self):
        c = self.plainClient()
        self.assertNotIn("AUTH PLAIN LOGIN", c.cmd("EHLO x")[1])
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret"))),
                         (538, ["5.7.11 Encryption required for requested authentication mechanism"]))

    @defer.inlineCallbacks
    def test_plainSuccessAllowsRelay(self):
        c = self.tlsClient()
        c.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)
        c.cmd("RSET")
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret"))),
                         (235, ["2.7.0 Authentication successful"]))
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret"))),
                         (503, ["5.5.1 Error: already authenticated"]))
        c.cmd("MAIL FROM:<a@example.org> AUTH=<>")
        self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
        c.cmd("DATA")
        c.send("Subject: auth\r\n\r\nx\r\n.\r\n")
        self.assertEqual((yield c.whenReply())[0], 250)
        [(_, stored)] = self.spooled()
        self.assertRegex(stored.decode(), r"with ESMTPSA \(TLSv1\.[23] \S+\) id ")
        # The login stays out of the trace header (received_shows_login = false).
        self.assertNotIn(b"alice", stored)

    @defer.inlineCallbacks
    def test_plainChallengeAndBadPassword(self):
        c = self.tlsClient()
        self.assertEqual(c.cmd("AUTH PLAIN"), (334, [""]))
        self.assertEqual((yield self.auth(c, b64("\0alice\0wrong"))), (535, ["5.7.8 Error: authentication failed"]))
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0nobody\0s3cret")))[0], 535)

    @defer.inlineCallbacks
    def test_loginMechanism(self):
        c = self.tlsClient()
        self.assertEqual(c.cmd("AUTH LOGIN"), (334, ["VXNlcm5hbWU6"]))
        self.assertEqual(c.cmd(b64("alice")), (334, ["UGFzc3dvcmQ6"]))
        self.assertEqual((yield self.auth(c, b64("s3cret")))[0], 235)

    @defer.inlineCallbacks
    def test_refusals(self):
        c = self.tlsClient()
        c.cmd("AUTH LOGIN")
        self.assertEqual(c.cmd("*"), (501, ["5.7.0 Authentication aborted"]))
        self.assertEqual(c.cmd("AUTH PLAIN !!!notbase64"), (501, ["5.5.2 Cannot decode response"]))
        self.assertEqual(c.cmd("AUTH CRAM-MD5"), (504, ["5.5.4 Unsupported authentication mechanism"]))
        self.assertEqual(c.cmd("AUTH")[1][0][:6], "5.5.4 ")
        c.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret")))[0], 503)

    def test_longAuthLine(self):
        c = self.tlsClient()
        c.cmd("AUTH PLAIN")
        self.assertEqual(c.cmd("A" * 13000), (500, ["5.5.6 Authentication exchange line is too long"]))

    @defer.inlineCallbacks
    def test_manyFailuresDisconnect(self):
        c = self.tlsClient()
        codes = []
        for i in range(5):
            codes.append((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0bad%d" % i)))[0])
        self.assertEqual(codes[:4], [535] * 4)
        self.assertEqual(codes[4], 421)
        self.assertTrue(c.closed())


class SwaksTests(TLSGatewayTestCase):
    """
    swaks, a real client, over a loopback socket: its own STARTTLS (a TLS
    handshake by Perl's IO::Socket::SSL) and AUTH PLAIN, and the message
    delivered through the queue manager.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.tlsListener = {"credentials": passwordFile(self)}
        yield TLSGatewayTestCase.setUp(self)

    def test_swaksTLSAuth(self):
        swaks = shutil.which("swaks")
        self.assertTrue(swaks, "swaks is not installed (make test installs it)")

        def run():
            return subprocess.run(
                [swaks, "--server", "127.0.0.1:%d" % self.gw.port, "--tls", "-a", "PLAIN",
                 "--auth-user", "alice", "--auth-password", "s3cret", "--from", "a@example.org",
                 "--to", "b@example.net", "--header", "Subject: swaks-auth"],
                capture_output=True, timeout=60, text=True)

        def check(p):
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertIn("235 2.7.0", p.stdout)
            return self.gw.service.queue.whenIdle()

        d = inThread(run).addCallback(check)
        d.addCallback(lambda _: self.assertIn(b"with ESMTPSA", self.gw.delivered()[0]))
        return d


class PlaintextAuthTests(AuthTestCase):
    extra = {"auth_plaintext": True}

    @defer.inlineCallbacks
    def test_authWithoutTLSAllowed(self):
        c = self.plainClient()
        self.assertIn("AUTH PLAIN LOGIN", c.cmd("EHLO x")[1])
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret")))[0], 235)

    @defer.inlineCallbacks
    def test_unreadablePasswordFile(self):
        """
        A password file rewritten with a byte that is not UTF-8 is the
        server's problem: 454 4.7.0, and one error line naming the file,
        not a critical traceback.
        """
        logs = LogCapture(self)
        with open(self.tlsListener["credentials"], "ab") as f:
            f.write(b"j\xf6rg:x\n")
        c = self.plainClient()
        c.cmd("EHLO x")
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret"))),
                         (454, ["4.7.0 Temporary authentication failure"]))
        [event] = logs.find("auth backend error")
        self.assertNotIn("log_failure", event)
        self.assertIn("is not UTF-8", str(event["why"]))


class UnreadablePasswordFileSocketTests(unittest.TestCase):
    """The same over a loopback socket, against a gateway in the test's reactor."""

    @defer.inlineCallbacks
    def test_authAnswered454(self):
        users = passwordFile(self)
        with open(users, "ab") as f:
            f.write(b"j\xf6rg:x\n")
        logs = LogCapture(self)

        def talk(c):
            c.cmd("EHLO x")
            return c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))

        reply, _ = yield overASocket(self, talk, credentials=users, auth_plaintext=True)
        self.assertEqual(reply, (454, ["4.7.0 Temporary authentication failure"]))
        self.assertEqual([e for e in logs.events if "log_failure" in e], [])


class AlwaysAllowTests(SessionTestCase):
    listener = {"always_allow": True}
    realSpool = True

    @defer.inlineCallbacks
    def test_anonymousWithoutAuth(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        code, lines = c.cmd("EHLO x")
        self.assertFalse(any(l.startswith("AUTH") for l in lines))
        c.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
        c.cmd("DATA")
        c.send("Subject: anon\r\n\r\nx\r\n.\r\n")
        self.assertEqual((yield c.whenReply())[0], 250)
        [(_, stored)] = self.spooled()
        # Relayed, but no SMTP AUTH succeeded (RFC 3848's A): it logged in nobody.
        self.assertIn(b"with ESMTP id", stored)
        self.assertNotIn(b"anonymous", stored)

    @defer.inlineCallbacks
    def test_authCommandStaysAnonymous(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.cmd("EHLO x")
        self.assertEqual((yield authReply(self.harness, c, "AUTH PLAIN " + b64("\0mallory\0x"))),
                         (503, ["5.5.1 Error: already authenticated"]))
        self.assertEqual(self.harness.factory.sessions.copy().pop().context["auth_user"], "anonymous")


class AlwaysAllowContextTests(SessionTestCase):
    listener = {"always_allow": True, "trusted_peers": ["127.0.0.0/8"], "extensions": ["xdumpcontext"]}

    def test_contextShowsAnonymous(self):
        def run(c):
            code, lines = c.cmd("XDUMPCONTEXT")
            self.assertIn("2.0.0 [connection] auth_user anonymous", lines)
            self.assertIn("2.0.0 [connection] auth_name ALWAYS-ALLOW", lines)

        return self.session(run)


class SASLResponseLimitTests(AuthTestCase):
    """
    A SASL response may be up to 12288 octets (RFC 4954 section 4,
    Postfix's smtpd_sasl_response_limit) on a listener whose commands are
    limited to 512; the AUTH command line itself keeps the 512.
    """

    extra = {"max_line_length": 512}

    @defer.inlineCallbacks
    def test_longResponseRead(self):
        c = self.tlsClient()
        response = b64("\0alice\0" + "p" * 700)  # 944 octets
        self.assertEqual(c.cmd("AUTH PLAIN"), (334, [""]))
        # Read whole and checked (the password is wrong), not refused as a line.
        self.assertEqual((yield self.auth(c, response)), (535, ["5.7.8 Error: authentication failed"]))
        self.assertEqual(c.cmd("AUTH PLAIN " + response), (500, ["5.5.2 Error: line too long"]))
        self.assertEqual(c.cmd("AUTH LOGIN"), (334, ["VXNlcm5hbWU6"]))
        self.assertEqual(c.cmd("A" * 13000), (500, ["5.5.6 Authentication exchange line is too long"]))
        # The exchange over, commands are limited to 512 again.
        self.assertEqual(c.cmd("NOOP " + "x" * 600), (500, ["5.5.2 Error: line too long"]))
        self.assertEqual((yield self.auth(c, "AUTH PLAIN " + b64("\0alice\0s3cret")))[0], 235)


class MalformedPlainSocketTests(unittest.TestCase):
    """
    RFC 4954 section 4: 501 5.5.2 is for a response that cannot be base64
    decoded; a PLAIN response that decodes but is no valid RFC 4616
    message (an empty one, "=", a missing part, an empty password) fails
    the authentication, 535 5.7.8, as Postfix (Cyrus SASL) answers it.
    """

    @defer.inlineCallbacks
    def test_decodedButMalformed(self):
        def talk(c):
            c.cmd("EHLO x")
            replies = [c.cmd("AUTH PLAIN " + response) for response in
                       ("=", b64("alice\0s3cret"), b64("\0alice\0"), b64("a\0b\0c\0d"))]
            c.cmd("AUTH PLAIN")
            replies.append(c.cmd("="))
            replies.append(c.cmd("AUTH PLAIN !!!notbase64"))
            replies.append(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret")))
            return replies

        replies, _ = yield overASocket(self, talk, credentials=passwordFile(self), auth_plaintext=True)
        self.assertEqual(replies[:5], [(535, ["5.7.8 Error: authentication failed"])] * 5)
        self.assertEqual(replies[5], (501, ["5.5.2 Cannot decode response"]))
        # No password was tried: the right one still logs in.
        self.assertEqual(replies[6], (235, ["2.7.0 Authentication successful"]))
