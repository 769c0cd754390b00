"""
What is already on disk when the spool is opened, or taken over from
another spool layout.
"""

import json
import os

from relaygw.logs import Logger
from relaygw.spool.layout import isDirectory, openRegular
from relaygw.spool.queueid import isQueueId, queueIdOf
from relaygw.spoolapi import CorruptMessage

log = Logger(namespace="relaygw.spool")


class SpoolRecovery:
    """
    What is already on disk: the scan at start (what was never
    acknowledged goes), and messages taken over from another spool layout.
    """

    def __init__(self, spool):
        self.spool = spool

    def open(self):
        """
        Create the layout, throw away what was never acknowledged and the
        progress and hold markers of messages that have gone.  Returns the
        committed queue ids, oldest first, and the spent files to reuse.
        """
        spool = self.spool
        spool.checkLayout()
        for area in spool.AREAS:
            os.makedirs(spool.path(area), exist_ok=True)
        spool.discard([spool.path("tmp", name) for name in os.listdir(spool.path("tmp"))])
        queued = set(os.listdir(spool.path("queue")))
        strays = sorted(name for name in queued if not isQueueId(name))
        if strays:
            log.warn("{path}: {n} files whose names are no queue ids, left alone (never delivered): {names}",
                     path=spool.path("queue"), n=len(strays), names=", ".join(ascii(n) for n in strays[:10])
                     + (" ..." if len(strays) > 10 else ""))
            queued.difference_update(strays)
        kept = queued.union(queueIdOf(name) for name in os.listdir(spool.path("corrupt")))
        spent = []
        for name in os.listdir(spool.path("spent")):
            if len(spent) < spool.spent.SPENT and self._reusable(name, kept):
                spent.append(name)
            else:
                spool.discard([spool.path("spent", name)])
        for area in ("state", "hold"):
            for name in os.listdir(spool.path(area)):
                if name.endswith(".tmp") or name not in queued:
                    spool.discard([spool.path(area, name)])
        return sorted(queued), spent

    def _reusable(self, name, kept):
        """
        Whether C{spent/name} may be overwritten: not when a message in
        C{kept} (queued or quarantined) is still that file.  A crash during
        its own removal can leave it under both names; a crash after it
        was reused for a new message can leave its old name here as well
        as the new one in C{queue/}, as a commit syncs only C{queue/}.
        The content then names the new message if it was synced before the
        rename; named first (through io_uring), the file can still hold its
        old content under both names, so a spent file with another name
        (a link count above one) is not reused either.
        """
        if name in kept:
            return False
        try:
            f, _ = openRegular(self.spool.path("spent", name), "spent file")
            with f:
                if os.fstat(f.fileno()).st_nlink > 1:
                    return False
                envelope = json.loads(f.readline(self.spool.MAX_ENVELOPE))
            return envelope.get("queue_id") not in kept
        except (OSError, CorruptMessage, ValueError, RecursionError, AttributeError):
            return False  # (unreadable: not worth the risk)

    def adopt(self, source):
        """
        Take over the messages of the spool layout at C{source} (a
        partition no longer used, or the unpartitioned spool): progress
        and hold markers move before the message they belong to; spent
        files are only ever overwritten by their own partition, so they
        go.  A message whose id this spool has already (queued or set
        aside: a copy, or junk under its name) is left where it is, with a
        warning, as is anything whose name is taken here: nothing of this
        spool is replaced.  Messages set aside there stay set aside here
        (L{Quarantine.adopt}).  Returns how many messages moved.
        """
        moved = 0
        taken = set()
        for area in ("queue", "corrupt"):
            if isDirectory(self.spool.path(area)):
                taken.update(queueIdOf(name) for name in os.listdir(self.spool.path(area)))
        for area in ("state", "hold", "corrupt", "queue"):
            src = os.path.join(source, area)
            if os.path.islink(src):
                log.warn("not adopting {path}: a symbolic link, not a directory", path=src)
                continue
            entries = sorted(os.listdir(src)) if os.path.isdir(src) else ()
            if entries:
                os.makedirs(self.spool.path(area), exist_ok=True)
            if area == "corrupt":
                self.spool.quarantined.adopt(src, entries)
                continue
            for entry in entries:
                qid = queueIdOf(entry)
                if qid in taken or os.path.lexists(self.spool.path(area, entry)):
                    log.warn("not adopting {path}: the spool has a message {qid} already",
                             path=os.path.join(src, entry), qid=qid)
                    continue
                os.rename(os.path.join(src, entry), self.spool.path(area, entry))
                if area == "queue":
                    moved += 1
                    self.spool.index.add(entry)
                    if os.path.lexists(self.spool.path("hold", entry)):
                        self.spool.index.noteHeld(entry)
        spent = os.path.join(source, "spent")
        if isDirectory(spent):
            self.spool.discard([os.path.join(spent, name) for name in os.listdir(spent)])
        return moved
