"""
The trusted verbs.  Each module parses its arguments (pure functions) and
applies them to the session's validation context.  The protocol has already
checked that the verb is enabled on the listener and that the peer is
trusted before it calls one.

A verb talks to the session only through L{IVerbSession} and returns an
L{Outcome} (or a Deferred firing with one): the session sends the reply,
logs a refusal, and applies a connect-policy refusal of a new identity, all
in one place.
"""

from dataclasses import dataclass

from twisted.internet import defer
from zope.interface import Attribute, Interface


class IVerbSession(Interface):
    """What a trusted verb may see and do of the session."""

    context = Attribute("the session's ValidationContext (the verb applies its changes to it)")
    inTransaction = Attribute("whether a MAIL transaction is open")
    hostname = Attribute("the listener's host name, for a new greeting")

    def resetIdentity(keepAuth=False, helo=None):
        """
        A new client identity: forget the transaction and HELO/EHLO (or
        take C{helo} as the client's HELO), and AUTH unless C{keepAuth}.
        """

    def rerunConnectPolicy():
        """
        Count the session against the claimed client address and run the
        connect policy for the new identity: its refusal (a reply) or
        C{None}, or a Deferred firing with one.
        """

    def audit(verb, changes, renew=False):
        """
        Log an accepted override (C{{key: (old, new)}}) with the real peer;
        with C{renew}, the session goes on under a new session id.
        """


@dataclass(frozen=True)
class Outcome:
    """
    What a verb answers.

    @ivar reply: the L{relaygw.codes.Reply} to send.
    @ivar lines: the reply's lines when not its text.
    @ivar refused: why the verb was refused (logged), or C{None}.
    @ivar sessionRefused: the connect policy refused the new identity:
        after this reply the session answers 503 to all but QUIT.
    """

    reply: object
    lines: object = None
    refused: object = None
    sessionRefused: bool = False


def refuse(reply, why):
    """The verb is refused with C{reply}, for the reason C{why}."""
    return Outcome(reply, refused=why)


def answer(reply, lines=None):
    return Outcome(reply, lines)


def afterConnectPolicy(result, ok):
    """
    The connect policy's answer for a new identity (a refusal, C{None}, or
    a Deferred of one) -> the session refused, or C{ok}.
    """

    def decide(refusal):
        if refusal is not None:
            return Outcome(refusal, sessionRefused=True)
        return Outcome(ok)

    if isinstance(result, defer.Deferred):
        return result.addCallback(decide)
    return decide(result)


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
