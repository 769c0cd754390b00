"""
Settling a delivery's outcomes: each recipient's result, stamped with the
relay it went to and how long set-up and transmission took, reported as
soon as a message has them all; and what a refusal or a broken-down
session means for the recipients (permanent or temporary, which code).
"""

from OpenSSL import SSL
from service_identity import VerificationError

from relaygw.logs import Logger
from relaygw.relay.body import UnreadableBody, _BodyInterrupted
from relaygw.relay.clientwire import RecipientResult, _SessionFailure, _temporary

log = Logger(namespace="relaygw.relay.client")


class Settlement:
    """The part of a L{relaygw.relay.client.Connection} that settles results."""

    def _timed(self, index, result):
        """C{result} with where it came from and how long it took, for the mail log."""
        now = self.reactor.seconds()
        setup = self.setupTime
        if setup is None:
            setup = now - self.setupStarted if self.setupStarted is not None else 0.0
        started = self.sendStarted.get(index)
        # (an MX host is connected to by address: its name is the one its certificate is checked against)
        name = self.options.tlsHostname or self.host
        relay = "%s[%s]:%d" % (name, self.peerIP, self.port) if self.peerIP else None
        return result.located(relay, max(0.0, setup), max(0.0, now - started) if started is not None else 0.0)

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

    def _settledSome(self, index):
        """
        The final results message C{index} has so far (accepted, refused for
        good), reported while its other recipients go on in another
        transaction, so that they are made durable now: a crash during that
        transaction does not send to them again.
        """
        final = {rcpt: r for rcpt, r in self.results[index].items() if r.ok or r.permanent}
        if self.settledSome is not None and final and index not in self.reported:
            try:
                self.settledSome(index, final)
            except Exception:
                log.failure("{where}: reporting an outcome failed", where=self.where)

    def _settleAll(self, result):
        for index, message in enumerate(self.messages):
            self._settle(index, message.recipients, result)

    @staticmethod
    def _closing(*replies):
        """
        Stop at a 421 among C{replies}, whatever command it answers: the
        next hop is closing the connection (RFC 5321 3.8), and nothing more
        goes out on it.  The message under way is deferred with that reply,
        those behind it go on another connection
        (L{relaygw.relay.client.Connection._brokenDown}).
        """
        for reply in replies:
            if reply is not None and reply.closing:
                raise _SessionFailure(reply.result())

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
        """
        The result describing why the session broke down: a temporary one,
        the next hop's refusal of the body before its end (the wire's
        C{early}), or the 421 it said it was closing with.
        """
        if self.cutResult is not None:  # (the connection was cut on purpose: the failure says nothing)
            if self.proto is not None:
                await self.proto.closed
            return self.cutResult
        if self.proto is None:
            return _temporary(
                "connection to %s failed: %s" % (self.where, failure.getErrorMessage()),
                "4.4.1",
            )
        proto = self.proto
        if failure.check(UnreadableBody):
            # The spool failed, not the next hop: one line (as a message that
            # cannot be opened gets), and the connection goes without an end of data.
            log.error("{where}: cannot read the message: {error}", where=self.where, error=failure.value.error)
            proto.abort()
            await proto.closed
            return _temporary(str(failure.value), "4.3.0")
        expected = failure.check(_BodyInterrupted) or (
            proto.lostReason is not None and failure.value is proto.lostReason.value
        )
        if not expected and not proto.timedOut and not proto.violation:
            log.failure("{where}: unexpected error during {stage}", failure, where=self.where, stage=self.stage)
        proto.abort()
        await proto.closed
        reason = proto.lostReason
        if proto.early is not None:
            return proto.early.result()
        if proto.closingReply is not None:
            return proto.closingReply.result()
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
