"""
HELO and EHLO for the SMTP session (RFC 5321 section 4.1.1.1): the
greeting command, the helo policy, and the EHLO keywords this session
offers (the extensions, in a stable order, and their rendering into the
250 reply).  A mixin of L{relaygw.protocol.SMTPSession}, which keeps
C{helo}, C{tlsActive} and C{trusted}.
"""

from relaygw import codes
from relaygw.commands import parseHelo

#: A domain is at most 255 octets (RFC 5321 section 4.5.3.1.2), as
#: XCLIENT's HELO= is: a longer name would go into the Received header
#: and onward in XCLIENT, where the next hop refuses it.
MAX_NAME = 255


class Hello:
    """C{do_HELO}, C{do_EHLO} and C{extensions}."""

    def extensions(self):
        """The EHLO keywords for this session, in a stable order."""
        ext = {"PIPELINING": None, "SIZE": str(self.listener.max_message_size)}
        if self.settings.tls is not None and not self.tlsActive:
            ext["STARTTLS"] = None
        if self.settings.portal is not None and not self.listener.always_allow and (
            self.tlsActive or self.listener.auth_plaintext
        ):
            ext["AUTH"] = "PLAIN LOGIN"
        ext["ENHANCEDSTATUSCODES"] = None
        ext["8BITMIME"] = None
        ext["DSN"] = None
        if self.trusted:
            for name in self.listener.extensions:
                ext[name.upper()] = self.factory.verbs[name.upper()].keyword
        return ext

    def do_EHLO(self, args):
        return self._hello("EHLO", args)

    def do_HELO(self, args):
        return self._hello("HELO", args)

    def _hello(self, verb, args):
        if not args:
            return self.reply(codes.HELO_SYNTAX.format(verb=verb))
        name, args = parseHelo(args)
        if name is None:
            return self.reply(codes.HELO_SYNTAX.format(verb=verb))
        if len(name) > MAX_NAME:
            return self.reply(codes.HELO_TOO_LONG.format(verb=verb))
        self.resetTransaction()
        # The policy judges the new name in the context; a name it refuses
        # gives way to the earlier greeting again, as Postfix's helo check
        # does, so that Received and onward XCLIENT never name it.
        earlier = self.helo, {k: self.context.get(k) for k in ("ehlo_domain", "ehlo_string", "protocol")}
        self.helo = (verb, args)
        self.context.update(
            ehlo_domain=name,
            ehlo_string="%s %s" % (verb.lower(), args),
            protocol="ESMTP" if verb == "EHLO" else "SMTP",
        )

        def answer(refusal):
            if refusal is not None:
                self.helo = earlier[0]
                self.context.update(**earlier[1])
                return self.reply(refusal)
            if verb == "HELO":
                return self.reply(codes.HELO_OK.format(host=self.hostname))
            lines = [self.hostname]
            for k, v in self.extensions().items():
                lines.append(k if not v else "%s %s" % (k, v))
            return self.reply(codes.HELO_OK, tuple(lines))  # a tuple: rendered once per listener

        return self._ask(self.settings.policy.helo(self.context), answer)
