"""
Delivery outcomes: the pure recording function, outcomes reported per
message as each reply is read, and progress kept in memory when its write
fails.
"""

import errno
import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.relay import outcome
from relaygw.relay.client import DeliveryOptions
from relaygw.relay.nexthop import WAITED, Result, temporary
from relaygw.relay.queue import QueueManager
from relaygw.relay.smtp import SMTPNextHop, smarthostList
from relaygw.durable import Committer
from relaygw.spool import Spool
from relaygw.testing import ScriptedSMTPFactory, ScriptedSMTPServer

OK = Result(250, "2.0.0", "ok")
LATER = Result(451, "4.4.1", "try later")
NEVER = Result(550, "5.1.1", "no such user")
POLICY = outcome.RetryPolicy(retryMin=60, retryMax=1000, lifetime=3600, bounceLifetime=600)


@defer.inlineCallbacks
def queuedMessage(case, recipients, arrival):
    """A new spool (in C{case}'s temporary directory) holding one committed message to C{recipients}."""
    spool = Spool(os.path.abspath(case.mktemp()), Committer(reactor))
    spool.open()
    w = spool.newMessage({"mailfrom": "a@example.org", "recipients": recipients,
                          "context": {"connection": {}}, "arrival": arrival})
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    return spool, (yield w.commit())


class RecordTests(unittest.TestCase):
    """L{outcome.record}: (state, outcomes, time) -> (new state, bounces, next attempt)."""

    def test_firstAttemptMixed(self):
        old = {}
        r = outcome.record(old, ["a", "b", "c"], [("hop1", {"a": OK, "b": LATER, "c": NEVER})], 1000.0, POLICY,
                           mailfrom="s@example.org", arrival=990.0)
        self.assertEqual(old, {})  # the input is not touched
        self.assertEqual(r.state["rcpts"]["a"], {"status": "done", "result": "250 2.0.0 ok", "hop": "hop1"})
        self.assertEqual(r.state["rcpts"]["b"]["status"], "deferred")
        self.assertEqual(r.state["rcpts"]["c"]["status"], "bounced")
        self.assertEqual(r.bounces, {"c": NEVER})
        self.assertEqual(r.pending, ("b",))
        self.assertEqual(r.state["attempts"], 1)
        self.assertEqual(r.nextAttempt, 1060.0)
        self.assertEqual(r.state["next_attempt"], 1060.0)
        self.assertEqual(r.state["last_error"], "451 4.4.1 try later")
        # Durable before the bounce is queued: the bounced one still to do.
        self.assertEqual(r.provisional["rcpts"]["c"]["status"], "deferred")
        self.assertEqual(r.provisional["rcpts"]["a"]["status"], "done")
        self.assertEqual([(e.recipient, e.status) for e in r.events],
                         [("a", "done"), ("b", "deferred"), ("c", "bounced")])

    def test_backoffDoublesUpToTheCap(self):
        state, waits = {}, []
        for n in range(6):
            r = outcome.record(state, ["b"], [("h", {"b": LATER})], 1000.0, POLICY, "s@example.org", 1000.0)
            state = r.state
            waits.append(r.nextAttempt - 1000.0)
        self.assertEqual(waits, [60, 120, 240, 480, 960, 1000])
        self.assertEqual(state["attempts"], 6)

    def test_forcedAttemptKeepsTheBackoff(self):
        """An operator's flush or release neither raises the back-off level nor pushes a retry further out."""
        r = outcome.record({}, ["b"], [("h", {"b": LATER})], 1000.0, POLICY, "s@example.org", 1000.0)
        r = outcome.record(r.state, ["b"], [("h", {"b": LATER})], 1010.0, POLICY, "s@example.org", 1000.0,
                           forced=True)
        self.assertEqual((r.state["attempts"], r.state["backoff"]), (2, 1))
        self.assertEqual(r.nextAttempt, 1060.0)  # the retry time still ahead stays
        r = outcome.record(r.state, ["b"], [("h", {"b": LATER})], 1100.0, POLICY, "s@example.org", 1000.0)
        self.assertEqual((r.state["attempts"], r.state["backoff"]), (3, 2))
        self.assertEqual(r.nextAttempt, 1220.0)

    def test_dueAtTheRecordedTime(self):
        """L{outcome.due}: the recorded next attempt, now without one, never beyond its back-off's delay."""
        self.assertEqual(outcome.due({}, 1000.0, POLICY), 1000.0)  # never tried
        self.assertEqual(outcome.due({"rcpts": {}, "next_attempt": None}, 1000.0, POLICY), 1000.0)  # underway
        self.assertEqual(outcome.due({"next_attempt": 900.0, "backoff": 1}, 1000.0, POLICY), 1000.0)
        self.assertEqual(outcome.due({"next_attempt": 1050.0, "backoff": 1}, 1000.0, POLICY), 1050.0)
        # Written before the clock was set back: no longer than its delay from now.
        self.assertEqual(outcome.due({"next_attempt": 90000.0, "backoff": 2}, 1000.0, POLICY), 1120.0)
        self.assertEqual(outcome.due({"next_attempt": 90000.0, "attempts": 9}, 1000.0, POLICY), 2000.0)

    def test_underwayNamesNoNextAttempt(self):
        state = {"rcpts": {"a": {"status": "done"}}, "next_attempt": 1060.0, "backoff": 1}
        self.assertIsNone(outcome.underway(state)["next_attempt"])
        self.assertEqual(state["next_attempt"], 1060.0)  # the input is not touched

    def test_expiredDeferralBounces(self):
        r = outcome.record({}, ["b"], [("h", {"b": LATER})], 5000.0, POLICY, "s@example.org", arrival=1000.0)
        self.assertEqual(r.bounces, {"b": LATER})
        self.assertEqual(r.pending, ())
        self.assertIsNone(r.nextAttempt)

    def test_nullSenderUsesBounceLifetimeAndNeverBounces(self):
        r = outcome.record({}, ["b"], [("h", {"b": LATER})], 1700.0, POLICY, "", arrival=1000.0)
        self.assertEqual(r.state["rcpts"]["b"]["status"], "bounced")
        self.assertIsNone(r.provisional)  # nobody to send a bounce to
        r = outcome.record({}, ["b"], [("h", {"b": LATER})], 1500.0, POLICY, "", arrival=1000.0)
        self.assertEqual(r.pending, ("b",))

    def test_attemptStillGoingRecordsOnlySuccesses(self):
        r = outcome.record({}, ["a", "b"], [("h1", {"a": OK, "b": LATER})], 1000.0, POLICY, ended=False)
        self.assertEqual(r.state["rcpts"], {"a": {"status": "done", "result": "250 2.0.0 ok", "hop": "h1"}})
        self.assertNotIn("attempts", r.state)
        self.assertIsNone(r.nextAttempt)
        self.assertEqual(r.pending, ("b",))

    def test_allDone(self):
        r = outcome.record({"rcpts": {"a": {"status": "done"}}, "attempts": 2}, ["a", "b"],
                           [("h", {"b": OK})], 1000.0, POLICY, "s@example.org")
        self.assertEqual(r.pending, ())
        self.assertIsNone(r.nextAttempt)
        self.assertEqual(r.state["attempts"], 3)
        self.assertIsNone(r.state["next_attempt"])  # (a crash before its removal: the next start goes on at once)

    def test_allBouncedNamesNoRetryTime(self):
        """The record made durable before the bounce is queued: a crash before it is queues it at the next start."""
        r = outcome.record({}, ["a"], [("h", {"a": NEVER})], 1000.0, POLICY, "s@example.org")
        self.assertEqual(r.provisional["rcpts"]["a"]["status"], "deferred")
        self.assertIsNone(r.provisional["next_attempt"])
        self.assertEqual(outcome.due(r.provisional, 1000.0, POLICY), 1000.0)

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from([OK, LATER, NEVER]), min_size=1),
           st.lists(st.sampled_from(["done", "bounced", "deferred", None]), min_size=6, max_size=6),
           st.floats(0, 10000))
    def test_finalStaysFinal(self, results, before, now):
        """A recipient done or bounced stays so; pending is exactly what is neither."""
        rcpts = list("abcdef")
        state = {"rcpts": {r: {"status": s} for r, s in zip(rcpts, before) if s}}
        r = outcome.record(state, rcpts, [("h", results)], now, POLICY, "s@example.org", arrival=0.0)
        for rcpt, old in zip(rcpts, before):
            if old in outcome.FINAL:
                self.assertIn(r.state["rcpts"][rcpt]["status"], outcome.FINAL)
        self.assertEqual(list(r.pending), outcome.pending(r.state, rcpts))
        self.assertEqual(r.nextAttempt is None, not r.pending)
        self.assertTrue(set(r.bounces) <= set(results))


class _SlowSecondServer(ScriptedSMTPServer):
    """Answers the end of data of every message but the first only when the test says so."""

    def reply(self, text):
        if text == self.factory.endOfData and self.completed > 1:
            self.factory.held.append(lambda: ScriptedSMTPServer.reply(self, text))
            return
        ScriptedSMTPServer.reply(self, text)


class PerMessageTests(unittest.TestCase):
    """A next hop reports each message's outcome when its reply is read, not at the end of the batch."""

    @defer.inlineCallbacks
    def test_firstMessageReportedWhileTheSecondWaits(self):
        factory = ScriptedSMTPFactory(extensions=["PIPELINING"])
        factory.protocol = _SlowSecondServer
        factory.held = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        directory = os.path.abspath(self.mktemp())
        spool = Spool(directory, Committer(reactor))
        spool.open()
        messages = []
        for n in range(2):
            w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["r%d@example.net" % n],
                                  "context": {"connection": {}}})
            w.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
            yield w.commit()
            messages.append(w.message)
        hop = SMTPNextHop(reactor, "test", smarthostList([("127.0.0.1", port.getHost().port)]),
                          DeliveryOptions(heloName="gw.test", tls="none", timeout=10), maxConnections=1)
        # Both go out on the one connection, in one batch.
        first, second = hop.deliver([messages[0]]), hop.deliver([messages[1]])
        deadline = reactor.seconds() + 10
        while not factory.held and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(first.called)
        self.assertEqual(first.result, [{"r0@example.net": Result(250, "2.0.0", "Ok: queued as 4ABC")}])
        self.assertFalse(second.called)
        factory.held.pop()()
        self.assertEqual((yield second), [{"r1@example.net": Result(250, "2.0.0", "Ok: queued as 4ABC")}])
        while hop.active:
            yield task.deferLater(reactor, 0.02, lambda: None)
        yield hop.closeIdle()
        for c in factory.connections:
            c.transport.loseConnection()


class _Hop:
    def __init__(self, replies):
        self.replies = replies
        self.calls = []

    def describe(self):
        return "test"

    def deliver(self, messages, progress=None):
        self.calls.append(list(messages[0].recipients))
        return [{r: self.replies[r] for r in messages[0].recipients}]

    def closeIdle(self):
        return defer.succeed(None)


class FailingWriteSpool(Spool):
    """A spool whose next C{failures} progress writes fail with ENOSPC (fault injection)."""

    failures = 0

    def writeState(self, queueId, state):
        if self.failures:
            self.failures -= 1
            return defer.fail(OSError(errno.ENOSPC, "No space left on device"))
        return Spool.writeState(self, queueId, state)


class ProgressWriteFailureTests(unittest.TestCase):
    """A progress write that fails: kept in memory, written again with back-off, no recipient re-sent."""

    @defer.inlineCallbacks
    def test_doneRecipientNeverSentAgain(self):
        clock = task.Clock()
        spool = FailingWriteSpool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["ok@example.net", "later@example.net"],
                              "context": {"connection": {}}, "arrival": 0})
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        qid = yield w.commit()
        hop = _Hop({"ok@example.net": OK, "later@example.net": LATER})
        q = QueueManager(spool, lambda m, r: hop, clock, retryMin=30, retryMax=30, lifetime=10 ** 12)
        spool.failures = 2
        q.startService()
        q.enqueue(qid)
        yield q.whenIdle()
        self.assertEqual(hop.calls, [["ok@example.net", "later@example.net"]])
        self.assertEqual(spool.readState(qid), {})  # nothing on disk...
        self.assertEqual(q.progress[qid]["rcpts"]["ok@example.net"]["status"], "done")  # ...but in memory
        # The next attempt reads the progress from memory.
        clock.advance(30)
        yield q.whenIdle()
        self.assertEqual(hop.calls[-1], ["later@example.net"])
        # The write is tried again after 1 s, then 2 s (the second failure
        # was the next attempt's own write).
        clock.advance(2)
        yield spool.whenStateWritten(qid)
        self.assertNotIn(qid, q.progress)
        state = spool.readState(qid)
        self.assertEqual(state["rcpts"]["ok@example.net"]["status"], "done")
        self.assertEqual(state["attempts"], 2)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        yield q.stopService()


class NextHopInterfaceTests(unittest.TestCase):
    """Every next hop and router provides what the queue manager asks of it, declared, not probed."""

    def test_nextHopsProvideINextHop(self):
        from zope.interface.verify import verifyObject

        from relaygw.relay.maildir import MaildirNextHop
        from relaygw.relay.nexthop import INextHop

        smtp = SMTPNextHop(reactor, "test", smarthostList([("127.0.0.1", 25)]),
                           DeliveryOptions(heloName="gw.test"))
        maildir = MaildirNextHop(os.path.abspath(self.mktemp()), Committer(reactor), reactor)
        for hop in (smtp, maildir):
            self.assertTrue(verifyObject(INextHop, hop))
            self.assertTrue(hop.unused)
            self.assertTrue(hop.closeIdle().called)

    def test_routersProvideIRouter(self):
        from zope.interface.verify import verifyObject

        from relaygw import config
        from relaygw.relay.maildir import MaildirNextHop
        from relaygw.relay.nexthop import FunctionRouter, IRouter
        from relaygw.relay.router import Router

        conf = config.parse('[relay]\nsmarthosts = ["127.0.0.1:2525"]\n[[listener]]\nname = "a"\nendpoint = "tcp:25"\n')
        maildir = MaildirNextHop(os.path.abspath(self.mktemp()), Committer(reactor), reactor)
        router = Router(conf, reactor, maildir)
        self.assertTrue(verifyObject(IRouter, router))
        self.assertTrue(router.closeIdle().called)
        # The queue manager takes a plain function as a router too.
        q = QueueManager(None, lambda m, r: maildir, reactor)
        self.assertIsInstance(q.router, FunctionRouter)
        self.assertTrue(verifyObject(IRouter, q.router))
        self.assertIs(q.router(None, "r@example.net"), maildir)
        q.router = router
        self.assertIs(q.router, router)


class _PendingHop(_Hop):
    """A next hop whose answer comes when the test gives it."""

    def deliver(self, messages, progress=None):
        self.calls.append(list(messages[0].recipients))
        self.answer = defer.Deferred()
        return self.answer


class SeveralNextHopsTests(unittest.TestCase):
    """A message split over next hops: what one hop accepted is durable before the others answer."""

    @defer.inlineCallbacks
    def test_firstHopsSuccessRecordedAtOnce(self):
        spool, qid = yield queuedMessage(self, ["fast@a.example", "slow@b.example"], 0)
        fast, slow = _Hop({"fast@a.example": OK}), _PendingHop({})
        q = QueueManager(spool, lambda m, r: fast if r.endswith("a.example") else slow, task.Clock(),
                         retryMin=30, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qid)
        yield spool.whenStateWritten(qid)
        self.assertEqual(spool.readState(qid)["rcpts"]["fast@a.example"]["status"], "done")
        self.assertNotIn("slow@b.example", spool.readState(qid)["rcpts"])
        self.assertIn(qid, q.active)  # the attempt goes on
        slow.answer.callback([{"slow@b.example": LATER}])
        yield q.whenIdle()
        state = spool.readState(qid)
        self.assertEqual((state["rcpts"]["fast@a.example"]["status"], state["rcpts"]["slow@b.example"]["status"],
                          state["attempts"]), ("done", "deferred", 1))
        yield q.stopService()

    @defer.inlineCallbacks
    def test_recordWrittenDuringAForcedAttemptNamesNoRetryTime(self):
        """
        A forced attempt's record written while it goes on names no next
        attempt (a crash then has the next start make it again at once); at
        its end the record keeps the retry time it had.
        """
        spool, qid = yield queuedMessage(self, ["fast@a.example", "slow@b.example"], 0)
        later = time.time() + 1000
        yield spool.writeState(qid, {"rcpts": {}, "attempts": 1, "backoff": 1, "next_attempt": later})
        fast, slow = _Hop({"fast@a.example": OK}), _PendingHop({})
        q = QueueManager(spool, lambda m, r: fast if r.endswith("a.example") else slow, task.Clock(),
                         retryMin=30, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qid, forced=True)
        yield spool.whenStateWritten(qid)
        state = spool.readState(qid)
        self.assertEqual(state["rcpts"]["fast@a.example"]["status"], "done")
        self.assertIsNone(state["next_attempt"])
        slow.answer.callback([{"slow@b.example": LATER}])
        yield q.whenIdle()
        yield spool.whenStateWritten(qid)
        state = spool.readState(qid)
        self.assertEqual((state["next_attempt"], state["backoff"], state["attempts"]), (later, 1, 2))
        yield q.stopService()


class StoppedAttemptTests(unittest.TestCase):
    """An attempt the gateway's stop cuts short leaves its message to go again at once at the next start."""

    @defer.inlineCallbacks
    def test_cutShortAttemptLeavesNoRetryTime(self):
        spool, qid = yield queuedMessage(self, ["fast@a.example", "slow@b.example"], 0)
        first, second = _PendingHop({}), _Hop({"slow@b.example": OK})
        # One delivery slot: the second next hop's turn comes once the first has answered.
        q = QueueManager(spool, lambda m, r: first if r.endswith("a.example") else second, task.Clock(),
                         concurrency=1, retryMin=30, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qid)
        stopped = q.stopService()
        first.answer.callback([{"fast@a.example": OK}])  # then the stop leaves the second untried
        yield stopped
        yield spool.whenStateWritten(qid)
        self.assertEqual(second.calls, [])
        state = spool.readState(qid)
        self.assertEqual(state["rcpts"]["fast@a.example"]["status"], "done")
        self.assertNotIn("slow@b.example", state["rcpts"])
        self.assertIsNone(state["next_attempt"])
        self.assertEqual(outcome.due(state, 1000.0, q.policy), 1000.0)


class _FullHop(_Hop):
    """A next hop that hands every message back untried (no connection came free) until the test makes room."""

    def __init__(self):
        _Hop.__init__(self, {})
        self.rooms = []

    def deliver(self, messages, progress=None):
        self.calls.append(list(messages[0].recipients))
        return [{r: WAITED for r in messages[0].recipients}]

    def whenRoom(self, message):
        d = defer.Deferred()
        self.rooms.append(d)
        return d


class HandedBackClockStepTests(unittest.TestCase):
    """
    How long a message has been handed back untried is measured on the
    reactor's clock (monotonic under the gateway), not the wall clock: a
    step of the system time neither counts it as waited too long at once
    nor holds it for the length of the step.
    """

    @defer.inlineCallbacks
    def handedBack(self):
        """
        A message handed back untried by a next hop with no room, once: its
        spool, id, hop, the queue manager's clock and the step added to the
        system time (C{step[0]}), and the queue manager.
        """
        spool, qid = yield queuedMessage(self, ["r@example.net"], time.time())
        hop, clock, step = _FullHop(), task.Clock(), [0]
        real = time.time
        self.patch(time, "time", lambda: real() + step[0])
        q = QueueManager(spool, lambda m, r: hop, clock, retryMin=300, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qid)
        yield q.whenIdle()
        return spool, qid, hop, clock, step, q

    @defer.inlineCallbacks
    def test_stepForwardCountsNoAttempt(self):
        spool, qid, hop, clock, step, q = yield self.handedBack()
        self.assertEqual(len(hop.calls), 1)
        step[0] = 3600  # the system clock set an hour on
        clock.advance(1)
        hop.rooms[-1].callback(None)  # room for it a second later: handed back again
        yield q.whenIdle()
        yield spool.whenStateWritten(qid)
        self.assertEqual(len(hop.calls), 2)
        self.assertEqual(spool.readState(qid), {})  # not deferred: it has waited one second, not an hour
        self.assertIn(qid, q.retries.parked())
        yield q.stopService()

    @defer.inlineCallbacks
    def test_stepBackwardHoldsNoLonger(self):
        spool, qid, hop, clock, step, q = yield self.handedBack()
        step[0] = -3600  # the system clock set an hour back
        clock.advance(1)
        hop.rooms[-1].callback(None)  # handed back again: parked until retry_min from the first time at most
        yield q.whenIdle()
        self.assertEqual(len(hop.calls), 2)
        clock.advance(299)
        yield q.whenIdle()
        yield spool.whenStateWritten(qid)
        self.assertEqual(len(hop.calls), 3)
        self.assertEqual(spool.readState(qid)["attempts"], 1)  # waited retry_min: deferred as any other
        yield q.stopService()


class _BrokenHop(_Hop):
    """A next hop whose C{deliver} raises (a bug in it, say)."""

    def deliver(self, messages, progress=None):
        raise RuntimeError("next hop bug")


class _SpoolMixin:
    """A spool of its own, and a message for r@example.net committed to it."""

    def setUp(self):
        self.spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        self.spool.open()

    @defer.inlineCallbacks
    def _queued(self):
        w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["r@example.net"],
                                   "context": {"connection": {}}, "arrival": 0})
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        qid = yield w.commit()
        return qid


class FailedAttemptTests(_SpoolMixin, unittest.TestCase):
    """What goes wrong outside any next hop's replies is logged, deferred, and frees the attempt's slot."""

    @defer.inlineCallbacks
    def test_nextHopThatRaisesDefersTheRecipients(self):
        qid = yield self._queued()
        clock = task.Clock()
        q = QueueManager(self.spool, lambda m, r: _BrokenHop({}), clock, retryMin=30, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qid)
        yield q.whenIdle()
        yield self.spool.whenStateWritten(qid)
        rcpt = self.spool.readState(qid)["rcpts"]["r@example.net"]
        self.assertEqual(rcpt["status"], "deferred")
        self.assertIn("next hop failure: next hop bug", rcpt["result"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(q.active, set())
        self.assertIn(qid, q.timers)
        yield q.stopService()

    @defer.inlineCallbacks
    def test_attemptThatRaisesIsRetriedAndFreesItsSlot(self):
        qid = yield self._queued()
        clock = task.Clock()
        q = QueueManager(self.spool, lambda m, r: _Hop({"r@example.net": OK}), clock, retryMin=30,
                         lifetime=10 ** 12)
        broken = []

        def load(queueId):
            broken.append(queueId)
            raise RuntimeError("cannot read it back")

        self.patch(self.spool, "load", load)
        q.startService()
        q.enqueue(qid)
        yield q.whenIdle()
        self.assertEqual(broken, [qid])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(q.active, set())
        self.assertTrue(q.timers[qid].active())
        self.assertEqual(q.timers[qid].getTime(), 30)
        yield q.stopService()


class JustAcceptedTests(_SpoolMixin, unittest.TestCase):
    """
    Messages handed in as they are accepted (the commits of one batch)
    start on their way together, once the reactor's turn is over: every
    one of them has its 250 first.
    """

    def setUp(self):
        _SpoolMixin.setUp(self)
        self.clock = task.Clock()
        self.hop = _Hop({"r@example.net": OK})
        self.q = QueueManager(self.spool, lambda m, r: self.hop, self.clock, retryMin=30, lifetime=10 ** 12)
        self.q.startService()

    def atOnce(self):
        return [c for c in self.clock.getDelayedCalls() if c.getTime() == self.clock.seconds()]

    @defer.inlineCallbacks
    def test_attemptsStartAfterTheTurn(self):
        first = yield self._queued()
        second = yield self._queued()
        self.q.enqueue(first, self.spool.load(first))
        self.q.enqueue(second, self.spool.load(second))
        self.assertEqual((self.hop.calls, self.q.active), ([], set()))
        self.assertEqual(len(self.atOnce()), 1)  # one call for the batch
        self.clock.advance(0)
        self.assertEqual(self.hop.calls, [["r@example.net"], ["r@example.net"]])
        yield self.q.whenIdle()
        yield self.q.stopService()
        self.assertEqual(self.atOnce(), [])

    @defer.inlineCallbacks
    def test_queuedAgainStartsAtOnce(self):
        """A message handed in without its content (a retry, a flush) is not held for the turn."""
        qid = yield self._queued()
        self.q.enqueue(qid)
        self.assertEqual(self.hop.calls, [["r@example.net"]])
        self.assertEqual(self.atOnce(), [])
        yield self.q.whenIdle()
        yield self.q.stopService()

    @defer.inlineCallbacks
    def test_stopBeforeTheTurnEnds(self):
        """Stopped before the turn is over: nothing goes out, the message stays queued."""
        qid = yield self._queued()
        self.q.enqueue(qid, self.spool.load(qid))
        yield self.q.stopService()
        self.assertEqual(self.atOnce(), [])
        self.clock.advance(0)
        self.assertEqual(self.hop.calls, [])
        self.assertTrue(self.spool.exists(qid))


class BackoffOverflowTests(unittest.TestCase):
    """
    A message retried for days with a float retry_min: the doubling of its
    wait once overflowed a float (past about 1,024 attempts), the attempt
    failed, and the message was retried for ever, never expired.
    """

    policy = outcome.RetryPolicy(retryMin=1.5, retryMax=60.0, lifetime=5 * 86400, bounceLifetime=5 * 86400)

    def test_manyAttemptsStillScheduled(self):
        state = {"rcpts": {"r@example.net": {"status": "deferred", "result": "451", "hop": "h"}},
                 "attempts": 1100, "backoff": 1100}
        recorded = outcome.record(state, ["r@example.net"], [("h", {"r@example.net": temporary("later")})],
                                  now=1000.0, policy=self.policy, mailfrom="s@example.org", arrival=900.0)
        self.assertEqual(recorded.nextAttempt, 1060.0)

    def test_expiredAfterManyAttemptsBounces(self):
        state = {"rcpts": {"r@example.net": {"status": "deferred", "result": "451", "hop": "h"}},
                 "attempts": 7000, "backoff": 7000}
        now = 1000.0 + 5 * 86400
        recorded = outcome.record(state, ["r@example.net"], [("h", {"r@example.net": temporary("later")})],
                                  now=now, policy=self.policy, mailfrom="s@example.org", arrival=1000.0)
        self.assertEqual(list(recorded.bounces), ["r@example.net"])


class OwedNoticeTests(unittest.TestCase):
    """The success notices a progress record says are owed (L{outcome.owe}, L{outcome.owed}, L{outcome.paid})."""

    def test_roundTripThroughTheRecord(self):
        """What is owed reads back as the same results after a JSON round trip, for done recipients only."""
        import json

        relayed = Result(250, "2.0.0", "Ok: queued as 4ABC", "mx.example[192.0.2.1]:25", reply=True,
                         action="relayed")
        state = outcome.record({}, ["a@x", "b@x"], [("smtp:x", {"a@x": relayed, "b@x": temporary("later")})],
                               1000.0, outcome.RetryPolicy()).state
        outcome.owe(state, {"a@x": relayed})
        back = outcome.owed(json.loads(json.dumps(state)))
        self.assertEqual(list(back), ["a@x"])
        got = back["a@x"]
        self.assertEqual((got.code, got.enhanced, got.text, got.relay, got.reply, got.action),
                         (250, "2.0.0", "Ok: queued as 4ABC", "mx.example[192.0.2.1]:25", True, "relayed"))

    def test_paidLeavesTheOriginal(self):
        """C{paid} gives a record owing nothing, and leaves the one it was given as it was."""
        done = Result(250, "2.0.0", "Ok", action="delivered")
        state = outcome.record({}, ["a@x"], [("maildir", {"a@x": done})], 1000.0, outcome.RetryPolicy()).state
        outcome.owe(state, {"a@x": done})
        self.assertEqual(outcome.owed(outcome.paid(state)), {})
        self.assertEqual(list(outcome.owed(state)), ["a@x"])
        self.assertEqual(outcome.paid(outcome.paid(state))["rcpts"]["a@x"]["status"], outcome.DONE)


class TurnBoundTests(unittest.TestCase):
    """The queue manager starts a bounded number of attempts in one turn of the reactor, the rest at the next."""

    @defer.inlineCallbacks
    def test_backlogHandedBackAtOnceSpreadOverTurns(self):
        """
        A backlog due together (a flush) to a destination that hands each
        message back at once (at its share of the delivery slots): each
        handed back frees its slot for the next, but no more than
        C{startsPerTurn} attempts start in one turn (before: all 60 in the
        turn of the flush, and every SMTP session waited for them).  Each
        is tried once, and all of them in the end.
        """
        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        qids = []
        for i in range(60):
            w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["r%d@example.net" % i],
                                  "context": {"connection": {}}, "arrival": i})
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            qids.append((yield w.commit()))
        hop, clock = _FullHop(), task.Clock()
        q = QueueManager(spool, lambda m, r: hop, clock, concurrency=5, retryMin=300, lifetime=10 ** 12)
        q.startsPerTurn = 10
        q.startService()
        q.flush()
        self.assertEqual(len(hop.calls), q.startsPerTurn)
        turns = 1
        while len(hop.calls) < len(qids) and turns < 100:
            _oneTurn(clock)
            self.assertLessEqual(len(hop.calls), q.startsPerTurn * (turns + 1))
            turns += 1
        self.assertEqual(turns, 6)
        yield q.whenIdle()
        self.assertEqual(sorted(tuple(c) for c in hop.calls), sorted(("r%d@example.net" % i,) for i in range(60)))
        self.assertEqual(sorted(q.retries.parked()), sorted(qids))
        yield q.stopService()

    @defer.inlineCallbacks
    def test_roomForAParkedMessageGoesFirst(self):
        """
        A parked message its next hop has room for goes before messages
        waiting for a delivery slot: started a few a turn, a backlog of
        them handed back one after another would otherwise keep the
        destination's connections kept for the parked ones idle.
        """
        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        qids = {}
        for rcpt in ("a@full.example", "x@busy.example", "b@full.example"):
            w = spool.newMessage({"mailfrom": "s@example.org", "recipients": [rcpt], "context": {"connection": {}},
                                  "arrival": 0})
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            qids[rcpt[0]] = yield w.commit()
        full, busy = _FullHop(), _PendingHop({})
        q = QueueManager(spool, lambda m, r: busy if r.endswith("busy.example") else full, task.Clock(),
                         concurrency=1, retryMin=300, lifetime=10 ** 12)
        q.startService()
        q.enqueue(qids["a"])
        yield q.whenIdle()  # (handed back: parked)
        q.enqueue(qids["x"])  # (the one delivery slot busy)
        q.enqueue(qids["b"])
        full.rooms[0].callback(None)
        self.assertEqual(list(q.ready), [qids["a"], qids["b"]])
        busy.answer.callback([{"x@busy.example": OK}])
        for _ in range(500):  # (the progress of the busy one is written first: bounded wait)
            if len(full.calls) == 3 and not q.active:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(full.calls, [["a@full.example"], ["a@full.example"], ["b@full.example"]])
        yield q.stopService()


def _oneTurn(clock):
    """
    The calls of C{clock} due now, as a turn of the reactor runs them:
    those they make run at the next turn (C{Clock.advance} runs them too).
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
