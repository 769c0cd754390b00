"""
AUTH over real loopback sockets (RFC 4954, checklist 51-55), ALWAYS-ALLOW,
and swaks -tls -a as a real client.
"""

import base64
import os
import shutil
import subprocess

from twisted.internet import defer

from relaygw.auth import PasswordFile
from relaygw.testing import inThread
from tests.helpers import GatewayTestCase, TLSGatewayTestCase


def b64(text):
    return base64.b64encode(text.encode()).decode()


class AuthTestCase(TLSGatewayTestCase):
    extra = {}

    @defer.inlineCallbacks
    def setUp(self):
        users = os.path.abspath(self.mktemp())
        PasswordFile(users).set("alice", "s3cret")
        self.tlsListener = dict({"credentials": users}, **self.extra)
        yield TLSGatewayTestCase.setUp(self)

    def tlsSession(self, f):
        def run(c):
            c.cmd("EHLO x")
            self.starttls(c)
            code, lines = c.cmd("EHLO x")
            self.assertIn("AUTH PLAIN LOGIN", lines)
            return f(c)

        return self.session(run)


class AuthTests(AuthTestCase):
    def test_plaintextRefused(self):
        def run(c):
            self.assertNotIn("AUTH PLAIN LOGIN", c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret")),
                             (538, ["5.7.11 Encryption required for requested authentication mechanism"]))

        return self.session(run)

    def test_plainSuccessAllowsRelay(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)
            c.cmd("RSET")
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret")), (235, ["2.7.0 Authentication successful"]))
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret")), (503, ["5.5.1 Error: already authenticated"]))
            c.cmd("MAIL FROM:<a@example.org> AUTH=<>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
            c.cmd("DATA")
            c.send("Subject: auth\r\n\r\nx\r\n.\r\n")
            self.assertEqual(c.reply()[0], 250)

        d = self.tlsSession(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())
        d.addCallback(lambda _: self.assertRegex(self.gw.delivered()[0].decode(),
                                                 r"with ESMTPSA \(TLSv1\.[23] \S+\) id "))
        # The login stays out of the trace header (received_shows_login = false).
        d.addCallback(lambda _: self.assertNotIn(b"alice", self.gw.delivered()[0]))
        return d

    def test_plainChallengeAndBadPassword(self):
        def run(c):
            self.assertEqual(c.cmd("AUTH PLAIN"), (334, [""]))
            self.assertEqual(c.cmd(b64("\0alice\0wrong")), (535, ["5.7.8 Error: authentication failed"]))
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0nobody\0s3cret"))[0], 535)

        return self.tlsSession(run)

    def test_loginMechanism(self):
        def run(c):
            self.assertEqual(c.cmd("AUTH LOGIN"), (334, ["VXNlcm5hbWU6"]))
            self.assertEqual(c.cmd(b64("alice")), (334, ["UGFzc3dvcmQ6"]))
            self.assertEqual(c.cmd(b64("s3cret"))[0], 235)

        return self.tlsSession(run)

    def test_refusals(self):
        def run(c):
            c.cmd("AUTH LOGIN")
            self.assertEqual(c.cmd("*"), (501, ["5.7.0 Authentication aborted"]))
            self.assertEqual(c.cmd("AUTH PLAIN !!!notbase64"), (501, ["5.5.2 Cannot decode response"]))
            self.assertEqual(c.cmd("AUTH CRAM-MD5"), (504, ["5.5.4 Unsupported authentication mechanism"]))
            self.assertEqual(c.cmd("AUTH")[1][0][:6], "5.5.4 ")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))[0], 503)

        return self.tlsSession(run)

    def test_longAuthLine(self):
        def run(c):
            c.cmd("AUTH PLAIN")
            self.assertEqual(c.cmd("A" * 5000), (500, ["5.5.6 Authentication exchange line is too long"]))

        return self.tlsSession(run)

    def test_manyFailuresDisconnect(self):
        def run(c):
            codes = [c.cmd("AUTH PLAIN " + b64("\0alice\0bad%d" % i))[0] for i in range(5)]
            self.assertEqual(codes[:4], [535] * 4)
            self.assertEqual(codes[4], 421)
            self.assertTrue(c.closed())

        return self.tlsSession(run)

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

    def test_authWithoutTLSAllowed(self):
        def run(c):
            self.assertIn("AUTH PLAIN LOGIN", c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0alice\0s3cret"))[0], 235)

        return self.session(run)


class AlwaysAllowTests(GatewayTestCase):
    listener = {"always_allow": True}

    def test_anonymousWithoutAuth(self):
        def run(c):
            code, lines = c.cmd("EHLO x")
            self.assertFalse(any(l.startswith("AUTH") for l in lines))
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
            c.cmd("DATA")
            c.send("Subject: anon\r\n\r\nx\r\n.\r\n")
            self.assertEqual(c.reply()[0], 250)

        d = self.session(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())
        d.addCallback(lambda _: self.assertIn(b"with ESMTPA id", self.gw.delivered()[0]))
        d.addCallback(lambda _: self.assertNotIn(b"anonymous", self.gw.delivered()[0]))
        return d

    def test_authCommandStaysAnonymous(self):
        def run(c):
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("AUTH PLAIN " + b64("\0mallory\0x")), (503, ["5.5.1 Error: already authenticated"]))
            self.assertEqual(self.gw.service.factories[0].sessions.copy().pop().context["auth_user"], "anonymous")

        return self.session(run)


class AlwaysAllowContextTests(GatewayTestCase):
    listener = {"always_allow": True, "trusted_peers": ["127.0.0.0/8"], "extensions": ["xdumpcontext"]}

    def test_contextShowsAnonymous(self):
        def run(c):
            code, lines = c.cmd("XDUMPCONTEXT")
            self.assertIn("2.0.0 [connection] auth_user anonymous", lines)
            self.assertIn("2.0.0 [connection] auth_name ALWAYS-ALLOW", lines)

        return self.session(run)
