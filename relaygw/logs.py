"""
The gateway's logging: text lines, or JSON lines for log shippers (one
object per event with its time, level, namespace, formatted message and
the event's own plain fields, the session id among them), and a L{Logger}
that skips events below the configured level before building them.
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
from twisted.logger import Logger as _Logger
from zope.interface import provider

_PLAIN = (str, int, float, bool, type(None))

#: Events below this level are dropped at the source (everything passes
#: until the gateway's own observer is installed, as in tests).
_minimum = LogLevel.debug


class Logger(_Logger):
    """
    L{twisted.logger.Logger}, except that an event below the gateway's log
    level costs one comparison: the stock C{emit} validates the level, builds
    and publishes the event, and only the observer then filters it out, a
    price the SMTP session would pay for every debug line of every message.
    """

    def emit(self, level, format=None, **kwargs):
        if level < _minimum:
            return
        _Logger.emit(self, level, format, **kwargs)


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


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escapeChar(c):
    if c.isprintable():
        return c
    named = _ESCAPES.get(c)
    if named is not None:
        return named
    n = ord(c)
    return "\\x%02x" % n if n < 0x100 else "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n


def escape(text):
    """
    C{text} with every non-printable character (line breaks, escape
    sequences, NUL, Unicode separators ...) written as a Python-style escape,
    so that no value can start a line of its own or drive a terminal.
    """
    if text.isprintable():
        return text
    return "".join(map(_escapeChar, text))


def textLinesObserver(outFile):
    """
    An L{ILogObserver} writing one compact text line per event.  Every field
    is escaped (L{escape}): a client-supplied value cannot forge a line.  A
    traceback follows on lines of its own, each indented, so that none of
    them can pass for an event either.
    """

    @provider(ILogObserver)
    def observe(event):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        level = getattr(event.get("log_level"), "name", "-")
        text = escape(formatEvent(event))
        failure = event.get("log_failure")
        if failure is not None:
            text += "".join("\n    " + escape(line) for line in failure.getTraceback().splitlines())
        outFile.write("%sZ %s [%s] %s\n" % (stamp, level, escape(str(event.get("log_namespace", "-"))), text))
        outFile.flush()

    return observe


def makeObserver(outFile, format="text", level="info"):
    """
    The gateway's log observer: text or JSON lines, at C{level} and above.
    Installing it for the process (L{install}) also drops lower-level events
    at their source.
    """
    base = jsonLinesObserver(outFile) if format == "json" else textLinesObserver(outFile)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(base, [predicate])


def install(application, outFile, format="text", level="info"):
    """Make our observer C{application}'s log observer, as twistd expects."""
    global _minimum
    application.setComponent(ILogObserver, makeObserver(outFile, format, level))
    _minimum = LogLevel.levelWithName(level)
