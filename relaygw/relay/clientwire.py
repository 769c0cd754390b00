"""
The SMTP client's wire protocol: command lines out, replies in.

L{_SMTPClientProtocol} is a line receiver that parses replies and hands
them, in order, to whoever asked for them (so pipelined commands are just
several requests for replies).  It counts the replies due, one per command
sent: a reply read while none is due answers nothing, and ends the
connection as a protocol violation, except a refusal (4xx, 5xx) read while
the message body is going out: the next hop's early answer to the content,
which ends the connection too.  It knows nothing about the conversation
(L{relaygw.relay.client}), only lines, replies, time-outs and protocol
violations.
"""

import re
from collections import deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw import wire
from relaygw.logs import Logger
from relaygw.relay.body import _BodyProducer
from relaygw.relay.nexthop import Result

log = Logger(namespace="relaygw.relay.client")

#: One recipient's outcome (shared with the queue manager).
RecipientResult = Result

#: Log every line to and from next hops (at debug level).  Off unless the
#: log level is debug: building the events costs more than the SMTP itself.
TRACE = False


def _temporary(text, enhanced="4.4.2", code=451):
    return RecipientResult(code, enhanced, text)


#: RFC 3463's class.subject.detail: ASCII digits, no leading zero in a
#: sub-field (as Postfix's dsn_valid), so a malformed code is never
#: reported onward (a reply is read as UTF-8: C{\\d} alone would take any
#: script's digits, which no report's ASCII Status field can carry).
_ENHANCED = re.compile(r"^([245])\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})(?:\s+|$)", re.ASCII)


@dataclass(frozen=True)
class _Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple

    @property
    def positive(self):
        return 200 <= self.code < 300

    @property
    def closing(self):
        """A 421: the next hop is closing the connection (RFC 5321 3.8, 4.2.2)."""
        return self.code == 421

    @property
    def enhanced(self):
        m = _ENHANCED.match(self.lines[0])
        if m and m.group(1) == str(self.code)[0]:
            return "%s.%s.%s" % m.groups()
        return None

    #: Characters of text kept: what the mail log, the queue's last reply and a bounce say of a reply (a
    #: multi-line one runs to 64 KiB); Postfix's client keeps as much as its line_length_limit.
    TEXT_LIMIT = 2048

    @property
    def text(self):
        enhanced = self.enhanced
        lines = self.lines
        if enhanced:
            lines = [_ENHANCED.sub("", line, count=1) if _ENHANCED.match(line) else line for line in lines]
        return " ".join(line.strip() for line in lines).strip()[:self.TEXT_LIMIT]

    def result(self):
        return RecipientResult(self.code, self.enhanced, self.text, reply=True)

    def __str__(self):
        return "%d %s" % (self.code, " / ".join(self.lines))


class _ProtocolViolation(Exception):
    """The next hop broke the protocol; the connection has been aborted."""


@implementer(IHandshakeListener)
class _SMTPClientProtocol(LineReceiver, TimeoutMixin):
    """
    SMTP client wire protocol: sends command lines and delivers replies in
    order through L{reply}.  Knows nothing about the conversation.

    @ivar closed: fires (with C{None}) when the connection is gone.
    @ivar lostReason: why the connection went away, once it has.
    @ivar partial: the replies read of the pipelined group being waited
        for when it went away (its RCPT refusals stand).
    @ivar timedOut: whether it went away because a reply took too long.
    @ivar violation: a description of a protocol violation, if one ended it.
    @ivar early: the refusal (4xx, 5xx) the next hop sent while the body was
        going out, before its end (as Postfix's client, which reads it once
        the connection breaks), if one ended it.
    """

    delimiter = b"\n"
    MAX_LENGTH = 65536

    #: One reply may run to this many octets, its lines together, and the
    #: replies not asked for yet (answers to pipelined commands) to
    #: L{MAX_QUEUED}, each counted with L{REPLY_COST} for the objects that
    #: hold it: a next hop that sends more (a multi-line reply that never
    #: ends, a flood of replies) is cut off, so what it sends cannot grow
    #: the gateway's memory while the command timeout runs.
    MAX_REPLY = 65536
    MAX_QUEUED = 1 << 20
    REPLY_COST = 256

    def __init__(self, timeout, clock, where):
        self.timeout = timeout
        self.callLater = clock.callLater
        self.where = where
        self.closed = Deferred()
        self.lostReason = None
        self.partial = []
        self.timedOut = False
        self.violation = None
        self.early = None
        self.tlsStarted = False
        self.tlsEstablished = False
        self._replies = deque()
        self._waiting = deque()
        self._sending = False
        self._closing = False
        self._lines = []
        self._lineOctets = 0
        self._queuedOctets = 0
        self._due = 1  # (the greeting)
        self.replyCount = 0
        self.last = None  # (the last reply read)
        self.closingReply = None  # (the 421 read, if any: the next hop is closing, nothing more goes to it)

    # Sending

    def send(self, *lines, secret=False):
        """Write command lines (str) in one write."""
        self._expect(len(lines))
        wire.send(self.transport, self.encode(*lines, secret=secret))

    def _expect(self, count):
        """
        C{count} more replies are due: commands are going out.  Input read
        while no reply was due (and not yet parsed when they go) came before
        them, and answers none of them.
        """
        if not self._due and (self._buffer or self._lines):  # (LineReceiver's unparsed input, a reply begun)
            self._violate("reply not asked for, read before the command it would answer")
        self._due += count

    def encode(self, *lines, secret=False):
        """Command lines (str) as they go on the wire (and into the trace)."""
        for line in lines if TRACE else ():
            if secret:
                words = line.split(" ")
                line = " ".join(words[:2] + ["****"]) if words[0].upper() == "AUTH" else "****"
            log.debug("{where} <<< {line}", where=self.where, line=line)
        return b"".join(line.encode("utf-8") + b"\r\n" for line in lines)

    def command(self, line, secret=False):
        """Send one command; return a Deferred firing with its reply."""
        self.send(line, secret=secret)
        return self.reply()

    def reply(self, timeout=None):
        """
        A Deferred firing with the next reply not yet asked for, within
        C{timeout} seconds (default: the command timeout).
        """
        return self._ask(None, timeout)

    def replies(self, count):
        """
        A Deferred firing with a list of the next C{count} replies once all
        of them are in: the answers to pipelined commands, for one wake-up;
        at a 421 (the next hop is closing) with those up to it.
        """
        return self._ask(count)

    def _ask(self, count, timeout=None):
        if not self._waiting and len(self._replies) >= (count or 1):
            if count is None:
                return succeed(self._queued())
            replies = [self._queued()]
            while len(replies) < count and not replies[-1].closing:  # (as L{_answer}: none after a 421)
                replies.append(self._queued())
            return succeed(replies)
        if self.lostReason is not None:
            return fail(self.lostReason)
        d = Deferred()
        self._waiting.append((d, count, []))
        self.setTimeout(timeout or self.timeout)
        while self._replies and self._waiting[0][0] is d:
            self._answer(self._queued())
        return d

    def _queued(self):
        """The oldest reply not asked for yet."""
        reply, octets = self._replies.popleft()
        self._queuedOctets -= octets
        return reply

    def _answer(self, reply):
        """Hand C{reply} to the oldest request for one."""
        d, count, collected = self._waiting[0]
        if count is not None:
            collected.append(reply)
            if len(collected) < count and not reply.closing:
                self.resetTimeout()
                return
            reply = collected  # (fewer after a 421: the next hop closes, the rest may never come)
        self._waiting.popleft()
        if self._waiting:
            self.resetTimeout()
        # else the timer stays armed, and is ignored while nothing is
        # outstanding (L{timeoutConnection}): cancelling it here and arming
        # a new one for the next command cost two calls per reply.
        d.callback(reply)

    def sendBody(self, file, after=()):
        """
        Stream a message body, then C{after} (command lines pipelined behind
        it); the Deferred fires once it is all written.
        """
        self._sending = True
        self.setTimeout(self.timeout)

        def written(result):
            self._sending = False
            if not isinstance(result, Failure):
                self._expect(1 + len(after))  # (the end of data's reply, and those of the commands behind it)
            return result

        return _BodyProducer(file, self.transport, self.resetTimeout, self.encode(*after)).start().addBoth(written)

    def startTLS(self, contextFactory):
        """
        Switch to TLS after a 220 to STARTTLS.  Anything already received
        after that reply was sent in the clear and would be taken as coming
        over TLS (response injection): that is a protocol violation.
        """
        if self.clearLineBuffer() or self._replies or self._lines:
            self._violate("data pipelined after the STARTTLS reply")
            raise _ProtocolViolation(self.violation)
        self.tlsStarted = True
        self.transport.startTLS(contextFactory)
        wire.tlsWritesAtOnce(self.transport)

    def handshakeCompleted(self):
        self.tlsEstablished = True

    def abort(self):
        """Drop the connection at once, if it is still there."""
        if self.lostReason is None and self.transport is not None:
            self.transport.abortConnection()

    # Receiving

    def lineReceived(self, line):
        if self.violation is not None or self.early is not None:
            return  # lines already read behind a violation or an early refusal are not replies
        line = line.rstrip(b"\r")
        code, separator, text = line[:3], line[3:4], line[4:]
        if (
            len(code) != 3
            or not code.isdigit()
            or code[:1] not in b"12345"
            or separator not in (b"-", b" ", b"")
            or (self._lines and code != self._lines[0][0])
        ):
            self._violate("malformed reply line %r" % (line[:100],))
            return
        self._lineOctets += len(line)
        if self._lineOctets > self.MAX_REPLY:
            self._violate("reply longer than %d octets" % (self.MAX_REPLY,))
            return
        self._lines.append((code, text.decode("utf-8", "replace")))
        if separator == b"-":
            return
        if not self._due and not (self._sending and code[:1] in b"45"):
            self._violate("reply not asked for: %r" % (line[:100],))
            return
        reply = _Reply(int(code), tuple(text for _, text in self._lines))
        octets, self._lines, self._lineOctets = self._lineOctets + self.REPLY_COST, [], 0
        if not self._due:
            # The body is not all sent, and the next hop has refused it:
            # what would follow would be read as commands.
            log.info("{where}: {reply} before the end of data", where=self.where, reply=reply)
            self.early = reply
            self.abort()
            return
        self._due -= 1
        self.replyCount += 1
        self.last = reply
        if reply.closing and self.closingReply is None:
            self.closingReply = reply
        if TRACE:
            log.debug("{where} >>> {reply}", where=self.where, reply=reply)
        if self._waiting:
            self._answer(reply)
            return
        self._queuedOctets += octets
        if self._queuedOctets > self.MAX_QUEUED:
            self._violate("more than %d octets of replies not asked for" % (self.MAX_QUEUED,))
            return
        self._replies.append((reply, octets))

    def lineLengthExceeded(self, line):
        self._violate("reply line longer than %d octets" % (self.MAX_LENGTH,))

    def _violate(self, description):
        if self.violation is None:
            self.violation = description
            log.warn("{where}: protocol violation: {what}", where=self.where, what=description)
        self._forget()
        self.abort()

    def _forget(self):
        """After a violation, what was read and not asked for is no reply."""
        self._lines, self._lineOctets = [], 0
        self._replies.clear()
        self._queuedOctets = 0

    def closeWithin(self, timeout):
        """Close the connection, cutting it off if it takes longer than C{timeout} seconds."""
        self._closing = True
        self.setTimeout(timeout)
        self.transport.loseConnection()

    def timeoutConnection(self):
        if not (self._waiting or self._sending or self._closing):
            return  # idle (a kept connection): the timer was left armed
        self.timedOut = True
        log.info("{where}: timeout after {timeout}s", where=self.where, timeout=self.timeout)
        self.abort()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.lostReason = reason
        waiting, self._waiting = self._waiting, deque()
        self.partial = waiting[0][2] if waiting else []
        for d, _, _ in waiting:
            d.errback(reason)
        self.closed.callback(None)


class _SessionFailure(Exception):
    """Stop the session: every recipient not yet answered gets C{result}."""

    def __init__(self, result):
        Exception.__init__(self, result)
        self.result = result


class _MessageFailure(_SessionFailure):
    """Give up on one message: its unanswered recipients get C{result}."""


def _extensions(reply):
    """The EHLO keywords as a dict: upper-case keyword -> parameter string."""
    extensions, mechanisms = {}, []
    for line in reply.lines[1:]:
        words = line.split()
        if not words:
            continue
        keyword, parameters = words[0].upper(), words[1:]
        if keyword.startswith("AUTH="):
            # Obsolete "AUTH=LOGIN PLAIN" form.
            keyword, parameters = "AUTH", [words[0][5:]] + parameters
        if keyword == "AUTH":
            # Every AUTH line's mechanisms, joined once at the end (joined
            # again at each line, thousands of AUTH lines in one reply took
            # work in the square of their number, in the reactor's thread).
            mechanisms += parameters
        extensions[keyword] = " ".join(parameters)
    if mechanisms:
        extensions["AUTH"] = " ".join(mechanisms)
    return extensions


def _outcome(reply, what):
    """
    The result a 4xx/5xx (or 2xx, where that is final) reply gives; anything
    else is not an answer we can report, so it becomes a temporary failure.
    """
    if 200 <= reply.code < 600 and reply.code // 100 != 3:
        return reply.result()
    return _temporary("unexpected reply to %s: %s" % (what, reply), "4.5.0")
