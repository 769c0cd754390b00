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

from relaygw.logs import Logger
from relaygw.relay.dsn import buildBounce
from relaygw.relay.nexthop import temporary
from relaygw.spoolapi import CorruptMessage

log = Logger(namespace="relaygw.queue")

DONE, BOUNCED, DEFERRED = "done", "bounced", "deferred"


class QueueManager(Service):
    """
    @ivar router: C{router(message, recipient) -> INextHop}.
    @ivar bouncer: called with C{(message, {rcpt: result})} for recipients
        that failed for good, or C{None}.
    """

    name = "queue"

    def __init__(self, spool, router, reactor, concurrency=50, retryMin=300, retryMax=4000,
                 lifetime=5 * 86400, bounceLifetime=5 * 86400, hostname="localhost", metrics=None,
                 pollInterval=2.0, deferAll=False):
        self.spool = spool
        self.router = router
        self.reactor = reactor
        self.concurrency = concurrency
        self.retryMin = retryMin
        self.retryMax = retryMax
        self.lifetime = lifetime
        self.bounceLifetime = bounceLifetime
        self.hostname = hostname
        self.metrics = metrics
        self.pollInterval = pollInterval
        self.deferAll = deferAll
        self._poller = None
        self.ready = collections.deque()
        self.queued = set()
        self.active = set()
        self.timers = {}
        self.recovered = []
        self.fresh = {}
        self.forced = set()
        self._idle = []

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
        idle = self.whenIdle()
        closeIdle = getattr(self.router, "closeIdle", None)
        if closeIdle is not None:
            idle.addCallback(lambda _: closeIdle())
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
                state = self.spool.readState(qid)
            else:
                state = {}  # just accepted: no progress yet
        except FileNotFoundError:
            return None  # deleted meanwhile (relaygw-queue delete)
        except CorruptMessage as e:
            return self._quarantine(qid, e)
        if self.spool.isHeld(qid):
            return None
        rcpts = state.setdefault("rcpts", {})
        pending = [r for r in message.recipients if rcpts.get(r, {}).get("status") not in (DONE, BOUNCED)]
        if not pending:
            return self.spool.remove(qid)
        groups = collections.OrderedDict()
        for r in pending:
            groups.setdefault(self.router(message, r), []).append(r)
        attempts = []
        for hop, recipients in groups.items():
            narrowed = message.narrowed(recipients)
            d = defer.maybeDeferred(hop.deliver, [narrowed])
            d.addCallback(lambda results: results[0])
            d.addErrback(self._hopFailed, recipients, hop)
            d.addCallback(lambda results, hop=hop: (hop, results))
            attempts.append(d)
        d = defer.gatherResults(attempts)
        d.addCallback(self._record, qid, message, state, fresh, forced)
        return d

    def _quarantine(self, qid, error):
        """A queue or state file that can't be read back: set it aside once, never retry it."""
        log.error("{qid}: corrupt {path}: {reason}; moved to corrupt/", qid=qid, path=error.path,
                  reason=error.reason)
        timer = self.timers.pop(qid, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.spool.quarantine(qid, "%s: %s" % (error.path, error.reason))
        if self.metrics:
            self.metrics.corrupt()

    def _hopFailed(self, failure, recipients, hop):
        log.failure("next hop {hop} failed", failure, hop=hop.describe())
        result = temporary("next hop failure: %s" % (failure.getErrorMessage(),))
        return {r: result for r in recipients}

    def _record(self, outcomes, qid, message, state, fresh=False, forced=False):
        """
        Write down what C{outcomes} say; C{fresh}: this was the first
        attempt at a message just accepted, with no progress on disk yet;
        C{forced}: an operator's flush or release, which leaves the
        backoff (and a retry time still ahead) as it was.
        """
        now = time.time()
        rcpts = state["rcpts"]
        level = state.get("backoff", state.get("attempts", 0))
        if not forced or not level:
            level += 1
        state["backoff"] = level
        previous = state.get("next_attempt")
        state["attempts"] = state.get("attempts", 0) + 1
        lifetime = self.bounceLifetime if message.mailfrom == "" else self.lifetime
        expired = now - message.envelope.get("arrival", now) >= lifetime
        bounced = {}
        errors = []
        for hop, results in outcomes:
            for r, result in results.items():
                entry = rcpts.setdefault(r, {})
                entry["result"] = result.describe()
                entry["hop"] = hop.describe()
                if self.metrics:
                    self.metrics.delivery(hop.describe(), "ok" if result.ok else
                                          ("bounce" if result.permanent else "defer"))
                if result.ok:
                    entry["status"] = DONE
                    log.info("{qid} to <{rcpt}> via {hop}: {result}", qid=qid, rcpt=r,
                             hop=hop.describe(), result=result.describe())
                elif result.permanent or expired:
                    entry["status"] = BOUNCED
                    bounced[r] = result
                    log.info("{qid} to <{rcpt}> bounced: {result}", qid=qid, rcpt=r, result=result.describe())
                else:
                    entry["status"] = DEFERRED
                    errors.append(result.describe())
                    log.info("{qid} to <{rcpt}> deferred: {result}", qid=qid, rcpt=r, result=result.describe())
        pending = [r for r in message.recipients if rcpts.get(r, {}).get("status") not in (DONE, BOUNCED)]
        delay = min(self.retryMax, self.retryMin * (2 ** (level - 1)))
        if forced and previous is not None and previous > now:
            delay = previous - now
        state["next_attempt"] = now + delay
        state["last_error"] = errors[-1] if errors else ""
        d = defer.succeed(None)
        if bounced and message.mailfrom != "" and self.spool.exists(qid):
            # Until the bounce is durable a crash must neither re-send to the
            # recipients that succeeded nor lose the bounce: record the
            # progress with the bounced recipients still to do (tried again,
            # and bounced again, after a restart).
            provisional = dict(state, rcpts={r: dict(e) for r, e in rcpts.items()})
            for r in bounced:
                provisional["rcpts"][r]["status"] = DEFERRED
            self.spool.writeState(qid, provisional)
            fresh = False
        if bounced:
            d = self._bounce(message, bounced)

        def settle(_):
            if not pending:
                return self.spool.remove(qid, progress=not fresh)
            if not self.spool.exists(qid):
                return None  # deleted with relaygw-queue meanwhile
            self.spool.writeState(qid, state)
            if self.running:
                self.timers[qid] = self.reactor.callLater(delay, self.enqueue, qid)

        return d.addCallback(settle)

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
        writer = self.spool.newMessage({
            "mailfrom": "", "mail_params": {}, "recipients": [message.mailfrom], "arrival": time.time(),
            "context": {"connection": {"bounce_for": message.queueId}, "message": {}},
        })
        writer.write(body)
        d = writer.commit()

        def queued(qid):
            log.info("{qid}: bounce {bounce} queued to <{sender}>", qid=message.queueId, bounce=qid,
                     sender=message.mailfrom)
            self.enqueue(qid)

        return d.addCallback(queued)
