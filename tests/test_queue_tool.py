"""relaygw-queue against the spool of a running gateway."""

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from relaygw.scripts import queue as tool
from relaygw.durable import Committer
from relaygw.spool import Spool
from relaygw.testing import Gateway, configText, inThread
from tests.messages import sendOne
from tests.outside import OutsideFiles
from tests.processes import sourceEnv
from tests.recorders import LogCapture
from tests.relaysetup import FAST, RelayTestCase, TrackingHopFactory


def block(out, qid):
    """The lines C{list} prints for C{qid}: its row, then one per recipient."""
    lines = out.splitlines()
    [start] = [i for i, l in enumerate(lines) if l.startswith(qid)]
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    return lines[start:end]


class QueueToolTests(RelayTestCase):
    def run_(self, *argv):
        out, self.stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(self.stderr):
            code = tool.main(["--config", self.gw.path] + list(argv), out=out)
        return code, out.getvalue()

    @defer.inlineCallbacks
    def setUp(self):
        self.hop_, port = self.hop(rcpt={"b@example.net": "451 4.3.0 not now", "c@example.net": "451 4.3.0 not now"})
        self.hopPort = port
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.pollInterval = 0.2
        self.q1 = yield self.send(rcpts=("b@example.net",))
        self.q2 = yield self.send(rcpts=("c@example.net",), mailfrom="d@example.org")
        spool = self.gw.service.spool
        yield self.until(lambda: all(spool.readState(q).get("attempts") for q in (self.q1, self.q2)))

    def test_listAndShow(self):
        code, out = self.run_("list")
        self.assertEqual(code, 0)
        row, rcpt = block(out, self.q1)
        self.assertIn("<a@example.org>", row)
        self.assertIn("(next attempt 20", row)  # a date
        self.assertEqual(rcpt.split(), ["<b@example.net>", "deferred", "451", "4.3.0", "not", "now"])
        size = self.gw.service.spool.load(self.q1).size
        self.assertEqual(row.split()[3], str(size))
        self.assertEqual(out.splitlines()[-1],
                         "-- 2 messages, %d bytes: 0 active, 2 deferred, 0 held; 0 corrupt" % (2 * size))
        code, out = self.run_("show", self.q2)
        shown = json.loads(out)
        self.assertEqual(shown["envelope"]["mailfrom"], "d@example.org")
        self.assertEqual(shown["state"]["rcpts"]["c@example.net"]["status"], "deferred")

    @defer.inlineCallbacks
    def test_holdReleaseFlushDelete(self):
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.assertEqual(block(self.run_("list")[1], self.q1 + "!")[0].split()[-1], "(held)")
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
    def test_pollFailingWithOSErrorLogsALine(self):
        """Out of descriptors for a moment: the poll logs one line (no traceback) and the next one works."""
        logs = LogCapture(self)
        spool = self.gw.service.spool
        take = spool.takeRequests
        failures = []

        def once():
            if not failures:
                failures.append(1)
                raise OSError(errno.EMFILE, "Too many open files")
            return take()

        spool.takeRequests = once
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        yield self.until(lambda: len(self.hop_.lines) and self.hop_.lines.count("RCPT TO:<b@example.net>") == 2)
        [line] = logs.find("queue poll failed: {error}")
        self.assertEqual(line["log_level"], LogLevel.error)
        self.assertEqual([e for e in logs.events if e.get("log_failure") is not None], [])

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

    def test_deleteOfAMessageDeliveredMeanwhile(self):
        """
        The message leaves the spool (its delivery ended) between the tool
        finding it and removing it: the tool says it has no such message
        and exits 1, and leaves no deletion for the gateway to log (before:
        "deleted ID", exit 0, and "removed (relaygw-queue delete)" in the
        mail log for a message that was delivered, not deleted).
        """
        spool = self.gw.service.spool
        act = tool._act

        def deliveredFirst(cmd, found, qid, out, err):
            os.rename(spool.path("queue", qid), spool.path("spent", qid))  # (as the gateway's removal)
            return act(cmd, found, qid, out, err)

        self.patch(tool, "_act", deliveredFirst)
        self.assertEqual(self.run_("delete", self.q1), (1, ""))
        self.assertEqual(self.stderr.getvalue(), "relaygw-queue: no such message: %s\n" % self.q1)
        self.assertEqual([n for n in os.listdir(spool.directory) if n.startswith("deleted")], [])

    def test_allOrDomainPassOverMessagesDeliveredMeanwhile(self):
        """
        A message that ALL or --domain chose, delivered (gone) before the
        tool acts on it, is passed over as postsuper passes over one: the
        others are acted on, exit 0, nothing on standard error (before:
        "no such message" for each, and exit 1, for a command that did
        what it was asked, as a busy gateway delivers).
        """
        spool = self.gw.service.spool
        act = tool._act

        def q1DeliveredFirst(cmd, found, qid, out, err):
            if qid == self.q1 and spool.exists(qid):
                os.rename(spool.path("queue", qid), spool.path("spent", qid))  # (as the gateway's removal)
            return act(cmd, found, qid, out, err)

        self.patch(tool, "_act", q1DeliveredFirst)
        self.assertEqual(self.run_("hold", "--domain", "example.net"), (0, "held %s\n" % self.q2))
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(self.run_("release", "ALL"), (0, "released %s\n" % self.q2))
        self.assertEqual(self.stderr.getvalue(), "")
        os.rename(spool.path("spent", self.q1), spool.path("queue", self.q1))
        self.assertEqual(self.run_("delete", "ALL"), (0, "deleted %s\n" % self.q2))
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(spool.queueIds(), [])

    @defer.inlineCallbacks
    def test_deleteIsLogged(self):
        """
        A message deleted with the tool leaves the mail log with a line
        (Postfix's postsuper logs "removed" too), within a poll of the
        running gateway, and its retry is forgotten: before, its story
        ended at its last "deferred" line.
        """
        logs = LogCapture(self)
        self.assertEqual(self.run_("delete", self.q1)[0], 0)
        yield self.until(lambda: logs.find("removed", qid=self.q1))
        [line] = logs.find("removed", qid=self.q1)
        self.assertEqual(formatEvent(line), "%s: removed (relaygw-queue delete)" % (self.q1,))
        self.assertNotIn(self.q1, self.gw.service.queue.timers)
        self.assertIn(self.q2, self.gw.service.queue.timers)
        self.assertEqual(logs.find("removed", qid=self.q2), [])
        self.assertEqual([n for n in os.listdir(self.gw.service.spool.directory) if n.startswith("deleted")], [])
        # Nothing of it stays in the queue manager (it would for as long as the gateway runs).
        attempts = self.gw.service.queue.attempts
        self.assertEqual([self.q1 in held for held in (attempts.mailLog.queuedAt, attempts.handBacks.waitedSince,
                                                        attempts.progress.unwritten)], [False] * 3)
        self.assertIn(self.q2, attempts.mailLog.queuedAt)

    @defer.inlineCallbacks
    def test_deletedMarkerForAQueuedMessage(self):
        """
        A deletion marker for a message still queued (left by hand, or a
        stale one) deleted nothing: no "removed" line, and the message
        keeps its retry (it was left waiting until a restart or a flush).
        """
        logs = LogCapture(self)
        spool = self.gw.service.spool
        with open(os.path.join(spool.directory, "deleted." + self.q1), "w"):
            pass
        yield self.until(lambda: not os.path.exists(os.path.join(spool.directory, "deleted." + self.q1)))
        self.assertEqual(logs.find("removed", qid=self.q1), [])
        self.assertIn(self.q1, self.gw.service.queue.timers)
        self.assertIn(self.q1, spool.queueIds())

    @defer.inlineCallbacks
    def test_holdAndReleaseAreLogged(self):
        """
        hold and release leave a line each in the mail log, as postsuper -h
        and -H log theirs, within a poll of the running gateway; holding a
        message that is held already logs nothing more.  The release still
        tries the message at once.
        """
        logs = LogCapture(self)
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        yield self.until(lambda: logs.find("placed on hold", qid=self.q1))
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        yield self.until(lambda: logs.find("released from hold", qid=self.q1))
        yield self.until(lambda: self.hop_.lines.count("RCPT TO:<b@example.net>") == 2)
        yield task.deferLater(reactor, 0.5, lambda: None)  # (polls after: nothing logged twice)
        lines = [formatEvent(e) for e in logs.events if e.get("event") in ("held", "released")]
        self.assertEqual(lines, ["%s: placed on hold" % self.q1, "%s: released from hold" % self.q1])
        [held] = logs.find("placed on hold")
        self.assertEqual((held["log_namespace"], held["log_level"]), ("relaygw.qmgr", LogLevel.info))
        self.assertEqual(self.hop_.lines.count("RCPT TO:<c@example.net>"), 1)  # (only the released one tried)
        self.assertEqual([n for n in os.listdir(self.gw.service.spool.directory) if n.startswith(("held", "rel"))],
                         [])

    @defer.inlineCallbacks
    def test_releaseWhileStoppedLoggedBeforeTheDelivery(self):
        """
        A message released while the gateway is stopped has its release
        logged at the next start before its delivery (the first poll came
        after the delivery it let go).
        """
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        logs = LogCapture(self)
        yield self.until(lambda: logs.find("placed on hold", qid=self.q1))
        yield self.gw.stop()
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        self.hop_.rcpt.clear()  # the next hop recovers
        self.gw = Gateway(self.gw.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % self.hopPort], retry_min=300, retry_max=300))
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        yield self.until(lambda: logs.find("status=", qid=self.q1))
        order = [e.get("event") for e in logs.events if e.get("qid") == self.q1 and e.get("event") in
                 ("released", "delivery")]
        self.assertEqual(order, ["released", "delivery"])

    def test_consoleScript(self):
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")

        def run():
            return subprocess.run([exe, "--config", self.gw.path, "list"], capture_output=True, text=True,
                                  timeout=30, env=sourceEnv())

        def check(p):
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(self.q1, p.stdout)
            self.assertIn("-- 2 messages", p.stdout)

        return inThread(run).addCallback(check)

    @defer.inlineCallbacks
    def test_readingWhileTheGatewayWrites(self):
        """list and show while messages are accepted, delivered and removed: no error, nothing changed."""

        def senders():
            return [sendOne(self.gw.port, rcpts=("z%d@example.net" % i,)) for i in range(15)]

        def readers():
            codes = []
            for _ in range(60):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stderr(err):
                    codes.append(tool.main(["--config", self.gw.path, "list"], out=out))
                    for line in out.getvalue().splitlines()[1:-1]:
                        if line.startswith(" "):
                            continue
                        code = tool.main(["--config", self.gw.path, "show", line.split()[0].rstrip("*!")],
                                         out=io.StringIO())
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
    (spool/wK): the tool sees, and steers, every partition, and refuses to
    run when one is a symbolic link, as the gateway refuses to start.
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
            row, rcpt = block(out, qid)
            self.assertIn("<s%d@example.org>" % worker, row)
            self.assertEqual(rcpt.split(), ["<r%d@example.net>" % worker, "pending"])
        self.assertIn("-- 2 messages", out)

    def test_commandsFindTheMessageInItsPartition(self):
        qid, spool = self.ids[1], self.spools[1]
        code, out = self.run_("show", qid)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["envelope"]["mailfrom"], "s1@example.org")
        self.assertEqual(self.run_("hold", qid)[0], 0)
        self.assertTrue(spool.isHeld(qid))
        self.assertEqual(block(self.run_("list")[1], qid)[0].split()[-1], "(held)")
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

    def test_linkedPartitionRefused(self):
        """One line naming the link, exit 1, and nothing done in any partition."""
        link, moved = self.spools[1].directory, os.path.abspath(self.mktemp())
        os.rename(link, moved)
        os.symlink(moved, link)
        for argv in (["list"], ["hold", "ALL"], ["flush"]):
            self.assertEqual(runTool("--config", self.config, *argv),
                             (1, "", "relaygw-queue: spool: %s is a symbolic link, not a directory; "
                                     "refusing to use the spool\n" % (link,)), argv)
        for directory in (self.spools[0].directory, moved):
            self.assertEqual(os.listdir(os.path.join(directory, "hold")), [])
            self.assertFalse(os.path.exists(os.path.join(directory, "flush")))


def runTool(*argv, stdin=None):
    """relaygw-queue in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stderr(err):
            code = tool.main(list(argv), out=out)
    finally:
        sys.stdin = old
    return code, out.getvalue(), err.getvalue()


class BulkAndRobustnessTests(unittest.TestCase):
    """Bulk forms, release of a message not held, and no traceback whatever the spool holds."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        self.ids = []
        for rcpt in ("a@one.example", "b@two.example", "c@Two.Example", "d@three.example"):
            w = self.spool.newMessage({"mailfrom": "s@example.org", "recipients": [rcpt], "arrival": time.time(),
                                       "context": {"connection": {}, "message": {}}})
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            self.ids.append((yield w.commit()))

    @defer.inlineCallbacks
    def queueMany(self, recipients=1):
        """600 more messages: more output than a pipe's reader takes before it goes."""
        for i in range(600):
            w = self.spool.newMessage({"mailfrom": "s%d@example.org" % i, "recipients": ["r@example.net"] * recipients,
                                       "context": {}})
            w.write(b"x\r\n")
            yield w.commit()

    def shellTool(self, line, timeout=60):
        """Run C{relaygw-queue --spool DIR LINE} through the shell (in a thread): its C{CompletedProcess}."""
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")
        return inThread(subprocess.run, "%s --spool %s %s" % (exe, self.dir, line), shell=True, capture_output=True,
                        text=True, timeout=timeout, env=sourceEnv())

    def test_listWithoutTheRightToRead(self):
        """
        list or show by a user who may not read the queue files: an error
        naming the file and why, exit 1 (before: every message listed as
        "unreadable: Permission denied" and counted corrupt, "0 messages
        ...; 4 corrupt", exit 0, a false alarm for a check run as another
        user).
        """
        kw = {}
        if os.getuid() == 0:
            # Root may read anything: the tool runs as another user, who may enter the spool's directories.
            kw = {"user": 65534, "group": 65534, "extra_groups": []}
            for top in (os.path.dirname(self.dir), self.dir):
                os.chmod(top, 0o755)
        else:
            for qid in self.ids:
                os.chmod(self.spool.path("queue", qid), 0)
                self.addCleanup(os.chmod, self.spool.path("queue", qid), 0o640)
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")
        first = self.spool.path("queue", self.ids[0])
        for argv in (["list"], ["show", self.ids[0]]):
            p = subprocess.run([exe, "--spool", self.dir] + argv, capture_output=True, text=True, timeout=60,
                               env=sourceEnv(), **kw)
            self.assertEqual((p.returncode, p.stderr), (1, "relaygw-queue: error: %s: Permission denied\n" % first),
                             argv)
            self.assertNotIn("corrupt", p.stdout)

    def test_changesWithoutTheRight(self):
        """
        hold ALL by a user who may not change the spool: one error line,
        exit 1 (before: "cannot hold ID: ... Permission denied" for each
        message, 5,000 lines for 5,000 messages, all saying the same).
        """
        if os.getuid() != 0:
            raise unittest.SkipTest("needs root, to run the tool as another user")
        for top in (os.path.dirname(self.dir), self.dir):
            os.chmod(top, 0o755)
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")
        p = subprocess.run([exe, "--spool", self.dir, "hold", "ALL"], capture_output=True, text=True, timeout=60,
                           env=sourceEnv(), user=65534, group=65534, extra_groups=[])
        self.assertEqual((p.returncode, p.stderr), (1, "relaygw-queue: error: %s: Permission denied\n"
                                                    % self.spool.path("hold", self.ids[0])))
        self.assertEqual([q for q in self.ids if self.spool.isHeld(q)], [])

    def test_releaseNotHeld(self):
        """release of a message that is not held says so, exits 1 and changes nothing."""
        before = sorted(os.listdir(self.dir))
        code, out, err = runTool("--spool", self.dir, "release", self.ids[0])
        self.assertEqual((code, out, err), (1, "", "relaygw-queue: %s is not held; nothing changed\n" % self.ids[0]))
        self.assertEqual(sorted(os.listdir(self.dir)), before)  # no release request left either
        self.assertEqual(runTool("--spool", self.dir, "hold", self.ids[0])[:2], (0, "held %s\n" % self.ids[0]))
        self.assertEqual(runTool("--spool", self.dir, "release", self.ids[0])[:2], (0, "released %s\n" % self.ids[0]))
        self.assertFalse(self.spool.isHeld(self.ids[0]))

    def test_releaseAllReleasesTheHeld(self):
        """
        release ALL (or --domain) lets every held message among them go, as
        postsuper -H ALL, and says nothing of those that were not held: a
        queue of deferred mail with a few held messages is no error.
        """
        for q in (self.ids[1], self.ids[3]):
            self.assertEqual(runTool("--spool", self.dir, "hold", q)[0], 0)
        self.assertEqual(runTool("--spool", self.dir, "release", "--domain", "three.example"),
                         (0, "released %s\n" % (self.ids[3],), ""))
        self.assertEqual(runTool("--spool", self.dir, "release", "ALL"), (0, "released %s\n" % (self.ids[1],), ""))
        self.assertEqual(runTool("--spool", self.dir, "release", "ALL"), (0, "no messages\n", ""))
        self.assertFalse(any(self.spool.isHeld(q) for q in self.ids))

    def test_configAndSpoolExcludeEachOther(self):
        """--config and --spool both given: a usage error, not one of them silently ignored."""
        config = os.path.join(self.dir, "relaygw.toml")
        with open(config, "w") as f:
            f.write(configText(os.path.join(self.dir, "other")))
        with self.assertRaises(SystemExit) as e:
            runTool("--config", config, "--spool", self.dir, "hold", "ALL")
        self.assertEqual(e.exception.code, 2)
        self.assertFalse(any(self.spool.isHeld(q) for q in self.ids))

    def test_noSpoolThere(self):
        """A spool directory that does not exist is an error for every command alike, and nothing is created."""
        missing = os.path.join(self.dir, "nonexistent")
        for argv in (["list"], ["show", self.ids[0]], ["hold", "ALL"], ["release", "ALL"], ["flush"],
                     ["delete", "--domain", "example.net"]):
            self.assertEqual(runTool("--spool", missing, *argv),
                             (1, "", "relaygw-queue: error: no spool at %s\n" % (missing,)), argv)
        self.assertFalse(os.path.exists(missing))

    def test_notASpool(self):
        """
        A directory that holds no spool (a mistyped --spool: no queue/ in
        it, nor in any partition) is an error for every command alike, as
        one that does not exist: not "0 messages", nor a flush marker left
        in it and "flush requested".
        """
        other = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(other, "w0"))
        with open(os.path.join(other, "notes"), "w"):
            pass
        for argv in (["list"], ["show", self.ids[0]], ["hold", "ALL"], ["release", "ALL"], ["flush"],
                     ["flush", self.ids[0]], ["delete", "--domain", "example.net"], ["delete", "ALL"]):
            self.assertEqual(runTool("--spool", other, *argv),
                             (1, "", "relaygw-queue: error: no spool at %s\n" % (other,)), argv)
        self.assertEqual(sorted(os.listdir(other)), ["notes", "w0"])
        self.assertEqual(os.listdir(os.path.join(other, "w0")), [])

    def test_moreWorkersNotYetStarted(self):
        """
        A config given more workers than the gateway runs with (not yet
        restarted, so no partitions): the tool still sees the spool it
        has, not "no spool" (nor, before, "0 messages").
        """
        other = os.path.abspath(self.mktemp())
        os.makedirs(other)
        config = os.path.join(other, "relaygw.toml")
        with open(config, "w") as f:
            f.write(configText(other, spool={"directory": self.dir}, process={"workers": 2}))
        code, out, err = runTool("--config", config, "list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("-- 4 messages", out)
        self.assertEqual(runTool("--config", config, "hold", self.ids[0]), (0, "held %s\n" % self.ids[0], ""))
        self.assertTrue(self.spool.isHeld(self.ids[0]))

    def test_everyConfigErrorALine(self):
        """A config with several errors: each its own line, named as the tool's, as the check prints them."""
        path = os.path.join(os.path.abspath(self.mktemp()) + ".toml")
        with open(path, "w") as f:
            f.write("[spool]\ndirectory = 5\nbogus = 1\n\n[[listener]]\nname = \"a\"\n")
        self.assertEqual(runTool("--config", path, "list"), (1, "", "".join("relaygw-queue: %s\n" % line for line in (
            "%s: spool.bogus: unknown key (expected one of the keys etc/relaygw.toml lists)",
            "%s: spool.directory: wrong type integer (expected a string)",
            "%s: listener[0].endpoint: missing required key (expected a string)")) % ((os.path.basename(path),) * 3)))

    def test_holdAll(self):
        code, out, _ = runTool("--spool", self.dir, "hold", "ALL")
        self.assertEqual(code, 0)
        self.assertEqual(out, "".join("held %s\n" % q for q in self.ids))
        self.assertTrue(all(self.spool.isHeld(q) for q in self.ids))
        self.assertTrue(runTool("--spool", self.dir, "list")[1].endswith("0 active, 0 deferred, 4 held; 0 corrupt\n"))

    def test_byDomain(self):
        """--domain matches a recipient's domain, whatever its case."""
        code, out, _ = runTool("--spool", self.dir, "delete", "--domain", "two.example")
        self.assertEqual(code, 0)
        self.assertEqual(out, "deleted %s\ndeleted %s\n" % (self.ids[1], self.ids[2]))
        self.assertEqual(self.spool.queueIds(), [self.ids[0], self.ids[3]])

    @defer.inlineCallbacks
    def test_byDomainAsTheRouterNamesIt(self):
        """
        --domain matches a recipient's domain as the router names it: with a
        root dot, or an address literal written another way, it is the same
        destination (they were left out).
        """
        ids = []
        for rcpt in ("e@two.example.", "f@[IPv6:2001:db8:0:0::1]", "g@[tag:x@two.example]"):
            w = self.spool.newMessage({"mailfrom": "s@example.org", "recipients": [rcpt], "arrival": time.time(),
                                       "context": {"connection": {}, "message": {}}})
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            ids.append((yield w.commit()))
        code, out, _ = runTool("--spool", self.dir, "hold", "--domain", "Two.Example.")
        self.assertEqual((code, out), (0, "".join("held %s\n" % q for q in (self.ids[1], self.ids[2], ids[0]))))
        code, out, _ = runTool("--spool", self.dir, "hold", "--domain", "[ipv6:2001:db8::1]")
        self.assertEqual((code, out), (0, "held %s\n" % (ids[1],)))

    def test_idsFromStdin(self):
        code, out, err = runTool("--spool", self.dir, "hold", "-", stdin="%s\n\n%s\nnosuch\n" % (self.ids[0], self.ids[3]))
        self.assertEqual(code, 1)  # one id was not found; the others were held
        self.assertEqual(out, "held %s\nheld %s\n" % (self.ids[0], self.ids[3]))
        self.assertEqual(err, "relaygw-queue: no such message: nosuch\n")
        self.assertEqual([self.spool.isHeld(q) for q in self.ids], [True, False, False, True])

    def test_flushSome(self):
        code, out, _ = runTool("--spool", self.dir, "flush", self.ids[2])
        self.assertEqual((code, out), (0, "flush requested for %s\n" % self.ids[2]))
        self.assertEqual(self.spool.takeRequests(), (False, [self.ids[2]], [], [], []))

    def test_anySpoolContent(self):
        """Garbage in every file and name: every command answers without a traceback."""
        q = self.ids
        with open(self.spool.path("queue", q[0]), "wb") as f:
            f.write(b"\xff\xfe\x00\n")
        with open(self.spool.path("state", q[1]), "wb") as f:
            f.write(b"[1, 2, 3]")
        with open(self.spool.path("queue", q[2]), "wb") as f:
            f.write(b'{"mailfrom": "x\\u001b[31m\\nforged line", "recipients": ["r\\u0000@x"], "arrival": 1e300,'
                    b' "body_size": 0}\n')
        with open(self.spool.path("state", q[3]), "wb") as f:
            f.write(b'{"rcpts": {}, "next_attempt": 1e300, "last_error": "\\u00e9\\r\\n"}')
        os.makedirs(self.spool.path("queue", "ADIRECTORY"))
        with open(os.path.join(self.spool.path("queue"), "na\xefve\nname"), "wb") as f:
            f.write(b"{}")
        with open(self.spool.path("corrupt", "BAD"), "wb") as f:
            f.write(b"")
        with open(self.spool.path("corrupt", "BAD.reason"), "wb") as f:
            f.write(b"\x00not json")
        seen, errors = [], []
        for argv in (["list"], ["show", q[0]], ["show", q[1]], ["show", q[2]], ["show", q[3]], ["show", "ADIRECTORY"],
                     ["hold", "ALL"], ["release", "ALL"], ["flush", "--domain", "x"], ["delete", "--domain", "x"],
                     ["delete", "BAD"], ["delete", "ALL"]):
            code, out, err = runTool("--spool", self.dir, *argv)
            self.assertNotIn("Traceback", out + err, argv)
            self.assertIn(code, (0, 1), (argv, err))
            seen.append(out)
            errors.append(err)
        listing = seen[0]
        self.assertNotIn("\x1b", listing)
        self.assertNotIn("\nforged line", listing)
        self.assertIn("unreadable: garbled envelope", listing)
        self.assertIn("unreadable: state file is not a progress record", listing)
        self.assertIn("x\\x1b[31m\\nforged line", listing)
        self.assertIn("BAD#", listing)
        self.assertTrue(all(l.isascii() for l in listing.splitlines()))
        # A name that is no queue id is no message: not listed (a warning, escaped, says so), nor acted on by ALL.
        self.assertIn("1 files whose names are no queue ids, not listed: 'na\\xefve\\nname'", errors[0])
        self.assertTrue(errors[0].isascii())
        self.assertTrue(os.path.exists(os.path.join(self.spool.path("queue"), "na\xefve\nname")))
        # What hold, release and delete say of each message is escaped too.
        for argv, out in zip(("hold", "release", "delete"), (seen[6], seen[7], seen[11])):
            self.assertNotIn("xefve", out, argv)
            self.assertTrue(all(" " <= c <= "~" for l in out.splitlines() for c in l), (argv, out))

    def test_everythingInCorruptListed(self):
        """
        Whatever corrupt/ holds is listed, once per name with its reason
        when it has one (a later quarantine's ID.1, a progress record or a
        reason alone, names that are no queue ids), can be shown and
        deleted by the name listed, and never ends the tool with an error.
        """
        files = {"Q1": b"x", "Q1.reason": b'{"reason": "first", "time": 1}',
                 "Q1.1": b"y", "Q1.1.reason": b'{"reason": "second", "time": 2}',
                 "Q2.state": b"{}", "Q2.reason": b'{"reason": "progress only", "time": 3}',
                 "Q3.reason": b'{"reason": "reason only", "time": 4}',
                 "Q4": b"z", "Q4.reason": b'{"reason": "far future", "time": 1%s}' % (b"0" * 400),
                 "note.txt": b"", "na\xefve\nname": b"", ".reason": b"", "..state": b"", "ALL": b""}
        for name, content in files.items():
            with open(self.spool.path("corrupt", name), "wb") as f:
                f.write(content)
        os.makedirs(self.spool.path("corrupt", "Q5.reason"))
        listed = ["..state", ".reason", "ALL", "Q1", "Q1.1", "Q2", "Q3", "Q4", "Q5", "na\\xefve\\nname", "note.txt"]
        code, out, err = runTool("--spool", self.dir, "list")
        self.assertEqual((code, err), (0, ""))
        rows = {l.split("#")[0]: l.split("corrupt: ")[1] for l in out.splitlines() if "  corrupt: " in l}
        self.assertEqual(sorted(rows), listed)
        self.assertEqual((rows["Q1"], rows["Q1.1"], rows["Q2"], rows["Q3"], rows["Q4"], rows["Q5"], rows["note.txt"]),
                         ("first", "second", "progress only", "reason only", "far future", "unknown", "unknown"))
        self.assertTrue(out.endswith("; %d corrupt\n" % len(listed)), out)
        code, out, err = runTool("--spool", self.dir, "show", "Q1.1")
        self.assertEqual((code, json.loads(out)["corrupt"], err), (0, "second", ""))
        # delete ALL is for the queued messages, whatever corrupt/ holds.
        self.assertEqual(runTool("--spool", self.dir, "delete", "ALL")[:2],
                         (0, "".join("deleted %s\n" % q for q in self.ids)))
        code, out, err = runTool("--spool", self.dir, "delete", "Q1.1", "Q2", "Q3", "note.txt", ".reason", "..state")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "".join("deleted %s (corrupt)\n" % n for n in ("Q1.1", "Q2", "Q3", "note.txt", ".reason",
                                                                              "..state")))
        self.assertEqual(sorted(os.listdir(self.spool.path("corrupt"))),
                         ["ALL", "Q1", "Q1.reason", "Q4", "Q4.reason", "Q5.reason", "na\xefve\nname"])
        self.assertEqual(runTool("--spool", self.dir, "delete", "../queue", "Q1.reason")[0], 1)
        self.assertEqual(len(os.listdir(self.spool.path("corrupt"))), 7)

    def test_directoriesWhereFilesBelong(self):
        """A directory in queue/ or corrupt/ is named and left alone; the other messages go on."""
        os.makedirs(self.spool.path("queue", "DIRX"))
        os.makedirs(self.spool.path("corrupt", "CDIR"))
        code, out, err = runTool("--spool", self.dir, "delete", "CDIR", "DIRX", self.ids[0])
        self.assertEqual(code, 1)
        self.assertEqual(out, "deleted %s\n" % self.ids[0])
        self.assertEqual(err, "relaygw-queue: cannot delete CDIR: %s: Is a directory\n"
                              "relaygw-queue: cannot delete DIRX: %s: Is a directory\n"
                         % (self.spool.path("corrupt", "CDIR"), self.spool.path("queue", "DIRX")))
        self.assertTrue(os.path.isdir(self.spool.path("queue", "DIRX")))
        self.assertTrue(os.path.isdir(self.spool.path("corrupt", "CDIR")))
        code, out, err = runTool("--spool", self.dir, "delete", "ALL")
        self.assertEqual((code, out), (1, "".join("deleted %s\n" % q for q in self.ids[1:])))
        self.assertEqual(err, "relaygw-queue: cannot delete DIRX: %s: Is a directory\n"
                         % self.spool.path("queue", "DIRX"))
        self.assertEqual(self.spool.queueIds(), ["DIRX"])

    def test_deleteByDomainPastADirectory(self):
        """A directory at state/ID: the message is deleted all the same, the directory named and left alone."""
        os.makedirs(self.spool.path("state", self.ids[1]))
        code, out, err = runTool("--spool", self.dir, "delete", "--domain", "two.example")
        self.assertEqual((code, out), (0, "deleted %s\ndeleted %s\n" % (self.ids[1], self.ids[2])))
        self.assertEqual(err, "relaygw-queue: warning: %s is a directory, not a spool file: left alone\n"
                         % self.spool.path("state", self.ids[1]))
        self.assertEqual(self.spool.queueIds(), [self.ids[0], self.ids[3]])

    @defer.inlineCallbacks
    def test_listIntoHead(self):
        """list | head: no BrokenPipeError traceback, however long the listing."""
        yield self.queueMany(recipients=3)
        p = yield self.shellTool("list | head -2", timeout=30)
        self.assertEqual(p.stderr, "")
        self.assertEqual(len(p.stdout.splitlines()), 2)
        self.assertTrue(p.stdout.startswith("QUEUE ID"))

    @defer.inlineCallbacks
    def test_changesIntoHead(self):
        """
        hold ALL | head -1, delete ALL | head -1: every message is acted on
        all the same, and none is said to have failed (before: each one
        after the reader went away got "cannot hold ID: Broken pipe", though
        it was held).
        """
        yield self.queueMany()
        p = yield self.shellTool("hold ALL | head -1")
        self.assertEqual(p.stderr, "")
        self.assertRegex(p.stdout, r"^held \S+\n$")
        ids = self.spool.queueIds()
        self.assertEqual(len(ids), 604)
        self.assertEqual([q for q in ids if not self.spool.isHeld(q)], [])
        p = yield self.shellTool("delete ALL | head -1")
        self.assertEqual(p.stderr, "")
        self.assertRegex(p.stdout, r"^deleted \S+\n$")
        self.assertEqual(self.spool.queueIds(), [])

    @defer.inlineCallbacks
    def test_changesWithNoWayToReport(self):
        """
        hold ALL, then release ALL, with standard output closed or a full
        device: every message is acted on all the same, and one line says
        the output failed, exit 1 (before: with it closed, the first message
        only, and "error: 'NoneType' object has no attribute 'write'"; on a
        full device "cannot release ID: No space left on device" for each
        one past the first block of output, though it was released).
        """
        yield self.queueMany()
        for redirection, why in ((">&-", "standard output is closed"), (">/dev/full", "No space left on device")):
            p = yield self.shellTool("hold ALL " + redirection)
            self.assertEqual((p.returncode, p.stderr), (1, "relaygw-queue: error: %s\n" % why))
            self.assertEqual([q for q in self.spool.queueIds() if not self.spool.isHeld(q)], [], redirection)
            p = yield self.shellTool("release ALL " + redirection)
            self.assertEqual((p.returncode, p.stderr), (1, "relaygw-queue: error: %s\n" % why))
            self.assertEqual([q for q in self.spool.queueIds() if self.spool.isHeld(q)], [], redirection)
        self.assertEqual(len(self.spool.queueIds()), 604)


class BackoffTests(unittest.TestCase):
    """A flush or release tries at once and leaves the retry backoff as it was."""

    @defer.inlineCallbacks
    def test_forcedAttemptKeepsBackoff(self):
        from twisted.internet import task

        from relaygw.relay.nexthop import Result
        from relaygw.relay.queue import QueueManager

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"], "arrival": time.time(),
                              "context": {}})
        w.write(b"x\r\n")
        qid = yield w.commit()
        attempts = []

        class Hop:
            def describe(self):
                return "test"

            def deliver(self, messages, progress=None):
                attempts.append(time.time())
                return [{"b@example.net": Result(451, "4.3.0", "not now")}]

        clock = task.Clock()
        q = QueueManager(spool, lambda m, r: Hop(), clock, retryMin=100, retryMax=10000)
        q.recovered = spool.open()
        q.startService()
        yield q.whenIdle()
        first = spool.readState(qid)
        self.assertEqual((first["attempts"], first["backoff"]), (1, 1))
        for _ in range(3):  # flushes, then a release
            q.flush()
            yield q.whenIdle()
        spool.hold(qid)
        spool.release(qid)
        clock.advance(q.pollInterval)
        yield q.whenIdle()
        state = spool.readState(qid)
        self.assertEqual(len(attempts), 5)
        self.assertEqual((state["attempts"], state["backoff"]), (5, 1))
        self.assertLess(abs(state["next_attempt"] - first["next_attempt"]), 0.01)
        # The scheduled retry comes at the first interval, and only then does it double.
        clock.advance(99)
        yield q.whenIdle()
        self.assertEqual(len(attempts), 5)
        clock.advance(1.5)
        yield q.whenIdle()
        self.assertEqual(len(attempts), 6)
        state = spool.readState(qid)
        self.assertEqual(state["backoff"], 2)
        self.assertLess(abs(state["next_attempt"] - time.time() - 200), 2)
        yield q.stopService()


class AttemptsEndingAtOnceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_manyHeldMessagesWaiting(self):
        """
        Attempts that end at once, with no I/O (600 held messages, flushed
        while the one delivery slot was busy), run one after another once
        the slot is free, not each inside the last: it took a
        RecursionError, and the message it hit stayed "in flight" for good.
        """
        from relaygw.relay.nexthop import Result
        from relaygw.relay.queue import QueueManager

        spool = Spool(os.path.abspath(self.mktemp()), Committer(reactor))
        spool.open()
        writers = []
        for n in range(601):
            w = spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net"],
                                  "arrival": time.time(), "context": {}})
            w.write(b"m%d\r\n" % n)
            writers.append(w.commit())
        first, *held = yield defer.gatherResults(writers)
        for qid in held:
            spool.hold(qid)
        busy = defer.Deferred()

        class Hop:
            def describe(self):
                return "test"

            def deliver(self, messages, progress=None):
                assert messages[0].queueId == first, "a held message went out"
                return busy

        clock = task.Clock()
        q = QueueManager(spool, lambda m, r: Hop(), clock, concurrency=1)
        q.enqueue(first)
        q.startService()
        q.flush()  # (the slot is busy: all wait)
        clock.advance(0)  # (the flush's second slice)
        self.assertEqual(len(q.ready), 600)
        busy.callback([{"b@example.net": Result(250, "2.0.0", "ok")}])
        for _ in range(1000):  # (past startsPerTurn in a turn, attempts go on at the next turn of the clock)
            yield q.whenIdle()
            yield task.deferLater(reactor, 0, lambda: None)  # (whenIdle fires as the slot frees, before the rest run)
            if not q.ready:
                break
            clock.advance(0)
        self.assertEqual((list(q.ready), q.active), ([], set()))
        self.assertEqual(self.flushLoggedErrors(RecursionError), [])
        yield q.stopService()


class WithdrawnTests(RelayTestCase):
    """
    A message held or deleted while its attempt waits for a connection to
    the next hop (behind a busy one) does not go out: the hold or delete is
    checked again as its content is opened to be sent, as Postfix's
    delivery agents find a message gone from the active queue.
    """

    @defer.inlineCallbacks
    def waitingBehindSlowHop(self, greetDelay=1.5):
        """m0 on the one connection, slow to greet; m1's attempt waits for it."""
        self.logs = LogCapture(self)
        self.hop_, port = self.hop(factory=TrackingHopFactory(greetDelay=greetDelay, extensions=["PIPELINING"]))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.pollInterval = 0.2
        yield self.send(subject="m0", rcpts=("r0@example.net",))
        qid = yield self.send(subject="m1", rcpts=("r1@example.net",))
        yield self.until(lambda: qid in self.gw.service.queue.active)  # its attempt is under way
        self.assertEqual(self.hop_.transactions, [])
        return qid

    def runTool(self, *argv):
        out = io.StringIO()
        code = tool.main(["--config", self.gw.path] + list(argv), out=out)
        return code, out.getvalue()

    @defer.inlineCallbacks
    def test_heldWhileWaiting(self):
        qid = yield self.waitingBehindSlowHop()
        self.assertEqual(self.runTool("hold", qid), (0, "held %s\n" % qid))
        yield self.until(lambda: qid not in self.gw.service.queue.active)
        self.assertEqual(self.hop_.recipients(), ["r0@example.net"])
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])
        self.assertEqual(self.gw.service.spool.readState(qid), {})  # no attempt counted, nothing deferred
        self.assertEqual(len(self.logs.find("not sent: {why}", qid=qid, why="held")), 1)
        self.assertEqual(self.logs.find("status=", qid=qid), [])
        self.assertEqual(self.runTool("release", qid), (0, "released %s\n" % qid))
        yield self.until(lambda: self.spoolEmpty() and len(self.hop_.transactions) == 2)
        self.assertEqual(self.hop_.recipients(), ["r0@example.net", "r1@example.net"])

    @defer.inlineCallbacks
    def test_deletedWhileWaiting(self):
        qid = yield self.waitingBehindSlowHop()
        self.assertEqual(self.runTool("delete", qid), (0, "deleted %s\n" % qid))
        yield self.until(lambda: self.spoolEmpty() and len(self.hop_.transactions) == 1)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.hop_.recipients(), ["r0@example.net"])
        self.assertEqual(len(self.logs.find("not sent: {why}", qid=qid, why="deleted")), 1)
        self.assertEqual([e for e in self.logs.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)], [])
        self.assertEqual(self.logs.find("status=", qid=qid), [])

    @defer.inlineCallbacks
    def test_deletionIsTheLastLine(self):
        """
        A deletion the gateway notices while the message's attempt still
        waits (its poll comes before the slow next hop's greeting) is its
        last line in the mail log, after the attempt's own "not sent" line
        (before: "removed (relaygw-queue delete)", then "not sent: deleted
        before it went out").
        """
        qid = yield self.waitingBehindSlowHop(greetDelay=4)
        self.assertEqual(self.runTool("delete", qid)[0], 0)
        yield self.until(lambda: self.logs.find("removed", qid=qid) and qid not in self.gw.service.queue.active)
        yield task.deferLater(reactor, 0.3, lambda: None)
        lines = [formatEvent(e) for e in self.logs.events if e.get("qid") == qid and e.get("log_format")]
        self.assertEqual(lines[-2:], ["%s: not sent: deleted before it went out" % qid,
                                      "%s: removed (relaygw-queue delete)" % qid])

    @defer.inlineCallbacks
    def deletedAtTheNextHop(self, pollInterval):
        """
        A message deleted with the tool while the next hop has its content
        and has not answered the end of data yet (it goes on, and is sent):
        its lines in the mail log.  The gateway notices the deletion with a
        poll every C{pollInterval} seconds.
        """
        self.logs = LogCapture(self)
        self.hop_, port = self.hop(endOfDataDelay=1.5)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.pollInterval = pollInterval
        qid = yield self.send(subject="m", rcpts=("r@example.net",))
        yield self.until(lambda: self.hop_.messages)  # (the end of data sent, its reply not yet)
        self.assertEqual(self.runTool("delete", qid), (0, "deleted %s\n" % qid))
        yield self.until(lambda: self.spoolEmpty() and qid not in self.gw.service.queue.active)
        yield task.deferLater(reactor, pollInterval + 0.5, lambda: None)
        return qid, [formatEvent(e) for e in self.logs.events if e.get("qid") == qid and e.get("log_format")]

    @defer.inlineCallbacks
    def test_deletedOnceSentRemovedOnce(self):
        """
        A message deleted while its content is with the next hop, which
        then takes it: "sent", then one "removed" line, the deletion's
        (before, its delivery's "removed" and then the deletion's: two
        removals of one message), whether the gateway notices the deletion
        before the end of the attempt or after.
        """
        for pollInterval in (0.2, 3):
            qid, lines = yield self.deletedAtTheNextHop(pollInterval)
            self.assertIn("status=sent", lines[-2])
            self.assertEqual([line for line in lines if "removed" in line],
                             ["%s: removed (relaygw-queue delete)" % qid], pollInterval)

    @defer.inlineCallbacks
    def test_flushWhileUnderWayLeavesNothing(self):
        """
        A flush that finds messages with their attempts under way marks
        nothing that outlives them: once both are delivered (and gone),
        the queue manager holds nothing of either (before, each stayed
        marked as forced for as long as the gateway ran, one more for
        every message a flush found in flight).
        """
        qid = yield self.waitingBehindSlowHop(greetDelay=4)
        self.assertEqual(self.runTool("flush")[0], 0)
        queue = self.gw.service.queue
        yield self.until(lambda: self.logs.find("flush requested"))
        yield self.until(lambda: self.spoolEmpty() and len(self.hop_.transactions) == 2 and not queue.active)
        self.assertEqual(self.hop_.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual((queue.forced, queue.fresh, queue.timers), (set(), {}, {}))
        self.assertNotIn(qid, queue.attempts.mailLog.queuedAt)

    @defer.inlineCallbacks
    def test_heldAndReleasedWhileWaiting(self):
        """Released again before its turn came: it goes out then, at once."""
        qid = yield self.waitingBehindSlowHop()
        spool = self.gw.service.spool
        self.assertEqual(self.runTool("hold", qid)[0], 0)
        self.assertEqual(self.runTool("release", qid)[0], 0)
        yield self.until(lambda: self.spoolEmpty() and len(self.hop_.transactions) == 2)
        self.assertEqual(self.hop_.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual(os.listdir(spool.path("hold")), [])


class SymlinkTests(OutsideFiles, unittest.TestCase):
    """
    Nothing outside the spool is created, truncated, read as a message or
    removed through a symbolic link planted in it (the tool runs as root).
    """

    @defer.inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.dir = os.path.join(base, "spool")
        self.outside = os.path.join(base, "outside")
        os.makedirs(self.outside)
        self.spool = Spool(self.dir, Committer(reactor))
        self.spool.open()
        self.ids = []
        for rcpt in ("a@one.example", "b@two.example"):
            w = self.spool.newMessage({"mailfrom": "s@example.org", "recipients": [rcpt], "arrival": time.time(),
                                       "context": {"connection": {}, "message": {}}})
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            self.ids.append((yield w.commit()))

    def test_holdMarkerNotWrittenThrough(self):
        """A symbolic link at hold/ID is not written through: it holds the message, and release removes it."""
        target = self.outsideFile("target", b"precious\n")
        os.symlink(target, self.spool.path("hold", self.ids[0]))
        code, out, err = runTool("--spool", self.dir, "hold", self.ids[0])
        self.assertEqual((code, out), (0, "held %s\n" % self.ids[0]))
        self.assertEqual(err, "relaygw-queue: warning: %s is not a hold marker: left alone\n"
                         % self.spool.path("hold", self.ids[0]))
        self.assertContent(target, b"precious\n")
        self.assertTrue(self.spool.isHeld(self.ids[0]))
        self.assertEqual(runTool("--spool", self.dir, "release", self.ids[0])[:2], (0, "released %s\n" % self.ids[0]))
        self.assertFalse(os.path.lexists(self.spool.path("hold", self.ids[0])))
        self.assertContent(target, b"precious\n")

    def assertRefused(self, area, *commands):
        path = self.spool.path(area)
        for argv in commands:
            self.assertEqual(runTool("--spool", self.dir, *argv),
                             (1, "", "relaygw-queue: spool: %s is a symbolic link, not a directory; "
                                     "refusing to use the spool\n" % (path,)), argv)

    def test_corruptAreaLinkedOutside(self):
        """corrupt/ a symbolic link: the tool refuses to run, and removes nothing there."""
        cdir = os.path.join(self.outside, "cdir")
        os.makedirs(cdir)
        for name in ("victim", "victim.reason"):
            with open(os.path.join(cdir, name), "w"):
                pass
        os.rmdir(self.spool.path("corrupt"))
        os.symlink(cdir, self.spool.path("corrupt"))
        self.assertRefused("corrupt", ["delete", "victim"], ["show", "victim"], ["list"], ["delete", "ALL"])
        self.assertEqual(sorted(os.listdir(cdir)), ["victim", "victim.reason"])
        self.assertEqual(self.spool.queueIds(), self.ids)

    def test_holdAreaLinkedOutside(self):
        """hold/ a symbolic link: nothing is created or removed there."""
        hdir = os.path.join(self.outside, "hdir")
        os.makedirs(hdir)
        self.outsideFile("hdir/" + self.ids[1], b"")
        os.rmdir(self.spool.path("hold"))
        os.symlink(hdir, self.spool.path("hold"))
        self.assertRefused("hold", ["hold", self.ids[0]], ["hold", "ALL"], ["release", "ALL"], ["flush"])
        self.assertEqual(os.listdir(hdir), [self.ids[1]])

    def test_queueFileLinkedOutside(self):
        """A symbolic link in queue/ (even to a well-formed message) is not read: it is unreadable."""
        with open(self.spool.path("queue", self.ids[0]), "rb") as f:
            message = f.read().replace(b"body", b"SECRET")
        os.symlink(self.outsideFile("envcopy", message), self.spool.path("queue", "LINKOUT"))
        code, out, err = runTool("--spool", self.dir, "show", "LINKOUT")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "relaygw-queue: LINKOUT is unreadable: queue file is a symbolic link\n")
        code, out, err = runTool("--spool", self.dir, "list")
        self.assertEqual(code, 0)
        self.assertIn("LINKOUT!", out)
        self.assertIn("unreadable: queue file is a symbolic link", out)

    def test_stateFileLinkedOutside(self):
        target = self.outsideFile("state", b'{"rcpts": {}, "attempts": 7, "last_error": "SECRET"}')
        os.symlink(target, self.spool.path("state", self.ids[1]))
        code, out, err = runTool("--spool", self.dir, "show", self.ids[1])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "relaygw-queue: %s is unreadable: state file is a symbolic link\n" % self.ids[1])

    def test_consoleScriptRefusesALinkedArea(self):
        """The installed relaygw-queue: one line naming the path, exit 1, no traceback."""
        os.rmdir(self.spool.path("hold"))
        os.symlink(self.outside, self.spool.path("hold"))
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")

        def run():
            return subprocess.run([exe, "--spool", self.dir, "hold", "ALL"], capture_output=True, text=True,
                                  timeout=30, env=sourceEnv())

        def check(p):
            self.assertEqual((p.returncode, p.stdout), (1, ""))
            self.assertEqual(p.stderr, "relaygw-queue: spool: %s is a symbolic link, not a directory; "
                                       "refusing to use the spool\n" % self.spool.path("hold"))
            self.assertEqual(os.listdir(self.outside), [])

        return inThread(run).addCallback(check)


class PartlyDeliveredTests(RelayTestCase):
    """relaygw-queue and a message the gateway has delivered to some of its recipients only."""

    @defer.inlineCallbacks
    def test_domainMeansRecipientsStillToDeliver(self):
        """
        --domain picks the messages with a recipient still to deliver in
        that domain, as Postfix's queue tools see only those: one whose
        recipient there is delivered (or bounced) is not deleted with the
        recipients it still has for elsewhere.
        """
        from relaygw.testing import ScriptedSMTPFactory

        hop, port = self.hop(factory=ScriptedSMTPFactory(rcpt={
            "stuck@example.org": "451 4.4.1 come back later", "bad@example.com": "550 5.1.1 no such user"}))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        yield self.send(rcpts=("done@example.net", "bad@example.com", "stuck@example.org"))
        queue = self.gw.service.queue
        yield self.until(lambda: queue.timers and not queue.active)
        spool = self.gw.service.spool
        [qid] = spool.queueIds()
        for domain in ("example.net", "example.com"):
            code, out, _ = yield inThread(runTool, "--spool", spool.directory, "delete", "--domain", domain)
            self.assertEqual((code, out), (0, "no messages\n"))
        self.assertEqual(spool.queueIds(), [qid])
        code, out, _ = yield inThread(runTool, "--spool", spool.directory, "delete", "--domain", "example.org")
        self.assertEqual((code, out), (0, "deleted %s\n" % (qid,)))
        self.assertEqual(spool.queueIds(), [])


class StrayNameTests(RelayTestCase):
    """
    A file in queue/ whose name is no queue id (put there by hand) is no
    message: the gateway leaves it alone, delivers and quarantines nothing
    of it, and says so once at start; list does not show it as a message
    (which show, hold and delete could not name), and warns of it instead.
    """

    STRAYS = ["x y", "a\x01b", "x.y"]

    @defer.inlineCallbacks
    def setUp(self):
        self.hop_, port = self.hop()
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay=dict(FAST, smarthosts=["[127.0.0.1]:%d" % port], tls="none"))
        self.queue = os.path.join(self.gw.directory, "spool", "queue")
        os.makedirs(self.queue)
        for name in self.STRAYS:
            with open(os.path.join(self.queue, name), "wb") as f:
                f.write(b"junk\n")
        self.logs = LogCapture(self)
        yield self.gw.start()
        self.addCleanup(self.gw.stop)
        self.gw.service.queue.pollInterval = 0.2

    def run_(self, *argv):
        return QueueToolTests.run_(self, *argv)

    @defer.inlineCallbacks
    def test_leftAloneNotListed(self):
        [warning] = self.logs.find("no queue ids")
        self.assertEqual(warning["n"], 3)
        yield self.send()
        self.assertEqual(self.run_("flush"), (0, "flush requested\n"))
        spool = self.gw.service.spool
        yield self.until(lambda: not os.path.exists(os.path.join(self.gw.directory, "spool", "flush"))
                         and not spool.queueIds() and not self.gw.service.queue.active)
        self.assertEqual(sorted(os.listdir(self.queue)), sorted(self.STRAYS))
        self.assertEqual(os.listdir(spool.path("corrupt")), [])
        self.assertEqual(spool.depth(), 0)
        code, out = self.run_("list")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[1:], ["-- 0 messages, 0 bytes: 0 active, 0 deferred, 0 held; 0 corrupt"])
        self.assertEqual(self.stderr.getvalue(),
                         "relaygw-queue: warning: %s: 3 files whose names are no queue ids, not listed: "
                         "'a\\x01b', 'x y', 'x.y'\n" % self.queue)
        self.assertEqual(self.run_("show", "x y"), (1, ""))
        self.assertEqual(self.stderr.getvalue(), "relaygw-queue: no such message: x y\n")


class ManyHeldTests(RelayTestCase):
    """
    The queue manager's poll (every pollInterval, on the reactor thread)
    looks for hold markers whose message has gone; with many messages
    held it must not look up each one's queue file every time: with 50,000
    held that took 260 ms every two seconds, a stall for every session.
    """

    MESSAGES = 30

    @defer.inlineCallbacks
    def setUp(self):
        yield self.gateway({"defer_all": True})
        for _ in range(self.MESSAGES):
            yield self.send()
        self.queue = self.gw.service.queue
        self.queue.requests.call.cancel()

    def run_(self, *argv):
        return QueueToolTests.run_(self, *argv)

    def test_pollLooksUpNoHeldMessage(self):
        spool = self.gw.service.spool
        self.assertEqual(self.run_("hold", "ALL")[0], 0)
        with open(spool.path("hold", "0123456789ABCDEF"), "w"):  # (by hand, for a message that has gone)
            pass
        self.queue.requests.poll()
        self.queue.requests.call.cancel()
        self.assertFalse(os.path.exists(spool.path("hold", "0123456789ABCDEF")))
        self.assertEqual(spool.heldCount(), self.MESSAGES)
        looked = []
        for owner, name in ((os, "stat"), (os, "lstat"), (os.path, "exists"), (os.path, "lexists")):
            def counting(path, *args, _real=getattr(owner, name), **kw):
                if str(path).startswith((spool.path("queue"), spool.path("hold") + os.sep)):
                    looked.append(path)
                return _real(path, *args, **kw)
            self.patch(owner, name, counting)
        self.queue.requests.poll()
        self.queue.requests.call.cancel()
        self.assertEqual(looked, [])
        self.assertTrue(all(spool.isHeld(qid) for qid in spool.queueIds()))

    @defer.inlineCallbacks
    def test_manyRequestsTakenAShareAtATime(self):
        """
        hold ALL leaves a marker per message: a poll acts on a bounded share
        of them (with 50,000 at once the poll held the reactor 1.2 s), and
        the next share is taken at the reactor's next turn, not a poll later.
        """
        from relaygw.spool import OperatorRequests

        self.patch(OperatorRequests, "TAKE", 7)
        logs = LogCapture(self)
        self.assertEqual(self.run_("hold", "ALL")[0], 0)
        self.queue.requests.poll()
        self.assertEqual(len(logs.find("placed on hold")), 7)
        self.assertLess(self.queue.requests.call.getTime() - reactor.seconds(), 0.1)
        yield self.until(lambda: len(logs.find("placed on hold")) == self.MESSAGES, timeout=2)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(logs.find("placed on hold")), self.MESSAGES)
        self.assertEqual(self.gw.service.spool.heldCount(), self.MESSAGES)
        self.assertFalse(self.gw.service.spool.requestsPending())
        self.assertGreater(self.queue.requests.call.getTime() - reactor.seconds(), 1)
