"""
Messages a next hop hands back untried (L{WAITED}: no connection came
free in time, the destination at its share of the delivery slots, or
congested): each is parked with the queue manager's retry timers until
that next hop has room for it, and one handed back for C{retryMin} is
deferred like any other, timed on the reactor's clock so that a step of
the system clock neither shortens nor stretches its wait.  What one
attempt does with the rest of its replies is L{relaygw.relay.attempt}'s.
"""

import time

from relaygw.relay.nexthop import WAITED, Result


class HandBacks:
    """
    The messages handed back untried in the attempts of one queue manager
    (C{manager}), whose C{retryMin} and retry timers they use.

    @ivar waitedSince: C{{qid: when}} its next hop first handed it back
        untried, since its last outcome: the reactor's time, monotonic
        under the gateway (a step of the system clock does not count).
    """

    def __init__(self, manager, reactor):
        self.manager = manager
        self.reactor = reactor
        self.waitedSince = {}

    def forget(self, qid):
        """C{qid} waits for no connection now (an outcome recorded, held, gone)."""
        self.waitedSince.pop(qid, None)

    def untried(self, attempt):
        """
        Nothing of C{attempt} was tried, its next hop handed it back (no
        connection came free): parked until one does, or until C{retryMin}
        after it was first handed back.
        """
        qid = attempt.qid
        since = self.waitedSince.setdefault(qid, self.reactor.seconds())
        latest = time.time() + max(0.0, since + self.manager.retryMin - self.reactor.seconds())
        self.manager.retries.when(qid, attempt.waitedOn.whenRoom(attempt.message), latest)

    @staticmethod
    def handedBack(attempt, recorded):
        """
        Whether every recipient still pending was handed back untried
        (L{WAITED}: its destination at its share of the delivery slots, or
        congested) while the others' outcomes were recorded.
        """
        waited = {r for _, results in attempt.outcomes for r, result in results.items() if result == WAITED}
        return attempt.waitedOn is not None and set(recorded.pending) <= waited

    def park(self, written, attempt, latest):
        """
        The recipients handed back go again once their next hop has room
        (or at C{latest}, their retry time), not only at their retry time,
        unless something else (a flush) has already queued the message.
        """
        retries = self.manager.retries
        if attempt.qid in retries.timers:
            retries.cancel(attempt.qid)
            retries.when(attempt.qid, attempt.waitedOn.whenRoom(attempt.message), latest)
        return written

    def waitedTooLong(self, attempt):
        """
        A message its next hop has handed back untried (L{WAITED}: no
        connection came free, the destination congested) for C{retryMin}
        is deferred like any other: an attempt counted, the usual backoff,
        and in the end its lifetime, rather than handed back without end
        while newer messages get the connections.
        """
        since = self.waitedSince.get(attempt.qid)
        if since is None or self.reactor.seconds() - since < self.manager.retryMin:
            return
        deferral = Result(WAITED.code, WAITED.enhanced, "no connection to the next hop came free")
        attempt.outcomes = [(hop, {r: deferral if result == WAITED else result for r, result in results.items()})
                            for hop, results in attempt.outcomes]
