"""
The queue manager's side of the progress records (C{state/ID}, written
through the spool): which record is in use for each message, and writing
it again, with a growing back-off, when a write fails.
"""

from twisted.internet import defer

from relaygw.logs import Logger

log = Logger(namespace="relaygw.queue")


class ProgressWriter:
    """
    The progress record in use for each message being delivered.  The last
    one handed to L{persist} is the one used from then on, written or not:
    when its write fails it stays in memory (the next attempt reads it from
    there, so no recipient it marks done is sent again) and the write is
    tried again with a growing back-off, while L{running}.

    @ivar unwritten: C{{qid: record}} not (yet) on disk.
    """

    #: Back-off between attempts to write a progress record that failed (seconds).
    WRITE_RETRY_MIN = 1.0
    WRITE_RETRY_MAX = 60.0

    def __init__(self, spool, reactor):
        self.spool = spool
        self.reactor = reactor
        self.running = False
        self.unwritten = {}
        self._failures = {}
        self._rewrites = {}

    def persist(self, qid, state):
        """
        Make C{state} the progress record of C{qid}.  Fires with C{True}
        once written, C{False} when it failed; never fails.
        """
        self.unwritten[qid] = state
        self._cancelRewrite(qid)

        def written(_):
            if self.unwritten.get(qid) is state:
                del self.unwritten[qid]
                if self._failures.pop(qid, None):
                    log.info("{qid}: delivery progress recorded after all", qid=qid)
            return True

        def failed(failure):
            if self.unwritten.get(qid) is not state:
                return False  # a newer record replaces it
            n = self._failures[qid] = self._failures.get(qid, 0) + 1
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
        state = self.unwritten.get(qid)
        if state is not None and self.spool.exists(qid):
            self.persist(qid, state)

    def _cancelRewrite(self, qid):
        call = self._rewrites.pop(qid, None)
        if call is not None and call.active():
            call.cancel()

    def drop(self, qid):
        """Forget the record kept in memory for C{qid} (the message has gone, or is set aside)."""
        self.unwritten.pop(qid, None)

    def keep(self, qid, state):
        """C{state} is C{qid}'s progress, in memory only: a retry reads it (L{unwritten}), nothing writes it."""
        self._cancelRewrite(qid)
        self.unwritten[qid] = state

    def finished(self, qid):
        """C{qid} leaves the spool: nothing of its progress is to be written any more."""
        self.unwritten.pop(qid, None)
        self._cancelRewrite(qid)
        self._failures.pop(qid, None)

    def start(self):
        self.running = True

    def stop(self):
        """No more rewrites (L{flush} makes the last try)."""
        self.running = False
        for qid in list(self._rewrites):
            self._cancelRewrite(qid)

    def flush(self):
        """
        At a stop, once no attempt is under way: each record still in memory
        only (its write failed, or its message's removal did) is written once
        more, so that the next start sends to none of the recipients it marks
        done when the fault has cleared meanwhile; says how many could not be
        written.  Fires once done; never fails.
        """
        qids = [qid for qid in self.unwritten if self.spool.exists(qid)]
        ds = [self.persist(qid, self.unwritten[qid]) for qid in qids]

        def warn(_):
            left = [qid for qid in qids if qid in self.unwritten]
            if left:
                log.warn("stopped with the delivery progress of {n} messages not written; their recipients "
                         "may be sent to again", n=len(left))

        return defer.gatherResults(ds).addCallback(warn)
