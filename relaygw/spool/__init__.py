"""
The durable spool: accepted means on disk.

The layout under the spool directory is this package's alone; everything
else goes through L{relaygw.spoolapi.ISpool} (L{Spool})::

    tmp/ID        a message being received
    queue/ID      a committed message: one JSON envelope line (starting
                  with the content's size), then the content
    state/ID      per-recipient delivery progress: one JSON object,
                  starting with its CRC-32, that names its message
    hold/ID       an empty marker: the message is held
    corrupt/ID    a queue file that could not be read back, with
                  ID.state (its progress, if any) and ID.reason; a
                  later one under the same id as ID.1, ID.2 ...
    spent/ID      delivered messages' files, overwritten by new ones
    flush, release.ID, held.ID, released.ID, deleted.ID
                  requests from relaygw-queue
    flushing, flushing.ID
                  a flush (of ID, or its release) taken and not carried out yet
    lock          the partition's owner (L{PartitionLock})

A body is streamed into C{tmp/ID} as it arrives.  At the end of DATA the
file joins the committer's next batch (L{relaygw.ringcommit.committer}:
through io_uring, or the disk thread): every message that finished in the
meantime is synced together, with its name in C{queue/}.  Only then is the
250 sent.  Through io_uring the file is renamed into C{queue/} before the
sync (one journal commit for the data and the name): a crash before the
sync can leave it there cut short or stale, which reading it back tells
from the checksum of its content and the queue id it holds.
"""

from relaygw.spool.directory import Spool
from relaygw.spool.layout import UnsafeSpool, areaProblems
from relaygw.spool.lock import LOCK_FILE, PartitionLock, PartitionLocked
from relaygw.spool.message import SpooledMessage
from relaygw.spool.partition import partitionDirectory, partitions, spoolsAt
from relaygw.spool.progress import ProgressRecords
from relaygw.spool.quarantine import Quarantine
from relaygw.spool.queueid import isQueueId, newQueueId
from relaygw.spool.recovery import SpoolRecovery
from relaygw.spool.requests import OperatorRequests
from relaygw.spool.writer import MessageWriter

__all__ = [
    "LOCK_FILE", "MessageWriter", "OperatorRequests", "PartitionLock", "PartitionLocked", "ProgressRecords",
    "Quarantine", "Spool", "SpoolRecovery", "SpooledMessage", "UnsafeSpool", "areaProblems", "isQueueId",
    "newQueueId", "partitionDirectory", "partitions", "spoolsAt",
]
