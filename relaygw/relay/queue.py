"""
The queue manager: a service that delivers what the spool holds.

It picks up recovered and newly queued messages and decides when each
delivery attempt runs: at once for a new message or an operator's request,
after a retry timer otherwise, never more than C{concurrency} deliveries at
a time: an attempt counts once for each next hop its message goes to, so a
message to many recipient domains does not open as many lookups and
connections for each of C{concurrency} messages, and it takes its next
hops only as many at a time as the other attempts leave room for (at
least one).
What one attempt does (next hops, recording the outcome per recipient,
bounces, removal) is L{relaygw.relay.attempt}'s: 2xx done, 5xx bounced, 4xx
retried with exponential backoff until the queue lifetime runs out;
taking relaygw-queue's requests is L{relaygw.relay.requestpoll}'s, and
the timers of the messages that wait for a retry (and of those recovered
at a start) are L{relaygw.relay.retries}'.
Progress is written to disk before anything is forgotten, so a restart
never re-sends to a recipient that already succeeded.  A message leaves the
spool only when every recipient is done or bounced.
"""

import collections
import itertools

from twisted.application.service import Service
from twisted.internet import defer

from relaygw.logs import Logger
from relaygw.relay import outcome
from relaygw.relay.attempt import Attempts
from relaygw.relay.flushing import Flush
from relaygw.relay.nexthop import FunctionRouter, IRouter
from relaygw.relay.requestpoll import RequestPoll
from relaygw.relay.retries import RetryTimers

log = Logger(namespace="relaygw.queue")

DONE, BOUNCED, DEFERRED = outcome.DONE, outcome.BOUNCED, outcome.DEFERRED


class QueueManager(Service):
    """
    @ivar router: an L{IRouter} (a plain C{(message, recipient) -> INextHop}
        function is taken as one).
    @ivar attempts: the L{Attempts} that run each delivery attempt.
    @ivar requests: the L{RequestPoll} that takes relaygw-queue's requests.
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
        self.attempts = Attempts(self, spool, reactor)
        self.requests = RequestPoll(self)
        self.ready = collections.deque()
        self.queued = set()
        self.active = set()
        self.fanOut = {}  # qid: the next hops an active attempt still waits for, past its first
        self.retries = RetryTimers(reactor, self.enqueue, lambda: self.running)
        self.timers = self.retries.timers  # (C{{qid: timer}}: what waits for its retry)
        self.recovered = []
        self.fresh = {}
        self.forced = set()
        self.failedAttempts = {}  # qid: attempts in a row that raised (L{_attemptFailed})
        self._idle = []
        self._retired = []
        self._flush = None  # the L{Flush} under way

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
        replaced = self._router
        self._configure(router, concurrency, retryMin, retryMax, lifetime, bounceLifetime, hostname)
        if self._router is not replaced:
            # Deliveries under way go on through the router they started
            # with, until they end: a stop cuts those short too.  Messages
            # parked with its next hops go again at once, through the new one.
            replaced.retire()  # (what waited with its next hops comes back: L{REROUTED})
            self._retired = [r for r in self._retired + [replaced] if not r.unused]
            for qid in self.retries.parked():
                self.enqueue(qid)
        wasDeferring, self.deferAll = self.deferAll, deferAll
        if deferAll and not wasDeferring:
            # What waits for a delivery slot stays queued too (attempts under
            # way go on): the flush when defer_all goes off brings it back.
            self.queued.difference_update(self.ready)
            for qid in self.ready:
                self.fresh.pop(qid, None)
                self.forced.discard(qid)
            self.ready.clear()
        if wasDeferring and not deferAll and self.running:
            self.flush()
        self._pump()

    @property
    def router(self):
        return self._router

    @router.setter
    def router(self, router):
        self._router = router if IRouter.providedBy(router) else FunctionRouter(router)

    @property
    def policy(self):
        return outcome.RetryPolicy(self.retryMin, self.retryMax, self.lifetime, self.bounceLifetime)

    @property
    def progress(self):
        """C{{qid: progress record}} not (yet) written to disk (see L{ProgressWriter})."""
        return self.attempts.progress.unwritten

    def startService(self):
        Service.startService(self)
        self.attempts.progress.start()
        # Requests made while the gateway was stopped (a hold, a release, a
        # deletion) are taken first, so that each is logged before the
        # delivery of the message it concerns; the poll then goes on by itself.
        self.requests.poll()
        for qid in self.recovered:
            if qid not in self.queued and qid not in self.active:  # (a flush asked for while the gateway was stopped)
                self.retries.resume(qid, self.spool.readState, self.policy)
        self.recovered = []

    stopTimeout = 10.0

    def stopService(self):
        """
        Stop scheduling, and have the next hops begin nothing new (each
        connection finishes the transaction under way); wait for those in
        flight, but not for ever: after C{stopTimeout} they are cut short
        (their messages stay queued as they were, and are tried again
        after the restart), so that nothing they do is logged or written
        after the stop.
        """
        Service.stopService(self)
        self.requests.stop()
        if self._pumpCall is not None and self._pumpCall.active():
            self._pumpCall.cancel()
        self._pumpCall = None
        if self._flush is not None:  # (not carried out: the spool keeps it asked for)
            self._flush.stop()
            self._flush = None
        self.retries.cancelAll()
        self.attempts.progress.stop()
        for router in self._routers():
            router.wrapUp()
        idle = self.whenIdle()
        timers = []
        if not idle.called:
            timers.append(self.reactor.callLater(self.stopTimeout, self._cutShort, idle, timers))
        idle.addCallback(self._closeIdle, timers)
        idle.addCallback(lambda result: self.attempts.progress.flush().addCallback(lambda _: result))

        def done(result):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if self.active:
                log.warn("stopped with {n} deliveries in flight; they stay queued", n=len(self.active))
            return result

        return idle.addBoth(done)

    #: Seconds deliveries cut short at a stop get to settle, and a next hop
    #: gets to answer the QUIT on a connection kept open: a stop takes at
    #: most C{stopTimeout} and twice this.
    cutGrace = 0.5

    def _cutShort(self, idle, timers):
        log.warn("stopping: {n} deliveries in flight cut short; their messages stay queued", n=len(self.active))
        self._cutAll()
        if not idle.called:  # (one still waiting for a name lookup, say)
            timers.append(self.reactor.callLater(self.cutGrace, idle.callback, None))

    def _cutAll(self):
        for router in self._routers():
            router.cutShort()

    def _closeIdle(self, _, timers):
        """
        Say QUIT on the connections kept open for reuse (a router a reload
        replaced keeps its own); those whose next hop has not answered
        within C{cutGrace} are cut.
        """
        closed = defer.gatherResults([router.closeIdle() for router in self._routers()])
        if not closed.called:
            timers.append(self.reactor.callLater(self.cutGrace, self._cutAll))
        return closed

    def _routers(self):
        """The current router, and those a reload replaced while they had work or a connection open."""
        return [self.router] + self._retired

    def _isIdle(self):
        """No delivery in progress, nor about to start for a message just accepted."""
        return not self.active and self._pumpCall is None

    def whenIdle(self):
        """Fires when L{_isIdle}."""
        if self._isIdle():
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def enqueue(self, queueId, message=None, forced=False, roomFor=False):
        """
        Schedule a delivery attempt for C{queueId} now.  A message just
        accepted is handed in as well, so it needn't be read back (its
        attempt starts at the end of the reactor's turn).
        C{forced}: an operator asked for it (flush, release); such an
        attempt leaves the retry backoff as it was.
        C{roomFor}: a parked message its next hop has room for now (kept
        for it): it goes before what waits for a delivery slot, which
        would take that room, or be handed back untried, first.
        """
        if self.deferAll:
            return  # [relay] defer_all: everything stays queued
        if message is not None:
            self.attempts.mailLog.accepted(queueId)
        if message is not None and queueId not in self.active:
            # Only for a first attempt: once one is in flight (a flush got
            # there first) progress is on disk, and the next attempt must
            # read it rather than start from no progress at all.
            self.fresh[queueId] = message
        self.retries.cancel(queueId)
        if queueId in self.active:
            return  # (the attempt under way is the one asked for: none marked forced, to stay so once it has gone)
        if forced:
            self.forced.add(queueId)
        if queueId in self.queued:
            return
        self.queued.add(queueId)
        if roomFor:
            self.ready.appendleft(queueId)
        else:
            self.ready.append(queueId)
        if message is None:
            self._pump()
        elif self._pumpCall is None:
            # Just accepted: its attempt starts once the reactor's current
            # turn is over (still before its next poll), so that every
            # message of one grouped commit has its 250 before the first of
            # them starts on its way out.
            self._pumpCall = self.reactor.callLater(0, self._pumpNow)

    _pumpCall = None

    def _pumpNow(self):
        self._pumpCall = None
        self._started = 0
        self._pump()
        self._idleNow()

    def flush(self):
        """
        Retry everything that waits for a retry (relaygw-queue flush), dead
        destinations too: a slice at a time (L{Flush}), and one under way
        starts over.
        """
        self.router.revive()
        if self._flush is not None:
            self._flush.stop()
        self._flush = Flush(self, self.reactor, itertools.chain(list(self.timers), self.spool.scanQueueIds()),
                            self._flushed)
        self._flush.start()

    def _flushed(self):
        self._flush = None
        self.requests.flushDone()

    _pumping = False

    #: Attempts started at most between two turns of the reactor that run
    #: L{_pumpNow}: more go on at the next turn.  Each start reads a queue
    #: file and runs a next hop, and one that comes straight back untried
    #: (its destination at its share of the delivery slots) frees its slot
    #: for the next at once: a backlog due together was otherwise all
    #: started, handed back and parked in one turn, and every SMTP session
    #: of the gateway waited for it.
    startsPerTurn = 10
    _started = 0

    def _pump(self):
        if self._pumping:
            return  # (an attempt that ended at once, inside the loop below: it goes on)
        self._pumping = True
        try:
            while self.running and self.ready and self.deliveries() < self.concurrency:
                if self._started >= self.startsPerTurn:
                    if self._pumpCall is None:  # (the rest at the next turn)
                        self._pumpCall = self.reactor.callLater(0, self._pumpNow)
                    break
                self._started += 1
                qid = self.ready.popleft()
                self.queued.discard(qid)
                self.active.add(qid)
                d = defer.maybeDeferred(self._attempt, qid)
                d.addCallbacks(self._attempted, self._attemptFailed, callbackArgs=(qid,), errbackArgs=(qid,))
        finally:
            self._pumping = False

    def deliveries(self):
        """The next-hop deliveries in progress: one for each next hop an active attempt waits for."""
        return len(self.active) + sum(self.fanOut.values())

    def slotsWanted(self):
        """Whether messages wait for a delivery slot (every one taken)."""
        return bool(self.ready) and self.deliveries() >= self.concurrency

    def waitingFor(self, queueId, hops):
        """
        The attempt for C{queueId} waits for C{hops} next hops: it counts as
        that many deliveries (L{deliveries}).  Fewer than before leaves room
        for other messages.
        """
        if queueId not in self.active:
            return
        before = self.fanOut.pop(queueId, 0)
        if hops > 1:
            self.fanOut[queueId] = hops - 1
        if hops - 1 < before:
            self._pump()

    def _attempt(self, qid):
        forced = qid in self.forced
        self.forced.discard(qid)
        return self.attempts.run(qid, self.fresh.pop(qid, None), forced)

    def _attemptFailed(self, failure, qid):
        """
        An attempt raised (a full disk queueing its bounce, a bug): log it
        and try again later rather than forget it, after retry_min, then
        twice as long each time it fails again, up to retry_max, so that a
        failure that lasts costs a few attempts a day, not one every retry_min.
        """
        try:
            n = self.failedAttempts[qid] = self.failedAttempts.get(qid, 0) + 1
            delay = min(self.retryMax, self.retryMin * 2 ** min(n - 1, 32))
            if failure.check(OSError):  # (the disk or the system said no: a line says it, not a traceback)
                log.error("delivery attempt for {qid} failed: {error}; retrying in {delay}s", qid=qid,
                          error=failure.getErrorMessage(), delay=delay)
            else:
                log.failure("delivery attempt for {qid} failed; retrying in {delay}s", failure, qid=qid, delay=delay)
            if self.running and self.spool.exists(qid):
                self.retries.after(qid, delay)
            else:
                del self.failedAttempts[qid]
        finally:
            self._finished(None, qid)

    def _attempted(self, _, qid):
        if self.failedAttempts:
            self.failedAttempts.pop(qid, None)
        self._finished(None, qid)

    def _finished(self, _, qid):
        self.active.discard(qid)
        if self._flush is not None:
            self._flush.finished(qid)
        self.requests.attemptEnded(qid)
        self.fanOut.pop(qid, None)
        self._idleNow()
        self._pump()

    def _idleNow(self):
        """Fire L{whenIdle}'s Deferreds if nothing is in progress."""
        if self._isIdle():
            waiting, self._idle = self._idle, []
            for d in waiting:
                if not d.called:  # a stop may have given up waiting already
                    d.callback(None)
