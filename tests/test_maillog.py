"""
The mail log over real sockets: connect, reject (client, sender, recipient,
HELO, reply), queued (size, message-id, recipient count), each delivery
attempt once (to=, relay=, delay=, delays=, dsn=, status=), removed and
disconnect with command counts; the JSON log carries the same events typed.
"""

import io
import json
import socket
import struct

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relaygw import logs, maillog
from relaygw.testing import Client, Gateway, ScriptedSMTPFactory, inThread
from tests.recorders import slowCommits
from tests.sessions import SessionTestCase, overASocket


class MailLogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.text, self.json = io.StringIO(), io.StringIO()
        self.events = []
        for observer in (logs.textLinesObserver(self.text), logs.jsonLinesObserver(self.json), self.events.append):
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.hop = ScriptedSMTPFactory(rcpt={"later@example.net": "451 4.3.0 Try again later"})
        port = reactor.listenTCP(0, self.hop, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.hopPort = port.getHost().port
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"smarthosts": ["[127.0.0.1]:%d" % self.hopPort], "tls": "none"})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def session(self, rcpts, content="Message-ID: <m1@example.org>\r\nSubject: log\r\n\r\nbody\r\n"):
        def run():
            c = Client(self.gw.port)
            try:
                *_, (code, lines) = c.transaction(rcpts, content, helo="client.example")
                self.assertEqual(code, 250)
                c.cmd("QUIT")
                return lines[0].rsplit(" ", 1)[1]
            finally:
                c.close()

        return inThread(run)

    @defer.inlineCallbacks
    def waitFor(self, event):
        """Wait (a bounded while) until C{event} was logged: the session ends after the client's QUIT."""
        for _ in range(150):
            if any(e.get("event") == event for e in self.events):
                return
            yield task.deferLater(reactor, 0.02, lambda: None)

    def lines(self, event):
        return [logs.escape(formatEvent(e)) for e in self.events if e.get("event") == event]

    @defer.inlineCallbacks
    def test_aMessageFromConnectToRemoved(self):
        qid = yield self.session(["b@example.net", "later@example.net"])
        yield self.gw.service.queue.whenIdle()
        yield self.waitFor("disconnect")
        [connect] = self.lines("connect")
        self.assertRegex(connect, r"^\[\w+\] connect from unknown\[127\.0\.0\.1\]:\d+ to l0$")
        [queued] = self.lines("queued")
        self.assertRegex(queued, r"^\[\w+\] %s: queued from=<a@example\.org>, size=\d+, nrcpt=2, "
                                 r"message-id=<m1@example\.org>, client=unknown\[127\.0\.0\.1\]$" % qid)
        deliveries = self.lines("delivery")
        self.assertEqual(len(deliveries), 2, deliveries)
        relay = r"127\.0\.0\.1\[127\.0\.0\.1\]:%d" % self.hopPort
        delays = r"delay=\d+\.\d\d, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+"
        self.assertRegex(deliveries[0], r"^%s: to=<b@example\.net>, relay=%s, %s, dsn=2\.0\.0, "
                                        r"status=sent \(250 2\.0\.0 Ok: queued as 4ABC\)$" % (qid, relay, delays))
        self.assertRegex(deliveries[1], r"^%s: to=<later@example\.net>, relay=%s, %s, dsn=4\.3\.0, "
                                        r"status=deferred \(451 4\.3\.0 Try again later\)$" % (qid, relay, delays))
        [disconnect] = self.lines("disconnect")
        self.assertRegex(disconnect, r"^\[\w+\] disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=2 "
                                     r"data=1 quit=1 commands=6$")
        # Each delivery once: no other line names the recipient (the relay
        # client's debug trace aside: whether it is written depends on the
        # process's log level, which other tests set).
        named = [line for line in self.text.getvalue().splitlines()
                 if "later@example.net" in line and " debug [" not in line]
        self.assertEqual(len(named), 1, self.text.getvalue())
        ours = [line for line in self.text.getvalue().splitlines() if "ScriptedSMTPFactory" not in line]
        self.assertFalse([line for line in ours if "ing factory" in line])

    @defer.inlineCallbacks
    def test_foldedMessageIdLogged(self):
        """
        A Message-ID field whose value is folded onto the next line (as
        mailers write a long one) is logged, as Postfix logs it (before:
        "message-id=", as for a message without one).
        """
        ids = []
        for fold in ("\r\n ", "\r\n\t", " \r\n  "):
            yield self.session(["b@example.net"], "Message-ID:%s<folded@example.org>\r\nSubject: log\r\n\r\nbody\r\n"
                               % fold)
            ids.append([e for e in self.events if e.get("event") == "queued"][-1]["message_id"])
        self.assertEqual(ids, ["<folded@example.org>"] * 3)
        # A continuation line of another field, or past the header, is no Message-ID.
        yield self.session(["b@example.net"], "Message-ID:\r\nSubject: log\r\n <other@example.org>\r\n\r\nbody\r\n")
        yield self.session(["b@example.net"], "Message-ID:\r\n\r\n <body@example.org>\r\n")
        self.assertEqual([e["message_id"] for e in self.events if e.get("event") == "queued"][-2:], ["", ""])

    @defer.inlineCallbacks
    def test_queuedSizeIsTheSpoolsAndRemovedFollows(self):
        qid = yield self.session(["b@example.net"])
        [event] = [e for e in self.events if e.get("event") == "queued"]
        self.assertEqual((event["nrcpt"], event["recipients"], event["message_id"]),
                         (1, ["b@example.net"], "<m1@example.org>"))
        yield self.gw.service.queue.whenIdle()
        yield self.waitFor("removed")
        self.assertEqual(self.lines("removed"), ["%s: removed" % qid])
        # The size is the spooled message's, Received header included: what goes onward.
        [delivered] = self.hop.messages
        self.assertTrue(delivered.startswith(b"Received: "))
        self.assertEqual(event["size"], len(delivered))

    @defer.inlineCallbacks
    def test_rejectNamesClientSenderRecipientHelo(self):
        def run():
            c = Client(self.gw.port)
            try:
                c.reply()
                c.cmd("EHLO client.example")
                c.cmd("MAIL FROM:<a@example.org>")
                self.assertEqual(c.cmd("RCPT TO:<bad address>")[0], 501)
                c.cmd("BOGUS")
                c.cmd("QUIT")
            finally:
                c.close()

        yield inThread(run)
        yield self.waitFor("disconnect")
        rejects = self.lines("reject")
        self.assertRegex(rejects[0], r"^\[\w+\] NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 501 5\.1\.3 .*; "
                                     r"from=<a@example\.org> to=<bad> proto=ESMTP helo=<client\.example>$")
        self.assertRegex(rejects[1], r"reject: BOGUS from unknown\[127\.0\.0\.1\]: 50\d .*; "
                                     r"from=<a@example\.org> proto=ESMTP helo=<client\.example>$")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith("ehlo=1 mail=1 rcpt=0/1 quit=1 unknown=0/1 commands=3/5"), disconnect)

    @defer.inlineCallbacks
    def test_lineRefusedBeforeItsVerbIsUnknown(self):
        """
        A line too long, or a blank one, is logged and counted as an unknown
        command (as Postfix does), not as the command before it or the
        connect stage.
        """
        def run():
            c = Client(self.gw.port)
            try:
                c.reply()
                c.cmd("NOOP")
                self.assertEqual(c.cmd("AUTH PLAIN " + "A" * 3000)[0], 500)
                self.assertEqual(c.cmd("   ")[0], 500)
                c.cmd("QUIT")
            finally:
                c.close()

        yield inThread(run)
        yield self.waitFor("disconnect")
        rejects = self.lines("reject")
        self.assertEqual(len(rejects), 2, rejects)
        for reject in rejects:
            self.assertRegex(reject, r"reject: UNKNOWN from unknown\[127\.0\.0\.1\]: 500 5\.5\.2 [^;]*; proto=SMTP$")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith("noop=1 quit=1 unknown=0/2 commands=2/4"), disconnect)

    @defer.inlineCallbacks
    def test_sessionsEndedUnasked(self):
        """
        An idle timeout and the drain end sessions unasked: a line in
        Postfix's words ("timeout after NOOP"; none for a session idle at
        the drain), not a reject of the last command, which keeps its count.
        """
        def timedOut(c):
            c.cmd("NOOP")
            return c.reply()[0]

        code, _ = yield overASocket(self, timedOut, relay_networks=["127.0.0.0/8"], idle_timeout=0.5,
                                    drain_timeout=0.5)
        self.assertEqual(code, 421)
        yield self.waitFor("disconnect")
        [closed] = self.lines("closed")
        self.assertRegex(closed, r"^\[\w+\] timeout after NOOP from unknown\[127\.0\.0\.1\]$")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith("noop=1 commands=1"), disconnect)
        del self.events[:]

        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"], "drain_timeout": 0.5},))
        yield gw.start()
        self.addCleanup(gw.stop)
        busy, idle = yield inThread(lambda: (Client(gw.port), Client(gw.port)))
        self.addCleanup(busy.close)
        self.addCleanup(idle.close)
        yield inThread(lambda: (busy.reply(), busy.cmd("EHLO x"), busy.cmd("MAIL FROM:<a@example.org>"),
                                idle.reply(), idle.cmd("NOOP")))
        yield gw.stop()
        self.assertEqual((yield inThread(idle.reply))[0], 421)
        self.assertEqual((yield inThread(busy.reply))[0], 421)
        [closed] = self.lines("closed")
        self.assertRegex(closed, r"shutting down after MAIL from unknown\[127\.0\.0\.1\]$")
        self.assertEqual(self.lines("reject"), [])
        self.assertEqual(sorted(line.split(" ", 4)[-1] for line in self.lines("disconnect")),
                         ["ehlo=1 mail=1 commands=2", "noop=1 commands=1"])

    @defer.inlineCallbacks
    def test_disconnectCountsInPostfixOrder(self):
        """
        The disconnect line names the commands in Postfix's order, unknown
        ones last, whatever order the client used them in, as Postfix 3.7
        logs the same session: "ehlo=1 mail=1 rcpt=1 data=1 rset=1 noop=1
        vrfy=1 quit=1 unknown=0/3" (before: in the order of their first
        use, "noop=1 unknown=0/1 vrfy=1 help=1 expn=0/1 rset=1 ehlo=1 ...").
        """
        def outOfOrder(c):
            for line in ("NOOP", "BOGUS", "VRFY x", "HELP", "EXPN x", "RSET", "EHLO x", "MAIL FROM:<a@example.org>",
                         "RCPT TO:<b@example.net>", "DATA"):
                c.cmd(line)
            c.send(b"Subject: order\r\n\r\nbody\r\n.\r\n")
            c.reply()
            c.cmd("QUIT")

        yield overASocket(self, outOfOrder, relay_networks=["127.0.0.0/8"])
        yield self.waitFor("disconnect")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith(" ehlo=1 mail=1 rcpt=1 data=1 rset=1 noop=1 vrfy=1 expn=0/1 help=1 "
                                            "quit=1 unknown=0/1 commands=9/11"), disconnect)

    @defer.inlineCallbacks
    def test_lostAfterTheFinalDot(self):
        """
        A client that resets the connection right after its final dot,
        while the commit is under way, has its message queued and the
        session logged as Postfix logs it: the queued line, then "lost
        connection after END-OF-MESSAGE" and data=1 (the session was logged
        as ended before the commit did, with data=0/1, though the message
        went on).
        """
        started = slowCommits(self, self.gw.service.spool, 0.3)

        def leaves(c):
            for line in ("EHLO x", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"):
                c.cmd(line)
            c.send(b"Subject: gone\r\n\r\nbody\r\n.\r\n")
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # (a reset)

        def run():
            c = Client(self.gw.port)
            try:
                c.reply()
                leaves(c)
            finally:
                c.close()

        yield inThread(run)
        yield self.waitFor("disconnect")
        self.assertEqual(len(started), 1)
        order = [e["event"] for e in self.events if e.get("event") in ("queued", "closed", "disconnect")]
        self.assertEqual(order, ["queued", "closed", "disconnect"])
        [closed] = self.lines("closed")
        self.assertRegex(closed, r"^\[\w+\] lost connection after END-OF-MESSAGE from unknown\[127\.0\.0\.1\]$")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith(" ehlo=1 mail=1 rcpt=1 data=1 commands=4"), disconnect)

    @defer.inlineCallbacks
    def test_lostConnection(self):
        """
        A client gone without QUIT gets Postfix's "lost connection after
        DATA" line, and a DATA whose content was cut short is not counted
        a success: its 354 only asked for the content.
        """
        def cutShort(c):
            for line in ("EHLO x", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA"):
                c.cmd(line)
            c.send(b"Subject: cut\r\n\r\nhalf a bo")

        yield overASocket(self, cutShort, relay_networks=["127.0.0.0/8"])
        yield self.waitFor("disconnect")
        [closed] = self.lines("closed")
        self.assertRegex(closed, r"^\[\w+\] lost connection after DATA from unknown\[127\.0\.0\.1\]$")
        [disconnect] = self.lines("disconnect")
        self.assertTrue(disconnect.endswith(" ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"), disconnect)
        self.assertEqual(self.lines("queued"), [])
        del self.events[:]

        def quits(c):
            c.cmd("EHLO x")
            c.cmd("QUIT")

        yield overASocket(self, quits, relay_networks=["127.0.0.0/8"])
        yield self.waitFor("disconnect")
        self.assertEqual(self.lines("closed"), [])

    @defer.inlineCallbacks
    def test_jsonCarriesTypedEvents(self):
        qid = yield self.session(["b@example.net", "later@example.net"])
        yield self.gw.service.queue.whenIdle()
        yield self.waitFor("disconnect")
        records = [json.loads(line) for line in self.json.getvalue().splitlines()]
        byEvent = {}
        for r in records:
            byEvent.setdefault(r.get("event"), []).append(r)
        [queued] = byEvent["queued"]
        self.assertEqual((queued["qid"], queued["recipients"], queued["nrcpt"]),
                         (qid, ["b@example.net", "later@example.net"], 2))
        self.assertIsInstance(queued["size"], int)
        sent, deferred = byEvent["delivery"]
        self.assertEqual((sent["to"], sent["status"], sent["dsn"]), ("b@example.net", "sent", "2.0.0"))
        self.assertEqual((deferred["status"], deferred["dsn"]), ("deferred", "4.3.0"))
        self.assertEqual(len(sent["delays"]), 4)
        self.assertTrue(all(isinstance(d, (int, float)) for d in sent["delays"]))
        [disconnect] = byEvent["disconnect"]
        self.assertEqual(disconnect["commands"]["rcpt"], {"ok": 2, "total": 2})


class DelaysTests(unittest.TestCase):
    """
    Postfix's C{delays=a/b/c/d}.  A message queued before a restart:
    C{a} is its time before the queue (arrival to the queue file), C{b}
    its time in the queue since.
    """

    @defer.inlineCallbacks
    def test_delaysOfARecoveredMessage(self):
        import os
        import time

        from relaygw.durable import Committer
        from relaygw.relay.nexthop import Result
        from relaygw.relay.queue import QueueManager
        from relaygw.spool import Spool

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        self.addCleanup(spool.committer.stop)
        now = time.time()
        w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"], "arrival": now - 100,
                              "context": {}})
        w.write(b"Subject: recovered\r\n\r\nbody\r\n")
        qid = yield w.commit()
        os.utime(spool.path("queue", qid), (now - 40, now - 40))  # made durable 60 s after it arrived

        class Hop:
            def describe(self):
                return "test"

            def deliver(self, messages, progress=None):
                return [{"b@example.net": Result(250, "2.0.0", "ok")}]

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        q = QueueManager(spool, lambda m, r: Hop(), task.Clock())
        q.recovered = spool.open()  # as after a restart
        q.startService()
        yield q.whenIdle()
        [delivery] = [e for e in events if e.get("event") == "delivery"]
        a, b, c, d = delivery["delays"]
        self.assertLess(abs(a - 60), 1, delivery["delays"])
        self.assertLess(abs(b - 40), 2, delivery["delays"])
        self.assertLess(abs(delivery["delay"] - 100), 2, delivery["delay"])
        self.assertEqual(delivery["qid"], qid)


    @defer.inlineCallbacks
    def test_delaysAddUpWhenTheNextHopMadeItWait(self):
        """
        A message that waited for a connection to the next hop (behind a
        busy one) counts that wait in C{b}, the queue manager's share, as
        Postfix does: the four parts add up to the delay.
        """
        import os

        from relaygw.durable import Committer
        from relaygw.relay.nexthop import Result
        from relaygw.relay.queue import QueueManager
        from relaygw.spool import Spool

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        self.addCleanup(spool.committer.stop)
        w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"], "context": {}})
        w.write(b"Subject: waited\r\n\r\nbody\r\n")
        qid = yield w.commit()

        class Hop:
            def describe(self):
                return "test"

            def deliver(self, messages, progress=None):
                # 0.5 s in all: waiting for a connection, then 0.05 s to set it up and 0.1 s to send.
                result = Result(250, "2.0.0", "ok").located("relay.example[192.0.2.1]:25", 0.05, 0.1)
                return task.deferLater(reactor, 0.5, lambda: [{"b@example.net": result}])

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        q = QueueManager(spool, lambda m, r: Hop(), task.Clock())
        q.recovered = [qid]
        q.startService()
        yield q.whenIdle()
        [delivery] = [e for e in events if e.get("event") == "delivery"]
        a, b, c, d = delivery["delays"]
        self.assertEqual((c, d), (0.05, 0.1))
        self.assertGreater(b, 0.3, delivery["delays"])
        self.assertLess(abs(a + b + c + d - delivery["delay"]), 0.01, (delivery["delays"], delivery["delay"]))


class CommandCountTests(unittest.TestCase):
    def test_postfixStyle(self):
        counts = maillog.CommandCounts()
        for verb, codes in (("EHLO", [250]), ("MAIL", [250]), ("RCPT", [554]), ("RCPT", [250]),
                            ("DATA", [354, 250]), ("QUIT", [221])):  # (the end of data's reply belongs to DATA)
            counts.command(verb)
            for code in codes:
                counts.replied(code)
        self.assertEqual(counts.summary(), "ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6")

    def test_intermediateReplyIsNoSuccess(self):
        """DATA answered 354 or AUTH answered 334, then nothing more (the client left): it did not succeed."""
        for commands, summary in (((("EHLO", 250), ("MAIL", 250), ("RCPT", 250), ("DATA", 354)),
                                   "ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"),
                                  ((("EHLO", 250), ("AUTH", 334)), "ehlo=1 auth=0/1 commands=1/2")):
            counts = maillog.CommandCounts()
            for verb, code in commands:
                counts.command(verb)
                counts.replied(code)
            self.assertEqual(counts.summary(), summary)

    def test_dsnAndSeconds(self):
        from relaygw.relay.nexthop import Result

        self.assertEqual(maillog.dsnOf(Result(451, None, "x")), "4.0.0")
        self.assertEqual(maillog.dsnOf(Result(550, "5.1.1", "x")), "5.1.1")
        self.assertEqual([maillog._seconds(d) for d in (0.0004, 0.01, 1.5, 12.7)], ["0", "0.01", "1.5", "12"])


class EndOfMessageRejectTests(SessionTestCase):
    """A message refused at its end is logged under its queue id, as Postfix's END-OF-MESSAGE."""

    listener = {"relay_networks": ["127.0.0.0/8"], "max_message_size": 100}

    def test_tooBig(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def run(c):
            c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            self.assertEqual(c.cmd("DATA")[0], 354)
            self.assertEqual(c.cmd("x" * 200 + "\r\n."), (552, ["5.3.4 Error: message too big"]))

        self.session(run)
        [reject] = [logs.escape(formatEvent(e)) for e in events if e.get("event") == "reject"]
        self.assertRegex(reject, r"^\[\w+\] [0-9A-Z]+: reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: "
                                 r"552 5\.3\.4 Error: message too big; from=<a@example\.org> to=<b@example\.net> "
                                 r"proto=ESMTP helo=<client\.example>$")
        self.assertNotIn("NOQUEUE", reject)
