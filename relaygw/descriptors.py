"""
The process's open-file budget.  Each session takes a descriptor, and its
spool file another while its content comes in; deliveries, the spool's
own files and the log keep a few more.  The usual soft limit of 1,024 is
below the default C{max_connections} alone, and past the limit Twisted
resets each new connection and sessions are refused their spool files.

So, as Postfix's master, the gateway raises its soft limit to the hard one
at start (L{raiseLimit}; workers inherit it), and a session past what the
limit can hold is refused C{421 4.7.0} at once (L{SessionBudget}), which a
client retries, instead of failing at its end of data.
"""

import resource

from relaygw.logs import Logger

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


class SessionBudget:
    """
    How many sessions this process's listeners may hold at once within its
    open-file limit: two descriptors each, past a reserve for the relay's
    deliveries (C{concurrency}) and C{RESERVE} more.

    @ivar sessions: that number.
    """

    RESERVE = 64

    def __init__(self, listeners, concurrency, limit=None):
        if limit is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        wanted = sum(l.max_connections for l in listeners)
        fits = self.sessions = max(1, (limit - concurrency - self.RESERVE) // 2)
        self.factories = []
        if fits < wanted:
            log.warn("the open-file limit is {limit}: this process can hold {fits} sessions at once, fewer than "
                     "max_connections allows ({wanted}); more are refused 421 4.7.0 (raise the hard limit, "
                     "LimitNOFILE=, or lower max_connections)", limit=limit, fits=fits, wanted=wanted)

    def full(self):
        """Whether the sessions open (closing ones too: they hold their descriptors) are past the budget."""
        return sum(len(f.sessions) + len(f.closing) for f in self.factories) > self.sessions
