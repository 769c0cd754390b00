"""
The TLS choices that make STARTTLS cheap: the self-signed certificate
relaygw generates is ECDSA P-256, and a client that comes back with its
session resumes it (session tickets, and the session cache for TLS 1.2),
over a real STARTTLS on loopback with Python's C{ssl} client.
"""

import os
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.trial import unittest

from relaygw.testing import Client, inThread
from relaygw.tls import generateSelfSigned
from tests.sessions import GatewayTestCase
from tests.tlsmaterial import clientContext, makeCA


class ResumptionTests(GatewayTestCase):
    #: Whether a client offering its last session gets it resumed.
    resumed = True
    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.cert, key = os.path.join(directory, "tls", "cert.pem"), os.path.join(directory, "tls", "key.pem")
        self.listener = {"tls_certificate": self.cert, "tls_key": key, "tls_self_signed": True}
        yield GatewayTestCase.setUp(self)

    def starttls(self, context, session=None):
        """One STARTTLS session; returns (reused, session, EHLO code after TLS)."""
        c = Client(self.gw.port)
        try:
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("EHLO client.example")[0], 250)
            self.assertEqual(c.cmd("STARTTLS")[0], 220)
            c.sock = context.wrap_socket(c.sock, server_hostname="relay.test", session=session)
            code, _ = c.cmd("EHLO client.example")  # a TLS 1.3 ticket arrives after the handshake
            self.assertEqual(c.cmd("QUIT")[0], 221)
            return c.sock.session_reused, c.sock.session, code
        finally:
            c.close()

    def resumes(self, maximum):
        context = clientContext(maximum=maximum)

        def run():
            first, session, code1 = self.starttls(context)
            again, _, code2 = self.starttls(context, session)
            return first, again, code1, code2

        return inThread(run)

    @defer.inlineCallbacks
    def test_tls13Session(self):
        first, again, code1, code2 = yield self.resumes(None)
        self.assertEqual((first, again, code1, code2), (False, self.resumed, 250, 250))

    @defer.inlineCallbacks
    def test_tls12Session(self):
        first, again, code1, code2 = yield self.resumes(ssl.TLSVersion.TLSv1_2)
        self.assertEqual((first, again, code1, code2), (False, self.resumed, 250, 250))

    def resumesAcrossReload(self, maximum):
        """A session from before a reload (SIGHUP) that changed nothing of TLS, offered after it."""
        self.gw.service.configPath = self.gw.path
        context = clientContext(maximum=maximum)

        def run():
            first, session, _ = self.starttls(context)
            self.gw.service.reactor.callFromThread(self.gw.service.reload)
            time.sleep(0.2)
            again, _, code = self.starttls(context, session)
            return first, again, code

        return inThread(run)

    @defer.inlineCallbacks
    def test_tls13SessionAcrossReload(self):
        """
        A reload that leaves the certificate, key and TLS settings as they
        were keeps the sessions it could resume (before, every SIGHUP, a
        log rotation's say, cost each client a full handshake).
        """
        self.assertEqual((yield self.resumesAcrossReload(None)), (False, self.resumed, 250))

    @defer.inlineCallbacks
    def test_tls12SessionAcrossReload(self):
        self.assertEqual((yield self.resumesAcrossReload(ssl.TLSVersion.TLSv1_2)), (False, self.resumed, 250))

    def test_selfSignedKeyIsP256(self):
        with open(self.cert, "rb") as f:
            key = x509.load_pem_x509_certificate(f.read()).public_key()
        self.assertIsInstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")


class GeneratedKeyTests(unittest.TestCase):
    def test_generatedKeyIsP256AndPrivate(self):
        directory = self.mktemp()
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        self.assertTrue(generateSelfSigned(cert, key, "mx.example"))
        from cryptography.hazmat.primitives import serialization

        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), None)
        self.assertIsInstance(private, ec.EllipticCurvePrivateKey)
        self.assertEqual(private.curve.name, "secp256r1")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)


class NoResumptionWithClientCertificatesTests(ResumptionTests):
    """Where client certificates are requested, trust needs a full handshake: nothing resumes."""

    resumed = False

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.ca, _ = makeCA(os.path.join(directory, "ca"))
        self.cert, key = os.path.join(directory, "tls", "cert.pem"), os.path.join(directory, "tls", "key.pem")
        self.listener = {"tls_certificate": self.cert, "tls_key": key, "tls_self_signed": True,
                         "tls_client_ca": self.ca}
        yield GatewayTestCase.setUp(self)
