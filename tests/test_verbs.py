"""
The trusted verbs XCLIENT, XREMOTEIP, XSETCONTEXT and XDUMPCONTEXT
(protocol.md sections 1, 3, 10-14; checklist 17, 18, 56-72, 75-80).

First the pure parsers, then sessions on a StringTransport with a
task.Clock (L{relaygw.testing.SessionHarness}, no sockets): trust,
advertisement, every refusal, the claimed identity as policy, logs, the
spooled envelope and the Received header the spool writes.  What needs a
real connection stays on a gateway on loopback sockets: context across a
real TLS handshake, and the onward XCLIENT a next hop receives.
Checklist 73 and 74 (nginx, swaks) are in test_interop_xclient; the xtext
codec (81) and the context itself are in test_xtext and test_context.
"""

import os
import re
import time

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent
from twisted.trial import unittest
from zope.interface import implementer

from relaygw import codes, xtext
from relaygw.context import ValidationContext
from relaygw.policy import AcceptAll, IPolicy
from relaygw.testing import ScriptedSMTPFactory, SessionHarness, receivedHeader
from relaygw.verbs import VerbError, xclient, xdumpcontext, xremoteip, xsetcontext
from tests.contextdump import conn
from tests.messages import queueMessage, sendMessage
from tests.recorders import LogCapture
from tests.sessions import GatewayTestCase, SessionTestCase, TLSGatewayTestCase

ALL = ["xclient", "xremoteip", "xsetcontext", "xdumpcontext"]
#: Trust grants the verbs only: the claimed clients the tests send mail for
#: relay because their addresses are in relay_networks.
TRUSTED = {"trusted_peers": ["127.0.0.0/8"], "extensions": ALL,
           "relay_networks": ["127.0.0.0/8", "::1/128", "192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"]}
#: Postfix's XCLIENT keyword line (checklist 17).
XCLIENT_KEYWORD = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"
SYNTAX = "5.5.4 "


# -- policies named by listeners below ------------------------------------


@implementer(IPolicy)
class RefuseTestNet2(AcceptAll):
    """Refuses clients from 198.51.100.0/24 (TEST-NET-2) at connect time."""

    def connect(self, context):
        if context.get("remote_ip", "").startswith("198.51.100."):
            return codes.Reply(554, "5.7.1", "access denied")
        return None


@implementer(IPolicy)
class FailForTestNet2(AcceptAll):
    """Fails for clients from 198.51.100.0/24: its Deferred fails for .7, it raises for the others."""

    def connect(self, context):
        ip = context.get("remote_ip", "")
        if ip == "198.51.100.7":
            return defer.fail(RuntimeError("the policy's lookup backend timed out"))
        if ip.startswith("198.51.100."):
            raise RuntimeError("the policy's lookup backend is down")
        return None


@implementer(IPolicy)
class Recorder(AcceptAll):
    """Accepts everything and records what each hook saw of the identity."""

    KEYS = ("remote_ip", "remote_name", "remote_port", "ehlo_domain", "auth_user", "peer_ip", "session_id")

    def __init__(self, listener=None):
        AcceptAll.__init__(self, listener)
        self.calls = []

    def _record(self, hook, context):
        self.calls.append((hook, {k: context.get(k) for k in self.KEYS}))

    def connect(self, context):
        self._record("connect", context)

    def helo(self, context):
        self._record("helo", context)

    def mail(self, context):
        self._record("mail", context)

    def rcpt(self, context, recipient):
        self._record("rcpt", context)

    def data(self, context):
        self._record("data", context)


# -- helpers ----------------------------------------------------------------


class VerbTestCase(SessionTestCase):
    """
    Sessions from 127.0.0.1 on the harness, accepted messages in its real
    spool (which writes the Received header); nothing is delivered.
    """

    listener = TRUSTED
    realSpool = True

    def queuedReceived(self):
        """The Received header of the one message queued, as the spool stored it."""
        [(message, content)] = self.spooled()
        return receivedHeader(content)


# -- the pure parsers ---------------------------------------------------------


class XclientParseTests(unittest.TestCase):
    def refused(self, args):
        e = self.assertRaises(VerbError, xclient.parse, args)
        self.assertEqual((e.reply.code, e.reply.enhanced), (501, "5.5.4"), args)
        return e

    def test_everyAttributeCanonical(self):
        attrs = xclient.parse("NAME=mx+2Dxt.example.net ADDR=IPV6:2001:DB8:0::11 PORT=25 proto=esmtp "
                              "HELO=helo.example.net LOGIN=alice DESTADDR=192.0.2.1 DESTPORT=587")
        self.assertEqual(attrs, {"NAME": "mx-xt.example.net", "ADDR": "2001:db8::11", "PORT": 25, "PROTO": "ESMTP",
                                 "HELO": "helo.example.net", "LOGIN": "alice", "DESTADDR": "192.0.2.1",
                                 "DESTPORT": 587})

    def test_attributeNamesCaseInsensitive(self):
        self.assertEqual(xclient.parse("name=a.example Addr=192.0.2.1"), {"NAME": "a.example", "ADDR": "192.0.2.1"})

    def test_ipv4MappedStoredAsIPv4(self):
        self.assertEqual(xclient.parse("ADDR=IPV6:::ffff:192.0.2.1")["ADDR"], "192.0.2.1")
        self.assertEqual(xclient.parse("ADDR=ipv6:::FFFF:c000:0201")["ADDR"], "192.0.2.1")

    def test_specialValues(self):
        self.assertEqual(xclient.parse("NAME=[tempunavail]")["NAME"], "[TEMPUNAVAIL]")
        self.assertEqual(xclient.parse("NAME=[Unavailable]")["NAME"], "[UNAVAILABLE]")
        for name in ("ADDR", "PORT", "HELO", "LOGIN", "DESTADDR", "DESTPORT"):
            self.assertEqual(xclient.parse("%s=[unavailable]" % name)[name], "[UNAVAILABLE]")
            self.refused("%s=[TEMPUNAVAIL]" % name)
        # Special values are plain xtext: compared after decoding.
        self.assertEqual(xclient.parse("NAME=+5BUNAVAILABLE+5D")["NAME"], "[UNAVAILABLE]")

    def test_duplicatesLastWins(self):
        self.assertEqual(xclient.parse("NAME=a.example ADDR=192.0.2.1 NAME=b.example")["NAME"], "b.example")

    def test_loginPlusKeptAndEscapesDecoded(self):
        # Checklist 68.
        self.assertEqual(xclient.parse("LOGIN=nginx+user@example.org")["LOGIN"], "nginx+user@example.org")
        self.assertEqual(xclient.parse("LOGIN=acc+2Buser@example.org")["LOGIN"], "acc+user@example.org")

    def test_noAttributes(self):
        for args in ("", "   "):
            self.refused(args)

    def test_malformedAttributes(self):
        for args in ("ADDR", "ADDR=", "=192.0.2.1", "NAME=ok.example ADDR", "FOO=1", "NAME=ok.example FOO=1",
                     "REVERSE_NAME=x.example", "XADDR=192.0.2.1"):
            self.refused(args)

    def test_rawValueLength(self):
        self.assertEqual(len(xclient.parse("HELO=" + "h" * 255)["HELO"]), 255)
        self.refused("HELO=" + "h" * 256)
        # The raw (encoded) length counts: 258 octets that decode to 86.
        self.refused("HELO=" + "+41" * 86)
        self.refused("LOGIN=" + "u" * 256)

    def test_badAddresses(self):
        for value in ("999.0.2.300", "2001:db8::1", "IPV6:192.0.2.1", "[192.0.2.1]", "192.0.2.1.5", "192.0.2",
                      "010.0.0.1", "IPV6:fe80::1%eth0", "IPV6:", "unknown", "example.net", "IPV6:[2001:db8::1]",
                      # No connection comes from (or goes to) these.
                      "0.0.0.0", "IPV6:::", "224.0.0.1", "IPV6:ff02::1", "255.255.255.255", "IPV6:::ffff:0.0.0.0"):
            self.refused("ADDR=" + value)
            self.refused("DESTADDR=" + value)

    def test_ports(self):
        self.assertEqual(xclient.parse("PORT=0 DESTPORT=65535"), {"PORT": 0, "DESTPORT": 65535})
        for value in ("65536", "-1", "x", "1e3", "123456", "99999", "+2B25", "2 5", "0x19"):
            self.refused("PORT=" + value)
            self.refused("DESTPORT=" + value)

    def test_proto(self):
        self.assertEqual(xclient.parse("PROTO=smtp")["PROTO"], "SMTP")
        self.assertEqual(xclient.parse("PROTO=EsMtP")["PROTO"], "ESMTP")
        for value in ("LMTP", "ESMTPS", "ESMTPA", "SMTP+20", "[UNAVAILABLE]", "[TEMPUNAVAIL]", "HTTP"):
            self.refused("PROTO=" + value)

    def test_names(self):
        for value in ("mx.example.net", "x_y.example", "a" * 63 + ".example", "localhost",
                      "1host.example", "host-1", "a-b--c.example"):
            self.assertEqual(xclient.parse("NAME=" + value)["NAME"], value)
        # The root's dot is dropped, as no next hop takes it (Postfix: "Bad NAME syntax").
        self.assertEqual(xclient.parse("NAME=mx.example.net.")["NAME"], "mx.example.net")
        for value in ("bad!name", "-bad..name", "a..b", ".example", "1234", "1.2.3.4", "a" * 64 + ".example",
                      "[TEMPUNAVAIL]x", "host name", "host+2Fname", "caf+C3+A9.example", "-a.example",
                      "a-.example", "a.-b", "a.example..", "a.example-", ".", "1234."):
            self.refused("NAME=" + value)

    def test_controlCharactersAndBadXtextRefused(self):
        for args in ("HELO=a+0Db", "HELO=a+0Ab", "HELO=a+00b", "HELO=a+09b", "HELO=a+7Fb",
                     # A login that is not UTF-8 as sent; a raw control in a login; raw 8-bit
                     # octets in any other attribute (not xtext).
                     "LOGIN=caf\xe9", "LOGIN=a\xc2\x85b", "LOGIN=a\x7fb",
                     "LOGIN=a\xe2\x80\xa8b", "LOGIN=\xc3", "HELO=caf\xc3\xa9",
                     "NAME=caf\xc3\xa9.example", "PROTO=\xc5\xbfmtp", "ADDR=192.0.2.\xd9\xa1"):
            self.refused(args)
        for args in ("NAME=caf+C3+A9.example", "ADDR=+D9+A1.2.3.4", "PORT=+D9+A2+D9+A5", "PROTO=+C5+BFmtp"):
            self.refused(args)

    def test_loginNotDecodingToALoginTakenAsSent(self):
        """
        nginx sends the login a client gave it unencoded: where decoding its
        "+XX" would give no login (not UTF-8, a control character, a NUL),
        the login is the octets as sent, never one with a control in it.
        """
        for login in ("bob+dev@example.org", "jane+facebook@example.org", "x+10off@example.org", "a+7Fb",
                      "a+C2+85b", "caf+E9", "n+00l", "j\xc3\xb6rg+cafe"):
            self.assertEqual(xclient.parse("LOGIN=" + login)["LOGIN"], login.encode("latin-1").decode("utf-8"))
        # A login that decodes to one is decoded (swaks, and relaygw's own onward XCLIENT).
        self.assertEqual(xclient.parse("LOGIN=acc+2Buser")["LOGIN"], "acc+user")

    def test_utf8LoginAndEightBitHelo(self):
        """
        A login is UTF-8 (SASL's; relaygw forwards an AUTH login so); a
        greeting name's 8-bit octets become "?", as in an EHLO argument.
        """
        self.assertEqual(xclient.parse("LOGIN=j+C3+B6rg@example.org")["LOGIN"], "j\xf6rg@example.org")
        # As nginx forwards a login: its UTF-8 octets raw, "+" and "=" as given.
        self.assertEqual(xclient.parse("LOGIN=j\xc3\xb6rg+tag=x@example.org")["LOGIN"], "j\xf6rg+tag=x@example.org")
        self.assertEqual(xclient.parse("LOGIN=j\xc3+B6rg")["LOGIN"], "j\xf6rg")
        self.assertEqual(xclient.parse("HELO=caf+C3+A9.example")["HELO"], "caf??.example")
        # (No special value by Unicode case mapping: "ı".upper() is "I".)
        self.assertEqual(xclient.parse("LOGIN=+5Bunava+C4+B1lable+5D")["LOGIN"], "[unava\u0131lable]")

    def test_forwardedLoginParsesBack(self):
        """What the delivery client forwards for a UTF-8 AUTH login (xtext of its UTF-8), a relaygw next hop takes."""
        self.assertEqual(xclient.parse("LOGIN=" + xtext.encode("j\xf6rg"))["LOGIN"], "j\xf6rg")

    def test_refusalNamesTheProblem(self):
        e = self.refused("ADDR=999.0.2.300")
        self.assertIn("XCLIENT", e.reply.text)


class XremoteipParseTests(unittest.TestCase):
    def test_addresses(self):
        self.assertEqual(xremoteip.parse("192.0.2.7"), "192.0.2.7")
        self.assertEqual(xremoteip.parse("IPv6:2001:DB8::7"), "2001:db8::7")
        self.assertEqual(xremoteip.parse("ipv6:2001:db8::7"), "2001:db8::7")
        self.assertEqual(xremoteip.parse("2001:db8:0:0::7"), "2001:db8::7")
        self.assertEqual(xremoteip.parse("::ffff:192.0.2.7"), "192.0.2.7")

    def test_refusals(self):
        for bad in ("", " ", "999.1.1.1", "a b", "192.0.2.7 192.0.2.8", "example.net", "[192.0.2.7]",
                    "IPv6:192.0.2.7", "fe80::1%eth0", "010.0.0.1",
                    "0.0.0.0", "::", "IPv6:::", "239.1.2.3", "ff02::1", "255.255.255.255", "::ffff:0.0.0.0"):
            self.assertIsNone(xremoteip.parse(bad), bad)


class XsetcontextParseTests(unittest.TestCase):
    def test_pairs(self):
        self.assertEqual(xsetcontext.parse("a=1 b=x+2By c="), [("a", "1"), ("b", "x+y"), ("c", "")])
        self.assertEqual(xsetcontext.parse("a=1 a=2"), [("a", "1"), ("a", "2")])
        self.assertEqual(xsetcontext.parse("k=a=b"), [("k", "a=b")])  # a literal "=" is tolerated
        self.assertEqual(xsetcontext.parse("k=a+20b"), [("k", "a b")])

    def test_refusals(self):
        # Checklist 68: in XSETCONTEXT a malformed escape is refused.
        for bad in ("", "a", "=1", "a=+4", "a=+ZZ", "a=x+", "a=x+00", "ok=1 b=+4", "a=caf\u00e9"):
            e = self.assertRaises(VerbError, xsetcontext.parse, bad)
            self.assertEqual((e.reply.code, e.reply.enhanced), (501, "5.5.4"), bad)


# -- advertisement and trust (checklist 17, 18, 56, 72, 78) ------------------


class AdvertisementTests(VerbTestCase):
    def test_ehloToTrustedPeerListsXclientAttributes(self):
        """Checklist 17."""

        def run(c):
            code, lines = c.cmd("EHLO x")
            self.assertEqual(code, 250)
            self.assertIn(XCLIENT_KEYWORD, lines)
            for verb in ("XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"):
                self.assertIn(verb, lines)
            # EHLO replies carry no enhanced code.
            self.assertFalse([l for l in lines if re.match(r"\d\.\d{1,3}\.\d{1,3} ", l)], lines)

        return self.session(run)

    def test_heloStaysOneLine(self):
        def run(c):
            self.assertEqual(c.cmd("HELO x"), (250, ["relay.test"]))

        return self.session(run)


class UntrustedTests(VerbTestCase):
    """The socket peer 127.0.0.1 is not in trusted_peers."""

    listener = {"trusted_peers": ["192.0.2.0/24"], "extensions": ALL, "relay_networks": ["127.0.0.0/8"]}

    def test_ehloToUntrustedPeerListsNoVerb(self):
        """Checklist 18."""

        def run(c):
            lines = c.cmd("EHLO x")[1]
            self.assertIn("ENHANCEDSTATUSCODES", lines)
            for verb in ("XCLIENT", "XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"):
                self.assertFalse(any(verb in l for l in lines), lines)

        return self.session(run)

    def test_everyVerbRefused550(self):
        """Checklist 56, 75, 78: 550 5.7.0 for every trusted verb."""

        def run(c):
            for cmd in ("XCLIENT ADDR=192.0.2.7", "xclient name=x.example", "XREMOTEIP 192.0.2.7",
                        "XSETCONTEXT a=1", "XDUMPCONTEXT"):
                self.assertEqual(c.cmd(cmd), (550, ["5.7.0 Error: insufficient authorization"]), cmd)
            # The session goes on.
            self.assertEqual(c.cmd("NOOP"), (250, ["2.0.0 Ok"]))

        return self.session(run)

    @defer.inlineCallbacks
    def test_refusedXclientChangesNothing(self):
        """Checklist 56: the message shows the real peer, no override, no via."""

        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO real.example")
            self.assertEqual(c.cmd("XCLIENT NAME=forged.example ADDR=192.0.2.7 HELO=forged.example LOGIN=root")[0],
                             550)
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.8")[0], 550)
            self.assertEqual(c.cmd("XSETCONTEXT binding=bulk")[0], 550)
            return (yield queueMessage(c))

        qid = yield self.session(run)
        m, content = self.harness.spooled(qid)
        ctx = m.envelope.context["connection"]
        self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["ehlo_domain"]),
                         ("127.0.0.1", "unknown", "real.example"))
        for key in ("overridden", "auth_user", "binding"):
            self.assertNotIn(key, ctx)
        self.assertEqual(m.envelope.context["client_keys"], [])
        header = receivedHeader(content)
        self.assertTrue(header.startswith(b"Received: from real.example (unknown [127.0.0.1])\r\n\tby relay.test"),
                        header)

    def test_untrustedChecksInPostfixOrder(self):
        """
        protocol.md section 10: "Checks in Postfix order: inside a transaction
        503 5.5.1; no attributes 501 5.5.4; untrusted 550 5.7.0".
        """

        def run(c):
            self.assertEqual(c.cmd("XCLIENT")[1][0][:6], SYNTAX)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[1][0][:6], "5.5.1 ")

        return self.session(run)


class UntrustedRelayTests(VerbTestCase):
    """An untrusted peer may not relay, and no verb changes that."""

    listener = {"trusted_peers": ["192.0.2.0/24"], "extensions": ALL, "relay_networks": ["192.0.2.0/24"]}

    def test_untrustedLoginOrAddressChangesNothing(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[1][0][:6], "5.7.1 ")
            c.cmd("RSET")
            self.assertEqual(c.cmd("XCLIENT LOGIN=alice ADDR=192.0.2.7")[0], 550)
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.7")[0], 550)
            c.cmd("MAIL FROM:<a@example.org>")
            code, lines = c.cmd("RCPT TO:<b@example.net>")
            self.assertEqual((code, lines[0][:6]), (554, "5.7.1 "))

        return self.session(run)

    def test_untrustedRawLoginRefused(self):
        """A login as nginx forwards it (raw UTF-8) is trusted peers' only: 550, nothing changes."""
        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=j\xc3\xb6rg@example.org")[0], 550)
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 554)

        return self.session(run)


class DisabledVerbTests(VerbTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xdumpcontext"]}

    def test_disabledVerbNotAdvertisedAnd502(self):
        def run(c):
            lines = c.cmd("EHLO x")[1]
            self.assertIn("XDUMPCONTEXT", lines)
            for verb in ("XCLIENT", "XREMOTEIP", "XSETCONTEXT"):
                self.assertFalse(any(l.startswith(verb) for l in lines), lines)
            for cmd in ("XCLIENT ADDR=192.0.2.7", "XREMOTEIP 192.0.2.7", "XSETCONTEXT a=1", "xclient name=x"):
                self.assertEqual(c.cmd(cmd), (502, ["5.5.1 Error: command not implemented"]), cmd)
            ctx = conn(c)
            self.assertEqual(ctx["remote_ip"], "127.0.0.1")
            self.assertNotIn("a", ctx)
            # A verb the gateway does not know at all is 500 5.5.2.
            self.assertEqual(c.cmd("XFORWARD ADDR=192.0.2.7")[1][0][:6], "5.5.2 ")

        return self.session(run)


class DisabledForUntrustedTests(VerbTestCase):
    listener = {"trusted_peers": ["192.0.2.0/24"], "extensions": ["xdumpcontext"]}

    def test_disabledBeatsUntrusted(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 502)
            self.assertEqual(c.cmd("XDUMPCONTEXT")[0], 550)

        return self.session(run)


# -- XCLIENT (checklist 57-72) -----------------------------------------------


class XclientTests(VerbTestCase):
    def test_successNewGreetingWithoutEnhancedCodeAndNewSession(self):
        """Checklist 65, and a new session id."""

        def run(c):
            c.cmd("EHLO proxy.example")
            before = conn(c)["session_id"]
            c.send("XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567\r\n")
            self.assertEqual(c.line(), "220 relay.test ESMTP relaygw")
            ctx = conn(c)
            self.assertNotEqual(ctx["session_id"], before)
            self.assertEqual(len(ctx["session_id"]), len(before))
            self.assertEqual((ctx["remote_name"], ctx["remote_ip"], ctx["remote_port"]),
                             ("client.example.net", "192.0.2.7", "4567"))
            self.assertEqual((ctx["peer_ip"], ctx["trusted"], ctx["overridden"]), ("127.0.0.1", "yes", "yes"))

        return self.session(run)

    def test_commandIsCaseInsensitive(self):
        def run(c):
            self.assertEqual(c.cmd("xclient name=mx.example addr=192.0.2.7")[0], 220)
            self.assertEqual(conn(c)["remote_name"], "mx.example")

        return self.session(run)

    @defer.inlineCallbacks
    def test_afterMailRefusedAndMessageKeepsOldIdentity(self):
        """Checklist 57."""

        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO proxy.example")
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XCLIENT NAME=late.example ADDR=192.0.2.7"),
                             (503, ["5.5.1 Error: MAIL transaction in progress"]))
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>")[0], 250)  # the transaction goes on
            self.assertEqual(c.cmd("DATA")[0], 354)
            c.send("Subject: x\r\n\r\nx\r\n.\r\n")
            self.assertEqual((yield c.whenReply())[0], 250)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from proxy.example (unknown [127.0.0.1])\r\n\tby "), header)
        self.assertNotIn(b"via", header)

    def test_noAttributes(self):
        """Checklist 58."""

        def run(c):
            self.assertEqual(c.cmd("XCLIENT"), (501, ["5.5.4 Syntax: XCLIENT attribute=value ..."]))
            self.assertEqual(c.cmd("XCLIENT   ")[1][0][:6], SYNTAX)

        return self.session(run)

    def refusedChangesNothing(self, c, args):
        code, lines = c.cmd("XCLIENT " + args)
        self.assertEqual((code, lines[0][:6]), (501, SYNTAX), args)

    def test_unknownAttributeValidOnesNotApplied(self):
        """Checklist 59."""

        def run(c):
            c.cmd("EHLO proxy.example")
            before = conn(c)
            for args in ("NAME=ok.example ADDR=192.0.2.7 FOO=1", "FOO=1 NAME=ok.example",
                         "LOGIN=alice HELO=h.example REVERSE_NAME=ok.example"):
                self.refusedChangesNothing(c, args)
            self.assertEqual(conn(c), before)  # nothing applied, no reset, same session

        return self.session(run)

    def test_missingEqualsEmptyOrLongValue(self):
        """Checklist 60."""

        def run(c):
            c.cmd("EHLO proxy.example")
            before = conn(c)
            for args in ("ADDR", "NAME=ok.example ADDR", "ADDR=", "NAME=", "NAME=ok.example HELO=",
                         "HELO=" + "h" * 256, "HELO=" + "+41" * 86, "LOGIN=" + "u" * 300):
                self.refusedChangesNothing(c, args)
            self.assertEqual(conn(c), before)
            # 255 octets is still fine.
            self.assertEqual(c.cmd("XCLIENT HELO=" + "h" * 255)[0], 220)
            self.assertEqual(conn(c)["ehlo_domain"], "h" * 255)

        return self.session(run)

    def test_badAddresses(self):
        """Checklist 61."""

        def run(c):
            for args in ("ADDR=999.0.2.300", "ADDR=2001:db8::1", "ADDR=IPV6:192.0.2.1", "ADDR=[192.0.2.1]",
                         "ADDR=IPV6:[2001:db8::1]", "DESTADDR=999.0.2.300", "NAME=ok.example ADDR=2001:db8::1",
                         "ADDR=0.0.0.0", "ADDR=IPV6:::", "ADDR=224.0.0.1", "ADDR=255.255.255.255"):
                self.refusedChangesNothing(c, args)
            ctx = conn(c)
            self.assertEqual((ctx["remote_ip"], ctx["remote_name"]), ("127.0.0.1", "unknown"))
            self.assertNotIn("dest_ip", ctx)

        return self.session(run)

    def test_badPorts(self):
        """Checklist 62."""

        def run(c):
            port = conn(c)["remote_port"]
            for args in ("PORT=65536", "PORT=-1", "PORT=x", "PORT=123456", "DESTPORT=65536", "DESTPORT=x",
                         "DESTPORT=-5"):
                self.refusedChangesNothing(c, args)
            self.assertEqual(conn(c)["remote_port"], port)
            self.assertEqual(c.cmd("XCLIENT PORT=65535 DESTPORT=0")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_port"], ctx["dest_port"]), ("65535", "0"))

        return self.session(run)

    def test_protoOnlySmtpOrEsmtp(self):
        """Checklist 63."""

        def run(c):
            c.cmd("EHLO proxy.example")
            for args in ("PROTO=LMTP", "PROTO=ESMTPS", "PROTO=[UNAVAILABLE]", "PROTO=HTTP"):
                self.refusedChangesNothing(c, args)
            self.assertEqual(conn(c)["protocol"], "ESMTP")
            self.assertEqual(c.cmd("XCLIENT PROTO=smtp")[0], 220)
            self.assertEqual(conn(c)["protocol"], "SMTP")
            self.assertEqual(c.cmd("XCLIENT PROTO=eSmTp")[0], 220)
            self.assertEqual(conn(c)["protocol"], "ESMTP")

        return self.session(run)

    def test_names(self):
        """Checklist 64."""

        def run(c):
            for args in ("NAME=bad!name", "NAME=-bad..name", "NAME=1234", "NAME=192.0.2.7",
                         "NAME=" + "a" * 64 + ".example", "NAME=[TEMPUNAVAIL]x"):
                self.refusedChangesNothing(c, args)
            self.assertEqual(c.cmd("XCLIENT NAME=mx.example.net")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_name"], ctx["remote_name_status"]), ("mx.example.net", "ok"))
            self.assertEqual(c.cmd("XCLIENT NAME=[UNAVAILABLE]")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_name"], ctx["remote_name_status"]), ("unknown", "perm"))
            self.assertEqual(c.cmd("XCLIENT NAME=[tempunavail]")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_name"], ctx["remote_name_status"]), ("unknown", "temp"))

        return self.session(run)

    def test_transactionAndHeloGone(self):
        """Checklist 66 (AUTH: see XclientAuthTests)."""

        def run(c):
            c.cmd("EHLO proxy.example")
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RSET")
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            ctx = conn(c)
            self.assertNotIn("ehlo_domain", ctx)
            self.assertNotIn("ehlo_string", ctx)
            self.assertEqual(ctx["protocol"], "SMTP")
            self.assertEqual(c.cmd("RCPT TO:<b@example.net>"), (503, ["5.5.1 Error: need MAIL command"]))
            self.assertEqual(c.cmd("DATA")[0], 503)

        return self.session(run)

    @defer.inlineCallbacks
    def test_nameXtextDecoded(self):
        """Checklist 67."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT NAME=mx+2Dxt.example.net ADDR=192.0.2.7")[0], 220)
            self.assertEqual(conn(c)["remote_name"], "mx-xt.example.net")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertIn(b"(mx-xt.example.net [192.0.2.7])", header)

    def test_loginPlusKeptXsetcontextBadEscapeRefused(self):
        """Checklist 68."""

        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=nginx+user@example.org")[0], 220)
            self.assertEqual(conn(c)["auth_user"], "nginx+user@example.org")
            self.assertEqual(c.cmd("XCLIENT LOGIN=acc+2Buser@example.org")[0], 220)
            self.assertEqual(conn(c)["auth_user"], "acc+user@example.org")
            for args in ("a=+4", "a=+ZZ", "a=x+", "a=1 b=+4"):
                code, lines = c.cmd("XSETCONTEXT " + args)
                self.assertEqual((code, lines[0][:6]), (501, SYNTAX), args)
            ctx = conn(c)
            self.assertNotIn("a", ctx)
            self.assertNotIn("b", ctx)

        return self.session(run)

    @defer.inlineCallbacks
    def test_rawUtf8LoginAsNginxSendsIt(self):
        """
        nginx forwards the login a client gave it as it is, UTF-8 octets
        included: taken as the login; XDUMPCONTEXT and Received show it
        escaped, the log decoded (its UTF-8 octets never as Latin-1).
        """
        logs = LogCapture(self)

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7 LOGIN=j\xc3\xb6rg@example.org")[0], 220)
            code, lines = c.cmd("XDUMPCONTEXT")
            [line] = [l for l in lines if " auth_user " in l]
            self.assertTrue(line.isascii() and line.isprintable(), line)
            self.assertEqual(conn(c)["auth_name"], "XCLIENT")
            self.assertEqual(c.cmd("XCLIENT LOGIN=caf\xc3\xa9\xc2\x85")[0], 501)
            c.cmd("EHLO e.example")
            return (yield queueMessage(c))

        qid = yield self.session(run)
        [queued] = logs.find("queued from=", event="queued", qid=qid)
        self.assertEqual(queued["sasl_username"], "j\xf6rg@example.org")
        [audit] = logs.find("accepted: {changes}", verb="XCLIENT")
        self.assertIn("'j\xf6rg@example.org'", formatEvent(audit))
        header = self.queuedReceived()
        self.assertIn(b"with ESMTPA id ", header)
        self.assertTrue(header.isascii(), header)

    @defer.inlineCallbacks
    def test_ipv6AddressInReceived(self):
        """Checklist 69."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=IPV6:2001:DB8:0:0::11")[0], 220)
            self.assertEqual(conn(c)["remote_ip"], "2001:db8::11")
            self.assertEqual(c.cmd("XCLIENT ADDR=ipv6:2001:db8::11 NAME=v6.example.net")[0], 220)
            c.cmd("EHLO v6-helo.example")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from v6-helo.example (v6.example.net [IPv6:2001:db8::11])\r\n"
                                          b"\tby relay.test "), header)

    @defer.inlineCallbacks
    def test_ipv4MappedAddressStoredAsIPv4(self):
        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=IPV6:::ffff:192.0.2.9")[0], 220)
            self.assertEqual(conn(c)["remote_ip"], "192.0.2.9")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertIn(b"(unknown [192.0.2.9])", header)

    @defer.inlineCallbacks
    def test_identityInReceived(self):
        """Checklist 70 (Received): NAME, ADDR, HELO; the real peer is left out."""
        ports = []

        @defer.inlineCallbacks
        def run(c):
            ports.append(c.transport.getPeer().port)
            c.cmd("EHLO proxy.example")
            self.assertEqual(c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 "
                                   "HELO=helo.example.net")[0], 220)
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(
            b"Received: from helo.example.net (client.example.net [192.0.2.7])\r\n"
            b"\tby relay.test (relaygw) with SMTP id "), header)
        self.assertNotIn(b"127.0.0.1", header)
        self.assertNotRegex(header, rb"\b%d\b" % ports[0])  # (not as a substring: the queue id may hold it)
        self.assertIn(b"\tfor <b@example.net>; ", header)
        self.assertNotIn(b"proxy.example", header)

    @defer.inlineCallbacks
    def test_noGreetingPassesForAComment(self):
        """
        A greeting name in parentheses or brackets (EHLO, or XCLIENT
        C{HELO=}) cannot pass in Received for a comment naming another host:
        its delimiters become C{?}; an address literal stays as it is.
        """
        greetings = [("EHLO (mx.bank.example[203.0.113.5])", None),
                     ("EHLO x", "HELO=(mx.bank.example[203.0.113.5])"),
                     ("EHLO [1.2.3", None),
                     ("EHLO a;b", None),
                     ("EHLO [192.0.2.44]", None)]
        headers = []
        for n, (ehlo, helo) in enumerate(greetings, 1):
            @defer.inlineCallbacks
            def run(c, ehlo=ehlo, helo=helo):
                c.cmd(ehlo)
                if helo is not None:
                    self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7 " + helo)[0], 220)
                yield queueMessage(c)

            yield self.session(run)
            [(_, content)] = self.spooled(n)[-1:]
            headers.append(receivedHeader(content).split(b"\r\n")[0])
        self.assertEqual(headers, [
            b"Received: from ?mx.bank.example?203.0.113.5?? (unknown [127.0.0.1])",
            b"Received: from ?mx.bank.example?203.0.113.5?? (unknown [192.0.2.7])",
            b"Received: from ?1.2.3 (unknown [127.0.0.1])",
            b"Received: from a?b (unknown [127.0.0.1])",
            b"Received: from [192.0.2.44] (unknown [127.0.0.1])",
        ])

    @defer.inlineCallbacks
    def test_identityInLogs(self):
        """Checklist 70 (logs): the queued line names the claimed client; the audit line the real peer."""
        logs = LogCapture(self)

        sessions = []

        @defer.inlineCallbacks
        def run(c):
            sessions.append(conn(c)["session_id"])
            self.assertEqual(c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7")[0], 220)
            sessions.append(conn(c)["session_id"])
            return (yield queueMessage(c))

        qid = yield self.session(run)
        [queued] = logs.find("queued from=", event="queued", qid=qid)
        self.assertEqual((queued["client"], queued["ip"]), ("client.example.net[192.0.2.7]", "192.0.2.7"))
        self.assertIsNone(queued["sasl_username"])
        self.assertNotIn("sasl_username", formatEvent(queued))
        self.assertEqual(queued["session"], sessions[1])
        # One line: the real peer, what changed, and the session id that follows.
        [audit] = logs.find("accepted: {changes}", verb="XCLIENT")
        self.assertEqual(audit["peer"], "127.0.0.1")
        self.assertIn("remote_ip '127.0.0.1' -> '192.0.2.7'", audit["changes"])
        self.assertEqual((audit["session"], audit["renewed"]), tuple(sessions))
        self.assertIn("; new session {renewed}", audit["log_format"])

    @defer.inlineCallbacks
    def test_loginAuthenticates(self):
        """Checklist 71: LOGIN=user authenticates as user; the mail log's queued line names the login."""
        logs = LogCapture(self)

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=user@example.org")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["auth_user"], ctx["auth_name"], ctx["auth_status"]),
                             ("user@example.org", "XCLIENT", "pass"))
            c.cmd("EHLO e.example")
            return (yield queueMessage(c))

        qid = yield self.session(run)
        [queued] = logs.find("queued from=", event="queued", qid=qid)
        self.assertTrue(formatEvent(queued).endswith(", sasl_username=user@example.org"), formatEvent(queued))
        header = self.queuedReceived()
        # ESMTPA (RFC 3848), but no login name: Postfix's default.
        self.assertIn(b"with ESMTPA id ", header)
        self.assertNotIn(b"user@example.org", header)

    @defer.inlineCallbacks
    def test_loginUnavailableAuthenticatesNobody(self):
        """Checklist 71: LOGIN=[UNAVAILABLE] authenticates nobody."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=someone")[0], 220)
            self.assertEqual(c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")[0], 220)
            ctx = conn(c)
            for key in ("auth_user", "auth_name", "auth_status"):
                self.assertNotIn(key, ctx)
            c.cmd("EHLO e.example")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertIn(b"with ESMTP id ", header)
        self.assertNotIn(b"authenticated", header)

    def test_secondXclientAfterUntrustedAddress(self):
        """Checklist 72: trust is decided at connect; an untrusted ADDR does not remove it."""

        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.9")[0], 220)
            self.assertIn(XCLIENT_KEYWORD, c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.8 NAME=second.example")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["trusted"]),
                             ("192.0.2.8", "second.example", "yes"))
            self.assertEqual(c.cmd("XREMOTEIP 203.0.113.10")[0], 250)
            self.assertEqual(c.cmd("XSETCONTEXT still=trusted")[0], 250)

        return self.session(run)

    @defer.inlineCallbacks
    def test_heloCountsAsGreeting(self):
        """HELO= stands for the client's HELO: no EHLO needed; Received names it (with SMTP)."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT HELO=helo.example.net ADDR=192.0.2.7")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["ehlo_domain"], ctx["protocol"]), ("helo.example.net", "SMTP"))
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from helo.example.net (unknown [192.0.2.7])"), header)
        self.assertIn(b"with SMTP id", header)

    @defer.inlineCallbacks
    def test_protoAndHeloTogether(self):
        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT PROTO=ESMTP HELO=helo.example.net")[0], 220)
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertIn(b"from helo.example.net (", header)
        self.assertIn(b"with ESMTP id", header)

    @defer.inlineCallbacks
    def test_laterEhloReplacesHelo(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("XCLIENT HELO=helo.example.net")
            c.cmd("EHLO again.example")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from again.example (unknown [127.0.0.1])"), header)

    @defer.inlineCallbacks
    def test_xclientWithoutHeloForgetsEarlierHelo(self):
        """protocol.md section 1: XCLIENT resets HELO/EHLO unless HELO= is sent (also one set by HELO=)."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XCLIENT HELO=first.example")[0], 220)
            self.assertEqual(c.cmd("XCLIENT NAME=second.example")[0], 220)
            ctx = conn(c)
            self.assertNotIn("ehlo_domain", ctx)
            self.assertNotIn("helo_name", ctx)
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from unknown (second.example [127.0.0.1])"), header)

    def test_unavailableValues(self):
        def run(c):
            c.cmd("XCLIENT HELO=h.example PORT=4567 DESTADDR=192.0.2.1 DESTPORT=25")
            self.assertEqual(c.cmd("XCLIENT ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE] HELO=[UNAVAILABLE] "
                                   "DESTADDR=[UNAVAILABLE] DESTPORT=[UNAVAILABLE]")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_ip"], ctx["remote_port"]), ("unknown", "0"))
            for key in ("ehlo_domain", "helo_name", "dest_ip", "dest_port"):
                self.assertNotIn(key, ctx)
            self.assertEqual(ctx["peer_ip"], "127.0.0.1")

        return self.session(run)

    def test_destinationAttributes(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT DESTADDR=IPV6:2001:db8::25 DESTPORT=587")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["dest_ip"], ctx["dest_port"]), ("2001:db8::25", "587"))
            self.assertEqual(ctx["remote_ip"], "127.0.0.1")  # untouched

        return self.session(run)

    def test_duplicatesLastWins(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT NAME=a.example ADDR=192.0.2.1 NAME=b.example ADDR=192.0.2.2")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["remote_name"], ctx["remote_ip"]), ("b.example", "192.0.2.2"))

        return self.session(run)

    def test_attributesNotSentAreKept(self):
        """Attributes last for the session; a later XCLIENT changes only what it names."""

        def run(c):
            c.cmd("XCLIENT NAME=a.example ADDR=192.0.2.1 PORT=1000")
            c.cmd("XCLIENT PORT=2000")
            ctx = conn(c)
            self.assertEqual((ctx["remote_name"], ctx["remote_ip"], ctx["remote_port"]),
                             ("a.example", "192.0.2.1", "2000"))

        return self.session(run)

    def test_pipelinedInputAfterXclientAnswered(self):
        """protocol.md section 10: relaygw goes on with input pending at the re-greeting."""

        def run(c):
            c.send("XCLIENT ADDR=192.0.2.7\r\nEHLO x\r\nMAIL FROM:<a@example.org>\r\n")
            self.assertEqual(c.reply(), (220, ["relay.test ESMTP relaygw"]))
            self.assertEqual(c.reply()[0], 250)
            self.assertEqual(c.reply(), (250, ["2.1.0 Ok"]))

        return self.session(run)

    def test_contextKeysSurviveXclientAndResets(self):
        """protocol.md section 1: XSETCONTEXT keys survive XCLIENT, EHLO, RSET, end of DATA."""

        @defer.inlineCallbacks
        def run(c):
            self.assertEqual(c.cmd("XSETCONTEXT binding=bulk")[0], 250)
            c.cmd("XCLIENT ADDR=192.0.2.7 LOGIN=x")
            c.cmd("EHLO x")
            c.cmd("RSET")
            yield queueMessage(c)
            c.cmd("XREMOTEIP 192.0.2.8")
            c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")
            self.assertEqual(conn(c)["binding"], "bulk")

        return self.session(run)


class XclientAuthTests(VerbTestCase):
    """
    Checklist 66: AUTH is reset by XCLIENT unless LOGIN= was sent.  The
    password is hashed in a thread, so AUTH's reply comes later (C{auth}).
    """

    def setUp(self):
        import base64

        from relaygw.auth import PasswordFile

        users = os.path.abspath(self.mktemp())
        PasswordFile(users).set("alice", "s3cret")
        self.listener = dict(TRUSTED, credentials=users, auth_plaintext=True)
        self.plain = "AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode()
        VerbTestCase.setUp(self)

    def auth(self, c):
        """Send the AUTH PLAIN command; a Deferred firing with its reply."""
        c.send(self.plain + "\r\n")
        return c.whenReply()

    def test_authResetWithoutLogin(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO x")
            self.assertEqual((yield self.auth(c))[0], 235)
            self.assertEqual(conn(c)["auth_user"], "alice")
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            self.assertNotIn("auth_user", conn(c))
            c.cmd("EHLO x")
            self.assertEqual((yield self.auth(c))[0], 235)  # not "already authenticated"

        return self.session(run)

    def test_loginReplacesAuth(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO x")
            yield self.auth(c)
            self.assertEqual(c.cmd("XCLIENT LOGIN=bob")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["auth_user"], ctx["auth_name"]), ("bob", "XCLIENT"))
            c.cmd("EHLO x")
            self.assertEqual((yield self.auth(c)), (503, ["5.5.1 Error: already authenticated"]))

        return self.session(run)

    def test_loginUnavailableEndsAuth(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO x")
            yield self.auth(c)
            self.assertEqual(c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")[0], 220)
            self.assertNotIn("auth_user", conn(c))

        return self.session(run)


class XclientAlwaysAllowTests(VerbTestCase):
    """protocol.md section 1: when XCLIENT resets AUTH, ALWAYS-ALLOW re-applies."""

    listener = dict(TRUSTED, always_allow=True)

    def assertAnonymous(self, c):
        ctx = conn(c)
        self.assertEqual((ctx.get("auth_user"), ctx.get("auth_name")), ("anonymous", "ALWAYS-ALLOW"))

    def test_anonymousReappliesAfterXclient(self):
        def run(c):
            self.assertAnonymous(c)
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            self.assertAnonymous(c)
            self.assertEqual(c.cmd("XCLIENT LOGIN=bob")[0], 220)
            ctx = conn(c)
            self.assertEqual((ctx["auth_user"], ctx["auth_name"]), ("bob", "XCLIENT"))
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.8")[0], 220)
            self.assertAnonymous(c)

        return self.session(run)

    def test_loginUnavailableFallsBackToAnonymous(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=bob")[0], 220)
            self.assertEqual(c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")[0], 220)
            self.assertAnonymous(c)
            self.assertEqual(c.cmd("AUTH PLAIN AGEAYg==")[0], 503)

        return self.session(run)


class ClaimedIdentityPolicyTests(VerbTestCase):
    """
    The built-in policy judges the claimed identity (checklist 70 policy,
    71, 75): the trusted peer itself (127.0.0.1) may not relay.
    """

    listener = dict(TRUSTED, relay_networks=["192.0.2.0/24"])

    def rcpt(self, c):
        c.cmd("RSET")
        self.assertEqual(c.cmd("MAIL FROM:<a@example.org>")[0], 250)
        code, lines = c.cmd("RCPT TO:<b@example.net>")
        c.cmd("RSET")
        return code, lines[0][:6]

    def test_utf8LoginLetsTheSessionRelay(self):
        """An XCLIENT LOGIN= in UTF-8, xtext-encoded, as relaygw forwards an AUTH login, authenticates."""
        def run(c):
            self.assertEqual(c.cmd("XCLIENT LOGIN=j+C3+B6rg")[:1], (220,))
            self.assertEqual(self.rcpt(c), (250, "2.1.5 "))

        return self.session(run)

    def test_loginLetsTheSessionRelay(self):
        def run(c):
            self.assertEqual(self.rcpt(c), (554, "5.7.1 "))
            self.assertEqual(c.cmd("XCLIENT LOGIN=alice")[0], 220)
            self.assertEqual(self.rcpt(c), (250, "2.1.5 "))
            self.assertEqual(c.cmd("XCLIENT LOGIN=[UNAVAILABLE]")[0], 220)
            self.assertEqual(self.rcpt(c), (554, "5.7.1 "))

        return self.session(run)

    def test_addressInsideRelayNetworks(self):
        def run(c):
            self.assertEqual(self.rcpt(c), (554, "5.7.1 "))
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            self.assertEqual(self.rcpt(c), (250, "2.1.5 "))
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.7")[0], 220)
            self.assertEqual(self.rcpt(c), (554, "5.7.1 "))
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.99")[0], 250)
            self.assertEqual(self.rcpt(c), (250, "2.1.5 "))
            self.assertEqual(c.cmd("XREMOTEIP IPv6:2001:db8::1")[0], 250)
            self.assertEqual(self.rcpt(c), (554, "5.7.1 "))

        return self.session(run)


class RecordingPolicyTests(VerbTestCase):
    """Checklist 70 (policy): every hook sees the XCLIENT identity; connect re-runs."""

    listener = dict(TRUSTED, policy="tests.test_verbs.Recorder")

    def test_policyHooksSeeClaimedIdentity(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO proxy.example")
            c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net LOGIN=u")
            yield queueMessage(c)

        def check(_):
            calls = self.harness.factory.policy.calls
            hooks = [h for h, _ in calls]
            self.assertEqual(hooks, ["connect", "helo", "connect", "mail", "rcpt", "data"])
            first, second = calls[0][1], calls[2][1]
            self.assertEqual(first["remote_ip"], "127.0.0.1")
            self.assertNotEqual(first["session_id"], second["session_id"])
            claimed = {"remote_ip": "192.0.2.7", "remote_name": "client.example.net", "remote_port": 4567,
                       "ehlo_domain": "helo.example.net", "auth_user": "u", "peer_ip": "127.0.0.1"}
            for hook, seen in calls[2:]:
                for k, v in claimed.items():
                    self.assertEqual(seen[k], v, (hook, k))

        return self.session(run).addCallback(check)

    def test_xremoteipRerunsConnect(self):
        def run(c):
            c.cmd("XREMOTEIP 192.0.2.9")

        self.session(run)
        calls = self.harness.factory.policy.calls
        self.assertEqual([h for h, _ in calls], ["connect", "connect"])
        self.assertEqual(calls[1][1]["remote_ip"], "192.0.2.9")


class ConnectPolicyRefusalTests(VerbTestCase):
    listener = dict(TRUSTED, policy="tests.test_verbs.RefuseTestNet2")

    def test_refusedXclientIdentityGets503UntilQuit(self):
        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=198.51.100.7"), (554, ["5.7.1 access denied"]))
            for cmd in ("MAIL FROM:<a@example.org>", "EHLO x", "XCLIENT ADDR=192.0.2.7", "XDUMPCONTEXT"):
                self.assertEqual(c.cmd(cmd), (503, ["5.7.0 Error: access denied"]), cmd)
            self.assertEqual(c.cmd("QUIT")[0], 221)
            self.assertTrue(c.closed())

        return self.session(run)

    def test_refusedXremoteipAddressGets503UntilQuit(self):
        def run(c):
            self.assertEqual(c.cmd("XREMOTEIP 198.51.100.8"), (554, ["5.7.1 access denied"]))
            self.assertEqual(c.cmd("MAIL FROM:<a@example.org>"), (503, ["5.7.0 Error: access denied"]))
            self.assertEqual(c.cmd("QUIT")[0], 221)

        return self.session(run)


class ConnectPolicyFailureTests(VerbTestCase):
    """
    A connect policy that fails refuses the session for now, 421 4.3.0 and
    close: before, XCLIENT and XREMOTEIP got 451 and the session went on
    under the identity the policy never passed; at connect, 451 came in
    place of a greeting, and no command was read until the idle timeout.
    """

    listener = dict(TRUSTED, policy="tests.test_verbs.FailForTestNet2")
    UNAVAILABLE = (421, ["4.3.0 relay.test service temporarily unavailable, closing connection"])

    def assertRefusedFor(self, command):
        def run(c):
            self.assertEqual(c.cmd(command), self.UNAVAILABLE)
            self.assertTrue(c.closed())
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        return self.session(run)

    def test_xclientPolicyFails(self):
        return self.assertRefusedFor("XCLIENT ADDR=198.51.100.7")

    def test_xclientPolicyRaises(self):
        return self.assertRefusedFor("XCLIENT ADDR=198.51.100.8")

    def test_xremoteipPolicyFails(self):
        return self.assertRefusedFor("XREMOTEIP 198.51.100.7")

    def test_xremoteipPolicyRaises(self):
        return self.assertRefusedFor("XREMOTEIP 198.51.100.8")

    def test_atConnect(self):
        harness = SessionHarness(self.mktemp(), self.listener, policy=FailForTestNet2(None))
        for ip in ("198.51.100.7", "198.51.100.8"):
            c = harness.connect(ip)
            self.addCleanup(c.lose)
            self.assertEqual(c.replies(), [self.UNAVAILABLE])
            self.assertTrue(c.closed(), ip)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class OnwardXclientTests(GatewayTestCase):
    """
    Checklist 70 (onward XCLIENT): the next hop is told the claimed
    identity.  On sockets: the subject is what the queue manager's
    delivery client sends to a real (scripted) next hop.
    """

    listener = TRUSTED

    @defer.inlineCallbacks
    def setUp(self):
        self.hop = ScriptedSMTPFactory(extensions=["XCLIENT NAME ADDR PORT PROTO HELO LOGIN"])
        port = reactor.listenTCP(0, self.hop, interface="127.0.0.1")
        self.addCleanup(self._closeHop, port)
        self.relay = {"smarthosts": ["[127.0.0.1]:%d" % port.getHost().port], "forward_identity": True,
                      "retry_min": 0.3, "retry_max": 0.6}
        yield GatewayTestCase.setUp(self)

    def _closeHop(self, port):
        for p in self.hop.connections:
            p.transport.loseConnection()
        return port.stopListening()

    @defer.inlineCallbacks
    def relayed(self, commands):
        def run(c):
            for line in commands:
                self.assertIn(c.cmd(line)[0], (220, 250), line)
            sendMessage(c)

        yield self.session(run)
        deadline = time.monotonic() + 15
        while not self.hop.transactions and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.hop.transactions), 1)
        [line] = [l for l in self.hop.lines if l.startswith("XCLIENT ")]
        return line

    @defer.inlineCallbacks
    def test_onwardXclientCarriesClaimedIdentity(self):
        line = yield self.relayed(["XCLIENT NAME=client.example.net ADDR=IPV6:2001:db8::7 PORT=4567 "
                                   "HELO=helo.example.net LOGIN=user+2Btag@example.org"])
        attrs = dict(a.split("=", 1) for a in line.split()[1:])
        self.assertEqual(attrs, {"HELO": "helo.example.net", "PROTO": "SMTP", "LOGIN": "user+2Btag@example.org",
                                 "PORT": "4567", "NAME": "client.example.net", "ADDR": "IPV6:2001:db8::7"})
        self.assertTrue(line.endswith("ADDR=IPV6:2001:db8::7"), line)

    @defer.inlineCallbacks
    def test_onwardXclientForUnavailableValues(self):
        # An unknown address relays only with a login.
        line = yield self.relayed(["XCLIENT NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] LOGIN=u"])
        attrs = dict(a.split("=", 1) for a in line.split()[1:])
        self.assertEqual((attrs["NAME"], attrs["ADDR"]), ("[UNAVAILABLE]", "[UNAVAILABLE]"))

    @defer.inlineCallbacks
    def test_onwardNameIsOneAPostfixNextHopTakes(self):
        """
        Checklist 64: a NAME Postfix's valid_hostname refuses (a label
        starting or ending in a hyphen, an empty label) is refused here too,
        and a fully qualified name's root dot is dropped: the onward XCLIENT
        to a Postfix next hop would be refused (501 5.5.4 Bad NAME syntax)
        and the message deferred again and again (differential test).
        """

        def refused(c):
            for name in ("-a.example", "a-.example", "a.-b.example", "a.example..", "a.example.-"):
                self.assertEqual(c.cmd("XCLIENT NAME=%s ADDR=192.0.2.7" % name)[0], 501, name)

        yield self.session(refused)
        line = yield self.relayed(["XCLIENT NAME=mx.example.net. ADDR=192.0.2.7"])
        attrs = dict(a.split("=", 1) for a in line.split()[1:])
        self.assertEqual((attrs["NAME"], attrs["ADDR"]), ("mx.example.net", "192.0.2.7"))


class IPv6PeerTests(VerbTestCase):
    listener = {"endpoint": "tcp6:0:interface=\\:\\:1", "trusted_peers": ["::1/128"],
                "extensions": ["xclient", "xdumpcontext"], "relay_networks": ["192.0.2.0/24"],
                "received_shows_peer": True}

    def v6session(self, f):
        c = self.harness.connect(peer="::1", port=40001, local=("::1", 25))
        self.addCleanup(c.lose)
        self.assertEqual(c.reply()[0], 220)
        return f(c)

    @defer.inlineCallbacks
    def test_realIPv6PeerNamedInVia(self):
        ports = []

        @defer.inlineCallbacks
        def run(c):
            ports.append(c.transport.getPeer().port)
            self.assertIn(XCLIENT_KEYWORD, c.cmd("EHLO x")[1])
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            self.assertEqual(conn(c)["peer_ip"], "::1")
            yield queueMessage(c)

        yield self.v6session(run)
        header = self.queuedReceived()
        self.assertIn(b"(unknown [192.0.2.7])\r\n\t(via [IPv6:::1] port %d)\r\n" % ports[0], header)


# -- XREMOTEIP (checklist 75) -------------------------------------------------


class XremoteipTests(VerbTestCase):
    def test_setsAddressNameUnknownPortUnavailable(self):
        def run(c):
            c.cmd("EHLO keep.example")
            c.cmd("XCLIENT NAME=named.example LOGIN=keepme PORT=4567")
            c.cmd("EHLO keep.example")
            before = conn(c)
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.7"), (250, ["2.0.0 Ok"]))
            ctx = conn(c)
            self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["remote_name_status"], ctx["remote_port"]),
                             ("192.0.2.7", "unknown", "perm", "0"))
            # No reset, no new session: HELO and AUTH kept.
            for key in ("ehlo_domain", "auth_user", "session_id", "peer_ip", "trusted"):
                self.assertEqual(ctx[key], before[key], key)

        return self.session(run)

    def test_ipv6Forms(self):
        def run(c):
            self.assertEqual(c.cmd("XREMOTEIP IPv6:2001:DB8::5")[0], 250)
            self.assertEqual(conn(c)["remote_ip"], "2001:db8::5")
            self.assertEqual(c.cmd("XREMOTEIP 2001:db8::6")[0], 250)
            self.assertEqual(conn(c)["remote_ip"], "2001:db8::6")

        return self.session(run)

    def test_badAddress501(self):
        def run(c):
            for args in ("", "999.1.1.1", "192.0.2.7 192.0.2.8", "[192.0.2.7]", "example.net", "IPv6:192.0.2.7",
                         "0.0.0.0", "::", "224.0.0.1", "255.255.255.255"):
                code, lines = c.cmd(("XREMOTEIP " + args).strip())
                self.assertEqual((code, lines[0][:6]), (501, SYNTAX), args)
            self.assertEqual(conn(c)["remote_ip"], "127.0.0.1")

        return self.session(run)

    @defer.inlineCallbacks
    def test_afterMail503AndMessageKeepsAddress(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.9"), (503, ["5.5.1 Error: MAIL transaction in progress"]))
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("DATA")
            c.send("Subject: x\r\n\r\nx\r\n.\r\n")
            self.assertEqual((yield c.whenReply())[0], 250)
            self.assertEqual(c.cmd("XREMOTEIP 192.0.2.9")[0], 250)  # outside a transaction again

        yield self.session(run)
        header = self.queuedReceived()
        self.assertIn(b"(unknown [127.0.0.1])", header)
        self.assertNotIn(b"192.0.2.9", header)

    def test_noNewGreeting(self):
        def run(c):
            c.send("XREMOTEIP 192.0.2.7\r\nNOOP\r\n")
            self.assertEqual(c.reply(), (250, ["2.0.0 Ok"]))
            self.assertEqual(c.reply(), (250, ["2.0.0 Ok"]))

        return self.session(run)

    @defer.inlineCallbacks
    def test_addressInReceived(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("EHLO e.example")
            c.cmd("XREMOTEIP 192.0.2.7")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        self.assertTrue(header.startswith(b"Received: from e.example (unknown [192.0.2.7])\r\n\tby relay.test "),
                        header)


# -- XSETCONTEXT (checklist 76, 77) -------------------------------------------


class XsetcontextTests(VerbTestCase):
    def test_setAndReplace(self):
        """Checklist 76."""

        def run(c):
            self.assertEqual(c.cmd("XSETCONTEXT a=1 b=x+2By"), (250, ["2.0.0 Ok"]))
            ctx = conn(c)
            self.assertEqual((ctx["a"], ctx["b"]), ("1", "x+y"))
            self.assertEqual(c.cmd("XSETCONTEXT a=2"), (250, ["2.0.0 Ok"]))
            ctx = conn(c)
            self.assertEqual((ctx["a"], ctx["b"]), ("2", "x+y"))
            self.assertEqual(c.cmd("xsetcontext a=3 a=4 empty=")[0], 250)
            ctx = conn(c)
            self.assertEqual((ctx["a"], ctx["empty"]), ("4", ""))

        return self.session(run)

    def test_ownedKeysRefusedSetNothing(self):
        """Checklist 77."""

        def run(c):
            before = conn(c)
            for args in ("remote_ip=192.0.2.1", "auth_user=root", "trusted=yes", "can_relay=yes",
                         "__bypass_x=1", "proxy_peer_ip=192.0.2.1", "rcptto_0=x", "mailfrom_string=x",
                         "ok=1 remote_ip=192.0.2.1", "__bypass_x=1 ok=1"):
                code, lines = c.cmd("XSETCONTEXT " + args)
                self.assertEqual((code, lines[0][:6]), (501, SYNTAX), args)
            self.assertEqual(conn(c), before)

        return self.session(run)

    def test_syntaxRefusals(self):
        def run(c):
            for args in ("", "novalue", "=1", "a b=1", "bad/key=1", "k" * 65 + "=1", "a=+4", "a=+ZZ",
                         "a=x+00", "a=x+0Dy", "a=caf+C3+A9", "a=caf\xe9"):
                code, lines = c.cmd(("XSETCONTEXT " + args).strip())
                self.assertEqual((code, lines[0][:6]), (501, SYNTAX), args)
            self.assertFalse(any(k in conn(c) for k in ("novalue", "a", "b", "bad/key")))

        return self.session(run)

    def test_insideTransaction503(self):
        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            self.assertEqual(c.cmd("XSETCONTEXT z=1"), (503, ["5.5.1 Error: MAIL transaction in progress"]))
            c.cmd("RSET")
            self.assertEqual(c.cmd("XSETCONTEXT z=1")[0], 250)

        return self.session(run)

    def test_limits(self):
        def run(c):
            self.assertEqual(c.cmd("XSETCONTEXT big=" + "v" * 1025)[1][0][:6], SYNTAX)
            self.assertEqual(c.cmd("XSETCONTEXT big=" + "v" * 1024)[0], 250)
            for i in range(63):
                self.assertEqual(c.cmd("XSETCONTEXT k%d=1" % i)[0], 250)
            self.assertEqual(c.cmd("XSETCONTEXT onemore=1")[1][0][:6], SYNTAX)
            self.assertEqual(c.cmd("XSETCONTEXT k0=2 big=w")[0], 250)  # replacing is fine
            ctx = conn(c)
            self.assertNotIn("onemore", ctx)
            self.assertEqual((ctx["k0"], ctx["big"]), ("2", "w"))

        return self.session(run)

    @defer.inlineCallbacks
    def test_valuesInSpooledEnvelope(self):
        @defer.inlineCallbacks
        def run(c):
            c.cmd("XSETCONTEXT binding=bulk tag=a+20b")
            c.cmd("XCLIENT ADDR=IPV6:2001:db8::11 NAME=[UNAVAILABLE] PORT=4567")
            return (yield queueMessage(c))

        qid = yield self.session(run)
        m, content = self.harness.spooled(qid)
        context = m.envelope.context
        c = context["connection"]
        self.assertEqual((c["binding"], c["tag"]), ("bulk", "a b"))
        self.assertEqual(sorted(context["client_keys"]), ["binding", "tag"])
        self.assertEqual((c["remote_ip"], c["remote_port"], c["remote_name"], c["peer_ip"]),
                         ("2001:db8::11", 4567, "unknown", "127.0.0.1"))
        self.assertEqual(context["message"]["rcptto"], ["b@example.net"])
        self.assertTrue(content.startswith(b"Received: from unknown (unknown [IPv6:2001:db8::11])\r\n"
                                           b"\tby relay.test "))


class ContextAcrossStartTLSTests(TLSGatewayTestCase):
    """
    protocol.md section 1: XSETCONTEXT keys and the XCLIENT identity
    survive STARTTLS.  On sockets: the context's C{tls} value comes from a
    real handshake.
    """

    tlsListener = TRUSTED

    def test_keysAndIdentityKeptHeloForgotten(self):
        def run(c):
            c.cmd("EHLO x")
            c.cmd("XSETCONTEXT binding=bulk")
            self.assertEqual(c.cmd("XCLIENT NAME=client.example.net ADDR=192.0.2.7")[0], 220)
            c.cmd("EHLO before-tls.example")
            self.starttls(c)
            ctx = conn(c)
            self.assertNotIn("ehlo_domain", ctx)
            self.assertEqual((ctx["binding"], ctx["remote_ip"], ctx["remote_name"]),
                             ("bulk", "192.0.2.7", "client.example.net"))
            self.assertTrue(ctx["tls"].startswith("TLS"), ctx["tls"])

        return self.session(run)


# -- XDUMPCONTEXT (checklist 79, 80) -------------------------------------------


class XdumpcontextTests(VerbTestCase):
    def rawDump(self, c, command="XDUMPCONTEXT"):
        c.send(command + "\r\n")
        lines = []
        while True:
            lines.append(c.line())
            if lines[-1][3:4] != "-":
                return lines

    def test_format(self):
        """Checklist 79."""

        def run(c):
            c.cmd("EHLO there")
            lines = self.rawDump(c)
            self.assertIn("250-2.0.0 [connection] ehlo_domain there", lines)
            self.assertIn("250-2.0.0 [connection] ehlo_string ehlo there", lines)
            self.assertIn("250-2.0.0 [connection] remote_ip 127.0.0.1", lines)
            self.assertIn("250-2.0.0 [connection] trusted yes", lines)
            self.assertEqual(lines[-1], "250 2.0.0 XDUMPCONTEXT complete")
            for line in lines[:-1]:
                self.assertTrue(line.startswith("250-2.0.0 [connection] "), line)
            keys = [l.split(" ")[2] for l in lines[:-1]]
            self.assertEqual(keys, sorted(keys))

        return self.session(run)

    def test_arguments501(self):
        def run(c):
            self.assertEqual(c.cmd("XDUMPCONTEXT now"), (501, ["5.5.4 Syntax: XDUMPCONTEXT"]))

        return self.session(run)

    def test_messageLinesInTransaction(self):
        """Checklist 80: [message] lines during a transaction, after the connection lines."""

        def run(c):
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<b@example.net>")
            c.cmd("RCPT TO:<c@example.net>")
            lines = self.rawDump(c)
            scopes = [l.split(" ")[1] for l in lines[:-1]]
            self.assertEqual(scopes, sorted(scopes, key=lambda s: s != "[connection]"))
            message = [l for l in lines if "[message]" in l]
            self.assertEqual(message, [
                "250-2.0.0 [message] mailfrom_domain example.org",
                "250-2.0.0 [message] mailfrom_localpart a",
                "250-2.0.0 [message] mailfrom_string a@example.org",
                "250-2.0.0 [message] message_rcpt_count 2",
                "250-2.0.0 [message] rcptto b@example.net c@example.net",
            ])
            self.assertEqual(lines[-1], "250 2.0.0 XDUMPCONTEXT complete")
            c.cmd("RSET")
            self.assertFalse(any("[message]" in l for l in self.rawDump(c)))

        return self.session(run)

    @defer.inlineCallbacks
    def test_controlCharactersEscaped(self):
        """
        Checklist 80: CR, NUL and 8-bit octets in the EHLO argument (the one
        way a client gets them near the context: XCLIENT and XSETCONTEXT
        refuse them) are replaced with "?" as Postfix does, so they can
        never break a reply or a header.  Values that do hold control
        characters print as +XX: see XdumpcontextRenderTests.
        """

        @defer.inlineCallbacks
        def run(c):
            c.send("EHLO a\rb\x00c\xe9\r\n")
            self.assertEqual(c.reply()[0], 250)
            lines = self.rawDump(c)
            self.assertIn("250-2.0.0 [connection] ehlo_domain a?b?c?", lines)
            self.assertIn("250-2.0.0 [connection] ehlo_string ehlo a?b?c?", lines)
            self.assertEqual(lines[-1], "250 2.0.0 XDUMPCONTEXT complete")
            yield queueMessage(c)

        yield self.session(run)
        header = self.queuedReceived()
        # The trace header stays one clean line per field, too.
        self.assertTrue(header.startswith(b"Received: from a?b?c? (unknown [127.0.0.1])\r\n\tby "), header)

    def test_longValueOnTheWire(self):
        def run(c):
            c.cmd("XSETCONTEXT note=" + "n" * 1000)
            lines = self.rawDump(c)
            self.assertEqual(lines[-1], "250 2.0.0 XDUMPCONTEXT complete")
            note = [l for l in lines if l.startswith("250-2.0.0 [connection] note ")]
            self.assertEqual(len(note), 3)
            self.assertEqual("".join(l.split(" ", 3)[3] for l in note), "n" * 1000)
            self.assertTrue(all(len(l) <= 510 for l in lines), [len(l) for l in lines])

        return self.session(run)


class XdumpcontextRenderTests(unittest.TestCase):
    """How XDUMPCONTEXT lines are escaped, folded and rendered (no session)."""

    def test_longValueFoldedWithinReplyLineLimit(self):
        """
        RFC 5321 caps a reply line at 512 octets: a long value goes on over
        the next lines, each repeating its scope and key, and never splits
        a +XX escape.
        """
        value = ("x\n" * 150) + "y" * 700
        ctx = ValidationContext(k=value, z="ok")
        lines = xdumpcontext.lines(ctx)
        folded = [l for l in lines if l.startswith("[connection] k ")]
        self.assertGreater(len(folded), 2)
        self.assertEqual(lines[len(folded):], ["[connection] z ok", "XDUMPCONTEXT complete"])
        text = "".join(l[len("[connection] k "):] for l in folded)
        self.assertEqual(text, value.replace("\n", "+0A"))
        for line in codes.render(250, "2.0.0", lines).split(b"\r\n")[:-1]:
            self.assertLessEqual(len(line) + 2, 512)
        for l in folded:
            self.assertRegex(l[len("[connection] k "):], r"^(\+0A|[xy])+$")

    def test_lineFeedEscapedWhenRendered(self):
        ctx = ValidationContext(k="a\r\n250 injected\x00", z="ok")
        lines = xdumpcontext.lines(ctx)
        self.assertEqual(lines, ["[connection] k a+0D+0A250 injected+00", "[connection] z ok",
                                 "XDUMPCONTEXT complete"])
        wire = codes.render(250, "2.0.0", lines)
        self.assertEqual(wire, b"250-2.0.0 [connection] k a+0D+0A250 injected+00\r\n"
                               b"250-2.0.0 [connection] z ok\r\n"
                               b"250 2.0.0 XDUMPCONTEXT complete\r\n")

    def test_renderEscapesWhateverItIsGiven(self):
        self.assertEqual(codes.escape("a\r\nb\x00\x7f"), "a+0D+0Ab+00+7F")
        self.assertEqual(codes.render(250, "2.0.0", ["x\ny"]), b"250 2.0.0 x+0Ay\r\n")

    def test_tupleRendersLikeAList(self):
        """A tuple of lines (the EHLO reply, rendered once per listener) is escaped and cut the same way."""
        lines = ["relay.test", "SIZE 10", "x\ny", "z" * 600]
        self.assertEqual(codes.render(250, None, tuple(lines)), codes.render(250, None, lines))
        self.assertEqual(codes.render(250, None, tuple(lines)), codes.render(250, None, list(lines)))
        self.assertIn(b"250-x+0Ay\r\n", codes.render(250, None, tuple(lines)))


# -- the Received header from the context (checklist 69, 70) --------------------


class ReceivedHeaderTests(unittest.TestCase):
    """relaygw.trace.receivedHeader, for the identities the verbs produce."""

    def header(self, recipients=("b@example.net",), showPeer=False, showLogin=False, **ctx):
        from relaygw.trace import receivedHeader

        return receivedHeader(ValidationContext(**ctx), "relay.test", "QID1", list(recipients), now=0,
                              showPeer=showPeer, showLogin=showLogin)

    def test_xclientIdentityWithRealPeer(self):
        ctx = dict(ehlo_domain="helo.example.net", remote_name="client.example.net", remote_ip="192.0.2.7",
                   peer_ip="127.0.0.1", peer_port=4711, overridden=True, protocol="ESMTP",
                   proxy_peer_ip="127.0.0.2")
        # By default only the claimed client, as Postfix writes it.
        self.assertEqual(
            self.header(**ctx),
            b"Received: from helo.example.net (client.example.net [192.0.2.7])\r\n"
            b"\tby relay.test (relaygw) with ESMTP id QID1\r\n"
            b"\tfor <b@example.net>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
        # received_shows_peer: the real peer and the balancer too.
        self.assertEqual(
            self.header(showPeer=True, **ctx),
            b"Received: from helo.example.net (client.example.net [192.0.2.7])\r\n"
            b"\t(via [127.0.0.1] port 4711)\r\n"
            b"\t(proxied by [127.0.0.2])\r\n"
            b"\tby relay.test (relaygw) with ESMTP id QID1\r\n"
            b"\tfor <b@example.net>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")

    def test_ipv6Literals(self):
        h = self.header(remote_ip="2001:db8::11", peer_ip="::1", peer_port=25, overridden=True, showPeer=True)
        self.assertIn(b"(unknown [IPv6:2001:db8::11])\r\n\t(via [IPv6:::1] port 25)\r\n", h)

    def test_noViaWithoutOverride(self):
        h = self.header(ehlo_domain="x", remote_ip="127.0.0.1", peer_ip="127.0.0.1", peer_port=1, showPeer=True)
        self.assertNotIn(b"via", h)
        # An override that names the real peer itself (nginx's ADDR) still says so.
        h = self.header(ehlo_domain="x", remote_ip="127.0.0.1", peer_ip="127.0.0.1", peer_port=1, overridden=True,
                        showPeer=True)
        self.assertIn(b"\t(via [127.0.0.1] port 1)\r\n", h)

    def test_heloFallbacks(self):
        self.assertTrue(self.header(remote_ip="192.0.2.1").startswith(b"Received: from unknown (unknown [192.0.2.1])"))
        self.assertTrue(self.header(remote_ip="192.0.2.1", helo_name="h.example").startswith(
            b"Received: from h.example ("))
        self.assertTrue(self.header(remote_ip="192.0.2.1", helo_name="h.example", ehlo_domain="e.example")
                        .startswith(b"Received: from e.example ("))

    def test_protocols(self):
        def with_(**ctx):
            return re.search(rb" with (\S+)", self.header(remote_ip="192.0.2.1", **ctx)).group(1)

        self.assertEqual(with_(protocol="SMTP"), b"SMTP")
        self.assertEqual(with_(protocol="ESMTP"), b"ESMTP")
        self.assertEqual(with_(protocol="ESMTP", auth_user="u"), b"ESMTPA")
        self.assertEqual(with_(protocol="ESMTP", tls="TLSv1.3", tls_cipher="X"), b"ESMTPS")
        self.assertEqual(with_(protocol="ESMTP", tls="TLSv1.3", tls_cipher="X", auth_user="u"), b"ESMTPSA")
        # The login name only on a listener that opts in (received_shows_login).
        self.assertNotIn(b"u@example.org", self.header(remote_ip="192.0.2.1", auth_user="u@example.org"))
        self.assertIn(b"with ESMTPA (authenticated as u@example.org) id",
                      self.header(remote_ip="192.0.2.1", auth_user="u@example.org", protocol="ESMTP", showLogin=True))

    def test_alwaysAllowIsNoLogin(self):
        """
        An ALWAYS-ALLOW session logged in nobody (protocol.md section 9):
        RFC 3848's A says SMTP AUTH succeeded, so it is not written, nor is
        a login name, as onward XCLIENT says LOGIN=[UNAVAILABLE].
        """
        anonymous = dict(remote_ip="192.0.2.1", protocol="ESMTP", auth_user="anonymous", auth_name="ALWAYS-ALLOW",
                         auth_status="pass", showLogin=True)
        self.assertIn(b" with ESMTP id ", self.header(**anonymous))
        self.assertIn(b" with ESMTPS (TLSv1.3 X) id ", self.header(tls="TLSv1.3", tls_cipher="X", **anonymous))
        self.assertIn(b" with ESMTPA (authenticated as bob) id ",
                      self.header(**dict(anonymous, auth_user="bob", auth_name="XCLIENT")))

    def test_clientValuesCannotBreakTheHeader(self):
        h = self.header(ehlo_domain="a\r\nX-Injected: 1", remote_name="n\x00", remote_ip="192.0.2.1",
                        auth_user="u\nv", recipients=("b\r\n@example.net",), peer_ip="127.0.0.1\r\nX: 1",
                        overridden=True, showPeer=True, showLogin=True)
        self.assertEqual(h.count(b"\r\n"), 4)
        self.assertNotIn(b"\nX-Injected", h)
        self.assertIn(b"from a??X-Injected: 1 (n? [192.0.2.1])", h)

    def test_severalRecipients(self):
        h = self.header(remote_ip="192.0.2.1", recipients=("b@example.net", "c@example.net"))
        self.assertTrue(h.endswith(b" id QID1;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"), h)
        self.assertNotIn(b"for <", h)
