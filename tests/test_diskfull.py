"""
Disk full is a 4xx, never a crash: min_free_space refuses MAIL, a write
that fails during DATA or at commit answers 452 4.3.1 after the whole
content was read, nothing is left half-written, and /healthz says why.
The fault-injection tests make every spool write path fail in turn; the
tmpfs test fills a real 2 MB file system.
"""

import ctypes
import errno
import os
import signal
import subprocess
import urllib.error
import urllib.request

from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from relaygw import durable, workers
from relaygw.ring import Ring
from relaygw.ringcommit import RingCommitter
from relaygw.relay import outcome
from relaygw.scripts import queue as tool
from relaygw.service import StartFailed
from relaygw.spool import Spool
from relaygw.testing import Client, Gateway, configText, freePort, inThread, twistdRunning, waitForPort
from tests.processes import waitUntil
from tests.recorders import LogCapture
from tests.relaysetup import RelayTestCase

BIG = 300 * 1024  # over MessageWriter.SPILL: streamed to tmp/ as it arrives
SMALL = 20 * 1024  # written at commit


def content(size, tag="x"):
    """A message of about C{size} octets, in 1000-octet lines."""
    line = (tag * 998)[:998] + "\r\n"
    return "Subject: %s\r\n\r\n" % tag + line * max(1, size // 1000)


def transaction(port, size, tag="x", mailArgs=""):
    """One message over a raw socket: the replies to MAIL and to the final dot (None if not reached)."""
    c = Client(port, timeout=20)
    try:
        c.reply()
        c.cmd("EHLO diskfull.test")
        mail = c.cmd("MAIL FROM:<a@example.org>" + mailArgs)
        if mail[0] != 250:
            return mail, None
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(content(size, tag) + ".\r\n")
        end = c.reply()
        # The session goes on: the client may try again later.
        assert c.cmd("RSET")[0] == 250
        c.cmd("QUIT")
        return mail, end
    finally:
        c.close()


def failing(original, error, calls=None, once=False):
    """
    C{original}, except that it raises C{OSError(error)} (and counts the
    calls) while armed; C{once}: it disarms itself after one failure.
    """

    def wrapper(*args, **kw):
        if wrapper.armed:
            if calls is not None:
                calls.append(args)
            wrapper.armed = not once
            raise OSError(error, os.strerror(error))
        return original(*args, **kw)

    wrapper.armed = True
    return wrapper


def failReportCommits(testcase, spool, times=1):
    """
    The commits of the gateway's own reports (bounces and success notices,
    a null sender) fail with ENOSPC: the first write of each of the first
    C{times} of them.  Returns the list of the failed writes.
    """
    faults = []
    fault = failing(durable.quick.write, errno.ENOSPC, faults, once=True)
    fault.armed = False
    testcase.patch(durable.quick, "write", fault)
    newMessage = spool.newMessage

    def failingReport(envelope):
        if envelope.mailfrom == "":
            fault.armed = len(faults) < times
        return newMessage(envelope)

    testcase.patch(spool, "newMessage", failingReport)
    return faults


def refuseQueueRemovals(testcase, error, times):
    """
    A queue file's removal (its rename to spent/, or an unlink) fails with
    C{error} C{times} times; returns the list of the paths refused so far.
    """
    faults = []

    def refusing(original):
        def call(path, *args):
            if "%squeue%s" % (os.sep, os.sep) in path and len(faults) < times:
                faults.append(path)
                raise OSError(error, os.strerror(error))
            return original(path, *args)
        return call

    testcase.patch(durable.quick, "rename", refusing(durable.quick.rename))
    testcase.patch(os, "unlink", refusing(os.unlink))
    return faults


def get(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ringFailing(error):
    """L{Ring.completions}, except that every result is C{-error} while armed."""
    real = Ring.completions

    def completions(ring):
        results = real(ring)
        if completions.armed and results:
            completions.calls.append(results)
            return [(tag, -error) for tag, _ in results]
        return results

    completions.armed, completions.calls = True, []
    return completions


class FaultCase(RelayTestCase):
    """A gateway whose spool's write paths fail with ENOSPC or EIO in turn (L{check})."""

    #: Whether the spool syncs through io_uring (the default) or in a disk thread.
    ring = True

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"defer_all": True}, admin={"endpoint": "tcp:0:interface=127.0.0.1"},
                          spool={"min_free_space": 0, "io_uring": self.ring})
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.spool = self.gw.service.spool
        self.assertIsInstance(self.spool.committer, RingCommitter if self.ring else durable.Committer)

    def leftovers(self):
        return {area: sorted(os.listdir(self.spool.path(area))) for area in ("tmp", "queue")}

    @defer.inlineCallbacks
    def check(self, size, name, error, obj=durable, fault=None):
        """
        Inject C{error} into C{obj.name} (or make C{fault}, with its
        C{calls}, C{obj.name}); a message of C{size} gets 452 4.3.1, then
        one goes through.
        """
        calls = []
        if fault is None:
            fault = failing(getattr(obj, name), error, calls)
        else:
            calls = fault.calls
        self.patch(obj, name, fault)
        mail, end = yield inThread(transaction, self.gw.port, size)
        self.assertEqual(mail[0], 250)
        self.assertEqual(end, (452, ["4.3.1 Insufficient system storage"]))
        self.assertTrue(calls, "the fault was never reached")
        self.assertEqual(self.leftovers(), {"tmp": [], "queue": []})  # nothing half-written
        status, body = yield inThread(get, self.gw.adminPort, "/healthz")
        self.assertEqual(status, 503)
        self.assertTrue(body.startswith("spool write failed 0s ago: [Errno %d] " % error), body)
        room = self.spool.room
        room.lastStorageError = (room.lastStorageError[0] - 31, room.lastStorageError[1])
        self.assertEqual((yield inThread(get, self.gw.adminPort, "/healthz")), (200, "ok\n"))
        fault.armed = False
        mail, end = yield inThread(transaction, self.gw.port, size, "y")
        self.assertEqual(end[0], 250, end)
        [qid] = self.spool.queueIds()
        self.assertEqual(end[1], ["2.0.0 Ok: queued as %s" % qid])
        m = self.spool.load(qid)
        with m.openBody() as f:
            body = f.read()
        self.assertEqual(len(body), m.size)
        self.assertTrue(body.endswith(content(size, "y").encode()))
        self.assertEqual(self.leftovers()["tmp"], [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)  # logged as one line each, no traceback

    def test_commitWriteENOSPC(self):
        """A small message is written at commit: that fails."""
        return self.check(SMALL, "write", errno.ENOSPC, obj=durable.quick)

    def test_commitRenameEIO(self):
        """Renaming the durable file into queue/ fails."""
        return self.check(SMALL, "rename", errno.EIO, obj=durable.quick)

    @defer.inlineCallbacks
    def test_commitOutOfDescriptors(self):
        """
        The process is out of descriptors when it opens the file at commit:
        451 4.3.0 with one error line (no critical traceback), nothing left
        behind, and the next message goes through.
        """
        calls = []
        fault = failing(durable.quick.open, errno.EMFILE, calls)
        self.patch(durable.quick, "open", fault)
        mail, end = yield inThread(transaction, self.gw.port, SMALL)
        self.assertEqual(end, (451, ["4.3.0 Error: local error in processing"]))
        self.assertTrue(calls)
        self.assertEqual(self.leftovers(), {"tmp": [], "queue": []})
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        fault.armed = False
        mail, end = yield inThread(transaction, self.gw.port, SMALL, "y")
        self.assertEqual(end[0], 250, end)

    @defer.inlineCallbacks
    def test_spillOpenOutOfDescriptors(self):
        """
        The process is out of descriptors when a large message's content
        is to be streamed to tmp/: 451 4.3.0, as at commit (it was 452 4.3.1
        Insufficient system storage, which the disk was not), with one
        error line, nothing left behind, and the next message goes through.
        """
        calls = []
        fault = failing(os.open, errno.EMFILE, calls)
        self.patch(os, "open", fault)
        mail, end = yield inThread(transaction, self.gw.port, BIG)
        self.assertEqual(end, (451, ["4.3.0 Error: local error in processing"]))
        self.assertTrue(calls)
        self.assertEqual(self.leftovers(), {"tmp": [], "queue": []})
        self.assertIsNone(self.spool.recentStorageError(30))
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        fault.armed = False
        mail, end = yield inThread(transaction, self.gw.port, BIG, "y")
        self.assertEqual(end[0], 250, end)

    @defer.inlineCallbacks
    def test_reusedSpentFileENOSPC(self):
        """A small message overwriting a spent file fails: the spent file goes, nothing is queued."""
        spent = self.spool.path("spent", "0000000000000000SPENT")
        with open(spent, "wb") as f:
            f.write(b"old content")
        self.spool.spent.names.append("0000000000000000SPENT")
        yield self.check(SMALL, "write", errno.ENOSPC, obj=durable.quick)
        self.assertFalse(os.path.exists(spent))

    @defer.inlineCallbacks
    def test_closeInterrupted(self):
        """
        Closing the synced file at commit says EINTR: Linux has let the
        descriptor go all the same, and the content is durable already, so
        the message is queued and gets its 250 (it got 451 4.3.0 with a
        critical traceback).
        """
        if durable.quick._libc is None:
            raise unittest.SkipTest("no libc: os.close")
        calls = []

        def close(fd):
            if calls:
                return real(fd)
            calls.append(fd)
            os.close(fd)
            ctypes.set_errno(errno.EINTR)
            return -1

        real = durable.quick._libc.close
        self.patch(durable.quick._libc, "close", close)
        mail, end = yield inThread(transaction, self.gw.port, SMALL)
        self.assertTrue(calls, "the fault was never reached")
        [qid] = self.spool.queueIds()
        self.assertEqual(end, (250, ["2.0.0 Ok: queued as %s" % qid]))
        self.assertEqual(self.leftovers(), {"tmp": [], "queue": [qid]})
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class DiskThreadFaultTests(FaultCase):
    """The commit's write paths failing with the spool synced in a disk thread (C{io_uring = false})."""

    ring = False

    def test_commitSyncEIO(self):
        """The sync that makes the batch durable fails."""
        self.patch(durable, "_syncfs", lambda fd: False)  # one fsync per file
        return self.check(SMALL, "fsync", errno.EIO, obj=os)

    def test_directorySyncEIO(self):
        """
        The sync of queue/ after the renames fails: the name is taken back,
        so the message answered 452 is not queued (and delivered) after all.
        """
        return self.check(SMALL, "fsyncDirectory", errno.EIO)


class FaultInjectionTests(FaultCase):
    """Each spool write path fails with ENOSPC or EIO in turn (the spool synced through io_uring)."""

    def test_commitSyncEIO(self):
        """The kernel's sync of the batch (through the ring) fails."""
        return self.check(SMALL, "completions", errno.EIO, obj=Ring, fault=ringFailing(errno.EIO))

    @defer.inlineCallbacks
    def checkSubmitRefused(self, error):
        """
        The kernel cannot take the batch's syncs for now (io_uring_enter
        says C{error}): 451 4.3.0 with one error line, as when out of memory
        (it was a critical traceback), nothing left behind, and the next
        message goes through on a new ring.
        """
        calls = []
        fault = failing(Ring.submit, error, calls, once=True)
        self.patch(Ring, "submit", fault)
        mail, end = yield inThread(transaction, self.gw.port, SMALL)
        self.assertEqual(end, (451, ["4.3.0 Error: local error in processing"]))
        self.assertTrue(calls)
        self.assertEqual(self.leftovers(), {"tmp": [], "queue": []})
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        mail, end = yield inThread(transaction, self.gw.port, SMALL, "y")
        self.assertEqual(end[0], 250, end)

    def test_submitEAGAIN(self):
        """Out of resources for the requests."""
        return self.checkSubmitRefused(errno.EAGAIN)

    def test_submitEBUSY(self):
        """Completions not reaped yet."""
        return self.checkSubmitRefused(errno.EBUSY)

    def test_spillWriteENOSPC(self):
        """A message over 256 KB (which once got no reply at all) while the disk fills as it streams."""
        return self.check(BIG, "writeAll", errno.ENOSPC)

    def test_spillWriteEIO(self):
        return self.check(BIG, "writeAll", errno.EIO)

    def test_spillOpenENOSPC(self):
        """Creating tmp/ID for the streamed content fails."""
        return self.check(BIG, "open", errno.ENOSPC, obj=os)

    def test_commitHeaderEIO(self):
        """Writing the content's size into the envelope line at commit fails."""
        return self.check(BIG, "pwrite", errno.EIO, obj=os)

    @defer.inlineCallbacks
    def test_belowMinFreeSpace(self):
        """
        MAIL gets 452 4.3.1 below min_free_space, counting SIZE=; /healthz
        says 503 with the reason; /metrics has the free bytes.
        """
        free = 10 * 1024 * 1024
        self.patch(self.spool.room, "freeSpace", lambda: free)
        self.spool.minFree = free - 5000
        mail, end = yield inThread(transaction, self.gw.port, SMALL, mailArgs=" SIZE=4000")
        self.assertEqual(mail[0], 250)
        self.assertEqual(end[0], 250)
        mail, end = yield inThread(transaction, self.gw.port, SMALL, mailArgs=" SIZE=6000")
        self.assertEqual((mail, end), ((452, ["4.3.1 Insufficient system storage"]), None))
        status, body = yield inThread(get, self.gw.adminPort, "/healthz")
        self.assertEqual((status, body), (200, "ok\n"))
        status, body = yield inThread(get, self.gw.adminPort, "/metrics")
        [gauge] = [l for l in body.splitlines() if l.startswith("relaygw_spool_free_bytes ")]
        self.assertEqual(float(gauge.split()[1]), free)
        self.spool.minFree = free + 1
        mail, end = yield inThread(transaction, self.gw.port, SMALL)
        self.assertEqual((mail, end), ((452, ["4.3.1 Insufficient system storage"]), None))
        status, body = yield inThread(get, self.gw.adminPort, "/healthz")
        self.assertEqual((status, body), (503, "spool low on space: %d bytes free, min_free_space %d\n" % (
            free, free + 1)))
        self.assertEqual(len(self.spool.queueIds()), 1)


class NextHopWriteTests(RelayTestCase):
    """The write paths behind the queue manager: the Maildir next hop and a bounce."""

    def armOnceAccepted(self, fault):
        """
        Arm C{fault} once a message is accepted (accepting needs the disk's
        writes too): what is written next is the queue manager's.
        """
        fault.armed = False
        factory = self.gw.service.factories[0]
        original = factory.onQueued

        def armThenEnqueue(qid, message):
            fault.armed = True
            return original(qid, message)

        self.patch(factory, "onQueued", armThenEnqueue)

    @defer.inlineCallbacks
    def test_maildirWriteENOSPC(self):
        """The Maildir can't be written: the message stays queued, deferred, and arrives once later."""
        yield self.gateway({})
        fault = failing(durable.quick.write, errno.ENOSPC)
        self.patch(durable.quick, "write", fault)
        self.patch(self.gw.service.queue, "retryMin", 0.2)
        self.patch(self.gw.service.queue, "retryMax", 0.2)
        self.armOnceAccepted(fault)
        qid = yield self.send()
        spool = self.gw.service.spool
        # The progress record can't be written either: the queue manager
        # keeps it in memory until it can.
        queue = self.gw.service.queue
        yield self.until(lambda: queue.progress.get(qid, {}).get("attempts", 0) >= 1)
        entry = queue.progress[qid]["rcpts"]["b@example.net"]
        self.assertEqual(entry["status"], "deferred")
        self.assertIn("No space left on device", entry["result"])
        self.assertEqual(os.listdir(os.path.join(self.gw.directory, "outbox", "tmp")), [])  # nothing half-written
        fault.armed = False
        yield self.until(lambda: not spool.queueIds())
        self.assertEqual(len(self.gw.delivered()), 1)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_stateWriteENOSPC(self):
        """A progress record can't be written: no partial file, the message intact, the record written later."""
        hop, port = self.hop(rcpt={"b@example.net": "451 4.3.0 not now"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        calls = []
        fault = failing(durable.quick.write, errno.ENOSPC, calls)
        self.patch(durable.quick, "write", fault)
        self.armOnceAccepted(fault)
        qid = yield self.send()
        spool = self.gw.service.spool
        yield self.until(lambda: calls and not self.gw.service.queue.active)
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 1)
        self.assertEqual(os.listdir(spool.path("state")), [])  # nothing half-written
        self.assertEqual(os.listdir(spool.path("tmp")), [])
        self.assertEqual(spool.load(qid).recipients, ["b@example.net"])
        fault.armed = False
        yield self.until(lambda: spool.readState(qid).get("attempts") == 1, timeout=20)
        self.assertEqual(spool.readState(qid)["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 1)  # not re-sent meanwhile
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_provisionalRecordENOSPCKeepsTheBounce(self):
        """
        One recipient delivered, one refused for good: the progress record
        that must be durable before the bounce is queued can't be written.
        The message stays (it is not removed with its bounce never queued),
        and once the disk has room the bounce goes out, once, and the
        delivered recipient is not sent to again.
        """
        hop, port = self.hop(rcpt={"b@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        queue = self.gw.service.queue
        self.patch(queue, "retryMin", 0.3)
        spool = self.gw.service.spool
        faults = []
        fault = failing(durable.quick.write, errno.ENOSPC, faults)
        self.patch(durable.quick, "write", fault)
        self.armOnceAccepted(fault)
        qid = yield self.send(rcpts=("c@example.net", "b@example.net"))
        yield self.until(lambda: faults and not queue.active)
        self.assertIn(qid, spool.queueIds())
        self.assertEqual([t for t in hop.transactions if t["mailfrom"] == ""], [])
        fault.armed = False
        yield self.until(lambda: not spool.queueIds(), timeout=10)
        bounces = [t for t in hop.transactions if t["mailfrom"] == ""]
        self.assertEqual([t["rcpts"] for t in bounces], [["a@example.org"]])
        self.assertEqual(hop.lines.count("RCPT TO:<c@example.net>"), 1)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_removalFailsAfterDelivery(self):
        """
        The message is delivered, then its queue file cannot be removed
        (EROFS, three times: the spool gone read-only): it is not sent
        again at the retries, which remove it once the spool lets them.
        Before, the retry read the record on disk, which did not say the
        recipients were done, and sent the message again at every retry.
        """
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        self.patch(self.gw.service.queue, "retryMin", 0.2)
        spool = self.gw.service.spool
        faults = refuseQueueRemovals(self, errno.EROFS, 3)
        logged = LogCapture(self)
        qid = yield self.send(rcpts=("b@example.net", "c@example.net"))
        yield self.until(lambda: len(faults) == 3 and not spool.queueIds(), timeout=10)
        self.assertEqual(len(hop.transactions), 1)
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 1)
        self.assertEqual(len(logged.find("delivery attempt for {qid} failed: {error}", qid=qid)), 3)
        self.assertEqual(len(logged.find("{qid}: removed", qid=qid)), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_removalFailsThenStop(self):
        """
        The message is delivered at its first attempt, then its queue file
        cannot be removed (EIO), and the gateway stops before the retry: the
        stop writes down that its recipient is done, so the next start
        removes it rather than send it again.  Before, the record stayed in
        memory only, and the next start sent the message a second time.
        """
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        queue = self.gw.service.queue
        self.patch(queue, "retryMin", 60)
        spool = self.gw.service.spool
        faults = refuseQueueRemovals(self, errno.EIO, 1)
        qid = yield self.send()
        yield self.until(lambda: faults and not queue.active)
        self.assertEqual(spool.queueIds(), [qid])
        yield self.gw.stop()
        self.assertEqual(len(hop.transactions), 1)
        self.assertEqual(outcome.pending(spool.readState(qid), ["b@example.net"]), [])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_bounceWriteENOSPC(self):
        """The bounce can't be queued: the original stays, and bounces once the disk has room."""
        hop, port = self.hop(rcpt={"b@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        queue = self.gw.service.queue
        self.patch(queue, "retryMin", 0.3)
        spool = self.gw.service.spool
        faults = failReportCommits(self, spool)
        qid = yield self.send()
        yield self.until(lambda: faults)
        self.assertIn(qid, spool.queueIds())  # kept: its bounce is not durable yet
        # Retried after retry_min: bounced again, and this time the bounce is queued (and relayed).
        yield self.until(lambda: not spool.queueIds(), timeout=10)
        bounces = [t for t in hop.transactions if t["mailfrom"] == ""]
        self.assertEqual([t["rcpts"] for t in bounces], [["a@example.org"]])
        self.assertEqual(hop.lines.count("RCPT TO:<b@example.net>"), 2)
        self.assertEqual(len(faults), 1)
        self.assertEqual(os.listdir(spool.path("tmp")), [])
        self.flushLoggedErrors()


class SpoolMovedTests(RelayTestCase):
    """
    The spool directory renamed away while the gateway runs, and back: a
    message not found then has not gone.  It is neither taken as removed
    nor as deleted by the operator, and goes out once, when it is back.
    """

    def moveAway(self):
        spool = self.gw.service.spool.directory
        os.rename(spool, spool + ".moved")
        return lambda: os.rename(spool + ".moved", spool)

    @defer.inlineCallbacks
    def test_acceptedWhileAway(self):
        """
        A message that ends while the spool is away cannot be queued: 451
        4.3.0 (its commit fails with ENOENT, a small message's as a large
        one's), logged as one line naming the error, not as a critical
        traceback; once the spool is back, mail is queued again.
        """
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        logged = LogCapture(self)
        back = self.moveAway()
        ends = []
        for size in (SMALL, BIG):
            mail, end = yield inThread(transaction, self.gw.port, size)
            ends.append(end)
        back()
        self.assertEqual(ends, [(451, ["4.3.0 Error: local error in processing"])] * 2)
        self.assertEqual(self.flushLoggedErrors(), [])
        failed = [formatEvent(e) for e in logged.find("spool ")]
        self.assertEqual(len(failed), 2, failed)
        for line in failed:
            self.assertIn("[Errno 2] No such file or directory: ", line)
        mail, end = yield inThread(transaction, self.gw.port, SMALL)
        self.assertEqual(end[0], 250)
        yield self.until(lambda: len(hop.transactions) == 1)

    @defer.inlineCallbacks
    def test_spentRemovedByHand(self):
        """
        spent/ removed by hand while the gateway runs: the messages that
        come next are queued in new files, rather than each refused 451
        4.3.0 for a spent file it could not open, until none was left.
        """
        import shutil

        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        spool = self.gw.service.spool
        for i in range(3):
            yield self.send(subject="s%d" % i)
            yield self.until(lambda: not spool.queueIds() and len(os.listdir(spool.path("spent"))) == 1)
        shutil.rmtree(spool.path("spent"))
        for i in range(3):
            mail, end = yield inThread(transaction, self.gw.port, SMALL, "t%d" % i)
            self.assertEqual(end[0], 250, end)
        yield self.until(lambda: len(hop.transactions) == 6 and not spool.queueIds())
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_progressAwayWhenRetried(self):
        """
        A retry that finds the progress records' directory away does not
        take the message for one without progress (and send again to the
        recipients already done): it waits, and goes on once it is back.
        """
        hop, port = self.hop(rcpt={"c@example.net": ["451 4.3.0 not yet", "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        spool = self.gw.service.spool
        logged = LogCapture(self)
        qid = yield self.send(rcpts=("b@example.net", "c@example.net"))
        yield self.until(lambda: spool.readState(qid).get("attempts") == 1)
        os.rename(spool.path("state"), spool.path("state") + ".moved")
        yield self.until(lambda: logged.find("delivery attempt for {qid} failed: {error}", qid=qid))
        os.rename(spool.path("state") + ".moved", spool.path("state"))
        yield self.until(lambda: not spool.queueIds())
        self.assertEqual([t["rcpts"] for t in hop.transactions], [["b@example.net"], ["c@example.net"]])
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_progressOverAStaleTemporaryFile(self):
        """
        A progress record's temporary file left behind (a write that failed
        while the spool was away could not remove it) does not stop every
        later record of that message: it is written over.
        """
        hop, port = self.hop(rcpt={"b@example.net": ["451 4.3.0 not yet", "451 4.3.0 not yet", "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 1, "retry_max": 1})
        spool = self.gw.service.spool
        logged = LogCapture(self)
        qid = yield self.send()
        yield self.until(lambda: spool.readState(qid).get("attempts") == 1)
        with open(spool.path("state", qid) + ".tmp", "wb") as f:
            f.write(b"left behind" * 100)
        yield self.until(lambda: spool.readState(qid).get("attempts") == 2)
        yield self.until(lambda: not spool.queueIds())
        self.assertEqual(logged.find("cannot write delivery progress"), [])
        self.assertEqual(len(hop.transactions), 1)

    @defer.inlineCallbacks
    def test_removedWhileAway(self):
        """
        Delivered while the spool is away, the message's removal fails
        (one line, retried), rather than being taken as done with its file
        left in queue/: it is removed once the spool is back, and not sent
        again.
        """
        hop, port = self.hop(endOfDataDelay=0.5)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        spool = self.gw.service.spool
        logged = LogCapture(self)
        qid = yield self.send()
        yield self.until(lambda: hop.transactions)
        back = self.moveAway()
        yield self.until(lambda: logged.find("delivery attempt for {qid} failed: {error}", qid=qid))
        self.assertEqual(logged.find("{qid}: removed", qid=qid), [])
        back()
        yield self.until(lambda: not spool.queueIds())
        yield self.until(lambda: logged.find("{qid}: removed", qid=qid))
        self.assertEqual(os.listdir(spool.path("state")), [])
        self.assertEqual(len(hop.transactions), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_retriedWhileAway(self):
        """
        A deferred message whose retry comes while the spool is away is
        not forgotten as deleted: it waits (one line), and is delivered
        once the spool is back.
        """
        hop, port = self.hop(rcpt={"b@example.net": ["451 4.3.0 not yet", "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        spool = self.gw.service.spool
        logged = LogCapture(self)
        qid = yield self.send()
        yield self.until(lambda: spool.readState(qid).get("attempts") == 1)
        back = self.moveAway()
        yield self.until(lambda: logged.find("delivery attempt for {qid} failed: {error}", qid=qid))
        back()
        yield self.until(lambda: hop.transactions, timeout=10)
        yield self.until(lambda: not spool.queueIds())
        self.assertEqual([t["rcpts"] for t in hop.transactions], [["b@example.net"]])
        self.assertEqual(len(logged.find("{qid}: removed", qid=qid)), 1)
        self.assertEqual(self.flushLoggedErrors(), [])


def isRoot():
    return os.geteuid() == 0


class TmpfsTests(unittest.TestCase):
    """
    A real 2 MB tmpfs (1,024 inodes) as the spool: it fills up, every
    message gets a reply (250 or 452 4.3.1), nothing crashes, and every
    queued message reads back whole.
    """

    timeout = 120

    def setUp(self):
        if not isRoot():
            raise unittest.SkipTest("mounting a tmpfs needs root")
        self.mount = os.path.abspath(self.mktemp())
        os.makedirs(self.mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=1024", "tmpfs", self.mount], check=True,
                       timeout=30)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mount], timeout=30)

    @defer.inlineCallbacks
    def gateway(self, minFree):
        gw = Gateway(self.mount, listeners=({"relay_networks": ["127.0.0.0/8"]},), relay={"defer_all": True},
                     admin={"endpoint": "tcp:0:interface=127.0.0.1"}, spool={"min_free_space": minFree})
        yield gw.start()
        self.addCleanup(gw.stop)
        return gw

    @defer.inlineCallbacks
    def fill(self, gw, sizes):
        """Send messages of C{sizes} in turn (on the reactor's thread pool); the replies."""
        replies = []
        for i, size in enumerate(sizes):
            mail, end = yield inThread(transaction, gw.port, size, "m%d" % i)
            replies.append((size, mail[0], end and end[0], end and end[1][0]))
        return replies

    def checkSpool(self, gw, accepted):
        spool = gw.service.spool
        ids = spool.queueIds()
        self.assertEqual(len(ids), accepted)
        for qid in ids:
            m = spool.load(qid)  # raises if anything was left half-written
            with m.openBody() as f:
                self.assertEqual(len(f.read()), m.size)
        self.assertEqual(os.listdir(spool.path("tmp")), [])
        self.assertEqual(os.listdir(spool.path("corrupt")), [])

    def fillUp(self):
        with open(os.path.join(self.mount, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass

    def test_startsOnAFullDisk(self):
        """
        A gateway started on a full spool (its lock files new and empty, as
        after a kill -9 during a first start) starts and answers MAIL with
        452 4.3.1 (no octet is free), in both of two workers, instead of
        ending in a traceback at the lock file's pid.
        """
        port = freePort()
        conf = os.path.join(self.mktemp() + ".toml")
        with open(conf, "w") as f:
            f.write(configText(self.mount, listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % port,
                                                       "relay_networks": ["127.0.0.0/8"]},),
                               relay={"defer_all": True}, spool={"min_free_space": 0}, process={"workers": 2}))
        for partition in ("spool", "spool/w0", "spool/w1"):
            os.makedirs(os.path.join(self.mount, partition))
            open(os.path.join(self.mount, partition, "lock"), "w").close()
        self.fillUp()

        def run():
            with twistdRunning(conf, os.path.dirname(conf)) as p:
                waitForPort(port)
                waitUntil(lambda: os.path.isdir(os.path.join(self.mount, "spool", "w1", "queue")), 20)
                replies = [transaction(port, 2000, "full%d" % n)[0][0] for n in range(6)]
                p.send_signal(signal.SIGTERM)
                p.wait(30)
            return replies, p.output

        def check(result):
            replies, out = result
            self.assertEqual(replies, [452] * 6, out)
            self.assertNotIn("Traceback", out)
            self.assertIn("is full: its lock file does not name this process", out)
            self.assertIn("started worker 1", out)

        return inThread(run).addCallback(check)

    def test_sharedTextNotLeftHalfWritten(self):
        """The text the main process shares with its workers, on a full disk: refused, and no partial file left."""
        with open(os.path.join(self.mount, "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError:
                pass
        path = os.path.join(self.mount, "reload.toml")
        self.assertFalse(workers._replaceWhole(path, b"# config\n" * 10000))
        self.assertEqual(sorted(os.listdir(self.mount)), ["filler"])

    @defer.inlineCallbacks
    def test_fullDuringData(self):
        """min_free_space = 0: the disk fills during DATA and at commit; 452 4.3.1, never silence."""
        gw = yield self.gateway(0)
        sizes = [BIG, SMALL * 4] * 8
        replies = yield self.fill(gw, sizes)
        accepted = [r for r in replies if r[2] == 250]
        refused = [r for r in replies if r[2] == 452]
        self.assertEqual(len(accepted) + len(refused), len(sizes), replies)
        self.assertTrue(accepted and refused, replies)
        # Both the streamed path and the commit path meet the full disk.
        self.assertEqual({r[0] for r in refused}, {BIG, SMALL * 4}, replies)
        self.assertEqual({r[3] for r in refused}, {"4.3.1 Insufficient system storage"})
        self.checkSpool(gw, len(accepted))
        status, body = yield inThread(get, gw.adminPort, "/healthz")
        self.assertEqual(status, 503)  # min_free_space 0, but a write failed just now
        self.assertIn("No space left on device", body)
        self.assertEqual(self.flushLoggedErrors(), [])  # no crash, no traceback
        self.report = ("tmpfs 2 MB, min_free_space 0: %d messages, %d accepted (%d octets), %d refused 452 4.3.1"
                       % (len(replies), len(accepted), sum(r[0] for r in accepted), len(refused)))
        print(self.report)

    @defer.inlineCallbacks
    def test_noRoomAtAllRefusesMail(self):
        """
        min_free_space = 0: with no octet free, or no inode (octets to
        spare), MAIL gets 452 4.3.1, as Postfix's smtpd answers with no block
        free whatever its queue_minfree, instead of 250 and a 452 once the
        client has sent the whole message; once room comes back, mail is
        accepted again.
        """
        gw = yield self.gateway(0)
        filler = os.path.join(self.mount, "filler")
        self.fillUp()
        inodes = os.path.join(self.mount, "inodes")
        os.makedirs(inodes)

        def fillInodes():
            try:
                for n in range(100000):
                    os.close(os.open(os.path.join(inodes, str(n)), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)

        replies = []
        for fill, free in ((lambda: None, lambda: os.unlink(filler)), (fillInodes, lambda: None)):
            fill()
            mail, end = yield inThread(transaction, gw.port, SMALL, "full")
            replies.append((mail, end))
            free()
        self.assertEqual(replies, [((452, ["4.3.1 Insufficient system storage"]), None)] * 2)
        self.assertGreater(gw.service.spool.freeSpace(), SMALL)  # (the second had octets to spare)
        for name in os.listdir(inodes):
            os.unlink(os.path.join(inodes, name))
        mail, end = yield inThread(transaction, gw.port, SMALL, "again")
        self.assertEqual((mail[0], end[0]), (250, 250))
        self.checkSpool(gw, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_spentFilesAreRoom(self):
        """
        The files of delivered messages kept in spent/ for reuse are room
        the spool can give back at once: when they alone bring the free
        space below min_free_space, MAIL is accepted (they go) rather than
        refused 452 4.3.1 for want of room the queue itself does not use.
        """
        from twisted.internet import reactor, task

        outbox = os.path.abspath(self.mktemp())
        gw = Gateway(self.mount, listeners=({"relay_networks": ["127.0.0.0/8"]},), relay={"maildir": outbox},
                     spool={"min_free_space": 1024 * 1024})
        yield gw.start()
        self.addCleanup(gw.stop)
        spool = gw.service.spool
        replies, spent = [], []
        for i in range(8):
            mail, end = yield inThread(transaction, gw.port, BIG, "s%d" % i)
            replies.append((mail[0], end and end[0]))
            for _ in range(200):  # (delivered to the Maildir, its file moved to spent/: at most 10 s)
                if not spool.queueIds() and len(os.listdir(os.path.join(outbox, "new"))) == replies.count((250, 250)):
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            spent.append(len(os.listdir(spool.path("spent"))))
        self.assertEqual(replies, [(250, 250)] * 8, spent)
        self.assertEqual(len(os.listdir(os.path.join(outbox, "new"))), 8)
        self.assertLess(min(spent), max(spent))  # (they went, when they alone held the room)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_healthyWhenSpentFilesHoldTheRoom(self):
        """
        Once deliveries have left the free space below min_free_space only
        in files kept in spent/ for reuse, /healthz gives them back and
        says 200, as MAIL would accept, rather than 503: behind a balancer
        that heeds it no MAIL would come to give them back, and the
        gateway would stay unhealthy for room the queue does not use.
        """
        from twisted.internet import reactor, task

        outbox = os.path.abspath(self.mktemp())
        gw = Gateway(self.mount, listeners=({"relay_networks": ["127.0.0.0/8"]},), relay={"maildir": outbox},
                     admin={"endpoint": "tcp:0:interface=127.0.0.1"}, spool={"min_free_space": 1024 * 1024})
        yield gw.start()
        self.addCleanup(gw.stop)
        spool = gw.service.spool
        for i in range(8):
            mail, end = yield inThread(transaction, gw.port, BIG, "h%d" % i)
            self.assertEqual((mail[0], end[0]), (250, 250))
            for _ in range(200):  # (delivered, its file moved to spent/: at most 10 s)
                if not spool.queueIds() and len(os.listdir(spool.path("spent"))) == i + 1:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            if spool.freeSpace() < spool.minFree:
                break
        self.assertLess(spool.freeSpace(), spool.minFree)
        self.assertTrue(os.listdir(spool.path("spent")))
        self.assertEqual((yield inThread(get, gw.adminPort, "/healthz")), (200, "ok\n"))
        self.assertEqual(os.listdir(spool.path("spent")), [])
        self.assertGreaterEqual(spool.freeSpace(), spool.minFree)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_minFreeRefusesMail(self):
        """min_free_space = 512 KB: MAIL gets 452 4.3.1 before the disk is full; /healthz turns 503."""
        gw = yield self.gateway(512 * 1024)
        replies = yield self.fill(gw, [BIG] * 8)
        accepted = [r for r in replies if r[2] == 250]
        refusedAtMail = [r for r in replies if r[1] == 452]
        self.assertTrue(accepted and refusedAtMail, replies)
        self.assertEqual(len(accepted) + len(refusedAtMail) + len([r for r in replies if r[2] == 452]), 8)
        self.assertGreaterEqual(gw.service.spool.freeSpace(), 0)
        status, body = yield inThread(get, gw.adminPort, "/healthz")
        self.assertEqual(status, 503)
        self.assertTrue(body.startswith("spool low on space: "), body)
        status, body = yield inThread(get, gw.adminPort, "/metrics")
        self.assertIn("relaygw_spool_free_bytes", body)
        self.checkSpool(gw, len(accepted))
        # A message delivered frees room: MAIL is accepted again.
        spool = gw.service.spool
        self.assertEqual(tool.main(["--config", gw.path, "delete"] + spool.queueIds()[:2], out=open(os.devnull, "w")), 0)
        mail, end = yield inThread(transaction, gw.port, SMALL, "again")
        self.assertEqual((mail[0], end[0]), (250, 250))
        print("tmpfs 2 MB, min_free_space 512 KB: %s" % ([r[1:3] for r in replies],))
        self.assertEqual(self.flushLoggedErrors(), [])



class SpentFilesTests(unittest.TestCase):
    """Delivered messages' files kept for reuse give their blocks back when room runs short."""

    @defer.inlineCallbacks
    def spoolWithSpentFiles(self, minFree):
        """A spool keeping C{minFree} octets free, with three delivered messages' files of 5,000 octets in spent/."""
        from twisted.internet import reactor

        from relaygw.durable import Committer
        from relaygw.spool import Spool

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor), minFree=minFree)
        spool.open()
        ids = []
        for n in range(3):
            w = spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
            w.write(b"x" * 5000)
            ids.append((yield w.commit()))
        for qid in ids:
            yield spool.remove(qid)
        return spool

    @defer.inlineCallbacks
    def test_releasedWhenShort(self):
        spool = yield self.spoolWithSpentFiles(1000)
        self.assertEqual(len(os.listdir(spool.path("spent"))), 3)
        self.assertTrue(spool.hasRoom(0))
        self.assertEqual(len(os.listdir(spool.path("spent"))), 3)  # room enough: kept
        self.patch(spool.room, "freeSpace", lambda: 999)
        self.assertTrue(spool.hasRoom(0))  # (what they hold is room: given back for this message)
        yield spool.committer.unlink([])  # the removal goes through the disk thread
        self.assertEqual(os.listdir(spool.path("spent")), [])
        self.assertIsNone(spool.spent.take())
        self.assertFalse(spool.hasRoom(0))  # (none left to give back)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_roomWhileTheirRemovalWaits(self):
        """
        The spent files given back are room from then on, while the disk
        thread has yet to remove them (behind a batch's sync): the MAILs
        that come meanwhile are not refused for the room they still hold.
        """
        spool = yield self.spoolWithSpentFiles(10000)
        held = sum(os.lstat(spool.path("spent", n)).st_blocks * 512 for n in os.listdir(spool.path("spent")))
        free = [9000]
        self.patch(spool.room, "freeSpace", lambda: free[0])
        removals = []
        unlink = spool.committer.unlink

        def waiting(paths):
            removals.append((paths, defer.Deferred()))
            return removals[-1][1]

        self.patch(spool.committer, "unlink", waiting)
        self.assertTrue(spool.hasRoom(0))
        self.assertTrue(spool.hasRoom(0))  # (their removal has not run yet)
        self.assertFalse(spool.hasRoom(held))
        [(paths, removed)] = removals
        free[0] += held
        yield unlink(paths)
        removed.callback(None)
        self.assertEqual(os.listdir(spool.path("spent")), [])
        self.assertTrue(spool.hasRoom(0))
        self.assertFalse(spool.hasRoom(held))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_notKeptWhileShort(self):
        """
        While room is short, a delivered message's file goes at once instead
        of to spent/ (where the next refused MAIL would have to remove it
        again, a warning each time); once there is room again, it is kept.
        """
        from twisted.internet import reactor

        from relaygw.durable import Committer
        from relaygw.spool import Spool

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor), minFree=1000)
        spool.open()

        @defer.inlineCallbacks
        def delivered():
            w = spool.newMessage({"mailfrom": "", "recipients": ["r@example.net"]})
            w.write(b"x" * 5000)
            yield spool.remove((yield w.commit()))
            return sorted(os.listdir(spool.path("spent")))

        free = [10 ** 9]
        self.patch(spool.room, "freeSpace", lambda: free[0])
        free[0] = 999
        self.assertFalse(spool.hasRoom(0))
        self.assertEqual((yield delivered()), [])
        spool.room.storageFailed(OSError(errno.ENOSPC, "No space left on device"))
        self.assertEqual((yield delivered()), [])
        free[0] = 10 ** 9
        self.assertTrue(spool.hasRoom(0))
        self.assertEqual(len((yield delivered())), 1)


class SpoolOpenFailsTests(unittest.TestCase):
    """The spool cannot be read at start (EIO): start ends with one line naming why, not a traceback."""

    def test_openEIO(self):
        gw = Gateway(self.mktemp())

        def fail(spool):
            raise OSError(errno.EIO, os.strerror(errno.EIO), spool.path("hold"))

        self.patch(Spool, "open", fail)
        logged = LogCapture(self)
        self.addCleanup(gw.service.spool.releaseLock)
        e = self.assertRaises(StartFailed, gw.service.startService)
        self.assertEqual(e.code, 1)
        self.assertEqual(str(e), "cannot open the spool %s: [Errno 5] Input/output error: %r" % (
            gw.service.spool.directory, gw.service.spool.path("hold")))
        [event] = logged.find("cannot open the spool")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(formatEvent(event), str(e))
        self.assertEqual(self.flushLoggedErrors(), [])
