"""
A queue file's format: one JSON envelope line, starting with the
content's size and CRC-32s, then the content.
"""

import json
import re
import zlib

from relaygw.spoolapi import CorruptMessage, Envelope

def storedEnvelope(envelope, queueId):
    """
    The stored form of a new message's envelope (an L{Envelope}, or its
    stored form as a dict) and its L{Envelope}, which shares nothing with
    the caller's.  The keys keep the order the queue file has always had
    (C{rcpt_params} last, and only when there are any).
    """
    if isinstance(envelope, Envelope):
        stored = envelope.asDict()  # (a copy)
        del stored["size"]
        if not stored["rcpt_params"]:  # (no DSN parameters: stored as before they were kept)
            del stored["rcpt_params"]
        stored["queue_id"] = queueId
    else:
        stored = dict(envelope, queue_id=queueId)
    return stored, Envelope(mailfrom=stored["mailfrom"], recipients=stored["recipients"],
                            mail_params=stored.get("mail_params", {}), arrival=stored.get("arrival", 0.0),
                            context=stored.get("context", {}), queue_id=queueId,
                            rcpt_params=stored.get("rcpt_params", {}))


#: The envelope line starts with the content's size and CRC-32, written
#: when the content is complete (padded, so the line keeps its length), and
#: the CRC-32 of the rest of the line (the envelope proper).
SIZE_HEAD = b'{"body_size":%20d,"body_crc32":%10d,"envelope_crc32":%10d,'
_HEAD_SIZE = len(SIZE_HEAD % (0, 0, 0))
#: The shape of that head, whatever its keys say (and of the shorter ones
#: written before the CRC-32s were recorded): a line of this shape whose
#: keys are not the head's was damaged, and is no older envelope whose
#: size or CRC-32s need not be checked.
_HEAD_SHAPE = re.compile(rb'\{"[^"]{9}":[ 0-9]{20},(?:"[^"]{10}":[ 0-9]{10},(?:"[^"]{14}":[ 0-9]{10},)?)?')
_HEAD_KEYS = [b"body_size", b"body_crc32", b"envelope_crc32"]


def readBack(queueId, f, total, content, maxEnvelope):
    """
    L{Spool.load}'s reading of the queue file C{f} (C{total} octets) of
    C{queueId}: C{(envelope, where its content starts, its recorded CRC-32
    or None)}, or L{CorruptMessage}.
    """
    line = f.readline(maxEnvelope)
    if not line:
        raise CorruptMessage("empty queue file")
    if not line.endswith(b"\n"):
        raise CorruptMessage("truncated envelope (%d octets without an end of line)" % len(line))
    try:
        stored = json.loads(line)
    except (ValueError, RecursionError):
        raise CorruptMessage("garbled envelope")
    head = _HEAD_SHAPE.match(line)
    if head is not None:
        keys = re.findall(rb'"([^"]*)":', head.group(0))
        if keys != _HEAD_KEYS[:len(keys)]:
            raise CorruptMessage("envelope's head is damaged")
    envelope = Envelope.fromDict(stored)
    actual = total - len(line)
    declared = stored.get("body_size")
    if declared is not None and declared != actual:
        raise CorruptMessage("content is %d octets, the envelope says %s" % (actual, declared))
    # (Messages queued before these were recorded have neither.)
    if stored.get("queue_id", queueId) != queueId:
        raise CorruptMessage("the file holds message %s" % (stored["queue_id"],))
    if "envelope_crc32" in stored:
        crc = zlib.crc32(line[_HEAD_SIZE:-1])
        if crc != stored["envelope_crc32"]:
            raise CorruptMessage("envelope's CRC-32 is %d, the envelope says %s" % (crc, stored["envelope_crc32"]))
    if content and "body_crc32" in stored:
        crc = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
        if crc != stored["body_crc32"]:
            raise CorruptMessage("content's CRC-32 is %d, the envelope says %s" % (crc, stored["body_crc32"]))
    envelope.size = actual
    crc = stored.get("body_crc32")
    return envelope, len(line), crc if isinstance(crc, int) and not isinstance(crc, bool) else None
