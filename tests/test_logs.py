"""
relaygw.logs: the text and JSON-lines observers, and the Logger that drops
events below the configured level before they are built.
"""

import errno
import io
import json
import os
import subprocess

from twisted.application.service import Application
from twisted.internet import defer, reactor, task, threads
from twisted.logger import ILogObserver, LogLevel, capturedLogs
from twisted.trial import unittest

from relaygw import logs


class ObserverTests(unittest.TestCase):
    def test_jsonLinesCarryTheSessionId(self):
        out = io.StringIO()
        observer = logs.makeObserver(out, "json", "info")
        observer({"log_level": LogLevel.info, "log_namespace": "relaygw.smtp", "log_time": 0.0,
                  "log_format": "[{session}] queued {qid}", "session": "S1", "qid": "Q1"})
        record = json.loads(out.getvalue())
        self.assertEqual((record["session"], record["message"], record["level"]),
                         ("S1", "[S1] queued Q1", "info"))

    def test_observerFiltersByLevel(self):
        out = io.StringIO()
        observer = logs.makeObserver(out, "text", "warn")
        observer({"log_level": LogLevel.info, "log_namespace": "x", "log_time": 0.0, "log_format": "quiet"})
        observer({"log_level": LogLevel.error, "log_namespace": "x", "log_time": 0.0, "log_format": "loud"})
        self.assertNotIn("quiet", out.getvalue())
        self.assertIn("error [x] loud", out.getvalue())


    def test_dnsPortChatterDropped(self):
        """
        The lines Twisted logs as each DNS query's own UDP port opens and
        closes are dropped; a listening TCP port's are kept.
        """
        from twisted.python import log as legacy

        with capturedLogs() as events:
            for text in ("DNSDatagramProtocol starting on 40001", "(UDP Port 40001 Closed)",
                         "SMTPFactory starting on 2525", "(TCP Port 2525 Closed)"):
                legacy.msg(text)
        out = io.StringIO()
        observer = logs.makeObserver(out)
        for event in events:
            observer(event)
        self.assertEqual([line.split("] ", 1)[1] for line in out.getvalue().splitlines()],
                         ["SMTPFactory starting on 2525", "(TCP Port 2525 Closed)"])


class LoggerGateTests(unittest.TestCase):
    def test_everythingPassesByDefault(self):
        with capturedLogs() as events:
            logs.Logger(namespace="t").debug("d")
        self.assertEqual([e["log_format"] for e in events], ["d"])

    def test_installSetsTheObserverAndTheGate(self):
        self.patch(logs, "_enabled", logs._enabled)
        app = Application("t")
        logs.install(app, io.StringIO(), "text", "warn")
        self.assertIsNotNone(ILogObserver(app, None))
        log = logs.Logger(namespace="t")
        with capturedLogs() as events:
            log.debug("d")
            log.info("i")
            log.warn("w")
            log.error("e")
        self.assertEqual([e["log_format"] for e in events], ["w", "e"])
        self.assertEqual(logs.formatMessage(events[0]), "w")


class _Custom:
    def __format__(self, spec):
        return "formatted" + spec

    def __str__(self):
        return "str"

    def __repr__(self):
        return "repr"


class FormatMessageTests(unittest.TestCase):
    """formatMessage renders what Twisted's formatEvent renders, without a string.Formatter per event."""

    CASES = [
        ("a {x} b", {"x": 1}),
        ("{x!r} 100%", {"x": "q"}),
        ("%s {x} %d", {"x": "%(y)s"}),
        ("{x:>5}|{y!s}", {"x": "a", "y": _Custom()}),
        ("{serial:x}", {"serial": 255}),
        ("{{literal}} {x}", {"x": (1, 2)}),
        ("{x}", {"x": (1,)}),
        ("{x}", {"x": _Custom()}),
        ("{x!r}", {"x": _Custom()}),
        ("{x!a}", {"x": "é"}),
        ("{x} {y} {z}", {"x": None, "y": 1.5, "z": True}),
        ("{a.b}", {"a": 1}),
        ("{f()}", {"f": lambda: 3}),
        ("{missing}", {}),
        ("{x", {"x": 1}),
        ("", {}),
    ]

    def test_sameTextAsFormatEvent(self):
        from twisted.logger import formatEvent

        for fmt, fields in self.CASES:
            event = dict(fields, log_format=fmt)
            self.assertEqual(logs.formatMessage(event), formatEvent(event), fmt)

    def test_noFormat(self):
        from twisted.logger import formatEvent

        event = {"log_format": None, "log_text": "legacy"}
        self.assertEqual(logs.formatMessage(event), formatEvent(event))


class _CountingFile(io.StringIO):
    def __init__(self):
        io.StringIO.__init__(self)
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return io.StringIO.write(self, text)


class LineTests(unittest.TestCase):
    def test_oneWritePerLineWithItsTraceback(self):
        from twisted.python.failure import Failure

        out = _CountingFile()
        observer = logs.makeObserver(out, "text", "info")
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        observer({"log_level": LogLevel.error, "log_namespace": "x", "log_time": 86400.5,
                  "log_format": "boom {n}", "n": 1, "log_failure": failure})
        self.assertEqual(out.writes, 1)
        self.assertTrue(out.getvalue().startswith("1970-01-02T00:00:00Z error [x] boom 1\n"))
        self.assertIn("ZeroDivisionError", out.getvalue())

    def test_eventsWithoutLevelOrNamespaceAreDropped(self):
        out = io.StringIO()
        observer = logs.makeObserver(out, "text", "debug")
        observer({"log_namespace": "x", "log_time": 0.0, "log_format": "no level"})
        observer({"log_level": LogLevel.info, "log_time": 0.0, "log_format": "no namespace"})
        self.assertEqual(out.getvalue(), "")

    def test_invalidLevelIsReported(self):
        from twisted.logger import InvalidLogLevelError

        with capturedLogs() as events:
            logs.Logger(namespace="t").emit("loud", "x")
        self.assertEqual([e["log_level"] for e in events], [LogLevel.critical])
        self.assertEqual(len(self.flushLoggedErrors(InvalidLogLevelError)), 1)



class ReopenTests(unittest.TestCase):
    def test_unopenableKeepsTheOldFile(self):
        """SIGHUP while the log file cannot be opened: one error line, logging goes on in the old file."""
        import os

        self.patch(logs, "_enabled", logs._enabled)  # (the observer sets the process's level)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "relaygw.log")
        out = logs.openLogFile(path)
        switch = logs._Switchable(out, "text", "info")
        os.rename(path, path + ".1")
        os.mkdir(path)  # (a directory cannot be opened for appending)
        with capturedLogs() as events:
            switch.reopen()
        self.assertIs(switch.outFile, out)
        self.assertEqual([e["log_format"] for e in events], ["cannot open the log file again: {error}"])
        os.rmdir(path)
        switch.reopen()
        self.assertIsNot(switch.outFile, out)
        self.assertTrue(out.closed)
        switch({"log_level": LogLevel.info, "log_namespace": "t", "log_format": "after", "log_time": 0})
        with open(path) as f:
            self.assertIn("after", f.read())
        switch.outFile.close()


class LogFileModeTests(unittest.TestCase):
    def createdUnder(self, umask):
        """The mode of a log file the gateway creates under C{umask}."""
        import os

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "relaygw.log")
        old = os.umask(umask)
        try:
            logs.openLogFile(path).close()
        finally:
            os.umask(old)
        return os.stat(path).st_mode & 0o777

    def test_notReadableByOthers(self):
        """A log file the gateway creates is not world-readable (its lines name senders, recipients and logins)."""
        self.assertEqual(self.createdUnder(0o022), 0o640)

    def test_createdModeWhateverTheUmask(self):
        """
        Created under a daemon's umask (twistd sets 077), a new log file is
        still 0640, so the log group can read the mail log after logrotate
        moved the old one away (it was 0600).
        """
        self.assertEqual(self.createdUnder(0o077), 0o640)

    def test_existingModeKept(self):
        """An existing file keeps the mode its administrator gave it."""
        import os

        path = os.path.abspath(self.mktemp())
        with open(path, "w"):
            pass
        os.chmod(path, 0o644)
        logs.openLogFile(path).close()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)


class _Writes(io.StringIO):
    """A log file that records each write it is given."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def _event(text):
    return {"log_level": LogLevel.info, "log_namespace": "t", "log_format": text, "log_time": 0}


class BatchedWriteTests(unittest.TestCase):
    """The installed observer writes a reactor turn's lines together, after the turn."""

    def setUp(self):
        self.patch(logs, "_enabled", logs._enabled)
        self.out = _Writes()
        self.switch = logs._Switchable(self.out, "text", "info")

    @defer.inlineCallbacks
    def test_oneWritePerReactorTurn(self):
        def turn():
            for text in ("one", "two", "three"):
                self.switch(_event(text))
            return self.out.getvalue()

        during = yield task.deferLater(reactor, 0, turn)
        self.assertEqual(during, "")
        yield task.deferLater(reactor, 0, lambda: None)
        [written] = self.out.writes
        self.assertEqual([line.split(" ", 3)[3] for line in written.splitlines()], ["one", "two", "three"])

    @defer.inlineCallbacks
    def test_otherThreadsWriteAtOnce(self):
        """A line logged outside the reactor thread is written before the call returns, with those before it."""

        def turn():
            self.switch(_event("reactor"))
            return threads.deferToThread(lambda: (self.switch(_event("thread")), self.out.getvalue())[1])

        seen = yield task.deferLater(reactor, 0, turn)
        self.assertEqual([line.split(" ", 3)[3] for line in seen.splitlines()], ["reactor", "thread"])

    def test_withoutARunningReactorAtOnce(self):
        """Before the reactor runs (start-up) or after it stops (shutdown), lines go out as they come."""
        self.switch(_event("now"))
        self.assertTrue(self.out.getvalue().endswith(" now\n"))

    @defer.inlineCallbacks
    def test_pendingLinesWrittenBeforeTheFileIsOpenedAgain(self):
        path = os.path.abspath(self.mktemp())
        self.switch = logs._Switchable(logs.openLogFile(path), "text", "info")
        self.addCleanup(lambda: self.switch.outFile.close())

        def turn():
            self.switch(_event("before"))
            os.rename(path, path + ".1")
            self.switch.reopen()
            self.switch(_event("after"))

        yield task.deferLater(reactor, 0, turn)
        yield task.deferLater(reactor, 0, lambda: None)
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual((old.read().split(" ", 3)[3], new.read().split(" ", 3)[3]), ("before\n", "after\n"))

    @defer.inlineCallbacks
    def test_failedWriteLosesOnlyItsLines(self):
        """
        A log file that cannot be written (a full disk) costs the lines of
        that turn, without an error from the reactor or another turn spent
        on it; lines are written again once it can take them.
        """
        self.out.failing = True

        def write(text):
            if self.out.failing:
                raise OSError(errno.ENOSPC, "No space left on device")
            return _Writes.write(self.out, text)

        self.out.write = write
        scheduled = []
        self.patch(reactor, "callLater", _recordingCallLater(reactor.callLater, scheduled))
        yield task.deferLater(reactor, 0, lambda: self.switch(_event("lost")))
        yield task.deferLater(reactor, 0, lambda: None)
        # The one write-out, and none after it.
        self.assertEqual([f for f in scheduled if f == self.switch._batched.writeOut], [self.switch._batched.writeOut])
        self.out.failing = False
        yield task.deferLater(reactor, 0, lambda: self.switch(_event("back")))
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual([line.split(" ", 3)[3] for line in self.out.getvalue().splitlines()], ["back"])


def _recordingCallLater(callLater, calls):
    def recording(delay, f, *args, **kwargs):
        calls.append(f)
        return callLater(delay, f, *args, **kwargs)

    return recording


class FullDiskLogTests(unittest.TestCase):
    """
    The log file on a real 1 MB tmpfs that fills up: logging goes on
    without an error escaping into the reactor or a reactor turn spent on
    each, and lines are written again once there is room.
    """

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root")
        self.patch(logs, "_enabled", logs._enabled)
        self.mount = os.path.abspath(self.mktemp())
        os.makedirs(self.mount)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", self.mount], check=True, timeout=30)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mount], timeout=30)

    @defer.inlineCallbacks
    def test_fullAndFreedAgain(self):
        path = os.path.join(self.mount, "relaygw.log")
        switch = logs._Switchable(logs.openLogFile(path), "text", "info")
        self.addCleanup(lambda: switch.outFile.close() if not switch.outFile.closed else None)
        filler = os.path.join(self.mount, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        scheduled = []
        self.patch(reactor, "callLater", _recordingCallLater(reactor.callLater, scheduled))
        for turn in range(3):
            yield task.deferLater(reactor, 0, lambda: [switch(_event("full %d" % i)) for i in range(200)])
        yield task.deferLater(reactor, 0, lambda: None)
        writeOuts = [f for f in scheduled if f == switch._batched.writeOut]
        self.assertEqual(len(writeOuts), 3)  # one per turn that logged, none for the failures
        os.unlink(filler)
        yield task.deferLater(reactor, 0, lambda: switch(_event("room again")))
        yield task.deferLater(reactor, 0, lambda: None)
        with open(path) as f:
            self.assertEqual(f.read().split(" ", 3)[3], "room again\n")
