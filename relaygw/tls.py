"""
TLS for the gateway: server settings per listener (with certificate reload and
optional client certificates), connection details for the validation context,
and the delivery client's TLS (L{ClientTLS}).

A listener builds one L{ServerTLS} and passes its C{contextFactory} to
L{startTLS} (STARTTLS) or to L{HalfCloseableTLSFactory} (implicit TLS).
That object stays the same for the life of the listener; every new
connection uses the certificate that is current when it is accepted, so
L{ServerTLS.reload} takes effect without a restart.  Both put a
L{HalfCloseableTLS} layer under the session, which takes the end of the
client's input as a half-close, as plain TCP does.
"""

import datetime
import functools
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from zope.interface import directlyProvides, implementer

from twisted.internet import ssl, tcp
from twisted.internet._idna import _idnaBytes
from twisted.internet._newtls import _BypassTLS
from twisted.internet.abstract import FileDescriptor, isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from relaygw.logs import Logger
from relaygw.trust import UNPARSABLE, parseIP

log = Logger()

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


#: The most octets a certificate, key or CA bundle file may have (the
#: platform's whole CA bundle is about 0.2 MiB): a larger one is refused
#: unread, not read into memory on the reactor.
MAX_PEM_SIZE = 16 * 1024 * 1024


def _readRegular(path):
    """
    The bytes of C{path}, which must be a regular file: a FIFO would hold
    the reactor until something wrote to it, a device such as /dev/zero
    would never end; and of at most L{MAX_PEM_SIZE} octets.
    """
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("%s is not a regular file" % (path,))
        if st.st_size > MAX_PEM_SIZE:
            raise ValueError(oversized(path, st.st_size))
        return f.read(MAX_PEM_SIZE + 1)


def oversized(path, size):
    """Why the PEM file C{path} of C{size} octets is refused."""
    return "%s is %d octets, over the %d a PEM file may have" % (path, size, MAX_PEM_SIZE)


def generateSelfSigned(certPath, keyPath, hostname="localhost"):
    """
    Create a self-signed certificate and its ECDSA P-256 key, valid for
    about two years for C{hostname}, C{localhost} and C{127.0.0.1}.  (Its
    signature in each full handshake costs a small fraction of an RSA 2048
    one; every client of TLS 1.2 and later accepts it.)

    Nothing is written if either file already exists (an existing key or
    certificate is never replaced).  Parent directories are created; the key
    file is created with mode 0600.

    @return: C{True} if the files were created.
    """
    if os.path.exists(certPath) or os.path.exists(keyPath):
        return False
    for path in (certPath, keyPath):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost")]
    ips = {ipaddress.ip_address("127.0.0.1")}
    # (an address literal, as a listener's hostname may be: "[192.0.2.1]", "[IPv6:2001:db8::1]")
    try:
        ips.add(parseIP(hostname[1:-1] if hostname.startswith("[") and hostname.endswith("]") else hostname))
    except ValueError:
        if hostname != "localhost":
            names.insert(0, x509.DNSName(hostname))
    names += [x509.IPAddress(ip) for ip in sorted(ips, key=str)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keyPEM)
    with open(certPath, "xb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created a self-signed certificate for {hostname} in {path}", hostname=hostname, path=certPath)
    return True


def _acceptAnyClientCertificate(connection, certificate, errno, depth, ok):
    """
    Never fail the handshake over a client certificate: it is only requested,
    and L{relaygw.trust.TrustPolicy.afterHandshake} checks it afterwards.
    """
    return True


def _subject(cert):
    return cert.subject.rfc4514_string()


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    Per-listener server TLS settings whose certificate can be reloaded
    without a restart.

    @ivar contextFactory: the object to give to C{startTLS} or
        L{TLSMemoryBIOFactory}.  It is this L{ServerTLS} itself (an
        L{IOpenSSLServerConnectionCreator} that also has C{getContext}), so
        it always uses the current settings.
    @ivar certificate: the current leaf certificate
        (L{cryptography.x509.Certificate}).
    """

    def __init__(
        self,
        certPath,
        keyPath,
        minVersion="1.2",
        ciphers=None,
        clientCA=None,
    ):
        """
        @param certPath: PEM certificate, optionally followed by its chain.
        @param keyPath: PEM private key (unencrypted).
        @param minVersion: C{"1.2"} or C{"1.3"}.
        @param ciphers: an OpenSSL cipher string (TLS 1.2 and below), or
            C{None} for Twisted's defaults.
        @param clientCA: path of a PEM CA bundle.  If given, a client
            certificate is requested (never required); the listener's
            L{relaygw.trust.TrustPolicy} checks it against L{clientCAStore}.

        @raise ValueError: on a bad option.
        @raise Exception: if the certificate or key cannot be loaded.
        """
        if minVersion not in _VERSIONS:
            raise ValueError("minVersion must be one of %s" % ", ".join(_VERSIONS))
        self.certPath = certPath
        self.keyPath = keyPath
        self.clientCA = clientCA
        self._minVersion = _VERSIONS[minVersion]
        self._cipherString = ciphers
        self._ciphers = None
        if ciphers is not None:
            self._ciphers = ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        self._stamps = self._stat()
        self._files, self._context, self.certificate, self._caStore = self._load()

    @property
    def contextFactory(self):
        return self

    @property
    def clientCAStore(self):
        """The current client CA store (an L{OpenSSL.crypto.X509Store}), or C{None}."""
        return self._caStore

    def _paths(self):
        return [p for p in (self.certPath, self.keyPath, self.clientCA) if p is not None]

    def _stat(self):
        stamps = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return stamps

    def _load(self):
        """
        Read the files and build a new context.

        @return: C{(file contents, context, leaf certificate, CA store)}.
        """
        files = [_readRegular(path) for path in self._paths()]
        certPEM, keyPEM = files[0], files[1]
        chain = x509.load_pem_x509_certificates(certPEM)
        key = serialization.load_pem_private_key(keyPEM, password=None)
        extra = {}
        if self._ciphers is not None:
            extra["acceptableCiphers"] = self._ciphers
        # Session resumption (a session cache and tickets), as nginx and
        # HAProxy offer it: a client that comes back skips the certificate
        # signature and the key exchange's public-key work.  Not where client
        # certificates are requested: a resumed session brings no chain, and
        # trust by certificate is decided on a full handshake only.
        resume = self.clientCA is None
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=self._minVersion,
            enableSessions=resume,
            enableSessionTickets=resume,
            **extra,
        )
        context = options.getContext()
        store = None
        if self.clientCA is not None:
            cas = x509.load_pem_x509_certificates(files[2])
            store = crypto.X509Store()
            for ca in cas:
                store.add_cert(crypto.X509.from_cryptography(ca))
                context.add_client_ca(ca)
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _acceptAnyClientCertificate)
        return files, context, chain[0], store

    def adopt(self, other):
        """
        Take the settings of C{other}, a L{ServerTLS} built from a reloaded
        config (other files, versions, ciphers or client CA): this object
        stays the one listening ports and sessions hold.  (Allowed client
        identities belong to the listener's trust policy.)  When that
        changes nothing (the same files' contents, versions and ciphers),
        the context stays: with it, the sessions clients may resume.
        """
        same = (other._files, other._minVersion, other._cipherString) == (
            self._files, self._minVersion, self._cipherString)
        self.certPath, self.keyPath, self.clientCA = other.certPath, other.keyPath, other.clientCA
        self._minVersion, self._cipherString, self._ciphers = other._minVersion, other._cipherString, other._ciphers
        self._stamps = other._stamps
        if not same:
            self._files, self._context, self.certificate, self._caStore = (
                other._files, other._context, other.certificate, other._caStore)

    def reload(self, failures=None):
        """
        Re-read the certificate, key and client CA files.  New connections use
        the new settings; on error the old ones stay and the error is logged,
        or its log call added to the list C{failures}, for a caller that
        decides later whether it is worth a line.

        @return: C{True} if the settings changed.
        """
        self._stamps = self._stat()
        try:
            loaded = self._load()
        except Exception as e:
            report = functools.partial(log.error, "TLS reload of {cert} failed, keeping the current certificate: "
                                       "{error}", cert=self.certPath, error=repr(e))
            if failures is None:
                report()
            else:
                failures.append(report)
            return False
        if loaded[0] == self._files:
            return False
        self._files, self._context, self.certificate, self._caStore = loaded
        log.info(
            "TLS certificate {cert} reloaded: {subject} serial {serial:x}",
            cert=self.certPath,
            subject=_subject(self.certificate),
            serial=self.certificate.serial_number,
        )
        return True

    def checkForChanges(self):
        """
        Reload if a file's modification time, size or inode changed.  For a
        L{TimerService}: never raises.
        """
        try:
            if self._stat() != self._stamps:
                self.reload()
        except Exception:
            log.failure("TLS reload check failed")

    def getContext(self):
        """
        @return: the current L{OpenSSL.SSL.Context} (see
            L{IOpenSSLContextFactory}).
        """
        return self._context

    def serverConnectionForTLS(self, tlsProtocol):
        """
        @see: L{IOpenSSLServerConnectionCreator}
        """
        return SSL.Connection(self._context, None)


@implementer(IHalfCloseableProtocol)
class HalfCloseableTLS(BufferingTLSTransport):
    """
    A server's TLS layer that takes the end of the client's input as a
    half-close, as Twisted's plain TCP transport does: the client's
    close_notify, or the end of the TCP stream, comes to the protocol above
    (when it is an L{IHalfCloseableProtocol}) as C{readConnectionLost}
    after all the records before it, and that protocol may still write
    until it closes, which sends the gateway's close_notify.  Twisted's own
    layer answers a close_notify with its own and closes at once, and
    takes the end of the TCP stream for a lost connection: a pipelining
    client that ends its input after its last commands lost the replies
    still to come (Postfix sends them).

    The end of the TCP stream without a close_notify ends the input just
    the same: SMTP's own framing says what was whole (a message cut short
    is dropped as at a disconnect).  No close_notify can follow it, so the
    connection closes as soon as the gateway's is out.
    """

    #: The client's input has ended (its close_notify, or the end of the TCP stream after the handshake).
    _inputEnded = False
    #: The TCP stream from the client has ended.
    _streamEnded = False

    def dataReceived(self, octets):
        """
        Records for OpenSSL; but nothing may follow a close_notify, and
        what does is dropped as it comes, not held until the session
        closes.
        """
        if not self._inputEnded:
            BufferingTLSTransport.dataReceived(self, octets)

    def _flushReceiveBIO(self):
        """Twisted's loop, but a close_notify ends the input, not the connection."""
        while not self._lostTLSConnection and not self._inputEnded:
            try:
                octets = self._tlsConnection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._endOfInput()
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, octets)
        self._flushSendBIO()

    def _endOfInput(self):
        """
        Tell the protocol above that the input has ended; one that takes
        no half-close, or a connection already closing (this is the answer
        to the gateway's close_notify), ends as in Twisted's layer.
        """
        wrapped = self.wrappedProtocol
        if self.disconnecting or not IHalfCloseableProtocol.providedBy(wrapped):
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return
        self._inputEnded = True
        wrapped.readConnectionLost()

    def readConnectionLost(self):
        """
        The TCP stream from the client ended.  Every whole record it held
        has been read (L{dataReceived} reads them as they come); OpenSSL is
        not told of the end, as it would take it for an attack and refuse
        to write the replies.
        """
        self._streamEnded = True
        if self._lostTLSConnection or self._inputEnded:
            if self.disconnecting:
                self.transport.loseConnection()
            return
        if not self._handshakeDone:
            # (no TLS session to end, and no handshake can finish now: close, as Twisted's layer does)
            self.transport.loseConnection()
            return
        self._endOfInput()

    def writeConnectionLost(self):
        """(The TCP write side is shut only by closing the connection.)"""

    def _shutdownTLS(self):
        """
        Send the close_notify, and close the connection once it is out,
        as Postfix does: Twisted's layer then waits for the client's
        close_notify, which a client that waits for the end of the stream
        after its 221 never sends (it was reset 2 s later, logged as a
        peer that had not taken its closing reply), and which cannot come
        at all once the client's stream has ended.
        """
        BufferingTLSTransport._shutdownTLS(self)
        self.transport.loseConnection()


class HalfCloseableTLSFactory(TLSMemoryBIOFactory):
    """A L{TLSMemoryBIOFactory} of L{HalfCloseableTLS} layers (implicit TLS)."""

    protocol = HalfCloseableTLS


def startTLS(transport, contextFactory):
    """
    Start TLS as the server on the session's C{transport} (a TCP
    connection, or a wrapper over one that passes writes through, as the
    PROXY protocol's does), as C{transport.startTLS(contextFactory)} does
    (Twisted's C{_newtls.startTLS}), but with a L{HalfCloseableTLS} layer.
    A transport that is no TCP connection (a test's) starts its own.
    """
    connection = transport
    while connection is not None and not isinstance(connection, tcp.Connection):
        connection = getattr(connection, "transport", None)
    if connection is None or connection.TLS:
        transport.startTLS(contextFactory)
        return
    producer, streaming = connection.producer, connection.streamingProducer
    if producer is not None:
        connection.unregisterProducer()
    factory = HalfCloseableTLSFactory(contextFactory, False, None)
    layer = factory.protocol(factory, connection.protocol, False)
    connection.protocol = layer
    connection.getHandle = layer.getHandle
    connection.getPeerCertificate = layer.getPeerCertificate
    directlyProvides(connection, ISSLTransport)
    connection.TLS = True
    layer.makeConnection(_BypassTLS(FileDescriptor, connection))
    if producer is not None:
        connection.registerProducer(producer, streaming)


def tlsInfo(transport):
    """
    TLS details of a connection after its handshake, for the validation
    context.

    @param transport: a TLS transport (with C{getHandle}).
    @return: C{{"tls": "TLSv1.3", "tls_cipher": ...}} plus
        C{"tls_client_cert_subject"} if the client presented a certificate
        (verified or not, and one cryptography can parse).  Empty if there
        is no TLS yet.
    """
    try:
        connection = transport.getHandle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
    except (AttributeError, SSL.Error):
        return {}
    if cipher is None:
        return {}
    info = {"tls": version, "tls_cipher": cipher}
    peer = connection.get_peer_certificate()
    if peer is not None:
        try:
            info["tls_client_cert_subject"] = _subject(peer.to_cryptography())
        except UNPARSABLE:
            pass  # (OpenSSL took it, cryptography cannot read it: no subject to show)
    return info


#: The oldest TLS version the delivery client speaks, under every policy.
CLIENT_MIN_VERSION = ssl.TLSVersion.TLSv1_2


def _dnsName(hostname):
    """
    C{hostname} as the name a certificate holds and SNI sends: without the
    final dot of an absolute name (C{relay.example.net.}), which neither
    has (RFC 6066 section 3, RFC 6125 section 6.2.1).
    """
    return hostname[:-1] if hostname.endswith(".") and not hostname.endswith("..") else hostname


def _asciiName(hostname):
    """
    C{hostname} (without a final dot) as ASCII bytes: as written if it is
    ASCII (IDNA's strict rules would refuse an underscore, which DNS and
    private CAs' certificates hold), else IDNA-encoded.

    @raise ValueError: for a name IDNA cannot encode.
    """
    name = _dnsName(hostname)
    if name.isascii():
        return name.encode("ascii")
    return _idnaBytes(name)


def _serverName(hostname):
    """The SNI name for C{hostname}, or C{None} for an address literal or an unencodable name."""
    if not hostname or isIPAddress(hostname) or isIPv6Address(hostname):
        return None
    try:
        return _asciiName(hostname)
    except (UnicodeError, ValueError):
        return None


class ClientTLS:
    """
    The delivery client's TLS for one next hop's settings: one context that
    verifies (against the CA bundle C{caFile}, or the platform's trust) and
    one that does not (C{tls = "may"}), both TLS 1.2 or later, made once
    and shared by every connection.  The CA bundle is read when the object
    is made (at start, or for a reloaded config) and by L{reload}, never
    per connection.
    """

    def __init__(self, caFile=None):
        """
        @param caFile: a PEM bundle of trusted CAs instead of the platform's.
        @raise Exception: if the bundle cannot be read or holds no certificate.
        """
        self.caFile = caFile
        self._stamp = self._stat()
        self._pem, self._verifying = self._load()
        self._opportunistic = ssl.CertificateOptions(verify=False, raiseMinimumTo=CLIENT_MIN_VERSION).getContext()

    def _stat(self):
        if self.caFile is None:
            return None
        try:
            st = os.stat(self.caFile)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self):
        """@return: C{(the bundle's bytes or None, the verifying context)}."""
        pem = None
        trustRoot = ssl.platformTrust()
        if self.caFile is not None:
            pem = _readRegular(self.caFile)
            cas = x509.load_pem_x509_certificates(pem)
            trustRoot = ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(c)) for c in cas])
        return pem, ssl.CertificateOptions(trustRoot=trustRoot, raiseMinimumTo=CLIENT_MIN_VERSION).getContext()

    def reload(self, failures=None):
        """
        Re-read the CA bundle.  New connections use it; on error the old one
        stays and the error is logged (or its log call added to
        C{failures}, as L{ServerTLS.reload} does).

        @return: C{True} if the bundle changed.
        """
        if self.caFile is None:
            return False
        self._stamp = self._stat()
        try:
            pem, context = self._load()
        except Exception as e:
            report = functools.partial(log.error, "TLS reload of CA bundle {ca} failed, keeping the current one: "
                                       "{error}", ca=self.caFile, error=" ".join(repr(e).split()))
            if failures is None:
                report()
            else:
                failures.append(report)
            return False
        if pem == self._pem:
            return False
        self._pem, self._verifying = pem, context
        log.info("TLS CA bundle {ca} reloaded", ca=self.caFile)
        return True

    def checkForChanges(self):
        """Reload if the bundle's modification time, size or inode changed.  Never raises."""
        try:
            if self._stat() != self._stamp:
                self.reload()
        except Exception:
            log.failure("TLS CA bundle reload check failed")

    def creator(self, hostname, verify):
        """
        Options for C{startTLS} to C{hostname} (sent as SNI).

        @param verify: C{True} to verify the chain and the name (failing
            closed: L{_NameChecked}); C{False} for opportunistic TLS.
        @return: an L{IOpenSSLClientConnectionCreator}.
        @raise ValueError: if C{verify} and C{hostname} is no name to check.
        """
        if verify:
            return _NameChecked(self._verifying, hostname)
        return _Opportunistic(self._opportunistic, hostname)


_platform = []


def platformClientTLS():
    """A L{ClientTLS} trusting the platform's CAs, made once for the process."""
    if not _platform:
        _platform.append(ClientTLS())
    return _platform[0]


@implementer(IOpenSSLClientConnectionCreator)
class _Opportunistic:
    """Client TLS that does not verify the server (SMTP "may" policy), but sends SNI."""

    def __init__(self, context, hostname):
        self._context = context
        self._serverName = _serverName(hostname)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _NameChecked:
    """
    Client TLS that verifies the chain with C{context} and the server's name,
    failing closed.  (Twisted's own check, in L{ssl.optionsForClientTLS},
    fails the handshake only on a L{VerificationError}: on any other error,
    cryptography cannot parse a certificate that OpenSSL accepted, a
    PrintableString holding an underscore say, or service_identity refuses a
    name pattern such as C{*.*.example}, it logs the error and lets the
    chain's result stand, so such a certificate from a trusted CA passed for
    any name.)
    """

    def __init__(self, context, hostname):
        self._context = context
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self._service = IPAddress_ID(hostname)
        else:
            self._service = DNS_ID(_asciiName(hostname).decode("ascii"))
        self._serverName = _serverName(hostname)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        protocols = [tlsProtocol]  # (let go of at the leaf: no cycle through the connection)
        service = self._service

        def verify(conn, cert, errno, depth, ok):
            if depth != 0:
                return ok
            protocol = protocols.pop() if protocols else None
            if not ok:
                return False
            try:
                verify_service_identity(extract_patterns(cert), [service], [])
            except Exception:  # (a wrong name, or a certificate cryptography cannot parse)
                if protocol is not None:
                    protocol.failVerification(Failure())
                return False
            return True

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection
