"""
Corrupt queue and state files are moved to corrupt/ once, with one error
log line, a counter and a row in relaygw-queue list; never retried.  The
envelope records the content's size, so a cut-off body is caught, and
C{size} is the octets sent onward for fresh and recovered messages alike.
"""

import io
import json
import os
import re
import zlib

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from relaygw.metrics import Metrics
from relaygw.relay.queue import QueueManager
from relaygw.scripts import queue as tool
from relaygw.durable import Committer
from relaygw.spool import MessageWriter, Spool
from relaygw.spool.retained import RetainedContent
from relaygw.spoolapi import CorruptMessage
from tests.recorders import LogCapture, RecordingHop
from tests.relaysetup import RelayTestCase

BODY = b"Subject: q\r\n\r\n" + b"line of the body\r\n" * 40


def cut(path, keep):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(keep(data))


def envelopeLine(data):
    return data.split(b"\n", 1)[0] + b"\n"


#: kind -> (area, how the file is damaged, the reason logged)
KINDS = {
    "emptyQueueFile": ("queue", lambda d: b"", "empty queue file"),
    "garbledQueueFile": ("queue", lambda d: b"\x00\xff\x10garbage\n" + d[200:], "garbled envelope"),
    "emptyObject": ("queue", lambda d: b"{}\n" + d[len(envelopeLine(d)):], "envelope lacks 'mailfrom'"),
    "truncatedEnvelope": ("queue", lambda d: d[:40], "truncated envelope (40 octets without an end of line)"),
    "bodyCutMidway": ("queue", lambda d: d[:len(envelopeLine(d)) + 100],
                      "content is 100 octets, the envelope says %d" % len(BODY)),
    "staleContent": ("queue", lambda d: d[:-6] + b"stale\n",
                     "content's CRC-32 is %d, the envelope says %d" % (zlib.crc32(BODY[:-6] + b"stale\n"),
                                                                      zlib.crc32(BODY))),
    "anotherMessage": ("queue", lambda d: re.sub(rb'"queue_id":"\w+"', b'"queue_id":"0123ABC"', d, count=1),
                       "the file holds message 0123ABC"),
    "hugeArrival": ("queue", lambda d: re.sub(rb'"arrival":[0-9.e+]+', b'"arrival":1' + b"0" * 400, d, count=1),
                    "envelope 'arrival' is not a time"),
    "nanArrival": ("queue", lambda d: re.sub(rb'"arrival":[0-9.e+]+', b'"arrival":NaN', d, count=1),
                   "envelope 'arrival' is not a time"),
    "wrongType": ("queue", lambda d: b'{"mailfrom":"a@example.org","recipients":"b@example.net"}\n' + BODY,
                  "envelope 'recipients' has the wrong type"),
    "envelopeCrcKeyChanged": ("queue", lambda d: d.replace(b'"envelope_crc32"', b'"ejvelope_crc32"', 1).replace(
        b"b@example.net", b"b@exampla.net", 1), "envelope's head is damaged"),
    "bodyCrcKeyChanged": ("queue", lambda d: d.replace(b'"body_crc32"', b'"body_crc33"', 1)[:-6] + b"stale\n",
                          "envelope's head is damaged"),
    "emptyStateFile": ("state", lambda d: b"", "empty state file"),
    "garbledStateFile": ("state", lambda d: b'{"rcpts": [1, 2', "garbled state file"),
    "backoffNotANumber": ("state", lambda d: b'{"rcpts": {}, "attempts": 1, "backoff": "2"}',
                          "state file is not a progress record"),
    "stateNotARecord": ("state", lambda d: b'{"rcpts": {"b@example.net": "done"}}', "state file is not a progress record"),
}


class QuarantineTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"],
                                   "arrival": 1.7e9, "context": {"connection": {}}})
        w.write(BODY)
        self.qid = yield w.commit()
        yield self.spool.writeState(self.qid, {"rcpts": {}, "attempts": 1, "next_attempt": 0})
        self.errors = []

        def observe(event):
            if event.get("log_level") == LogLevel.error:
                self.errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_sizeRecordedBeforeTheAck(self):
        """The envelope line starts with the content's size and CRC-32 (small and streamed messages)."""
        with open(self.spool.path("queue", self.qid), "rb") as f:
            stored = json.loads(f.readline())
        self.assertEqual((stored["body_size"], stored["body_crc32"]), (len(BODY), zlib.crc32(BODY)))
        self.assertEqual(self.spool.load(self.qid).size, len(BODY))

    def test_recordedBeforeTheChecksum(self):
        """A queue file from before the CRC-32 (or the size) was recorded still loads, whole."""
        path = self.spool.path("queue", self.qid)
        for dropped in ("body_crc32", "body_size"):
            def older(data):
                stored = json.loads(envelopeLine(data))
                del stored[dropped]
                stored.pop("envelope_crc32", None)  # (recorded later still)
                return json.dumps(stored).encode() + b"\n" + data[len(envelopeLine(data)):]

            cut(path, older)
            reopened = Spool(self.dir, self.spool.committer)  # (nothing kept in memory: read from the file)
            self.assertEqual(reopened.open(), [self.qid])
            message = reopened.load(self.qid)
            self.assertEqual(message.size, len(BODY))
            with message.openBody() as f:
                self.assertEqual(f.read(), BODY)

    @defer.inlineCallbacks
    def test_sizeRecordedStreamed(self):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        for _ in range(6):
            w.write(b"y" * 65536)
        self.assertIsNotNone(w.fd)  # streamed to tmp/
        qid = yield w.commit()
        with open(self.spool.path("queue", qid), "rb") as f:
            line = f.readline()
            self.assertEqual(json.loads(line)["body_size"], 6 * 65536)
            self.assertEqual(json.loads(line)["body_crc32"], zlib.crc32(b"y" * 6 * 65536))
            self.assertEqual(len(f.read()), 6 * 65536)
        self.assertEqual(self.spool.load(qid).size, 6 * 65536)
        self.assertEqual(len(line), MessageWriter(self.spool, qid, {"mailfrom": "", "recipients": ["r@example.net"],
                                                                     "queue_id": qid}).bodyOffset)

    def corrupt(self, kind):
        area, damage, reason = KINDS[kind]
        path = self.spool.path(area, self.qid)
        cut(path, damage)
        return path, reason

    @defer.inlineCallbacks
    def quarantined(self, kind):
        path, reason = self.corrupt(kind)
        clock = task.Clock()
        hop = RecordingHop()
        metrics = Metrics()
        q = QueueManager(self.spool, lambda m, r: hop, clock, retryMin=30, metrics=metrics)
        q.recovered = self.spool.open()  # as at a start: the message is recovered
        self.assertEqual(q.recovered, [self.qid])
        with self.assertRaises(CorruptMessage) as caught:
            self.spool.load(self.qid)
            self.spool.readState(self.qid)
        self.assertEqual((caught.exception.path, caught.exception.reason), (path, reason))
        q.startService()
        yield q.whenIdle()
        # Moved once, with one line naming the file and the reason, and counted.
        self.assertEqual(self.spool.queueIds(), [])
        self.assertTrue(os.path.exists(self.spool.path("corrupt", self.qid)))
        self.assertFalse(os.path.exists(self.spool.path("state", self.qid)))
        self.assertEqual(len(self.errors), 1, self.errors)
        from twisted.logger import formatEvent

        line = formatEvent(self.errors[0])
        self.assertIn(path, line)
        self.assertIn(reason, line)
        self.assertIn(b"relaygw_spool_corrupt_total 1.0", metrics.render())
        # Never tried again: not at its retry time, not on a flush.
        clock.advance(100000)
        q.flush()
        yield q.whenIdle()
        self.assertEqual(hop.calls, [])
        self.assertEqual(len(self.errors), 1)
        # relaygw-queue lists it, with the reason, and can delete it.
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "list"], out=out), 0)
        [row] = [l for l in out.getvalue().splitlines() if l.startswith(self.qid)]
        self.assertTrue(row.startswith(self.qid + "#"), row)
        self.assertIn("corrupt: %s: %s" % (path, reason), row)
        self.assertTrue(out.getvalue().endswith("-- 0 messages, 0 bytes: 0 active, 0 deferred, 0 held; 1 corrupt\n"))
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "show", self.qid], out=out), 0)
        self.assertEqual(json.loads(out.getvalue())["corrupt"], "%s: %s" % (path, reason))
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "delete", self.qid], out=out), 0)
        self.assertEqual(out.getvalue(), "deleted %s (corrupt)\n" % self.qid)
        self.assertEqual(os.listdir(self.spool.path("corrupt")), [])
        yield q.stopService()

    def test_emptyQueueFile(self):
        return self.quarantined("emptyQueueFile")

    def test_garbledQueueFile(self):
        return self.quarantined("garbledQueueFile")

    def test_emptyObject(self):
        return self.quarantined("emptyObject")

    def test_truncatedEnvelope(self):
        return self.quarantined("truncatedEnvelope")

    def test_bodyCutMidway(self):
        """A queue file cut mid-body is never delivered truncated."""
        return self.quarantined("bodyCutMidway")

    def test_staleContent(self):
        """
        Content of the size recorded but not the content (a file named before
        its sync and cut short by a crash, or one it was written over).
        """
        return self.quarantined("staleContent")

    def test_anotherMessage(self):
        """A file that holds another message than its name says (a reused file whose new content was lost)."""
        return self.quarantined("anotherMessage")

    def test_wrongType(self):
        return self.quarantined("wrongType")

    def test_hugeArrival(self):
        """An arrival past a float's range (it raised OverflowError, which nothing expected)."""
        return self.quarantined("hugeArrival")

    def test_nanArrival(self):
        """NaN (or Infinity) parses as JSON, but is no time: the message would never grow old enough to bounce."""
        return self.quarantined("nanArrival")

    def test_emptyStateFile(self):
        return self.quarantined("emptyStateFile")

    def test_garbledStateFile(self):
        return self.quarantined("garbledStateFile")

    @defer.inlineCallbacks
    def test_recipientChanged(self):
        """An envelope changed since its 250 (a recipient's address) is set aside, never delivered to."""
        cut(self.spool.path("queue", self.qid), lambda d: d.replace(b"b@example.net", b"b@example.nes", 1))
        with self.assertRaises(CorruptMessage) as caught:
            self.spool.load(self.qid, content=False)
        self.assertTrue(caught.exception.reason.startswith("envelope's CRC-32 is "), caught.exception.reason)
        hop = RecordingHop()
        q = QueueManager(self.spool, lambda m, r: hop, task.Clock(), retryMin=30)
        q.recovered = self.spool.open()
        q.startService()
        yield q.whenIdle()
        self.assertEqual(hop.calls, [])
        self.assertEqual([qid for qid, _, _ in self.spool.corrupt()], [self.qid])
        self.assertEqual(len(self.errors), 1)
        yield q.stopService()

    def test_envelopeCrcKeyChanged(self):
        """
        A bit flipped in the name of the envelope's CRC-32 is no envelope from
        before it was recorded: the recipient changed with it is never sent to.
        """
        return self.quarantined("envelopeCrcKeyChanged")

    def test_bodyCrcKeyChanged(self):
        """A bit flipped in the name of the content's CRC-32: changed content is never sent."""
        return self.quarantined("bodyCrcKeyChanged")

    def test_stateNotARecord(self):
        return self.quarantined("stateNotARecord")

    def test_backoffNotANumber(self):
        """
        A back-off level that is not a number would fail the recording of
        every attempt's outcome after its delivery (sent again at each retry).
        """
        return self.quarantined("backoffNotANumber")

    def test_listReadsEnvelopesOnly(self):
        """
        relaygw-queue list reads each envelope, not the content (a large
        queue's listing would read all of it): content that does not match
        its CRC-32 lists as queued, and show, which reads it, names why.
        """
        path, reason = self.corrupt("staleContent")
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "list"], out=out), 0)
        self.assertTrue(out.getvalue().endswith("-- 1 message, %d bytes: 1 active, 0 deferred, 0 held; 0 corrupt\n"
                                                % len(BODY)), out.getvalue())
        self.assertIn("%s*" % self.qid, out.getvalue())
        err = io.StringIO()
        self.patch(tool.sys, "stderr", err)
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "show", self.qid], out=out), 1)
        self.assertEqual(err.getvalue(), "relaygw-queue: %s is unreadable: %s\n" % (self.qid, reason))
        with self.assertRaises(CorruptMessage):
            self.spool.load(self.qid)
        self.assertEqual(self.spool.load(self.qid, content=False).size, len(BODY))

    @defer.inlineCallbacks
    def test_intactMessageDelivered(self):
        """The same path with nothing damaged delivers (the tests above can fail)."""
        hop = RecordingHop()
        q = QueueManager(self.spool, lambda m, r: hop, task.Clock(), retryMin=30)
        q.recovered = self.spool.open()
        q.startService()
        yield q.whenIdle()
        self.assertEqual(len(hop.calls), 1)
        self.assertEqual(self.errors, [])
        yield q.stopService()


class QuarantinedAgainTests(unittest.TestCase):
    """
    A second quarantine under a queue id already in corrupt/ (the id used
    again, or a progress record set aside after its queue file) replaces
    nothing: it gets the next free name, ID.1, with its own reason.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"], "arrival": 1.7e9})
        w.write(BODY)
        self.qid = yield w.commit()
        yield self.spool.writeState(self.qid, {"rcpts": {}, "attempts": 1})

    def read(self, name):
        with open(self.spool.path("corrupt", name), "rb") as f:
            return f.read()

    def test_idUsedAgain(self):
        with open(self.spool.path("queue", self.qid), "rb") as f:
            first = f.read()
        self.spool.quarantine(self.qid, "first reason")
        second = b"another file under the same name\n"
        with open(self.spool.path("queue", self.qid), "wb") as f:
            f.write(second)
        self.spool.quarantine(self.qid, "second reason")
        self.assertEqual((self.read(self.qid), self.read(self.qid + ".1")), (first, second))
        self.assertEqual([(name, reason) for name, reason, _ in self.spool.corrupt()],
                         [(self.qid, "first reason"), (self.qid + ".1", "second reason")])
        self.assertEqual(self.spool.queueIds(), [])
        # A third goes to .2; and relaygw-queue lists each under its own name.
        with open(self.spool.path("queue", self.qid), "wb") as f:
            f.write(b"third\n")
        self.spool.quarantine(self.qid, "third reason")
        self.assertEqual(self.read(self.qid + ".2"), b"third\n")
        out = io.StringIO()
        self.assertEqual(tool.main(["--spool", self.dir, "list"], out=out), 0)
        rows = [l for l in out.getvalue().splitlines() if l.startswith(self.qid)]
        self.assertEqual([(row.split()[0], row.split("corrupt: ")[1]) for row in rows],
                         [(self.qid + "#", "first reason"), (self.qid + ".1#", "second reason"),
                          (self.qid + ".2#", "third reason")])
        self.assertTrue(out.getvalue().endswith("; 3 corrupt\n"), out.getvalue())

    def test_progressAfterItsQueueFile(self):
        """A progress record that turns up after its message was set aside keeps the first one's evidence."""
        with open(self.spool.path("state", self.qid), "rb") as f:
            first = f.read()
        self.spool.quarantine(self.qid, "garbled envelope")
        with open(self.spool.path("state", self.qid), "wb") as f:
            f.write(b"{garbled")
        self.spool.quarantine(self.qid, "garbled state file")
        self.assertEqual((self.read(self.qid + ".state"), self.read(self.qid + ".1.state")), (first, b"{garbled"))
        self.assertTrue(os.path.exists(self.spool.path("corrupt", self.qid)))
        self.assertEqual([(name, reason) for name, reason, _ in self.spool.corrupt()],
                         [(self.qid, "garbled envelope"), (self.qid + ".1", "garbled state file")])

    def test_reasonFileInTheWay(self):
        """Only a reason left there (the files never moved): the quarantine takes the next name, not its place."""
        with open(self.spool.path("corrupt", self.qid + ".reason"), "w") as f:
            f.write('{"reason": "older", "time": 1}')
        self.spool.quarantine(self.qid, "newer")
        self.assertEqual(json.loads(self.read(self.qid + ".reason"))["reason"], "older")
        self.assertEqual(json.loads(self.read(self.qid + ".1.reason"))["reason"], "newer")
        self.assertTrue(os.path.exists(self.spool.path("corrupt", self.qid + ".1")))


class ProgressDamagedTests(unittest.TestCase):
    """
    A progress record changed since it was written (a bit flipped, another
    message's record in its place) sets its message aside: read as it is, it
    would send the message again to a recipient it was delivered to, or
    never to one marked done by a record that is not its own.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        self.qids = []
        for done in ("b@example.net", "c@example.net"):
            w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net", "c@example.net"],
                                       "arrival": 1.7e9})
            w.write(BODY)
            qid = yield w.commit()
            yield self.spool.writeState(qid, {"rcpts": {done: {"status": "done", "result": "250 Ok", "hop": "h"}},
                                              "attempts": 1})
            self.qids.append(qid)

    @defer.inlineCallbacks
    def delivered(self):
        """C{{qid: recipients}} a queue manager delivers to after a restart."""
        hop = RecordingHop()
        q = QueueManager(self.spool, lambda m, r: hop, task.Clock(), retryMin=30)
        q.recovered = self.spool.open()
        q.startService()
        yield q.whenIdle()
        yield q.stopService()
        return {m.queueId: m.recipients for call in hop.calls for m in call}

    @defer.inlineCallbacks
    def test_bitFlipped(self):
        def flip(data):
            at = data.index(b'"done"') + 2
            return data[:at] + bytes([data[at] ^ 8]) + data[at + 1:]  # ("dgne": no longer done)

        cut(self.spool.path("state", self.qids[0]), flip)
        self.assertEqual((yield self.delivered()), {self.qids[1]: ["b@example.net"]})
        [(name, reason, _)] = self.spool.corrupt()
        self.assertEqual(name, self.qids[0])
        self.assertIn("CRC-32", reason)

    @defer.inlineCallbacks
    def test_headFlipped(self):
        """Bits flipped in the names of the record's CRC-32 and queue id too: no record from before them."""
        def flip(data):
            data = data.replace(b'{"crc32":', b'{"crc22":', 1).replace(b'"queue_id"', b'"queue_ie"', 1)
            return data.replace(b'"done"', b'"dgne"', 1)

        cut(self.spool.path("state", self.qids[0]), flip)
        self.assertEqual((yield self.delivered()), {self.qids[1]: ["b@example.net"]})
        path = self.spool.path("state", self.qids[0])
        self.assertEqual([(name, reason) for name, reason, _ in self.spool.corrupt()],
                         [(self.qids[0], "%s: progress record's head is damaged" % path)])

    @defer.inlineCallbacks
    def test_anotherMessagesRecord(self):
        with open(self.spool.path("state", self.qids[1]), "rb") as f:
            other = f.read()
        cut(self.spool.path("state", self.qids[0]), lambda d: other)
        self.assertEqual((yield self.delivered()), {self.qids[1]: ["b@example.net"]})
        self.assertEqual([(name, reason) for name, reason, _ in self.spool.corrupt()],
                         [(self.qids[0], "%s: the record is message %s's" % (
                             self.spool.path("state", self.qids[0]), self.qids[1]))])

    @defer.inlineCallbacks
    def test_recordedBeforeTheChecksum(self):
        """A progress record from before its CRC-32 and queue id were recorded is read as it always was."""
        for qid, done in zip(self.qids, ("b@example.net", "c@example.net")):
            cut(self.spool.path("state", qid), lambda d: json.dumps({"rcpts": {done: {"status": "done"}}}).encode())
        self.assertEqual((yield self.delivered()), {self.qids[0]: ["c@example.net"], self.qids[1]: ["b@example.net"]})
        self.assertEqual(self.spool.corrupt(), [])

    @defer.inlineCallbacks
    def test_intact(self):
        """Undamaged, each record reads back as written, and keeps its done recipient from a second delivery."""
        self.assertEqual(self.spool.readState(self.qids[0]),
                         {"rcpts": {"b@example.net": {"status": "done", "result": "250 Ok", "hop": "h"}},
                          "attempts": 1})
        self.assertEqual((yield self.delivered()), {self.qids[0]: ["c@example.net"], self.qids[1]: ["b@example.net"]})


class DamagedWhileQueuedTests(unittest.TestCase):
    """
    A queue file damaged after its attempt read it back (cut short, changed,
    grown) never goes out as if it were whole: the content a next hop reads
    ends with an error instead of an early or a late end.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        writer = Spool(self.dir, Committer(reactor))
        writer.open()
        w = writer.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"], "arrival": 1.7e9})
        w.write(BODY)
        qid = yield w.commit()
        self.spool = Spool(self.dir, Committer(reactor))  # (nothing kept in memory: read from the file)
        self.spool.open()
        self.message = self.spool.load(qid)
        self.path = self.spool.path("queue", qid)

    def readAll(self):
        with self.message.openForDelivery() as f:
            return b"".join(iter(lambda: f.read(100), b""))

    def test_whole(self):
        """Undamaged, the content reads back whole, in chunks of any size."""
        self.assertEqual(self.readAll(), BODY)
        with self.message.openForDelivery() as f:
            self.assertEqual(f.read(), BODY)

    def test_cutShort(self):
        cut(self.path, lambda d: d[:-100])
        self.assertRaises(OSError, self.readAll)

    def test_changed(self):
        cut(self.path, lambda d: d[:-5] + b"XXX\r\n")
        self.assertRaises(OSError, self.readAll)

    def test_grown(self):
        """Octets past the recorded size are never sent."""
        cut(self.path, lambda d: d + b"appended\r\n")
        self.assertEqual(self.readAll(), BODY)

    def test_readAgainCheckedAgain(self):
        """
        Read again from its start (the 7-bit conversion reads it twice), the
        content is checked again: changed between the two reads, the second
        ends with an error.  Only its start can be sought.
        """
        with self.message.openForDelivery() as f:
            start = f.tell()
            self.assertEqual(f.read(), BODY)
            f.seek(start)
            self.assertEqual(f.read(), BODY)
            self.assertRaises(ValueError, f.seek, start + 1)
            f.seek(start)
            cut(self.path, lambda d: d[:-5] + b"XXX\r\n")
            self.assertRaises(OSError, f.read)


class CutDuringDeliveryTests(RelayTestCase):
    """A queue file cut short while its message waits for the next hop's greeting."""

    @defer.inlineCallbacks
    def test_notSentCutShort(self):
        from tests.relaysetup import TrackingHopFactory

        hop, port = self.hop(factory=TrackingHopFactory(greetDelay=1.0))
        logged = LogCapture(self)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "none", "retry_min": 0.5,
                            "retry_max": 0.5})
        retain, RetainedContent.RETAIN_EACH = RetainedContent.RETAIN_EACH, 0  # (read from the file, as after a restart)
        self.addCleanup(setattr, RetainedContent, "RETAIN_EACH", retain)
        qid = yield self.send()
        yield self.until(lambda: hop.connections)
        content = []
        cut(self.gw.service.spool.path("queue", qid),
            lambda d: content.append(d[len(envelopeLine(d)):]) or d[:-10])
        [content] = content
        yield self.until(lambda: os.path.exists(self.gw.service.spool.path("corrupt", qid)))
        self.assertEqual(hop.transactions, [])  # (its DATA began, and was never ended)
        self.assertEqual(self.gw.service.spool.queueIds(), [])
        self.assertEqual([(qid, "%s: content is %d octets, the envelope says %d" % (
            self.gw.service.spool.path("queue", qid), len(content) - 10, len(content)))],
            [(q, reason) for q, reason, _ in self.gw.service.spool.corrupt()])
        # The read that found it cut short: one line, the message deferred (and set aside at its next attempt).
        self.assertEqual(self.flushLoggedErrors(), [])
        [event] = logged.find("cannot read the message")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("content cut short since it was read back (10 octets missing)", str(event["error"]))
        [deferred] = [e for e in logged.find("status=") if e.get("qid") == qid]
        self.assertIn("dsn=4.3.0, status=deferred (451 4.3.0 cannot read the message: %s: content cut short" % (
            self.gw.service.spool.path("queue", qid),), formatEvent(deferred))


class SizeTests(RelayTestCase):
    """size is the octets sent onward, on the first attempt and after a restart alike."""

    @defer.inlineCallbacks
    def test_sameSizeFreshAndRecovered(self):
        hop, port = self.hop(extensions=["SIZE 10000000"],
                             rcpt={"b@example.net": ["451 4.3.0 not yet", "451 4.3.0 not yet", "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 0.3, "retry_max": 0.3})
        qid = yield self.send()
        spool = self.gw.service.spool
        yield self.until(lambda: spool.readState(qid).get("attempts", 0) >= 1)
        fresh = spool.load(qid).size
        yield self.until(lambda: not spool.queueIds())
        sizes = [int(l.split("SIZE=")[1].split()[0]) for l in hop.lines if l.startswith("MAIL")]
        [data] = [t["data"] for t in hop.transactions]
        self.assertEqual(sizes, [len(data)] * 3)  # right on the first attempt, and on every retry
        self.assertEqual(fresh, len(data))
        self.assertTrue(data.startswith(b"Received: "))


class InterfaceTests(unittest.TestCase):
    """The spool and its messages provide the interfaces the rest of the gateway uses."""

    @defer.inlineCallbacks
    def test_provides(self):
        from zope.interface.verify import verifyObject

        from relaygw.spoolapi import Envelope, ISpool, ISpooledMessage

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        self.assertTrue(verifyObject(ISpool, spool))
        w = spool.newMessage(Envelope(mailfrom="a@example.org", recipients=["b@example.net"], arrival=5.0))
        w.write(BODY)
        qid = yield w.commit()
        m = spool.load(qid)
        self.assertTrue(verifyObject(ISpooledMessage, m))
        env = m.envelope
        self.assertIsInstance(env, Envelope)
        self.assertEqual((env.mailfrom, env.recipients, env.arrival, env.queue_id, env.size),
                         ("a@example.org", ["b@example.net"], 5.0, qid, len(BODY)))
        with m.narrowed(["b@example.net"]).openBody() as f:
            self.assertEqual(f.read(), BODY)


class AnyContentTests(unittest.TestCase):
    """Whatever a queue or state file holds, reading it back is a message, or CorruptMessage: nothing else."""

    def setUp(self):
        self.spool = Spool(os.path.abspath(self.mktemp()), None)
        self.spool.open()

    def test_anyBytes(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        line = st.one_of(
            st.binary(max_size=300),
            st.dictionaries(st.sampled_from(["mailfrom", "recipients", "arrival", "context", "body_size",
                                             "mail_params", "queue_id"]),
                            st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                                             st.text(max_size=5), kids, max_size=3), max_leaves=6),
                            max_size=7).map(lambda d: json.dumps(d).encode() + b"\n"),
        )

        @settings(max_examples=300, deadline=None, database=None)
        @given(line, st.binary(max_size=100), st.binary(max_size=200))
        def check(envelope, body, state):
            with open(self.spool.path("queue", "Q"), "wb") as f:
                f.write(envelope + body)
            with open(self.spool.path("state", "Q"), "wb") as f:
                f.write(state)
            try:
                m = self.spool.load("Q")
            except CorruptMessage:
                pass
            else:
                self.assertIsInstance(m.mailfrom, str)
                self.assertTrue(all(isinstance(r, str) for r in m.recipients))
                self.assertEqual(m.size, len(body))
            try:
                s = self.spool.readState("Q")
            except CorruptMessage:
                pass
            else:
                self.assertIsInstance(s, dict)
            out, err = io.StringIO(), io.StringIO()
            import contextlib

            with contextlib.redirect_stderr(err):
                self.assertIn(tool.main(["--spool", self.spool.directory, "list"], out=out), (0, 1))
                self.assertIn(tool.main(["--spool", self.spool.directory, "show", "Q"], out=out), (0, 1))
            self.assertNotIn("Traceback", out.getvalue() + err.getvalue())
            self.assertFalse(err.getvalue().startswith("relaygw-queue: error"), err.getvalue())

        check()

    def test_cutAnywhere(self):
        """A well-formed message cut at any point reads back only when whole."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=200, deadline=None, database=None)
        @given(st.binary(min_size=1, max_size=400), st.data())
        def check(body, data):
            line = json.dumps({"body_size": len(body), "mailfrom": "a@example.org",
                               "recipients": ["b@example.net"]}).encode() + b"\n"
            whole = line + body
            cut = data.draw(st.integers(min_value=0, max_value=len(whole)))
            with open(self.spool.path("queue", "Q"), "wb") as f:
                f.write(whole[:cut])
            if cut == len(whole):
                self.assertEqual(self.spool.load("Q").size, len(body))
            else:
                self.assertRaises(CorruptMessage, self.spool.load, "Q")

        check()
