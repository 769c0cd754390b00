"""
Next-hop selection for a recipient domain (RFC 5321 section 5.1).

L{lookupNextHops} turns a domain into an ordered list of C{(ip, 25)} next
hops: MX records sorted by preference (equal preferences shuffled), each MX
host's IPv4 then IPv6 addresses (taken from the additional section when the
server supplied them), or the domain's own addresses when it has no MX
("implicit MX"); a domain literal (C{[192.0.2.1]}) is its own next hop.
Failures are split into permanent (L{NoSuchDomain}, L{NullMX}) and
temporary (L{TemporaryLookupFailure}) so that the caller can bounce or
defer.

Only records owned by the name asked for (or by a name its CNAME records in
the same answer lead to) count, so an answer about another name cannot send
mail elsewhere; a CNAME loop is a temporary failure.  At most
C{MX_HOST_LIMIT} MX hosts are looked up, together, and at most
C{MX_ADDRESS_LIMIT} of their addresses tried; once one has addresses,
the others get C{HOST_GRACE_SECONDS} more, and the whole lookup takes at
most C{LOOKUP_SECONDS}.

An MX host that is the gateway itself (an address one of its own port 25
listeners accepts on, L{ownAddresses}) ends the list: it and every MX host
of the same or a worse preference are left out, as Postfix does, and when
that leaves none the mail "loops back to myself" (L{LoopsToSelf}).  Each
next hop also says whether its host is of the best preference left
(Postfix's best MX): mail that loops through it (its EHLO reply names the
gateway) bounces, through a worse one it is deferred.
"""

import random
import socket
import struct

from twisted.internet import defer
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from relaygw.logs import Logger
from relaygw.relay.nexthop import loopsBack
from relaygw.trust import isEndpoint, parseIP

log = Logger()

SMTP_PORT = 25

#: The best MX hosts tried for a domain (Postfix's smtp_mx_address_limit
#: counts 5 addresses): a domain publishing hundreds cannot hold a delivery
#: for hours of address lookups.
MX_HOST_LIMIT = 5

#: The addresses tried, best first, of those hosts (or of a domain without
#: MX): a host publishing hundreds of addresses cannot hold a delivery for
#: one connection timeout after another; room for an IPv4 and an IPv6
#: address of each host.
MX_ADDRESS_LIMIT = 2 * MX_HOST_LIMIT

#: Seconds a whole lookup may take (the MX query, then the hosts'
#: addresses, each of which the resolver may retry for up to a minute).
LOOKUP_SECONDS = 60.0

#: Seconds the other MX hosts' lookups may go on once one host has
#: addresses (a resolver's usual timeout): a host whose DNS never answers
#: is left out of this attempt rather than holding the domain's mail.
HOST_GRACE_SECONDS = 5.0


class NullMX(Exception):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""


class NoSuchDomain(Exception):
    """The domain does not exist, or has neither MX nor address records."""


class LoopsToSelf(Exception):
    """
    The domain's best MX host (or its own address) is the gateway itself.

    @ivar result: the mail's outcome (L{loopsBack}).
    """

    def __init__(self, domain):
        self.result = loopsBack(domain)
        Exception.__init__(self, self.result.text)


class TemporaryLookupFailure(Exception):
    """
    The DNS could not give an answer now (timeout, SERVFAIL, refusal...),
    or gave no address to send to.

    @ivar enhanced: the enhanced status code of the deferral (RFC 3463, as
        Postfix has them): 4.4.3, the DNS failed; 4.4.4, it answered, but
        with no next hop mail can go to.
    """

    def __init__(self, message, enhanced="4.4.3"):
        Exception.__init__(self, message)
        self.enhanced = enhanced


class StrictResolver(client.Resolver):
    """
    twisted.names' resolver, which matches a reply to its query by id and
    source alone, refusing a reply that is not a response (its QR bit
    clear) to a standard query, or whose question is not the one asked
    (RFC 5452 section 9.1): its RCODE and records are not a server's word
    about that name (an NXDOMAIN read from such a packet bounced mail at
    once).  Refused, the lookup fails as if the server had: a temporary
    failure.  A UDP reply cut short is asked again over TCP; a TCP reply
    cut short, or saying it was (TC), is refused too (read as it was, a
    domain's address records cut off bounced its mail as having none).

    A question already being asked is not asked again: every lookup of it
    waits for the one query (as twisted.names does), and that query is
    cancelled only once every lookup waiting for it has been (twisted.names
    cancels it with the first lookup, whichever it is, failing all the
    others: the grace or time limit of one domain's lookup deferred the
    mail of another domain sharing an MX host).
    """

    def __init__(self, *args, **kwargs):
        client.Resolver.__init__(self, *args, **kwargs)
        self._asking = {}  # (name, type, class) -> its _Question
        build = self.factory.buildProtocol

        def buildProtocol(addr):  # (TCP: one message per length-prefixed string)
            protocol = build(addr)
            received = protocol.stringReceived
            protocol.stringReceived = lambda packet: received(_truncatedIfCut(packet))
            return protocol

        self.factory.buildProtocol = buildProtocol

    def _lookup(self, name, cls, type, timeout):
        key = (name, type, cls)
        question = self._asking.get(key)
        if question is not None:
            return question.wait()
        question = self._asking[key] = _Question()
        d = question.wait()
        question.query = client.Resolver._lookup(self, name, cls, type, timeout)
        question.query.addBoth(self._answered, key, question)
        return d

    def _answered(self, result, key, question):
        if self._asking.get(key) is question:
            del self._asking[key]
        question.answer(result)

    def _connectedProtocol(self, interface=""):
        protocol = client.Resolver._connectedProtocol(self, interface)
        received = protocol.datagramReceived

        def datagramReceived(data, address):
            received(_truncatedIfCut(data), address)

        protocol.datagramReceived = datagramReceived
        return protocol

    def queryUDP(self, queries, timeout=None):
        return client.Resolver.queryUDP(self, queries, timeout).addCallback(self._answers, queries)

    def queryTCP(self, queries, timeout=10):
        return client.Resolver.queryTCP(self, queries, timeout).addCallback(self._answers, queries, overTCP=True)

    def _answers(self, message, queries, overTCP=False):
        if not message.answer or message.opCode != dns.OP_QUERY or _questions(message.queries) != _questions(queries):
            raise error.DNSServerError(message)
        if overTCP and message.trunc:  # (twisted.names would ask again over TCP, at once, without end)
            raise error.DNSServerError(message)
        return message


class _Question:
    """
    One question being asked (L{StrictResolver}): its query, and the
    lookups waiting for its answer.  The query is cancelled with the last
    of them; each other lookup cancelled just stops waiting.
    """

    query = None

    def __init__(self):
        self.waiting = []

    def wait(self):
        """A lookup waits for the answer: a Deferred that fires with it."""
        d = defer.Deferred(self._cancel)
        self.waiting.append(d)
        return d

    def answer(self, result):
        """The query's result (a Failure too) for every lookup still waiting."""
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(result)

    def _cancel(self, d):
        if d in self.waiting:
            self.waiting.remove(d)
        if not self.waiting and self.query is not None:
            self.query.cancel()  # (called already, it may still wait for a query asked again: that goes)


def _truncatedIfCut(data):
    """
    A reply with fewer records than its header counts (cut short on its
    way, the TC bit not set; twisted.names reads what is there), marked
    truncated, so that over UDP it is asked again over TCP (RFC 2181
    section 9), and over TCP refused: read as it is, its missing MX records
    made the domain's own address its next hop.
    """
    message = dns.Message()
    try:
        message.fromStr(data)
    except (EOFError, ValueError):
        return data  # (twisted.names drops it)
    sections = message.queries, message.answers, message.authority, message.additional
    if struct.unpack("!4H", data[4:12]) == tuple(map(len, sections)):
        return data
    return data[:2] + bytes([data[2] | 0x02]) + data[3:]


def _questions(queries):
    return [(_name(q.name), q.type, q.cls) for q in queries]


def makeResolver(server=None):
    """
    The resolver MX delivery uses: the DNS server C{server} (C{(host,
    port)}) alone, else the system's (the hosts file, then the servers of
    resolv.conf).  No cache of its own, as Postfix has none: the one
    L{client.createResolver} puts in its chain is filled only by a DNS
    server's factory, never by lookups through the chain.
    """
    if server is not None:
        return StrictResolver(servers=[server])
    from twisted.names import hosts, resolve

    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"), StrictResolver(b"/etc/resolv.conf")])


def _name(value):
    """A DNS name (L{dns.Name}, bytes or str) as lowercase str, no final dot."""
    if isinstance(value, dns.Name):
        value = value.name
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.rstrip(".").lower()


def _owned(records, name):
    """
    The Internet-class records in C{records} (RRHeaders) owned by C{name},
    or by a name the CNAME records among them lead to from it (a record of
    another class answers no question the gateway asks: RFC 1035 section
    4.1.1).

    @raise TemporaryLookupFailure: those CNAMEs loop (a resolver answers
        SERVFAIL for a loop; this reply came without one).
    """
    records = [rr for rr in records if rr.cls == dns.IN]
    onward = {}
    for rr in records:
        if rr.type == dns.CNAME:
            onward.setdefault(_name(rr.name), set()).add(_name(rr.payload.name))
    # The names reached from C{name}, each looked at once (a depth-first walk
    # that meets a name still on its path has found a loop).
    names, onPath, stack = {name}, {name}, [(name, iter(onward.get(name, ())))]
    while stack:
        owner, targets = stack[-1]
        target = next(targets, None)
        if target is None:
            stack.pop()
            onPath.discard(owner)
        elif target in onPath:
            raise TemporaryLookupFailure("%s: CNAME loop" % (name,))
        elif target not in names:
            names.add(target)
            onPath.add(target)
            stack.append((target, iter(onward.get(target, ()))))
    return [rr for rr in records if _name(rr.name) in names]


def _addresses(records, name):
    """The IPv4 then IPv6 addresses in C{records} (RRHeaders) owned by C{name} (L{_owned})."""
    v4, v6 = [], []
    for rr in _owned(records, name):
        if rr.type == dns.A:
            v4.append(rr.payload.dottedQuad())
        elif rr.type == dns.AAAA:
            v6.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
    return v4 + v6


def _nxdomain(failure):
    """
    Whether C{failure} says the name does not exist: NXDOMAIN from a server,
    or a local resolver's (authority's) "no such name".  The other
    L{error.DomainError} subclasses (SERVFAIL, REFUSED...) are temporary.
    """
    return failure.check(error.DNSNameError, error.AuthoritativeDomainError) or failure.type is error.DomainError


def _classify(failure, what):
    """
    Translate a resolver failure into L{NoSuchDomain} (NXDOMAIN) or
    L{TemporaryLookupFailure} (anything else).
    """
    if _nxdomain(failure):
        raise NoSuchDomain("%s: no such domain" % (what,))
    for kind, reason in _REASONS:
        if failure.check(kind):
            break
    else:  # (the text of a DNS error is the repr of the whole reply: not for a log line or a bounce)
        reason = failure.getErrorMessage() or failure.type.__name__
    raise TemporaryLookupFailure("%s: DNS lookup failed: %s" % (what, reason))


#: What a DNS failure says, for logs and the deferral's text.
_REASONS = (
    (error.DNSServerError, "server failure"),
    (error.DNSQueryRefusedError, "query refused"),
    (error.DNSFormatError, "format error"),
    (error.DNSNotImplementedError, "query not implemented"),
    (error.DNSUnknownError, "unknown error"),
    (defer.TimeoutError, "timed out"),
    (defer.CancelledError, "cancelled"),
)


async def _hostAddresses(resolver, host):
    """
    The addresses of C{host} from A and AAAA lookups: a list, or raises
    L{NoSuchDomain} / L{TemporaryLookupFailure} if both lookups failed.
    """
    results = await defer.DeferredList(
        [resolver.lookupAddress(host), resolver.lookupIPV6Address(host)],
        consumeErrors=True,
    )
    found, failures = [], []
    for success, result in results:
        if success:
            found.extend(_addresses(result[0], host))
        else:
            failures.append(result)
    if found or not failures:
        return found
    for f in failures:
        if not _nxdomain(f):
            _classify(f, host)
    _classify(failures[0], host)


def _nonlocalBind(family):
    """Whether the kernel lets a socket bind an address that is not the machine's (so binding proves nothing)."""
    path = "/proc/sys/net/ipv4/ip_nonlocal_bind" if family == socket.AF_INET else "/proc/sys/net/ipv6/ip_nonlocal_bind"
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def _local(address):
    """Whether C{address} (an L{ipaddress} address) is one of this machine's: it can be bound."""
    if address.is_loopback:
        return True
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    if _nonlocalBind(family):
        return False
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((str(address), 0))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _address(text):
    """L{parseIP}, or C{None} for text that is no address."""
    try:
        return parseIP(text)
    except ValueError:
        return None


def _literal(domain):
    """
    The address (text) of the domain literal C{domain} (RFC 5321 section
    4.1.3: C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}), or C{None} for a domain
    name.

    @raise NoSuchDomain: a literal that is no address a connection can go
        to (another tag, the unspecified or a multicast address).
    """
    if not domain.startswith("["):
        return None
    address = _address(domain[1:-1]) if domain.endswith("]") else None
    if address is None or not isEndpoint(address):
        raise NoSuchDomain("%s: not an address mail can go to" % (domain,))
    return str(address)


def ownAddresses(bound):
    """
    A predicate: whether mail sent to an address on port 25 would come back
    to this gateway, given what its listeners are bound to (C{bound}: the
    C{(interface, port)} pairs of L{relaygw.config.endpointPort}, C{""} for
    every address).  A listener bound to every address makes each of the
    machine's own addresses (loopback included) the gateway's.
    """
    interfaces = {interface for interface, port in filter(None, bound) if port == SMTP_PORT and interface != "unix"}
    explicit = {_address(interface) for interface in interfaces if interface}
    everywhere = "" in interfaces or any(address.is_unspecified for address in explicit if address is not None)

    def isSelf(ip):
        address = _address(ip)
        return address is not None and (address in explicit or (everywhere and _local(address)))

    return isSelf


def _beforeSelf(addresses, preferences, isSelf, domain, best=None):
    """
    C{addresses} (C{(ip, host)}, best first) up to the first MX host that
    is the gateway: only hosts of a better preference than it stay.

    @param best: the best preference the domain publishes.
    @raise LoopsToSelf: when none stays, and the gateway is of the best
        preference; L{TemporaryLookupFailure} when none stays because no
        address of a better host was found (Postfix's "unable to find
        primary relay": the gateway as a backup MX waits for the primary's
        DNS rather than bounce the mail).
    """
    own = [preferences[host] for ip, host in addresses if isSelf(ip)]
    if not own:
        return addresses
    kept = [(ip, host) for ip, host in addresses if preferences[host] < min(own)]
    if not kept:
        if best is not None and best < min(own):
            raise TemporaryLookupFailure("%s: unable to find primary relay (no address of an MX host better "
                                         "than this gateway)" % (domain,), "4.4.4")
        raise LoopsToSelf(domain)
    log.info("{domain}: MX hosts of preference {preference} or worse left out: the gateway is one of them",
             domain=domain, preference=min(own))
    return kept


def _sortMX(records):
    """MX RRHeaders sorted by preference, equal preferences in random order."""
    return sorted(records, key=lambda rr: (rr.payload.preference, random.random()))


async def _lookupNextHops(resolver, domain, clock, isSelf):
    domain = _name(domain)
    address = _literal(domain)
    if address is not None:  # (its own next hop, as Postfix has it; no DNS name to ask about)
        preferences = {address: 0}
        return _unique(_beforeSelf([(address, address)], preferences, isSelf, domain), preferences)
    try:
        answers, authority, additional = await resolver.lookupMailExchange(domain)
    except Exception:
        _classify(Failure(), domain)

    mxs = [rr for rr in _owned(answers, domain) if rr.type == dns.MX]
    if not mxs:
        # Implicit MX: the domain itself (RFC 5321 section 5.1).
        try:
            addresses = await _hostAddresses(resolver, domain)
        except NoSuchDomain:
            raise NoSuchDomain("%s: no such domain" % (domain,))
        if not addresses:
            raise NoSuchDomain("%s: no MX and no address records" % (domain,))
        log.debug("{domain}: implicit MX {addresses}", domain=domain, addresses=addresses)
        preferences = {domain: 0}
        hops = _beforeSelf([(ip, domain) for ip in addresses], preferences, isSelf, domain)
        return _unique(hops, preferences)[:MX_ADDRESS_LIMIT]

    mxs = _sortMX(mxs)
    hosts = [_name(rr.payload.name) for rr in mxs]
    if len(mxs) == 1 and mxs[0].payload.preference == 0 and hosts == [""]:
        raise NullMX("%s does not accept mail (null MX)" % (domain,))
    preferences = {}
    for host, rr in zip(hosts, mxs):
        preferences.setdefault(host, rr.payload.preference)
    hosts = [host for host in hosts if host][:MX_HOST_LIMIT]  # (a "." among others, or not preference 0: no host)

    async def resolve(host):
        known = _addresses(additional, host)
        if known:
            return known
        return await _hostAddresses(resolver, host)

    results = await _settled([defer.Deferred.fromCoroutine(resolve(host)) for host in hosts], clock)
    addresses, temporary = [], None
    for host, outcome in zip(hosts, results):
        if outcome is None:
            log.info("{domain}: MX host {host} unanswered after {grace}s more; not tried this time",
                     domain=domain, host=host, grace=HOST_GRACE_SECONDS)
            continue
        success, result = outcome
        if success:
            addresses.extend((ip, host) for ip in result)
        elif result.check(NoSuchDomain):
            log.info("{domain}: MX host {host} does not exist", domain=domain, host=host)
        elif result.check(TemporaryLookupFailure):
            temporary = result.value
        else:  # (a name the resolver cannot even encode, say): that host is skipped
            temporary = TemporaryLookupFailure("%s: %s" % (host, result.getErrorMessage()))
    if not addresses:
        # An MX pointing nowhere is usually a transient misconfiguration:
        # defer rather than bounce, and let the queue lifetime decide.
        raise TemporaryLookupFailure(
            "%s: no address for any MX host%s" % (domain, ": %s" % (temporary,) if temporary else ""),
            "4.4.3" if temporary else "4.4.4",
        )
    log.debug("{domain}: MX {hosts} -> {addresses}", domain=domain, hosts=hosts, addresses=addresses)
    best = min(preferences[host] for host in hosts)
    return _unique(_beforeSelf(addresses, preferences, isSelf, domain, best), preferences)[:MX_ADDRESS_LIMIT]


def _settled(lookups, clock):
    """
    Wait for the host lookups C{lookups}: all of them, or, once one has
    found addresses, the others for C{HOST_GRACE_SECONDS} more (those still
    going then are cancelled).

    @return: a L{Deferred} firing with a list, one entry per lookup:
        C{(success, result)} as L{defer.DeferredList} gives, or C{None} for
        a lookup cut by the grace.  Cancelling it cancels them all.
    """
    results = [None] * len(lookups)
    left = [len(lookups)]
    grace, finished = [], []

    def finish(_=None):
        finished.append(True)
        for timer in grace:
            if timer.active():
                timer.cancel()
        for i, lookup in enumerate(lookups):
            if results[i] is None:
                lookup.cancel()  # (its outcome, a CancelledError, is dropped by settle)

    def cut():
        finish()
        done.callback(results)

    def settle(result, i):
        if finished:
            return
        results[i] = (not isinstance(result, Failure), result)
        left[0] -= 1
        if not left[0]:
            cut()
        elif results[i][0] and result and not grace:
            grace.append(clock.callLater(HOST_GRACE_SECONDS, cut))

    done = defer.Deferred(finish)
    for i, lookup in enumerate(lookups):
        lookup.addBoth(settle, i)
    if not lookups:
        done.callback(results)
    return done


def _unique(addresses, preferences):
    """
    C{(ip, 25, name, best)} tuples in order, each address once; C{best}:
    its host (C{name}) is of the first one's preference (C{preferences}).
    """
    seen, hops, best = set(), [], preferences[addresses[0][1]]
    for ip, name in addresses:
        if ip not in seen:
            seen.add(ip)
            hops.append((ip, SMTP_PORT, name, preferences[name] == best))
    return hops


def _nobody(ip):
    return False


def lookupNextHops(resolver, domain, withNames=False, clock=None, isSelf=_nobody):
    """
    Find the next hops for mail to C{domain}.

    @param resolver: a L{twisted.names} L{IResolver<twisted.internet.interfaces.IResolver>}.
    @param domain: the recipient domain (str).
    @param withNames: also give each address's host name (the MX host, or
        the domain for an implicit MX), which TLS verification checks, and
        whether that host is of the best preference left (Postfix's best
        MX; every host of a domain without MX is).
    @param isSelf: whether an address is the gateway's own (L{ownAddresses}).
    @return: a L{Deferred} firing with a list of C{(ip, 25)} tuples
        (C{(ip, 25, name, best)} with C{withNames}), best first, or failing with
        L{NullMX}, L{NoSuchDomain}, L{LoopsToSelf} (permanent) or L{TemporaryLookupFailure}
        (also after C{LOOKUP_SECONDS}).  Cancelling it ends the lookup.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    d = defer.Deferred.fromCoroutine(_lookupNextHops(resolver, domain, clock, isSelf))
    d.addTimeout(LOOKUP_SECONDS, clock, onTimeoutCancel=lambda result, timeout: Failure(
        TemporaryLookupFailure("%s: DNS lookup timed out after %gs" % (domain, timeout))))
    return d if withNames else d.addCallback(lambda hops: [hop[:2] for hop in hops])
