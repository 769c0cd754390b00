"""
Messages set aside in C{corrupt/}: files that could not be read back,
never tried again, kept for an operator to look at.
"""

import collections
import json
import os
import time

from relaygw.durable import removeFiles
from relaygw.logs import Logger
from relaygw.spool.layout import CREATE, namesMessage, openRegular
from relaygw.spool.queueid import queueIdOf
from relaygw.spoolapi import CorruptMessage

log = Logger(namespace="relaygw.spool")


def corruptEntry(name):
    """
    What C{corrupt/name} belongs to, as it is listed: NAME for NAME.state
    and NAME.reason (but C{.reason} or C{..state} for itself: no file name
    is left, or C{corrupt/} itself or the spool above it).
    """
    for end in (".state", ".reason"):
        if name.endswith(end) and namesMessage(name[:-len(end)]):
            return name[:-len(end)]
    return name


def corruptOrder(name):
    """Sorts what C{corrupt/} holds by queue id, then in the order it was set aside (ID, ID.1, ID.2 ... ID.10)."""
    return queueIdOf(name), len(name), name



class Quarantine:
    """
    The spool's C{corrupt/}: messages set aside, listed and removed, and
    those taken over from another spool layout's.
    """

    def __init__(self, spool):
        self.spool = spool

    def adopt(self, src, entries):
        """
        Messages set aside in C{src} (another layout's C{corrupt/}) stay set
        aside here, each with its progress record and reason, under the
        next free name for its queue id (L{_freeName}): nothing here is
        replaced, and nothing is left behind.
        """
        groups = collections.defaultdict(list)
        for entry in entries:
            groups[corruptEntry(entry)].append(entry)
        for name in sorted(groups, key=corruptOrder):
            new = self._freeName(queueIdOf(name))
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
                with open(os.open(os.path.join(area, name + ".reason"), CREATE | os.O_EXCL, 0o640), "w") as f:
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
        for name in sorted({corruptEntry(name) for name in names}, key=corruptOrder):
            reason, when = "unknown", None
            try:
                f, _ = openRegular(self.spool.path("corrupt", name + ".reason"), "reason file")
                with f:
                    recorded = json.loads(f.read(self.REASON_SIZE))
                reason = str(recorded["reason"])
                when = float(recorded["time"])
            except (OSError, CorruptMessage, ValueError, KeyError, TypeError, RecursionError, OverflowError):
                pass  # (what is not a reason written here: unknown, or a reason without its time)
            found.append((name, reason, when))
        return found

    def count(self):
        """How many messages L{corrupt} lists, without reading their reasons."""
        try:
            return len({corruptEntry(name) for name in os.listdir(self.spool.path("corrupt"))})
        except FileNotFoundError:
            return 0

    #: A reason file is read up to this size (one written here is a line).
    REASON_SIZE = 64 << 10

    def discardCorrupt(self, name):
        """
        Remove a quarantined message's files, C{name} as L{corrupt} lists
        it; False when there is none, C{OSError} when its file is a directory.
        """
        try:
            files = [n for n in os.listdir(self.spool.path("corrupt")) if corruptEntry(n) == name]
        except FileNotFoundError:
            return False
        if not files:
            return False
        path = self.spool.path("corrupt", name)
        if name in files:
            removeFiles([path])
        self.spool.discard([path + ".state", path + ".reason"])
        return True
