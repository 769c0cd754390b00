"""The client's side of SMTP AUTH in tests: encoding its arguments, and waiting for a reply on a harness session."""

import base64

from twisted.internet import defer


def b64(text):
    """C{text} (UTF-8) in base64, as an AUTH argument (str)."""
    return base64.b64encode(text.encode("utf-8")).decode()


@defer.inlineCallbacks
def authReply(harness, c, line):
    """
    Send an AUTH line (or an AUTH exchange line) on harness client C{c} and
    wait for its reply: the harness clock runs the wait before verifying
    that recent failures from the client impose, and the password is hashed
    in the reactor's threads.
    """
    wait = harness.factory.authFailures.delay(c.session.context["remote_ip"])
    c.send(line + "\r\n")
    harness.clock.advance(wait)
    reply = yield c.whenReply()
    return reply
