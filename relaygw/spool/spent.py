"""
Delivered messages' files, kept in C{spent/} for new messages to overwrite.
"""

import os

from relaygw.durable import removeFiles
from relaygw.logs import Logger

log = Logger(namespace="relaygw.spool")


class SpentFiles:
    """
    A delivered message's file is not unlinked but moved to C{spent/}, up
    to C{SPENT} of them, and the next message overwrites it: creating a
    file costs the file system an inode allocation, which on ext4 scans
    past every recently freed inode, and that was most of the CPU time
    of a message relayed at full speed.

    @ivar names: the spent files free to overwrite.
    @ivar releasing: octets and files of the spent files whose removal is
        under way.
    @ivar gone: C{spent/} has gone (L{forget}).
    """

    SPENT = 1024

    def __init__(self, spool):
        self.spool = spool
        self.names = []
        self.releasing = (0, 0)
        self.gone = False

    def full(self):
        """Whether no more delivered files are kept: C{SPENT} are, or C{spent/} has gone."""
        return self.gone or len(self.names) >= self.SPENT

    def add(self, name):
        """A delivered message's file is C{spent/name} now, to overwrite."""
        self.names.append(name)

    def take(self):
        """A spent file's path to overwrite with a new message, or None."""
        return self.spool.path("spent", self.names.pop()) if self.names else None

    def forget(self):
        """
        C{spent/} has gone (removed by hand): the files it held are not
        reused, and delivered messages' files are not kept until a restart
        makes it again.
        """
        if not self.gone:
            log.warn("{path} has gone: delivered messages' files are not kept for reuse until a restart",
                     path=self.spool.path("spent"))
        self.gone = True
        self.names = []

    def release(self):
        """
        The file system is short of room: delivered messages' files give
        their blocks back.  Returns the octets and the files given back.
        """
        if not self.names:
            return 0, 0
        paths = [self.spool.path("spent", name) for name in self.names]
        self.names = []
        held = 0
        for path in paths:
            try:
                held += os.lstat(path).st_blocks * 512
            except OSError:
                pass
        log.warn("spool short of room: removing {n} spent files", n=len(paths))
        committer = self.spool.committer
        if committer is None:
            removeFiles(paths)
        else:
            releasing = (held, len(paths))
            self.releasing = (self.releasing[0] + held, self.releasing[1] + len(paths))

            def released(result):
                self.releasing = (self.releasing[0] - releasing[0], self.releasing[1] - releasing[1])
                return result

            committer.unlink(paths).addBoth(released).addErrback(
                lambda f: log.failure("could not remove spent files", f))
        return held, len(paths)
