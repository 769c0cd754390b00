"""
The SMTP client that hands messages to a next hop: the conversation.

L{deliver} opens one connection, negotiates (EHLO/HELO, STARTTLS, AUTH,
XCLIENT), sends every message on it and returns one result per recipient.
Every outcome, including a refused connection, a timeout or a TLS failure,
comes back as a result: the returned L{Deferred} does not fail.  A recipient
is only ever reported as accepted (2xx) when the next hop acknowledged its
message with a 2xx reply to the end of data.

The conversation is the coroutine L{Connection.carry}; its parts live
beside it, one concern each (as Haraka's outbound/ does):

  - L{relaygw.relay.clientwire}: the wire protocol (command lines, replies);
  - L{relaygw.relay.body}: the body producer (dot-stuffing, flow control);
  - L{relaygw.relay.negotiation}: connect, EHLO, STARTTLS, AUTH;
  - L{relaygw.relay.identity}: XCLIENT/XFORWARD identity forwarding;
  - L{relaygw.relay.transaction}: one message's MAIL, RCPT, DATA and body,
    pipelined, with the next envelope sent behind its end of data;
  - L{relaygw.relay.settlement}: each recipient's result, timed and
    reported, and what a refusal or a broken-down session means.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from relaygw.logs import Logger
from relaygw.relay.clientwire import _MessageFailure, _SessionFailure, _temporary
from relaygw.relay.clientwire import RecipientResult  # noqa: F401 (the results of deliver, named here for its callers)
from relaygw.relay.identity import IdentityForwarding
from relaygw.relay.negotiation import Negotiation
from relaygw.relay.nexthop import NOT_SENT, STOPPED, WITHDRAWN
from relaygw.relay.settlement import Settlement
from relaygw.relay.transaction import Transaction
from relaygw.spoolapi import Withdrawn

log = Logger(namespace="relaygw.relay.client")


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
        start (a spooled message's C{openForDelivery}, which may raise
        L{relaygw.spoolapi.Withdrawn}); used instead of C{bodyPath}.
    @ivar context: the original client's connection-level validation context
        (C{remote_ip}, C{remote_port}, C{remote_name}, C{ehlo_domain},
        C{protocol}, C{auth_user} are forwarded with XCLIENT/XFORWARD).
    @ivar size: the content size, or C{None} to take it from the file.
    @ivar mailParams: the parameters MAIL was given (C{RET} and C{ENVID}
        go on to a next hop that offers DSN), or C{None}.
    @ivar rcptParams: C{{recipient: {"NOTIFY": ..., "ORCPT": ...}}} for the
        recipients given DSN parameters (RFC 3461), or C{None} when none was.
    """

    mailfrom: str
    recipients: list
    bodyPath: str = ""
    bodyOffset: int = 0
    context: dict = field(default_factory=dict)
    size: Optional[int] = None
    openBody: Optional[Callable] = None
    mailParams: Optional[dict] = None
    rcptParams: Optional[dict] = None


@dataclass
class DeliveryOptions:
    """
    How to talk to the next hop.

    @ivar heloName: the name to send with EHLO/HELO.
    @ivar tls: C{"none"}, C{"may"} (STARTTLS when offered, no certificate
        check) or C{"verify"} (STARTTLS required, certificate verified).
    @ivar tlsHostname: the name the certificate must match under
        C{"verify"} (default: the host given to L{deliver}).
    @ivar clientTLS: the next hop's L{relaygw.tls.ClientTLS} (its CA bundle
        for C{"verify"}; C{None}: the platform's trust).
    @ivar auth: C{(user, password)} for AUTH PLAIN (or LOGIN) when offered.
    @ivar forwardIdentity: pass the original client's identity on with
        XCLIENT (preferred) or XFORWARD when the next hop offers them.
    @ivar timeout: seconds to wait for each reply (twice that for the reply
        to an end of data) and for body progress.
    @ivar ownNames: the gateway's own host names, lower case: a next hop on
        port 25 answering EHLO/HELO with one of them is the gateway itself
        (L{relaygw.relay.negotiation}).
    @ivar destination: what the mail is for, in the outcome of such a loop
        (C{"mail for DESTINATION loops back to myself"}): the recipient
        domain of MX delivery (default: the host connected to).
    @ivar bestMX: the host is of the destination's best MX preference, or
        the only kind there is (a smarthost, a domain without MX): a loop
        through it bounces, through a worse one it is deferred.
    """

    heloName: str
    tls: str = "may"
    tlsHostname: Optional[str] = None
    clientTLS: Optional[object] = None
    auth: Optional[tuple] = None
    forwardIdentity: bool = False
    timeout: float = 300
    ownNames: frozenset = frozenset()
    destination: Optional[str] = None
    bestMX: bool = True


class Connection(Negotiation, IdentityForwarding, Transaction, Settlement):
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
        self.opened = reactor.seconds()
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
        self.brokeDown = False  # (the last carry's session broke down: see L{_brokenDown})
        self.peerIP = None
        self.current = None  # the index of the message under way
        self.currentFrom = 0  # the replies read before it
        self.setupStarted = self.setupTime = None
        self.sendStarted = {}

    # The conversation

    @property
    def usable(self):
        """Whether the connection is open and may carry another batch."""
        proto = self.proto
        return proto is not None and proto.lostReason is None and proto.violation is None and not self.broken

    broken = False

    settled = None
    settledSome = None

    #: What every recipient not yet settled gets once L{cut} has ended the connection.
    cutResult = None

    #: The connection attempt under way (L{Negotiation._open}), for L{cut}.
    connecting = None

    #: Set by L{wrapUp}: no transaction starts after the one under way.
    wrappedUp = False

    #: The messages of the batch given back before they began (L{takeBack}).
    takenBack = frozenset()

    def takeBack(self, index, result):
        """
        Message C{index} of the batch is not sent on this connection, and
        its recipients get C{result} at once, unless it has begun or its
        envelope may have gone out behind the message under way.  Whether
        it was taken back.
        """
        begun = 0 if self.current is None else self.current + 1  # (the first: the connection is its own)
        if index <= begun or index in self.reported:
            return False
        self.takenBack = self.takenBack | {index}
        self._settle(index, self.messages[index].recipients, result)
        return True

    def wrapUp(self):
        """
        The gateway is stopping: finish the transaction under way and start
        no other; each message not begun gets L{STOPPED}.  The connection
        is not kept (an envelope may have gone out ahead): it is closed once
        its batch has ended.
        """
        self.wrappedUp = True
        self.broken = True

    def cut(self, result):
        """
        End the connection at once (the gateway is stopping): the batch it
        carries ends, and each recipient not yet settled gets C{result}.
        """
        self.cutResult = result
        self.broken = True
        if self.connecting is not None:
            self.connecting.cancel()
        if self.proto is not None:
            self.proto.abort()

    async def carry(self, messages, keepOpen=False, settled=None, settledSome=None):
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
        @param settledSome: called with C{(index, results)}: the final
            results (accepted, refused for good) of some of message
            C{index}'s recipients, when the others go on in a transaction
            of their own (L{relaygw.relay.transaction}).
        """
        self.messages, self.results = messages, [{} for _ in messages]
        self.settled, self.reported, self.takenBack = settled, set(), frozenset()
        self.settledSome = settledSome
        self.brokeDown = False
        self.current = None
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
                    if self.wrappedUp:
                        break
                    if index in self.takenBack:
                        continue
                    try:
                        await self._transaction(index, message)
                    except _MessageFailure as e:
                        self._settle(index, message.recipients, e.result)
                if not keepOpen:
                    await self._quit()
            except _SessionFailure as e:
                self._brokenDown(e.result)
                self.broken = True
                await self._quit()
            except Exception:
                self.broken = True
                self._brokenDown(await self._describe(Failure()))
        except Exception:
            self.broken = True
            log.failure("{where}: delivery failed", where=self.where)
            self._settleAll(_temporary("local error delivering to %s" % (self.where,), "4.3.0"))
        if self.ahead is not None:
            self.ahead[0].close()
            self.ahead = None
        self._settleAll(self.cutResult or (STOPPED if self.wrappedUp else
                                           _temporary("no reply from %s" % (self.where,), "4.4.2")))
        # A kept-open connection the next hop closed (its idle timeout)
        # before answering anything: no message got as far as its body.
        self.stale = kept is not None and kept.replyCount == replies and kept.lostReason is not None \
            and not kept.timedOut and kept.violation is None and self.cutResult is None
        if self.proto is not None and not (keepOpen and self.usable):
            self.broken = True
            self.proto.abort()
        return self.results

    def _brokenDown(self, result):
        """
        The session broke down: the message under way (and every one before
        it still open) gets C{result}, each message after it L{NOT_SENT}, as
        does the one under way when nothing of it was answered (its
        envelope at most went out ahead) or only a 421 on a connection
        that carried a message before.  All of them get C{result} when
        none was reached (the connection itself failed) or the gateway cut
        the connection.
        """
        self.brokeDown = True
        current, proto = self.current, self.proto
        if current is not None and proto is not None:
            answered = proto.replyCount - self.currentFrom
            if answered == 1 and self._doneCarrying(proto.last.code):  # (with the envelope sent ahead)
                current -= 1  # (-1: a used connection that reached none)
            elif not answered:
                current = current - 1 if current > 0 else None
        for index, message in enumerate(self.messages):
            reached = current is None or index <= current or result.untried
            self._settle(index, message.recipients, result if reached else NOT_SENT)

    async def close(self):
        """Say QUIT and close (a kept-open connection that is no longer needed)."""
        self.broken = True
        try:
            await self._quit()
        except Exception:
            log.failure("{where}: QUIT failed", where=self.where)
        if self.proto is not None:
            self.proto.abort()

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
        except Withdrawn:
            raise _MessageFailure(WITHDRAWN)
        except OSError as e:
            if report:
                log.error("{where}: cannot read the message: {e}", where=self.where, e=e)
            raise _MessageFailure(_temporary("cannot read the message: %s" % (e.strerror or e,), "4.3.0"))

    async def _transaction(self, index, message):
        self.current, self.currentFrom = index, self.proto.replyCount
        self.sendStarted[index] = self.reactor.seconds()
        ahead, self.ahead = self.ahead, None
        body, size = ahead or self._openBody(message)
        try:
            await self._send(index, message, body, size, sent=ahead is not None)
        finally:
            try:
                body.close()
            except OSError:
                pass  # (EIO, EINTR: a file only read loses nothing, and its descriptor is gone all the same)

    async def _quit(self):
        """Say QUIT (if the connection is still up) and wait for it to close."""
        proto = self.proto
        if proto is None:
            return
        if proto.lostReason is None and proto.closingReply is None:  # (no one to say QUIT to)
            self.stage = "QUIT"
            try:
                await proto.command("QUIT")
            except Exception:
                pass
        if proto.lostReason is None:
            proto.closeWithin(self.options.timeout)
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
