"""
Client connection counts and rates per address (a listener's
C{max_connections_per_ip} and C{connection_rate_per_ip}) and failed
logins per address (the AUTH limiter, L{relaygw.auth.FailureTracker}),
kept in one place for the whole gateway, as Postfix's anvil keeps them
for every smtpd process.

With one process the counts are that process's (L{Anvil}).  With several
workers, worker 0 keeps them and every other worker asks it over a
socket pair the supervisor hands it at its start (L{AnvilClient}): a
client's connections count the same whichever worker the kernel gives
them to.  Only a listener with a limit asks, and AUTH; when worker 0
cannot be asked (the channel has gone, or no answer came in time) the
connection is let in and the login tried, as smtpd does when anvil does
not answer.
"""

import collections
import json
import os
import socket

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import Interface, implementer

from relaygw import wire
from relaygw.logs import Logger

log = Logger(namespace="relaygw.anvil")

#: The environment variable naming the descriptor of a worker's channel.
ENV = "RELAYGW_ANVIL_FD"

#: Said once by a worker that cannot ask worker 0.
_ALONE = "no client-count channel to worker 0: per-IP limits and failed logins count this worker's clients only"

#: What L{ClientCounts.acquire} says of a connection over a limit.
TOO_MANY = "count"
TOO_FAST = "rate"


class IClientCounts(Interface):
    """One listener's clients per address, as a session's factory counts them."""

    def acquire(ip, limit, rate):
        """
        Count a connection from C{ip}; L{TOO_MANY} or L{TOO_FAST} when it is
        over C{limit} connections at once or C{rate} a minute (0: none), else
        C{None}, or a Deferred of one of those.  It is counted either way,
        until L{release}.
        """

    def release(ip):
        """A connection counted against C{ip} is over."""


@implementer(IClientCounts)
class ClientCounts:
    """
    One listener's clients: how many connections each address holds, and
    when it made those of the last minute.
    """

    #: Seconds between sweeps of the per-address connection times.
    PRUNE_EVERY = 60

    def __init__(self, clock, catchUp=None):
        self.clock = clock
        self.perIP = collections.Counter()
        self.recentConnects = collections.defaultdict(collections.deque)
        self._prunedAt = 0.0
        #: Called before a connection is refused over C{limit}: takes in
        #: the releases other processes have already sent (L{Anvil.catchUp}).
        self.catchUp = catchUp

    def acquire(self, ip, limit, rate):
        self.perIP[ip] += 1
        if limit and self.perIP[ip] > limit and self.catchUp is not None:
            self.catchUp()
        if limit and self.perIP[ip] > limit:
            return TOO_MANY
        if rate:
            now = self.clock.seconds()
            self._pruneRecent(now)
            recent = self.recentConnects[ip]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            recent.append(now)
            if len(recent) > rate:
                return TOO_FAST
        return None

    def release(self, ip):
        self.perIP[ip] -= 1
        if self.perIP[ip] <= 0:
            del self.perIP[ip]

    def _pruneRecent(self, now):
        """
        Forget addresses with no connection in the last minute, once a
        minute at most, so the rate state holds only recent clients.
        """
        if now - self._prunedAt < self.PRUNE_EVERY:
            return
        self._prunedAt = now
        for ip in [ip for ip, recent in self.recentConnects.items() if not recent or recent[-1] <= now - 60]:
            del self.recentConnects[ip]


class Anvil:
    """
    The counts of every listener of the gateway, and its failed logins per
    address (L{relaygw.auth.FailureTracker}): in worker 0 of several.
    """

    def __init__(self, clock):
        from relaygw.auth import FailureTracker

        self.clock = clock
        self.listeners = {}
        self.authFailures = FailureTracker(clock)
        self.channels = set()
        self._catchingUp = False

    def countsFor(self, name):
        """Listener C{name}'s L{ClientCounts}."""
        counts = self.listeners.get(name)
        if counts is None:
            counts = self.listeners[name] = ClientCounts(self.clock, catchUp=self.catchUp)
        return counts

    def catchUp(self):
        """
        Take in now what the other workers have sent and not been read
        yet, before a connection is refused over a limit.  A worker
        releases a slot before its session's connection closes, so the
        client may connect again at once; the reactor here may take that
        connection (accepted in the same turn as the one before) ahead of
        the release waiting in a channel, and would refuse it 421 for a
        slot already given back.  A channel whose requests are being
        handled (one of them asked) is read in its own order.
        """
        if self._catchingUp:
            return
        self._catchingUp = True
        try:
            for channel in list(self.channels):
                while not channel.dispatching:
                    data = wire.receiveNow(channel.transport)
                    if not data:
                        break
                    channel.dataReceived(data)
        finally:
            self._catchingUp = False

    def attach(self, reactor, sock):
        """
        Serve another worker over C{sock}, this end of its channel (taken
        over: the caller may close its own object).  What that worker
        counted is released when the channel goes, with the worker.
        """
        sock.setblocking(False)
        reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: _Channel(self)))


class _Channel(LineOnlyReceiver):
    """
    Worker 0's end of another worker's channel: one JSON array a line each
    way, a request's answer (if it has one) in the order asked.  What the
    worker holds (connections counted, logins being verified) is released
    when the channel goes.
    """

    delimiter = b"\n"

    #: Whether its requests are being handled now (L{Anvil.catchUp} leaves it alone then).
    dispatching = False

    def __init__(self, anvil):
        self.anvil = anvil
        self.held = collections.Counter()
        self.logins = collections.Counter()

    def connectionMade(self):
        self.anvil.channels.add(self)

    def dataReceived(self, data):
        self.dispatching = True
        try:
            LineOnlyReceiver.dataReceived(self, data)
        finally:
            self.dispatching = False

    def lineReceived(self, line):
        try:
            op, *args = json.loads(line)
            answer = getattr(self, "op_" + op.replace("-", "_"))(*args)
        except (ValueError, TypeError, AttributeError) as e:
            log.warn("dropping a worker's client-count channel: bad request {line!r} ({error})",
                     line=line[:200], error=e)
            self.transport.loseConnection()
            return
        if answer is not _NOTHING:
            self.sendLine(json.dumps(answer).encode())

    def op_acquire(self, name, ip, limit, rate):
        self.held[(name, ip)] += 1
        return self.anvil.countsFor(name).acquire(ip, limit, rate)

    def op_release(self, name, ip):
        if _take(self.held, (name, ip)):
            self.anvil.countsFor(name).release(ip)
        return _NOTHING

    def op_auth_locked(self, ip):
        return self.anvil.authFailures.lockedOut(ip)

    def op_auth_begin(self, ip):
        wait = self.anvil.authFailures.begin(ip)
        if wait is not None:
            self.logins[ip] += 1
        return wait

    def op_auth_end(self, ip, failed):
        if not _take(self.logins, ip):
            return self.anvil.authFailures.tooMany(ip)
        return self.anvil.authFailures.end(ip, bool(failed))

    def connectionLost(self, reason):
        self.anvil.channels.discard(self)
        for (name, ip), n in self.held.items():
            counts = self.anvil.countsFor(name)
            for _ in range(n):
                counts.release(ip)
        for ip, n in self.logins.items():
            for _ in range(n):
                self.anvil.authFailures.done(ip, failed=False)
        self.held.clear()
        self.logins.clear()


#: (A request without an answer.)
_NOTHING = object()


def _take(counter, key):
    """
    Take one off C{counter[key]}, if it holds any; whether it did.  A key
    down to none goes, so that a channel holds only what its worker holds
    now, not every address it has ever served.
    """
    n = counter.get(key, 0)
    if n <= 0:
        return False
    if n == 1:
        del counter[key]
    else:
        counter[key] = n - 1
    return True


class AnvilClient(LineOnlyReceiver):
    """A worker's end of its channel to worker 0's L{Anvil}."""

    delimiter = b"\n"
    #: Seconds to wait for worker 0's answer before letting the connection in.
    TIMEOUT = 5

    def __init__(self, reactor):
        self.reactor = reactor
        self.waiting = collections.deque()
        self.connected = False
        self.warned = False

    @classmethod
    def fromEnvironment(cls, reactor, environ=None):
        """The channel the supervisor handed this worker (named in its environment), or C{None}."""
        environ = os.environ if environ is None else environ
        value = environ.pop(ENV, None)
        if value is None:
            return None
        try:
            fd = int(value)
            os.set_blocking(fd, False)
        except (ValueError, OSError) as e:
            log.warn(_ALONE + " ({error})", error=e)
            return None
        client = cls(reactor)
        try:
            reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: client))
        finally:
            os.close(fd)
        return client

    def connectionMade(self):
        self.connected = True

    def countsFor(self, name):
        return _RemoteCounts(self, name)

    @property
    def authFailures(self):
        return _RemoteFailures(self)

    def ask(self, otherwise, *request):
        """
        Worker 0's answer to C{request} (a Deferred), or C{otherwise} when
        it cannot be asked or does not answer in time.
        """
        if not self.connected:
            if not self.warned:  # (said when it matters: not at a shutdown, which also ends the channel)
                self.warned = True
                log.warn(_ALONE)
            return otherwise
        d = defer.Deferred()
        self.waiting.append(d)
        self.tell(*request)
        return d.addTimeout(self.TIMEOUT, self.reactor).addErrback(self._unanswered, otherwise)

    def tell(self, *request):
        """
        Send worker 0 C{request}, which has no answer.  It leaves at once,
        not at the reactor's next turn: a release must reach worker 0
        before the client, told 221 and shut out right after it, can
        connect again, or its next connection could be counted against a
        slot still held and refused 421.
        """
        if self.connected:
            wire.sendNow(self.transport, json.dumps(request).encode() + self.delimiter)

    @staticmethod
    def _unanswered(failure, otherwise):
        failure.trap(defer.TimeoutError, defer.CancelledError, ValueError, error.ConnectionClosed)
        log.warn("no usable answer from worker 0 to a client-count request ({why}): going on without it",
                 why=failure.getErrorMessage())
        return otherwise

    def lineReceived(self, line):
        if not self.waiting:
            return
        d = self.waiting.popleft()
        if not d.called:  # (not already given up on after a timeout)
            try:
                d.callback(json.loads(line))
            except ValueError:
                d.errback()

    def connectionLost(self, reason):
        self.connected = False
        waiting, self.waiting = self.waiting, collections.deque()
        for d in waiting:
            if not d.called:
                d.errback(reason)  # (each request's own default, as with no channel: L{_unanswered})


@implementer(IClientCounts)
class _RemoteCounts:
    """One listener's counts as another worker sees them: through its L{AnvilClient}."""

    def __init__(self, client, name):
        self.client = client
        self.name = name

    def acquire(self, ip, limit, rate):
        """A Deferred of worker 0's verdict (or C{None} when it cannot be asked)."""
        d = self.client.ask(None, "acquire", self.name, ip, limit, rate)
        if isinstance(d, defer.Deferred):
            d.addCallback(lambda verdict: verdict if verdict in (TOO_MANY, TOO_FAST) else None)
        return d

    def release(self, ip):
        self.client.tell("release", self.name, ip)


class _RemoteFailures:
    """
    Failed logins per address as another worker sees them: the calls of
    L{relaygw.auth.FailureTracker} that AUTH makes, each a Deferred of
    worker 0's answer (or what lets the client try, when it cannot be asked).
    """

    def __init__(self, client):
        self.client = client

    def lockedOut(self, peer):
        return self.client.ask(False, "auth-locked", peer)

    def begin(self, peer):
        return self.client.ask(0, "auth-begin", peer)

    def end(self, peer, failed):
        return self.client.ask(False, "auth-end", peer, failed)
