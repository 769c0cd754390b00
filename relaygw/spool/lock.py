"""
A spool partition's owner: one live process at a time.
"""

import errno
import fcntl
import os

from relaygw.logs import Logger
from relaygw.spool.layout import UnsafeSpool
from relaygw.spoolapi import isStorageError

log = Logger(namespace="relaygw.spool")

LOCK_FILE = "lock"


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
