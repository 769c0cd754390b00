"""
The queue manager's side of relaygw-queue's requests (the spool keeps
them: L{relaygw.spool.OperatorRequests}): taken every C{pollInterval}
seconds, or at the reactor's next turn while more wait, and acted on
through the queue manager, as Postfix's queue manager takes the triggers
postqueue and postsuper leave it.
"""

from relaygw import maillog
from relaygw.logs import Logger

log = Logger(namespace="relaygw.queue")


class RequestPoll:
    """
    The requests of relaygw-queue for one queue manager (C{manager}, whose
    spool, reactor, router and C{pollInterval} it uses as they are at the
    time).

    @ivar call: the delayed call of the next L{poll}, while the manager runs.
    @ivar deletedWhileActive: messages deleted with relaygw-queue during
        their attempt: logged as that ends (L{attemptEnded}).
    """

    def __init__(self, manager):
        self.manager = manager
        self.call = None
        self.deletedWhileActive = set()
        self.flushing = set()  # messages flushed by id (or released) whose attempt has not ended

    def poll(self):
        """
        Pick up requests from relaygw-queue: a flush retries everything, a
        release or a flush of one message tries it now; a hold and a release
        are logged, a deletion is logged and its retry forgotten; clear
        stray hold markers.  Never raises.
        """
        manager = self.manager
        spool = manager.spool
        try:
            requests = spool.takeRequests()
            for qid in requests.held:
                maillog.held(qid)
            for qid in requests.released:
                maillog.released(qid)
            ids = requests.flushed + requests.released
            if ids:
                manager.router.revive()  # (a flush does too)
            if requests.flushAll:
                log.info("flush requested")
                manager.flush()
            for qid in ids:
                if spool.exists(qid):
                    manager.enqueue(qid, forced=True)
            for qid in ids:
                if qid in manager.queued or qid in manager.active:
                    self.flushing.add(qid)
                elif not manager.deferAll:  # (gone, or tried at once: its request is done)
                    self.flushDone(qid)
            for qid in requests.deleted:
                if spool.exists(qid):  # (a marker for a message still queued deleted nothing)
                    continue
                manager.retries.cancel(qid)
                if qid in manager.active:  # (its attempt's lines come first: this one is its last)
                    self.deletedWhileActive.add(qid)
                else:
                    manager.attempts.forget(qid)
                    maillog.removed(qid, operator=True)
            spool.clearStrayHolds()
        except OSError as e:  # out of descriptors, a failing disk: a line, not a traceback; tried again
            log.error("queue poll failed: {error}", error=e)
        except Exception:
            log.failure("queue poll failed")
        if manager.running:
            # (Many requests at once, hold ALL of a large queue: taken a share at a time, each turn.)
            delay = 0 if spool.requestsPending() else manager.pollInterval
            self.call = manager.reactor.callLater(delay, self.poll)

    def stop(self):
        """Poll no more (until the next L{poll})."""
        if self.call is not None and self.call.active():
            self.call.cancel()

    def attemptEnded(self, qid):
        """
        The attempt for C{qid} has ended: a deletion during it is logged
        now, its last line; a flush of it by id is carried out, unless it
        was handed back untried (parked until its next hop has room).
        """
        if qid in self.deletedWhileActive:
            self.deletedWhileActive.discard(qid)
            maillog.removed(qid, operator=True)
        if qid in self.flushing and not self.manager.retries.isParked(qid):
            self.flushing.discard(qid)
            self.flushDone(qid)

    def flushDone(self, qid=None):
        """The flush of everything (or of C{qid}) has been carried out: the spool asks for it no more."""
        try:
            self.manager.spool.flushDone(qid)
        except OSError as e:  # (asked for still: the next start flushes again)
            log.error("cannot remove the flush request: {error}", error=e)
