"""
What the running gateway knows is queued, kept as messages come and go.
"""

import heapq
import os


class QueueIndex:
    """
    What the running gateway knows is queued (from the scan at
    L{Spool.open}, then as messages come and go), for /metrics: the ids,
    a heap of them for the oldest (ids sort by the time they were made;
    one gone is popped as it comes up), and the held ones.

    @ivar holdsGone: held messages that left the spool with their hold
        marker perhaps still there (L{Spool.remove} without progress): for
        L{Spool.clearStrayHolds}.
    """

    def __init__(self, spool):
        self.spool = spool
        self.queued = set()
        self._byAge = []
        self.held = set()
        self.holdsGone = set()

    def reset(self, queued, held):
        """The scan at start found C{queued} (oldest first), and hold markers named C{held}."""
        self.queued, self._byAge = set(queued), list(queued)  # (sorted: a heap already)
        self.held = set(held) & self.queued

    def add(self, queueId):
        """C{queueId} is queued now (committed, or adopted): counted by L{depth}."""
        if queueId not in self.queued:
            self.queued.add(queueId)
            heapq.heappush(self._byAge, queueId)

    def drop(self, queueId):
        """C{queueId} has left the spool."""
        self.queued.discard(queueId)
        self.held.discard(queueId)

    def noteHeld(self, queueId):
        """C{queueId} was held: counted by L{heldCount} while it is queued."""
        if queueId in self.queued:
            self.held.add(queueId)

    def noteRequests(self, requests):
        """What the operator held and released (a L{Requests})."""
        for qid in requests.held:
            if qid in self.queued:
                self.held.add(qid)
            else:  # (delivered as it was held, perhaps: its marker may stay behind)
                self.holdsGone.add(qid)
        self.held.difference_update(requests.released)

    def leaving(self, queueId):
        """C{queueId} leaves the spool with its hold marker perhaps still there."""
        if queueId in self.held:
            self.holdsGone.add(queueId)

    def takeHoldsGone(self):
        """L{holdsGone}, emptied."""
        gone, self.holdsGone = self.holdsGone, set()
        return gone

    def oldestAge(self, now):
        """
        (depth, age of the oldest message in seconds), from what the running
        gateway knows is queued (L{Spool.open} and since): no scan of
        C{queue/}, one stat.  An oldest message whose file has gone behind
        its back (removed by hand) is forgotten here.
        """
        byAge = self._byAge
        while byAge:
            if byAge[0] not in self.queued:
                heapq.heappop(byAge)
                continue
            try:
                oldest = os.stat(self.spool.path("queue", byAge[0])).st_mtime
            except FileNotFoundError:
                self.queued.discard(heapq.heappop(byAge))
                continue
            except OSError:
                return len(self.queued), 0.0
            return len(self.queued), max(0.0, now - oldest)
        return 0, 0.0

    def depth(self):
        """How many messages are queued, as the running gateway knows (L{oldestAge}'s depth, without a stat)."""
        return len(self.queued)

    def heldCount(self):
        """How many of the queued messages are held (markers seen at L{reset} and noted since)."""
        return len(self.held)
