"""
Tests for L{relaygw.relay.mx} against a real L{twisted.names} server on
127.0.0.1 (UDP and TCP) serving zones built in code.
"""

from twisted.internet import defer, protocol, reactor, task
from twisted.names import authority, client, common, dns, error, server
from twisted.trial import unittest

from relaygw.relay import mx
from relaygw.relay.mx import LoopsToSelf, NoSuchDomain, NullMX, TemporaryLookupFailure, lookupNextHops, ownAddresses
from tests.dnsfuzz import DNSOverTCP, listenDNS


def _zone(origin, records):
    """An in-memory authority for C{origin} holding C{records}."""
    zone = authority.FileAuthority(None)
    zone.soa = (
        origin,
        dns.Record_SOA(
            mname=b"ns." + origin,
            rname=b"hostmaster." + origin,
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=60,
            ttl=60,
        ),
    )
    zone.records = {name.lower(): recs for name, recs in records.items()}
    return zone


class _Broken(common.ResolverBase):
    """Fails (the server answers SERVFAIL) for names under broken.test."""

    def _lookup(self, name, cls, type, timeout):
        if name.lower().endswith(b"broken.test"):
            return defer.fail(RuntimeError("backend down"))
        return defer.fail(error.DomainError(name))


class _Hostile(common.ResolverBase):
    """
    Answers the DNS server gives for names under hostile.test: records
    owned by other names, a CNAME chain, and a name it never answers.
    """

    def __init__(self):
        common.ResolverBase.__init__(self)
        self.hanging = []
        self.hangingTypes = []  # (the query type of each of C{hanging})

    def _lookup(self, name, cls, type, timeout):
        name = name.lower()
        rr = lambda owner, payload: dns.RRHeader(owner, payload.TYPE, payload=payload, ttl=60)  # noqa: E731
        if name == b"wrongowner.hostile.test" and type == dns.MX:
            return defer.succeed(([rr(b"wrongowner.hostile.test", dns.Record_MX(10, b"mx2.example.test")),
                                   rr(b"elsewhere.test", dns.Record_MX(5, b"mx.example.net"))], [],
                                  [rr(b"mx2.example.test", dns.Record_A("192.0.2.66"))]))
        if name == b"alias.hostile.test" and type == dns.MX:
            return defer.succeed(([rr(b"alias.hostile.test", dns.Record_CNAME(b"target.hostile.test")),
                                   rr(b"target.hostile.test", dns.Record_MX(10, b"mx2.example.test"))], [], []))
        if name == b"chaos.hostile.test" and type == dns.MX:  # (a record of another class: no answer to an IN question)
            return defer.succeed(([dns.RRHeader(name, dns.MX, dns.CH, 60, dns.Record_MX(0, b"mx.example.net")),
                                   rr(name, dns.Record_MX(10, b"mx2.example.test"))], [], []))
        if name == b"loop.hostile.test":
            return defer.succeed(([rr(b"loop.hostile.test", dns.Record_CNAME(b"loop2.hostile.test")),
                                   rr(b"loop2.hostile.test", dns.Record_CNAME(b"loop.hostile.test"))], [], []))
        if name == b"hang.hostile.test":
            d = defer.Deferred()
            self.hanging.append(d)
            self.hangingTypes.append(type)
            return d
        return defer.fail(error.DomainError(name))


def _listenDNS(case, factory, datagrams):
    """A DNS server on 127.0.0.1, TCP C{factory} and UDP C{datagrams} on one port (stopped at C{case}'s end): the port."""
    tcp, udp = listenDNS(factory, datagrams)
    case.addCleanup(tcp.stopListening)
    case.addCleanup(udp.stopListening)
    return tcp.getHost().port


class _Recording:
    """Wraps a resolver and records the address lookups made through it."""

    def __init__(self, resolver):
        self.resolver = resolver
        self.addressLookups = []

    def lookupMailExchange(self, name, timeout=None):
        return self.resolver.lookupMailExchange(name, timeout)

    def lookupAddress(self, name, timeout=None):
        self.addressLookups.append(("A", name))
        return self.resolver.lookupAddress(name, timeout)

    def lookupIPV6Address(self, name, timeout=None):
        self.addressLookups.append(("AAAA", name))
        return self.resolver.lookupIPV6Address(name, timeout)


EXAMPLE_TEST = {
    b"example.test": [
        dns.Record_MX(20, b"mx2.example.test"),
        dns.Record_MX(30, b"mx.example.net"),
        dns.Record_MX(10, b"mx1.example.test"),
    ],
    b"mx1.example.test": [dns.Record_A("192.0.2.1"), dns.Record_AAAA("2001:db8::1")],
    b"mx2.example.test": [dns.Record_A("192.0.2.2")],
    b"implicit.example.test": [dns.Record_A("192.0.2.10"), dns.Record_AAAA("2001:db8::10")],
    b"nullmx.example.test": [dns.Record_MX(0, b"")],
    b"noaddr.example.test": [dns.Record_TXT(b"no mail here")],
    b"deadmx.example.test": [dns.Record_MX(10, b"gone.example.test")],
    b"partial.example.test": [
        dns.Record_MX(10, b"mx.broken.test"),
        dns.Record_MX(20, b"mx2.example.test"),
    ],
    b"tempmx.example.test": [dns.Record_MX(10, b"mx.broken.test")],
    b"deadprimary.example.test": [dns.Record_MX(10, b"gone.example.test"), dns.Record_MX(20, b"mx2.example.test")],
    b"badname.example.test": [dns.Record_MX(10, b"\xc3\xa9t\xc3\xa9.example.test"),
                              dns.Record_MX(20, b"mx2.example.test")],
    b"notnull.example.test": [dns.Record_MX(10, b"")],
    b"silentbackup.example.test": [dns.Record_MX(10, b"mx2.example.test"), dns.Record_MX(20, b"hang.hostile.test")],
    b"silentbest.example.test": [dns.Record_MX(10, b"hang.hostile.test"), dns.Record_MX(20, b"mx2.example.test")],
    b"slowonly.example.test": [dns.Record_MX(10, b"hang.hostile.test")],
    b"many.example.test": [dns.Record_MX(i, b"m%d.example.test" % i) for i in range(1, 9)],
    **{b"m%d.example.test" % i: [dns.Record_A("192.0.2.%d" % (100 + i))] for i in range(1, 9)},
    b"wide.example.test": [dns.Record_MX(10, b"w1.example.test"), dns.Record_MX(20, b"w2.example.test")],
    b"w1.example.test": [dns.Record_A("198.18.1.%d" % i) for i in range(1, 26)],
    b"w2.example.test": [dns.Record_A("198.18.2.%d" % i) for i in range(1, 26)],
    b"widehost.example.test": [dns.Record_A("198.18.3.%d" % i) for i in range(1, 26)],
}

EXAMPLE_NET = {
    b"mx.example.net": [dns.Record_A("198.51.100.7"), dns.Record_AAAA("2001:db8::7")],
}


class LookupNextHopsTests(unittest.TestCase):
    def setUp(self):
        self.hostile = _Hostile()
        factory = server.DNSServerFactory(
            authorities=[
                _zone(b"example.test", EXAMPLE_TEST),
                _zone(b"example.net", EXAMPLE_NET),
                self.hostile,
                _Broken(),
            ]
        )
        self.port = port = _listenDNS(self, factory, dns.DNSDatagramProtocol(factory))
        self.resolver = _Recording(client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor))

    @defer.inlineCallbacks
    def test_mxOrdering(self):
        """
        MX hosts come in preference order, each host's IPv4 then IPv6
        addresses; addresses in the additional section are not looked up
        again, the out-of-zone host is.
        """
        hops = yield lookupNextHops(self.resolver, "Example.Test")
        self.assertEqual(
            hops,
            [
                ("192.0.2.1", 25),
                ("2001:db8::1", 25),
                ("192.0.2.2", 25),
                ("198.51.100.7", 25),
                ("2001:db8::7", 25),
            ],
        )
        looked = {name for kind, name in self.resolver.addressLookups}
        self.assertEqual(looked, {"mx.example.net"})

    @defer.inlineCallbacks
    def test_namesForTLSVerification(self):
        """With names, each address carries the host its certificate must match."""
        hops = yield lookupNextHops(self.resolver, "Example.Test", withNames=True)
        names = {ip: name for ip, port, name, best in hops}
        self.assertEqual(names["198.51.100.7"], "mx.example.net")
        self.assertNotIn("example.test", names.values())
        implicit = yield lookupNextHops(self.resolver, "implicit.example.test", withNames=True)
        self.assertEqual(implicit[0][:3], ("192.0.2.10", 25, "implicit.example.test"))

    @defer.inlineCallbacks
    def test_bestMX(self):
        """
        With names, each address says whether its host is of the best
        preference left (Postfix's best MX), which decides whether a loop
        through it bounces; every address of a domain without MX is.
        """
        hops = yield lookupNextHops(self.resolver, "Example.Test", withNames=True)
        self.assertEqual([(ip, best) for ip, port, name, best in hops], [
            ("192.0.2.1", True), ("2001:db8::1", True), ("192.0.2.2", False), ("198.51.100.7", False),
            ("2001:db8::7", False)])
        hops = yield lookupNextHops(self.resolver, "example.test", withNames=True, isSelf=lambda ip: ip == "192.0.2.2")
        self.assertEqual([(ip, best) for ip, port, name, best in hops], [("192.0.2.1", True), ("2001:db8::1", True)])
        hops = yield lookupNextHops(self.resolver, "example.test", withNames=True,
                                    isSelf=lambda ip: ip == "2001:db8::7")
        self.assertEqual([best for ip, port, name, best in hops], [True, True, False])
        implicit = yield lookupNextHops(self.resolver, "implicit.example.test", withNames=True)
        self.assertEqual([best for ip, port, name, best in implicit], [True, True])

    @defer.inlineCallbacks
    def test_implicitMX(self):
        """A domain without MX records is its own next hop."""
        hops = yield lookupNextHops(self.resolver, "implicit.example.test")
        self.assertEqual(hops, [("192.0.2.10", 25), ("2001:db8::10", 25)])

    @defer.inlineCallbacks
    def test_selfEndsTheList(self):
        """
        An MX host that is the gateway itself is left out with every host of
        the same or a worse preference; only better ones stay.
        """
        hops = yield lookupNextHops(self.resolver, "example.test", isSelf=lambda ip: ip == "192.0.2.2")
        self.assertEqual(hops, [("192.0.2.1", 25), ("2001:db8::1", 25)])

    def test_bestMXIsSelf(self):
        """The best MX host is the gateway: L{LoopsToSelf}, whatever worse hosts there are."""
        d = lookupNextHops(self.resolver, "example.test", isSelf=lambda ip: ip == "2001:db8::1")
        d = self.assertFailure(d, LoopsToSelf)
        d.addCallback(lambda e: self.assertEqual(str(e), "mail for example.test loops back to myself"))
        return d

    @defer.inlineCallbacks
    def test_backupWithoutPrimary(self):
        """
        The gateway is a backup MX (192.0.2.2, preference 20) and no address
        of the better host is found (its lookup fails for now, or it does
        not exist): deferred 4.4.4, as Postfix's "unable to find primary
        relay"; it used to bounce as a loop (5.4.6).
        """
        for domain in ("partial.example.test", "deadprimary.example.test"):
            d = lookupNextHops(self.resolver, domain, isSelf=lambda ip: ip == "192.0.2.2")
            e = yield self.assertFailure(d, TemporaryLookupFailure)
            self.assertEqual(e.enhanced, "4.4.4")
            self.assertIn("unable to find primary relay", str(e))
        self.assertTrue(self.flushLoggedErrors(RuntimeError))  # (mx.broken.test's resolver)

    def test_implicitMXIsSelf(self):
        """A domain without MX records whose address is the gateway's: L{LoopsToSelf}."""
        d = lookupNextHops(self.resolver, "implicit.example.test", isSelf=lambda ip: ip == "192.0.2.10")
        return self.assertFailure(d, LoopsToSelf)

    def test_nullMX(self):
        """A single MX "." of preference 0 fails with L{NullMX}."""
        return self.assertFailure(lookupNextHops(self.resolver, "nullmx.example.test"), NullMX)

    def test_nxdomain(self):
        """A domain that does not exist fails with L{NoSuchDomain}."""
        return self.assertFailure(lookupNextHops(self.resolver, "nosuch.example.test"), NoSuchDomain)

    def test_noAddress(self):
        """A domain with neither MX nor address records fails with L{NoSuchDomain}."""
        return self.assertFailure(lookupNextHops(self.resolver, "noaddr.example.test"), NoSuchDomain)

    @defer.inlineCallbacks
    def test_servfail(self):
        """A SERVFAIL for the MX query is a L{TemporaryLookupFailure}."""
        yield self.assertFailure(lookupNextHops(self.resolver, "broken.test"), TemporaryLookupFailure)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    def test_mxHostMissing(self):
        """MX hosts that do not exist are a temporary failure, not a bounce."""
        return self.assertFailure(lookupNextHops(self.resolver, "deadmx.example.test"), TemporaryLookupFailure)

    @defer.inlineCallbacks
    def test_mxHostTemporaryFailure(self):
        """
        An MX host whose addresses cannot be looked up is skipped when
        another host resolves, and makes the lookup temporary when none does.
        """
        hops = yield lookupNextHops(self.resolver, "partial.example.test")
        self.assertEqual(hops, [("192.0.2.2", 25)])
        yield self.assertFailure(lookupNextHops(self.resolver, "tempmx.example.test"), TemporaryLookupFailure)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    @defer.inlineCallbacks
    def test_unencodableMXHostSkipped(self):
        """An MX host whose name the resolver cannot encode is skipped; the domain's other host still serves."""
        hops = yield lookupNextHops(self.resolver, "badname.example.test")
        self.assertEqual(hops, [("192.0.2.2", 25)])

    @defer.inlineCallbacks
    def test_recordsOfOtherNamesIgnored(self):
        """
        MX and address records an answer gives for other names are not
        used (the additional A record for mx2 is, being mx2's); a CNAME in
        the answer leads to its target's records.
        """
        hops = yield lookupNextHops(self.resolver, "wrongowner.hostile.test", withNames=True)
        self.assertEqual(hops, [("192.0.2.66", 25, "mx2.example.test", True)])
        hops = yield lookupNextHops(self.resolver, "alias.hostile.test")
        self.assertEqual(hops, [("192.0.2.2", 25)])

    @defer.inlineCallbacks
    def test_recordsOfAnotherClassIgnored(self):
        """An MX record of the CHAOS class in the answer to an Internet-class question is not used."""
        hops = yield lookupNextHops(self.resolver, "chaos.hostile.test")
        self.assertEqual(hops, [("192.0.2.2", 25)])

    def test_nullMXIsPreferenceZero(self):
        """An MX "." of another preference is no null MX (RFC 7505): no host, a temporary failure."""
        return self.assertFailure(lookupNextHops(self.resolver, "notnull.example.test"), TemporaryLookupFailure)

    @defer.inlineCallbacks
    def test_mxHostsLimited(self):
        """Of eight MX hosts, the best five are tried, in preference order."""
        hops = yield lookupNextHops(self.resolver, "many.example.test")
        self.assertEqual(hops, [("192.0.2.%d" % (100 + i), 25) for i in range(1, 6)])

    @defer.inlineCallbacks
    def test_addressesLimited(self):
        """
        MX hosts (or a domain without MX) with 25 addresses each: the best
        MX_ADDRESS_LIMIT addresses are tried, in order, rather than one
        connection timeout after another for each of them.
        """
        hops = yield lookupNextHops(self.resolver, "wide.example.test")
        self.assertEqual(hops, [("198.18.1.%d" % i, 25) for i in range(1, mx.MX_ADDRESS_LIMIT + 1)])
        hops = yield lookupNextHops(self.resolver, "widehost.example.test")
        self.assertEqual(hops, [("198.18.3.%d" % i, 25) for i in range(1, mx.MX_ADDRESS_LIMIT + 1)])

    @defer.inlineCallbacks
    def test_lookupTimeBounded(self):
        """A lookup the DNS never answers ends, a temporary failure, after LOOKUP_SECONDS."""
        self.patch(mx, "LOOKUP_SECONDS", 0.3)
        started = reactor.seconds()
        failure = yield self.assertFailure(lookupNextHops(self.resolver, "hang.hostile.test"), TemporaryLookupFailure)
        self.assertLess(reactor.seconds() - started, 2)
        self.assertEqual(str(failure), "hang.hostile.test: DNS lookup timed out after 0.3s")
        yield task.deferLater(reactor, 1.2, lambda: None)  # (the resolver forgets the query after its first timeout)


    @defer.inlineCallbacks
    def test_silentHostLeftOut(self):
        """
        Once one MX host has addresses, a host whose DNS never answers gets
        HOST_GRACE_SECONDS more and is then left out, better or worse
        (it used to hold the domain's mail for the whole LOOKUP_SECONDS).
        """
        self.patch(mx, "HOST_GRACE_SECONDS", 0.3)
        for domain in ("silentbackup.example.test", "silentbest.example.test"):
            started = reactor.seconds()
            hops = yield lookupNextHops(self.resolver, domain)
            self.assertEqual(hops, [("192.0.2.2", 25)])
            self.assertLess(reactor.seconds() - started, 2)
        yield task.deferLater(reactor, 1.2, lambda: None)  # (the resolver forgets the query after its first timeout)

    @defer.inlineCallbacks
    def test_answerWithinGraceKept(self):
        """A better host answering within the grace still comes first."""
        self.patch(mx, "HOST_GRACE_SECONDS", 5)
        pending = lookupNextHops(self.resolver, "silentbest.example.test")
        while len(self.hostile.hanging) < 2:  # (its A and AAAA queries)
            yield task.deferLater(reactor, 0.01, lambda: None)
        found = dns.RRHeader(b"hang.hostile.test", dns.A, payload=dns.Record_A("192.0.2.77"), ttl=60)
        for d in self.hostile.hanging:
            d.callback(([found] if d is self.hostile.hanging[0] else [], [], []))
        hops = yield pending
        self.assertEqual(hops, [("192.0.2.77", 25), ("192.0.2.2", 25)])

    @defer.inlineCallbacks
    def test_sharedQueryOutlivesAnotherLookup(self):
        """
        Two domains share an MX host whose DNS is slow: the lookup of the
        first, which has another host, leaves it out after the grace; the
        second, which has no other, still gets its address when the answer
        comes.  (The resolver asks a question once for every lookup waiting
        on it: the first's giving up failed the second's at once, and its
        mail was deferred.)
        """
        self.patch(mx, "HOST_GRACE_SECONDS", 0.2)
        resolver = mx.makeResolver(("127.0.0.1", self.port))
        first = lookupNextHops(resolver, "silentbackup.example.test")
        while len(self.hostile.hanging) < 2:  # (the A and AAAA queries of its silent host)
            yield task.deferLater(reactor, 0.01, lambda: None)
        second = lookupNextHops(resolver, "slowonly.example.test")
        second.addErrback(lambda failure: failure)  # (held: it may fail before it is waited for)
        hops = yield first
        self.assertEqual(hops, [("192.0.2.2", 25)])
        self.assertEqual(len(self.hostile.hanging), 2)  # (the second asked nothing again: it waits on those)
        found = dns.RRHeader(b"hang.hostile.test", dns.A, payload=dns.Record_A("192.0.2.77"), ttl=60)
        for d, qtype in zip(self.hostile.hanging, self.hostile.hangingTypes):
            d.callback(([found] if qtype == dns.A else [], [], []))
        hops = yield second
        self.assertEqual(hops, [("192.0.2.77", 25)])
        yield task.deferLater(reactor, 1.2, lambda: None)  # (the resolver forgets the query after its first timeout)

    @defer.inlineCallbacks
    def test_sharedQueryCancelledWithTheLast(self):
        """
        A question two lookups wait for is still asked once the first is
        cancelled, and no longer (not asked again at the resolver's next
        timeout) once the second is too, also after it has been asked again.
        """
        resolver = mx.StrictResolver(servers=[("127.0.0.1", self.port)], timeout=(0.2, 0.5, 5))
        lookups = [lookupNextHops(resolver, "hang.hostile.test") for _ in range(2)]
        while len(self.hostile.hanging) < 2:  # (asked, and asked again after 0.2 s)
            yield task.deferLater(reactor, 0.01, lambda: None)
        lookups[0].cancel()
        yield self.assertFailure(lookups[0], TemporaryLookupFailure)
        self.assertFalse(lookups[1].called)
        lookups[1].cancel()
        yield self.assertFailure(lookups[1], TemporaryLookupFailure)
        yield task.deferLater(reactor, 0.8, lambda: None)
        self.assertEqual(len(self.hostile.hanging), 2)

    @defer.inlineCallbacks
    def test_addressLiteral(self):
        """
        A domain literal (RFC 5321 section 4.1.3) is its own next hop, no
        DNS asked (a query for the name "[192.0.2.5]" got NXDOMAIN: its
        mail bounced 5.1.2 as if the domain did not exist).
        """
        hops = yield lookupNextHops(_Recording(None), "[192.0.2.5]", withNames=True)
        self.assertEqual(hops, [("192.0.2.5", 25, "192.0.2.5", True)])
        hops = yield lookupNextHops(_Recording(None), "[IPv6:2001:DB8::5]")
        self.assertEqual(hops, [("2001:db8::5", 25)])

    def test_addressLiteralIsSelf(self):
        """A domain literal that is the gateway's own address: L{LoopsToSelf}."""
        d = lookupNextHops(_Recording(None), "[192.0.2.5]", isSelf=lambda ip: ip == "192.0.2.5")
        return self.assertFailure(d, LoopsToSelf)

    @defer.inlineCallbacks
    def test_addressLiteralUnusable(self):
        """
        A domain literal that is no address the gateway can connect to (a
        tag other than IPv6, the unspecified or a multicast address) is
        L{NoSuchDomain}.
        """
        for literal in ("[x-tag:abc]", "[0.0.0.0]", "[IPv6:::]", "[224.0.0.1]", "[IPv6:ff02::1]", "[1.2.3]"):
            yield self.assertFailure(lookupNextHops(_Recording(None), literal), NoSuchDomain)

    def test_cnameLoop(self):
        """A CNAME loop in a NOERROR answer is a temporary failure (a resolver's SERVFAIL), not "no MX"."""
        d = self.assertFailure(lookupNextHops(self.resolver, "loop.hostile.test"), TemporaryLookupFailure)
        return d.addCallback(lambda failure: self.assertEqual(str(failure), "loop.hostile.test: CNAME loop"))


class _BadReply(protocol.DatagramProtocol):
    """
    Answers each query with a packet of the same id saying NXDOMAIN: no
    response (QR clear), or a response about another name.
    """

    def __init__(self, answer, otherName):
        self.answer, self.otherName = answer, otherName

    def datagramReceived(self, data, address):
        query = dns.Message()
        query.fromStr(data)
        reply = dns.Message(id=query.id, answer=self.answer, rCode=dns.ENAME)
        reply.queries = [dns.Query(b"other.test", q.type, q.cls) for q in query.queries] \
            if self.otherName else query.queries
        self.transport.write(reply.toStr(), address)


def _cutReply(data):
    """The reply to the query C{data}: one A record, cut off after the question (its header still counts the record)."""
    query = dns.Message()
    query.fromStr(data)
    reply = dns.Message(id=query.id, answer=1)
    reply.queries = query.queries
    whole = len(reply.toStr())
    reply.answers = [dns.RRHeader(query.queries[0].name.name, payload=dns.Record_A("192.0.2.99"))]
    return reply.toStr()[:whole]


class _CutReply(protocol.DatagramProtocol):
    """Answers each query over UDP with L{_cutReply}."""

    def datagramReceived(self, data, address):
        self.transport.write(_cutReply(data), address)


class _AlwaysTruncated(protocol.Protocol):
    """A DNS server over TCP answering each query with an empty reply, its TC bit set; counts the queries."""

    def dataReceived(self, data):
        self.factory.queries += 1
        query = dns.Message()
        query.fromStr(data[2:])
        reply = dns.Message(id=query.id, answer=1, trunc=1)
        reply.queries = query.queries
        reply = reply.toStr()
        self.transport.write(len(reply).to_bytes(2, "big") + reply)


class StrictResolverTests(unittest.TestCase):
    """A reply that is not the server's word about the name asked is not believed: a temporary failure."""

    def lookup(self, server):
        udp = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        resolver = mx.makeResolver(("127.0.0.1", udp.getHost().port))
        return self.assertFailure(lookupNextHops(resolver, "example.test"), TemporaryLookupFailure)

    def test_notAResponse(self):
        return self.lookup(_BadReply(answer=0, otherName=False))

    def test_anotherQuestion(self):
        return self.lookup(_BadReply(answer=1, otherName=True))

    @defer.inlineCallbacks
    def test_cutReplyAskedOverTCP(self):
        """
        A UDP reply missing the records its header counts, without the TC
        bit, is asked again over TCP: read as it was, "no MX" made the
        domain's own address (here none: a bounce) its next hop.
        """
        factory = server.DNSServerFactory(authorities=[_zone(b"example.test", EXAMPLE_TEST)])
        resolver = mx.makeResolver(("127.0.0.1", _listenDNS(self, factory, _CutReply())))
        hops = yield lookupNextHops(resolver, "example.test")
        self.assertEqual(hops[0], ("192.0.2.1", 25))
        for connection in resolver.connections:  # (twisted.names keeps them open)
            connection.transport.loseConnection()
        yield task.deferLater(reactor, 0.1, lambda: None)


    @defer.inlineCallbacks
    def test_cutReplyOverTCPRefused(self):
        """
        A TCP reply missing the records its header counts is refused, a
        temporary failure: read as it was, the domain had neither MX nor
        address records, and its mail bounced.
        """
        factory = protocol.ServerFactory.forProtocol(DNSOverTCP)
        factory.answer, factory.connections = _cutReply, []
        resolver = mx.makeResolver(("127.0.0.1", _listenDNS(self, factory, _CutReply())))
        yield self.assertFailure(lookupNextHops(resolver, "example.test"), TemporaryLookupFailure)
        for connection in resolver.connections:  # (twisted.names keeps them open)
            connection.transport.loseConnection()
        yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def test_truncatedOverTCPIsNotAskedAgain(self):
        """
        A reply over TCP with its TC bit set (it cannot be cut short: a
        server saying so is broken, or hostile) is a temporary failure, not
        a reason to ask again: twisted.names asked again over TCP at each
        reply, as fast as the server answered, until the lookup's time ran out.
        """
        self.patch(mx, "LOOKUP_SECONDS", 0.5)
        factory = protocol.ServerFactory.forProtocol(_AlwaysTruncated)
        factory.queries = 0
        resolver = mx.makeResolver(("127.0.0.1", _listenDNS(self, factory, _CutReply())))
        yield self.assertFailure(lookupNextHops(resolver, "example.test"), TemporaryLookupFailure)
        self.assertEqual(factory.queries, 1)
        for connection in resolver.connections:  # (twisted.names keeps them open)
            connection.transport.loseConnection()
        yield task.deferLater(reactor, 0.1, lambda: None)


class LongCNAMEChainTests(unittest.TestCase):
    """
    L{mx._owned} on an answer holding a long CNAME chain (records in
    reverse order, as a hostile zone may serve them over TCP) runs in the
    reactor thread: it must not take seconds.
    """

    def test_longChainIsCheap(self):
        import time

        from twisted.names import dns

        from relaygw.relay import mx

        n = 3000
        records = [dns.RRHeader(b"c%d.example" % i if i else b"example", dns.CNAME,
                                payload=dns.Record_CNAME(b"c%d.example" % (i + 1))) for i in range(n)]
        records.reverse()
        started = time.process_time()
        owned = mx._owned(records, "example")
        took = time.process_time() - started
        self.assertEqual(len(owned), n)
        self.assertLess(took, 0.25, "%d CNAME records took %.2fs of CPU in the reactor thread" % (n, took))
        # The same chain closed into a loop at its far end is still found.
        looped = records + [dns.RRHeader(b"c%d.example" % n, dns.CNAME, payload=dns.Record_CNAME(b"c7.example"))]
        self.assertRaises(mx.TemporaryLookupFailure, mx._owned, looped, "example")


class OwnAddressesTests(unittest.TestCase):
    """L{ownAddresses}: which addresses are the gateway's own port 25, from what its listeners bind."""

    def test_explicitInterface(self):
        isSelf = ownAddresses([("192.0.2.1", 25), ("2001:db8::5", 25)])
        self.assertTrue(isSelf("192.0.2.1"))
        self.assertTrue(isSelf("::ffff:192.0.2.1"))
        self.assertTrue(isSelf("2001:DB8::5"))
        self.assertFalse(isSelf("192.0.2.2"))
        self.assertFalse(isSelf("127.0.0.1"))
        self.assertFalse(isSelf("not an address"))

    def test_otherPortsAreNotSelf(self):
        """MX delivery goes to port 25: a listener on another port (or a UNIX socket) is not in its way."""
        isSelf = ownAddresses([("192.0.2.1", 2525), ("", 587), ("unix", "/run/relaygw.sock"), None])
        self.assertFalse(isSelf("192.0.2.1"))
        self.assertFalse(isSelf("127.0.0.1"))

    def test_everyAddress(self):
        """Bound to every address: each of the machine's own (loopback among them) is the gateway's."""
        for interface in ("", "0.0.0.0", "::"):
            isSelf = ownAddresses([(interface, 25)])
            self.assertTrue(isSelf("127.0.0.1"), interface)
            self.assertTrue(isSelf("127.0.0.53"), interface)
            self.assertTrue(isSelf("::1"), interface)
            self.assertFalse(isSelf("192.0.2.1"), interface)  # (documentation range: no machine's)
            self.assertFalse(isSelf("2001:db8::1"), interface)
