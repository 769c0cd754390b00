"""
Several worker processes sharing each listening port, to use every core.

Every worker binds the listener's address with C{SO_REUSEPORT}, so the
kernel spreads new connections across them, and owns a spool partition
(C{<spool>/w<N>}) with its own queue manager.  Worker 0 is the process
twistd started; it spawns the others, restarts one that dies, and on
shutdown tells them to drain (SIGTERM) and waits for them.
"""

import os
import re
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from relaygw.logs import Logger

log = Logger(namespace="relaygw.workers")


def parseTCP(description):
    """C{tcp:PORT[:interface=X][:backlog=N]} -> (interface, port, backlog); None if not plain TCP."""
    # Colons escaped with a backslash (an IPv6 interface) do not split.
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] != "tcp" or len(parts) < 2:
        return None
    port, interface, backlog = None, "0.0.0.0", 1024
    try:
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            if not eq:
                port = int(key)
            elif key == "port":
                port = int(value)
            elif key == "interface":
                interface = value.replace("\\", "")
            elif key == "backlog":
                backlog = int(value)
            else:
                return None
    except ValueError:
        return None
    return (interface, port, backlog) if port is not None else None


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket sets C{SO_REUSEPORT}."""

    def __init__(self, reactor, interface, port, backlog=1024):
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.backlog = backlog

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            return defer.succeed(self.reactor.adoptStreamPort(sock.fileno(), family, factory))
        except OSError:
            return defer.fail()
        finally:
            sock.close()


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)
        self.supervisor.workerEnded(self.index, reason)


class WorkerSupervisor(Service):
    """Runs workers 1..N-1 as child processes of worker 0."""

    name = "workers"

    def __init__(self, reactor, count, argv, restartDelay=1.0):
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.restartDelay = restartDelay
        self.children = {}

    def startService(self):
        Service.startService(self)
        for i in range(1, self.count):
            self.spawn(i)

    def spawn(self, index):
        proto = _WorkerProtocol(self, index)
        argv = list(self.argv) + ["--worker", str(index)]
        # The worker writes its log lines straight to our stdout and stderr
        # (twistd has replaced sys.stdout with a logging file by now).
        self.children[index] = (proto, self.reactor.spawnProcess(
            proto, argv[0], argv, env=os.environ.copy(), path=os.getcwd(), childFDs={0: "w", 1: 1, 2: 2}))
        log.info("started worker {index} (pid {pid})", index=index, pid=self.children[index][1].pid)

    def workerEnded(self, index, reason):
        self.children.pop(index, None)
        if self.running:
            log.warn("worker {index} exited ({why}); restarting", index=index, why=reason.getErrorMessage())
            self.reactor.callLater(self.restartDelay, lambda: self.running and self.spawn(index))

    def signalWorkers(self, signal):
        """Send C{signal} ("HUP" ...) to every running worker."""
        for index, (proto, transport) in list(self.children.items()):
            try:
                transport.signalProcess(signal)
            except Exception as e:
                log.warn("cannot signal worker {index}: {error}", index=index, error=e)

    def stopService(self):
        Service.stopService(self)
        waiting = []
        for index, (proto, transport) in list(self.children.items()):
            try:
                transport.signalProcess("TERM")
            except Exception:
                pass
            waiting.append(proto.ended)
        return defer.gatherResults(waiting)


def twistdArgv(configPath, logfile=None):
    """
    The command line running relaygw in the foreground under twistd (another
    worker, a test, the bench); with C{logfile}, logging there.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd, "--nodaemon", "--pidfile="] + (["--logfile=" + logfile] if logfile else []) + ["relaygw"]
    if configPath:
        argv += ["--config", os.path.abspath(configPath)]
    return argv
