"""
The policy seam: consulted at connect, EHLO, MAIL, RCPT and end of DATA with
the validation context in hand.  Each hook returns C{None} to accept or a
L{relaygw.codes.Reply} to refuse, directly or through a Deferred.
"""

import inspect

from twisted.python.reflect import namedAny
from zope.interface import Interface, implementer
from zope.interface.interface import InterfaceClass

from relaygw import codes
from relaygw.trust import Networks


class IPolicy(Interface):
    """Accept or refuse each step of a session, judged on its context."""

    def connect(context):
        """A client connected, or its identity changed (XCLIENT, XREMOTEIP)."""

    def helo(context):
        """HELO/EHLO; C{context['ehlo_domain']} is set."""

    def mail(context):
        """MAIL; C{context.message} holds the sender."""

    def rcpt(context, recipient):
        """RCPT for C{recipient} (not yet added to the message)."""

    def data(context):
        """End of DATA, before the message is queued."""


@implementer(IPolicy)
class AcceptAll:
    """A policy that refuses nothing (a base for custom policies)."""

    def __init__(self, listener=None):
        self.listener = listener

    def connect(self, context):
        return None

    def helo(self, context):
        return None

    def mail(self, context):
        return None

    def rcpt(self, context, recipient):
        return None

    def data(self, context):
        return None


@implementer(IPolicy)
class RelayAccessPolicy(AcceptAll):
    """
    The built-in policy, judged on the claimed identity (after XCLIENT,
    XREMOTEIP or a PROXY header), as Postfix's C{permit_mynetworks} and
    C{permit_sasl_authenticated} judge it: a recipient is accepted when the
    client's C{remote_ip} is in the listener's C{relay_networks}, or the
    session logged in (AUTH, XCLIENT C{LOGIN=}, an ALWAYS-ALLOW listener).
    Everyone else gets 554 5.7.1 at RCPT.

    Being a trusted peer is not among the reasons: trust grants the
    trusted verbs only, so a balancer that speaks for a client relays only
    what that client could.
    """

    def __init__(self, listener=None):
        AcceptAll.__init__(self, listener)
        self.relayNetworks = Networks(listener.relay_networks if listener else ())

    def canRelay(self, context):
        return bool(context.get("auth_user") or context.get("remote_ip") in self.relayNetworks)

    def rcpt(self, context, recipient):
        if self.canRelay(context):
            return None
        return codes.RELAY_DENIED.format(rcpt=recipient)


def loadPolicy(dottedName, listener):
    """
    Build the policy a listener names: C{dottedName} is a class or factory
    taking the listener config and returning an L{IPolicy} provider.
    """
    factory = namedAny(dottedName)
    if inspect.isbuiltin(factory) or isinstance(factory, InterfaceClass):
        raise TypeError("%s is not a policy class" % (dottedName,))
    try:
        policy = factory(listener)
    except SystemExit:  # (sys.exit, say: a mistyped name must not stop the gateway)
        raise TypeError("%s exited when called" % (dottedName,))
    if not IPolicy.providedBy(policy):
        raise TypeError("%s does not provide IPolicy" % (dottedName,))
    return policy
