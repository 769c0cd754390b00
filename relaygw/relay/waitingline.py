"""
The line of messages waiting for a connection to one SMTP next hop: the
order they wait in, the batch a connection takes, and the messages that
go back to the queue manager when no connection comes free in time.

A message that has waited C{WAIT_SECONDS} for a connection (every one the
destination may have is busy, or stuck) goes back to the queue manager
untried (L{WAITED}), which tries it again a little later: waiting, it held
one of the queue manager's delivery slots, and enough of them held by one
slow destination kept every other from getting any.  The destination is
then congested for C{WAIT_SECONDS}: a connection carries one message at a
time (a batch behind a message the next hop never answers would hold the
slots of all of it), a message that cannot start at once goes back at
once, and one goes out on a connection of its own, up to the cap.

A message of a batch under way that has not begun (behind one the next
hop, or its DNS, does not answer) goes back the same way once it has
waited C{WAIT_SECONDS} since it joined the line (L{_watchBatch}).

While other messages wait for one of the queue manager's delivery slots
(C{contended}), a destination holds at most C{maxHeld} messages, waiting
or on a connection: its share of the slots.  Past it, a message goes
back at once, untried, as one that waited too long does.  A backlog to a
destination that answers each message in a fraction of C{WAIT_SECONDS}
would otherwise hold every slot (none of its messages waiting that
long), and mail for other destinations would wait behind all of it,
where Postfix's queue manager serves each destination in turn.

A message that went back is parked with the queue manager (L{whenRoom})
until the destination has room for it: no read of its queue file, no
attempt, until a connection comes free.  Messages wait and are parked in
the order they were accepted, and while older ones are parked a newer one
does not take the room they wait for, as Postfix's queue manager serves a
destination first come, first served.
"""

import bisect
import itertools

from twisted.internet import defer

from relaygw.context import identityOf
from relaygw.logs import Logger
from relaygw.relay.nexthop import WAITED

log = Logger(namespace="relaygw.relay")


class WaitingLine:
    """
    The waiting line of L{relaygw.relay.smtp.SMTPNextHop}, which provides
    C{reactor}, C{name}, C{options}, C{batch}, C{maxConnections}, C{active}
    (connections carrying a batch), C{stopping} and C{_pump}.

    @ivar waiting: C{(message, Deferred, progress, since)} for each message
        waiting for a connection, in the order the messages were accepted.
    @ivar parked: C{(accepted, n, queue ID, Deferred)} for each message gone
        back to the queue manager until there is room (L{whenRoom}), in the
        order the messages were accepted.
    @ivar released: the queue IDs of parked messages told there is a
        connection for them while the destination is congested, until they
        are back (the connection is theirs meanwhile), which is at once
        unless they are held or deleted, or wait for a delivery slot.
    """

    #: How long a message waits for a connection before it goes back to the queue manager.
    WAIT_SECONDS = 5.0

    #: How many messages the destination may hold at once, waiting or on a
    #: connection (None: no limit), while C{contended()} (other messages wait
    #: for a delivery slot); those past it go back to the queue manager.
    maxHeld = None
    contended = staticmethod(lambda: True)
    held = 0  # messages joined and not answered yet
    _roomCall = None  # (see L{_left})

    handBack = None  # the timer of L{_handBack}
    congestedUntil = 0.0  # (see L{_giveBack})
    _order = itertools.count()  # (ties between parked messages accepted at the same time)

    def __init__(self):
        self.waiting = []
        self.parked = []
        self.released = set()
        self.watched = {}  # batches under way with messages not begun: token -> (connection or None, carried, batch)

    def whenRoom(self, message):
        """
        A Deferred that fires when C{message}, handed back untried
        (L{WAITED}), may go again: a connection has come free for it (see
        L{_watch}), or the destination is found dead (its messages are then
        deferred at once).  Cancel it to give up waiting.
        """
        entry = (_arrival(message), next(self._order), message.queueId, defer.Deferred(self._unpark))
        bisect.insort(self.parked, entry)
        self.reactor.callLater(0, self._pump)  # (room may have come meanwhile; never from within a hand-back)
        return entry[3]

    def _unpark(self, d):
        self.parked = [entry for entry in self.parked if entry[3] is not d]

    def _congested(self):
        return self.reactor.seconds() < self.congestedUntil

    def _startsNext(self, congested):
        """
        Whether the first waiting message may have a connection now.  While
        the destination is C{congested} it takes a connection of its own,
        but not one promised to a parked message, nor before parked messages
        accepted earlier.
        """
        if not congested:
            return True
        if self.parked and self.parked[0][0] < _accepted(self.waiting[0]):
            return False
        return self.active + len(self.released) < self.maxConnections

    def _join(self, messages, progress):
        """C{messages} join the line; one Deferred each, fired with its results."""
        ds = []
        now = self.reactor.seconds()
        for index, m in enumerate(messages):
            self.released.discard(m.queueId)
            if self.maxHeld is not None and self.held + len(self.released) >= self.maxHeld and self.contended():
                self._overShare()
                ds.append(defer.succeed({r: WAITED for r in m.recipients}))
                continue
            self.held += 1
            d = defer.Deferred().addBoth(self._left)
            entry = (m, d, None if progress is None else (progress, index), now)
            if self.waiting and _accepted(self.waiting[-1]) > _accepted(entry):
                bisect.insort(self.waiting, entry, key=_accepted)  # (back from the queue manager, say)
            else:
                self.waiting.append(entry)
            ds.append(d)
        return ds

    _atShare = False

    def _overShare(self):
        """A message goes back: the destination holds its share of the delivery slots (logged once a spell)."""
        if not self._atShare:
            self._atShare = True
            log.info("{hop}: {n} messages held, its share of the delivery slots; the next wait in the queue "
                     "until it has room", hop=self.name, n=self.held)

    def _left(self, result):
        """A message of the line has its answer: room for a parked one, told at the end of the reactor's turn."""
        self.held -= 1
        if self.parked and self._roomCall is None:
            self._roomCall = self.reactor.callLater(0, self._room)
        return result

    def _room(self):
        self._roomCall = None
        self._pump()

    def _take(self):
        """
        The next batch of waiting messages for one connection: one while
        the destination is congested, otherwise no more than a
        connection's part of the destination's share of the delivery
        slots (L{maxHeld}); when the client identity is forwarded, only
        messages from the same original client (see
        L{relaygw.relay.smtp.SMTPNextHop._key}).
        """
        size = 1 if self._congested() else self.batch
        if self.maxHeld is not None:  # (each connection a part of the share: not all of it on the first)
            size = min(size, -(-self.maxHeld // self.maxConnections))
        if not self.options.forwardIdentity:
            batch, self.waiting = self.waiting[:size], self.waiting[size:]
            return batch
        key = identityOf(self.waiting[0][0].context)
        batch, rest = [], []
        for item in self.waiting:
            if len(batch) < size and identityOf(item[0].context) == key:
                batch.append(item)
            else:
                rest.append(item)
        self.waiting = rest
        return batch

    def _watch(self, dead=False):
        """
        After the batches that could start have: while the destination is
        congested, what still waits goes back at once; otherwise the timer
        of L{_handBack} runs while anything waits.  Parked messages are told
        there is room once a connection is free: as many as there are free
        connections while the destination is congested, all of them
        otherwise (and at once when it is C{dead}).  Were they told while
        every connection is busy, they would only wait and go back again.
        """
        now = self.reactor.seconds()
        congested = self._congested()
        if self.waiting and not self.stopping and congested:
            # (Not congested for longer for it: only a message that waited
            # WAIT_SECONDS is.  Messages coming back more often than that, a
            # backlog retried every second, kept it congested for good, and
            # no connection was opened again while older ones were parked.)
            waiting, self.waiting = self.waiting, []
            _answer(waiting, WAITED)
        # (Room in the destination's share of the slots, if it has one.)
        room = None if self.maxHeld is None or dead else self.maxHeld - self.held - len(self.released)
        if self.parked and not self.stopping and (dead or self.active < self.maxConnections
                                                  or (room is not None and room > 0 and not congested)):
            promise = congested and not dead  # (each told keeps its connection until it is back)
            n = self.maxConnections - self.active - len(self.waiting) - len(self.released) if promise \
                else len(self.parked)
            if room is not None:  # (each told keeps its room in the share until it is back)
                n, promise = min(n, room), True
            released, self.parked = self.parked[:max(0, n)], self.parked[max(0, n):]
            for _, _, qid, d in released:
                if promise:
                    self.released.add(qid)
                self.reactor.callLater(0, self._tell, qid, d)  # (the queue manager reads it again: never from here)
        if self._atShare and not self.parked and (room is None or room > 0):
            self._atShare = False
        if self.waiting and not self.stopping:
            if self.handBack is None:
                delay = min(item[3] for item in self.waiting) + self.WAIT_SECONDS - now
                self.handBack = self.reactor.callLater(max(0, delay), self._handBack)
        elif self.handBack is not None:
            self.handBack.cancel()
            self.handBack = None

    def _empty(self, result):
        """Every message of the line gets C{result}, and nothing waits any more."""
        if self.handBack is not None:
            self.handBack.cancel()
            self.handBack = None
        waiting, self.waiting = self.waiting, []
        _answer(waiting, result)

    def _withdrawAll(self, result):
        """
        Nothing goes out here any more: each message waiting, and each not
        begun behind another on a connection or lookup, gets C{result};
        parked messages are told to go again (the queue manager reads them).
        """
        self._empty(result)
        for conn, carried, batch in list(self.watched.values()):
            for position, (index, message) in enumerate(carried):
                if position == 0 or batch[index][1].called:
                    continue
                if conn is None:
                    batch[index][1].callback({r: result for r in message.recipients})
                else:
                    conn.takeBack(position, result)
        parked, self.parked = self.parked, []
        for _, _, qid, d in parked:
            self.reactor.callLater(0, self._tell, qid, d)

    def _handBack(self):
        """Messages that waited C{WAIT_SECONDS} for a connection go back to the queue manager."""
        self.handBack = None
        since = self.reactor.seconds() - self.WAIT_SECONDS
        waited = [item for item in self.waiting if item[3] <= since]
        if waited:
            self.waiting = [item for item in self.waiting if item[3] > since]
            log.info("{hop}: {n} messages waited {seconds:g}s for a connection; back in the queue, and the next "
                     "ones at once while every connection is busy", hop=self.name, n=len(waited),
                     seconds=self.WAIT_SECONDS)
            self._giveBack(waited)
        self._pump()

    def _tell(self, qid, d):
        """
        Tell parked message C{qid} (C{d}: L{whenRoom}'s) there is room.  If
        it does not come back at once (held or deleted, or waiting for one
        of the queue manager's delivery slots), the connection kept for it
        goes to the next: a held message kept it for nothing.
        """
        if not d.called:  # (unless cancelled meanwhile)
            d.callback(None)
        if qid in self.released:
            self.released.discard(qid)
            self._pump()

    takeBackTimer = None  # (see L{_watchBatch})

    def _watchBatch(self, conn, carried, batch):
        """
        While C{conn} carries C{carried} (C{(index in batch, message)}), or
        while the batch waits for the lookup of the next hop's hosts (C{conn}
        None): a message of it that has not begun (each but the first,
        during the lookup) once it has waited C{WAIT_SECONDS} since it
        joined the line goes back to the queue manager untried (L{WAITED}),
        as one still waiting for a connection does, and the destination is
        congested: behind a message the next hop, or its DNS, does not
        answer, a batch held the delivery slots of all of it.  Returns a
        token to drop from C{watched} when the carry or lookup ends (None
        for a batch of one).  One timer serves every batch of the hop.
        """
        if len(carried) < 2:
            return None
        token = object()
        self.watched[token] = (conn, carried, batch)
        due = min(batch[index][3] for index, _ in carried[1:]) + self.WAIT_SECONDS
        timer = self.takeBackTimer
        if timer is None or timer.getTime() > due:
            if timer is not None:
                timer.cancel()
            self.takeBackTimer = self.reactor.callLater(max(0, due - self.reactor.seconds()), self._takeBack)
        return token

    def _unwatch(self, token):
        """The batch of C{token} (L{_watchBatch}) is no longer under way; the timer goes with the last one."""
        self.watched.pop(token, None)
        if not self.watched and self.takeBackTimer is not None:
            self.takeBackTimer.cancel()
            self.takeBackTimer = None

    def _takeBack(self):
        """The messages of watched batches (L{_watchBatch}) that have waited long enough go back."""
        self.takeBackTimer = None
        if self.stopping:
            return
        now, later, taken = self.reactor.seconds(), None, 0
        for conn, carried, batch in list(self.watched.values()):
            for position, (index, message) in enumerate(carried):
                if batch[index][1].called:
                    continue
                due = batch[index][3] + self.WAIT_SECONDS
                if due > now:
                    later = due if later is None else min(later, due)
                elif conn is None and position > 0:
                    batch[index][1].callback({r: WAITED for r in message.recipients})
                    taken += 1
                elif conn is not None and conn.takeBack(position, WAITED):
                    taken += 1
        if taken:
            log.info("{hop}: {n} messages waited {seconds:g}s behind another on a connection or lookup; "
                     "back in the queue", hop=self.name, n=taken, seconds=self.WAIT_SECONDS)
            self.congestedUntil = now + self.WAIT_SECONDS
        if later is not None:
            self.takeBackTimer = self.reactor.callLater(later - now, self._takeBack)

    def _giveBack(self, waiting):
        """C{waiting}'s messages go back to the queue manager (L{WAITED}); the destination is congested."""
        self.congestedUntil = self.reactor.seconds() + self.WAIT_SECONDS
        _answer(waiting, WAITED)


def _answer(waiting, result):
    """Each message of C{waiting} (entries of the line) gets C{result} for every recipient."""
    for m, d, *_ in waiting:
        d.callback({r: result for r in m.recipients})


def _arrival(message):
    """When C{message} was accepted: the order messages wait and are parked in."""
    return getattr(message, "arrival", 0) or 0


def _accepted(entry):
    """When the message of a waiting entry was accepted."""
    return _arrival(entry[0])
