"""
The pure command-argument parsers (relaygw.commands) and the trusted verbs'
parsers (XCLIENT, XSETCONTEXT, XREMOTEIP): exact refusals for bad input,
property tests that nothing but the module's own error escapes, round trips
where a form can be written back, and every reply line within 512 octets.
"""

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relaygw import codes, xtext
from relaygw.commands import CommandError, parseMail, parseRcpt, splitWords, validLiteral
from relaygw.verbs import VerbError, xclient, xremoteip, xsetcontext


def refusal(f, *args):
    try:
        f(*args)
    except (CommandError, VerbError) as e:
        return e.reply.code, e.reply.enhanced
    raise AssertionError("accepted: %r" % (args,))


def assertShortLines(testCase, reply):
    for line in codes.render(reply.code, reply.enhanced, reply.text).split(b"\r\n")[:-1]:
        testCase.assertLessEqual(len(line) + 2, codes.MAX_REPLY_LINE)


class AddressLiteralTests(unittest.TestCase):
    def test_valid(self):
        for literal in ("1.2.3.4", "255.255.255.255", "IPv6:::1", "ipv6:2001:db8::1", "IPv6:::ffff:1.2.3.4",
                        "x-tag:some-content"):
            self.assertTrue(validLiteral(literal), literal)
            self.assertEqual(parseMail("FROM:<a@[%s]>" % literal, 0)[0], "a@[%s]" % literal)

    def test_invalid(self):
        for literal in ("<", ">", "1.2.3", "1.2.3.256", "1.2.3.4.5", "IPv6:zz", "IPv6:fe80::1%eth0", "::1",
                        "IPv6:", "-tag:x", "1234:x", "example.com"):
            self.assertFalse(validLiteral(literal), literal)

    def test_mailRefused(self):
        self.assertEqual(refusal(parseMail, "FROM:<0@[<]>", 0), (501, "5.1.7"))

    def test_rcptRefused(self):
        self.assertEqual(refusal(parseRcpt, "TO:<a@[>]>"), (501, "5.1.3"))


class SourceRouteTests(unittest.TestCase):
    """A source route is dropped (RFC 5321 section 4.1.1.3); with no mailbox after it, the path is refused."""

    def test_routeDropped(self):
        self.assertEqual(parseMail("FROM:<@a.example,@b.example:u@c.example>", 0)[0], "u@c.example")
        self.assertEqual(parseRcpt("TO:<@a.example:u@c.example>")[0], "u@c.example")

    def test_routeWithoutMailboxIsNotTheNullPath(self):
        self.assertEqual(parseMail("FROM:<>", 0)[0], "")
        for path in ("<@relay.example:>", "<@a.example,@b.example:>"):
            self.assertEqual(refusal(parseMail, "FROM:" + path, 0), (501, "5.1.7"))
            self.assertEqual(refusal(parseRcpt, "TO:" + path), (501, "5.1.3"))


class SplitTests(unittest.TestCase):
    def test_spaceOnly(self):
        self.assertEqual(splitWords("a\tb  c\xa0d \x1ce"), ["a\tb", "c\xa0d", "\x1ce"])

    def test_tabInParametersRefused(self):
        self.assertEqual(refusal(parseMail, "FROM:<a@b.example> SIZE=10\tBODY=7BIT", 0), (501, "5.5.4"))

    def test_quotedGreaterThan(self):
        """
        A quoted local part may hold C{>} (RFC 5321 section 4.1.2): the path
        ends at the first C{>} outside the quotes, with parameters after it
        or not (before, any parameter made such a path a syntax error).
        """
        self.assertEqual(parseMail('FROM:<"a>b"@b.example> SIZE=10 BODY=8BITMIME', 0),
                         ('"a>b"@b.example', {"SIZE": "10", "BODY": "8BITMIME"}))
        self.assertEqual(parseMail('FROM:<"a\\">b"@b.example> SIZE=10', 0)[0], '"a\\">b"@b.example')
        self.assertEqual(parseRcpt('TO:<"x>y"@y.example> NOTIFY=NEVER'), ('"x>y"@y.example', {"NOTIFY": "NEVER"}))
        self.assertEqual(refusal(parseMail, 'FROM:<"a@b.example> SIZE=10', 0), (501, "5.1.7"))

    def test_bodyWithoutValue(self):
        """C{BODY} alone is a syntax error, as C{BODY=} is (before: 555 naming C{BODY=None})."""
        for args in ("FROM:<a@b.example> BODY", "FROM:<a@b.example> BODY="):
            self.assertEqual(refusal(parseMail, args, 0), (501, "5.5.4"))

    def test_runsOfSpaces(self):
        self.assertEqual(parseMail("FROM:<a@b.example>  SIZE=10   BODY=7BIT", 0)[1],
                         {"SIZE": "10", "BODY": "7BIT"})

    def test_xclientTab(self):
        self.assertEqual(refusal(xclient.parse, "ADDR=192.0.2.1\tNAME=x.example"), (501, "5.5.4"))

    def test_xsetcontextNBSP(self):
        # U+00A0 is not a separator: the pair's value holds it, and it is not xtext.
        self.assertEqual(refusal(xsetcontext.parse, "a=1\xa0b=2"), (501, "5.5.4"))

    def test_xremoteipTab(self):
        self.assertIsNone(xremoteip.parse("192.0.2.1\t"))
        self.assertEqual(xremoteip.parse(" 192.0.2.1 "), "192.0.2.1")


class ReplyLengthTests(unittest.TestCase):
    def test_longParameter(self):
        try:
            parseMail("FROM:<a@b.example> " + "X" * 3000, 0)
        except CommandError as e:
            self.assertEqual((e.reply.code, e.reply.enhanced), (555, "5.5.4"))
            assertShortLines(self, e.reply)
            self.assertIn("...", e.reply.text)
        else:
            self.fail("accepted")

    def test_xclientNonASCII(self):
        try:
            xclient.parse("NAME=" + "\xe9" * 2000)
        except VerbError as e:
            self.assertEqual((e.reply.code, e.reply.enhanced), (501, "5.5.4"))
            assertShortLines(self, e.reply)
        else:
            self.fail("accepted")

    def test_renderCaps(self):
        wire = codes.render(250, "2.0.0", "\x00" * 1000)
        self.assertLessEqual(len(wire), codes.MAX_REPLY_LINE)
        self.assertGreater(len(wire), codes.MAX_REPLY_LINE - 4)
        self.assertTrue(wire.endswith(b"+00...\r\n"))

    def test_excerptKeepsEscapesWhole(self):
        for n in range(10, 20):
            text = codes.excerpt("\x01" * 100, n)
            self.assertLessEqual(len(text), n)
            self.assertRegex(text, r"^(\+01)*\.\.\.$")


printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
anyText = st.text(st.characters(max_codepoint=0x2FF), max_size=300)


class FuzzTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(anyText)
    def test_mailOnlyCommandError(self, args):
        for f in (lambda a: parseMail(a, 1000), parseRcpt):
            try:
                f(args)
            except CommandError as e:
                assertShortLines(self, e.reply)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["FROM:", "TO:"]), st.text(st.characters(max_codepoint=0x7F), max_size=80))
    def test_pathsStartingRight(self, keyword, rest):
        f = (lambda a: parseMail(a, 0)) if keyword == "FROM:" else parseRcpt
        try:
            address, params = f(keyword + rest)
        except CommandError as e:
            assertShortLines(self, e.reply)
        else:
            # What is accepted is one path: no CR, LF or NUL, and no brackets
            # or SP outside a quoted local part.
            self.assertFalse(set(address) & set("\r\n\x00"))
            bare = address.rsplit("@", 1)[-1] if address.startswith('"') else address
            self.assertFalse(set(bare) & set(" <>"))

    @settings(max_examples=300, deadline=None)
    @given(anyText)
    def test_xclientOnlyVerbError(self, args):
        try:
            xclient.parse(args)
        except VerbError as e:
            assertShortLines(self, e.reply)

    @settings(max_examples=300, deadline=None)
    @given(anyText)
    def test_xsetcontextOnlyVerbError(self, args):
        try:
            xsetcontext.parse(args)
        except VerbError as e:
            assertShortLines(self, e.reply)

    @settings(max_examples=200, deadline=None)
    @given(anyText)
    def test_xremoteipNeverRaises(self, args):
        xremoteip.parse(args)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
                              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)),
                    min_size=1, max_size=6))
    def test_xsetcontextRoundTrip(self, pairs):
        line = " ".join("%s=%s" % (name, xtext.encode(value)) for name, value in pairs)
        self.assertEqual(xsetcontext.parse(line), pairs)

    @settings(max_examples=200, deadline=None)
    @given(st.ip_addresses(), st.integers(min_value=0, max_value=65535),
           st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}\.example", fullmatch=True),
           st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
           st.sampled_from(["SMTP", "ESMTP"]))
    def test_xclientRoundTrip(self, addr, port, name, login, proto):
        # [UNAVAILABLE] and [TEMPUNAVAIL] (any case) are special values, not logins.
        assume(login.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"))
        form = ("IPV6:%s" % addr) if addr.version == 6 else str(addr)
        line = "ADDR=%s PORT=%d NAME=%s LOGIN=%s PROTO=%s" % (
            xtext.encode(form), port, name, xtext.encode(login), proto)
        canonical = addr.ipv4_mapped or addr if addr.version == 6 else addr
        if canonical.is_unspecified or canonical.is_multicast or str(canonical) == "255.255.255.255":
            self.assertRaises(VerbError, xclient.parse, line)  # no connection has such an address
            return
        attrs = xclient.parse(line)
        self.assertEqual(attrs, {"ADDR": str(canonical), "PORT": port, "NAME": name, "LOGIN": login, "PROTO": proto})
