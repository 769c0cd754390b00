"""
A stop with deliveries still in flight: after the queue manager's
C{stopTimeout} they are cut short (the connection attempt, the session
waiting for a reply, the messages waiting for a connection) and settle
before the stop ends, so that nothing is logged or written for them once
the gateway has said it stopped.  Their messages stay queued as they were,
with no attempt counted, and the next start delivers them.
"""

import os
import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.durable import Committer
from relaygw.relay.queue import QueueManager
from relaygw.spool import Spool
from relaygw.testing import Gateway, configText
from tests.recorders import LogCapture, RecordingHop
from tests.relaysetup import FAST, RelayTestCase, TrackingHopFactory


class StopCutsShortTests(RelayTestCase):
    @defer.inlineCallbacks
    def stopAndCheck(self, qids):
        """Stop the gateway; check what the stop left of C{qids} (each cut short, queued, untouched)."""
        self.gw.service.queue.stopTimeout = 0.3
        yield self.gw.stop()
        stoppedAt = len(self.logs.events)
        self.assertEqual(self.gw.service.queue.active, set())  # settled before the stop ended
        spool = self.gw.service.spool
        self.assertEqual(sorted(spool.queueIds()), sorted(qids))
        for qid in qids:
            self.assertEqual(len(self.logs.find("not delivered before the stop", qid=qid)), 1)
            self.assertEqual(self.logs.find("status=", qid=qid), [])
            self.assertEqual(spool.readState(qid), {})  # no attempt counted
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual([e.get("log_format") for e in self.logs.events[stoppedAt:]
                          if e.get("log_namespace", "").startswith("relaygw")], [])

    @defer.inlineCallbacks
    def deliveredAfterRestart(self, rcpts):
        """A second gateway on the same spool, relaying to a next hop that answers, delivers C{rcpts}."""
        hop, port = self.hop()
        second = Gateway(self.gw.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                         relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % port]))
        yield second.start()
        self.addCleanup(second.stop)
        self.gw = second
        yield self.until(self.spoolEmpty)
        self.assertEqual(sorted(hop.recipients()), sorted(rcpts))

    @defer.inlineCallbacks
    def test_awaitingTheFinalReply(self):
        """The next hop has the whole message and never answers: the connection is cut at the stop."""
        self.logs = LogCapture(self)
        hop, port = self.hop(endOfData=None)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        qid = yield self.send(rcpts=("a@example.net",))
        yield self.until(lambda: hop.transactions)
        yield self.stopAndCheck([qid])
        self.assertEqual(len(self.logs.find("deliveries in flight cut short", n=1)), 1)
        yield self.until(lambda: all(c.transport.disconnected for c in hop.connections))
        yield self.deliveredAfterRestart(["a@example.net"])

    @defer.inlineCallbacks
    def test_waitingForAConnection(self):
        """A message waiting behind the one busy connection is not sent at all."""
        self.logs = LogCapture(self)
        hop, port = self.hop(endOfData=None)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1})
        first = yield self.send(rcpts=("a@example.net",))
        yield self.until(lambda: hop.transactions)
        second = yield self.send(rcpts=("b@example.net",))
        yield self.until(lambda: second in self.gw.service.queue.active)  # (its attempt starts after the 250)
        yield self.stopAndCheck([first, second])
        self.assertEqual(hop.verbs().count("MAIL"), 1)
        yield self.deliveredAfterRestart(["a@example.net", "b@example.net"])

    @defer.inlineCallbacks
    def test_transactionUnderWayFinishes(self):
        """
        At the stop, a connection carrying a batch finishes the transaction
        under way and begins no other: those behind it stay queued as they
        were, none cut after its end of data (which sent it twice: once
        before the stop, once after the restart).
        """
        self.logs = LogCapture(self)
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], endOfDataDelay=1.0)
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1})
        qids = []
        for n in range(4):  # (the first alone, its connection's greeting late; the others one batch)
            qids.append((yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))))
        yield self.until(lambda: "RCPT TO:<r1@example.net>" in hop.lines)
        self.gw.service.queue.stopTimeout = 2.5  # (time for two more transactions)
        yield self.gw.stop()
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net"])
        spool = self.gw.service.spool
        self.assertEqual(sorted(spool.queueIds()), sorted(qids[2:]))
        for qid in qids[2:]:
            self.assertEqual(spool.readState(qid), {})  # no attempt counted
        self.assertEqual(self.logs.find("deliveries in flight cut short"), [])
        yield self.deliveredAfterRestart(["r2@example.net", "r3@example.net"])

    @defer.inlineCallbacks
    def test_connecting(self):
        """A connection attempt the next hop never completes (its accept queue full) is cancelled."""
        self.logs = LogCapture(self)
        full = socket.socket()
        self.addCleanup(full.close)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname())  # (takes the one place in the queue)
        self.addCleanup(filler.close)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % full.getsockname()[1]], "command_timeout": 60})
        qid = yield self.send(rcpts=("a@example.net",))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertIn(qid, self.gw.service.queue.active)
        yield self.stopAndCheck([qid])
        yield self.deliveredAfterRestart(["a@example.net"])

    @defer.inlineCallbacks
    def test_startedBeforeAReload(self):
        """A delivery that began before a reload replaced the next hops is cut short too."""
        self.logs = LogCapture(self)
        hop, port = self.hop(endOfData=None)
        relay = {"smarthosts": ["[127.0.0.1]:%d" % port]}
        yield self.gateway(relay)
        qid = yield self.send(rcpts=("a@example.net",))
        yield self.until(lambda: hop.transactions)
        router = self.gw.service.queue.router
        with open(self.gw.path, "w") as f:
            f.write(configText(self.gw.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                               relay=dict(FAST, retry_max=0.9, **relay)))
        self.gw.service.configPath = self.gw.path  # (what SIGHUP reads)
        self.gw.service.reload()
        self.assertIsNot(self.gw.service.queue.router, router)
        yield self.stopAndCheck([qid])
        yield self.deliveredAfterRestart(["a@example.net"])

    @defer.inlineCallbacks
    def test_quitNeverAnswered(self):
        """
        A connection kept open for reuse, its next hop silent at QUIT: the
        stop cuts it after a moment rather than waiting out the command
        timeout (which held the drain for 300 s by default).
        """
        hop, port = self.hop(replies={"QUIT": None})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "command_timeout": 30})
        yield self.send(rcpts=("a@example.net",))
        yield self.until(self.spoolEmpty)
        started = reactor.seconds()
        yield self.gw.stop()
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(hop.verbs().count("QUIT"), 1)
        yield self.until(lambda: all(c.transport.disconnected for c in hop.connections))

    @defer.inlineCallbacks
    def test_partlyAttempted(self):
        """
        One recipient refused for now at RCPT, the other's delivery cut
        short: the refusal is recorded (an attempt for it), the other stays
        to do, and the line says the message was not delivered before the stop.
        """
        self.logs = LogCapture(self)
        hop, port = self.hop(endOfData=None, rcpt={"first@example.net": "451 4.3.0 try later"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        qid = yield self.send(rcpts=("first@example.net", "second@example.net"))
        yield self.until(lambda: hop.transactions)
        self.gw.service.queue.stopTimeout = 0.3
        yield self.gw.stop()
        self.assertEqual(len(self.logs.find("not delivered before the stop", qid=qid)), 1)
        [deferred] = self.logs.find("status=", qid=qid)
        self.assertEqual((deferred["to"], deferred["status"]), ("first@example.net", "deferred"))
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(set(state["rcpts"]), {"first@example.net"})
        self.assertEqual(state["rcpts"]["first@example.net"]["status"], "deferred")
        self.assertEqual(state["attempts"], 1)

    @defer.inlineCallbacks
    def test_lookingUpTheNextHop(self):
        """A delivery still waiting for its MX lookup (a resolver that never answers) is cut short too."""
        self.logs = LogCapture(self)
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % silent.getsockname()[1]})
        qid = yield self.send(rcpts=("a@example.net",))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertIn(qid, self.gw.service.queue.active)
        yield self.stopAndCheck([qid])
        yield task.deferLater(reactor, 1.2, lambda: None)  # (the resolver forgets the query after its first timeout)

    @defer.inlineCallbacks
    def test_deliveredPartLoggedAtOnce(self):
        """
        A message split over two next hops, one of which never answers: the
        other's delivery is in the mail log as soon as it is made durable,
        not when the attempt ends (a stop or crash lost it), and once only.
        """
        self.logs = LogCapture(self)
        quick, qport = self.hop()
        stuck, sport = self.hop(endOfData=None)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % qport]},
                           routes=[{"name": "stuck", "domains": ["stuck.example"],
                                    "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        qid = yield self.send(rcpts=("a@quick.example", "b@stuck.example"))
        yield self.until(lambda: stuck.transactions and quick.transactions)
        yield self.until(lambda: self.logs.find("status=", qid=qid))
        [sent] = self.logs.find("status=", qid=qid)
        self.assertEqual((sent["to"], sent["status"]), ("a@quick.example", "sent"))
        self.assertIn(qid, self.gw.service.queue.active)
        self.gw.service.queue.stopTimeout = 0.3
        yield self.gw.stop()
        self.assertEqual(len(self.logs.find("status=", qid=qid)), 1)
        self.assertEqual(len(self.logs.find("not delivered before the stop", qid=qid)), 1)
        yield self.deliveredAfterRestart(["b@stuck.example"])


class IdleTests(unittest.TestCase):
    """L{QueueManager.whenIdle}, which a stop waits on."""

    @defer.inlineCallbacks
    def test_justAcceptedMessageCounts(self):
        """
        A message just accepted starts on its way at the end of the reactor's
        turn: until then the queue is not idle (a stop, or a test, waiting
        for it would not wait for that delivery).
        """
        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        self.addCleanup(spool.committer.stop)
        w = spool.newMessage({"mailfrom": "", "recipients": ["b@example.net"]})
        w.write(b"Subject: x\r\n\r\nx\r\n")
        qid = yield w.commit()
        hop = RecordingHop()
        clock = task.Clock()
        q = QueueManager(spool, lambda m, r: hop, clock)
        q.startService()
        self.addCleanup(q.stopService)
        q.enqueue(qid, w.message)
        idle = q.whenIdle()
        self.assertFalse(idle.called)
        clock.advance(0)
        yield idle
        self.assertEqual([[m.queueId for m in messages] for messages in hop.calls], [[qid]])
