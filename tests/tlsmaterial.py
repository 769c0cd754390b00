"""
TLS material for tests: a throwaway CA issuing leaf certificates, a
self-signed listener certificate, and the Python client context that does
not verify the server.
"""

import datetime
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relaygw.tls import generateSelfSigned


def makeCA(directory, name="Test CA"):
    """A CA and a function to issue leaf certificates from it (with cryptography)."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    caCert = (x509.CertificateBuilder().subject_name(caName).issuer_name(caName)
              .public_key(caKey.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(caKey, hashes.SHA256()))
    caPath = os.path.join(directory, "ca.pem")
    with open(caPath, "wb") as f:
        f.write(caCert.public_bytes(serialization.Encoding.PEM))

    def issue(label, dns):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
                .issuer_name(caName).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
                .sign(caKey, hashes.SHA256()))
        certPath = os.path.join(directory, label + ".pem")
        keyPath = os.path.join(directory, label + ".key")
        with open(certPath, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(keyPath, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return certPath, keyPath

    return caPath, issue


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
