"""
JSON-lines logging for log shippers: one object per event with its time,
level, namespace, formatted message and the event's own plain fields (the
session id among them).
"""

import json

from twisted.logger import formatEvent
from zope.interface import provider

from twisted.logger import ILogObserver

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
