"""
Trust says who the client is, never that it may relay: relaying judged on
the claimed identity, per-IP limits on the claimed client, the trace
header, XCLIENT HELO= validation, AUTH PLAIN authzid, require_tls gating
and the per-session settings bundle.  Sessions run without sockets
(PROXY headers through the listener's wrapper, TLS in memory); relaygw
relaying to relaygw runs over loopback sockets.
"""

import dataclasses
import os
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import trust
from relaygw.auth import PasswordFile
from relaygw.commands import parseHelo
from relaygw.testing import Client, configText, inThread, receivedHeader
from relaygw.verbs import xclient
from tests.authexchange import authReply, b64
from tests.contextdump import conn
from tests.messages import queueMessage, sendMessage
from tests.proxyheaders import v2
from tests.recorders import LogCapture
from tests.relaysetup import forwardingChain
from tests.sessions import SessionTestCase, TLSSessionTestCase

ALL = ["xclient", "xremoteip", "xsetcontext", "xdumpcontext"]
DENIED = (554, ["5.7.1 <victim@gmail.example>: Relay access denied"])
TOO_MANY = (421, ["4.7.0 relay.test too many connections, try again later"])
NEED_TLS = (530, ["5.7.0 Must issue a STARTTLS command first"])


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def rcpt(c, to="victim@gmail.example"):
    c.cmd("RSET")
    assert c.cmd("MAIL FROM:<spam@spammer.example>")[0] == 250
    reply = c.cmd("RCPT TO:<%s>" % (to,))
    c.cmd("RSET")
    return reply


def proxied(testcase, source):
    """A harness client from the balancer (127.0.0.1) behind a PROXY v2 header naming C{source}."""
    c = testcase.harness.connect(proxy=v2(src=source))
    testcase.addCleanup(c.lose)
    return c


class RelayOnClaimedIdentityTests(SessionTestCase):
    """Item 1: a trusted peer gets the verbs, never relaying."""

    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ALL, "relay_networks": ["192.0.2.0/24"]}
    realSpool = True

    def test_issueTranscriptIsRefused(self):
        def run(c):
            c.cmd("EHLO relay-proxy.localdomain")
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.66 NAME=[UNAVAILABLE]")[0], 220)
            c.cmd("EHLO spammer.example")
            self.assertEqual(c.cmd("MAIL FROM:<spam@spammer.example>"), (250, ["2.1.0 Ok"]))
            self.assertEqual(c.cmd("RCPT TO:<victim@gmail.example>"), DENIED)
            self.assertEqual(conn(c)["trusted"], "yes")  # still trusted: the verbs work

        return self.session(run)

    def test_xremoteipOutsideIsRefused(self):
        def run(c):
            self.assertEqual(c.cmd("XREMOTEIP 203.0.113.66")[0], 250)
            self.assertEqual(rcpt(c), DENIED)
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.66")[0], 250)
            self.assertEqual(rcpt(c)[0], 250)

        return self.session(run)

    def test_trustedPeerItselfIsNotARelayClient(self):
        def run(c):
            self.assertEqual(rcpt(c), DENIED)  # 127.0.0.1 is trusted but not in relay_networks

        return self.session(run)

    def test_loginRelaysFromAnyAddress(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.66 LOGIN=alice")[0], 220)
            self.assertEqual(rcpt(c), (250, ["2.1.5 Ok"]))

        return self.session(run)

    @defer.inlineCallbacks
    def test_insideIsRelayedAndDelivered(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.66 NAME=[UNAVAILABLE]")[0], 220)
            c.cmd("EHLO inside.example")
            return queueMessage(c, rcpt="victim@gmail.example", subject="inside")

        yield self.session(run)
        [(_, msg)] = self.spooled()
        self.assertTrue(receivedHeader(msg).startswith(b"Received: from inside.example (unknown [192.0.2.66])\r\n"
                                                       b"\tby relay.test (relaygw) with ESMTP id "))


class RelayOnProxySourceTests(SessionTestCase):
    """Item 1 behind PROXY: a source trusted for the verbs still relays only from relay_networks."""

    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "trusted_peers": ["203.0.113.0/24"],
                "extensions": ["xclient", "xdumpcontext"], "relay_networks": ["192.0.2.0/24"]}

    def test_trustedSourceOutsideRelayNetworksIsRefused(self):
        c = proxied(self, "203.0.113.66")
        self.assertEqual(c.reply()[0], 220)
        self.assertIn("XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT", c.cmd("EHLO x")[1])
        self.assertEqual(rcpt(c), DENIED)
        c2 = proxied(self, "192.0.2.7")
        self.assertEqual(c2.reply()[0], 220)
        self.assertEqual(rcpt(c2), (250, ["2.1.5 Ok"]))


class TrustPolicyTests(unittest.TestCase):
    """Item 9: the one object that answers for trust."""

    def test_connectionVerdicts(self):
        policy = trust.TrustPolicy(["127.0.0.0/8"], ["10.0.0.1/32"])
        self.assertEqual(policy.forConnection("127.0.0.5"), trust.Verdict(True, "peer"))
        self.assertEqual(policy.forConnection("192.0.2.1"), trust.UNTRUSTED)
        # A balancer may send PROXY headers; that makes it no trusted peer.
        self.assertTrue(policy.balancer("10.0.0.1"))
        self.assertFalse(policy.balancer("127.0.0.5"))
        self.assertEqual(policy.forConnection("10.0.0.1"), trust.UNTRUSTED)

    def test_linkLocalBalancer(self):
        """
        A balancer on a link-local address is known by its address, as a
        trusted peer is: the socket's zone (its interface) is not part of it.
        """
        policy = trust.TrustPolicy(["fe80::/10"], ["fe80::1/128"])
        self.assertTrue(policy.balancer("fe80::1%eth0"))
        self.assertFalse(policy.balancer("fe80::2%eth0"))
        self.assertFalse(policy.balancer(None))  # (a UNIX socket's peer)
        self.assertFalse(policy.balancer("not an address"))
        self.assertEqual(policy.forConnection(trust.peerIP("fe80::2%eth0")), trust.Verdict(True, "peer"))

    def test_noCertificateTrustWithoutClientCA(self):
        policy = trust.TrustPolicy(clientIdentities=["dns:lb1.example.net"])
        self.assertIs(policy.afterHandshake(object()), trust.UNTRUSTED)
        self.assertRaises(ValueError, trust.TrustPolicy, clientIdentities=["lb1"])


class AuthzidTests(SessionTestCase):
    """Item 7: RFC 4616 authzid."""

    def setUp(self):
        users = os.path.abspath(self.mktemp())
        PasswordFile(users).set("alice", "s3cret")
        PasswordFile(users).set("bob", "b0b")
        self.listener = {"credentials": users, "auth_plaintext": True}
        SessionTestCase.setUp(self)

    @defer.inlineCallbacks
    def test_authzidForAnotherUserIsRefused(self):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        c.cmd("EHLO x")
        # Bob's right password, acting for alice: refused.
        self.assertEqual((yield authReply(self.harness, c, "AUTH PLAIN " + b64("alice\0bob\0b0b"))),
                         (535, ["5.7.8 Error: authentication failed"]))
        self.assertEqual(c.cmd("AUTH PLAIN"), (334, [""]))
        self.assertEqual((yield authReply(self.harness, c, b64("bob\0alice\0s3cret"))),
                         (535, ["5.7.8 Error: authentication failed"]))
        self.assertEqual(rcpt(c), DENIED)  # nobody logged in
        # An authzid equal to the authcid is the same user.
        self.assertEqual((yield authReply(self.harness, c, "AUTH PLAIN " + b64("alice\0alice\0s3cret"))),
                         (235, ["2.7.0 Authentication successful"]))


class RequireTLSTests(TLSSessionTestCase):
    """Item 8: protocol.md section 8, before TLS."""

    tlsListener = {"require_tls": True, "trusted_peers": ["127.0.0.0/8"], "extensions": ALL,
                   "relay_networks": ["127.0.0.0/8"]}

    def test_onlyTheListedCommandsBeforeTLS(self):
        def run(c):
            self.assertEqual(c.cmd("EHLO x")[0], 250)
            self.assertEqual(c.cmd("HELO x")[0], 250)
            self.assertEqual(c.cmd("NOOP"), (250, ["2.0.0 Ok"]))
            self.assertEqual(c.cmd("HELP")[0], 214)
            self.assertEqual(c.cmd("XCLIENT ADDR=127.0.0.7")[0], 220)
            for command in ("VRFY postmaster", "RSET", "XSETCONTEXT a=b", "XREMOTEIP 192.0.2.1", "XDUMPCONTEXT",
                            "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA", "EXPN list",
                            "AUTH PLAIN", "BDAT 10 LAST", "FROBNICATE"):
                self.assertEqual(c.cmd(command), NEED_TLS, command)
            self.starttls(c)
            c.cmd("EHLO x")
            self.assertEqual(c.cmd("RSET"), (250, ["2.0.0 Ok"]))
            self.assertEqual(c.cmd("VRFY postmaster")[0], 252)
            self.assertEqual(c.cmd("XREMOTEIP 127.0.0.8")[0], 250)
            self.assertEqual(conn(c)["remote_ip"], "127.0.0.8")
            self.assertEqual(c.cmd("QUIT")[0], 221)

        return self.session(run)

    def test_quitBeforeTLS(self):
        def run(c):
            self.assertEqual(c.cmd("QUIT")[0], 221)
            self.assertTrue(c.closed())

        return self.session(run)


class HeloValidationTests(SessionTestCase):
    """Item 5: XCLIENT HELO= and the EHLO argument go through one function."""

    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ALL, "relay_networks": ["127.0.0.0/8"]}
    realSpool = True
    FORGED = "fake (trusted.example [10.0.0.1]) by mx.bank.example"

    def test_sameFunction(self):
        self.assertEqual(parseHelo(self.FORGED), ("fake", self.FORGED))
        self.assertEqual(parseHelo("  a\tb"), ("a?b", "  a?b"))
        self.assertEqual(parseHelo("   "), (None, "   "))
        encoded = self.FORGED.replace(" ", "+20")
        self.assertEqual(xclient.parse("HELO=" + encoded)["HELO"], parseHelo(self.FORGED)[0])

    @defer.inlineCallbacks
    def test_xclientHeloCannotAddAClause(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT HELO=" + self.FORGED.replace(" ", "+20"))[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["ehlo_domain"], ctx["helo_name"]), ("fake", "fake"))
            return queueMessage(c)

        yield self.session(run)
        [(_, msg)] = self.spooled()
        self.assertTrue(receivedHeader(msg).startswith(b"Received: from fake (unknown [127.0.0.1])\r\n"
                                                       b"\tby relay.test (relaygw) with SMTP id "), msg)
        self.assertNotIn(b"bank", msg)

    def test_ehloKeepsOneWordToo(self):
        def run(c):
            c.cmd("EHLO " + self.FORGED)
            ctx = conn(c)
            self.assertEqual(ctx["ehlo_domain"], "fake")
            self.assertEqual(ctx["ehlo_string"], "ehlo " + self.FORGED)

        return self.session(run)


class PerClaimedIPTests(SessionTestCase):
    """Item 3: per-IP limits count the claimed client, not the balancer."""

    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ALL, "relay_networks": ["192.0.2.0/24"],
                "max_connections_per_ip": 2}

    def open(self, claim):
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        verb, address = claim
        return c, c.cmd("%s %s" % (verb, address if verb == "XREMOTEIP" else "ADDR=" + address))

    def quit(self, c):
        """QUIT, and the client goes away once the session has closed."""
        c.cmd("QUIT")
        self.assertTrue(c.closed())
        c.lose()

    def test_threeClientsFromThreeAddresses(self):
        sessions = [self.open(("XCLIENT", "192.0.2.%d" % n)) for n in (1, 2, 3)]
        for c, reply in sessions:
            self.assertEqual(reply[0], 220)
            self.assertEqual(rcpt(c)[0], 250)

    def test_threeClientsFromOneAddress(self):
        for verb in ("XCLIENT", "XREMOTEIP"):
            held = [self.open((verb, "192.0.2.9")) for _ in range(2)]
            self.assertEqual([reply[0] for _, reply in held], [220, 220] if verb == "XCLIENT" else [250, 250])
            c, reply = self.open((verb, "192.0.2.9"))
            self.assertEqual(reply, TOO_MANY, verb)
            self.assertTrue(c.closed())
            c.lose()
            # Closing one frees its place.
            self.quit(held[0][0])
            self.assertLess(self.harness.factory.clients.perIP.get("192.0.2.9", 0), 2)
            c, reply = self.open((verb, "192.0.2.9"))
            self.assertEqual(reply[0], 220 if verb == "XCLIENT" else 250)
            for h, _ in held[1:] + [(c, None)]:
                self.quit(h)

    def test_attributesWithoutAnAddress(self):
        """
        An XCLIENT without ADDR (a line split before its ADDR, or only a
        LOGIN or NAME) claims no client address: the balancer is not counted
        under its own, so more of its sessions than the per-IP limit go on.
        """
        sessions = []
        for n in (1, 2, 3):
            c = self.client()
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("XCLIENT HELO=client%d.example LOGIN=user%d" % (n, n))[0], 220)
            sessions.append(c)
        for n, c in enumerate(sessions, 1):
            self.assertEqual(c.cmd("XCLIENT NAME=mx%d.example" % (n,))[0], 220)
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.%d" % (n,))[0], 220)
        self.assertEqual(dict(self.harness.factory.clients.perIP), {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 1})

    def test_untrustedPeerIsCountedAtConnect(self):
        factory = self.harness.factory
        factory.applyListener(dataclasses.replace(factory.listener, trusted_peers=()))
        held = [self.client() for _ in range(2)]
        for c in held:
            self.assertEqual(c.reply()[0], 220)
        c = self.client()
        self.assertEqual(c.reply(), (421, ["4.7.0 relay.test too many connections, try again later"]))


class PerProxySourceTests(SessionTestCase):
    """Item 3 behind PROXY: the header's source is counted at connect."""

    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "max_connections_per_ip": 1,
                "received_shows_peer": True, "relay_networks": ["192.0.2.0/24"]}
    realSpool = True

    @defer.inlineCallbacks
    def test_countedPerSource(self):
        first = proxied(self, "192.0.2.7")
        self.assertEqual(first.reply()[0], 220)
        second = proxied(self, "192.0.2.7")
        self.assertEqual(second.reply(), TOO_MANY)
        other = proxied(self, "192.0.2.8")
        self.assertEqual(other.reply()[0], 220)
        other.cmd("EHLO other.example")
        yield queueMessage(other, subject="shows-peer")
        [(_, msg)] = self.spooled()
        # received_shows_peer = true: the balancer is named.
        self.assertTrue(receivedHeader(msg).startswith(b"Received: from other.example (unknown [192.0.2.8])\r\n"
                                                       b"\t(proxied by [127.0.0.1])\r\n"), msg)


    def test_balancersOwnConnectionsNotCounted(self):
        """
        The balancer's own connections (HAProxy's health checks: a version 2
        LOCAL header, or a version 1 header naming the balancer itself) are
        not counted under its address, however many are open at once.
        """
        headers = [v2(command=0), v2(command=0), b"PROXY TCP4 127.0.0.1 127.0.0.1 40001 25\r\n",
                   v2(src="127.0.0.1", dst="127.0.0.1")]
        sessions = [self.harness.connect(proxy=header) for header in headers]
        for c in sessions:
            self.addCleanup(c.lose)
            self.assertEqual(c.reply()[0], 220)
        self.assertEqual(dict(self.harness.factory.clients.perIP), {})
        # A client is still counted.
        first = proxied(self, "192.0.2.7")
        self.assertEqual(first.reply()[0], 220)
        self.assertEqual(proxied(self, "192.0.2.7").reply(), TOO_MANY)


class SettingsBundleTests(SessionTestCase):
    """Item 9: a session pins its listener's settings, policy and trust whole at connect."""

    listener = {"relay_networks": ["127.0.0.0/8"], "max_recipients": 5}

    def reload(self, **listener):
        harness = self.harness
        with open(harness.path, "w") as f:
            f.write(configText(harness.directory, listeners=(listener,)))
        harness.service.configPath = harness.path  # what SIGHUP re-reads
        harness.service.reload()

    def test_reloadAppliesToNewSessionsOnly(self):
        factory = self.harness.factory
        before = factory.settings
        c = self.client()
        self.assertEqual(c.reply()[0], 220)
        self.reload(relay_networks=[], max_recipients=1)
        self.assertIsNot(factory.settings, before)
        self.assertEqual(factory.settings.listener.max_recipients, 1)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, before, "policy", None)
        # The live session keeps the old policy and the old limits together.
        c.cmd("MAIL FROM:<a@example.org>")
        for n in range(3):
            self.assertEqual(c.cmd("RCPT TO:<r%d@example.net>" % n), (250, ["2.1.5 Ok"]))
        c.cmd("RSET")
        live = [s for s in factory.sessions]
        self.assertEqual([s.settings for s in live], [before])
        # A new session gets the new bundle: no relaying, one recipient.
        c2 = self.client()
        self.assertEqual(c2.reply()[0], 220)
        c2.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(c2.cmd("RCPT TO:<r@example.net>"), (554, ["5.7.1 <r@example.net>: Relay access denied"]))
        self.assertEqual(c.cmd("QUIT")[0], 221)


class OnwardAttributesTests(unittest.TestCase):
    """Item 6 (the table): what relaygw sends in XCLIENT, its own XCLIENT accepts."""

    NAMES = ["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"]

    def attributes(self, **connection):
        from relaygw.relay.identity import _identityAttributes

        return _identityAttributes(connection, self.NAMES, xclient=True)

    def test_alwaysAllowIsNoLogin(self):
        attrs = self.attributes(remote_ip="192.0.2.7", auth_user="anonymous", auth_name="ALWAYS-ALLOW",
                                protocol="ESMTP")
        self.assertIn("LOGIN=[UNAVAILABLE]", attrs)
        attrs = self.attributes(remote_ip="192.0.2.7", auth_user="alice", auth_name="AUTH", protocol="ESMTP")
        self.assertIn("LOGIN=alice", attrs)

    def test_everythingSentIsAccepted(self):
        contexts = [
            {"remote_ip": "192.0.2.7"},  # no protocol, name, port, HELO or login
            {"remote_ip": "192.0.2.7", "remote_name": "unknown", "remote_name_status": "temp", "remote_port": 0,
             "protocol": "SMTP", "ehlo_domain": "h.example", "auth_user": "anonymous", "auth_name": "ALWAYS-ALLOW"},
            {"remote_ip": "2001:db8::1", "remote_name": "c.example", "remote_port": 25, "protocol": "ESMTPSA",
             "auth_user": "u+x@example.org", "auth_name": "XCLIENT"},
            {"remote_ip": "unknown", "protocol": "ESMTP"},
            # Values whose encoding is over 255 octets ("+" and "=" go as three).
            {"remote_ip": "192.0.2.7", "ehlo_domain": "a" * 255, "auth_user": "u" + "+" * 100 + "@example.org"},
            {"remote_ip": "192.0.2.7", "ehlo_domain": "a" + "+" * 100, "auth_user": "=" * 90},
        ]
        for connection in contexts:
            attrs = self.attributes(**connection)
            self.assertTrue(attrs, connection)
            self.assertNotIn("PROTO=[UNAVAILABLE]", attrs)
            parsed = xclient.parse(" ".join(attrs))  # raises VerbError if relaygw would refuse it
            self.assertEqual(set(parsed), {a.split("=", 1)[0] for a in attrs})

    def test_bounceForwardsNothing(self):
        self.assertEqual(self.attributes(bounce_for="QID"), ())


class FactsStayInLogsTests(SessionTestCase):
    """Item 4: what Received leaves out, the log and XDUMPCONTEXT keep."""

    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], "trusted_peers": ["192.0.2.0/24"],
                "extensions": ["xclient", "xdumpcontext"], "relay_networks": ["192.0.2.0/24"]}
    realSpool = True

    @defer.inlineCallbacks
    def test_balancerPeerAndLogin(self):
        logs = LogCapture(self)
        c = proxied(self, "192.0.2.7")
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.99 LOGIN=alice")[0], 220)
        ctx = conn(c)
        self.assertEqual((ctx["remote_ip"], ctx["peer_ip"], ctx["proxy_peer_ip"], ctx["auth_user"]),
                         ("192.0.2.99", "192.0.2.7", "127.0.0.1", "alice"))
        yield queueMessage(c)
        [proxiedBy] = logs.find("proxied by")
        self.assertEqual(proxiedBy["balancer"], "127.0.0.1")
        [audit] = logs.find("accepted: {changes}", verb="XCLIENT")
        self.assertEqual(audit["peer"], "192.0.2.7")
        self.assertIn("auth_user None -> 'alice'", audit["changes"])


class RelaygwToRelaygwTests(unittest.TestCase):
    """
    Item 6 through a real next hop, relaygw itself: with forward_identity,
    whatever the first gateway sends in XCLIENT the second accepts, for a
    claimed client, an ALWAYS-ALLOW session (no login goes onward) and a
    bounce (no client: the first gateway is the client).  Two gateways on
    loopback sockets: the messages go through the first one's queue manager
    and delivery client to the second.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # The next hop relays for 192.0.2.0/24 and for the first gateway
        # itself (127.0.0.1), not for 198.51.100.0/24.
        yield forwardingChain(self, listeners=(
            {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
             "relay_networks": ["192.0.2.0/24", "198.51.100.0/24"]},
            {"name": "anon", "always_allow": True}))

    @defer.inlineCallbacks
    def arrivals(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while len(self.arrived) < n and time.monotonic() < deadline:
            yield self.gw.service.queue.whenIdle()
            yield self.hop.service.queue.whenIdle()
            yield deferLater(0.05)
        self.assertEqual(len(self.arrived), n, self.arrived)
        return self.arrived

    def session(self, port, f):
        def run():
            c = Client(port)
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            return f(c)

        return inThread(run)

    @defer.inlineCallbacks
    def test_claimedClientAndAlwaysAllow(self):
        def claimed(c):
            self.assertEqual(c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567")[0], 220)
            c.cmd("EHLO helo.example.net")
            return sendMessage(c, subject="claimed")

        yield self.session(self.gw.ports[0], claimed)
        [first] = yield self.arrivals(1)
        ctx = first.context["connection"]
        self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["remote_port"], ctx["ehlo_domain"]),
                         ("192.0.2.7", "client.example.net", 4567, "helo.example.net"))
        self.assertEqual((ctx["peer_ip"], ctx["overridden"]), ("127.0.0.1", True))
        self.assertNotIn("auth_user", ctx)

        def anonymous(c):
            c.cmd("EHLO anon.example")
            return sendMessage(c, subject="anonymous")

        yield self.session(self.gw.ports[1], anonymous)
        [_, second] = yield self.arrivals(2)
        ctx = second.context["connection"]
        # ALWAYS-ALLOW logged in nobody: it goes on as LOGIN=[UNAVAILABLE] and
        # relays at the next hop on its own address (127.0.0.1), not a login.
        self.assertNotIn("auth_user", ctx)
        self.assertEqual((ctx["remote_ip"], ctx["ehlo_domain"], ctx["overridden"]),
                         ("127.0.0.1", "anon.example", True))

    @defer.inlineCallbacks
    def test_bounceGoesOnAsTheGatewaysOwnMail(self):
        def refusedOnward(c):
            # The first gateway relays 198.51.100.7; the next hop does not.
            self.assertEqual(c.cmd("XCLIENT ADDR=198.51.100.7")[0], 220)
            c.cmd("EHLO outside.example")
            return sendMessage(c, mailfrom="sender@example.org", subject="refused-onward")

        yield self.session(self.gw.ports[0], refusedOnward)
        [bounce] = yield self.arrivals(1)
        self.assertEqual((bounce.mailfrom, bounce.recipients), ("", ["sender@example.org"]))
        ctx = bounce.context["connection"]
        # No XCLIENT: the next hop judged the gateway itself.
        self.assertEqual((ctx["remote_ip"], ctx["peer_ip"]), ("127.0.0.1", "127.0.0.1"))
        self.assertNotIn("overridden", ctx)
        yield self.hop.service.queue.whenIdle()
        [delivered] = self.hop.delivered()
        self.assertIn(b"5.7.1", delivered)
        self.assertIn(b"refused-onward", delivered)
