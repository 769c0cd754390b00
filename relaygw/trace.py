"""
The trace header a gateway adds to every accepted message (RFC 5321 section
4.4, RFC 3848), built from the validation context only.
"""

import re
import time
from datetime import datetime, timezone
from email.utils import format_datetime

from relaygw.context import identityValue


#: The most of one value a Received header shows (a domain's 255 octets):
#: with it, no line of the header is longer than RFC 5322's 998.
_MAX_VALUE = 255


def _clean(value):
    """Context values are client-influenced: never let one break the header."""
    text = str(value)[:_MAX_VALUE]
    if text.isascii() and text.isprintable():  # printable ASCII: " " to "~"
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


_LITERAL = re.compile(r"\[[^][()\\;]*\]\Z")
_DELIMITERS = str.maketrans({c: "?" for c in "()[];\\"})


def _inComment(value):
    """
    A client-given value for Received: no parenthesis, bracket or
    semicolon, so that none can close its comment and pass for another
    host's (C{(mx.example [192.0.2.1])}) or for the header's date.
    """
    return _clean(value).translate(_DELIMITERS)


def _heloName(value):
    """The client's greeting name for Received: an address literal as it is, else L{_inComment}."""
    text = _clean(value)
    if _LITERAL.match(text):
        return text
    return text.translate(_DELIMITERS)


def _addressLiteral(ip):
    return "IPv6:" + ip if ":" in ip else ip


def _login(context):
    """
    The client's login (AUTH, XCLIENT C{LOGIN=}), or C{None}: an
    ALWAYS-ALLOW session logged in nobody, as onward XCLIENT says too.
    """
    return identityValue(context, "LOGIN")


def withProtocol(context):
    """SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA, as RFC 3848 names them (A: SMTP AUTH succeeded)."""
    proto = context.get("protocol", "ESMTP")
    login = _login(context)
    if proto == "SMTP" and not (context.get("tls") or login):
        return "SMTP"
    suffix = ("S" if context.get("tls") else "") + ("A" if login else "")
    return "ESMTP" + suffix


def dateTime(now=None):
    """
    RFC 5322's date-time of C{now} (the time now by default) in UTC, as
    "+0000": "GMT" is its obs-zone, which must not be generated (its section 4).
    """
    return format_datetime(datetime.fromtimestamp(time.time() if now is None else now, timezone.utc))


def receivedHeader(context, hostname, queueId, recipients, now=None, showPeer=False, showLogin=False):
    """
    The C{Received:} header for a message, folded, ending in CRLF.

    It names the client as the context has it (after XCLIENT/XREMOTEIP or a
    PROXY header) and nothing else about the connection, as Postfix does:
    the real peer that vouched for an overridden identity and the balancer
    that sent a PROXY header appear only with C{showPeer} (the listener's
    C{received_shows_peer}), the login name only with C{showLogin}
    (C{received_shows_login}, Postfix's C{smtpd_sasl_authenticated_header}).
    Logs and XDUMPCONTEXT always have them.
    """
    helo = _heloName(context.get("ehlo_domain") or context.get("helo_name") or "unknown")
    name = _inComment(context.get("remote_name") or "unknown")
    ip = _clean(context.get("remote_ip", "unknown"))
    lines = ["Received: from %s (%s [%s])" % (helo, name, _addressLiteral(ip))]
    if showPeer:
        peer = context.get("peer_ip")
        if peer and (context.get("overridden") or peer != ip):
            lines.append("\t(via [%s] port %s)" % (_addressLiteral(_clean(peer)),
                                                   _clean(context.get("peer_port", ""))))
        balancer = context.get("proxy_peer_ip")
        if balancer:
            lines.append("\t(proxied by [%s])" % (_addressLiteral(_clean(balancer)),))
    with_ = withProtocol(context)
    detail = ""
    if context.get("tls"):
        detail = " (%s %s)" % (_clean(context.get("tls")), _clean(context.get("tls_cipher", "")))
    auth = ""
    if showLogin and _login(context):
        auth = " (authenticated as %s)" % (_inComment(_login(context)),)
    lines.append("\tby %s (relaygw) with %s%s%s id %s" % (hostname, with_, detail, auth, queueId))
    date = dateTime(now)
    if len(recipients) == 1:
        lines.append("\tfor <%s>; %s" % (_clean(recipients[0]), date))
    else:
        lines[-1] += ";"
        lines.append("\t%s" % (date,))
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
