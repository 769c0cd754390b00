"""relaygw-queue against the spool of a running gateway."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relaygw.scripts import queue as tool
from relaygw.spool import Committer, Spool
from relaygw.testing import configText, inThread
from tests.test_relay import RelayTestCase, sourceEnv


class QueueToolTests(RelayTestCase):
    def run_(self, *argv):
        out, self.stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(self.stderr):
            code = tool.main(["--config", self.gw.path] + list(argv), out=out)
        return code, out.getvalue()

    @defer.inlineCallbacks
    def setUp(self):
        self.hop_, port = self.hop(rcpt={"b@example.net": "451 4.3.0 not now", "c@example.net": "451 4.3.0 not now"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.pollInterval = 0.2
        self.q1 = yield self.send(rcpts=("b@example.net",))
        self.q2 = yield self.send(rcpts=("c@example.net",), mailfrom="d@example.org")
        spool = self.gw.service.spool
        yield self.until(lambda: all(spool.readState(q).get("attempts") for q in (self.q1, self.q2)))

    def test_listAndShow(self):
        code, out = self.run_("list")
        self.assertEqual(code, 0)
        line = [l for l in out.splitlines() if l.startswith(self.q1)][0]
        self.assertIn("<a@example.org>", line)
        self.assertIn("<b@example.net>:deferred", line)
        self.assertIn("451 4.3.0 not now", line)
        self.assertIn("next=20", line)  # a date
        self.assertIn("2 message(s)", out)
        code, out = self.run_("show", self.q2)
        shown = json.loads(out)
        self.assertEqual(shown["envelope"]["mailfrom"], "d@example.org")
        self.assertEqual(shown["state"]["rcpts"]["c@example.net"]["status"], "deferred")

    @defer.inlineCallbacks
    def test_holdReleaseFlushDelete(self):
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.assertIn("next=held", self.run_("list")[1])
        self.hop_.rcpt.clear()  # the next hop recovers
        self.assertEqual(self.run_("flush")[0], 0)
        yield self.until(lambda: self.q2 not in self.gw.service.spool.queueIds())
        self.assertEqual(self.hop_.recipients(), ["c@example.net"])
        self.assertIn(self.q1, self.gw.service.spool.queueIds())  # held: not delivered
        self.assertEqual(self.hop_.lines.count("RCPT TO:<b@example.net>"), 1)  # not even tried again
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        yield self.until(lambda: self.q1 not in self.gw.service.spool.queueIds())
        self.assertEqual(sorted(self.hop_.recipients()), ["b@example.net", "c@example.net"])

    @defer.inlineCallbacks
    def test_releaseOnlyThatMessage(self):
        """release retries the released message now, and nothing else."""
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.hop_.rcpt.clear()  # the next hop recovers
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        yield self.until(lambda: self.q1 not in self.gw.service.spool.queueIds())
        self.assertEqual(self.hop_.recipients(), ["b@example.net"])
        self.assertEqual(self.gw.service.spool.queueIds(), [self.q2])  # waits for its retry time
        self.assertEqual([n for n in os.listdir(self.gw.service.spool.directory) if n.startswith("release")], [])

    @defer.inlineCallbacks
    def test_strayHoldMarkerCleared(self):
        """A hold marker whose message has gone (delivered as it was held) is cleared."""
        spool = self.gw.service.spool
        with open(spool.path("hold", "0123456789ABCDEF"), "w"):
            pass
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        yield self.until(lambda: not os.path.exists(spool.path("hold", "0123456789ABCDEF")))
        self.assertTrue(spool.isHeld(self.q1))  # a message still queued keeps its hold

    def test_delete(self):
        code, out = self.run_("delete", self.q1)
        self.assertEqual((code, out), (0, "deleted %s\n" % self.q1))
        self.assertNotIn(self.q1, self.gw.service.spool.queueIds())
        self.assertEqual(self.run_("show", self.q1)[0], 1)
        self.assertEqual(self.stderr.getvalue(), "relaygw-queue: no such message: %s\n" % self.q1)
        self.assertEqual(self.run_("delete", "../etc")[0], 1)
        self.assertEqual(self.gw.service.spool.queueIds(), [self.q2])
        self.assertFalse(os.path.exists(self.gw.service.spool.path("state", self.q1)))

    def test_consoleScript(self):
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")

        def run():
            return subprocess.run([exe, "--config", self.gw.path, "list"], capture_output=True, text=True,
                                  timeout=30, env=sourceEnv())

        def check(p):
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(self.q1, p.stdout)
            self.assertIn("2 message(s)", p.stdout)

        return inThread(run).addCallback(check)

    @defer.inlineCallbacks
    def test_readingWhileTheGatewayWrites(self):
        """list and show while messages are accepted, delivered and removed: no error, nothing changed."""
        from tests.test_relay import sendOne

        def senders():
            return [sendOne(self.gw.port, rcpts=("z%d@example.net" % i,)) for i in range(15)]

        def readers():
            codes = []
            for _ in range(60):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stderr(err):
                    codes.append(tool.main(["--config", self.gw.path, "list"], out=out))
                    for line in out.getvalue().splitlines()[:-1]:
                        code = tool.main(["--config", self.gw.path, "show", line.split()[0]], out=io.StringIO())
                        # A message may be delivered between list and show, nothing else.
                        codes.append(code if code == 0 or "no such message" in err.getvalue() else code + 100)
            return codes

        _, codes = yield defer.gatherResults([inThread(senders), inThread(readers)])
        self.assertEqual(set(codes), {0} | ({1} & set(codes)))
        yield self.until(lambda: len(self.hop_.transactions) == 15)
        self.assertEqual(sorted(self.hop_.recipients()), sorted("z%d@example.net" % i for i in range(15)))
        yield self.until(lambda: sorted(self.gw.service.spool.queueIds()) == sorted([self.q1, self.q2]))
        self.assertEqual(self.gw.service.spool.readState(self.q1)["rcpts"]["b@example.net"]["status"], "deferred")

    def test_badIds(self):
        before = sorted(os.listdir(self.gw.service.spool.path("queue")))
        for bad in ("", "nosuch", "../queue", "/etc/passwd", ".", "..", "queue/" + self.q1):
            for command in ("show", "delete", "hold", "release"):
                self.assertEqual(self.run_(command, bad), (1, ""), (command, bad))
                self.assertIn("no such message", self.stderr.getvalue())
        self.assertEqual(sorted(os.listdir(self.gw.service.spool.path("queue"))), before)
        self.assertEqual(os.listdir(self.gw.service.spool.path("hold")), [])


class WorkerPartitionTests(unittest.TestCase):
    """
    With [process] workers = N each worker has its own spool partition
    (spool/wK): the tool sees, and steers, every partition.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "relaygw.toml")
        with open(self.config, "w") as f:
            f.write(configText(self.directory) + "\n[process]\nworkers = 2\n")
        self.spools = []
        self.ids = []
        for worker in (0, 1):
            spool = Spool(os.path.join(self.directory, "spool", "w%d" % worker), Committer(reactor))
            spool.open()
            w = spool.newMessage({"mailfrom": "s%d@example.org" % worker, "mail_params": {},
                                  "recipients": ["r%d@example.net" % worker], "arrival": time.time(),
                                  "context": {"connection": {}, "message": {}}})
            w.write(b"Subject: w%d\r\n\r\nbody\r\n" % worker)
            qid = yield w.commit()
            self.spools.append(spool)
            self.ids.append(qid)

    def run_(self, *argv):
        out = io.StringIO()
        code = tool.main(["--config", self.config] + list(argv), out=out)
        return code, out.getvalue()

    def test_listShowsEveryPartition(self):
        code, out = self.run_("list")
        self.assertEqual(code, 0)
        for worker, qid in enumerate(self.ids):
            [line] = [l for l in out.splitlines() if l.startswith(qid)]
            self.assertIn("<s%d@example.org>" % worker, line)
            self.assertIn("<r%d@example.net>:pending" % worker, line)
        self.assertIn("2 message(s)", out)

    def test_commandsFindTheMessageInItsPartition(self):
        qid, spool = self.ids[1], self.spools[1]
        code, out = self.run_("show", qid)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["envelope"]["mailfrom"], "s1@example.org")
        self.assertEqual(self.run_("hold", qid)[0], 0)
        self.assertTrue(spool.isHeld(qid))
        self.assertIn("next=held", self.run_("list")[1])
        self.assertEqual(self.run_("release", qid)[0], 0)
        self.assertFalse(spool.isHeld(qid))
        self.assertEqual(self.run_("delete", qid)[0], 0)
        self.assertEqual(spool.queueIds(), [])
        self.assertEqual(self.spools[0].queueIds(), [self.ids[0]])

    def test_flushReachesEveryWorker(self):
        self.assertEqual(self.run_("flush")[0], 0)
        # Each worker's queue manager polls for the marker in its own partition.
        for spool in self.spools:
            self.assertTrue(os.path.exists(os.path.join(spool.directory, "flush")), spool.directory)
