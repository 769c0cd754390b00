"""
What the gateway changes in the reactor it runs on, before it builds its
services: its timers on the monotonic clock, its I/O events handed to
the connections without Twisted's legacy log context around each one, and
a connection the kernel will not watch (epoll out of memory) closed with
one log line.
"""

import errno
import time
import types

from twisted.python.failure import Failure

from relaygw.logs import Logger

log = Logger(namespace="relaygw.eventloop")


def tune(reactor):
    """The three changes, on C{reactor} (the one installed)."""
    onMonotonicClock(reactor)
    dispatchDirectly(reactor)
    closeUnwatchable(reactor)


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


#: What C{epoll_ctl} fails with when the kernel has no memory (or watch) left for a descriptor.
_NO_WATCH = frozenset((errno.ENOMEM, errno.ENOSPC))


def closeUnwatchable(reactor):
    """
    When the kernel cannot watch a connection's descriptor (C{epoll_ctl}
    fails with C{ENOMEM}, or C{ENOSPC} past C{max_user_watches}), close
    that connection with one log line, as its peer had gone, instead of
    the traceback Twisted logs from wherever it was asked to read or write
    (a new connection's accept, a reply), which left the connection to
    the garbage collector.  Only TCP connections: anything else (a
    listening port) raises as before.  Any other reactor is left as it
    is; returns whether the change was made.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # (no epoll on this platform)
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    from twisted.internet import tcp

    closing = set()

    def watching(add):
        def watch(selectable):
            try:
                return add(selectable)
            except OSError as e:
                if e.errno not in _NO_WATCH or not isinstance(selectable, tcp.Connection):
                    raise
                error = e
            if selectable not in closing:
                closing.add(selectable)
                log.error("cannot watch the connection from {peer} ({error}): closing it",
                          peer=_peer(selectable), error=errno.errorcode.get(error.errno, error.errno))
                reactor.callLater(0, close, selectable, error)

        return watch

    def close(selectable, error):
        closing.discard(selectable)
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        if selectable.connected:
            selectable.connectionLost(Failure(error))
        elif hasattr(selectable, "failIfNotConnected"):  # (a connection of ours not made yet)
            selectable.failIfNotConnected(error)

    reactor.addReader = watching(reactor.addReader)
    reactor.addWriter = watching(reactor.addWriter)
    return True


def _peer(selectable):
    try:
        address = selectable.getPeer()
        return "[%s]:%d" % (address.host, address.port)
    except Exception:
        return "an unknown peer"
