"""
XSETCONTEXT name=value ...: a trusted peer sets connection-level context
keys (values are RFC 1891 xtext).  All or nothing; gateway-owned keys can't
be set (protocol.md sections 12 and 14).
"""

from relaygw import codes, xtext
from relaygw.commands import splitWords
from relaygw.context import ContextError
from relaygw.verbs import VerbError, answer, refuse


def _bad(why):
    return VerbError(codes.SYNTAX.format(what="XSETCONTEXT: %s" % why), why)


def parse(args):
    """C{name=xtext ...} -> a list of C{(name, decoded value)}."""
    words = splitWords(args)
    if not words:
        raise _bad("no name=value pairs")
    pairs = []
    for word in words:
        name, eq, raw = word.partition("=")
        if not eq or not name:
            raise _bad("bad pair %s" % (word,))
        try:
            value = xtext.decode(raw).decode("ascii")
        except (xtext.XtextError, UnicodeDecodeError):
            raise _bad("bad xtext in %s" % (name,))
        pairs.append((name, value))
    return pairs


def run(session, args):
    if session.inTransaction:
        return refuse(codes.BAD_SEQUENCE.format(what="MAIL transaction in progress"), "inside a transaction")
    try:
        pairs = parse(args)
        old = {name: session.context.get(name) for name, _ in pairs}
        session.context.setClientKeys(pairs)
    except VerbError as e:
        return refuse(e.reply, e.why)
    except ContextError as e:
        return refuse(codes.SYNTAX.format(what="XSETCONTEXT: %s" % e), str(e))
    session.audit("XSETCONTEXT", {name: (old[name], value) for name, value in pairs})
    return answer(codes.OK)
