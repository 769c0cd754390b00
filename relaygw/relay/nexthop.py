"""The seam between the queue manager and where messages go next."""

from dataclasses import dataclass, field

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer


@dataclass(frozen=True)
class Result:
    """
    The outcome for one recipient: the next hop's reply, or a temporary
    failure (4xx) made up locally when there was no final reply.
    """

    code: int
    enhanced: object
    text: str
    #: Where and how long, for the mail log (not part of the outcome):
    #: C{host[ip]:port} of the next hop (C{None}: no connection), the
    #: seconds spent setting the connection up and sending the message.
    relay: object = field(default=None, compare=False)
    setup: float = field(default=0.0, compare=False)
    transmit: float = field(default=0.0, compare=False)
    #: No attempt to count: set only on the gateway's own results below
    #: (L{WITHDRAWN}, L{STOPPED}, L{NOT_SENT}, L{WAITED}), never on a reply,
    #: so that no reply equals one of them, whatever its code and text.
    untried: bool = False
    #: The text is the next hop's own reply (at C{relay}), not one made up
    #: locally: a bounce quotes it as an SMTP diagnostic and names the MTA.
    reply: bool = field(default=False, compare=False)
    #: For a success the gateway is the last to report (RFC 3461): the
    #: Action of the success notice a recipient with C{NOTIFY=SUCCESS} gets,
    #: C{"relayed"} (a next hop that offers no DSN took it) or
    #: C{"delivered"} (a Maildir); C{None}: any notice is the next hop's.
    action: object = field(default=None, compare=False)

    @property
    def ok(self):
        return 200 <= self.code < 300

    @property
    def permanent(self):
        return self.code >= 500

    @property
    def temporary(self):
        return 400 <= self.code < 500

    def describe(self):
        return " ".join(str(part) for part in (self.code, self.enhanced, self.text) if part)

    def located(self, relay, setup, transmit):
        """This outcome with where it came from and how long it took (no C{dataclasses.replace}: once per reply)."""
        return Result(self.code, self.enhanced, self.text, relay, setup, transmit, self.untried, self.reply,
                      self.action)

    def withAction(self, action):
        """This outcome, with the C{action} of the success notice the gateway owes (see L{action})."""
        return Result(self.code, self.enhanced, self.text, self.relay, self.setup, self.transmit, self.untried,
                      self.reply, action)

    __str__ = describe


def temporary(text):
    return Result(451, "4.4.0", text)


def loopsBack(destination, best=True):
    """
    The outcome for mail to C{destination} that would come back to the
    gateway, as Postfix's: bounced (554 5.4.6) when the host it would go
    to is the best (or only) one, deferred (451 4.4.6) when a better host
    may take it later.
    """
    text = "mail for %s loops back to myself" % (destination,)
    return Result(554, "5.4.6", text) if best else Result(451, "4.4.6", text)


#: The result for each recipient of a message whose content a next hop
#: found withdrawn (L{relaygw.spoolapi.Withdrawn}) as it was about to send
#: it: no attempt was made, on this host or any other.
WITHDRAWN = Result(451, "4.3.0", "held or deleted before it went out", untried=True)

#: The result for each recipient whose delivery was still waiting or under
#: way when the gateway stopped (L{relaygw.relay.smtp.SMTPNextHop.cutShort}):
#: not an attempt; the message stays queued as it was, for the next start.
STOPPED = Result(451, "4.3.2", "cut short by the gateway's stop", untried=True)

#: The result for each recipient of a message its connection never got to
#: (at most its envelope went out ahead): the session broke down over an
#: earlier message, the next hop closing or going silent after that one's
#: end of data, say.  Not an attempt: the message is tried again at once,
#: without the one that broke the session, instead of being deferred with
#: it, retried with it and in the end bounced with it.
NOT_SENT = Result(451, "4.4.2", "not sent: the connection broke down over an earlier message", untried=True)


#: The result for each recipient of a message still waiting for a
#: connection (or behind another on one) when a reload replaced the router
#: its next hop belongs to: not an attempt; the queue manager tries it again
#: at once, through the new router (the route may name another next hop).
REROUTED = Result(451, "4.3.0", "not sent: the next hop was replaced by a reload", untried=True)


#: The result for each recipient of a message that waited too long for a
#: connection to its next hop (every one busy, or stuck): not an attempt;
#: the queue manager tries it again once that next hop has room for it
#: (L{INextHop.whenRoom}).
WAITED = Result(451, "4.4.5", "not sent: no connection to the next hop came free in time", untried=True)


class INextHop(Interface):
    """
    Where messages go next (an SMTP destination, the local Maildir): what
    the queue manager and the router may ask of every next hop.
    """

    unused = Attribute(
        "True when nothing waits, nothing is in flight and no connection is kept open "
        "(the router may then forget the next hop).")

    def describe():
        """A short name for logs and metrics."""

    def deliver(messages, progress=None):
        """
        Deliver L{relaygw.spool.SpooledMessage}s (with C{recipients} narrowed
        to those still pending).  Fires with one C{{recipient: Result}} dict
        per message, in order.  Failures of the hop itself are temporary
        results, not errbacks.  Handed one message, it fires as soon as that
        message's outcome is final (the reply to its end of data is read),
        whatever else the same connection still carries.

        @param progress: if given, called as C{progress(index, results)}
            with the final results (accepted, refused for good) of some of
            message C{index}'s recipients while the hop goes on with others
            (another host), so that the caller can make them durable before
            the message's outcome is complete.  They are in the outcome too.
        """

    def closeIdle():
        """Close what is kept open for reuse (on shutdown); fires when it is closed."""

    def whenRoom(message):
        """
        A cancellable Deferred that fires when the next hop has room for
        C{message}, which it handed back untried (L{WAITED}).
        """


class IRouter(Interface):
    """Chooses each recipient's next hop."""

    def __call__(message, recipient):
        """The L{INextHop} for C{recipient} of C{message}."""

    unused = Attribute("True when no next hop has anything waiting or in flight, or a connection kept open.")

    def closeIdle():
        """Close what every next hop keeps open for reuse; fires when done."""

    def wrapUp():
        """
        The gateway is stopping: begin nothing new.  Messages waiting for a
        connection get L{STOPPED}; a connection finishes the transaction
        under way and starts no other (those behind it get L{STOPPED}).
        """

    def cutShort():
        """
        The gateway is stopping: end the deliveries still in flight at once;
        their recipients get L{STOPPED}.
        """

    def revive():
        """
        An operator asked for delivery now: destinations found dead (whose
        messages are deferred at once for a while) are tried again.
        """

    def retire():
        """
        A reload replaced this router: deliveries under way go on, but
        nothing new begins; what has not gone out gets L{REROUTED}.
        """


@implementer(IRouter)
class FunctionRouter:
    """An L{IRouter} from a plain C{(message, recipient) -> INextHop} function (tests, simple set-ups)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, message, recipient):
        return self.function(message, recipient)

    unused = True  # (its next hops are the function's)

    def closeIdle(self):
        return defer.succeed(None)

    def wrapUp(self):
        pass

    def cutShort(self):
        pass

    def revive(self):
        pass

    def retire(self):
        pass
