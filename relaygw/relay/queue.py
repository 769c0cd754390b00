"""
The queue manager: a service that delivers what the spool holds.

It picks up recovered and newly queued messages, hands them to the next hop
the router chooses, and records the outcome per recipient: 2xx done, 5xx
bounced, 4xx retried with exponential backoff until the queue lifetime runs
out.  Progress is written to disk before anything is forgotten, so a restart
never re-sends to a recipient that already succeeded.  A message leaves the
spool only when every recipient is done or bounced.
"""

import collections
import time

from twisted.application.service import Service
from twisted.internet import defer

from relaygw import maillog
from relaygw.logs import Logger
from relaygw.relay import outcome
from relaygw.relay.dsn import buildBounce
from relaygw.relay.nexthop import FunctionRouter, IRouter, temporary
from relaygw.spoolapi import CorruptMessage, Envelope

log = Logger(namespace="relaygw.queue")

DONE, BOUNCED, DEFERRED = outcome.DONE, outcome.BOUNCED, outcome.DEFERRED


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


class QueueManager(Service):
    """
    @ivar router: an L{IRouter} (a plain C{(message, recipient) -> INextHop}
        function is taken as one).
    @ivar bouncer: called with C{(message, {rcpt: result})} for recipients
        that failed for good, or C{None}.
    """

    name = "queue"

    def __init__(self, spool, router, reactor, concurrency=50, retryMin=300, retryMax=4000,
                 lifetime=5 * 86400, bounceLifetime=5 * 86400, hostname="localhost", metrics=None,
                 pollInterval=2.0, deferAll=False):
        self.spool = spool
        self.reactor = reactor
        self.metrics = metrics
        self.pollInterval = pollInterval
        self._configure(router, concurrency, retryMin, retryMax, lifetime, bounceLifetime, hostname)
        self.deferAll = deferAll
        self._poller = None
        self.ready = collections.deque()
        self.queued = set()
        self.active = set()
        self.timers = {}
        self.recovered = []
        self.fresh = {}
        self.forced = set()
        self.queuedAt = {}  # qid -> when a message accepted by this process was queued (for the mail log)
        self.progress = {}  # qid -> progress record not (yet) written to disk
        self._writeFailures = {}
        self._rewrites = {}
        self._idle = []

    def _configure(self, router, concurrency, retryMin, retryMax, lifetime, bounceLifetime, hostname):
        """The settings a reload may change (see L{reconfigure})."""
        self.router = router
        self.concurrency = concurrency
        self.retryMin = retryMin
        self.retryMax = retryMax
        self.lifetime = lifetime
        self.bounceLifetime = bounceLifetime
        self.hostname = hostname

    def reconfigure(self, router, concurrency, retryMin, retryMax, lifetime, bounceLifetime, hostname, deferAll):
        """A reloaded config: the next scheduling decisions and deliveries use it."""
        self._configure(router, concurrency, retryMin, retryMax, lifetime, bounceLifetime, hostname)
        wasDeferring, self.deferAll = self.deferAll, deferAll
        if wasDeferring and not deferAll and self.running:
            self.flush()
        self._pump()

    @property
    def router(self):
        return self._router

    @router.setter
    def router(self, router):
        self._router = router if IRouter.providedBy(router) else FunctionRouter(router)

    def startService(self):
        Service.startService(self)
        for qid in self.recovered:
            self.enqueue(qid)
        self.recovered = []
        self._poller = self.reactor.callLater(self.pollInterval, self._poll)

    def _poll(self):
        """
        Pick up requests from relaygw-queue: a flush retries everything, a
        release one message; clear stray hold markers.  Never raises.
        """
        try:
            flushAll, ids = self.spool.takeRequests()
            if flushAll:
                log.info("flush requested")
                self.flush()
            for qid in ids:
                if self.spool.exists(qid):
                    self.enqueue(qid, forced=True)
            self.spool.clearStrayHolds()
        except Exception:
            log.failure("queue poll failed")
        if self.running:
            self._poller = self.reactor.callLater(self.pollInterval, self._poll)

    stopTimeout = 10.0

    def stopService(self):
        """
        Stop scheduling; wait for deliveries in flight, but not for ever:
        after C{stopTimeout} the spool still holds whatever was not
        acknowledged, and it is retried after the restart.
        """
        Service.stopService(self)
        if self._poller is not None and self._poller.active():
            self._poller.cancel()
        for t in self.timers.values():
            if t.active():
                t.cancel()
        self.timers.clear()
        for qid in list(self._rewrites):
            self._cancelRewrite(qid)
        if self._writeFailures:
            log.warn("stopped with the delivery progress of {n} messages not written; their recipients "
                     "may be sent to again", n=len(self._writeFailures))
        idle = self.whenIdle()
        idle.addCallback(lambda _: self.router.closeIdle())
        if idle.called:
            return idle
        timer = self.reactor.callLater(self.stopTimeout, idle.callback, None)

        def done(result):
            if timer.active():
                timer.cancel()
            elif self.active:
                log.warn("stopped with {n} deliveries in flight; they stay queued", n=len(self.active))
            return result

        return idle.addBoth(done)

    def whenIdle(self):
        """Fires when no delivery is in progress."""
        if not self.active:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def enqueue(self, queueId, message=None, forced=False):
        """
        Schedule a delivery attempt for C{queueId} now.  A message just
        accepted is handed in as well, so it needn't be read back.
        C{forced}: an operator asked for it (flush, release); such an
        attempt leaves the retry backoff as it was.
        """
        if self.deferAll:
            return  # [relay] defer_all: everything stays queued
        if forced:
            self.forced.add(queueId)
        if message is not None:
            self.queuedAt.setdefault(queueId, time.time())
        if message is not None and queueId not in self.active:
            # Only for a first attempt: once one is in flight (a flush got
            # there first) progress is on disk, and the next attempt must
            # read it rather than start from no progress at all.
            self.fresh[queueId] = message
        timer = self.timers.pop(queueId, None)
        if timer is not None and timer.active():
            timer.cancel()
        if queueId in self.queued or queueId in self.active:
            return
        self.queued.add(queueId)
        self.ready.append(queueId)
        self._pump()

    def waitingForRetry(self):
        """The messages whose next attempt waits for its retry time."""
        return [qid for qid, timer in self.timers.items() if timer.active()]

    def flush(self):
        """Retry everything that waits for a retry (relaygw-queue flush)."""
        for qid in sorted(set(self.timers) | set(self.spool.queueIds())):
            self.enqueue(qid, forced=True)

    def _pump(self):
        while self.running and self.ready and len(self.active) < self.concurrency:
            qid = self.ready.popleft()
            self.queued.discard(qid)
            self.active.add(qid)
            d = defer.maybeDeferred(self._attempt, qid)
            d.addErrback(self._attemptFailed, qid)
            d.addBoth(self._finished, qid)

    def _attemptFailed(self, failure, qid):
        """
        An attempt raised (a corrupt queue file, a full disk writing
        progress): log it and try again later rather than forget it.
        """
        log.failure("delivery attempt for {qid} failed; retrying in {delay}s", failure, qid=qid,
                    delay=self.retryMin)
        if self.running and self.spool.exists(qid):
            self.timers[qid] = self.reactor.callLater(self.retryMin, self.enqueue, qid)

    def _finished(self, _, qid):
        self.active.discard(qid)
        if not self.active:
            waiting, self._idle = self._idle, []
            for d in waiting:
                if not d.called:  # a stop may have given up waiting already
                    d.callback(None)
        self._pump()

    def _attempt(self, qid):
        message = self.fresh.pop(qid, None)
        fresh = message is not None
        forced = qid in self.forced
        self.forced.discard(qid)
        try:
            if message is None:
                message = self.spool.load(qid)
            state = self.progress.get(qid)  # newer than the disk when a write failed
            if state is None:
                state = {} if fresh else self.spool.readState(qid)  # just accepted: no progress yet
        except FileNotFoundError:
            return None  # deleted meanwhile (relaygw-queue delete)
        except CorruptMessage as e:
            return self._quarantine(qid, e)
        if self.spool.isHeld(qid):
            return None
        todo = outcome.pending(state, message.recipients)
        if not todo:
            return self._remove(qid, fresh)
        groups = collections.OrderedDict()
        for r in todo:
            groups.setdefault(self.router(message, r), []).append(r)
        attempt = _Attempt(qid, message, state, fresh, len(groups), forced)
        attempt.started = time.time()
        ds = []
        for hop, recipients in groups.items():
            d = defer.maybeDeferred(hop.deliver, [message.narrowed(recipients)])
            d.addCallback(lambda results: results[0])
            d.addErrback(self._hopFailed, recipients, hop)
            d.addCallback(self._replied, attempt, hop)
            ds.append(d)
        return defer.gatherResults(ds, consumeErrors=True)

    def _quarantine(self, qid, error):
        """A queue or state file that can't be read back: set it aside once, never retry it."""
        log.error("{qid}: corrupt {path}: {reason}; moved to corrupt/", qid=qid, path=error.path,
                  reason=error.reason)
        timer = self.timers.pop(qid, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.progress.pop(qid, None)
        self.queuedAt.pop(qid, None)
        self.spool.quarantine(qid, "%s: %s" % (error.path, error.reason))
        if self.metrics:
            self.metrics.corrupt()

    def _hopFailed(self, failure, recipients, hop):
        log.failure("next hop {hop} failed", failure, hop=hop.describe())
        result = temporary("next hop failure: %s" % (failure.getErrorMessage(),))
        return {r: result for r in recipients}

    def _replied(self, results, attempt, hop):
        """
        One next hop's replies for the message, as soon as they are read.
        While other next hops still work on the message, the successes are
        made durable at once (a crash then re-sends to none of them); the
        last one ends the attempt.
        """
        attempt.outcomes.append((hop.describe(), results))
        attempt.waiting -= 1
        if attempt.waiting:
            recorded = outcome.record(attempt.state, attempt.message.recipients, [(hop.describe(), results)],
                                      time.time(), self.policy, attempt.message.mailfrom, ended=False)
            if recorded.events:
                attempt.state, attempt.fresh = recorded.state, False
                return self._persist(attempt.qid, recorded.state)
            return None
        return self._record(attempt)

    @property
    def policy(self):
        return outcome.RetryPolicy(self.retryMin, self.retryMax, self.lifetime, self.bounceLifetime)

    def _record(self, attempt):
        """The attempt has ended: write down what its replies say."""
        qid, message = attempt.qid, attempt.message
        recorded = outcome.record(attempt.state, message.recipients, attempt.outcomes, time.time(), self.policy,
                                  message.mailfrom, message.arrival or None, forced=attempt.forced)
        now = time.time()
        arrival = message.arrival or attempt.started
        queuedAt = self.queuedAt.get(qid)
        # Postfix's delays=a/b/c/d: before the queue, in the queue, connection set-up, transmission.
        beforeQueue = max(0.0, queuedAt - arrival) if queuedAt else 0.0
        inQueue = max(0.0, attempt.started - (queuedAt or arrival))
        for event in recorded.events:
            result = event.result
            if self.metrics:
                self.metrics.delivery(event.hop, {outcome.DONE: "ok", outcome.BOUNCED: "bounce"}.get(
                    event.status, "defer"))
            relay = result.relay or ("none" if event.hop.startswith(("smtp", "mx")) else event.hop)
            setup, transmit = result.setup, result.transmit
            maillog.delivery(qid, event.recipient, relay, max(0.0, now - arrival),
                             (beforeQueue, inQueue, setup, transmit), event.status, result)
            if self.metrics:
                self.metrics.deliveryTimes(maillog.STATUS.get(event.status, event.status), now - arrival,
                                           setup + transmit)
        fresh = attempt.fresh
        d = defer.succeed(None)
        if recorded.provisional is not None and self.spool.exists(qid):
            # Until the bounce is durable a crash must neither re-send to the
            # recipients that succeeded nor lose the bounce: record the
            # progress with the bounced recipients still to do (tried again,
            # and bounced again, after a restart).
            fresh = False
            d = self._persist(qid, recorded.provisional)
        if recorded.bounces:
            d.addCallback(lambda written: self._bounce(message, recorded.bounces) if written is not False else None)

        def settle(written):
            if written is False:  # the provisional record is not durable: no bounce yet
                self._retryLater(qid, recorded.nextAttempt or time.time() + self.retryMin)
                return None
            if not recorded.pending:
                return self._remove(qid, fresh)
            if not self.spool.exists(qid):
                self.progress.pop(qid, None)
                self.queuedAt.pop(qid, None)
                return None  # deleted with relaygw-queue meanwhile
            self._retryLater(qid, recorded.nextAttempt)
            return self._persist(qid, recorded.state)

        return d.addCallback(settle)

    def _retryLater(self, qid, when):
        if self.running:
            self.timers[qid] = self.reactor.callLater(max(0, when - time.time()), self.enqueue, qid)

    def _remove(self, qid, fresh):
        """Every recipient is done or bounced: the message leaves the spool."""
        self.progress.pop(qid, None)
        self._cancelRewrite(qid)
        self._writeFailures.pop(qid, None)
        self.queuedAt.pop(qid, None)
        maillog.removed(qid)
        return self.spool.remove(qid, progress=not fresh)

    #: Back-off between attempts to write a progress record that failed (seconds).
    WRITE_RETRY_MIN = 1.0
    WRITE_RETRY_MAX = 60.0

    def _persist(self, qid, state):
        """
        Make C{state} the progress record of C{qid}.  It is the one used from
        now on, written or not: when the write fails it stays in memory
        (the next attempt reads it from there, so no recipient it marks done
        is sent again) and the write is tried again with a growing back-off.
        Fires with C{True} once written, C{False} when it failed; never fails.
        """
        self.progress[qid] = state
        self._cancelRewrite(qid)

        def written(_):
            if self.progress.get(qid) is state:
                del self.progress[qid]
                if self._writeFailures.pop(qid, None):
                    log.info("{qid}: delivery progress recorded after all", qid=qid)
            return True

        def failed(failure):
            if self.progress.get(qid) is not state:
                return False  # a newer record replaces it
            n = self._writeFailures[qid] = self._writeFailures.get(qid, 0) + 1
            delay = min(self.WRITE_RETRY_MAX, self.WRITE_RETRY_MIN * 2 ** (n - 1))
            log.error("{qid}: cannot write delivery progress ({error}); kept in memory, trying again in {delay}s",
                      qid=qid, error=failure.getErrorMessage(), delay=delay)
            if self.running:
                self._cancelRewrite(qid)
                self._rewrites[qid] = self.reactor.callLater(delay, self._rewrite, qid)
            return False

        return self.spool.writeState(qid, state).addCallbacks(written, failed)

    def _rewrite(self, qid):
        del self._rewrites[qid]
        state = self.progress.get(qid)
        if state is not None and self.spool.exists(qid):
            self._persist(qid, state)

    def _cancelRewrite(self, qid):
        call = self._rewrites.pop(qid, None)
        if call is not None and call.active():
            call.cancel()

    def _bounce(self, message, failures):
        """
        Queue an RFC 3464 bounce to the envelope sender.  Fires once it is
        durable, so the original is never removed before its bounce exists.
        A message with the null sender never bounces: it is logged and dropped.
        """
        if message.mailfrom == "":
            log.warn("{qid}: undeliverable message with null sender dropped for {rcpts}",
                     qid=message.queueId, rcpts=", ".join(failures))
            return defer.succeed(None)
        body = buildBounce(message, failures, self.hostname)
        writer = self.spool.newMessage(Envelope(
            mailfrom="", recipients=[message.mailfrom], arrival=time.time(),
            context={"connection": {"bounce_for": message.queueId}, "message": {}}))
        writer.write(body)
        d = writer.commit()

        def queued(qid):
            maillog.bounce(message.queueId, qid, message.mailfrom)
            self.enqueue(qid)

        return d.addCallback(queued)
