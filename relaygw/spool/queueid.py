"""
Queue ids: how a message is named in the spool.
"""

import os
import re
import time

_counter = 0

#: A queue id: what L{newQueueId} makes, and what relaygw-queue takes as one.
#: A file in C{queue/} named otherwise (put there by hand: C{x y}, a control
#: character) is no message: never listed, counted or delivered, and left
#: alone, with a warning at start (as Postfix skips a queue file with a bad name).
_QUEUE_ID = re.compile(r"[A-Za-z0-9_-]+")


def isQueueId(name):
    """Whether C{name} is a queue id (L{_QUEUE_ID})."""
    return _QUEUE_ID.fullmatch(name) is not None


def newQueueId():
    """A unique, sortable, file-name-safe queue id."""
    global _counter
    _counter = (_counter + 1) & 0xFFFFFF
    return "%011X%04X%06X" % (int(time.time() * 1000), os.getpid() & 0xFFFF, _counter)


def queueIdOf(name):
    """
    The queue id a spool file belongs to, by its name: ID in C{queue/},
    C{state/} and C{hold/}; in C{corrupt/} ID, ID.state and ID.reason, and
    for later ones ID.1, ID.1.state ...
    """
    return name.partition(".")[0]
