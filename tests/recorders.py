"""What a test records of a running gateway: every log event, and the envelopes of the messages it accepts."""

from twisted.logger import globalLogPublisher


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
