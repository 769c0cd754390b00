"""
A new message as it is received, up to its commit.
"""

import json
import os
import zlib

from twisted.internet import defer

from relaygw import durable
from relaygw.durable import CommitJob, discardFile
from relaygw.spool.layout import isDirectory
from relaygw.spool.message import SpooledMessage
from relaygw.spool.queuefile import SIZE_HEAD, storedEnvelope
from relaygw.spoolapi import isStorageError

class MessageWriter:
    """
    Receives one incoming message: the envelope line first (all of it is
    known when DATA starts), then the content through L{write}.  Content
    stays in memory up to C{SPILL} octets and is written out by the disk
    thread at commit; a larger message is streamed into C{tmp/ID} as it
    arrives, so memory stays flat whatever the message size.

    A write that fails (a full disk) does not raise: the partial file is
    removed, the rest of the content is only counted, and L{failed} holds
    the error; L{commit} then fails with it.

    @ivar size: octets of content written so far.
    @ivar envelope: the message's L{Envelope} (its C{size} set at commit).
    """

    SPILL = 256 * 1024

    def __init__(self, spool, queueId, envelope):
        self.spool = spool
        self.queueId = queueId
        self.tmpPath = spool.path("tmp", queueId)
        self.fd = None
        self.size = 0
        self.failed = None
        stored, self.envelope = storedEnvelope(envelope, queueId)
        line = json.dumps(stored, separators=(",", ":")).encode("utf-8")
        self._envelopeCrc = zlib.crc32(line[1:])
        self._chunks = [(SIZE_HEAD % (0, 0, self._envelopeCrc)) + line[1:] + b"\n"]
        self._crc = 0
        self._buffered = self.bodyOffset = len(self._chunks[0])

    def write(self, data):
        """Append content."""
        self.size += len(data)
        if self.failed is not None:
            return
        self._crc = zlib.crc32(data, self._crc)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self.SPILL:
            try:
                if self.fd is None:
                    self.fd = os.open(self.tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                self._flush()
            except OSError as e:
                self._fail(e)

    def _fail(self, error):
        self.failed = error
        self.abort()
        if isStorageError(error):
            self.spool.room.storageFailed(error)

    def _flush(self):
        data = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        durable.writeAll(self.fd, data)

    def commit(self):
        """Make the message durable and move it into C{queue/}; fires with the queue id."""
        if self.failed is not None:
            return defer.fail(self.failed)
        final = self.spool.path("queue", self.queueId)
        head = SIZE_HEAD % (self.size, self._crc, self._envelopeCrc)
        spent = None
        if self.fd is None:
            self._chunks[0] = head + self._chunks[0][len(head):]
            retain = self._chunks[1:]
            spent = self.spool.spent.take()
            job = CommitJob(spent or self.tmpPath, final, data=self._chunks, reuse=spent is not None, early=True)
        else:
            try:
                self._flush()
                os.pwrite(self.fd, head, 0)
            except OSError as e:
                self._fail(e)
                return defer.fail(e)
            job = CommitJob(self.tmpPath, final, fd=self.fd, size=self.size, early=True)
            retain = None
        self.fd = None
        chunks, self._chunks = self._chunks, []
        self.envelope.size = self.size
        self.spool._committing.add(self.queueId)
        d = self.spool.committer.commit(job)
        if spent is not None:
            d.addErrback(self._spentGone, chunks, final)
        d.addCallbacks(self._committed, self._commitFailed, callbackArgs=(retain,))
        return d

    def _spentGone(self, failure, chunks, final):
        """
        The spent file taken for the message could not be opened: C{spent/}
        itself has gone (removed by hand).  None of the spent files can be
        reused then; the message gets a new file instead.
        """
        failure.trap(FileNotFoundError)
        if isDirectory(self.spool.path("spent")):
            return failure
        self.spool.spent.forget()
        return self.spool.committer.commit(CommitJob(self.tmpPath, final, data=chunks, early=True))

    def _committed(self, _, retain):
        self.spool._committing.discard(self.queueId)
        self.spool.index.add(self.queueId)
        if retain is not None:
            self.spool.retainedContent.keep(self.queueId, retain, self.size)
        return self.queueId

    def _commitFailed(self, failure):
        if not durable.quick.exists(self.spool.path("queue", self.queueId)):  # (else not removed: gone read-only)
            self.spool._committing.discard(self.queueId)
        if isStorageError(failure.value):
            self.spool.room.storageFailed(failure.value)
        return failure

    @property
    def message(self):
        """The committed message, without reading it back from disk."""
        return SpooledMessage(self.spool, self.queueId, self.envelope, self.bodyOffset, self._crc)

    def abort(self):
        """Throw the partial message away."""
        self._chunks = []
        if self.fd is not None:  # else nothing was written to disk yet
            discardFile(self.fd, self.tmpPath)
            self.fd = None
