"""
A message sink in memory (L{MemorySink}) for session tests that need no
spool: it keeps each message and commits at once.
"""

from twisted.internet import defer


class MemorySink:
    """
    An L{relaygw.sink.IMessageSink} that keeps messages in memory and
    commits at once (synchronously), for session tests that need no spool.

    @ivar messages: C{[(envelope, content)]} of committed messages.
    """

    def __init__(self, limit=None):
        self.messages = []
        self.limit = limit
        self._next = 0

    def begin(self, envelope, context, listener):
        self._next += 1
        return _MemoryMessage(self, envelope, "M%05d" % self._next,
                              listener.max_message_size if self.limit is None else self.limit)


class _MemoryMessage:
    failed = None
    message = None

    def __init__(self, sink, envelope, queueId, limit):
        self.sink = sink
        self.envelope = envelope
        self.queueId = queueId
        self.limit = limit
        self.chunks = []
        self.size = 0
        self.tooBig = False

    def write(self, chunk):
        if self.tooBig:
            return
        if self.limit and self.size + len(chunk) > self.limit:
            self.tooBig = True
            return
        self.chunks.append(chunk)
        self.size += len(chunk)

    def commit(self):
        from relaygw.spoolapi import Envelope

        self.envelope.queue_id = self.queueId
        self.envelope.size = self.size
        self.message = _Stored(self.queueId, self.envelope)
        self.sink.messages.append((self.envelope, b"".join(self.chunks)))
        assert isinstance(self.envelope, Envelope)
        return defer.succeed(self.queueId)

    def abort(self):
        self.chunks = []


class _Stored:
    """The committed message as the queue manager would get it: its queue id, size and (a copy of) its envelope."""

    def __init__(self, queueId, envelope):
        self.queueId = queueId
        self.envelope = type(envelope)(**envelope.asDict())
        self.size = envelope.size
