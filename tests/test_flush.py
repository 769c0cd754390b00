"""
relaygw-queue flush of the whole queue: taken a slice at a time, and
carried out in full even when the gateway was stopped, or killed, before
it was done.
"""

import io
import os
import socket
import time

from twisted.internet import defer, reactor, task

from relaygw.relay.flushing import Flush
from relaygw.scripts import queue as tool
from relaygw.testing import Gateway, configText
from tests.messages import sendOne
from tests.recorders import LogCapture
from tests.relaysetup import FAST, CrashingGateway, RelayTestCase, crashTest, waitFor


def deadPort():
    """A loopback port bound, not listening (a connection to it is refused), and its socket."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1], s


def flush(config, *ids):
    """relaygw-queue flush (of C{ids}), as the tool runs it."""
    out = io.StringIO()
    assert tool.main(["--config", config, "flush"] + list(ids), out=out) == 0, out.getvalue()


class SlicedFlushTests(RelayTestCase):
    """
    A flush hands the queue manager a slice of the queue per turn of the
    reactor: with 20,000 messages deferred, handing in all of them at once
    held the reactor 0.2 s, and every session of the worker with it.
    """

    MESSAGES = 30
    SLICE = 7

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(Flush, "SLICE", self.SLICE)
        self.dead, self.deadSocket = deadPort()
        self.addCleanup(self.deadSocket.close)
        self.directory = self.mktemp()
        yield self.started()
        self.addCleanup(lambda: self.gw.stop())
        self.logs = LogCapture(self)
        for n in range(self.MESSAGES):
            yield self.send(subject="m%d" % n)
        yield self.until(lambda: len(self.logs.find("status={status}", status="deferred")) == self.MESSAGES
                         and not self.gw.service.queue.active)

    def started(self):
        """(Re)start the gateway in C{directory}, relaying to the dead port with an hour's retry time."""
        self.gw = Gateway(self.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"smarthosts": ["[127.0.0.1]:%d" % self.dead], "tls": "none",
                                 "retry_min": 3600, "retry_max": 3600})
        return self.gw.start()

    def sink(self):
        """A next hop that takes every message, on the dead port (no longer dead)."""
        self.deadSocket.close()
        hop, _ = self.hop(port=self.dead)
        return hop

    @defer.inlineCallbacks
    def test_aSliceATurn(self):
        queue = self.gw.service.queue
        queue.requests.stop()
        hop = self.sink()
        flush(self.gw.path)
        queue.requests.poll()
        self.assertLessEqual(len(queue.ready) + len(queue.active), self.SLICE)
        self.assertTrue(os.path.exists(os.path.join(self.gw.service.spool.directory, "flushing")))
        yield self.until(lambda: len(hop.recipients()) == self.MESSAGES)
        yield self.until(lambda: not self.gw.service.spool.queueIds())
        self.assertFalse(os.path.exists(os.path.join(self.gw.service.spool.directory, "flushing")))
        self.assertEqual(len(hop.recipients()), self.MESSAGES)

    @defer.inlineCallbacks
    def test_relayedMailNotKeptInMind(self):
        """
        While a flush goes on, the messages relayed meanwhile are not kept
        in mind by it (only those still queued are): a long flush of a
        large queue must not hold every message the gateway relays.
        """
        queue = self.gw.service.queue
        hop = self.sink()
        queue.flush()
        flushing = queue._flush
        flushing.stop()  # (held at its first slice: the flush goes on, as a long one would)
        qid = yield self.send(subject="new")
        yield self.until(lambda: "b@example.net" in hop.recipients() and not self.gw.service.spool.exists(qid)
                         and qid not in queue.active)
        self.assertIs(queue._flush, flushing)
        self.assertNotIn(qid, flushing.seen)
        self.assertEqual(len(flushing.seen), self.SLICE)

    @defer.inlineCallbacks
    def test_askedForWhileStopped(self):
        """A flush asked for while the gateway is stopped is carried out in full at its start, a slice a turn."""
        yield self.gw.stop()
        hop = self.sink()
        flush(self.gw.path)
        yield self.started()
        yield self.until(lambda: len(hop.recipients()) == self.MESSAGES)
        yield self.until(lambda: not self.gw.service.spool.queueIds())
        self.assertEqual(len(hop.recipients()), self.MESSAGES)
        self.assertFalse(os.path.exists(os.path.join(self.gw.service.spool.directory, "flushing")))

    @defer.inlineCallbacks
    def test_stoppedMidFlush(self):
        """A stop before the flush is done leaves it asked for: the next start carries it out."""
        queue = self.gw.service.queue
        queue.requests.stop()
        flush(self.gw.path)
        queue.requests.poll()
        queue._flush.stop()  # (held at its first slice, as the stop comes in the middle of a large flush)
        yield self.gw.stop()
        self.assertTrue(os.path.exists(os.path.join(self.gw.service.spool.directory, "flushing")))
        hop = self.sink()
        yield self.started()
        yield self.until(lambda: len(hop.recipients()) == self.MESSAGES)
        yield self.until(lambda: not self.gw.service.spool.queueIds())
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(hop.recipients()), self.MESSAGES)


class KilledMidFlushTests(RelayTestCase):
    """
    A flush of a deferred queue whose next hop hangs (every attempt waits
    for its greeting) when the gateway is killed (kill -9): after the
    restart each message is tried at once, not at the retry time its
    record names, an hour on.
    """

    timeout = 120
    MESSAGES = 12

    def test_killedMidFlush(self):
        return self.killedMidFlush()

    def test_killedMidFlushOfIds(self):
        """The same for a flush of each message by its id (flush ID..., flush --domain)."""
        return self.killedMidFlush("ids")

    def test_killedAfterRelease(self):
        """
        The same for messages held, then released (a release is an attempt
        now): the release was taken and forgotten before the attempt was
        made, so they waited for their retry time.
        """
        return self.killedMidFlush("release")

    def killedMidFlush(self, how="all"):
        dead, s = deadPort()
        self.addCleanup(s.close)
        relay = {"smarthosts": ["[127.0.0.1]:%d" % dead], "tls": "none", "retry_min": 3600, "retry_max": 3600}
        gateway = CrashingGateway(os.path.abspath(self.mktemp()), dict(FAST, **relay))
        log = os.path.join(gateway.directory, "twistd.log")

        def logged(text):
            with open(log, errors="replace") as f:
                return f.read().count(text)

        def run(gateway):
            gateway.start()
            for n in range(self.MESSAGES):
                sendOne(gateway.port, subject="m%d" % n)
            waitFor(lambda: logged("status=deferred") >= self.MESSAGES, "the messages deferred")
            s.listen(64)  # (connections now wait for a greeting that never comes)
            if how != "all":
                ids = os.listdir(gateway.path("queue"))
                if how == "release":
                    tool.main(["--config", gateway.conf, "hold"] + ids, out=io.StringIO())
                    markers = "released."
                    tool.main(["--config", gateway.conf, "release"] + ids, out=io.StringIO())
                else:
                    markers = "release."
                    flush(gateway.conf, *ids)
                waitFor(lambda: not [n for n in os.listdir(os.path.join(gateway.directory, "spool"))
                                     if n.startswith(markers)], "the requests taken")
            else:
                flush(gateway.conf)
                waitFor(lambda: logged("flush requested"), "the flush taken")
            time.sleep(1)
            gateway.kill()
            with open(gateway.conf, "w") as f:  # (the next hop: the Maildir)
                f.write(configText(gateway.directory, relay=dict(relay, smarthosts=[]),
                                   listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % gateway.port,
                                               "relay_networks": ["127.0.0.0/8"]},)))
            gateway.start()
            outbox = os.path.join(gateway.directory, "outbox", "new")
            waitFor(lambda: os.path.isdir(outbox) and len(os.listdir(outbox)) >= self.MESSAGES,
                    "every message delivered", timeout=20)
            waitFor(lambda: not os.listdir(gateway.path("queue")), "the queue empty")
            return len(os.listdir(outbox)), sorted(os.listdir(os.path.join(gateway.directory, "spool")))

        def check(result):
            delivered, names = result
            self.assertEqual(delivered, self.MESSAGES)
            self.assertEqual([n for n in names if n.startswith("flush")], [])

        return crashTest(gateway, run, check)
