"""
The gateway's logging: text lines, or JSON lines for log shippers (one
object per event with its time, level, namespace, formatted message and
the event's own plain fields, the session id among them), and a L{Logger}
that skips events below the configured level before building them.
"""

import json
import os
import re
import string
import threading
import time

from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
)
from twisted.logger import Logger as _Logger
from twisted.python import threadable
from zope.interface import implementer, provider

_PLAIN = (str, int, float, bool, type(None))
_LEVELS = frozenset(LogLevel.iterconstants())


def _atOrAbove(minimum):
    """The levels at or above C{minimum}: a set lookup, where a comparison of two levels is a Python call."""
    return frozenset(level for level in _LEVELS if level >= minimum)


#: Events at other levels are dropped at the source (everything passes
#: until the gateway's own observer is installed, as in tests).
_enabled = _LEVELS


class Logger(_Logger):
    """
    L{twisted.logger.Logger}, except that an event below the gateway's log
    level costs one comparison: the stock C{emit} validates the level, builds
    and publishes the event, and only the observer then filters it out, a
    price the SMTP session would pay for every debug line of every message.
    """

    def emit(self, level, format=None, **kwargs):
        if level not in _enabled:
            if level not in _LEVELS:
                _Logger.emit(self, level, format, **kwargs)  # it reports the invalid level
            return
        # The stock emit, less its check of the level against a fresh
        # iteration of every LogLevel constant.
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)


#: Parsed message formats: format -> ((literal, field, conversion, spec), ...),
#: or None for a format only Twisted's formatter handles (attribute or item
#: access, calls).  The gateway's formats are literals, so the cache stays
#: small; it stops growing at _FORMATS_MAX.
_formats = {}
_FORMATS_MAX = 2000
_parser = string.Formatter()
_STR_IS_FORMAT = frozenset((str, int, float, bool, type(None)))


def _parse(fmt):
    """
    C{(template, fields)} for C{%}-formatting when every field is plain
    (no spec, no conversion but C{!r}), else C{(None, parts)}; C{None} if
    only Twisted's formatter can render C{fmt}.
    """
    try:
        parts = []
        for literal, field, spec, conversion in _parser.parse(fmt):
            if field is not None:
                if not field.isidentifier() or (spec and "{" in spec):
                    return None
                if conversion not in (None, "r", "s", "a"):
                    return None
            parts.append((literal, field, conversion, spec or ""))
    except ValueError:
        return None
    if all(field is None or (not spec and conversion in (None, "r")) for _, field, conversion, spec in parts):
        template = "".join(literal.replace("%", "%%") + ("" if field is None else "%r" if conversion else "%s")
                           for literal, field, conversion, spec in parts)
        return template, tuple((field, conversion is None) for _, field, conversion, _ in parts if field is not None)
    return None, tuple(parts)


def formatMessage(event):
    """
    The event's message, as L{twisted.logger.formatEvent} renders it, from
    a format parsed once rather than by a C{string.Formatter} per event;
    anything out of the ordinary (no format, a field missing or failing to
    render, attribute access) goes to C{formatEvent}.
    """
    fmt = event.get("log_format")
    if fmt.__class__ is not str:
        return formatEvent(event)
    parsed = _formats.get(fmt, False)
    if parsed is False:
        parsed = _parse(fmt)
        if len(_formats) < _FORMATS_MAX:
            _formats[fmt] = parsed
    if parsed is None:
        return formatEvent(event)
    template, fields = parsed
    try:
        if template is not None:
            values = []
            for field, plain in fields:
                value = event[field]
                # %s is str(); format() may differ for a type with its own __format__.
                values.append(value if not plain or value.__class__ in _STR_IS_FORMAT else format(value, ""))
            return template % tuple(values)
        out = []
        for literal, field, conversion, spec in fields:
            if literal:
                out.append(literal)
            if field is not None:
                value = event[field]
                if conversion is not None:
                    value = repr(value) if conversion == "r" else str(value) if conversion == "s" else ascii(value)
                out.append(format(value, spec))
        return "".join(out)
    except Exception:
        return formatEvent(event)


class _Stamps:
    """The text line's UTC time stamp, made once a second."""

    second = None
    text = ""

    @classmethod
    def of(cls, when):
        second = int(when)
        if second != cls.second:
            cls.text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            cls.second = second
        return cls.text


_SKIP = object()


def _typed(value, depth=0):
    """C{value} as JSON takes it (plain values, lists, string-keyed dicts), or C{_SKIP}."""
    if isinstance(value, _PLAIN):
        return value
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        items = [_typed(v, depth + 1) for v in value]
        return _SKIP if _SKIP in items else items
    if depth < 3 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _typed(v, depth + 1) for k, v in value.items()}
        return _SKIP if _SKIP in items.values() else items
    return _SKIP


def jsonLinesObserver(outFile):
    """An L{ILogObserver} writing one JSON object per line to C{outFile}."""

    @provider(ILogObserver)
    def observe(event):
        record = {
            "time": event.get("log_time"),
            "level": getattr(event.get("log_level"), "name", None),
            "namespace": event.get("log_namespace"),
            "message": formatMessage(event),
        }
        for k, v in event.items():
            if not k.startswith("log_") and k not in record:
                value = _typed(v)
                if value is not _SKIP:
                    record[k] = value
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
        when = event.get("log_time")
        stamp = _Stamps.of(time.time() if when is None else when)
        level = getattr(event.get("log_level"), "name", "-")
        text = escape(formatMessage(event))
        failure = event.get("log_failure")
        if failure is not None:
            text += "".join("\n    " + escape(line) for line in failure.getTraceback().splitlines())
        # The whole line in one write.
        outFile.write("%s %s [%s] %s\n" % (stamp, level, escape(str(event.get("log_namespace", "-"))), text))
        outFile.flush()

    return observe


def makeObserver(outFile, format="text", level="info"):
    """
    The gateway's log observer: text or JSON lines, at C{level} and above.
    Installing it for the process (L{install}) also drops lower-level events
    at their source.
    """
    base = jsonLinesObserver(outFile) if format == "json" else textLinesObserver(outFile)
    enabled = _atOrAbove(LogLevel.levelWithName(level))

    @provider(ILogObserver)
    def atLevel(event):
        # What LogLevelFilterPredicate does with no per-namespace levels, less its
        # walk of the namespace: an event without a level or a namespace is dropped.
        if event.get("log_level") in enabled:
            namespace = event.get("log_namespace")
            if namespace and not (namespace == "log_legacy" and _dnsPortChatter(event)):
                base(event)

    return atLevel


#: What Twisted's UDP port says for each DNS query (a port of its own, for
#: a random source port): two lines a query, a dozen a relayed message.
_DNS_PORT_CHATTER = re.compile(r"\(UDP Port \d+ Closed\)|DNSDatagramProtocol starting on \d+")


def _dnsPortChatter(event):
    message = event.get("message")
    return bool(message) and len(message) == 1 and isinstance(message[0], str) \
        and _DNS_PORT_CHATTER.fullmatch(message[0]) is not None


class _Batched:
    """
    A log file whose lines, logged on the reactor thread while it runs, are
    written together once per turn of the reactor: a message relayed at
    full speed logs five lines or more, and a write(2) each cost a system
    call and a turn at the GIL.  Lines from other threads, or logged while
    the reactor is not running, are written at once (with any before them).
    """

    def __init__(self, outFile):
        from twisted.internet import reactor  # (the one twistd installed by now)

        self.reactor = reactor
        self.outFile = outFile
        self._lines = []
        self._lock = threading.RLock()
        self._scheduled = False

    def write(self, line):
        with self._lock:
            self._lines.append(line)

    def flush(self):
        """Write the lines now, or once the reactor's current turn is over."""
        # (isInIOThread, less its two calls a line)
        if not (getattr(self.reactor, "running", False) and threading.get_ident() == threadable.ioThread):
            self.writeOut()
        elif not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self.writeOut)

    def switchTo(self, outFile):
        """Write what is pending, then go on in C{outFile}; returns the file left."""
        with self._lock:
            self.writeOut()
            old, self.outFile = self.outFile, outFile
        return old

    def writeOut(self):
        with self._lock:
            self._scheduled = False
            lines, self._lines = self._lines, []
            if not lines:
                return
            try:
                self.outFile.write("".join(lines))
                self.outFile.flush()
            except Exception:
                # A full disk or a closed stream: these lines are lost, as
                # they were when each was written from the observer.  Not
                # logged (that would come back here, every reactor turn).
                pass


@implementer(ILogObserver)
class _Switchable:
    """
    The process's observer; a reload replaces the format and level behind
    it, and opens a log file named by path again (L{reopen}).  Its lines
    are written once per turn of the reactor (L{_Batched}).
    """

    def __init__(self, outFile, format, level):
        self._batched = _Batched(outFile)
        self.configure(format, level)

    @property
    def outFile(self):
        return self._batched.outFile

    def configure(self, format, level):
        global _enabled
        self.format, self.level = format, level
        self.observer = makeObserver(self._batched, format, level)
        _enabled = _atOrAbove(LogLevel.levelWithName(level))

    def writeOut(self):
        """Write the lines waiting for the reactor's turn to end (at shutdown)."""
        self._batched.writeOut()

    def reopen(self):
        path = getattr(self.outFile, "name", None)
        if not (isinstance(path, str) and os.path.isabs(path)):
            return  # standard output, or a file object given by the caller
        try:
            fresh = openLogFile(path)
        except OSError as e:  # the reload goes on, logging where it did
            Logger(namespace="relaygw.service").error("cannot open the log file again: {error}", error=e)
            return
        self._batched.switchTo(fresh).close()

    def __call__(self, event):
        self.observer(event)


def openLogFile(path):
    """
    A log file opened for appending lines (unencodable characters escaped);
    created readable by its owner and group only, as a mail log usually is:
    its lines name senders, recipients and logins.
    """
    return open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace", opener=_logOpener)


def _logOpener(name, flags):
    """Open C{name}; one created is 0640 whatever the umask (twistd's daemon runs under 077: 0600)."""
    try:
        fd = os.open(name, flags | os.O_EXCL, 0o640)
    except FileExistsError:
        return os.open(name, flags)
    os.fchmod(fd, 0o640)
    return fd


_installed = None


def install(application, outFile, format="text", level="info"):
    """Make our observer C{application}'s log observer, as twistd expects."""
    from twisted.internet import reactor

    global _installed
    _installed = _Switchable(outFile, format, level)
    application.setComponent(ILogObserver, _installed)
    reactor.addSystemEventTrigger("after", "shutdown", _installed.writeOut)


def reopen():
    """
    SIGHUP: a log file named by path is opened again, so that one moved
    away (logrotate without C{copytruncate}) is followed by a new one.
    """
    if _installed is not None:
        _installed.reopen()


def reconfigure(format, level):
    """A reloaded C{[log]}: the installed observer (if any) takes the new format and level."""
    if _installed is not None:
        _installed.configure(format, level)
