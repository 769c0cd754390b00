"""
The spool partitions of the workers under one spool directory.
"""

import os
import re

from relaygw.spool.directory import Spool
from relaygw.spool.layout import UnsafeSpool, isDirectory

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
    found = {int(os.path.basename(path)[1:]): path for path in _partitionPaths(base) if isDirectory(path)}
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
    single = isDirectory(os.path.join(base, "queue"))
    if (found or linked) and (workers > 1 or not single) or (workers > 1 and not single):
        if linked:
            raise UnsafeSpool(linked[0], "a symbolic link, not a directory")
        return [Spool(path, None) for path in found]
    return [Spool(base, None)]
