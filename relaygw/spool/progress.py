"""
The queued messages' per-recipient delivery progress (C{state/ID}).
"""

import errno
import json
import os
import re
import zlib

from twisted.internet import defer
from twisted.python import failure

from relaygw.durable import CommitJob, fsyncDirectory, removeFiles
from relaygw.spool.layout import CREATE, isDirectory, openRegular
from relaygw.spoolapi import CorruptMessage, SpoolUnavailable

#: A progress record starts with the CRC-32 of the rest of it (padded, as
#: the envelope line's), and names its message: read back, one changed
#: since (a bit flipped) or another message's is told from its own.
_RECORD_HEAD = b'{"crc32":%10d,'
_RECORD_HEAD_SIZE = len(_RECORD_HEAD % 0)
#: Its shape, whatever its key says (a record from before it starts otherwise).
_RECORD_SHAPE = re.compile(rb'\{"[^"]{5}":[ 0-9]{10},')


def _record(queueId, state):
    """The stored form of the progress record C{state} of C{queueId}."""
    rest = json.dumps(dict(state, queue_id=queueId), separators=(",", ":")).encode("utf-8")[1:]
    return (_RECORD_HEAD % zlib.crc32(rest)) + rest


def _checkRecord(queueId, data, state, path):
    """
    Raise L{CorruptMessage} unless C{data}, read back as C{state}, is the
    progress record of C{queueId} as it was written; the record keeps
    neither its CRC-32 nor its queue id.  (Records written before these
    were recorded have neither, and are not checked.)
    """
    if not data.startswith(b'{"crc32":') or not isinstance(state, dict):
        raise CorruptMessage("progress record's head is damaged", path)
    recorded, qid = state.pop("crc32", None), state.pop("queue_id", None)
    crc = zlib.crc32(data[_RECORD_HEAD_SIZE:])
    if crc != recorded:
        raise CorruptMessage("progress record's CRC-32 is %d, the record says %s" % (crc, recorded), path)
    if qid != queueId:
        raise CorruptMessage("the record is message %s's" % (qid,), path)


class _StateWrite:
    """A progress write in progress: who waits for it, and the state to write after it."""

    def __init__(self, waiter):
        self.waiters = [waiter]
        self.next = None


class ProgressRecords:
    """
    The per-recipient delivery progress of the queued messages
    (C{state/ID}): read back, and replaced durably, in order.
    """

    def __init__(self, spool):
        self.spool = spool
        self._writes = {}

    def read(self, queueId):
        """
        The per-recipient progress, C{{}} when there is none yet;
        L{CorruptMessage} if unreadable, L{SpoolUnavailable} when C{state/}
        itself is not there.
        """
        path = self.spool.path("state", queueId)
        try:
            f, _ = openRegular(path, "state file")
        except FileNotFoundError:
            if not isDirectory(self.spool.path("state")):
                # (moved away: the record may be there still, and say who is done)
                raise SpoolUnavailable(errno.ENOENT, "spool state directory not found", self.spool.path("state"))
            return {}
        with f:
            data = f.read()
        try:
            state = json.loads(data) if data else None
        except (ValueError, RecursionError):
            raise CorruptMessage("garbled state file", path)
        if state is None:
            raise CorruptMessage("empty state file", path)
        if _RECORD_SHAPE.match(data) or (isinstance(state, dict) and ("crc32" in state or "queue_id" in state)):
            _checkRecord(queueId, data, state, path)
        if (not isinstance(state, dict) or not isinstance(state.get("rcpts", {}), dict)
                or not all(isinstance(e, dict) for e in state.get("rcpts", {}).values())
                or not isinstance(state.get("attempts", 0), int)
                or not isinstance(state.get("backoff", 0), (int, float))
                or not isinstance(state.get("next_attempt", 0), (int, float, type(None)))):
            raise CorruptMessage("state file is not a progress record", path)
        return state

    def write(self, queueId, state):
        """
        Durably replace the progress record (L{_record}: it names its
        message, and carries its own CRC-32).  Through the committer when
        there is one: the record joins the next grouped commit (one sync
        for it and every message accepted meanwhile), so the reactor thread
        never waits on the disk; returns a Deferred firing once it is
        durable.  Writes for one message go to disk in order, and one that
        waits behind another is replaced by a newer state handed in
        meanwhile (only the latest matters).  Without a committer (the
        relaygw-queue tool) it is written at once.
        """
        data = _record(queueId, state)
        if self.spool.committer is None:
            return self._writeNow(queueId, data)
        d = defer.Deferred()
        writing = self._writes.get(queueId)
        if writing is not None:
            writing.next = data  # goes to disk once the write in progress is done
            writing.waiters.append(d)
        else:
            writing = self._writes[queueId] = _StateWrite(d)
            self._start(queueId, data, writing)
        return d

    def _start(self, queueId, data, writing):
        final = self.spool.path("state", queueId)
        waiters, writing.waiters = writing.waiters, []

        def written(result):
            if not isinstance(result, failure.Failure) and not os.path.exists(self.spool.path("queue", queueId)):
                # relaygw-queue deleted the message while this record was
                # being written, which put the record back after the delete.
                removeFiles([final])
            if writing.next is not None:  # (tried even when this one failed)
                data, writing.next = writing.next, None
                self._start(queueId, data, writing)
            else:
                del self._writes[queueId]
                waiters.extend(writing.waiters)
            for d in waiters:
                d.errback(result) if isinstance(result, failure.Failure) else d.callback(None)

        # (Written over whatever a write that could not remove it left at
        # that name: writes for one message never overlap.)
        self.spool.committer.commit(CommitJob(final + ".tmp", final, data=data, reuse=True)).addBoth(written)

    def writing(self, queueId):
        """Whether a progress write for C{queueId} is in progress."""
        return queueId in self._writes

    def whenWritten(self, queueId):
        """Fires once no progress write for C{queueId} is in progress (never fails)."""
        writing = self._writes.get(queueId)
        if writing is None:
            return defer.succeed(None)
        d = defer.Deferred()
        writing.waiters.append(d)
        return d.addErrback(lambda _: None)

    def _writeNow(self, queueId, data):
        final = self.spool.path("state", queueId)
        tmp = final + ".tmp"
        with open(os.open(tmp, CREATE | os.O_TRUNC, 0o640), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsyncDirectory(self.spool.path("state"))
        return defer.succeed(None)
