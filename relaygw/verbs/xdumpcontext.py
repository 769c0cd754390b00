"""
XDUMPCONTEXT: print the validation context, for debugging.

Format (one reply, every line with 2.0.0 when ENHANCEDSTATUSCODES is on)::

    250-2.0.0 [connection] <key> <value>
    250-2.0.0 [message] <key> <value>        (only inside a transaction)
    250 2.0.0 XDUMPCONTEXT complete

Keys are sorted within each scope.  Octets outside 0x20-0x7E print as
C{+XX}, so a value can never break the reply.
"""

from relaygw import codes
from relaygw.context import display


def _octets(text):
    """
    C{text} with every octet outside 0x20-0x7E as C{+XX}.  Commands are
    decoded as Latin-1, so a character up to U+00FF is the one octet the
    client sent (C{EHLO caf\\xe9} prints C{caf+E9}); others print their
    UTF-8 octets.
    """
    out = []
    for c in text:
        if " " <= c <= "~":
            out.append(c)
        else:
            raw = c.encode("latin-1") if ord(c) < 0x100 else c.encode("utf-8", "surrogatepass")
            out.extend("+%02X" % b for b in raw)
    return "".join(out)


def lines(context):
    out = ["[%s] %s %s" % (scope, _octets(key), _octets(display(value))) for scope, key, value in context.items()]
    out.append(codes.XDUMP_END)
    return out


def run(session, args):
    if args:
        return session.refuseVerb("XDUMPCONTEXT", codes.SYNTAX.format(what="XDUMPCONTEXT"), "arguments")
    return session.reply(codes.XDUMP_LINE, lines(session.ctx))
