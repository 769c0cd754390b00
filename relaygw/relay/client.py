"""
The SMTP client that hands messages to a next hop.

L{deliver} opens one connection, negotiates (EHLO/HELO, STARTTLS, AUTH,
XCLIENT), sends every message on it and returns one result per recipient.
Every outcome, including a refused connection, a timeout or a TLS failure,
comes back as a result: the returned L{Deferred} does not fail.  A recipient
is only ever reported as accepted (2xx) when the next hop acknowledged its
message with a 2xx reply to the end of data.

The wire protocol is L{_SMTPClientProtocol}: a line receiver that parses
replies and hands them, in order, to whoever asked for them (so pipelined
commands are just several requests for replies).  The conversation itself is
the coroutine L{Connection.carry}.
"""

import base64
import os
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from OpenSSL import SSL
from service_identity import VerificationError
from zope.interface import implementer

from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relaygw import wire, xtext
from relaygw.context import FORWARDED_ATTRIBUTES, identityValue
from relaygw.logs import Logger
from relaygw.relay.nexthop import Result

log = Logger()


@dataclass
class OutboundMessage:
    """
    One message to hand to a next hop.

    @ivar mailfrom: the envelope sender, C{""} for the null sender.
    @ivar recipients: the envelope recipients.
    @ivar bodyPath: the file holding the content (headers and body), CRLF
        line ends, not dot-stuffed, unless C{openBody} is given.
    @ivar bodyOffset: the content starts at this byte offset of the file.
    @ivar openBody: returns the content as a binary file positioned at its
        start (a spooled message's C{openBody}); used instead of C{bodyPath}.
    @ivar context: the original client's connection-level validation context
        (C{remote_ip}, C{remote_port}, C{remote_name}, C{ehlo_domain},
        C{protocol}, C{auth_user} are forwarded with XCLIENT/XFORWARD).
    @ivar size: the content size, or C{None} to take it from the file.
    """

    mailfrom: str
    recipients: list
    bodyPath: str = ""
    bodyOffset: int = 0
    context: dict = field(default_factory=dict)
    size: Optional[int] = None
    openBody: Optional[Callable] = None


#: One recipient's outcome (shared with the queue manager).
RecipientResult = Result


@dataclass
class DeliveryOptions:
    """
    How to talk to the next hop.

    @ivar heloName: the name to send with EHLO/HELO.
    @ivar tls: C{"none"}, C{"may"} (STARTTLS when offered, no certificate
        check) or C{"verify"} (STARTTLS required, certificate verified).
    @ivar tlsHostname: the name the certificate must match under
        C{"verify"} (default: the host given to L{deliver}).
    @ivar caFile: a PEM CA bundle for C{"verify"} (C{None}: platform trust).
    @ivar auth: C{(user, password)} for AUTH PLAIN (or LOGIN) when offered.
    @ivar forwardIdentity: pass the original client's identity on with
        XCLIENT (preferred) or XFORWARD when the next hop offers them.
    @ivar timeout: seconds to wait for each reply (and for body progress).
    """

    heloName: str
    tls: str = "may"
    tlsHostname: Optional[str] = None
    caFile: Optional[str] = None
    auth: Optional[tuple] = None
    forwardIdentity: bool = False
    timeout: float = 300


def _temporary(text, enhanced="4.4.2", code=451):
    return RecipientResult(code, enhanced, text)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@dataclass(frozen=True)
class _Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple

    @property
    def positive(self):
        return 200 <= self.code < 300

    @property
    def enhanced(self):
        m = _ENHANCED.match(self.lines[0])
        if m and m.group(1) == str(self.code)[0]:
            return "%s.%s.%s" % m.groups()
        return None

    @property
    def text(self):
        enhanced = self.enhanced
        lines = self.lines
        if enhanced:
            lines = [_ENHANCED.sub("", line, count=1) if _ENHANCED.match(line) else line for line in lines]
        return " ".join(line.strip() for line in lines).strip()

    def result(self):
        return RecipientResult(self.code, self.enhanced, self.text)

    def __str__(self):
        return "%d %s" % (self.code, " / ".join(self.lines))


class _ProtocolViolation(Exception):
    """The next hop broke the protocol; the connection has been aborted."""


class _BodyInterrupted(Exception):
    """The transport stopped the body producer (the connection went away)."""


@implementer(IPullProducer)
class _BodyProducer:
    """
    Streams message content from a file to the transport, dot-stuffing it on
    the fly (line starts may fall anywhere in a chunk), then writes the
    C{CRLF.CRLF} terminator (adding the final CRLF the content lacks) and
    C{after}, the commands pipelined behind it.
    """

    CHUNK_SIZE = 2**16

    def __init__(self, file, consumer, progress, after=b""):
        self.file = file
        self.consumer = consumer
        self.progress = progress
        self.after = after
        self.atLineStart = True
        self.tail = b""
        self.deferred = Deferred()

    def start(self):
        """
        Write the body; the Deferred fires once all of it is written.  A body
        that fits in one chunk goes out in one write, with its terminator;
        a larger one is produced chunk by chunk as the transport drains.
        """
        d = self.deferred
        chunk = self._read()
        if isinstance(chunk, Failure):
            self.deferred = None
            d.errback(chunk)
            return d
        if len(chunk) < self.CHUNK_SIZE:  # a short read of a regular file: the end
            self.deferred = None
            wire.send(self.consumer, self.stuff(chunk) + self.terminator() + self.after)
            d.callback(None)
            return d
        self.first = chunk
        self.consumer.registerProducer(self, False)
        return d

    first = None

    def _read(self):
        """
        The next chunk, or a L{Failure}: a message that cannot be read is
        never terminated, the caller fails and aborts the connection.
        """
        try:
            chunk = self.file.read(self.CHUNK_SIZE)
        except OSError:
            return Failure()
        self.progress()
        return chunk

    def stuff(self, chunk):
        out = chunk.replace(b"\n.", b"\n..")
        if self.atLineStart and out[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk.endswith(b"\n")
        self.tail = (self.tail + chunk)[-2:]
        return out

    def terminator(self):
        if self.tail in (b"", b"\r\n"):
            return b".\r\n"
        return b"\r\n.\r\n"

    def resumeProducing(self):
        if self.deferred is None:
            return
        chunk, self.first = self.first, None
        if chunk is None:
            chunk = self._read()
        if isinstance(chunk, Failure):
            self._finish(chunk)
            return
        if chunk:
            self.consumer.write(self.stuff(chunk))
        else:
            self.consumer.write(self.terminator() + self.after)
            self._finish(None)

    def stopProducing(self):
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(_BodyInterrupted("the connection stopped the message body"))

    def _finish(self, result):
        d, self.deferred = self.deferred, None
        self.consumer.unregisterProducer()
        d.callback(result) if result is None else d.errback(result)


@implementer(IHandshakeListener)
class _SMTPClientProtocol(LineReceiver, TimeoutMixin):
    """
    SMTP client wire protocol: sends command lines and delivers replies in
    order through L{reply}.  Knows nothing about the conversation.

    @ivar closed: fires (with C{None}) when the connection is gone.
    @ivar lostReason: why the connection went away, once it has.
    @ivar timedOut: whether it went away because a reply took too long.
    @ivar violation: a description of a protocol violation, if one ended it.
    """

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, timeout, clock, where):
        self.timeout = timeout
        self.callLater = clock.callLater
        self.where = where
        self.closed = Deferred()
        self.lostReason = None
        self.timedOut = False
        self.violation = None
        self.tlsStarted = False
        self.tlsEstablished = False
        self._replies = deque()
        self._waiting = deque()
        self._lines = []
        self.replyCount = 0

    # Sending

    def send(self, *lines, secret=False):
        """Write command lines (str) in one write."""
        wire.send(self.transport, self.encode(*lines, secret=secret))

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

    def reply(self):
        """A Deferred firing with the next reply not yet asked for."""
        return self._ask(None)

    def replies(self, count):
        """
        A Deferred firing with a list of the next C{count} replies once all
        of them are in: the answers to pipelined commands, for one wake-up.
        """
        return self._ask(count)

    def _ask(self, count):
        if not self._waiting and len(self._replies) >= (count or 1):
            if count is None:
                return succeed(self._replies.popleft())
            return succeed([self._replies.popleft() for _ in range(count)])
        if self.lostReason is not None:
            return fail(self.lostReason)
        d = Deferred()
        self._waiting.append((d, count, []))
        self.setTimeout(self.timeout)
        while self._replies and self._waiting[0][0] is d:
            self._answer(self._replies.popleft())
        return d

    def _answer(self, reply):
        """Hand C{reply} to the oldest request for one."""
        d, count, collected = self._waiting[0]
        if count is not None:
            collected.append(reply)
            if len(collected) < count:
                self.resetTimeout()
                return
            reply = collected
        self._waiting.popleft()
        if self._waiting:
            self.resetTimeout()
        else:
            self.setTimeout(None)
        d.callback(reply)

    def sendBody(self, file, after=b""):
        """
        Stream a message body, then C{after} (commands pipelined behind it);
        the Deferred fires once it is all written.
        """
        self.setTimeout(self.timeout)

        def written(result):
            self.setTimeout(None)
            return result

        return _BodyProducer(file, self.transport, self.resetTimeout, after).start().addBoth(written)

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

    def handshakeCompleted(self):
        self.tlsEstablished = True

    def abort(self):
        """Drop the connection at once, if it is still there."""
        if self.lostReason is None and self.transport is not None:
            self.transport.abortConnection()

    # Receiving

    def lineReceived(self, line):
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
        self._lines.append((code, text.decode("utf-8", "replace")))
        if separator == b"-":
            return
        reply = _Reply(int(code), tuple(text for _, text in self._lines))
        self._lines = []
        self.replyCount += 1
        if TRACE:
            log.debug("{where} >>> {reply}", where=self.where, reply=reply)
        if self._waiting:
            self._answer(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line):
        self._violate("reply line longer than %d octets" % (self.MAX_LENGTH,))

    def _violate(self, description):
        if self.violation is None:
            self.violation = description
            log.warn("{where}: protocol violation: {what}", where=self.where, what=description)
        self.abort()

    def timeoutConnection(self):
        self.timedOut = True
        log.info("{where}: timeout after {timeout}s", where=self.where, timeout=self.timeout)
        self.abort()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.lostReason = reason
        waiting, self._waiting = self._waiting, deque()
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


_MAX_COMMAND = 510

#: Log every line to and from next hops (at debug level).  Off unless the
#: log level is debug: building the events costs more than the SMTP itself.
TRACE = False

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _identityAttributes(context, advertised, xclient):
    """
    The C{NAME=value} attributes describing the original client, for the
    attribute names the next hop advertised, values xtext-encoded.  Nothing
    for a message without a client (a bounce): the gateway itself is its
    client.  An unknown PROTO is left out of XCLIENT, which takes only
    SMTP or ESMTP there.
    """
    if not context.get("remote_ip"):
        return ()
    attributes = []
    for name in FORWARDED_ATTRIBUTES:
        if name not in advertised:
            continue
        value = identityValue(context, name)
        if value is None:
            if name == "PROTO" and xclient:
                continue
            status = str(context.get("remote_name_status") or "").lower()
            value = "[TEMPUNAVAIL]" if name == "NAME" and status.startswith("temp") else "[UNAVAILABLE]"
        else:
            value = str(value)
            if name == "ADDR":
                if value.lower().startswith("::ffff:") and isIPAddress(value[7:]):
                    value = value[7:]
                elif isIPv6Address(value):
                    value = "IPV6:" + value
            elif name == "PROTO" and xclient:
                # XCLIENT accepts only these two.
                value = "ESMTP" if value.upper().startswith(("ESMTP", "LMTP")) else "SMTP"
            value = xtext.encode(value)
        attributes.append("%s=%s" % (name, value))
    return tuple(attributes)


def _commandLines(verb, attributes):
    """C{verb} with C{attributes}, split into lines that fit in 512 octets."""
    lines, current = [], verb
    for attribute in attributes:
        if current != verb and len(current) + 1 + len(attribute) > _MAX_COMMAND:
            lines.append(current)
            current = verb
        current += " " + attribute
    lines.append(current)
    return lines


def _rcptCommands(message):
    return ["RCPT TO:<%s>" % (recipient,) for recipient in message.recipients]


def _extensions(reply):
    """The EHLO keywords as a dict: upper-case keyword -> parameter string."""
    extensions = {}
    for line in reply.lines[1:]:
        words = line.split()
        if not words:
            continue
        keyword, parameters = words[0].upper(), words[1:]
        if keyword.startswith("AUTH="):
            # Obsolete "AUTH=LOGIN PLAIN" form.
            keyword, parameters = "AUTH", [words[0][5:]] + parameters
        if keyword == "AUTH" and keyword in extensions:
            parameters = extensions[keyword].split() + parameters
        extensions[keyword] = " ".join(parameters)
    return extensions


def _outcome(reply, what):
    """
    The result a 4xx/5xx (or 2xx, where that is final) reply gives; anything
    else is not an answer we can report, so it becomes a temporary failure.
    """
    if 200 <= reply.code < 600 and reply.code // 100 != 3:
        return reply.result()
    return _temporary("unexpected reply to %s: %s" % (what, reply), "4.5.0")


class Connection:
    """
    One connection to one next hop.  L{carry} delivers a batch of messages
    over it, opening it first if needed; a connection that is kept open
    (C{keepOpen}) carries the next batch without a new handshake, and
    L{close} says QUIT.
    """

    def __init__(self, reactor, host, port, options):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.messages = []
        self.options = options
        self.where = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        self.results = []
        self.proto = None
        self.stage = "connect"
        self.extensions = {}
        self.needReset = False
        self.forwarded = None
        self.xclientNames = None
        self.ahead = None  # (file, size) of the next message, its envelope already sent
        self.stale = False
        self.peerIP = None
        self.setupStarted = self.setupTime = None
        self.sendStarted = {}

    # Results

    def _timed(self, index, result):
        """C{result} with where it came from and how long it took, for the mail log."""
        now = self.reactor.seconds()
        setup = self.setupTime
        if setup is None:
            setup = now - self.setupStarted if self.setupStarted is not None else 0.0
        started = self.sendStarted.get(index)
        relay = "%s[%s]:%d" % (self.host, self.peerIP, self.port) if self.peerIP else None
        return replace(result, relay=relay, setup=max(0.0, setup),
                       transmit=max(0.0, now - started) if started is not None else 0.0)

    def _settle(self, index, recipients, result):
        results = self.results[index]
        result = self._timed(index, result)
        for recipient in recipients:
            if recipient not in results:
                results[recipient] = result
                log.debug(
                    "{where}: {mailfrom} -> {rcpt}: {result}",
                    where=self.where,
                    mailfrom="<%s>" % (self.messages[index].mailfrom,),
                    rcpt=recipient,
                    result=result,
                )
        if self.settled is not None and index not in self.reported and \
                len(results) >= len(set(self.messages[index].recipients)):
            # Every recipient of the message has its outcome: report it
            # now, while the conversation goes on with the next message.
            self.reported.add(index)
            try:
                self.settled(index, results)
            except Exception:
                log.failure("{where}: reporting an outcome failed", where=self.where)

    def _settleAll(self, result):
        for index, message in enumerate(self.messages):
            self._settle(index, message.recipients, result)

    def _refused(self, reply, what, permanentAllowed=False):
        """
        The result when the next hop refuses a session-level step.  Only a
        5xx to HELO stays permanent: refused greetings, STARTTLS, AUTH,
        XCLIENT... are deferred (soft bounce) so the mail is retried.
        """
        text = "%s refused %s: %s" % (self.where, what, reply)
        if reply.code // 100 == 4 or (permanentAllowed and reply.code // 100 == 5):
            return RecipientResult(reply.code, reply.enhanced, text)
        enhanced = reply.enhanced
        return _temporary(text, "4" + enhanced[1:] if enhanced else "4.0.0")

    async def _describe(self, failure):
        """A temporary result describing why the session broke down."""
        if self.proto is None:
            return _temporary(
                "connection to %s failed: %s" % (self.where, failure.getErrorMessage()),
                "4.4.1",
            )
        proto = self.proto
        expected = failure.check(_BodyInterrupted) or (
            proto.lostReason is not None and failure.value is proto.lostReason.value
        )
        if not expected and not proto.timedOut and not proto.violation:
            log.failure("{where}: unexpected error during {stage}", failure, where=self.where, stage=self.stage)
        proto.abort()
        await proto.closed
        reason = proto.lostReason
        if proto.timedOut:
            return _temporary("timeout waiting for %s from %s" % (self.stage, self.where), "4.4.2")
        if proto.violation:
            return _temporary("protocol error from %s: %s" % (self.where, proto.violation), "4.5.0")
        if (proto.tlsStarted and not proto.tlsEstablished) or reason.check(SSL.Error, VerificationError):
            return _temporary(
                "TLS handshake with %s failed: %s" % (self.where, reason.getErrorMessage()),
                "4.7.5",
            )
        return _temporary(
            "connection to %s lost during %s: %s" % (self.where, self.stage, reason.getErrorMessage()),
            "4.4.2",
        )

    # The conversation

    @property
    def usable(self):
        """Whether the connection is open and may carry another batch."""
        return self.proto is not None and self.proto.lostReason is None and not self.broken

    broken = False

    settled = None

    async def carry(self, messages, keepOpen=False, settled=None):
        """
        Deliver C{messages}; returns one dict per message mapping each
        recipient to its L{RecipientResult}.  The connection is closed
        afterwards unless C{keepOpen}, and always after a failure.  After
        a carry that found a kept-open connection closed by the next hop
        before any reply, C{stale} is true and the results say nothing.

        @param settled: called with C{(index, results)} as soon as every
            recipient of message C{index} has its outcome (typically when
            the reply to its end of data is read), before the next message
            is done with.
        """
        self.messages, self.results = messages, [{} for _ in messages]
        self.settled, self.reported = settled, set()
        kept = self.proto
        self.sendStarted = {}
        if kept is not None:
            self.setupTime = 0.0  # a kept-open connection: nothing to set up
        replies = kept.replyCount if kept is not None else 0
        try:
            try:
                if self.proto is None:
                    await self._open()
                for index, message in enumerate(messages):
                    try:
                        await self._transaction(index, message)
                    except _MessageFailure as e:
                        self._settle(index, message.recipients, e.result)
                if not keepOpen:
                    await self._quit()
            except _SessionFailure as e:
                self._settleAll(e.result)
                self.broken = True
                await self._quit()
            except Exception:
                self.broken = True
                self._settleAll(await self._describe(Failure()))
        except Exception:
            self.broken = True
            log.failure("{where}: delivery failed", where=self.where)
            self._settleAll(_temporary("local error delivering to %s" % (self.where,), "4.3.0"))
        if self.ahead is not None:
            self.ahead[0].close()
            self.ahead = None
        self._settleAll(_temporary("no reply from %s" % (self.where,), "4.4.2"))
        # A kept-open connection the next hop closed (its idle timeout)
        # before answering anything: no message got as far as its body.
        self.stale = kept is not None and kept.replyCount == replies and kept.lostReason is not None \
            and not kept.timedOut and kept.violation is None
        if self.proto is not None and not (keepOpen and self.usable):
            self.broken = True
            self.proto.abort()
        return self.results

    async def close(self):
        """Say QUIT and close (a kept-open connection that is no longer needed)."""
        self.broken = True
        try:
            await self._quit()
        except Exception:
            log.failure("{where}: QUIT failed", where=self.where)
        if self.proto is not None:
            self.proto.abort()

    def _endpoint(self):
        timeout = self.options.timeout
        if isIPAddress(self.host):
            return TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=timeout)
        if isIPv6Address(self.host):
            return TCP6ClientEndpoint(self.reactor, self.host, self.port, timeout=timeout)
        return HostnameEndpoint(self.reactor, self.host, self.port, timeout=timeout)

    async def _open(self):
        self.stage = "connect"
        self.setupStarted, self.setupTime = self.reactor.seconds(), None
        proto = _SMTPClientProtocol(self.options.timeout, self.reactor, self.where)
        await connectProtocol(self._endpoint(), proto)
        wire.noDelay(proto.transport)
        self.proto = proto
        self.peerIP = getattr(proto.transport.getPeer(), "host", None)
        log.debug("{where}: connected", where=self.where)
        self.stage = "greeting"
        greeting = await proto.reply()
        if not greeting.positive:
            raise _SessionFailure(self._refused(greeting, "the connection"))
        await self._hello()
        await self._startTLS()
        await self._authenticate()
        self.setupTime = self.reactor.seconds() - self.setupStarted

    async def _hello(self, name=None):
        name = name or self.options.heloName
        self.stage = "EHLO"
        reply = await self.proto.command("EHLO " + name)
        if reply.positive:
            self.extensions = _extensions(reply)
            return
        if reply.code // 100 == 5:
            self.stage = "HELO"
            reply = await self.proto.command("HELO " + name)
            if reply.positive:
                self.extensions = {}
                return
        raise _SessionFailure(self._refused(reply, self.stage, permanentAllowed=True))

    def _tlsOptions(self):
        if self.options.tls != "verify":
            return ssl.CertificateOptions()
        trustRoot = None
        if self.options.caFile:
            with open(self.options.caFile, "rb") as f:
                pems = _PEM_CERTIFICATE.findall(f.read())
            if not pems:
                raise ValueError("no certificate in %s" % (self.options.caFile,))
            trustRoot = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])
        return ssl.optionsForClientTLS(self.options.tlsHostname or self.host, trustRoot=trustRoot)

    async def _startTLS(self):
        policy = self.options.tls
        if policy == "none":
            return
        if "STARTTLS" not in self.extensions:
            if policy == "verify":
                raise _SessionFailure(
                    _temporary("TLS is required but %s does not offer STARTTLS" % (self.where,), "4.7.4")
                )
            log.info("{where}: STARTTLS not offered, continuing in plaintext", where=self.where)
            return
        try:
            contextFactory = self._tlsOptions()
        except Exception as e:
            log.failure("{where}: cannot set up TLS", where=self.where)
            raise _SessionFailure(_temporary("cannot set up TLS for %s: %s" % (self.where, e), "4.7.5"))
        self.stage = "STARTTLS"
        reply = await self.proto.command("STARTTLS")
        if not reply.positive:
            if policy == "verify":
                raise _SessionFailure(self._refused(reply, "STARTTLS"))
            log.info("{where}: STARTTLS refused ({reply}), continuing in plaintext", where=self.where, reply=reply)
            return
        self.proto.startTLS(contextFactory)
        await self._hello()
        log.info("{where}: TLS established ({policy})", where=self.where, policy=policy)

    async def _authenticate(self):
        if not self.options.auth:
            return
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self.options.auth

        def b64(value):
            return base64.b64encode(value.encode("utf-8")).decode("ascii")

        self.stage = "AUTH"
        if "PLAIN" in mechanisms:
            reply = await self.proto.command("AUTH PLAIN " + b64("\0%s\0%s" % (user, password)), secret=True)
        elif "LOGIN" in mechanisms:
            reply = await self.proto.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self.proto.command(b64(user), secret=True)
            if reply.code == 334:
                reply = await self.proto.command(b64(password), secret=True)
        else:
            log.warn(
                "{where}: AUTH configured but PLAIN/LOGIN not offered ({offered!r}); continuing without",
                where=self.where,
                offered=self.extensions.get("AUTH"),
            )
            return
        if reply.code == 334:
            # An unexpected challenge: cancel the exchange.
            await self.proto.command("*")
        if not reply.positive:
            raise _SessionFailure(self._refused(reply, "AUTH"))
        log.info("{where}: authenticated as {user}", where=self.where, user=user)

    def _xclientNames(self):
        """The XCLIENT attribute names the next hop takes (or took)."""
        return self.extensions.get("XCLIENT", "").upper().split() or self.xclientNames

    def _identityForwarded(self, message):
        """Whether C{message} can go out without forwarding an identity first."""
        if not self.options.forwardIdentity or not message.context.get("remote_ip"):
            return True
        names = self._xclientNames()
        if not names:
            return "XFORWARD" not in self.extensions
        return _identityAttributes(message.context, names, xclient=True) == self.forwarded

    async def _forwardIdentity(self, message):
        """
        XCLIENT when the identity changes, or XFORWARD before each MAIL;
        nothing for a message without a client (a bounce).
        """
        if not self.options.forwardIdentity or not message.context.get("remote_ip"):
            return
        names = self._xclientNames()
        if names:
            attributes = _identityAttributes(message.context, names, xclient=True)
            if attributes == self.forwarded:
                return
            if "XCLIENT" not in self.extensions:
                # The next hop now takes us for the previous client and no
                # longer lets us change that: this message needs a
                # connection of its own.
                raise _MessageFailure(
                    _temporary(
                        "cannot forward another client identity to %s on this connection" % (self.where,),
                        "4.4.3",
                    )
                )
            self.stage = "XCLIENT"
            for line in _commandLines("XCLIENT", attributes):
                reply = await self.proto.command(line)
                if not reply.positive:
                    raise _SessionFailure(self._refused(reply, "XCLIENT"))
            self.forwarded, self.xclientNames = attributes, names
            # Greet again as the original client did (as nginx replays the
            # client's EHLO), so the next hop's HELO is the client's.
            helo = message.context.get("ehlo_domain") or ""
            await self._hello(helo if re.match(r"^[\x21-\x7e]{1,255}$", helo) else None)
        elif "XFORWARD" in self.extensions:
            advertised = self.extensions["XFORWARD"].upper().split()
            self.stage = "XFORWARD"
            for line in _commandLines("XFORWARD", _identityAttributes(message.context, advertised, xclient=False)):
                reply = await self.proto.command(line)
                if not reply.positive:
                    raise _MessageFailure(self._refused(reply, "XFORWARD"))

    def _mailCommand(self, message, size):
        addresses = [message.mailfrom] + list(message.recipients)
        if any(c in address for address in addresses for c in "\r\n<>"):
            raise _MessageFailure(RecipientResult(553, "5.1.3", "invalid character in envelope address"))
        parameters = []
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and int(limit) > 0 and size > int(limit):
                raise _MessageFailure(
                    RecipientResult(
                        552, "5.3.4", "message size %d exceeds the limit %s of %s" % (size, limit, self.where)
                    )
                )
            parameters.append("SIZE=%d" % (size,))
        if "8BITMIME" in self.extensions:
            parameters.append("BODY=8BITMIME")
        if not all(address.isascii() for address in addresses):
            if "SMTPUTF8" not in self.extensions:
                raise _MessageFailure(
                    RecipientResult(553, "5.6.7", "%s does not support SMTPUTF8 addresses" % (self.where,))
                )
            parameters.append("SMTPUTF8")
        return " ".join(["MAIL FROM:<%s>" % (message.mailfrom,)] + parameters)

    def _openBody(self, message, report=True):
        """The content of C{message}: C{(file, size)}; raises L{_MessageFailure}."""
        try:
            if message.openBody is not None:
                body = message.openBody()
            else:
                body = open(message.bodyPath, "rb", buffering=0)  # reads are 64 KB chunks: no buffer needed
                body.seek(message.bodyOffset)
            size = message.size
            if size is None:
                size = max(0, os.fstat(body.fileno()).st_size - message.bodyOffset)
            return body, size
        except OSError as e:
            if report:
                log.error("{where}: cannot read the message: {e}", where=self.where, e=e)
            raise _MessageFailure(_temporary("cannot read the message: %s" % (e.strerror or e,), "4.3.0"))

    async def _transaction(self, index, message):
        self.sendStarted[index] = self.reactor.seconds()
        ahead, self.ahead = self.ahead, None
        body, size = ahead or self._openBody(message)
        with body:
            await self._send(index, message, body, size, sent=ahead is not None)

    def _envelopeAhead(self, index):
        """
        The envelope of message C{index} (MAIL, RCPT, DATA) as bytes to send
        right behind the previous message's end of data, which RFC 2920
        allows, so the next hop answers both in one go; C{b""} when that
        message must wait for the reply (no PIPELINING, an identity to
        forward first, a message that cannot go out).
        """
        if index >= len(self.messages) or "PIPELINING" not in self.extensions:
            return b""
        message = self.messages[index]
        if not self._identityForwarded(message):
            return b""
        try:
            body, size = self._openBody(message, report=False)
        except _MessageFailure:
            return b""  # its own transaction reports it
        try:
            mail = self._mailCommand(message, size)
        except _MessageFailure:
            body.close()
            return b""
        self.ahead = (body, size)
        return self.proto.encode(mail, *_rcptCommands(message), "DATA")

    async def _send(self, index, message, body, size, sent=False):
        """
        One transaction.  C{sent}: its envelope already went out behind the
        previous message (L{_envelopeAhead}).
        """
        proto = self.proto
        rcpts = _rcptCommands(message)
        if not sent:
            if self.needReset:
                self.stage = "RSET"
                reply = await proto.command("RSET")
                if not reply.positive:
                    raise _SessionFailure(self._refused(reply, "RSET"))
                self.needReset = False
            await self._forwardIdentity(message)
            mail = self._mailCommand(message, size)
        self.stage = "MAIL"
        dataReply = None
        if sent or "PIPELINING" in self.extensions:
            if not sent:
                proto.send(mail, *rcpts, "DATA")
            replies = await proto.replies(len(rcpts) + 2)
            mailReply, rcptReplies, dataReply = replies[0], replies[1:-1], replies[-1]
        else:
            mailReply = await proto.command(mail)
            rcptReplies = []
            if mailReply.positive:
                self.stage = "RCPT"
                for rcpt in rcpts:
                    rcptReplies.append(await proto.command(rcpt))

        if not mailReply.positive:
            self._settle(index, message.recipients, _outcome(mailReply, "MAIL"))
            if dataReply is not None and dataReply.code == 354:
                await self._abandonData()
            return

        accepted = []
        for recipient, reply in zip(message.recipients, rcptReplies):
            if reply.positive:
                accepted.append(recipient)
            else:
                self._settle(index, [recipient], _outcome(reply, "RCPT"))
        if not accepted:
            # MAIL opened a transaction that will not complete.
            self.needReset = True
            if dataReply is not None and dataReply.code == 354:
                await self._abandonData()
            return

        if dataReply is None:
            self.stage = "DATA"
            dataReply = await proto.command("DATA")
        if dataReply.code != 354:
            self.needReset = True
            result = _outcome(dataReply, "DATA")
            if result.ok:
                result = _temporary("unexpected reply to DATA: %s" % (dataReply,), "4.5.0")
            self._settle(index, accepted, result)
            return

        self.stage = "message body"
        await proto.sendBody(body, self._envelopeAhead(index + 1))
        self.stage = "end of data"
        final = await proto.reply()
        self._settle(index, accepted, _outcome(final, "end of data"))

    async def _abandonData(self):
        """The next hop said 354 with no valid recipient: end an empty DATA."""
        self.stage = "end of data"
        self.proto.send(".")
        await self.proto.reply()
        self.needReset = True

    async def _quit(self):
        """Say QUIT (if the connection is still up) and wait for it to close."""
        proto = self.proto
        if proto is None:
            return
        if proto.lostReason is None:
            self.stage = "QUIT"
            try:
                await proto.command("QUIT")
            except Exception:
                pass
        if proto.lostReason is None:
            proto.setTimeout(self.options.timeout)
            proto.transport.loseConnection()
        await proto.closed


def deliver(reactor, host, port, messages, options):
    """
    Deliver C{messages} to the SMTP server at C{host}:C{port} over one
    connection.

    @param reactor: the reactor to connect with.
    @param host: an IPv4/IPv6 literal or a host name.
    @param messages: a list of L{OutboundMessage}.
    @param options: L{DeliveryOptions}.
    @return: a L{Deferred} firing with one dict per message (same order),
        mapping each recipient to its L{RecipientResult}.  Failures to
        connect, time-outs, TLS failures and lost connections are reported as
        temporary results, not as errbacks.
    """
    if not messages:
        return succeed([])
    return Deferred.fromCoroutine(Connection(reactor, host, port, options).carry(messages))
