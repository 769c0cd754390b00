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
listen queue instead of taking descriptors.  A connection accepted past
the budget anyway (one burst is accepted in a batch) is told C{421 4.7.0}.
"""

import resource

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
    deliveries (C{concurrency}), the admin endpoint's connections
    (C{others}) and C{RESERVE} more (the spool's, the log's, the workers'
    channels, DNS sockets).  Every accepted connection counts until it has
    gone: sessions, those still closing, and those a PROXY listener holds
    before their header.

    @ivar connections: that number.
    @ivar ports: the listening ports to pause while it is reached.
    """

    RESERVE = 64

    def __init__(self, listeners, concurrency, ports=(), limit=None, others=0, yielding=False):
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

    def changed(self):
        """
        A connection came or went: stop accepting at the budget, accept
        again below it.  With C{yielding} (several workers), a listener
        holding its C{max_connections} (C{full()}) stops accepting on its
        own ports, so that another worker, waiting on the same socket,
        takes the next client instead of this one refusing it.
        """
        full = self.held() >= self.connections
        if full != self.paused:
            self.paused = full
            if full:
                log.warn("holding {n} connections, all the open-file limit allows: not accepting until one ends",
                         n=self.connections)
            else:
                log.info("accepting connections again")
        if full:
            stopped = set(self.ports)
        elif self.yielding:
            stopped = {port for f in self.factories if f.full() for port in f.ports}
        elif not self._stopped:
            return
        else:
            stopped = set()
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
