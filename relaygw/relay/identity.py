"""
Identity forwarding: the original client's identity passed on to the next
hop with XCLIENT (once per identity on a connection) or XFORWARD (before
each MAIL), when it offers them and C{forward_identity} is set.
"""

import re

from twisted.internet.abstract import isIPAddress, isIPv6Address

from relaygw import xtext
from relaygw.context import FORWARDED_ATTRIBUTES, identityValue
from relaygw.logs import Logger
from relaygw.relay.clientwire import _MessageFailure, _SessionFailure, _temporary

log = Logger(namespace="relaygw.relay.client")

_MAX_COMMAND = 510

#: What an XFORWARD value may not hold (XFORWARD_README): controls,
#: whitespace and non-ASCII, and the characters special in message headers
#: that Postfix's smtpd replaces in them (its NEUTER_CHARACTERS).
_HEADER_SPECIALS = re.compile(r'[^\x21-\x7e]|[<>()\\";@]')


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
            # ([TEMPUNAVAIL] is XCLIENT's only: XFORWARD has [UNAVAILABLE] alone.)
            status = str(context.get("remote_name_status") or "").lower()
            temporary = xclient and name == "NAME" and status.startswith("temp")
            value = "[TEMPUNAVAIL]" if temporary else "[UNAVAILABLE]"
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
            elif not xclient:
                # XFORWARD_README: no whitespace or characters special in
                # message headers (the next hop may put them in one): as
                # Postfix's smtpd neuters them.
                value = _HEADER_SPECIALS.sub("?", value)
            value = xtext.encode(value)
            if len(value) > xtext.MAX_ATTRIBUTE:
                # (A login or greeting name full of "+" or "=", each sent as
                # three octets: the next hop would refuse the command, and so
                # the message.)
                value = "[UNAVAILABLE]"
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


class IdentityForwarding:
    """
    The part of a L{relaygw.relay.client.Connection} that forwards client
    identities; it keeps C{forwarded} (the attributes last sent with
    XCLIENT) and C{xclientNames} (the names the next hop took).
    """

    forwarded = None
    xclientNames = None
    #: C{(attributes, result)}: the identity whose greeting the next hop refused, and its refusal.
    refusedGreeting = None

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
            if self.refusedGreeting is not None and self.refusedGreeting[0] == attributes:
                raise _MessageFailure(self.refusedGreeting[1])
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
            for number, line in enumerate(_commandLines("XCLIENT", attributes)):
                reply = await self.proto.command(line)
                self._closing(reply)
                if not reply.positive:
                    # A refused first line changed nothing: the refusal is of
                    # this client's identity, not of the next hop's session
                    # (which carries other clients' messages, and must not
                    # be found dead for it).
                    failure = _MessageFailure if number == 0 else _SessionFailure
                    raise failure(self._refused(reply, "XCLIENT"))
            self.forwarded, self.xclientNames = attributes, names
            # Greet again as the original client did (as nginx replays the
            # client's EHLO or HELO), so the next hop's HELO is the client's.
            # A client that spoke plain SMTP (PROTO=SMTP) is replayed with
            # HELO: an EHLO would make it ESMTP again at the next hop (its
            # Received header, log and policy), as Postfix's EHLO does after
            # XCLIENT PROTO=SMTP.  A client that gave none (or none a
            # command line can carry) is not given one: greeting in the
            # gateway's name would tell the next hop a HELO the client never
            # sent (and pass its HELO checks).  The next hop's reset forgot
            # the EHLO before, so without EHLO no extension is used.
            helo = message.context.get("ehlo_domain") or ""
            if re.match(r"^[\x21-\x7e]{1,255}$", helo):
                try:
                    await self._hello(helo, extended=identityValue(message.context, "PROTO") != "SMTP",
                                      refusal=_MessageFailure)
                except _MessageFailure as e:
                    # The next hop refused this client's greeting (its HELO
                    # policy, say): a refusal of this client's messages, as a
                    # refused XCLIENT is, not of the next hop, which answered
                    # and must not be found dead for it (with the mail of
                    # every other client).  Nothing goes out under this
                    # identity without its greeting.
                    self.forwarded, self.refusedGreeting = None, (attributes, e.result)
                    raise
            else:
                self.extensions = {}
        elif "XFORWARD" in self.extensions:
            advertised = self.extensions["XFORWARD"].upper().split()
            self.stage = "XFORWARD"
            for line in _commandLines("XFORWARD", _identityAttributes(message.context, advertised, xclient=False)):
                reply = await self.proto.command(line)
                self._closing(reply)
                if not reply.positive:
                    # XFORWARD is for the next hop's logs only, and grants
                    # nothing: a refusal (an IPv6 ADDR at an IPv4-only
                    # Postfix: 501 5.5.4) leaves the message to be logged
                    # as the gateway's, as Postfix's smtp client goes on
                    # to MAIL with a warning.  Deferring it would retry a
                    # refusal that recurs until the message bounces.
                    log.warn("{where} refused XFORWARD: {reply}; going on without it",
                             where=self.where, reply=reply)
