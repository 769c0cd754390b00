"""
Text logs cannot be forged: every value a client controls reaches the text
log escaped, one event per line, over real loopback sockets for each source
(AUTH username, client certificate subject, XCLIENT, XSETCONTEXT).
"""

import io
import os
import ssl

from cryptography import x509
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from relaygw import logs
from relaygw.auth import PasswordFile
from relaygw.testing import Client, Gateway, inThread
from relaygw.tls import generateSelfSigned
from tests.authexchange import b64
from tests.tlsmaterial import CA, altNames, certificate, commonName, newKey, writePEM

#: A fake event and a terminal escape (clear screen), as an attacker sends them.
FORGED = "2026-12-02T20:10:00Z info [relaygw.smtp] [deadbeef0000] authenticated as admin"
PAYLOAD = "x\n" + FORGED + "\x1b[2J\r\x00"


class EscapeTests(unittest.TestCase):
    def test_everyNonPrintableEscaped(self):
        self.assertEqual(logs.escape("a\nb\rc\td\x1b[2J\x00\x7f\x85\u2028é"),
                         "a\\nb\\rc\\td\\x1b[2J\\x00\\x7f\\x85\\u2028é")

    def test_printableUnchanged(self):
        text = "[abc] refused: 554 5.7.1 <b@example.net>: Relay access denied"
        self.assertIs(logs.escape(text), text)

    def test_fieldsAndTracebackCannotStartALine(self):
        out = io.StringIO()
        observer = logs.textLinesObserver(out)
        try:
            raise ValueError("bad\n" + FORGED)
        except ValueError:
            failure = Failure()
        observer({"log_level": LogLevel.error, "log_namespace": "relaygw.smtp\n", "log_time": 0.0,
                  "log_format": "[{session}] user {user}", "session": "S\r", "user": PAYLOAD,
                  "log_failure": failure})
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("1970-01-01T00:00:00Z error [relaygw.smtp\\n] [S\\r] user x\\n"))
        self.assertTrue(all(line.startswith("    ") for line in lines[1:]), lines)
        self.assertTrue(len(lines) > 2)
        self.assertFalse(any(FORGED in line and not line.startswith("    ") for line in lines[1:]))


def issueClientCertificate(directory, cn):
    """A CA file, and a client certificate + key it issued with subject CN C{cn} for lb1.example.net."""
    caKey, key = newKey(), newKey()
    caName = commonName("Log CA")
    caCert = certificate(caName, caName, caKey, caKey, 3, CA)
    cert = certificate(commonName(cn), caName, key, caKey, 3, altNames(x509.DNSName("lb1.example.net")))
    paths = [os.path.join(directory, n) for n in ("ca.pem", "client.pem", "client.key")]
    for path, item in zip(paths, (caCert, cert, key)):
        writePEM(path, item)
    return paths


class ForgingOverTheWireTests(unittest.TestCase):
    """A gateway on loopback whose text log is captured for each test."""

    @defer.inlineCallbacks
    def startGateway(self, **listener):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.directory = directory
        self.out = io.StringIO()
        observer = logs.textLinesObserver(self.out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.gw = Gateway(directory, listeners=(listener,))
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def client(self):
        c = Client(self.gw.port)
        self.addCleanup(c.close)
        self.assertEqual(c.reply()[0], 220)
        return c

    def assertNotForged(self, escaped):
        """Every logged line is a real event; the payload shows up escaped, never raw."""
        text = self.out.getvalue()
        for raw in ("\x1b", "\r", "\x00"):
            self.assertNotIn(raw, text)
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \w+ \[|^    ")
            self.assertFalse(line.startswith(FORGED), line)
        self.assertIn(escaped, text)

    @defer.inlineCallbacks
    def test_authUsername(self):
        users = os.path.abspath(self.mktemp())
        PasswordFile(users).set("alice", "s3cret")
        yield self.startGateway(credentials=users, auth_plaintext=True)

        def run():
            c = self.client()
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("AUTH LOGIN"), (334, ["VXNlcm5hbWU6"]))
            self.assertEqual(c.cmd(b64(PAYLOAD))[0], 334)
            self.assertEqual(c.cmd(b64("wrong"))[0], 535)

        yield inThread(run)
        self.assertNotForged("authentication failed for x\\n" + FORGED + "\\x1b[2J\\r\\x00")

    @defer.inlineCallbacks
    def test_clientCertificateSubject(self):
        tlsdir = os.path.abspath(self.mktemp())
        os.makedirs(tlsdir)
        # A common name has at most 64 characters: a shorter fake line.
        ca, cert, key = issueClientCertificate(tlsdir, "x\n2026-12-02T20:10:00Z info [relaygw] admin\x1b[2J\r")
        serverCert, serverKey = os.path.join(tlsdir, "cert.pem"), os.path.join(tlsdir, "key.pem")
        generateSelfSigned(serverCert, serverKey, "relay.test")
        yield self.startGateway(tls_certificate=serverCert, tls_key=serverKey, tls_client_ca=ca,
                                tls_client_identities=["dns:lb1.example.net"])

        def run():
            c = self.client()
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("STARTTLS")[0], 220)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.load_cert_chain(cert, key)
            c.sock = ctx.wrap_socket(c.sock, server_hostname="relay.test")
            self.assertEqual(c.cmd("NOOP")[0], 250)

        yield inThread(run)
        self.assertNotForged("trusted by client certificate CN=x\\n2026-12-02T20:10:00Z info [relaygw] admin\\x1b[2J\\r")

    @defer.inlineCallbacks
    def test_xclientValues(self):
        yield self.startGateway(trusted_peers=["127.0.0.0/8"], extensions=["xclient"])

        def run():
            c = self.client()
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("XCLIENT \x1b[2J\x00")[0], 501)
            self.assertEqual(c.cmd("XCLIENT HELO=x+0A2026-12-02T20:10:00Z+1B[2J")[0], 501)

        yield inThread(run)
        self.assertNotForged("XCLIENT from [127.0.0.1] refused: bad attribute \\x1b[2J\\x00")

    @defer.inlineCallbacks
    def test_xsetcontextValues(self):
        yield self.startGateway(trusted_peers=["127.0.0.0/8"], extensions=["xsetcontext"])

        def run():
            c = self.client()
            c.cmd("EHLO x")
            c.cmd("XSETCONTEXT binding=x+0A2026-12-02T20:10:00Z+1B[2J+0D")
            self.assertEqual(c.cmd("XSETCONTEXT bad\x1b[2J\x00")[0], 501)

        yield inThread(run)
        self.assertNotForged("XSETCONTEXT from [127.0.0.1] refused: bad pair bad\\x1b[2J\\x00")
        self.assertNotIn("\n2026-12-02T20:10:00Z", self.out.getvalue())
