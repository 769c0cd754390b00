"""
Several worker processes sharing each listening port, to use every core.

Every worker accepts from the listening sockets the main process opened
and passed on (L{relaygw.sharedports}), and owns a spool partition
(C{<spool>/w<N>}) with its own queue manager, locked for its lifetime.
Worker 0 is the process twistd started (the main process); it spawns the
others, restarts one that dies (with back-off), and on shutdown tells them
to drain (SIGTERM) at once, so that all drain in parallel, and waits for
them.  A worker dies with the main process: the kernel sends it
C{PARENT_DEATH_SIGNAL} (C{PR_SET_PDEATHSIG}), and it then stops listening
at once.
"""

import os
import re
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from relaygw import anvil
from relaygw.durable import removeFiles
from relaygw.logs import Logger
from relaygw.sharedports import ENV, SharedSockets, acceptExclusively
from relaygw.spool import PartitionLock, PartitionLocked, UnsafeSpool, partitionDirectory, partitions

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
    """
    A TCP server endpoint for one of several workers: the listening socket
    the main process passed on for this address (L{relaygw.sharedports}),
    else one of its own with C{SO_REUSEPORT}.
    """

    def __init__(self, reactor, interface, port, backlog=1024, shared=None):
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.backlog = backlog
        self.shared = shared if shared is not None else SharedSockets({})

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = self.shared.take(self.interface, self.port, family)
        try:
            if sock is None:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self.interface, self.port))
                sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError:
            return defer.fail()
        finally:
            if sock is not None:
                sock.close()
        acceptExclusively(self.reactor, port)
        self.shared.listening(self.interface, self.port, port)
        return defer.succeed(port)


#: Descriptors the main process holds for each worker it starts: the write
#: end of the worker's stdin, and its end of the worker's client-count channel.
DESCRIPTORS_PER_WORKER = 2

#: The environment variable naming the main process to a worker it started.
PARENT_ENV = "RELAYGW_MAIN_PID"

_PR_SET_PDEATHSIG = 1

#: What the kernel sends a worker when the main process dies: a signal of
#: its own, not the SIGTERM of a drain, because when the main thread dies
#: first (a kill -9 while its other threads are busy) the worker gets it
#: while C{getppid()} still names the dying process.
PARENT_DEATH_SIGNAL = signal.SIGUSR2

#: Set by the parent-death signal's handler.
_orphaned = False


def parentPid():
    """In a worker: the pid of the main process that started it (C{None} in the main process)."""
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def parentGone():
    """Whether this is a worker whose main process has died."""
    parent = parentPid()
    return parent is not None and (_orphaned or os.getppid() != parent)


def _parentDied(signum, frame):
    """
    The main process has died: this worker drains, as on SIGTERM, but stops
    listening at once.  (The signal comes again when the last of the main
    process's threads has gone.)
    """
    global _orphaned
    if not _orphaned:
        _orphaned = True
        os.kill(os.getpid(), signal.SIGTERM)


def dieWithParent():
    """
    In a worker: have the kernel send L{PARENT_DEATH_SIGNAL} when the main
    process dies (C{PR_SET_PDEATHSIG}), so no worker goes on accepting mail
    on its own.  Returns False (and the caller exits) when the main process
    is already gone; where C{prctl} is missing, L{ParentWatch} still notices.
    """
    try:
        import ctypes

        signal.signal(PARENT_DEATH_SIGNAL, _parentDied)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return not parentGone()


#: The environment variable listing, for the workers the main process
#: starts, the CPUs it could run on before it kept itself to one.
CPUS_ENV = "RELAYGW_CPUS"


#: The CPUs the workers share, once this worker has kept to one of them.
_shared = None


def sharedCPUs():
    """
    The CPUs every worker may run on, once L{keepToOneCPU} has kept this
    one to one of them (a frozenset), else C{None}: where the worker's disk
    thread runs (L{relaygw.durable.Committer}).
    """
    return _shared


def keepToOneCPU(index, workers, listed=True):
    """
    Keep worker C{index} of C{workers} (every thread of this process, and
    those it starts later but for its disk thread, which L{sharedCPUs}
    gives) on one CPU: C{listed[index]}, modulo their number, when
    C{listed} is a list, else the C{index}-th of those the main process
    could run on, but only when the workers are at least as many as those
    CPUs.  Several workers each left to the kernel are moved between
    cores, and wake on one whose caches another process has taken; kept
    apart they relay more on the same cores (7% more at 10 sessions, a
    quarter more with another process keeping one core busy:
    bench/RESULTS.md, levers).  Fewer workers than CPUs means the gateway
    shares the host, and the first CPUs of a wide set (a CPU quota without
    a cpuset) may be where everything else runs: those are left to the
    kernel.  Returns the CPU, or C{None} (and says why) where none is kept.
    """
    try:
        if listed is True:
            given = os.environ.get(CPUS_ENV, "")
            listed = [int(c) for c in given.split(",")] if given else sorted(os.sched_getaffinity(0))
            os.environ[CPUS_ENV] = ",".join(map(str, listed))  # (for the workers this one starts)
            if workers < len(listed):
                if index == 0:
                    log.info("workers left to run on any CPU: {workers} workers for {cpus} CPUs (cpu_affinity "
                             "lists the CPUs to keep them to)", workers=workers, cpus=len(listed))
                return None
        cpu = listed[index % len(listed)]
        for task in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(task), {cpu})
    except (AttributeError, OSError, ValueError) as e:
        log.warn("worker {index} left to run on any CPU: {error}", index=index, error=e)
        return None
    global _shared
    _shared = frozenset(listed)
    return cpu


class ParentWatch(Service):
    """
    In a worker: checks every C{interval} seconds that the main process is
    still there, and stops this one when it is not (a fallback for
    platforms without C{PR_SET_PDEATHSIG}).
    """

    name = "parent-watch"

    def __init__(self, reactor, interval=1.0):
        self.reactor = reactor
        self.interval = interval
        self._call = None

    def startService(self):
        Service.startService(self)
        self._call = self.reactor.callLater(self.interval, self._check)

    def _check(self):
        self._call = None
        if parentGone():
            log.warn("the main process has gone; this worker stops")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.running:
            self._call = self.reactor.callLater(self.interval, self._check)

    def stopService(self):
        Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.ended = defer.Deferred()
        self.started = supervisor.reactor.seconds()

    def processEnded(self, reason):
        self.ended.callback(None)
        self.supervisor.workerEnded(self, reason)


class WorkerSupervisor(Service):
    """
    Runs workers 1..N-1 as child processes of worker 0, and restarts one
    that dies: after C{restartDelay}, then after a delay that doubles (up
    to C{maxRestartDelay}) while it keeps dying within C{stableAfter}
    seconds of its start.
    """

    name = "workers"

    def __init__(self, reactor, count, argv, restartDelay=1.0, maxRestartDelay=30.0, stableAfter=10.0):
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.restartDelay = restartDelay
        self.maxRestartDelay = maxRestartDelay
        self.stableAfter = stableAfter
        self.children = {}
        #: The main process's L{SharedSockets}, passed on to each worker it starts.
        self.shared = None
        self.delays = {}
        self.restarts = {}
        self._stopping = None
        #: What each worker it starts finds in its environment besides (L{STARTED_ENV}).
        self.env = {}
        #: The L{Anvil} each worker it starts gets a channel to.
        self.anvil = None

    def startService(self):
        Service.startService(self)
        for i in range(1, self.count):
            self.spawn(i)

    def spawn(self, index):
        self.restarts.pop(index, None)
        proto = _WorkerProtocol(self, index)
        argv = list(self.argv) + ["--worker", str(index)]
        if os.path.exists(_SH):
            # SIGHUP ignored from the start (kept across exec) until the
            # worker's own handler is in place: its default action would
            # kill a worker starting up when logrotate signals the main
            # process.  What such a SIGHUP meant, the worker catches up on.
            argv = [_SH, "-c", 'trap "" HUP; exec "$@"', "relaygw-worker"] + argv
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())}, **self.env)
        env.pop(ENV, None)
        # The worker writes its log lines straight to our stdout and stderr
        # (twistd has replaced sys.stdout with a logging file by now), and
        # accepts connections from our listening sockets.
        childFDs = {0: "w", 1: 1, 2: 2}
        if self.shared is not None:
            fds, more = self.shared.forChild()
            childFDs.update(fds)
            env.update(more)
        channel = None
        if self.anvil is not None:
            channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            childFDs[max(childFDs) + 1] = channel[1].fileno()
            env[anvil.ENV] = str(max(childFDs))
        try:
            self.children[index] = (proto, self.reactor.spawnProcess(
                proto, argv[0], argv, env=env, path=os.getcwd(), childFDs=childFDs))
            if channel is not None:
                self.anvil.attach(self.reactor, channel[0])
        finally:
            for end in channel or ():
                end.close()
        log.info("started worker {index} (pid {pid})", index=index, pid=self.children[index][1].pid)

    def workerEnded(self, proto, reason):
        index = proto.index
        if self.children.get(index, (None,))[0] is proto:
            del self.children[index]
        if not self.running:
            return
        if self.reactor.seconds() - proto.started >= self.stableAfter:
            delay = self.delays[index] = self.restartDelay
        else:
            delay = self._longerDelay(index, self.restartDelay / 2)
        log.warn("worker {index} exited ({why}); restarting it in {delay}s", index=index,
                 why=reason.getErrorMessage(), delay=delay)
        self.restarts[index] = self.reactor.callLater(delay, self._restart, index)

    def _longerDelay(self, index, first):
        """Worker C{index}'s restart delay doubled (from C{first}), up to C{maxRestartDelay}."""
        delay = self.delays[index] = min(self.maxRestartDelay, self.delays.get(index, first) * 2)
        return delay

    def _restart(self, index):
        """Start worker C{index} again; a start that fails (no descriptor, no process) is tried again later."""
        if not self.running:
            return
        try:
            self.spawn(index)
        except Exception as e:
            delay = self._longerDelay(index, self.restartDelay)
            log.error("cannot start worker {index}: {error}; trying again in {delay}s", index=index, error=e,
                      delay=delay)
            self.restarts[index] = self.reactor.callLater(delay, self._restart, index)

    def signalWorkers(self, signal):
        """Send C{signal} ("HUP" ...) to every running worker."""
        for index, (proto, transport) in list(self.children.items()):
            try:
                transport.signalProcess(signal)
            except Exception as e:
                log.warn("cannot signal worker {index}: {error}", index=index, error=e)

    def stopService(self, timeout=None):
        """
        Tell every worker to drain (SIGTERM) and wait until they have gone;
        one still there after C{timeout} seconds is killed.
        """
        if self._stopping is not None:
            return self._stopping
        Service.stopService(self)
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        waiting = []
        for index, (proto, transport) in list(self.children.items()):
            try:
                transport.signalProcess("TERM")
            except Exception:
                pass
            waiting.append(proto.ended)
        done = defer.gatherResults(waiting)
        if timeout is not None and waiting:
            killer = self.reactor.callLater(timeout, self._kill)
            done.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
        self._stopping = done
        return done

    def _kill(self):
        for index, (proto, transport) in list(self.children.items()):
            log.warn("worker {index} did not stop in time; killing it", index=index)
            try:
                transport.signalProcess("KILL")
            except Exception:
                pass


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


#: The worker role's lines keep the namespace operators know them by.
_roleLog = Logger(namespace="relaygw.service")


class WorkerRole:
    """
    This process's place among the workers (C{[process] workers}): the
    spool partition it owns, locked for its lifetime (worker 0 of several
    also locks the spool directory itself, where it adopts the messages
    stranded in a layout no longer used); worker 0's supervisor of the
    others; the other workers' watch on the main process; and where each
    worker's metrics snapshot goes for worker 0's C{/metrics}.

    @ivar spoolDirectory: this process's spool (partition) directory.
    @ivar supervisor: the L{WorkerSupervisor} (worker 0 of several), or None.
    """

    def __init__(self, config, reactor, worker=0, workerArgv=None, configText=None):
        self.base = config.spool.directory
        self.configText = configText
        self.worker = worker
        self.workers = config.process.workers
        self.spoolDirectory = partitionDirectory(self.base, worker) if self.workers > 1 else self.base
        self.supervisor = None
        if self.workers > 1 and worker == 0 and workerArgv:
            self.supervisor = WorkerSupervisor(reactor, self.workers, workerArgv)
        self.parentWatch = ParentWatch(reactor) if worker > 0 and parentPid() is not None else None
        self._appliedReload = _startedWithReload
        self._locks = []

    def share(self, total):
        """
        This worker's part of a limit the config sets for the whole gateway
        (C{destination_concurrency}): the parts of all workers add up to
        C{total}, each at least 1, so a C{total} below the number of
        workers is exceeded (worker 0 says so).
        """
        if total < self.workers and self.worker == 0:
            _roleLog.warn("destination_concurrency = {total} is below workers = {workers}: each worker opens at "
                          "least one connection to a destination, so the gateway may hold {workers} at once",
                          total=total, workers=self.workers)
        return max(1, total // self.workers + (self.worker < total % self.workers))

    def clientCounts(self, reactor):
        """
        Where this process counts clients per address (L{relaygw.anvil}):
        worker 0 of several keeps the counts and hands each worker it starts
        a channel to them; another worker asks over that channel.  C{None}
        for a single process (each listener counts its own).
        """
        if self.workers == 1:
            return None
        if self.worker > 0:
            return anvil.AnvilClient.fromEnvironment(reactor)
        counts = anvil.Anvil(reactor)
        if self.supervisor is not None:
            self.supervisor.anvil = counts
        return counts

    def services(self):
        """The services this role runs: the supervisor, or the watch on the main process."""
        return [svc for svc in (self.supervisor, self.parentWatch) if svc is not None]

    def acquire(self, spool):
        """
        Take exclusive ownership of C{spool}, this process's partition (and,
        for worker 0 of several, of the spool directory itself); raises
        L{PartitionLocked} when another live process has it, L{UnsafeSpool}
        when its layout is not safe to use.
        """
        if spool.lock is not None:
            for lock in self._locks + [spool.lock]:
                lock.claim()  # (a daemon has forked since)
            return
        if self.workers > 1 and self.worker == 0:
            self._locks.append(PartitionLock(self.base))
            # The last run's reloads are not this one's.  The workers run on
            # the text this process started on (also one started again while
            # the file has been edited but not reloaded).
            removeFiles([_reloadedPath(self.base)])
            # Nor are the metrics snapshots the last run's workers left: read
            # before this run's workers replace them, their counts would be
            # carried on in /metrics as those of restarted workers.
            for path in self.peerSnapshots():
                try:
                    removeFiles([path])
                except OSError as e:  # (a directory there: its worker says it cannot write its own)
                    _roleLog.warn("cannot remove {path}: {error}", path=path, error=e)
            if self.supervisor is not None and self.configText is not None \
                    and _replaceWhole(_startedPath(self.base), self.configText.encode("utf-8")):
                self.supervisor.env[STARTED_ENV] = _startedPath(self.base)
        try:
            if self.workers > 1 and os.path.islink(spool.directory):
                # (The spool directory the config names may be a link; a partition in it may not.)
                raise UnsafeSpool(spool.directory, "a symbolic link, not a directory")
            spool.acquire()
        except (PartitionLocked, UnsafeSpool):
            self._releaseLocks()
            raise

    def release(self, spool):
        """Give up the spool's locks (last, at the end of a drain)."""
        self._releaseLocks()
        spool.releaseLock()

    def _releaseLocks(self):
        for lock in self._locks:
            lock.release()
        self._locks = []

    def adoptStranded(self, spool, quiet=False):
        """
        Worker 0 takes over into C{spool} the messages left in a spool
        layout the current C{[process] workers} no longer uses: the
        partitions of workers that no longer exist, the unpartitioned spool
        after a switch to several workers, and every partition after a
        switch back to one process.  Returns how many it moved, and whether
        a partition was left because another process still holds it (a
        worker of an earlier run, still draining): try again later.
        """
        moved, held = 0, False
        if self.worker != 0:
            return moved, held
        base = self.base
        sources = [path for index, path in partitions(base).items() if self.workers == 1 or index >= self.workers]
        if self.workers > 1:
            sources.append(base)
        for source in sources:
            if source != base:  # (the base directory is ours already)
                try:
                    lock = PartitionLock(source)
                except PartitionLocked as e:
                    held = True
                    if not quiet:
                        _roleLog.warn("not adopting the messages in {source} yet: {error}", source=source,
                                      error=str(e))
                    continue
                except UnsafeSpool as e:
                    _roleLog.warn("not adopting the messages in {source}: {error}", source=source, error=str(e))
                    continue
            else:
                lock = None
            try:
                n = spool.adopt(source)
            finally:
                if lock is not None:
                    lock.release()
            if n:
                moved += n
                _roleLog.info("adopted {n} queued messages from {source}", n=n, source=source)
        return moved, held

    def shareConfig(self, text):
        """
        Worker 0: the config text it is about to apply on SIGHUP, for the
        other workers; returns whether it could (never raises).
        """
        return _replaceWhole(_reloadedPath(self.base), text.encode("utf-8"))

    def sharedConfig(self):
        """The config text worker 0 last applied on SIGHUP since it started, or C{None}."""
        return _readShared(_reloadedPath(self.base))

    def newReload(self):
        """
        In a worker: the config text worker 0 has applied on SIGHUP since
        this worker last applied one or read its config, or C{None} (then
        nothing changes: worker 0 refused the file, or nothing was
        reloaded).  Also once the worker's SIGHUP handler is in place, for
        a SIGHUP that came while it started (and was ignored).  Each text
        worker 0 applies is a new file, also the same text again.
        """
        stamp = _stamp(_reloadedPath(self.base))
        if stamp is None or stamp == self._appliedReload:
            return None
        self._appliedReload = stamp
        return self.sharedConfig()

    def snapshotPath(self, worker):
        """Where worker C{worker} writes its metrics for worker 0."""
        return os.path.join(partitionDirectory(self.base, worker), "metrics.prom")

    def peerSnapshots(self):
        """The other workers' snapshots, for worker 0's C{/metrics}."""
        return [self.snapshotPath(i) for i in range(1, self.workers)]

    #: Whether the last snapshot could not be written (said once, and once when one can be again).
    _snapshotFailing = False

    def writeSnapshot(self, metrics):
        """This worker's metrics, for worker 0's /metrics (replaced whole; never raises)."""
        path = self.snapshotPath(self.worker)
        written = _replaceWhole(path, metrics.render(), quiet=self._snapshotFailing)
        if written and self._snapshotFailing:
            _roleLog.info("writing {path} again", path=path)
        self._snapshotFailing = not written


def _replaceWhole(path, data, quiet=False):
    """
    Write C{data} to C{path} whole (a new file renamed over it) for another
    process of this user to read, and no one else (a config's text can hold
    a smarthost's password); never raises.  Returns whether it was written.
    """
    try:
        removeFiles([path + ".tmp"])  # (one left by an older version may have other permissions)
        with open(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(data)
        os.rename(path + ".tmp", path)
        return True
    except OSError as e:
        if not quiet:
            _roleLog.warn("cannot write {path}: {error}", path=path, error=e)
        try:
            removeFiles([path + ".tmp"])  # (an empty one, on a full disk)
        except OSError:
            pass
        return False


def _readShared(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


#: Names, for the workers the main process starts, the config text it started on.
STARTED_ENV = "RELAYGW_STARTED_CONFIG"

_SH = "/bin/sh"

#: In a worker: which file of reloaded text it started with (L{workerConfig}, L{_stamp}).
_startedWithReload = None


def _stamp(path):
    """Which file C{path} is now (each write of a shared text is a new one), or C{None}."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _startedPath(base):
    return os.path.join(base, "started.toml")


def _reloadedPath(base):
    return os.path.join(base, "reload.toml")


def workerConfig(path):
    """
    In a worker the main process started: the config it runs on, the text
    the main process started on with what that process has applied on
    SIGHUP since (keys that need a restart as they started), C{path} the
    config file's (for relative paths and messages).  C{None} in any other
    process, or when the main process could not share its text.
    """
    started = os.environ.get(STARTED_ENV)
    text = _readShared(started) if started else None
    if text is None:
        return None
    from relaygw.config import parse
    from relaygw.reload import applicable

    global _startedWithReload
    config = parse(text, path, environment=True)
    _startedWithReload = _stamp(_reloadedPath(config.spool.directory))  # (before the read: a newer one applies later)
    reloaded = _readShared(_reloadedPath(config.spool.directory))
    if reloaded is None:
        return config
    return applicable(config, parse(reloaded, path, environment=True))
