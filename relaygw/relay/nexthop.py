"""The seam between the queue manager and where messages go next."""

from dataclasses import dataclass, field

from zope.interface import Interface


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

    __str__ = describe


def temporary(text):
    return Result(451, "4.4.0", text)


class INextHop(Interface):
    def describe():
        """A short name for logs and metrics."""

    def deliver(messages):
        """
        Deliver L{relaygw.spool.SpooledMessage}s (with C{recipients} narrowed
        to those still pending).  Fires with one C{{recipient: Result}} dict
        per message, in order.  Failures of the hop itself are temporary
        results, not errbacks.
        """
