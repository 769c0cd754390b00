"""
What the mail log and the metrics hear of each recipient's delivery: a
line for each outcome, with Postfix's delays=a/b/c/d (before the queue,
in the queue manager, connection set-up, transmission), counted from
when each message was queued.  What one attempt does is
L{relaygw.relay.attempt}'s.
"""

import time

from relaygw import maillog
from relaygw.relay import outcome


class DeliveryLog:
    """
    The recipients' outcomes in the attempts of one queue manager
    (C{manager}, whose metrics it uses as they are at the time).

    @ivar queuedAt: C{{qid: when}} a message was queued (for the mail log's
        delays): when this process accepted it, or its queue file's time.
    """

    def __init__(self, manager, spool):
        self.manager = manager
        self.spool = spool
        self.queuedAt = {}

    def accepted(self, qid):
        """C{qid} was queued by this process, now."""
        self.queuedAt.setdefault(qid, time.time())

    def forget(self, qid):
        """C{qid} has left the spool."""
        self.queuedAt.pop(qid, None)

    def tell(self, attempt, events):
        """
        Each recipient's outcome in C{events} to the mail log and the
        metrics; a delivery already told while the attempt went on
        (L{relaygw.relay.attempt.Attempts._keep}) is not told again.
        """
        events = [event for event in events if not (event.status == outcome.DONE and event.recipient in attempt.logged)]
        attempt.logged.update(event.recipient for event in events if event.status == outcome.DONE)
        qid, message, metrics = attempt.qid, attempt.message, self.manager.metrics
        now = time.time()
        arrival = message.arrival or attempt.started
        queuedAt = self.queuedAt.get(qid)
        if queuedAt is None:  # queued before a restart: the queue file says when
            queuedAt = self.queuedAt[qid] = self.spool.committedAt(qid)
        # Postfix's delays=a/b/c/d: before the queue, in the queue manager
        # (waiting for the next attempt, and for a connection to the next
        # hop: the rest of the delay), connection set-up, transmission.
        beforeQueue = max(0.0, queuedAt - arrival) if queuedAt else 0.0
        for event in events:
            result = event.result
            if metrics:
                metrics.delivery(event.hop, {outcome.DONE: "ok", outcome.BOUNCED: "bounce"}.get(
                    event.status, "defer"))
            relay = result.relay or ("none" if event.hop.startswith(("smtp", "mx")) else event.hop)
            setup, transmit = result.setup, result.transmit
            inQueue = max(0.0, now - arrival - beforeQueue - setup - transmit)
            # (a temporary failure bounced at the end of the message's lifetime: Postfix's "expired")
            status = "expired" if event.status == outcome.BOUNCED and not result.permanent else event.status
            maillog.delivery(qid, event.recipient, relay, max(0.0, now - arrival),
                             (beforeQueue, inQueue, setup, transmit), status, result)
            if metrics:
                metrics.deliveryTimes(maillog.STATUS.get(event.status, event.status), now - arrival,
                                      setup + transmit)
