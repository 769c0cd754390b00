"""RFC 2920 pipelining: replies in order, nothing discarded (checklist 36-38)."""

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from tests.sessions import GatewayTestCase, SessionTestCase


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


class RecipientOvershootTests(GatewayTestCase):
    """
    Recipients past C{max_recipients} get 452 4.5.3 without counting as
    errors (up to 1,000 of them, Postfix's C{smtpd_recipient_overshoot_limit}):
    a client that pipelines all its recipients is told which to send again,
    and its message still goes, over a real socket.
    """

    listener = {"relay_networks": ["127.0.0.0/8"]}

    def test_pipelinedPastTheLimit(self):
        def run(c):
            c.cmd("EHLO many.example")
            rcpts = ["RCPT TO:<r%d@example.net>" % i for i in range(150)]
            c.send("\r\n".join(["MAIL FROM:<a@example.org>"] + rcpts + ["DATA"]) + "\r\n")
            replies = [c.reply() for _ in range(152)]
            c.send("Subject: many\r\n\r\nx\r\n.\r\n")
            return replies, c.reply()

        def check(result):
            replies, end = result
            self.assertEqual([code for code, _ in replies], [250] * 101 + [452] * 50 + [354])
            self.assertEqual(replies[101][1], ["4.5.3 Error: too many recipients"])
            self.assertEqual(end[0], 250)
            return self.gw.service.queue.whenIdle()

        def delivered(_):
            [message] = self.gw.delivered()
            self.assertIn(b"Subject: many", message)

        return self.session(run).addCallback(check).addCallback(delivered)


class RecipientOvershootLimitTests(SessionTestCase):
    listener = {"relay_networks": ["127.0.0.0/8"], "max_recipients": 2}

    def test_pastTheOvershootEachCounts(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            c.send("".join("RCPT TO:<r%d@example.net>\r\n" % i for i in range(2 + 1000 + 20)))
            codes = [code for code, _ in c.replies()]
            # 2 accepted, 1,000 refused uncounted, then 20 counted: the 20th error closes.
            self.assertEqual(codes, [250] * 2 + [452] * 1020 + [421])

        return self.session(run)


class RecipientOvershootLogTests(GatewayTestCase):
    """What the mail log says of recipients past C{max_recipients}, over a real socket."""

    listener = {"relay_networks": ["127.0.0.0/8"], "max_recipients": 2}

    def test_theUncountedOnesLoggedOnce(self):
        """
        Of the recipients refused past C{max_recipients}, the first of the
        transaction is logged, then those that count as errors: 21 reject
        lines for 1,020 refusals (before: one each, 24 MB of log from a
        client that pipelined 4.5 MB of such transactions).
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def run(c):
            rcpts = "".join("RCPT TO:<r%d@example.net>\r\n" % i for i in range(2 + 1000 + 20))
            c.send("MAIL FROM:<a@example.org>\r\n" + rcpts)
            codes = [c.reply()[0] for _ in range(1024)]
            self.assertEqual(codes, [250] * 3 + [452] * 1020 + [421])

        def check(_):
            refused = [e for e in events if e.get("event") == "reject" and e.get("code") == 452]
            self.assertEqual(len(refused), 21)
            self.assertEqual([e["recipient"] for e in refused[:2]], ["r2@example.net", "r1002@example.net"])

        return self.session(run).addCallback(check)
