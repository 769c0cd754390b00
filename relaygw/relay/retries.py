"""
The retry timers of the queue manager (L{relaygw.relay.queue}): when each
queued message it is not trying now is tried again, as Haraka's
C{timer_queue.js} keeps them: at its retry time, at the time its progress
record names after a restart, or once its next hop has room for it.
"""

import time

from twisted.internet import defer

from relaygw.relay import outcome


class RetryTimers:
    """
    When each queued message is tried again: at a time (L{later}), when its
    progress record says after a restart (L{resume}), or once its next hop
    has room for it (L{when}); each calls C{enqueue(queueId)}.
    None is set while the queue manager is not C{running()}.

    @ivar timers: C{{queueId: timer}} (an C{IDelayedCall}, or L{_Parked}).
    """

    def __init__(self, reactor, enqueue, running):
        self.reactor = reactor
        self.enqueue = enqueue
        self.running = running
        self.timers = {}

    def later(self, queueId, when):
        """The next attempt for C{queueId} at C{when} (seconds since the epoch)."""
        self.after(queueId, max(0, when - time.time()))

    def resume(self, queueId, readState, policy):
        """
        C{queueId}, queued before this start, goes when its progress record
        (C{readState(queueId)}) says its next attempt is due, as Postfix's
        queue manager takes from its deferred queue only the messages whose
        time has come: a restart does not retry a large deferred queue at
        once.  One never tried, or whose record cannot be read (its attempt
        sets it aside), goes at once.
        """
        now = time.time()
        try:
            when = outcome.due(readState(queueId), now, policy)
        except Exception:
            when = now
        if when > now:
            self.later(queueId, when)
        else:
            self.enqueue(queueId)

    def after(self, queueId, delay):
        """The next attempt for C{queueId} in C{delay} seconds."""
        if self.running():
            self.timers[queueId] = self.reactor.callLater(delay, self.enqueue, queueId)

    def when(self, queueId, ready, latest):
        """
        The next attempt for C{queueId} once C{ready} fires (its next hop
        has room for it: L{relaygw.relay.nexthop.INextHop.whenRoom}), or at
        C{latest} (seconds since the epoch), whichever comes first.
        """
        if self.running():
            self.timers[queueId] = _Parked(self.reactor.callLater(max(0, latest - time.time()), self.enqueue,
                                                                  queueId), ready)
        ready.addCallbacks(lambda _: self.enqueue(queueId, roomFor=True), lambda f: f.trap(defer.CancelledError))
        if not self.running():
            ready.cancel()

    def cancel(self, queueId):
        """Forget the retry timer of C{queueId}, if any."""
        timer = self.timers.pop(queueId, None)
        if timer is not None and timer.active():
            timer.cancel()

    def cancelAll(self):
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        self.timers.clear()

    def waiting(self):
        """The messages whose next attempt waits for its retry time."""
        return [qid for qid, timer in self.timers.items() if timer.active()]

    def parked(self):
        """The messages parked with their next hop (L{when})."""
        return [qid for qid, timer in self.timers.items() if isinstance(timer, _Parked)]

    def isParked(self, queueId):
        """Whether C{queueId} is parked with its next hop (L{when})."""
        return isinstance(self.timers.get(queueId), _Parked)


class _Parked:
    """
    The retry of a message parked with its next hop (L{RetryTimers.when}):
    a timer, as far as the queue manager's other retries go.
    """

    def __init__(self, timer, ready):
        self.timer = timer
        self.ready = ready

    def active(self):
        return self.timer.active() or not self.ready.called

    def cancel(self):
        if self.timer.active():
            self.timer.cancel()
        self.ready.cancel()  # (the next hop forgets it; nothing once it has fired)
