"""
Client connection counts and rates per address (a listener's
C{max_connections_per_ip} and C{connection_rate_per_ip}), kept in one
place for the whole gateway, as Postfix's anvil keeps them for every
smtpd process.

With one process the counts are that process's (L{Anvil}).  With several
workers, worker 0 keeps them and every other worker asks it over a
socket pair the supervisor hands it at its start (L{AnvilClient}): a
client's connections count the same whichever worker the kernel gives
them to.  Only a listener with a limit asks; when worker 0 cannot be
asked (the channel has gone, or no answer came in time) the connection
is let in, as smtpd does when anvil does not answer.
"""

import collections
import json
import os
import socket

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from relaygw.logs import Logger

log = Logger(namespace="relaygw.anvil")

#: The environment variable naming the descriptor of a worker's channel.
ENV = "RELAYGW_ANVIL_FD"

#: What L{ClientCounts.acquire} says of a connection over a limit.
TOO_MANY = "count"
TOO_FAST = "rate"


class ClientCounts:
    """
    One listener's clients: how many connections each address holds, and
    when it made those of the last minute.
    """

    #: Seconds between sweeps of the per-address connection times.
    PRUNE_EVERY = 60

    def __init__(self, clock):
        self.clock = clock
        self.perIP = collections.Counter()
        self.recentConnects = collections.defaultdict(collections.deque)
        self._prunedAt = 0.0

    def acquire(self, ip, limit, rate):
        """
        Count a connection from C{ip}; L{TOO_MANY} or L{TOO_FAST} when it is
        over C{limit} connections at once or C{rate} a minute (0: none), else
        C{None}.  It is counted either way, until L{release}.
        """
        self.perIP[ip] += 1
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
        """A connection counted against C{ip} is over."""
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
    """The counts of every listener of the gateway (in worker 0, or the only process)."""

    def __init__(self, clock):
        self.clock = clock
        self.listeners = {}

    def countsFor(self, name):
        """Listener C{name}'s L{ClientCounts}."""
        counts = self.listeners.get(name)
        if counts is None:
            counts = self.listeners[name] = ClientCounts(self.clock)
        return counts

    def attach(self, reactor, sock):
        """
        Serve another worker over C{sock}, this end of its channel (taken
        over: the caller may close its own object).  What that worker
        counted is released when the channel goes, with the worker.
        """
        sock.setblocking(False)
        reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: _Channel(self)))


class _Channel(LineOnlyReceiver):
    """Worker 0's end of another worker's channel: one JSON array a line each way."""

    delimiter = b"\n"

    def __init__(self, anvil):
        self.anvil = anvil
        self.held = collections.Counter()

    def lineReceived(self, line):
        try:
            op, name, ip, *limits = json.loads(line)
            counts = self.anvil.countsFor(name)
            if op == "acquire":
                limit, rate = limits
                verdict = counts.acquire(ip, limit, rate)
                self.held[(name, ip)] += 1
                self.sendLine(json.dumps(verdict).encode())
            elif op == "release" and self.held[(name, ip)] > 0:
                self.held[(name, ip)] -= 1
                counts.release(ip)
        except (ValueError, TypeError) as e:
            log.warn("dropping a worker's client-count channel: bad request {line!r} ({error})",
                     line=line[:200], error=e)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        for (name, ip), n in self.held.items():
            counts = self.anvil.countsFor(name)
            for _ in range(n):
                counts.release(ip)
        self.held.clear()


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
            log.warn("no client-count channel to worker 0 ({error}): per-IP limits count this worker's clients only",
                     error=e)
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

    def acquire(self, name, ip, limit, rate):
        if not self.connected:
            if not self.warned:  # (said when it matters: not at a shutdown, which also ends the channel)
                self.warned = True
                log.warn("no client-count channel to worker 0: per-IP limits count this worker's clients only")
            return None
        d = defer.Deferred()
        self.waiting.append(d)
        self.sendLine(json.dumps(["acquire", name, ip, limit, rate]).encode())
        return d.addTimeout(self.TIMEOUT, self.reactor).addErrback(self._unanswered)

    def release(self, name, ip):
        if self.connected:
            self.sendLine(json.dumps(["release", name, ip]).encode())

    @staticmethod
    def _unanswered(failure):
        failure.trap(defer.TimeoutError, defer.CancelledError)
        log.warn("worker 0 did not answer a client-count request in time: the connection is let in")
        return None

    def lineReceived(self, line):
        if not self.waiting:
            return
        d = self.waiting.popleft()
        if not d.called:  # (not already let in after a timeout)
            try:
                verdict = json.loads(line)
            except ValueError:
                verdict = None
            d.callback(verdict if verdict in (TOO_MANY, TOO_FAST) else None)

    def connectionLost(self, reason):
        self.connected = False
        waiting, self.waiting = self.waiting, collections.deque()
        for d in waiting:
            if not d.called:
                d.callback(None)


class _RemoteCounts:
    """One listener's counts as another worker sees them: through its L{AnvilClient}."""

    def __init__(self, client, name):
        self.client = client
        self.name = name

    def acquire(self, ip, limit, rate):
        """As L{ClientCounts.acquire}, but a Deferred (or C{None} when worker 0 cannot be asked)."""
        return self.client.acquire(self.name, ip, limit, rate)

    def release(self, ip):
        self.client.release(self.name, ip)
