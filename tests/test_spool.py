"""
The spool: grouped commits, recovery, and crash safety of a real twistd
process killed mid-DATA and right after the 250.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from relaygw import durable
from relaygw.durable import CommitJob, Committer
from relaygw.relay.dsn import buildBounce
from relaygw.relay.nexthop import Result
from relaygw.spool import Spool
from relaygw.spool.retained import RetainedContent
from relaygw.spool.spent import SpentFiles
from relaygw.spoolapi import CorruptMessage, Envelope, Withdrawn
from relaygw.testing import Client, Gateway, configText, freePort, inThread, runTwistd, waitForPort
from tests.outside import OutsideFiles
from tests.recorders import LogCapture, RecordingHop


class SpoolCase(unittest.TestCase):
    """A spool with its disk thread, and a way to commit content to it."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()

    @defer.inlineCallbacks
    def commitContent(self, content):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        w.write(content)
        qid = yield w.commit()
        m = self.spool.load(qid)
        with open(m.path, "rb") as f:
            f.seek(m.bodyOffset)
            self.assertEqual(f.read(), content)
        return qid


class SpoolTests(SpoolCase):

    @defer.inlineCallbacks
    def test_manySmallPieces(self):
        """
        Content that came in more pieces than one writev(2) takes (tiny
        packets) is committed whole, in order.
        """
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["b@example.net"]})
        pieces = [b"line %d\r\n" % i for i in range(3000)]
        for piece in pieces:
            w.write(piece)
        qid = yield w.commit()
        m = self.spool.load(qid)
        with open(m.path, "rb") as f:
            f.seek(m.bodyOffset)
            self.assertEqual(f.read(), b"".join(pieces))

    @defer.inlineCallbacks
    def test_commitWritesEnvelopeAndContent(self):
        w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"],
                                   "context": {"connection": {"remote_ip": "192.0.2.1"}}})
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        # A small message stays in memory until the disk thread writes it.
        self.assertFalse(os.path.exists(self.spool.path("tmp", w.queueId)))
        qid = yield w.commit()
        self.assertEqual(self.spool.queueIds(), [qid])
        self.assertFalse(os.path.exists(self.spool.path("tmp", qid)))
        m = self.spool.load(qid)
        self.assertEqual(m.recipients, ["b@example.net"])
        self.assertEqual(m.context["remote_ip"], "192.0.2.1")
        self.assertEqual(m.envelope.size, 20)
        with open(m.path, "rb") as f:
            f.seek(m.bodyOffset)
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nbody\r\n")

    @defer.inlineCallbacks
    def test_largeMessageStreamsToDisk(self):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        chunk = b"y" * 65536
        for _ in range(64):
            w.write(chunk)
            # Never more than the spill threshold held in memory.
            self.assertLess(w._buffered, w.SPILL + len(chunk))
        qid = yield w.commit()
        m = self.spool.load(qid)
        self.assertEqual(m.envelope.size, 64 * 65536)

    @defer.inlineCallbacks
    def test_concurrentCommitsShareSyncs(self):
        writers = []
        for i in range(50):
            w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
            w.write(b"x" * 4096)
            writers.append(w)
        yield defer.gatherResults([w.commit() for w in writers])
        c = self.spool.committer
        self.assertEqual(c.jobs, 50)
        self.assertLess(c.batches, 50)
        self.assertEqual(len(self.spool.queueIds()), 50)

    def test_openDiscardsUnacknowledged(self):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        w.write(b"x" * (w.SPILL + 1))  # large: streamed into tmp/ as it arrives
        self.assertTrue(os.path.exists(self.spool.path("tmp", w.queueId)))
        with open(self.spool.path("state", "orphan"), "w") as f:
            f.write("{}")
        self.assertEqual(Spool(self.dir, self.spool.committer).open(), [])
        self.assertEqual(os.listdir(self.spool.path("tmp")), [])
        self.assertEqual(os.listdir(self.spool.path("state")), [])

    @defer.inlineCallbacks
    def test_stateWrittenAfterADeleteDoesNotStay(self):
        """
        relaygw-queue deletes a message while its progress record is being
        written: the write lands after the delete and would leave a record
        of nothing behind until a restart; it is removed as it lands.
        """
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        qid = yield w.commit()
        os.unlink(self.spool.path("queue", qid))  # the tool's delete, before the record lands
        yield self.spool.writeState(qid, {"rcpts": {"r@example.net": {"status": "deferred"}}})
        self.assertEqual(os.listdir(self.spool.path("state")), [])

    #: A queue file as relaygw wrote it before DSN parameters were kept:
    #: the envelope line (its CRC-32 over what follows the head) and content.
    WRITTEN_BEFORE_DSN = (
        b'{"body_size":                  22,"body_crc32":3048348511,"envelope_crc32":1871771768,'
        b'"mailfrom":"a@example.org","recipients":["b@example.net"],"mail_params":{"SIZE":"20"},'
        b'"arrival":1700000000.0,"context":{"connection":{}},"queue_id":"1A24CC1E522679F000001"}\n'
        b"Subject: old\r\n\r\nbody\r\n")

    def test_queueFileWrittenBeforeDSNLoads(self):
        """A queue file written before DSN parameters were kept loads, checksums and all, without any."""
        qid = "1A24CC1E522679F000001"
        with open(self.spool.path("queue", qid), "wb") as f:
            f.write(self.WRITTEN_BEFORE_DSN)
        m = self.spool.load(qid)
        self.assertEqual((m.mailfrom, m.recipients, m.envelope.mail_params), ("a@example.org", ["b@example.net"],
                                                                              {"SIZE": "20"}))
        self.assertEqual(m.envelope.rcpt_params, {})
        self.assertEqual(m.size, 22)
        with m.openForDelivery() as f:
            self.assertEqual(f.read(), b"Subject: old\r\n\r\nbody\r\n")

    @defer.inlineCallbacks
    def test_dsnParametersKeptWithTheMessage(self):
        """
        RET and ENVID (with MAIL's parameters) and each recipient's NOTIFY
        and ORCPT are written with the message and read back by another
        spool on the same directory (a restart).
        """
        params = {"b@example.net": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;B+2Bx@example.net"}}
        w = self.spool.newMessage(Envelope(mailfrom="a@example.org", recipients=["b@example.net", "c@example.net"],
                                           mail_params={"RET": "HDRS", "ENVID": "id+2B1"}, rcpt_params=params))
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        qid = yield w.commit()
        again = Spool(self.dir, self.spool.committer)
        m = again.load(qid)
        self.assertEqual(m.envelope.mail_params, {"RET": "HDRS", "ENVID": "id+2B1"})
        self.assertEqual(m.envelope.rcpt_params,
                         {"b@example.net": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;B+2Bx@example.net"}})

    @defer.inlineCallbacks
    def test_envelopeWithoutDSNParametersAsBefore(self):
        """Without DSN parameters the envelope line has the keys it always had: nothing more to write or read."""
        w = self.spool.newMessage(Envelope(mailfrom="a@example.org", recipients=["b@example.net"]))
        qid = yield w.commit()
        with open(self.spool.path("queue", qid), "rb") as f:
            stored = json.loads(f.readline())
        self.assertEqual(list(stored), ["body_size", "body_crc32", "envelope_crc32", "mailfrom", "recipients",
                                        "mail_params", "arrival", "context", "queue_id"])

    def test_badDSNParametersAreCorrupt(self):
        """Stored DSN parameters that are not parameters by recipient: the envelope is corrupt, not half read."""
        with self.assertRaises(CorruptMessage):
            Envelope.fromDict({"mailfrom": "", "recipients": ["b@example.net"], "rcpt_params": {"b@example.net": 1}})

    @defer.inlineCallbacks
    def test_stateRoundTrip(self):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        qid = yield w.commit()
        self.assertEqual(self.spool.readState(qid), {})
        batches = self.spool.committer.batches
        written = self.spool.writeState(qid, {"rcpts": {"r@example.net": {"status": "done"}}})
        yield written
        # Through the committer's grouped commit, like a new message.
        self.assertEqual(self.spool.committer.batches, batches + 1)
        self.assertEqual(self.spool.readState(qid)["rcpts"]["r@example.net"]["status"], "done")
        yield self.spool.remove(qid)
        self.assertEqual(self.spool.queueIds(), [])
        self.assertEqual(self.spool.readState(qid), {})

    @defer.inlineCallbacks
    def test_deliveredFileIsReused(self):
        """
        A removed message's file waits in spent/ and the next message is
        written over it: same inode, cut to the new message's length.
        """
        first = yield self.commitContent(b"x" * 9000)
        inode = os.stat(self.spool.path("queue", first)).st_ino
        yield self.spool.remove(first, progress=False)
        self.assertEqual(os.listdir(self.spool.path("spent")), [first])
        second = yield self.commitContent(b"short\r\n")
        self.assertEqual(os.stat(self.spool.path("queue", second)).st_ino, inode)
        self.assertEqual(os.listdir(self.spool.path("spent")), [])
        self.assertEqual(self.spool.queueIds(), [second])

    @defer.inlineCallbacks
    def test_spentFileGoneMissing(self):
        """A spent file removed behind the gateway's back is created afresh."""
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first)
        os.unlink(self.spool.path("spent", first))
        second = yield self.commitContent(b"two\r\n")
        self.assertEqual(self.spool.queueIds(), [second])
        # And removing a message that has already gone is not an error.
        os.unlink(self.spool.path("queue", second))
        yield self.spool.remove(second)
        self.assertEqual(self.spool.queueIds(), [])

    @defer.inlineCallbacks
    def test_failedRemovalIsReportedAndTheDiskThreadGoesOn(self):
        """An unlink that fails (here: a directory) fails its own Deferred; later commits still complete."""
        committer = self.spool.committer
        stuck = os.path.join(self.dir, "not-a-file")
        os.mkdir(stuck)
        gone = os.path.join(self.dir, "gone-already")
        yield self.assertFailure(committer.unlink([stuck]), IsADirectoryError)
        yield committer.unlink([gone])  # a file that is already gone is no error
        qid = yield self.commitContent(b"after\r\n")
        self.assertEqual(self.spool.queueIds(), [qid])

    @defer.inlineCallbacks
    def test_spentFilesBounded(self):
        """
        At most SPENT files are kept; at start, one that is still queued
        under its own name (a crash mid-removal) is never handed out.
        """
        self.patch(SpentFiles, "SPENT", 2)
        qids = []
        for i in range(4):
            qids.append((yield self.commitContent(b"m%d\r\n" % i)))
        for qid in qids[:3]:
            yield self.spool.remove(qid)
        self.assertEqual(len(os.listdir(self.spool.path("spent"))), 2)
        os.link(self.spool.path("queue", qids[3]), self.spool.path("spent", qids[3]))
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [qids[3]])
        self.assertEqual(sorted(os.listdir(self.spool.path("spent"))), sorted(qids[:2]))
        self.assertNotIn(qids[3], reopened.spent.names)


    @defer.inlineCallbacks
    def test_reusedFileStillUnderItsOldName(self):
        """
        A commit syncs queue/ only, so after a crash a reused file can
        still have its spent name too.  At start that name goes, and the
        message the file holds is never written over.
        """
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first, progress=False)
        second = yield self.commitContent(b"two\r\n")  # written over spent/first
        self.assertEqual(os.listdir(self.spool.path("spent")), [])
        os.link(self.spool.path("queue", second), self.spool.path("spent", first))  # what the crash left
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [second])
        self.assertEqual(os.listdir(self.spool.path("spent")), [])
        w = reopened.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        w.write(b"three\r\n")
        third = yield w.commit()
        self.assertEqual(sorted(reopened.queueIds()), sorted([second, third]))
        with reopened.load(second).openBody() as f:
            self.assertEqual(f.read(), b"two\r\n")

    @defer.inlineCallbacks
    def test_reusedFileNamedBeforeItsNewContent(self):
        """
        A reused file is named in queue/ before its sync (through io_uring):
        a crash then can leave the old content under both names.  The spent
        name goes at start (the file has another), and the queued name is
        not taken for the old message.
        """
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first, progress=False)
        second = "0" * len(first)
        os.link(self.spool.path("spent", first), self.spool.path("queue", second))  # what the crash left
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [second])
        self.assertEqual((os.listdir(self.spool.path("spent")), reopened.spent.names), ([], []))
        with self.assertRaises(CorruptMessage) as cm:
            reopened.load(second)
        self.assertEqual(cm.exception.reason, "the file holds message %s" % (first,))

    @defer.inlineCallbacks
    def test_quarantinedFileStillUnderItsOldName(self):
        """The same for a reused file that has since been quarantined: the evidence is kept."""
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first, progress=False)
        second = yield self.commitContent(b"two\r\n")
        self.spool.quarantine(second, "test")
        os.link(self.spool.path("corrupt", second), self.spool.path("spent", first))
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [])
        self.assertEqual(os.listdir(self.spool.path("spent")), [])

    @defer.inlineCallbacks
    def test_spentFileOfASecondQuarantineNotReused(self):
        """A message set aside under a later name (ID.1) keeps its spent file from reuse, as one under ID does."""
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first, progress=False)
        self.assertEqual(os.listdir(self.spool.path("spent")), [first])
        with open(self.spool.path("corrupt", first + ".1"), "wb") as f:
            f.write(b"a copy of what was queued\n")
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [])
        self.assertEqual((os.listdir(self.spool.path("spent")), reopened.spent.names), ([], []))

    @defer.inlineCallbacks
    def test_unreadableSpentFileNotReused(self):
        """A spent file whose envelope cannot be read back (a crash mid-write) is removed, not reused."""
        first = yield self.commitContent(b"one\r\n")
        yield self.spool.remove(first, progress=False)
        with open(self.spool.path("spent", first), "r+b") as f:
            f.write(b"\0\0\0")
        with open(self.spool.path("spent", "empty"), "wb"):
            pass
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [])
        self.assertEqual(os.listdir(self.spool.path("spent")), [])


class RetainedContentTests(SpoolCase):
    """
    A committed message's content stays in memory until it leaves the
    spool, so its delivery does not read back what was just written; the
    queue file stays the authority on whether the message is still queued.
    """

    def scribbled(self, qid):
        """
        Overwrite the queue file's content in place, and read the content
        back through the message loaded before: only a read of the file
        sees the change (a load now would refuse the file: its checksum).
        """
        m = self.spool.load(qid)
        with open(m.path, "r+b") as f:
            f.seek(m.bodyOffset)
            f.write(b"#" * m.envelope.size)
        with m.openBody() as f:
            return f.read()

    @defer.inlineCallbacks
    def test_contentComesFromMemory(self):
        qid = yield self.commitContent(b"Subject: kept\r\n\r\nbody\r\n")
        self.assertEqual(self.scribbled(qid), b"Subject: kept\r\n\r\nbody\r\n")

    @defer.inlineCallbacks
    def test_deletedMessageIsNotDelivered(self):
        """relaygw-queue delete unlinks the queue file: nothing is served from memory then."""
        qid = yield self.commitContent(b"gone\r\n")
        message = self.spool.load(qid)
        os.unlink(message.path)
        self.assertRaises(FileNotFoundError, message.openBody)
        self.assertEqual(str(self.assertRaises(Withdrawn, message.openForDelivery)), "deleted")

    @defer.inlineCallbacks
    def test_heldMessageIsNotDelivered(self):
        """
        relaygw-queue hold: nothing is served for delivery until the release;
        the content is still there for a bounce (of the recipients already
        refused) meanwhile.
        """
        qid = yield self.commitContent(b"Subject: held\r\n\r\nbody\r\n")
        message = self.spool.load(qid)
        self.spool.hold(qid)
        self.assertEqual(str(self.assertRaises(Withdrawn, message.openForDelivery)), "held")
        self.assertIn(b"Subject: held\r\n", buildBounce(message, {"r@example.net": Result(550, "5.1.1", "no")},
                                                          "relay.test"))
        self.spool.release(qid)
        with message.openForDelivery() as f:
            self.assertEqual(f.read(), b"Subject: held\r\n\r\nbody\r\n")

    @defer.inlineCallbacks
    def test_largeMessageReadFromItsFile(self):
        self.patch(RetainedContent, "RETAIN_EACH", 100)
        qid = yield self.commitContent(b"x" * 101)
        self.assertEqual(self.scribbled(qid), b"#" * 101)

    @defer.inlineCallbacks
    def test_memoryBoundedAndGivenBackOnRemoval(self):
        """At most RETAIN octets are kept; a removed or quarantined message gives its share back."""
        self.patch(RetainedContent, "RETAIN", 150)
        first = yield self.commitContent(b"a" * 100)
        second = yield self.commitContent(b"b" * 100)
        self.assertEqual(self.scribbled(second), b"#" * 100)  # over the budget: read from the file
        yield self.spool.remove(first)
        third = yield self.commitContent(b"c" * 100)
        self.assertEqual(self.scribbled(third), b"c" * 100)
        self.spool.quarantine(third, "test")
        fourth = yield self.commitContent(b"d" * 100)
        self.assertEqual(self.scribbled(fourth), b"d" * 100)


def send(port, subject, finish=True):
    """Send one message; returns the 250 reply text, or None if not finished."""
    c = Client(port)
    c.reply()
    c.cmd("EHLO crash")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<b@example.net>")
    c.cmd("DATA")
    c.send("Subject: %s\r\n\r\n%s\r\n" % (subject, "z" * 2000))
    if not finish:
        return c
    c.send(".\r\n")
    code, lines = c.reply()
    c.close()
    assert code == 250, (code, lines)
    return lines[0]


def commitHeld(case, committer, directory, name):
    """
    Commit a job whose content, written in the disk thread, waits for the
    returned gate (a C{threading.Event}); returns C{(Deferred, gate)} once
    the disk thread has taken the job, so what is handed in meanwhile
    makes up the next batch.
    """
    gate, entered = threading.Event(), threading.Event()

    def data():
        entered.set()
        gate.wait(10)
        return b"held\n"

    d = committer.commit(CommitJob(os.path.join(directory, name + ".tmp"), os.path.join(directory, name), data=data))
    case.assertTrue(entered.wait(10))
    return d, gate


class CommitOrderTests(unittest.TestCase):
    """
    What the disk thread does, in order, to make a batch durable: the
    content is synced (one syncfs for the batch) before the file takes its
    name, and the directory is synced after the rename; only then does the
    commit fire (and the client get its 250).
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        self.calls = []

        def record(name, real, where):
            def call(*args):
                self.calls.append((name, where(*args)))
                return real(*args)
            return call

        self.patch(durable.quick, "rename",
                   record("rename", durable.quick.rename, lambda a, b: os.path.basename(os.path.dirname(b))))
        self.patch(durable, "_syncfs", record("syncfs", durable._syncfs, lambda fd: ""))
        self.patch(durable, "fsyncDirectory", record("fsyncdir", durable.fsyncDirectory, os.path.basename))

    def message(self):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["b@example.net"]})
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        return w.commit()

    @defer.inlineCallbacks
    def test_messageSyncedThenNamed(self):
        qid = yield self.message()
        self.assertEqual(self.calls, [("syncfs", ""), ("rename", "queue"), ("fsyncdir", "queue")])
        self.assertEqual(self.spool.load(qid).size, 20)

    @defer.inlineCallbacks
    def test_reusedFileSyncedThenNamed(self):
        """Written over a spent file: only queue/ is synced after the rename (the spool knows the old name)."""
        first = yield self.message()
        yield self.spool.remove(first, progress=False)
        del self.calls[:]
        second = yield self.message()
        self.assertEqual(self.calls, [("syncfs", ""), ("rename", "queue"), ("fsyncdir", "queue")])
        self.assertEqual(os.stat(self.spool.path("queue", second)).st_nlink, 1)
        self.assertEqual(os.listdir(self.spool.path("spent")), [])

    @defer.inlineCallbacks
    def test_progressRecordSyncedThenNamed(self):
        qid = yield self.message()
        del self.calls[:]
        yield self.spool.writeState(qid, {"rcpts": {}, "attempts": 1})
        self.assertEqual(self.calls, [("syncfs", ""), ("rename", "state"), ("fsyncdir", "state")])
        self.assertEqual(self.spool.readState(qid)["attempts"], 1)

    def held(self, name):
        """L{commitHeld} into the spool's C{queue/}; the gate is C{self.gate}."""
        d, self.gate = commitHeld(self, self.spool.committer, self.spool.path("queue"), name)
        return d

    def fired(self, _, name):
        self.calls.append(("fired", name))

    @defer.inlineCallbacks
    def test_renamesMadeDurableByTheNextBatch(self):
        """
        A batch renamed while the next one waits: that batch's syncfs
        (which starts after the renames) makes them durable, and only then
        do the first batch's commits fire.  The last batch, with nothing
        behind it, has its directory synced.
        """
        first = self.held("one").addCallback(self.fired, "one")
        second = self.message().addCallback(self.fired, "two")
        self.gate.set()
        yield defer.gatherResults([first, second])
        disk = [c for c in self.calls if c[0] != "fired"]
        self.assertEqual(disk, [("syncfs", ""), ("rename", "queue"), ("syncfs", ""), ("rename", "queue"),
                                ("fsyncdir", "queue")])
        # (The disk thread goes on while the reactor thread fires.)
        self.assertGreater(self.calls.index(("fired", "one")), self.calls.index(("syncfs", ""), 1))
        self.assertGreater(self.calls.index(("fired", "two")), self.calls.index(("fsyncdir", "queue")))

    @defer.inlineCallbacks
    def test_everyFileSystemOfABatchSynced(self):
        """
        One batch writing to two file systems (here the spool's and a
        tmpfs, as a Maildir next hop on its own mount would be) syncs each
        of them before anything is renamed.
        """
        elsewhere = tempfile.mkdtemp(dir="/dev/shm")
        self.addCleanup(shutil.rmtree, elsewhere)
        devices = {os.stat(self.dir).st_dev, os.stat(elsewhere).st_dev}
        self.assertEqual(len(devices), 2, "/dev/shm is not a file system of its own here")
        synced = []
        syncfs = durable._syncfs

        def record(fd):
            synced.append(os.fstat(fd).st_dev)
            return syncfs(fd)

        self.patch(durable, "_syncfs", record)
        maildir = CommitJob(os.path.join(elsewhere, "t"), os.path.join(elsewhere, "m"), data=b"delivered\n")
        ds = [self.held("one"), self.message(), self.spool.committer.commit(maildir)]
        self.gate.set()
        yield defer.gatherResults(ds)
        self.assertEqual(sorted(synced[-2:]), sorted(devices))
        self.assertEqual(len(synced), 3)  # the first batch's, then the second's: one per file system
        with open(os.path.join(elsewhere, "m"), "rb") as f:
            self.assertEqual(f.read(), b"delivered\n")

    @defer.inlineCallbacks
    def test_failedSyncLeavesNothingQueued(self):
        def eio(fd):
            raise OSError(5, "Input/output error")

        self.patch(durable, "_syncfs", eio)
        with self.assertRaises(OSError):
            yield self.message()
        self.assertEqual((os.listdir(self.spool.path("queue")), os.listdir(self.spool.path("tmp"))), ([], []))

    @defer.inlineCallbacks
    def assertFailsAlone(self, job, errno):
        """
        C{job} (a Maildir next hop's delivery, say) is committed in one
        batch with a held message and three more: it fails with C{errno},
        and the messages, on the spool's file system, are queued.
        """
        first = self.held("one")
        failing = self.spool.committer.commit(job)
        messages = [self.message() for _ in range(3)]
        self.gate.set()
        with self.assertRaises(OSError) as cm:
            yield failing
        self.assertEqual(cm.exception.errno, errno)
        qids = yield defer.gatherResults(messages + [first])
        self.assertEqual(sorted(self.spool.queueIds()), sorted(qids[:3] + ["one"]))

    @defer.inlineCallbacks
    def test_unwritableJobFailsAlone(self):
        """
        One job of a batch cannot be written (a Maildir next hop's own file
        system is full): that commit fails with ENOSPC, and the messages
        of the same batch, on the spool's file system, are queued.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)

        def full():
            raise OSError(28, "No space left on device")

        yield self.assertFailsAlone(CommitJob(os.path.join(elsewhere, "t"),
                                              os.path.join(elsewhere, "m"), data=full), 28)
        self.assertEqual((os.listdir(elsewhere), os.listdir(self.spool.path("tmp"))), ([], []))

    @defer.inlineCallbacks
    def test_unnamableJobFailsAlone(self):
        """
        One job of a batch cannot be named (a Maildir next hop's new/ was
        removed): that commit fails, and the messages of the same batch
        are queued.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(elsewhere, "tmp"))
        yield self.assertFailsAlone(CommitJob(os.path.join(elsewhere, "tmp", "m"),
                                              os.path.join(elsewhere, "new", "m"), data=b"delivered\n"), 2)
        self.assertEqual(os.listdir(os.path.join(elsewhere, "tmp")), [])

    @defer.inlineCallbacks
    def test_failedFileSystemFailsItsJobsAlone(self):
        """
        A batch writes to two file systems (the spool's, and a Maildir
        next hop's on a tmpfs) and the sync of the Maildir's fails with
        EIO: its delivery fails, and the messages of the same batch, on
        the spool's file system, are queued.
        """
        elsewhere = tempfile.mkdtemp(dir="/dev/shm")
        self.addCleanup(shutil.rmtree, elsewhere)
        failing = os.stat(elsewhere).st_dev
        self.assertNotEqual(failing, os.stat(self.dir).st_dev, "/dev/shm is not a file system of its own here")
        syncfs = durable._syncfs

        def eio(fd):
            if os.fstat(fd).st_dev == failing:
                raise OSError(5, "Input/output error")
            return syncfs(fd)

        self.patch(durable, "_syncfs", eio)
        yield self.assertFailsAlone(CommitJob(os.path.join(elsewhere, "t"),
                                              os.path.join(elsewhere, "m"), data=b"delivered\n"), 5)
        self.assertEqual(os.listdir(elsewhere), [])

    @defer.inlineCallbacks
    def test_failedDirectoryFailsItsJobsAlone(self):
        """
        The sync of a Maildir next hop's new/ fails after the renames: its
        delivery fails (its name taken back), and the messages named in
        queue/ in the same batch, whose directory was synced, are queued.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(elsewhere, "tmp"))
        os.makedirs(os.path.join(elsewhere, "new"))
        sync = durable.fsyncDirectory

        def eio(path):
            if path.startswith(elsewhere):
                raise OSError(5, "Input/output error")
            return sync(path)

        self.patch(durable, "fsyncDirectory", eio)
        yield self.assertFailsAlone(CommitJob(os.path.join(elsewhere, "tmp", "m"),
                                              os.path.join(elsewhere, "new", "m"), data=b"delivered\n"), 5)
        self.assertEqual(os.listdir(os.path.join(elsewhere, "new")), [])

    @defer.inlineCallbacks
    def test_failedCloseAnswered(self):
        """
        Closing a synced file fails (EIO, as NFS or FUSE can report it:
        the descriptor is gone all the same): that commit fails and its
        file is removed, and the disk thread goes on with the next commit.
        """
        close = durable.quick.close
        failed = []

        def eio(fd):
            close(fd)
            if not failed:
                failed.append(fd)
                raise OSError(5, "Input/output error")

        self.patch(durable.quick, "close", eio)
        with self.assertRaises(OSError):
            yield self.message().addTimeout(10, reactor)
        self.assertEqual(len(failed), 1)
        self.assertEqual((os.listdir(self.spool.path("queue")), os.listdir(self.spool.path("tmp"))), ([], []))
        qid = yield self.message().addTimeout(10, reactor)
        self.assertEqual(self.spool.queueIds(), [qid])

    @defer.inlineCallbacks
    def test_failedCloseOfAnUnfinishedFile(self):
        """
        A file being written fails (ENOSPC) and its close fails too (as
        NFS reports the write's error again there): the commit fails with
        the write's error, the file is removed, and the disk thread goes on.
        """
        self.assertEqual((yield failedCloseOfAnUnfinishedFile(self, self.message)), [])


@defer.inlineCallbacks
def failedCloseOfAnUnfinishedFile(case, message):
    """
    Commit C{message()} with its write failing with ENOSPC and the close of
    that file with EIO (the descriptor released all the same), then again;
    fires with the spool's queue ids after the first commit failed.
    """
    write, close = durable.quick.write, os.close
    failed = []

    def enospc(fd, data):
        failed.append(fd)
        raise OSError(28, "No space left on device")

    class OS:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def close(fd):
            close(fd)
            if fd in failed:
                raise OSError(5, "Input/output error")

    case.patch(durable.quick, "write", enospc)
    case.patch(durable, "os", OS())
    with case.assertRaises(OSError) as cm:
        yield message().addTimeout(10, reactor)
    case.assertEqual((cm.exception.errno, len(failed)), (28, 1))
    spool = case.spool
    case.assertEqual((os.listdir(spool.path("queue")), os.listdir(spool.path("tmp"))), ([], []))
    queued = spool.queueIds()
    case.patch(durable.quick, "write", write)
    qid = yield message().addTimeout(10, reactor)
    case.assertEqual(spool.queueIds(), [qid])
    return queued


class QuickCallsTests(unittest.TestCase):
    """
    The disk thread's quick calls (libc with the GIL held, or C{os}'s
    without libc) do what C{os}'s do, errors included.
    """

    def check(self, quick):
        d = self.mktemp()
        os.mkdir(d)
        old, new = os.path.join(d, "old"), os.path.join(d, "new")
        fd = quick.open(old, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.assertEqual(quick.write(fd, b"x" * 70000), 70000)
        quick.close(fd)
        fd = quick.open(old, os.O_WRONLY | os.O_CREAT, 0o640)  # reused: written over, then cut
        quick.ftruncate(fd, quick.write(fd, b"short"))
        self.assertFalse(os.get_inheritable(fd))
        quick.close(fd)
        quick.rename(old, new)
        with open(new, "rb") as f:
            self.assertEqual(f.read(), b"short")
        self.assertEqual(os.stat(new).st_mode & 0o777, 0o640 & ~_umask())
        link = os.path.join(d, "link")
        os.symlink(old, link)  # (dangling: old is renamed)
        for path, follow, found in ((new, True, True), (d, True, True), (old, True, False), (link, True, False),
                                    (link, False, True), (old, False, False), (os.path.join(new, "x"), True, False)):
            self.assertIs(quick.exists(path, follow=follow), found, (path, follow))
        with self.assertRaises(FileExistsError) as e:
            quick.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.assertEqual(e.exception.filename, new)
        with self.assertRaises(FileNotFoundError) as e:
            quick.rename(old, new)
        self.assertEqual(e.exception.filename, old)
        with self.assertRaises(OSError):
            quick.close(fd)  # closed already: EBADF

    def test_libc(self):
        quick = durable._Quick()
        self.assertIsNotNone(quick._libc)  # (Linux, glibc)
        self.check(quick)

    def test_withoutLibc(self):
        quick = durable._Quick()
        quick._libc = None
        self.check(quick)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CommitterStopTests(unittest.TestCase):
    """At shutdown the disk thread ends, after the work it was handed."""

    @defer.inlineCallbacks
    def test_stopAfterPendingWork(self):
        import threading

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        before = {t for t in threading.enumerate() if t.name == "relaygw-disk"}
        w = spool.newMessage({"mailfrom": "", "recipients": ["b@example.net"]})
        w.write(b"Subject: x\r\n\r\nbody\r\n")
        d = w.commit()
        spool.committer.stop()  # while the commit is under way
        qid = yield d
        self.assertEqual(spool.queueIds(), [qid])
        for _ in range(100):
            if not {t for t in threading.enumerate() if t.name == "relaygw-disk"} - before:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual({t for t in threading.enumerate() if t.name == "relaygw-disk"} - before, set())
        # A commit after the stop starts a new thread.
        w = spool.newMessage({"mailfrom": "", "recipients": ["c@example.net"]})
        w.write(b"Subject: y\r\n\r\nbody\r\n")
        self.assertEqual(len((yield w.commit())), len(qid))
        spool.committer.stop()


class CommitterCPUsTests(unittest.TestCase):
    """The disk thread runs on the CPUs it is given, whatever those of the thread that starts it."""

    @defer.inlineCallbacks
    def test_cpus(self):
        allowed = frozenset(os.sched_getaffinity(0))
        self.addCleanup(os.sched_setaffinity, 0, allowed)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        one = frozenset([max(allowed)])
        # (started by this thread, kept to one CPU for the last case as a worker's reactor thread is)
        for name, cpus, starter, expected in (("given one", one, allowed, one), ("given", None, allowed, allowed),
                                              ("given all", allowed, frozenset([min(allowed)]), allowed)):
            os.sched_setaffinity(0, starter)
            committer = Committer(reactor, cpus=cpus)
            self.addCleanup(committer.stop)
            seen = []

            def data():
                seen.append(frozenset(os.sched_getaffinity(0)))  # (in the disk thread)
                return b"x\n"

            path = os.path.join(directory, name)
            yield committer.commit(CommitJob(path + ".tmp", path, data=data))
            self.assertEqual(seen, [expected], name)


class CommitterHandInTests(unittest.TestCase):
    """Work handed to the disk thread while it syncs a batch is never acknowledged before it is done."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.committer = Committer(reactor)
        self.addCleanup(self.committer.stop)

    def job(self, name):
        return CommitJob(os.path.join(self.directory, name + ".tmp"), os.path.join(self.directory, name), data=b"x\n")

    @defer.inlineCallbacks
    def test_everyFiredCommitIsOnDisk(self):
        """
        Thousands of jobs handed in while the disk thread works, with the
        GIL switching as often as it can: each one's Deferred fires only
        once its file has its final name.  (A disk thread that takes its
        own batches from a list the reactor thread appends to loses jobs
        this way unless both only touch the list under one lock.)
        """
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        self.addCleanup(sys.setswitchinterval, interval)
        missing, ds = [], []

        def check(_, path):
            if not os.path.exists(path):
                missing.append(path)

        for i in range(3000):
            path = os.path.join(self.directory, "m%d" % i)
            ds.append(self.committer.commit(self.job("m%d" % i)).addCallback(check, path))
        yield defer.gatherResults(ds)
        self.assertEqual(missing, [])
        self.assertEqual(len([n for n in os.listdir(self.directory) if not n.endswith(".tmp")]), 3000)

    @defer.inlineCallbacks
    def test_commitsBeforeRemovals(self):
        """
        A batch's commits are answered before its removals' Deferreds fire:
        a client waits for its 250, where a removal only lets the queue
        manager go on.
        """
        inside, gate = threading.Event(), threading.Event()

        def held():  # runs in the disk thread, in the first batch
            inside.set()
            gate.wait(10)
            return b"x\n"

        first = self.committer.commit(CommitJob(os.path.join(self.directory, "a.tmp"),
                                                os.path.join(self.directory, "a"), data=held))
        self.assertTrue(inside.wait(10))  # (the disk thread gets there without the reactor)
        gone = os.path.join(self.directory, "gone")
        open(gone, "wb").close()
        order = []
        removal = self.committer.unlink([gone]).addCallback(lambda _: order.append("removal"))
        commit = self.committer.commit(self.job("b")).addCallback(lambda _: order.append("commit"))
        gate.set()
        yield defer.gatherResults([first, removal, commit])
        self.assertEqual(order, ["commit", "removal"])
        self.assertEqual(sorted(os.listdir(self.directory)), ["a", "b"])

    @defer.inlineCallbacks
    def test_wakeUpFails(self):
        """
        The disk thread cannot wake the reactor once (the waker's write
        fails, ENOSPC injected): its batch is answered all the same (the call
        was queued before the wake-up), and the disk thread goes on with the
        next.  Before, it died there, and every later commit (each 250, each
        progress record) waited for ever.
        """
        failed = []
        real = reactor.wakeUp

        def wakeUp():
            if not failed and threading.current_thread().name == "relaygw-disk":
                failed.append(True)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real()

        self.patch(reactor, "wakeUp", wakeUp)
        ticks = task.LoopingCall(lambda: None)  # (the reactor's next turn, as the gateway's own timers give it)
        ticks.start(0.1)
        self.addCleanup(ticks.stop)
        yield self.committer.commit(self.job("a"))
        second = self.committer.commit(self.job("b"))
        timer = reactor.callLater(5, second.cancel)
        yield second
        timer.cancel()
        self.assertEqual(failed, [True])
        self.assertEqual(sorted(os.listdir(self.directory)), ["a", "b"])


class DiskThreadSchedulingTests(unittest.TestCase):
    """
    The disk thread runs under SCHED_BATCH: its wake-ups do not preempt the
    reactor thread.  A batch of BIG_BATCH octets or more is the exception.
    """

    def setUp(self):
        self.directory = directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.committer = Committer(reactor)
        self.addCleanup(self.committer.stop)

    @defer.inlineCallbacks
    def test_diskThreadIsBatchScheduled(self):
        directory, committer = self.directory, self.committer
        seen = []

        def data():  # runs in the disk thread, as it fills the file
            seen.append((threading.get_ident(), os.sched_getscheduler(0)))
            return b"queued\n"

        yield committer.commit(CommitJob(os.path.join(directory, "t"), os.path.join(directory, "q"), data=data))
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen[0][0], threading.get_ident())
        self.assertEqual(seen[0][1], os.SCHED_BATCH)
        self.assertEqual(os.sched_getscheduler(0), os.SCHED_OTHER)  # the reactor thread keeps its policy
        with open(os.path.join(directory, "q"), "rb") as f:
            self.assertEqual(f.read(), b"queued\n")

    @defer.inlineCallbacks
    def test_bigBatchOnTheNormalPolicy(self):
        """A batch of BIG_BATCH octets or more is synced on the normal policy; the next small one is not."""
        directory, committer = self.directory, self.committer
        seen = []

        def recorder(name):
            def data():
                seen.append((name, os.sched_getscheduler(0)))
                return b"recorded\n"
            return CommitJob(os.path.join(directory, name + ".tmp"), os.path.join(directory, name), data=data)

        first, gate = commitHeld(self, committer, directory, "first")  # the next two make up one batch
        big = CommitJob(os.path.join(directory, "b.tmp"), os.path.join(directory, "big"),
                        data=[b"x" * 65536] * (Committer.BIG_BATCH // 65536))
        self.assertEqual(big.size, Committer.BIG_BATCH)
        ds = [first, committer.commit(big), committer.commit(recorder("withBig"))]
        gate.set()
        yield defer.gatherResults(ds)
        yield committer.commit(recorder("alone"))
        self.assertEqual(seen, [("withBig", os.SCHED_OTHER), ("alone", os.SCHED_BATCH)])
        self.assertEqual(os.path.getsize(os.path.join(directory, "big")), Committer.BIG_BATCH)


class CrashTests(unittest.TestCase):
    """Kill -9 the real gateway and restart it: exactly the acknowledged mail arrives."""

    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = freePort()
        self.conf = os.path.join(self.dir, "relaygw.toml")
        with open(self.conf, "w") as f:
            f.write(configText(self.dir, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % self.port,
                "relay_networks": ["127.0.0.0/8"]},)))
        self.outbox = os.path.join(self.dir, "outbox", "new")
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.stdout.close()

    def start(self):
        p = runTwistd(self.conf, self.dir)
        self.procs.append(p)
        waitForPort(self.port)
        return p

    def subjects(self):
        found = []
        for n in os.listdir(self.outbox):
            with open(os.path.join(self.outbox, n), "rb") as f:
                data = f.read()
            found.append(data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode())
        return sorted(found)

    def waitDelivered(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.isdir(self.outbox) and len(os.listdir(self.outbox)) >= n:
                return
            time.sleep(0.05)

    def scenario(self):
        p = self.start()
        acked = [send(self.port, "acked-%d" % i) and "acked-%d" % i for i in range(5)]
        # A message cut off mid-DATA, then a hard kill right after a 250.
        pending = send(self.port, "never-acked", finish=False)
        acked.append("acked-last")
        send(self.port, "acked-last")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        pending.close()
        # Restart: recovery delivers what was acknowledged and never the rest.
        p2 = self.start()
        self.waitDelivered(len(acked))
        time.sleep(0.5)
        self.assertEqual(self.subjects(), sorted(acked))
        spool = os.path.join(self.dir, "spool")
        self.assertEqual(os.listdir(os.path.join(spool, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(spool, "queue")), [])
        p2.send_signal(signal.SIGTERM)
        p2.wait(20)

    def test_killMidDataAndAfterAck(self):
        return inThread(self.scenario)

    def configure(self, **relay):
        with open(self.conf, "w") as f:
            f.write(configText(self.dir, relay=dict(relay), listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % self.port,
                "relay_networks": ["127.0.0.0/8"]},)))

    def blockOutbox(self):
        os.rmdir(self.outbox)
        with open(self.outbox, "w") as f:  # "new" is a file: every delivery fails
            f.write("blocked")

    def unblockOutbox(self):
        os.unlink(self.outbox)
        os.mkdir(self.outbox)

    def waitDeferred(self, n, timeout=20):
        """Wait until C{n} progress records name a next attempt (each message deferred once)."""
        state = os.path.join(self.dir, "spool", "state")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = []
            for name in os.listdir(state):
                try:
                    with open(os.path.join(state, name)) as f:
                        records.append(json.load(f))
                except (OSError, ValueError):
                    pass
            if sum(1 for r in records if r.get("next_attempt")) >= n:
                return
            time.sleep(0.05)
        self.fail("%d messages not deferred within %ss" % (n, timeout))

    def test_restartKeepsRetryTimes(self):
        """
        Deferred mail waits for its recorded next attempt after a kill -9
        and restart, as Postfix's queue manager leaves deferred mail whose
        time has not come: a restart does not retry the whole queue at
        once.  A message accepted after the restart goes at once, and
        relaygw-queue flush sends the deferred ones at once.
        """

        def run():
            self.configure(retry_min=120, retry_max=120)
            p = self.start()
            self.blockOutbox()
            for i in range(3):
                send(self.port, "deferred-%d" % i)
            self.waitDeferred(3)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            self.unblockOutbox()
            p2 = self.start()
            send(self.port, "new")
            self.waitDelivered(1)
            time.sleep(2)
            self.assertEqual(self.subjects(), ["new"])
            subprocess.run([sys.executable, "-m", "relaygw.scripts.queue", "--config", self.conf, "flush"],
                           check=True, capture_output=True, timeout=30)
            self.waitDelivered(4)
            self.assertEqual(self.subjects(), ["deferred-0", "deferred-1", "deferred-2", "new"])
            p2.send_signal(signal.SIGTERM)
            p2.wait(20)

        return inThread(run)

    def test_recoveryDeliversSpooledMessages(self):
        """Messages still spooled at the kill (next hop broken) arrive after restart, at their retry time."""

        def run():
            self.configure(retry_min=1, retry_max=1)
            p = self.start()
            os.rmdir(self.outbox)
            with open(self.outbox, "w") as f:  # "new" is a file: every delivery fails
                f.write("blocked")
            for i in range(3):
                send(self.port, "spooled-%d" % i)
            time.sleep(0.5)
            queued = os.listdir(os.path.join(self.dir, "spool", "queue"))
            self.assertEqual(len(queued), 3)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            os.unlink(self.outbox)
            os.mkdir(self.outbox)
            p2 = self.start()
            self.waitDelivered(3)
            self.assertEqual(self.subjects(), ["spooled-0", "spooled-1", "spooled-2"])
            p2.send_signal(signal.SIGTERM)
            p2.wait(20)

        return inThread(run)


class AttemptFailureTests(unittest.TestCase):
    """An attempt that raises is retried later, not forgotten."""

    @defer.inlineCallbacks
    def test_retriedAfterError(self):
        from twisted.internet import task as _task

        from relaygw.relay.queue import QueueManager

        clock = _task.Clock()
        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"],
                              "context": {"connection": {}}})
        qid = yield w.commit()
        hop = RecordingHop()
        routed = []

        def router(message, rcpt):
            routed.append(rcpt)
            if len(routed) == 1:
                raise OSError("disk full")  # raised inside the attempt itself
            return hop

        q = QueueManager(spool, router, clock, retryMin=30)
        q.startService()
        logged = LogCapture(self)
        q.enqueue(qid)
        # (an OSError: one line, no traceback)
        self.assertEqual(len(logged.find("delivery attempt for {qid} failed: {error}", qid=qid, delay=30)), 1)
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        self.assertIn(qid, spool.queueIds())
        clock.advance(30)
        yield q.whenIdle()
        yield spool.committer.unlink([])  # let the removal reach the disk thread
        self.assertEqual(len(hop.calls), 1)
        self.assertEqual(len(routed), 2)
        self.assertEqual(spool.queueIds(), [])
        yield q.stopService()


class RecoveredRetryTimeTests(unittest.TestCase):
    """
    What a start does with each message already queued: it waits for the
    next attempt its progress record names, and goes at once when it was
    never tried, was in the middle of an attempt, or its record is garbled.
    """

    @defer.inlineCallbacks
    def test_eachRecoveredMessageAtItsTime(self):
        from relaygw.relay.queue import QueueManager

        clock = task.Clock()
        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        qids = {}
        for tag in ("fresh", "deferred", "underway", "garbled", "stepped"):
            w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net", "c@example.net"],
                                  "arrival": time.time(), "context": {"connection": {}}})
            w.write(b"Subject: " + tag.encode() + b"\r\n\r\nbody\r\n")
            qids[tag] = yield w.commit()
        now = time.time()
        done = {"b@example.net": {"status": "done", "result": "250 ok", "hop": "test"}}
        yield spool.writeState(qids["deferred"], {"rcpts": {}, "attempts": 1, "backoff": 1, "next_attempt": now + 100})
        yield spool.writeState(qids["underway"], {"rcpts": done, "attempts": 1, "backoff": 1, "next_attempt": None})
        # Written before the clock was set back by a day: held no longer than its back-off (300 s).
        yield spool.writeState(qids["stepped"], {"rcpts": {}, "attempts": 1, "backoff": 1,
                                                 "next_attempt": now + 86400})
        with open(spool.path("state", qids["garbled"]), "w") as f:
            f.write("{garbled")
        hop = RecordingHop()
        q = QueueManager(spool, lambda message, rcpt: hop, clock, retryMin=300)
        q.recovered = spool.open()
        logged = LogCapture(self)
        q.startService()
        yield q.whenIdle()

        def sent():
            return sorted(m.queueId for call in hop.calls for m in call)

        self.assertEqual(sent(), sorted([qids["fresh"], qids["underway"]]))
        self.assertEqual([m.recipients for call in hop.calls for m in call if m.queueId == qids["underway"]],
                         [["c@example.net"]])
        self.assertEqual(len(logged.find("{qid}: corrupt {path}: {reason}; moved to corrupt/", qid=qids["garbled"])),
                         1)
        clock.advance(99)
        self.assertEqual(len(hop.calls), 2)
        clock.advance(1)
        yield q.whenIdle()
        self.assertEqual(sent(), sorted([qids["fresh"], qids["underway"], qids["deferred"]]))
        clock.advance(200)
        yield q.whenIdle()
        self.assertEqual(sent(), sorted([qids["fresh"], qids["underway"], qids["deferred"], qids["stepped"]]))
        yield q.stopService()


class WorkerCountChangeTests(unittest.TestCase):
    """
    Changing [process] workers strands no message: worker 0 adopts what the
    layout it no longer uses holds (with its hold marker).
    """

    @defer.inlineCallbacks
    def queueOne(self, directory, tag, held=False):
        spool = Spool(directory, Committer(reactor))
        spool.open()
        w = spool.newMessage({"mailfrom": "%s@example.org" % tag, "mail_params": {},
                              "recipients": ["r@example.net"], "arrival": time.time(),
                              "context": {"connection": {}, "message": {}}})
        w.write(b"Subject: " + tag.encode() + b"\r\n\r\nbody\r\n")
        qid = yield w.commit()
        if held:
            open(spool.path("hold", qid), "w").close()
        return qid

    @defer.inlineCallbacks
    def start(self, directory, workers):
        gw = Gateway(directory, relay={"defer_all": True},
                     process={"workers": workers} if workers > 1 else None)
        yield gw.start()
        self.addCleanup(gw.stop)
        return gw.service.spool

    @defer.inlineCallbacks
    def test_toSeveralWorkers(self):
        directory = os.path.abspath(self.mktemp())
        qid = yield self.queueOne(os.path.join(directory, "spool"), "single", held=True)
        open(os.path.join(directory, "spool", "spent", "0ABC"), "w").close()  # a delivered message's file
        spool = yield self.start(directory, 2)
        self.assertEqual(os.listdir(os.path.join(directory, "spool", "spent")), [])
        self.assertEqual(spool.directory, os.path.join(directory, "spool", "w0"))
        self.assertEqual(spool.queueIds(), [qid])
        self.assertTrue(spool.isHeld(qid))
        self.assertEqual(os.listdir(os.path.join(directory, "spool", "queue")), [])

    @defer.inlineCallbacks
    def test_backToOneProcess(self):
        directory = os.path.abspath(self.mktemp())
        ids = []
        for worker in (0, 1):
            qid = yield self.queueOne(os.path.join(directory, "spool", "w%d" % worker), "w%d" % worker, held=True)
            ids.append(qid)
        spool = yield self.start(directory, 1)
        self.assertEqual(spool.queueIds(), sorted(ids))
        self.assertTrue(all(spool.isHeld(qid) for qid in ids))

    @defer.inlineCallbacks
    def test_nameTakenAlready(self):
        """
        A message in the layout no longer used whose id the spool has
        already (a copy of one queued there, a directory) is left where it
        is, with a warning: it neither stops the start nor replaces what
        is there.  The others are adopted.
        """
        directory = os.path.abspath(self.mktemp())
        base, stranded = os.path.join(directory, "spool"), os.path.join(directory, "spool", "w1")
        qid = yield self.queueOne(base, "base")
        done = b'{"rcpts":{"r@example.net":{"status":"done"}}}'
        with open(os.path.join(base, "state", qid), "wb") as f:
            f.write(done)
        os.makedirs(os.path.join(base, "queue", "JUNK"))
        other = yield self.queueOne(stranded, "stranded")
        shutil.copy(os.path.join(base, "queue", qid), os.path.join(stranded, "queue", qid))
        shutil.copy(os.path.join(base, "queue", qid), os.path.join(stranded, "queue", "JUNK"))
        with open(os.path.join(stranded, "state", qid), "w") as f:
            f.write("{}")
        warnings = []

        def observe(event):
            if event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        spool = yield self.start(directory, 1)
        self.assertEqual(spool.queueIds(), sorted(["JUNK", qid, other]))
        with open(spool.path("state", qid), "rb") as f:
            self.assertEqual(f.read(), done)  # (its own progress, not the copy's)
        self.assertTrue(os.path.isdir(spool.path("queue", "JUNK")))
        self.assertEqual(sorted(os.listdir(os.path.join(stranded, "queue"))), sorted(["JUNK", qid]))
        self.assertEqual(os.listdir(os.path.join(stranded, "state")), [qid])
        for area, name in (("state", qid), ("queue", "JUNK"), ("queue", qid)):
            self.assertIn("not adopting %s: the spool has a message %s already" % (
                os.path.join(stranded, area, name), name), warnings)


    @defer.inlineCallbacks
    def test_quarantinedUnderATakenNameAdoptedUnderAFreeOne(self):
        """
        What the layout no longer used set aside under a queue id this
        spool has set aside too (or under ID.1 ...) is adopted under the
        next free name, each with its progress record and reason, and
        nothing of this spool's own is replaced: all of it is listed.
        """
        directory = os.path.abspath(self.mktemp())
        base, stranded = os.path.join(directory, "spool"), os.path.join(directory, "spool", "w1")
        qid = yield self.queueOne(base, "base")
        yield self.queueOne(stranded, "stranded")
        files = {(base, qid): b"own", (base, qid + ".reason"): b'{"reason": "own", "time": 1}',
                 (stranded, qid): b"first", (stranded, qid + ".state"): b"first state",
                 (stranded, qid + ".reason"): b'{"reason": "first", "time": 2}',
                 (stranded, qid + ".1"): b"second", (stranded, qid + ".1.reason"): b'{"reason": "second", "time": 3}'}
        for (where, name), content in files.items():
            os.makedirs(os.path.join(where, "corrupt"), exist_ok=True)
            with open(os.path.join(where, "corrupt", name), "wb") as f:
                f.write(content)
        spool = yield self.start(directory, 1)

        def read(name):
            with open(spool.path("corrupt", name), "rb") as f:
                return f.read()

        self.assertEqual(os.listdir(os.path.join(stranded, "corrupt")), [])
        self.assertEqual({name: read(name) for name in os.listdir(spool.path("corrupt"))},
                         {qid: b"own", qid + ".reason": files[base, qid + ".reason"],
                          qid + ".1": b"first", qid + ".1.state": b"first state",
                          qid + ".1.reason": files[stranded, qid + ".reason"],
                          qid + ".2": b"second", qid + ".2.reason": files[stranded, qid + ".1.reason"]})
        self.assertEqual([(name, reason) for name, reason, _ in spool.corrupt()],
                         [(qid, "own"), (qid + ".1", "first"), (qid + ".2", "second")])


class LinkedOutsideTests(OutsideFiles, SpoolCase):
    """The gateway never follows a symbolic link planted in the spool."""

    def setUp(self):
        SpoolCase.setUp(self)
        self.outside = os.path.abspath(self.mktemp())
        os.makedirs(self.outside)

    @defer.inlineCallbacks
    def test_spentLinkNotOverwritten(self):
        """A symbolic link in spent/ is removed at start, never reused for a new message."""
        content = b'{"queue_id": "GONE"}\nprecious\n'
        target = self.outsideFile("target", content)
        os.symlink(target, self.spool.path("spent", "GONE"))
        reopened = Spool(self.dir, self.spool.committer)
        reopened.open()
        self.assertEqual(os.listdir(self.spool.path("spent")), [])
        w = reopened.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
        w.write(b"new\r\n")
        yield w.commit()
        self.assertContent(target, content)

    @defer.inlineCallbacks
    def test_queueAndStateLinksAreCorrupt(self):
        """A queue or state file that is a symbolic link is corrupt; quarantine moves the link itself."""
        qid = yield self.commitContent(b"x\r\n")
        with open(self.spool.path("queue", qid), "rb") as f:
            message = f.read()
        target = self.outsideFile("message", message)
        os.symlink(target, self.spool.path("queue", "LINK"))
        with self.assertRaises(CorruptMessage) as caught:
            self.spool.load("LINK")
        self.assertEqual((caught.exception.reason, caught.exception.path),
                         ("queue file is a symbolic link", self.spool.path("queue", "LINK")))
        state = self.outsideFile("state", b'{"rcpts": {}}')
        os.symlink(state, self.spool.path("state", qid))
        self.assertRaises(CorruptMessage, self.spool.readState, qid)
        reason = self.outsideFile("reason", b"precious")
        os.symlink(reason, self.spool.path("corrupt", "LINK.reason"))
        self.spool.quarantine("LINK", "a symbolic link")  # (set aside as LINK.1: LINK.reason is taken)
        self.assertTrue(os.path.islink(self.spool.path("corrupt", "LINK.1")))
        self.assertFalse(os.path.islink(self.spool.path("corrupt", "LINK.1.reason")))
        self.assertEqual([(name, why) for name, why, _ in self.spool.corrupt()], [("LINK", "unknown"),
                                                                                  ("LINK.1", "a symbolic link")])
        self.assertContent(target, message)
        self.assertContent(reason, b"precious")

    @defer.inlineCallbacks
    def test_gatewayQuarantinesALinkedMessage(self):
        gw = Gateway(self.mktemp())
        Spool(os.path.join(gw.directory, "spool"), None).open()
        target = self.outsideFile("message", b'{"mailfrom": "", "recipients": ["r@example.net"]}\nSECRET\r\n')
        os.symlink(target, os.path.join(gw.directory, "spool", "queue", "LINK"))
        yield gw.start()
        self.addCleanup(gw.stop)
        corrupt = os.path.join(gw.directory, "spool", "corrupt", "LINK")
        for _ in range(100):
            if os.path.lexists(corrupt):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(os.path.islink(corrupt))
        self.assertFalse(os.path.isdir(gw.outbox) and os.listdir(gw.outbox))
        self.assertContent(target, b'{"mailfrom": "", "recipients": ["r@example.net"]}\nSECRET\r\n')

    def refusedToStart(self, linked, **config):
        """
        twistd on a spool where C{linked} (a path under C{spool/}) is a
        symbolic link to the outside directory: it exits 1 with one line
        naming it, no traceback, and nothing is made outside.
        """
        directory = os.path.abspath(self.mktemp())
        spool = os.path.join(directory, "spool")
        os.makedirs(os.path.dirname(os.path.join(spool, linked)))
        os.symlink(self.outside, os.path.join(spool, linked))
        conf = os.path.join(directory, "relaygw.toml")
        with open(conf, "w") as f:
            f.write(configText(directory, **config))

        def run():
            p = runTwistd(conf, directory)
            try:
                output = p.communicate(timeout=60)[0].decode()
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return p.returncode, output

        def check(result):
            code, output = result
            self.assertEqual(code, 1, output)
            # (The config check's line for an area, the spool's own for a partition.)
            self.assertIn("%s is a symbolic link, not a directory" % os.path.join(spool, linked), output)
            self.assertNotIn("Traceback", output)
            self.assertEqual(os.listdir(self.outside), [])

        return inThread(run).addCallback(check)

    def test_gatewayRefusesALinkedArea(self):
        return self.refusedToStart("hold")

    def test_gatewayRefusesALinkedPartition(self):
        """With several workers, a partition (w0/) that is a link is refused too (before: its lock made outside)."""
        return self.refusedToStart("w0", process={"workers": 2})


class JunkDirectoryTests(SpoolCase):
    """A directory where the spool expects a file never stops the gateway: it is left alone or set aside."""

    def setUp(self):
        SpoolCase.setUp(self)
        self.warnings = []

        def observe(event):
            if event.get("log_level") == LogLevel.warn:
                self.warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_openLeavesDirectoriesAlone(self):
        junk = [self.spool.path(area, "JUNK") for area in ("tmp", "spent", "state", "hold")]
        for path in junk:
            os.makedirs(path)
        reopened = Spool(self.dir, self.spool.committer)
        self.assertEqual(reopened.open(), [])
        self.assertTrue(all(os.path.isdir(path) for path in junk))
        self.assertEqual(self.warnings, ["%s is a directory, not a spool file: left alone" % path for path in junk])
        reopened.clearStrayHolds()  # (warned once)
        self.assertEqual(len(self.warnings), 4)

    @defer.inlineCallbacks
    def test_gatewayStartsAndSetsADirectoryAside(self):
        gw = Gateway(self.mktemp())
        spool = os.path.join(gw.directory, "spool")
        Spool(spool, None).open()
        for path in ("hold/HDIR", "state/SDIR", "queue/QDIR"):
            os.makedirs(os.path.join(spool, path))
        yield gw.start()
        self.addCleanup(gw.stop)
        for _ in range(100):
            if os.path.isdir(os.path.join(spool, "corrupt", "QDIR")):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(gw.service.running)
        self.assertEqual(os.listdir(os.path.join(spool, "queue")), [])
        self.assertTrue(os.path.isdir(os.path.join(spool, "corrupt", "QDIR")))
        self.assertTrue(os.path.isdir(os.path.join(spool, "hold", "HDIR")))
        self.assertIn("%s is a directory, not a spool file: left alone" % os.path.join(spool, "hold", "HDIR"),
                      self.warnings)


class ReleaseMarkerTests(SpoolCase):
    """A release or deletion marker is for a message: one whose name names none is removed and does nothing."""

    MARKERS = ("release.", "release..", "release...", "deleted.", "deleted..", "held.", "held..", "released...")

    def setUp(self):
        SpoolCase.setUp(self)
        for name in self.MARKERS:
            open(os.path.join(self.dir, name), "w").close()

    def test_taken(self):
        self.assertEqual(self.spool.takeRequests(), (False, [], [], [], []))
        self.assertEqual([name for name in os.listdir(self.dir) if name.startswith(("release", "deleted.", "held."))],
                         [])

    @defer.inlineCallbacks
    def test_holdAndReleaseTold(self):
        """
        A hold and a release are told to the queue manager (for the mail
        log), once each: a message held already is not held again; a
        release is an attempt now as well, a flush of one message only that.
        """
        qid = yield self.commitContent(b"x\r\n")
        other = yield self.commitContent(b"y\r\n")
        self.assertTrue(self.spool.hold(qid))
        self.assertTrue(self.spool.hold(qid))
        self.spool.requestFlush(other)
        requests = self.spool.takeRequests()
        self.assertEqual((requests.flushAll, requests.flushed, requests.held, requests.released, requests.deleted),
                         (False, [other], [qid], [], []))
        self.assertTrue(self.spool.release(qid))
        self.assertFalse(self.spool.release(qid))
        self.assertEqual(self.spool.takeRequests(), (False, [], [], [qid], []))
        self.assertEqual(self.spool.takeRequests(), (False, [], [], [], []))

    @defer.inlineCallbacks
    def test_areasLeftAlone(self):
        """
        The empty name and the directory entries are no queue ids: the
        queue manager never takes C{queue/} itself for a message, and sets
        no area (C{state/} with every progress record) aside as corrupt.
        """
        from relaygw.relay.queue import QueueManager

        qid = yield self.commitContent(b"Subject: x\r\n\r\nbody\r\n")
        yield self.spool.writeState(qid, {"rcpts": {}, "attempts": 1, "next_attempt": time.time() + 3600})
        hop = RecordingHop()
        q = QueueManager(self.spool, lambda m, r: hop, task.Clock(), retryMin=3600)
        q.startService()
        q.requests.poll()
        yield q.whenIdle()
        self.assertEqual(sorted(os.listdir(self.spool.path("state"))), [qid])
        self.assertEqual(os.listdir(self.spool.path("corrupt")), [])
        self.assertEqual(self.spool.queueIds(), [qid])
        self.assertEqual(hop.calls, [])
        yield q.stopService()


class SpentDirectoryTests(SpoolCase):
    """A directory in spent/ under a queued message's name: the message leaves the spool once all the same."""

    @defer.inlineCallbacks
    def test_deliveredOnce(self):
        from relaygw.relay.queue import QueueManager

        qid = yield self.commitContent(b"Subject: x\r\n\r\nbody\r\n")
        os.makedirs(self.spool.path("spent", qid + "/inner"))
        spool = Spool(self.dir, self.spool.committer)  # (as at a start: what spent/ holds is read)
        hop, clock = RecordingHop(), task.Clock()
        q = QueueManager(spool, lambda m, r: hop, clock, retryMin=30)
        q.recovered = spool.open()
        q.startService()
        self.addCleanup(q.stopService)
        yield q.whenIdle()
        for _ in range(3):
            clock.advance(30)
            yield q.whenIdle()
        self.assertEqual(len(hop.calls), 1)
        self.assertEqual(spool.queueIds(), [])
        self.assertTrue(os.path.isdir(spool.path("spent", qid + "/inner")))
        self.assertEqual(self.flushLoggedErrors(), [])
        w = spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})  # (not written over the directory)
        w.write(b"Subject: y\r\n\r\nbody\r\n")
        yield w.commit()

    def test_removeOrKeep(self):
        """A file to keep under a name a directory has is removed instead."""
        from relaygw.durable import removeOrKeep

        path, keep = self.spool.path("queue", "Q"), self.spool.path("spent", "Q")
        open(path, "w").close()
        os.makedirs(os.path.join(keep, "inner"))
        self.assertIsNone(removeOrKeep([path], keep))
        self.assertFalse(os.path.exists(path))
        self.assertTrue(os.path.isdir(os.path.join(keep, "inner")))
