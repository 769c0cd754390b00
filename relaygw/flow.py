"""
Flow control and closing for the SMTP session: the session is a streaming
producer for its transport (it answers nothing more, and soon reads
nothing more, while a client that does not read has replies backed up),
and a closing reply is followed by a lingering close with a time bound.
A mixin of L{relaygw.protocol.SMTPSession}, which keeps C{lineReader},
C{mode}, C{waiting} and C{_process}.
"""

from relaygw import wire
from relaygw.logs import Logger
from relaygw.modes import CLOSED

log = Logger(namespace="relaygw.smtp")

#: How much unanswered input is buffered while replies are backed up or a reply is pending.
_HOLD_WHILE_PAUSED = 4096
#: After a closing reply: seconds before a peer that has not taken it is cut off.
CLOSE_TIMEOUT = 2.0
#: After a closing reply: seconds input is read and discarded before closing.
LINGER = 1.0


class FlowControl:
    """C{IPushProducer} for the transport, and the lingering close."""

    writePaused = False
    _reading = True
    _abortTimer = _lingerTimer = None

    def _close(self):
        """
        After a closing reply: read no more commands, and make sure the
        client gets the reply.  A lingering close: on plain TCP the write
        side is shut once the reply is out (the client reads it, then
        EOF), and input is read and discarded until the client closes, for
        at most L{LINGER} seconds, so that unread pipelined input does not
        make the kernel reset the connection over the reply.  Whatever
        happens, a peer that has not taken the reply within
        L{CLOSE_TIMEOUT} seconds is cut off.
        """
        if self.mode == CLOSED:
            return
        self.mode = CLOSED
        self.setTimeout(None)
        pending = bool(self.lineReader.take())
        self.transport.unregisterProducer()
        # The session is over: its per-IP and connection slots come back now,
        # not when a slow or silent peer finally lets the socket go.
        self.factory.sessionEnded(self)
        reactor = self.factory.reactor
        self._abortTimer = reactor.callLater(CLOSE_TIMEOUT, self._abort)
        tcp = wire.halfCloseable(self.transport)
        if tcp is not None:
            wire.shutWrite(tcp)
        elif not pending:
            self.transport.loseConnection()
            return
        self.transport.resumeProducing()
        self._lingerTimer = reactor.callLater(LINGER, self.transport.loseConnection)

    #: The client has shut its write side (L{readConnectionLost}).
    inputEnded = False

    def readConnectionLost(self):
        """
        The client shut its write side (a half-close, on plain TCP): what it
        sent before is still answered, in order, and then the connection
        closes, as Postfix reads the end of input only when it looks for the
        next command.  After a closing reply, this is the end the lingering
        close waits for.
        """
        self.inputEnded = True
        self._process()  # (what it can answer now, then L{_endOfInput})

    def writeConnectionLost(self):
        """Our write side is shut (after a closing reply): input is still read until the client closes."""

    def _endOfInput(self):
        """
        Once the input has ended and all of it that was whole is answered:
        close (a command or message cut short goes as at a disconnect).
        The session produces nothing more: a TLS layer sends its
        close_notify only once no producer is left.
        """
        if self.mode == CLOSED or (self.waiting is None and not self.writePaused):
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def cancelCloseTimers(self):
        """The connection is gone: the closing timers have nothing left to do."""
        for timer in (self._abortTimer, self._lingerTimer):
            if timer is not None and timer.active():
                timer.cancel()

    def _abort(self):
        log.info("[{session}] peer did not take the closing reply; connection aborted", session=self.sessionId)
        self.transport.abortConnection()

    def pauseProducing(self):
        """
        The transport holds more than it wants to of our replies (the peer
        does not read): answer no more commands and read no more input
        until it has drained.
        """
        self.writePaused = True
        self._updateReading()

    def resumeProducing(self):
        """The replies drained: read and answer again."""
        self.writePaused = False
        self._updateReading()
        if self.waiting is None:
            self._process()

    def stopProducing(self):
        """The connection is going away; C{connectionLost} cleans up."""

    def _updateReading(self):
        """
        Read from the transport unless unanswered input piles up: more
        than L{_HOLD_WHILE_PAUSED} octets while replies are backed up, or
        while a reply is pending (the greeting, a policy check, a password
        being verified, a message being committed): the rest waits in the
        kernel, not in the gateway's memory.  (Reading goes on while only
        replies are backed up: a TLS layer pauses us while its handshake
        runs, and needs to read to finish it.)
        """
        if self.mode == CLOSED:
            return
        want = not ((self.writePaused or self.waiting is not None) and self.lineReader.pending > _HOLD_WHILE_PAUSED)
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()
