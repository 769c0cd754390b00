"""
relaygw.linereader: the pure command-line framer, against a line-by-line
model (bounded lines, bare LF per mode), fed in arbitrary pieces.
"""

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relaygw.linereader import BARE_LF, LINE_TOO_LONG, LineReader
from tests.streamcuts import chunked

#: Either event may report an over-long line ended by a bare LF in reject
#: mode: which one depends on whether its LF arrived before the limit
#: was passed.
EITHER = frozenset((LINE_TOO_LONG, BARE_LF))


def model(stream, limit, reject):
    """
    The events for C{stream}, one line at a time, with what stays unread:
    C{(events, unread)}, C{unread} being C{None} inside an over-long line.
    """
    events, pos = [], 0
    while True:
        nl = stream.find(b"\n", pos)
        if nl == -1:
            tail = stream[pos:]
            if len(tail) > limit:
                # What is still unread is dropped (a suffix of it, up to
                # the limit, may be held until more input shows its end).
                return events + [LINE_TOO_LONG], None
            return events, tail
        raw = stream[pos:nl]
        crlf = raw.endswith(b"\r")
        text = raw[:-1] if crlf else raw
        if len(raw) > limit:
            # The limit may be passed before the LF arrives.
            events.append(LINE_TOO_LONG if crlf or not reject else EITHER)
        elif not crlf and reject:
            events.append(BARE_LF)
        elif len(text) + 2 > limit:
            events.append(LINE_TOO_LONG)
        else:
            events.append(text)
        pos = nl + 1


def run(stream, cuts=(), limit=16, reject=False):
    """Feed C{stream} in pieces, reading every line after each: C{(events, reader)}."""
    reader = LineReader(limit, reject)
    events = []
    for piece in chunked(stream, cuts):
        reader.feed(piece)
        while True:
            event = reader.next()
            if event is None:
                break
            events.append(event)
        # Nothing is held beyond the limit once the reader ran dry.
        assert reader.pending <= limit, (reader.pending, limit)
    return events, reader


def matches(events, expected):
    return len(events) == len(expected) and all(
        e in x if isinstance(x, frozenset) else e == x for e, x in zip(events, expected)
    )


tokens = st.sampled_from([b"\r\n", b"\n", b"\r", b"NOOP", b"a", b"bc", b"x" * 7, b" ", b"\x00", b"\xff"])
streams = st.lists(tokens, max_size=40).map(b"".join)


class LineReaderTests(unittest.TestCase):
    def test_lines(self):
        events, reader = run(b"EHLO x\r\nNOOP\r\nQUI", limit=512)
        self.assertEqual(events, [b"EHLO x", b"NOOP"])
        self.assertEqual((reader.pending, reader.unread), (3, b"QUI"))
        reader.feed(b"T\r\n")
        self.assertEqual(reader.next(), b"QUIT")
        self.assertIsNone(reader.next())

    def test_bareLF(self):
        """A bare LF ends a line; in reject mode that line is the event."""
        self.assertEqual(run(b"NOOP\nRSET\r\n")[0], [b"NOOP", b"RSET"])
        self.assertEqual(run(b"NOOP\nRSET\r\n", reject=True)[0], [BARE_LF, b"RSET"])
        self.assertEqual(run(b"\n", reject=True)[0], [BARE_LF])

    def test_bareCRIsData(self):
        self.assertEqual(run(b"a\rb\r\r\n", reject=True)[0], [b"a\rb\r"])

    def test_limitCountsTheCRLF(self):
        self.assertEqual(run(b"x" * 14 + b"\r\n" + b"y" * 15 + b"\r\nNOOP\r\n")[0],
                         [b"x" * 14, LINE_TOO_LONG, b"NOOP"])
        # A bare LF line is held to the same length.
        self.assertEqual(run(b"x" * 15 + b"\nNOOP\n")[0], [LINE_TOO_LONG, b"NOOP"])

    def test_unterminatedInputIsDropped(self):
        """Past the limit without an LF: one event, and that line is dropped to its LF."""
        reader = LineReader(16)
        reader.feed(b"y" * 100)
        self.assertEqual((reader.next(), reader.next(), reader.pending), (LINE_TOO_LONG, None, 0))
        for _ in range(3):
            reader.feed(b"y" * 100)
            self.assertEqual((reader.next(), reader.pending), (None, 0))
        reader.feed(b"y" * 10)
        self.assertEqual((reader.next(), reader.pending), (None, 10))
        reader.feed(b"y\r\nNOOP\r\n")
        self.assertEqual(reader.next(), b"NOOP")

    def test_overflowReportedOnce(self):
        events, reader = run(b"y" * 100 + b"z" * 100 + b"\r\nNOOP\r\n", cuts=(50, 100, 150, 201))
        self.assertEqual(events, [LINE_TOO_LONG, b"NOOP"])

    def test_overflowStaysUnreadUntilRead(self):
        """
        The start of an over-long line is still unread input while its
        event is handled (a closing reply lingers over it), and is dropped
        by the next read or feed.
        """
        reader = LineReader(16)
        reader.feed(b"y" * 20)
        self.assertIs(reader.next(), LINE_TOO_LONG)
        self.assertEqual(reader.pending, 20)
        self.assertEqual(reader.take(), b"y" * 20)
        reader = LineReader(16)
        reader.feed(b"y" * 20)
        self.assertIs(reader.next(), LINE_TOO_LONG)
        reader.feed(b"yy\r\nNOOP\r\n")
        self.assertEqual(reader.pending, 10)
        self.assertEqual(reader.next(), b"NOOP")

    def test_take(self):
        """L{LineReader.take} hands over what was not read, and reading goes on after it."""
        reader = LineReader(512)
        reader.feed(b"DATA\r\nSubject: x\r\n\r\nbody\r\n")
        self.assertEqual(reader.next(), b"DATA")
        self.assertEqual(reader.take(), b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual((reader.pending, reader.unread, reader.next()), (0, b"", None))
        reader.feed(b"QUIT\r\n")
        self.assertEqual(reader.next(), b"QUIT")

    @settings(max_examples=400, deadline=None)
    @given(streams, st.lists(st.integers(min_value=0, max_value=400), max_size=12),
           st.sampled_from([8, 16, 512]), st.booleans())
    @example(b"x" * 20 + b"\n", [10], 16, True)
    @example(b"x" * 14 + b"\r\r\n", [15], 16, False)
    def test_matchesTheModel(self, stream, cuts, limit, reject):
        """Whatever the pieces, the events are the line-by-line model's."""
        events, reader = run(stream, cuts, limit, reject)
        expected, unread = model(stream, limit, reject)
        self.assertTrue(matches(events, expected), (events, expected))
        if unread is None:
            self.assertTrue(stream.endswith(reader.unread))
            self.assertLessEqual(reader.pending, limit)
        else:
            self.assertEqual(reader.unread, unread)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8),
           st.sampled_from([4, 16, 64]), st.booleans())
    def test_arbitraryBytes(self, stream, cuts, limit, reject):
        """Any octets: no exception, no line over the limit, bounded holding back."""
        events, reader = run(stream, cuts, limit, reject)
        for event in events:
            if event is not LINE_TOO_LONG and event is not BARE_LF:
                self.assertIsInstance(event, bytes)
                self.assertNotIn(b"\n", event)
                self.assertLessEqual(len(event) + 2, limit)
        self.assertLessEqual(reader.pending, limit)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=14).map(lambda b: b.replace(b"\n", b"")), max_size=20),
           st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=20, max_size=20),
           st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_linesReassembleTheInput(self, texts, ends, cuts):
        """Lines within the limit, with CRLF after each, are the input with bare LFs made CRLF."""
        stream = b"".join(t + e for t, e in zip(texts, ends))
        events, _ = run(stream, cuts, limit=16)
        self.assertTrue(all(isinstance(e, bytes) for e in events), events)
        self.assertEqual(b"".join(e + b"\r\n" for e in events), re.sub(rb"(?<!\r)\n", b"\r\n", stream))
