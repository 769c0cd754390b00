"""
Builds the gateway: a C{MultiService} of the queue manager, one listening
service per listener and, when configured, the admin endpoint.
"""

import collections
import dataclasses
import os
import re
import time

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, error, task, tcp
from twisted.python import failure
from zope.interface import implementer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from relaygw import codes, sdnotify, trust
from relaygw.auth import FailureTracker, makePortal
from relaygw.logs import Logger
from relaygw.policy import loadPolicy
from relaygw.proxy import ProxyProtocolFactory
from relaygw.protocol import SMTPSession
from relaygw.relay.maildir import MaildirNextHop
from relaygw.relay.queue import QueueManager
from relaygw.relay.router import Router
from relaygw.sink import SpoolSink
from relaygw.durable import Committer
from relaygw.spool import PartitionLock, PartitionLocked, Spool, partitionDirectory, partitions
from relaygw.tls import ServerTLS, generateSelfSigned
from relaygw.verbs import registry
from relaygw.workers import (
    ParentWatch, ReusePortEndpoint, WorkerSupervisor, parentGone, parentPid, parseTCP, twistdArgv,
)

log = Logger(namespace="relaygw.service")


class NullMetrics:
    """Metrics sink used when no admin endpoint is configured."""

    def connection(self, listener, delta):
        pass

    def event(self, listener, kind, *labels):
        pass

    def queued(self, listener, size, seconds):
        pass

    def delivery(self, hop, result):
        pass

    def deliveryTimes(self, status, inQueue, attempt):
        pass

    def corrupt(self):
        pass


@dataclasses.dataclass(frozen=True)
class ListenerSettings:
    """
    One listener's settings as a session sees them, pinned whole when the
    session connects: the config, the policy built from it, the trust
    policy, the cred portal and the server TLS settings.  A reload makes a
    new bundle for new sessions; a live session never mixes a new policy
    (or portal) with old limits.
    """

    listener: object
    policy: object
    trust: trust.TrustPolicy
    portal: object = None
    tls: object = None

    @classmethod
    def build(cls, listener, tls=None, portal=None, policy=None):
        if policy is None:
            policy = loadPolicy(listener.policy, listener)
        # The trust policy checks client certificates against the TLS
        # settings the listener keeps.
        return cls(listener, policy, trust.TrustPolicy.fromListener(listener, tls), portal, tls)


class SMTPFactory(ServerFactory):
    """
    Everything a session needs from its listener: the current
    L{ListenerSettings}, spool, verbs, TLS and the cred portal, plus the
    session bookkeeping used for limits and draining.
    """

    protocol = SMTPSession
    noisy = False

    def __init__(self, listener, spool, reactor, onQueued=None, portal=None, tls=None, metrics=None,
                 authFailures=None):
        self.spool = spool
        self.sink = SpoolSink(spool)
        self.reactor = reactor
        self.onQueued = onQueued
        self.metrics = metrics or NullMetrics()
        self.settings = ListenerSettings.build(listener, tls, portal)
        self.verbs = registry()
        self.sessions = set()
        self.closing = set()
        self.perIP = collections.Counter()
        self.recentConnects = collections.defaultdict(collections.deque)
        self._prunedAt = 0.0
        self.draining = False
        self.authFailures = authFailures
        if portal is not None and authFailures is None:
            from relaygw.auth import FailureTracker

            self.authFailures = FailureTracker(clock=reactor)

    @property
    def listener(self):
        """The current listener config (new sessions pin it)."""
        return self.settings.listener

    @property
    def policy(self):
        """The current policy (new sessions pin it)."""
        return self.settings.policy

    @property
    def portal(self):
        """The current cred portal or C{None} (new sessions pin it)."""
        return self.settings.portal

    @portal.setter
    def portal(self, portal):
        self.settings = dataclasses.replace(self.settings, portal=portal)

    @property
    def tls(self):
        """The current L{ServerTLS} or C{None} (new sessions pin it)."""
        return self.settings.tls

    @tls.setter
    def tls(self, tls):
        s = self.settings
        self.settings = ListenerSettings.build(s.listener, tls, s.portal, s.policy)

    def prepare(self, listener):
        """
        Build what a reloaded listener config needs (policy, trust, TLS,
        portal) without changing anything yet; raises if it can't.  New
        sessions get it as one L{ListenerSettings} bundle (L{apply}).
        """
        tls = None
        if listener.tls_certificate:
            if listener.tls_self_signed:
                generateSelfSigned(listener.tls_certificate, listener.tls_key, listener.hostname)
            tls = ServerTLS(listener.tls_certificate, listener.tls_key, listener.tls_min_version,
                            listener.tls_ciphers, listener.tls_client_ca)
        portal = self.portal
        old = self.listener
        if (old.credentials, old.always_allow) != (listener.credentials, listener.always_allow):
            portal = None
            if listener.credentials or listener.always_allow:
                portal = makePortal(listener.credentials, listener.always_allow)
        return {"policy": loadPolicy(listener.policy, listener), "trust": trust.TrustPolicy.fromListener(listener),
                "tls": tls, "portal": portal}

    def apply(self, listener, prepared):
        """Swap in a reloaded listener config (from L{prepare}); new sessions use it."""
        tls = prepared["tls"]
        if self.tls is not None and tls is not None:
            # The same object: an implicit-TLS port holds on to it.
            self.tls.adopt(tls)
            tls = self.tls
        portal = prepared["portal"]
        if portal is not None and self.authFailures is None:
            from relaygw.auth import FailureTracker

            self.authFailures = FailureTracker(clock=self.reactor)
        self.settings = ListenerSettings.build(listener, tls, portal, prepared["policy"])

    def applyListener(self, listener):
        """A reloaded listener config, prepared and applied at once."""
        self.apply(listener, self.prepare(listener))

    def proxyInfo(self, transport):
        if not self.listener.proxy_protocol:
            return None
        from relaygw.proxy import findProxyInfo

        return findProxyInfo(transport)

    def tlsInfo(self, transport):
        from relaygw.tls import tlsInfo

        return tlsInfo(transport)

    def admit(self, session):
        """
        A refusal (421) when the session is over a limit, else C{None}; a
        session that is admitted is counted against its client's address
        (L{sessionStarted}).
        """
        listener = session.listener
        host = listener.hostname
        if self.draining:
            return codes.SHUTTING_DOWN.format(host=host)
        if len(self.sessions) > listener.max_connections:
            return codes.TOO_MANY_CONNECTIONS.format(host=host)
        return self._perIP(session, session.countedIP)

    def _perIP(self, session, ip):
        """The per-IP limits for client C{ip} (already counted), or C{None}."""
        if ip is None:
            return None
        listener = session.listener
        host = listener.hostname
        if listener.max_connections_per_ip and self.perIP[ip] > listener.max_connections_per_ip:
            return codes.TOO_MANY_CONNECTIONS.format(host=host)
        rate = listener.connection_rate_per_ip
        if rate:
            now = self.reactor.seconds()
            self._pruneRecent(now)
            recent = self.recentConnects[ip]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            recent.append(now)
            if len(recent) > rate:
                return codes.RATE_LIMITED.format(host=host)
        return None

    #: Seconds between sweeps of the per-address connection times.
    PRUNE_EVERY = 60

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

    def _count(self, session, ip):
        """Count C{session} against client C{ip} (C{None}: not counted) instead of its previous one."""
        old = session.countedIP
        if old is not None:
            self.perIP[old] -= 1
            if self.perIP[old] <= 0:
                del self.perIP[old]
        session.countedIP = ip
        if ip is not None:
            self.perIP[ip] += 1

    def sessionStarted(self, session):
        """
        C{session} connected: count it against its client's address.  A
        trusted peer that may claim client identities (a balancer; Postfix
        exempts C{$mynetworks} from its client limits) is counted only under
        the addresses it claims (L{clientClaimed}).
        """
        self.sessions.add(session)
        claims = session.trusted and {"xclient", "xremoteip"} & set(session.listener.extensions)
        self._count(session, None if claims else session.context["remote_ip"])
        self.metrics.connection(self.listener.name, +1)

    def clientClaimed(self, session):
        """
        XCLIENT or XREMOTEIP changed the session's client address: count it
        against the claimed one, as if it had connected from there.  Returns
        the 421 refusal when that address is over its limits.
        """
        ip = session.context.get("remote_ip")
        if ip == "unknown":
            ip = None
        if ip == session.countedIP:
            return None
        self._count(session, ip)
        return self._perIP(session, ip)

    def sessionEnded(self, session):
        """
        C{session} is over (its closing reply sent), and again once its
        connection has gone; in between it is C{closing} (a drain waits
        for those too, a few seconds at most).
        """
        if session in self.sessions:
            self.sessions.discard(session)
            self._count(session, None)
            self.metrics.connection(self.listener.name, -1)
            if session.transport is not None and session.transport.connected:
                self.closing.add(session)
        else:
            self.closing.discard(session)

    def stats(self, kind, *labels):
        self.metrics.event(self.listener.name, kind, *labels)

    def messageQueued(self, session, message, seconds):
        self.metrics.queued(self.listener.name, message.size, seconds)
        if self.onQueued is not None:
            self.onQueued(message.queueId, message)


class GatewayService(MultiService):
    """The whole gateway; holds the pieces tests and the admin endpoint need."""

    installSignals = False
    #: Where the log goes once twistd hands us the application (None: standard output).
    logFile = None

    def __init__(self, config, reactor, worker=0, workerArgv=None, configPath=None):
        MultiService.__init__(self)
        # No "Starting factory ..." / "Stopping factory ..." line for every
        # outbound connection: the mail log says what happened.
        Factory.noisy = False
        self.config = config
        self.configPath = configPath
        self.reactor = reactor
        self.worker = worker
        self.workers = config.process.workers
        self.committer = Committer(reactor, config.spool.fsync)
        directory = config.spool.directory
        if self.workers > 1:
            directory = partitionDirectory(directory, worker)
        self.spool = Spool(directory, self.committer, config.spool.min_free_space)
        relay = config.relay
        from relaygw.relay import clientwire

        clientwire.TRACE = config.log.level == "debug"
        self.maildir = MaildirNextHop(relay.maildir, self.committer, reactor)
        self.router = Router(config, reactor, self.maildir)
        self.queue = QueueManager(self.spool, self.router, reactor, concurrency=relay.concurrency,
                                  retryMin=relay.retry_min, retryMax=relay.retry_max,
                                  lifetime=relay.max_lifetime, bounceLifetime=relay.bounce_lifetime,
                                  hostname=relay.helo_name or config.listeners[0].hostname,
                                  deferAll=relay.defer_all)
        self.queue.setServiceParent(self)
        self.factories = []
        TimerService(5, self._watchCertificates).setServiceParent(self)
        self.supervisor = None
        if self.workers > 1 and worker == 0 and workerArgv:
            self.supervisor = WorkerSupervisor(reactor, self.workers, workerArgv)
            self.supervisor.setServiceParent(self)
        if worker > 0 and parentPid() is not None:
            ParentWatch(reactor).setServiceParent(self)
        self.stopping = False
        self.listeningPorts = []
        self._locks = []
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
            self.metrics.peers = [self._metricsSnapshot(i) for i in range(1, self.workers)]
            adminService = StreamServerEndpointService(serverFromString(reactor, config.admin.endpoint),
                                                       makeAdminSite(self.metrics, self.health))
            adminService._raiseSynchronously = True
            adminService.setName("admin")
            adminService.setServiceParent(self)
        elif config.admin.endpoint:
            TimerService(1, self._writeMetricsSnapshot).setServiceParent(self)
        self.queue.metrics = self.metrics
        self.tlsSettings = []
        # Failed logins count per client address across every listener.
        self.authFailures = FailureTracker(clock=reactor)
        self.proxyFactories = {}
        for listener in config.listeners:
            tls = self._serverTLS(listener)
            portal = None
            if listener.credentials or listener.always_allow:
                portal = makePortal(listener.credentials, listener.always_allow)
            factory = SMTPFactory(listener, self.spool, reactor, onQueued=self.queue.enqueue,
                                  portal=portal, tls=tls, metrics=self.metrics,
                                  authFailures=self.authFailures)
            self.factories.append(factory)
            if self.workers > 1:
                endpoint = ReusePortEndpoint(reactor, *parseTCP(listener.endpoint))
            else:
                endpoint = serverFromString(reactor, withBacklog(listener.endpoint))
            wrapped = factory
            if listener.implicit_tls:
                wrapped = TLSMemoryBIOFactory(tls.contextFactory, False, wrapped)
            if listener.proxy_protocol:
                # The PROXY header comes first, then (implicit) TLS, then SMTP.
                wrapped = ProxyProtocolFactory(wrapped, factory.settings.trust.balancer,
                                               listener.proxy_timeout, reactor)
                self.proxyFactories[listener.name] = wrapped
            svc = StreamServerEndpointService(_RecordingEndpoint(endpoint, self.listeningPorts), wrapped)
            svc._raiseSynchronously = True
            svc.setName("listener:" + listener.name)
            svc.setServiceParent(self)

    def _serverTLS(self, listener):
        if not listener.tls_certificate:
            return None
        if listener.tls_self_signed and generateSelfSigned(
                listener.tls_certificate, listener.tls_key, listener.hostname):
            log.info("generated a self-signed certificate {path}", path=listener.tls_certificate)
        tls = ServerTLS(listener.tls_certificate, listener.tls_key, listener.tls_min_version,
                        listener.tls_ciphers, listener.tls_client_ca)
        self.tlsSettings.append(tls)
        return tls

    def reload(self):
        """
        SIGHUP: open the log file again, reload certificates, then the
        config file (L{reloadConfig}: whole or not at all).  Worker 0 passes an accepted reload on to the
        other workers.
        """
        from relaygw import logs

        logs.reopen()
        self.reloadCertificates()
        if not self.configPath:
            return
        from relaygw.reload import reloadConfig

        if reloadConfig(self, self.configPath) and self.supervisor is not None:
            self.supervisor.signalWorkers("HUP")

    def prepareRelay(self, config):
        """The queue manager's settings and router for a reloaded config (nothing changes yet)."""
        relay = config.relay
        router = self.router
        old = self.config
        if (old.relay, old.routes, old.listeners[0].hostname) != (relay, config.routes, config.listeners[0].hostname):
            maildir = self.maildir
            if relay.maildir != old.relay.maildir:
                maildir = MaildirNextHop(relay.maildir, self.committer, self.reactor)
            router = Router(config, self.reactor, maildir)
        return {"router": router, "concurrency": relay.concurrency, "retryMin": relay.retry_min,
                "retryMax": relay.retry_max, "lifetime": relay.max_lifetime,
                "bounceLifetime": relay.bounce_lifetime, "deferAll": relay.defer_all,
                "hostname": relay.helo_name or config.listeners[0].hostname, "trace": config.log.level == "debug"}

    def applyRelay(self, settings):
        """Swap in L{prepareRelay}'s result: new deliveries use it; the old router's idle connections close."""
        from relaygw.relay import clientwire

        settings = dict(settings)
        clientwire.TRACE = settings.pop("trace")
        old, self.router = self.router, settings["router"]
        if old is not self.router:
            self.maildir = self.router.default.fallback
            old.closeIdle()
        self.queue.reconfigure(**settings)

    def reloadCertificates(self):
        """SIGHUP: re-read every listener's certificate; new connections use it."""
        for tls in self.tlsSettings:
            if tls.reload():
                log.info("reloaded certificate {path}", path=tls.certPath)

    def _watchCertificates(self):
        for tls in self.tlsSettings:
            tls.checkForChanges()

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
             seconds, while closed sessions finish their lingering close),
             then everything else.

        The spool stays intact and its lock is released last.  The whole
        drain takes at most C{drain_delay} + C{drain_timeout} + 5 seconds.
        """
        log.info("draining")
        if self.installSignals and self.worker == 0:
            sdnotify.notify("STOPPING=1")
        self.stopping = True
        delay = max([l.drain_delay for l in self.config.listeners] or [0])
        timeout = max([l.drain_timeout for l in self.config.listeners] or [0])
        children = None
        if self.supervisor is not None and self.supervisor.running:
            children = self.supervisor.stopService(timeout=delay + timeout + self.QUEUE_GRACE + 1)
        if parentGone():
            log.warn("the main process has gone: this worker stops listening at once")
            delay = 0
        if delay:
            log.info("still accepting for {delay}s (drain_delay)", delay=delay)
            yield task.deferLater(self.reactor, delay, lambda: None)
        for f in self.factories:
            f.draining = True
        for port in self.listeningPorts:
            closeListeningPort(port)
        listeners = [svc for svc in self if svc.name and svc.name.startswith("listener:")]
        yield defer.gatherResults([defer.maybeDeferred(svc.stopService) for svc in listeners])
        for f in self.factories:
            for session in list(f.sessions):
                session.drain()
        deadline = self.reactor.seconds() + timeout
        while any(f.sessions for f in self.factories) and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        for f in self.factories:
            for session in list(f.sessions):
                session.shutDown()
        self.queue.stopTimeout = min(self.queue.stopTimeout, self.QUEUE_GRACE)
        queueStopped = defer.maybeDeferred(self.queue.stopService)
        # Meanwhile, closed sessions whose peer is still taking the last
        # reply (a lingering close ends within a few seconds).
        lingering = self.reactor.seconds() + self.QUEUE_GRACE
        while any(f.closing for f in self.factories) and self.reactor.seconds() < lingering:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        yield queueStopped
        if children is not None:
            yield children
        Service.stopService(self)
        yield defer.gatherResults([defer.maybeDeferred(svc.stopService) for svc in reversed(list(self))
                                   if svc.running])
        for lock in self._locks:
            lock.release()
        self._locks = []
        self.spool.releaseLock()
        log.info("stopped; spool intact")

    #: Seconds the queue manager's deliveries in flight get after the sessions' drain.
    QUEUE_GRACE = 3.0

    def _metricsSnapshot(self, worker):
        return os.path.join(partitionDirectory(self.config.spool.directory, worker), "metrics.prom")

    def _writeMetricsSnapshot(self):
        """This worker's metrics, for worker 0's /metrics (replaced whole; never raises)."""
        path = self._metricsSnapshot(self.worker)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(self.metrics.render())
            os.rename(path + ".tmp", path)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=path, error=e)

    def spoolProbe(self):
        """(depth, age of the oldest message in seconds, free octets), for /metrics."""
        depth, age = self.spool.oldestAge(time.time())
        try:
            free = self.spool.freeSpace()
        except OSError:
            free = 0
        return depth, age, free

    def queueProbe(self):
        """This worker's messages by state, for /metrics: what relaygw-queue list's summary counts."""
        ids = self.spool.queueIds()
        held = sum(1 for qid in ids if self.spool.isHeld(qid))
        deferred = len(self.queue.waitingForRetry())
        return {"active": max(0, len(ids) - held - deferred), "deferred": deferred, "held": held,
                "corrupt": len(self.spool.corrupt())}

    def health(self):
        """For /healthz: (ok, reason)."""
        if self.stopping or any(f.draining for f in self.factories):
            return False, "draining"
        if not self.spool.writable():
            return False, "spool not writable"
        try:
            free = self.spool.freeSpace()
        except OSError as e:
            return False, "spool file system unreadable: %s" % (e.strerror,)
        if free < max(1, self.spool.minFree):
            return False, "spool low on space: %d bytes free, min_free_space %d" % (free, self.spool.minFree)
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

    def _adoptStrandedMessages(self):
        """
        Worker 0 takes over messages left in a spool layout the current
        C{[process] workers} no longer uses: the partitions of workers that
        no longer exist, the unpartitioned spool after a switch to several
        workers, and every partition after a switch back to one process.
        """
        base = self.config.spool.directory
        sources = [path for index, path in partitions(base).items() if self.workers == 1 or index >= self.workers]
        if self.workers > 1:
            sources.append(base)
        for source in sources:
            if source != base:  # (the base directory is ours already)
                try:
                    lock = PartitionLock(source)
                except PartitionLocked as e:
                    log.warn("not adopting the messages in {source}: {error}", source=source, error=str(e))
                    continue
            else:
                lock = None
            try:
                moved = self.spool.adopt(source)
            finally:
                if lock is not None:
                    lock.release()
            if moved:
                log.info("adopted {n} queued messages from {source}", n=moved, source=source)

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
                log.error("{file}: {key}: cannot listen: {why} (expected a free port this user may bind)",
                          file=os.path.basename(self.configPath or "default.toml"),
                          key=keys.get(svc.name, svc.name), why=getattr(why, "strerror", None) or why)
                raise SystemExit(1)

    def acquireSpool(self):
        """
        Take exclusive ownership of this process's spool partition (and,
        for worker 0 of several, of the spool directory itself, where the
        stranded messages it adopts are); raises L{PartitionLocked} when
        another live process has it.
        """
        if self.spool.lock is not None:
            for lock in self._locks + [self.spool.lock]:
                lock.claim()  # (a daemon has forked since)
            return
        if self.workers > 1 and self.worker == 0:
            self._locks.append(PartitionLock(self.config.spool.directory))
        try:
            self.spool.acquire()
        except PartitionLocked:
            for lock in self._locks:
                lock.release()
            self._locks = []
            raise

    def startService(self):
        # The spool is locked and opened (and what was never acknowledged
        # discarded) before any listener accepts a connection.
        self.acquireSpool()
        if self.worker == 0:
            self._adoptStrandedMessages()
        self.queue.recovered = self.spool.open()
        if self.queue.recovered:
            log.info("recovered {n} queued messages", n=len(self.queue.recovered))
        MultiService.startService(self)
        if self.installSignals:
            import signal

            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            if self.worker == 0:
                # Every listener is bound; once the reactor runs (its signal
                # handlers in place, so a stop drains), tell systemd.
                self.reactor.callWhenRunning(sdnotify.notify, "READY=1\nSTATUS=accepting mail")


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """A server endpoint that notes the ports it opens (for L{closeListeningPort})."""

    def __init__(self, endpoint, ports):
        self.endpoint = endpoint
        self.ports = ports

    def listen(self, factory):
        return self.endpoint.listen(factory).addCallback(self._opened)

    def _opened(self, port):
        self.ports.append(port)
        return port


def closeListeningPort(port):
    """
    Stop listening without resetting anybody: accept every connection the
    kernel has already completed (the factory answers each with 421 4.3.2
    while draining), then close the socket in the same breath, so that
    later attempts are refused (a balancer retries another server) rather
    than reset.  Ports that are not plain TCP are left to C{stopListening}.
    """
    if not isinstance(port, tcp.Port) or not port.connected:
        return
    port.stopReading()
    for _ in range(1000):  # (bounded: a flood cannot keep us here)
        before = port.sessionno
        port.numberAccepts = 1000
        port.doRead()
        if port.sessionno == before:
            break
    port.disconnecting = True
    port.connectionLost(failure.Failure(error.ConnectionDone()))


def makeService(config, reactor=None, worker=0, configPath=None, logFile=None):
    """
    The gateway's service tree for a validated config.  C{logFile}: a
    file opened for appending, or C{None} for standard output; the other
    workers log to the same file.
    """
    if reactor is None:
        from twisted.internet import reactor
    for l in config.listeners:
        if (l.always_allow or l.extensions) and not l.trusted_peers and not _boundLocally(l.endpoint):
            log.warn("listener {name}: {what} enabled on a public address without trusted_peers",
                     name=l.name, what="always_allow" if l.always_allow else "trusted verbs")
    service = GatewayService(config, reactor, worker, twistdArgv(configPath, getattr(logFile, "name", None)),
                             configPath)
    service.logFile = logFile
    return service


#: The listen queue a listener gets unless its endpoint string says otherwise
#: (Twisted's default of 50 drops SYNs under a burst of clients).
BACKLOG = 1024


def withBacklog(description, backlog=BACKLOG):
    """A server endpoint string with C{backlog=} added when it listens on a queue and names none."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0] in ("tcp", "tcp6", "ssl", "unix") and not any(p.startswith("backlog=") for p in parts[1:]):
        return "%s:backlog=%d" % (description, backlog)
    return description


def _boundLocally(endpoint):
    """Whether a server endpoint string binds only loopback or private addresses."""
    for part in endpoint.split(":"):
        if part.startswith("interface="):
            return trust.isLocalAddress(part[len("interface="):].replace("\\", ""))
    return endpoint.startswith("unix:")
