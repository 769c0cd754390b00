"""
Routing: which next hop a recipient of a message goes to.

Routes are tried in order; the first whose recipient domain (or a parent
domain) or validation-context key matches wins.  Otherwise the [relay]
next hop applies: smarthosts, MX delivery, or the local Maildir.
"""

from twisted.internet import defer
from zope.interface import implementer

from relaygw import config as _config
from relaygw.commands import addressDomain, canonicalDomain
from relaygw.tls import ClientTLS, platformClientTLS
from relaygw.relay import mx
from relaygw.relay.nexthop import IRouter
from relaygw.relay.smtp import SMTPNextHop, mxHosts, smarthostList


def _options(hop, heloName, ownNames, clientTLS, destination=None):
    from relaygw.relay.client import DeliveryOptions

    return DeliveryOptions(
        heloName=heloName,
        ownNames=ownNames,
        destination=destination,
        tls=hop.tls,
        tlsHostname=None,
        clientTLS=clientTLS,
        auth=(hop.auth_user, hop.auth_password) if hop.auth_user else None,
        forwardIdentity=hop.forward_identity,
        timeout=hop.command_timeout,
    )


class HopSpec:
    """
    One configured destination: builds (and caches) its next-hop objects.
    With MX delivery there is one per recipient domain; once C{MAX_CACHED}
    of them exist, those with nothing in flight and no connection kept
    open are dropped before another is added, but none handed out in the
    reactor's current turn: the message being routed has been given it
    and is about to hand it its recipients (dropped, a later recipient of
    the same domain would get a second one, and the gateway's stop would
    not reach the first).
    """

    MAX_CACHED = 1000

    def __init__(self, name, hop, reactor, heloName, resolver, fallback=None, deadFor=300, connections=None,
                 isSelf=None, ownNames=frozenset(), held=None, contended=None, replaced=None):
        self.name = name
        #: C{{name: next hop}} of the router a reload replaced, still with connections open (L{SMTPNextHop.follow}).
        self.replaced = replaced if replaced is not None else {}
        #: Messages each of its next hops may hold at once while C{contended()} (L{WaitingLine.maxHeld}).
        self.held = held
        self.contended = contended
        #: Whether an MX host's address is the gateway's own (L{mx.ownAddresses}).
        self.isSelf = isSelf or mx.ownAddresses(())
        #: The gateway's own host names (lower case): a next hop answering with one is the gateway.
        self.ownNames = ownNames
        #: Connections to each of its next hops this process may open (its share of destination_concurrency).
        self.connections = hop.destination_concurrency if connections is None else connections
        self.deadFor = deadFor  # (how long a destination found dead stays so: [relay] retry_min)
        self.hop = hop
        #: Its outbound TLS (the CA bundle read here, once, and at a reload), shared by its next hops.
        self.clientTLS = None
        if hop.tls != "none" and (hop.smarthosts or hop.mx):
            self.clientTLS = ClientTLS(hop.tls_ca) if hop.tls_ca else platformClientTLS()
        self.reactor = reactor
        self.heloName = heloName
        self.resolver = resolver
        self.fallback = fallback
        self.cache = {}
        self._sweepAt = self.MAX_CACHED
        self._handedOut = set()  # the domains whose hop was handed out in this turn of the reactor

    def _sweep(self):
        for domain, hop in list(self.cache.items()):
            if hop.unused and domain not in self._handedOut:
                del self.cache[domain]
        # Everything still busy: don't sweep again at every new domain.
        self._sweepAt = max(self.MAX_CACHED, 2 * len(self.cache))

    def nextHop(self, domain):
        hop = self.hop
        if hop.smarthosts:
            if None not in self.cache:
                hosts = [_config.parseHostPort(h) for h in hop.smarthosts]
                options = _options(hop, self.heloName, self.ownNames, self.clientTLS)
                # tlsHostname stays None: each smarthost's certificate is
                # verified against the name that smarthost was configured
                # with (the host the client connects to), not the first one's.
                self.cache[None] = self._smtpHop("smtp:%s" % ",".join(hop.smarthosts), smarthostList(hosts), options)
            return self.cache[None]
        if hop.mx:
            if domain not in self.cache:
                if len(self.cache) >= self._sweepAt:
                    self._sweep()
                options = _options(hop, self.heloName, self.ownNames, self.clientTLS, domain)
                # tlsHostname stays None: each MX host's certificate is checked against its own name.
                hosts = mxHosts(self.resolver(), domain, self.isSelf)
                self.cache[domain] = self._smtpHop("mx:%s" % domain, hosts, options)
            if not self._handedOut:
                self.reactor.callLater(0, self._handedOut.clear)
            self._handedOut.add(domain)
            return self.cache[domain]
        return self.fallback

    def _smtpHop(self, name, hosts, options):
        """An SMTP next hop with this spec's limits: its connections, its share of the slots, its dead time."""
        hop = SMTPNextHop(self.reactor, name, hosts, options, self.connections, deadFor=self.deadFor,
                          maxHeld=self.held, contended=self.contended)
        before = self.replaced.pop(name, None)
        if before is not None:
            hop.follow(before)
        return hop

    def smtpHops(self):
        """The next hops built so far (SMTP destinations; the fallback is not cached)."""
        return list(self.cache.values())


def ownHostnames(config):
    """
    The names the gateway's listeners greet and answer EHLO with (Postfix's
    myhostname), lower case: a next hop answering with one is the gateway.
    """
    return frozenset(listener.hostname.lower() for listener in config.listeners)


@implementer(IRouter)
class Router:
    """C{router(message, recipient) -> INextHop}."""

    def __init__(self, config, reactor, maildir, share=None, contended=None, replaces=None):
        """
        @param share: this process's part of a gateway-wide limit
            (L{relaygw.workers.WorkerRole.share}); by default all of it.
        @param contended: C{() -> bool}, whether messages wait for one of the
            queue manager's delivery slots (by default, always so taken).
        @param replaces: the router this one replaces at a reload: a next hop
            of its with connections still open counts them against the
            destination's limit in the new one of the same name.
        """
        #: C{{name: next hop}} of the routers replaced, with connections open, not yet followed by one of this one's.
        self.replaced = replaced = {}
        if replaces is not None:
            for hop in list(replaces.replaced.values()) + replaces._smtpHops():
                if not hop.unused or hop.inheritedConnections():
                    replaced[hop.name] = hop
        share = share or (lambda total: total)
        relay = config.relay
        heloName = relay.helo_name or config.listeners[0].hostname
        self._resolver = None
        self.relay = relay
        isSelf = mx.ownAddresses([_config.endpointPort(listener.endpoint) for listener in config.listeners])
        ownNames = ownHostnames(config)
        # Half the queue manager's delivery slots at most for one destination:
        # the rest stay for mail to the others (L{WaitingLine.maxHeld}).
        held = max(1, relay.concurrency // 2)
        self.default = HopSpec("relay", relay, reactor, heloName, self.resolver, fallback=maildir,
                               deadFor=relay.retry_min, connections=share(relay.destination_concurrency),
                               isSelf=isSelf, ownNames=ownNames, held=held, contended=contended, replaced=replaced)
        self.routes = [(r, HopSpec(r.name or "route[%d]" % i, r, reactor, heloName, self.resolver,
                                   deadFor=relay.retry_min, connections=share(r.destination_concurrency),
                                   isSelf=isSelf, ownNames=ownNames, held=held, contended=contended,
                                   replaced=replaced), tuple(canonicalDomain(d) for d in r.domains))
                       for i, r in enumerate(config.routes)]

    def _specs(self):
        return [self.default] + [spec for _, spec, _ in self.routes]

    def reloadCertificates(self, failures=None):
        """Re-read every next hop's CA bundle (L{ClientTLS.reload}): new connections use it."""
        for spec in self._specs():
            if spec.clientTLS is not None:
                spec.clientTLS.reload(failures)

    def watchCertificates(self):
        """Reload a CA bundle whose file changed."""
        for spec in self._specs():
            if spec.clientTLS is not None:
                spec.clientTLS.checkForChanges()

    def resolver(self):
        if self._resolver is None:
            server = _config.parseHostPort(self.relay.resolver, 53) if self.relay.resolver else None
            self._resolver = mx.makeResolver(server)
        return self._resolver

    def closeIdle(self):
        """Close the connections SMTP next hops keep open for reuse; fires when done."""
        hops = self._smtpHops()
        if self.default.fallback is not None:
            hops.append(self.default.fallback)
        return defer.gatherResults([hop.closeIdle() for hop in hops])

    def _smtpHops(self):
        return [hop for spec in self._specs() for hop in spec.smtpHops()]

    @property
    def unused(self):
        """No SMTP next hop has anything waiting or in flight, or a connection kept open."""
        return all(hop.unused for hop in self._smtpHops())

    def wrapUp(self):
        """The gateway is stopping: no SMTP next hop begins anything new (L{SMTPNextHop.wrapUp})."""
        for hop in self._smtpHops():
            hop.wrapUp()

    def revive(self):
        """Every SMTP next hop found dead is tried again (L{SMTPNextHop.revive})."""
        for hop in self._smtpHops():
            hop.revive()

    def retire(self):
        """A reload replaced this router: no SMTP next hop of it begins anything new (L{SMTPNextHop.retire})."""
        for hop in self._smtpHops():
            hop.retire()

    def cutShort(self):
        """The gateway is stopping: every SMTP next hop cuts its deliveries short (L{SMTPNextHop.cutShort})."""
        for hop in self._smtpHops():
            hop.cutShort()

    def __call__(self, message, recipient):
        domain = addressDomain(recipient)
        context = message.context
        for route, spec, domains in self.routes:
            if route.context_key is not None and context.get(route.context_key) == route.context_value:
                return spec.nextHop(domain)
            for d in domains:
                if domain == d or domain.endswith("." + d):
                    return spec.nextHop(domain)
        return self.default.nextHop(domain)
