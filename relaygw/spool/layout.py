"""
The spool's areas, and how a file inside them is opened: nothing the
spool opens is ever reached through a symbolic link.
"""

import errno
import os
import stat

from relaygw.spoolapi import CorruptMessage

#: The directories of the layout (see L{relaygw.spool}).
AREAS = ("tmp", "queue", "state", "hold", "spent", "corrupt")

#: How files inside the spool are opened: a symlink is never followed (the
#: operator's tool runs as root; nothing outside the spool may be touched).
READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


def openRegular(path, what):
    """
    C{path} opened to read (a binary file) and its size.  Raises
    L{CorruptMessage} naming C{what} when it is not a regular file: a
    symbolic link (never followed), a directory, a FIFO.
    """
    try:
        fd = os.open(path, READ)
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


def isDirectory(path):
    """Whether C{path} is a real directory (not a symbolic link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def areaProblems(directory):
    """
    C{(path, what it is)} for each area of the spool layout in
    C{directory} that exists but is no real directory: a symbolic link
    there would take every file operation outside the spool.  One C{lstat}
    per area; start refuses such a spool, the config check names them all.
    """
    for area in AREAS:
        path = directory + os.sep + area
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(mode):
            yield path, "a symbolic link, not a directory" if stat.S_ISLNK(mode) else "not a directory"


def namesMessage(qid):
    """
    Whether an id taken from a file name (a marker's, a quarantined
    file's) can name a message: empty, C{.} and C{..} name an area itself
    or the spool above it.
    """
    return qid not in ("", ".", "..")
