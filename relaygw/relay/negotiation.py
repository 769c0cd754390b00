"""
Opening a session with a next hop: connect, greeting, EHLO/HELO (and
whether the next hop is the gateway itself), STARTTLS (by the C{tls}
policy) and AUTH.
"""

import base64

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol

from relaygw import tls, wire
from relaygw.logs import Logger
from relaygw.relay.clientwire import _extensions, _SessionFailure, _SMTPClientProtocol, _temporary
from relaygw.relay.mx import SMTP_PORT
from relaygw.relay.nexthop import loopsBack

log = Logger(namespace="relaygw.relay.client")


class Negotiation:
    """The part of a L{relaygw.relay.client.Connection} that opens the session."""

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
        self.connecting = connectProtocol(self._endpoint(), proto)
        try:
            await self.connecting
        finally:
            self.connecting = None
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

    async def _hello(self, name=None, extended=True, refusal=_SessionFailure):
        """
        EHLO, or HELO if it is refused (or, without C{extended}, HELO only:
        a session with no extensions).  A refusal other than a 421 raises
        C{refusal} with the next hop's reply.
        """
        name = name or self.options.heloName
        reply = None
        if extended:
            self.stage = "EHLO"
            reply = await self.proto.command("EHLO " + name)
            if reply.positive:
                self._notMyself(reply)
                self.extensions = _extensions(reply)
                return
        # (any other refusal of EHLO: the old protocol may do, as Postfix's client tries)
        if reply is None or reply.code != 421:
            self.stage = "HELO"
            reply = await self.proto.command("HELO " + name)
            if reply.positive:
                self._notMyself(reply)
                self.extensions = {}
                return
        failure = _SessionFailure if reply.code == 421 else refusal
        raise failure(self._refused(reply, self.stage, permanentAllowed=True))

    def _notMyself(self, reply):
        """
        A next hop on port 25 whose EHLO/HELO reply begins with one of the
        gateway's own names is the gateway: the mail would loop (Postfix's
        smtp_helo, against myhostname).  On another port it is no loop: a
        content filter on the same machine may answer with the same name.
        """
        name = (reply.lines[0].split() or [""])[0]
        if self.port != SMTP_PORT or name.lower() not in self.options.ownNames:
            return
        log.warn("host {where} replied to HELO/EHLO with my own hostname {name}", where=self.where, name=name)
        raise _SessionFailure(loopsBack(self.options.destination or self.host, self.options.bestMX))

    def _tlsOptions(self):
        settings = self.options.clientTLS or tls.platformClientTLS()
        return settings.creator(self.options.tlsHostname or self.host, self.options.tls == "verify")

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
        self._closing(reply)
        if not reply.positive:
            if policy == "verify":
                raise _SessionFailure(self._refused(reply, "STARTTLS"))
            log.info("{where}: STARTTLS refused ({reply}), continuing in plaintext", where=self.where, reply=reply)
            return
        self.proto.startTLS(contextFactory)
        try:
            await self._hello()
        except BaseException:
            # Opportunistic TLS that fails (the handshake, or EHLO over it):
            # like Postfix, the next hop tries this host again without TLS,
            # unless that would send AUTH credentials in the clear.
            self.retryPlain = policy == "may" and not self.options.auth
            raise
        log.info("{where}: TLS established ({policy})", where=self.where, policy=policy)

    #: Whether this connection's opportunistic TLS failed and the host may
    #: be tried again in plaintext (see L{_startTLS}).
    retryPlain = False

    async def _authenticate(self):
        if not self.options.auth:
            return
        if not self.proto.tlsEstablished and self.options.tls != "none":
            # STARTTLS missing from the EHLO reply, or refused: as a man in
            # the middle would make it.  The password goes out in the clear
            # only where the config says there is no TLS (tls = "none"), as
            # Postfix's smtp_sasl_security_options = noplaintext.
            raise _SessionFailure(
                _temporary("not sending AUTH credentials to %s without TLS" % (self.where,), "4.7.4")
            )
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
