"""
The trusted verbs over real loopback sockets: XCLIENT, XREMOTEIP,
XSETCONTEXT, XDUMPCONTEXT (protocol.md checklist 17, 18, 56-81), trust,
policy outcomes, and the identity in the spooled envelope and Received.
"""

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer

from relaygw import codes, xtext
from relaygw.policy import AcceptAll, IPolicy
from relaygw.testing import inThread
from relaygw.verbs import VerbError, xclient, xremoteip, xsetcontext
from tests.test_smtp import GatewayTestCase

ALL = ["xclient", "xremoteip", "xsetcontext", "xdumpcontext"]


@implementer(IPolicy)
class DocumentationNetOnly(AcceptAll):
    """Relays only for 192.0.2.0/24 (TEST-NET-1), judged on the context's remote_ip."""

    def rcpt(self, context, recipient):
        if context.get("remote_ip", "").startswith("192.0.2."):
            return None
        return codes.RELAY_DENIED.format(rcpt=recipient)


@implementer(IPolicy)
class RefuseTestNet2(AcceptAll):
    """Refuses clients from 198.51.100.0/24 at connect time."""

    def connect(self, context):
        if context.get("remote_ip", "").startswith("198.51.100."):
            return codes.Reply(554, "5.7.1", "access denied")
        return None


def dump(c):
    """XDUMPCONTEXT as {(scope, key): value}."""
    code, lines = c.cmd("XDUMPCONTEXT")
    assert code == 250, (code, lines)
    assert lines[-1] == "2.0.0 XDUMPCONTEXT complete", lines
    out = {}
    for line in lines[:-1]:
        assert line.startswith("2.0.0 ["), line
        scope, _, rest = line[7:].partition("] ")
        key, _, value = rest.partition(" ")
        out[(scope, key)] = value
    return out


class ParserTests(unittest.TestCase):
    def test_xclientCanonical(self):
        attrs = xclient.parse("NAME=mx+2Dxt.example.net ADDR=IPV6:2001:DB8::11 PORT=25 proto=esmtp")
        self.assertEqual(attrs, {"NAME": "mx-xt.example.net", "ADDR": "2001:db8::11", "PORT": 25,
                                 "PROTO": "ESMTP"})

    def test_xclientMappedAndSpecial(self):
        self.assertEqual(xclient.parse("ADDR=IPV6:::ffff:192.0.2.1")["ADDR"], "192.0.2.1")
        self.assertEqual(xclient.parse("NAME=[tempunavail]")["NAME"], "[TEMPUNAVAIL]")
        self.assertEqual(xclient.parse("LOGIN=nginx+user@example.org")["LOGIN"], "nginx+user@example.org")
        self.assertEqual(xclient.parse("NAME=a ADDR=192.0.2.1 NAME=b")["NAME"], "b")

    def test_xclientRefusals(self):
        for args in ("", "ADDR", "ADDR=", "FOO=1", "ADDR=999.0.2.300", "ADDR=2001:db8::1",
                     "ADDR=IPV6:192.0.2.1", "ADDR=[192.0.2.1]", "PORT=65536", "PORT=x", "PROTO=LMTP",
                     "NAME=-bad..name", "NAME=1234", "HELO=" + "h" * 256, "HELO=a+0Db", "PORT=[TEMPUNAVAIL]"):
            self.assertRaises(VerbError, xclient.parse, args)

    def test_xremoteip(self):
        self.assertEqual(xremoteip.parse("192.0.2.7"), "192.0.2.7")
        self.assertEqual(xremoteip.parse("IPv6:2001:db8::7"), "2001:db8::7")
        self.assertEqual(xremoteip.parse("2001:db8::7"), "2001:db8::7")
        for bad in ("", "999.1.1.1", "a b", "example.net"):
            self.assertIsNone(xremoteip.parse(bad))

    def test_xsetcontext(self):
        self.assertEqual(xsetcontext.parse("a=1 b=x+2By c="), [("a", "1"), ("b", "x+y"), ("c", "")])
        for bad in ("", "a", "=1", "a=+4", "a=+ZZ", "a=x+00"):
            self.assertRaises(VerbError, xsetcontext.parse, bad)


class TrustedTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ALL}

    def test_ehloAdvertisesVerbs(self):
        def run(c):
            lines = c.cmd("EHLO x")[1]
            self.assertIn("XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT", lines)
            for verb in ("XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"):
                self.assertIn(verb, lines)

        return self.session(run)

    def test_xclientSuccessNewGreetingAndSession(self):
        def run(c):
            c.cmd("EHLO x")
            before = dump(c)[("connection", "session_id")]
            code, lines = c.cmd("XCLIENT NAME=mx+2Dxt.example.net ADDR=192.0.2.7 PORT=4567")
            self.assertEqual(code, 220)
            self.assertTrue(lines[0].startswith("relay.test ESMTP"), lines)  # no enhanced code
            ctx = dump(c)
            self.assertNotEqual(ctx[("connection", "session_id")], before)
            self.assertEqual(ctx[("connection", "remote_name")], "mx-xt.example.net")
            self.assertEqual(ctx[("connection", "remote_ip")], "192.0.2.7")
            self.assertEqual(ctx[("connection", "remote_port")], "4567")
            self.assertEqual(ctx[("connection", "peer_ip")], "127.0.0.1")
            self.assertNotIn(("connection", "ehlo_domain"), ctx)  # HELO/EHLO forgotten

        return self.session(run)

    def test_xclientInTransactionKeepsOldIdentity(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7"), (503, ["5.5.1 Error: MAIL transaction in progress"]))
            self.assertEqual(dump(c)[("connection", "remote_ip")], "127.0.0.1")
            self.assertEqual(dump(c)[("message", "mailfrom_string")], "a@example.org")

        return self.session(run)

    def test_xclientSyntaxRefusalsChangeNothing(self):
        def run(c):
            for args in ("", "NAME=ok.example ADDR=999.0.2.300", "NAME=ok.example FOO=1", "ADDR",
                         "ADDR=", "ADDR=2001:db8::1", "ADDR=IPV6:192.0.2.1", "PORT=70000", "DESTPORT=x",
                         "PROTO=LMTP", "NAME=bad_name!", "HELO=" + "h" * 300):
                code, lines = c.cmd(("XCLIENT " + args).strip())
                self.assertEqual((code, lines[0][:6]), (501, "5.5.4 "), args)
            ctx = dump(c)
            self.assertEqual(ctx[("connection", "remote_ip")], "127.0.0.1")
            self.assertEqual(ctx[("connection", "remote_name")], "unknown")

        return self.session(run)

    def test_specialValuesAccepted(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT NAME=[UNAVAILABLE]")[0], 220)
            self.assertEqual(dump(c)[("connection", "remote_name_status")], "perm")
            self.assertEqual(c.cmd("XCLIENT NAME=[tempunavail]")[0], 220)
            self.assertEqual(dump(c)[("connection", "remote_name_status")], "temp")

        return self.session(run)

    def test_ipv6AndLoginAndHeloCountsAsGreeting(self):
        def run(c):
            code, _ = c.cmd("XCLIENT HELO=helo.example.net LOGIN=nginx+user@example.org ADDR=IPV6:2001:db8::11")
            self.assertEqual(code, 220)
            ctx = dump(c)
            self.assertEqual(ctx[("connection", "remote_ip")], "2001:db8::11")
            self.assertEqual(ctx[("connection", "auth_user")], "nginx+user@example.org")
            self.assertEqual(ctx[("connection", "auth_name")], "XCLIENT")
            self.assertEqual(ctx[("connection", "ehlo_domain")], "helo.example.net")
            # MAIL follows directly, as in Postfix.
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)

        return self.session(run)

    def test_loginUnavailableAuthenticatesNobody(self):
        def run(c):
            c.cmd("XCLIENT LOGIN=someone")
            c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")
            self.assertNotIn(("connection", "auth_user"), dump(c))

        return self.session(run)

    def test_secondXclientAfterUntrustedAddress(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.9")[0], 220)
            self.assertIn("XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT", c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.8")[0], 220)
            self.assertEqual(dump(c)[("connection", "trusted")], "yes")

        return self.session(run)

    def test_xremoteip(self):
        def run(c):
            c.cmd("EHLO keep.example")
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.7"), (250, ["2.0.0 Ok"]))
            ctx = dump(c)
            self.assertEqual(ctx[("connection", "remote_ip")], "192.0.2.7")
            self.assertEqual(ctx[("connection", "remote_name")], "unknown")
            self.assertEqual(ctx[("connection", "ehlo_domain")], "keep.example")  # not reset
            self.assertEqual(c.cmd("XREMOTEIP IPv6:2001:db8::5")[0], 250)
            self.assertEqual(dump(c)[("connection", "remote_ip")], "2001:db8::5")
            self.assertEqual(c.cmd("XREMOTEIP 999.1.1.1")[1][0][:6], "5.5.4 ")
            self.assertEqual(c.cmd("XREMOTEIP")[0], 501)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.9")[1][0][:6], "5.5.1 ")

        return self.session(run)

    def test_xsetcontext(self):
        def run(c):
            self.assertEqual(c.cmd("XSETCONTEXT a=1 b=x+2By"), (250, ["2.0.0 Ok"]))
            ctx = dump(c)
            self.assertEqual((ctx[("connection", "a")], ctx[("connection", "b")]), ("1", "x+y"))
            c.cmd("XSETCONTEXT a=2")
            self.assertEqual(dump(c)[("connection", "a")], "2")
            for args in ("remote_ip=192.0.2.1", "auth_user=root", "__bypass_x=1", "ok=1 trusted=yes",
                         "a=+4", "a=+ZZ", "", "=1", "novalue"):
                code, lines = c.cmd(("XSETCONTEXT " + args).strip())
                self.assertEqual((code, lines[0][:6]), (501, "5.5.4 "), args)
            ctx = dump(c)
            self.assertNotIn(("connection", "ok"), ctx)  # all or nothing
            self.assertEqual(ctx[("connection", "remote_ip")], "127.0.0.1")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XSETCONTEXT z=1")[1][0][:6], "5.5.1 ")

        return self.session(run)

    def test_xsetcontextLimits(self):
        def run(c):
            self.assertEqual(c.cmd("XSETCONTEXT big=" + "v" * 1025)[0], 501)
            for i in range(64):
                self.assertEqual(c.cmd("XSETCONTEXT k%d=1" % i)[0], 250)
            self.assertEqual(c.cmd("XSETCONTEXT onemore=1")[0], 501)

        return self.session(run)

    def test_xdumpcontextFormat(self):
        def run(c):
            c.cmd("EHLO there")
            code, lines = c.cmd("XDUMPCONTEXT")
            self.assertIn("2.0.0 [connection] ehlo_domain there", lines)
            self.assertIn("2.0.0 [connection] ehlo_string ehlo there", lines)
            self.assertEqual(lines[-1], "2.0.0 XDUMPCONTEXT complete")
            self.assertFalse(any("[message]" in l for l in lines))
            c.cmd("MAIL FROM:<a@example.org>")
            lines = c.cmd("XDUMPCONTEXT")[1]
            self.assertIn("2.0.0 [message] mailfrom_string a@example.org", lines)
            self.assertEqual(c.cmd("XDUMPCONTEXT now")[0], 501)

        return self.session(run)

    @defer.inlineCallbacks
    def test_identityInEnvelopeAndReceived(self):
        def run(c):
            c.cmd("EHLO proxy.example")
            c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net")
            c.cmd("XSETCONTEXT binding=bulk")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)  # trusted peers relay
            c.cmd("DATA")
            c.send("Subject: id\r\n\r\nx\r\n.\r\n")
            return c.reply()[1][0].rsplit(" ", 1)[1]

        yield self.session(run)
        yield self.gw.service.queue.whenIdle()
        [msg] = self.gw.delivered()
        self.assertIn(b"Received: from helo.example.net (client.example.net [192.0.2.7])\r\n"
                      b"\t(via [127.0.0.1] port ", msg)

    @defer.inlineCallbacks
    def test_envelopeCarriesContext(self):
        self.gw.service.queue.stopService()  # keep the message in the spool

        def run(c):
            c.cmd("XCLIENT ADDR=IPV6:2001:db8::11 NAME=[UNAVAILABLE]")
            c.cmd("XSETCONTEXT binding=bulk")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            c.send("Subject: id\r\n\r\nx\r\n.\r\n")
            return c.reply()[1][0].rsplit(" ", 1)[1]

        qid = yield self.session(run)
        m = self.gw.service.spool.load(qid)
        conn = m.envelope["context"]["connection"]
        self.assertEqual((conn["remote_ip"], conn["binding"], conn["peer_ip"]), ("2001:db8::11", "bulk", "127.0.0.1"))
        with open(m.path, "rb") as f:
            f.seek(m.bodyOffset)
            self.assertTrue(f.read().startswith(b"Received: from unknown (unknown [IPv6:2001:db8::11])"))


class UntrustedTests(GatewayTestCase):
    listener = {"trusted_peers": ["192.0.2.0/24"], "extensions": ALL}

    def test_notAdvertisedAndRefused(self):
        def run(c):
            lines = c.cmd("EHLO x")[1]
            for verb in ("XCLIENT", "XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"):
                self.assertFalse(any(l.startswith(verb) for l in lines), lines)
            for cmd in ("XCLIENT ADDR=192.0.2.7", "XREMOTEIP 192.0.2.7", "XSETCONTEXT a=1", "XDUMPCONTEXT"):
                self.assertEqual(c.cmd(cmd), (550, ["5.7.0 Error: insufficient authorization"]), cmd)
            c.cmd("MAIL FROM:<a@example.org>")
            # Nothing changed: still an unknown local client that may not relay.
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class DisabledTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xdumpcontext"]}

    def test_disabledVerbNotAdvertisedNotImplemented(self):
        def run(c):
            lines = c.cmd("EHLO x")[1]
            self.assertIn("XDUMPCONTEXT", lines)
            self.assertFalse(any(l.startswith("XCLIENT") for l in lines))
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7"), (502, ["5.5.1 Error: command not implemented"]))
            self.assertEqual(c.cmd("XSETCONTEXT a=1")[0], 502)

        return self.session(run)


class PolicyTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient", "xremoteip"],
                "policy": "tests.test_verbs.DocumentationNetOnly"}

    def test_overriddenAddressDecidesPolicy(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)
            c.cmd("RSET")
            c.cmd("XCLIENT ADDR=192.0.2.7")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)
            c.cmd("RSET")
            self.assertEqual(c.cmd("XREMOTEIP 203.0.113.1")[0], 250)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class RelayNetworksTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.2/32"], "extensions": ["xclient"], "relay_networks": ["192.0.2.0/24"]}

    def test_untrustedCannotForgeIntoRelayNetworks(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 550)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class RelayAccessPolicyTests(unittest.TestCase):
    """The built-in policy judges the (possibly overridden) context."""

    def test_decisions(self):
        from relaygw.config import ListenerConfig
        from relaygw.context import ValidationContext
        from relaygw.policy import RelayAccessPolicy

        policy = RelayAccessPolicy(ListenerConfig(name="x", endpoint="tcp:1", relay_networks=("192.0.2.0/24",)))
        self.assertEqual(policy.rcpt(ValidationContext(remote_ip="203.0.113.1"), "b@example.net").code, 554)
        self.assertIsNone(policy.rcpt(ValidationContext(remote_ip="192.0.2.7"), "b@example.net"))
        self.assertIsNone(policy.rcpt(ValidationContext(remote_ip="203.0.113.1", auth_user="alice"), "b@x.net"))
        self.assertIsNone(policy.rcpt(ValidationContext(remote_ip="203.0.113.1", trusted=True), "b@x.net"))


class ConnectPolicyAfterXclientTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                "policy": "tests.test_verbs.RefuseTestNet2"}

    def test_refusedIdentityGets503UntilQuit(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=198.51.100.7"), (554, ["5.7.1 access denied"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>"), (503, ["5.7.0 Error: access denied"]))
            self.assertEqual(c.cmd("QUIT")[0], 221)

        return self.session(run)


class XtextTests(unittest.TestCase):
    def test_encodeEscapes(self):
        self.assertEqual(xtext.encode(b"a+b=c d\x01\x7f\xe9"), "a+2Bb+3Dc+20d+01+7F+E9")
        self.assertEqual(xtext.encode("\u20ac"), "+E2+82+AC")

    def test_roundTrip(self):
        data = bytes(b for b in range(1, 256))
        self.assertEqual(xtext.decode(xtext.encode(data)), data)

    def test_decodeRefusals(self):
        for bad in ("+4", "+ZZ", "a+", "+00", "a b"):
            self.assertRaises(xtext.XtextError, xtext.decode, bad)
        self.assertEqual(xtext.decode("x+2by"), b"x+y")  # lowercase hex tolerated
        self.assertEqual(xtext.decode("nginx+user", lenient=True), b"nginx+user")


class EscapingTests(unittest.TestCase):
    def test_renderEscapesControlCharacters(self):
        wire = codes.render(250, "2.0.0", ["[connection] k a\r\n250 injected\x00"])
        self.assertEqual(wire, b"250 2.0.0 [connection] k a+0D+0A250 injected+00\r\n")
