"""
Accepted means delivered once and whole: messages of random, binary-ish
content sent over loopback sockets (raw, in segments of random sizes, and
with smtplib) reach a scripted next hop octet for octet as the gateway
stored them, the gateway's own Received header first.  What the gateway
stores is the content after RFC 5321 section 4.5.2 dot-unstuffing, with a
bare LF taken as a line end (protocol.md section 2, C{normalize}), as the
line-by-line model of L{tests.test_datareader} has it.
"""

import os
import random
import re
import smtplib
import socket
import time

from twisted.internet import defer
from twisted.internet.ssl import PrivateCertificate

from relaygw.testing import Gateway, inThread
from tests.relaysetup import FAST, RelayTestCase
from tests.test_datareader import model
from tests.tlsmaterial import clientContext, makeCA, selfSignedListener

#: Octets any one line can be: the scripted next hop reads lines of up to 1 MB.
_LONGEST = 200000

_ALPHABET = bytes(range(32, 127))


def _line(rng):
    """One line of content, without its end."""
    kind = rng.randrange(16)
    if kind == 0:
        return b""
    if kind == 1:
        return rng.choice([b".", b"..", b". ", b"...", b".\r", b"\x00", b"\r"])
    if kind == 2:
        return b"." * rng.randrange(1, 4) + bytes(rng.choice(_ALPHABET) for _ in range(rng.randrange(20)))
    if kind == 3:
        n = rng.choice([997, 998, 999, 1000, 1001])
        return bytes(rng.choice(_ALPHABET) for _ in range(n))
    if kind == 4 and rng.random() < 0.2:
        return rng.randbytes(rng.randrange(2000, _LONGEST)).replace(b"\n", b"x")
    if kind == 5:
        return rng.choice([b"Received: from elsewhere", b"From: a@example.org", b"Subject: headers in the body",
                           b"\tfolded", b"MAIL FROM:<x@example.org>", b"QUIT"])
    if kind in (6, 7):
        return rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b"")
    return bytes(rng.choice(_ALPHABET) for _ in range(rng.randrange(1, 100)))


def content(rng, bareLF):
    """A message's content as the client means it (before dot-stuffing)."""
    out = []
    for _ in range(rng.choice([0, 1, 2, 5, 20, 60])):
        end = b"\r\n"
        if bareLF and rng.random() < 0.2:
            end = b"\n"
        elif rng.random() < 0.03:
            end = b"\r\r\n"
        out.append(_line(rng) + end)
    data = b"".join(out)
    if data and rng.random() < 0.15:
        data = data.rstrip(b"\n").rstrip(b"\r")  # (no final line end: the client adds one before the dot)
    return data


def stuffed(data):
    """C{data} as a client sends it after DATA: dot-stuffed at every line start, then the end of data."""
    wire = data.replace(b"\n.", b"\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


def delivered(stored):
    """
    What the next hop gets after the Received header for C{stored}
    content: the same, an empty line first where its first line starts
    with a space or tab (L{relaygw.sink}).
    """
    return b"\r\n" + stored if stored[:1] in (b" ", b"\t") else stored


def withoutReceived(data):
    """The content the next hop got, less the gateway's Received header (up to its date, in UTC)."""
    assert data.startswith(b"Received: from "), data[:100]
    return data[data.index(b" +0000\r\n") + 8:]


class RawSender:
    """One connection to the gateway, sending each message in segments of random sizes."""

    def __init__(self, port, rng, tls=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rng = rng
        self.buf = b""
        assert self.reply()[0] == 220
        self.command(b"EHLO fuzz.example")
        if tls:
            assert self.command(b"STARTTLS")[0] == 220
            self.sock = clientContext().wrap_socket(self.sock)
            self.command(b"EHLO fuzz.example")

    def reply(self):
        lines = []
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(self.buf)
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            lines.append(line.rstrip(b"\r").decode("latin-1"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), lines

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def segments(self, wire):
        rng = self.rng
        pos = 0
        while pos < len(wire):
            size = rng.choice([1, 2, 3, 5, 7, 64, 1000, 4096, 65536, 1 << 20])
            self.sock.sendall(wire[pos:pos + size])
            pos += size
            if rng.random() < 0.02:
                time.sleep(0.002)

    envelopeSent = False

    def envelope(self, rcpt):
        """MAIL, RCPT and DATA for C{rcpt} as one group (RFC 2920), DATA last."""
        return b"MAIL FROM:<fuzz@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode()

    def envelopeReplies(self):
        replies = [self.reply() for _ in range(3)]
        assert [code for code, _ in replies] == [250, 250, 354], replies

    def message(self, rcpt, wire, nextRcpt=None):
        """
        One transaction; the reply to its end of data.  With C{nextRcpt},
        the envelope of the next message is sent right behind the end of
        data, in the same segment.
        """
        if not self.envelopeSent:
            self.sock.sendall(self.envelope(rcpt))
            self.envelopeReplies()
        self.segments(wire[:-5])
        self.sock.sendall(wire[-5:] + (self.envelope(nextRcpt) if nextRcpt else b""))
        reply = self.reply()
        self.envelopeSent = bool(nextRcpt)
        if nextRcpt:
            self.envelopeReplies()
        return reply

    def close(self):
        try:
            self.command(b"QUIT")
        finally:
            self.sock.close()


def sendAll(port, plan, seed, tls=False):
    """
    Send C{plan} (C{(how, rcpt, wire or content)}, in order) to the
    gateway, over STARTTLS if C{tls}; returns each message's end-of-data
    reply code and enhanced code.
    """
    rng = random.Random(seed)
    replies = {}
    raw = None
    for index, (how, rcpt, data) in enumerate(plan):
        if how == "smtplib":
            if raw is not None:
                raw.close()
                raw = None
            with smtplib.SMTP("127.0.0.1", port, local_hostname="fuzz.example", timeout=20) as s:
                if tls:
                    s.starttls(context=clientContext())
                try:
                    s.sendmail("fuzz@example.org", [rcpt], data)
                    replies[rcpt] = (250, "2.0.0")
                except smtplib.SMTPDataError as e:
                    replies[rcpt] = (e.smtp_code, e.smtp_error.decode("latin-1").split(" ", 1)[0])
            continue
        if raw is None or (not raw.envelopeSent and rng.random() < 0.3):
            if raw is not None:
                raw.close()
            raw = RawSender(port, rng, tls)
        following = plan[index + 1] if index + 1 < len(plan) else None
        ahead = following[1] if following and following[0] == "raw" and rng.random() < 0.4 else None
        code, lines = raw.message(rcpt, data, ahead)
        replies[rcpt] = (code, lines[0][4:].split(" ", 1)[0])
    if raw is not None:
        raw.close()
    return replies


def smtplibWire(data):
    """What smtplib sends for bytes C{data} after DATA: dot-stuffed, a final CRLF, the end of data."""
    data = smtplib._quote_periods(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class TransparencyFuzzTests(RelayTestCase):
    """A fixed seed's messages, each checked end to end."""

    SEED = 20261206
    CASES = 70
    LIMIT = 400000

    def plan(self):
        """
        The messages: C{(how, rcpt, what is sent, what the gateway stores,
        whether a line ends in a bare LF)}.
        """
        rng = random.Random(self.SEED)
        cases = []
        for n in range(self.CASES):
            data = content(rng, bareLF=rng.random() < 0.15)
            if n % 10 == 3:  # (past the spill to the queue file, and the producer's chunks)
                data += b"".join(rng.randbytes(rng.randrange(1000, 90000)).replace(b"\n", b".") + b"\r\n"
                                 for _ in range(4))
            rcpt = "m%d@example.net" % n
            if n % 7 == 5:
                stored, _, bare = model(smtplibWire(data))
                cases.append(("smtplib", rcpt, data, stored, bare))
            else:
                wire = stuffed(data)
                stored, _, bare = model(wire)
                cases.append(("raw", rcpt, wire, stored, bare))
        # Exactly at the size limit, and one octet over it.
        for n, size in ((self.CASES, self.LIMIT), (self.CASES + 1, self.LIMIT + 1)):
            lines = [b"x" * 998 + b"\r\n"] * ((size - 2) // 1000)
            data = b"".join(lines) + b"y" * (size - 1000 * len(lines) - 2) + b"\r\n"
            cases.append(("raw", "m%d@example.net" % n, stuffed(data), model(stuffed(data))[0], False))
        return cases

    def test_acceptedIsDeliveredWhole(self):
        return self.fuzz(tls=False)

    def test_acceptedIsDeliveredWholeOverTLS(self):
        """The same, with STARTTLS on the way in and on the way out."""
        return self.fuzz(tls=True)

    def test_bareLFRefusedBeforeTheReply(self):
        """With C{bare_lf = "reject"}, content with a bare LF gets 550 5.5.2 at its end, and goes nowhere."""
        return self.fuzz(tls=False, bareLF="reject")

    tlsListener = {"relay_networks": ["127.0.0.0/8"]}

    @defer.inlineCallbacks
    def fuzz(self, tls, bareLF="normalize"):
        listener, relay, hopTLS = {"max_message_size": self.LIMIT, "bare_lf": bareLF}, {}, None
        if tls:
            selfSignedListener(self)
            listener.update(tls_certificate=self.cert, tls_key=self.key)
            ca, issue = makeCA(os.path.abspath(self.mktemp()))
            cert, key = issue("hop", "localhost")
            with open(cert) as c, open(key) as k:
                hopTLS = PrivateCertificate.loadPEM(c.read() + k.read()).options()
            relay = {"tls": "verify", "tls_ca": ca}
        hop, port = self.hop(extensions=["PIPELINING", "8BITMIME", "SIZE 100000000"], tls=hopTLS)
        gw = yield self.gateway(dict(relay, smarthosts=["[%s]:%d" % ("localhost" if tls else "127.0.0.1", port)]),
                                listener=listener)
        cases = self.plan()
        replies = yield inThread(sendAll, gw.port, [(how, rcpt, sent) for how, rcpt, sent, _, _ in cases],
                                 self.SEED, tls)
        expected = {}
        for how, rcpt, _, stored, bare in cases:
            code, enhanced = replies[rcpt]
            if len(stored) > self.LIMIT:
                self.assertEqual((code, enhanced), (552, "5.3.4"), rcpt)
            elif bare and bareLF == "reject":
                self.assertEqual((code, enhanced), (550, "5.5.2"), rcpt)
            else:
                self.assertEqual((code, enhanced), (250, "2.0.0"), rcpt)
                expected[rcpt] = delivered(stored)
        yield self.until(lambda: len(hop.transactions) >= len(expected) and self.spoolEmpty(), timeout=40)
        got = {}
        for t in hop.transactions:
            [rcpt] = t["rcpts"]
            self.assertNotIn(rcpt, got, "delivered twice")
            got[rcpt] = withoutReceived(t["data"])
        self.assertEqual(sorted(got), sorted(expected))
        mismatches = [r for r in expected if got[r] != expected[r]]
        self.assertEqual(mismatches, [])
        if tls:
            self.assertTrue(all(t["tls"] for t in hop.transactions))
        self.assertTrue(sum(map(len, expected.values())) > 1000000)
        self.assertTrue(any(bare for _, _, _, _, bare in cases))
        self.assertEqual([len(cases[-2][3]), replies[cases[-2][1]]], [self.LIMIT, (250, "2.0.0")])


class RecoveredTransparencyTests(RelayTestCase):
    """
    Messages read back from the queue files after a restart go out whole
    too, those written over the files of messages delivered before
    (C{spent/}) included.
    """

    SEED = 7

    @defer.inlineCallbacks
    def test_afterRestart(self):
        rng = random.Random(self.SEED)
        early, cases = [], []
        for n in range(6):  # (delivered at once: their files are the next ones' to overwrite)
            wire = stuffed(content(rng, bareLF=False) + b"x" * rng.randrange(20000, 60000) + b"\r\n")
            early.append(("raw", "s%d@example.net" % n, wire, model(wire)[0]))
        for n in range(12):
            data = content(rng, bareLF=n % 3 == 0)
            if n % 4 == 1:
                data += rng.randbytes(300000).replace(b"\n", b"\r") + b"\r\n"
            wire = stuffed(data)
            cases.append(("raw", "r%d@example.net" % n, wire, model(wire)[0]))
        directory = self.mktemp()
        deferring, dport = self.hop(extensions=["PIPELINING", "8BITMIME"],
                                    rcpt={rcpt: "451 4.3.0 later" for _, rcpt, _, _ in cases})
        first = Gateway(directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                        relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % dport]))
        self.gw = first
        yield first.start()
        stopped = []
        self.addCleanup(lambda: None if stopped else first.stop())
        replies = yield inThread(sendAll, first.port, [(how, rcpt, wire) for how, rcpt, wire, _ in early], self.SEED)
        yield self.until(lambda: len(deferring.transactions) >= len(early) and self.spoolEmpty())
        self.assertTrue(os.listdir(first.service.spool.path("spent")))
        replies.update((yield inThread(sendAll, first.port, [(how, rcpt, wire) for how, rcpt, wire, _ in cases],
                                       self.SEED)))
        self.assertEqual(set(replies.values()), {(250, "2.0.0")})
        yield self.until(lambda: all("RCPT TO:<%s>" % rcpt in deferring.lines for _, rcpt, _, _ in cases))
        yield first.stop()
        stopped.append(True)
        hop, port = self.hop(extensions=["PIPELINING", "8BITMIME"])
        self.gw = second = Gateway(directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                                   relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % port]))
        yield second.start()
        self.addCleanup(second.stop)
        yield self.until(lambda: len(hop.transactions) >= len(cases) and self.spoolEmpty(), timeout=30)
        got = {}
        for t in deferring.transactions + hop.transactions:
            [rcpt] = t["rcpts"]
            self.assertNotIn(rcpt, got, "delivered twice")
            got[rcpt] = withoutReceived(t["data"])
        expected = {rcpt: delivered(stored) for _, rcpt, _, stored in early + cases}
        self.assertEqual(sorted(got), sorted(expected))
        self.assertEqual([r for r in expected if got[r] != expected[r]], [])


def returnedHeaders(stored):
    """
    What a bounce returns of the header section of C{stored} (a message
    as stored), as L{relaygw.relay.dsn} documents it: whole lines,
    NUL and bare CR as "?", a line over 998 octets continued on the next.
    """
    end = stored.find(b"\r\n\r\n")
    section = stored[:end + 2] if end != -1 else stored[:stored.rfind(b"\r\n") + 2]
    out = []
    for line in section.split(b"\r\n")[:-1]:
        line = line.replace(b"\x00", b"?").replace(b"\r", b"?")
        while len(line) > 998:
            cut = 998
            while 0x80 <= line[cut] < 0xC0 and cut > 995:
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


class BouncedTransparencyTests(RelayTestCase):
    """A bounce returns the header section the gateway accepted, as documented."""

    SEED = 11

    @defer.inlineCallbacks
    def test_returnedHeaders(self):
        rng = random.Random(self.SEED)
        cases = []
        for n in range(16):
            header = b"".join(rng.choice([b"Subject: ", b"X-Fuzz: ", b"\t", b" "]) + _line(rng)[:5000] + b"\r\n"
                              for _ in range(rng.randrange(0, 6)))
            data = header + rng.choice([b"\r\nbody\r\n", b"", b"\r\n", b"\r\n.\r\n..\r\n"])
            wire = stuffed(data)
            cases.append(("raw", "bad%d@example.net" % n, wire, model(wire)[0]))
        hop, port = self.hop(extensions=["PIPELINING", "8BITMIME"],
                             rcpt={rcpt: "550 5.1.1 no such user" for _, rcpt, _, _ in cases})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        replies = yield inThread(sendAll, self.gw.port, [(how, rcpt, wire) for how, rcpt, wire, _ in cases],
                                 self.SEED)
        self.assertEqual(set(replies.values()), {(250, "2.0.0")})
        yield self.until(lambda: len(hop.transactions) >= len(cases) and self.spoolEmpty(), timeout=30)
        bounced = {}
        for t in hop.transactions:
            self.assertEqual((t["mailfrom"], t["rcpts"]), ("", ["fuzz@example.org"]))
            data = t["data"]
            self.assertTrue(all(len(line) <= 998 for line in data.split(b"\r\n")))
            part = data.index(b"Content-Type: text/rfc822-headers\r\n")
            part = data.index(b"\r\n\r\n", part) + 4
            returned = data[part:data.rindex(b"\r\n--relaygw-")]
            rcpt = re.search(rb"Final-Recipient: rfc822; (\S+)\r\n", data).group(1).decode()
            self.assertNotIn(rcpt, bounced)
            bounced[rcpt] = withoutReceived(returned)
        received = b"Received: from fuzz.example; Sun, 6 Dec 2026 00:00:00 +0000\r\n"
        expected = {rcpt: withoutReceived(returnedHeaders(received + delivered(stored)))
                    for _, rcpt, _, stored in cases}
        self.assertEqual(sorted(bounced), sorted(expected))
        self.assertEqual([r for r in expected if bounced[r] != expected[r]], [])
