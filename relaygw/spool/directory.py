"""
The spool directory: the L{ISpool} the rest of the gateway sees.
"""

import errno
import os

from zope.interface import implementer

from relaygw import durable
from relaygw.durable import removeFiles
from relaygw.logs import Logger
from relaygw.spool.index import QueueIndex
from relaygw.spool.layout import AREAS, UnsafeSpool, areaProblems, isDirectory, openRegular
from relaygw.spool.lock import PartitionLock
from relaygw.spool.message import SpooledMessage
from relaygw.spool.progress import ProgressRecords
from relaygw.spool.quarantine import Quarantine
from relaygw.spool.queuefile import readBack
from relaygw.spool.queueid import isQueueId, newQueueId
from relaygw.spool.recovery import SpoolRecovery
from relaygw.spool.requests import OperatorRequests
from relaygw.spool.retained import RetainedContent
from relaygw.spool.room import Room
from relaygw.spool.spent import SpentFiles
from relaygw.spool.writer import MessageWriter
from relaygw.spoolapi import CorruptMessage, ISpool, SpoolUnavailable

log = Logger(namespace="relaygw.spool")


@implementer(ISpool)
class Spool:
    """
    The spool directory: new messages, reading them back, progress and
    removal; the L{ISpool} the rest of the gateway sees.  Each part it
    holds together has its own class: recovery (L{SpoolRecovery}),
    quarantine (L{Quarantine}), progress records (L{ProgressRecords}), the
    operator's holds and requests (L{OperatorRequests}), what the running
    gateway knows is queued (L{QueueIndex}), the spent files new messages
    overwrite (L{SpentFiles}), the room on the file system (L{Room}) and
    the content kept in memory (L{RetainedContent}).  The layout they
    share is L{relaygw.spool}'s.
    """

    MAX_ENVELOPE = 4 << 20
    AREAS = AREAS

    def __init__(self, directory, committer, minFree=0):
        self.directory = directory
        self.committer = committer
        self.spent = SpentFiles(self)
        self.room = Room(directory, self.spent, minFree)
        self.retainedContent = RetainedContent()
        self.index = QueueIndex(self)
        self._leftAlone = set()
        #: Messages named in queue/ whose commit is not done yet (through
        #: io_uring a queue file takes its name before its sync): not queued
        #: until then, for a flush or a poll as for anyone else.  One whose
        #: commit failed but whose file could not be removed stays here: its
        #: client was told 4xx, so it is never queued by this process.
        self._committing = set()
        self.recovery = SpoolRecovery(self)
        self.quarantined = Quarantine(self)
        self.progress = ProgressRecords(self)
        self.requests = OperatorRequests(self)

    lock = None

    @property
    def minFree(self):
        """Octets that must stay free on the spool's file system (L{Room.minFree})."""
        return self.room.minFree

    @minFree.setter
    def minFree(self, octets):
        self.room.minFree = octets

    def acquire(self):
        """
        Take exclusive ownership of the partition for this process
        (L{PartitionLock}); raises L{PartitionLocked} if another has it.
        """
        if self.lock is None:
            self.lock = PartitionLock(self.directory)
            try:
                self.checkLayout()
            except UnsafeSpool:
                self.releaseLock()
                raise

    def checkLayout(self):
        """Raise L{UnsafeSpool} for the first area of the layout that is no real directory (L{areaProblems})."""
        for path, what in areaProblems(self.directory):
            raise UnsafeSpool(path, what)

    def releaseLock(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def path(self, area, queueId=None):
        # Concatenation, not os.path.join: several calls per message.
        if queueId is None:
            return self.directory + os.sep + area
        return self.directory + os.sep + area + os.sep + queueId

    def open(self):
        """
        Create the layout and throw away what was never acknowledged.
        Returns the queue ids of the committed messages, oldest first.
        """
        queued, self.spent.names = self.recovery.open()
        self.index.reset(queued, os.listdir(self.path("hold")))
        return queued

    def newMessage(self, envelope):
        """A L{MessageWriter} for a new message with C{envelope} (an L{Envelope}, or its stored form)."""
        return MessageWriter(self, newQueueId(), envelope)

    def queueIds(self):
        """The queued messages' ids, oldest first (a file whose name is no queue id is none: L{strays})."""
        try:
            names = os.listdir(self.path("queue"))
        except FileNotFoundError:
            return []
        committing = self._committing
        return sorted(n for n in names if n not in committing and isQueueId(n))

    def scanQueueIds(self):
        """
        The queued messages' ids as L{queueIds} has them, but in no order,
        read from the directory as they are taken: a large queue is gone
        through a part at a time, not listed and sorted at once.
        """
        try:
            entries = os.scandir(self.path("queue"))
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                name = entry.name
                if name not in self._committing and isQueueId(name):
                    yield name

    def strays(self):
        """The names in C{queue/} that are no queue id (L{isQueueId}): left alone."""
        try:
            return sorted(n for n in os.listdir(self.path("queue")) if not isQueueId(n))
        except FileNotFoundError:
            return []

    def exists(self, queueId):
        """
        Whether C{queueId} is queued: its file is there, or the queue
        directory itself is not (L{checkAvailable}), so it has not gone.
        """
        if queueId in self._committing:
            return False
        return durable.quick.exists(self.path("queue", queueId)) or not durable.quick.exists(self.path("queue"))

    def checkAvailable(self):
        """Raise L{SpoolUnavailable} when the queue directory is not there (a message not found has not gone)."""
        if not isDirectory(self.path("queue")):
            raise SpoolUnavailable(errno.ENOENT, "spool queue directory not found", self.path("queue"))

    def committedAt(self, queueId):
        """When the message was made durable (its queue file's time); None if it is gone."""
        try:
            return os.stat(self.path("queue", queueId)).st_mtime
        except OSError:
            return None

    def load(self, queueId, content=True):
        """
        Read a committed message's envelope (L{SpooledMessage}).  Raises
        C{FileNotFoundError} when it has gone, L{SpoolUnavailable} when the
        queue directory is not there, L{CorruptMessage} when the file cannot
        be read back whole:
        empty, garbled, an envelope without what every message has,
        another message's, or content whose size or CRC-32 is not the one
        recorded before the 250.  Unless C{content}, the content is not
        read, so its CRC-32 is not checked (a listing of a large queue).
        """
        path = self.path("queue", queueId)
        try:
            f, total = openRegular(path, "queue file")
        except FileNotFoundError:
            self.checkAvailable()
            raise
        try:
            with f:
                envelope, offset, crc = readBack(queueId, f, total, content, self.MAX_ENVELOPE)
            return SpooledMessage(self, queueId, envelope, offset, crc)
        except CorruptMessage as e:
            e.path = path
            raise

    # -- progress, recovery and the operator's requests -----------------

    def readState(self, queueId):
        """The per-recipient progress, C{{}} when there is none yet; L{CorruptMessage} if unreadable."""
        return self.progress.read(queueId)

    def writeState(self, queueId, state):
        """Durably replace the progress record (L{ProgressRecords.write})."""
        return self.progress.write(queueId, state)

    def whenStateWritten(self, queueId):
        """Fires once no progress write for C{queueId} is in progress (never fails)."""
        return self.progress.whenWritten(queueId)

    def quarantine(self, queueId, reason):
        """Set the message aside in C{corrupt/} (L{Quarantine.quarantine}); never raises."""
        self.forget(queueId)
        self.quarantined.quarantine(queueId, reason)

    def corrupt(self):
        """C{[(name, reason, when)]} of the quarantined messages, oldest first (L{Quarantine.corrupt})."""
        return self.quarantined.corrupt()

    def corruptCount(self):
        """How many messages L{corrupt} lists, without reading their reasons."""
        return self.quarantined.count()

    def discardCorrupt(self, name):
        """Remove a quarantined message, named as L{corrupt} lists it; False when there is none."""
        return self.quarantined.discardCorrupt(name)

    def adopt(self, source):
        """Take over the messages of the spool layout at C{source}; how many moved."""
        return self.recovery.adopt(source)

    def hold(self, queueId):
        """Keep C{queueId} from being delivered; False when it is not queued."""
        held = self.requests.hold(queueId)
        if held:
            self.index.noteHeld(queueId)
        return held

    def release(self, queueId):
        """Let a held message go and ask for an attempt now; False (and nothing done) when it was not held."""
        return self.requests.release(queueId)

    def isHeld(self, queueId):
        return self.requests.isHeld(queueId)

    def clearStrayHolds(self):
        """Remove hold markers whose message has gone (L{OperatorRequests.clearStrayHolds})."""
        self.requests.clearStrayHolds(self.index.takeHoldsGone())

    def requestFlush(self, queueId=None):
        """Ask the running queue manager to retry everything, or only C{queueId}."""
        self.requests.requestFlush(queueId)

    def takeRequests(self):
        """The requests left since the last call (and removed): a L{Requests}."""
        requests = self.requests.take()
        self.index.noteRequests(requests)
        for qid in requests.deleted:
            if not self.exists(qid):
                self.forget(qid)
        return requests

    def requestsPending(self):
        """Whether requests the last L{takeRequests} left for later wait (L{OperatorRequests.take})."""
        return bool(self.requests.pending)

    def flushDone(self, queueId=None):
        """The flush that L{takeRequests} handed out has been carried out (L{ISpool.flushDone})."""
        self.requests.flushDone(queueId)

    def noteDeleted(self, queueId):
        """The operator deleted C{queueId} (relaygw-queue): the running queue manager is told."""
        self.requests.noteDeleted(queueId)

    # -- room and what is queued -----------------------------------------

    def freeSpace(self):
        """Octets free to unprivileged writers on the spool's file system."""
        return self.room.freeSpace()

    def freeFiles(self):
        """Inodes free to unprivileged writers on the spool's file system, or None where it counts none."""
        return self.room.freeFiles()

    def hasRoom(self, size=0):
        """Whether C{size} more octets still leave C{minFree} free, and a new file can be made (L{Room.hasRoom})."""
        return self.room.hasRoom(size)

    def recentStorageError(self, seconds):
        """C{(secondsAgo, error)} of a storage error within the last C{seconds}, or None."""
        return self.room.recentStorageError(seconds)

    def oldestAge(self, now):
        """(depth, age of the oldest message in seconds), from what the running gateway knows is queued."""
        return self.index.oldestAge(now)

    def depth(self):
        """How many messages are queued, as the running gateway knows (L{oldestAge}'s depth, without a stat)."""
        return self.index.depth()

    def heldCount(self):
        """How many of the queued messages are held (markers seen at L{open} and through L{takeRequests})."""
        return self.index.heldCount()

    # -- removal -------------------------------------------------------

    def remove(self, queueId, progress=True):
        """
        Delivery finished: the message leaves the spool.  Through the disk
        thread when there is one (a Deferred), else at once.  Without
        C{progress} (delivered at its first attempt, nothing recorded) only
        the queue file goes; a hold file that appeared meanwhile is cleared
        at the next start.
        """
        if not progress:
            self.index.leaving(queueId)
        self.forget(queueId)
        paths = [self.path(area, queueId) for area in (("queue", "state", "hold") if progress else ("queue",))]
        if self.committer is None:
            removeFiles(paths[:1])  # (a directory there is no message: an error, and nothing goes)
            self.discard(paths[1:])
            return None
        if self.progress.writing(queueId):  # its progress file must not appear after the removal
            return self.progress.whenWritten(queueId).addCallback(lambda _: self.remove(queueId, True))
        if self.room.short or self.spent.full() or self.path("spent", queueId) in self._leftAlone:
            return self.committer.unlink(paths)  # (not kept where a directory left alone has its name)
        d = self.committer.unlink(paths, keep=self.path("spent", queueId))
        d.addCallback(lambda _: self.spent.add(queueId))
        return d

    def delete(self, queueId):
        """
        The operator's delete (relaygw-queue): the message leaves the spool
        at once.  False (and nothing done) when its queue file had gone
        already: delivered, or deleted, since it was looked up.
        """
        try:
            os.unlink(self.path("queue", queueId))
        except FileNotFoundError:
            return False
        self.forget(queueId)
        self.discard([self.path("state", queueId), self.path("hold", queueId)])
        return True

    def retained(self, queueId):
        """
        The content kept in memory for C{queueId}, or None: none was kept,
        or the queue file is gone (relaygw-queue delete), so it is not sent.
        """
        content = self.retainedContent.get(queueId)
        return content if content is not None and self.exists(queueId) else None

    def forget(self, queueId):
        """Drop what is kept in memory of C{queueId} (its content, L{retained}): it has left the spool."""
        self.retainedContent.drop(queueId)
        self.index.drop(queueId)

    def writable(self):
        return os.access(self.path("tmp"), os.W_OK)

    def discard(self, paths):
        """
        Remove the files C{paths}; one already gone is fine.  A directory
        there is junk: left alone, with a warning the first time.  Returns
        whether every one has gone.
        """
        gone = True
        for path in paths:
            try:
                removeFiles([path])
            except IsADirectoryError:
                gone = False
                if path not in self._leftAlone:
                    self._leftAlone.add(path)
                    log.warn("{path} is a directory, not a spool file: left alone", path=path)
        return gone
