"""
Tests for L{relaygw.tls}: real TLS handshakes on loopback with a Python
C{ssl} client running in a thread.
"""

import os
import shutil
import socket
import ssl
import time

from cryptography import x509
from OpenSSL import SSL
from cryptography.hazmat.primitives import hashes
from zope.interface import implementer

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from relaygw import tls
from relaygw.trust import TrustPolicy
from tests.outside import plantFIFO
from tests.tlsmaterial import CA, altNames, certificate, clientContext, commonName, newKey, writePEM


def makeCA(cn):
    """A CA key and self-signed certificate."""
    key = newKey()
    return key, certificate(commonName(cn), commonName(cn), key, key, 10, CA)


def makeLeaf(caKey, caCert, cn, *names):
    """A key and certificate for C{names} (x509 GeneralNames) issued by the CA."""
    key = newKey()
    return key, certificate(commonName(cn), caCert.subject, key, caKey, 10, altNames(*names))


@implementer(IHandshakeListener)
class _Server(Protocol):
    """
    Record the TLS details after the handshake, then say C{ok} and close.
    With C{factory.starttls}, wait for a C{STARTTLS} line first.
    """

    info = None

    def connectionMade(self):
        self.done = self.factory.pending.pop(0)
        if self.factory.starttls:
            self.transport.write(b"220 ready\r\n")

    def dataReceived(self, data):
        if data == b"STARTTLS\r\n":
            self.transport.write(b"220 go\r\n")
            self.transport.startTLS(self.factory.serverTLS.contextFactory)

    def handshakeCompleted(self):
        self.info = (
            tls.tlsInfo(self.transport),
            self.factory.trust.verifyCertificate(self.transport),
        )
        self.transport.write(b"ok\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.info)


def _client(port, context, starttls):
    """
    Connect, handshake, read until EOF.

    @return: C{(protocol version, server certificate, data read)}.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if starttls:
            f = raw.makefile("rb", buffering=0)
            assert f.readline() == b"220 ready\r\n"
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline() == b"220 go\r\n"
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
            version = s.version()
            data = b""
            while True:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
    return version, cert, data


class _Fixture:
    """Files under one temporary directory."""

    def setUpFiles(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        tls.generateSelfSigned(self.cert, self.key)

    def path(self, name):
        return os.path.join(self.dir, name)


class GenerateSelfSignedTests(_Fixture, unittest.TestCase):
    def test_createsLoadablePair(self):
        """
        The certificate and key load, match, name C{localhost} and
        C{127.0.0.1}; the key is private; parent directories are created.
        """
        cert = os.path.join(self.mktemp(), "sub", "c.pem")
        key = os.path.join(os.path.dirname(cert), "k.pem")
        self.assertTrue(tls.generateSelfSigned(cert, key, hostname="mx.example.com"))
        server = tls.ServerTLS(cert, key)
        san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mx.example.com", "localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)

    def test_addressLiteralHostname(self):
        """A host name that is an address literal is named as that address, not as a DNS name "[...]"."""
        for hostname, address in (("[192.0.2.1]", "192.0.2.1"), ("[IPv6:2001:db8::1]", "2001:db8::1")):
            directory = self.mktemp()
            cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
            self.assertTrue(tls.generateSelfSigned(cert, key, hostname=hostname))
            san = tls.ServerTLS(cert, key).certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
            self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
            self.assertEqual(sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
                             sorted([address, "127.0.0.1"]))

    def test_doesNotOverwrite(self):
        """
        Existing files are kept and C{False} is returned.
        """
        self.setUpFiles()
        with open(self.cert, "rb") as f:
            before = f.read()
        self.assertFalse(tls.generateSelfSigned(self.cert, self.key))
        os.remove(self.key)
        self.assertFalse(tls.generateSelfSigned(self.cert, self.key))
        with open(self.cert, "rb") as f:
            self.assertEqual(f.read(), before)


class ServerTLSTests(_Fixture, unittest.TestCase):
    def setUp(self):
        self.setUpFiles()

    def listen(self, serverTLS, starttls=False, identities=()):
        factory = Factory.forProtocol(_Server)
        factory.serverTLS = serverTLS
        factory.trust = TrustPolicy(clientIdentities=identities, tls=serverTLS)
        factory.starttls = starttls
        factory.pending = []
        self.factory = factory
        if not starttls:
            factory = TLSMemoryBIOFactory(serverTLS.contextFactory, False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def connect(self, context=None):
        """
        Connect once.

        @return: a L{Deferred} firing with C{(client result, server result)}
            where the server result is C{(tlsInfo, TrustPolicy.verifyCertificate)}.
        """
        if context is None:
            context = clientContext()
        server = defer.Deferred()
        self.factory.pending.append(server)
        client = threads.deferToThread(_client, self.port, context, self.factory.starttls)
        return defer.gatherResults([client, server], consumeErrors=True)

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        """
        A client handshakes through L{TLSMemoryBIOFactory}; the server sees
        the protocol and cipher and no client certificate.
        """
        server = tls.ServerTLS(self.cert, self.key)
        self.listen(server)
        (version, cert, data), (info, verified) = yield self.connect()
        self.assertEqual(data, b"ok\r\n")
        self.assertEqual(cert.serial_number, server.certificate.serial_number)
        self.assertEqual(info["tls"], version)
        self.assertEqual(info["tls"], "TLSv1.3")
        self.assertTrue(info["tls_cipher"].startswith("TLS_"), info)
        self.assertNotIn("tls_client_cert_subject", info)
        self.assertEqual(verified, (False, None))

    @defer.inlineCallbacks
    def test_startTLS(self):
        """
        The same object works with C{transport.startTLS}.
        """
        server = tls.ServerTLS(self.cert, self.key)
        self.listen(server, starttls=True)
        (version, cert, data), (info, verified) = yield self.connect(clientContext(maximum=ssl.TLSVersion.TLSv1_2))
        self.assertEqual(data, b"ok\r\n")
        self.assertEqual(version, "TLSv1.2")
        self.assertEqual(info["tls"], "TLSv1.2")
        self.assertIn("tls_cipher", info)

    @defer.inlineCallbacks
    def test_minVersion13(self):
        """
        With C{minVersion="1.3"} a TLS 1.2-only client cannot connect.
        """
        self.listen(tls.ServerTLS(self.cert, self.key, minVersion="1.3"))
        d = self.connect(clientContext(maximum=ssl.TLSVersion.TLSv1_2))
        failure = yield self.assertFailure(d, defer.FirstError)
        self.assertIsInstance(failure.subFailure.value, ssl.SSLError)

    @defer.inlineCallbacks
    def test_ciphers(self):
        """
        The cipher string limits TLS 1.2 ciphers.
        """
        self.listen(tls.ServerTLS(self.cert, self.key, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
        _, (info, _) = yield self.connect(clientContext(maximum=ssl.TLSVersion.TLSv1_2))
        self.assertEqual(info["tls_cipher"], "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_badOptions(self):
        """
        A bad version, identity or cipher string is a L{ValueError}.
        """
        self.assertRaises(ValueError, tls.ServerTLS, self.cert, self.key, minVersion="1.1")
        self.assertRaises(ValueError, tls.ServerTLS, self.cert, self.key, ciphers="NOSUCHCIPHER")
        self.assertRaises(ValueError, TrustPolicy, clientIdentities=["lb1"])

    def replaceCertificate(self):
        """
        Overwrite the certificate files with a new pair.

        @return: the new certificate's serial number.
        """
        other = self.mktemp()
        tls.generateSelfSigned(os.path.join(other, "c"), os.path.join(other, "k"), "new.example")
        shutil.copy(os.path.join(other, "c"), self.cert)
        shutil.copy(os.path.join(other, "k"), self.key)
        # Make sure the change is visible even on a coarse clock.
        for path in (self.cert, self.key):
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
        with open(self.cert, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).serial_number

    @defer.inlineCallbacks
    def test_reload(self):
        """
        After L{ServerTLS.reload}, new connections on the same listener get
        the new certificate.
        """
        server = tls.ServerTLS(self.cert, self.key)
        self.listen(server)
        (_, before, _), _ = yield self.connect()
        self.assertFalse(server.reload())
        serial = self.replaceCertificate()
        self.assertNotEqual(serial, before.serial_number)
        self.assertTrue(server.reload())
        (_, after, _), _ = yield self.connect()
        self.assertEqual(after.serial_number, serial)
        self.assertEqual(after.subject, commonName("new.example"))

    def test_reloadErrorKeepsCertificate(self):
        """
        A broken file is reported and the current certificate stays.
        """
        server = tls.ServerTLS(self.cert, self.key)
        before = server.certificate
        with open(self.key, "w") as f:
            f.write("garbage")
        self.assertFalse(server.reload())
        server.checkForChanges()
        self.assertIs(server.certificate, before)

    def test_reloadRefusesFIFO(self):
        """
        A key file replaced by a FIFO is refused at once, unread, and the
        current certificate stays (before: the watch that reloads a changed
        file opened it on the reactor, and every session and delivery
        waited until something wrote to it).
        """
        server = tls.ServerTLS(self.cert, self.key)
        before = server.certificate
        os.unlink(self.key)
        plantFIFO(self, self.key)
        errors = []
        self.patch(tls.log, "error", lambda fmt, **kw: errors.append(fmt.format(**kw)))
        started = time.monotonic()
        server.checkForChanges()
        self.assertLess(time.monotonic() - started, 5)
        self.assertIs(server.certificate, before)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("not a regular file", errors[0])

    def test_checkForChanges(self):
        """
        L{ServerTLS.checkForChanges} reloads only when a file changed.
        """
        server = tls.ServerTLS(self.cert, self.key)
        reloads = []
        original = server.reload
        self.patch(server, "reload", lambda: reloads.append(original()))
        server.checkForChanges()
        self.assertEqual(reloads, [])
        serial = self.replaceCertificate()
        server.checkForChanges()
        self.assertEqual(reloads, [True])
        self.assertEqual(server.certificate.serial_number, serial)
        server.checkForChanges()
        self.assertEqual(reloads, [True])

    def test_checkForChangesNeverRaises(self):
        """
        A missing file is logged, not raised, and the certificate stays.
        """
        server = tls.ServerTLS(self.cert, self.key)
        os.remove(self.cert)
        server.checkForChanges()
        self.assertIsNotNone(server.certificate)


class ClientCertificateTests(_Fixture, unittest.TestCase):
    def setUp(self):
        self.setUpFiles()
        self.caKey, caCert = makeCA("Test CA")
        self.ca = writePEM(self.path("ca.pem"), caCert)
        self.caCert = caCert
        self.factory = None

    listen = ServerTLSTests.listen
    connect = ServerTLSTests.connect

    def clientFiles(self, caKey, caCert, *names):
        key, cert = makeLeaf(caKey, caCert, "lb1", *names)
        return writePEM(self.path("client.pem"), cert), writePEM(self.path("client.key"), key)

    @defer.inlineCallbacks
    def verify(self, identities, certKey, maximum=None):
        self.listen(tls.ServerTLS(self.cert, self.key, clientCA=self.ca), identities=identities)
        _, (info, verified) = yield self.connect(clientContext(certKey, maximum))
        return info, verified

    @defer.inlineCallbacks
    def test_allowedDNS(self):
        """
        A certificate from the client CA with an allowed DNS name is verified.
        """
        files = self.clientFiles(self.caKey, self.caCert, x509.DNSName("lb1.example.net"))
        info, verified = yield self.verify(["dns:other.example.net", "dns:lb1.example.net"], files)
        self.assertEqual(verified, (True, "CN=lb1"))
        self.assertEqual(info["tls_client_cert_subject"], "CN=lb1")

    @defer.inlineCallbacks
    def test_allowedDNSOverTLS12(self):
        """
        The same holds with TLS 1.2.
        """
        files = self.clientFiles(self.caKey, self.caCert, x509.DNSName("lb1.example.net"))
        _, verified = yield self.verify(["dns:lb1.example.net"], files, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(verified, (True, "CN=lb1"))

    @defer.inlineCallbacks
    def test_identityNotAllowed(self):
        """
        A valid certificate whose name is not in the list is not verified.
        """
        files = self.clientFiles(self.caKey, self.caCert, x509.DNSName("lb1.example.net"))
        _, verified = yield self.verify(["dns:lb2.example.net"], files)
        self.assertEqual(verified, (False, "CN=lb1"))

    @defer.inlineCallbacks
    def test_otherCA(self):
        """
        A certificate from another CA is not verified, but the handshake
        succeeds.
        """
        otherKey, otherCert = makeCA("Other CA")
        files = self.clientFiles(otherKey, otherCert, x509.DNSName("lb1.example.net"))
        info, verified = yield self.verify(["dns:lb1.example.net"], files)
        self.assertEqual(verified, (False, "CN=lb1"))
        self.assertEqual(info["tls_client_cert_subject"], "CN=lb1")

    @defer.inlineCallbacks
    def test_noClientCertificate(self):
        """
        Without a client certificate the handshake succeeds, not verified.
        """
        info, verified = yield self.verify(["dns:lb1.example.net"], None)
        self.assertEqual(verified, (False, None))
        self.assertIn("tls_cipher", info)

    @defer.inlineCallbacks
    def test_uri(self):
        """
        URI identities must match exactly, path included.
        """
        files = self.clientFiles(
            self.caKey, self.caCert, x509.UniformResourceIdentifier("spiffe://example/lb")
        )
        _, verified = yield self.verify(["uri:spiffe://example/lb"], files)
        self.assertEqual(verified, (True, "CN=lb1"))
        _, verified = yield self.verify(["uri:spiffe://example/other"], files)
        self.assertEqual(verified, (False, "CN=lb1"))

    @defer.inlineCallbacks
    def test_intermediate(self):
        """
        A client may send an intermediate CA that chains to the client CA.
        """
        interKey, interCert = makeLeaf(self.caKey, self.caCert, "Intermediate")
        interCert = (
            x509.CertificateBuilder()
            .subject_name(interCert.subject)
            .issuer_name(self.caCert.subject)
            .public_key(interKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(interCert.not_valid_before_utc)
            .not_valid_after(interCert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.caKey, hashes.SHA256())
        )
        key, cert = makeLeaf(interKey, interCert, "lb1", x509.DNSName("lb1.example.net"))
        files = writePEM(self.path("chain.pem"), cert, interCert), writePEM(self.path("k.pem"), key)
        _, verified = yield self.verify(["dns:lb1.example.net"], files)
        self.assertEqual(verified, (True, "CN=lb1"))


class ClientTLSTests(_Fixture, unittest.TestCase):
    def test_verify(self):
        """
        C{creator(name, True)} verifies the peer, and sends the name as SNI.
        """
        self.setUpFiles()
        creator = tls.ClientTLS(self.cert).creator("localhost", True)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))
        connection = creator.clientConnectionForTLS(None)
        self.assertEqual(connection.get_servername(), b"localhost")
        self.assertTrue(connection.get_verify_mode() & SSL.VERIFY_PEER)

    def test_noVerify(self):
        """
        C{creator(name, False)} does not verify but sends SNI; an address
        literal is sent as no SNI.
        """
        creator = tls.ClientTLS().creator("mx.example.com", False)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))
        connection = creator.clientConnectionForTLS(None)
        self.assertEqual(connection.get_servername(), b"mx.example.com")
        self.assertEqual(connection.get_verify_mode(), 0)
        self.assertIsNone(tls.ClientTLS().creator("192.0.2.1", False).clientConnectionForTLS(None).get_servername())

    def test_minimumVersion(self):
        """Both kinds of connection refuse TLS below 1.2 (the delivery client used Twisted's TLS 1.0 for "may")."""
        from OpenSSL._util import lib

        client = tls.ClientTLS()
        for verify in (False, True):
            context = client.creator("mx.example.com", verify).clientConnectionForTLS(None).get_context()
            options = lib.SSL_CTX_get_options(context._context)
            self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1, verify)

    def test_oneContextPerSettings(self):
        """Every connection shares the settings' contexts: nothing is built or read per connection."""
        self.setUpFiles()
        client = tls.ClientTLS(self.cert)
        contexts = {client.creator(name, verify).clientConnectionForTLS(None).get_context()
                    for name in ("a.example", "b.example") for verify in (True, True)}
        self.assertEqual(len(contexts), 1)

    def test_caRefusedIfNotRegular(self):
        """A CA bundle that is a FIFO is refused at once, unread."""
        self.setUpFiles()
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        self.assertRaises(ValueError, tls.ClientTLS, fifo)

    @defer.inlineCallbacks
    def handshake(self, creator):
        """
        Connect to a L{ServerTLS} listener with Twisted using C{creator}.

        @return: a L{Deferred} firing with the server certificate the client
            saw, or C{None} if the handshake failed.
        """
        serverDone = defer.Deferred()
        self.factory.pending.append(serverDone)
        done = defer.Deferred()

        @implementer(IHandshakeListener)
        class Client(Protocol):
            cert = None

            def handshakeCompleted(self):
                self.cert = self.transport.getPeerCertificate()

            def connectionLost(self, reason):
                done.callback(self.cert)

        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        yield endpoint.connect(Factory.forProtocol(Client))
        cert = yield done
        yield serverDone
        return cert

    @defer.inlineCallbacks
    def test_handshakes(self):
        """
        Both kinds of client options complete a handshake with a
        L{ServerTLS}; the verifying one checks the certificate against the CA
        file and the name.
        """
        self.setUpFiles()
        server = tls.ServerTLS(self.cert, self.key)
        ServerTLSTests.listen(self, server)
        serial = server.certificate.serial_number
        cert = yield self.handshake(tls.ClientTLS().creator("localhost", False))
        self.assertEqual(cert.to_cryptography().serial_number, serial)
        cert = yield self.handshake(tls.ClientTLS(self.cert).creator("localhost", True))
        self.assertEqual(cert.to_cryptography().serial_number, serial)
        cert = yield self.handshake(tls.ClientTLS(self.cert).creator("mx.example.com", True))
        self.assertIsNone(cert)
        _, otherCA = makeCA("Other CA")
        cert = yield self.handshake(tls.ClientTLS(writePEM(self.path("o.pem"), otherCA)).creator("localhost", True))
        self.assertIsNone(cert)

    @defer.inlineCallbacks
    def test_caReadOnce(self):
        """
        The CA bundle is read when the settings are made, not per
        connection: replaced by a FIFO (which a read would wait on) or by
        another CA, handshakes still verify against the bundle as it was.
        """
        self.setUpFiles()
        server = tls.ServerTLS(self.cert, self.key)
        ServerTLSTests.listen(self, server)
        ca = self.path("ca.pem")
        shutil.copy(self.cert, ca)
        client = tls.ClientTLS(ca)
        _, otherCA = makeCA("Other CA")
        writePEM(ca, otherCA)
        cert = yield self.handshake(client.creator("localhost", True))
        self.assertEqual(cert.to_cryptography().serial_number, server.certificate.serial_number)
        os.unlink(ca)
        os.mkfifo(ca)
        cert = yield self.handshake(client.creator("localhost", True))
        self.assertEqual(cert.to_cryptography().serial_number, server.certificate.serial_number)

    @defer.inlineCallbacks
    def test_reload(self):
        """
        L{ClientTLS.reload} takes a new CA bundle; one it cannot read (not
        a regular file, no certificate) leaves the current one, with one
        error line each.
        """
        self.setUpFiles()
        server = tls.ServerTLS(self.cert, self.key)
        ServerTLSTests.listen(self, server)
        ca = self.path("ca.pem")
        _, otherCA = makeCA("Other CA")
        writePEM(ca, otherCA)
        client = tls.ClientTLS(ca)
        self.assertIsNone((yield self.handshake(client.creator("localhost", True))))
        shutil.copy(self.cert, ca)
        self.assertTrue(client.reload())
        self.assertIsNotNone((yield self.handshake(client.creator("localhost", True))))
        errors = []
        self.patch(tls.log, "error", lambda fmt, **kw: errors.append(fmt.format(**kw)))
        with open(ca, "w") as f:
            f.write("not a certificate\n")
        self.assertFalse(client.reload())
        os.unlink(ca)
        os.mkfifo(ca)
        self.assertFalse(client.reload())
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(all(e.startswith("TLS reload of CA bundle %s failed, keeping the current one: " % ca)
                            and "\n" not in e for e in errors), errors)
        self.assertIn("not a regular file", errors[1])
        self.assertIsNotNone((yield self.handshake(client.creator("localhost", True))))
