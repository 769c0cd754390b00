"""
Builds the gateway: a C{MultiService} of the queue manager, one listening
service per listener (L{relaygw.listeners}) and, when configured, the admin
endpoint; its start (the spool locked and recovered first) and its drain.
"""

import os
import time

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import AbstractDatagramProtocol, Factory

from relaygw import sdnotify, trust
from relaygw.config import ConfigError, drainDelay
from relaygw.listeners import Listeners, NullMetrics
from relaygw.logs import Logger
from relaygw.relay.maildir import MaildirNextHop
from relaygw.relay.queue import QueueManager
from relaygw.relay.router import Router, ownHostnames
from relaygw.ringcommit import committer
from relaygw.spool import Spool
from relaygw.workers import WorkerRole, parentGone, sharedCPUs, twistdArgv

log = Logger(namespace="relaygw.service")


class StartFailed(SystemExit, Exception):
    """
    Start cannot go on, for C{why} (already logged): the process exits 1
    without a traceback, as for C{SystemExit}.  Being an C{Exception} too,
    it is what twistd reports to the launcher waiting on a daemon's start
    (which otherwise waits for ever) and what makes it remove the pid file.
    """

    def __init__(self, why):
        SystemExit.__init__(self, 1)
        self.why = why

    def __str__(self):
        return self.why


class Delivery:
    """
    The delivering side of the gateway: the default Maildir next hop, the
    router and the queue manager, and what a reload changes in them.
    """

    def __init__(self, config, reactor, spool, committer, share=None):
        self.reactor = reactor
        self.committer = committer
        self.share = share
        relay = config.relay
        from relaygw.relay import clientwire

        clientwire.TRACE = config.log.level == "debug"
        self.maildir = self._maildir(config)
        self.router = Router(config, reactor, self.maildir, share, self._contended)
        self.queue = QueueManager(spool, self.router, reactor, concurrency=relay.concurrency,
                                  retryMin=relay.retry_min, retryMax=relay.retry_max,
                                  lifetime=relay.max_lifetime, bounceLifetime=relay.bounce_lifetime,
                                  hostname=relay.helo_name or config.listeners[0].hostname,
                                  deferAll=relay.defer_all)

    def _maildir(self, config):
        """
        The Maildir next hop of C{config}, its directories made.  One the
        file system will not make (full, read-only, or not one that takes
        directories, though the start checks passed) is a L{ConfigError}
        line naming the key, at start as on a reload, not a traceback.
        """
        try:
            return MaildirNextHop(config.relay.maildir, self.committer, self.reactor)
        except OSError as e:
            raise ConfigError("%s: relay.maildir: cannot create %s: %s (expected a directory the gateway may write)"
                              % (os.path.basename(config.path), e.filename or config.relay.maildir,
                                 e.strerror or e))

    def _contended(self):
        """Whether messages wait for a delivery slot (a next hop then keeps to its share of them)."""
        return self.queue.slotsWanted()

    def prepare(self, old, config):
        """The queue manager's settings and router for C{config}, reloaded over C{old} (nothing changes yet)."""
        relay = config.relay
        router = self.router
        before = (old.relay, old.routes, old.listeners[0].hostname, ownHostnames(old))
        if before != (relay, config.routes, config.listeners[0].hostname, ownHostnames(config)):
            maildir = self.maildir
            if relay.maildir != old.relay.maildir:
                maildir = self._maildir(config)
            router = Router(config, self.reactor, maildir, self.share, self._contended, replaces=self.router)
        return {"router": router, "concurrency": relay.concurrency, "retryMin": relay.retry_min,
                "retryMax": relay.retry_max, "lifetime": relay.max_lifetime,
                "bounceLifetime": relay.bounce_lifetime, "deferAll": relay.defer_all,
                "hostname": relay.helo_name or config.listeners[0].hostname, "trace": config.log.level == "debug"}

    def reloadCertificates(self, failures=None):
        """Re-read the next hops' CA bundles (L{Router.reloadCertificates})."""
        self.router.reloadCertificates(failures)

    def watchCertificates(self):
        self.router.watchCertificates()

    def apply(self, settings):
        """Swap in L{prepare}'s result: new deliveries use it; the old router's idle connections close."""
        from relaygw.relay import clientwire

        settings = dict(settings)
        clientwire.TRACE = settings.pop("trace")
        old, self.router = self.router, settings["router"]
        if old is not self.router:
            self.maildir = self.router.default.fallback
            old.closeIdle()
        self.queue.reconfigure(**settings)


class GatewayService(MultiService):
    """
    The whole gateway; holds the pieces tests and the admin endpoint need:
    the L{Spool}, the L{Delivery} side and its queue manager, the
    L{Listeners} and this process's L{WorkerRole}.
    """

    installSignals = False
    #: Where the log goes once twistd hands us the application (None: standard output).
    logFile = None

    def __init__(self, config, reactor, worker=0, workerArgv=None, configPath=None, configText=None):
        MultiService.__init__(self)
        # No "Starting factory ..." / "Stopping factory ..." line for every
        # outbound connection (the mail log says what happened), nor a
        # "Starting protocol ..." / "Stopping protocol ..." pair for every
        # DNS query of an MX lookup.
        Factory.noisy = False
        AbstractDatagramProtocol.noisy = False
        self.config = config
        self.configPath = configPath
        self.reactor = reactor
        self.worker = worker
        self.role = WorkerRole(config, reactor, worker, workerArgv, configText)
        self.supervisor = self.role.supervisor
        self.committer = committer(reactor, config.spool.fsync, config.spool.io_uring, cpus=sharedCPUs())
        self.spool = Spool(self.role.spoolDirectory, self.committer, config.spool.min_free_space)
        self.delivery = Delivery(config, reactor, self.spool, self.committer, self.role.share)
        self.queue = self.delivery.queue
        self.queue.setServiceParent(self)
        TimerService(5, self._watchCertificates).setServiceParent(self)
        for svc in self.role.services():
            svc.setServiceParent(self)
        self.stopping = False
        self.metrics = NullMetrics()
        if config.admin.endpoint:
            from relaygw.metrics import Metrics

            self.metrics = Metrics()
            self.metrics.setSpoolProbe(self.spoolProbe)
            self.metrics.setQueueProbe(self.queueProbe)
        if config.admin.endpoint and worker == 0:
            from relaygw.admin import makeAdminSite

            # The other workers' counts reach /metrics through the
            # snapshots they write every second.
            self.metrics.peers = self.role.peerSnapshots()
            adminService = StreamServerEndpointService(serverFromString(reactor, config.admin.endpoint),
                                                       makeAdminSite(self.metrics, self.health))
            adminService._raiseSynchronously = True
            adminService.setName("admin")
            adminService.setServiceParent(self)
        elif config.admin.endpoint:
            TimerService(1, self.role.writeSnapshot, self.metrics).setServiceParent(self)
        self.queue.metrics = self.metrics
        self.listeners = Listeners(config, reactor, self, self.spool, self.queue.enqueue, self.metrics,
                                   self.role.workers, self.role.clientCounts(reactor))
        self.factories = self.listeners.factories
        self.listeningPorts = self.listeners.listeningPorts
        if self.supervisor is not None:
            self.supervisor.shared = self.listeners.shared

    def reload(self):
        """
        SIGHUP: open the log file again, reload certificates, then the
        config file (L{reloadConfig}: whole or not at all).  Worker 0 passes
        the signal on to the other workers, also when it refused the config
        (each opens its log file again).  They apply the text worker 0 last
        applied, not the file as they find it: a file replaced again in
        between (by an invalid one, say) would leave the workers on
        different configs.
        """
        from relaygw import logs

        logs.reopen()
        if not self.configPath:
            self.listeners.reloadCertificates()
            self.delivery.reloadCertificates()
        else:
            from relaygw.reload import reloadConfig

            # A certificate that fails to load fails the config's checks too:
            # worker 0's refusal names it, once for the gateway.
            failures = []
            self.listeners.reloadCertificates(failures)
            self.delivery.reloadCertificates(failures)
            if self.worker == 0:
                if reloadConfig(self, self.configPath,
                                share=self.role.shareConfig if self.supervisor is not None else None) is not None:
                    for report in failures:
                        report()
            else:
                self._followMainProcess()
        if self.supervisor is not None:
            self.supervisor.signalWorkers("HUP")

    def _followMainProcess(self):
        """A worker: apply the text worker 0 has applied since this worker last did (none if it refused a file)."""
        from relaygw.reload import reloadConfig

        shared = self.role.newReload()
        if shared is not None:
            reloadConfig(self, self.configPath, shared)

    def _watchCertificates(self):
        self.listeners.watchCertificates()
        self.delivery.watchCertificates()

    @defer.inlineCallbacks
    def stopService(self):
        """
        Graceful drain, in order:

          1. C{/healthz} says 503 at once, and the other workers are told
             to drain (all drain in parallel);
          2. the listeners keep accepting for C{drain_delay} seconds, while
             a load balancer takes the instance out of its rotation (no
             delay in a worker whose main process has died);
          3. they stop listening: what the kernel has already queued is
             accepted and told 421 4.3.2 (never reset), later connection
             attempts are refused, and idle sessions get 421 4.3.2;
          4. sessions in a transaction may finish until C{drain_timeout};
             the rest get 421 4.3.2;
          5. the queue manager stops (deliveries in flight get a few more
             seconds, while closed sessions finish their lingering close,
             then are cut short, their messages staying queued as they
             were), then everything else.

        The spool stays intact and its lock is released last.  The whole
        drain takes at most C{drain_delay} + C{drain_timeout} + 5 seconds.
        """
        log.info("draining")
        if self._adoptTimer is not None and self._adoptTimer.active():
            self._adoptTimer.cancel()
        if self.installSignals and self.worker == 0:
            sdnotify.notify("STOPPING=1")
        self.stopping = True
        delay = max([drainDelay(self.config, l) for l in self.config.listeners] or [0])
        timeout = max([l.drain_timeout for l in self.config.listeners] or [0])
        children = None
        if self.supervisor is not None and self.supervisor.running:
            # (a worker's own drain takes at most its delays, the queue's grace and the cut's)
            children = self.supervisor.stopService(
                timeout=delay + timeout + self.QUEUE_GRACE + 2 * self.queue.cutGrace + 1)
        if parentGone():
            log.warn("the main process has gone: this worker stops listening at once")
            delay = 0
        if delay:
            log.info("still accepting for {delay}s (drain_delay)", delay=delay)
            yield task.deferLater(self.reactor, delay, lambda: None)
        # A worker whose main process lives leaves the shared sockets to it:
        # the main process drains too (or restarts the worker).
        yield self.listeners.stopAccepting(refuseNew=self.worker == 0 or parentGone())
        self.listeners.drainSessions()
        deadline = self.reactor.seconds() + timeout
        while self.listeners.sessionsOpen and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        self.listeners.shutDownSessions()
        self.queue.stopTimeout = min(self.queue.stopTimeout, self.QUEUE_GRACE)
        queueStopped = defer.maybeDeferred(self.queue.stopService)
        # Meanwhile, closed sessions whose peer is still taking the last
        # reply (a lingering close ends within a few seconds), and those
        # whose message's commit was under way (its reply first).
        lingering = self.reactor.seconds() + self.QUEUE_GRACE
        while (self.listeners.sessionsClosing or self.listeners.sessionsOpen) and self.reactor.seconds() < lingering:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        yield queueStopped
        if children is not None:
            yield children
        Service.stopService(self)
        yield defer.gatherResults([defer.maybeDeferred(svc.stopService) for svc in reversed(list(self))
                                   if svc.running])
        self.role.release(self.spool)
        self.committer.stop()
        log.info("stopped; spool intact")

    #: Seconds the queue manager's deliveries in flight get after the sessions' drain.
    QUEUE_GRACE = 3.0

    def spoolProbe(self):
        """(depth, age of the oldest message in seconds, free octets), for /metrics."""
        depth, age = self.spool.oldestAge(time.time())
        try:
            free = self.spool.freeSpace()
        except OSError:
            free = 0
        return depth, age, free

    def queueProbe(self):
        """
        This worker's messages by state, for /metrics: what relaygw-queue
        list's summary counts, from what the spool and the queue manager
        keep as messages come and go (no scan of a large queue at each scrape).
        """
        depth = self.spool.depth()
        held = self.spool.heldCount()
        deferred = len(self.queue.retries.waiting())
        return {"active": max(0, depth - held - deferred), "deferred": deferred, "held": held,
                "corrupt": self.spool.corruptCount()}

    def health(self):
        """For /healthz: (ok, reason)."""
        if self.stopping or self.listeners.draining:
            return False, "draining"
        if not self.spool.writable():
            return False, "spool not writable"
        try:
            free = self.spool.freeSpace()
        except OSError as e:
            return False, "spool file system unreadable: %s" % (e.strerror,)
        if not self.spool.hasRoom():
            # Judged as MAIL judges it: the spent files kept for reuse give
            # their room back first, rather than keep the gateway unhealthy
            # (and so without the MAIL that would have given it back).
            try:
                files = self.spool.freeFiles()
            except OSError:
                files = None
            return False, "spool low on space: %d bytes free%s, min_free_space %d" % (
                free, ", no inode free" if files == 0 else "", self.spool.minFree)
        failed = self.spool.recentStorageError(self.STORAGE_ERROR_SECONDS)
        if failed is not None:
            return False, "spool write failed %ds ago: %s" % (failed[0], failed[1])
        return True, "ok"

    #: How long /healthz reports a failed spool write.
    STORAGE_ERROR_SECONDS = 30

    def setServiceParent(self, parent):
        # twistd hands us the Application before it starts logging: our
        # observer (text or JSON lines, filtered by level) becomes the
        # application's log observer.
        if hasattr(parent, "setComponent"):
            import sys

            from relaygw import logs

            logs.install(parent, self.logFile or sys.stdout, self.config.log.format, self.config.log.level)
        MultiService.setServiceParent(self, parent)

    def privilegedStartService(self):
        """
        Bind the listening ports (before twistd drops privileges).  A port
        that can't be bound (in use, no permission for port 25) ends start
        with one line naming the key, like the config check, not a traceback.
        """
        keys = {"listener:" + l.name: "listener[%d].endpoint" % i for i, l in enumerate(self.config.listeners)}
        keys["admin"] = "admin.endpoint"
        for svc in self:
            try:
                svc.privilegedStartService()
            except (CannotListenError, OSError) as e:
                why = e.socketError if isinstance(e, CannotListenError) else e
                fields = dict(file=os.path.basename(self.configPath or "default.toml"),
                              key=keys.get(svc.name, svc.name), why=getattr(why, "strerror", None) or why)
                text = "{file}: {key}: cannot listen: {why} (expected a free port this user may bind)"
                log.error(text, **fields)
                raise StartFailed(text.format(**fields))
        if self.listeners.shared is not None:
            self.listeners.shared.closeUnused()

    def acquireSpool(self):
        """
        Take exclusive ownership of this process's spool partition
        (L{WorkerRole.acquire}); raises L{PartitionLocked} when another
        live process has it, L{UnsafeSpool} when an area of its layout is
        a symbolic link.
        """
        self.role.acquire(self.spool)

    #: Seconds between tries at a partition another process held at start.
    ADOPT_RETRY = 30.0
    _adoptTimer = None

    def _adoptLater(self):
        """
        A partition to adopt was held at start (a worker of an earlier run,
        still draining its sessions): tried again until it is free, and
        what moves is delivered at once.
        """
        def again():
            self._adoptTimer = None
            moved, held = self.role.adoptStranded(self.spool, quiet=True)
            if moved:
                self.queue.flush()
            if held:
                self._adoptLater()

        self._adoptTimer = self.reactor.callLater(self.ADOPT_RETRY, again)

    def startService(self):
        # The spool is locked and opened (and what was never acknowledged
        # discarded) before any listener accepts a connection.
        self.acquireSpool()
        _, held = self.role.adoptStranded(self.spool)
        if held:
            self._adoptLater()
        try:
            self.queue.recovered = self.spool.open()
        except OSError as e:  # (the disk failing, or gone read-only): one line, not a traceback
            text = "cannot open the spool {directory}: {why}"
            log.error(text, directory=self.spool.directory, why=e)
            raise StartFailed(text.format(directory=self.spool.directory, why=e))
        if self.queue.recovered:
            log.info("recovered {n} queued messages", n=len(self.queue.recovered))
        MultiService.startService(self)
        if self.installSignals:
            import signal

            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            if self.worker > 0 and self.configPath:
                self._followMainProcess()  # (a SIGHUP while this worker started was ignored)
            self.reactor.callWhenRunning(self._drainOnce)  # (after the reactor's own handlers are in place)
            if self.worker == 0:
                # Every listener is bound; once the reactor runs (its signal
                # handlers in place, so a stop drains), tell systemd.
                self.reactor.callWhenRunning(sdnotify.notify, "READY=1\nSTATUS=accepting mail")


    _stopSignalled = False

    def _drainOnce(self):
        """
        The reactor's SIGTERM and SIGINT handlers (which start the drain)
        for the first stop signal only: another (an impatient operator,
        C{pkill} reaching the workers the main process also tells to drain,
        a worker's watch on a main process gone meanwhile) only says so,
        where the reactor's would stop it again (a critical traceback).
        """
        import signal

        def once(handler):
            def handle(number, frame):
                if self._stopSignalled or self.stopping:
                    self.reactor.callFromThread(log.info, "received {signal} while draining; the drain goes on",
                                                signal=signal.Signals(number).name)
                    return
                self._stopSignalled = True
                handler(number, frame)

            return handle

        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, once(handler))


def makeService(config, reactor=None, worker=0, configPath=None, logFile=None, configText=None):
    """
    The gateway's service tree for a validated config.  C{logFile}: a
    file opened for appending, or C{None} for standard output; the other
    workers log to the same file.  C{configText}: the text C{config} was
    read from, which the other workers then run on.
    """
    if reactor is None:
        from twisted.internet import reactor
    for l in config.listeners:
        if (l.always_allow or l.extensions) and not l.trusted_peers and not _boundLocally(l.endpoint):
            log.warn("listener {name}: {what} enabled on a public address without trusted_peers",
                     name=l.name, what="always_allow" if l.always_allow else "trusted verbs")
    service = GatewayService(config, reactor, worker, twistdArgv(configPath, getattr(logFile, "name", None)),
                             configPath, configText)
    service.logFile = logFile
    return service


def _boundLocally(endpoint):
    """Whether a server endpoint string binds only loopback or private addresses."""
    for part in endpoint.split(":"):
        if part.startswith("interface="):
            return trust.isLocalAddress(part[len("interface="):].replace("\\", ""))
    return endpoint.startswith("unix:")
