"""
The trusted verbs.  Each module parses its arguments (pure functions) and
applies them to the session's validation context.  The protocol has already
checked that the verb is enabled on the listener and that the peer is
trusted before it calls one.
"""


class Verb:
    """A trusted verb: its EHLO keyword arguments and its handler."""

    def __init__(self, keyword, run):
        self.keyword = keyword
        self.run = run

    def __call__(self, session, args):
        return self.run(session, args)


class VerbError(Exception):
    """The verb's arguments are refused with C{reply}."""

    def __init__(self, reply, why=""):
        Exception.__init__(self, why or reply.text)
        self.reply = reply
        self.why = why or reply.text


def registry():
    """Verb name -> L{Verb}, for every trusted verb the gateway knows."""
    from relaygw.verbs import xclient, xdumpcontext, xremoteip, xsetcontext

    return {
        "XCLIENT": Verb(xclient.KEYWORD, xclient.run),
        "XREMOTEIP": Verb(None, xremoteip.run),
        "XSETCONTEXT": Verb(None, xsetcontext.run),
        "XDUMPCONTEXT": Verb(None, xdumpcontext.run),
    }
