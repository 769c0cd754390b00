"""
Exclusive ownership of the spool: one process per partition, workers that
die with the main process, and a main process that restarts a dead worker.
"""

import os
import signal
import stat
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.trial import unittest

from relaygw import workers
from relaygw.spool import PartitionLock, PartitionLocked
from relaygw.testing import Gateway, configText, freePort, inThread, waitForPort
from tests.messages import sendOne
from tests.processes import portRefused, processAlive, runTwistd, sourceEnv, spoolPids, waitUntil


class PartitionLockTests(unittest.TestCase):
    def test_secondOwnerRefused(self):
        directory = os.path.abspath(self.mktemp())
        first = PartitionLock(directory)
        with self.assertRaises(PartitionLocked) as caught:
            PartitionLock(directory)
        self.assertIn("in use by another relaygw process (pid %d)" % os.getpid(), str(caught.exception))
        first.release()
        PartitionLock(directory).release()  # free again

    def test_lockDiesWithTheProcess(self):
        """However the owner ends (here SIGKILL), the lock goes with it."""
        directory = os.path.abspath(self.mktemp())
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from relaygw.spool import PartitionLock; "
             "PartitionLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)", directory],
            stdout=subprocess.PIPE, env=sourceEnv())
        try:
            self.assertEqual(child.stdout.readline().strip(), b"locked")
            self.assertRaises(PartitionLocked, PartitionLock, directory)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        PartitionLock(directory).release()

    @defer.inlineCallbacks
    def test_secondGatewayOnTheSameSpool(self):
        first = Gateway(self.mktemp())
        yield first.start()
        self.addCleanup(first.stop)
        second = Gateway(first.directory)
        self.assertRaises(PartitionLocked, second.service.startService)
        self.assertFalse(second.service.running)


class TwistdOwnershipTests(unittest.TestCase):
    """Real twistd processes on a loopback port."""

    timeout = 60

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = freePort()
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        # Workers a test left orphaned (they name themselves in the locks).
        for pid in spoolPids(self.directory).values():
            if processAlive(pid) and pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def start(self, workers=1, **kw):
        conf = os.path.join(self.directory, "relaygw.toml")
        with open(conf, "w") as f:
            f.write(configText(self.directory, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % self.port, "relay_networks": ["127.0.0.0/8"],
                "drain_timeout": 2},), relay={"defer_all": True},
                process={"workers": workers} if workers > 1 else None, **kw))
        p = runTwistd(conf, self.directory)
        self.procs.append(p)
        return p

    def log(self):
        with open(os.path.join(self.directory, "twistd.log")) as f:
            return f.read()

    def waitForWorkers(self, count):
        """Until C{count} workers own their partitions and listen (so that they log what they do)."""
        spool = os.path.join(self.directory, "spool")
        self.assertTrue(waitUntil(lambda: len([n for n in spoolPids(self.directory) if n.startswith("w")]) >= count
                                 and all(os.path.isdir(os.path.join(spool, "w%d" % i, "queue"))
                                         for i in range(count)), 20), self.log())
        time.sleep(0.5)  # (the spool is opened just before the reactor runs)

    def test_secondProcessExits1(self):
        def run():
            first = self.start()
            waitForPort(self.port)
            second = self.start()
            self.assertEqual(second.wait(30), 1)
            self.assertIn("spool %s is in use by another relaygw process (pid %d)"
                          % (os.path.join(self.directory, "spool"), first.pid), self.log())
            self.assertIsNone(first.poll())
            sendOne(self.port)  # the first one still serves
            first.send_signal(signal.SIGTERM)
            first.wait(30)

        return inThread(run)

    def test_lockCannotBeOpened(self):
        """
        The spool's lock file cannot be opened (a socket has its name: ENXIO,
        as a failing or full disk's EIO or ENOSPC): start ends with exit
        status 1 and one line naming the spool and the error, not a traceback.
        """
        spool = os.path.join(self.directory, "spool")
        os.makedirs(spool)
        os.mknod(os.path.join(spool, "lock"), stat.S_IFSOCK | 0o600)

        def run():
            p = self.start()
            self.assertEqual(p.wait(30), 1)
            self.assertIn("cannot take the spool %s: [Errno 6] No such device or address: '%s'" % (
                spool, os.path.join(spool, "lock")), self.log())
            self.assertNotIn("Traceback", self.log())

        return inThread(run)

    def test_killMainStopsEveryWorker(self):
        """kill -9 of the main process: its worker stops listening and exits; nothing accepts mail."""

        def run():
            main = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            worker = spoolPids(self.directory)["w1"]
            self.assertNotEqual(worker, main.pid)
            self.assertTrue(processAlive(worker))
            main.kill()
            main.wait()
            started = time.monotonic()
            self.assertTrue(waitUntil(lambda: not processAlive(worker), 10), self.log())
            self.assertLess(time.monotonic() - started, 10)
            self.assertTrue(portRefused(self.port))
            self.assertIn("the main process has gone: this worker stops listening at once", self.log())
            # A new main process takes over both partitions.
            again = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            self.assertTrue(waitUntil(lambda: spoolPids(self.directory).get("w1") not in (None, worker), 20))
            sendOne(self.port)
            again.send_signal(signal.SIGTERM)
            again.wait(30)

        return inThread(run)

    def test_parentDeathSignalStopsListeningAtOnce(self):
        """
        The kernel's parent-death signal stops a worker listening at once,
        without the drain delay, even while getppid() still names the main
        process: a kill -9 of a busy main process whose main thread died
        before its others (it took SIGTERM, the drain's signal, for a drain).
        """
        def run():
            main = self.start(workers=2, admin={"endpoint": "tcp:0:interface=127.0.0.1"})  # (drain_delay 5 s)
            waitForPort(self.port)
            self.waitForWorkers(2)
            worker = spoolPids(self.directory)["w1"]
            started = time.monotonic()
            os.kill(worker, workers.PARENT_DEATH_SIGNAL)  # (as the kernel sends it; the main process lives on)
            self.assertTrue(waitUntil(lambda: not processAlive(worker), 10), self.log())
            self.assertLess(time.monotonic() - started, 4)
            self.assertIn("the main process has gone: this worker stops listening at once", self.log())
            main.send_signal(signal.SIGTERM)
            main.wait(30)

        return inThread(run)

    def test_deadWorkerRestarted(self):
        """A worker that dies is restarted, with a log line, and takes its partition back."""

        def run():
            main = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            worker = spoolPids(self.directory)["w1"]
            os.kill(worker, signal.SIGKILL)
            self.assertTrue(waitUntil(lambda: spoolPids(self.directory).get("w1") not in (None, worker)
                                     and "started worker 1" in self.log().split("worker 1 exited")[-1], 20),
                            self.log())
            self.assertIn("worker 1 exited (A process has ended with a probable error condition: process ended "
                          "by signal 9.); restarting it in 1.0s", self.log())
            self.assertTrue(processAlive(spoolPids(self.directory)["w1"]))
            main.send_signal(signal.SIGTERM)
            self.assertIn(main.wait(30), (0, -signal.SIGTERM))
            self.assertFalse(processAlive(spoolPids(self.directory)["w1"]))

        return inThread(run)


class HeldPartitionAdoptedLaterTests(unittest.TestCase):
    """
    A partition to adopt (here w1/, left by a run with two workers) that
    another process still holds at start (that run's worker, still
    draining its sessions) is tried again until it is free, and its
    messages are delivered then; it was skipped once, at start, and its
    acknowledged messages waited for the next restart.
    """

    @defer.inlineCallbacks
    def test_adoptedOnceFree(self):
        import zlib

        from twisted.internet import reactor, task

        from relaygw.service import GatewayService
        from relaygw.spool import Spool, newQueueId
        from tests.recorders import LogCapture

        self.patch(GatewayService, "ADOPT_RETRY", 0.2)
        directory = os.path.abspath(self.mktemp())
        partition = os.path.join(directory, "spool", "w1")
        Spool(partition, None).open()
        body = b"Subject: stranded\r\n\r\nleft in w1\r\n"
        qid = newQueueId()
        with open(os.path.join(partition, "queue", qid), "wb") as f:
            f.write(('{"body_size":%d,"body_crc32":%d,"mailfrom":"a@example.org","recipients":["b@example.net"],'
                     '"arrival":%f,"queue_id":"%s"}\n' % (len(body), zlib.crc32(body), time.time(), qid)).encode()
                    + body)
        held = PartitionLock(partition)  # (the earlier run's worker 1, still draining)
        logs = LogCapture(self)
        gw = Gateway(directory)
        yield gw.start()
        self.addCleanup(gw.stop)
        self.assertEqual(len(logs.find("not adopting the messages in {source} yet: {error}")), 1)
        yield task.deferLater(reactor, 0.6, lambda: None)
        self.assertEqual(gw.delivered(), [])
        self.assertEqual(os.listdir(os.path.join(partition, "queue")), [qid])
        held.release()
        deadline = time.monotonic() + 10
        while not gw.delivered() and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        [message] = gw.delivered()
        self.assertTrue(message.endswith(body))
        self.assertEqual(os.listdir(os.path.join(partition, "queue")), [])
        self.assertEqual(len(logs.find("not adopting the messages in {source} yet: {error}")), 1)  # (said once)
