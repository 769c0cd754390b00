"""
The seam between the SMTP session and what happens to an accepted
message (Twisted's C{IMessageDelivery}/C{IMessage}, aiosmtpd's
C{handle_DATA}, Postfix's cleanup): the session hands over the envelope
and the client's content, and learns the queue id once the message is
stored.  The sink adds the C{Received} header and keeps the size, as
Postfix's cleanup does; the session only speaks SMTP.

Content whose first line starts with a space or a tab (a continuation
line, which no message can start with) would continue the Received header
above it: as Postfix's cleanup does, an empty line then ends the header
section first, so the client's octets all reach the next hop unchanged,
as the body, and the Received header stays the gateway's own.
"""

from zope.interface import Attribute, Interface, implementer

from relaygw import trace
from relaygw.datareader import isContinuation


class IMessageSink(Interface):
    """Where a session's accepted messages go."""

    def begin(envelope, context, listener):
        """
        Start a message.

        @param envelope: the L{relaygw.spoolapi.Envelope} (sender,
            recipients, parameters, arrival, context snapshot).
        @param context: the session's L{relaygw.context.ValidationContext}
            (for the trace header).
        @param listener: the session's listener config (hostname, size
            limit, what the trace header shows).
        @return: an L{IIncomingMessage}.
        @raise OSError: the message cannot be started (no room).
        """


class IIncomingMessage(Interface):
    """One message being received."""

    queueId = Attribute("the queue id it will have")
    size = Attribute("octets stored so far (the Received header included)")
    tooBig = Attribute("whether the client's content went over the size limit (what came after was dropped)")
    failed = Attribute("the storage error that struck while writing, or None")
    message = Attribute("after commit: the stored message (for the queue manager)")

    def write(chunk):
        """Content octets from the client (unstuffed, CRLF line ends)."""

    def commit():
        """Store the message durably; a Deferred firing with the queue id."""

    def abort():
        """Forget the message."""


@implementer(IMessageSink)
class SpoolSink:
    """L{IMessageSink} on the spool's public API (C{ISpool.newMessage})."""

    def __init__(self, spool):
        self.spool = spool

    def begin(self, envelope, context, listener):
        # The spool stores a copy, with the queue id and the size it assigns.
        writer = self.spool.newMessage(envelope)
        incoming = IncomingMessage(writer, listener.max_message_size)
        writer.write(trace.receivedHeader(context, listener.hostname, writer.queueId, envelope.recipients,
                                          showPeer=listener.received_shows_peer,
                                          showLogin=listener.received_shows_login))
        incoming.traceOctets = writer.size
        return incoming


@implementer(IIncomingMessage)
class IncomingMessage:
    """A spool writer behind the size limit, which counts the client's octets only."""

    def __init__(self, writer, limit):
        self.writer = writer
        self.limit = limit
        self.traceOctets = 0
        self.tooBig = False
        self.started = False

    @property
    def queueId(self):
        return self.writer.queueId

    @property
    def size(self):
        return self.writer.size

    @property
    def failed(self):
        return self.writer.failed

    @property
    def message(self):
        return self.writer.message

    def write(self, chunk):
        if self.tooBig or not chunk:
            return
        if not self.started:
            self.started = True
            if isContinuation(chunk):  # (it would continue the Received header: an empty line ends it)
                self.writer.write(b"\r\n")
                self.traceOctets += 2
        if self.limit and self.writer.size - self.traceOctets + len(chunk) > self.limit:
            # Refused at its end whatever follows: what was stored goes now,
            # not when the client has sent the rest.
            self.tooBig = True
            self.writer.abort()
            return
        self.writer.write(chunk)

    def commit(self):
        return self.writer.commit()

    def abort(self):
        self.writer.abort()
