"""
A committed message as read back from the spool, and its content as a
next hop reads it.
"""

import io
import os
import zlib

from zope.interface import implementer

from relaygw.spool.layout import READ
from relaygw.spoolapi import ISpooledMessage, Withdrawn

@implementer(ISpooledMessage)
class SpooledMessage:
    """
    A committed message as read back from the spool.

    @ivar envelope: its L{Envelope} (C{size}: the octets of content).
    @ivar bodyOffset: where the content starts in C{path}.
    @ivar crc: the content's CRC-32 recorded before the 250 (C{None} for a
        message queued before it was recorded).
    """

    def __init__(self, spool, queueId, envelope, bodyOffset, crc=None):
        self.spool = spool
        self.queueId = queueId
        self.envelope = envelope
        self.bodyOffset = bodyOffset
        self.crc = crc

    @property
    def path(self):
        return self.spool.path("queue", self.queueId)

    @property
    def mailfrom(self):
        return self.envelope.mailfrom

    @property
    def recipients(self):
        return self._recipients if self._recipients is not None else self.envelope.recipients

    _recipients = None

    @property
    def size(self):
        """Octets of content sent onward (the Received header included)."""
        return self.envelope.size

    @property
    def arrival(self):
        return self.envelope.arrival

    def narrowed(self, recipients):
        """A view of this message for only C{recipients}."""
        m = SpooledMessage(self.spool, self.queueId, self.envelope, self.bodyOffset, self.crc)
        m._recipients = list(recipients)
        return m

    @property
    def context(self):
        return self.envelope.context.get("connection", {})

    def openForDelivery(self):
        """
        L{openBody}, for a next hop about to send the message.  Raises
        L{Withdrawn} when the operator has held or deleted it since its
        attempt began: the last moment it can be kept from going out.
        """
        if self.spool.isHeld(self.queueId):
            raise Withdrawn("held")
        try:
            body = self.openBody()
        except FileNotFoundError:
            self.spool.checkAvailable()
            raise Withdrawn("deleted")
        return body if isinstance(body, io.BytesIO) else _CheckedContent(body, self.size, self.crc, self.path)

    def openBody(self):
        """The content: a binary file positioned at its start (unbuffered; read big chunks)."""
        content = self.spool.retained(self.queueId)
        if content is not None:
            return io.BytesIO(content)
        f = open(os.open(self.path, READ), "rb", buffering=0)
        try:
            f.seek(self.bodyOffset)
        except BaseException:
            f.close()
            raise
        return f


class _CheckedContent:
    """
    A queue file's content as a next hop reads it: no more than the size
    recorded before the 250, and checked against that size and CRC-32 as
    its last octets are read.  The file was checked when its attempt read
    it back; one cut short or changed since then ends in an C{OSError}, not
    in an early end: a next hop that cannot read a message never terminates
    it, and the next attempt's reading back quarantines it.
    """

    def __init__(self, f, size, crc, path):
        self.f = f
        self.size = self.left = size
        self.crc = crc
        self.path = path
        self._crc = 0

    def tell(self):
        return self.f.tell()

    def seek(self, offset):
        """Back to the content's start (C{offset}, as L{tell} gave it there), to read and check it again."""
        if offset != self.f.tell() - (self.size - self.left):
            raise ValueError("only the start of the content can be sought")
        self.f.seek(offset)
        self.left, self._crc = self.size, 0

    def read(self, n=-1):
        want = self.left if n is None or n < 0 else min(n, self.left)
        chunks, got = [], 0
        while got < want:
            chunk = self.f.read(want - got)
            if not chunk:
                raise OSError("%s: content cut short since it was read back (%d octets missing)" % (
                    self.path, self.left - got))
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        self.left -= got
        if self.crc is not None:
            self._crc = zlib.crc32(data, self._crc)
            if not self.left and self._crc != self.crc:
                raise OSError("%s: content changed since it was read back (CRC-32 %d, the envelope says %d)" % (
                    self.path, self._crc, self.crc))
        return data

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
