"""
What the gateway changes in the reactor it runs on, before it builds its
services: its timers on the monotonic clock, and its I/O events handed to
the connections without Twisted's legacy log context around each one.
"""

import time
import types

from relaygw.logs import Logger

log = Logger(namespace="relaygw.eventloop")


def tune(reactor):
    """Both changes, on C{reactor} (the one installed)."""
    onMonotonicClock(reactor)
    dispatchDirectly(reactor)


def onMonotonicClock(reactor):
    """
    Run the reactor's timers on the monotonic clock, not on the wall clock
    Twisted gives them.  On the wall clock a step of the system time (a
    first NTP sync, an administrator's C{date}) fires every idle, data and
    retry timer at once when it goes forward, and when it goes back holds
    each for the length of the step: sessions idle for ever, a queue that
    retries nothing for an hour (what Postfix's C{sane_time} guards
    against).  Every use of C{reactor.seconds()} here is a difference of
    two; log lines and queue files keep the wall clock.  Timers already
    set move over with their remaining delay.
    """
    shift = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic


def dispatchDirectly(reactor):
    """
    Hand each epoll event straight to its connection.  Twisted's epoll
    reactor wraps every one in C{log.callWithLogger}, which asks the
    connection for its log prefix, copies the legacy log context with it,
    and pushes and pops that context: about 3 µs an event, ten events a
    relayed message, for a context the gateway's log never reads.  An
    error that escapes a connection's own handling is still logged, and
    the loop goes on, as with the wrapper.  Any other reactor, or an epoll
    reactor without the parts this relies on, is left as it is; returns
    whether the change was made.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # (no epoll on this platform)
        return False
    if not isinstance(reactor, EPollReactor) or not all(
        hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")
    ):
        return False
    reactor.doIteration = types.MethodType(_doPoll, reactor)
    return True


def _doPoll(reactor, timeout):
    """L{EPollReactor.doPoll} without the log context around each event."""
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
    except InterruptedError:  # (EINTR, as Twisted's poll step takes it)
        return
    selectables, handle = reactor._selectables, reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue  # (removed by an earlier event of this poll)
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.failure("handling an I/O event of {selectable!r}", selectable=selectable)
