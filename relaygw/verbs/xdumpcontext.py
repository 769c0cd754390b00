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


def lines(context):
    out = ["[%s] %s %s" % (scope, key, display(value)) for scope, key, value in context.items()]
    out.append(codes.XDUMP_END)
    return out


def run(session, args):
    if args:
        return session.refuseVerb("XDUMPCONTEXT", codes.SYNTAX.format(what="XDUMPCONTEXT"), "arguments")
    return session.reply(codes.XDUMP_LINE, lines(session.ctx))
