"""
A flush of the whole queue (relaygw-queue flush), carried out a slice at a
time: every queued message is handed to the queue manager as an operator's
request, C{SLICE} of them in each turn of the reactor, so that a flush of a
large deferred queue does not hold up the sessions of its worker while it
lists, sorts and schedules every message at once.

The flush is carried out once every message it found has been tried (its
attempt has ended); only then is its request removed from the spool
(L{relaygw.spoolapi.ISpool.flushDone}), so that a stop or a crash in the
middle of it leaves it asked for, and the next start carries it out.
"""

import itertools


class Flush:
    """
    One flush of everything queued.

    @ivar seen: the messages this flush has handed in, or whose attempt
        ended since it began and which wait for their next one (a message
        already tried for this flush, say one that came due meanwhile, is
        not tried again); not those that left the queue, so that the mail
        relayed during a long flush is not all kept in mind.
    @ivar open: the messages handed in whose attempt has not ended yet.
    """

    #: Messages handed in per turn of the reactor, at most: with 20,000
    #: deferred, handing in all of them at once held the reactor 0.2 s.
    SLICE = 500

    def __init__(self, manager, reactor, ids, done):
        """
        @param manager: the L{relaygw.relay.queue.QueueManager} the messages are handed to.
        @param ids: an iterable of the queue ids to flush, read as the flush goes on.
        @param done: called once the flush has been carried out.
        """
        self.manager = manager
        self.reactor = reactor
        self._ids = iter(ids)
        self._done = done
        self.seen = set()
        self.open = set()
        self._exhausted = False
        self._call = None

    def start(self):
        """Hand in the first slice now (a small queue, all of it), the others a turn apart."""
        self._slice()

    def stop(self):
        """Hand in nothing more: the flush is not carried out (a stop, or a newer flush replaces it)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        close = getattr(self._ids, "close", None)
        if close is not None:
            close()  # (a directory being read: closed now, not when collected)

    def finished(self, queueId):
        """
        The attempt for C{queueId} has ended.  One its next hop handed back
        untried (parked until a connection comes free) has not been tried:
        the flush waits for the attempt it makes then.
        """
        if queueId in self.manager.timers:  # (still queued: one delivered or bounced is not kept in mind)
            self.seen.add(queueId)
        if self.manager.retries.isParked(queueId):
            self.open.add(queueId)
            return
        self.open.discard(queueId)
        self._check()

    def _slice(self):
        self._call = None
        manager = self.manager
        if not manager.running:
            return
        taken = list(itertools.islice(self._ids, self.SLICE))
        self._exhausted = len(taken) < self.SLICE
        # (oldest first within a slice: a queue of up to SLICE messages goes in order)
        for qid in sorted(set(taken) - self.seen):
            self.seen.add(qid)
            manager.enqueue(qid, forced=True)
            if qid in manager.queued or qid in manager.active:
                self.open.add(qid)
        if self._exhausted:
            self._check()
        else:
            self._call = self.reactor.callLater(0, self._slice)

    def _check(self):
        if self._exhausted and not self.open and self._done is not None:
            done, self._done = self._done, None
            done()
