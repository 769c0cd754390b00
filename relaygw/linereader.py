"""
Command-line framing (RFC 5321 section 2.3.8), as a pure reader: bytes
in, one command line or framing event at a time out.  No I/O, no clock,
no reply: what an event means (which reply, whether the session ends) is
the session's to decide in its current mode.

A line ends at LF.  Its CRLF is removed; a bare LF (protocol.md section
2) ends a line too, and in C{reject} mode that line is the L{BARE_LF}
event instead.  A bare CR is data.  A line longer than the limit (its
CRLF counted) is the L{LINE_TOO_LONG} event, never a line.  Unread input
without an LF that grows past the limit is the same event, once; then it
and the rest of that line up to its LF are dropped, so the reader holds
no more than the limit plus what was fed since it was last read.

Lines are cut from the buffer at an offset, so a burst of pipelined
commands is not copied once per line.
"""


class _Event:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "<%s>" % (self.name,)


#: A line, or unread input without an LF, longer than the limit.
LINE_TOO_LONG = _Event("LINE_TOO_LONG")
#: A line ended by a bare LF, in C{reject} mode.
BARE_LF = _Event("BARE_LF")


class LineReader:
    """
    The command lines of one connection.

    Call L{feed} with input as it arrives, and L{next} for each line until
    it returns C{None} (no complete line yet).  L{take} hands over the
    input not read yet (the content after DATA, or plaintext discarded at
    STARTTLS).

    @ivar limit: the longest line, its CRLF counted.
    @ivar rejectBareLF: whether a line ended by a bare LF is L{BARE_LF}.
    """

    def __init__(self, limit, rejectBareLF=False):
        self.limit = limit
        self.rejectBareLF = rejectBareLF
        self._buf = b""
        self._pos = 0
        # Inside an over-long line: drop input up to its LF.
        self._skipping = False
        # Its start was just reported: drop it before reading on (until
        # then it is still unread input, which a closing reply lingers over).
        self._drop = False

    @property
    def pending(self):
        """How many octets are not read yet."""
        return len(self._buf) - self._pos

    @property
    def unread(self):
        """The octets not read yet (a copy; the reader keeps them)."""
        return self._buf[self._pos:]

    def feed(self, data):
        if self._drop:
            self._drop = False
            self._buf, self._pos = data, 0
        elif self._pos == len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf = self._buf[self._pos:] + data
            self._pos = 0

    def take(self):
        """The octets not read yet, removed from the reader."""
        rest = self._buf[self._pos:] if self._pos else self._buf
        self._buf, self._pos, self._drop = b"", 0, False
        return rest

    def next(self):
        """
        The next command line (bytes, without its line end),
        L{LINE_TOO_LONG}, L{BARE_LF}, or C{None} if no complete line is
        buffered.
        """
        if self._drop:
            self._drop = False
            self._buf, self._pos = b"", 0
            return None
        buf, pos = self._buf, self._pos
        i = buf.find(b"\n", pos)
        if i != -1 and self._skipping:
            # The end of an over-long line: drop it.
            self._skipping = False
            pos = i + 1
            i = buf.find(b"\n", pos)
        if i == -1:
            self._pos = pos
            if len(buf) - pos > self.limit:
                if self._skipping:
                    self._buf, self._pos = b"", 0
                    return None
                self._skipping = self._drop = True
                return LINE_TOO_LONG
            return None
        self._pos = i + 1
        if i > pos and buf[i - 1] == 13:
            line = buf[pos:i - 1]
        elif self.rejectBareLF:
            return BARE_LF
        else:
            line = buf[pos:i]
        if len(line) + 2 > self.limit:
            return LINE_TOO_LONG
        return line
