"""
Trust: who may use the trusted verbs and who may send a PROXY header.

L{TrustPolicy} is the one place that decides it, once per connection from
facts a client cannot forge (the socket peer, the PROXY source from a
trusted balancer, a verified client certificate), kept apart from the
identity that the trusted verbs rewrite.  Trust grants the verbs only:
whether a client may relay is judged by the policy on the claimed identity
(protocol.md section 1).
"""

import dataclasses
import functools
import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from service_identity.cryptography import extract_patterns
from service_identity.exceptions import CertificateError
from service_identity.hazmat import DNS_ID

from relaygw.logs import Logger

log = Logger(namespace="relaygw.trust")


@functools.lru_cache(maxsize=4096)
def peerIP(text):
    """
    The canonical text of a socket's peer or local address.  A scoped
    (link-local) IPv6 address loses its zone: the zone names an interface
    of this host, not the client, and no canonical address carries one.
    """
    if "%" in text:
        text = text.split("%", 1)[0]
    return canonicalIP(text)


def canonicalIP(text):
    """
    Parse an IP address (optionally C{IPv6:}-prefixed) into its canonical
    text, IPv4-mapped IPv6 as IPv4.  Raises C{ValueError} if it is not one.
    """
    return str(parseIP(text))


def clientIP(text):
    """L{canonicalIP}, refusing (C{ValueError}) an address no client connects from (L{isEndpoint})."""
    addr = parseIP(text)
    if not isEndpoint(addr):
        raise ValueError("not a client address")
    return str(addr)


def parseIP(text):
    """The C{ipaddress} address of L{canonicalIP}'s text (C{ValueError} if it is none)."""
    if text[:5].lower() == "ipv6:":
        addr = ipaddress.IPv6Address(text[5:])
    else:
        addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id:
            raise ValueError("scoped IPv6 address")
    return addr


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def isEndpoint(addr):
    """
    Whether the C{ipaddress} address C{addr} can be a TCP connection's end:
    not unspecified (C{0.0.0.0}, C{::}), multicast or the broadcast address.
    A trusted peer naming such a client is making a mistake, not a claim.
    """
    return not (addr.is_unspecified or addr.is_multicast or addr == _BROADCAST)


class Networks:
    """
    An immutable set of networks; C{ip in networks} tests membership.
    IPv4-mapped IPv6 addresses match their IPv4 networks.
    """

    _CACHE_SIZE = 4096

    def __init__(self, cidrs=()):
        self.cidrs = tuple(cidrs)
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in self.cidrs)
        self._answers = {}

    def __contains__(self, ip):
        ip = str(ip)
        answer = self._answers.get(ip)
        if answer is None:
            answer = self._lookup(ip)
            if len(self._answers) >= self._CACHE_SIZE:
                self._answers.clear()
            self._answers[ip] = answer
        return answer

    def _lookup(self, ip):
        try:
            addr = parseIP(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self._nets)

    def __bool__(self):
        return bool(self._nets)

    def __repr__(self):
        return "Networks(%r)" % (self.cidrs,)


def isLocalAddress(ip):
    """Whether C{ip} is loopback or private (used for start-up warnings)."""
    try:
        addr = parseIP(ip)
    except ValueError:
        return False
    if addr.is_unspecified:
        return False  # 0.0.0.0 and :: bind every interface
    return addr.is_loopback or addr.is_private


#: The trusted verbs that claim a client address.
CLAIMING_VERBS = frozenset(("xclient", "xremoteip"))


def countedAddress(context, trusted, extensions):
    """
    The client address the per-IP limits count a session against, or
    C{None} for none.  That is the claimed client's C{remote_ip}; but a
    trusted peer that may claim client identities (a balancer, with
    XCLIENT or XREMOTEIP among C{extensions}) is counted only under the
    addresses it claims for its clients, never under its own (Postfix
    exempts C{$mynetworks} from its client limits): an XCLIENT without
    C{ADDR=} (only C{LOGIN=}, or a line split before its C{ADDR=}) leaves
    it uncounted.  So is a PROXY balancer: its own connections (a version
    2 C{LOCAL} header, or a header naming the balancer itself as the
    client, as HAProxy's health checks over C{send-proxy} do) are not a
    client's, and counting them would have a rate limit refuse the checks
    and the balancer take the server out of its rotation.
    """
    ip = context.get("remote_ip")
    if ip == "unknown" or (trusted and CLAIMING_VERBS & set(extensions) and ip == context.get("peer_ip")):
        return None
    if ip == context.get("proxy_peer_ip"):
        return None
    return ip


def parseClientIdentity(text):
    """
    Parse C{dns:NAME} or C{uri:URI} into C{("dns", DNS_ID)} or
    C{("uri", str)}; L{ValueError} otherwise.
    """
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if not sep or not value:
        raise ValueError("client identity %r: expected dns:NAME or uri:URI" % (text,))
    if kind == "dns":
        return ("dns", DNS_ID(value))
    if kind == "uri":
        return ("uri", value)
    raise ValueError("client identity %r: expected dns:NAME or uri:URI" % (text,))



#: What cryptography raises for a certificate that OpenSSL accepted but it
#: cannot parse (a PrintableString holding an underscore, as some CAs issue
#: them; an unknown version; a malformed or repeated extension): a client
#: asked for a certificate may present anything.
UNPARSABLE = (ValueError, x509.InvalidVersion, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _notForClients(cert):
    """
    Why C{cert} may not authenticate a TLS client, or C{None}: as OpenSSL's
    SSL client purpose (RFC 5280 sections 4.2.1.3, 4.2.1.12), an extended
    key usage, if any, must name clientAuth, and a key usage, if any,
    digitalSignature or keyAgreement (a web server's or an S/MIME
    certificate from the same CA is no balancer's).
    """
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            return "its extended key usage does not allow TLS client authentication"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if not (usage.digital_signature or usage.key_agreement):
            return "its key usage allows neither digital signatures nor key agreement"
    return None

@dataclasses.dataclass(frozen=True)
class Verdict:
    """
    What trust says about one connection.

    @ivar trusted: the trusted verbs (XCLIENT, ...) are granted.  Nothing
        else: relaying is judged by the policy on the claimed identity.
    @ivar why: C{"peer"}, C{"certificate"} or C{None} (untrusted).
    @ivar subject: the verified client certificate's subject, if any.
    """

    trusted: bool = False
    why: str = None
    subject: str = None


UNTRUSTED = Verdict()


class TrustPolicy:
    """
    The one owner of trust for a listener: who may send a PROXY header
    (C{proxy_trusted}), and who may use the trusted verbs: a connection
    whose peer is in C{trusted_peers} (with a PROXY header, the header's
    source, as Postfix judges C{smtpd_authorized_xclient_hosts} on it), or
    one that presented a client certificate chaining to C{tls_client_ca}
    with a name in C{tls_client_identities}.

    Trust grants the verbs only; it never lets a client relay.

    @ivar peers: the C{trusted_peers} L{Networks}.
    @ivar balancers: the C{proxy_trusted} L{Networks}.
    """

    def __init__(self, trustedPeers=(), proxyTrusted=(), clientIdentities=(), tls=None):
        self.peers = Networks(trustedPeers)
        self.balancers = Networks(proxyTrusted)
        self.identities = tuple(parseClientIdentity(i) for i in clientIdentities)
        self.tls = tls
        # The client CA these identities go with.  The listener's TLS
        # settings are one object that a reload naming another CA changes
        # in place: a session pinned to this policy then has no CA to check
        # its certificate against (neither the new CA with these identities,
        # nor the new identities, make it trusted).
        self.clientCA = tls.clientCA if tls is not None else None

    @classmethod
    def fromListener(cls, listener, tls=None):
        return cls(listener.trusted_peers, listener.proxy_trusted, listener.tls_client_identities, tls)

    def balancer(self, ip):
        """
        Whether socket peer C{ip} may open a connection with a PROXY header.
        A link-local peer's zone is not part of its address (L{peerIP}), as
        for C{trusted_peers}.
        """
        try:
            ip = peerIP(ip)
        except (TypeError, ValueError):
            return False
        return ip in self.balancers

    def forConnection(self, peer, proxied=None):
        """
        The L{Verdict} for a new connection.

        @param peer: the client-level peer address: the socket peer, or
            the PROXY source when a trusted balancer sent a header.
        @param proxied: the L{relaygw.proxy.ProxyInfo} or C{None}; its
            balancer gets no trust from having sent the header.
        """
        if peer in self.peers:
            return Verdict(True, "peer")
        return UNTRUSTED

    def afterHandshake(self, transport, verdict=UNTRUSTED):
        """
        The L{Verdict} once TLS is up: a client certificate that chains to
        the listener's client CA and names an allowed identity makes the
        connection trusted; otherwise C{verdict} stands.
        """
        if verdict.trusted or self._clientCAStore() is None:
            return verdict
        ok, subject = self.verifyCertificate(transport)
        return Verdict(True, "certificate", subject) if ok else verdict

    def _clientCAStore(self):
        """The store of the client CA this policy was built with, or C{None} (none, or no longer the listener's)."""
        if self.tls is None or self.tls.clientCA != self.clientCA:
            return None
        return self.tls.clientCAStore

    def verifyCertificate(self, transport):
        """
        Check the client certificate of a connection after its handshake.

        @param transport: a TLS transport (with C{getHandle}).
        @return: C{(True, subject)} if the client presented a certificate that
            chains to the client CA and whose DNS or URI subjectAltName
            matches an allowed identity; C{(False, subject or None)}
            otherwise.  DNS names follow RFC 6125 (a certificate wildcard may
            match); URIs must be equal.
        """
        connection = transport.getHandle()
        peer = connection.get_peer_certificate()
        if peer is None:
            return False, None
        try:
            leaf = peer.to_cryptography()
            subject = leaf.subject.rfc4514_string()
        except UNPARSABLE as e:
            log.info("client certificate not verified: it cannot be parsed: {error}", error=e)
            return False, None
        store = self._clientCAStore()
        if store is None or not self.identities:
            return False, subject
        # (compared as OpenSSL has them: the chain is never parsed here)
        leafDER = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)
        untrusted = [
            c
            for c in connection.get_peer_cert_chain() or []
            if crypto.dump_certificate(crypto.FILETYPE_ASN1, c) != leafDER
        ]
        try:
            crypto.X509StoreContext(store, peer, untrusted).verify_certificate()
        except crypto.X509StoreContextError as e:
            log.info("client certificate {subject} not verified: {error}", subject=subject, error=e)
            return False, subject
        try:
            unfit = _notForClients(leaf)
            matches = unfit is None and self._matches(leaf)
        except UNPARSABLE as e:
            unfit = "its extensions cannot be parsed: %s" % (e,)
        except CertificateError as e:  # (a name pattern service_identity will not match: "*.*.example")
            unfit = "its names cannot be matched: %s" % (e,)
        if unfit:
            log.info("client certificate {subject} not verified: {error}", subject=subject, error=unfit)
            return False, subject
        return matches, subject

    def _matches(self, cert):
        patterns = extract_patterns(cert)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            uris = []
        else:
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        for kind, identity in self.identities:
            if kind == "dns" and any(identity.verify(p) for p in patterns):
                return True
            if kind == "uri" and identity in uris:
                return True
        return False
