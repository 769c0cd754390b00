"""
The durable spool: accepted means on disk.

The layout under the spool directory is L{Spool}'s alone (see there);
everything else goes through L{relaygw.spoolapi.ISpool}.

A body is streamed into C{tmp/ID} as it arrives.  At the end of DATA the
file joins the committer's next batch (L{relaygw.ringcommit.committer}:
through io_uring, or the disk thread): every message that finished in the
meantime is synced together, with its name in C{queue/}.  Only then is the
250 sent.  Through io_uring the file is renamed into C{queue/} before the
sync (one journal commit for the data and the name): a crash before the
sync can leave it there cut short or stale, which reading it back tells
from the checksum of its content and the queue id it holds.
"""

import collections
import errno
import fcntl
import heapq
import io
import json
import os
import re
import stat
import time
import zlib

from twisted.internet import defer
from twisted.python import failure
from zope.interface import implementer

from relaygw import durable
from relaygw.durable import CommitJob, discardFile, fsyncDirectory, removeFiles
from relaygw.logs import Logger
from relaygw.spoolapi import (CorruptMessage, Envelope, ISpool, ISpooledMessage, Requests, SpoolUnavailable,
                              Withdrawn, isStorageError)

log = Logger()

LOCK_FILE = "lock"

#: How files inside the spool are opened: a symlink is never followed (the
#: operator's tool runs as root; nothing outside the spool may be touched).
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeSpool(Exception):
    """
    Part of the spool's layout is not what it must be (a symbolic link
    where a directory belongs, say): the spool is not used at all.
    """

    def __init__(self, path, what):
        Exception.__init__(self, path, what)
        self.path = path
        self.what = what

    def __str__(self):
        return "spool: %s is %s; refusing to use the spool" % (self.path, self.what)


def _openRegular(path, what):
    """
    C{path} opened to read (a binary file) and its size.  Raises
    L{CorruptMessage} naming C{what} when it is not a regular file: a
    symbolic link (never followed), a directory, a FIFO.
    """
    try:
        fd = os.open(path, _READ)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptMessage("%s is a symbolic link" % what, path)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptMessage("%s is %s" % (what, "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"),
                             path)
    return open(fd, "rb"), st.st_size


def _isDirectory(path):
    """Whether C{path} is a real directory (not a symbolic link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class PartitionLocked(Exception):
    """Another live process owns the spool partition."""

    def __init__(self, directory, owner):
        Exception.__init__(self, directory, owner)
        self.directory = directory
        self.owner = owner

    def __str__(self):
        return "spool %s is in use by another relaygw process%s" % (
            self.directory, " (pid %s)" % self.owner if self.owner else "")


class PartitionLock:
    """
    Exclusive ownership of a spool partition: an C{flock} on its C{lock}
    file, held until L{release} or until the process ends, however it ends
    (the kernel drops the lock with the last descriptor).  The file names
    the owner's pid, for the message another process gets.
    """

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        path = os.path.join(directory, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR):
                raise UnsafeSpool(path, "%s, not a lock file" % (
                    "a symbolic link" if e.errno == errno.ELOOP else "a directory"))
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                owner = ""
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise PartitionLocked(directory, owner)
            raise
        self.fd = fd
        self.claim()

    def claim(self):
        """
        Name this process as the owner (again after a daemon's fork, which
        keeps the lock).  One fixed-width write: whoever reads the file
        meanwhile sees one pid or the other, never an empty or mixed file.
        On a full file system a new lock file cannot take the pid: the lock
        holds all the same, and the gateway starts (its queued mail going
        out is what frees the room).
        """
        try:
            os.pwrite(self.fd, b"%20d\n" % os.getpid(), 0)
            os.ftruncate(self.fd, 21)
        except OSError as e:
            if not isStorageError(e):
                raise
            if not self.unnamed:
                log.warn("spool {directory} is full: its lock file does not name this process ({error})",
                         directory=self.directory, error=e.strerror)
            self.unnamed = True

    unnamed = False

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # (the lock goes with it)
            self.fd = None


_PARTITION = re.compile(r"w[0-9]+")


def partitionDirectory(base, worker):
    """Worker C{worker}'s spool partition under C{base} (with C{[process] workers} > 1)."""
    return os.path.join(base, "w%d" % worker)


def _partitionPaths(base):
    """Every C{wN} under C{base}, whatever it is."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [os.path.join(base, n) for n in names if _PARTITION.fullmatch(n)]


def partitions(base):
    """The partitions under C{base}: C{{worker index: directory}}, in index order."""
    found = {int(os.path.basename(path)[1:]): path for path in _partitionPaths(base) if _isDirectory(path)}
    return dict(sorted(found.items()))


def spoolsAt(base, workers):
    """
    The spools under C{base} for a tool (no disk thread): C{base} itself,
    or with several workers (or only partitions found) each C{wN}
    partition under it; C{base} itself when it has no partition yet (a
    config given more workers, the gateway not yet started on it).
    Raises L{UnsafeSpool} when one of those is a symbolic link, as the
    gateway refuses its own.
    """
    found = list(partitions(base).values())
    linked = sorted(path for path in _partitionPaths(base) if os.path.islink(path))
    single = _isDirectory(os.path.join(base, "queue"))
    if (found or linked) and (workers > 1 or not single) or (workers > 1 and not single):
        if linked:
            raise UnsafeSpool(linked[0], "a symbolic link, not a directory")
        return [Spool(path, None) for path in found]
    return [Spool(base, None)]


_counter = 0

#: A queue id: what L{newQueueId} makes, and what relaygw-queue takes as one.
#: A file in C{queue/} named otherwise (put there by hand: C{x y}, a control
#: character) is no message: never listed, counted or delivered, and left
#: alone, with a warning at start (as Postfix skips a queue file with a bad name).
_QUEUE_ID = re.compile(r"[A-Za-z0-9_-]+")


def isQueueId(name):
    """Whether C{name} is a queue id (L{_QUEUE_ID})."""
    return _QUEUE_ID.fullmatch(name) is not None


def newQueueId():
    """A unique, sortable, file-name-safe queue id."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    return "%011X%04X%06X" % (int(time.time() * 1000), os.getpid() & 0xFFFF, _counter)


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
        f = open(os.open(self.path, _READ), "rb", buffering=0)
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


def _stored(envelope, queueId):
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
_SIZE_HEAD = b'{"body_size":%20d,"body_crc32":%10d,"envelope_crc32":%10d,'
_HEAD_SIZE = len(_SIZE_HEAD % (0, 0, 0))
#: The shape of that head, whatever its keys say (and of the shorter ones
#: written before the CRC-32s were recorded): a line of this shape whose
#: keys are not the head's was damaged, and is no older envelope whose
#: size or CRC-32s need not be checked.
_HEAD_SHAPE = re.compile(rb'\{"[^"]{9}":[ 0-9]{20},(?:"[^"]{10}":[ 0-9]{10},(?:"[^"]{14}":[ 0-9]{10},)?)?')
_HEAD_KEYS = [b"body_size", b"body_crc32", b"envelope_crc32"]


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
        stored, self.envelope = _stored(envelope, queueId)
        line = json.dumps(stored, separators=(",", ":")).encode("utf-8")
        self._envelopeCrc = zlib.crc32(line[1:])
        self._chunks = [(_SIZE_HEAD % (0, 0, self._envelopeCrc)) + line[1:] + b"\n"]
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
            self.spool.storageFailed(error)

    def _flush(self):
        data = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        durable.writeAll(self.fd, data)

    def commit(self):
        """Make the message durable and move it into C{queue/}; fires with the queue id."""
        if self.failed is not None:
            return defer.fail(self.failed)
        final = self.spool.path("queue", self.queueId)
        head = _SIZE_HEAD % (self.size, self._crc, self._envelopeCrc)
        spent = None
        if self.fd is None:
            self._chunks[0] = head + self._chunks[0][len(head):]
            retain = self._chunks[1:]
            spent = self.spool.takeSpent()
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
        if _isDirectory(self.spool.path("spent")):
            return failure
        self.spool.forgetSpent()
        return self.spool.committer.commit(CommitJob(self.tmpPath, final, data=chunks, early=True))

    def _committed(self, _, retain):
        self.spool._committing.discard(self.queueId)
        self.spool._indexed(self.queueId)
        if retain is not None:
            self.spool._retain(self.queueId, retain, self.size)
        return self.queueId

    def _commitFailed(self, failure):
        if not durable.quick.exists(self.spool.path("queue", self.queueId)):  # (else not removed: gone read-only)
            self.spool._committing.discard(self.queueId)
        if isStorageError(failure.value):
            self.spool.storageFailed(failure.value)
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


#: Files relaygw-queue leaves in a spool directory for its queue manager:
#: retry everything, try one message now (C{flush ID}), and what was held,
#: released and deleted (for the mail log; a release is an attempt now too).
FLUSH_MARKER = "flush"
RELEASE_MARKER = "release."
HELD_MARKER = "held."
RELEASED_MARKER = "released."
DELETED_MARKER = "deleted."


def _readBack(queueId, f, total, content, maxEnvelope):
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


def areaProblems(directory):
    """
    C{(path, what it is)} for each area of the spool layout in
    C{directory} that exists but is no real directory: a symbolic link
    there would take every file operation outside the spool.  One C{lstat}
    per area; start refuses such a spool, the config check names them all.
    """
    for area in Spool.AREAS:
        path = directory + os.sep + area
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(mode):
            yield path, "a symbolic link, not a directory" if stat.S_ISLNK(mode) else "not a directory"


@implementer(ISpool)
class Spool:
    """
    The spool directory: new messages, reading them back, progress and
    removal.  Recovery and quarantine (L{SpoolRecovery}), progress records
    (L{ProgressRecords}) and the operator's holds and requests
    (L{OperatorRequests}) each have their own class; this one owns the
    layout they share and is the L{ISpool} the rest of the gateway sees.

    Layout (nothing outside this module knows it)::

        tmp/ID        a message being received
        queue/ID      a committed message: one JSON envelope line (starting
                      with the content's size), then the content
        state/ID      per-recipient delivery progress: one JSON object,
                      starting with its CRC-32, that names its message
        hold/ID       an empty marker: the message is held
        corrupt/ID    a queue file that could not be read back, with
                      ID.state (its progress, if any) and ID.reason; a
                      later one under the same id as ID.1, ID.2 ...
        spent/ID      delivered messages' files, overwritten by new ones
        flush, release.ID, held.ID, released.ID, deleted.ID
                      requests from relaygw-queue

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
    AREAS = ("tmp", "queue", "state", "hold", "spent", "corrupt")

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
        if not _isDirectory(self.path("queue")):
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
            f, total = _openRegular(path, "queue file")
        except FileNotFoundError:
            self.checkAvailable()
            raise
        try:
            with f:
                envelope, offset, crc = _readBack(queueId, f, total, content, self.MAX_ENVELOPE)
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
        """Set the message aside in C{corrupt/} (L{SpoolRecovery.quarantine}); never raises."""
        self.forget(queueId)
        self.recovery.quarantine(queueId, reason)

    def corrupt(self):
        """C{[(name, reason, when)]} of the quarantined messages, oldest first (L{SpoolRecovery.corrupt})."""
        return self.recovery.corrupt()

    def corruptCount(self):
        """How many messages L{corrupt} lists, without reading their reasons."""
        try:
            return len({_corruptEntry(name) for name in os.listdir(self.path("corrupt"))})
        except FileNotFoundError:
            return 0

    def discardCorrupt(self, name):
        """Remove a quarantined message, named as L{corrupt} lists it; False when there is none."""
        return self.recovery.discardCorrupt(name)

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
            f, _ = _openRegular(path, "state file")
        except FileNotFoundError:
            if not _isDirectory(self.spool.path("state")):
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
        with open(os.open(tmp, _CREATE | os.O_TRUNC, 0o640), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsyncDirectory(self.spool.path("state"))
        return defer.succeed(None)


def _queueIdOf(name):
    """
    The queue id a spool file belongs to, by its name: ID in C{queue/},
    C{state/} and C{hold/}; in C{corrupt/} ID, ID.state and ID.reason, and
    for later ones ID.1, ID.1.state ...
    """
    return name.partition(".")[0]


def _corruptEntry(name):
    """
    What C{corrupt/name} belongs to, as it is listed: NAME for NAME.state
    and NAME.reason (but C{.reason} or C{..state} for itself: no file name
    is left, or C{corrupt/} itself or the spool above it).
    """
    for end in (".state", ".reason"):
        if name.endswith(end) and name[:-len(end)] not in ("", ".", ".."):
            return name[:-len(end)]
    return name


def _corruptOrder(name):
    """Sorts what C{corrupt/} holds by queue id, then in the order it was set aside (ID, ID.1, ID.2 ... ID.10)."""
    return _queueIdOf(name), len(name), name


class SpoolRecovery:
    """
    What is already on disk: the scan at start (what was never
    acknowledged goes), messages taken over from another spool layout, and
    the quarantine of files that cannot be read back.
    """

    def __init__(self, spool):
        self.spool = spool

    def open(self):
        """
        Create the layout, throw away what was never acknowledged and the
        progress and hold markers of messages that have gone.  Returns the
        committed queue ids, oldest first, and the spent files to reuse.
        """
        spool = self.spool
        spool.checkLayout()
        for area in spool.AREAS:
            os.makedirs(spool.path(area), exist_ok=True)
        spool.discard([spool.path("tmp", name) for name in os.listdir(spool.path("tmp"))])
        queued = set(os.listdir(spool.path("queue")))
        strays = sorted(name for name in queued if not isQueueId(name))
        if strays:
            log.warn("{path}: {n} files whose names are no queue ids, left alone (never delivered): {names}",
                     path=spool.path("queue"), n=len(strays), names=", ".join(ascii(n) for n in strays[:10])
                     + (" ..." if len(strays) > 10 else ""))
            queued.difference_update(strays)
        kept = queued.union(_queueIdOf(name) for name in os.listdir(spool.path("corrupt")))
        spent = []
        for name in os.listdir(spool.path("spent")):
            if len(spent) < spool.SPENT and self._reusable(name, kept):
                spent.append(name)
            else:
                spool.discard([spool.path("spent", name)])
        for area in ("state", "hold"):
            for name in os.listdir(spool.path(area)):
                if name.endswith(".tmp") or name not in queued:
                    spool.discard([spool.path(area, name)])
        return sorted(queued), spent

    def _reusable(self, name, kept):
        """
        Whether C{spent/name} may be overwritten: not when a message in
        C{kept} (queued or quarantined) is still that file.  A crash during
        its own removal can leave it under both names; a crash after it
        was reused for a new message can leave its old name here as well
        as the new one in C{queue/}, as a commit syncs only C{queue/}.
        The content then names the new message if it was synced before the
        rename; named first (through io_uring), the file can still hold its
        old content under both names, so a spent file with another name
        (a link count above one) is not reused either.
        """
        if name in kept:
            return False
        try:
            f, _ = _openRegular(self.spool.path("spent", name), "spent file")
            with f:
                if os.fstat(f.fileno()).st_nlink > 1:
                    return False
                envelope = json.loads(f.readline(self.spool.MAX_ENVELOPE))
            return envelope.get("queue_id") not in kept
        except (OSError, CorruptMessage, ValueError, RecursionError, AttributeError):
            return False  # (unreadable: not worth the risk)

    def adopt(self, source):
        """
        Take over the messages of the spool layout at C{source} (a
        partition no longer used, or the unpartitioned spool): progress
        and hold markers move before the message they belong to; spent
        files are only ever overwritten by their own partition, so they
        go.  A message whose id this spool has already (queued or set
        aside: a copy, or junk under its name) is left where it is, with a
        warning, as is anything whose name is taken here: nothing of this
        spool is replaced.  Messages set aside there stay set aside here
        (L{_adoptCorrupt}).  Returns how many messages moved.
        """
        moved = 0
        taken = set()
        for area in ("queue", "corrupt"):
            if _isDirectory(self.spool.path(area)):
                taken.update(_queueIdOf(name) for name in os.listdir(self.spool.path(area)))
        for area in ("state", "hold", "corrupt", "queue"):
            src = os.path.join(source, area)
            if os.path.islink(src):
                log.warn("not adopting {path}: a symbolic link, not a directory", path=src)
                continue
            entries = sorted(os.listdir(src)) if os.path.isdir(src) else ()
            if entries:
                os.makedirs(self.spool.path(area), exist_ok=True)
            if area == "corrupt":
                self._adoptCorrupt(src, entries)
                continue
            for entry in entries:
                qid = _queueIdOf(entry)
                if qid in taken or os.path.lexists(self.spool.path(area, entry)):
                    log.warn("not adopting {path}: the spool has a message {qid} already",
                             path=os.path.join(src, entry), qid=qid)
                    continue
                os.rename(os.path.join(src, entry), self.spool.path(area, entry))
                if area == "queue":
                    moved += 1
                    self.spool._indexed(entry)
                    if os.path.lexists(self.spool.path("hold", entry)):
                        self.spool._held.add(entry)
        spent = os.path.join(source, "spent")
        if _isDirectory(spent):
            self.spool.discard([os.path.join(spent, name) for name in os.listdir(spent)])
        return moved

    def _adoptCorrupt(self, src, entries):
        """
        Messages set aside in C{src} (another layout's C{corrupt/}) stay set
        aside here, each with its progress record and reason, under the
        next free name for its queue id (L{_freeName}): nothing here is
        replaced, and nothing is left behind.
        """
        groups = collections.defaultdict(list)
        for entry in entries:
            groups[_corruptEntry(entry)].append(entry)
        for name in sorted(groups, key=_corruptOrder):
            new = self._freeName(_queueIdOf(name))
            for entry in groups[name]:
                os.rename(os.path.join(src, entry), self.spool.path("corrupt", new + entry[len(name):]))

    def quarantine(self, queueId, reason):
        """
        Move the message's files to C{corrupt/} (the queue file as NAME,
        its progress as NAME.state) next to NAME.reason, so it is never
        tried again and an operator can look at it.  NAME is the queue id,
        or for a later quarantine under the same id (the id used again, or
        a progress record that turned up after its queue file was set
        aside) the next free ID.1, ID.2 ...: nothing already there is
        replaced.  Never raises.
        """
        spool = self.spool
        area = spool.path("corrupt")
        name = self._freeName(queueId)
        moved = False
        for src, dst in (("state", name + ".state"), ("queue", name)):
            try:
                os.makedirs(area, exist_ok=True)
                os.rename(spool.path(src, queueId), os.path.join(area, dst))
                moved = True
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("cannot quarantine {path}: {error}", path=spool.path(src, queueId), error=e)
        if moved:  # (else nothing is there for the reason to explain: deleted meanwhile)
            try:
                with open(os.open(os.path.join(area, name + ".reason"), _CREATE | os.O_EXCL, 0o640), "w") as f:
                    json.dump({"reason": str(reason), "time": time.time()}, f)
            except OSError:
                pass  # the files are set aside all the same; the reason is then unknown
        spool.discard([spool.path("hold", queueId)])

    def _freeName(self, queueId):
        """The first of ID, ID.1, ID.2 ... with none of its files (NAME, NAME.state, NAME.reason) in corrupt/."""
        area = self.spool.path("corrupt")
        name, n = queueId, 0
        while any(os.path.lexists(os.path.join(area, name + end)) for end in ("", ".state", ".reason")):
            n += 1
            name = "%s.%d" % (queueId, n)
        return name

    def corrupt(self):
        """
        C{[(name, reason, when)]} of the quarantined messages, oldest first:
        each under its queue id, a later one under the same id as ID.1, ID.2 ...
        """
        try:
            names = os.listdir(self.spool.path("corrupt"))
        except FileNotFoundError:
            return []
        found = []
        for name in sorted({_corruptEntry(name) for name in names}, key=_corruptOrder):
            reason, when = "unknown", None
            try:
                f, _ = _openRegular(self.spool.path("corrupt", name + ".reason"), "reason file")
                with f:
                    recorded = json.loads(f.read(self.REASON_SIZE))
                reason = str(recorded["reason"])
                when = float(recorded["time"])
            except (OSError, CorruptMessage, ValueError, KeyError, TypeError, RecursionError, OverflowError):
                pass  # (what is not a reason written here: unknown, or a reason without its time)
            found.append((name, reason, when))
        return found

    #: A reason file is read up to this size (one written here is a line).
    REASON_SIZE = 64 << 10

    def discardCorrupt(self, name):
        """
        Remove a quarantined message's files, C{name} as L{corrupt} lists
        it; False when there is none, C{OSError} when its file is a directory.
        """
        try:
            files = [n for n in os.listdir(self.spool.path("corrupt")) if _corruptEntry(n) == name]
        except FileNotFoundError:
            return False
        if not files:
            return False
        path = self.spool.path("corrupt", name)
        if name in files:
            removeFiles([path])
        self.spool.discard([path + ".state", path + ".reason"])
        return True


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
            os.close(os.open(path, _CREATE, 0o640))
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
            if queueId not in spool._queued and not os.path.exists(spool.path("queue", queueId)):
                spool.discard([spool.path("hold", queueId)])

    def requestFlush(self, queueId=None):
        """Leave the marker the queue manager polls for: retry everything, or only C{queueId}."""
        self._mark(FLUSH_MARKER if queueId is None else RELEASE_MARKER + queueId)

    def noteDeleted(self, queueId):
        """Tell the queue manager that C{queueId} was deleted: it logs the removal and forgets the message."""
        self._mark(DELETED_MARKER + queueId)

    def _mark(self, marker):
        try:
            os.close(os.open(os.path.join(self.spool.directory, marker), _CREATE, 0o640))
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
        if not self.pending:
            self.pending = [name for name in os.listdir(directory) if name == FLUSH_MARKER or name.startswith(
                (RELEASE_MARKER, HELD_MARKER, RELEASED_MARKER, DELETED_MARKER))]
        names, self.pending = self.pending[:self.TAKE], self.pending[self.TAKE:]
        for name in names:
            if name == FLUSH_MARKER:
                into = None
            elif name.startswith(RELEASE_MARKER):
                into, qid = flushed, name[len(RELEASE_MARKER):]
            elif name.startswith(HELD_MARKER):
                into, qid = held, name[len(HELD_MARKER):]
            elif name.startswith(RELEASED_MARKER):
                into, qid = released, name[len(RELEASED_MARKER):]
            elif name.startswith(DELETED_MARKER):
                into, qid = deleted, name[len(DELETED_MARKER):]
            else:
                continue
            if self.spool.discard([os.path.join(directory, name)]):
                if into is None:
                    flushAll = True
                elif qid not in ("", ".", ".."):
                    into.append(qid)
        return Requests(flushAll, flushed, held, released, deleted)
