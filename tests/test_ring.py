"""
The spool's syncs through io_uring: the ring itself (real kernel results),
and L{RingCommitter}'s order (a queue file named, then it and its name
synced at once, then the 250; a file whose owner does not check it synced,
then named, then the name synced), its batches, its failures and its stop.
"""

import errno
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw import durable, ringcommit
from relaygw.durable import CommitJob, Committer
from relaygw.ring import Ring
from relaygw.ringcommit import RingCommitter, committer
from relaygw.spool import Spool
from tests.test_spool import failedCloseOfAnUnfinishedFile


class RingTests(unittest.TestCase):
    def setUp(self):
        self.ring = Ring(entries=4)
        self.addCleanup(self.ring.close)

    def wait(self, count):
        results = []
        while len(results) < count:
            results += self.ring.completions()
        return results

    def test_fsyncResults(self):
        """A file's sync succeeds; a pipe's fails with EINVAL, from the kernel; each comes back with its tag."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x")
            f.flush()
            r, w = os.pipe()
            self.addCleanup(os.close, r)
            self.addCleanup(os.close, w)
            self.assertEqual(self.ring.completions(), [])
            self.ring.fsync(f.fileno(), 7, dataOnly=True)
            self.ring.fsync(r, 8)
            self.ring.submit()
            self.assertEqual(sorted(self.wait(2)), [(7, 0), (8, -errno.EINVAL)])

    def test_full(self):
        """No more requests than the submission queue holds wait for L{Ring.submit}."""
        for tag in range(self.ring.capacity):
            self.ring.fsync(0, tag)
        with self.assertRaises(OSError) as cm:
            self.ring.fsync(0, 99)
        self.assertEqual(cm.exception.errno, errno.ENOBUFS)
        self.ring.submit()
        self.assertEqual(len(self.wait(self.ring.capacity)), self.ring.capacity)


class RingCommitterTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.committer = RingCommitter(reactor)
        self.addCleanup(self.committer.stop)
        self.spool = Spool(self.dir, self.committer)
        self.spool.open()
        self.calls = []
        fsync, rename = Ring.fsync, durable.quick.rename

        def recordSync(ring, fd, tag, dataOnly=False):
            path = os.readlink("/proc/self/fd/%d" % fd)  # (a directory, or a file in one)
            if os.path.isdir(path):
                self.calls.append(("sync", os.path.basename(path) + "/"))
            else:
                self.calls.append(("sync", os.path.basename(os.path.dirname(path))))
            return fsync(ring, fd, tag, dataOnly)

        def recordRename(source, destination):
            self.calls.append(("rename", os.path.basename(os.path.dirname(destination))))
            return rename(source, destination)

        self.patch(Ring, "fsync", recordSync)
        self.patch(durable.quick, "rename", recordRename)

    def message(self, body=b"body\r\n"):
        w = self.spool.newMessage({"mailfrom": "", "recipients": ["b@example.net"]})
        w.write(b"Subject: x\r\n\r\n" + body)
        return w.commit().addCallback(self.fired)

    def fired(self, qid):
        self.calls.append(("fired", None))
        return qid

    def stateFile(self, name):
        """A job whose owner does not check what it reads back (a progress record's, a Maildir's)."""
        job = CommitJob(self.spool.path("tmp", name), self.spool.path("state", name), data=b"{}")
        return self.committer.commit(job).addCallback(self.fired)

    @defer.inlineCallbacks
    def test_namedThenSyncedThenFired(self):
        """A queue file is named in queue/, then it and queue/ are synced at once, then the commit fires."""
        qid = yield self.message()
        self.assertEqual(self.calls, [("rename", "queue"), ("sync", "queue"), ("sync", "queue/"), ("fired", None)])
        self.assertEqual(self.spool.load(qid).size, 20)
        self.assertEqual(os.listdir(self.spool.path("tmp")), [])
        self.assertEqual(self.committer.batches, 1)

    @defer.inlineCallbacks
    def test_uncheckedSyncedThenNamedThenFired(self):
        """A file whose owner does not check it is synced in tmp/, then named, then its directory synced."""
        yield self.stateFile("s")
        self.assertEqual(self.calls, [("sync", "tmp"), ("rename", "state"), ("sync", "state/"), ("fired", None)])
        self.assertEqual(os.listdir(self.spool.path("state")), ["s"])
        self.assertEqual((self.committer.jobs, self.committer.batches), (1, 1))

    @defer.inlineCallbacks
    def test_mixedBatch(self):
        """In one batch, the queue file's commit fires once its sync is done, before the other file is named."""
        yield defer.gatherResults([self.message(), self.stateFile("s")])
        self.assertEqual(self.calls, [("rename", "queue"), ("sync", "queue"), ("sync", "tmp"), ("sync", "queue/"),
                                      ("fired", None), ("rename", "state"), ("sync", "state/"), ("fired", None)])
        self.assertEqual((self.committer.jobs, self.committer.batches), (2, 1))

    @defer.inlineCallbacks
    def test_oneBatchATurn(self):
        """Commits handed in during one reactor turn are synced together: one directory sync for them all."""
        qids = yield defer.gatherResults([self.message(b"%d\r\n" % i) for i in range(50)])
        self.assertEqual(len(set(qids)), 50)
        self.assertEqual((self.committer.jobs, self.committer.batches), (50, 1))
        self.assertEqual(self.calls.count(("sync", "queue/")), 1)
        self.assertEqual(self.calls.index(("fired", None)), 101)  # 50 renames, 50 syncs, one directory sync
        self.assertEqual(sorted(self.spool.queueIds()), sorted(qids))

    @defer.inlineCallbacks
    def test_failedSyncLeavesNothingQueued(self):
        """
        The kernel refuses the sync (here of a pipe instead of the file): the
        commit fails, and the name the file was given is taken back.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        fsync = Ring.fsync
        self.patch(Ring, "fsync", lambda ring, fd, tag, dataOnly=False: fsync(ring, r, tag, dataOnly))
        with self.assertRaises(OSError) as cm:
            yield self.message()
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        self.assertEqual((os.listdir(self.spool.path("queue")), os.listdir(self.spool.path("tmp"))), ([], []))
        self.patch(Ring, "fsync", fsync)
        qid = yield self.message()
        self.assertEqual(self.spool.queueIds(), [qid])

    @defer.inlineCallbacks
    def test_failedCloseOfAnUnfinishedFile(self):
        """A queue file's write and then its close fail: the commit is answered, and the next goes through."""
        self.assertEqual((yield failedCloseOfAnUnfinishedFile(self, self.message)), [])

    @defer.inlineCallbacks
    def test_directoryNotOpened(self):
        """
        Out of descriptors for the directory's sync: the commit fails (its
        name is not known durable) and the ring is let go; the next commit
        opens a new one and goes through.
        """
        real = durable.quick.open

        def noDirectory(path, flags, mode=0o777):
            if flags & os.O_DIRECTORY:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(path, flags, mode)

        self.patch(durable.quick, "open", noDirectory)
        rings = []

        class Recorded(Ring):
            def __init__(self):
                Ring.__init__(self)
                rings.append(self)

        self.patch(ringcommit, "Ring", Recorded)
        with self.assertRaises(OSError) as cm:
            yield self.message()
        self.assertEqual(cm.exception.errno, errno.EMFILE)
        self.assertEqual(os.listdir(self.spool.path("queue")), [])
        self.assertEqual(len(rings), 1)
        self.assertIsNone(self.committer.ring)
        self.assertNotIn(self.committer, reactor.getReaders())
        self.patch(durable.quick, "open", real)
        qid = yield self.message()
        self.assertIn(qid, self.spool.queueIds())
        self.assertEqual(len(rings), 2)
        self.assertIs(self.committer.ring, rings[1])

    @defer.inlineCallbacks
    def test_failedDirectoryFailsItsJobsAlone(self):
        """
        The sync of a Maildir next hop's new/ fails (here the kernel is
        handed a pipe instead): that delivery fails and its name is taken
        back, while a progress record and a message of the same batch, whose
        directories were synced, go through.
        """
        maildir = os.path.abspath(self.mktemp())
        for sub in ("tmp", "new"):
            os.makedirs(os.path.join(maildir, sub))
        qid = yield self.message()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        fsync = Ring.fsync
        newDir = os.stat(os.path.join(maildir, "new"))

        def failing(ring, fd, tag, dataOnly=False):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (newDir.st_dev, newDir.st_ino):
                fd = r
            return fsync(ring, fd, tag, dataOnly)

        self.patch(Ring, "fsync", failing)
        delivery = self.committer.commit(CommitJob(os.path.join(maildir, "tmp", "m"),
                                                   os.path.join(maildir, "new", "m"), data=b"delivered\n"))
        record = self.spool.writeState(qid, {"rcpts": {}, "attempts": 1})
        another = self.message()
        with self.assertRaises(OSError) as cm:
            yield delivery
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        yield record
        second = yield another
        self.assertEqual(self.spool.readState(qid)["attempts"], 1)
        self.assertEqual(sorted(self.spool.queueIds()), sorted([qid, second]))
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), [])
        self.assertEqual(self.committer.batches, 2)

    @defer.inlineCallbacks
    def test_replacedDirectorySynced(self):
        """
        A Maildir next hop's directory is replaced while the ring stays
        open (moved aside, made afresh, the configuration reloaded): the
        next delivery's name is made durable by a sync of the new directory.
        """
        maildir = os.path.abspath(self.mktemp())
        synced = []
        fsync = Ring.fsync

        def record(ring, fd, tag, dataOnly=False):
            synced.append(os.fstat(fd).st_ino)
            return fsync(ring, fd, tag, dataOnly)

        self.patch(Ring, "fsync", record)
        for name in ("1", "2"):
            if os.path.isdir(maildir):
                os.rename(maildir, maildir + ".old")
            for sub in ("tmp", "new"):
                os.makedirs(os.path.join(maildir, sub))
            job = CommitJob(os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name), data=b"x\n")
            yield self.committer.commit(job)
            self.assertEqual(os.listdir(os.path.join(maildir, "new")), [name])
            self.assertEqual(synced[-1], os.stat(os.path.join(maildir, "new")).st_ino)

    @defer.inlineCallbacks
    def test_removalAndReuse(self):
        """A delivered message's file becomes a spent file at once, and the next message is written over it."""
        first = yield self.message()
        yield self.spool.remove(first, progress=False)
        self.assertEqual(os.listdir(self.spool.path("spent")), [first])
        second = yield self.message()
        self.assertEqual(os.listdir(self.spool.path("spent")), [])
        self.assertEqual(os.stat(self.spool.path("queue", second)).st_nlink, 1)

    @defer.inlineCallbacks
    def test_stopClosesTheRingOnceDone(self):
        """A stop with a batch in flight lets it finish, then closes the ring; a later commit opens a new one."""
        d = self.message()
        self.committer.stop()
        yield d
        yield task.deferLater(reactor, 0, lambda: None)  # (the commits fire first)
        self.assertIsNone(self.committer.ring)
        self.assertNotIn(self.committer, reactor.getReaders())
        yield self.message()
        self.assertIn(self.committer, reactor.getReaders())
        self.committer.stop()
        self.assertIsNone(self.committer.ring)

    @defer.inlineCallbacks
    def test_droppedByTheReactor(self):
        """
        The ring dropped at the reactor's shutdown (which drops every reader
        with ConnectionLost) is closed without a word; dropped after an error
        in its reading (a bug), it is logged.  A commit after either opens a
        new ring.
        """
        from twisted.internet import main
        from twisted.python.failure import Failure
        from tests.recorders import LogCapture

        logs = LogCapture(self)
        for reason, logged in ((main.CONNECTION_LOST, 0), (RuntimeError("bug"), 1)):
            yield self.message()
            reactor.removeReader(self.committer)  # (as the reactor does before it tells the reader)
            self.committer.connectionLost(Failure(reason))
            self.assertIsNone(self.committer.ring)
            self.assertEqual(len(logs.find("io_uring failed")), logged)
        self.flushLoggedErrors(RuntimeError)
        yield self.message()
        self.assertIn(self.committer, reactor.getReaders())


class ChoiceTests(unittest.TestCase):
    """L{committer}: io_uring where asked for and offered, the disk thread otherwise."""

    def test_ring(self):
        c = committer(reactor)
        self.addCleanup(c.stop)
        self.assertIsInstance(c, RingCommitter)
        self.assertTrue(c.dataOnly)
        self.assertFalse(committer(reactor, "each").dataOnly)

    def test_notAskedFor(self):
        self.assertIsInstance(committer(reactor, ring=False), Committer)

    def test_unavailable(self):
        def noRing():
            raise OSError(errno.ENOSYS, "Function not implemented")

        self.patch(ringcommit, "Ring", noRing)
        events = []
        self.patch(ringcommit.log, "info", lambda fmt, **kw: events.append(fmt.format(**kw)))
        self.assertIsInstance(committer(reactor, cpus=frozenset([0])), Committer)
        self.assertEqual(events, ["syncing the spool in a disk thread: no io_uring (Function not implemented)"])

    def test_otherArchitectures(self):
        """The ring's reads of shared memory carry no fences: x86-64's memory order only, and a line says so."""
        self.patch(ringcommit.platform, "machine", lambda: "aarch64")
        events = []
        self.patch(ringcommit.log, "info", lambda fmt, **kw: events.append(fmt.format(**kw)))
        self.assertIsInstance(committer(reactor), Committer)
        self.assertEqual(events, ["syncing the spool in a disk thread: no io_uring (not on aarch64)"])
        self.assertIsInstance(committer(reactor, ring=False), Committer)
        self.assertEqual(len(events), 1)

    @defer.inlineCallbacks
    def test_jobInterface(self):
        """Both take the same jobs (a Maildir's commit, say) and give the same counters."""
        for c in (RingCommitter(reactor), Committer(reactor)):
            self.addCleanup(c.stop)
            d = os.path.abspath(self.mktemp())
            os.makedirs(os.path.join(d, "tmp"))
            os.makedirs(os.path.join(d, "new"))
            job = CommitJob(os.path.join(d, "tmp", "m"), os.path.join(d, "new", "m"), data=b"delivered\n")
            self.assertEqual((c.jobs, c.batches), (0, 0))
            yield c.commit(job)
            with open(os.path.join(d, "new", "m"), "rb") as f:
                self.assertEqual(f.read(), b"delivered\n")
            self.assertEqual((c.jobs, c.batches), (1, 1))


class CommitWindowTests(unittest.TestCase):
    """
    Through io_uring a new message takes its name in queue/ before its
    sync: until that sync is done it is not queued.  A flush the queue
    manager runs in that window (relaygw-queue flush, seen at its poll)
    must not start delivering it: when the sync then fails, the client is
    told 452 and sends the message again, so it must not go out as well.
    """

    @defer.inlineCallbacks
    def ringGateway(self):
        """A started gateway whose spool commits through io_uring (or skip, where there is none)."""
        from relaygw.testing import Gateway

        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                     spool={"min_free_space": 0, "io_uring": True})
        yield gw.start()
        self.addCleanup(gw.stop)
        if not isinstance(gw.service.spool.committer, RingCommitter):
            raise unittest.SkipTest("no io_uring here")
        return gw

    def failFirstSync(self):
        """The ring's first batch of completions fails with EIO, later ones succeed; returns the list it is noted in."""
        realCompletions = Ring.completions
        failed = []

        def completions(ring):
            results = realCompletions(ring)
            if results and not failed:
                failed.append(results)
                return [(tag, -errno.EIO) for tag, _ in results]
            return results

        self.patch(Ring, "completions", completions)
        return failed

    def sendOnce(self, gw):
        """One message to C{gw} over a loopback socket; fires with the end of data's reply."""
        from relaygw.testing import Client, inThread

        def send():
            c = Client(gw.port, timeout=20)
            try:
                return c.transaction(["b@example.net"], "Subject: once\r\n\r\nbody\r\n")[-1]
            finally:
                c.close()

        return inThread(send)

    @defer.inlineCallbacks
    def test_failedCommitNotDeliveredByAFlush(self):
        gw = yield self.ringGateway()
        spool = gw.service.spool
        queueDir = spool.path("queue")
        realName = durable.CommitJob.name
        flushed = []

        def name(job):
            realName(job)
            if os.path.dirname(job.finalPath) == queueDir and not flushed:
                # The flush runs while this batch's sync is in flight.
                flushed.append(job.finalPath)
                reactor.callLater(0, gw.service.queue.flush)

        self.patch(durable.CommitJob, "name", name)
        failed = self.failFirstSync()

        end = yield self.sendOnce(gw)
        self.assertTrue(flushed and failed, "the window was not reached")
        self.assertEqual(end, (452, ["4.3.1 Insufficient system storage"]))
        yield task.deferLater(reactor, 0.5, lambda: None)  # (a delivery under way would finish)
        yield gw.service.queue.whenIdle()
        new = os.path.join(gw.directory, "outbox", "new")
        self.assertEqual(sorted(os.listdir(new)) if os.path.isdir(new) else [], [])
        self.assertEqual(spool.queueIds(), [])

    def test_unremovableFailedCommitNotDelivered(self):
        """
        The sync fails and the file system goes read-only (ext4 after an
        aborted journal), so the queue file named before the sync cannot be
        removed: the client is told 452, and the file is not queued for
        delivery in this process, by a flush or otherwise.
        """
        return self.refusedButKept(lambda gw, qid: gw.service.queue.flush(), 0.5)

    def test_unremovableFailedCommitNotReleased(self):
        """
        As above, and relaygw-queue (which lists the file left in queue/)
        asks for an attempt of that message: it is not delivered either.
        """
        return self.refusedButKept(lambda gw, qid: gw.service.spool.requestFlush(qid), 3)

    @defer.inlineCallbacks
    def refusedButKept(self, request, seconds):
        """A message refused 452 whose queue file stays; C{request(gw, qid)}, and after C{seconds} no delivery."""
        gw = yield self.ringGateway()
        spool = gw.service.spool
        queueDir = spool.path("queue")
        self.failFirstSync()
        kept = []

        class ReadOnly:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def unlink(path):
                if os.path.dirname(path) == queueDir:
                    kept.append(path)
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
                return os.unlink(path)

        self.patch(durable, "os", ReadOnly())

        end = yield self.sendOnce(gw)
        self.assertEqual(end, (452, ["4.3.1 Insufficient system storage"]))
        self.assertEqual([os.path.basename(p) for p in kept], os.listdir(queueDir))
        self.assertEqual(spool.queueIds(), [])
        request(gw, os.path.basename(kept[0]))
        yield task.deferLater(reactor, seconds, lambda: None)  # (the poll, and a delivery under way would finish)
        yield gw.service.queue.whenIdle()
        new = os.path.join(gw.directory, "outbox", "new")
        self.assertEqual(sorted(os.listdir(new)) if os.path.isdir(new) else [], [])
