"""
What one delivery attempt of one queued message does, from reading it back
to its recorded outcome: the router groups the recipients by next hop;
each next hop's replies are recorded as they come in
(L{relaygw.relay.outcome}); the mail log and the metrics hear of every
recipient (L{relaygw.relay.deliverylog}); failures for good are bounced;
then the message leaves the spool or waits for its retry (or, handed back
untried, for room at its next hop: L{relaygw.relay.handback}), and one
that cannot be read back is set aside.  The queue manager
(L{relaygw.relay.queue}) decides when attempts run.
"""

import collections
import time

from twisted.internet import defer

from relaygw import maillog
from relaygw.logs import Logger
from relaygw.relay import outcome
from relaygw.relay.deliverylog import DeliveryLog
from relaygw.relay.dsn import queueBounce, queueSuccess, wanted
from relaygw.relay.handback import HandBacks
from relaygw.relay.nexthop import STOPPED, WAITED, temporary
from relaygw.relay.progress import ProgressWriter
from relaygw.spoolapi import CorruptMessage

log = Logger(namespace="relaygw.queue")


class _Attempt:
    """One delivery attempt of one message, while its next hops reply."""

    def __init__(self, qid, message, state, fresh, waiting, forced=False):
        self.qid = qid
        self.forced = forced
        self.message = message
        self.state = state
        self.fresh = fresh
        self.waiting = waiting
        self.outcomes = []
        #: Recipients whose delivery the mail log has told already (L{Attempts._keep}).
        self.logged = set()
        #: The (first) next hop that handed the message back untried (L{WAITED}).
        self.waitedOn = None


class Attempts:
    """
    The delivery attempts of one queue manager (C{manager}), whose settings
    (router, retry policy, hostname, metrics) they use as they are at the
    time, and whose timers they ask for a retry.

    @ivar progress: the L{ProgressWriter} of the messages' progress records.
    @ivar handBacks: the L{HandBacks} of the messages handed back untried.
    @ivar mailLog: the L{DeliveryLog} that tells each recipient's outcome.
    """

    def __init__(self, manager, spool, reactor):
        self.manager = manager
        self.spool = spool
        self.progress = ProgressWriter(spool, reactor)
        self.mailLog = DeliveryLog(manager, spool)
        self.handBacks = HandBacks(manager, reactor)
        self.unremoved = set()  # qids whose removal failed (their queue file may have gone with it)

    def run(self, qid, message, forced):
        """
        Attempt delivery of C{qid}: C{message} when it was just accepted
        (not read back, no progress yet), else C{None}.  C{forced}: an
        operator asked for it.  Fires once its outcome is recorded.
        """
        fresh = message is not None
        try:
            if message is None:
                message = self.spool.load(qid)
            state = self.progress.unwritten.get(qid)  # newer than the disk when a write failed
            if state is None:
                state = {} if fresh else self.spool.readState(qid)  # just accepted: no progress yet
        except FileNotFoundError:
            self.forget(qid)
            return None  # deleted meanwhile (relaygw-queue delete)
        except CorruptMessage as e:
            return self._quarantine(qid, e)
        if not fresh and self.spool.isHeld(qid):
            self.handBacks.forget(qid)  # (held, it waits for no connection)
            return None  # (a message held as it was accepted: its next hop finds it withdrawn)
        todo = outcome.pending(state, message.recipients)
        if not todo:
            owed = outcome.owed(state)  # (a crash came between a success and its notice)
            if owed:
                return self._notifySuccess(message, owed).addCallback(lambda _: self._remove(qid, fresh, state))
            return self._remove(qid, fresh, state)
        groups = collections.OrderedDict()
        router = self.manager.router
        for r in todo:
            groups.setdefault(router(message, r), []).append(r)
        attempt = _Attempt(qid, message, state, fresh, len(groups), forced)
        attempt.started = time.time()
        if len(groups) == 1:  # (the usual case: one next hop, no DeferredList to wait through)
            self.manager.waitingFor(qid, 1)
            [(hop, recipients)] = groups.items()
            return self._deliver(attempt, hop, recipients)
        # The delivery slots the other attempts leave (this one holds one):
        # a message to many domains takes its next hops that many at a time.
        room = max(1, self.manager.concurrency - self.manager.deliveries() + 1)
        self.manager.waitingFor(qid, len(groups))
        if len(groups) <= room:
            ds = [self._deliver(attempt, hop, recipients) for hop, recipients in groups.items()]
        else:
            turns = defer.DeferredSemaphore(room)
            ds = [turns.run(self._deliver, attempt, hop, recipients) for hop, recipients in groups.items()]
        return defer.gatherResults(ds, consumeErrors=True)

    def _deliver(self, attempt, hop, recipients):
        """
        Hand C{recipients} to C{hop}; fires once their replies are taken.  A
        next hop whose turn comes after the stop began is not started: its
        recipients stay as they were (L{STOPPED}).
        """
        if not self.manager.running:
            return defer.maybeDeferred(self._replied, [{r: STOPPED for r in recipients}], attempt, hop)
        d = defer.maybeDeferred(hop.deliver, [attempt.message.narrowed(recipients)],
                                progress=lambda _, results: self._keep(attempt, hop, results))
        return d.addCallbacks(self._replied, self._hopFailed, callbackArgs=(attempt, hop),
                              errbackArgs=(attempt, recipients, hop))

    def _quarantine(self, qid, error):
        """A queue or state file that can't be read back: set it aside once, never retry it."""
        log.error("{qid}: corrupt {path}: {reason}; moved to corrupt/", qid=qid, path=error.path,
                  reason=error.reason)
        self.manager.retries.cancel(qid)
        self.forget(qid)
        self.spool.quarantine(qid, "%s: %s" % (error.path, error.reason))
        if self.manager.metrics:
            self.manager.metrics.corrupt()

    def _hopFailed(self, failure, attempt, recipients, hop):
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure  # (what failed, not the list of Deferreds that gathered it)
        if failure.check(OSError):
            # The disk or the system said no (a Maildir not writable, say): a line says it, not a traceback.
            log.error("next hop {hop} failed: {why}", hop=hop.describe(), why=failure.getErrorMessage())
        else:
            log.failure("next hop {hop} failed", failure, hop=hop.describe())
        result = temporary("next hop failure: %s" % (failure.getErrorMessage(),))
        return self._replied([{r: result for r in recipients}], attempt, hop)

    def _replied(self, results, attempt, hop):
        """
        One next hop's replies for the message (C{results}: what its
        C{deliver} gives, a list of one), as soon as they are read; the
        last one ends the attempt.
        """
        results = results[0]
        attempt.outcomes.append((hop.describe(), results))
        if attempt.waitedOn is None and WAITED in results.values():
            attempt.waitedOn = hop
        attempt.waiting -= 1
        if attempt.waiting:
            self.manager.waitingFor(attempt.qid, attempt.waiting)
            return self._keep(attempt, hop, results)
        return self._record(attempt)

    def _keep(self, attempt, hop, results):
        """
        Replies read while the attempt goes on (another next hop, or this
        one's next host, still works on the message): the successes are made
        durable at once, so that a crash re-sends to none of them, and
        logged at once (a stop or crash before the attempt ends would lose
        the lines).
        """
        recorded = outcome.record(attempt.state, attempt.message.recipients, [(hop.describe(), results)],
                                  time.time(), self.manager.policy, attempt.message.mailfrom, ended=False)
        if recorded.events:
            attempt.state, attempt.fresh = recorded.state, False
            outcome.owe(recorded.state, self._noticesDue(attempt.message, recorded.events))
            self.mailLog.tell(attempt, recorded.events)
            return self.progress.persist(attempt.qid, outcome.underway(recorded.state))
        return None

    @staticmethod
    def _noticesDue(message, events):
        """C{{recipient: result}} of those done in C{events} that are owed a success notice (RFC 3461)."""
        if not message.envelope.rcpt_params:  # (the usual case: no DSN parameters, no notice)
            return {}
        done = {e.recipient: e.result for e in events if e.status == outcome.DONE and e.result.action}
        return wanted(message, done, success=True)

    def _record(self, attempt):
        """The attempt has ended: write down what its replies say."""
        qid, message = attempt.qid, attempt.message
        self.handBacks.waitedTooLong(attempt)
        # Recipients whose message was withdrawn (held or deleted before it
        # went out), or whose delivery the gateway's stop cut short, were
        # not attempted: they stay as they were.
        outcomes = [(hop, {r: result for r, result in results.items() if not result.untried})
                    for hop, results in attempt.outcomes]
        stopped = any(result == STOPPED for _, results in attempt.outcomes for result in results.values())
        if stopped:
            log.info("{qid}: not delivered before the stop; stays queued", qid=qid)
        if not any(results for _, results in outcomes):
            if stopped:
                return None
            if not self.spool.exists(qid):
                why = "deleted"
                self.forget(qid)
            elif self.spool.isHeld(qid):
                why = "held"  # (its release brings it back)
            elif attempt.waitedOn is not None:  # (no connection came free: parked until one does)
                self.handBacks.untried(attempt)
                return None
            else:  # held and released while this attempt was under way, or its next hop's router replaced
                self.manager.retries.later(qid, time.time())
                return None
            self.handBacks.forget(qid)
            log.info("{qid}: not sent: {why} before it went out", qid=qid, why=why)
            return None
        self.handBacks.forget(qid)
        recorded = outcome.record(attempt.state, message.recipients, outcomes, time.time(),
                                  self.manager.policy, message.mailfrom, message.arrival or None,
                                  forced=attempt.forced)
        self.mailLog.tell(attempt, recorded.events)
        # Success notices owed: this attempt's, and any a crash left owed.
        # The records written before they are queued say so (L{outcome.owe}).
        done = dict(outcome.owed(attempt.state), **self._noticesDue(message, recorded.events))
        for state in (recorded.state, recorded.provisional):
            if done and state is not None:
                outcome.owe(state, done)
        fresh = attempt.fresh
        d = None
        if (recorded.provisional is not None or done) and self.spool.exists(qid):
            # Until the bounce and the notices are durable, neither a crash
            # nor a failure to queue them may re-send to the recipients that
            # succeeded or lose a report: record the progress first, with the
            # notices owed and the bounced recipients still to do (tried
            # again, and bounced again, after a restart).
            fresh = False
            d = self.progress.persist(qid, recorded.state if recorded.provisional is None else recorded.provisional)
        # What must be queued before the message may leave the spool (a
        # bounce, success notices: each returns its headers), once the
        # record above is durable; its outcome (C{written}) goes on to settle.
        notices = []
        if recorded.bounces:
            notices.append(lambda: self._bounce(message, recorded.bounces))
            if done and recorded.provisional is not None and d is not None:
                # The bounce is queued: the record says so before the notices
                # are, so a notice that cannot be queued does not bounce them again.
                notices.append(lambda: self.progress.persist(qid, recorded.state))
        if done:
            notices.append(lambda: self._notifySuccess(message, done))
        for notice in notices:
            d = (d or defer.succeed(None)).addCallback(
                lambda written, notice=notice: written if written is False else notice().addCallback(lambda _: written))

        def settle(written):
            if written is False:  # the record is not durable: no bounce or notice yet
                self.manager.retries.later(qid, recorded.nextAttempt or time.time() + self.manager.retryMin)
                return None
            if not recorded.pending:
                return self._remove(qid, fresh, recorded.state)
            if not self.spool.exists(qid):
                return self.forget(qid)
            self.manager.retries.later(qid, recorded.nextAttempt)
            state = outcome.paid(recorded.state)
            # Cut short by the stop: no retry time, so that the next start
            # makes the attempt again at once for those it left untried.
            persisted = self.progress.persist(qid, outcome.underway(state) if stopped else state)
            if self.handBacks.handedBack(attempt, recorded):
                # (Parked once the record is made and the attempt over: room told
                # while it is still active would be lost.)
                persisted.addCallback(self.handBacks.park, attempt, recorded.nextAttempt)
            return persisted

        if d is None:  # (the usual case: nothing to make durable first)
            return settle(None)
        return d.addCallback(settle)

    def forget(self, qid):
        """
        C{qid} has gone (deleted with relaygw-queue, or quarantined): nothing
        of it stays in memory, here or in the spool.
        """
        self.progress.drop(qid)
        self.handBacks.forget(qid)
        self.mailLog.forget(qid)
        self.unremoved.discard(qid)
        self.spool.forget(qid)

    def _remove(self, qid, fresh, state):
        """
        Every recipient is done or bounced (C{state}, its notices queued):
        the message leaves the spool.  A removal that fails (the spool gone
        read-only, EIO) keeps C{state} in memory, so the retry sends to
        nobody and tries the removal again (the record on disk may still
        say to send).
        """
        # Deleted with relaygw-queue while its content was with the next hop: the deletion's line
        # ("removed (relaygw-queue delete)", the queue manager's) is its removal, not a second one.
        # As with Postfix, "removed" is logged by whoever removed the queue file.
        deleted = qid not in self.unremoved and not self.spool.exists(qid)

        def removed(_):
            self.progress.finished(qid)
            self.mailLog.forget(qid)
            self.unremoved.discard(qid)
            if not deleted:
                maillog.removed(qid)

        def failed(failure):
            self.progress.keep(qid, outcome.paid(state))
            self.unremoved.add(qid)
            return failure

        return defer.maybeDeferred(self.spool.remove, qid, progress=not fresh).addCallbacks(removed, failed)

    def _bounce(self, message, failures):
        """
        Queue the bounce (L{queueBounce}) and hand it to the queue manager.
        Fires once it is durable, so the original is never removed before
        its bounce exists.
        """
        def queued(bounceId):
            if bounceId is not None:
                maillog.bounce(message.queueId, bounceId, message.mailfrom)
                self.manager.enqueue(bounceId)

        return queueBounce(self.spool, message, failures, self.manager.hostname).addCallback(queued)

    def _notifySuccess(self, message, done):
        """Queue the success notice for those of C{done} that asked for one (L{queueSuccess}), and hand it on."""
        def queued(noticeId):
            if noticeId is not None:
                maillog.success(message.queueId, noticeId, message.mailfrom)
                self.manager.enqueue(noticeId)

        return queueSuccess(self.spool, message, done, self.manager.hostname).addCallback(queued)
