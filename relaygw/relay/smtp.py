"""
Onward SMTP next hops: a smarthost list (tried in order with failover) or
MX delivery for one recipient domain.

Messages handed in while every connection to the destination is busy wait
and go out together on the next free connection, so under load one
connection carries many messages (the client pipelines them when the next
hop offers PIPELINING).  The number of connections per destination is
capped; the connections kept open for the next batch, and those saying
QUIT, are L{KeptOpen}'s.

A destination found dead (L{Health}) has what waits for it, and what comes
meanwhile, deferred at once with the reason ("delivery temporarily
suspended: ...") instead of each message trying a connection and waiting
for a timeout of its own.  How messages wait for a connection, and when
they go back to the queue manager instead, is L{WaitingLine}'s.
"""

import dataclasses

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw.context import identityOf
from relaygw.logs import Logger
from relaygw.relay import client as smtpclient
from relaygw.relay import mx
from relaygw.relay.nexthop import NOT_SENT, REROUTED, STOPPED, INextHop, Result, temporary
from relaygw.relay.keptopen import KeptOpen
from relaygw.relay.waitingline import WaitingLine

log = Logger(namespace="relaygw.relay")


def outbound(message):
    """The delivery client's view of a spooled message."""
    return smtpclient.OutboundMessage(
        mailfrom=message.mailfrom,
        recipients=list(message.recipients),
        openBody=message.openForDelivery,
        context=message.context,
        size=message.size,
        mailParams=message.envelope.mail_params,
        rcptParams=message.envelope.rcpt_params or None,
    )


def _identity(message):
    """What XCLIENT/XFORWARD would say about a message's original client."""
    return identityOf(message.context)


@implementer(INextHop)
class SMTPNextHop(WaitingLine, KeptOpen):
    """
    @ivar hosts: C{hosts() -> Deferred[list[(host, port)]]}, the candidates
        in order (a fixed smarthost list, or an MX lookup).
    """

    def __init__(self, reactor, name, hosts, options, maxConnections=10, batch=50, deadFor=300, maxHeld=None,
                 contended=None):
        WaitingLine.__init__(self)
        self.maxHeld = maxHeld
        if contended is not None:
            self.contended = contended
        KeptOpen.__init__(self)
        self.reactor = reactor
        self.name = name
        self.hosts = hosts
        self.options = options
        self.maxConnections = maxConnections
        self.batch = batch
        self.active = 0
        self.carrying = set()  # connections carrying a batch now
        self.lookups = set()  # next-hop lookups under way
        self.stopping = False
        self.retired = False  # (a reload replaced its router: L{retire})
        self.health = Health(reactor, name, deadFor)
        #: The same destination's next hop in the router a reload replaced, while it has connections open.
        self.predecessor = None

    def describe(self):
        return self.name

    @property
    def unused(self):
        """Nothing waits (or is parked), nothing is in flight, no connection is kept open."""
        return not (self.waiting or self.parked or self.active or self.idle or self.closing)

    def deliver(self, messages, progress=None):
        ds = self._join(messages, progress)
        self._pump()
        if len(ds) == 1:  # (every message's Deferred fires with a result, never fails)
            return ds[0].addCallback(lambda results: [results])
        return defer.gatherResults(ds)

    def _key(self, host, port, message):
        """
        Which kept-open connections may carry C{message}: when the client
        identity is forwarded, only one that already speaks for the same
        original client (a next hop usually accepts one XCLIENT per
        connection, and a message from another client would be deferred).
        """
        return (host, port, _identity(message) if self.options.forwardIdentity else None)

    def wrapUp(self):
        """
        The gateway is stopping: messages waiting for a connection are not
        sent, and each connection carrying a batch finishes the transaction
        under way and starts no other (a new transaction begun in the last
        moments would be cut after its end of data, and sent again after
        the restart).
        """
        self.stopping = True
        self._empty(STOPPED)
        for conn in self.carrying:
            conn.wrapUp()

    def cutShort(self):
        """
        The gateway is stopping, and the deliveries still in flight had
        their time: messages waiting for the lookup of the next hop's hosts
        are not sent, and the connections carrying messages are cut (every
        recipient not yet settled gets L{STOPPED}), as are those saying QUIT
        to a next hop slow to answer.
        """
        self.wrapUp()
        for lookup in list(self.lookups):
            lookup.cancel()
        for conn in list(self.carrying) + list(self.closing):
            conn.cut(STOPPED)

    def follow(self, predecessor):
        """
        This next hop replaces C{predecessor} (a reload rebuilt the router):
        the connections it still has open count against C{maxConnections}
        here too, and it keeps none open once its batches are done.
        """
        if not predecessor.unused:
            self.predecessor, predecessor.successor = predecessor, self

    def openConnections(self):
        """The connections this next hop has open: carrying, kept or closing."""
        return self.active + len(self.idle) + len(self.closing)

    def inheritedConnections(self):
        """The connections the next hops this one replaced still have open."""
        before = self.predecessor
        if before is None:
            return 0
        n = before.openConnections() + before.inheritedConnections()
        if not n and before.unused:
            self.predecessor = before.successor = None
        return n

    def _reloadedConnections(self):
        """
        The connections the same destination's next hops in other routers
        (those this one replaced, and those that replaced it) have open.
        """
        n, after = self.inheritedConnections(), self.successor
        while after is not None:
            n, after = n + after.openConnections(), after.successor
        return n

    def retire(self):
        """
        A reload replaced the router this next hop belongs to: the batches
        under way finish, but nothing else goes out here.  What waits for a
        connection or behind another message on one, and what comes later,
        gets L{REROUTED} (the queue manager tries it again at once, through
        the new router: the route may name another next hop); parked
        messages are told to go again.
        """
        self.retired = True
        self._pump()

    def revive(self):
        """An operator's flush: a destination found dead is tried again with the next message."""
        self.health.revive()

    def _pump(self, freed=False):
        """
        Start batches.  A message that comes while connections are busy
        waits for one of them (its next batch pipelines it behind the
        others) unless more messages wait than connections are busy, or
        the destination holds its share of the delivery slots (more
        connections are then what makes it go faster); then another
        connection opens, up to the cap.  A connection that has
        just C{freed} itself takes what waits at once.  While the
        destination is congested a message starts on a connection of its
        own, or not at all (L{WaitingLine._startsNext}).
        """
        if self.retired and not self.stopping:
            self._withdrawAll(REROUTED)
            if self.successor is not None:
                self.successor._pump()
            return
        suspended = self.health.suspended() if (self.waiting or self.parked) and not self.stopping else None
        if suspended is not None:
            self._empty(suspended)
            self._watch(dead=True)
            return
        self._makeRoom()
        congested = self._congested()
        while self.waiting and not self.stopping \
                and self.active + len(self.closing) + self._reloadedConnections() < self.maxConnections \
                and (freed or congested or self._atShare or len(self.waiting) > self.active) \
                and self._startsNext(congested):
            freed = False
            batch = self._take()
            self.active += 1
            d = self._send(batch)
            d.addBoth(self._sent, batch)
        self._watch()
        if self.successor is not None:  # (a connection of this one may have ended: room for it)
            self.successor._pump()

    def _sent(self, results, batch):
        self.active -= 1
        requeued = results if isinstance(results, set) else ()
        for index, (m, d, *_) in enumerate(batch):
            if d.called or index in requeued:
                continue  # reported as it came, or waiting again
            if not isinstance(results, Failure):  # (cannot happen: every message is reported)
                d.callback({r: temporary("no next hop available") for r in m.recipients})
            else:
                log.failure("delivery via {hop} failed", results, hop=self.name)
                d.callback({r: temporary("delivery failed: %s" % results.getErrorMessage())
                            for r in m.recipients})
        self._pump(freed=True)

    @defer.inlineCallbacks
    def _send(self, batch):
        """
        Try each candidate host in turn for what is still pending.  A
        message's Deferred (in C{batch}) fires as soon as its outcome is
        final: every recipient accepted or refused for good, as the reply
        is read, or after the last candidate with the last temporary
        failure (as the reply is read when that candidate answered).  A
        message a connection never got to (L{NOT_SENT}: the session broke
        down over one before it) waits again, first in line for the next
        connection; the indexes of those are what this fires with.
        """
        messages = [item[0] for item in batch]
        final = [dict() for _ in messages]
        requeued = set()

        def report(index, results):
            d = batch[index][1]
            if not d.called:
                d.callback(results)

        def reportSome(index, results):
            """Final results for some of a message's recipients, the others going on (next host, new transaction)."""
            progress = batch[index][2]
            if progress is not None and results:
                callback, position = progress  # (its position among the messages given to deliver)
                defer.maybeDeferred(callback, position, results).addErrback(
                    lambda f: log.failure("recording progress via {hop}", f, hop=self.name))

        lookup = self.hosts()
        self.lookups.add(lookup)
        watch = self._watchBatch(None, list(enumerate(messages)), batch)
        try:
            candidates = yield lookup
        except mx.NullMX:
            result = Result(556, "5.1.10", "domain does not accept mail (null MX)")
            candidates = None
        except mx.NoSuchDomain:
            result = Result(550, "5.1.2", "recipient domain does not exist")
            candidates = None
        except mx.LoopsToSelf as e:
            result = e.result
            candidates = None
        except mx.TemporaryLookupFailure as e:
            result = STOPPED if self.stopping else Result(451, e.enhanced, "next hop lookup failed: %s" % (e,))
            candidates = None
            if not self.stopping:  # (a site failure, as Postfix's: a DNS that fails or never answers)
                self.health.failed(result)
        except Exception as e:
            result = STOPPED if self.stopping else temporary("next hop lookup failed: %s" % (e,))
            candidates = None
        finally:
            self.lookups.discard(lookup)
            self._unwatch(watch)
        if candidates is None:
            for index, m in enumerate(messages):
                report(index, {r: result for r in m.recipients})
            return
        last = {}
        failure, answered = None, False  # (the last session failure that answered nothing; whether a carry answered)
        pending = [(index, m) for index, m in enumerate(messages) if not batch[index][1].called]  # (not taken back)
        for n, candidate in enumerate(candidates):
            if not pending or self.stopping:
                break
            lastCandidate = n == len(candidates) - 1
            host, port = candidate[:2]
            options = self.options
            if len(candidate) > 2:  # an MX host: TLS checks its name; a loop bounces if it is a best one
                options = dataclasses.replace(options, tlsHostname=candidate[2], bestMX=candidate[3])
            key = self._key(host, port, pending[0][1])
            still, notSent, carried = {}, set(), [pending]

            def settled(position, res, still=still, notSent=notSent, carried=carried, lastCandidate=lastCandidate):
                index, m = carried[0][position]
                if NOT_SENT in res.values():
                    notSent.add(index)
                    return
                retry, now = [], {}
                for rcpt in m.recipients:
                    r = res.get(rcpt)
                    if r is None:
                        continue
                    if r.ok or r.permanent or r.untried:
                        final[index][rcpt] = now[rcpt] = r
                    else:
                        last[(index, rcpt)] = r
                        retry.append(rcpt)
                if retry and now and lastCandidate:
                    # The next hop answered, and no other host is left to
                    # try: the deferred recipients' outcome is final too, so
                    # the whole outcome goes out now (one progress write).
                    report(index, {**final[index], **{rcpt: last[(index, rcpt)] for rcpt in retry}})
                elif retry:
                    still[index] = (index, m.narrowed(retry))
                    reportSome(index, now)
                else:
                    report(index, final[index])

            while True:
                room = self._roomFor(key)
                if room is not None:
                    yield room
                    if self.stopping:
                        break
                conn = self._connection(key, options)
                notSent.clear()
                self.carrying.add(conn)
                watch = self._watchBatch(conn, carried[0], batch)
                try:
                    results = yield defer.ensureDeferred(conn.carry(
                        [outbound(m) for _, m in carried[0]], keepOpen=True, settled=settled,
                        settledSome=lambda position, res, carried=carried: reportSome(carried[0][position][0], res)))
                finally:
                    self.carrying.discard(conn)
                    self._unwatch(watch)
                if self.stopping:
                    break
                if conn.stale or conn.retryPlain:  # (what that carry said is void: it goes again)
                    for index, _ in carried[0]:
                        still.pop(index, None)
                    if conn.stale:  # (a new connection never is)
                        log.info("{where}: kept-open connection closed by the next hop; trying again",
                                 where=conn.where)
                    else:
                        log.info("{where}: opportunistic TLS failed; trying again without TLS", where=conn.where)
                        options = dataclasses.replace(options, tls="none")
                    continue
                self._park(conn, key)
                said = _verdict(conn, results)
                if said is True:
                    answered = True
                    self.health.answered()
                elif said is not None:
                    failure = said
                for position, res in enumerate(results):  # (every message was settled: this is a safety net)
                    index = carried[0][position][0]
                    if index not in still and not batch[index][1].called:
                        settled(position, res)
                if not notSent or n == 0:
                    break
                # Past the first host, what the connection never got to goes
                # on a new connection to the same host, where failover is.
                carried[0] = [(index, m) for index, m in carried[0] if index in notSent]
            if n == 0:  # (at the first host, it waits again, first in line)
                requeued.update(notSent)
            pending = [still[index] for index in sorted(still)]
        for index, m in enumerate(messages):
            if index in requeued and not self.stopping:
                continue
            for rcpt in m.recipients:
                if rcpt not in final[index]:
                    final[index][rcpt] = last.get((index, rcpt), STOPPED if self.stopping
                                                  else temporary("no next hop available"))
            report(index, final[index])
        if not self.stopping:
            if failure is not None and not answered:
                self.health.failed(failure)
            self.waiting[:0] = [batch[index] for index in sorted(requeued)]
            return requeued

class Health:
    """
    Whether a destination is dead, as Postfix throttles one: once
    C{DEAD_AFTER} batches in a row found every host failing before it
    answered any of their messages (no connection, a refused greeting, a
    421, silence), or found no hosts because their lookup failed for now
    (a DNS server failing or silent), for C{deadFor} seconds ([relay] retry_min, Postfix's
    minimal_backoff_time).  A message it answers, or an operator's flush
    (L{revive}), ends that.  One message that breaks its session (a
    content filter dropping the connection) does not: the batches around
    it are answered.
    """

    #: Batches in a row failed on every host, answering nothing, that make the destination dead.
    DEAD_AFTER = 3

    def __init__(self, reactor, name, deadFor):
        self.reactor = reactor
        self.name = name
        self.deadFor = deadFor
        self.failures = 0  # batches failed in a row
        self.deadUntil = None  # set when found dead; None again once it answers
        self.result = None

    def suspended(self):
        """The result for each recipient while the destination is dead; None when it is not."""
        if self.deadUntil is None or self.reactor.seconds() >= self.deadUntil:
            return None
        return self.result

    def failed(self, reason):
        """Every host failed a batch's session before answering anything: C{reason}, the last failure."""
        self.failures += 1
        if self.failures < self.DEAD_AFTER:
            return
        if self.suspended() is None:  # (newly dead, or again once its time ran out)
            log.warn("{hop}: {reason}; deliveries suspended for {seconds:g}s", hop=self.name, reason=reason,
                     seconds=self.deadFor)
        self.deadUntil = self.reactor.seconds() + self.deadFor
        self.result = Result(reason.code, reason.enhanced, "delivery temporarily suspended: %s" % reason.text)

    def answered(self):
        """A connection got answers to a message: the destination lives."""
        self.failures = 0
        if self.deadUntil is not None:
            log.info("{hop}: answering again; deliveries resumed", hop=self.name)
            self.deadUntil = None

    def revive(self):
        if self.deadUntil is not None:
            log.info("{hop}: flush requested; deliveries resumed", hop=self.name)
        self.deadUntil, self.failures = None, 0


def _verdict(conn, results):
    """
    What C{conn}'s carry (C{results}) says about the destination: C{True}
    when it answered (a final reply to a message, or a session that did
    not break down); the reason when the session broke down before any
    final reply (no connection, a refused greeting, a 421, silence); None
    when it reached no message (a kept-open connection's 421 to the next
    MAIL: its messages go on another connection).
    """
    reason = None
    for res in results:
        for r in res.values():
            if r.ok or r.permanent:
                return True
            if reason is None and not r.untried:
                reason = r
    return True if not conn.brokeDown else reason


def smarthostList(hosts):
    """A C{hosts} provider for a fixed smarthost list."""
    return lambda: defer.succeed(list(hosts))


def mxHosts(resolver, domain, isSelf):
    """A C{hosts} provider that looks up the MX hosts of C{domain} (those before the gateway itself, C{isSelf})."""
    return lambda: mx.lookupNextHops(resolver, domain, withNames=True, isSelf=isSelf)
