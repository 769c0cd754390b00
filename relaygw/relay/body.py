"""
The message body on its way out: read from the spool in chunks, dot-stuffed
on the fly and written to the transport as it drains (a pull producer).
"""

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw import wire


class _BodyInterrupted(Exception):
    """The transport stopped the body producer (the connection went away)."""


class UnreadableBody(Exception):
    """
    The message's content could not be read (C{error}: the C{OSError}, a
    failing disk or a queue file cut short since it was read back): the
    connection is dropped without an end of data, and the message waits
    for its next attempt.
    """

    def __init__(self, error):
        Exception.__init__(self, error)
        self.error = error

    def __str__(self):
        return "cannot read the message: %s" % (self.error.strerror or self.error,)


@implementer(IPullProducer)
class _BodyProducer:
    """
    Streams message content from a file to the transport, dot-stuffing it on
    the fly (line starts may fall anywhere in a chunk), then writes the
    C{CRLF.CRLF} terminator (adding the final CRLF the content lacks) and
    C{after}, the commands pipelined behind it.
    """

    CHUNK_SIZE = 2**16

    def __init__(self, file, consumer, progress, after=b""):
        self.file = file
        self.consumer = consumer
        self.progress = progress
        self.after = after
        self.atLineStart = True
        self.tail = b""
        self.deferred = Deferred()

    def start(self):
        """
        Write the body; the Deferred fires once all of it is written.  A body
        that fits in one chunk goes out in one write, with its terminator;
        a larger one is produced chunk by chunk as the transport drains.
        """
        d = self.deferred
        chunk = self._read()
        if isinstance(chunk, Failure):
            self.deferred = None
            d.errback(chunk)
            return d
        if len(chunk) < self.CHUNK_SIZE:  # a short read of a regular file: the end
            self.deferred = None
            wire.send(self.consumer, self.stuff(chunk) + self.terminator() + self.after)
            d.callback(None)
            return d
        self.first = chunk
        self.consumer.registerProducer(self, False)
        return d

    first = None

    def _read(self):
        """
        The next chunk, or a L{Failure}: a message that cannot be read is
        never terminated, the caller fails and aborts the connection.
        """
        try:
            chunk = self.file.read(self.CHUNK_SIZE)
        except OSError as e:
            return Failure(UnreadableBody(e))
        self.progress()
        return chunk

    def stuff(self, chunk):
        out = chunk.replace(b"\n.", b"\n..")
        if self.atLineStart and out[:1] == b".":
            out = b"." + out
        self.atLineStart = chunk.endswith(b"\n")
        self.tail = (self.tail + chunk)[-2:]
        return out

    def terminator(self):
        if self.tail in (b"", b"\r\n"):
            return b".\r\n"
        return b"\r\n.\r\n"

    def resumeProducing(self):
        if self.deferred is None:
            return
        chunk, self.first = self.first, None
        if chunk is None:
            chunk = self._read()
        if isinstance(chunk, Failure):
            self._finish(chunk)
            return
        if chunk:
            self.consumer.write(self.stuff(chunk))
        else:
            self.consumer.write(self.terminator() + self.after)
            self._finish(None)

    def stopProducing(self):
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            d.errback(_BodyInterrupted("the connection stopped the message body"))

    def _finish(self, result):
        d, self.deferred = self.deferred, None
        self.consumer.unregisterProducer()
        d.callback(result) if result is None else d.errback(result)
