"""
STARTTLS (RFC 3207) for the SMTP session: the command, with the
CVE-2011-0411 fix (plaintext pipelined after STARTTLS is discarded), the
C{require_tls} check the dispatch asks before most commands, and the
completed handshake (implicit TLS too), which records TLS in the context
and may make a verified client certificate trusted.  A mixin of
L{relaygw.protocol.SMTPSession}, which keeps C{lineReader}, C{tlsActive},
C{verdict} and C{trusted}.
"""

from relaygw import codes, tls, wire
from relaygw.logs import Logger

log = Logger(namespace="relaygw.smtp")


class StartTLS:
    """C{do_STARTTLS}, C{_needsTLS} and C{handshakeCompleted}."""

    def _needsTLS(self):
        return self.listener.require_tls and not self.tlsActive

    def do_STARTTLS(self, args):
        if args:
            return self.reply(codes.SYNTAX.format(what="STARTTLS"))
        if self.tlsActive:
            return self.reply(codes.TLS_ACTIVE)
        if self.settings.tls is None:
            return self.reply(codes.TLS_UNAVAILABLE)
        self.reply(codes.READY_TLS)
        # CVE-2011-0411: whatever followed STARTTLS in plaintext is discarded.
        discarded = self.lineReader.take()
        if discarded:
            log.warn("[{session}] discarded {n} octets of plaintext pipelined after STARTTLS",
                     session=self.sessionId, n=len(discarded))
        self.resetSession()
        tls.startTLS(self.transport, self.settings.tls.contextFactory)
        wire.tlsWritesAtOnce(self.transport)

    def handshakeCompleted(self):
        """TLS is up (STARTTLS or implicit): record it in the context."""
        self.tlsActive = True
        info = self.factory.tlsInfo(self.transport)
        self.context.update(**info)
        verdict = self.settings.trust.afterHandshake(self.transport, self.verdict)
        if verdict.trusted and not self.trusted:
            # A verified client certificate is as good as a trusted address.
            self.verdict, self.trusted = verdict, True
            self.context.update(trusted=True, tls_client_verified=True)
            log.info("[{session}] trusted by client certificate {subject}", session=self.sessionId,
                     subject=info.get("tls_client_cert_subject"))
        log.info("[{session}] TLS established {tls} {cipher}", session=self.sessionId,
                 tls=info.get("tls"), cipher=info.get("tls_cipher"))
        self.factory.stats("tls_handshakes")
