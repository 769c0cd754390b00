"""
What the rest of the gateway may know about the spool: the envelope of a
queued message and the spool's operations.  Only L{relaygw.spool} knows
how messages, progress, hold markers and requests are laid out on disk.
"""

import collections
import copy
import dataclasses
import math
import errno

from zope.interface import Attribute, Interface


class CorruptMessage(Exception):
    """
    A queue or state file that cannot be read back or does not agree with
    itself.  C{str()} is the reason, fit for a log line; C{path} names the
    file when it is known.
    """

    def __init__(self, reason, path=None):
        Exception.__init__(self, reason)
        self.reason = reason
        self.path = path


class SpoolUnavailable(OSError):
    """
    The spool's queue directory is not there (renamed or removed while the
    gateway runs): a message not found in it has not gone, and waits.
    """


#: What relaygw-queue asked of the running queue manager since its last
#: look (L{ISpool.takeRequests}): retry everything (a bool); try these
#: messages now; these were held; these released (to be tried now); these
#: deleted.  Each a list of queue ids.
Requests = collections.namedtuple("Requests", "flushAll flushed held released deleted")


class Withdrawn(Exception):
    """
    The operator held or deleted a queued message (relaygw-queue) before
    its content was opened to go out: it is not sent.  C{str()} says which.
    """


#: Errors that mean the spool's storage is out of room or failing.
STORAGE_ERRORS = frozenset([errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])


def isStorageError(error):
    """Whether C{error} says the spool's storage is full or failing (a 452 4.3.1, not a crash)."""
    return isinstance(error, OSError) and error.errno in STORAGE_ERRORS


@dataclasses.dataclass
class Envelope:
    """
    A message's envelope as the spool keeps it.

    @ivar size: the content's size in octets as it is sent onward (the
        Received header included); 0 until the content is complete.
    @ivar rcpt_params: the DSN parameters (RFC 3461) given with RCPT, for
        the recipients that had any: C{{recipient: {"NOTIFY": "SUCCESS,DELAY",
        "ORCPT": "rfc822;a+2Bb@example.org"}}} (NOTIFY uppercased, ORCPT as
        xtext).  Empty, and left out of the stored form, when none had any;
        C{mail_params} holds MAIL's C{RET} and C{ENVID} (xtext) alike.
    """

    mailfrom: str
    recipients: list
    mail_params: dict = dataclasses.field(default_factory=dict)
    arrival: float = 0.0
    context: dict = dataclasses.field(default_factory=dict)
    queue_id: str = ""
    size: int = 0
    rcpt_params: dict = dataclasses.field(default_factory=dict)

    #: (key, accepted types, required) of the stored form.
    _SHAPE = (("mailfrom", (str,), True), ("recipients", (list,), True), ("mail_params", (dict,), False),
              ("arrival", (int, float), False), ("context", (dict,), False), ("queue_id", (str,), False),
              ("rcpt_params", (dict,), False))

    @classmethod
    def fromDict(cls, stored):
        """The envelope from its stored form; raises L{CorruptMessage} naming what is wrong."""
        if not isinstance(stored, dict):
            raise CorruptMessage("envelope is not an object")
        for key, kinds, required in cls._SHAPE:
            if key not in stored:
                if required:
                    raise CorruptMessage("envelope lacks %r" % (key,))
            elif not isinstance(stored[key], kinds) or isinstance(stored[key], bool):
                raise CorruptMessage("envelope %r has the wrong type" % (key,))
        if not stored["recipients"] or not all(isinstance(r, str) for r in stored["recipients"]):
            raise CorruptMessage("envelope recipients are not a list of addresses")
        rcptParams = stored.get("rcpt_params", {})
        if not all(isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in rcptParams.values()):
            raise CorruptMessage("envelope rcpt_params are not parameters by recipient")
        size = stored.get("size", stored.get("body_size", 0))
        try:
            arrival = float(stored.get("arrival", 0.0))
        except OverflowError:  # (a JSON integer past a float's range)
            arrival = math.inf
        if not math.isfinite(arrival):  # (NaN and Infinity parse too: an age that never grows old)
            raise CorruptMessage("envelope 'arrival' is not a time")
        return cls(mailfrom=stored["mailfrom"], recipients=list(stored["recipients"]),
                   mail_params=dict(stored.get("mail_params", {})), arrival=arrival,
                   context=dict(stored.get("context", {})), queue_id=stored.get("queue_id", ""),
                   size=size if isinstance(size, int) else 0, rcpt_params=dict(rcptParams))

    def asDict(self):
        """
        The stored form (as C{relaygw-queue show} prints it): a deep copy, as
        C{dataclasses.asdict} makes it, but without a C{copy.deepcopy} call
        for every value of the context (once per message, on the way in).
        """
        return {f.name: _copied(getattr(self, f.name)) for f in dataclasses.fields(self)}


_IMMUTABLE = frozenset((str, int, float, bool, type(None), bytes))


def _copied(value):
    """A deep copy of plain data (dicts, lists, tuples of immutable values); anything else by C{deepcopy}."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    # Immutable values inline, not by a call each (a context has a few dozen).
    if kind is dict:
        return {k: v if type(v) in _IMMUTABLE else _copied(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _IMMUTABLE else _copied(v) for v in value]
    if kind is tuple:
        return tuple(_copied(v) for v in value)
    return copy.deepcopy(value)


class ISpooledMessage(Interface):
    """A committed message, as next hops and the queue manager see it."""

    queueId = Attribute("the queue id")
    mailfrom = Attribute("the envelope sender, '' for the null sender")
    recipients = Attribute("the recipients this view is for")
    size = Attribute("octets of content sent onward")
    arrival = Attribute("when it was accepted (seconds since the epoch)")
    context = Attribute("the connection context recorded at acceptance")
    envelope = Attribute("the L{Envelope} (read only)")

    def narrowed(recipients):
        """A view of the same message for only C{recipients}."""

    def openBody():
        """A binary file positioned at the start of the content; the caller closes it."""

    def openForDelivery():
        """
        L{openBody} for a next hop about to send the message; raises
        L{Withdrawn} when it is held or deleted.
        """


class ISpool(Interface):
    """
    The spool of one process (or one worker's partition): the one owner
    of the queue file layout.
    """

    directory = Attribute("the spool (partition) directory")

    def open():
        """Create the layout, discard what was never acknowledged; the queued ids, oldest first."""

    def checkLayout():
        """Raise C{UnsafeSpool} unless every area of the layout that exists is a real directory."""

    def newMessage(envelope):
        """
        A writer for a new message (C{write()}, C{commit()}, C{abort()},
        C{failed}, and C{message} once committed) with a copy of
        C{envelope}: an L{Envelope}, or its stored form as a dict.
        """

    def queueIds():
        """The ids of the queued messages, oldest first."""

    def scanQueueIds():
        """The ids of the queued messages, in no order, an iterator reading the queue as it is taken."""

    def exists(queueId):
        """Whether C{queueId} is (still) queued."""

    def committedAt(queueId):
        """When C{queueId} was made durable (a time stamp), or C{None} if it is gone."""

    def load(queueId, content=True):
        """
        The L{ISpooledMessage}; raises L{CorruptMessage} or
        C{FileNotFoundError}.  Unless C{content}, only the envelope is read
        back (the content's checksum is not checked).
        """

    def readState(queueId):
        """The per-recipient progress (C{{}} when none); raises L{CorruptMessage}."""

    def writeState(queueId, state):
        """Durably replace the progress record."""

    def remove(queueId, progress=True):
        """The message leaves the spool."""

    def quarantine(queueId, reason):
        """Move the message's files to the corrupt area, with the reason."""

    def corrupt():
        """C{[(name, reason, when)]} of the quarantined messages: the name is the queue id, or ID.1, ID.2 ..."""

    def hold(queueId):
        """Keep C{queueId} from being delivered; False when it is not queued."""

    def release(queueId):
        """Let a held message go and ask for an attempt now; False when it was not held."""

    def isHeld(queueId):
        """Whether C{queueId} is held."""

    def requestFlush(queueId=None):
        """Ask the running queue manager to retry everything (or C{queueId}) now."""

    def noteDeleted(queueId):
        """Tell the running queue manager that C{queueId} was deleted (it logs the removal)."""

    def takeRequests():
        """
        The requests left since the last call, a L{Requests}: a bounded
        share of them when there are many (L{requestsPending} says more wait).
        """

    def requestsPending():
        """Whether requests that the last L{takeRequests} left for later are waiting."""

    def flushDone(queueId=None):
        """
        The flush of everything a L{takeRequests} handed out (C{flushAll}),
        or of C{queueId} (one of C{flushed}), has been carried out.  Until
        then a stop or a crash leaves it asked for: the first
        L{takeRequests} after the next start hands it out again.
        """

    def freeSpace():
        """Octets free for the spool on its file system."""

    def freeFiles():
        """Inodes free for the spool on its file system, or None where it counts none."""

    def hasRoom(size=0):
        """Whether C{size} more octets leave at least the configured minimum free, and an inode is free."""

    def oldestAge(now):
        """(depth, age in seconds of the oldest message)."""

    def adopt(directory):
        """Take over the messages of another spool layout at C{directory}; how many moved."""

