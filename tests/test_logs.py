"""
relaygw.logs: the text and JSON-lines observers, and the Logger that drops
events below the configured level before they are built.
"""

import io
import json

from twisted.application.service import Application
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


class LoggerGateTests(unittest.TestCase):
    def test_everythingPassesByDefault(self):
        with capturedLogs() as events:
            logs.Logger(namespace="t").debug("d")
        self.assertEqual([e["log_format"] for e in events], ["d"])

    def test_installSetsTheObserverAndTheGate(self):
        self.patch(logs, "_minimum", logs._minimum)
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
