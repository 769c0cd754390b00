"""
Client-given values stay within what the header and the next hop take:
the greeting name at most 255 octets, no Received line over 998 octets,
no comment closed by a login, and nothing sent onward in XCLIENT that
relaygw's own XCLIENT (or Postfix's) would refuse.  Sessions run over
loopback (harness sessions where a real socket adds nothing, two gateways
on loopback sockets for the onward XCLIENT).
"""

import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.testing import Client, inThread, receivedHeader
from tests.messages import queueMessage, sendMessage
from tests.recorders import LogCapture
from tests.relaysetup import forwardingChain
from tests.sessions import SessionTestCase


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class GreetingNameTests(SessionTestCase):
    """A greeting name is a domain: at most 255 octets (RFC 5321 section 4.5.3.1.2), as XCLIENT's HELO= is."""

    listener = {"relay_networks": ["127.0.0.0/8"]}
    realSpool = True

    @defer.inlineCallbacks
    def test_longestNameAcceptedLongerRefused(self):
        longest = ("b" * 62 + ".") * 4 + "abc"  # 255 octets

        replies = []

        def run(c):
            replies.extend([c.cmd("EHLO " + longest + "x"), c.cmd("HELO " + longest + "x")])
            self.assertEqual(c.cmd("EHLO " + longest)[0], 250)
            return queueMessage(c)

        yield self.session(run)
        self.assertEqual(replies, [(501, ["5.5.4 Syntax: EHLO hostname of at most 255 octets"]),
                                   (501, ["5.5.4 Syntax: HELO hostname of at most 255 octets"])])
        [(_, msg)] = self.spooled()
        header = receivedHeader(msg)
        self.assertIn(b"from " + longest.encode() + b" (", header)
        self.assertEqual([len(l) for l in header.split(b"\r\n") if len(l) > 998], [])


class ReceivedValuesTests(unittest.TestCase):
    """
    Whatever the context holds (a name from DNS, a login from SASL or
    XCLIENT), no line of Received is over 998 octets (RFC 5322 section
    2.1.1) and no value closes its comment.
    """

    def test_longValuesCut(self):
        from relaygw.trace import receivedHeader as build

        context = {"ehlo_domain": "h" * 2000, "remote_name": "n" * 2000 + "(x)", "remote_ip": "192.0.2.7",
                   "auth_user": "(" * 3000, "tls": "TLSv1.3", "tls_cipher": "c" * 2000, "peer_ip": "127.0.0.1",
                   "peer_port": "9" * 2000, "overridden": True, "proxy_peer_ip": "127.0.0.2"}
        header = build(context, "relay.example", "QID", ["b@example.net"], now=0, showPeer=True, showLogin=True)
        lines = header.split(b"\r\n")
        self.assertEqual([len(l) for l in lines if len(l) > 998], [])
        self.assertIn(b"(authenticated as " + b"?" * 255 + b")", header)
        self.assertIn(b"(" + b"n" * 255 + b" [192.0.2.7])", header)


class ReceivedLoginCommentTests(SessionTestCase):
    """
    With received_shows_login, the login goes into Received as a comment,
    "(authenticated as <login>)".  The login is a client value (XCLIENT
    LOGIN= is what nginx passes on from the end client's AUTH): like the
    greeting name it must not be able to close the comment and add a clause
    of its own (protocol.md section 17: "no value can add a clause of its
    own"); trace._clean keeps parentheses, brackets and semicolons.
    """

    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"], "relay_networks": ["127.0.0.0/8"],
                "received_shows_login": True}
    realSpool = True

    @defer.inlineCallbacks
    def test_loginCannotCloseTheComment(self):
        login = "x) by mx.bank.example (via [203.0.113.5]"

        def run(c):
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7 LOGIN=" + login.replace(" ", "+20"))[0], 220)
            c.cmd("EHLO client.example")
            return queueMessage(c)

        yield self.session(run)
        [(_, msg)] = self.spooled()
        header = receivedHeader(msg)
        # The login stays inside its comment: no parenthesis, bracket or semicolon of its own.
        self.assertIn(b"(authenticated as x? by mx.bank.example ?via ?203.0.113.5?) id ", header)
        self.assertRegex(header, rb"\(authenticated as [^()\[\];]*\) id ")


class OnwardXclientAcceptedTests(unittest.TestCase):
    """
    README: "Everything relaygw sends in XCLIENT, relaygw's own XCLIENT
    accepts."  A greeting name or a login whose xtext is over 255 octets
    ("+" and "=" are sent as +2B and +3D) goes onward as [UNAVAILABLE]: the
    next hop would refuse the XCLIENT (501 5.5.4), and the message would be
    deferred again and again.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield forwardingChain(self)
        self.logs = LogCapture(self)

    def refusals(self):
        return self.logs.find("refused: {why}", verb="XCLIENT")

    @defer.inlineCallbacks
    def arrivals(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.arrived) < n and time.monotonic() < deadline:
            yield deferLater(0.1)
        self.assertEqual(len(self.arrived), n, self.arrived)
        return self.arrived

    @defer.inlineCallbacks
    def relayWithEhlo(self, helo):
        def run():
            c = Client(self.gw.ports[0])
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7")[0], 220)
            self.assertEqual(c.cmd("EHLO " + helo)[0], 250)
            return sendMessage(c, subject="long-helo")

        yield inThread(run)
        [arrived] = yield self.arrivals(1)
        return arrived.context["connection"]

    @defer.inlineCallbacks
    def test_ehloNameLongOnlyAsXtextStillRelayed(self):
        name = "a" + "+" * 100 + ".example"  # 109 octets, 309 as xtext
        ctx = yield self.relayWithEhlo(name)
        self.assertEqual(ctx["remote_ip"], "192.0.2.7")
        self.assertEqual(self.refusals(), [])

    @defer.inlineCallbacks
    def test_rawPlusInLoginStillRelayed(self):
        # nginx passes LOGIN on raw (protocol.md section 10): each bare '+'
        # is kept, and goes onward as +2B, three octets for one.
        login = "u" + "+" * 100 + "@example.org"  # 113 octets as nginx sends it, 313 as onward xtext

        def run():
            c = Client(self.gw.ports[0])
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("XCLIENT ADDR=192.0.2.7 LOGIN=" + login)[0], 220)
            self.assertEqual(c.cmd("EHLO client.example")[0], 250)
            return sendMessage(c, subject="plus-login")

        yield inThread(run)
        [arrived] = yield self.arrivals(1)
        # Too long to go onward (XCLIENT takes 255 octets): the next hop
        # hears of no login rather than refuse the XCLIENT.
        self.assertIsNone(arrived.context["connection"].get("auth_user"))
        self.assertEqual(self.refusals(), [])


    @defer.inlineCallbacks
    def test_utf8LoginRelayed(self):
        # A SASL login is UTF-8 (RFC 4616): it goes onward as the xtext of
        # its UTF-8 octets, which the next hop takes as the same login.
        def run():
            c = Client(self.gw.ports[0])
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("XCLIENT ADDR=203.0.113.7 LOGIN=j+C3+B6rg@example.org")[0], 220)
            self.assertEqual(c.cmd("EHLO client.example")[0], 250)
            return sendMessage(c, subject="utf8-login")

        yield inThread(run)
        [arrived] = yield self.arrivals(1)
        self.assertEqual(arrived.context["connection"]["auth_user"], "j\xf6rg@example.org")
        self.assertEqual(arrived.context["connection"]["remote_ip"], "203.0.113.7")
        self.assertEqual(self.refusals(), [])

class OnwardXclientRefusalSuspendsHopTests(unittest.TestCase):
    """
    A refused onward XCLIENT breaks the delivery session before any message
    is answered, and three such batches in a row mark the whole next hop
    dead for retry_min seconds: were a client's greeting name sent onward
    whatever its length, one client could stop delivery to the smarthost
    for everybody.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogCapture(self)
        yield forwardingChain(self, retry=(30, 60))

    def send(self, addr, helo, subject):
        def run():
            c = Client(self.gw.ports[0])
            self.addCleanup(c.close)
            self.assertEqual(c.reply()[0], 220)
            self.assertEqual(c.cmd("XCLIENT ADDR=" + addr)[0], 220)
            self.assertEqual(c.cmd("EHLO " + helo)[0], 250)
            return sendMessage(c, subject=subject)

        return inThread(run)

    @defer.inlineCallbacks
    def test_longEhloNamesDoNotStopOtherClientsMail(self):
        long = "+" * 100 + ".example"  # 108 octets, 308 as xtext
        for n in range(3):
            yield self.send("192.0.2.%d" % (10 + n), "c%d%s" % (n, long), "long-%d" % n)
        # An ordinary client of the same gateway, a moment later.
        yield self.send("192.0.2.99", "good.example", "good")
        deadline = time.monotonic() + 10
        while not any(e.context["connection"].get("remote_ip") == "192.0.2.99" for e in self.arrived) \
                and time.monotonic() < deadline:
            yield deferLater(0.1)
        deadline = time.monotonic() + 10
        while len(self.arrived) < 4 and time.monotonic() < deadline:
            yield deferLater(0.1)
        suspended = [e["log_format"] for e in self.logs.find("deliveries suspended")]
        self.assertEqual(sorted(e.context["connection"]["remote_ip"] for e in self.arrived),
                         ["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.99"], suspended)
        self.assertEqual(self.logs.find("refused: {why}", verb="XCLIENT"), [])
