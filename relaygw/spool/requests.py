"""
What relaygw-queue asks of the running queue manager: hold markers, and
flush and release requests.
"""

import errno
import os
import stat
import time

from relaygw import durable
from relaygw.logs import Logger
from relaygw.spool.layout import CREATE, namesMessage
from relaygw.spoolapi import Requests

log = Logger(namespace="relaygw.spool")

#: Files relaygw-queue leaves in a spool directory for its queue manager:
#: retry everything, try one message now (C{flush ID}), and what was held,
#: released and deleted (for the mail log; a release is an attempt now too).
FLUSH_MARKER = "flush"
RELEASE_MARKER = "release."
HELD_MARKER = "held."
RELEASED_MARKER = "released."
DELETED_MARKER = "deleted."
#: A flush of everything (C{flushing}) or of one message (C{flushing.ID})
#: taken by the queue manager and not carried out yet (L{OperatorRequests.flushDone}):
#: a stop or crash leaves it for the next start.
FLUSH_TAKEN = "flushing"


class OperatorRequests:
    """
    What relaygw-queue asks of the running queue manager through the
    spool directory: hold markers, and flush and release requests.
    """

    #: Markers one L{take} acts on at most: C{hold ALL} of a large queue
    #: leaves one for each message, and acting on 50,000 at once (removing
    #: each, a line in the mail log) held the reactor thread over a second.
    TAKE = 1000

    def __init__(self, spool):
        self.spool = spool
        #: Markers found by the last reading of the spool directory and not taken yet.
        self.pending = []
        #: Whether L{take} has looked for flushes taken before this start and not carried out.
        self._resumed = False

    def hold(self, queueId):
        """
        Keep C{queueId} from being delivered; False when it is not queued.
        The queue manager is told of a message held now (not of one held
        already), for the mail log.
        """
        spool = self.spool
        if not spool.exists(queueId):
            return False
        fresh = not self.isHeld(queueId)
        path = spool.path("hold", queueId)
        try:
            os.close(os.open(path, CREATE, 0o640))
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            # Something else is there: not written through, and it holds the message already.
            log.warn("{path} is not a hold marker: left alone", path=path)
        if not spool.exists(queueId):
            # Delivered meanwhile: leave no stray marker behind.
            spool.discard([spool.path("hold", queueId)])
            return False
        if fresh:
            self._mark(HELD_MARKER + queueId)
        return True

    def release(self, queueId):
        """
        Let a held message go and ask for an attempt now (and its line in
        the mail log); False (and nothing done) when it was not held.
        """
        try:
            os.unlink(self.spool.path("hold", queueId))
        except FileNotFoundError:
            return False
        self._mark(RELEASED_MARKER + queueId)
        return True

    def isHeld(self, queueId):
        """Whatever is at C{hold/ID} (never followed) holds the message."""
        return durable.quick.exists(self.spool.path("hold", queueId), follow=False)

    #: C{hold/}'s modification time when L{clearStrayHolds} last looked at all of it.
    _holdSeen = None

    def clearStrayHolds(self, gone=()):
        """
        Remove hold markers whose message has gone: one held just as its
        first attempt delivered it (which removes only the queue file),
        named in C{gone}, or one put in C{hold/} by hand.  C{hold/} is read
        whole only when it has changed since it was last read, and only a
        marker whose message the spool does not know as queued costs a
        look at C{queue/}: with many messages held, a poll stays cheap.
        """
        spool = self.spool
        path = spool.path("hold")
        changed = os.stat(path).st_mtime_ns
        names = set(gone)
        if changed != self._holdSeen:
            names.update(os.listdir(path))
            # (A time this recent may not have moved on yet for a marker made just after the listing.)
            self._holdSeen = changed if time.time() - changed / 1e9 > 2 else None
        for queueId in names:
            if queueId not in spool.index.queued and not os.path.exists(spool.path("queue", queueId)):
                spool.discard([spool.path("hold", queueId)])

    def requestFlush(self, queueId=None):
        """Leave the marker the queue manager polls for: retry everything, or only C{queueId}."""
        self._mark(FLUSH_MARKER if queueId is None else RELEASE_MARKER + queueId)

    def noteDeleted(self, queueId):
        """Tell the queue manager that C{queueId} was deleted: it logs the removal and forgets the message."""
        self._mark(DELETED_MARKER + queueId)

    def _mark(self, marker):
        try:
            os.close(os.open(os.path.join(self.spool.directory, marker), CREATE, 0o640))
        except OSError as e:
            if e.errno != errno.ELOOP:  # (a symbolic link there is a request already, never written through)
                raise

    def take(self):
        """
        The requests left since the last call (and removed), a
        L{Requests}.  A marker whose id is no file name (empty, C{.} or
        C{..}: C{queue/} itself or the spool above it) names no message:
        it is removed and asks for nothing.
        """
        flushAll, flushed, held, released, deleted = False, [], [], [], []
        directory = self.spool.directory
        if not self._resumed:  # (the first take since the start: a flush a stop or crash cut short goes on)
            self._resumed = True
            try:
                flushAll = not stat.S_ISDIR(os.lstat(os.path.join(directory, FLUSH_TAKEN)).st_mode)
            except FileNotFoundError:
                pass
            flushed.extend(name[len(FLUSH_TAKEN) + 1:] for name in os.listdir(directory)
                           if name.startswith(FLUSH_TAKEN + ".") and namesMessage(name[len(FLUSH_TAKEN) + 1:]))
        if not self.pending:
            self.pending = [name for name in os.listdir(directory) if name == FLUSH_MARKER or name.startswith(
                (RELEASE_MARKER, HELD_MARKER, RELEASED_MARKER, DELETED_MARKER))]
        names, self.pending = self.pending[:self.TAKE], self.pending[self.TAKE:]
        for name in names:
            if name == FLUSH_MARKER:
                if self._takeFlush():
                    flushAll = True
                continue
            elif name.startswith(RELEASE_MARKER):
                qid = name[len(RELEASE_MARKER):]
                if namesMessage(qid) and self._takeFlush(name, FLUSH_TAKEN + "." + qid):
                    flushed.append(qid)
                    continue
                into = flushed
            elif name.startswith(HELD_MARKER):
                into, qid = held, name[len(HELD_MARKER):]
            elif name.startswith(RELEASED_MARKER):
                # (An attempt now, kept asked for until it is made, as a flush of the message.)
                qid = name[len(RELEASED_MARKER):]
                if namesMessage(qid) and self._takeFlush(name, FLUSH_TAKEN + "." + qid):
                    released.append(qid)
                    continue
                into = released
            elif name.startswith(DELETED_MARKER):
                into, qid = deleted, name[len(DELETED_MARKER):]
            else:
                continue
            if self.spool.discard([os.path.join(directory, name)]) and namesMessage(qid):
                into.append(qid)
        return Requests(flushAll, flushed, held, released, deleted)

    def _takeFlush(self, name=FLUSH_MARKER, taken=FLUSH_TAKEN):
        """
        Take a request to flush everything (or one message: C{release.ID},
        C{released.ID}, C{flushing.ID}): its marker C{name} becomes C{taken} (replacing one
        taken before, whose flush starts over) until L{flushDone}, so that
        a flush cut short by a stop or a crash is carried out after the
        next start.  Whether there was one.
        """
        directory = self.spool.directory
        marker = os.path.join(directory, name)
        try:
            if stat.S_ISDIR(os.lstat(marker).st_mode):
                return self.spool.discard([marker])  # (junk: left alone, with a warning)
            os.replace(marker, os.path.join(directory, taken))
        except FileNotFoundError:
            return False
        except OSError as e:  # (a directory where the taken one goes: junk, the marker is removed as before)
            log.warn("cannot keep the flush request {path}: {error}", path=marker, error=e)
            return self.spool.discard([marker])
        return True

    def flushDone(self, queueId=None):
        """The flush of everything taken (or of C{queueId}) has been carried out: it is asked for no more."""
        name = FLUSH_TAKEN if queueId is None else FLUSH_TAKEN + "." + queueId
        self.spool.discard([os.path.join(self.spool.directory, name)])
