"""
A real Postfix (Debian's package, a throwaway instance) as the gateway's
next hop, configured to restrict what it takes: every message must arrive
whole exactly once, or be deferred or bounced with the right status.
"""

import binascii
import email
import os
import shutil
import tempfile

from twisted.internet import defer

from relaygw.testing import Client, PostfixInstance, freePort, inThread
from tests.recorders import LogCapture
from tests.relaysetup import RelayTestCase

#: What Postfix itself would change in what it passes on, turned off: its
#: line-length splitting, headers it adds to local clients' mail.
QUIET = {"smtp_line_length_limit": "0", "local_header_rewrite_clients": "", "message_size_limit": "0"}


def sendRaw(port, content, rcpts=("b@example.net",), mailfrom="a@example.org", mailParams="", rcptParams=""):
    """
    One message whose stored content is C{content} (bytes, CRLF lines),
    dot-stuffed here; returns the reply to its end of data.
    """
    c = Client(port, timeout=60)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        assert c.cmd(("MAIL FROM:<%s> %s" % (mailfrom, mailParams)).strip())[0] == 250
        for r in rcpts:
            code, lines = c.cmd(("RCPT TO:<%s> %s" % (r, rcptParams)).strip())
            assert code == 250, (code, lines)
        assert c.cmd("DATA")[0] == 354
        stuffed = content.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        c.send(stuffed + (b"" if not content or content.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        return c.reply()
    finally:
        c.close()


def withoutTrace(data):
    """C{data} without the Received header fields at its start."""
    lines = data.split(b"\r\n")
    i = 0
    while i < len(lines) and lines[i].startswith(b"Received:"):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


class _PostfixNextHop(RelayTestCase):
    """A Postfix instance (main.cf with L{QUIET} and C{settings}) relaying to a scripted sink."""

    timeout = 180
    settings = None
    sinkExtensions = ("8BITMIME",)

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogCapture(self)
        self.sink, sinkPort = self.hop(extensions=list(self.sinkExtensions))
        self.postfixPort = freePort()
        directory = tempfile.mkdtemp(prefix="relaygw-pf-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.postfix = PostfixInstance(directory, self.postfixPort, "[127.0.0.1]:%d" % sinkPort,
                                       dict(QUIET, **self.configure(directory)))
        self.addCleanup(inThread, self.postfix.stop)
        yield inThread(self.postfix.start)

    def configure(self, directory):
        return dict(self.settings or {})

    def relayTo(self, **relay):
        return self.gateway(dict({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none"}, **relay))

    def sendRaw(self, content, **kw):
        return inThread(sendRaw, self.gw.port, content, **kw)

    def deliveries(self, status=None):
        return [e for e in self.logs.events
                if e.get("event") == "delivery" and (status is None or e.get("status") == status)]

    def bounces(self):
        return [t for t in self.sink.transactions if t["mailfrom"] == ""]

    def arrived(self):
        return [t for t in self.sink.transactions if t["mailfrom"] != ""]


EDGE = {
    "dots": b"Subject: dots\r\n\r\n.leading\r\n..two\r\nmid.dle\r\n.\r\n\r\n. space\r\nend\r\n",
    "onlydot": b"Subject: onlydot\r\n\r\n.\r\n",
    "long": b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n" + b"y" * 998 + b"\r\n" + b"z" * 70000 + b"\r\nend\r\n",
    "longdot": b"Subject: longdot\r\n\r\n" + (b"a" * 65535 + b"\r\n.") * 3 + b"b\r\n",
    "nul": b"Subject: nul\r\n\r\na\x00b\r\n\x00\r\n",
    "emptybody": b"Subject: emptybody\r\n\r\n",
    "headeronly": b"Subject: headeronly\r\nX-Other: y\r\n",
    "eightbit": b"Subject: eightbit\r\n\r\ncaf\xc3\xa9\r\n\xff\xfe\r\n",
    "trailingspace": b"Subject: trailingspace\r\n\r\nline   \r\ntab\t\r\n",
}


class PostfixContentTests(_PostfixNextHop):
    """Content edge cases through a Postfix that takes everything: each arrives as it was stored."""

    @defer.inlineCallbacks
    def test_edgeCases(self):
        yield self.relayTo()
        for name, content in EDGE.items():
            code, lines = yield self.sendRaw(content, rcpts=("%s@example.net" % name,))
            self.assertEqual(code, 250, (name, lines))
        yield self.until(self.spoolEmpty, timeout=60)
        yield self.until(lambda: len(self.sink.transactions) >= len(EDGE), timeout=90)
        got = {t["rcpts"][0].split("@")[0]: withoutTrace(t["data"]) for t in self.sink.transactions}
        self.assertEqual(len(self.sink.transactions), len(EDGE))
        for name, content in EDGE.items():
            self.assertEqual(got[name], content, name)

    @defer.inlineCallbacks
    def test_bareLF(self):
        yield self.relayTo()
        c = yield inThread(Client, self.gw.port)
        def run():
            c.reply()
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            c.send(b"Subject: lf\n\nbare\nlf\r\n.\n.\r\n.\r\n")
            r = c.reply()
            c.close()
            return r
        code, _ = yield inThread(run)
        self.assertEqual(code, 250)
        yield self.until(lambda: len(self.sink.transactions) == 1, timeout=60)
        self.assertEqual(withoutTrace(self.sink.transactions[0]["data"]),
                         b"Subject: lf\r\n\r\nbare\r\nlf\r\n.\r\n.\r\n")

    @defer.inlineCallbacks
    def test_tenMegabytes(self):
        yield self.relayTo()
        line = b"0123456789" * 7 + b"\r\n"
        content = b"Subject: big\r\n\r\n" + line * (10 * 1024 * 1024 // len(line))
        code, _ = yield self.sendRaw(content)
        self.assertEqual(code, 250)
        yield self.until(lambda: len(self.sink.transactions) == 1, timeout=120)
        self.assertEqual(withoutTrace(self.sink.transactions[0]["data"]), content)


class RecipientLimitTests(_PostfixNextHop):
    settings = {"smtpd_recipient_limit": "2"}

    @defer.inlineCallbacks
    def test_fiveRecipients(self):
        """
        Postfix takes two recipients per transaction (452 4.5.3 for the
        others): the rest go at once in new transactions, none deferred.
        """
        yield self.relayTo(retry_min=600, retry_max=600)
        rcpts = ["r%d@example.net" % i for i in range(5)]
        yield self.sendRaw(b"Subject: five\r\n\r\nfive\r\n", rcpts=rcpts)
        yield self.until(self.spoolEmpty, timeout=60)
        self.assertEqual(self.deliveries("deferred"), [])
        self.assertEqual(len(self.deliveries("sent")), 5)
        yield self.until(lambda: sorted(r for t in self.arrived() for r in t["rcpts"]) == rcpts, timeout=30)
        self.assertEqual(self.bounces(), [])


class RecipientLimitNoPipeliningTests(RecipientLimitTests):
    settings = {"smtpd_recipient_limit": "2", "smtpd_discard_ehlo_keywords": "pipelining, dsn"}


class No8BitTests(_PostfixNextHop):
    settings = {"smtpd_discard_ehlo_keywords": "8bitmime"}

    @defer.inlineCallbacks
    def test_downgrade(self):
        yield self.relayTo()
        bodies = {
            "plain": b"caf\xc3\xa9 \r\n.dot\xe9\r\n" + b"\xe9" * 3000 + b"\r\ntrail \t\r\n=3D\r\nlast",
            "nul": b"a\x00\xe9\r\n\rb\xe9\r\n",
            "long": (b"\xe9x " * 40000) + b"\r\n",
        }
        for name, body in bodies.items():
            yield self.sendRaw(b"Subject: %s\r\n\r\n" % name.encode() + body, rcpts=("%s@example.net" % name,))
        multipart = (b"Subject: multi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n"
                     b"pre\r\n--BB\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Transfer-Encoding: 8bit\r\n\r\n"
                     b"caf\xc3\xa9\r\n--BB\r\nContent-Type: text/plain\r\n\r\nascii\r\n--BB--\r\nepi\r\n")
        yield self.sendRaw(multipart, rcpts=("multi@example.net",))
        yield self.until(self.spoolEmpty, timeout=60)
        yield self.until(lambda: len(self.sink.transactions) >= 4, timeout=60)
        got = {t["rcpts"][0].split("@")[0]: withoutTrace(t["data"]) for t in self.sink.transactions}
        for name, body in bodies.items():
            data = got[name]
            self.assertTrue(data.isascii(), name)
            msg = email.message_from_bytes(data)
            self.assertEqual(msg["Content-Transfer-Encoding"], "quoted-printable")
            expect = body if body.endswith(b"\r\n") else body + b"\r\n"
            decoded = binascii.a2b_qp(data.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
            self.assertEqual(decoded, expect, name)
            for line in data.split(b"\r\n"):
                self.assertLessEqual(len(line), 998)
        msg = email.message_from_bytes(got["multi"])
        parts = msg.get_payload()
        self.assertEqual(parts[0].get_payload(decode=True), b"caf\xc3\xa9")


class EndOfDataDeferTests(_PostfixNextHop):
    """
    Postfix refusing a message at its end of data from
    C{smtpd_end_of_data_restrictions} keeps the transaction open: the next
    MAIL on that connection would get "503 5.5.1 nested MAIL command".
    """

    def configure(self, directory):
        self.senders = os.path.join(directory, "senders")
        with open(self.senders, "w") as f:
            f.write("d@example.org DEFER try later\n")
        return {"smtpd_end_of_data_restrictions": "check_sender_access texthash:" + self.senders}

    @defer.inlineCallbacks
    def test_deferredThenDeliveredOnce(self):
        yield self.relayTo(retry_min=1, retry_max=1)
        yield self.sendRaw(b"Subject: later\r\n\r\nlater\r\n", rcpts=("d@example.net",), mailfrom="d@example.org")
        yield self.until(lambda: len(self.deliveries()) >= 3, timeout=30)
        with open(self.senders, "w") as f:
            f.write("")
        # (a reload would leave the smtpd process of the connection kept open on the old table)
        yield inThread(self.postfix.stop)
        yield inThread(self.postfix.start)
        yield self.until(self.spoolEmpty, timeout=60)
        yield self.until(lambda: self.arrived(), timeout=30)
        self.assertEqual([(e["status"], e["dsn"]) for e in self.deliveries()][:3], [("deferred", "4.7.1")] * 3)
        self.assertEqual(self.deliveries()[-1]["status"], "sent")
        self.assertEqual([t["rcpts"] for t in self.arrived()], [["d@example.net"]])
        self.assertEqual(withoutTrace(self.arrived()[0]["data"]), b"Subject: later\r\n\r\nlater\r\n")
        self.assertEqual(self.bounces(), [])


class XclientRefusedTests(_PostfixNextHop):
    """
    Postfix (C{inet_protocols = ipv4}) refusing the IPv6 address of one
    client forwarded with XCLIENT: that client's message waits, and the
    other clients' mail goes on.
    """

    def sendAs(self, xclient):
        c = Client(self.gw.port)
        try:
            c.reply()
            c.cmd("EHLO x")
            for line in (xclient, "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"):
                code, lines = c.cmd(line)
                assert code in (220, 250, 354), (line, code, lines)
            c.send(b"Subject: xc\r\n\r\nxc\r\n.\r\n")
            assert c.reply()[0] == 250
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_otherClientsDelivered(self):
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24", "2001:db8::/32"]})
        yield inThread(self.sendAs, "XCLIENT ADDR=IPV6:2001:db8::7 HELO=six.example.net")
        yield self.until(lambda: len(self.deliveries("deferred")) >= 4, timeout=30)
        refused = self.deliveries("deferred")
        self.assertEqual({e["dsn"] for e in refused}, {"4.5.4"})
        self.assertIn("refused XCLIENT: 501 5.5.4 Bad ADDR syntax", refused[0]["reply"])
        for i in range(3):
            yield inThread(self.sendAs, "XCLIENT ADDR=192.0.2.%d HELO=four.example.net" % (i + 1))
        yield self.until(lambda: len(self.arrived()) == 3, timeout=30)
        others = [e for e in self.deliveries() if e["qid"] != refused[0]["qid"]]
        self.assertEqual([e["status"] for e in others], ["sent"] * 3)


class EndOfDataDeferPipelinedTests(_PostfixNextHop):
    """
    As L{EndOfDataDeferTests}, with the next message's envelope pipelined
    behind the refused end of data: its MAIL gets "503 5.5.1 nested MAIL
    command", which says nothing of that message.
    """

    def configure(self, directory):
        senders = os.path.join(directory, "senders")
        with open(senders, "w") as f:
            f.write("slow@example.org sleep 3, permit\nd@example.org DEFER try later\n")
        return {"smtpd_end_of_data_restrictions": "check_sender_access texthash:" + senders}

    @defer.inlineCallbacks
    def test_nextMessageDelivered(self):
        yield self.relayTo(destination_concurrency=1, retry_min=1, retry_max=1)
        yield self.sendRaw(b"Subject: slow\r\n\r\nslow\r\n", rcpts=("s@example.net",), mailfrom="slow@example.org")
        yield self.sendRaw(b"Subject: later\r\n\r\nlater\r\n", rcpts=("d@example.net",), mailfrom="d@example.org")
        yield self.sendRaw(b"Subject: fine\r\n\r\nfine\r\n", rcpts=("f@example.net",))
        yield self.until(lambda: len(self.arrived()) == 2, timeout=60)
        self.assertEqual(sorted(t["rcpts"][0] for t in self.arrived()), ["f@example.net", "s@example.net"])
        self.assertEqual({e["status"] for e in self.deliveries() if e["to"] == "d@example.net"}, {"deferred"})
        self.assertEqual(self.bounces(), [])
        # (its envelope went out behind the refused end of data, and got the 503: it waited)
        self.assertEqual([(e["status"], e["dsn"]) for e in self.deliveries() if e["to"] == "f@example.net"],
                         [("deferred", "4.5.0"), ("sent", "2.0.0")])
