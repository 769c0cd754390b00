"""
JSON-lines logging for log shippers: one object per event with its time,
level, namespace, formatted message and the event's own plain fields (the
session id among them).
"""

import json
import time

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider

_PLAIN = (str, int, float, bool, type(None))


def jsonLinesObserver(outFile):
    """An L{ILogObserver} writing one JSON object per line to C{outFile}."""

    @provider(ILogObserver)
    def observe(event):
        record = {
            "time": event.get("log_time"),
            "level": getattr(event.get("log_level"), "name", None),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        for k, v in event.items():
            if not k.startswith("log_") and k not in record and isinstance(v, _PLAIN):
                record[k] = v
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        outFile.write(json.dumps(record) + "\n")
        outFile.flush()

    return observe


def textLinesObserver(outFile):
    """An L{ILogObserver} writing one compact text line per event."""

    @provider(ILogObserver)
    def observe(event):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        level = getattr(event.get("log_level"), "name", "-")
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        outFile.write("%sZ %s [%s] %s\n" % (stamp, level, event.get("log_namespace", "-"), text))
        outFile.flush()

    return observe


def makeObserver(outFile, format="text", level="info"):
    """The gateway's log observer: text or JSON lines, at C{level} and above."""
    base = jsonLinesObserver(outFile) if format == "json" else textLinesObserver(outFile)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(base, [predicate])
