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
    if ring and platform.machine().lower() in ("x86_64", "amd64"):
        try:
            Ring().close()
        except OSError as e:
            log.info("syncing the spool in a disk thread: no io_uring ({error})", error=e.strerror)
        else:
            return RingCommitter(reactor, mode)
    return Committer(reactor, mode, cpus=cpus)


@implementer(IReadDescriptor)
class RingCommitter:
    """
    L{relaygw.durable.Committer}'s interface, with group commit through
    io_uring.  Jobs handed in during a reactor turn, or while a batch is
    being synced, make the next batch.  A batch's files are created and
    written, then synced together (one C{fdatasync} each, C{fsync} in mode
    C{"each"}, all in flight at once: one journal commit between them);
    then renamed and their directories synced; then its Deferreds fire.
    Removals are done at once, as they need no sync.
    """

    def __init__(self, reactor, mode="grouped"):
        self.reactor = reactor
        self.dataOnly = mode != "each"
        self.ring = None  # (opened with the first batch, closed by stop)
        self._stopping = False
        self._pending = []
        self._batch = None  # [jobs and Deferreds, phase, results outstanding, {index: error}]
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
        The reactor dropped the ring after an error escaped L{doRead} (a
        bug): the batch in flight fails, and the next commit opens a new ring.
        """
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
        if self._batch is not None:
            self._batch[2] = 0
            self._batch[3] = {None: error}
            self._batch[1] = "names"  # (nothing more to name)
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
        batch, self._pending = self._pending[:self.ring.capacity], self._pending[self.ring.capacity:]
        started = self.reactor.seconds()
        ready = []
        for job, d in batch:
            try:
                job.prepare()
            except BaseException as e:
                job.abandon()
                d.errback(e)
            else:
                ready.append((job, d))
        if not ready:
            return self._startNext()
        for index, (job, _) in enumerate(ready):
            self.ring.fsync(job.fd, index, self.dataOnly)
        self._batch = [ready, "data", len(ready), {}, started]
        self._submit()

    def _submit(self):
        try:
            self.ring.submit()
        except OSError as e:  # (what the kernel did not take would go with a later batch: a new ring)
            self._abandonRing(e)

    def _completed(self, tag, result):
        batch = self._batch
        if result < 0:
            batch[3].setdefault(tag if batch[1] == "data" else None, OSError(-result, os.strerror(-result)))
        batch[2] -= 1
        if batch[2] == 0:
            self._finish()

    def _finish(self):
        jobs, phase, _, errors, started = self._batch
        if phase == "data":
            directories = set()
            for index, (job, d) in enumerate(jobs):
                try:
                    fd, job.fd = job.fd, None
                    quick.close(fd)
                    if index not in errors and None not in errors:
                        quick.rename(job.tmpPath, job.finalPath)
                        directories.add(os.path.dirname(job.finalPath))
                except OSError as e:
                    errors.setdefault(index, e)
            if directories:
                self._batch = [jobs, "names", len(directories), errors, started]
                try:
                    for directory in sorted(directories):
                        self.ring.fsync(self._directory(directory), 0)
                except OSError as e:  # (out of descriptors, say: the names are not known durable)
                    return self._abandonRing(e)
                return self._submit()
        self._batch = None
        self.batches += 1
        self.jobs += len(jobs)
        self.syncSeconds += self.reactor.seconds() - started
        for index, (job, d) in enumerate(jobs):
            error = errors.get(index) or errors.get(None)
            if error is None:
                d.callback(None)
            else:
                job.abandon()
                d.errback(error)
        self._startNext()

    def _directory(self, path):
        """A descriptor of directory C{path} to sync, kept open."""
        fd = self._directories.get(path)
        if fd is None:
            fd = self._directories[path] = quick.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return fd
