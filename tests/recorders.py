"""
What a test records of a running gateway: every log event, the envelopes
of the messages it accepts, and what a next hop in memory is handed.
"""

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from relaygw.relay.nexthop import Result

OK = Result(250, "2.0.0", "ok")


class LogCapture:
    """Collects every log event while a test runs."""

    def __init__(self, testcase):
        self.events = []
        self._observer = self.events.append
        globalLogPublisher.addObserver(self._observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observer)

    def find(self, formatPart, **fields):
        return [e for e in list(self.events)
                if formatPart in (e.get("log_format") or "") and all(e.get(k) == v for k, v in fields.items())]


def recordEnvelopes(gateway):
    """
    A list that collects the envelope of each message C{gateway} accepts
    (the validation context it was accepted with), before the queue
    manager delivers it.
    """
    envelopes = []
    factory = gateway.service.factories[0]
    original = factory.onQueued

    def onQueued(queueId, message):
        envelopes.append(message.envelope)
        return original(queueId, message)

    factory.onQueued = onQueued
    return envelopes


def slowCommits(testcase, spool, seconds):
    """
    Each of C{spool}'s commits is made at once, and its result reaches the
    session C{seconds} later (a slow sync); a list that gets the reactor's
    time at the start of each commit.
    """
    real = spool.committer.commit
    started = []

    def slowCommit(job):
        d = real(job)
        started.append(reactor.seconds())
        return d.addBoth(lambda r: task.deferLater(reactor, seconds, lambda: r))

    spool.committer.commit = slowCommit
    testcase.addCleanup(setattr, spool.committer, "commit", real)
    return started


class RecordingHop:
    """A next hop in memory: C{calls} has the messages of each delivery, and every recipient gets C{result}."""

    def __init__(self, result=OK):
        self.result = result
        self.calls = []

    def describe(self):
        return "test"

    def deliver(self, messages, progress=None):
        self.calls.append(messages)
        return [{r: self.result for r in m.recipients} for m in messages]

    def closeIdle(self):
        return defer.succeed(None)
