"""
A seeded, model-based fuzz of the client identity over loopback sockets:
sequences mixing PROXY headers (versions 1 and 2, TCP4, TCP6, LOCAL,
TLVs), XCLIENT with every attribute (special values, odd case, xtext
escapes, invalid values), XREMOTEIP, XSETCONTEXT, STARTTLS, AUTH, RSET and
EHLO, on listeners that trust the peer and ones that do not.

L{Identity} says after each step who the client is.  The checks: each
reply's code (pipelined or not); relaying allowed exactly when the claimed
address is in C{relay_networks} or the session logged in; XDUMPCONTEXT (on
trusted listeners) showing the claimed identity; a balancer's sessions not
counted under its own address by C{max_connections_per_ip}; and for each
message delivered, its Received header (with C{received_shows_peer} and
C{received_shows_login} on one listener), the onward XCLIENT or XFORWARD
and the mail log's C{client=} naming the claimed client and nothing else.

Run from the command line for longer runs:

    python -m tests.trustfuzz SEED [SEED...] --sessions N
"""

import ipaddress
import random
import socket
import ssl
import struct

from relaygw import xtext
from relaygw.testing import ScriptedSMTPFactory, ScriptedSMTPServer
from relaygw.testing.gateway import receivedHeader
from tests.proxyheaders import v2

REPLY_TIMEOUT = 10.0

#: alice:s3cret, and a wrong password.
GOOD_PLAIN = "AGFsaWNlAHMzY3JldA=="

RELAY = ["192.0.2.0/25", "2001:db8:1::/48", "10.1.0.0/16"]
#: The PROXY listener trusts some of the clients a balancer speaks for.
PROXY_TRUSTED_CLIENTS = ["192.0.2.0/26", "2001:db8:1::/64"]


class Violation(AssertionError):
    """A check failed; the message has the session's transcript."""


def _nets(cidrs):
    return [ipaddress.ip_network(c) for c in cidrs]


def _inNets(ip, nets):
    if ip is None:
        return False
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in nets)


# -- generators: (wire text, the value the gateway keeps, or INVALID) ------------------------------

INVALID = object()


def _oddCase(rng, word):
    if rng.random() < 0.3:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)
    return word


_ADDRS = [
    ("192.0.2.5", "192.0.2.5"), ("192.0.2.200", "192.0.2.200"), ("10.1.2.3", "10.1.2.3"),
    ("203.0.113.9", "203.0.113.9"), ("127.0.0.1", "127.0.0.1"), ("IPV6:2001:db8:1::5", "2001:db8:1::5"),
    ("ipv6:2001:DB8:1:0::9", "2001:db8:1::9"), ("IPv6:2001:db8:2::5", "2001:db8:2::5"),
    ("IPV6:::ffff:192.0.2.7", "192.0.2.7"), ("IPV6+3A2001:db8:1::6", "2001:db8:1::6"),
    ("[UNAVAILABLE]", None), ("[unavailable]", None),
    ("2001:db8:1::1", INVALID), ("999.1.1.1", INVALID), ("IPV6:192.0.2.1", INVALID), ("0.0.0.0", INVALID),
    ("224.0.0.1", INVALID), ("010.0.0.1", INVALID), ("[192.0.2.5]", INVALID), ("[TEMPUNAVAIL]", INVALID),
]
_NAMES = [
    ("mx.example.org", ("mx.example.org", "ok")), ("[UNAVAILABLE]", (None, "perm")),
    ("[TEMPUNAVAIL]", (None, "temp")), ("[tempunavail]", (None, "temp")),
    ("mx+2Dxt.example.net", ("mx-xt.example.net", "ok")), ("host_1.example", ("host_1.example", "ok")),
    ("bad_name!", INVALID), ("123", INVALID), ("a..b", INVALID), ("+ZZ", INVALID),
]
_PORTS = [("25", 25), ("0", 0), ("65535", 65535), ("[UNAVAILABLE]", 0), ("65536", INVALID), ("x", INVALID),
          ("-1", INVALID)]
_PROTOS = [("SMTP", "SMTP"), ("esmtp", "ESMTP"), ("ESMTP", "ESMTP"), ("LMTP", INVALID),
           ("[UNAVAILABLE]", INVALID)]
_HELOS = [("client.example", "client.example"), ("[192.0.2.1]", "[192.0.2.1]"), ("[UNAVAILABLE]", None),
          ("h+2Dx.example", "h-x.example"), ("two+20words", "two"), ("x" * 300, INVALID), ("a+0Db", INVALID)]
_LOGINS = [("user", "user"), ("nginx+user@example.org", "nginx+user@example.org"), ("acc+2Buser", "acc+user"),
           ("[UNAVAILABLE]", None), ("[Unavailable]", None)]
_DESTADDRS = [("192.0.2.1", "192.0.2.1"), ("IPV6:2001:db8::1", "2001:db8::1"), ("bad", INVALID)]
_DESTPORTS = [("25", 25), ("99999", INVALID)]


def xclientAttributes(rng):
    """A list of C{(name, wire value, kept value or INVALID)}; sometimes an unknown or malformed attribute."""
    out = []
    for _ in range(rng.randrange(1, 5)):
        name = rng.choice(["NAME", "ADDR", "ADDR", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR",
                           "DESTPORT", "BOGUS", "REVERSE_NAME"])
        table = {"NAME": _NAMES, "ADDR": _ADDRS, "PORT": _PORTS, "PROTO": _PROTOS, "HELO": _HELOS,
                 "LOGIN": _LOGINS, "DESTADDR": _DESTADDRS, "DESTPORT": _DESTPORTS}.get(name)
        if table is None:
            out.append((name, "1", INVALID))
            continue
        wire, kept = rng.choice(table)
        if rng.random() < 0.02:
            out.append((name, "", INVALID))  # (an empty value)
            continue
        out.append((name, wire, kept))
    return out


# -- the model -------------------------------------------------------------------------------------


class Identity:
    """Who the client is, as the gateway must see it."""

    def __init__(self, ip, port):
        self.ip = ip
        self.port = port
        self.name = None
        self.nameStatus = "perm"
        self.helo = None
        self.proto = "SMTP"
        self.login = None  # a real login (AUTH, XCLIENT LOGIN=)
        self.anonymous = False  # ALWAYS-ALLOW
        self.tls = False
        self.overridden = False
        self.shows = False  # (received_shows_peer and received_shows_login)
        self.peer = (ip, port)

    def copy(self):
        other = Identity(self.ip, self.port)
        other.__dict__.update(self.__dict__)
        return other

    def withProtocol(self):
        authed = self.login  # (ALWAYS-ALLOW logged in nobody)
        if self.proto == "SMTP" and not (self.tls or authed):
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if authed else "")

    def client(self):
        return "%s[%s]" % (self.name or "unknown", self.ip or "unknown")


class Outcome:
    """What the sessions expect of the next hop and the log, and how much was checked."""

    def __init__(self):
        self.sessions = 0
        self.commands = 0
        self.checks = 0
        self.expected = {}  # recipient -> (identity, listener label, qid)
        self.problems = []

    def check(self, transactions, queuedLog):
        """Compare what the next hops got, and the mail log, with the model; returns the problems."""
        problems = list(self.problems)
        got = {}
        for t in transactions:
            for r in t["rcpts"]:
                got[r] = t
        for rcpt, (ident, label, qid) in sorted(self.expected.items()):
            t = got.get(rcpt)
            if t is None:
                problems.append("%s: %s never delivered" % (label, rcpt))
                continue
            problems.extend("%s %s: %s" % (label, rcpt, p) for p in checkDelivered(ident, t))
            self.checks += 1
            client = queuedLog.get(qid)
            self.checks += 1
            if client != ident.client():
                problems.append("%s %s: mail log client=%r, expected %r" % (label, rcpt, client, ident.client()))
        return problems


def _literal(ip):
    return "IPv6:" + ip if ip and ":" in ip else ip


def checkDelivered(ident, t):
    """The problems with delivered transaction C{t} (Received, onward identity) for identity C{ident}."""
    problems = []
    received = receivedHeader(t["data"]).decode("ascii")
    via = ""
    if ident.shows and (ident.overridden or ident.peer[0] != ident.ip):
        via = "\r\n\t(via [%s] port %d)" % (_literal(ident.peer[0]), ident.peer[1])
    login = " (authenticated as %s)" % (ident.login,) if ident.shows and ident.login else ""
    first = "Received: from %s (%s [%s])%s\r\n\tby relay.test (relaygw) with %s%s" % (
        ident.helo or "unknown", ident.name or "unknown", _literal(ident.ip or "unknown"), via, ident.withProtocol(),
        login)
    if not received.startswith(first) or (login and not received.startswith(first + " id ")):
        problems.append("Received %r, expected it to start %r" % (received, first))
    if not ident.shows:
        if "127.0.0.1" in received and ident.ip != "127.0.0.1":
            problems.append("Received names the real peer: %r" % (received,))
        if ("authenticated" in received) or ("via" in received) or ("proxied" in received):
            problems.append("Received names more than the client: %r" % (received,))
    onward = t.get("xclient") if t["hop"] == "xclient" else t.get("xforward")
    expected = {
        "HELO": ident.helo or "[UNAVAILABLE]",
        "PROTO": "ESMTP" if ident.proto.startswith("ESMTP") else "SMTP",
        "LOGIN": ident.login or "[UNAVAILABLE]",
        "PORT": str(ident.port) if ident.port else "[UNAVAILABLE]",
        "NAME": ident.name or ("[TEMPUNAVAIL]" if ident.nameStatus == "temp" else "[UNAVAILABLE]"),
        "ADDR": ("IPV6:" + ident.ip if ":" in ident.ip else ident.ip) if ident.ip else "[UNAVAILABLE]",
    }
    if t["hop"] == "xforward":
        expected["PROTO"] = ident.proto
        del expected["LOGIN"]  # (XFORWARD has no LOGIN)
        if not ident.name:  # ([TEMPUNAVAIL] is XCLIENT's only)
            expected["NAME"] = "[UNAVAILABLE]"
        if ident.helo:  # (no character special in headers: XFORWARD_README)
            expected["HELO"] = "".join(c if "!" <= c <= "~" and c not in '<>()\\";@' else "?" for c in ident.helo)
    if onward != expected:
        problems.append("onward %s %r, expected %r" % (t["hop"].upper(), onward, expected))
    return problems


# -- the next hops ---------------------------------------------------------------------------------


class IdentityHopServer(ScriptedSMTPServer):
    """
    A next hop that takes XCLIENT as often as it is sent (it keeps offering
    it) and notes with each transaction the identity it was last given
    with XCLIENT, or with XFORWARD since the last one.
    """

    def connectionMade(self):
        self.xclient = {}
        self.xforward = {}
        self.lastVerb = None
        ScriptedSMTPServer.connectionMade(self)

    def lineReceived(self, line):
        if not self.inData:
            text = line.decode("ascii", "replace")
            verb = text.split(" ", 1)[0].upper()
            if verb in ("XCLIENT", "XFORWARD"):
                attrs = dict(w.split("=", 1) for w in text.split()[1:])
                attrs = {k.upper(): xtext.decode(v, lenient=True).decode("ascii") for k, v in attrs.items()}
                if verb == "XCLIENT":
                    if self.lastVerb != "XCLIENT":
                        self.xclient = {}
                    self.xclient.update(attrs)
                else:
                    self.xforward.update(attrs)
            self.lastVerb = verb
        before = len(self.factory.transactions)
        ScriptedSMTPServer.lineReceived(self, line)
        if not self.factory.onceOnly:
            self.xclientUsed = False
        if len(self.factory.transactions) > before:
            t = self.factory.transactions[-1]
            t.update(hop=self.factory.kind, xclient=dict(self.xclient), xforward=dict(self.xforward))
            self.xforward = {}


class IdentityHopFactory(ScriptedSMTPFactory):
    protocol = IdentityHopServer
    #: XCLIENT is offered until it was used (as Postfix, for its own client address).
    onceOnly = False

    def __init__(self, kind):
        ext = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN" if kind == "xclient" else "XFORWARD NAME ADDR PORT PROTO HELO"
        ScriptedSMTPFactory.__init__(self, extensions=["PIPELINING", "8BITMIME", ext])
        self.kind = kind


# -- the gateway -----------------------------------------------------------------------------------

#: Listener labels, in the order of the gateway's listeners: (label, trusts the socket peer, TLS, PROXY, always_allow)
LISTENERS = (("trusted", True, True, False, False), ("untrusted", False, False, False, False),
             ("proxy", None, False, True, False), ("always", True, False, False, True),
             ("shows", True, False, False, False))


def startGateway(directory, reactor=None):
    """
    A gateway with the L{LISTENERS}, relaying with C{forward_identity} to a
    next hop taking XCLIENT (recipients at C{xc.example}) and one taking
    XFORWARD (C{xf.example}); returns a Deferred firing with
    C{(gateway, [hops], [hop ports], {label: port})}.
    """
    import os

    from twisted.internet import defer

    from relaygw.testing import Gateway
    from tests.fuzzing import material

    if reactor is None:
        from twisted.internet import reactor
    users, cert, key = material(directory)
    hops = [IdentityHopFactory("xclient"), IdentityHopFactory("xforward")]
    hopPorts = [reactor.listenTCP(0, h, interface="127.0.0.1") for h in hops]
    verbs = ["xclient", "xremoteip", "xsetcontext", "xdumpcontext"]
    common = {"relay_networks": RELAY, "extensions": verbs, "credentials": users, "auth_plaintext": True}
    listeners = (
        dict(common, trusted_peers=["127.0.0.0/8"], tls_certificate=cert, tls_key=key),
        dict(common, trusted_peers=["10.9.9.0/24"], relay_networks=RELAY + ["127.0.0.0/8"]),
        dict(common, trusted_peers=PROXY_TRUSTED_CLIENTS, proxy_protocol=True, proxy_trusted=["127.0.0.0/8"]),
        # One connection per client address: the balancer's own sessions are not counted.
        dict(common, trusted_peers=["127.0.0.0/8"], always_allow=True, max_connections_per_ip=1),
        dict(common, trusted_peers=["127.0.0.0/8"], received_shows_peer=True, received_shows_login=True),
    )
    gw = Gateway(os.path.join(directory, "gw"), reactor=reactor, listeners=listeners,
                 relay={"smarthosts": ["[127.0.0.1]:%d" % hopPorts[0].getHost().port], "retry_min": 0.3,
                        "retry_max": 0.6, "forward_identity": True},
                 routes=({"domains": ["xf.example"], "smarthosts": ["[127.0.0.1]:%d" % hopPorts[1].getHost().port]},))

    @defer.inlineCallbacks
    def start():
        yield gw.start()
        return gw, hops, hopPorts, {label: port for (label, *_), port in zip(LISTENERS, gw.ports)}

    return start()


def queuedClients(events):
    """The mail log's C{client=} of each queued message, by queue id, from log events."""
    return {e["qid"]: e.get("client") for e in events if e.get("event") == "queued" and "qid" in e}


# -- one session -----------------------------------------------------------------------------------


class Session:
    """One connection, its model, and the checks of each reply."""

    def __init__(self, rng, ports, label, outcome, serial):
        self.rng = rng
        self.label = label
        self.outcome = outcome
        self.serial = serial
        self.transcript = []
        self.buf = b""
        _, trusted, self.hasTLS, proxy, self.always = next(x for x in LISTENERS if x[0] == label)
        self.sock = socket.create_connection(("127.0.0.1", ports[label]), timeout=REPLY_TIMEOUT)
        host, port = self.sock.getsockname()[:2]
        self.ident = Identity(host, port)
        self.trusted = trusted
        if proxy:
            self._proxyHeader()
        self.ident.anonymous = self.always
        self.ident.shows = label == "shows"
        self.companion = None
        if label == "always":
            self._openCompanion(ports[label])
        self.inTx = False
        self.rcpts = []
        self.messages = 0
        self.clientKeys = {}

    def fail(self, why):
        raise Violation("%s session %d: %s\n%s" % (self.label, self.serial, why, "\n".join(self.transcript[-30:])))

    def _proxyHeader(self):
        rng = self.rng
        kind = rng.choice(["v1-4", "v1-6", "v2-4", "v2-6", "v2-local", "v2-4-tlv"])
        src4 = rng.choice(["192.0.2.9", "192.0.2.100", "198.51.100.4", "10.1.9.9"])
        src6 = rng.choice(["2001:db8:1::7", "2001:db8:1:1::7", "2001:db8:5::1", "::ffff:192.0.2.10"])
        sport = rng.choice([1, 4567, 65535])
        if kind == "v1-4":
            header = ("PROXY TCP4 %s 198.51.100.1 %d 25\r\n" % (src4, sport)).encode()
            src = src4
        elif kind == "v1-6":
            header = ("PROXY TCP6 %s 2001:db8::25 %d 25\r\n" % (src6, sport)).encode()
            src = src6
        elif kind == "v2-local":
            header = v2(command=0)
            src = None
        elif kind == "v2-6":
            header = v2(family=2, src=src6, dst="2001:db8::25", sport=sport)
            src = src6
        else:
            tlvs = b""
            if kind == "v2-4-tlv":
                tlvs = (b"\x04" + struct.pack("!H", 3) + b"abc" + b"\x05" + struct.pack("!H", 4) + b"uniq"
                        + b"\x20" + struct.pack("!H", 5) + b"\x01\x00\x00\x00\x00")
            header = v2(src=src4, sport=sport, tlvs=tlvs)
            src = src4
        self.transcript.append(">> %r" % (header,))
        self.sock.sendall(header)
        if src is not None:
            addr = ipaddress.ip_address(src)
            if addr.version == 6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            self.ident.ip, self.ident.port = str(addr), sport
        self.trusted = _inNets(self.ident.ip, _nets(PROXY_TRUSTED_CLIENTS))

    def _openCompanion(self, port):
        """
        Another session of the balancer held open meanwhile, with an
        XCLIENT that claims no address: neither it nor this session may be
        counted under the balancer's own address (max_connections_per_ip 1).
        """
        self.companion = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        f = self.companion.makefile("rb")
        self.companion.sendall(b"XCLIENT LOGIN=held HELO=held.example\r\n")
        replies = [f.readline()[:3], f.readline()[:3]]
        f.close()
        self.transcript.append("companion: %r" % (replies,))
        if replies != [b"220", b"220"]:
            self.fail("companion session: %r" % (replies,))

    # -- wire ----------------------------------------------------------

    def send(self, line):
        self.transcript.append(">> %s" % (line,))
        self.sock.sendall(line.encode("latin-1") + b"\r\n")
        self.outcome.commands += 1

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    data = self.sock.recv(65536)
                except (socket.timeout, ssl.SSLError, OSError) as e:
                    self.fail("no reply: %r" % (e,))
                if not data:
                    self.fail("connection closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("latin-1")
            self.transcript.append("<< %s" % (text,))
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    #: Verbs whose reply is read before anything else is sent.
    SYNC = ("STARTTLS", "DATA", "XDUMPCONTEXT", "QUIT")

    def cmd(self, line, expect=None):
        verb = line.split(" ", 1)[0].upper()
        if self.pipelining and expect is not None and verb not in self.SYNC:
            self.send(line)
            self.pending.append((line, expect))
            return expect, []
        self.flush()
        self.send(line)
        code, lines = self.reply()
        if expect is not None:
            self.outcome.checks += 1
            if code != expect:
                self.fail("%s: got %d, expected %d" % (line.split(" ")[0], code, expect))
        return code, lines

    # -- steps ---------------------------------------------------------

    pipelining = False

    def flush(self):
        """Read the replies to the commands sent ahead, checking each."""
        pending, self.pending = self.pending, []
        for line, expect in pending:
            code, _ = self.reply()
            self.outcome.checks += 1
            if code != expect:
                self.fail("%s (pipelined): got %d, expected %d" % (line.split(" ")[0], code, expect))

    def greet(self):
        code, _ = self.reply()
        if code != 220:
            self.fail("greeting %d" % (code,))

    def run(self, steps):
        self.greet()
        self.pending = []
        self.pipelining = self.rng.random() < 0.4
        for _ in range(steps):
            step = self.rng.choice(["ehlo", "ehlo", "xclient", "xclient", "xclient", "xremoteip", "xsetcontext",
                                    "starttls", "auth", "rset", "mail", "mail", "mail", "dump", "dump"])
            getattr(self, "step_" + step)()
        if self.inTx and self.rcpts:
            self.data()
        self.cmd("QUIT", 221)
        self.sock.close()
        if self.companion is not None:
            self.companion.close()

    def step_ehlo(self):
        verb = self.rng.choice(["EHLO", "HELO", "ehlo"])
        name = self.rng.choice(["client.example", "[192.0.2.250]", "c%d.example" % self.serial, "[IPv6:::1]"])
        self.cmd("%s %s" % (verb, name), 250)
        self.ident.helo = name
        self.ident.proto = "ESMTP" if verb.upper() == "EHLO" else "SMTP"
        self.inTx, self.rcpts = False, []

    def _untrustedOrTx(self, verb, args):
        """The expected refusal code for a trusted verb, or None if it runs."""
        if verb == "XCLIENT":
            if self.inTx:
                return 503
            if not args:
                return 501
            return None if self.trusted else 550
        if not self.trusted:
            return 550
        if self.inTx:
            return 503
        return None

    def step_xclient(self):
        rng = self.rng
        attrs = xclientAttributes(rng) if rng.random() > 0.03 else []
        args = " ".join(_oddCase(rng, n) + "=" + w for n, w, _ in attrs)
        refusal = self._untrustedOrTx("XCLIENT", args)
        if refusal is None and any(k is INVALID for _, _, k in attrs):
            refusal = 501
        if refusal is not None:
            self.cmd(("XCLIENT " + args).rstrip(), refusal)
            return
        self.cmd("XCLIENT " + args, 220)
        self.ident.overridden = True
        final = {}
        for name, _, kept in attrs:
            final[name] = kept
        ident = self.ident
        self.inTx, self.rcpts = False, []
        if "HELO" in final:
            ident.helo = final["HELO"]
        else:
            ident.helo = None
        ident.proto = final.get("PROTO", "SMTP")
        if "LOGIN" in final and final["LOGIN"] is not None:
            ident.login = final["LOGIN"]
            ident.anonymous = False
        else:
            ident.login = None
            ident.anonymous = self.always
        if "NAME" in final:
            ident.name, ident.nameStatus = final["NAME"]
        if "ADDR" in final:
            ident.ip = final["ADDR"]
        if "PORT" in final:
            ident.port = final["PORT"]

    def step_xremoteip(self):
        rng = self.rng
        wire, kept = rng.choice([("192.0.2.77", "192.0.2.77"), ("203.0.113.77", "203.0.113.77"),
                                 ("IPv6:2001:db8:1::77", "2001:db8:1::77"), ("2001:db8:3::77", "2001:db8:3::77"),
                                 ("::ffff:10.1.0.77", "10.1.0.77"), ("bad", INVALID), ("", INVALID),
                                 ("0.0.0.0", INVALID), ("1.2.3.4 5.6.7.8", INVALID)])
        refusal = self._untrustedOrTx("XREMOTEIP", wire)
        if refusal is None and kept is INVALID:
            refusal = 501
        if refusal is not None:
            self.cmd(("XREMOTEIP " + wire).rstrip(), refusal)
            return
        self.cmd("XREMOTEIP " + wire, 250)
        self.ident.overridden = True
        self.ident.ip, self.ident.name, self.ident.nameStatus, self.ident.port = kept, None, "perm", 0

    def step_xsetcontext(self):
        rng = self.rng
        pairs = [rng.choice([("a", "1", "1"), ("b", "x+2By", "x+y"), ("Remote_IP", "9.9.9.9", "9.9.9.9"),
                             ("k", "", ""), ("remote_ip", "1.2.3.4", INVALID), ("trusted", "1", INVALID),
                             ("__bypass_x", "1", INVALID), ("proxy_peer_ip", "1.1.1.1", INVALID),
                             ("tls", "fake", INVALID), ("auth_user", "mallory", INVALID), ("n", "+4", INVALID),
                             ("ehlo_domain", "evil", INVALID), ("can_relay", "yes", INVALID)])
                 for _ in range(rng.randrange(1, 3))]
        args = " ".join("%s=%s" % (k, w) for k, w, _ in pairs)
        refusal = self._untrustedOrTx("XSETCONTEXT", args)
        if refusal is None and any(v is INVALID for _, _, v in pairs):
            refusal = 501
        self.cmd("XSETCONTEXT " + args, refusal or 250)
        if refusal is None:
            self.clientKeys.update((k, v) for k, _, v in pairs)

    def step_starttls(self):
        if not self.hasTLS or self.ident.tls:
            self.cmd("STARTTLS", 503 if self.ident.tls else 454)
            return
        self.cmd("STARTTLS", 220)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="relay.test")
        ident = self.ident
        ident.tls = True
        ident.helo, ident.proto, ident.login = None, "SMTP", None
        ident.anonymous = self.always
        self.inTx, self.rcpts = False, []

    def step_auth(self):
        ident = self.ident
        if self.always:
            self.cmd("AUTH PLAIN " + GOOD_PLAIN, 503)
            return
        if ident.login:
            self.cmd("AUTH PLAIN " + GOOD_PLAIN, 503)
            return
        if self.inTx:
            self.cmd("AUTH PLAIN " + GOOD_PLAIN, 503)
            return
        self.cmd("AUTH PLAIN " + GOOD_PLAIN, 235)
        ident.login = "alice"

    def step_rset(self):
        self.cmd("RSET", 250)
        self.inTx, self.rcpts = False, []

    def canRelay(self):
        nets = _nets(RELAY + (["127.0.0.0/8"] if self.label == "untrusted" else []))
        return bool(self.ident.login or self.ident.anonymous or _inNets(self.ident.ip, nets))

    def step_mail(self):
        if not self.inTx:
            self.cmd("MAIL FROM:<s%d@example.com>" % (self.serial,), 250)
            self.inTx = True
            return
        if self.rcpts and self.rng.random() < 0.4:
            self.data()
            return
        domain = self.rng.choice(["xc.example", "xf.example"])
        rcpt = "r%d.%d.%d@%s" % (self.serial, self.messages, len(self.rcpts), domain)
        self.cmd("RCPT TO:<%s>" % (rcpt,), 250 if self.canRelay() else 554)
        if self.canRelay():
            self.rcpts.append(rcpt)

    def data(self):
        self.cmd("DATA", 354)
        self.send("Subject: fuzz %d\r\n\r\nbody\r\n." % (self.serial,))
        code, lines = self.reply()
        if code != 250:
            self.fail("end of data: %d" % (code,))
        qid = lines[0].rsplit(" ", 1)[-1]
        for r in self.rcpts:
            self.outcome.expected[r] = (self.ident.copy(), "%s/%d" % (self.label, self.serial), qid)
        self.messages += 1
        self.inTx, self.rcpts = False, []

    def step_dump(self):
        if not self.trusted:
            self.cmd("XDUMPCONTEXT", 550)
            return
        code, lines = self.cmd("XDUMPCONTEXT", 250)
        ctx = {}
        for line in lines[:-1]:
            scope, _, rest = line[len("2.0.0 ["):].partition("] ")
            key, _, value = rest.partition(" ")
            if scope == "connection":
                ctx[key] = value
        ident = self.ident
        want = {"remote_ip": ident.ip or "unknown", "remote_name": ident.name or "unknown",
                "remote_name_status": ident.nameStatus, "remote_port": str(ident.port),
                "ehlo_domain": ident.helo, "protocol": ident.proto,
                "auth_user": ident.login or ("anonymous" if ident.anonymous else None), "trusted": "yes"}
        want.update(self.clientKeys)
        for key, value in want.items():
            self.outcome.checks += 1
            if ctx.get(key) != value:
                self.fail("XDUMPCONTEXT %s=%r, expected %r" % (key, ctx.get(key), value))


def runSessions(ports, seed, sessions, outcome, steps=(3, 16)):
    """Run C{sessions} sessions of seed C{seed} (in a thread: they block); violations go to C{outcome}."""
    rng = random.Random(seed)
    for i in range(sessions):
        label = rng.choice([x[0] for x in LISTENERS])
        serial = seed * 100000 + i
        s = Session(rng, ports, label, outcome, serial)
        outcome.sessions += 1
        try:
            s.run(rng.randrange(*steps))
        except Violation as e:
            outcome.problems.append(str(e))
            s.sock.close()
            if s.companion is not None:
                s.companion.close()
        if len(outcome.problems) > 20:
            return


def main(argv):
    import argparse
    import tempfile
    import time

    from twisted.internet import reactor, task, threads
    from twisted.logger import globalLogPublisher

    from tests.fuzzing import runMain

    parser = argparse.ArgumentParser()
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args(argv)
    events = []
    globalLogPublisher.addObserver(events.append)

    def work(started):
        gw, hops, hopPorts, ports = started
        outcome = Outcome()

        def run():
            t0 = time.monotonic()
            for seed in args.seeds:
                runSessions(ports, seed, args.sessions, outcome)
            print("ran in %.1f s" % (time.monotonic() - t0))
            return outcome

        def settle(outcome, waited=0):
            got = sum(len(t["rcpts"]) for h in hops for t in h.transactions)
            if got < len(outcome.expected) and waited < 30:
                return task.deferLater(reactor, 0.5, settle, outcome, waited + 0.5)
            problems = outcome.check([t for h in hops for t in h.transactions], queuedClients(events))
            for p in problems[:30]:
                print("PROBLEM", p)
            print("seeds %s sessions %d commands %d checks %d messages-to %d problems %d" % (
                args.seeds, outcome.sessions, outcome.commands, outcome.checks, len(outcome.expected),
                len(problems)))
            return gw.stop().addCallback(lambda _: 1 if problems else 0)

        return threads.deferToThread(run).addCallback(settle)

    runMain(lambda: startGateway(tempfile.mkdtemp(prefix="trustfuzz-")), work)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
