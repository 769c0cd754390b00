"""
One accept queue per listening address, shared by every worker.

With a C{SO_REUSEPORT} socket per worker the kernel hashes each new
connection to one of them, whether that worker is idle, busy or stuck, so
connections wait in a busy worker's queue while another sits idle.  Instead
the main process passes its listening sockets on to the workers it starts
(L{SharedSockets.forChild}), and every process waits on them with
C{EPOLLEXCLUSIVE} (L{acceptExclusively}): the kernel wakes one process that
is waiting for work, not all of them.  A worker that inherited no socket
for an address binds its own with C{SO_REUSEPORT}, as before.
"""

import json
import os
import select
import socket

#: The environment variable naming a worker's inherited sockets: JSON, {"interface port": fd}.
ENV = "RELAYGW_LISTEN_FDS"

#: The first descriptor number a worker inherits sockets at (0-2 are its standard streams).
FIRST_FD = 3


def _key(interface, port):
    return "%s %d" % (interface, port)


class SharedSockets:
    """
    This process's listening sockets by configured address: the ones it
    inherited (a worker) and the ones it listens on (to pass on).
    """

    def __init__(self, environ=None):
        self._inherited = {}
        self._listening = {}
        value = (os.environ if environ is None else environ).get(ENV)
        if value:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = {}
            if isinstance(parsed, dict):
                self._inherited = {k: fd for k, fd in parsed.items() if isinstance(fd, int) and fd >= FIRST_FD}

    def take(self, interface, port, family):
        """
        The inherited listening socket for this address (a C{socket}, which
        the caller closes once adopted), or None.
        """
        fd = self._inherited.pop(_key(interface, port), None)
        if fd is None:
            return None
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            return None
        try:
            if (sock.family == family and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and port in (0, sock.getsockname()[1])):
                return sock
        except OSError:
            pass
        sock.close()  # not what it claims to be: bind our own instead
        return None

    def listening(self, interface, port, listeningPort):
        """Record the port this process listens on for an address, to pass on."""
        self._listening[_key(interface, port)] = listeningPort

    def forChild(self):
        """
        What a worker about to start inherits: C{(childFDs, environment)},
        the descriptors to add to C{spawnProcess}'s C{childFDs} and the
        variables to add to its environment.
        """
        fds, names = {}, {}
        for key, port in sorted(self._listening.items()):
            if not getattr(port, "connected", False):
                continue  # stopped listening (draining): the worker binds its own, if it starts at all
            child = FIRST_FD + len(fds)
            fds[child] = port.fileno()
            names[key] = child
        return fds, ({ENV: json.dumps(names)} if names else {})

    def closeUnused(self):
        """Close inherited sockets no listener took (the configuration changed since the main process read it)."""
        for fd in self._inherited.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._inherited = {}


def acceptExclusively(reactor, port):
    """
    Have the reactor wait on C{port} with C{EPOLLEXCLUSIVE}, so that a new
    connection wakes one waiting process, not every process sharing the
    socket.  Twisted's epoll reactor registers readers without it, and the
    flag can only be given when a descriptor is added; other reactors are
    left alone.  Returns whether it was done.
    """
    poller = getattr(reactor, "_poller", None)
    flag = getattr(select, "EPOLLEXCLUSIVE", None)
    fd = port.fileno()
    if flag is None or not isinstance(poller, select.epoll) or fd not in getattr(reactor, "_reads", ()):
        return False
    poller.unregister(fd)
    try:
        poller.register(fd, select.EPOLLIN | flag)
    except OSError:  # (a kernel before 4.5)
        poller.register(fd, select.EPOLLIN)
        return False
    return True
