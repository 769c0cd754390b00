"""
The SMTP session's life as a connection.  Its start, up to the greeting:
the listener's settings pinned, the connection's context and trust
verdict, admission (per-IP and connection limits, draining), the
anonymous login of an ALWAYS-ALLOW listener, the connect policy, the
greeting delay and the early-talker check, or the policy's refusal in
place of the greeting (then 503 to all but QUIT).  Its end: the idle
timeout, the gateway's drain and shut-down, and the clean-up when the
connection is lost.  A mixin of L{relaygw.protocol.SMTPSession}, which
keeps C{mode}, C{waiting} and the reply machinery.
"""

import itertools
import os

from twisted.internet import defer
from twisted.python.failure import Failure

from relaygw import codes, maillog, wire
from relaygw.context import connectionContext
from relaygw.linereader import LineReader
from relaygw.logs import Logger
from relaygw.modes import CLOSED, COMMAND, DATA

log = Logger(namespace="relaygw.smtp")


#: Session ids: 48 bits counted up from a random start in each process, so
#: that they differ between workers and restarts without a getrandom(2)
#: call for every connection.
_sessionIds = itertools.count(int.from_bytes(os.urandom(6), "big"))


def newSessionId():
    return "%012x" % (next(_sessionIds) & 0xFFFFFFFFFFFF)


class Lifecycle:
    """From C{connectionMade} to the greeting, and from the end of the session to C{connectionLost}."""

    _greetTimer = None

    def connectionMade(self):
        f = self.factory
        wire.noDelay(self.transport)
        wire.boundBuffers(self.transport)
        self.transport.registerProducer(self, True)
        self.settings = f.settings
        self.listener = self.settings.listener
        self.hostname = self.listener.hostname
        self.lineReader = LineReader(self.listener.max_line_length, self.listener.bare_lf == "reject")
        self.sessionId = newSessionId()
        proxied = f.proxyInfo(self.transport)
        self.context = connectionContext(self.sessionId, self.listener.name, self.transport.getPeer(),
                                         self.transport.getHost(), proxied)
        # Trust is decided once, here, from facts the client cannot forge;
        # it grants the trusted verbs, never relaying.
        self.verdict = self.settings.trust.forConnection(self.context["peer_ip"], proxied)
        self.trusted = self.verdict.trusted
        self.context.update(trusted=self.trusted)
        f.sessionStarted(self)
        self.setTimeout(self.listener.idle_timeout)
        maillog.connect(self.sessionId, self.context, self.listener.name)
        if proxied is not None and proxied.peer is not None:
            # The balancer stays out of Received (unless received_shows_peer), not out of the log.
            log.info("[{session}] proxied by [{balancer}]:{port}", session=self.sessionId,
                     balancer=self.context["proxy_peer_ip"], port=self.context["proxy_peer_port"])
        self._wait(self._ask(f.admit(self), self._admitted))

    def _admitted(self, refusal):
        if refusal is not None:
            self.reply(refusal)
            return None
        if self.settings.portal is not None and self.listener.always_allow:
            d = self._loginAnonymous()
            return d.addCallback(lambda _: self._ask(self.connectPolicy(), self._greet))
        return self._ask(self.connectPolicy(), self._greet)

    def connectPolicy(self):
        """
        The connect policy's answer for the client as the session now
        knows it: a refusal, C{None}, or a Deferred of one.  A policy that
        fails (its lookup backend down, say) refuses the session for now,
        421 4.3.0 and close: a failed check never lets a client in, and
        never leaves one waiting for a greeting (Postfix fails such checks
        closed too).
        """
        try:
            result = self.settings.policy.connect(self.context)
        except Exception:
            return self._policyFailed(Failure())
        if isinstance(result, defer.Deferred):
            return result.addErrback(self._policyFailed)
        return result

    def _policyFailed(self, failure):
        log.failure("[{session}] the connect policy failed", failure, session=self.sessionId)
        return codes.UNAVAILABLE.format(host=self.hostname)

    def _greet(self, refusal):
        if refusal is not None:
            self._refuseSession(refusal)
            return None
        delay = self.listener.greet_delay
        if delay:
            d = defer.Deferred()
            self._greetTimer = self.factory.reactor.callLater(delay, d.callback, None)
            d.addCallback(lambda _: self._sendGreeting())
            return d
        self._sendGreeting()
        return None

    def _sendGreeting(self):
        if self.mode == CLOSED:
            return
        self.greeted = True
        if self.lineReader.pending:
            # Input before the greeting: a protocol synchronisation error.
            self.reply(codes.EARLY_TALKER)
            return
        self.reply(codes.GREETING.format(host=self.hostname))

    def _refuseSession(self, refusal):
        """
        The connect policy refused the client: this reply instead of a
        greeting (Postfix), then 503 to all but QUIT.
        """
        self.refusedSession = refusal
        self.greeted = True
        return self.reply(refusal)

    def timeoutConnection(self):
        maillog.closed(self.sessionId, self.context, "timeout", self.lastCommand[0])
        timeout = codes.DATA_TIMEOUT if self.mode == DATA else codes.TIMEOUT
        self.reply(timeout.format(host=self.hostname), unasked=True)

    def drain(self):
        """
        The gateway is shutting down: an idle session is told 421 4.3.2
        now; one inside a transaction may finish it first.
        """
        if self.mode == COMMAND and not self.inTransaction and self.waiting is None:
            self.reply(codes.SHUTTING_DOWN.format(host=self.hostname), unasked=True)

    #: A message's commit is under way (L{relaygw.transaction}): its reply comes before a shutdown's.
    committing = False
    _shutDownAfterCommit = False
    #: Whether the client was lost, when the connection ended during a commit.
    _endAfterCommit = None

    def shutDown(self):
        """
        The drain timeout ran out: 421 4.3.2 and close, whatever the state;
        but a message whose commit is under way gets its own reply first (a
        421 now, and the message queued after all, would have the client
        send it again).
        """
        if self.committing:
            self._shutDownAfterCommit = True
            return
        if self.mode != CLOSED:
            if self.writer is not None:
                self.writer.abort()
                self.writer = None
            self.mode = COMMAND
            maillog.closed(self.sessionId, self.context, "shutting down", self.lastCommand[0])
            self.reply(codes.SHUTTING_DOWN.format(host=self.hostname), unasked=True)

    def connectionLost(self, reason):
        self.setTimeout(None)
        from OpenSSL import SSL

        if reason.check(SSL.Error):
            log.info("[{session}] " + ("TLS error: {why}" if self.tlsActive else "TLS handshake failed: {why}"),
                     session=self.sessionId, why=reason.getErrorMessage())
        # Neither QUIT nor a closing reply of ours ended it: the client went away.
        lost = self.mode != CLOSED
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.mode = CLOSED
        if self._greetTimer is not None and self._greetTimer.active():
            self._greetTimer.cancel()
        self.cancelCloseTimers()
        if self.avatar is not None:
            self.avatar = None
        if self.committing:
            # The client left after its final dot: the message is queued
            # (or refused) first, and the session ends after it, logged as
            # Postfix logs it (its queued line, then data=1).
            self._endAfterCommit = lost
        else:
            self._ended(lost)

    def _ended(self, lost):
        if lost:
            maillog.closed(self.sessionId, self.context, "lost connection", self.lastCommand[0])
        self.factory.sessionEnded(self)
        maillog.disconnect(self.sessionId, self.context, self.commandCounts)
