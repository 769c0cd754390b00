"""
XDUMPCONTEXT: print the validation context, for debugging.

Format (one reply, every line with 2.0.0 when ENHANCEDSTATUSCODES is on)::

    250-2.0.0 [connection] <key> <value>
    250-2.0.0 [message] <key> <value>        (only inside a transaction)
    250 2.0.0 XDUMPCONTEXT complete

Keys are sorted within each scope.  Octets outside 0x20-0x7E print as
C{+XX}, so a value can never break the reply.  A value too long for one
reply line (RFC 5321 caps them at 512 octets) goes on over the next
lines, each starting C{[scope] <key>} again.
"""

from relaygw import codes
from relaygw.context import display
from relaygw.verbs import answer, refuse


#: Text octets per line: 512 less "250-2.0.0 " and CRLF.
LINE = 500


def _octets(text):
    """
    C{text} as printable pieces: a character in 0x20-0x7E, or the C{+XX}
    of an octet outside it.  Commands are decoded as Latin-1, so a
    character up to U+00FF is the one octet the client sent (C{EHLO
    caf\\xe9} prints C{caf+E9}); others print their UTF-8 octets.
    """
    out = []
    for c in text:
        if " " <= c <= "~":
            out.append(c)
        else:
            raw = c.encode("latin-1") if ord(c) < 0x100 else c.encode("utf-8", "surrogatepass")
            out.extend("+%02X" % b for b in raw)
    return out


def _fold(prefix, pieces):
    """C{prefix} and C{pieces} as lines of at most L{LINE} octets, never splitting a piece."""
    room = max(LINE - len(prefix), 3)
    out, line = [], []
    used = 0
    for piece in pieces:
        if used + len(piece) > room:
            out.append(prefix + "".join(line))
            line, used = [], 0
        line.append(piece)
        used += len(piece)
    out.append(prefix + "".join(line))
    return out


def lines(context):
    out = []
    for scope, key, value in context.items():
        out.extend(_fold("[%s] %s " % (scope, "".join(_octets(key))), _octets(display(value))))
    out.append(codes.XDUMP_END)
    return out


def run(session, args):
    if args:
        return refuse(codes.SYNTAX.format(what="XDUMPCONTEXT"), "arguments")
    return answer(codes.XDUMP_LINE, lines(session.context))
