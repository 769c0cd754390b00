"""
L{relaygw.relay.downgrade}: 8-bit content made 7-bit for a next hop
without 8BITMIME, each part's decoded content unchanged (read back with
the standard library's email parser).
"""

import io

from twisted.trial import unittest

from relaygw.relay.downgrade import FIELD_LIMIT, NESTING_LIMIT, forSevenBit
from tests.messages import mimeFields, mimeLeaves

MULTIPART = (
    b"From: a@example.net\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"plain ASCII\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b" boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=latin1\r\n"
    b"\r\n"
    b"<p>\xe9t\xe9</p>\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Subject: inner message\r\n"
    b"Content-Type: text/plain; charset=latin1\r\n"
    b"\r\n"
    b"na\xefve " + b"x" * 200 + b" end \r\n"
    b"--outer\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAEC\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def _converted(content, prefix=b"envelope\n"):
    """C{content} as it would go out (read 100 octets at a time), from a file where it starts after C{prefix}."""
    f = io.BytesIO(prefix + content)
    f.seek(len(prefix))
    reader = forSevenBit(f)
    if reader is f:
        return None
    out = []
    while True:
        chunk = reader.read(100)
        out.append(chunk)
        if len(chunk) < 100:
            return b"".join(out)


class DowngradeTests(unittest.TestCase):
    def test_asciiContentUnchanged(self):
        """All-ASCII content goes as it is: the file itself, where it was."""
        f = io.BytesIO(b"xx" + b"Subject: hi\r\n\r\nplain\r\n")
        f.seek(2)
        self.assertIs(forSevenBit(f), f)
        self.assertEqual(f.tell(), 2)

    def test_plainMessage(self):
        """
        A message without MIME gets MIME-Version and quoted-printable; its
        dots, trailing white space and 8-bit octets come back decoded as
        they were.
        """
        content = b"Subject: x\r\n\r\n.\r\n..dots\r\nend with space \r\ncaf\xc3\xa9\r\n"
        out = _converted(content)
        self.assertTrue(out.isascii())
        self.assertEqual(out.split(b"\r\n\r\n")[0],
                         b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable")
        self.assertEqual(mimeLeaves(out), [("text/plain", content.split(b"\r\n\r\n", 1)[1])])

    def test_multipart(self):
        """
        Each 8-bit leaf part is encoded, in nested multiparts and inside a
        message/rfc822 part (the multipart's and that part's own 8bit label
        becomes 7bit); an ASCII
        part, a base64 part, the preamble and the epilogue are left as
        they are; every line fits in 78 octets.
        """
        out = _converted(MULTIPART)
        self.assertTrue(out.isascii(), out)
        self.assertEqual(mimeLeaves(out), mimeLeaves(MULTIPART))
        self.assertEqual(len(mimeLeaves(out)), 5)
        self.assertIn(b"\r\npreamble\r\n", out)
        self.assertIn(b"\r\nepilogue\r\n", out)
        self.assertIn(b"Content-Type: text/plain\r\n\r\nplain ASCII\r\n", out)
        self.assertIn(b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n", out)
        self.assertIn(b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n", out)
        self.assertIn(b'boundary="outer"\r\nContent-Transfer-Encoding: 7bit\r\n\r\npreamble', out)
        self.assertEqual(out.count(b"Content-Transfer-Encoding: quoted-printable"), 3)
        self.assertNotIn(b"8bit", out)
        self.assertLessEqual(max(len(line) for line in out.split(b"\r\n")), 78)
        self.assertTrue(out.endswith(b"--outer--\r\nepilogue\r\n"))

    def test_linesLongerThanAChunk(self):
        """
        Lines longer than a read (64 KB), 8-bit or not, come back whole, in
        lines of at most 76 octets; a last line without its line end gets
        none (the end of data adds it).
        """
        content = (b"Subject: x\r\n\r\n" + b"\xe9" * 200000 + b"\r\nshort\r\n" + b"a" * 150000 + b"\r\n"
                   + b"\xff" * 70000)
        out = _converted(content)
        self.assertEqual(mimeLeaves(out), mimeLeaves(content))
        self.assertLessEqual(max(map(len, out.split(b"\r\n"))), 76)
        self.assertTrue(out.endswith(b"=FF=FF"), out[-20:])

    def test_longLineEncodedInPieces(self):
        """
        A long 8-bit line is encoded a piece at a time: converting a 4 MB
        one allocates about the line twice (its chunks as read, then
        joined), not also its encoding, three times its size, over again.
        """
        import tracemalloc

        f = io.BytesIO(b"Subject: x\r\n\r\n" + b"\xe9" * (4 << 20) + b"\r\n")
        tracemalloc.start()
        try:
            reader, out = forSevenBit(f), 0
            while True:
                chunk = len(reader.read(1 << 16))
                out += chunk
                if chunk < 1 << 16:
                    break
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertGreater(out, 12 << 20)
        self.assertLess(peak, 3 * (4 << 20))

    def test_eightBitHeadersOnly(self):
        """8-bit octets in header fields alone (no charset to encode them with) leave the content as it was."""
        content = b"Subject: caf\xc3\xa9\r\n\r\nplain body\r\n"
        self.assertEqual(_converted(content), content)

    def test_endsInHeaderSection(self):
        """
        Content that ends in a header section (a message of 8-bit header
        fields alone, or one cut short in a part's header) goes out with
        those fields, the last line without a line end as it came.
        """
        for content in (b"Subject: caf\xc3\xa9\r\nFrom: a@example.net\r\n",
                        b"Subject: caf\xc3\xa9\r\nFrom: a@example.net",
                        b"Subject: x\r\n\t caf\xc3\xa9\r\n"):
            self.assertEqual(_converted(content), content)
        cut = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\ncaf\xc3\xa9\r\n'
               b"--b\r\nContent-Type: text/plain\r\nX-Last: \xc3\xa9")
        out = _converted(cut)
        self.assertTrue(out.endswith(b"\r\ncaf=C3=A9\r\n--b\r\nContent-Type: text/plain\r\nX-Last: \xc3\xa9"), out)

    def test_nestingLimit(self):
        """
        Multiparts nested up to NESTING_LIMIT deep are walked into; what a
        deeper one holds goes as it is (as Postfix's mime_nesting_limit),
        so that each line is compared with at most that many boundaries.
        """

        def nested(depth):
            heads = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
                             for n in range(depth))
            return b"From: a@example.net\r\n" + heads + b"Content-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n"

        self.assertTrue(_converted(nested(NESTING_LIMIT)).endswith(b"\r\n\r\ncaf=C3=A9\r\n"))
        deep = nested(NESTING_LIMIT + 1)
        self.assertEqual(_converted(deep), deep)

    def test_longContentType(self):
        """
        A Content-Type field is read up to FIELD_LIMIT octets: a boundary
        within them is found whatever follows; one beyond is not, and the
        multipart is taken as one part (its 8-bit content encoded whole).
        """
        params = b"".join(b"\r\n p%d=v%d;" % (n, n) for n in range(FIELD_LIMIT // 8))
        body = b"\r\n--x\r\n\r\ncaf\xc3\xa9\r\n--x--\r\n"
        early = b"Content-Type: multipart/mixed; boundary=x;" + params + b" p=v\r\n" + body
        self.assertTrue(_converted(early).endswith(b"\r\n--x\r\nContent-Transfer-Encoding: quoted-printable"
                                                   b"\r\n\r\ncaf=C3=A9\r\n--x--\r\n"))
        late = b"Content-Type: multipart/mixed;" + params + b" boundary=x\r\n" + body
        self.assertTrue(_converted(late).endswith(b"\r\n\r\n--x\r\n\r\ncaf=C3=A9\r\n--x--\r\n"))

    def test_unreadable(self):
        """Content that cannot be read fails at the first read of what would go out: never sent in part."""

        class Failing(io.BytesIO):
            def read(self, size=-1):
                raise OSError("disk on fire")

        reader = forSevenBit(Failing(b"caf\xc3\xa9"))
        self.assertRaises(OSError, reader.read, 100)


def _randomContent(rng):
    """A random MIME message: nested multiparts (some not closed), message/rfc822 parts, every encoding label."""
    boundaries = []

    def text():
        lines = []
        for _ in range(rng.randrange(0, 6)):
            kind = rng.random()
            if kind < 0.3:
                lines.append(bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 10))))
            elif kind < 0.45:
                lines.append(rng.choice([b".", b"..", b"=41 an equals sign", b"--b1", b"--zz"]))
            elif kind < 0.55:
                lines.append(b"x" * rng.randrange(70, 300) + b" \t")
            else:
                lines.append(b"word %d" % rng.randrange(1000))
        return lines

    def entity(depth):
        kind = rng.random()
        if depth < 3 and kind < 0.3:
            boundary = b"b%d" % (len(boundaries) + 1)
            boundaries.append(boundary)
            lines = [b'Content-Type: multipart/mixed; boundary="' + boundary + b'"']
            lines += [b"Content-Transfer-Encoding: 8bit"] if rng.random() < 0.3 else []
            lines += [b""] + text()
            for _ in range(rng.randrange(0, 4)):
                lines += [b"--" + boundary] + entity(depth + 1)
            return lines + ([b"--" + boundary + b"--"] if rng.random() < 0.8 else []) + text()
        if depth < 3 and kind < 0.4:
            return [b"Content-Type: message/rfc822", b"Content-Transfer-Encoding: " + rng.choice([b"8bit", b"7bit"]),
                    b"", b"Subject: inner"] + entity(depth + 1)
        encoding = rng.choice([None, b"7bit", b"8bit", b"quoted-printable", b"base64", b"binary", b"8BIT "])
        head = [b"Content-Type: text/plain; charset=utf-8"] if rng.random() < 0.7 else []
        head += [b"Content-Transfer-Encoding: " + encoding] if encoding else []
        body = [b"AAEC"] if encoding == b"base64" else [line for line in text()
                                                        if encoding != b"quoted-printable" or line.isascii()]
        return head + [b""] + body

    lines = [b"From: a@example.net"] + ([b"MIME-Version: 1.0"] if rng.random() < 0.7 else []) + entity(0)
    content = b"".join(line + b"\r\n" for line in lines)
    if rng.random() < 0.3:
        # Cut short: in a header section as well as in a body, perhaps mid-line; never between
        # a CR and its LF (a last line ending in a bare CR decodes with that CR, where the email
        # package's parser drops it).
        content = content[:rng.randrange(len(content) + 1)].removesuffix(b"\r")
    return content


class RandomStructureTests(unittest.TestCase):
    def test_decodedContentKept(self):
        """
        Random MIME messages (fixed seed), some cut short: each leaf part
        decodes as it did, every entity keeps its header fields, and no
        line grows past 998 octets.
        """
        import random

        rng, converted = random.Random(20261207), 0
        for _ in range(400):
            content = _randomContent(rng)
            out = _converted(content, prefix=b"")
            if out is None:
                self.assertTrue(content.isascii())
                continue
            converted += 1
            self.assertEqual(mimeLeaves(out), mimeLeaves(content), content)
            self.assertEqual(mimeFields(out), mimeFields(content), content)
            self.assertLessEqual(max(map(len, out.split(b"\r\n"))), max(998, *map(len, content.split(b"\r\n"))))
        self.assertGreater(converted, 150)
