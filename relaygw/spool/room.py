"""
Room on the spool's file system: whether a message fits, and the storage
errors seen.
"""

import os
import time


class Room:
    """
    Whether the spool's file system has room for more, counting what the
    spent files (L{SpentFiles}) hold as free, and the last storage error.

    @ivar minFree: octets that must stay free on the spool's file system
        (C{[spool] min_free_space}).
    @ivar short: room ran short (a MAIL found too little, or a write
        failed) and has not been found enough since: delivered files are
        not kept then.
    """

    def __init__(self, directory, spent, minFree=0):
        self.directory = directory
        self.spent = spent
        self.minFree = minFree
        self.short = False
        self.lastStorageError = None

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
        releasing = self.spent.releasing
        try:
            # (Spent files being removed are room already: the disk thread
            # has not got to them yet.)
            free, files = self.freeSpace() + releasing[0], self.freeFiles()
        except OSError:
            return True
        if files is not None:
            files += releasing[1]
        if self._enough(free, files, size):
            self.short = False
            return True
        # What the spent files hold is the spool's own to give back: room
        # for this message once they have gone, not a reason to refuse it.
        self.short = True
        held, count = self.spent.release()
        return self._enough(free + held, None if files is None else files + count, size)

    def _enough(self, free, files, size):
        return free > 0 and free >= self.minFree + size and (files is None or files > 0)

    def storageFailed(self, error):
        """A write failed for want of room (or an I/O error): remembered for /healthz; spent files go."""
        self.lastStorageError = (time.monotonic(), error)
        self.short = True
        self.spent.release()

    def recentStorageError(self, seconds):
        """C{(secondsAgo, error)} of a storage error within the last C{seconds}, or None."""
        if self.lastStorageError is None:
            return None
        ago = time.monotonic() - self.lastStorageError[0]
        return (ago, self.lastStorageError[1]) if ago <= seconds else None
