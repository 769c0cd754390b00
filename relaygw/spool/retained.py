"""
Committed messages' content kept in memory until they leave the spool.
"""


class RetainedContent:
    """
    A committed message's content is also kept in memory until it leaves
    the spool (messages up to RETAIN_EACH octets, RETAIN in all), so that
    its delivery need not open and read back what was just written; the
    queue file must still be there (relaygw-queue delete unlinks it).
    """

    RETAIN_EACH = 64 << 10
    RETAIN = 8 << 20

    def __init__(self):
        self._contents = {}
        self._size = 0

    def keep(self, queueId, chunks, size):
        """Keep C{queueId}'s content (C{chunks}, C{size} octets), if it is within the bounds."""
        if size <= self.RETAIN_EACH and self._size + size <= self.RETAIN:
            self._contents[queueId] = b"".join(chunks)
            self._size += size

    def get(self, queueId):
        """The content kept for C{queueId}, or None."""
        return self._contents.get(queueId)

    def drop(self, queueId):
        """C{queueId} has left the spool: its share is given back."""
        content = self._contents.pop(queueId, None)
        if content is not None:
            self._size -= len(content)
