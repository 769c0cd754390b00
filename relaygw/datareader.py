"""
DATA framing (RFC 5321 section 4.1.1.4), as a pure reader: bytes in, body
octets and the end of data out.  No I/O, no clock, no reply.

The end of data is only C{CR LF . CR LF}; the start of DATA counts as
just after a CRLF (protocol.md section 2, the SMTP smuggling cases:
CVE-2023-51764/-51765/-51766).  A C{.} line that itself, or whose previous
line, ended in a bare LF is never the end.  A bare LF in the body ends a
line and is stored as CRLF, and L{DataReader.sawBareLF} records that one
was seen (a listener in C{reject} mode refuses the message at its end).  A
bare CR is data.  A leading dot is removed (dot-stuffing), except on a
line that is only a dot.

Input is scanned in whole buffers with a few C-speed bytes operations, not
line by line; a line longer than C{piece} octets is passed on in pieces,
so memory stays bounded whatever the line lengths.
"""

import re

_UNSTUFF = re.compile(rb"\n\.(?!\r?\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_END = b"\r\n.\r\n"

#: A line longer than this is passed on in pieces.
PIECE = 32 * 1024


class DataReader:
    """
    The body of one DATA command.

    Call L{feed} with each piece of input as it arrives.  It returns
    C{(body, rest)}: C{body} is message content ready to be stored (dot
    unstuffed, line ends CRLF), and C{rest} is C{None} until the end of
    data was seen, then the input that followed it (the next commands).
    After the end, the reader must not be fed again.

    @ivar sawBareLF: whether the body had a line ending in a bare LF.
    @ivar done: whether the end of data was seen.
    """

    def __init__(self, piece=PIECE):
        self.piece = max(piece, 8)
        self.sawBareLF = False
        self.done = False
        self._buf = b""
        # The last two raw octets before _buf: DATA starts after a CRLF.
        self._last2 = b"\r\n"

    @property
    def pending(self):
        """How many octets are held back (an incomplete line)."""
        return len(self._buf)

    def feed(self, data):
        if self.done:
            raise ValueError("DATA reader fed after the end of data")
        buf = self._buf + data if self._buf else data
        out = []
        while buf:
            probe = self._last2 + buf
            end = probe.find(_END)
            if end != -1:
                # The "." sits at probe[end + 2], which is buf[end].
                out.append(self._content(buf[:end]))
                self._buf = b""
                self.done = True
                return b"".join(out), buf[end + 3:]
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) < self.piece:
                    break
                # A very long line: pass it on in pieces, never ending on
                # CR (a CRLF split here would look like a bare LF), and
                # keeping back what could start the end-of-data marker.
                cut = len(buf) - 4
                if buf[cut - 1:cut] == b"\r":
                    cut -= 1
            out.append(self._content(buf[:cut]))
            buf = buf[cut:]
            if not buf or buf.find(b"\n") == -1 and len(buf) < self.piece:
                break
        self._buf = buf
        return b"".join(out), None

    def _content(self, chunk):
        """Raw content octets -> stored octets (unstuffed, CRLF line ends)."""
        if not chunk:
            return b""
        bol = self._last2[-1:] == b"\n"
        self._last2 = (self._last2 + chunk)[-2:]
        probe = (b"\n" + chunk) if bol else chunk
        if b"\n." in probe:
            probe = _UNSTUFF.sub(b"\n", probe)
            chunk = probe[1:] if bol else probe
        if chunk.count(b"\n") != chunk.count(b"\r\n"):
            self.sawBareLF = True
            chunk = _BARE_LF.sub(b"\r\n", chunk)
        return chunk


def isContinuation(line):
    """
    Whether C{line} (or a chunk's first line) continues a header field: a
    space or a tab first.  Message content that starts with one has no
    header, it is all body (L{relaygw.sink} ends the gateway's own header
    before it).
    """
    return line[:1] in (b" ", b"\t")


class HeaderScanner:
    """
    What the log and the hop limit need of a message's header, as its
    content arrives in chunks: its Message-ID (the first) and how many
    C{Received:} lines it has (the hops it made).  It stops looking at the
    end of the header (or after L{LIMIT} octets of it).  Each octet is
    looked at once, whatever the chunks: a header sent a few octets a
    segment costs no more than one sent whole.
    """

    LIMIT = 65536
    #: At most this much of a line is kept: its start says what it is.
    LINE = 1024
    _ID = re.compile(rb"Message-ID:[ \t]*(<[^>\r\n]{1,500}>)", re.I)
    #: The value on the line after a Message-ID field's name (a folded field, as mailers write a long one).
    _FOLDED_ID = re.compile(rb"[ \t]+(<[^>\r\n]{1,500}>)")

    def __init__(self):
        self.partial = b""  # the start of the line under way
        self.overlong = False  # the line under way is longer than LINE (its Message-ID is not looked at)
        self.seen = 0
        self.done = False
        self.messageId = None
        self.idFolded = False  # the last line was a Message-ID field's name alone: its value may follow
        self.received = 0

    def feed(self, chunk):
        if self.done:
            return
        if not self.seen and not self.partial and isContinuation(chunk):
            return self._stop()
        data = self.partial + chunk if self.partial else chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end == -1:
                break
            line, start = data[start:end], end + 1
            overlong, self.overlong = self.overlong, False
            folded, self.idFolded = self.idFolded, False
            if line == b"" or line == b"\r":  # the end of the header
                return self._stop()
            first = line[:11].lower()
            if first[:9] == b"received:":
                self.received += 1
            elif first == b"message-id:" and self.messageId is None and not overlong:
                m = self._ID.match(line)
                if m is not None:
                    self.messageId = m.group(1).decode("latin-1")
                else:
                    self.idFolded = not line[11:].strip()
            elif folded and not overlong:
                m = self._FOLDED_ID.match(line)
                if m is not None:
                    self.messageId = m.group(1).decode("latin-1")
        self.seen += len(chunk)
        self.partial = data[start:start + self.LINE]
        self.overlong = self.overlong or len(data) - start > self.LINE
        if self.seen > self.LIMIT:
            self._stop()

    def _stop(self):
        self.done = True
        self.partial = b""
