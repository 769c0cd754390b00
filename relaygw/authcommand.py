"""
The AUTH command (RFC 4954) of the SMTP session: the SASL exchange
(L{relaygw.sasl}), the brute-force limiter checked before the portal is
asked (L{relaygw.auth.FailureTracker}), and the login through the cred
portal.  A mixin of L{relaygw.protocol.SMTPSession}.
"""

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from relaygw import codes, sasl
from relaygw.auth import PasswordFileError
from relaygw.logs import Logger
from relaygw.modes import AUTH, CLOSED, COMMAND

log = Logger(namespace="relaygw.smtp")


#: The longest SASL response line (RFC 4954 section 4 counts 12288 octets
#: enough for deployed mechanisms; Postfix's smtpd_sasl_response_limit),
#: whatever shorter C{max_line_length} the listener sets for commands.  The
#: AUTH command line itself, initial response included, keeps that limit
#: (a client with a longer one sends it after the 334 instead).
SASL_RESPONSE_LIMIT = 12288


class AuthCommand:
    """C{do_AUTH} and the login it leads to."""

    sasl = None

    def do_AUTH(self, args):
        f = self.factory
        if self.settings.portal is None:
            return self.reply(codes.NOT_IMPLEMENTED)
        if self.context.get("auth_user"):
            # Also on ALWAYS-ALLOW listeners: the session is already
            # authenticated as anonymous (protocol.md section 9).
            return self.reply(codes.AUTH_ALREADY)
        if not (self.tlsActive or self.listener.auth_plaintext):
            return self.reply(codes.AUTH_NEEDS_TLS)
        if self.inTransaction:
            return self.reply(codes.AUTH_IN_TRANSACTION)
        return self._ask(f.authFailures.lockedOut(self.context["remote_ip"]), lambda locked: self._begin(args, locked))

    def _begin(self, args, locked):
        if self.mode == CLOSED:  # (the client went while worker 0 was asked: no exchange to begin)
            return None
        if locked:
            self.factory.stats("auth", "locked")
            return self.reply(codes.AUTH_LOCKED)
        try:
            self.sasl = sasl.Exchange.begin(args)
        except sasl.SASLError as e:
            return self.reply(e.reply)
        self.mode = AUTH
        self.lineReader.limit = max(self.listener.max_line_length, SASL_RESPONSE_LIMIT)
        return self._authOutcome(self.sasl.first())

    def endExchange(self):
        """Back to commands (and their line limit) after a SASL exchange."""
        self.mode = COMMAND
        self.sasl = None
        self.lineReader.limit = self.listener.max_line_length

    def _authStep(self, line):
        return self._authOutcome(self.sasl.respond(line))

    def _authOutcome(self, outcome):
        """Apply what the SASL exchange said: challenge, refuse, or verify."""
        if isinstance(outcome, sasl.Challenge):
            return self.reply(codes.AUTH_CHALLENGE.format(challenge=outcome.text))
        self.endExchange()
        if isinstance(outcome, sasl.Refused):
            return self.reply(outcome.reply)
        if outcome.authzid and outcome.authzid != outcome.user:
            # RFC 4616: acting for another identity needs an
            # authorisation no one here has.
            return self._refuseAuthzid(outcome.user, outcome.authzid)
        return self._login(outcome.user, outcome.password)

    def _login(self, user, password):
        """
        Verify C{user} and C{password} through the portal, unless the
        claimed client address is locked out for failed logins (then no
        password is hashed at all); after recent failures the verification
        waits first.
        """
        from relaygw.auth import IRelayUser, SessionPassword

        f = self.factory
        tracker = f.authFailures
        who = self.context["remote_ip"]
        # A guess queued behind others is not hashed once its client has gone.
        credentials = SessionPassword(user.encode("utf-8"), password.encode("utf-8"), lambda: self.mode != CLOSED)

        def verify(wait):
            if wait is None:
                f.stats("auth", "locked")
                log.info("[{session}] AUTH refused: [{ip}] is locked out after failed logins",
                         session=self.sessionId, ip=who)
                return self.reply(codes.AUTH_LOCKED)
            if wait:
                d = task.deferLater(f.reactor, wait, self.settings.portal.login, credentials, None, IRelayUser)
            else:
                d = self.settings.portal.login(credentials, None, IRelayUser)
            return d.addCallbacks(ok, bad)

        def ok(result):
            tracker.end(who, failed=False)
            _, avatar, _ = result
            self._setAuth(avatar.username, "AUTH")
            f.stats("auth", "success")
            log.info("[{session}] authenticated as {user}", session=self.sessionId, user=avatar.username)
            self.reply(codes.AUTH_OK)

        def bad(failure):
            if failure.check(defer.CancelledError):  # (the client went away: nothing verified, no one to answer)
                tracker.end(who, failed=False)
                return None
            if not failure.check(UnauthorizedLogin):
                tracker.end(who, failed=False)
                if failure.check(PasswordFileError):
                    log.error("[{session}] auth backend error: {why}", session=self.sessionId, why=failure.value)
                else:
                    log.failure("[{session}] auth backend error", failure, session=self.sessionId)
                self.reply(codes.AUTH_UNAVAILABLE)
                return None
            f.stats("auth", "failure")
            log.info("[{session}] authentication failed for {user}", session=self.sessionId, user=user)
            return self._failed(who)

        return self._ask(tracker.begin(who), verify)

    def _failed(self, who):
        """A failed attempt of C{who}'s: counted, then 535 5.7.8, or 421 once it has too many."""
        def reply(tooMany):
            self.reply(codes.AUTH_TOO_MANY.format(host=self.hostname) if tooMany else codes.AUTH_FAILED)

        return self._ask(self.factory.authFailures.end(who, failed=True), reply)

    def _refuseAuthzid(self, user, authzid):
        """
        RFC 4616: an authorisation identity other than the authentication
        identity is refused with 535 5.7.8 like a failed login (counted,
        after the same wait), without looking at the password.
        """
        f = self.factory
        who = self.context["remote_ip"]
        log.info("[{session}] AUTH PLAIN as {user} for {authzid} refused", session=self.sessionId,
                 user=user, authzid=authzid)

        def decide(wait):
            if wait is None:
                f.stats("auth", "locked")
                return self.reply(codes.AUTH_LOCKED)

            def counted(_=None):
                f.stats("auth", "failure")
                return self._failed(who)

            if wait:
                return task.deferLater(f.reactor, wait, counted)
            return counted()

        return self._ask(f.authFailures.begin(who), decide)

    def _loginAnonymous(self):
        from relaygw.auth import IRelayUser

        d = self.settings.portal.login(Anonymous(), None, IRelayUser)
        d.addCallback(lambda result: self._setAuth(result[1].username, "ALWAYS-ALLOW"))
        return d

    def _setAuth(self, user, how):
        self.avatar = user
        self.context.update(auth_user=user, auth_name=how, auth_status="pass")
