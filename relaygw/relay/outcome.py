"""
The state of one message's delivery, and what a next hop's replies do to it.

L{record} is a pure function: from the progress record, the replies that
came in and the time, it computes the new record, the recipients that
failed for good (to bounce) and when to try again.  The queue manager owns
the I/O around it (writing the record through the spool, queueing the
bounce, setting the timer); nothing here touches a file or a clock.

The progress record (the spool's C{state/ID}) is a JSON object::

    {"rcpts": {rcpt: {"status": "done"|"bounced"|"deferred",
                      "result": "250 2.0.0 ...", "hop": "smtp:..."}},
     "attempts": 2, "backoff": 2, "next_attempt": 1700000000.0, "last_error": "451 ..."}

C{backoff} is the back-off level: the attempts, less those an operator
forced (which must not push the next retry further out).  A recipient done
whose success notice the gateway owes (RFC 3461: it asked for one, and the
next hop took no DSN) has its result in a C{"notice"} object too, from the
moment its success is written until the notice is queued (L{owe}, L{owed}).
"""

import copy
from dataclasses import dataclass, field

from relaygw.relay.nexthop import Result

DONE, BOUNCED, DEFERRED = "done", "bounced", "deferred"

#: Statuses after which a recipient is never tried again.
FINAL = (DONE, BOUNCED)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and when to give up (seconds)."""

    retryMin: float = 300
    retryMax: float = 4000
    lifetime: float = 5 * 86400
    bounceLifetime: float = 5 * 86400

    def delay(self, attempts):
        """The wait after the C{attempts}-th attempt: doubling from C{retryMin}, capped at C{retryMax}."""
        # (The doubling stops long before a float overflows: past 2**60 the cap is reached for any retryMin.)
        return min(self.retryMax, self.retryMin * (2 ** min(max(0, attempts - 1), 60)))


@dataclass(frozen=True)
class Event:
    """One recipient's outcome, for the log and the metrics."""

    recipient: str
    hop: str
    status: str
    result: object


@dataclass(frozen=True)
class Recorded:
    """
    What L{record} computed.

    @ivar state: the new progress record (a new dict; the old one is untouched).
    @ivar bounces: C{{recipient: Result}} that failed for good in this record.
    @ivar pending: the recipients still to deliver, in envelope order.
    @ivar nextAttempt: when to try the pending ones again (C{None} when
        none is pending, or the attempt has not ended).
    @ivar provisional: the record to make durable before a bounce is
        queued: the bounced recipients still to do, so a crash in between
        neither loses the bounce nor re-sends to those that succeeded
        (C{None} when nothing bounces to a real sender).
    @ivar events: one L{Event} per recipient result.
    """

    state: dict
    bounces: dict = field(default_factory=dict)
    pending: tuple = ()
    nextAttempt: object = None
    provisional: object = None
    events: tuple = ()


def pending(state, recipients):
    """The recipients of C{recipients} that the record C{state} does not mark done or bounced."""
    rcpts = (state or {}).get("rcpts", {})
    return [r for r in recipients if rcpts.get(r, {}).get("status") not in FINAL]


def due(state, now, policy):
    """
    When the next attempt recorded in C{state} (a progress record) is due
    (seconds since the epoch): C{now} for a message never tried, or whose
    record names no time; never further ahead than its back-off level's
    delay from C{now}, so that a record written before the clock was set
    back does not hold its message for the length of the step.
    """
    when = (state or {}).get("next_attempt")
    if when is None or when <= now:
        return now
    return min(when, now + policy.delay(state.get("backoff", state.get("attempts", 0))))


def underway(state):
    """
    C{state} as written while its attempt goes on: no next attempt time,
    so that an attempt a crash cuts short is made again at once at the
    next start (L{due}), even one an operator forced before that time.
    """
    return dict(state, next_attempt=None) if state.get("next_attempt") is not None else state


def owe(state, results):
    """Note in C{state} (a progress record) the success notices owed for C{results} (C{{rcpt: Result}})."""
    for rcpt, r in results.items():
        state["rcpts"][rcpt]["notice"] = {"code": r.code, "enhanced": r.enhanced, "text": r.text,
                                          "relay": r.relay, "reply": r.reply, "action": r.action}


def owed(state):
    """The success notices C{state} says are owed: C{{rcpt: Result}}."""
    notices = {}
    for rcpt, entry in (state or {}).get("rcpts", {}).items():
        n = entry.get("notice")
        if isinstance(n, dict) and entry.get("status") == DONE:
            notices[rcpt] = Result(n.get("code", 250), n.get("enhanced", ""), n.get("text", ""), n.get("relay"),
                                   reply=bool(n.get("reply")), action=n.get("action") or "relayed")
    return notices


def paid(state):
    """C{state} with no success notice owed any more (they are queued)."""
    if not any("notice" in entry for entry in state.get("rcpts", {}).values()):
        return state
    new = copy.deepcopy(state)
    for entry in new["rcpts"].values():
        entry.pop("notice", None)
    return new


def record(state, recipients, outcomes, now, policy, mailfrom="", arrival=None, ended=True, forced=False):
    """
    Apply next-hop replies to a progress record.

    @param state: the progress record so far (C{{}} for none).
    @param recipients: the message's envelope recipients.
    @param outcomes: C{[(hop name, {recipient: Result})]}.
    @param now: the time of the replies (seconds since the epoch).
    @param policy: a L{RetryPolicy}.
    @param mailfrom: the envelope sender (C{""}: the null sender, whose
        messages have C{bounceLifetime} and never bounce).
    @param arrival: when the message was accepted (C{None}: now).
    @param ended: whether the attempt has ended with these replies.  While
        it goes on (replies from one of several next hops, as they come),
        only successes are recorded, and the attempt is not counted.
    @param forced: the attempt was an operator's (flush, release): it
        leaves the back-off level, and a retry time still ahead, as they were.
    @return: L{Recorded}.
    """
    new = copy.deepcopy(state or {})
    rcpts = new.setdefault("rcpts", {})
    lifetime = policy.bounceLifetime if mailfrom == "" else policy.lifetime
    expired = now - (now if arrival is None else arrival) >= lifetime
    bounces, errors, events = {}, [], []
    for hop, results in outcomes:
        for rcpt, result in results.items():
            if not ended and not result.ok:
                continue
            if result.ok:
                status = DONE
            elif result.permanent or expired:
                status = BOUNCED
                bounces[rcpt] = result
            else:
                status = DEFERRED
                errors.append(result.describe())
            if rcpts.get(rcpt, {}).get("status") in FINAL and status != DONE:
                continue  # (a recipient listed twice: its first final outcome stands)
            rcpts[rcpt] = {"result": result.describe(), "hop": hop, "status": status}
            events.append(Event(rcpt, hop, status, result))
    left = tuple(pending(new, recipients))
    if not ended:
        return Recorded(new, pending=left, events=tuple(events))
    level = new.get("backoff", new.get("attempts", 0))
    if not forced or not level:
        level += 1
    new["backoff"] = level
    previous = new.get("next_attempt")
    new["attempts"] = new.get("attempts", 0) + 1
    delay = policy.delay(level)
    if forced and previous is not None and previous > now:
        delay = previous - now
    # None when nothing is left to deliver: a record written before the
    # message's bounce or success notices are queued (a crash may come
    # before they are, and the removal) holds it for no retry at the next start.
    new["next_attempt"] = (now + delay) if left else None
    new["last_error"] = errors[-1] if errors else ""
    provisional = None
    if bounces and mailfrom != "":
        provisional = copy.deepcopy(new)
        for rcpt in bounces:
            provisional["rcpts"][rcpt]["status"] = DEFERRED
    return Recorded(new, bounces=bounces, pending=left, nextAttempt=(now + delay) if left else None,
                    provisional=provisional, events=tuple(events))
