"""RFC 2920 pipelining: replies in order, nothing discarded (checklist 36-38)."""

from twisted.internet import defer

from tests.sessions import SessionTestCase


class PipeliningTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_mailRcptRcptDataInOneSegment(self):
        def run(c):
            c.cmd("EHLO x")
            c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                   "RCPT TO:<c@example.net>\r\nDATA\r\n")
            codes = [c.reply()[0] for _ in range(4)]
            self.assertEqual(codes, [250, 250, 250, 354])
            c.send("Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n")
            self.assertEqual(c.reply()[0], 250)
            self.assertEqual(c.reply()[0], 221)

        return self.session(run)

    def test_failedRcptDoesNotDiscardLaterCommands(self):
        def run(c):
            c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<bad@@x>\r\nRCPT TO:<b@example.net>\r\n"
                   "DATA\r\nSubject: p\r\n\r\nhi\r\n.\r\nNOOP\r\n")
            codes = [c.reply()[0] for _ in range(6)]
            self.assertEqual(codes, [250, 501, 250, 354, 250, 250])

        return self.session(run)

    def test_pipelinedBeforeEhloReply(self):
        c = self.client()
        c.send("EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(c.reply()[0], 250)
        self.assertEqual(c.reply()[0], 250)
        self.assertEqual(c.reply()[0], 250)


class SpooledPipeliningTests(SessionTestCase):
    """Pipelined messages into the real spool: each end of data waits for its commit."""

    listener = {"relay_networks": ["127.0.0.0/8"]}
    realSpool = True

    @defer.inlineCallbacks
    def test_manyMessagesInOneWrite(self):
        one = ("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
               "Subject: m\r\n\r\nbody\r\n.\r\n")
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.send(one * 20 + "QUIT\r\n")
        codes = []
        for _ in range(81):
            codes.append((yield c.whenReply())[0])
        self.assertEqual(codes, [250, 250, 354, 250] * 20 + [221])
        self.assertEqual(len(self.spooled(20)), 20)
