"""
The spool directory: the L{ISpool} the rest of the gateway sees.
"""

import errno
import heapq
import os
import time

from zope.interface import implementer

from relaygw import durable
from relaygw.durable import removeFiles
from relaygw.logs import Logger
from relaygw.spool.layout import AREAS, UnsafeSpool, areaProblems, isDirectory, openRegular
from relaygw.spool.lock import PartitionLock
from relaygw.spool.message import SpooledMessage
from relaygw.spool.progress import ProgressRecords
from relaygw.spool.quarantine import Quarantine, corruptEntry
from relaygw.spool.queuefile import readBack
from relaygw.spool.queueid import isQueueId, newQueueId
from relaygw.spool.recovery import SpoolRecovery
from relaygw.spool.requests import OperatorRequests
from relaygw.spool.writer import MessageWriter
from relaygw.spoolapi import CorruptMessage, ISpool, SpoolUnavailable

log = Logger(namespace="relaygw.spool")


@implementer(ISpool)
class Spool:
    """
    The spool directory: new messages, reading them back, progress and
    removal.  Recovery (L{SpoolRecovery}), quarantine (L{Quarantine}),
    progress records (L{ProgressRecords}) and the operator's holds and
    requests (L{OperatorRequests}) each have their own class; this one
    holds them together (the layout they share is L{relaygw.spool}'s) and
    is the L{ISpool} the rest of the gateway sees.

    A delivered message's file is not unlinked but moved to C{spent/}, up
    to C{SPENT} of them, and the next message overwrites it: creating a
    file costs the file system an inode allocation, which on ext4 scans
    past every recently freed inode, and that was most of the CPU time
    of a message relayed at full speed.

    @ivar minFree: octets that must stay free on the spool's file system
        (C{[spool] min_free_space}).
    """

    SPENT = 1024
    #: A committed message's content is also kept in memory until it leaves
    #: the spool (messages up to RETAIN_EACH octets, RETAIN in all), so that
    #: its delivery need not open and read back what was just written; the
    #: queue file must still be there (relaygw-queue delete unlinks it).
    RETAIN_EACH = 64 << 10
    RETAIN = 8 << 20
    MAX_ENVELOPE = 4 << 20
    AREAS = AREAS

    def __init__(self, directory, committer, minFree=0):
        self.directory = directory
        self.committer = committer
        self.minFree = minFree
        self.lastStorageError = None
        self._spent = []
        #: Room ran short (a MAIL found too little, or a write failed) and has
        #: not been found enough since: delivered files are not kept then.
        self._short = False
        self._retained = {}
        self._retainedSize = 0
        self._leftAlone = set()
        #: Messages named in queue/ whose commit is not done yet (through
        #: io_uring a queue file takes its name before its sync): not queued
        #: until then, for a flush or a poll as for anyone else.  One whose
        #: commit failed but whose file could not be removed stays here: its
        #: client was told 4xx, so it is never queued by this process.
        self._committing = set()
        #: What the running gateway knows is queued (from the scan at
        #: L{open}, then as messages come and go), for /metrics: the ids,
        #: a heap of them for the oldest (ids sort by the time they were
        #: made; one gone is popped as it comes up), and the held ones.
        self._queued = set()
        self._byAge = []
        self._held = set()
        #: Held messages that left the spool with their hold marker perhaps
        #: still there (L{remove} without progress): for L{clearStrayHolds}.
        self._holdsGone = set()
        self.recovery = SpoolRecovery(self)
        self.quarantined = Quarantine(self)
        self.progress = ProgressRecords(self)
        self.requests = OperatorRequests(self)

    lock = None

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
        queued, self._spent = self.recovery.open()
        self._queued, self._byAge = set(queued), list(queued)  # (sorted: a heap already)
        self._held = set(os.listdir(self.path("hold"))) & self._queued
        return queued

    def _indexed(self, queueId):
        """C{queueId} is queued now (committed, or adopted): counted by L{depth}."""
        if queueId not in self._queued:
            self._queued.add(queueId)
            heapq.heappush(self._byAge, queueId)

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
        try:
            return len({corruptEntry(name) for name in os.listdir(self.path("corrupt"))})
        except FileNotFoundError:
            return 0

    def discardCorrupt(self, name):
        """Remove a quarantined message, named as L{corrupt} lists it; False when there is none."""
        return self.quarantined.discardCorrupt(name)

    def adopt(self, source):
        """Take over the messages of the spool layout at C{source}; how many moved."""
        return self.recovery.adopt(source)

    def hold(self, queueId):
        """Keep C{queueId} from being delivered; False when it is not queued."""
        held = self.requests.hold(queueId)
        if held and queueId in self._queued:
            self._held.add(queueId)
        return held

    def release(self, queueId):
        """Let a held message go and ask for an attempt now; False (and nothing done) when it was not held."""
        return self.requests.release(queueId)

    def isHeld(self, queueId):
        return self.requests.isHeld(queueId)

    def clearStrayHolds(self):
        """Remove hold markers whose message has gone (L{OperatorRequests.clearStrayHolds})."""
        gone, self._holdsGone = self._holdsGone, set()
        self.requests.clearStrayHolds(gone)

    def requestFlush(self, queueId=None):
        """Ask the running queue manager to retry everything, or only C{queueId}."""
        self.requests.requestFlush(queueId)

    def takeRequests(self):
        """The requests left since the last call (and removed): a L{Requests}."""
        requests = self.requests.take()
        for qid in requests.held:
            if qid in self._queued:
                self._held.add(qid)
            else:  # (delivered as it was held, perhaps: its marker may stay behind)
                self._holdsGone.add(qid)
        self._held.difference_update(requests.released)
        for qid in requests.deleted:
            if not self.exists(qid):
                self.forget(qid)
        return requests

    def requestsPending(self):
        """Whether requests the last L{takeRequests} left for later wait (L{OperatorRequests.take})."""
        return bool(self.requests.pending)

    def noteDeleted(self, queueId):
        """The operator deleted C{queueId} (relaygw-queue): the running queue manager is told."""
        self.requests.noteDeleted(queueId)


    # -- room ------------------------------------------------------------

    def freeSpace(self):
        """Octets free to unprivileged writers on the spool's file system."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def freeFiles(self):
        """
        Inodes free to unprivileged writers on the spool's file system, or
        None where it counts none (btrfs: no inode can run out).
        """
        st = os.statvfs(self.directory)
        return st.f_favail if st.f_files else None

    def hasRoom(self, size=0):
        """
        Whether C{size} more octets still leave C{minFree} free, and a new
        file can be made (True when that cannot be told), counting what the
        spent files hold as free.  No octet or no inode free is never room,
        whatever C{minFree} says: no message could be queued (Postfix's
        smtpd refuses MAIL when no block is free, even with C{queue_minfree}
        0).  When there is no room, the spent files give their blocks and
        inodes back, for this message and those that come after.
        """
        try:
            # (Spent files being removed are room already: the disk thread
            # has not got to them yet.)
            free, files = self.freeSpace() + self._releasing[0], self.freeFiles()
        except OSError:
            return True
        if files is not None:
            files += self._releasing[1]
        if self._enough(free, files, size):
            self._short = False
            return True
        # What the spent files hold is the spool's own to give back: room
        # for this message once they have gone, not a reason to refuse it.
        self._short = True
        held, count = self.releaseSpent()
        return self._enough(free + held, None if files is None else files + count, size)

    def _enough(self, free, files, size):
        return free > 0 and free >= self.minFree + size and (files is None or files > 0)

    def storageFailed(self, error):
        """A write failed for want of room (or an I/O error): remembered for /healthz; spent files go."""
        self.lastStorageError = (time.monotonic(), error)
        self._short = True
        self.releaseSpent()

    def recentStorageError(self, seconds):
        """C{(secondsAgo, error)} of a storage error within the last C{seconds}, or None."""
        if self.lastStorageError is None:
            return None
        ago = time.monotonic() - self.lastStorageError[0]
        return (ago, self.lastStorageError[1]) if ago <= seconds else None

    def releaseSpent(self):
        """
        The file system is short of room: delivered messages' files give
        their blocks back.  Returns the octets and the files given back.
        """
        if not self._spent:
            return 0, 0
        paths = [self.path("spent", name) for name in self._spent]
        self._spent = []
        held = 0
        for path in paths:
            try:
                held += os.lstat(path).st_blocks * 512
            except OSError:
                pass
        log.warn("spool short of room: removing {n} spent files", n=len(paths))
        if self.committer is None:
            removeFiles(paths)
        else:
            releasing = (held, len(paths))
            self._releasing = (self._releasing[0] + held, self._releasing[1] + len(paths))

            def released(result):
                self._releasing = (self._releasing[0] - releasing[0], self._releasing[1] - releasing[1])
                return result

            self.committer.unlink(paths).addBoth(released).addErrback(
                lambda f: log.failure("could not remove spent files", f))
        return held, len(paths)

    #: Octets and files of the spent files whose removal is under way.
    _releasing = (0, 0)

    def oldestAge(self, now):
        """
        (depth, age of the oldest message in seconds), from what the running
        gateway knows is queued (L{open} and since): no scan of C{queue/},
        one stat.  An oldest message whose file has gone behind its back
        (removed by hand) is forgotten here.
        """
        byAge = self._byAge
        while byAge:
            if byAge[0] not in self._queued:
                heapq.heappop(byAge)
                continue
            try:
                oldest = os.stat(self.path("queue", byAge[0])).st_mtime
            except FileNotFoundError:
                self._queued.discard(heapq.heappop(byAge))
                continue
            except OSError:
                return len(self._queued), 0.0
            return len(self._queued), max(0.0, now - oldest)
        return 0, 0.0

    def depth(self):
        """How many messages are queued, as the running gateway knows (L{oldestAge}'s depth, without a stat)."""
        return len(self._queued)

    def heldCount(self):
        """How many of the queued messages are held (markers seen at L{open} and through L{takeRequests})."""
        return len(self._held)

    # -- removal and reuse ---------------------------------------------

    def remove(self, queueId, progress=True):
        """
        Delivery finished: the message leaves the spool.  Through the disk
        thread when there is one (a Deferred), else at once.  Without
        C{progress} (delivered at its first attempt, nothing recorded) only
        the queue file goes; a hold file that appeared meanwhile is cleared
        at the next start.
        """
        if not progress and queueId in self._held:
            self._holdsGone.add(queueId)
        self.forget(queueId)
        paths = [self.path(area, queueId) for area in (("queue", "state", "hold") if progress else ("queue",))]
        if self.committer is None:
            removeFiles(paths[:1])  # (a directory there is no message: an error, and nothing goes)
            self.discard(paths[1:])
            return None
        if self.progress.writing(queueId):  # its progress file must not appear after the removal
            return self.progress.whenWritten(queueId).addCallback(lambda _: self.remove(queueId, True))
        if self._short or self._spentGone or len(self._spent) >= self.SPENT \
                or self.path("spent", queueId) in self._leftAlone:
            return self.committer.unlink(paths)  # (not kept where a directory left alone has its name)
        d = self.committer.unlink(paths, keep=self.path("spent", queueId))
        d.addCallback(lambda _: self._spent.append(queueId))
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

    def _retain(self, queueId, chunks, size):
        if size <= self.RETAIN_EACH and self._retainedSize + size <= self.RETAIN:
            self._retained[queueId] = b"".join(chunks)
            self._retainedSize += size

    def retained(self, queueId):
        """
        The content kept in memory for C{queueId}, or None: none was kept,
        or the queue file is gone (relaygw-queue delete), so it is not sent.
        """
        content = self._retained.get(queueId)
        return content if content is not None and self.exists(queueId) else None

    def forget(self, queueId):
        """Drop what is kept in memory of C{queueId} (its content, L{retained}): it has left the spool."""
        content = self._retained.pop(queueId, None)
        if content is not None:
            self._retainedSize -= len(content)
        self._queued.discard(queueId)
        self._held.discard(queueId)

    def forgetSpent(self):
        """
        C{spent/} has gone (removed by hand): the files it held are not
        reused, and delivered messages' files are not kept until a restart
        makes it again.
        """
        if not self._spentGone:
            log.warn("{path} has gone: delivered messages' files are not kept for reuse until a restart",
                     path=self.path("spent"))
        self._spentGone = True
        self._spent = []

    _spentGone = False

    def takeSpent(self):
        """A spent file's path to overwrite with a new message, or None."""
        return self.path("spent", self._spent.pop()) if self._spent else None

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
