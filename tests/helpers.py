"""
Shared test helpers: gateways on loopback ports, TLS material, relay
set-ups, PROXY headers and XDUMPCONTEXT readers.  Test modules import
these from here, never from each other.
"""

import datetime
import email
import ipaddress
import os
import relaygw
import socket
import ssl
import struct
import time
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relaygw import testing
from relaygw.testing import (
    Client, Gateway, MemorySink, ScriptedSMTPFactory, ScriptedSMTPServer, SessionHarness, inThread,
)
from relaygw.tls import generateSelfSigned


class GatewayTestCase(unittest.TestCase):
    """Starts a gateway with C{listener} overrides for each test."""

    listener = {}
    relay = None

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=(dict(self.listener),), relay=self.relay)
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def client(self):
        c = Client(self.gw.port)
        self.addCleanup(c.close)
        return c

    def session(self, f):
        """Run C{f(client)} in a thread after the greeting was read."""

        def run():
            c = self.client()
            code, _ = c.reply()
            self.assertEqual(code, 220)
            return f(c)

        return inThread(run)


def makeCA(directory, name="Test CA"):
    """A CA and a function to issue leaf certificates from it (with cryptography)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

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


def clientContext(cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
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


class TLSGatewayTestCase(GatewayTestCase):
    tlsListener = {}

    @defer.inlineCallbacks
    def setUp(self):
        selfSignedListener(self)
        yield GatewayTestCase.setUp(self)

    def starttls(self, c, cert=None):
        """STARTTLS on raw client C{c}; returns the TLS socket wrapped into the client."""
        self.assertEqual(c.cmd("STARTTLS"), (220, ["2.0.0 Ready to start TLS"]))
        c.sock = clientContext(cert).wrap_socket(c.sock, server_hostname="relay.test")
        return c


FAST = {"retry_min": 0.3, "retry_max": 0.6}


#: The source tree under test (child processes must run it, not an installed copy).
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(relaygw.__file__)))


def sourceEnv():
    """The environment for a child process that imports relaygw from L{SOURCE}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SOURCE] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def runTwistd(configPath, cwd):
    """
    C{twistd -n relaygw} from the source tree as a child process, its
    output appended to C{cwd}/twistd.log; returns the Popen.
    """
    with open(os.path.join(cwd, "twistd.log"), "ab") as log:
        return testing.runTwistd(configPath, cwd, stdout=log, env=sourceEnv())


def sendOne(port, mailfrom="a@example.org", rcpts=("b@example.net",), subject="relay", before=()):
    c = Client(port)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        for line in before:
            code, lines = c.cmd(line)
            assert code in (220, 250), (line, code, lines)
        assert c.cmd("MAIL FROM:<%s>" % mailfrom)[0] == 250
        for r in rcpts:
            assert c.cmd("RCPT TO:<%s>" % r)[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send("Subject: %s\r\n\r\nbody of %s\r\n.\r\n" % (subject, subject))
        code, lines = c.reply()
        assert code == 250, (code, lines)
        return lines[0].rsplit(" ", 1)[1]
    finally:
        c.close()


class TrackingHopServer(ScriptedSMTPServer):
    """
    A scripted next hop that greets its first connection only after
    C{factory.greetDelay} seconds (so messages pile up behind that busy
    connection) and notes, for each transaction, the index of its connection
    and the ADDR that connection was last given with XCLIENT.
    """

    def connectionMade(self):
        self.xaddr = None
        self.greetCall = None
        ScriptedSMTPServer.connectionMade(self)
        delay = self.factory.greetDelay if len(self.factory.connections) == 1 else 0
        self.greetCall = reactor.callLater(delay, self.sendLine, b"220 scripted.example.test ESMTP")

    def connectionLost(self, reason):
        if self.greetCall is not None and self.greetCall.active():
            self.greetCall.cancel()
        ScriptedSMTPServer.connectionLost(self, reason)

    def lineReceived(self, line):
        if not self.inData and line.upper().startswith(b"XCLIENT "):
            for word in line.decode().split()[1:]:
                if word.upper().startswith("ADDR="):
                    self.xaddr = word[5:]
        before = len(self.factory.transactions)
        ScriptedSMTPServer.lineReceived(self, line)
        if len(self.factory.transactions) > before:
            self.factory.transactions[-1]["xaddr"] = self.xaddr
            self.factory.transactions[-1]["connection"] = self.factory.connections.index(self)


class TrackingHopFactory(ScriptedSMTPFactory):
    protocol = TrackingHopServer

    def __init__(self, greetDelay=0.0, **kw):
        ScriptedSMTPFactory.__init__(self, greeting=None, **kw)
        self.greetDelay = greetDelay


def deliveryStatus(data):
    """The blocks (field groups) of the message/delivery-status part of a DSN, parsed."""
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.get_payload() if p.get_content_type() == "message/delivery-status"]
    return [dict(block.items()) for block in status.get_payload()]


class RelayTestCase(unittest.TestCase):
    timeout = 60

    def hop(self, factory=None, interface="127.0.0.1", port=0, **kw):
        factory = factory or ScriptedSMTPFactory(**kw)
        listening = reactor.listenTCP(port, factory, interface=interface)
        self.addCleanup(self._closeHop, listening, factory)
        return factory, listening.getHost().port

    def _closeHop(self, port, factory):
        for c in factory.connections:
            call = getattr(c, "greetCall", None)
            if call is not None and call.active():
                call.cancel()
            c.transport.loseConnection()
        return port.stopListening()

    @defer.inlineCallbacks
    def gateway(self, relay, listener=None, routes=()):
        listener = dict({"relay_networks": ["127.0.0.0/8"]}, **(listener or {}))
        gw = Gateway(self.mktemp(), listeners=(listener,), relay=dict(FAST, **relay), routes=routes)
        yield gw.start()
        self.addCleanup(gw.stop)
        self.gw = gw
        return gw

    def send(self, **kw):
        return inThread(sendOne, self.gw.port, **kw)

    @defer.inlineCallbacks
    def until(self, predicate, timeout=15):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %r" % (predicate,))
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def fourBehindSlowHop(self, concurrency):
        """
        Send messages m0..m3 (to r0..r3) one after the other to a next hop
        that greets each connection only after 1.5 s; returns the hop once
        all four are delivered.
        """
        hop = TrackingHopFactory(greetDelay=1.5, extensions=["PIPELINING"])
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": concurrency})
        for n in range(4):
            yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))
        yield self.until(lambda: len(hop.transactions) == 4 and self.spoolEmpty())
        return hop

    def spoolEmpty(self):
        """No message queued or in flight, and no progress or hold file left behind."""
        spool = self.gw.service.spool
        return (not spool.queueIds() and not self.gw.service.queue.active
                and not os.listdir(spool.path("state")) and not os.listdir(spool.path("hold")))


#: The PROXY protocol version 2 signature.
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command=1, family=1, transport=1, src="192.0.2.7", dst="198.51.100.1", sport=4567, dport=25,
       tlvs=b"", version=2):
    """A version 2 header (addresses omitted for LOCAL)."""
    if command == 0:
        body = b""
    elif family == 1:
        body = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    elif family == 2:
        body = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
    else:
        body = b"\x00" * 216
    body += tlvs
    return SIG + bytes([(version << 4) | command, (family << 4) | transport]) + struct.pack("!H", len(body)) + body


def rawSession(port, header, then=b""):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(header + then)
    return s


def dump(c):
    """XDUMPCONTEXT as C{{(scope, key): value}}, checking the line format."""
    code, lines = c.cmd("XDUMPCONTEXT")
    assert code == 250, (code, lines)
    assert lines[-1] == "2.0.0 XDUMPCONTEXT complete", lines
    out = {}
    for line in lines[:-1]:
        assert line.startswith("2.0.0 ["), line
        scope, _, rest = line[7:].partition("] ")
        key, _, value = rest.partition(" ")
        out[(scope, key)] = value
    return out


def conn(c):
    """The connection scope of XDUMPCONTEXT as a dict."""
    return {k: v for (scope, k), v in dump(c).items() if scope == "connection"}


def _transaction(c, mailfrom, rcpt, subject):
    """MAIL, RCPT, DATA and the content on client C{c} (asserts every step up to the content)."""
    code, lines = c.cmd("MAIL FROM:<%s>" % mailfrom)
    assert code == 250, (code, lines)
    code, lines = c.cmd("RCPT TO:<%s>" % rcpt)
    assert code == 250, (code, lines)
    code, lines = c.cmd("DATA")
    assert code == 354, (code, lines)
    c.send("Subject: %s\r\n\r\nbody\r\n.\r\n" % subject)


def _queueId(reply):
    code, lines = reply
    assert code == 250, (code, lines)
    return lines[0].rsplit(" ", 1)[1]


def sendMessage(c, mailfrom="a@example.org", rcpt="b@example.net", subject="verbs"):
    """MAIL, RCPT, DATA; returns the queue id (asserts every step)."""
    _transaction(c, mailfrom, rcpt, subject)
    return _queueId(c.reply())


@defer.inlineCallbacks
def queueMessage(c, mailfrom="a@example.org", rcpt="b@example.net", subject="verbs"):
    """
    L{sendMessage} for a harness session (L{SessionClient}) on the real
    spool: waits for the end-of-data reply; fires with the queue id.
    """
    _transaction(c, mailfrom, rcpt, subject)
    return _queueId((yield c.whenReply()))


def spoolPids(directory):
    """The pids named by the spool's lock files: {partition: pid}."""
    out = {}
    spool = os.path.join(directory, "spool")
    for name in sorted(os.listdir(spool)):
        path = os.path.join(spool, name, "lock")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                out[name] = int(text)
    return out


def processAlive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not reaped yet) is not alive
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def portRefused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def waitUntil(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


class SessionTestCase(unittest.TestCase):
    """
    One SMTP session per client on a StringTransport with a task.Clock
    (L{SessionHarness}), no sockets: C{listener} overrides, and accepted
    messages kept in C{self.sink} (a L{MemorySink}).  C{session(f)} runs
    C{f(client)} after the greeting, as L{GatewayTestCase.session} does
    over a socket.

    With C{realSpool} set, accepted messages go to the harness's real
    spool instead (C{self.sink} is None), which adds the Received header:
    read them back with L{spooled}; the end-of-data reply then waits for
    the disk thread (L{queueMessage}).
    """

    listener = {}
    realSpool = False

    def setUp(self):
        self.sink = None if self.realSpool else MemorySink()
        self.harness = SessionHarness(self.mktemp(), dict(self.listener), sink=self.sink)
        self.addCleanup(self.harness.close)
        self.clock = self.harness.clock

    def spooled(self, n=1):
        """The messages queued so far, C{[(message, content)]}, asserting there are C{n}."""
        self.assertEqual(len(self.harness.queued), n, self.harness.queued)
        return [self.harness.spooled(queueId) for queueId in self.harness.queued]

    def client(self):
        c = self.harness.connect()
        self.addCleanup(c.lose)
        return c

    def session(self, f):
        c = self.client()
        code, _ = c.reply()
        self.assertEqual(code, 220)
        return f(c)


class TLSSessionTestCase(SessionTestCase):
    """
    L{SessionTestCase} on a listener with a self-signed certificate for
    relay.test (C{tlsListener} overrides); C{starttls(c)} runs STARTTLS with
    a real TLS handshake in memory (L{SessionClient.starttls}).
    """

    tlsListener = {}

    def setUp(self):
        selfSignedListener(self)
        SessionTestCase.setUp(self)

    def starttls(self, c, cert=None):
        """STARTTLS on harness client C{c}, then the client's handshake; returns C{c}."""
        self.assertEqual(c.cmd("STARTTLS"), (220, ["2.0.0 Ready to start TLS"]))
        c.starttls(clientContext(cert))
        return c


@defer.inlineCallbacks
def authReply(harness, c, line):
    """
    Send an AUTH line (or an AUTH exchange line) on harness client C{c} and
    wait for its reply: the harness clock runs the wait before verifying
    that recent failures from the client impose, and the password is hashed
    in the reactor's threads.
    """
    wait = harness.factory.authFailures.delay(c.session.context["remote_ip"])
    c.send(line + "\r\n")
    harness.clock.advance(wait)
    reply = yield c.whenReply()
    return reply


class LogCapture:
    """Collects every log event while a test runs."""

    def __init__(self, testcase):
        self.events = []
        self._observer = self.events.append
        globalLogPublisher.addObserver(self._observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observer)

    def find(self, formatPart, **fields):
        return [e for e in list(self.events)
                if formatPart in (e.get("log_format") or "") and all(e.get(k) == v for k, v in fields.items())]


def chunked(stream, cuts):
    """C{stream} cut at the offsets C{cuts} (any integers, taken modulo its length + 1), in order."""
    cuts = sorted({c % (len(stream) + 1) for c in cuts})
    out, last = [], 0
    for c in cuts + [len(stream)]:
        out.append(stream[last:c])
        last = c
    return out


def recordEnvelopes(gateway):
    """
    A list that collects the envelope of each message C{gateway} accepts
    (the validation context it was accepted with), before the queue
    manager delivers it.
    """
    envelopes = []
    factory = gateway.service.factories[0]
    original = factory.onQueued

    def onQueued(queueId, message):
        envelopes.append(message.envelope)
        return original(queueId, message)

    factory.onQueued = onQueued
    return envelopes
