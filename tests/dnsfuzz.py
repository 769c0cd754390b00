"""
A seeded fuzzer of the MX lookup (L{relaygw.relay.mx.lookupNextHops}
through L{relaygw.relay.mx.StrictResolver}, the resolver MX delivery uses)
against a DNS server on 127.0.0.1, UDP and TCP, that misbehaves at random.

Each case builds a zone (domains with MX hosts, an implicit MX, a null MX,
a CNAME, none at all; hosts with IPv4 and IPv6 addresses, none, or no such
name; glue in the additional section or not) and looks up one to three of
its domains at once.  Each reply of the server may be:
 - right, or right with its names in other cases of letters (RFC 4343);
 - the server's word, other than the zone's: SERVFAIL, REFUSED, NXDOMAIN,
   or no records for a name that has some;
 - damaged in a way a client can tell: no reply, a late one, another id,
   not a response, another question, cut short, truncated (TC), record
   counts that do not add up, garbage;
 - hostile: records owned by names other than the one asked (MX records,
   CNAMEs, addresses under 203.0.113.0/24), or by that name in another
   class than the question's, which must change nothing;
 - a name in a compression loop;
 - a bit flipped at random past the header (which no client can always
   tell: such a case is only checked for ending and its kind of outcome).

The checks (L{Case.check}): every lookup ends, within its time limit, with
next hops or one of the lookup's own failures, nothing logged as a failure;
no next hop is an address of a record owned by another name, nor the
domain's own address when it has MX records (a lost MX answer read as "no
MX"), nor any address the zone does not give it; a permanent failure (no
such domain, null MX) only when the zone says so or the server said so of
that domain; and a case whose every reply was right (or only hostile)
gives exactly the zone's next hops, best preference first.

Run from the command line for long runs:

    python -m tests.dnsfuzz SEED [SEED...] --cases N
"""

import random
import socket
import struct
import time
from functools import partial

from twisted.internet import defer, protocol, reactor, task
from twisted.names import dns

from relaygw.relay import mx
from tests.fuzzing import LoggedFailures, casesMain, runCases

#: The resolver's timeouts, one per try (twisted.names' default is 1, 3, 11 and 45 s).
TIMEOUTS = (0.2, 0.4, 0.6)
#: The lookup's time limit and the grace of the other MX hosts (60 and 5 s in the gateway).
LOOKUP_SECONDS, HOST_GRACE_SECONDS = 3.0, 0.5

#: Addresses only ever in records owned by a name that was not asked for.
POISON = "203.0.113."
#: The addresses of a domain that has MX records: never its next hops.
TRAP = "198.19."

_FATES = [("ok", 70), ("servfail", 2), ("refused", 1.5), ("nxdomain", 1.5), ("nodata", 1.5),
          ("silent", 2), ("late", 2), ("wrongid", 2), ("notresponse", 2), ("otherquestion", 2), ("cut", 3),
          ("tc", 2), ("counts", 1.5), ("garbage", 1.5), ("poison", 5), ("case", 2), ("loop", 1), ("flip", 1)]
#: What the server says of a name, other than what the zone says.
SAID = {"servfail": dns.ESERVER, "refused": dns.EREFUSED, "nxdomain": dns.ENAME, "nodata": dns.OK}
#: Replies that must change nothing: right (in another case of letters, RFC 4343), or only hostile.
HARMLESS = {"ok", "poison", "case"}


def _choose(rng, weighted):
    return rng.choices([w[0] for w in weighted], [w[1] for w in weighted])[0]


def _mixedCase(rng, name):
    return bytes(c ^ 0x20 if chr(c).isalpha() and rng.random() < 0.5 else c for c in name)


def _rr(name, payload):
    return dns.RRHeader(name.encode(), payload.TYPE, dns.IN, 60, payload)


class Zone:
    """
    The names of one case: C{records} (name -> record payloads), the
    domains to look up, and what each should give (L{expected}).
    """

    def __init__(self, rng):
        self.records, self.kinds, self.glue = {}, {}, rng.random() < 0.5
        hosts = []
        for h in range(rng.randrange(1, 6)):
            host = "mx%d.%s" % (h, rng.choice(["fuzz.test", "other.test"]))
            hosts.append(host)
            fate = _choose(rng, [("v4", 4), ("v6", 2), ("both", 3), ("nodata", 1), ("absent", 1)])
            if fate == "absent":
                continue
            recs = self.records[host] = []
            if fate in ("v4", "both"):
                recs += [dns.Record_A("198.18.%d.%d" % (h, i + 1)) for i in range(rng.randrange(1, 3))]
            if fate in ("v6", "both"):
                recs.append(dns.Record_AAAA("2001:db8:%x::1" % h))
            if fate == "nodata":
                recs.append(dns.Record_TXT(b"no address"))
        self.domains = []
        for d in range(rng.randrange(1, 4)):
            domain = "d%d.fuzz.test" % d
            self.domains.append(domain)
            kind = _choose(rng, [("mx", 12), ("implicit", 3), ("null", 1), ("absent", 1), ("nodata", 1),
                                 ("cname", 2)])
            if kind == "cname":
                target = "t%d.fuzz.test" % d
                self.records[domain] = [dns.Record_CNAME(target.encode())]
                domain, kind = target, rng.choice(["mx", "implicit"])
            self.kinds[domain] = kind
            if kind == "mx":
                self.records[domain] = [dns.Record_MX(rng.choice([0, 10, 10, 20, 30]), host.encode())
                                        for host in rng.sample(hosts, rng.randrange(1, len(hosts) + 1))]
                self.records[domain].append(dns.Record_A(TRAP + "%d.1" % d))
            elif kind == "implicit":
                self.records[domain] = [dns.Record_A("198.18.%d.%d" % (100 + d, i + 1))
                                        for i in range(rng.randrange(0, 3))]
                if not self.records[domain] or rng.random() < 0.3:
                    self.records[domain].append(dns.Record_AAAA("2001:db8:1%02x::1" % d))
            elif kind == "null":
                self.records[domain] = [dns.Record_MX(0, b"")]
            elif kind == "nodata":
                self.records[domain] = [dns.Record_TXT(b"no mail")]

    def target(self, name):
        """C{name}, or where its CNAME leads."""
        cname = [r for r in self.records.get(name, ()) if r.TYPE == dns.CNAME]
        return cname[0].name.name.decode() if cname else name

    def answer(self, name, rtype):
        """C{(rcode, answers, additional)}: what the zone says of C{name}, C{rtype}."""
        if name not in self.records:
            return dns.ENAME, [], []
        answers = [_rr(name, r) for r in self.records[name] if r.TYPE == rtype]
        target = self.target(name)
        if target != name:
            answers = [_rr(name, self.records[name][0])]
            if target not in self.records:
                return dns.ENAME, answers, []
            answers += [_rr(target, r) for r in self.records[target] if r.TYPE == rtype]
        additional = []
        if rtype == dns.MX and self.glue:
            for rr in answers:
                if rr.type == dns.MX:
                    host = rr.payload.name.name.decode()
                    additional += [_rr(host, r) for r in self.records.get(host, ()) if r.TYPE in (dns.A, dns.AAAA)]
        return dns.OK, answers, additional

    def addresses(self, name):
        """C{name}'s addresses (text), IPv4 first, as the zone has them."""
        recs = self.records.get(name, ())
        return ([r.dottedQuad() for r in recs if r.TYPE == dns.A]
                + [socket.inet_ntop(socket.AF_INET6, r.address) for r in recs if r.TYPE == dns.AAAA])

    def expected(self, domain):
        """
        C{(kind, value)}: C{("hops", {address: preference})},
        C{("permanent", exception class)} or C{("temporary", enhanced code)}.
        """
        name = self.target(domain)
        if name not in self.records:
            return "permanent", mx.NoSuchDomain
        mxs = [r for r in self.records[name] if r.TYPE == dns.MX]
        if len(mxs) == 1 and mxs[0].preference == 0 and not mxs[0].name.name:
            return "permanent", mx.NullMX
        if not mxs:
            own = self.addresses(name)
            return ("hops", {a: 0 for a in own}) if own else ("permanent", mx.NoSuchDomain)
        hops = {}
        for r in sorted(mxs, key=lambda r: r.preference):
            for a in self.addresses(r.name.name.decode()):
                hops.setdefault(a, r.preference)
        return ("hops", hops) if hops else ("temporary", "4.4.4")


class Server:
    """The DNS server of one case: the zone's answers, each reply's fate drawn at random, and what it did."""

    def __init__(self, zone, rng):
        self.zone, self.rng = zone, rng
        self.damaged = self.noisy = False
        self.said = set()  # the names the server spoke of otherwise than the zone
        self.replies = 0
        self.late, self.connections = [], []

    def reply(self, data):
        """The bytes to send back for the query C{data} (C{None}: nothing)."""
        query = dns.Message()
        try:
            query.fromStr(data)
        except Exception:
            return None
        if not query.queries:
            return None
        q = query.queries[0]
        name, rtype = q.name.name.decode("ascii", "replace").lower().rstrip("."), q.type
        self.replies += 1
        fate = _choose(self.rng, _FATES)
        if fate not in HARMLESS:
            if fate in SAID:
                self.said.add(name)
            elif fate == "flip":
                self.noisy = True
            else:
                self.damaged = True
        rcode, answers, additional = self.zone.answer(name, rtype)
        if fate in SAID:
            rcode, answers, additional = SAID[fate], [], []
        elif fate == "poison":
            answers, additional = self._poisoned(name, rtype, answers, additional)
        message = dns.Message(id=query.id, answer=1, opCode=dns.OP_QUERY, recDes=1, recAv=1, auth=1, rCode=rcode)
        message.queries = [q]
        message.answers, message.additional = answers, additional
        if fate == "otherquestion":  # (the answer to that question: another name's NXDOMAIN, another type's records)
            other = self.rng.choice(["elsewhere.test", name])
            otherType = self.rng.choice([t for t in (dns.MX, dns.A, dns.AAAA, dns.TXT) if (other, t) != (name, rtype)])
            message.queries = [dns.Query(other.encode(), otherType, dns.IN)]
            message.rCode, message.answers, message.additional = self.zone.answer(other, otherType)
        elif fate == "tc":
            message.trunc, message.answers, message.additional = 1, [], []
        elif fate == "notresponse":
            message.answer = 0
        if fate == "case":
            message.queries = [dns.Query(_mixedCase(self.rng, q.name.name), q.type, q.cls)]
            for rr in message.answers + message.additional:
                rr.name = dns.Name(_mixedCase(self.rng, rr.name.name))
        out = message.toStr()
        if fate == "wrongid":
            out = struct.pack("!H", (query.id + self.rng.randrange(1, 65535)) % 65536) + out[2:]
        elif fate == "cut" and len(out) > 13:
            out = out[:self.rng.randrange(12, len(out))]
        elif fate == "counts":
            counts = list(struct.unpack("!4H", out[4:12]))
            counts[self.rng.randrange(1, 4)] += self.rng.randrange(1, 4)
            out = out[:4] + struct.pack("!4H", *counts) + out[12:]
        elif fate == "garbage":
            out = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 60)))
        elif fate == "loop":  # (one answer whose name is a compression pointer to itself)
            message.answers, message.additional, message.authority = [], [], []
            out = message.toStr()
            out = out[:6] + struct.pack("!H", 1) + out[8:] + struct.pack("!H", 0xC000 | len(out)) + bytes(10)
        elif fate == "flip" and len(out) > 12:
            i = self.rng.randrange(12, len(out))
            out = out[:i] + bytes([out[i] ^ (1 << self.rng.randrange(8))]) + out[i + 1:]
        if fate == "silent":
            return None
        if fate == "late":
            return ("late", out)
        return out

    def replyAtOnce(self, data):
        """L{reply}, a late one at once (over TCP, where the lateness would only hold the connection)."""
        out = self.reply(data)
        return out[1] if isinstance(out, tuple) else out

    def _poisoned(self, name, rtype, answers, additional):
        """C{answers} and C{additional} with records owned by other names: none of them may count."""
        rng = self.rng
        evil = "mx%d.evil.test" % rng.randrange(3)
        extra = [_rr("elsewhere.test", dns.Record_MX(0, evil.encode())),
                 _rr("x" + name, dns.Record_CNAME(b"elsewhere.test")),
                 _rr(evil, dns.Record_A(POISON + str(rng.randrange(1, 250))))]
        if rtype in (dns.A, dns.AAAA):
            extra.append(_rr("x" + name, dns.Record_A(POISON + "254")))
        # Records of the name asked, of another class than the question's.
        chaos = {dns.MX: dns.Record_MX(0, evil.encode()), dns.A: dns.Record_A(POISON + "253")}.get(rtype)
        if chaos is not None:
            extra.append(dns.RRHeader(name.encode(), chaos.TYPE, rng.choice([dns.CH, dns.HS]), 60, chaos))
        for rr in rng.sample(extra, rng.randrange(1, len(extra) + 1)):
            (answers if rng.random() < 0.5 else additional).append(rr)
        rng.shuffle(answers)
        return answers, additional


class _UDP(protocol.DatagramProtocol):
    def __init__(self, server):
        self.server = server

    def datagramReceived(self, data, address):
        out = self.server.reply(data)
        if isinstance(out, tuple):
            self.server.late.append(reactor.callLater(TIMEOUTS[0] * 1.5, self._send, out[1], address))
        elif out is not None:
            self._send(out, address)

    def _send(self, out, address):
        if self.transport is not None:
            self.transport.write(out, address)


class DNSOverTCP(protocol.Protocol):
    """
    Queries over TCP (length-prefixed, RFC 1035 section 4.2.2), each
    answered with C{factory.answer(query)} (C{None}: no answer, the
    connection closed); the factory's C{connections} lists them.
    """

    buffer = b""

    def connectionMade(self):
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            data, self.buffer = self.buffer[2:2 + length], self.buffer[2 + length:]
            out = self.factory.answer(data)
            if out is None:
                self.transport.loseConnection()
                return
            self.transport.write(struct.pack("!H", len(out)) + out)


class Figures:
    def __init__(self):
        self.cases = self.lookups = self.replies = 0
        self.hops = self.temporary = self.permanent = self.noisy = 0
        self.problems = []

    def __str__(self):
        return ("%d cases, %d lookups, %d replies: %d with next hops, %d temporary failures, %d permanent; "
                "%d cases with a bit flipped; %d problems"
                % (self.cases, self.lookups, self.replies, self.hops, self.temporary, self.permanent,
                   self.noisy, len(self.problems)))


class Case:
    """One zone, its server, the lookups of one to three of its domains at once, and the checks of their outcomes."""

    def __init__(self, directory, rng, figures, label):
        self.rng, self.figures, self.label = rng, figures, label

    @defer.inlineCallbacks
    def run(self):
        rng = self.rng
        zone = Zone(random.Random(rng.random()))
        server = Server(zone, random.Random(rng.random()))
        port, udp = _listen(server)
        failures = LoggedFailures().start()
        saved = mx.LOOKUP_SECONDS, mx.HOST_GRACE_SECONDS
        mx.LOOKUP_SECONDS, mx.HOST_GRACE_SECONDS = LOOKUP_SECONDS, HOST_GRACE_SECONDS
        try:
            resolver = mx.StrictResolver(servers=[("127.0.0.1", port.getHost().port)], timeout=TIMEOUTS)
            started = time.monotonic()
            outcomes = yield defer.DeferredList(
                [mx.lookupNextHops(resolver, domain, withNames=True) for domain in zone.domains], consumeErrors=True)
            took = time.monotonic() - started
        finally:
            mx.LOOKUP_SECONDS, mx.HOST_GRACE_SECONDS = saved
            failures.stop()
            for call in server.late:
                if call.active():
                    call.cancel()
            yield port.stopListening()
            yield udp.stopListening()
        for connection in resolver.connections + server.connections:  # (twisted.names keeps its own open)
            connection.transport.loseConnection()
        yield task.deferLater(reactor, 0.01, lambda: None)
        # (twisted.names forgets a reply it refused after a while of its own)
        for _ in range(20):
            if not any(getattr(c.func, "__name__", "") == "_clearFailed" for c in reactor.getDelayedCalls()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.check(zone, server, outcomes, took, failures.events)

    def check(self, zone, server, outcomes, took, failures):
        fig = self.figures
        fig.cases += 1
        fig.replies += server.replies
        fig.noisy += server.noisy
        problem = lambda text: fig.problems.append("case %s: %s" % (self.label, text))  # noqa: E731
        if took > LOOKUP_SECONDS + 1:
            problem("lookups took %.1f s" % took)
        for event in failures:
            problem("logged: %s" % (event.get("log_format") or event,))
        for domain, (success, result) in zip(zone.domains, outcomes):
            fig.lookups += 1
            kind, value = zone.expected(domain)
            said = server.said & {domain, zone.target(domain)}
            if success:
                fig.hops += 1
                self.checkHops(domain, result, kind, value, said, server, problem)
                continue
            failure = result.value
            if isinstance(failure, mx.TemporaryLookupFailure):
                fig.temporary += 1
                if server.noisy:
                    continue
                if not (server.damaged or server.said) and (kind, value) != ("temporary", failure.enhanced):
                    problem("%s: %s, expected %s %s" % (domain, failure, kind, value))
            elif isinstance(failure, (mx.NoSuchDomain, mx.NullMX)):
                fig.permanent += 1
                if server.noisy:
                    continue
                if (kind, value) != ("permanent", type(failure)) and not said:
                    problem("%s: permanent %s: %s, expected %s %s" % (domain, type(failure).__name__, failure,
                                                                     kind, value))
            else:
                problem("%s: failed with %r" % (domain, failure))

    def checkHops(self, domain, hops, kind, value, said, server, problem):
        addresses = [hop[0] for hop in hops]
        if any(a.startswith(POISON) for a in addresses):
            problem("%s: next hops %s from records of another name" % (domain, addresses))
        if server.noisy:
            return
        if any(a.startswith(TRAP) for a in addresses) and not said:
            problem("%s: next hops %s: the domain's own address, though it has MX records" % (domain, addresses))
        allowed = dict(value) if kind == "hops" else {}
        if said:  # (its MX records unsaid: its own addresses may be its next hops)
            allowed.update((a, 0) for a in server.zone.addresses(server.zone.target(domain)))
        strays = [a for a in addresses if a not in allowed]
        if strays:
            problem("%s: next hops %s not in the zone's %s" % (domain, strays, sorted(allowed)))
        if len(set(addresses)) != len(addresses):
            problem("%s: an address twice in %s" % (domain, addresses))
        if kind != "hops" and not (server.damaged or server.said):
            problem("%s: next hops %s, expected %s %s" % (domain, addresses, kind, value))
        elif kind == "hops" and not (server.damaged or server.said):
            # (at most MX_ADDRESS_LIMIT of them, the best first; which of equal preferences is left to chance)
            if len(addresses) != min(len(value), mx.MX_ADDRESS_LIMIT) or \
                    (len(value) <= mx.MX_ADDRESS_LIMIT and sorted(addresses) != sorted(value)):
                problem("%s: next hops %s, expected %s" % (domain, addresses, sorted(value)))
            elif any(value[a] < max(value[b] for b in addresses) for a in set(value) - set(addresses)):
                problem("%s: next hops %s leave out a better one of %s" % (domain, addresses, sorted(value)))
            preferences = [value.get(a, 0) for a in addresses]
            if preferences != sorted(preferences):
                problem("%s: next hops %s out of preference order" % (domain, addresses))
            best = [hop[3] for hop in hops]
            if best != [p == min(preferences) for p in preferences]:
                problem("%s: best MX flags %s for preferences %s" % (domain, best, preferences))


def _listen(server):
    """The server on one port of 127.0.0.1, TCP and UDP: C{(tcpPort, udpPort)}."""
    factory = protocol.ServerFactory.forProtocol(DNSOverTCP)
    factory.connections = server.connections
    factory.answer = server.replyAtOnce
    return listenDNS(factory, _UDP(server))


def listenDNS(factory, datagrams):
    """A DNS server on 127.0.0.1, TCP C{factory} and UDP C{datagrams} on one port: C{(tcpPort, udpPort)}."""
    from twisted.internet.error import CannotListenError

    for attempt in range(20):  # (a TCP port whose UDP twin is free)
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        try:
            udp = reactor.listenUDP(tcp.getHost().port, datagrams, interface="127.0.0.1")
        except CannotListenError:
            tcp.stopListening()
            continue
        return tcp, udp
    raise CannotListenError("127.0.0.1", 0, "no port free for both TCP and UDP")


#: C{runSeeds(base, seeds, cases, figures, minutes=None, done=None)}: C{cases} L{Case}s for
#: each seed (L{tests.fuzzing.runCases}); a Deferred of C{figures}.
runSeeds = partial(runCases, Case)


if __name__ == "__main__":
    import sys

    casesMain(sys.argv[1:], runSeeds, Figures(), "dnsfuzz", 200)
