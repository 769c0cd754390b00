"""
The listening side of the gateway: one L{SMTPFactory} per configured
listener (the bookkeeping its sessions share: settings, limits, drain), and
L{Listeners}, which builds each listener's factory, TLS settings, PROXY
wrapper and endpoint service, and what a drain and a reload do to them.
"""

import ctypes
import dataclasses
import re
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, error, task, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.python import failure
from zope.interface import implementer

from relaygw import anvil, codes, trust
from relaygw.anvil import ClientCounts
from relaygw.auth import FailureTracker, makePortal
from relaygw.descriptors import ConnectionBudget
from relaygw.logs import Logger
from relaygw.policy import loadPolicy
from relaygw.protocol import SMTPSession
from relaygw.proxy import ProxyProtocolFactory
from relaygw.sink import SpoolSink
from relaygw.tls import HalfCloseableTLSFactory, ServerTLS, generateSelfSigned
from relaygw.verbs import registry
from relaygw.sharedports import SharedSockets
from relaygw.workers import DESCRIPTORS_PER_WORKER, ReusePortEndpoint, parentPid, parseTCP

#: (Its lines keep the namespace operators know them by.)
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


def _uncounted(kind, *labels):
    """L{SMTPFactory.stats} without metrics."""


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
                 authFailures=None, clients=None, descriptors=None):
        self.spool = spool
        self.sink = SpoolSink(spool)
        self.reactor = reactor
        self.onQueued = onQueued
        self.metrics = metrics or NullMetrics()
        if isinstance(self.metrics, NullMetrics):
            # Nothing reads the session's events: one call a command and a reply, not three.
            self.stats = _uncounted
        self.settings = ListenerSettings.build(listener, tls, portal)
        self.verbs = registry()
        self.sessions = set()
        self.closing = set()
        #: The per-address counts of this listener's clients (an L{relaygw.anvil.IClientCounts}).
        self.clients = clients if clients is not None else ClientCounts(reactor)
        self.draining = False
        #: The process's L{relaygw.descriptors.ConnectionBudget}, shared by its listeners (or C{None}).
        self.descriptors = descriptors
        if descriptors is not None:
            descriptors.factories.append(self)
        #: The ports this listener accepts on (in this process).
        self.ports = []
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
        A refusal (421) when the session is over a limit, else C{None} (or
        a Deferred of one, when another worker keeps the per-IP counts).  A
        trusted peer that may claim client identities is counted only under
        the addresses it claims (L{relaygw.trust.countedAddress},
        L{clientClaimed}).
        """
        listener = session.listener
        host = listener.hostname
        if self.draining:
            return codes.SHUTTING_DOWN.format(host=host)
        if len(self.sessions) > listener.max_connections or (self.descriptors and self.descriptors.full()):
            return codes.TOO_MANY_CONNECTIONS.format(host=host)
        return self._count(session, trust.countedAddress(session.context, session.trusted, listener.extensions))

    def _count(self, session, ip):
        """
        Count C{session} against client C{ip} instead of its previous one
        (C{None}: not counted), when its listener limits clients per
        address; the refusal when C{ip} is over a limit.
        """
        if session.countedIP is not None:
            self.clients.release(session.countedIP)
            session.countedIP = None
        listener = session.listener
        limit, rate = listener.max_connections_per_ip, listener.connection_rate_per_ip
        if ip is None or not (limit or rate):
            return None
        session.countedIP = ip
        verdict = self.clients.acquire(ip, limit, rate)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._refusal, listener.hostname)
        return self._refusal(verdict, listener.hostname)

    @staticmethod
    def _refusal(verdict, host):
        if verdict == anvil.TOO_MANY:
            return codes.TOO_MANY_CONNECTIONS.format(host=host)
        if verdict == anvil.TOO_FAST:
            return codes.RATE_LIMITED.format(host=host)
        return None

    def sessionStarted(self, session):
        """C{session} connected (L{admit} counts it against its client's address)."""
        self.sessions.add(session)
        self.metrics.connection(self.listener.name, +1)
        self.connectionsChanged()

    #: The PROXY wrapper in front of this listener, if any (its connections before their header count too).
    proxy = None

    def connectionsHeld(self):
        """The connections this listener holds: sessions, closing ones, and PROXY ones before their header."""
        return len(self.sessions) + len(self.closing) + (self.proxy.waiting if self.proxy is not None else 0)

    def full(self):
        """Whether this listener holds its C{max_connections} (another worker may take the next client)."""
        return len(self.sessions) >= self.listener.max_connections

    def connectionsChanged(self):
        if self.descriptors is not None:
            self.descriptors.changed()

    def clientClaimed(self, session):
        """
        XCLIENT or XREMOTEIP changed the session's client identity: count it
        against the claimed address (L{relaygw.trust.countedAddress}), as if
        it had connected from there.  Returns the 421 refusal when that
        address is over its limits (or a Deferred of it, or of C{None}).
        """
        ip = trust.countedAddress(session.context, session.trusted, session.listener.extensions)
        if ip is not None and ip == session.countedIP:
            return None
        return self._count(session, ip)

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
        self.connectionsChanged()

    def stats(self, kind, *labels):
        self.metrics.event(self.listener.name, kind, *labels)

    def messageQueued(self, session, message, seconds):
        self.metrics.queued(self.listener.name, message.size, seconds)
        if self.onQueued is not None:
            self.onQueued(message.queueId, message)


class Listeners:
    """
    The listeners of one process, built from the config: for each its
    L{SMTPFactory}, server TLS settings and cred portal, its PROXY wrapper
    and its endpoint service (a child of C{parent}, named
    C{listener:NAME}).  Failed logins count per client address across
    every listener.

    @ivar factories: the L{SMTPFactory} of each listener, in config order.
    @ivar services: their endpoint services, in the same order.
    @ivar proxyFactories: C{{listener name: ProxyProtocolFactory}}.
    @ivar tlsSettings: the L{ServerTLS} of each listener that has one.
    @ivar listeningPorts: the ports opened (for L{closeListeningPort}).
    @ivar shared: with several workers, the L{SharedSockets} they accept from.
    @ivar budget: the L{ConnectionBudget} the listeners share.

    With several workers, C{clients} (an L{relaygw.anvil.Anvil} or
    L{relaygw.anvil.AnvilClient}) keeps each listener's per-IP counts and
    the failed logins for the whole gateway.
    """

    def __init__(self, config, reactor, parent, spool, onQueued, metrics, workers=1, clients=None):
        self.reactor = reactor
        self.factories = []
        self.services = []
        self.proxyFactories = {}
        self.tlsSettings = []
        self.listeningPorts = []
        # A worker takes the sockets the main process passed on (named in
        # its environment); the main process inherits none.
        self.shared = SharedSockets(None if parentPid() is not None else {}) if workers > 1 else None
        self.authFailures = clients.authFailures if clients is not None else FailureTracker(clock=reactor)
        others = 0
        if config.admin.endpoint and parentPid() is None:  # (worker 0 serves it: its connections take descriptors)
            from relaygw.admin import MAX_CONNECTIONS as others
        if workers > 1 and parentPid() is None:  # (worker 0 is the main process, holding the others' descriptors)
            others += DESCRIPTORS_PER_WORKER * (workers - 1)
        budget = self.budget = ConnectionBudget(config.listeners, config.relay.concurrency, ports=self.listeningPorts,
                                                others=others, yielding=workers > 1, reactor=reactor)
        for listener in config.listeners:
            tls = self._serverTLS(listener)
            portal = None
            if listener.credentials or listener.always_allow:
                portal = makePortal(listener.credentials, listener.always_allow)
            factory = SMTPFactory(listener, spool, reactor, onQueued=onQueued, portal=portal, tls=tls,
                                  metrics=metrics, authFailures=self.authFailures,
                                  clients=clients.countsFor(listener.name) if clients is not None else None,
                                  descriptors=budget)
            self.factories.append(factory)
            if workers > 1:
                endpoint = ReusePortEndpoint(reactor, *parseTCP(listener.endpoint), shared=self.shared)
            else:
                endpoint = serverFromString(reactor, withBacklog(listener.endpoint))
            wrapped = factory
            if listener.implicit_tls:
                wrapped = HalfCloseableTLSFactory(tls.contextFactory, False, wrapped)
            if listener.proxy_protocol:
                # The PROXY header comes first, then (implicit) TLS, then SMTP.
                wrapped = ProxyProtocolFactory(wrapped, factory.settings.trust.balancer,
                                               listener.proxy_timeout, reactor,
                                               onChange=factory.connectionsChanged)
                factory.proxy = wrapped
                self.proxyFactories[listener.name] = wrapped
            recording = _RecordingEndpoint(endpoint, self.listeningPorts, factory.ports,
                                           opened=lambda port, factory=factory: budget.guard(port, factory))
            svc = StreamServerEndpointService(recording, wrapped)
            svc._raiseSynchronously = True
            svc.setName("listener:" + listener.name)
            svc.setServiceParent(parent)
            self.services.append(svc)

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

    # -- reload ----------------------------------------------------------

    def prepare(self, config):
        """
        What a reloaded C{config} gives each listener it still has (built,
        nothing changed yet; raises if it can't): C{[(factory, listener,
        prepared)]} for L{apply}.
        """
        prepared = []
        for factory in self.factories:
            listener = next((l for l in config.listeners if l.name == factory.listener.name), None)
            if listener is not None:
                prepared.append((factory, listener, factory.prepare(listener)))
        return prepared

    def apply(self, prepared, config):
        """
        Swap in L{prepare}'s result for C{config}: new sessions use it, and
        the connections held within the open-file limit leave room for its
        deliveries.
        """
        for factory, listener, settings in prepared:
            factory.apply(listener, settings)
            wrapper = self.proxyFactories.get(listener.name)
            if wrapper is not None:
                wrapper.isTrusted = factory.settings.trust.balancer
                wrapper.timeout = listener.proxy_timeout
        self.tlsSettings = [f.tls for f in self.factories if f.tls is not None]
        # (after the listeners: whether each accepts is judged by its new max_connections)
        self.budget.configure(config.listeners, config.relay.concurrency)

    def reloadCertificates(self, failures=None):
        """Re-read every listener's certificate (each logs what it loaded); new connections use it."""
        for tls in self.tlsSettings:
            tls.reload(failures)

    def watchCertificates(self):
        """Reload a certificate whose files changed."""
        for tls in self.tlsSettings:
            tls.checkForChanges()

    # -- drain -----------------------------------------------------------

    @property
    def draining(self):
        return any(f.draining for f in self.factories)

    @defer.inlineCallbacks
    def stopAccepting(self, refuseNew=True):
        """
        Stop listening without resetting anybody: first let no new handshake
        complete (L{refuseNewHandshakes}) and those under way settle, then
        accept what the kernel has queued, told 421 4.3.2, and close
        (L{closeListeningPort}).  Without the first step, a connection
        completed between the last accept and the close, here or in another
        worker sharing the socket, was reset.  Not with C{refuseNew} false:
        a worker stopping while the main process that owns the shared socket
        goes on (and restarts the worker) leaves it open to new clients.
        Fires once every endpoint service has stopped.
        """
        for f in self.factories:
            f.draining = True
        ports = [p for p in self.listeningPorts if isinstance(p, tcp.Port) and p.connected]
        refused = [refuseNewHandshakes(p.socket) for p in ports] if refuseNew else []
        if any(refused):
            yield task.deferLater(self.reactor, HANDSHAKE_SETTLE, lambda: None)
        for port in self.listeningPorts:
            closeListeningPort(port)
        yield defer.gatherResults([defer.maybeDeferred(svc.stopService) for svc in self.services])

    def drainSessions(self):
        """Idle sessions get 421 4.3.2; those in a transaction may finish it."""
        for f in self.factories:
            for session in list(f.sessions):
                session.drain()

    def shutDownSessions(self):
        """The sessions still open get 421 4.3.2 now."""
        for f in self.factories:
            for session in list(f.sessions):
                session.shutDown()

    @property
    def sessionsOpen(self):
        return any(f.sessions for f in self.factories)

    @property
    def sessionsClosing(self):
        """Whether closed sessions' peers are still taking the last reply (a lingering close)."""
        return any(f.closing for f in self.factories)


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """
    A server endpoint that notes the ports it opens in lists (for
    L{closeListeningPort}, and its listener's), and hands each to
    C{opened} (the connection budget's guard).
    """

    def __init__(self, endpoint, *lists, opened=None):
        self.endpoint = endpoint
        self.lists = lists
        self.opened = opened

    def listen(self, factory):
        return self.endpoint.listen(factory).addCallback(self._opened)

    def _opened(self, port):
        for ports in self.lists:
            ports.append(port)
        if self.opened is not None:
            self.opened(port)
        return port


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


#: A classic BPF program dropping a TCP segment that has SYN set and ACK not
#: (a new handshake's first segment) and keeping every other: the filter of a
#: listening socket sees each segment from the TCP header on, whose flags are
#: its 14th octet.
_DROP_SYN = (_SockFilter * 5)(
    _SockFilter(0x30, 0, 0, 13),  # BPF_LD | BPF_B | BPF_ABS: A = flags
    _SockFilter(0x54, 0, 0, 0x12),  # BPF_ALU | BPF_AND | BPF_K: A &= SYN | ACK
    _SockFilter(0x15, 0, 1, 0x02),  # BPF_JMP | BPF_JEQ | BPF_K: SYN alone?
    _SockFilter(0x06, 0, 0, 0),  # BPF_RET | BPF_K: drop
    _SockFilter(0x06, 0, 0, 0xFFFFFFFF))  # keep
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)

#: Seconds a listening socket keeps accepting after L{refuseNewHandshakes},
#: for handshakes already answered to complete (their client's ACK is one
#: round trip away) and be told 421 4.3.2 rather than reset by the close.
HANDSHAKE_SETTLE = 0.1


def refuseNewHandshakes(sock):
    """
    On Linux, drop every new handshake's SYN a listening socket is handed
    from now on (the client sends it again a second later, when the closed
    port refuses it), while a handshake already answered still completes
    (dropping its ACK too would leave its client waiting for a greeting
    that never comes) and the connections in the accept queue stay there to
    be accepted.  The filter is the socket's, so it also holds for the
    other workers sharing it.  Returns whether it was attached.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(_SockFprog(len(_DROP_SYN), _DROP_SYN)))
    except (OSError, ValueError):
        return False
    return True


def closeListeningPort(port):
    """
    Accept every connection the kernel has already completed (the factory
    answers each with 421 4.3.2 while draining), then close the socket in
    the same breath, so that later attempts are refused (a balancer retries
    another server) rather than reset.  Ports that are not plain TCP are
    left to C{stopListening}.
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


#: The listen queue a listener gets unless its endpoint string says otherwise
#: (Twisted's default of 50 drops SYNs under a burst of clients).
BACKLOG = 1024


def withBacklog(description, backlog=BACKLOG):
    """A server endpoint string with C{backlog=} added when it listens on a queue and names none."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0] in ("tcp", "tcp6", "ssl", "unix") and not any(p.startswith("backlog=") for p in parts[1:]):
        return "%s:backlog=%d" % (description, backlog)
    return description
