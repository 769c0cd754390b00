"""
TLS material for tests: certificates built with cryptography and written
as PEM, a throwaway CA issuing leaf certificates, a self-signed listener
certificate, and the Python client context that does not verify the
server.
"""

import datetime
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from relaygw.tls import generateSelfSigned


def commonName(cn):
    """The x509 name C{CN=cn}."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def newKey():
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


#: The extension that makes a certificate a CA's: C{(extension, critical)}.
CA = (x509.BasicConstraints(ca=True, path_length=None), True)


def altNames(*names):
    """The subject alternative names C{names} (x509 GeneralNames): C{(extension, critical)}."""
    return (x509.SubjectAlternativeName(list(names)), False)


def certificate(subject, issuer, key, signer, days, *extensions):
    """
    A certificate of the public half of C{key} for C{subject}, issued by
    C{issuer} (x509 names) and signed with C{signer}, valid from a day ago
    for C{days} days, with C{extensions} (C{(extension, critical)} pairs).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def pem(item):
    """A certificate, or a private key (PKCS#8, not encrypted), as PEM bytes."""
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())


def writePEM(path, *items):
    """Write C{items} (certificates and keys) to C{path} as PEM; returns C{path}."""
    with open(path, "wb") as f:
        for item in items:
            f.write(pem(item))
    return path


def makeCA(directory, name="Test CA"):
    """
    A CA in C{directory}: the path of its certificate, and a function
    C{issue(label, dns, *extensions)} that issues a leaf certificate for
    C{dns} from it, with C{extensions} too (C{(extension, critical)}),
    written as C{label}.pem and C{label}.key; returns their paths.
    """
    os.makedirs(directory, exist_ok=True)
    caKey = newKey()
    caName = commonName(name)
    caPath = writePEM(os.path.join(directory, "ca.pem"), certificate(caName, caName, caKey, caKey, 30, CA))

    def issue(label, dns, *extensions):
        key = newKey()
        cert = certificate(commonName(dns), caName, key, caKey, 30, altNames(x509.DNSName(dns)), *extensions)
        return (writePEM(os.path.join(directory, label + ".pem"), cert),
                writePEM(os.path.join(directory, label + ".key"), key))

    def issueUnreadable(label, dns):
        """As C{issue}, but the certificate is an L{unreadableCertificate}."""
        key = newKey()
        path = os.path.join(directory, label + ".pem")
        with open(path, "w") as f:
            f.write(ssl.DER_cert_to_PEM_cert(unreadableCertificate(caName, caKey, key, x509.DNSName(dns))))
        return path, writePEM(os.path.join(directory, label + ".key"), key)

    issue.unreadable = issueUnreadable
    return caPath, issue


def unreadableCertificate(issuer, signer, key, *names):
    """
    The DER of a certificate of C{key} for C{names} (x509 GeneralNames),
    issued by C{issuer} and signed with C{signer}, whose subject common name
    is a PrintableString holding an underscore: OpenSSL reads it (some CAs
    issue such names), cryptography refuses to parse the certificate.
    """
    placeholder = "lb" + "X" * 8
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, placeholder, _ASN1Type.PrintableString)])
    cert = certificate(name, issuer, key, signer, 30, altNames(*names))
    return _resigned(cert, signer, placeholder.encode(), b"lb_" + b"X" * 7)


def _derLength(n):
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _derContent(data, offset):
    """Where the content of the DER element at C{offset} starts and ends."""
    first = data[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    n = first & 0x7F
    start = offset + 2 + n
    return start, start + int.from_bytes(data[offset + 2:start], "big")


def _resigned(cert, signer, old, new):
    """The DER of C{cert} with C{old} replaced by C{new} (as long) in its to-be-signed part, signed again."""
    der = cert.public_bytes(serialization.Encoding.DER)
    tbsStart, _ = _derContent(der, 0)
    _, tbsEnd = _derContent(der, tbsStart)
    _, algorithmEnd = _derContent(der, tbsEnd)
    tbs = der[tbsStart:tbsEnd]
    assert len(old) == len(new) and tbs.count(old) == 1
    tbs = tbs.replace(old, new)
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA256()))
    body = tbs + der[tbsEnd:algorithmEnd] + b"\x03" + _derLength(len(signature) + 1) + b"\x00" + signature
    return b"\x30" + _derLength(len(body)) + body


def clientContext(cert=None, maximum=None):
    """
    A Python client context that does not verify the server, presenting
    C{cert} (C{(certPath, keyPath)}) if given, up to TLS version C{maximum}
    if given.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def selfSignedListener(testcase):
    """
    A self-signed certificate for relay.test in C{testcase.tlsdir}
    (C{.cert}, C{.key}), and C{testcase.listener}: its C{tlsListener}
    with that certificate.
    """
    testcase.tlsdir = os.path.abspath(testcase.mktemp())
    os.makedirs(testcase.tlsdir)
    testcase.cert = os.path.join(testcase.tlsdir, "cert.pem")
    testcase.key = os.path.join(testcase.tlsdir, "key.pem")
    generateSelfSigned(testcase.cert, testcase.key, "relay.test")
    testcase.listener = dict(testcase.tlsListener, tls_certificate=testcase.cert, tls_key=testcase.key)
