"""
The durable spool: accepted means on disk.

Layout under the spool directory::

    tmp/ID      a message being received (never acknowledged; removed at start)
    queue/ID    a committed message: one JSON envelope line, then the content
    state/ID    per-recipient delivery progress (written by the queue manager)
    hold/ID     an empty marker: the message is held (relaygw-queue hold)

A body is streamed into C{tmp/ID} as it arrives.  At the end of DATA the
file joins the L{Committer}'s next batch: one sync covers every message that
finished in the meantime, then each file is renamed into C{queue/} and the
directory is synced once.  Only then is the 250 sent.
"""

import ctypes
import json
import os
import re
import threading
import time

from twisted.internet import defer

from relaygw.logs import Logger

log = Logger()

_libc = None


def _syncfs(fd):
    """C{syncfs(2)} where the platform has it; returns False otherwise."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return True


_IOV_MAX = 1024  # POSIX's minimum is 16; Linux takes 1024


def writeAll(fd, data):
    """
    os.write until every octet of C{data} (bytes, or an iterable of them)
    is written; returns how many octets that was.
    """
    if not isinstance(data, bytes):
        data = list(data)
        total = sum(map(len, data))
        if len(data) > _IOV_MAX:
            data = b"".join(data)
        else:
            # One system call for the lot (each one costs the disk thread
            # a turn at the GIL), unless the kernel takes only part of it.
            written = os.writev(fd, data) if data else 0
            if written == total:
                return total
            data = b"".join(data)[written:]
    else:
        total = len(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return total


def removeFiles(paths):
    """Remove each of C{paths}; one that is already gone is not an error."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _discard(fd, path):
    """Close C{fd} (if open) and remove the unfinished file C{path}."""
    if fd is not None:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def fsyncDirectory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CommitJob:
    """
    Make a file durable, then rename it to C{finalPath}.

    The file is either already open (C{fd}), or is created in the disk
    thread from C{data} (bytes, or a callable returning the bytes to write
    or a list of chunks), so the reactor thread never waits on the journal.
    With C{reuse}, C{tmpPath} is a spent file that is overwritten and cut
    to length instead of created: no inode is allocated.
    """

    def __init__(self, tmpPath, finalPath, fd=None, data=None, reuse=False):
        self.tmpPath = tmpPath
        self.finalPath = finalPath
        self.fd = fd
        self.data = data
        self.reuse = reuse

    def prepare(self):
        """Runs in the disk thread: create (or reuse) and fill the file if needed."""
        if self.fd is not None or self.data is None:
            return
        data = self.data() if callable(self.data) else self.data
        self.data = None
        if self.reuse:  # (created after all if it has gone missing)
            self.fd = os.open(self.tmpPath, os.O_WRONLY | os.O_CREAT, 0o640)
            os.ftruncate(self.fd, writeAll(self.fd, data))
        else:
            self.fd = os.open(self.tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            writeAll(self.fd, data)

    def abandon(self):
        _discard(self.fd, self.tmpPath)
        self.fd = None


class Committer:
    """
    The disk thread, with group commit: every job handed in while a batch
    is being synced waits for the next batch, so one sync covers all the
    messages that finished at about the same time.  Files are created,
    synced, renamed and removed in this one thread, so the reactor thread
    never blocks on file-system metadata.

    @ivar mode: C{"grouped"} syncs the whole file system once per batch with
        C{syncfs(2)} (falling back to one C{fsync} per file); C{"each"} fsyncs
        every file.
    """

    def __init__(self, reactor, mode="grouped"):
        self.reactor = reactor
        self.mode = mode
        self._pending = []
        self._unlinks = []
        self._busy = False
        self._thread = None
        self._work = None
        self.batches = 0
        self.jobs = 0
        self.syncSeconds = 0.0

    def commit(self, job):
        """Queue C{job}; the Deferred fires once it is durable and renamed."""
        d = defer.Deferred()
        self._pending.append((job, d))
        self._kick()
        return d

    def unlink(self, paths, keep=None):
        """
        Remove files in the disk thread (no sync needed); fires when done.
        With C{keep}, the first of C{paths} is renamed to it instead.
        """
        d = defer.Deferred()
        self._unlinks.append(((paths, keep), d))
        self._kick()
        return d

    def _kick(self):
        if self._busy:
            return
        batch, self._pending = self._pending, []
        unlinks, self._unlinks = self._unlinks, []
        if not batch and not unlinks:
            return
        self._busy = True
        if self._thread is None:
            import queue

            self._work = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="relaygw-disk", daemon=True)
            self._thread.start()
        self._work.put((batch, unlinks))

    def _run(self):
        while True:
            batch, unlinks = self._work.get()
            started = time.monotonic()
            for (paths, keep), _ in unlinks:
                if keep is not None:
                    try:
                        os.rename(paths[0], keep)
                    except OSError:  # gone already: the next user creates it afresh
                        pass
                    paths = paths[1:]
                removeFiles(paths)
            try:
                if batch:
                    self._sync([job for job, _ in batch])
                error = None
            except BaseException as e:  # reported on the reactor thread
                error = e
                for job, _ in batch:
                    job.abandon()
            self.reactor.callFromThread(self._done, batch, unlinks, error, time.monotonic() - started)

    def _done(self, batch, unlinks, error, seconds):
        self._busy = False
        if batch:
            self.batches += 1
            self.jobs += len(batch)
            self.syncSeconds += seconds
        for _, d in unlinks:
            d.callback(None)
        for _, d in batch:
            if error is not None:
                d.errback(error)
            else:
                d.callback(None)
        self._kick()

    def _sync(self, jobs):
        """Runs in the disk thread: create, sync data, rename, sync directories."""
        for job in jobs:
            job.prepare()
        synced = self.mode == "grouped" and _syncfs(jobs[0].fd)
        for job in jobs:
            if not synced:
                os.fsync(job.fd)
            os.close(job.fd)
            job.fd = None
            os.rename(job.tmpPath, job.finalPath)
        # A reused file leaves its directory: that must be durable too, or
        # after a crash the old name could hand a queued file out again.
        for d in sorted({os.path.dirname(job.finalPath) for job in jobs} |
                        {os.path.dirname(job.tmpPath) for job in jobs if job.reuse}):
            fsyncDirectory(d)


_PARTITION = re.compile(r"w[0-9]+")


def partitionDirectory(base, worker):
    """Worker C{worker}'s spool partition under C{base} (with C{[process] workers} > 1)."""
    return os.path.join(base, "w%d" % worker)


def partitions(base):
    """The partitions under C{base}: C{{worker index: directory}}, in index order."""
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    found = {int(n[1:]): os.path.join(base, n) for n in names
             if _PARTITION.fullmatch(n) and os.path.isdir(os.path.join(base, n))}
    return dict(sorted(found.items()))


_counter = 0


def newQueueId():
    """A unique, sortable, file-name-safe queue id."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    return "%011X%04X%06X" % (int(time.time() * 1000), os.getpid() & 0xFFFF, _counter)


class SpooledMessage:
    """
    A committed message as read back from the spool.

    @ivar envelope: the envelope dict (mailfrom, mail_params, recipients,
        context, arrival, size).
    @ivar bodyOffset: where the content starts in C{path}.
    """

    def __init__(self, spool, queueId, envelope, bodyOffset):
        self.spool = spool
        self.queueId = queueId
        self.envelope = envelope
        self.bodyOffset = bodyOffset

    @property
    def path(self):
        return self.spool.path("queue", self.queueId)

    @property
    def mailfrom(self):
        return self.envelope["mailfrom"]

    @property
    def recipients(self):
        return self._recipients if self._recipients is not None else self.envelope["recipients"]

    _recipients = None

    def narrowed(self, recipients):
        """A view of this message for only C{recipients}."""
        m = SpooledMessage(self.spool, self.queueId, self.envelope, self.bodyOffset)
        m._recipients = list(recipients)
        return m

    @property
    def context(self):
        return self.envelope.get("context", {}).get("connection", {})


class MessageWriter:
    """
    Receives one incoming message: the envelope line first (all of it is
    known when DATA starts), then the content through L{write}.  Content
    stays in memory up to C{SPILL} octets and is written out by the disk
    thread at commit; a larger message is streamed into C{tmp/ID} as it
    arrives, so memory stays flat whatever the message size.
    """

    SPILL = 256 * 1024

    def __init__(self, spool, queueId, envelope):
        self.spool = spool
        self.queueId = queueId
        self.tmpPath = spool.path("tmp", queueId)
        self.fd = None
        self.size = 0
        self.envelope = envelope
        self._chunks = [json.dumps(envelope, separators=(",", ":")).encode("utf-8") + b"\n"]
        self._buffered = self.bodyOffset = len(self._chunks[0])

    def write(self, data):
        """Append content."""
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self.SPILL:
            if self.fd is None:
                self.fd = os.open(self.tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            self._flush()

    def _flush(self):
        data = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        writeAll(self.fd, data)

    def commit(self):
        """Make the message durable and move it into C{queue/}; fires with the queue id."""
        final = self.spool.path("queue", self.queueId)
        if self.fd is None:
            spent = self.spool.takeSpent()
            job = CommitJob(spent or self.tmpPath, final, data=self._chunks, reuse=spent is not None)
        else:
            self._flush()
            job = CommitJob(self.tmpPath, final, fd=self.fd)
        self.fd = None
        self._chunks = []
        self.envelope["size"] = self.size
        d = self.spool.committer.commit(job)
        d.addCallback(lambda _: self.queueId)
        return d

    @property
    def message(self):
        """The committed message, without reading it back from disk."""
        return SpooledMessage(self.spool, self.queueId, self.envelope, self.bodyOffset)

    def abort(self):
        """Throw the partial message away."""
        self._chunks = []
        if self.fd is not None:  # else nothing was written to disk yet
            _discard(self.fd, self.tmpPath)
            self.fd = None


class Spool:
    """
    The spool directory: new messages, recovery, progress and removal.

    A delivered message's file is not unlinked but moved to C{spent/}, up
    to C{SPENT} of them, and the next message overwrites it: creating a
    file costs the file system an inode allocation, which on ext4 scans
    past every recently freed inode, and that was most of the CPU time
    of a message relayed at full speed.
    """

    SPENT = 1024

    def __init__(self, directory, committer):
        self.directory = directory
        self.committer = committer
        self._spent = []

    def path(self, area, queueId=None):
        if queueId is None:
            return os.path.join(self.directory, area)
        return os.path.join(self.directory, area, queueId)

    def open(self):
        """
        Create the layout and throw away what was never acknowledged.
        Returns the queue ids of the committed messages, oldest first.
        """
        for area in ("tmp", "queue", "state", "hold", "spent"):
            os.makedirs(self.path(area), exist_ok=True)
        for name in os.listdir(self.path("tmp")):
            os.unlink(self.path("tmp", name))
        queued = set(os.listdir(self.path("queue")))
        self._spent = []
        for name in os.listdir(self.path("spent")):
            if len(self._spent) < self.SPENT and name not in queued:
                self._spent.append(name)
            else:
                os.unlink(self.path("spent", name))
        for area in ("state", "hold"):
            for name in os.listdir(self.path(area)):
                if name.endswith(".tmp") or name not in queued:
                    os.unlink(self.path(area, name))
        return sorted(queued)

    def newMessage(self, envelope):
        queueId = newQueueId()
        envelope = dict(envelope, queue_id=queueId)
        return MessageWriter(self, queueId, envelope)

    def queueIds(self):
        return sorted(os.listdir(self.path("queue")))

    def load(self, queueId):
        """Read a committed message's envelope (L{SpooledMessage})."""
        with open(self.path("queue", queueId), "rb") as f:
            line = f.readline()
        envelope = json.loads(line)
        envelope["size"] = os.stat(self.path("queue", queueId)).st_size - len(line)
        return SpooledMessage(self, queueId, envelope, len(line))

    def readState(self, queueId):
        """The per-recipient progress, C{{}} when there is none yet."""
        try:
            with open(self.path("state", queueId), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def writeState(self, queueId, state):
        """Durably replace the progress record (tmp, fsync, rename, fsync dir)."""
        final = self.path("state", queueId)
        tmp = final + ".tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(state, separators=(",", ":")).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsyncDirectory(self.path("state"))

    def clearStrayHolds(self):
        """
        Remove hold markers whose message has gone: one held just as its
        first attempt delivered it (which removes only the queue file).
        """
        for queueId in os.listdir(self.path("hold")):
            if not os.path.exists(self.path("queue", queueId)):
                removeFiles([self.path("hold", queueId)])

    def isHeld(self, queueId):
        return os.path.exists(self.path("hold", queueId))

    def remove(self, queueId, progress=True):
        """
        Delivery finished: the message leaves the spool.  Through the disk
        thread when there is one (a Deferred), else at once.  Without
        C{progress} (delivered at its first attempt, nothing recorded) only
        the queue file goes; a hold file that appeared meanwhile is cleared
        at the next start.
        """
        paths = [self.path(area, queueId) for area in (("queue", "state", "hold") if progress else ("queue",))]
        if self.committer is None:
            return removeFiles(paths)
        if len(self._spent) >= self.SPENT:
            return self.committer.unlink(paths)
        d = self.committer.unlink(paths, keep=self.path("spent", queueId))
        d.addCallback(lambda _: self._spent.append(queueId))
        return d

    def takeSpent(self):
        """A spent file's path to overwrite with a new message, or None."""
        return self.path("spent", self._spent.pop()) if self._spent else None

    def writable(self):
        return os.access(self.path("tmp"), os.W_OK)
