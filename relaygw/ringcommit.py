"""
Group commit through io_uring (L{RingCommitter}), and the choice between it
and the disk thread (L{committer}).

The disk thread (L{relaygw.durable.Committer}) syncs a batch in a Python
thread, which then needs the GIL back from the busy reactor thread, and a
core, before the batch's 250s can go out: at saturation that wait was most
of the p99 from end of DATA to the 250 (bench/RESULTS.md).  Here the
reactor thread writes and renames the files itself (into the page cache,
as it already writes large messages), and the kernel runs the syncs: no
thread of ours waits for the disk, and epoll says when a batch is done.
"""

import os
import platform

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from relaygw.durable import Committer, quick, removeOrKeep
from relaygw.logs import Logger
from relaygw.ring import Ring

log = Logger(namespace="relaygw.spool")


def committer(reactor, mode="grouped", ring=True, cpus=None):
    """
    The spool's committer: through io_uring if C{ring} and the kernel
    offers it (on x86-64, whose memory order the ring's unfenced reads rely
    on), the disk thread otherwise.
    """
    if ring:
        machine = platform.machine()
        if machine.lower() not in ("x86_64", "amd64"):
            why = "not on %s" % (machine,)
        else:
            try:
                Ring().close()
            except OSError as e:
                why = e.strerror
            else:
                return RingCommitter(reactor, mode)
        log.info("syncing the spool in a disk thread: no io_uring ({error})", error=why)
    return Committer(reactor, mode, cpus=cpus)


class _Batch:
    """
    The jobs in flight, with their Deferreds, and where they are: C{"data"}
    (the files' syncs, and the directory syncs of the jobs named early) or
    C{"names"} (the directory syncs of the jobs named after it).
    """

    def __init__(self, jobs, started):
        self.jobs = jobs
        self.started = started
        self.phase = "data"
        self.outstanding = 0
        #: The directories synced in this phase, by their tag less C{files}.
        self.directories = []
        #: The tags below this are the files' (a job's index), the others the directories'.
        self.files = 0
        #: Failures: by a job's index, by a directory's path, C{None} for all.
        self.errors = {}


@implementer(IReadDescriptor)
class RingCommitter:
    """
    L{relaygw.durable.Committer}'s interface, with group commit through
    io_uring.  Jobs handed in during a reactor turn, or while a batch is
    being synced, make the next batch.  A batch's files are created and
    written, those whose owner checks them (C{early}) are renamed at once,
    then every file is synced (one C{fdatasync} each, C{fsync} in mode
    C{"each"}) together with the directories of the early names, all in
    flight at once: one journal commit between them.  The other files are
    renamed only once their data is durable, and their directories synced
    in turn.  Each job's Deferred fires once its file and its name are
    durable.  Removals are done at once, as they need no sync.
    """

    def __init__(self, reactor, mode="grouped"):
        self.reactor = reactor
        self.dataOnly = mode != "each"
        self.ring = None  # (opened with the first batch, closed by stop)
        self._stopping = False
        self._pending = []
        self._batch = None
        self._scheduled = False
        self._directories = {}
        self.batches = 0
        self.jobs = 0
        self.syncSeconds = 0.0

    def commit(self, job):
        """Queue C{job}; the Deferred fires once it is durable and renamed."""
        d = defer.Deferred()
        self._pending.append((job, d))
        self._stopping = False
        if self._batch is None and not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self._startNext)
        return d

    def unlink(self, paths, keep=None):
        """Remove files at once (no sync needed), the first renamed to C{keep} instead if given."""
        error = removeOrKeep(paths, keep)
        return defer.succeed(None) if error is None else defer.fail(error)

    def stop(self):
        """Close the ring once everything handed in is done (at shutdown); a commit after that opens a new one."""
        self._stopping = True
        if self._batch is None and not self._pending:
            self._close()

    def _close(self):
        if self.ring is not None:
            self._abandonRing(None)

    # -- IReadDescriptor: the ring's results -------------------------------

    def fileno(self):
        return self.ring.fd

    def logPrefix(self):
        return "RingCommitter"

    def connectionLost(self, reason):
        """
        The reactor dropped the ring: at its shutdown (every reader is
        dropped so when the reactor stops before the spool has), or after an
        error escaped L{doRead} (a bug, logged).  The batch in flight fails,
        and the next commit opens a new ring.
        """
        if not reason.check(ConnectionLost):
            log.failure("the spool's io_uring failed", reason)
        self._abandonRing(reason.value)

    def doRead(self):
        for tag, result in self.ring.completions():
            if self._batch is not None:
                self._completed(tag, result)

    def _abandonRing(self, error):
        """Close the ring with whatever it holds; the batch in flight (if any) fails with C{error}."""
        if self.ring is not None:
            self.reactor.removeReader(self)  # (nothing, if the reactor dropped it already)
            self.ring.close()  # (the kernel waits for what was in flight, for nobody)
            self.ring = None
            self._directories, directories = {}, self._directories
            for fd in directories.values():
                quick.close(fd)
        batch = self._batch
        if batch is not None:
            batch.outstanding = 0
            batch.errors = {None: error}
            batch.phase = "names"  # (nothing more to name)
            self._finish()

    # -- batches --------------------------------------------------------

    def _startNext(self):
        self._scheduled = False
        if self._batch is not None:
            return
        if not self._pending:
            if self._stopping:
                self._close()
            return
        if self.ring is None:
            try:
                self.ring = Ring()
            except OSError as e:  # (out of memory for its pages, or of descriptors)
                batch, self._pending = self._pending, []
                for job, d in batch:
                    job.abandon()
                    d.errback(e)
                return
            self.reactor.addReader(self)
        # (Half the submission queue: room for as many directories as files.)
        room = self.ring.capacity // 2
        batch, self._pending = self._pending[:room], self._pending[room:]
        started = self.reactor.seconds()
        ready = []
        for job, d in batch:
            try:
                job.prepare()
                if job.early:
                    job.name()
            except BaseException as e:
                job.abandon()
                d.errback(e)
            else:
                ready.append((job, d))
        if not ready:
            return self._startNext()
        self._batch = _Batch(ready, started)
        for index, (job, _) in enumerate(ready):
            self.ring.fsync(job.fd, index, self.dataOnly)
        self._syncDirectories({os.path.dirname(job.finalPath) for job, _ in ready if job.early}, len(ready))

    def _syncDirectories(self, directories, tags):
        """Sync C{directories} with the files already queued (C{tags} of them), and hand the lot to the kernel."""
        batch = self._batch
        batch.outstanding = tags + len(directories)
        batch.files, batch.directories = tags, sorted(directories)
        try:
            for offset, directory in enumerate(batch.directories):
                self.ring.fsync(self._directory(directory), tags + offset)
            self.ring.submit()
        except OSError as e:  # (out of descriptors; what the kernel did not take would go with a later batch)
            self._abandonRing(e)

    def _completed(self, tag, result):
        batch = self._batch
        if result < 0:
            key = tag if tag < batch.files else batch.directories[tag - batch.files]
            batch.errors.setdefault(key, OSError(-result, os.strerror(-result)))
        batch.outstanding -= 1
        if batch.outstanding == 0:
            self._finish()

    def _finish(self):
        """The batch's phase is over: settle its jobs, then name those that wait for their data's sync."""
        batch = self._batch
        errors = batch.errors
        settled, late = [], []
        for index, (job, d) in enumerate(batch.jobs):
            error = errors.get(None) or (errors.get(index) if batch.phase == "data" else None)
            if job.named:  # (its name's durability: its directory's sync)
                error = error or errors.get(os.path.dirname(job.finalPath))
            if batch.phase == "data":
                fd, job.fd = job.fd, None
                try:
                    quick.close(fd)
                except OSError as e:
                    error = error or e
                if not (job.early or error):
                    late.append((job, d))
                    continue
            settled.append((job, d, error))
        if not late:
            self._over(batch)
        self._settle(settled)  # (a commit handed in meanwhile waits for the batch's end)
        if late:
            self._nameLate(late, batch)
        else:
            self._startNext()

    def _nameLate(self, jobs, batch):
        """Name the files synced in C{batch}'s first phase, and sync their directories."""
        named, failed, directories = [], [], set()
        for job, d in jobs:
            try:
                job.name()
            except OSError as e:
                failed.append((job, d, e))
            else:
                named.append((job, d))
                directories.add(os.path.dirname(job.finalPath))
        if not named:
            self._over(batch)
        self._settle(failed)
        if named:
            batch.jobs, batch.phase, batch.errors = named, "names", {}
            self._syncDirectories(directories, 0)
        else:
            self._startNext()

    def _over(self, batch):
        self._batch = None
        self.batches += 1
        self.syncSeconds += self.reactor.seconds() - batch.started

    def _settle(self, outcomes):
        """Fire the Deferreds of C{[(job, Deferred, error or None)]}."""
        self.jobs += len(outcomes)
        for job, d, error in outcomes:
            if error is None:
                d.callback(None)
            else:
                job.abandon()
                d.errback(error)

    def _directory(self, path):
        """
        A descriptor of directory C{path} to sync, kept open while C{path}
        still names that directory (one replaced, as a Maildir made afresh,
        is opened again: syncing the old one would make no new name durable).
        """
        fd = self._directories.get(path)
        if fd is not None:
            now, kept = os.stat(path), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (kept.st_dev, kept.st_ino):
                return fd
            del self._directories[path]
            quick.close(fd)
        fd = self._directories[path] = quick.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return fd
