"""
8-bit content for a next hop that does not offer 8BITMIME (RFC 6152
section 3): converted to 7 bits with MIME, as Postfix does by default
(C{disable_mime_output_conversion = no}), rather than sent as it came.

Each MIME leaf part whose body holds 8-bit octets and whose declared
encoding is 7bit, 8bit, binary or none gets C{Content-Transfer-Encoding:
quoted-printable} and its body is encoded so; multipart bodies and
C{message/rfc822} parts are walked into, their own encoding header made
7bit when it said 8bit or binary.  A message without C{MIME-Version} gets one.
Header fields are left as they are (8-bit octets there have no charset to
encode them with), as are a multipart's preamble and epilogue, and what a
multipart nested deeper than L{NESTING_LIMIT} holds.

The content is read twice from its file, never held whole (one line at a
time, its encoding a piece at a time): once to find which parts hold 8-bit
octets, once to write it out converted.
"""

import binascii
from email.message import Message

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread

#: Encodings whose parts are converted; base64 and quoted-printable are 7-bit already.
_CONVERTIBLE = (None, "7bit", "8bit", "binary")

_QP = b"Content-Transfer-Encoding: quoted-printable\r\n"

#: Multiparts nested deeper than this are not walked into (Postfix's
#: C{mime_nesting_limit}): their content goes as it is.  Each line that
#: starts with "--" is compared with every boundary open, so without a
#: bound a message of nested multiparts costs time in the square of its
#: size (1 MB: 50 s, in the reactor's thread up to L{INLINE_SIZE}).
NESTING_LIMIT = 100

#: Content up to this size is read for L{forSevenBit} in the reactor's
#: thread (a few microseconds), larger content in a thread of its own: a
#: hand-off to a thread for every message cost a next hop without
#: 8BITMIME a tenth of the gateway's throughput.
INLINE_SIZE = 1 << 16


def sevenBit(file, size):
    """L{forSevenBit} of C{file} (C{size} octets) as a Deferred: read in a thread when it may take long."""
    return succeed(forSevenBit(file)) if size <= INLINE_SIZE else deferToThread(forSevenBit, file)


def forSevenBit(file):
    """
    C{file} (the content, binary, positioned at its start) as it may go to
    a next hop without 8BITMIME: itself when it is all ASCII, else a
    reader of the converted content (C{read(n)}: C{n} octets, fewer only
    at the end).  If C{file} cannot be read, a reader failing as it did:
    the message is never sent in part.
    """
    try:
        start = file.tell()
        while True:
            chunk = file.read(1 << 16)
            if not chunk:
                file.seek(start)
                return file
            if not chunk.isascii():
                break
        file.seek(start)
        walk = _Walk(None)
        for line in _lines(file):
            walk.line(line)
        file.seek(start)
    except OSError as e:
        return _Unreadable(e)
    return _Reader(file, walk.eightBit)


class _Unreadable:
    """Content that could not be read: each read raises the error."""

    def __init__(self, error):
        self.error = error

    def read(self, size):
        raise self.error


def _lines(file):
    """The lines of C{file} (binary, perhaps unbuffered), each with its line end, read 64 KB at a time."""
    rest = []  # (the start of a line longer than a chunk, in pieces: joined once, not once a chunk)
    while True:
        chunk = file.read(1 << 16)
        if not chunk:
            break
        lines = chunk.split(b"\n")
        if len(lines) == 1:
            rest.append(chunk)
            continue
        rest.append(lines[0])
        lines[0] = b"".join(rest)
        rest = [lines.pop()]
        for line in lines:
            yield line + b"\n"
    rest = b"".join(rest)
    if rest:
        yield rest


class _Reader:
    """The converted content of C{file}, read in pieces."""

    def __init__(self, file, eightBit):
        self._lines = _lines(file)
        self._walk = _Walk(eightBit)
        self._buffer = bytearray()
        self._pending = iter(())  # (what the last line read becomes, taken as it is needed)

    def read(self, size):
        while len(self._buffer) < size:
            piece = next(self._pending, None)
            if piece is not None:
                self._buffer += piece
                continue
            line = next(self._lines, None)
            if line is None:
                self._buffer += b"".join(self._walk.end())
                break
            self._pending = iter(self._walk.line(line))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


#: The most of a Content-Type or Content-Transfer-Encoding field read: the
#: email package parses parameters in time that grows with the square of
#: their length (a 800 KB field: 2 s), and a real field is a few hundred
#: octets.  A boundary further in is not seen (that multipart is one part).
FIELD_LIMIT = 16384


def _contentType(fields):
    """C{(type, boundary, encoding)} of an entity from its header fields (each a list of physical lines)."""
    message = Message()
    for lines in fields:
        name, _, value = b"".join(lines).partition(b":")
        name = name.strip().lower()
        if name in (b"content-type", b"content-transfer-encoding"):
            message[name.decode("ascii", "replace")] = " ".join(value[:FIELD_LIMIT].decode("ascii", "replace").split())
    encoding = str(message.get("content-transfer-encoding") or "").strip().lower() or None
    try:
        boundary = message.get_param("boundary") if message.get_content_maintype() == "multipart" else None
        if isinstance(boundary, tuple):  # (an RFC 2231 value)
            boundary = boundary[2]
        return message.get_content_type(), boundary, encoding
    except Exception:  # (a header the email package cannot read: the part is taken as text/plain)
        return "text/plain", None, encoding


def _physical(fields):
    """The physical lines of header C{fields} (each a list of them), as they go out."""
    return [line for lines in fields for line in lines]


def _field(lines, name):
    """Whether the header field C{lines} (its physical lines) is named C{name} (lower-case bytes)."""
    head = lines[0]
    return head[:len(name)].lower() == name and head[len(name):].lstrip(b" \t")[:1] == b":"


class _Walk:
    """
    The MIME structure of the content, line by line.  Without C{eightBit}
    it notes which leaf parts hold 8-bit octets (C{eightBit}, in the order
    they come); with it, each L{line} returns the lines to write instead.
    """

    def __init__(self, eightBit):
        self.converting = eightBit is not None
        self.eightBit = eightBit if self.converting else []
        self.boundaries = []  # the multiparts open, innermost last
        self.fields = []  # the header fields of the entity being read
        self.state = "headers"  # or "leaf", "between" (a preamble or epilogue)
        self.top = True  # (the message's own header section)
        self.leaf = None  # the index of the leaf part being read
        self.leaves = 0  # the leaf parts met so far
        self.encoding = False  # the leaf part being read is quoted-printable encoded here

    def line(self, line):
        if self.boundaries and line.startswith(b"--"):
            delimiter = line.rstrip()
            for depth in range(len(self.boundaries) - 1, -1, -1):
                boundary = b"--" + self.boundaries[depth]
                if delimiter == boundary or delimiter == boundary + b"--":
                    return self._delimiter(depth, delimiter != boundary, line)
        if self.state == "headers":
            if line[:1] in (b" ", b"\t") and self.fields:
                self.fields[-1].append(line)
                return []
            if b":" in line and line.strip():
                self.fields.append([line])
                return []
            out = self._headersEnd()
            return out + list(self.line(line)) if line.strip() else out + [line]
        if self.state == "leaf":
            if not self.converting:
                if not self.eightBit[self.leaf] and not line.isascii():
                    self.eightBit[self.leaf] = True
                return []
            if self.encoding:
                return _encoded(line)
        return [line]

    def end(self):
        """
        The content has ended: the lines still held, those of a header
        section it ends in (a message of header fields alone, or one cut
        short), as they came (the entity has no body to encode).
        """
        fields, self.fields = self.fields, []
        return _physical(fields)

    def _delimiter(self, depth, closing, line):
        out = self._headersEnd() if self.state == "headers" else []
        del self.boundaries[depth + (not closing):]
        self.state, self.fields = ("between", []) if closing else ("headers", [])
        return out + [line]

    def _headersEnd(self):
        """The entity's header section is complete: how to read its body, and the header lines to write."""
        fields, top = self.fields, self.top
        self.fields, self.top = [], False
        ctype, boundary, encoding = _contentType(fields)
        if boundary and len(self.boundaries) >= NESTING_LIMIT:
            self.state = "between"  # (too deep: what it holds goes as it is, up to its parent's next delimiter)
            return _physical(fields)
        if boundary or (ctype == "message/rfc822" and encoding in _CONVERTIBLE):
            # A composite entity: its parts follow, 7-bit once converted (so labelled 7bit, RFC 2045 section 6.4).
            if boundary:
                self.boundaries.append(boundary.encode("ascii", "replace"))
            self.state = "between" if boundary else "headers"
            if self.converting and encoding in ("8bit", "binary"):
                fields = [f for f in fields if not _field(f, b"content-transfer-encoding")]
                fields.append([b"Content-Transfer-Encoding: 7bit\r\n"])
            return _physical(fields)
        self.state, self.leaf, self.leaves = "leaf", self.leaves, self.leaves + 1
        if not self.converting:
            self.eightBit.append(False)
            return []
        self.encoding = self.leaf < len(self.eightBit) and self.eightBit[self.leaf] and encoding in _CONVERTIBLE
        if self.encoding:
            fields = [f for f in fields if not _field(f, b"content-transfer-encoding")]
            if top and not any(_field(f, b"mime-version") for f in fields):
                fields.append([b"MIME-Version: 1.0\r\n"])
            fields.append([_QP])
        return _physical(fields)


#: A body line is encoded this many octets at a time, soft line breaks
#: between, so that a long one is held once and its encoding a piece at a
#: time (one 25 MB line held whole, and its encoding several times over,
#: cost 231 MB).
PIECE = 1 << 15


def _encoded(line):
    """
    One body line quoted-printable encoded (RFC 2045 section 6.7), soft
    line breaks as CRLF, in pieces; the content's last line may have no
    line end.
    """
    size = len(line)
    end = b"\r\n" if line.endswith(b"\n") else b""
    if end:
        size -= 2 if line[size - 2:size - 1] == b"\r" else 1
    text = memoryview(line)[:size]
    if size <= PIECE:
        return [_qp(text) + end]
    return (_qp(text[start:start + PIECE]) + (end if start + PIECE >= size else _SOFT)
            for start in range(0, size, PIECE))


def _qp(text):
    """
    C{text} quoted-printable encoded, in lines of at most 76 octets before
    their CRLF, the last one at most 75: a piece of a line is followed by a
    soft line break (C{=}), which makes 76.
    """
    out = binascii.b2a_qp(text, quotetabs=False, istext=False, header=False)
    head, newline, last = out.rpartition(b"\n")
    if len(last) > 75:  # (cut where no "=XX" is cut in two)
        cut = 73 - (last[72:73] == b"=") - 2 * (last[71:72] == b"=")
        out = head + newline + last[:cut] + b"=\n" + last[cut:]
    return out.replace(b"\n", b"\r\n")


_SOFT = b"=\r\n"
