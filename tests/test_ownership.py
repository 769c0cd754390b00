"""
Exclusive ownership of the spool: one process per partition, workers that
die with the main process, and a main process that restarts a dead worker.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.trial import unittest

from relaygw.spool import PartitionLock, PartitionLocked
from relaygw.testing import Gateway, configText, freePort, inThread, waitForPort
from tests.test_relay import runTwistd, sendOne, sourceEnv


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


def _pids(directory):
    """The pids named by the spool's lock files: {partition: pid}."""
    out = {}
    spool = os.path.join(directory, "spool")
    for name in sorted(os.listdir(spool)):
        path = os.path.join(spool, name, "lock")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                out[name] = int(text)
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not reaped yet) is not alive
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _waitFor(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


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
        for pid in _pids(self.directory).values():
            if _alive(pid) and pid != os.getpid():
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
        self.assertTrue(_waitFor(lambda: len([n for n in _pids(self.directory) if n.startswith("w")]) >= count
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

    def test_killMainStopsEveryWorker(self):
        """kill -9 of the main process: its worker stops listening and exits; nothing accepts mail."""

        def run():
            main = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            worker = _pids(self.directory)["w1"]
            self.assertNotEqual(worker, main.pid)
            self.assertTrue(_alive(worker))
            main.kill()
            main.wait()
            started = time.monotonic()
            self.assertTrue(_waitFor(lambda: not _alive(worker), 10), self.log())
            self.assertLess(time.monotonic() - started, 10)
            self.assertTrue(_refused(self.port))
            self.assertIn("the main process has gone: this worker stops listening at once", self.log())
            # A new main process takes over both partitions.
            again = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            self.assertTrue(_waitFor(lambda: _pids(self.directory).get("w1") not in (None, worker), 20))
            sendOne(self.port)
            again.send_signal(signal.SIGTERM)
            again.wait(30)

        return inThread(run)

    def test_deadWorkerRestarted(self):
        """A worker that dies is restarted, with a log line, and takes its partition back."""

        def run():
            main = self.start(workers=2)
            waitForPort(self.port)
            self.waitForWorkers(2)
            worker = _pids(self.directory)["w1"]
            os.kill(worker, signal.SIGKILL)
            self.assertTrue(_waitFor(lambda: _pids(self.directory).get("w1") not in (None, worker)
                                     and "started worker 1" in self.log().split("worker 1 exited")[-1], 20),
                            self.log())
            self.assertIn("worker 1 exited (A process has ended with a probable error condition: process ended "
                          "by signal 9.); restarting it in 1.0s", self.log())
            self.assertTrue(_alive(_pids(self.directory)["w1"]))
            main.send_signal(signal.SIGTERM)
            self.assertIn(main.wait(30), (0, -signal.SIGTERM))
            self.assertFalse(_alive(_pids(self.directory)["w1"]))

        return inThread(run)
