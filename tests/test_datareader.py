"""
relaygw.datareader: the pure DATA framer, against a line-by-line model of
protocol.md section 2 (smuggling cases), fed in arbitrary pieces.
"""

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relaygw.datareader import DataReader, HeaderScanner
from tests.streamcuts import chunked


def model(stream):
    """
    protocol.md section 2, one line at a time: C{(body, rest, sawBareLF)},
    C{rest} being C{None} when the stream has no end of data.
    """
    body, bare = [], False
    prevCRLF = True  # DATA starts after a CRLF
    pos = 0
    while True:
        nl = stream.find(b"\n", pos)
        if nl == -1:
            return b"".join(body), None, bare
        crlf = nl > pos and stream[nl - 1:nl] == b"\r"
        text = stream[pos:nl - 1] if crlf else stream[pos:nl]
        if text == b"." and crlf and prevCRLF:
            return b"".join(body), stream[nl + 1:], bare
        if text.startswith(b".") and text != b".":
            text = text[1:]
        if not crlf:
            bare = True
        body.append(text + b"\r\n")
        prevCRLF = crlf
        pos = nl + 1


def run(stream, cuts=(), piece=8):
    """Feed C{stream} in pieces; the body, what followed the end, and the reader."""
    reader = DataReader(piece=piece)
    body, after = [], None
    for p in chunked(stream, cuts):
        if after is not None:
            after.append(p)
            continue
        got, rest = reader.feed(p)
        body.append(got)
        if rest is not None:
            after = [rest]
    return b"".join(body), (None if after is None else b"".join(after)), reader


tokens = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"bc", b"\r\n.\r\n", b"\n.\n",
                          b"\r\n.\n", b"\n.\r\n", b"\x00", b"\xff", b"QUIT\r\n"])
streams = st.lists(tokens, max_size=40).map(b"".join)


class DataReaderTests(unittest.TestCase):
    def test_simple(self):
        body, rest, reader = run(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        self.assertEqual((body, rest), (b"Subject: x\r\n\r\nhello\r\n", b"QUIT\r\n"))
        self.assertFalse(reader.sawBareLF)

    def test_emptyBody(self):
        self.assertEqual(run(b".\r\nNOOP\r\n")[:2], (b"", b"NOOP\r\n"))

    def test_dotStuffing(self):
        self.assertEqual(run(b"..x\r\n..\r\n.\r\n")[:2], (b".x\r\n.\r\n", b""))

    def test_bareLFDotIsNotTheEnd(self):
        # CVE-2023-51764: <LF>.<LF>, <LF>.<CR><LF> and <CR><LF>.<LF> never end DATA.
        for smuggle, command in ((b"a\n.\n", b"MAIL FROM:<x@y>\r\n"), (b"a\n.\r\n", b"RCPT TO:<x@y>\r\n"),
                                 (b"a\r\n.\n", b"DATA\r\n")):
            body, rest, reader = run(smuggle + command + b".\r\nNOOP\r\n")
            self.assertEqual(rest, b"NOOP\r\n")
            self.assertTrue(body.endswith(command))
            self.assertTrue(reader.sawBareLF)
            body, rest, reader = run(smuggle + command)
            self.assertIsNone(rest)

    def test_bareCRIsData(self):
        body, rest, reader = run(b"a\r.\r\r\n.\r\n")
        self.assertEqual((body, rest), (b"a\r.\r\r\n", b""))
        self.assertFalse(reader.sawBareLF)

    def test_longLineInPieces(self):
        reader = DataReader(piece=1024)
        line = b"x" * 100000
        body, rest = reader.feed(line)
        self.assertIsNone(rest)
        self.assertLess(reader.pending, 1024)
        more, rest = reader.feed(b"\r\n.\r\n")
        self.assertEqual(body + more, line + b"\r\n")
        self.assertEqual(rest, b"")

    def test_fedAfterEnd(self):
        reader = DataReader()
        reader.feed(b".\r\n")
        self.assertRaises(ValueError, reader.feed, b"x")

    @settings(max_examples=400, deadline=None)
    @given(streams, st.lists(st.integers(min_value=0, max_value=400), max_size=12),
           st.sampled_from([8, 16, 1 << 15]))
    @example(b"a\r\n.\r\n", [3], 8)
    @example(b"\r\n.\r\n", [1, 2, 3, 4], 8)
    @example(b"." * 40 + b"\r\n.\r\n", [9], 8)
    def test_matchesTheModel(self, stream, cuts, piece):
        """Whatever the pieces, the framing is the line-by-line model's."""
        body, rest, reader = run(stream, cuts, piece)
        expected, expectedRest, bare = model(stream)
        if rest is None:
            # The reader may hold back an incomplete last line.
            self.assertIsNone(expectedRest)
            self.assertTrue(expected.startswith(body) or body.startswith(expected[: len(body)]))
            held, _, _ = run(stream + b"\r\n.\r\n", cuts, piece)
            full, _, _ = model(stream + b"\r\n.\r\n")
            self.assertEqual(held, full)
        else:
            self.assertEqual((body, rest, reader.sawBareLF), (expected, expectedRest, bare))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
    def test_arbitraryBytes(self, stream, cuts):
        """Any octets: no exception, bounded holding back, body lines end in CRLF."""
        body, rest, reader = run(stream + b"\r\n.\r\n", cuts, 16)
        self.assertIsNotNone(rest)
        self.assertEqual(body.count(b"\n"), body.count(b"\r\n"))
        self.assertEqual((body, rest), model(stream + b"\r\n.\r\n")[:2])


class HeaderScannerTests(unittest.TestCase):
    def test_messageIdAcrossChunks(self):
        scanner = HeaderScanner()
        for chunk in (b"Subject: x\r\nMessage-", b"Id: <a@b>\r\n", b"\r\nbody Message-ID: <no@no>\r\n"):
            scanner.feed(chunk)
        self.assertEqual(scanner.messageId, "<a@b>")
        none = HeaderScanner()
        none.feed(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n")
        self.assertIsNone(none.messageId)

    def test_messageIdAnySplit(self):
        """
        The same header split at every octet gives the same answer: a
        Message-ID after folded and bare-LF lines, none after the header's
        end (CRLF or bare LF), none inside a line too long to look at (and
        that line's end is not taken for the header's).
        """
        cases = [
            (b"Subject: x\r\n\tfolded\nX: y\r\nmessage-id:\t<a@b>\r\n\r\nbody", "<a@b>"),
            (b"Subject: x\n\nMessage-ID: <a@b>\n", None),
            (b"\r\nMessage-ID: <a@b>\r\n", None),
            (b"X-Long: " + b"x" * 2000 + b"\nMessage-ID: <after@long>\r\n", "<after@long>"),
            (b"X-Long: " + b"x" * 2000 + b" Message-ID: <in@long>\r\n\r\n", None),
            (b"X: " + b"y" * 1100 + b"\r\n\r\nMessage-ID: <body@x>\r\n", None),
            # A continuation line first: all of it is body (the sink ends the gateway's header before it).
            (b"\tfolded\r\nMessage-ID: <body@x>\r\n\r\n", None),
            (b" x\r\nMessage-ID: <body@x>\r\n\r\n", None),
        ]
        for data, expected in cases:
            for size in (1, 2, 7, 1000, len(data)):
                scanner = HeaderScanner()
                for i in range(0, len(data), size):
                    scanner.feed(data[i:i + size])
                self.assertEqual(scanner.messageId, expected, (data[:40], size))

    def test_noHeaderNoHops(self):
        """Received lines after a first continuation line are body: they are no hops."""
        scanner = HeaderScanner()
        scanner.feed(b" x\r\n" + b"Received: from a by b; date\r\n" * 60)
        self.assertEqual(scanner.received, 0)
        counted = HeaderScanner()
        counted.feed(b"Received: from a by b; date\r\n" * 60)
        self.assertEqual(counted.received, 60)

    def test_messageIdScanIsLinear(self):
        """
        A 64 KB header fed a line at a time is looked at once: the scanner
        keeps no more than a line of it (each chunk used to be added to
        what came before and the whole searched again).
        """
        scanner = HeaderScanner()
        kept = 0
        for _ in range(9000):
            scanner.feed(b"X-A: b\r\n")
            kept = max(kept, len(scanner.partial))
            scanner.feed(b"X-B: ")
            kept = max(kept, len(scanner.partial))
        self.assertTrue(scanner.done)  # (past LIMIT: it stopped looking)
        self.assertIsNone(scanner.messageId)
        self.assertLessEqual(kept, len(b"X-B: "))
        # A line longer than LINE: only its start is kept, a chunk at a time.
        long = HeaderScanner()
        for _ in range(5000):
            long.feed(b"x" * 13)
            kept = max(kept, len(long.partial))
        self.assertLessEqual(kept, HeaderScanner.LINE)

    def test_receivedCounted(self):
        """
        The Received lines of the header, however split and however long
        (a folded one is one), and none after the header's end; the first
        Message-ID, wherever it is.
        """
        data = (b"Received: from a\r\n\tby b; date\r\nMessage-ID: <first@x>\r\nRECEIVED: from c\r\n"
                b"received:" + b"y" * 3000 + b"\r\nMessage-ID: <second@x>\r\nX-Received: no\r\n"
                b"Received: from d\n\r\nReceived: in the body\r\n")
        for size in (1, 5, 64, len(data)):
            scanner = HeaderScanner()
            for i in range(0, len(data), size):
                scanner.feed(data[i:i + size])
            self.assertEqual((scanner.received, scanner.messageId), (4, "<first@x>"), size)
