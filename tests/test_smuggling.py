"""
DATA framing: end of data is only CRLF.CRLF; bare LF and bare CR never end
a message or smuggle a second one; dot-stuffing is undone; over-long lines
never leave DATA (the Twisted 26.10 hole).  Checklist 27-29, 42.
"""

from twisted.internet import defer

from tests.sessions import SessionTestCase


class SmugglingTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}
    realSpool = True

    @defer.inlineCallbacks
    def transaction(self, body, expectQueued=True):
        """Send one message with raw C{body} (everything after the 354)."""
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        self.assertEqual(c.cmd("DATA")[0], 354)
        c.send(body)
        replies = [(yield c.whenReply())]
        # Anything after the first end of data must run as commands.
        c.send("NOOP\r\n")
        replies.append((yield c.whenReply()))
        return replies

    def contents(self):
        """The content of every message stored, without its header section."""
        stored = [content for _, content in self.spooled(len(self.harness.queued))]
        return [m.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in m else m for m in stored]

    @defer.inlineCallbacks
    def test_smugglingProbesDoNotEndData(self):
        for probe in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"):
            body = (b"Subject: s\r\n\r\nbefore" + probe +
                    b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n")
            replies = yield self.transaction(body)
            self.assertEqual(replies[0][0], 250, probe)
            self.assertTrue(replies[0][1][0].startswith("2.0.0 Ok: queued as"), probe)
            # The NOOP answers next: no 250/250/354 from smuggled commands.
            self.assertEqual(replies[1], (250, ["2.0.0 Ok"]), probe)
        bodies = self.contents()
        self.assertEqual(len(bodies), 5)
        for b in bodies:
            self.assertIn(b"MAIL FROM:<evil@example.org>", b)
            self.assertIn(b"smuggled", b)

    @defer.inlineCallbacks
    def test_bareLFNormalised(self):
        yield self.transaction(b"Subject: n\r\n\r\nline1\nline2\r\n.\r\n")
        bodies = self.contents()
        self.assertEqual(bodies, [b"line1\r\nline2\r\n"])

    @defer.inlineCallbacks
    def test_bareCRIsData(self):
        yield self.transaction(b"Subject: n\r\n\r\na\rb\r\n.\r\n")
        bodies = self.contents()
        self.assertEqual(bodies, [b"a\rb\r\n"])

    @defer.inlineCallbacks
    def test_dotStuffingUndone(self):
        yield self.transaction(b"Subject: d\r\n\r\n..leading\r\n...two\r\n.x\r\nmid.dle\r\n.\r\n")
        bodies = self.contents()
        self.assertEqual(bodies, [b".leading\r\n..two\r\nx\r\nmid.dle\r\n"])

    @defer.inlineCallbacks
    def test_overlongBodyLineStaysInData(self):
        body = (b"Subject: long\r\n\r\n" + b"y" * 100000 + b"\r\n"
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n.\r\n")
        replies = yield self.transaction(body)
        self.assertEqual(replies[0][0], 250)
        self.assertEqual(replies[1], (250, ["2.0.0 Ok"]))
        bodies = self.contents()
        self.assertEqual(len(bodies), 1)
        self.assertTrue(bodies[0].startswith(b"y" * 100000 + b"\r\nMAIL FROM:<evil@example.org>"))

    @defer.inlineCallbacks
    def test_eightBitBodyByteForByte(self):
        payload = bytes(b for b in range(256) if b not in (10, 13)) * 4 + b"\r\n"
        yield self.transaction(b"Subject: 8\r\n\r\n" + payload + b".\r\n")
        bodies = self.contents()
        self.assertEqual(bodies, [payload])

    @defer.inlineCallbacks
    def test_endMarkerSplitAcrossSegments(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        for piece in (b"Subject: x\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
            c.send(piece)  # each its own segment
        reply = yield c.whenReply()
        self.assertEqual(reply[0], 250)
        bodies = self.contents()
        self.assertEqual(bodies, [b"body\r\n"])

    @defer.inlineCallbacks
    def test_emptyMessage(self):
        replies = yield self.transaction(b".\r\n")
        self.assertEqual(replies[0][0], 250)


class RejectBareLFTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"], "bare_lf": "reject"}
    realSpool = True

    @defer.inlineCallbacks
    def test_bareLFInContentRefused(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send("Subject: x\r\n\r\nbare\nlf\r\n.\r\n")
        self.assertEqual((yield c.whenReply()), (550, ["5.5.2 Error: bare <LF> received in message content"]))
        self.assertEqual(self.harness.service.spool.queueIds(), [])

    def test_bareLFInCommandCloses(self):
        def run(c):
            c.send("NOOP\n")
            code, lines = c.reply()
            self.assertEqual((code, lines[0][:6]), (550, "5.5.2 "))
            self.assertTrue(c.closed())

        return self.session(run)
