"""
Every SMTP reply the gateway sends: code, enhanced status code (RFC 3463) and text.

The protocol never writes a reply literal of its own; it picks a L{Reply} from
this table and renders it with L{render}, which is the only place that turns
reply text into wire lines.  Text is sanitised there, so no value that reaches
a reply (a client-supplied string, a context value) can inject extra lines.
"""

import functools
import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^\x20-\x7e]")


def escape(text):
    """
    Make C{text} safe for one reply line: octets outside 0x20-0x7E become
    C{+XX} (xtext style), so CR, LF and NUL can never break a reply.
    """
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return _UNSAFE.sub(lambda m: "".join(_octets(c) for c in m.group()), str(text))


#: RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 512
#: How much of a client-supplied value a reply echoes (escaped octets).
EXCERPT = 200


def excerpt(text, limit=EXCERPT):
    """
    C{text} escaped as by L{escape} and cut to at most C{limit} octets
    (never inside a C{+XX}), with C{...} when something was left out.
    """
    safe = escape(text)
    if len(safe) <= limit:
        return safe
    return _cut(safe, limit - 3) + "..."


def _cut(safe, n):
    """An escaped C{safe} cut to at most C{n} octets, never inside a C{+XX}."""
    cut = safe[:max(n, 0)]
    plus = cut.rfind("+", max(len(cut) - 2, 0))
    if plus != -1 and _UNSAFE_ESCAPE.match(safe, plus) and plus + 3 > len(cut):
        cut = cut[:plus]
    return cut


_UNSAFE_ESCAPE = re.compile(r"\+[0-9A-F]{2}")


def _octets(c):
    """C{+XX} per octet: a character decoded from a wire octet is that octet."""
    data = c.encode("latin-1") if ord(c) < 256 else c.encode("utf-8")
    return "".join("+%02X" % b for b in data)


@dataclass(frozen=True)
class Reply:
    """
    One SMTP reply.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 code (C{None} for greetings, HELO/EHLO and 3xx).
    @ivar text: the text; may contain C{{name}} fields filled by L{Reply.format}.
    @ivar close: whether the connection closes after this reply.
    """

    code: int
    enhanced: object
    text: str
    close: bool = False

    def format(self, **fields):
        """A copy with the named fields filled into the text (each escaped)."""
        return _format(self, tuple(fields.items()))

    def withText(self, text):
        # The constructor, not dataclasses.replace: a queued message's 250 is one of these.
        return Reply(self.code, self.enhanced, text, self.close)

    @property
    def permanent(self):
        return self.code >= 500

    @property
    def positive(self):
        return self.code < 400


@functools.lru_cache(maxsize=1024)
def _format(reply, items):
    return reply.withText(reply.text.format(**{k: excerpt(v) for k, v in items}))


def render(code, enhanced, lines, enhancedEnabled=True):
    """
    Render a reply as wire bytes: every line gets the code (with C{-} on all
    but the last), and the enhanced code when there is one and the listener
    advertises ENHANCEDSTATUSCODES.  Each line is escaped, and cut (ending
    in C{...}) so that no line exceeds L{MAX_REPLY_LINE} octets.
    """
    if isinstance(lines, str):
        return _renderOne(code, enhanced, lines, enhancedEnabled)
    if isinstance(lines, tuple):
        # A reply made of values that repeat from session to session (the
        # EHLO keywords of a listener): rendered once.
        return _renderMany(code, enhanced, lines, enhancedEnabled)
    return _render(code, enhanced, lines, enhancedEnabled)


@functools.lru_cache(maxsize=256)
def _renderMany(code, enhanced, lines, enhancedEnabled):
    return _render(code, enhanced, lines, enhancedEnabled)


@functools.lru_cache(maxsize=1024)
def _renderOne(code, enhanced, line, enhancedEnabled):
    return _render(code, enhanced, [line], enhancedEnabled)


def _render(code, enhanced, lines, enhancedEnabled=True):
    lines = list(lines) or [""]
    prefix = "%s " % (enhanced,) if (enhanced and enhancedEnabled) else ""
    out = []
    for i, line in enumerate(lines):
        sep = "-" if i < len(lines) - 1 else " "
        head = "%d%s%s" % (code, sep, prefix)
        text = escape(line)
        room = MAX_REPLY_LINE - 2 - len(head)
        if len(text) > room:
            text = _cut(text, room - 3) + "..."
        out.append("%s%s\r\n" % (head, text))
    return "".join(out).encode("ascii")


def _r(code, enhanced, text, close=False):
    return Reply(code, enhanced, text, close)


# Greeting and session
GREETING = _r(220, None, "{host} ESMTP relaygw")
SERVICE_UNAVAILABLE = _r(554, "5.7.1", "{host} service not available", close=True)
EARLY_TALKER = _r(554, "5.5.0", "protocol synchronization error: input before greeting", close=True)
BYE = _r(221, "2.0.0", "{host} closing connection", close=True)
TIMEOUT = _r(421, "4.4.2", "{host} idle timeout, closing connection", close=True)
DATA_TIMEOUT = _r(421, "4.4.2", "{host} timeout receiving message content, closing connection", close=True)
TOO_MANY_ERRORS = _r(421, "4.7.0", "{host} too many errors, closing connection", close=True)
SHUTTING_DOWN = _r(421, "4.3.2", "{host} service shutting down, closing connection", close=True)
TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "{host} too many connections, try again later", close=True)
RATE_LIMITED = _r(421, "4.7.0", "{host} connection rate limit exceeded, try again later", close=True)
UNAVAILABLE = _r(421, "4.3.0", "{host} service temporarily unavailable, closing connection", close=True)
BARE_LF_COMMAND = _r(550, "5.5.2", "bare <LF> received in a command", close=True)

# Generic
OK = _r(250, "2.0.0", "Ok")
HELP = _r(214, "2.0.0", "See RFC 5321; commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
VRFY_CANNOT = _r(252, "2.0.0", "Cannot VRFY user, but will accept message")
VRFY_DISABLED = _r(502, "5.5.1", "VRFY command is disabled")
UNKNOWN_COMMAND = _r(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = _r(500, "5.5.2", "Error: line too long")
BAD_SEQUENCE = _r(503, "5.5.1", "Error: {what}")
SYNTAX = _r(501, "5.5.4", "Syntax: {what}")
NOT_IMPLEMENTED = _r(502, "5.5.1", "Error: command not implemented")
LOCAL_ERROR = _r(451, "4.3.0", "Error: local error in processing")
NON_ASCII_ADDRESS = _r(553, "5.6.7", "Error: non-ASCII address not supported (no SMTPUTF8)")

# HELO / EHLO
HELO_OK = _r(250, None, "{host}")
HELO_SYNTAX = _r(501, "5.5.4", "Syntax: {verb} hostname")
HELO_TOO_LONG = _r(501, "5.5.4", "Syntax: {verb} hostname of at most 255 octets")

# MAIL
SENDER_OK = _r(250, "2.1.0", "Ok")
NESTED_MAIL = _r(503, "5.5.1", "Error: nested MAIL command")
BAD_SENDER = _r(501, "5.1.7", "Bad sender address syntax")
TOO_MANY_HOPS = _r(554, "5.4.6", "Error: too many hops (a mail loop?)")
BAD_PARAMETER = _r(555, "5.5.4", "Unsupported option: {param}")
SIZE_SYNTAX = _r(501, "5.5.4", "Bad SIZE parameter")
MESSAGE_TOO_BIG_DECLARED = _r(552, "5.3.4", "Message size exceeds fixed limit")
NO_ROOM = _r(452, "4.3.1", "Insufficient system storage")
RET_SYNTAX = _r(501, "5.5.4", "Bad RET parameter syntax")
ENVID_SYNTAX = _r(501, "5.5.4", "Bad ENVID parameter syntax")

# RCPT
RECIPIENT_OK = _r(250, "2.1.5", "Ok")
NEED_MAIL = _r(503, "5.5.1", "Error: need MAIL command")
BAD_RECIPIENT = _r(501, "5.1.3", "Bad recipient address syntax")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Error: too many recipients")
RELAY_DENIED = _r(554, "5.7.1", "<{rcpt}>: Relay access denied")
NOTIFY_SYNTAX = _r(501, "5.5.4", "Bad NOTIFY parameter syntax")
ORCPT_SYNTAX = _r(501, "5.5.4", "Bad ORCPT parameter syntax")

# DATA
START_DATA = _r(354, None, "End data with <CR><LF>.<CR><LF>")
NO_VALID_RECIPIENTS = _r(554, "5.5.1", "Error: no valid recipients")
QUEUED = _r(250, "2.0.0", "Ok: queued as {qid}")
MESSAGE_TOO_BIG = _r(552, "5.3.4", "Error: message too big")
BARE_LF_DATA = _r(550, "5.5.2", "Error: bare <LF> received in message content")

# STARTTLS (RFC 3207)
READY_TLS = _r(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = _r(454, "4.7.0", "TLS not available due to temporary reason")
TLS_ACTIVE = _r(503, "5.5.1", "Error: TLS already active")
TLS_REQUIRED = _r(530, "5.7.0", "Must issue a STARTTLS command first")

# AUTH (RFC 4954)
AUTH_OK = _r(235, "2.7.0", "Authentication successful")
AUTH_FAILED = _r(535, "5.7.8", "Error: authentication failed")
AUTH_CANCELLED = _r(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = _r(501, "5.5.2", "Cannot decode response")
AUTH_LINE_TOO_LONG = _r(500, "5.5.6", "Authentication exchange line is too long")
AUTH_NEEDS_TLS = _r(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_MECHANISM = _r(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_ALREADY = _r(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = _r(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_UNAVAILABLE = _r(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED = _r(454, "4.7.0", "Too many failed authentications from this address, try again later")
AUTH_TOO_MANY = _r(421, "4.7.0", "{host} too many authentication failures", close=True)
AUTH_CHALLENGE = _r(334, None, "{challenge}")

# Trusted verbs
VERB_UNTRUSTED = _r(550, "5.7.0", "Error: insufficient authorization")
XCLIENT_IN_TRANSACTION = _r(503, "5.5.1", "Error: MAIL transaction in progress")
POLICY_REFUSED_SESSION = _r(503, "5.7.0", "Error: access denied")
XDUMP_LINE = _r(250, "2.0.0", "")
XDUMP_END = "XDUMPCONTEXT complete"
