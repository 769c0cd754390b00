"""
A seeded, stateful fuzzer of the inbound SMTP session over loopback
sockets: random but plausible commands and parameters (odd casing, extra
spaces, tabs, NUL, bare CR, bare LF, 8-bit octets, over-long lines),
pipelined in bursts cut at random octets, connections dropped mid-command
or mid-DATA, on a listener that trusts the peer for the X-verbs and on one
that does not.  Every reply is checked as it comes (L{checkReply}), and
L{Outcome} collects what must reach the next hop: one message for each 250
at end of data, with the recipients that got 250 and the content sent.

Run from the command line for long runs:

    python -m tests.sessionfuzz SEED [SEED...] --sessions N --seconds S
"""

import random
import re
import socket
import time

from tests.test_datareader import model
from tests.test_transparency import content, stuffed, withoutReceived

#: Seconds any reply may take (an AUTH exchange's failure delay is longer).
REPLY_TIMEOUT = 5.0
AUTH_TIMEOUT = 15.0

_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})( |$)")
_VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "QUIT",
          "STARTTLS", "AUTH", "XCLIENT", "XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT"]
_TRUSTED_VERBS = ("XCLIENT", "XREMOTEIP", "XSETCONTEXT", "XDUMPCONTEXT")


class Violation(AssertionError):
    """An invariant broke; the message says which, and the session's transcript."""


class Closed(Exception):
    """The gateway closed the connection."""


def oddCase(rng, word):
    if rng.random() < 0.3:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)
    return word


def junk(rng):
    """A short random argument, sometimes with control or 8-bit octets."""
    kind = rng.randrange(10)
    if kind == 0:
        return ""
    if kind == 1:
        return "x" * rng.choice([255, 256, 511, 1000, 2100, 5000])
    if kind == 2:
        odd = [0, 9, 13, 0x7F, 0x80, 0xC3, 0xFF, 0x20, 0x41]
        return "".join(chr(rng.choice(odd)) for _ in range(rng.randrange(1, 8)))
    if kind == 3:
        return rng.choice(["=", "==", "+", "+4", "+ZZ", "+2B", "[UNAVAILABLE]", "[tempunavail]", "<>", "<", ">",
                           ":", "\t", "  ", "IPV6:", "::1", "999.0.2.300", "192.0.2.1", "\u00e9"])
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789.-_@+=") for _ in range(rng.randrange(1, 30)))


def address(rng):
    """A mailbox, usually valid; C{(wire text, the address the gateway keeps, or None if it is bad)}."""
    user = rng.choice(["a", "bob", "x.y", "first+tag", "u%d" % rng.randrange(50), '"q t"'])
    domain = rng.choice(["example.net", "example.org", "[192.0.2.9]", "[IPv6:2001:db8::1]", "sub.example.com"])
    kind = rng.randrange(12)
    if kind == 0:
        return "<%s@%s>" % (user, domain + rng.choice(["..", "[", "-"])), None
    if kind == 1:
        return "<%s\u00e9@%s>" % (user, domain), None
    if kind == 2:
        return "%s@%s" % (user, domain), "%s@%s" % (user, domain)
    if kind == 3:
        return "<@relay.example:%s@%s>" % (user, domain), "%s@%s" % (user, domain)
    if kind == 4:
        return "<%s>" % junk(rng), None
    return "<%s@%s>" % (user, domain), "%s@%s" % (user, domain)


def esmtpParam(rng):
    return rng.choice([
        "SIZE=%d" % rng.choice([0, 1, 1000, 10 ** 6, 10 ** 9, 10 ** 25]), "SIZE=abc", "SIZE", "SIZE=",
        "BODY=8BITMIME", "BODY=7BIT", "BODY=BINARYMIME", "body=8bitmime", "BODY=", "SMTPUTF8",
        "AUTH=<>", "AUTH=a+2Bb@example.org", "AUTH", "RET=FULL", "RET=HDRS", "ENVID=abc+2B", "NOTIFY=NEVER",
        "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.net", "X-UNKNOWN=1", "FOO", "=x", "SIZE=1 SIZE=2",
        "\u00e9=1", junk(rng)])


def xclientArgs(rng):
    attrs = []
    for _ in range(rng.randrange(0, 5)):
        name = rng.choice(["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT",
                           "REVERSE_NAME", "BOGUS"])
        value = {
            "NAME": rng.choice(["mx.example.org", "[UNAVAILABLE]", "[TEMPUNAVAIL]", "bad_name!", "123",
                                "mx+2Dxt.example.net"]),
            "ADDR": rng.choice(["192.0.2.7", "127.0.0.1", "IPV6:2001:db8::11", "2001:db8::1", "999.0.2.300",
                                "[UNAVAILABLE]", "IPV6:192.0.2.1", "010.0.0.1"]),
            "PORT": rng.choice(["25", "0", "65535", "65536", "-1", "x", "[UNAVAILABLE]"]),
            "DESTPORT": rng.choice(["25", "99999"]),
            "PROTO": rng.choice(["SMTP", "esmtp", "LMTP"]),
            "HELO": rng.choice(["client.example", "two words", "[UNAVAILABLE]", "x" * 300, "a+0Db"]),
            "LOGIN": rng.choice(["user", "nginx+user@example.org", "acc+2Buser", "[UNAVAILABLE]"]),
            "DESTADDR": rng.choice(["192.0.2.1", "bad"]),
        }.get(name, junk(rng))
        sep = "=" if rng.random() < 0.95 else ""
        attrs.append(oddCase(rng, name) + sep + value)
    return " ".join(attrs)


def command(rng):
    """One random command line (text, no line end) and its verb (upper case)."""
    verb = rng.choice(_VERBS + ["MAIL", "RCPT", "RCPT", "DATA", "EHLO", "RSET", "XCLIENT", "UNKNOWN"])
    sp = rng.choice([" "] * 8 + ["  ", "\t", " \t"])
    if verb == "EHLO" or verb == "HELO":
        arg = rng.choice(["client.example", "[127.0.0.1]", "", junk(rng), "client.example extra words"])
    elif verb == "MAIL":
        path, _ = address(rng) if rng.random() < 0.9 else ("<>", "")
        params = " ".join(esmtpParam(rng) for _ in range(rng.choice([0, 0, 0, 1, 2, 3])))
        arg = oddCase(rng, "FROM:") + rng.choice(["", "", " "]) + path + (" " + params if params else "")
    elif verb == "RCPT":
        path, _ = address(rng)
        params = " ".join(esmtpParam(rng) for _ in range(rng.choice([0, 0, 0, 0, 1, 2])))
        arg = oddCase(rng, "TO:") + rng.choice(["", "", " "]) + path + (" " + params if params else "")
    elif verb == "BDAT":
        arg = rng.choice(["0 LAST", "10", "x", "", "5 LAST"])
    elif verb in ("DATA", "RSET", "QUIT", "STARTTLS", "HELP", "XDUMPCONTEXT"):
        arg = "" if rng.random() < 0.85 else junk(rng)
    elif verb == "AUTH":
        arg = rng.choice(["PLAIN", "LOGIN", "PLAIN AGFsaWNlAHMzY3JldA==", "PLAIN AGFsaWNlAHdyb25n", "PLAIN =",
                          "PLAIN !!!", "CRAM-MD5", "", "PLAIN *", "LOGIN YWxpY2U="])
    elif verb == "XCLIENT":
        arg = xclientArgs(rng)
    elif verb == "XREMOTEIP":
        arg = rng.choice(["192.0.2.7", "IPv6:2001:db8::5", "2001:db8::6", "bad", "", "127.0.0.1"])
    elif verb == "XSETCONTEXT":
        pairs = ["a=1", "b=x+2By", "remote_ip=1.2.3.4", "__bypass_x=1", "k=", "bad", "n=+4", "trusted=1",
                 "x" * 70 + "=1", "v=" + "y" * 1100]
        arg = " ".join(rng.choice(pairs) for _ in range(rng.randrange(0, 3)))
    else:
        arg = junk(rng)
    text = oddCase(rng, verb) + (sp + arg if arg or rng.random() < 0.1 else "")
    if rng.random() < 0.04:  # (an octet a command should not have)
        pos = rng.randrange(len(text) + 1)
        text = text[:pos] + rng.choice(["\x00", "\r", "\x80", "\xff"]) + text[pos:]
    return text, verb


class Session:
    """
    One connection and its model: the transaction it thinks is open, and
    the checks on each reply.
    """

    def __init__(self, port, rng, trusted, outcome, label, tls=False):
        self.rng = rng
        self.tls = tls
        self.tlsActive = False
        self.trusted = trusted
        self.outcome = outcome
        self.label = label
        self.transcript = []
        self.buf = b""
        self.mail = False
        self.rcpts = []
        self.authMode = False
        self.closed = False
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fail(self, why):
        raise Violation("%s: %s\n%s" % (self.label, why, "\n".join(self.transcript[-40:])))

    # -- wire -----------------------------------------------------------

    def send(self, data):
        self.transcript.append(">> %r" % (data[:300],))
        if self.buf.startswith(b"421 "):  # (an error too many: the gateway closes without being asked)
            self.reply()
            self.expectClose()
            raise Closed()
        if self.buf:
            self.fail("a reply nothing asked for: %r" % (self.buf,))
        rng = self.rng
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 2, 5, 17, 100, len(data)]) if rng.random() < 0.3 else len(data)
            try:
                self.sock.sendall(data[pos:pos + n])
            except OSError:
                return
            pos += n
            if n < len(data) and rng.random() < 0.1:
                time.sleep(0.001)
        self.outcome.commands += 1

    def reply(self, timeout=REPLY_TIMEOUT):
        """Read one whole reply: C{(code, [text of each line])}, checked for form."""
        self.sock.settimeout(timeout)
        lines, code = [], None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    self.fail("no reply within %s s (have %r)" % (timeout, self.buf))
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    if self.buf or lines:
                        self.fail("connection closed inside a reply: %r %r" % (lines, self.buf))
                    raise Closed()
                self.buf += chunk
                if time.monotonic() > deadline:
                    self.fail("reply took longer than %s s" % timeout)
            raw, _, self.buf = self.buf.partition(b"\n")
            self.transcript.append("<< %r" % (raw,))
            if not raw.endswith(b"\r") or b"\r" in raw[:-1]:
                self.fail("reply line not ended by CRLF alone: %r" % (raw,))
            m = _LINE.match(raw[:-1])
            if m is None and re.match(rb"^[2-5][0-9][0-9]$", raw[:-1]):
                m = _LINE.match(raw[:-1] + b" ")
            if m is None:
                self.fail("malformed reply line %r" % (raw,))
            if len(raw) + 1 > 512:
                self.fail("reply line over 512 octets")
            if code is not None and m.group(1) != code:
                self.fail("reply code changes inside a reply: %r" % (raw,))
            code = m.group(1)
            text = m.group(3).decode("latin-1")
            if not text.isprintable() or not text.isascii():
                self.fail("unprintable reply text %r" % (text,))
            if "Traceback" in text or "Unhandled" in text or "Error at" in text:
                self.fail("a traceback in a reply")
            lines.append(text)
            if m.group(2) == b" ":
                self.outcome.replies += 1
                return int(code), lines

    def checkEnhanced(self, code, lines, verb):
        """RFC 2034 as protocol.md section 5 has it."""
        exempt = verb in ("EHLO", "HELO", "GREETING") or (verb == "XCLIENT" and code == 220)
        if code // 100 == 3:
            if any(_ENHANCED.match(t) for t in lines):
                self.fail("a 3xx with an enhanced code")
            return
        if exempt:
            return
        for t in lines:
            m = _ENHANCED.match(t)
            if m is None:
                self.fail("%d reply to %s without an enhanced code: %r" % (code, verb, t))
            if int(m.group(1)) != code // 100:
                self.fail("enhanced class %s differs from the code %d" % (m.group(1), code))

    # -- one session ----------------------------------------------------

    def run(self, steps):
        rng = self.rng
        code, lines = self.reply()
        if code != 220:
            self.fail("greeting %d" % code)
        self.checkEnhanced(code, lines, "GREETING")
        try:
            for _ in range(steps):
                r = rng.random()
                if r < 0.02:
                    self.drop(rng.choice([b"MAIL FROM:<a@exa", b"EHLO", b"RCPT TO:<b@example.net>\r\nDA"]))
                    return
                if r < 0.30 and not self.authMode:
                    if not self.burst():
                        return
                elif r < 0.45 and not self.authMode:
                    if not self.transaction():
                        return
                else:
                    if not self.one():
                        return
            if rng.random() < 0.7:
                self.send(b"QUIT\r\n")
                self.expect(["QUIT"])
        except Closed:
            pass
        finally:
            self.sock.close()

    def drop(self, partial):
        self.send(partial)
        self.sock.close()

    def lineOf(self, text):
        data = text.encode("latin-1", "replace") if not isinstance(text, bytes) else text
        end = b"\r\n"
        if self.rng.random() < 0.05:
            end = b"\n"
        return data + end

    def one(self):
        if self.authMode:
            text = self.rng.choice(["*", "AGFsaWNlAHMzY3JldA==", "YWxpY2U=", "czNjcmV0", "!!", "", "x" * 3000])
            verb = "AUTH-RESPONSE"
        else:
            text, verb = command(self.rng)
        self.send(self.lineOf(text))
        return self.expect([(verb, text)])

    def burst(self):
        """A pipelined group, DATA (if any) last; returns whether the session goes on."""
        cmds = [command(self.rng) for _ in range(self.rng.randrange(2, 8))]
        cmds = [(v, t) for t, v in cmds if v not in ("DATA", "STARTTLS", "BDAT")]
        last = self.rng.random()
        if last < 0.3:
            cmds.append(("DATA", "DATA"))
        elif last < 0.4 and self.tls:
            cmds.append(("STARTTLS", "STARTTLS"))
        if not cmds:
            return True
        self.send(b"".join(self.lineOf(t) for _, t in cmds))
        return self.expect(cmds)

    def expect(self, cmds):
        """Read the replies to C{cmds} (C{(verb, text)} or a verb) in order, updating the model."""
        replies = []
        for item in cmds:
            verb, text = item if isinstance(item, tuple) else (item, item)
            pieces = self.piecesOf(text)
            for i, piece in enumerate(pieces):
                if self.closed:
                    return False
                v = verb if i == 0 else "?"
                if self.authMode and v != "AUTH-RESPONSE":
                    v = "AUTH-RESPONSE"
                try:
                    code, lines = self.reply(AUTH_TIMEOUT if v in ("AUTH", "AUTH-RESPONSE") else REPLY_TIMEOUT)
                except Closed:
                    self.fail("closed without a reply to %r" % (piece,))
                replies.append(code)
                self.checkEnhanced(code, lines, v if len(pieces) == 1 else "?")
                self.judge(v, piece, code, lines)
                if code in (221, 421) or (code == 554 and lines[0].startswith("5.5.0")):
                    self.closed = True
                    self.expectClose()
                    return False
                if code == 354:
                    return self.content()
                if verb == "STARTTLS" and code == 220:
                    return self.handshake()
        return True

    def handshake(self):
        """STARTTLS said 220: whatever was pipelined behind it is never answered."""
        from tests.tlsmaterial import clientContext

        if self.buf:
            self.fail("a reply after 220 to STARTTLS, in plaintext: %r" % (self.buf,))
        self.sock = clientContext().wrap_socket(self.sock, server_hostname="relay.test")
        self.tlsActive = True
        self.mail, self.rcpts, self.authMode = False, [], False
        self.sock.settimeout(REPLY_TIMEOUT)
        return True

    def piecesOf(self, text):
        """The lines the gateway sees for C{text}: a bare LF ends a line (normalize mode)."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        return text.split("\n")

    def expectClose(self):
        self.sock.settimeout(REPLY_TIMEOUT)
        try:
            extra = self.sock.recv(4096)
        except socket.timeout:
            self.fail("not closed after a closing reply")
        except OSError:
            return
        if extra or self.buf:
            self.fail("data after a closing reply: %r" % (extra,))

    def judge(self, verb, text, code, lines):
        """The model: what each reply means, and what it may never be."""
        if code == 451 or any("internal" in t.lower() for t in lines):
            self.fail("a local error for %r: %d %r" % (text, code, lines))
        if verb in _TRUSTED_VERBS and not self.trusted and code < 400:
            self.fail("untrusted %s succeeded: %d" % (verb, code))
        if verb == "AUTH-RESPONSE" or (verb == "AUTH" and code == 334):
            self.authMode = code == 334
            return
        if code == 354 and not (self.mail and self.rcpts):
            self.fail("354 without an accepted recipient")
        if verb == "DATA" and text == "DATA" and self.mail and self.rcpts and code not in (354, 421):
            self.fail("DATA refused (%d) with recipients %r" % (code, self.rcpts))
        if verb == "MAIL" and code == 250:
            if self.mail:
                self.fail("a second MAIL accepted")
            self.mail, self.rcpts = True, []
        elif verb == "RCPT" and code == 250:
            if not self.mail:
                self.fail("RCPT accepted without MAIL")
            addr = rcptAddress(text)
            if addr is None:
                self.fail("RCPT %r accepted, but it is no address" % (text,))
            if addr not in self.rcpts:
                self.rcpts.append(addr)
        elif verb in ("RSET", "EHLO", "HELO") and code == 250:
            self.mail, self.rcpts = False, []
        elif verb == "XCLIENT" and code == 220:
            self.mail, self.rcpts = False, []
        if code == 250 and verb == "EHLO":
            words = [t.split(" ")[0].upper() for t in lines[1:]]
            if not self.trusted and set(words) & set(_TRUSTED_VERBS):
                self.fail("EHLO offers trusted verbs to an untrusted peer")
            if self.trusted and "XCLIENT" not in words:
                self.fail("EHLO offers no XCLIENT to a trusted peer")
            if ("STARTTLS" in words) != (self.tls and not self.tlsActive):
                self.fail("STARTTLS offered wrongly")
            for k in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"):
                if k not in words:
                    self.fail("EHLO without %s" % k)
        plainStartTLS = text.strip(" ").upper() == "STARTTLS"
        if verb == "STARTTLS" and code == 220 and (self.tlsActive or not self.tls or not plainStartTLS):
            self.fail("STARTTLS accepted wrongly")
        if code == 250 and verb == "XDUMPCONTEXT" and not lines[-1].endswith("XDUMPCONTEXT complete"):
            self.fail("XDUMPCONTEXT without its end line")

    def content(self):
        """After a 354: send content, end it (or drop the connection); returns whether the session goes on."""
        rng = self.rng
        marker = "%s-%d" % (self.label, self.outcome.next())
        body = b"X-Fuzz: " + marker.encode() + b"\r\n" + content(rng, bareLF=rng.random() < 0.2)
        wire = stuffed(body)
        stored = model(wire)[0]
        rcpts = list(self.rcpts)
        self.mail, self.rcpts = False, []
        if rng.random() < 0.04:  # (dropped inside DATA: nothing may be delivered)
            self.send(wire[:rng.randrange(len(wire) - 3)])
            self.sock.close()
            self.outcome.never.add(marker)
            return False
        if rng.random() < 0.03:  # (dropped right after the end of data: either way, once)
            self.send(wire)
            self.sock.close()
            self.outcome.maybe[marker] = (rcpts, stored)
            return False
        self.send(wire)
        code, lines = self.reply(REPLY_TIMEOUT * 2)
        self.checkEnhanced(code, lines, "END-OF-DATA")
        self.judge("END-OF-DATA", "", code, lines)
        if code == 250:
            self.outcome.expected[marker] = (rcpts, stored)
            if not self.trusted:
                self.outcome.untrusted.add(marker)
        else:
            self.outcome.never.add(marker)
        if code == 421:
            self.expectClose()
            return False
        return True

    def transaction(self):
        """A plausible whole transaction, one command at a time."""
        rng = self.rng
        steps = [("MAIL", "MAIL FROM:<s@example.org>" + rng.choice(["", " BODY=8BITMIME", " SIZE=100"]))]
        for _ in range(rng.randrange(1, 4)):
            path, _ = address(rng)
            steps.append(("RCPT", "RCPT TO:" + path))
        steps.append(("DATA", "DATA"))
        for verb, text in steps:
            self.send(text.encode("latin-1", "replace") + b"\r\n")
            if not self.expect([(verb, text)]):
                return False
            if verb == "MAIL" and not self.mail:
                return True
        return True


def rcptAddress(text):
    """The address the gateway keeps for a RCPT line (source route dropped)."""
    m = re.match(r"(?i)^rcpt[ \t]+to: ?(.*)$", text, re.S)
    if not m:
        return None
    rest = m.group(1).lstrip(" ")
    if rest.startswith("<"):
        path = rest[1:rest.index(">")] if ">" in rest else rest[1:]
    else:
        path = rest.split(" ")[0]
    return re.sub(r"^@[^:,]+(?:,@[^:,]+)*:", "", path)


class Outcome:
    """What the sessions expect of the next hop, and counts."""

    def __init__(self):
        self.expected = {}
        self.maybe = {}
        self.never = set()
        self.untrusted = set()
        self.sessions = self.commands = self.replies = self.reports = 0
        self._n = 0

    def next(self):
        self._n += 1
        return self._n

    def check(self, transactions):
        """Compare the next hop's transactions with what was accepted: a list of problems."""
        got = {}
        problems = []
        for t in transactions:
            if t["mailfrom"] == "" and t["data"].startswith(b"From: Mail Delivery System <MAILER-DAEMON@"):
                # The gateway's own success notice (a NOTIFY=SUCCESS recipient,
                # the next hop offering no DSN): no message a session sent.
                self.reports += 1
                continue
            data = withoutReceived(t["data"])
            m = re.match(rb"^\r?\n?X-Fuzz: (\S+)\r\n", data)
            if m is None:
                problems.append("a message without a marker: %r" % (data[:200],))
                continue
            marker = m.group(1).decode()
            if marker in self.untrusted and b"[127.0.0.1]" not in t["data"].split(b"\r\n", 1)[0]:
                problems.append("%s: an untrusted peer changed the Received header: %r" % (marker, t["data"][:200]))
            got.setdefault(marker, []).append((t["rcpts"], data, t["data"]))
        for marker, (rcpts, stored) in list(self.expected.items()) + list(self.maybe.items()):
            deliveries = got.pop(marker, [])
            if not deliveries and marker in self.maybe:
                continue
            if not deliveries:
                problems.append("%s accepted but never delivered" % marker)
                continue
            seen = [r for d in deliveries for r in d[0]]
            if sorted(seen) != sorted(rcpts):
                problems.append("%s: recipients %r, expected %r" % (marker, seen, rcpts))
            expect = b"\r\n" + stored if stored[:1] in (b" ", b"\t") else stored
            for _, data, _ in deliveries:
                if data != expect:
                    problems.append("%s: content differs: %r vs %r" % (marker, data[:300], expect[:300]))
        for marker in got:
            problems.append("%s delivered but %s" % (marker, "refused" if marker in self.never else "unknown"))
        return problems


def runSessions(ports, seed, sessions, seconds, outcome=None, steps=(1, 25)):
    """
    Run up to C{sessions} sessions (or C{seconds}) of seed C{seed},
    alternating the listeners of C{ports} (C{[(port, trusted)]}).
    """
    rng = random.Random(seed)
    outcome = outcome or Outcome()
    stop = time.monotonic() + seconds
    for n in range(sessions):
        if time.monotonic() > stop:
            break
        port, trusted, tls = ports[n % len(ports)]
        s = Session(port, random.Random(rng.getrandbits(64)), trusted, outcome, "s%d.%d" % (seed, n), tls)
        s.run(rng.randrange(*steps))
        outcome.sessions += 1
    return outcome


def startGateway(directory, reactor=None):
    """
    A gateway on two loopback listeners, one trusting the peer for the
    X-verbs and one not, relaying to a scripted next hop; returns
    C{(Deferred of the gateway, next hop factory, [(port, trusted)])} once
    the Deferred fires.
    """
    import os

    from twisted.internet import defer

    from relaygw.testing import Gateway, ScriptedSMTPFactory
    from tests.fuzzing import material

    if reactor is None:
        from twisted.internet import reactor
    users, cert, key = material(directory)
    hop = ScriptedSMTPFactory(extensions=["PIPELINING", "8BITMIME", "SIZE 100000000"])
    hopPort = reactor.listenTCP(0, hop, interface="127.0.0.1")
    common = {"relay_networks": ["127.0.0.0/8"], "extensions": ["xclient", "xremoteip", "xsetcontext",
                                                                "xdumpcontext"],
              "credentials": users, "auth_plaintext": True, "max_message_size": 200000, "max_recipients": 5}
    gw = Gateway(os.path.join(directory, "gw"), reactor=reactor,
                 listeners=(dict(common, trusted_peers=["127.0.0.0/8"]), dict(common, trusted_peers=["10.9.9.0/24"]),
                            dict(common, trusted_peers=["127.0.0.0/8"], tls_certificate=cert, tls_key=key),
                            dict(common, trusted_peers=[], always_allow=True),
                            dict(common, trusted_peers=["127.0.0.0/8"], tls_certificate=cert, tls_key=key,
                                 require_tls=True)),
                 relay={"smarthosts": ["[127.0.0.1]:%d" % hopPort.getHost().port], "retry_min": 0.3,
                        "retry_max": 0.6})

    @defer.inlineCallbacks
    def start():
        yield gw.start()
        return gw, hop, hopPort, [(gw.ports[0], True, False), (gw.ports[1], False, False), (gw.ports[2], True, True),
                                  (gw.ports[3], False, False), (gw.ports[4], True, True)]

    return start()


def spoolEmpty(gw):
    """No message queued or in flight."""
    spool = gw.service.spool
    return not spool.queueIds() and not gw.service.queue.active


def main(argv):
    import argparse
    import os
    import tempfile

    from twisted.internet import reactor, task, threads
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.fuzzing import runMain

    parser = argparse.ArgumentParser()
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=180)
    args = parser.parse_args(argv)
    bad = []

    def observe(event):
        fmt = event.get("log_format") or ""
        if "log_failure" in event or "Unhandled" in fmt or "Traceback" in fmt or "internal error" in fmt:
            bad.append(event)

    globalLogPublisher.addObserver(observe)

    def work(started):
        gw, hop, hopPort, ports = started
        outcome = Outcome()
        violations = []

        def run():
            for seed in args.seeds:
                before = outcome.sessions
                t0 = time.monotonic()
                try:
                    runSessions(ports, seed, args.sessions, args.seconds, outcome)
                except Violation as e:
                    print("VIOLATION seed %d: %s" % (seed, e), flush=True)
                    violations.append(e)
                print("seed %d: %d sessions in %.0f s" % (seed, outcome.sessions - before,
                                                          time.monotonic() - t0), flush=True)
            return outcome

        def settle(outcome, waited=0):
            if not spoolEmpty(gw) and waited < 60:
                return task.deferLater(reactor, 0.5, settle, outcome, waited + 0.5)
            problems = outcome.check(hop.transactions)
            root = os.path.dirname(gw.service.spool.path("state"))
            for dirpath, dirnames, filenames in os.walk(root):
                if filenames:
                    print("SPOOL", dirpath, len(filenames), filenames[:3])
            for p in problems[:30]:
                print("PROBLEM", p)
            for e in bad[:10]:
                print("LOG", formatEvent(e), e.get("log_failure"))
            print("sessions %d commands %d replies %d accepted %d maybe %d refused %d delivered %d "
                  "(notices %d) problems %d bad-log %d" % (
                      outcome.sessions, outcome.commands, outcome.replies, len(outcome.expected),
                      len(outcome.maybe), len(outcome.never), len(hop.transactions), outcome.reports,
                      len(problems), len(bad)))
            return gw.stop().addCallback(lambda _: 1 if problems or bad or violations else 0)

        return threads.deferToThread(run).addCallback(settle)

    runMain(lambda: startGateway(tempfile.mkdtemp(prefix="sessionfuzz-")), work)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
