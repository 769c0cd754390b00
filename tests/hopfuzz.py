"""
A seeded fuzzer of the delivery client (L{relaygw.relay.client.deliver})
against a next hop that misbehaves at random over loopback sockets: each
reply may be positive, a 4xx or 5xx, a 421 (the connection closed after it,
or not), a close or silence instead, a malformed or unasked-for line, a
multi-line reply, a reply cut into pieces sent apart, an enhanced code that
is missing or malformed, a refusal (or a 250) during the body; its EHLO
offers a random set of extensions (PIPELINING, SIZE, 8BITMIME, DSN,
STARTTLS, AUTH, XCLIENT, XFORWARD ...), and a TLS handshake may be reset.
The client runs with tls = none or may, with or without credentials and
identity forwarding.

The next hop records what it did, and the client's results are checked
against it (L{Case.check}): a recipient is reported delivered only if the
next hop took it in a transaction whose end of data it answered 2xx, with
the content whole; a permanent failure only after a 5xx from the next hop
(or a message over its SIZE); every result is an SMTP outcome; the client
never sends a command while a reply is due without PIPELINING, never sends
the content before the 354, never goes on after a 421, never uses an
extension the next hop did not offer, never sends its password in
plaintext under tls = may nor MAIL without the AUTH it was given, says
EHLO first after STARTTLS and XCLIENT; every delivery ends, and nothing is
logged as a failure.

Run from the command line for long runs:

    python -m tests.hopfuzz SEED [SEED...] --cases N
"""

import os
import random
import re
import time
from functools import partial

from twisted.internet import defer, protocol, reactor, task

from relaygw.relay.client import DeliveryOptions, OutboundMessage, deliver
from tests.fuzzing import LoggedFailures, casesMain, runCases
from tests.messages import mimeFields, mimeLeaves

#: Seconds the client waits for a reply (twice that for an end of data).
TIMEOUT = 1.0

_EXTENSIONS = ["PIPELINING", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "SIZE", "STARTTLS",
               "AUTH PLAIN LOGIN", "XCLIENT NAME ADDR PORT PROTO HELO LOGIN", "XFORWARD NAME ADDR PROTO HELO"]

#: What a reply may be (with their weights).
_ACTIONS = [("ok", 88), ("temp", 3), ("perm", 3), ("421", 1), ("421open", 1), ("close", 1), ("garbage", 1),
            ("extra", 1), ("silent", 0.3)]

_POSITIVE = {"greeting": "220 hop.test ESMTP", "HELO": "250 hop.test", "MAIL": "250 2.1.0 Ok",
             "RCPT": "250 2.1.5 Ok", "DATA": "354 End data with <CR><LF>.<CR><LF>", "end": "250 2.0.0 Ok: queued",
             "RSET": "250 2.0.0 Ok", "NOOP": "250 2.0.0 Ok", "QUIT": "221 2.0.0 Bye",
             "STARTTLS": "220 2.0.0 Ready to start TLS", "AUTH": "235 2.7.0 Authentication successful",
             "XCLIENT": "220 hop.test ESMTP", "XFORWARD": "250 2.0.0 Ok"}
_TEMPORARY = {"greeting": "421 4.3.2 not now", "DATA": "451 4.3.0 not now", "end": "451 4.3.0 try later",
              "RCPT": "450 4.2.0 mailbox busy", "MAIL": "452 4.3.1 insufficient storage"}
_PERMANENT = {"greeting": "554 5.3.2 no service", "DATA": "554 5.5.1 no valid recipients",
              "end": "552 5.3.4 message too big", "RCPT": "550 5.1.1 no such user", "MAIL": "553 5.7.1 sender refused"}
#: Lines that are no reply (a 2xx reply, however odd, is a success: RFC 5321 section 4.2.1).
_GARBAGE = ["hello", "2500 x", "25", "abc 250 ok", "\x00\x01\x02", "999 9.9.9 what", "250-", "1xx ok", "250\tok"]


class Transaction:
    """What the next hop saw of one message, and what it answered."""

    def __init__(self, mailfrom, params):
        self.mailfrom = mailfrom
        self.params = params
        self.rcpts = []  # those answered 2xx
        self.dataCode = None
        self.body = []
        self.endCode = None
        self.endWritten = False
        self.early = False  # (answered 250 before the end of the content)
        self.sevenBit = False  # (8BITMIME not offered: 8-bit content must come converted)


class Connection:
    """One connection's record: the extensions offered, transactions, 5xx replies sent, violations."""

    def __init__(self):
        self.offered = set()
        self.sizes = []  # (every SIZE limit its EHLOs offered)
        self.tls = False
        #: The senders of the transactions under way or begun once the next
        #: hop had sent a line no command asked for (or an incomplete one):
        #: the client can take any reply after it for another command's.
        self.misled = set()
        self.transactions = []
        self.permanent = []  # (mailfrom of the transaction then, or None)
        self.violations = []


class FuzzHop(protocol.Protocol):
    """A next hop whose every reply is chosen at random (see the module docstring)."""

    def connectionMade(self):
        f = self.factory
        self.rng = random.Random(f.rng.random())
        self.record = Connection()
        f.connections.append(self.record)
        self.buffer = b""
        self.owed = False  # a reply is due (or being sent)
        self.mode = "command"
        self.txn = None
        self.after421 = False
        self.gone = False
        self.calls = []
        self.nextMode = "command"
        self.misled = False
        self.authStep = 0
        self.authed = False
        self.xclient = False
        self.needHello = None  # (after STARTTLS or XCLIENT: the command that asks for a new EHLO)
        self.xclientHelo = None  # (the HELO= of the last XCLIENT line)
        f.protocols.append(self)
        self.reply("greeting")

    # -- input ------------------------------------------------------------

    def dataReceived(self, data):
        if self.after421 and not self.misled:  # (misled, the client may not have read that far yet)
            self.record.violations.append("sent %r after a 421" % (data[:60],))
            self.after421 = False  # (said once)
        if self.gone:
            return
        if self.misled:
            pass  # (an unasked-for line was sent: the client counts its replies one off, rightly)
        elif self.owed and self.mode == "command" and "PIPELINING" not in self.record.offered:
            self.record.violations.append("sent %r while a reply was due, without PIPELINING" % (data[:60],))
        elif self.owed and self.mode == "awaiting354":
            self.record.violations.append("sent %r before the reply to DATA" % (data[:60],))
        self.buffer += data
        self.process()

    def process(self):
        while not self.owed and not self.gone:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            if self.mode == "data":
                self.bodyLine(line)
            else:
                self.command(line)

    def bodyLine(self, line):
        txn = self.txn
        if line == b".":
            self.mode = "command"
            self.reply("end")
            return
        if not txn.body and self.rng.random() < 0.03:
            # An answer before the end of the content, and a close (or a 250: a protocol error).
            text = self.rng.choice(["552 5.3.4 message too big", "451 4.3.0 try later", "250 2.0.0 queued early"])
            if text[0] == "5":
                self.record.permanent.append(txn.mailfrom)
            elif text[0] == "2":
                # A client that has sent the whole content by now can't tell
                # this from the answer to its end of data: the next hop took it.
                txn.endCode, txn.endWritten, txn.early = 250, True, True
                self.record.transactions.append(txn)
            self.write(text + "\r\n")
            self.close()
            return
        txn.body.append(line[1:] if line.startswith(b".") else line)

    def command(self, raw):
        if len(raw) > 998 or b"\n" in raw or b"\r" in raw:
            self.record.violations.append("bad command line %r" % (raw[:80],))
        text = raw.decode("utf-8", "replace")
        verb = text.split(" ", 1)[0].upper()
        if self.authStep:
            return self.authLine()
        if self.needHello and verb not in ("EHLO", "HELO", "QUIT"):
            self.record.violations.append("%s before EHLO after %s" % (verb, self.needHello))
        if verb in ("EHLO", "HELO"):
            if self.xclientHelo == "[UNAVAILABLE]" and self.xclient:
                self.record.violations.append("%s for a client that gave no greeting" % (verb,))
            self.txn = None
            self.needHello = None
            return self.reply("EHLO" if verb == "EHLO" else "HELO")
        if verb in ("STARTTLS", "AUTH", "XCLIENT", "XFORWARD"):
            return self.negotiation(verb, text)
        if verb == "MAIL":
            f = self.factory
            if f.options.auth and "AUTH" in self.record.offered and not self.authed and not self.xclient:
                self.record.violations.append("MAIL without the AUTH configured")
            params = text.split(">", 1)[1].split() if ">" in text else []
            self.checkParams(params, {"SIZE": "SIZE", "BODY": "8BITMIME", "RET": "DSN", "ENVID": "DSN",
                                      "SMTPUTF8": "SMTPUTF8"})
            limit = self.record.sizes[-1] if "SIZE" in self.record.offered else 0
            for p in params:
                if p.upper().startswith("SIZE=") and limit and int(p[5:]) > limit:
                    self.record.violations.append("a message of %s octets over the SIZE %d offered" % (p[5:], limit))
            mailfrom = text.split("<", 1)[1].split(">", 1)[0] if "<" in text else ""
            self.txn = Transaction(mailfrom, params)
            self.txn.sevenBit = "8BITMIME" not in self.record.offered
            if self.misled:
                self.record.misled.add(mailfrom)
            return self.reply("MAIL")
        if verb == "RCPT":
            params = text.split(">", 1)[1].split() if ">" in text else []
            self.checkParams(params, {"NOTIFY": "DSN", "ORCPT": "DSN"})
            rcpt = text.split("<", 1)[1].split(">", 1)[0] if "<" in text else ""
            if self.txn is None:  # (MAIL refused, its RCPTs pipelined behind it)
                return self.send("503 5.5.1 need MAIL")
            return self.reply("RCPT", rcpt)
        if verb == "DATA":
            if self.txn is None or not self.txn.rcpts:
                return self.send("503 5.5.1 no valid recipients")
            self.mode = "awaiting354"
            return self.reply("DATA")
        if verb in ("RSET", "NOOP", "QUIT"):
            if verb == "RSET":
                self.txn = None
            return self.reply(verb)
        self.record.violations.append("unexpected command %r" % (text[:80],))
        self.send("502 5.5.2 command not recognized")

    def negotiation(self, verb, text):
        """STARTTLS, AUTH, XCLIENT and XFORWARD: only when offered, and AUTH never in plaintext with tls = may."""
        f = self.factory
        if verb not in {e.split()[0] for e in self.record.offered}:
            self.record.violations.append("%s without it offered" % (verb,))
        if verb == "XCLIENT":
            self.xclientHelo = next((w[5:] for w in text.split()[1:] if w.upper().startswith("HELO=")),
                                    self.xclientHelo)
        if verb == "STARTTLS" and self.record.tls:
            self.record.violations.append("STARTTLS again under TLS")
        if verb == "AUTH" and not self.record.tls and f.options.tls != "none":
            self.record.violations.append("AUTH in plaintext with tls = %s" % (f.options.tls,))
        if verb == "AUTH":
            words = text.split()
            if len(words) == 2 and words[1].upper() in ("PLAIN", "LOGIN"):
                self.authStep = 1
                return self.send("334 " + ("VXNlcm5hbWU6" if words[1].upper() == "LOGIN" else ""))
        return self.reply(verb)

    def authLine(self):
        """The next line of an AUTH exchange: a prompt for LOGIN's password, or the outcome."""
        if self.authStep == 1 and self.rng.random() < 0.5:
            self.authStep = 2
            return self.send("334 UGFzc3dvcmQ6")
        self.authStep = 0
        return self.reply("AUTH")

    def checkParams(self, params, needs):
        for p in params:
            name = p.split("=", 1)[0].upper()
            need = needs.get(name)
            if need is None or need not in self.record.offered:
                self.record.violations.append("parameter %s without %s offered" % (p, need or "an extension"))

    # -- output -----------------------------------------------------------

    def reply(self, phase, rcpt=None):
        """Answer C{phase} as chosen at random; positive replies move the transaction on."""
        rng = self.rng
        action = rng.choices([a for a, _ in _ACTIONS], [w for _, w in _ACTIONS])[0] if phase != "QUIT" else "ok"
        if action == "silent" and phase in ("EHLO", "HELO"):
            action = "ok"
        self.nextMode = "command"
        if action == "ok" or action == "extra":
            text = self.positive(phase)
            if phase == "RCPT":
                self.txn.rcpts.append(rcpt)
            elif phase == "DATA":
                self.txn.dataCode = 354
                self.nextMode = "data"
            elif phase == "end":
                self.txn.endCode = 250
                self.record.transactions.append(self.txn)
            elif phase == "STARTTLS":
                self.send(text)
                self.startTLS()
                return
            elif phase == "XCLIENT":
                if self.xclientHelo == "[UNAVAILABLE]":
                    # A client that gave no greeting is greeted for by nobody; the
                    # reset forgot the EHLO, so nothing it offered may be used.
                    self.record.offered = set()
                else:
                    self.needHello = "XCLIENT"
                self.xclient = True  # (the client's AUTH belongs to the greeting before it)
            elif phase == "AUTH":
                self.authed = True
            if action == "extra":  # (pipelined, it is the answer to the next command: the client can't tell)
                self.mislead()
                extra = rng.choice(["250 2.0.0 and another", "550 5.0.0 surprise", "221 bye"])
                if extra[0] == "5":  # (whichever command it is read as answering)
                    self.record.permanent.append(None)
                return self.send(text, transaction=self.txn if phase == "end" else None, extra=extra)
            self.send(text, transaction=self.txn if phase == "end" else None)
            if phase == "QUIT":
                self.close()
            return
        if action in ("temp", "perm"):
            table = _TEMPORARY if action == "temp" else _PERMANENT
            text = table.get(phase, ("451 4.3.0 not now" if action == "temp" else "500 5.5.2 refused"))
            if phase == "RCPT" and action == "temp" and self.txn and self.txn.rcpts and rng.random() < 0.5:
                text = "452 4.5.3 Error: too many recipients"  # (the rest go in another transaction)
            if phase == "EHLO" or phase == "HELO":
                text = "%s %s" % ("421 4.3.2" if action == "temp" else "502 5.5.1", "not here")
            if action == "perm":
                self.record.permanent.append(self.txn.mailfrom if self.txn else None)
            if phase == "end":
                self.txn.endCode = int(text[:3])
            if phase in ("MAIL", "end"):
                self.txn = None  # (no transaction: RCPT and DATA get 503)
            if text.startswith("421"):
                return self.fourTwentyOne(phase, close=True)
            return self.send(self.variant(text))
        if action in ("421", "421open"):
            return self.fourTwentyOne(phase, close=action == "421")
        if action == "close":
            return self.close()
        if action == "garbage":
            self.mislead()
            if phase == "MAIL":
                self.txn = None
            return self.send(rng.choice(_GARBAGE))
        # silent: the client's timer must end it
        self.owed = True

    def mislead(self):
        """A line no command asked for is going out: see L{Connection.misled}."""
        self.misled = True
        self.record.misled.add(self.txn.mailfrom if self.txn else None)

    def startTLS(self):
        """After the 220: the handshake, or (now and then) a reset instead of one."""
        if self.rng.random() < 0.15:
            self.transport.abortConnection()
            self.gone = True
            return
        self.transport.startTLS(self.factory.tls)
        self.authed = False  # (a new session: RFC 3207 section 4.2)
        self.record = Connection()
        self.record.tls = True
        self.factory.connections.append(self.record)
        self.needHello = "STARTTLS"

    def positive(self, phase):
        if phase == "EHLO":
            offered = [e for e in _EXTENSIONS if self.rng.random() < 0.5 and not (e == "STARTTLS" and self.record.tls)]
            self.record.offered = {e.split()[0] for e in offered} | set(offered)
            lines = ["hop.test"]
            for e in offered:
                if e == "SIZE":
                    size = self.rng.choice([0, 100, 2000, 10 ** 6])
                    self.record.sizes.append(size)
                    lines.append("SIZE %d" % size if size else "SIZE")
                else:
                    lines.append(e)
            return "\r\n".join(("250-" if i < len(lines) - 1 else "250 ") + line for i, line in enumerate(lines))
        if phase == "HELO":
            self.record.offered = set()
            return _POSITIVE["HELO"]
        return self.variant(_POSITIVE[phase])

    def variant(self, text):
        """The same reply, sometimes multi-line, without its enhanced code, or with a malformed one."""
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return "%s-first line\r\n%s" % (text[:3], text)
        if r < 0.15:
            return re.sub(r"^(\d\d\d) \d\.\d+\.\d+ ", r"\1 ", text)
        if r < 0.2:
            return re.sub(r"^(\d\d\d) (\d)\.\d+\.\d+ ", r"\1 \2.01.999 ", text)
        if r < 0.23:
            return text[:3]  # (the code alone)
        return text

    def fourTwentyOne(self, phase, close):
        if phase == "end":
            self.txn.endCode = 421
        self.send("421 4.4.2 hop.test closing")
        self.after421 = not close
        if close:
            self.close()
        else:
            self.gone = True  # (what comes after it is a violation: L{dataReceived})

    def send(self, text, transaction=None, extra=None):
        """
        Write C{text} and its CRLF, at once or in pieces a few ms apart; the
        next command waits for it.  C{extra}: a line no command asked for,
        right behind it.
        """
        data = (text + "\r\n").encode("utf-8", "replace")
        self.owed = True
        if self.rng.random() < 0.15 and len(data) > 2:
            cut = self.rng.randrange(1, len(data))
            self.write(data[:cut])
            self.later(self.rng.uniform(0.001, 0.02), self.sent, data[cut:], transaction, extra)
        else:
            self.sent(data, transaction, extra)

    def sent(self, data, transaction, extra=None):
        self.write(data + (b"" if extra is None else extra.encode() + b"\r\n"))
        if transaction is not None:
            transaction.endWritten = not self.gone
        self.owed = False
        if self.mode == "awaiting354":
            self.mode = self.nextMode
        self.process()

    def later(self, seconds, f, *args):
        self.calls.append(reactor.callLater(seconds, f, *args))

    def write(self, data):
        if not self.gone and self.transport is not None:
            self.transport.write(data if isinstance(data, bytes) else data.encode())

    def close(self):
        self.gone = True
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.gone = True
        for call in self.calls:
            if call.active():
                call.cancel()


class FuzzHopFactory(protocol.ServerFactory):
    protocol = FuzzHop

    def __init__(self, rng, tls, options):
        self.rng = rng
        self.tls = tls
        self.options = options
        self.connections = []
        self.protocols = []


def _content(rng, i):
    lines = [b"From: s%d@fuzz.test" % i, b"Subject: case %d" % i]
    if rng.random() < 0.1:  # (header fields alone, one of them 8-bit)
        return b"".join(line + b"\r\n" for line in lines + [b"X-Note: caf\xc3\xa9"])
    lines.append(b"")
    for _ in range(rng.randrange(1, 30)):
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(b"." * rng.randrange(1, 3) + b"dot")
        elif kind == 1:
            lines.append(bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 20))))
        elif kind == 2:
            lines.append(b"x" * rng.choice([0, 1, 500, 998]))
        else:
            lines.append(b"line %d" % rng.randrange(10 ** 6))
    return b"".join(line + b"\r\n" for line in lines)


class Figures:
    def __init__(self):
        self.cases = self.messages = self.recipients = self.delivered = 0
        self.deferred = self.bounced = self.unclaimed = 0
        self.problems = []

    def __str__(self):
        return ("%d cases, %d messages, %d recipients: %d delivered, %d deferred, %d bounced; "
                "%d answered 250 at the end of data but not taken as delivered; %d problems"
                % (self.cases, self.messages, self.recipients, self.delivered, self.deferred, self.bounced,
                   self.unclaimed, len(self.problems)))


class Case:
    """One connection's worth of messages to one fuzzing next hop, and the checks of their results."""

    def __init__(self, directory, rng, figures, label):
        self.directory = directory
        self.rng = rng
        self.figures = figures
        self.label = label

    @defer.inlineCallbacks
    def run(self):
        rng = self.rng
        os.makedirs(self.directory, exist_ok=True)
        options = DeliveryOptions(heloName="relay.fuzz.test", tls=rng.choice(["none", "may"]), timeout=TIMEOUT,
                                  auth=("relay", "s3cret") if rng.random() < 0.3 else None,
                                  forwardIdentity=rng.random() < 0.3)
        factory = FuzzHopFactory(random.Random(rng.random()), serverTLS(self.directory), options)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        failures = LoggedFailures().start()
        try:
            messages, contents = [], []
            for i in range(rng.randrange(1, 5)):
                content = _content(rng, i)
                path = os.path.join(self.directory, "m%d" % i)
                with open(path, "wb") as f:
                    f.write(content)
                rcpts = ["r%d-%d@dest.test" % (i, j) for j in range(rng.randrange(1, 4))]
                dsn = {r: {"NOTIFY": "SUCCESS,FAILURE"} for r in rcpts} if rng.random() < 0.3 else None
                messages.append(OutboundMessage(mailfrom="s%d@fuzz.test" % i, recipients=rcpts, bodyPath=path,
                                                rcptParams=dsn, mailParams={"RET": "HDRS"} if dsn else None,
                                                context={"remote_ip": "192.0.2.%d" % (i + 1),
                                                         "remote_name": "c%d.example" % i, "protocol": "ESMTP",
                                                         "ehlo_domain": "h%d.example" % i if rng.random() < 0.8
                                                         else None}))
                contents.append(content)
            started = time.monotonic()
            results = yield deliver(reactor, "127.0.0.1", port.getHost().port, messages, options)
            took = time.monotonic() - started
        finally:
            failures.stop()
            yield port.stopListening()
        # (the next hop's last writes and closes)
        yield task.deferLater(reactor, 0.05, lambda: None)
        left = [p for p in factory.protocols if p.transport is not None and p.transport.connected]
        for p in left:
            p.transport.abortConnection()
        if left:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.check(factory, messages, contents, results, took, failures.events, len(left))

    def check(self, factory, messages, contents, results, took, failures, left=0):
        fig = self.figures
        fig.cases += 1
        problem = lambda text: fig.problems.append("case %s: %s" % (self.label, text))  # noqa: E731
        if left:
            problem("%d connections left open after the delivery ended" % left)
        if took > 20 * TIMEOUT + 5:
            problem("delivery took %.1f s" % took)
        for event in failures:
            problem("logged: %s" % (event.get("log_format") or event,))
        for conn in factory.connections:
            for v in conn.violations:
                problem("next hop saw: %s" % v)
        if len(results) != len(messages):
            problem("%d results for %d messages" % (len(results), len(messages)))
            return
        for message, content, result in zip(messages, contents, results):
            fig.messages += 1
            body = content[:-2].split(b"\r\n")
            taken = [t for c in factory.connections for t in c.transactions
                     if t.mailfrom == message.mailfrom and t.endCode == 250 and t.endWritten]
            fives = [m for c in factory.connections for m in c.permanent if m in (message.mailfrom, None)]
            sizes = [size for c in factory.connections for size in c.sizes if size]
            misled = any(message.mailfrom in c.misled for c in factory.connections)
            if sorted(result) != sorted(message.recipients):
                problem("%s: results for %s" % (message.mailfrom, sorted(result)))
            for rcpt in message.recipients:
                fig.recipients += 1
                r = result.get(rcpt)
                if r is None or not isinstance(r.code, int) or not 200 <= r.code < 600:
                    problem("%s: %r" % (rcpt, r))
                    continue
                mine = [t for t in taken if rcpt in t.rcpts]
                if len(mine) > 1 and not misled:
                    problem("%s taken in %d transactions" % (rcpt, len(mine)))
                if r.ok:
                    fig.delivered += 1
                    if misled:
                        pass  # (which reply answered which command, neither side can tell)
                    elif not mine:
                        problem("%s reported delivered (%s) with no transaction answered 250" % (rcpt, r))
                    elif all(not _same(t, body) and not t.early for t in mine):
                        problem("%s: content altered" % (rcpt,))
                else:
                    if mine:
                        fig.unclaimed += 1
                    if r.permanent:
                        fig.bounced += 1
                        if not fives and not any(len(content) > s for s in sizes):
                            problem("%s failed for good (%s) without a 5xx from the next hop" % (rcpt, r))
                    else:
                        fig.deferred += 1


def _same(transaction, body):
    """
    Whether C{transaction} received C{body} (lines): as it is, or, without
    8BITMIME, 8-bit content converted to 7 bits with the same header fields
    (but for the encoding ones) and the same decoded parts (RFC 6152).
    """
    if transaction.body == body:
        return True
    if not transaction.sevenBit or all(line.isascii() for line in body):
        return False
    got = transaction.body
    received = b"".join(line + b"\r\n" for line in got)
    original = b"".join(line + b"\r\n" for line in body)
    return (all(line.isascii() for line in got[got.index(b"") + 1 if b"" in got else len(got):])
            and mimeFields(received) == mimeFields(original) and mimeLeaves(received) == mimeLeaves(original))


_TLS = {}


def serverTLS(directory):
    """The next hop's TLS context: a self-signed certificate made once per process."""
    if "options" not in _TLS:
        from twisted.internet import ssl

        from relaygw.tls import generateSelfSigned

        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        generateSelfSigned(cert, key, "hop.test")
        with open(cert, "rb") as c, open(key, "rb") as k:
            _TLS["options"] = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
    return _TLS["options"]


#: C{runSeeds(base, seeds, cases, figures, minutes=None, done=None)}: C{cases} L{Case}s for
#: each seed (L{tests.fuzzing.runCases}); a Deferred of C{figures}.
runSeeds = partial(runCases, Case)


if __name__ == "__main__":
    import sys

    casesMain(sys.argv[1:], runSeeds, Figures(), "hopfuzz", 100)
