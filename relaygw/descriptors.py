"""
The process's open-file budget.  Each session takes a descriptor, and its
spool file another while its content comes in; deliveries, the spool's
own files and the log keep a few more.  The usual soft limit of 1,024 is
below the default C{max_connections} alone, and past the limit Twisted
resets each new connection and sessions are refused their spool files.

So, as Postfix's master, the gateway raises its soft limit to the hard one
at start (L{raiseLimit}; workers inherit it), and stops accepting while its
listeners hold all the connections the limit allows (L{ConnectionBudget}), as
the master stops at its process limit: later clients wait in the kernel's
listen queue instead of taking descriptors.  Twisted accepts what the
queue holds in one batch, so each listening socket takes no more than the
budget has room for (L{ConnectionBudget.guard}); a connection accepted
past it anyway is told C{421 4.7.0}.  When C{accept} itself finds the
process (or the system) out of descriptors, the listeners stop accepting
for a while instead of closing what waits in the queue, as stock Twisted
does, unanswered.
"""

import errno
import resource
import time

from relaygw.logs import Logger
from relaygw.sharedports import acceptExclusively

log = Logger(namespace="relaygw.service")


def raiseLimit():
    """Raise the soft limit on open files to the hard limit (as far as the kernel allows); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard,) if hard != resource.RLIM_INFINITY else (1 << 20, 1 << 16):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return target
    return soft


class ConnectionBudget:
    """
    How many connections this process's listeners may hold at once within
    its open-file limit: two descriptors each (the connection, and its
    spool file while content comes in), past a reserve for the relay's
    deliveries (C{concurrency}), the admin endpoint's connections and, in
    the main process, those it holds for each other worker (C{others}),
    and C{RESERVE} more (the spool's, the log's, DNS sockets).  Every accepted connection counts until it has
    gone: sessions, those still closing, and those a PROXY listener holds
    before their header.

    @ivar connections: that number.
    @ivar ports: the listening ports to pause while it is reached.
    """

    RESERVE = 64

    #: Seconds between two warnings that the listeners stopped accepting at the budget.
    WARN_EVERY = 1000

    #: Seconds the listeners stop accepting when C{accept} finds no descriptor (sooner once a connection ends).
    BACKOFF = 1.0

    def __init__(self, listeners, concurrency, ports=(), limit=None, others=0, yielding=False, reactor=None):
        if limit is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = limit
        self.others = others
        #: Whether a listener at its max_connections stops accepting (with several workers: L{changed}).
        self.yielding = yielding
        self.factories = []
        self.ports = ports
        self.paused = False
        self._stopped = set()  # the ports not accepting now
        self.reactor = reactor
        self._backoff = None  # (the timer ending a pause after accept found no descriptor, and what was held then)
        self._short = False  # (said so, and no connection accepted since)
        self._warnedAt = None  # (when the listeners' pause at the budget was last said)
        self._said = False  # (and they have not been said to accept again since)
        self.connections = None
        self.configure(listeners, concurrency)

    def configure(self, listeners, concurrency):
        """
        Size the budget for C{listeners} and C{concurrency} deliveries: at
        start, and again when a reload changes them (saying so, as at
        start, when the limit holds fewer connections than they allow).
        """
        before = self.connections
        wanted = sum(l.max_connections for l in listeners)
        fits = self.connections = max(1, (self.limit - concurrency - self.others - self.RESERVE) // 2)
        if fits < wanted and fits != before:
            log.warn("the open-file limit is {limit}: this process can hold {fits} connections at once, fewer "
                     "than max_connections allows ({wanted}); past them it stops accepting for a while (raise "
                     "the hard limit, LimitNOFILE=, or lower max_connections)", limit=self.limit, fits=fits,
                     wanted=wanted)
        if before is not None:
            self.changed()

    def held(self):
        """The connections this process's listeners hold now."""
        return sum(f.connectionsHeld() for f in self.factories)

    def full(self):
        """Whether the connections held are past the budget (the last one accepted must be refused)."""
        return self.held() > self.connections

    def guard(self, port, factory):
        """
        Have the listening C{port} of C{factory} take from its queue only
        the connections the budget has room for (and, with C{yielding},
        its listener too): Twisted's accept loop goes on until the queue is
        empty, and would accept a burst past the budget only for it to be
        refused 421.  Also keep Twisted from closing what waits in the
        queue when C{accept} finds no descriptor (L{_outOfDescriptors}).
        Ports without a socket of their own are left alone.
        """
        sock = getattr(port, "socket", None)
        if sock is not None and hasattr(sock, "accept") and not isinstance(sock, _GuardedSocket):
            port.socket = _GuardedSocket(sock, self, factory)
            if self.reactor is None:
                self.reactor = getattr(port, "reactor", None)

    def _room(self, factory):
        """Whether a listening socket of C{factory} may accept one more connection now."""
        if factory.draining:
            return True  # (each is told 421 4.3.2 and closed: drain takes what the queue holds)
        if self._backoff is not None or self.held() >= self.connections:
            return False
        return not (self.yielding and factory.full())

    def _outOfDescriptors(self, error):
        """
        C{accept} failed for want of descriptors or memory: stop accepting
        for L{BACKOFF} seconds, or until a connection ends, and leave the
        clients in the listen queue (the kernel keeps them) rather than
        close them unanswered as Twisted does to recover.
        """
        if self._backoff is not None or self.reactor is None:
            return
        if not self._short:
            self._short = True
            log.warn("no descriptor to accept a connection ({error}): clients wait in the listen queue until one "
                     "is free", error=errno.errorcode.get(error, error))
        self._backoff = (self.reactor.callLater(self.BACKOFF, self._endBackoff), self.held())
        self._pause(set(self.ports))

    def _endBackoff(self):
        timer, _ = self._backoff
        if timer.active():
            timer.cancel()
        self._backoff = None
        self.changed()

    def changed(self):
        """
        A connection came or went: stop accepting at the budget, accept
        again below it.  With C{yielding} (several workers), a listener
        holding its C{max_connections} (C{full()}) stops accepting on its
        own ports, so that another worker, waiting on the same socket,
        takes the next client instead of this one refusing it.
        """
        held = self.held()
        if self._backoff is not None:
            if held >= self._backoff[1]:
                return
            self._endBackoff()  # (a connection ended: its descriptor is free again)
            return
        full = held >= self.connections
        if full != self.paused:
            self.paused = full
            self._sayPaused(full)
        if full:
            stopped = set(self.ports)
        elif self.yielding:
            stopped = {port for f in self.factories if f.full() for port in f.ports}
        elif not self._stopped:
            return
        else:
            stopped = set()
        self._pause(stopped)

    def _sayPaused(self, full):
        """
        Say that the listeners stopped accepting at the budget, at most
        once every L{WARN_EVERY} seconds (as Postfix's master says a
        service reached its process limit), and that they accept again
        after a pause it said: at the budget they stop and start again
        with each connection that ends, two lines a session.
        """
        now = time.monotonic()
        if full and (self._warnedAt is None or now - self._warnedAt >= self.WARN_EVERY):
            self._warnedAt = now
            self._said = True
            log.warn("holding {n} connections, all the open-file limit allows: not accepting until one ends",
                     n=self.connections)
        elif not full and self._said:
            self._said = False
            log.info("accepting connections again")

    def _pause(self, stopped):
        """Stop accepting on the ports in C{stopped}, accept again on the others."""
        for port in self.ports:
            if (port in stopped) == (port in self._stopped) or not getattr(port, "connected", False) \
                    or port.disconnecting:
                continue
            if port in stopped:
                port.stopReading()
                self._stopped.add(port)
            else:
                port.startReading()
                self._stopped.discard(port)
                # (The reactor registers it afresh, without the flag.)
                acceptExclusively(getattr(port, "reactor", None), port)


#: What C{accept} fails with when the process or the system has no descriptor (or memory) for a connection.
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _GuardedSocket:
    """
    A listening socket as L{ConnectionBudget.guard} leaves it on its port:
    C{accept} says "nothing waits" (C{EAGAIN}, which ends Twisted's accept
    loop) when the budget has no room, and when the process has no
    descriptor left; everything else is the socket's.
    """

    def __init__(self, sock, budget, factory):
        self._sock = sock
        self._budget = budget
        self._factory = factory

    def accept(self):
        if not self._budget._room(self._factory):
            raise BlockingIOError(errno.EAGAIN, "no room in the connection budget")
        try:
            accepted = self._sock.accept()
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                raise
            self._budget._outOfDescriptors(e.errno)
            raise BlockingIOError(errno.EAGAIN, "no descriptor for a connection") from None
        self._budget._short = False
        return accepted

    def __getattr__(self, name):
        return getattr(self._sock, name)
