"""
Durable low-level writing for the spool and the Maildir next hop: the disk
thread with group commit (L{Committer}), the job it runs (L{CommitJob}), and
the small file helpers they share.  It knows nothing of the queue file's
layout, which is L{relaygw.spool}'s alone.
"""

import ctypes
import errno
import os
import sys
import threading
import time

from twisted.internet import defer

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
    _libcCall(_libc.syncfs, fd)
    return True


def _libcCall(function, *args, path=None, again=True):
    """
    C{function(*args)} from libc (loaded with C{use_errno}): its result, or
    C{OSError} (its errno's subclass) for -1.  Called again after EINTR,
    unless C{again} is false (C{close}: the descriptor is gone either way).
    """
    while True:
        result = function(*args)
        if result != -1:
            return result
        e = ctypes.get_errno()
        if e != errno.EINTR or not again:
            raise OSError(e, os.strerror(e), path)


class _Quick:
    """
    The disk thread's quick system calls (opening, writing into the page
    cache, cutting, closing, renaming), and the reactor thread's checks that
    a queue file or a hold marker is there, made through libc without
    letting the GIL go, where C{os}'s let it go and take it back.  At saturation
    the reactor thread holds the GIL, so each take-back was a wait for it
    (and, under C{SCHED_BATCH}, for a core): a batch's 250s waited for
    dozens of them.  The calls that wait for the device (C{syncfs},
    C{fsync}) still let it go.  Without libc, C{os}'s own calls.
    """

    def __init__(self):
        try:
            libc = ctypes.PyDLL(None, use_errno=True)
            libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
            libc.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
            libc.write.restype = ctypes.c_ssize_t
            libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_int64]
            libc.rename.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            libc.close.argtypes = [ctypes.c_int]
            libc.faccessat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            libc = None
        self._libc = libc

    def open(self, path, flags, mode=0o777):
        if self._libc is None:
            return os.open(path, flags, mode)
        return _libcCall(self._libc.open, os.fsencode(path), flags | os.O_CLOEXEC, mode, path=path)

    def write(self, fd, data):
        """Write all of C{data} (bytes); returns its length."""
        if self._libc is None:
            return writeAll(fd, data)
        done = _libcCall(self._libc.write, fd, data, len(data))
        while done < len(data):  # (a regular file takes it whole unless the disk is full)
            rest = data[done:]
            done += _libcCall(self._libc.write, fd, rest, len(rest))
        return len(data)

    def ftruncate(self, fd, length):
        if self._libc is None:
            return os.ftruncate(fd, length)
        _libcCall(self._libc.ftruncate, fd, length)

    def close(self, fd):
        """
        Close C{fd}.  EINTR is no error: Linux has let the descriptor go all
        the same (it is not closed again), and what was synced stays synced.
        """
        try:
            if self._libc is None:
                return os.close(fd)
            _libcCall(self._libc.close, fd, again=False)
        except InterruptedError:
            pass

    def rename(self, source, destination):
        if self._libc is None:
            return os.rename(source, destination)
        _libcCall(self._libc.rename, os.fsencode(source), os.fsencode(destination), path=source)

    def exists(self, path, follow=True):
        """
        C{os.path.exists} (C{os.path.lexists} unless C{follow}) with the
        GIL held: the kernel answers the lookup from its caches in a few
        microseconds, and around C{os.stat} the reactor thread then waited
        for the disk thread to give the GIL back.
        """
        if self._libc is None or not _LINUX:
            return os.path.exists(path) if follow else os.path.lexists(path)
        flags = 0 if follow else _AT_SYMLINK_NOFOLLOW
        return self._libc.faccessat(_AT_FDCWD, os.fsencode(path), os.F_OK, flags) == 0


#: C{faccessat}'s constants, as <fcntl.h> has them on Linux.
_LINUX = sys.platform.startswith("linux")
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW = -100, 0x100

quick = _Quick()


def writeAll(fd, data):
    """os.write until every octet of C{data} (bytes) is written; returns how many that was."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def removeFiles(paths):
    """Remove each of C{paths}; one that is already gone is not an error."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def removeOrKeep(paths, keep):
    """
    One removal request: C{paths} removed, the first renamed to C{keep}
    instead if given (or removed, when a directory has that name, or
    C{keep}'s directory is missing); returns the error (EIO, EROFS...), if
    any, for the caller to hear of: ENOENT when the first one's directory
    is missing, for a file not found there has not been removed.
    """
    first = paths[0] if paths else None
    try:
        if keep is not None:
            try:
                quick.rename(paths[0], keep)
                paths, first = paths[1:], None
            except FileNotFoundError:  # gone already (the next user creates it afresh), or no directory for keep
                pass
            except OSError as e:
                if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
        removeFiles(paths)
        if first is not None and not quick.exists(os.path.dirname(first)):
            # Its directory is out of reach (renamed, say): nothing was removed.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.path.dirname(first))
    except OSError as e:
        return e
    return None


def discardFile(fd, path):
    """
    Close C{fd} (if open) and remove the unfinished file C{path}.  A close
    that fails (EIO, reporting a write's error again) has let the
    descriptor go all the same, and the file still goes.
    """
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError:
        pass


def fsyncDirectory(path):
    fd = quick.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        quick.close(fd)


class CommitJob:
    """
    Make a file durable, then rename it to C{finalPath}.

    The file is either already open (C{fd}), or is created in the disk
    thread from C{data} (bytes, or a callable returning the bytes to write
    or a list of chunks), so the reactor thread never waits on the journal.
    With C{reuse}, C{tmpPath} is a spent file that is overwritten and cut
    to length instead of created: no inode is allocated.  Only the new
    name's directory is synced, so after a crash the file can still have
    its old name as well; the owner of the reused files must recognise
    that name before it hands the file out again (the spool does, from
    the queue id in the content).

    With C{early}, the owner checks what it reads back (a checksum of the
    content, the queue id), so a committer may give the file its final
    name before its data is durable and sync both at once (the ring does):
    after a crash before the sync, the file can be there under that name
    but cut short or stale, and its owner must recognise it as such.
    """

    #: The file has its final name (L{name}).
    named = False

    def __init__(self, tmpPath, finalPath, fd=None, data=None, reuse=False, size=None, early=False):
        self.tmpPath = tmpPath
        self.finalPath = finalPath
        self.fd = fd
        self.data = data
        self.reuse = reuse
        self.early = early
        if size is None:  # (unknown for a callable: counted as nothing)
            size = len(data) if isinstance(data, bytes) else sum(map(len, data)) if isinstance(data, list) else 0
        #: Octets of content the sync makes durable.
        self.size = size

    def prepare(self):
        """Runs in the disk thread: create (or reuse) and fill the file if needed."""
        if self.fd is not None or self.data is None:
            return
        data = self.data() if callable(self.data) else self.data
        self.data = None
        if not isinstance(data, bytes):
            data = b"".join(data)
        if self.reuse:  # (created after all if it has gone missing)
            self.fd = quick.open(self.tmpPath, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            quick.ftruncate(self.fd, quick.write(self.fd, data))
        else:
            self.fd = quick.open(self.tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            quick.write(self.fd, data)

    def name(self):
        """Give the file its final name (its descriptor stays open)."""
        quick.rename(self.tmpPath, self.finalPath)
        self.named = True

    def abandon(self):
        """Close and remove the file, under whichever name it has: a failed commit names nothing."""
        discardFile(self.fd, self.finalPath if self.named else self.tmpPath)
        self.fd = None


class Committer:
    """
    The disk thread, with group commit: every job handed in while a batch
    is being synced waits for the next batch, so one sync covers all the
    messages that finished at about the same time.  Files are created,
    synced, renamed and removed in this one thread, so the reactor thread
    never blocks on file-system metadata.

    A batch's data is synced before its files are renamed, and its renames
    before its Deferreds fire.  When more jobs are waiting once a batch is
    renamed, the next batch's C{syncfs} makes those renames durable along
    with its own data: one journal commit per batch instead of two while
    jobs keep coming.  Otherwise the renamed files' directories are synced.

    @ivar mode: C{"grouped"} syncs each file system a batch writes to once
        with C{syncfs(2)} (falling back to one C{fsync} per file); C{"each"}
        fsyncs every file.
    @ivar cpus: the CPUs the disk thread runs on, or C{None} for those of
        the thread that starts it.  A worker kept to one CPU gives its disk
        thread all of the workers' CPUs: under C{SCHED_BATCH} it never
        preempts, so kept to a CPU that another process keeps busy it
        waited a whole time slice at each wake-up (bench/RESULTS.md).
    """

    def __init__(self, reactor, mode="grouped", cpus=None):
        self.reactor = reactor
        self.mode = mode
        self.cpus = cpus
        self._wake = threading.Condition(threading.Lock())
        self._pending = []
        self._unlinks = []
        self._thread = None
        self._stopping = False
        self._devices = {}
        self.batches = 0
        self.jobs = 0
        self.syncSeconds = 0.0

    def commit(self, job):
        """Queue C{job}; the Deferred fires once it is durable and renamed."""
        d = defer.Deferred()
        with self._wake:
            self._pending.append((job, d))
            self._start()
        return d

    def unlink(self, paths, keep=None):
        """
        Remove files in the disk thread (no sync needed); fires when done.
        With C{keep}, the first of C{paths} is renamed to it instead.
        """
        d = defer.Deferred()
        with self._wake:
            self._unlinks.append(((paths, keep), d))
            self._start()
        return d

    def stop(self):
        """
        Let the disk thread end once everything handed in is done (at
        shutdown); a commit after that starts a new one.
        """
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _start(self):
        """With the lock held: wake the disk thread, or start one."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="relaygw-disk", daemon=True)
            self._thread.start()
        else:
            self._wake.notify()

    def _take(self):
        """Runs in the disk thread: the next batch and removals, or C{None} once stopped."""
        with self._wake:
            while not (self._pending or self._unlinks):
                if self._stopping:
                    self._thread = None
                    return None
                self._wake.wait()
            batch, self._pending = self._pending, []
            unlinks, self._unlinks = self._unlinks, []
            return batch, unlinks

    #: A batch with this many octets of content or more runs on the normal
    #: scheduling policy (large messages: at saturation, the 250s waiting
    #: for it would otherwise wait for a free core, batch after batch).
    BIG_BATCH = 1 << 20

    @staticmethod
    def _schedule(policy):
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except (AttributeError, OSError):
            pass

    def _run(self):
        # A disk thread woken by the kernel would preempt the reactor thread
        # only to wait for the GIL that thread holds: two context switches
        # for nothing.  Under SCHED_BATCH (no privilege needed) it waits for
        # a free core instead: fewer switches, a longer wait at saturation.
        self._schedule(os.SCHED_BATCH)
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)
            except (AttributeError, OSError):
                pass  # (where it was started, then)
        renamed = []  # (job, Deferred): renamed, durable once a sync after the renames is done
        while True:
            work = self._take()
            if work is None:
                return
            batch, unlinks = work
            started = time.monotonic()
            unlinks = [(request, d, removeOrKeep(*request)) for request, d in unlinks]
            settled = []
            big = sum(job.size for job, _ in batch) >= self.BIG_BATCH
            if big:
                self._schedule(os.SCHED_OTHER)
            batch, failed = self._each(batch, lambda job: job.prepare())
            settled += failed
            batch, failed, synced = self._syncData(batch)
            settled += failed
            settled += self._settle(renamed, synced)
            renamed = []
            batch, failed = self._each(batch, self._name)
            settled += failed
            if batch:
                with self._wake:
                    chain = synced and bool(self._pending)
                if chain:
                    renamed = batch
                else:
                    settled += self._settle(batch, set())
            if big:
                self._schedule(os.SCHED_BATCH)
            try:
                self.reactor.callFromThread(self._done, len(batch), unlinks, settled, time.monotonic() - started)
            except OSError:
                pass  # (only the wake-up failed: the call is queued, for the reactor's next turn)

    @staticmethod
    def _abandon(batch, error):
        for job, _ in batch:
            job.abandon()
        return [(d, error) for _, d in batch]

    def _device(self, directory):
        """The file system C{directory} is on (looked up once)."""
        device = self._devices.get(directory)
        if device is None:
            device = self._devices[directory] = os.stat(directory).st_dev
        return device

    @classmethod
    def _each(cls, batch, step):
        """
        Runs in the disk thread: C{step(job)} for each job of C{batch}.
        Returns the jobs it did, and the outcomes of those it failed: each
        fails alone, abandoned (a full file system of a Maildir next hop's
        fails no message of the spool's).
        """
        done, failed = [], []
        for job, d in batch:
            try:
                step(job)
            except BaseException as e:  # reported on the reactor thread
                failed += cls._abandon([(job, d)], e)
            else:
                done.append((job, d))
        return done, failed

    def _syncData(self, batch):
        """
        Runs in the disk thread: sync the files' data.  Returns the jobs
        synced, the outcomes of those that failed (each file system's,
        or each file's, fail alone), and the file systems synced whole
        (C{syncfs}, one call each), whose earlier renames are durable too.
        """
        errors = {}  # (by index in batch)
        synced = set()
        each = range(len(batch))
        if self.mode == "grouped":
            byDevice = {}
            for index, (job, _) in enumerate(batch):
                try:
                    byDevice.setdefault(self._device(os.path.dirname(job.finalPath)), []).append(index)
                except BaseException as e:  # reported on the reactor thread
                    errors[index] = e
            each = []
            for device, indexes in byDevice.items():
                try:
                    whole = _syncfs(batch[indexes[0]][0].fd)
                except BaseException as e:
                    errors.update(dict.fromkeys(indexes, e))
                else:
                    if whole:
                        synced.add(device)
                    else:  # (no syncfs here)
                        each += indexes
        for index in each:
            try:
                os.fsync(batch[index][0].fd)
            except BaseException as e:
                errors[index] = e
        ready, failed = [], []
        for index, (job, d) in enumerate(batch):
            if index in errors:
                failed += self._abandon([(job, d)], errors[index])
            else:
                ready.append((job, d))
        return ready, failed, synced

    @staticmethod
    def _name(job):
        """Runs in the disk thread: close the file and give it its name."""
        fd, job.fd = job.fd, None  # (gone even if close fails: not closed again by abandon)
        quick.close(fd)
        job.name()

    def _settle(self, renamed, synced):
        """
        Runs in the disk thread: make the renames of C{renamed} durable
        (syncing each directory on a file system not in C{synced}); their
        Deferreds' outcomes.  When a directory cannot be synced, the names
        in it are taken back (as the ring committer does): a client told
        452 must not find its message queued, and delivered, after all.
        """
        errors = {}
        for directory in sorted({os.path.dirname(job.finalPath) for job, _ in renamed}):
            try:
                if self._device(directory) not in synced:
                    fsyncDirectory(directory)
            except OSError as e:
                errors[directory] = e
        outcomes = []
        for job, d in renamed:
            error = errors.get(os.path.dirname(job.finalPath))
            outcomes += [(d, None)] if error is None else self._abandon([(job, d)], error)
        return outcomes

    def _done(self, count, unlinks, settled, seconds):
        if count:
            self.batches += 1
            self.jobs += count
            self.syncSeconds += seconds
        # The commits first: their clients wait for a 250, where a removal
        # only lets the queue manager go on to its next attempt.
        for d, error in settled + [(d, failed) for _, d, failed in unlinks]:
            if error is not None:
                d.errback(error)
            else:
                d.callback(None)


#: The file whose lock says which process owns a spool partition.
