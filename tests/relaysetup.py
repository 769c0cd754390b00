"""
Relay set-ups for tests: a gateway on loopback that relays to scripted
next hops with short retry times (L{RelayTestCase}), a next hop that tracks
which connection carried each transaction, and the DSN reader.
"""

import email
import os
import signal
import subprocess
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.testing import (
    Gateway, ScriptedSMTPFactory, ScriptedSMTPServer, configText, freePort, inThread, waitForPort,
)
from tests.messages import sendOne
from tests.processes import runTwistd

#: Retry times short enough for a test to see a retry.
FAST = {"retry_min": 0.3, "retry_max": 0.6}


class TrackingHopServer(ScriptedSMTPServer):
    """
    A scripted next hop that greets its first connection only after
    C{factory.greetDelay} seconds (so messages pile up behind that busy
    connection) and notes, for each transaction, the index of its connection
    and the ADDR that connection was last given with XCLIENT.
    """

    def connectionMade(self):
        self.xaddr = None
        self.greetCall = None
        ScriptedSMTPServer.connectionMade(self)
        delay = self.factory.greetDelay if len(self.factory.connections) == 1 else 0
        self.greetCall = reactor.callLater(delay, self.sendLine, b"220 scripted.example.test ESMTP")

    def connectionLost(self, reason):
        if self.greetCall is not None and self.greetCall.active():
            self.greetCall.cancel()
        ScriptedSMTPServer.connectionLost(self, reason)

    def lineReceived(self, line):
        if not self.inData and line.upper().startswith(b"XCLIENT "):
            for word in line.decode().split()[1:]:
                if word.upper().startswith("ADDR="):
                    self.xaddr = word[5:]
        before = len(self.factory.transactions)
        ScriptedSMTPServer.lineReceived(self, line)
        if len(self.factory.transactions) > before:
            self.factory.transactions[-1]["xaddr"] = self.xaddr
            self.factory.transactions[-1]["connection"] = self.factory.connections.index(self)


class TrackingHopFactory(ScriptedSMTPFactory):
    protocol = TrackingHopServer

    def __init__(self, greetDelay=0.0, **kw):
        ScriptedSMTPFactory.__init__(self, greeting=None, **kw)
        self.greetDelay = greetDelay


@defer.inlineCallbacks
def forwardingChain(test, listeners=None, retry=(0.3, 0.6)):
    """
    Two gateways on loopback sockets for C{test}: a next hop that takes
    XCLIENT from the first and relays for 192.0.2.0/24 and for the first
    gateway (127.0.0.1), and the first, with C{forward_identity}, trusting
    127.0.0.0/8 with XCLIENT on its first listener (C{listeners}, else one
    relaying for 192.0.2.0/24).  Sets C{test.hop}, C{test.gw} and
    C{test.arrived} (the envelopes the next hop queues).
    """
    from tests.recorders import recordEnvelopes

    test.hop = Gateway(test.mktemp(), listeners=({
        "trusted_peers": ["127.0.0.1/32"], "extensions": ["xclient"],
        "relay_networks": ["192.0.2.0/24", "127.0.0.1/32"]},))
    yield test.hop.start()
    test.addCleanup(test.hop.stop)
    test.arrived = recordEnvelopes(test.hop)
    test.gw = Gateway(test.mktemp(), listeners=listeners or (
        {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"], "relay_networks": ["192.0.2.0/24"]},),
        relay={"smarthosts": ["[127.0.0.1]:%d" % test.hop.port], "forward_identity": True, "tls": "none",
               "retry_min": retry[0], "retry_max": retry[1]})
    yield test.gw.start()
    test.addCleanup(test.gw.stop)


def deliveryStatus(data):
    """The blocks (field groups) of the message/delivery-status part of a DSN, parsed."""
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.get_payload() if p.get_content_type() == "message/delivery-status"]
    return [dict(block.items()) for block in status.get_payload()]


class RelayTestCase(unittest.TestCase):
    timeout = 60

    def hop(self, factory=None, interface="127.0.0.1", port=0, **kw):
        factory = factory or ScriptedSMTPFactory(**kw)
        listening = reactor.listenTCP(port, factory, interface=interface)
        self.addCleanup(self._closeHop, listening, factory)
        return factory, listening.getHost().port

    def _closeHop(self, port, factory):
        for c in factory.connections:
            call = getattr(c, "greetCall", None)
            if call is not None and call.active():
                call.cancel()
            c.transport.loseConnection()
        return port.stopListening()

    @defer.inlineCallbacks
    def gateway(self, relay, listener=None, routes=()):
        listener = dict({"relay_networks": ["127.0.0.0/8"]}, **(listener or {}))
        gw = Gateway(self.mktemp(), listeners=(listener,), relay=dict(FAST, **relay), routes=routes)
        yield gw.start()
        self.addCleanup(gw.stop)
        self.gw = gw
        return gw

    def send(self, **kw):
        return inThread(sendOne, self.gw.port, **kw)

    @defer.inlineCallbacks
    def until(self, predicate, timeout=15):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %r" % (predicate,))
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def fourBehindSlowHop(self, concurrency):
        """
        Send messages m0..m3 (to r0..r3) one after the other to a next hop
        that greets each connection only after 1.5 s; returns the hop once
        all four are delivered.
        """
        hop = TrackingHopFactory(greetDelay=1.5, extensions=["PIPELINING"])
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": concurrency})
        for n in range(4):
            yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))
        yield self.until(lambda: len(hop.transactions) == 4 and self.spoolEmpty())
        return hop

    def spoolEmpty(self):
        """No message queued or in flight, and no progress or hold file left behind."""
        spool = self.gw.service.spool
        return (not spool.queueIds() and not self.gw.service.queue.active
                and not os.listdir(spool.path("state")) and not os.listdir(spool.path("hold")))


class CrashingGateway:
    """
    relaygw under twistd as a child process, to be killed (kill -9) and
    started again on the same spool: for the tests of what a crash leaves.
    Its methods block: call them from a thread (L{crashTest}).
    """

    def __init__(self, directory, relay, routes=()):
        self.directory = directory
        os.makedirs(directory)
        self.port = freePort()
        self.conf = os.path.join(directory, "relaygw.toml")
        with open(self.conf, "w") as f:
            f.write(configText(directory, relay=relay, routes=routes,
                               listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % self.port,
                                           "relay_networks": ["127.0.0.0/8"]},)))
        self.procs = []

    def path(self, area, name=""):
        return os.path.join(self.directory, "spool", area, name)

    def start(self):
        p = runTwistd(self.conf, self.directory)
        self.procs.append(p)
        waitForPort(self.port)
        return p

    def kill(self):
        """kill -9 the running gateway."""
        p = self.procs[-1]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)

    def log(self):
        with open(os.path.join(self.directory, "twistd.log"), errors="replace") as f:
            return f.read()[-5000:]


def waitFor(predicate, what, timeout=30):
    """Block until C{predicate()}, at most C{timeout} seconds, else fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % (what,))
        time.sleep(0.05)


def crashTest(gateway, run, check):
    """
    C{run(gateway)} in a thread (the gateway stopped after it, however it
    ends), then C{check} of its result; a failure quotes the gateway's log.
    """
    def running():
        try:
            return run(gateway)
        finally:
            gateway.stop()

    def failed(f):
        raise AssertionError("%s\n--- twistd.log ---\n%s" % (f.getErrorMessage(), gateway.log()))

    return inThread(running).addCallbacks(check, failed)
