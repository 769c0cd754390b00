"""
The trusted verbs (XCLIENT, XREMOTEIP, XSETCONTEXT, XDUMPCONTEXT) in the
session: who may run them, and the session as the verbs see it
(L{relaygw.verbs.IVerbSession}).  A verb returns a
L{relaygw.verbs.Outcome}, and L{TrustedVerbs._verbOutcome} is the one place
its refusals are applied.  A mixin of L{relaygw.protocol.SMTPSession},
which keeps C{trusted}, C{context}, C{settings} and the reply machinery.
"""

from twisted.internet import defer
from zope.interface import implementer

from relaygw import codes
from relaygw.logs import Logger
from relaygw.verbs import IVerbSession

log = Logger(namespace="relaygw.smtp")


@implementer(IVerbSession)
class TrustedVerbs:
    """Dispatch of the trusted verbs, and the session interface they use."""

    def trustedVerb(self, verb, args):
        """A verb the session core does not know: a trusted verb this listener enables, or 500 5.5.2."""
        verbImpl = self.factory.verbs.get(verb)
        if verbImpl is None:
            return self.reply(codes.UNKNOWN_COMMAND)
        if verb.lower() not in self.listener.extensions:
            return self.reply(codes.NOT_IMPLEMENTED)
        if verb == "XCLIENT" and not self.trusted and (self.inTransaction or not args):
            # Postfix's order: a transaction (503) and missing
            # attributes (501) are reported before the trust refusal.
            return self._runVerb(verb, verbImpl, args)
        if not self.trusted:
            log.warn("[{session}] refused {verb} from untrusted peer [{peer}]",
                     session=self.sessionId, verb=verb, peer=self.context["peer_ip"])
            self.factory.stats("verb_refused", verb)
            return self.reply(codes.VERB_UNTRUSTED)
        self.factory.stats("verb_used", verb)
        return self._runVerb(verb, verbImpl, args)

    def resetIdentity(self, keepAuth=False, helo=None):
        self.resetSession(keepHelo=False, keepAuth=keepAuth)
        if helo is not None:
            self.helo = ("HELO", helo)

    def audit(self, verb, changes, renew=False):
        """
        Log an accepted override with the real peer and old/new values; with
        C{renew}, the session takes a new id, named on the same line.
        """
        session = self.sessionId
        renewed = self.newSession() if renew else None
        log.info(
            "[{session}] {verb} from [{peer}] accepted: {changes}" + ("; new session {renewed}" if renew else ""),
            session=session, verb=verb, peer=self.context["peer_ip"], renewed=renewed,
            changes=", ".join("%s %r -> %r" % (k, old, new) for k, (old, new) in changes.items()),
        )

    def rerunConnectPolicy(self):
        """
        A new identity: count the session against the claimed client
        address (over the per-IP limits: 421 4.7.0 and close), then the
        connect policy's refusal or C{None} (or a Deferred of one).
        """
        def then(refusal):
            return refusal if refusal is not None else self.connectPolicy()

        return self._ask(self.factory.clientClaimed(self), then)

    def _runVerb(self, verb, impl, args):
        result = impl(self, args)
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._verbOutcome, verb)
        return self._verbOutcome(result, verb)

    def _verbOutcome(self, outcome, verb):
        """Apply a trusted verb's L{relaygw.verbs.Outcome}: the one place its refusals are applied."""
        if outcome.refused is not None:
            log.info("[{session}] {verb} from [{peer}] refused: {why}", session=self.sessionId,
                     verb=verb, peer=self.context["peer_ip"], why=outcome.refused)
            self.factory.stats("verb_refused", verb)
        if outcome.sessionRefused:
            return self._refuseSession(outcome.reply)
        return self.reply(outcome.reply, outcome.lines)
