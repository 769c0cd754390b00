"""
STARTTLS and implicit TLS (RFC 3207, checklist 44-50), certificate reload
and client-certificate trust.  The session's own STARTTLS behaviour runs
without sockets, with a real TLS handshake in memory (TLSSessionTestCase);
real clients, implicit TLS, reload and client certificates over loopback
sockets.
"""

import os
import shutil
import smtplib
import socket
import ssl
import subprocess

from twisted.internet import defer
from twisted.trial import unittest
from twisted.mail import smtp

from relaygw.config import load as loadConfig
from relaygw.testing import Client, Gateway, configText, inThread
from relaygw.tls import generateSelfSigned
from tests.recorders import LogCapture
from tests.sessions import SessionTestCase, TLSGatewayTestCase, TLSSessionTestCase
from tests.tlsmaterial import clientContext, makeCA


class StartTLSTests(TLSSessionTestCase):
    tlsListener = {"relay_networks": ["127.0.0.0/8"]}

    def test_advertisedAndArgumentRefused(self):
        def run(c):
            self.assertIn("STARTTLS", c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("STARTTLS now"), (501, ["5.5.4 Syntax: STARTTLS"]))

        return self.session(run)

    def test_afterTLSStateResetAndNoSecondStartTLS(self):
        def run(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            self.starttls(c)
            # The transaction is gone (checklist 48) ...
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 503)
            code, lines = c.cmd("EHLO x")
            self.assertNotIn("STARTTLS", lines)
            self.assertEqual(c.cmd("STARTTLS"), (503, ["5.5.1 Error: TLS already active"]))

        return self.session(run)

    def test_plaintextInjectionDiscarded(self):
        def run(c):
            c.cmd("EHLO x")
            c.send("STARTTLS\r\nHELP\r\n")
            self.assertEqual(c.reply()[0], 220)
            c.starttls(clientContext())
            # The injected HELP must never be answered: the next reply is NOOP's.
            self.assertEqual(c.cmd("NOOP"), (250, ["2.0.0 Ok"]))
            self.assertEqual((c.replies(), c.buf), ([], b""))

        return self.session(run)


class StartTLSClientTests(TLSGatewayTestCase):
    """
    STARTTLS from real clients over loopback sockets (smtplib, Twisted's
    ESMTP client, openssl s_client: their own TLS stacks and certificate
    checks, and the message delivered through the queue manager), and a
    failed handshake, which must close the TCP connection and leave the
    listener serving.
    """

    tlsListener = {"relay_networks": ["127.0.0.0/8"]}

    def test_smtplibStartTLSDeliversESMTPS(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.gw.port) as s:
                s.starttls(context=clientContext())
                s.sendmail("a@example.org", ["b@example.net"], b"Subject: tls\r\n\r\nsecret\r\n")

        d = inThread(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())

        def check(_):
            [msg] = self.gw.delivered()
            self.assertRegex(msg.decode(), r"with ESMTPS \(TLSv1\.[23] [A-Z0-9_-]+\)")

        return d.addCallback(check)

    def test_twistedClientRequiringTLS(self):
        from io import BytesIO

        from twisted.internet import reactor
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        with open(self.cert) as f:
            trust = Certificate.loadPEM(f.read())
        d = defer.Deferred()
        factory = smtp.ESMTPSenderFactory(
            None, None, "a@example.org", ["b@example.net"], BytesIO(b"Subject: twisted\r\n\r\nvia twisted\r\n"),
            d, retries=0, contextFactory=optionsForClientTLS("relay.test", trustRoot=trust),
            requireAuthentication=False, requireTransportSecurity=True)
        reactor.connectTCP("127.0.0.1", self.gw.port, factory)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())

        def check(_):
            [msg] = self.gw.delivered()
            self.assertIn(b"with ESMTPS", msg)
            self.assertIn(b"via twisted", msg)

        return d.addCallback(check)

    def test_handshakeFailureDropsCleanly(self):
        def run(c):
            c.cmd("EHLO x")
            c.cmd("STARTTLS")
            c.send(b"\x16\x03\x01\x00\x05garbage-not-tls\r\n" * 3)
            self.assertTrue(c.closed())
            # The gateway still serves new sessions.
            c2 = self.client()
            self.assertEqual(c2.reply()[0], 220)

        return self.session(run)

    def test_errorAfterTheHandshakeIsNoHandshakeFailure(self):
        log = LogCapture(self)

        def run(c):
            c.cmd("EHLO x")
            c.cmd("STARTTLS")
            tls = clientContext().wrap_socket(c.sock, server_hostname="relay.test")
            tls.sendall(b"NOOP\r\n")
            self.assertEqual(tls.recv(100)[:3], b"250")
            # A record the session keys cannot have made: the connection ends.
            raw = socket.socket(fileno=os.dup(tls.fileno()))
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            raw.settimeout(5)
            while raw.recv(4096):
                pass
            raw.close()
            tls.close()

        def check(_):
            self.assertEqual(log.find("TLS handshake failed"), [])
            [event] = log.find("TLS error")
            self.assertIn("bad record mac", event["why"].lower())

        return self.session(run).addCallback(check)

    def test_opensslStartTLS(self):
        openssl = shutil.which("openssl")
        self.assertTrue(openssl, "openssl is not installed (make test installs it)")
        def run():
            p = subprocess.run([openssl, "s_client", "-starttls", "smtp", "-connect",
                                "127.0.0.1:%d" % self.gw.port, "-servername", "relay.test", "-quiet"],
                               input=b"EHLO openssl\r\nQUIT\r\n", capture_output=True, timeout=30)
            return p

        def check(p):
            out = p.stdout.decode("latin-1")
            self.assertIn("250-relay.test", out)
            self.assertIn("221 2.0.0", out)
            self.assertIn("CN = relay.test", p.stderr.decode("latin-1"))

        return inThread(run).addCallback(check)


class NoCertificateTests(SessionTestCase):
    def test_startTLSUnavailable(self):
        def run(c):
            self.assertNotIn("STARTTLS", c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("STARTTLS"), (454, ["4.7.0 TLS not available due to temporary reason"]))

        return self.session(run)


class RequireTLSTests(TLSSessionTestCase):
    tlsListener = {"require_tls": True, "trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"]}

    def test_mailBeforeTLSRefused(self):
        def run(c):
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>"), (530, ["5.7.0 Must issue a STARTTLS command first"]))
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.5")[0], 220)
            self.starttls(c)
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)

        return self.session(run)


class ImplicitTLSTests(TLSGatewayTestCase):
    """
    Implicit TLS over a loopback socket: the listener's own TLS wrapper
    (which the session harness does not build) greets inside TLS, and the
    message is delivered through the queue manager.
    """

    tlsListener = {"implicit_tls": True, "relay_networks": ["127.0.0.0/8"]}

    def test_greetingInsideTLS(self):
        def run():
            raw = socket.create_connection(("127.0.0.1", self.gw.port), timeout=10)
            c = Client.__new__(Client)
            c.sock = clientContext().wrap_socket(raw, server_hostname="relay.test")
            c.buf = b""
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            code, lines = c.cmd("EHLO x")
            self.assertNotIn("STARTTLS", lines)
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            c.send("Subject: implicit\r\n\r\nx\r\n.\r\n")
            self.assertEqual(c.reply()[0], 250)

        d = inThread(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())
        d.addCallback(lambda _: self.assertIn(b"with ESMTPS", self.gw.delivered()[0]))
        return d


class SharedSelfSignedTests(unittest.TestCase):
    """
    An implicit TLS port and a STARTTLS port sharing one generated pair:
    the listener naming the files without C{tls_self_signed} comes first,
    and the pair does not exist yet.
    """

    @defer.inlineCallbacks
    def test_generatedOnceForBoth(self):
        directory = os.path.abspath(self.mktemp())
        pair = {"tls_certificate": os.path.join(directory, "tls", "cert.pem"),
                "tls_key": os.path.join(directory, "tls", "key.pem")}
        config = configText(directory, listeners=(dict(pair), dict(pair, tls_self_signed=True, implicit_tls=True)))
        os.makedirs(directory)
        path = os.path.join(directory, "relaygw.toml")
        with open(path, "w") as f:
            f.write(config)
        # The check that start and --check-config run (before: "cannot read .../cert.pem").
        self.assertTrue(all(l.tls_self_signed for l in loadConfig(path, environment=True).listeners))
        gw = Gateway(directory, listeners=(dict(pair), dict(pair, tls_self_signed=True, implicit_tls=True)))
        yield gw.start()
        self.addCleanup(gw.stop)

        def run():
            with smtplib.SMTP("127.0.0.1", gw.ports[0]) as s:
                s.starttls(context=clientContext())
                starttls = s.sock.getpeercert(binary_form=True)
            with socket.create_connection(("127.0.0.1", gw.ports[1])) as raw:
                with clientContext().wrap_socket(raw) as tls:
                    return starttls, tls.getpeercert(binary_form=True), tls.recv(100)

        starttls, implicit, greeting = yield inThread(run)
        with open(pair["tls_certificate"]) as f:
            self.assertEqual(starttls, ssl.PEM_cert_to_DER_cert(f.read()))
        self.assertEqual(implicit, starttls)
        self.assertEqual(greeting[:4], b"220 ")


class ReloadTests(TLSGatewayTestCase):
    """The certificate a real TLS client is shown over a loopback socket, before and after a reload."""

    def peerCertificate(self):
        def run():
            c = self.client()
            c.reply()
            c.cmd("EHLO x")
            self.starttls(c)
            return c.sock.getpeercert(binary_form=True)

        return inThread(run)

    @defer.inlineCallbacks
    def test_reloadServesNewCertificate(self):
        before = yield self.peerCertificate()
        os.unlink(self.cert)
        os.unlink(self.key)
        generateSelfSigned(self.cert, self.key, "relay.test")
        self.gw.service.reload()
        after = yield self.peerCertificate()
        self.assertNotEqual(before, after)
        with open(self.cert, "rb") as f:
            self.assertEqual(after, ssl.PEM_cert_to_DER_cert(f.read().decode()))


class ClientCertificateTrustTests(TLSGatewayTestCase):
    """Client certificates checked in real handshakes over loopback sockets (ssl clients presenting them)."""

    @defer.inlineCallbacks
    def setUp(self):
        cadir = os.path.abspath(self.mktemp())
        self.ca, self.issue = makeCA(cadir)
        self.good = self.issue("lb1", "lb1.example.net")
        self.other = self.issue("lb9", "lb9.example.net")
        _, foreignIssue = makeCA(os.path.join(cadir, "foreign"), "Foreign CA")
        self.foreign = foreignIssue("lbx", "lb1.example.net")
        self.tlsListener = {"tls_client_ca": self.ca, "tls_client_identities": ["dns:lb1.example.net"],
                            "extensions": ["xclient"], "trusted_peers": []}
        yield TLSGatewayTestCase.setUp(self)

    def trustedWith(self, cert):
        def run():
            c = self.client()
            c.reply()
            c.cmd("EHLO x")
            self.starttls(c, cert)
            lines = c.cmd("EHLO x")[1]
            return any(l.startswith("XCLIENT") for l in lines), c.cmd("XCLIENT ADDR=192.0.2.9")[0]

        return inThread(run)

    @defer.inlineCallbacks
    def test_trustOnlyForAllowedIdentityFromTheCA(self):
        self.assertEqual((yield self.trustedWith(self.good)), (True, 220))
        self.assertEqual((yield self.trustedWith(self.other)), (False, 550))
        self.assertEqual((yield self.trustedWith(self.foreign)), (False, 550))
        self.assertEqual((yield self.trustedWith(None)), (False, 550))

    @defer.inlineCallbacks
    def test_certificateCryptographyCannotParse(self):
        """
        A client certificate that OpenSSL accepts but cryptography cannot
        parse (an underscore in a PrintableString subject), from the client
        CA for the allowed name: the session goes on, untrusted, and the
        refusal is logged.  Before, the end of the handshake raised, and the
        connection was dropped without a reply.
        """
        log = LogCapture(self)
        cert = self.issue.unreadable("odd", "lb1.example.net")
        self.assertEqual((yield self.trustedWith(cert)), (False, 550))
        self.assertEqual(len(log.find("client certificate not verified: it cannot be parsed")), 1)

    @defer.inlineCallbacks
    def test_certificateWithMalformedNamePattern(self):
        """
        A certificate from the client CA whose subjectAltName holds a
        pattern service_identity refuses to match (two wildcards, or a
        wildcard beyond the left-most label): no trust, and the session goes
        on.  Before, the match raised at the end of the handshake and the
        connection was dropped without a reply.
        """
        log = LogCapture(self)
        for dns in ("*.*.example.net", "lb1.*.example.net"):
            self.assertEqual((yield self.trustedWith(self.issue("odd", dns))), (False, 550), dns)
        self.assertEqual(len(log.find("not verified")), 2)

    @defer.inlineCallbacks
    def test_certificateForAnotherPurposeNotTrusted(self):
        """
        A certificate from the client CA for the allowed name, but issued for
        another purpose (a web server's, an S/MIME one, a key for signing
        certificates): no trust (before, each was trusted, and with XCLIENT
        LOGIN= could relay).  One for TLS clients is.
        """
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

        def usages(*oids):
            return (x509.ExtendedKeyUsage(list(oids)), False)

        signing = (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                 data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                 encipher_only=False, decipher_only=False), True)
        for label, extension, trusted in (("web", usages(EKU.SERVER_AUTH), False),
                                          ("mail", usages(EKU.EMAIL_PROTECTION), False),
                                          ("signing", signing, False),
                                          ("client", usages(EKU.SERVER_AUTH, EKU.CLIENT_AUTH), True)):
            cert = self.issue(label, "lb1.example.net", extension)
            self.assertEqual((yield self.trustedWith(cert)), (trusted, 220 if trusted else 550), label)
