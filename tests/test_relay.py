"""
Onward relay end to end: a gateway in the test's reactor relaying to
scripted loopback next hops (smarthosts, failover, retries, bounces, TLS,
AUTH, XCLIENT forwarding, routes, MX), and a crash during delivery.
"""

import io
import json
import os
import re
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.error import CannotListenError
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import formatEvent
from twisted.trial import unittest

from relaygw.logs import makeObserver
from relaygw.testing import (
    Client, Gateway, ScriptedSMTPFactory, ScriptedSMTPServer, configText, freePort, inThread,
)
from relaygw.relay.nexthop import NOT_SENT, STOPPED, WAITED, WITHDRAWN, Result
from relaygw.relay.smtp import Health, SMTPNextHop
from tests.messages import sendMessage, sendOne
from tests.outside import plantFIFO
from tests.recorders import LogCapture
from tests.relaysetup import (
    FAST, CrashingGateway, RelayTestCase, TrackingHopFactory, crashTest, deliveryStatus, waitFor,
)
from tests.tlsmaterial import makeCA


class SmarthostTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_acceptingHop(self):
        hop, port = self.hop(extensions=["PIPELINING", "8BITMIME", "SIZE 10000000"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("b@example.net", "c@example.net"))
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(hop.transactions), 1)
        t = hop.transactions[0]
        self.assertEqual((t["mailfrom"], t["rcpts"]), ("a@example.org", ["b@example.net", "c@example.net"]))
        self.assertIn(b"Received: from client.example (unknown [127.0.0.1])", t["data"])
        self.assertTrue(t["data"].endswith(b"body of relay\r\n"))

    @defer.inlineCallbacks
    def test_quotedLocalPartsWithAngleBrackets(self):
        """
        Paths whose quoted local parts hold C{<} or C{>} (RFC 5321 allows
        them; the session accepts them) go on as they came, with the other
        recipients of the message: they were bounced 553 5.1.3, all of them.
        """
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(mailfrom='"s>x"@example.org', rcpts=('"a<b>"@example.net', "c@example.net"))
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(hop.transactions), 1)
        self.assertIn('MAIL FROM:<"s>x"@example.org>', hop.lines)
        self.assertIn('RCPT TO:<"a<b>"@example.net>', hop.lines)
        self.assertIn("RCPT TO:<c@example.net>", hop.lines)

    @defer.inlineCallbacks
    def relayEightBit(self, extensions):
        """A message with 8-bit (Latin-1) octets in its Subject and body, to a next hop offering C{extensions}."""
        hop, port = self.hop(extensions=extensions)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(subject="caf\u00e9")
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(hop.transactions), 1)
        return hop.transactions[0]["data"]

    @defer.inlineCallbacks
    def test_eightBitConvertedWithout8BITMIME(self):
        """
        8-bit content to a next hop that does not offer 8BITMIME arrives
        quoted-printable (RFC 6152, as Postfix converts it), read from the
        queue file twice with its checksum checked each time; the header
        field keeps its octets (no charset to encode them with).
        """
        data = yield self.relayEightBit(["PIPELINING", "SIZE 10000000"])
        self.assertIn(b"Subject: caf\xe9\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
                      data)
        self.assertTrue(data.endswith(b"\r\n\r\nbody of caf=E9\r\n"), data)

    @defer.inlineCallbacks
    def test_eightBitHeaderFieldsAlone(self):
        """
        A message of header fields alone, one of them 8-bit, to a next hop
        without 8BITMIME arrives with every field (no body to encode).
        """
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(content="Subject: caf\u00e9\r\nX-Last: yes\r\n")
        yield self.until(self.spoolEmpty)
        data = hop.transactions[0]["data"]
        self.assertTrue(data.startswith(b"Received: from client.example"), data)
        self.assertTrue(data.endswith(b"\r\nSubject: caf\xe9\r\nX-Last: yes\r\n"), data)

    @defer.inlineCallbacks
    def test_eightBitAsItCameWith8BITMIME(self):
        """To a next hop that offers 8BITMIME, 8-bit content goes as it came."""
        data = yield self.relayEightBit(["PIPELINING", "8BITMIME"])
        self.assertTrue(data.endswith(b"Subject: caf\xe9\r\n\r\nbody of caf\xe9\r\n"), data)

    @defer.inlineCallbacks
    def test_temporaryThenSuccess(self):
        hop, port = self.hop(rcpt={"b@example.net": ["451 4.3.0 try again later", "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts") == 1)
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertIn("451 4.3.0", state["last_error"])
        yield self.until(self.spoolEmpty)
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_handedInAgainWhileInFlight(self):
        """
        A message handed to the queue manager again while its first attempt
        is in flight (a flush that picks up a just-committed message before
        the session hands it in) does not make a later attempt forget the
        recipients that already succeeded.
        """
        hop = TrackingHopFactory(greetDelay=1.0, rcpt={"later@example.net": ["451 4.3.0 not now", "250 2.1.5 Ok"]})
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        qid = yield self.send(rcpts=("now@example.net", "later@example.net"))
        queue = self.gw.service.queue
        yield self.until(lambda: qid in queue.active)  # (its attempt starts after the 250)
        queue.enqueue(qid, self.gw.service.spool.load(qid))
        yield self.until(self.spoolEmpty)
        self.assertEqual(sorted(hop.recipients()), ["later@example.net", "now@example.net"])
        self.assertEqual(queue.fresh, {})

    @defer.inlineCallbacks
    def test_exponentialBackoff(self):
        """Retries wait retry_min, then twice as long each time, up to retry_max."""
        times = []
        hop, port = self.hop(rcpt={"b@example.net": ["451 4.3.0 busy"] * 5 + ["250 2.1.5 Ok"]})
        lineReceived = ScriptedSMTPServer.lineReceived

        def stamp(server, line):
            if line.startswith(b"RCPT"):
                times.append(time.monotonic())
            return lineReceived(server, line)

        self.patch(ScriptedSMTPServer, "lineReceived", stamp)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 0.2, "retry_max": 0.4})
        qid = yield self.send()
        seen = []
        yield self.until(lambda: seen.append((self.gw.service.spool.readState(qid), time.time()))
                         or seen[-1][0].get("attempts") == 1)
        state, when = seen[-1]
        self.assertTrue(0 < state["next_attempt"] - when <= 0.2, state)
        yield self.until(self.spoolEmpty)
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(len(gaps), 5, gaps)
        self.assertTrue(0.19 <= gaps[0] < 0.39, gaps)   # retry_min
        for gap in gaps[1:]:
            self.assertTrue(0.39 <= gap < 0.75, gaps)   # doubled, then capped at retry_max
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_permanentFailuresBounce(self):
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 <bad@example.net>: no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("good@example.net", "bad@example.net"))
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        self.assertEqual(hop.recipients(), ["good@example.net", "a@example.org"])
        bounce = hop.transactions[1]
        self.assertEqual(bounce["mailfrom"], "")
        data = bounce["data"].decode()
        self.assertIn("Content-Type: multipart/report; report-type=delivery-status", data)
        self.assertIn("Final-Recipient: rfc822; bad@example.net", data)
        self.assertIn("Status: 5.1.1", data)
        self.assertIn("Action: failed", data)
        self.assertIn("Subject: relay", data)  # the original headers
        self.assertNotIn("good@example.net", data.split("message/delivery-status")[1])
        # RFC 3464: the per-message fields, then one group per recipient,
        # each separated by a blank line.
        blocks = deliveryStatus(bounce["data"])
        self.assertEqual(len(blocks), 2, blocks)
        self.assertIn("Reporting-MTA", blocks[0])
        self.assertNotIn("Final-Recipient", blocks[0])
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; bad@example.net")
        self.assertEqual(blocks[1]["Status"], "5.1.1")
        self.assertEqual(blocks[1]["Action"], "failed")

    @defer.inlineCallbacks
    def test_bouncesOfOneMessage(self):
        """
        Recipients that fail for good in two attempts give two bounces, each
        with its own Message-ID, and a 10 KB reply is cut so that no line of
        a bounce passes 998 octets.
        """
        long = "550 5.1.1 " + "x" * 10000
        bad1 = "b" * 64 + "@" + ".".join(["d" * 60, "d" * 60, "d" * 50]) + ".example.net"  # 249 octets, legal
        hop, port = self.hop(rcpt={bad1: long, "bad2@example.net": ["450 4.2.0 busy", "550 5.1.1 gone now"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=(bad1, "bad2@example.net"))
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        bounces = [t["data"] for t in hop.transactions]
        ids = [re.search(rb"^Message-ID: (\S+)\r$", b, re.M).group(1) for b in bounces]
        self.assertNotEqual(ids[0], ids[1])
        for data in bounces:
            self.assertLessEqual(max(len(line) for line in data.split(b"\r\n")), 998)
        first = bounces[0].decode()
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1 " + "x" * 860, first)
        self.assertIn("<%s>: 550 5.1.1 xxx" % bad1, first)
        self.assertIn("x [...]\r\n", first)
        self.assertIn("gone now", bounces[1].decode())

    @defer.inlineCallbacks
    def test_crashBeforeTheBounceIsDurable(self):
        """
        A crash while the bounce is being made durable neither re-sends to the
        recipients that succeeded nor loses the bounce: the "crash" stops the
        gateway with the bounce's commit held back (nothing of it on disk),
        and a new gateway on the same spool takes over.
        """
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        relay = {"smarthosts": ["[127.0.0.1]:%d" % port]}
        first = yield self.gateway(relay)
        spool = first.service.spool
        held = []
        newMessage = spool.newMessage

        def holdBounces(envelope):
            writer = newMessage(envelope)
            if envelope.mailfrom == "":
                writer.commit = lambda: held.append(writer) or defer.Deferred()
            return writer

        spool.newMessage = holdBounces
        qid = yield self.send(rcpts=("good@example.net", "bad@example.net"))
        yield self.until(lambda: held)
        # The bounce is not durable yet: the progress on disk must say who
        # got the message, and must not yet count the bounce as sent.
        state = spool.readState(qid)
        self.assertEqual(state["rcpts"]["good@example.net"]["status"], "done")
        self.assertNotEqual(state["rcpts"].get("bad@example.net", {}).get("status"), "bounced")
        first.service.queue.stopTimeout = 0.2
        yield first.stop()
        self.assertEqual(hop.recipients(), ["good@example.net"])
        self.assertEqual(os.listdir(spool.path("queue")), [qid])

        second = Gateway(first.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                         relay=dict(FAST, **relay))
        yield second.start()
        self.addCleanup(second.stop)
        self.gw = second
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        self.assertEqual(hop.lines.count("RCPT TO:<good@example.net>"), 1)
        self.assertEqual(hop.recipients(), ["good@example.net", "a@example.org"])
        self.assertIn(b"Final-Recipient: rfc822; bad@example.net", hop.transactions[1]["data"])

    @defer.inlineCallbacks
    def test_nullSenderNeverBounces(self):
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(mailfrom="", rcpts=("bad@example.net",))
        yield self.until(self.spoolEmpty)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(hop.transactions, [])
        self.assertEqual(self.gw.service.spool.queueIds(), [])

    @defer.inlineCallbacks
    def test_nullSenderExpiresWithoutBounce(self):
        hop, port = self.hop(rcpt={"slow@example.net": "451 4.4.1 come back later"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "bounce_lifetime": 0.5})
        yield self.send(mailfrom="", rcpts=("slow@example.net",))
        yield self.until(self.spoolEmpty)
        self.assertGreaterEqual(hop.lines.count("RCPT TO:<slow@example.net>"), 2)
        self.assertEqual(hop.transactions, [])  # not delivered, and no bounce to <>

    @defer.inlineCallbacks
    def test_severalMessagesPerConnection(self):
        """
        Messages that wait for a busy next hop go out together, on the
        connection kept open from the batch before.
        """
        hop = yield self.fourBehindSlowHop(concurrency=1)
        self.assertEqual(len(hop.connections), 1)
        self.assertEqual([t["connection"] for t in hop.transactions], [0, 0, 0, 0])
        self.assertEqual(hop.lines.count("RSET"), 0)
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net", "r2@example.net", "r3@example.net"])
        for n, t in enumerate(hop.transactions):
            self.assertTrue(t["data"].endswith(b"body of m%d\r\n" % n))

    @defer.inlineCallbacks
    def test_connectionsFollowTheBacklog(self):
        """
        A message that comes while a connection is busy waits for it; a
        second connection opens only when more messages wait than
        connections are busy, and a connection that finishes takes what
        waits.
        """
        hop = yield self.fourBehindSlowHop(concurrency=10)
        self.assertEqual(len(hop.connections), 2)
        carried = {t["rcpts"][0]: t["connection"] for t in hop.transactions}
        self.assertEqual(sorted(carried), ["r%d@example.net" % n for n in range(4)])
        self.assertEqual(carried["r0@example.net"], 0)
        # Both connections carried mail; which one took r3 depends on which
        # greeted first, a matter of timing on a loaded machine.
        self.assertEqual(set(carried.values()), {0, 1})

    @defer.inlineCallbacks
    def test_keptConnectionCarriesTheNextMessage(self):
        hop, port = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("one@example.net",))
        yield self.until(self.spoolEmpty)
        yield self.send(rcpts=("two@example.net",))
        yield self.until(lambda: self.spoolEmpty() and len(hop.transactions) == 2)
        self.assertEqual(len(hop.connections), 1)
        self.assertEqual(hop.lines.count("EHLO relay.test"), 1)
        self.assertEqual(hop.recipients(), ["one@example.net", "two@example.net"])

    @defer.inlineCallbacks
    def test_keptConnectionIsClosedWhenIdle(self):
        self.patch(SMTPNextHop, "IDLE_SECONDS", 0.2)
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send()
        yield self.until(self.spoolEmpty)
        yield self.until(lambda: "QUIT" in hop.lines)
        self.assertEqual(self.gw.service.queue.router.default.smtpHops()[0].idle, [])

    @defer.inlineCallbacks
    def test_stopClosesKeptConnections(self):
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertNotIn("QUIT", hop.lines)
        yield self.gw.stop()
        self.assertIn("QUIT", hop.lines)

    @defer.inlineCallbacks
    def test_connectionClosedByTheHopIsNotReused(self):
        hop, port = self.hop(factory=TrackingHopFactory())
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("one@example.net",))
        yield self.until(self.spoolEmpty)
        hop.connections[0].transport.loseConnection()
        yield self.until(lambda: not self.gw.service.queue.router.default.smtpHops()[0].idle[0][0].usable)
        yield self.send(rcpts=("two@example.net",))
        yield self.until(lambda: self.spoolEmpty() and len(hop.transactions) == 2)
        self.assertEqual([t["connection"] for t in hop.transactions], [0, 1])

    @defer.inlineCallbacks
    def test_failoverFromRefusedToSecond(self):
        dead = freePort()
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % dead, "[127.0.0.1]:%d" % port]})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_dropMidDataIsTemporary(self):
        hop, port = self.hop(drop="body", drops=1)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts") == 1)
        self.assertEqual(hop.transactions, [])  # nothing acknowledged, nothing marked done
        yield self.until(self.spoolEmpty)
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_keptConnectionClosedByTheNextHop(self):
        """
        A kept-open connection that the next hop closes before answering
        the next MAIL costs that message nothing: it goes out at once over
        a new connection, with no retry and no progress recorded.
        """
        hop, port = self.hop(drop="reused")
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        yield self.send(subject="first")
        yield self.until(lambda: len(hop.transactions) == 1 and self.spoolEmpty())
        qid = yield self.send(subject="second")  # within the kept-open connection's idle time
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        self.assertEqual(len(hop.connections), 2)
        self.assertIn(b"Subject: second", hop.transactions[1]["data"])
        self.assertEqual(self.gw.service.spool.readState(qid), {})

    @defer.inlineCallbacks
    def test_messageBehindABrokenSessionNotDeferred(self):
        """
        A next hop closing the connection at one message's end of data
        defers that message alone: the one carried behind it on the same
        connection was not sent, and goes out at once on a new connection
        (it was deferred with it, retried with it, and in the end bounced
        with it).
        """
        hop = TrackingHopFactory(greetDelay=1.0, extensions=["PIPELINING"], dropAtEndFor="poison@example.net")
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 300, "retry_max": 300})
        yield self.send(subject="first", rcpts=("r0@example.net",))  # (its connection's greeting is late)
        poison = yield self.send(subject="poison", rcpts=("poison@example.net",))
        yield self.send(subject="behind", rcpts=("r1@example.net",))  # (the same batch, behind the poison)
        spool = self.gw.service.spool
        yield self.until(lambda: len(hop.transactions) == 2 and spool.readState(poison).get("attempts") == 1)
        self.assertEqual(spool.queueIds(), [poison])
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual([t["connection"] for t in hop.transactions], [0, 1])

    @defer.inlineCallbacks
    def test_messageNotSentGoesFirst(self):
        """
        A message its connection never got to (the next hop silent at the
        end of data of the one before it) goes first on the next connection,
        ahead of another such message that came meanwhile: it used to wait
        behind it again, and again time out with it.
        """
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], silentAtEndFor="poison@example.net")
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "command_timeout": 1.5, "retry_min": 300, "retry_max": 300})
        yield self.send(subject="first", rcpts=("r0@example.net",))  # (its connection's greeting is late)
        yield self.send(subject="poison 1", rcpts=("poison@example.net",))
        yield self.send(subject="behind", rcpts=("r1@example.net",))  # (the same batch, behind the poison)
        yield self.until(lambda: "RCPT TO:<poison@example.net>" in hop.lines)
        yield self.send(subject="poison 2", rcpts=("poison@example.net",))  # (waits while the first times out)
        yield self.until(lambda: len(hop.transactions) == 2)
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual([t["connection"] for t in hop.transactions], [0, 1])

    @defer.inlineCallbacks
    def test_keptConnectionClosedUnderABatch(self):
        """
        A kept-open connection closed by the next hop under a batch of two:
        both go out once on a new connection (the second, not reached by
        the closed one, was put back in line as well, and went out twice).
        """
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], drop="reused")
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 300, "retry_max": 300})
        yield self.send(subject="first", rcpts=("r0@example.net",))  # (its connection's greeting is late)
        yield self.send(subject="second", rcpts=("r1@example.net",))
        yield self.send(subject="third", rcpts=("r2@example.net",))  # (the same batch as the second)
        yield self.until(lambda: len(hop.transactions) >= 3 and self.spoolEmpty())
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net", "r2@example.net"])
        self.assertEqual([t["connection"] for t in hop.transactions], [0, 1, 1])
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_notSentPastTheFirstHostStaysThere(self):
        """
        Messages a connection to the second smarthost never got to (it
        takes one message per connection) go on new connections to that
        host: the first, which deferred them, is asked once each (they
        started over from it, the n-th message n times).
        """
        first = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"],
                                   rcpt={"r%d@example.net" % n: "451 4.7.1 greylisted" for n in range(4)})
        first, firstPort = self.hop(factory=first)
        second, secondPort = self.hop(extensions=["PIPELINING"], perConnection=1)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % firstPort, "[127.0.0.1]:%d" % secondPort],
                            "destination_concurrency": 1, "retry_min": 300, "retry_max": 300})
        for n in range(4):  # (the first alone, its connection's greeting late; the others one batch)
            yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))
        yield self.until(lambda: len(second.transactions) == 4 and self.spoolEmpty())
        self.assertEqual(sorted(second.recipients()), ["r%d@example.net" % n for n in range(4)])
        self.assertEqual([first.lines.count("RCPT TO:<r%d@example.net>" % n) for n in range(4)], [1] * 4)
        self.assertEqual(len(second.connections), 4)

    @defer.inlineCallbacks
    def test_limitOfMessagesPerConnection(self):
        """
        A next hop that takes one message per connection and says 421 to
        the next MAIL: every message goes out at once, each on a connection
        of its own, none deferred (retry_min was its wait).
        """
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], mailLimit=1)
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 300, "retry_max": 300})
        for n in range(4):  # (the first alone, its connection's greeting late; the others one batch)
            yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))
        yield self.until(lambda: len(hop.transactions) == 4 and self.spoolEmpty())
        self.assertEqual(sorted(hop.recipients()), ["r%d@example.net" % n for n in range(4)])

    @defer.inlineCallbacks
    def test_421UnderABatch(self):
        """
        A 421 to a RCPT of the first message a fresh connection carries (the
        next hop shutting down, the connection not closed yet): that message
        is deferred with the reply, and the messages of its batch behind it
        go out at once on a new connection, none on the one told 421.
        """
        hop, port = self.hop(factory=TrackingHopFactory(extensions=["PIPELINING"],
                                                         rcpt={"r0@example.net": "421 4.3.2 shutting down"}))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.deferAll = True  # (they go out in one batch)
        qids = []
        for n in range(3):
            qids.append((yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))))
        self.gw.service.queue.deferAll = False
        self.gw.service.queue.flush()
        yield self.until(lambda: len(hop.transactions) == 2 and self.attempted(qids[:1])())
        self.assertEqual(hop.lines.count("RCPT TO:<r0@example.net>"), 1)
        self.assertIn("421 4.3.2 shutting down", self.lastErrors(qids[:1])[0])
        self.assertEqual(sorted(hop.recipients()), ["r1@example.net", "r2@example.net"])
        self.assertEqual([t["connection"] for t in hop.transactions], [1, 1])
        self.assertEqual([self.gw.service.spool.readState(qid) for qid in qids[1:]], [{}, {}])

    def lastErrors(self, qids):
        spool = self.gw.service.spool
        return [spool.readState(qid).get("last_error", "") for qid in qids]

    def attempted(self, qids):
        return lambda: all(self.gw.service.spool.readState(qid).get("attempts") == 1 for qid in qids)

    @defer.inlineCallbacks
    def test_deadDestinationDefersAtOnce(self):
        """
        A next hop that answers 421 to every MAIL is dead after three
        connections, as Postfix throttles one: the messages waiting behind
        them, and those that come meanwhile, are deferred at once with its
        reason instead of each opening a connection of its own.  The
        operator's flush tries it again.
        """
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], mailLimit=0)
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 60, "retry_max": 60})
        qids = []
        for n in range(6):  # (the first alone, its connection's greeting late; the others wait for it)
            qids.append((yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))))
        yield self.until(self.attempted(qids))
        qids.append((yield self.send(subject="m6", rcpts=("r6@example.net",))))  # (while it is dead)
        yield self.until(self.attempted(qids[6:]))
        self.assertEqual(Health.DEAD_AFTER, 3)
        self.assertEqual(len(hop.connections), 3)
        self.assertEqual(hop.verbs().count("MAIL"), 3)
        errors = self.lastErrors(qids)
        for error in errors[:3]:  # (the 421, the connection closed after it or not)
            self.assertEqual(error, "421 4.7.0 too many messages on this connection")
        for error in errors[3:]:
            self.assertEqual(error, "421 4.7.0 delivery temporarily suspended: too many messages on this connection")
        hop.mailLimit = None
        self.gw.service.spool.requestFlush(qids[6])  # (relaygw-queue flush ID)
        yield self.until(lambda: hop.transactions)
        self.assertEqual(hop.recipients(), ["r6@example.net"])
        self.gw.service.queue.flush()
        yield self.until(lambda: len(hop.transactions) == 7 and self.spoolEmpty())
        self.assertEqual(sorted(hop.recipients()), ["r%d@example.net" % n for n in range(7)])

    @defer.inlineCallbacks
    def test_silentDestinationCostsThreeTimeouts(self):
        """
        A next hop that never answers an end of data costs three command
        timeouts, not one per message: the messages the connections never
        got to are deferred at once once it is found dead.
        """
        hop, port = self.hop(extensions=["PIPELINING"], silentAtEndFor="silent@example.net")
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 60, "retry_max": 60, "command_timeout": 0.5})
        self.gw.service.queue.deferAll = True  # (they go out in one batch)
        qids = []
        for n in range(6):
            qids.append((yield self.send(subject="m%d" % n, rcpts=("silent@example.net",))))
        self.gw.service.queue.deferAll = False
        started = time.monotonic()
        self.gw.service.queue.flush()
        yield self.until(self.attempted(qids))
        self.assertLess(time.monotonic() - started, 3.5)
        self.assertEqual(len(hop.connections), 3)
        errors = sorted(self.lastErrors(qids), key=lambda e: "suspended" in e)
        for error in errors[:3]:
            self.assertIn("timeout", error)
            self.assertNotIn("suspended", error)
        for error in errors[3:]:
            self.assertIn("delivery temporarily suspended: ", error)

    @defer.inlineCallbacks
    def test_refusedRecipientsLeaveTheDestinationAlive(self):
        """A next hop that answers, if only with 4xx to every RCPT (greylisting), is tried for each message."""
        hop, port = self.hop(extensions=["PIPELINING"], rcpt={"r%d@example.net" % n: "450 4.7.1 greylisted"
                                                              for n in range(4)})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 60, "retry_max": 60})
        qids = []
        for n in range(4):
            qids.append((yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))))
            yield self.until(self.attempted(qids))
        self.assertEqual(hop.verbs().count("MAIL"), 4)
        self.assertEqual([e.count("450 4.7.1") for e in self.lastErrors(qids)], [1] * 4)

    @defer.inlineCallbacks
    def test_deadDestinationTriedAgainAfterRetryMin(self):
        """
        A dead destination is tried again after retry_min, Postfix's
        minimal_backoff_time; its first answer then is logged, as its death was.
        """
        logs = LogCapture(self)
        hop = TrackingHopFactory(greetDelay=0.5, extensions=["PIPELINING"], mailLimit=0)
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 1,
                            "retry_min": 1, "retry_max": 1})
        qids = []
        for n in range(4):
            qids.append((yield self.send(subject="m%d" % n, rcpts=("r%d@example.net" % n,))))
        yield self.until(self.attempted(qids))
        self.assertIn("suspended", self.lastErrors(qids)[3])
        hop.mailLimit = None
        yield self.until(lambda: len(hop.transactions) == 4 and self.spoolEmpty())
        self.assertEqual(sorted(hop.recipients()), ["r%d@example.net" % n for n in range(4)])
        self.assertEqual([len(logs.find(text)) for text in ("deliveries suspended", "deliveries resumed")], [1, 1])

    @defer.inlineCallbacks
    def stuckRoute(self, waitSeconds, commandTimeout, retryMin=60):
        """
        A gateway with 4 delivery slots, a smarthost that accepts, and a
        route for slow.example to a next hop (one connection) that never
        answers the end of data of s@slow.example's messages: that hop and
        the smarthost.
        """
        self.patch(SMTPNextHop, "WAIT_SECONDS", waitSeconds)
        stuck, sport = self.hop(extensions=["PIPELINING"], silentAtEndFor="s@slow.example")
        good, gport = self.hop(extensions=["PIPELINING"])
        self.relay = {"smarthosts": ["[127.0.0.1]:%d" % gport], "concurrency": 4,
                      "command_timeout": commandTimeout, "retry_min": retryMin, "retry_max": 60}
        yield self.gateway(self.relay, routes=[{"domains": ["slow.example"], "smarthosts": ["[127.0.0.1]:%d" % sport],
                                                "destination_concurrency": 1}])
        return stuck, good

    @defer.inlineCallbacks
    def test_stuckDestinationLeavesSlotsToOthers(self):
        """
        Messages waiting for a connection to a destination whose every
        connection is stuck (silent at an end of data) go back to the
        queue manager after WAIT_SECONDS, untried: they held its delivery
        slots, and a message for another destination waited for the stuck
        one's command timeout.
        """
        stuck, good = yield self.stuckRoute(waitSeconds=0.5, commandTimeout=30)
        slow = []
        for n in range(4):
            slow.append((yield self.send(subject="slow %d" % n, rcpts=("s@slow.example",))))
        yield self.until(lambda: stuck.messages or "DATA" in stuck.verbs())
        started = time.monotonic()
        yield self.send(subject="other", rcpts=("b@example.net",))
        yield self.until(lambda: good.transactions)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(good.recipients(), ["b@example.net"])
        self.assertEqual(len(stuck.connections), 1)
        spool = self.gw.service.spool
        self.assertEqual([spool.readState(qid).get("attempts") for qid in slow], [None] * 4)  # no attempt counted

    @defer.inlineCallbacks
    def test_messagesBehindAStuckOneOnItsConnectionGoBack(self):
        """
        Messages a connection has taken behind one whose end of data its
        next hop never answers (three connections to the stuck destination,
        its six messages in batches of one, two and three) go back to the
        queue manager untried after WAIT_SECONDS, as those waiting for a
        connection do, unless their envelope has gone out: they held every
        delivery slot, and a message for another destination waited for the
        stuck one's command timeout.
        """
        self.patch(SMTPNextHop, "WAIT_SECONDS", 1.0)
        stuck, sport = self.hop(extensions=["PIPELINING"], silentAtEndFor="s@slow.example")
        good, gport = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % gport], "concurrency": 6, "command_timeout": 30,
                            "retry_min": 60, "retry_max": 60},
                           routes=[{"domains": ["slow.example"], "smarthosts": ["[127.0.0.1]:%d" % sport],
                                    "destination_concurrency": 3}])
        self.gw.service.queue.stopTimeout = 0.5
        slow = []
        for n in range(6):
            slow.append((yield self.send(subject="slow %d" % n, rcpts=("s@slow.example",))))
        yield self.until(lambda: len(stuck.connections) == 3, timeout=5)
        started = time.monotonic()
        yield self.send(subject="other", rcpts=("b@example.net",))
        yield self.until(lambda: good.transactions, timeout=10)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(good.recipients(), ["b@example.net"])
        spool = self.gw.service.spool
        self.assertEqual([spool.readState(qid).get("attempts") for qid in slow], [None] * 6)  # no attempt counted

    @defer.inlineCallbacks
    def test_handedBackForRetryMinIsDeferred(self):
        """
        A message its next hop keeps handing back untried (no connection
        comes free) is deferred once that has gone on for retry_min: an
        attempt counted, the usual backoff and, in the end, its lifetime.
        Newer messages could take each connection freed before it came
        back, without end.
        """
        stuck, good = yield self.stuckRoute(waitSeconds=0.3, commandTimeout=30, retryMin=1)
        qids = []
        for n in range(3):
            qids.append((yield self.send(subject="slow %d" % n, rcpts=("s@slow.example",))))
        spool = self.gw.service.spool
        yield self.until(lambda: [spool.readState(qid).get("attempts") for qid in qids[1:]] == [1, 1])
        for qid in qids[1:]:
            self.assertEqual(spool.readState(qid)["last_error"], "451 4.4.5 no connection to the next hop came free")
        self.assertEqual(spool.readState(qids[0]), {})  # (the one the connection is stuck on)
        self.assertEqual(len(stuck.connections), 1)
        [routeHop] = self.gw.service.queue.router.routes[0][1].smtpHops()
        self.assertEqual(routeHop.parked, [])  # (nothing left waiting for room that would try them again)

    @defer.inlineCallbacks
    def fourParked(self, waitSeconds, commandTimeout):
        """
        Messages from s0..s3 to the stuck route: s0 stuck on its connection,
        the others handed back and parked.  Returns the stuck hop, the
        route's next hop and the senders of what it is handed from then on.
        """
        stuck, good = yield self.stuckRoute(waitSeconds=waitSeconds, commandTimeout=commandTimeout)
        for n in range(4):
            yield self.send(mailfrom="s%d@example.org" % n, rcpts=("s@slow.example",))
        [routeHop] = self.gw.service.queue.router.routes[0][1].smtpHops()
        yield self.until(lambda: len(routeHop.parked) == 3)
        handed = []
        deliver = routeHop.deliver
        self.patch(routeHop, "deliver", lambda messages, **kw: (handed.append(messages[0].mailfrom),
                                                                 deliver(messages, **kw))[1])
        self.good = good
        return stuck, routeHop, handed

    @defer.inlineCallbacks
    def test_handedBackMessagesAreParkedNotPolled(self):
        """
        Messages handed back by a destination whose connection is stuck are
        not read and tried again every few seconds while it stays stuck.
        """
        stuck, routeHop, handed = yield self.fourParked(waitSeconds=0.3, commandTimeout=30)
        yield task.deferLater(reactor, 3, lambda: None)
        self.assertEqual(handed, [])  # (a retry every 2 s read each of the 3 again, and it went back again)
        self.assertEqual(len(routeHop.parked), 3)

    @defer.inlineCallbacks
    def test_parkedMessagesGoAgainAfterAReload(self):
        """
        A reload that sends the stuck route elsewhere sends its parked
        messages there at once: the old next hop would have held them until
        its connection came free.
        """
        stuck, routeHop, handed = yield self.fourParked(waitSeconds=0.3, commandTimeout=30)
        with open(self.gw.path, "w") as f:
            f.write(configText(self.gw.directory, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                               relay=dict(FAST, **self.relay),
                               routes=[{"domains": ["slow.example"], "smarthosts": self.relay["smarthosts"]}]))
        self.gw.service.configPath = self.gw.path  # (what SIGHUP reads)
        self.gw.service.reload()
        yield self.until(lambda: len(self.good.transactions) == 3, timeout=5)
        self.assertEqual(sorted(t["mailfrom"] for t in self.good.transactions),
                         ["s1@example.org", "s2@example.org", "s3@example.org"])
        self.assertEqual(routeHop.parked, [])

    @defer.inlineCallbacks
    def test_timeHeldIsNotTimeWaited(self):
        """
        A parked message held past retry_min and then released is parked
        again, not deferred at once as one that no connection came free
        for: while held it did not wait for one.
        """
        stuck, good = yield self.stuckRoute(waitSeconds=0.3, commandTimeout=30, retryMin=2)
        yield self.send(mailfrom="s0@example.org", rcpts=("s@slow.example",))
        qid = yield self.send(mailfrom="s1@example.org", rcpts=("s@slow.example",))
        [routeHop] = self.gw.service.queue.router.routes[0][1].smtpHops()
        yield self.until(lambda: routeHop.parked)
        spool = self.gw.service.spool
        self.assertTrue(spool.hold(qid))
        yield self.until(lambda: not routeHop.parked)  # (retry_min ran out: the attempt found it held)
        spool.release(qid)
        yield self.until(lambda: routeHop.parked or spool.readState(qid).get("attempts"))
        self.assertEqual(spool.readState(qid), {})

    @defer.inlineCallbacks
    def test_parkedMessagesGoOldestFirst(self):
        """
        When the stuck connection times out, the oldest parked message takes
        the connection that came free, and only it: the destination is
        still congested.
        """
        stuck, routeHop, handed = yield self.fourParked(waitSeconds=2, commandTimeout=1.5)  # (end of data: 3 s)
        yield self.until(lambda: len(stuck.connections) == 2)  # (the first timed out)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(handed, ["s1@example.org"])
        mails = [line.split()[1] for line in stuck.lines if line.startswith("MAIL")]
        self.assertEqual(mails, ["FROM:<s0@example.org>", "FROM:<s1@example.org>"])

    @defer.inlineCallbacks
    def test_congestedDestinationCarriesOneAtATime(self):
        """
        Once messages had to go back from a destination whose connection is
        stuck, the connection freed by a timeout takes one message, not
        the whole line behind it: stuck behind its first message, the rest
        of such a batch held the delivery slots for another timeout.
        """
        stuck, good = yield self.stuckRoute(waitSeconds=0.3, commandTimeout=1.5)
        for n in range(8):
            yield self.send(subject="slow %d" % n, rcpts=("s@slow.example",))
        yield self.until(lambda: len(stuck.connections) == 2)  # (the first timed out)
        yield task.deferLater(reactor, 0.2, lambda: None)
        [routeHop] = self.gw.service.queue.router.routes[0][1].smtpHops()
        self.assertEqual([len(conn.messages) for conn in routeHop.carrying], [1])
        started = time.monotonic()
        yield self.send(subject="other", rcpts=("b@example.net",))
        yield self.until(lambda: good.transactions)
        self.assertLess(time.monotonic() - started, 1.2)

    @defer.inlineCallbacks
    def test_lifetimeExpiryBounces(self):
        """A recipient still deferred at the end of its lifetime bounces; the mail log says expired, as Postfix's."""
        logs = LogCapture(self)
        hop, port = self.hop(rcpt={"slow@example.net": "451 4.4.1 come back later"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "max_lifetime": 0.5})
        yield self.send(rcpts=("slow@example.net",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        self.assertEqual(bounce["rcpts"], ["a@example.org"])
        statuses = [e["status"] for e in logs.events if e.get("event") == "delivery" and e["to"] == "slow@example.net"]
        self.assertEqual(statuses[-1], "expired")
        self.assertEqual(set(statuses[:-1]), {"deferred"})
        # The report keeps the last temporary status, as Postfix's: nothing said the failure was permanent.
        block = deliveryStatus(bounce["data"])[1]
        self.assertEqual((block["Action"], block["Status"]), ("failed", "4.4.1"))
        self.assertEqual(block["Diagnostic-Code"], "smtp; 451 4.4.1 come back later")

    @defer.inlineCallbacks
    def test_lifetimeExpiryWithoutEnhancedCode(self):
        """A recipient that expires after a 4xx with no enhanced code: its Status is the reply's class, 4.0.0."""
        hop, port = self.hop(rcpt={"slow@example.net": "450 mailbox busy"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "max_lifetime": 0.5})
        yield self.send(rcpts=("slow@example.net",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        block = deliveryStatus(bounce["data"])[1]
        self.assertEqual((block["Action"], block["Status"]), ("failed", "4.0.0"))
        self.assertEqual(block["Diagnostic-Code"], "smtp; 450 mailbox busy")

    @defer.inlineCallbacks
    def test_bounceNamesTheRemoteMTA(self):
        """
        A recipient refused by the next hop: its group in the report names
        that next hop (Remote-MTA) and quotes its reply as an SMTP
        diagnostic, as Postfix's bounces do (RFC 3464 sections 2.3.5, 2.3.6).
        """
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("bad@example.net",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        blocks = deliveryStatus(bounce["data"])
        self.assertEqual(blocks[1]["Remote-MTA"], "dns; 127.0.0.1")
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")

    @defer.inlineCallbacks
    def assertBouncedWithoutCode(self, reply, quoted):
        """
        A refusal C{reply} whose enhanced code is none of RFC 3463's: the
        bounce's Status is the one its reply code gives (5.0.0), as
        Postfix's, never a malformed one; the reply is quoted whole, as
        C{quoted}.
        """
        hop, port = self.hop(rcpt={"bad@example.net": reply})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("bad@example.net",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        blocks = deliveryStatus(bounce["data"])
        self.assertEqual(blocks[1]["Status"], "5.0.0")
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; " + quoted)

    def test_malformedEnhancedCodeNotReported(self):
        """An enhanced code with leading zeros (5.01.001)."""
        return self.assertBouncedWithoutCode("550 5.01.001 bad address", "550 5.01.001 bad address")

    def test_nonAsciiDigitsNoEnhancedCode(self):
        """
        An enhanced code ending in another script's digit (U+0661 ARABIC-INDIC
        DIGIT ONE, sent as UTF-8): before, it was taken as the code, the
        bounce could not be built (its Status field is ASCII), and the
        recipient was tried again every retry without end, never bounced.
        """
        return self.assertBouncedWithoutCode("550 5.1.1\u0661 no such user", "550 5.1.1? no such user")

    @defer.inlineCallbacks
    def test_bounceReturnsNoBodyLines(self):
        """
        A message whose header section runs straight into its body (no
        blank line in between): its bounce returns the header fields only,
        not the body's lines as if they were headers.
        """
        hop, port = self.hop(rcpt={"bad@example.net": "550 5.1.1 no such user"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})

        def send():
            c = Client(self.gw.port)
            try:
                replies = c.transaction(["bad@example.net"], "Subject: hi\r\nsecret body line\r\nmore body\r\n")
                assert replies[-1][0] == 250, replies
            finally:
                c.close()

        yield inThread(send)
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        self.assertNotIn(b"secret body line", bounce["data"])
        self.assertNotIn(b"more body", bounce["data"])
        self.assertIn(b"\r\nSubject: hi\r\n", bounce["data"])

    @defer.inlineCallbacks
    def test_localFailureIsNoSMTPReply(self):
        """
        A recipient that expires without any next hop having answered (the
        connection refused each time) bounces with the gateway's own
        diagnostic: no SMTP reply code it never got, and no Remote-MTA
        (RFC 3464 section 2.3.5: not when no remote MTA was involved).
        """
        sink, sport = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % freePort()], "max_lifetime": 0.5},
                           routes=[{"name": "senders", "domains": ["example.org"],
                                    "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        yield self.send(rcpts=("far@example.net",))
        yield self.until(lambda: sink.transactions and self.spoolEmpty())
        [bounce] = sink.transactions
        blocks = deliveryStatus(bounce["data"])
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; far@example.net")
        self.assertNotIn("Remote-MTA", blocks[1])
        diagnostic = blocks[1]["Diagnostic-Code"]
        self.assertTrue(diagnostic.startswith("X-relaygw; connection to "), diagnostic)
        self.assertNotIn("451", diagnostic)

    @defer.inlineCallbacks
    def test_authToSmarthost(self):
        hop, port = self.hop(extensions=["AUTH PLAIN LOGIN"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "none",
                            "auth_user": "relay", "auth_password": "s3cret"})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertIn("AUTH PLAIN AHJlbGF5AHMzY3JldA==", hop.lines)
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_xclientForwarding(self):
        hop, port = self.hop(extensions=["XCLIENT NAME ADDR PORT HELO PROTO LOGIN"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "received_shows_peer": True, "received_shows_login": True})
        yield self.send(before=["XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net"
                                " LOGIN=alice",
                                "EHLO helo.example.net"])
        yield self.until(self.spoolEmpty)
        [xclient] = [l for l in hop.lines if l.startswith("XCLIENT ")]
        attributes = dict(a.split("=", 1) for a in xclient.split()[1:])
        self.assertEqual(attributes, {"HELO": "helo.example.net", "PROTO": "ESMTP", "LOGIN": "alice",
                                      "PORT": "4567", "NAME": "client.example.net", "ADDR": "192.0.2.7"})
        self.assertTrue(xclient.endswith("ADDR=192.0.2.7"), xclient)
        # After XCLIENT the next hop is greeted again, as the original client did.
        after = hop.lines[hop.lines.index(xclient) + 1]
        self.assertEqual(after, "EHLO helo.example.net")
        [t] = hop.transactions
        received = t["data"].split(b"\r\n\r\n", 1)[0].decode()
        # The trace names the forwarded identity and, on a listener that opts
        # in, the real peer that vouched for it and the login.
        self.assertIn("Received: from helo.example.net (client.example.net [192.0.2.7])", received)
        self.assertRegex(received, r"\(via \[127\.0\.0\.1\] port \d+\)")
        self.assertIn("(authenticated as alice)", received)

    @defer.inlineCallbacks
    def test_noForwardingWithoutForwardIdentity(self):
        hop, port = self.hop(extensions=["XCLIENT NAME ADDR PORT HELO PROTO LOGIN"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        yield self.send(before=["XCLIENT NAME=client.example.net ADDR=192.0.2.7", "EHLO helo.example.net"])
        yield self.until(self.spoolEmpty)
        self.assertNotIn("XCLIENT", hop.verbs())
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_xclientClientsBatchedTogether(self):
        """
        Messages from different original clients that wait for the same busy
        connection are each sent under their own identity, without waiting
        for a retry (the next hop stops offering XCLIENT once it was used).
        """
        hop = TrackingHopFactory(greetDelay=1.5, extensions=["PIPELINING", "XCLIENT NAME ADDR PORT HELO PROTO LOGIN"])
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "forward_identity": True,
                            "destination_concurrency": 1, "retry_min": 60, "retry_max": 60},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        for n in (1, 2, 3, 4):
            yield self.send(subject="from-%d" % n, rcpts=("r%d@example.net" % n,),
                            before=["XCLIENT NAME=c%d.example.net ADDR=192.0.2.%d" % (n, n),
                                    "EHLO helo%d.example.net" % n])
        yield self.until(lambda: len(hop.transactions) == 4 and self.spoolEmpty(), timeout=20)
        for t in hop.transactions:
            n = t["rcpts"][0][1]
            self.assertIn(b"Subject: from-%s" % n.encode(), t["data"])
            # Sent after an XCLIENT naming its own client.
            self.assertEqual(t["xaddr"], "192.0.2.%s" % n)
        self.assertEqual(sorted(hop.recipients()), ["r1@example.net", "r2@example.net", "r3@example.net",
                                                    "r4@example.net"])

    @defer.inlineCallbacks
    def test_dropMidDataFailsOver(self):
        dropper, dport = self.hop(drop="body", drops=100)
        good, gport = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % dport, "[127.0.0.1]:%d" % gport]})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertIn("DATA", dropper.verbs())
        self.assertEqual(dropper.transactions, [])
        self.assertEqual(good.recipients(), ["b@example.net"])
        self.assertEqual(len(good.transactions), 1)

    @defer.inlineCallbacks
    def test_acceptedRecipientsDurableWhileOthersFailOver(self):
        """
        The recipients the first smarthost accepted are in the progress
        record while the others wait on the second one: a crash then
        re-sends to none of them.
        """
        first, port1 = self.hop(extensions=["PIPELINING"], rcpt={"x@example.net": "450 4.2.0 busy"})
        silent, port2 = self.hop(greeting=None)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port1, "[127.0.0.1]:%d" % port2],
                            "command_timeout": 30})
        qid = yield self.send(rcpts=("x@example.net", "y@example.net"))
        yield self.until(lambda: len(silent.connections) == 1)
        spool = self.gw.service.spool
        yield self.until(lambda: spool.readState(qid).get("rcpts", {}).get("y@example.net", {}).get("status") == "done",
                         timeout=5)
        self.assertEqual(first.recipients(), ["y@example.net"])
        self.assertNotIn("x@example.net", spool.readState(qid)["rcpts"])
        self.assertEqual(spool.readState(qid).get("attempts"), None)  # the attempt goes on

    @defer.inlineCallbacks
    def test_mixedOutcomeFromTheLastHostWrittenOnce(self):
        """
        With no other host left to try, a message the next hop accepted for
        one recipient and deferred for another has its whole outcome in the
        first progress record written: no record with the success alone
        comes first (a needless write, and a record that named only part
        of the outcome).
        """
        hop, port = self.hop(extensions=["PIPELINING"], rcpt={"later@example.net": "451 4.3.0 not now"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 60, "retry_max": 60})
        spool = self.gw.service.spool
        written = []
        writeState = spool.writeState

        def recording(qid, state):
            written.append((qid, json.loads(json.dumps(state))))
            return writeState(qid, state)

        spool.writeState = recording
        qid = yield self.send(rcpts=("now@example.net", "later@example.net"))
        yield self.until(lambda: [q for q, _ in written if q == qid])
        yield task.deferLater(reactor, 0.3, lambda: None)
        records = [state for q, state in written if q == qid]
        self.assertEqual(len(records), 1, records)
        self.assertEqual(records[0]["rcpts"]["now@example.net"]["status"], "done")
        self.assertEqual(records[0]["rcpts"]["later@example.net"]["status"], "deferred")
        self.assertEqual(hop.recipients(), ["now@example.net"])

    @defer.inlineCallbacks
    def test_timeoutIsTemporary(self):
        silent, sport = self.hop(greeting=None)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % sport], "command_timeout": 0.5})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertIn("timeout", state["last_error"])
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])  # no bounce either

    @defer.inlineCallbacks
    def test_brokenOpportunisticTLSRetriedInPlaintext(self):
        """
        A next hop that offers STARTTLS but cannot carry TLS gets the
        message in plaintext on a second connection, as Postfix does at its
        "may" level.
        """
        hop, port = self.hop(extensions=["STARTTLS"], replies={"STARTTLS": "220 2.0.0 Ready to start TLS"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "command_timeout": 1})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(hop.connections), 2)
        self.assertEqual(hop.recipients(), ["b@example.net"])
        self.assertEqual(hop.verbs().count("STARTTLS"), 1)

    @defer.inlineCallbacks
    def test_brokenTLSNotRetriedInPlaintextWithCredentials(self):
        """With AUTH credentials for the next hop, a failed TLS is not followed by a plaintext try."""
        hop, port = self.hop(extensions=["STARTTLS", "AUTH PLAIN"],
                             replies={"STARTTLS": "220 2.0.0 Ready to start TLS"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "command_timeout": 1,
                            "auth_user": "relay", "auth_password": "secret"})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertEqual(len(hop.connections), 1)
        self.assertNotIn("AUTH", hop.verbs())
        self.assertEqual(hop.transactions, [])

    @defer.inlineCallbacks
    def test_timeoutFailsOver(self):
        silent, sport = self.hop(greeting=None)
        good, gport = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % sport, "[127.0.0.1]:%d" % gport],
                            "command_timeout": 0.5})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(silent.connections), 1)
        self.assertEqual(good.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_allRefusedStaysQueued(self):
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % freePort(), "[127.0.0.1]:%d" % freePort()]})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 2)
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertIn("refused", state["last_error"].lower())
        self.assertGreater(state["next_attempt"], time.time() - 1)
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])

    @defer.inlineCallbacks
    def test_authLogin(self):
        hop, port = self.hop(extensions=["AUTH LOGIN"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "none",
                            "auth_user": "relay", "auth_password": "s3cret"})
        yield self.send()
        yield self.until(self.spoolEmpty)
        i = hop.lines.index("AUTH LOGIN")
        self.assertEqual(hop.lines[i + 1:i + 3], ["cmVsYXk=", "czNjcmV0"])
        self.assertEqual(hop.recipients(), ["b@example.net"])

    @defer.inlineCallbacks
    def test_authRefusedIsTemporary(self):
        hop, port = self.hop(extensions=["AUTH PLAIN"], authReply="535 5.7.8 Authentication credentials invalid")
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "none",
                            "auth_user": "relay", "auth_password": "wrong"})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 2)
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertIn("535", state["last_error"])
        self.assertNotIn("MAIL", hop.verbs())
        self.assertEqual(hop.transactions, [])  # no mail, and no bounce


class LongReplyTests(RelayTestCase):
    """What a next hop's reply puts in the mail log and the queue: its text, within bounds."""

    timeout = 30

    @defer.inlineCallbacks
    def test_longMultilineReplyKeptShort(self):
        """
        A refusal of 120 lines of 400 octets (within the 64 KiB a reply may
        run to): its text is kept to 2048 characters, as Postfix's client
        keeps a multi-line reply's text to line_length_limit, in the mail
        log's delivery line and the recipient's last reply in the queue
        (before: a line of 50,000 characters in the mail log, and in the
        state file, for each attempt of each recipient).
        """
        logs = LogCapture(self)
        reply = "\n".join(["451-4.3.0 " + "z" * 400] * 120 + ["451 4.3.0 end"])
        hop, port = self.hop(rcpt={"b@example.net": reply})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 60, "retry_max": 120})
        qid = yield self.send()
        yield self.until(lambda: logs.find("status=", qid=qid))
        [line] = logs.find("status=", qid=qid)
        self.assertEqual(line["status"], "deferred")
        self.assertTrue(line["reply"].startswith("451 4.3.0 zzz"), line["reply"][:50])
        self.assertEqual(len(line["reply"]), len("451 4.3.0 ") + 2048)
        spool = self.gw.service.spool
        yield self.until(lambda: spool.readState(qid).get("rcpts"))
        self.assertEqual(spool.readState(qid)["rcpts"]["b@example.net"]["result"], line["reply"])


class ReplyLikeAnUntriedResultTests(RelayTestCase):
    """
    A next hop's refusal is an attempt, whatever it says: counted, backed
    off, and in the end bounced, even when its code, enhanced code and text
    equal those of one of the gateway's own "no attempt was made" results
    (L{NOT_SENT}, L{STOPPED}, L{WITHDRAWN}, L{WAITED}).  Taken for one, it
    would have the message sent again at once without end, or left queued
    with no retry.
    """

    timeout = 30

    @defer.inlineCallbacks
    def _oneAttempt(self, rcptReply):
        hop, port = self.hop(rcpt={"b@example.net": rcptReply})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 60, "retry_max": 120})
        qid = yield self.send()
        yield self.until(lambda: "RCPT" in hop.verbs(), timeout=10)
        # Bounded observation: 1.5 s of wall time.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        return hop, qid

    @defer.inlineCallbacks
    def _assertOneAttempt(self, rcptReply):
        hop, qid = yield self._oneAttempt(rcptReply)
        rcpts = hop.verbs().count("RCPT")
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(rcpts, 1, "%d RCPTs in 1.5 s with retry_min = 60 s" % (rcpts,))
        self.assertEqual(state.get("attempts"), 1, state)
        self.assertIn(qid, self.gw.service.queue.retries.waiting())

    def test_ordinaryDeferralIsAnAttempt(self):
        """Any other 451 is one attempt, then the retry_min (60 s) back-off."""
        return self._assertOneAttempt("451 4.4.2 not sent: try again later")

    def test_replyLikeNotSentIsAnAttempt(self):
        """
        RCPT answered like L{NOT_SENT}: one attempt, then the back-off,
        not the message handed straight back to go again at once.
        """
        return self._assertOneAttempt(NOT_SENT.describe())

    def test_replyLikeWithdrawnIsAnAttempt(self):
        """
        RCPT answered like L{WITHDRAWN}: one attempt recorded, then the
        back-off, not the message scheduled again at once.
        """
        return self._assertOneAttempt(WITHDRAWN.describe())

    @defer.inlineCallbacks
    def test_replyLikeStoppedIsAnAttempt(self):
        """
        RCPT answered like L{STOPPED}: one attempt recorded and a retry
        scheduled, not the attempt taken as cut short by a stop that never
        happened, leaving the message queued, never tried again and never
        bounced.
        """
        hop, qid = yield self._oneAttempt(STOPPED.describe())
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])
        self.assertEqual(state.get("attempts"), 1, state)
        self.assertIn(qid, self.gw.service.queue.retries.waiting())

    def test_replyLikeWaitedIsAnAttempt(self):
        """
        RCPT answered like L{WAITED}: one attempt, then the back-off, not
        the message parked as if no connection had come free, told at once
        that one has, and sent again and again until retry_min has passed.
        """
        return self._assertOneAttempt(WAITED.describe())


class TLSTests(RelayTestCase):
    def setUp(self):
        cadir = os.path.abspath(self.mktemp())
        self.ca, issue = makeCA(cadir)
        cert, key = issue("hop", "localhost")
        with open(cert) as c, open(key) as k:
            self.serverTLS = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        otherCA, _ = makeCA(os.path.join(cadir, "other"), "Other CA")
        self.otherCA = otherCA

    @defer.inlineCallbacks
    def test_verifyWithRightCA(self):
        hop, port = self.hop(tls=self.serverTLS)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": self.ca})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertTrue(hop.transactions[0]["tls"])

    def copyCA(self, source):
        """A copy of CA bundle C{source} the test may replace; its path."""
        path = os.path.abspath(self.mktemp())
        with open(source, "rb") as f, open(path, "wb") as out:
            out.write(f.read())
        return path

    def delivered(self, hop, n):
        """Wait for C{n} transactions over TLS at C{hop} and an empty spool."""
        return self.until(lambda: len(hop.transactions) == n and self.spoolEmpty())

    @defer.inlineCallbacks
    def test_caReadOnceNotPerConnection(self):
        """
        The CA bundle is read at start, not at every connection: replaced
        by a FIFO, deliveries still verify with it and nothing waits
        (before: each connection opened the file on the reactor, and a FIFO
        held the whole gateway until something wrote to it).
        """
        hop, port = self.hop(tls=self.serverTLS)
        ca = self.copyCA(self.ca)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": ca})
        yield self.send()
        yield self.delivered(hop, 1)
        yield self.gw.service.delivery.router.closeIdle()  # (the next delivery opens a connection of its own)
        os.unlink(ca)
        plantFIFO(self, ca)
        started = time.monotonic()
        yield self.send()
        yield self.delivered(hop, 2)
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(all(t["tls"] for t in hop.transactions))

    @defer.inlineCallbacks
    def test_reloadTakesNewCA(self):
        """A reload after the CA bundle's file changed verifies with the new bundle."""
        hop, port = self.hop(tls=self.serverTLS)
        ca = self.copyCA(self.otherCA)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": ca})
        self.gw.service.configPath = self.gw.path
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertEqual(hop.transactions, [])
        with open(self.ca, "rb") as f, open(ca, "wb") as out:
            out.write(f.read())
        self.gw.service.reload()
        yield self.delivered(hop, 1)

    @defer.inlineCallbacks
    def test_reloadWithBrokenCAKeepsTheOld(self):
        """
        A reload with a CA bundle that holds no certificate keeps the one
        loaded, with one error line; deliveries still verify with it.
        """
        hop, port = self.hop(tls=self.serverTLS)
        ca = self.copyCA(self.ca)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": ca})
        self.gw.service.configPath = self.gw.path
        with open(ca, "w") as f:
            f.write("not a certificate\n")
        logs = LogCapture(self)
        self.gw.service.reload()
        errors = [formatEvent(e) for e in logs.events if e["log_level"].name in ("error", "critical")]
        self.assertEqual(errors, ["reload refused, keeping the running config: relaygw.toml: relay.tls_ca: %s holds "
                                  "no PEM certificate (expected a readable PEM CA bundle)" % (ca,)])
        yield self.send()
        yield self.delivered(hop, 1)
        self.assertTrue(hop.transactions[0]["tls"])

    @defer.inlineCallbacks
    def test_reloadWithHugeCAKeepsTheOld(self):
        """
        A CA bundle file grown to 1 TiB (sparse) is refused unread, at a
        reload and by the watch for changed files, with one error line
        each; deliveries still verify with the one loaded.  (Before, the
        checks of a reload read it: MemoryError, a traceback and no line
        naming the key; a few GiB were read on the reactor.)
        """
        hop, port = self.hop(tls=self.serverTLS)
        ca = self.copyCA(self.ca)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": ca})
        self.gw.service.configPath = self.gw.path
        os.truncate(ca, 1 << 40)
        logs = LogCapture(self)
        self.gw.service.delivery.watchCertificates()
        self.gw.service.reload()
        errors = [formatEvent(e) for e in logs.events if e["log_level"].name in ("error", "critical")]
        tooBig = "%s is 1099511627776 octets, over the 16777216 a PEM file may have" % (ca,)
        self.assertEqual(errors, [
            "TLS reload of CA bundle %s failed, keeping the current one: ValueError('%s')" % (ca, tooBig),
            "reload refused, keeping the running config: relaygw.toml: relay.tls_ca: %s (expected a readable PEM "
            "CA bundle)" % (tooBig,)])
        yield self.send()
        yield self.delivered(hop, 1)

    @defer.inlineCallbacks
    def test_verifyWithWrongCAStaysQueued(self):
        hop, port = self.hop(tls=self.serverTLS)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": self.otherCA})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertEqual(hop.transactions, [])
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["b@example.net"]["status"], "deferred")
        self.assertIn("TLS handshake", state["last_error"])
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])

    @defer.inlineCallbacks
    def test_verifyAfterFailoverChecksThatHostsName(self):
        """
        Each smarthost's certificate is checked against its own configured
        name, not the first smarthost's.
        """
        hop, port = self.hop(tls=self.serverTLS)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % freePort(), "[localhost]:%d" % port],
                            "tls": "verify", "tls_ca": self.ca})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertEqual(hop.recipients(), ["b@example.net"])
        self.assertTrue(hop.transactions[0]["tls"])

    @defer.inlineCallbacks
    def test_verifyWithoutSTARTTLSStaysQueued(self):
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": self.ca})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertIn("STARTTLS", self.gw.service.spool.readState(qid)["last_error"])
        self.assertNotIn("MAIL", hop.verbs())

    @defer.inlineCallbacks
    def test_mayUsesTLSWithoutVerifying(self):
        hop, port = self.hop(tls=self.serverTLS)
        # Neither the CA nor the name (127.0.0.1) would verify: "may" does not check.
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "may"})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertTrue(hop.transactions[0]["tls"])
        self.assertEqual(hop.verbs().count("EHLO"), 2)

    @defer.inlineCallbacks
    def test_plaintextFallbackIsNotReused(self):
        """
        A connection that went on in plaintext after a failed opportunistic
        handshake carries its batch and closes: the next message tries TLS
        again (kept open, it carried every later message in plaintext).
        """
        hop, port = self.hop(tls=self.serverTLS, failHandshakes=1)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "may"})
        yield self.send(subject="first")
        yield self.until(self.spoolEmpty)
        self.assertEqual([t["tls"] for t in hop.transactions], [False])
        yield self.send(subject="second")
        yield self.until(self.spoolEmpty)
        self.assertEqual([t["tls"] for t in hop.transactions], [False, True])
        self.assertIn(b"Subject: second", hop.transactions[1]["data"])

    @defer.inlineCallbacks
    def test_connectionReusedOnlyForAWhile(self):
        """A kept-open connection carries no batch once C{REUSE_SECONDS} have passed since it opened."""
        self.patch(SMTPNextHop, "IDLE_SECONDS", 10.0)
        self.patch(SMTPNextHop, "REUSE_SECONDS", 1.5)
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        for n in range(2):
            yield self.send(subject="m%d" % n)
            yield self.until(lambda: len(hop.transactions) == n + 1)
        self.assertEqual(len(hop.connections), 1)
        yield task.deferLater(reactor, 1.6, lambda: None)
        # Still open (idle for less than IDLE_SECONDS), but too old to carry another.
        yield self.send(subject="m2")
        yield self.until(lambda: len(hop.transactions) == 3)
        self.assertEqual(len(hop.connections), 2)

    @defer.inlineCallbacks
    def test_noneNeverStartsTLS(self):
        hop, port = self.hop(tls=self.serverTLS)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "tls": "none"})
        yield self.send()
        yield self.until(self.spoolEmpty)
        self.assertNotIn("STARTTLS", hop.verbs())
        self.assertFalse(hop.transactions[0]["tls"])


class RouteTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_contextAndDomainRoutes(self):
        default, dport = self.hop()
        bulk, bport = self.hop()
        partner, pport = self.hop()
        yield self.gateway(
            {"smarthosts": ["[127.0.0.1]:%d" % dport]},
            listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xsetcontext"]},
            routes=[{"name": "bulk", "context_key": "binding", "context_value": "bulk",
                     "smarthosts": ["[127.0.0.1]:%d" % bport]},
                    {"name": "partner", "domains": ["partner.example"], "smarthosts": ["[127.0.0.1]:%d" % pport]}])
        yield self.send(subject="normal")
        yield self.send(subject="bulk", before=["XSETCONTEXT binding=bulk"])
        yield self.send(subject="partner", rcpts=("x@mail.partner.example",))
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(default.transactions), 1)
        self.assertIn(b"Subject: normal", default.transactions[0]["data"])
        self.assertEqual(len(bulk.transactions), 1)
        self.assertIn(b"Subject: bulk", bulk.transactions[0]["data"])
        self.assertEqual(partner.recipients(), ["x@mail.partner.example"])

    @defer.inlineCallbacks
    def test_domainRouteSplitsOneMessage(self):
        """One message, recipients in two routes: each next hop gets only its own."""
        default, dport = self.hop()
        partner, pport = self.hop(rcpt={"bad@partner.example": "550 5.1.1 unknown"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % dport]},
                           routes=[{"name": "partner", "domains": ["Partner.Example."],
                                    "smarthosts": ["[127.0.0.1]:%d" % pport]}])
        yield self.send(rcpts=("a@other.example", "x@PARTNER.example", "bad@partner.example"))
        yield self.until(lambda: len(default.transactions) == 2 and self.spoolEmpty())
        self.assertEqual(partner.recipients(), ["x@PARTNER.example"])
        self.assertEqual(default.transactions[0]["rcpts"], ["a@other.example"])
        # The bounce for the partner's refusal goes to the sender by the default path.
        bounce = default.transactions[1]
        self.assertEqual((bounce["mailfrom"], bounce["rcpts"]), ("", ["a@example.org"]))
        self.assertIn(b"Final-Recipient: rfc822; bad@partner.example", bounce["data"])


    @defer.inlineCallbacks
    def test_addressLiteralRouteTakesEveryFormOfTheAddress(self):
        """
        A route for an address literal takes the recipients at that address
        however they write it (case, zeros, IPv4-mapped IPv6): those not
        written as in the route went to the default next hop.
        """
        default, dport = self.hop()
        literal, lport = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % dport]},
                           routes=[{"name": "literal", "domains": ["[IPv6:2001:db8::1]", "[192.0.2.1]"],
                                    "smarthosts": ["[127.0.0.1]:%d" % lport]}])
        rcpts = ("a@[IPv6:2001:db8::1]", "b@[ipv6:2001:DB8::1]", "c@[IPv6:2001:db8:0:0:0:0:0:1]",
                 "d@[IPv6:2001:0db8::0001]", "e@[192.0.2.1]", "f@[IPv6:::ffff:192.0.2.1]",
                 "g@[IPv6:2001:db8::2]", "h@[192.0.2.10]")
        yield self.send(rcpts=rcpts)
        yield self.until(lambda: len(default.transactions) == 1 and len(literal.transactions) == 1
                         and self.spoolEmpty())
        self.assertEqual(literal.recipients(), list(rcpts[:6]))
        self.assertEqual(default.recipients(), list(rcpts[6:]))

class MXHopCacheTests(unittest.TestCase):
    def test_unusedHopsDropped(self):
        """
        One next hop per MX domain is cached; past the limit, those with
        nothing to do are dropped, and a busy one is kept (and reused).
        """
        import types

        from relaygw import config as _config
        from relaygw.relay.router import HopSpec, Router

        self.patch(HopSpec, "MAX_CACHED", 3)
        cfg = _config.parse(configText(os.path.abspath(self.mktemp()),
                                       relay={"mx": True, "resolver": "127.0.0.1:5353"}))
        clock = task.Clock()
        router = Router(cfg, clock, maildir=None)
        msg = types.SimpleNamespace(context={})
        hops = [router(msg, "a@d%d.example" % i) for i in range(3)]
        self.assertIs(router(msg, "b@D1.example"), hops[1])
        clock.advance(0)  # (those handed out in this turn are kept)
        hops[0].waiting.append((msg, defer.Deferred()))  # busy
        router(msg, "a@d3.example")
        self.assertEqual(sorted(router.default.cache), ["d0.example", "d3.example"])
        self.assertIs(router(msg, "a@d0.example"), hops[0])


def _message(name, arrival):
    import types

    return types.SimpleNamespace(name=name, queueId=name, arrival=arrival, recipients=["%s@example.net" % name],
                                 context={})


class WaitingOrderTests(unittest.TestCase):
    def test_messagesWaitInTheOrderTheyWereAccepted(self):
        """
        A message that comes back to a next hop (it waited too long for a
        connection before) waits ahead of those accepted after it, not
        behind them: handed back again and again, it could be overtaken
        for ever.
        """
        import types

        clock = task.Clock()
        options = types.SimpleNamespace(forwardIdentity=False)
        hop = SMTPNextHop(clock, "smtp:test", lambda: defer.Deferred(), options, maxConnections=1)
        for name, arrival in (("busy", 1.0), ("b", 3.0), ("c", 4.0), ("a", 2.0), ("d", 5.0)):
            hop.deliver([_message(name, arrival)])
        self.assertEqual([entry[0].name for entry in hop.waiting], ["a", "b", "c", "d"])
        hop.wrapUp()


class ParkingTests(unittest.TestCase):
    """
    Messages a congested next hop handed back are parked (L{SMTPNextHop.whenRoom})
    and told there is room as connections come free, oldest first.
    """

    def setUp(self):
        import types

        self.clock = task.Clock()
        self.lookups = []

        def hosts():
            self.lookups.append(defer.Deferred())
            return self.lookups[-1]

        self.hop = SMTPNextHop(self.clock, "smtp:test", hosts, types.SimpleNamespace(forwardIdentity=False),
                               maxConnections=1)
        self.results = {}
        self.deliver(_message("busy", 1.0))  # (its connection never gets its hosts: stuck)
        for name, arrival in (("b", 3.0), ("c", 4.0)):
            self.deliver(_message(name, arrival))
        self.clock.advance(self.hop.WAIT_SECONDS)  # b and c go back untried; the destination is congested
        self.assertEqual(self.handedBack(), ["b", "c"])

    def deliver(self, m):
        self.hop.deliver([m]).addCallback(lambda results: self.results.__setitem__(m.name, results[0]))

    def handedBack(self):
        return sorted(name for name, results in self.results.items() if WAITED in results.values())

    def park(self, *names, held=()):
        """
        Park messages (name, accepted); each, once told, comes straight back
        as the queue manager sends it, unless it is C{held}.
        """
        told = []

        def comeBack(_, name, arrival):
            told.append(name)
            if name not in held:
                self.deliver(_message(name, arrival))

        for name, arrival in names:
            self.hop.whenRoom(_message(name, arrival)).addCallback(comeBack, name, arrival)
        self.clock.advance(0)
        return told

    def test_toldWhenAConnectionFrees(self):
        """
        Parked messages hear nothing while every connection is busy; when
        one comes free, the oldest is told (one connection: one message),
        and a newer message that comes meanwhile does not take its room.
        """
        told = self.park(("c", 4.0), ("b", 3.0))
        self.clock.advance(self.hop.WAIT_SECONDS - 1)  # (still congested)
        self.assertEqual(told, [])
        self.assertFalse(self.hop.unused)
        self.results.clear()
        self.lookups[0].errback(RuntimeError("no DNS"))  # the stuck connection is freed: b is told
        self.deliver(_message("e", 5.0))  # newer, before b is back: the connection is b's
        self.assertEqual(self.results.get("e", {}).get("e@example.net"), WAITED)
        self.clock.advance(0)
        self.assertEqual(told, ["b"])
        self.assertEqual(len(self.lookups), 2)  # b is back, and went out
        self.assertNotIn("b", self.results)
        self.hop.wrapUp()

    def test_heldMessageGivesItsConnectionUp(self):
        """
        A parked message told of a free connection that does not come back
        (held, or deleted) leaves it to the next one at once; it kept that
        connection idle for seconds, and the destination's mail waiting.
        """
        told = self.park(("b", 3.0), ("c", 4.0), held=("b",))
        self.lookups[0].errback(RuntimeError("no DNS"))
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(told, ["b", "c"])
        self.assertEqual(len(self.lookups), 2)  # c went out
        self.hop.wrapUp()

    def test_cancelledWhenTheQueueManagerGivesUp(self):
        d = self.hop.whenRoom(_message("b", 3.0))
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.cancel()
        self.assertEqual(self.hop.parked, [])
        self.lookups[0].errback(RuntimeError("no DNS"))
        self.clock.advance(0)  # (nothing fires twice)
        self.hop.wrapUp()

    def test_notToldWhileEveryConnectionIsBusy(self):
        """
        With the congestion over but the one connection still stuck, a new
        message does not bring the parked ones back only to wait and go
        back again; they are told when the connection comes free.
        """
        told = self.park(("b", 3.0), ("c", 4.0))
        self.clock.advance(self.hop.WAIT_SECONDS)
        self.deliver(_message("e", 5.0))
        self.clock.advance(0)
        self.assertEqual(told, [])
        self.lookups[0].errback(RuntimeError("no DNS"))  # (e takes the connection that came free)
        self.clock.advance(0)
        self.assertEqual(told, [])
        self.lookups[1].errback(RuntimeError("no DNS"))
        self.clock.advance(0)
        self.assertEqual(told, ["b", "c"])
        self.hop.wrapUp()

    def test_allToldOnceTheCongestionIsOver(self):
        """
        With the congestion over (no message had to go back for WAIT_SECONDS),
        every parked message is told at once when the hop is next pumped.
        """
        told = self.park(("b", 3.0), ("c", 4.0))
        self.clock.advance(self.hop.WAIT_SECONDS)
        self.lookups[0].errback(RuntimeError("no DNS"))
        self.clock.advance(0)
        self.assertEqual(told, ["b", "c"])
        self.assertEqual(len(self.lookups), 2)  # (both back: the first on a connection, the other waiting)
        self.hop.wrapUp()

    def test_givenBackWhileCongestedDoesNotProlongIt(self):
        """
        A message given back at once because the destination is congested
        does not make it congested for longer: WAIT_SECONDS after a message
        last had to wait that long, a second message waits for the
        connection the first is on.  (Each one given back made it congested
        for another WAIT_SECONDS: with a backlog retried every second, a
        kill -9 loop's whole queue waited for minutes, the next hop idle.)
        """
        self.clock.advance(self.hop.WAIT_SECONDS - 1)  # (still congested; the one connection stuck)
        self.deliver(_message("e", 5.0))
        self.assertEqual(self.results["e"]["e@example.net"], WAITED)
        self.clock.advance(2)
        self.lookups[0].errback(RuntimeError("no DNS"))  # the stuck connection ends
        self.results.clear()
        self.deliver(_message("f", 6.0))
        self.deliver(_message("g", 7.0))
        self.clock.advance(0)
        self.assertEqual(len(self.lookups), 2)  # f went out
        self.assertNotIn("g", self.results)  # g waits behind it, not handed back
        self.hop.wrapUp()

    def test_allToldWhenTheDestinationIsDead(self):
        """A destination found dead tells every parked message: each is then deferred at once."""
        told = self.park(("b", 3.0), ("c", 4.0))
        self.hop.health.failures = self.hop.health.DEAD_AFTER - 1
        self.hop.health.failed(Result(421, "4.4.2", "no greeting"))
        self.deliver(_message("d", 5.0))
        self.clock.advance(0)
        self.assertEqual(told, ["b", "c"])
        for name in "bcd":
            self.assertIn("suspended", str(self.results[name]["%s@example.net" % name]))
        self.hop.wrapUp()



class ShareTests(unittest.TestCase):
    """A destination holds at most its share of the delivery slots (L{SMTPNextHop.maxHeld})."""

    def test_pastTheShareGoesBackAndWaitsForRoom(self):
        """
        With 3 messages held (on two connections whose lookups never end),
        the fourth goes back at once, untried, and is parked; when one of
        the three is answered it is told, and a newer message that comes
        meanwhile does not take its room.  Back, it goes out on the
        connection that came free.
        """
        import types

        clock = task.Clock()
        lookups, results, told = [], {}, []

        def hosts():
            lookups.append(defer.Deferred())
            return lookups[-1]

        def deliver(m):
            hop.deliver([m]).addCallback(lambda r: results.__setitem__(m.name, r[0]))

        hop = SMTPNextHop(clock, "smtp:test", hosts, types.SimpleNamespace(forwardIdentity=False),
                          maxConnections=2, maxHeld=3)
        logs = LogCapture(self)
        for name, arrival in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)):
            deliver(_message(name, arrival))
        self.assertEqual((hop.held, len(lookups)), (3, 2))  # (a alone, then b and c together)
        self.assertEqual(results, {"d": {"d@example.net": WAITED}})
        self.assertEqual(len(logs.find("its share of the delivery slots")), 1)
        hop.whenRoom(_message("d", 4.0)).addCallback(lambda _: (told.append("d"), deliver(_message("d", 4.0))))
        clock.advance(0)
        self.assertEqual(told, [])  # (no room: parked, not read again)
        results.clear()
        lookups[0].errback(RuntimeError("no DNS"))  # a is answered: room for one
        deliver(_message("e", 5.0))  # newer, before d is back: the room is d's
        self.assertEqual(results.pop("e"), {"e@example.net": WAITED})
        self.assertIn("lookup failed", str(results.pop("a")["a@example.net"]))
        clock.advance(0)
        self.assertEqual(told, ["d"])
        self.assertEqual((results, hop.held, len(lookups)), ({}, 3, 3))  # d back, on the free connection
        hop.cutShort()
        self.assertEqual(hop.held, 0)

    def test_noShareWhileNothingWaitsForASlot(self):
        """While no other message waits for a delivery slot, a destination may hold more than its share."""
        import types

        clock = task.Clock()
        hop = SMTPNextHop(clock, "smtp:test", lambda: defer.Deferred(), types.SimpleNamespace(forwardIdentity=False),
                          maxConnections=2, maxHeld=3, contended=lambda: False)
        results = {}
        for name, arrival in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)):
            hop.deliver([_message(name, arrival)]).addCallback(lambda r, name=name: results.__setitem__(name, r[0]))
        self.assertEqual((hop.held, results), (4, {}))
        hop.cutShort()
        self.assertEqual(hop.held, 0)


class FairShareTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_backlogToOneDestinationLeavesSlotsToOthers(self):
        """
        60 messages for a destination that answers each end of data after
        0.2 s on its two connections: none waits WAIT_SECONDS, and they held
        every one of the 10 delivery slots, so a message for another
        destination waited behind most of the backlog (about 4 s).  The
        destination holds half the slots now: the other message goes at
        once, and the backlog goes on over both connections, each message
        delivered once.
        """
        slow, sport = self.hop(endOfDataDelay=0.2, extensions=["PIPELINING"])
        good, gport = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % gport], "concurrency": 10, "retry_min": 60,
                            "retry_max": 120},
                           routes=[{"domains": ["slow.example"], "smarthosts": ["[127.0.0.1]:%d" % sport],
                                    "destination_concurrency": 2}])
        backlog = ["s%d@slow.example" % n for n in range(60)]

        def sendBacklog():
            c = Client(self.gw.port)
            try:
                c.reply()
                c.cmd("EHLO client.example")
                for rcpt in backlog:
                    sendMessage(c, rcpt=rcpt, subject=rcpt)
            finally:
                c.close()

        started = time.monotonic()
        yield inThread(sendBacklog)
        sent = time.monotonic()
        yield self.send(subject="other", rcpts=("b@example.net",))
        yield self.until(lambda: good.transactions)
        self.assertLess(time.monotonic() - sent, 1.5)
        yield self.until(self.spoolEmpty, timeout=30)
        self.assertLess(time.monotonic() - started, 10)  # (one connection: 12 s; two: 6 s)
        self.assertEqual(sorted(r for t in slow.transactions for r in t["rcpts"]), sorted(backlog))

    @defer.inlineCallbacks
    def test_recipientsHandedBackWaitForRoomNotTheRetry(self):
        """
        A message to two destinations, one of which hands its recipient back
        untried (at its share, or congested) while the other delivers: that
        recipient is parked with its next hop and goes when it has room,
        not at the next retry (retry_min, 60 s here), and each recipient is
        delivered once.
        """
        routed, rport = self.hop(extensions=["PIPELINING"])
        good, gport = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % gport], "retry_min": 60, "retry_max": 120},
                           routes=[{"domains": ["slow.example"], "smarthosts": ["[127.0.0.1]:%d" % rport]}])
        deliver, handedBack = SMTPNextHop.deliver, []

        def handBackOnce(hop, messages, progress=None):
            if str(rport) in hop.name and not handedBack:
                handedBack.append(messages[0].recipients)
                return defer.succeed([{r: WAITED for r in messages[0].recipients}])
            return deliver(hop, messages, progress)

        self.patch(SMTPNextHop, "deliver", handBackOnce)
        yield self.send(rcpts=("s@slow.example", "b@example.net"))
        yield self.until(lambda: routed.transactions and good.transactions, timeout=5)
        yield self.until(self.spoolEmpty)
        self.assertEqual(handedBack, [["s@slow.example"]])
        self.assertEqual((routed.recipients(), good.recipients()), (["s@slow.example"], ["b@example.net"]))

class MXTests(RelayTestCase):
    """MX delivery through a DNS server on loopback."""

    def dns(self, records, slow=(), asked=None):
        """
        A DNS server on loopback UDP holding C{records} (C{(name, type,
        payload)}); names under servfail.example get SERVFAIL, and those in
        C{slow} their answer after 0.6 s; each name asked is added to C{asked}.
        """
        from twisted.names import dns, server
        from twisted.names.authority import PySourceAuthority  # noqa: F401 (for the record types)
        from twisted.names.common import ResolverBase

        class Zone(ResolverBase):
            def _lookup(self, name, cls, type, timeout):
                name = name.decode() if isinstance(name, bytes) else name
                if asked is not None:
                    asked.append(name)
                if name.endswith("servfail.example"):
                    return defer.fail(RuntimeError("backend down"))  # (the server answers SERVFAIL)
                answers = [dns.RRHeader(name=name, type=t, payload=p, ttl=60, auth=True)
                           for (n, t, p) in records if n == name and t == type]
                if not answers and not any(n == name for (n, _, _) in records):
                    return defer.fail(dns.AuthoritativeDomainError(name))
                if name in slow:
                    return task.deferLater(reactor, 0.6, lambda: (answers, [], []))
                return defer.succeed((answers, [], []))

        factory = server.DNSServerFactory(authorities=[Zone()])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        return udp.getHost().port

    @defer.inlineCallbacks
    def test_nullMXAndNXDomainBounce(self):
        from twisted.names import dns

        sink, sport = self.hop()
        dnsPort = self.dns([("null.example", dns.MX, dns.Record_MX(0, b".")),
                            ("relay.example", dns.MX, dns.Record_MX(10, b"out.relay.example"))])
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort},
                           routes=[{"name": "senders", "domains": ["example.org"],
                                    "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        yield self.send(rcpts=("x@null.example", "y@nosuch.example"))
        yield self.until(lambda: sink.transactions and self.spoolEmpty())
        [bounce] = sink.transactions  # the bounce goes to a@example.org through the route
        data = bounce["data"].decode()
        self.assertIn("Final-Recipient: rfc822; x@null.example", data)
        self.assertIn("Status: 5.1.10", data)
        self.assertIn("Final-Recipient: rfc822; y@nosuch.example", data)
        self.assertIn("Status: 5.1.2", data)


    def port25(self, exclude=()):
        """
        A next hop on port 25 of some loopback address (MX delivery always
        uses port 25), or skip when no such address can be had.
        """
        for last in range(77, 97):
            address = "127.0.0.%d" % last
            if address in exclude:
                continue
            factory = ScriptedSMTPFactory()
            try:
                hop, _ = self.hop(factory=factory, interface=address, port=25)
            except CannotListenError:
                continue
            return hop, address
        raise unittest.SkipTest("cannot listen on port 25 of any 127.0.0.77-96 address")

    def freeAddress(self, exclude):
        """A loopback address with nothing listening on port 25."""
        import socket

        for last in range(200, 250):
            address = "127.0.0.%d" % last
            if address in exclude:
                continue
            try:
                socket.create_connection((address, 25), timeout=1).close()
            except ConnectionRefusedError:
                return address
        raise unittest.SkipTest("no loopback address without a port 25 listener")

    @defer.inlineCallbacks
    def test_mxDelivery(self):
        """
        MX records in preference order (the best one refuses connections),
        and implicit MX (no MX record, an A record), both on port 25.
        """
        from twisted.names import dns

        hop, address = self.port25()
        dead = self.freeAddress([address])
        dnsPort = self.dns([
            ("relay.example", dns.MX, dns.Record_MX(20, b"mx2.relay.example")),
            ("relay.example", dns.MX, dns.Record_MX(10, b"mx1.relay.example")),
            ("mx1.relay.example", dns.A, dns.Record_A(dead)),
            ("mx2.relay.example", dns.A, dns.Record_A(address)),
            ("implicit.example", dns.A, dns.Record_A(address)),
        ])
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort})
        logged = LogCapture(self)
        yield self.send(rcpts=("x@relay.example", "y@implicit.example"))
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty())
        self.assertEqual(sorted(hop.recipients()), ["x@relay.example", "y@implicit.example"])
        self.assertEqual({t["mailfrom"] for t in hop.transactions}, {"a@example.org"})
        # The mail log names the host as Postfix does, relay=NAME[IP]:PORT (it named the address twice).
        self.assertEqual(sorted((e["to"], e["relay"]) for e in logged.find("to=<{to}>", status="sent")),
                         [("x@relay.example", "mx2.relay.example[%s]:25" % address),
                          ("y@implicit.example", "implicit.example[%s]:25" % address)])

    @defer.inlineCallbacks
    def test_addressLiteralDelivery(self):
        """
        A recipient at a domain literal (x@[127.0.0.N]) is delivered to that
        address, port 25, as Postfix does, without asking the DNS (which
        answered NXDOMAIN for the name "[127.0.0.N]": a 5.1.2 bounce).
        """
        from twisted.names import dns

        hop, address = self.port25()
        dnsPort = self.dns([("relay.example", dns.MX, dns.Record_MX(10, b"mx.relay.example"))])
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort})
        yield self.send(rcpts=("x@[%s]" % address,))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        self.assertEqual(hop.recipients(), ["x@[%s]" % address])

    @defer.inlineCallbacks
    def test_sharedSlowMXHost(self):
        """
        One message to two domains whose MX hosts include one with slow DNS:
        a.example, which has another host, leaves it out after the grace;
        b.example, which has only that one, waits for its answer, and both
        recipients are delivered at once (b's used to be deferred, its
        lookup failing with a's: CancelledError).
        """
        from twisted.names import dns

        from relaygw.relay import mx

        self.patch(mx, "HOST_GRACE_SECONDS", 0.2)
        hop, address = self.port25()
        dnsPort = self.dns([
            ("a.example", dns.MX, dns.Record_MX(10, b"mx.a.example")),
            ("a.example", dns.MX, dns.Record_MX(20, b"mx.shared.example")),
            ("b.example", dns.MX, dns.Record_MX(10, b"mx.shared.example")),
            ("mx.a.example", dns.A, dns.Record_A(address)),
            ("mx.shared.example", dns.A, dns.Record_A(address)),
        ], slow=("mx.shared.example",))
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort, "retry_min": 60, "retry_max": 60})
        yield self.send(rcpts=("x@a.example", "y@b.example"))
        yield self.until(lambda: len(hop.transactions) == 2 and self.spoolEmpty(), timeout=5)
        self.assertEqual(sorted(hop.recipients()), ["x@a.example", "y@b.example"])

    @defer.inlineCallbacks
    def test_dnsFailureIsTemporary(self):
        """
        A SERVFAIL for the MX query defers the mail with 4.4.3 (RFC 3463:
        directory server failure), as Postfix does, the reason in the text
        (not the repr of the whole DNS reply).
        """
        dnsPort = self.dns([])
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort})
        qid = yield self.send(rcpts=("x@servfail.example",))
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        rcpt = self.gw.service.spool.readState(qid)["rcpts"]["x@servfail.example"]
        self.assertEqual(rcpt["status"], "deferred")
        self.assertEqual(rcpt["result"],
                         "451 4.4.3 next hop lookup failed: servfail.example: DNS lookup failed: server failure")
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_failingDNSMakesTheDestinationDead(self):
        """
        A domain whose MX lookup fails three times in a row is dead, as
        Postfix throttles a site failure: what comes for it meanwhile is
        deferred at once without a lookup; other domains are not.
        """
        sink, sport = self.hop()
        asked = []
        dnsPort = self.dns([], asked=asked)
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort, "retry_min": 60, "retry_max": 60},
                           routes=[{"name": "fine", "domains": ["fine.example"],
                                    "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        state = self.gw.service.spool.readState
        qids = []
        for n in range(5):
            qids.append((yield self.send(rcpts=("x%d@servfail.example" % n,))))
            yield self.until(lambda: state(qids[-1]).get("attempts", 0) >= 1)
        errors = [state(qid)["last_error"] for qid in qids]
        for error in errors[:3]:
            self.assertEqual(error, "451 4.4.3 next hop lookup failed: servfail.example: DNS lookup failed: "
                                    "server failure")
        for error in errors[3:]:
            self.assertEqual(error, "451 4.4.3 delivery temporarily suspended: next hop lookup failed: "
                                    "servfail.example: DNS lookup failed: server failure")
        self.assertEqual(asked.count("servfail.example"), 3)
        yield self.send(rcpts=("y@fine.example",))
        yield self.until(lambda: sink.transactions)
        self.assertEqual(sink.recipients(), ["y@fine.example"])
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_mxHostWithoutAddressIsTemporary(self):
        """An MX pointing at a name with no address is deferred, not bounced."""
        from twisted.names import dns

        dnsPort = self.dns([("broken.example", dns.MX, dns.Record_MX(10, b"nowhere.broken.example"))])
        logs = LogCapture(self)
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort})
        qid = yield self.send(rcpts=("x@broken.example",))
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        state = self.gw.service.spool.readState(qid)
        self.assertEqual(state["rcpts"]["x@broken.example"]["status"], "deferred")
        self.assertTrue(state["rcpts"]["x@broken.example"]["result"].startswith("451 4.4.4 "), state)
        self.assertEqual(self.gw.service.spool.queueIds(), [qid])
        # Its queries (MX, A, AAAA), each on a UDP port of its own, make no
        # lines of their own in the gateway's log.
        out = io.StringIO()
        observer = makeObserver(out)
        for event in logs.events:
            observer(event)
        self.assertTrue(out.getvalue())
        self.assertNotIn("UDP", out.getvalue())
        self.assertNotIn("Datagram", out.getvalue())


class CrashDuringDeliveryTests(RelayTestCase):
    """kill -9 after the first attempt: succeeded recipients are never sent again."""

    timeout = 90

    def test_noResendAfterRestart(self):
        hop, hport = self.hop(rcpt={"later@example.net": ["451 4.3.0 not now", "451 4.3.0 not now",
                                                            "250 2.1.5 Ok"]})
        gateway = CrashingGateway(os.path.abspath(self.mktemp()),
                                  {"smarthosts": ["[127.0.0.1]:%d" % hport], "retry_min": 2, "retry_max": 2})

        def run(gw):
            gw.start()
            qid = sendOne(gw.port, rcpts=("now@example.net", "later@example.net"))
            statePath = gw.path("state", qid)
            waitFor(lambda: os.path.exists(statePath), "the first attempt's progress", 20)
            with open(statePath) as f:
                state = json.load(f)
            assert state["rcpts"]["now@example.net"]["status"] == "done", state
            assert state["rcpts"]["later@example.net"]["status"] == "deferred", state
            gw.kill()
            gw.start()
            waitFor(lambda: "later@example.net" in hop.recipients() and not os.path.exists(gw.path("queue", qid)),
                    "delivery after the restart")
            return qid

        def check(qid):
            # Each recipient reached the next hop in a completed transaction
            # exactly once; the one that succeeded before the crash was not
            # even offered again.
            self.assertEqual(sorted(hop.recipients()), ["later@example.net", "now@example.net"])
            self.assertEqual(hop.lines.count("RCPT TO:<now@example.net>"), 1)
            self.assertEqual(hop.lines.count("RCPT TO:<later@example.net>"), 3)
            self.assertEqual(len(hop.transactions), 2)

        return crashTest(gateway, run, check)


class DuplicateRecipientTests(RelayTestCase):
    """
    One recipient given twice in RCPT is one recipient (Postfix's cleanup
    drops duplicates): sent once, and when the next hop accepted one copy
    and deferred the other, not deferred and delivered again.
    """

    @defer.inlineCallbacks
    def test_duplicateRecipientSentOnce(self):
        hop, port = self.hop()
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("x@example.net", "x@example.net"))
        yield self.until(self.spoolEmpty)
        self.assertEqual(hop.lines.count("RCPT TO:<x@example.net>"), 1)

    @defer.inlineCallbacks
    def test_acceptedDuplicateNotDeliveredAgain(self):
        """
        The next hop accepts the first RCPT and defers the second copy: the
        message went out to x, so x must not be deferred and sent again.
        """
        hop, port = self.hop(rcpt={"x@example.net": ["250 2.1.5 Ok", "452 4.5.3 too many recipients",
                                                     "250 2.1.5 Ok"]})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port]})
        yield self.send(rcpts=("x@example.net", "x@example.net"))
        yield self.until(self.spoolEmpty)
        self.assertEqual(len(hop.transactions), 1,
                         "x@example.net delivered %d times: %r" % (len(hop.transactions),
                                                                 [t["rcpts"] for t in hop.transactions]))


class GatewayPlaintextCredentialTests(RelayTestCase):
    """
    End to end with the default [relay] tls = "may" and auth_user /
    auth_password set: a next hop whose EHLO reply lacks STARTTLS (deleted
    by a man in the middle) gets no AUTH, and no mail, in the clear.
    """

    @defer.inlineCallbacks
    def test_strippedSTARTTLSNoPlaintextCredentials(self):
        hop, port = self.hop(extensions=["AUTH PLAIN LOGIN"])  # (STARTTLS stripped by a man in the middle)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "command_timeout": 1,
                            "auth_user": "relay", "auth_password": "s3cret-smarthost-password"})
        qid = yield self.send()
        yield self.until(lambda: hop.transactions or
                         self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertNotIn("AUTH", hop.verbs(), "password sent in the clear: %r" % (hop.lines,))
        self.assertEqual(hop.transactions, [])


def _freePort25():
    """A 127.0.0.x address whose port 25 is free (nothing listening), or skip."""
    for last in range(120, 160):
        address = "127.0.0.%d" % last
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, 25))
        except OSError:
            continue
        finally:
            s.close()
        return address
    raise unittest.SkipTest("cannot bind port 25 of any 127.0.0.120-159 address")


class MXLoopTests(RelayTestCase):
    """
    An MX host that is the gateway itself (an address its own port 25
    listener accepts on) ends the MX list, as Postfix's smtp_truncate_self
    does: it and every host of the same or a worse preference are left
    out, and when none is left the mail "loops back to myself" and bounces
    5.4.6 at once, instead of going round until hopcount_limit.
    """

    dns = MXTests.dns

    @defer.inlineCallbacks
    def loopingGateway(self, records, address):
        """
        A gateway relaying for 127.0.0.0/8 on a test port and on port 25 of
        C{address}, with MX delivery through a DNS server holding C{records},
        bounces to example.org going to a sink; returns the sink and the
        envelopes either listener queued.
        """
        sink, sport = self.hop()
        dnsPort = self.dns(records)
        gw = Gateway(self.mktemp(),
                     listeners=({"relay_networks": ["127.0.0.0/8"]},
                                {"relay_networks": ["127.0.0.0/8"], "endpoint": "tcp:25:interface=%s" % address}),
                     relay=dict(FAST, mx=True, resolver="127.0.0.1:%d" % dnsPort),
                     routes=[{"name": "senders", "domains": ["example.org"],
                              "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        yield gw.start()
        self.addCleanup(gw.stop)
        self.gw = gw
        envelopes = []
        for factory in gw.service.factories:  # (both listeners)
            def onQueued(queueId, message, original=factory.onQueued):
                envelopes.append(message.envelope)
                return original(queueId, message)
            factory.onQueued = onQueued
        return sink, envelopes

    @defer.inlineCallbacks
    def assertLoopBounced(self, records, address, domain):
        sink, envelopes = yield self.loopingGateway(records, address)
        yield self.send(rcpts=("x@%s" % domain,))
        yield self.until(lambda: sink.transactions and self.spoolEmpty(), timeout=30)
        self.assertEqual(len(envelopes), 1)  # the client's copy only: none came back through port 25
        [block] = deliveryStatus(sink.transactions[0]["data"])[1:]
        self.assertEqual(block["Status"], "5.4.6")
        self.assertIn("mail for %s loops back to myself" % (domain,), block["Diagnostic-Code"])

    def test_bestMXIsSelf(self):
        """The best MX host is the gateway: the other, worse one is not tried either."""
        from twisted.names import dns

        address = _freePort25()
        other, otherAddress = MXTests.port25(self, exclude=[address])
        return self.assertLoopBounced([
            ("loop.example", dns.MX, dns.Record_MX(10, b"mx.loop.example")),
            ("loop.example", dns.MX, dns.Record_MX(20, b"backup.loop.example")),
            ("mx.loop.example", dns.A, dns.Record_A(address)),
            ("backup.loop.example", dns.A, dns.Record_A(otherAddress))], address, "loop.example") \
            .addCallback(lambda _: self.assertEqual(other.transactions, []))

    def test_implicitMXIsSelf(self):
        """No MX record, and the domain's own address is the gateway's."""
        from twisted.names import dns

        address = _freePort25()
        return self.assertLoopBounced([("self.example", dns.A, dns.Record_A(address))], address, "self.example")

    def test_addressLiteralIsSelf(self):
        """A recipient at a domain literal that is the gateway's own port 25."""
        address = _freePort25()
        return self.assertLoopBounced([], address, "[%s]" % address)

    @defer.inlineCallbacks
    def test_selfAsBackupMXIsLeftOut(self):
        """
        The gateway is a worse MX than another host: that host gets the
        mail, and when it defers, the message waits for it rather than
        going to the gateway's own port 25.
        """
        from twisted.names import dns

        address = _freePort25()
        primary, primaryAddress = MXTests.port25(self, exclude=[address])
        primary.rcpt = {"x@backup.example": "451 4.3.0 try later"}
        sink, envelopes = yield self.loopingGateway([
            ("backup.example", dns.MX, dns.Record_MX(10, b"mx.backup.example")),
            ("backup.example", dns.MX, dns.Record_MX(20, b"me.backup.example")),
            ("mx.backup.example", dns.A, dns.Record_A(primaryAddress)),
            ("me.backup.example", dns.A, dns.Record_A(address))], address)
        yield self.send(rcpts=("x@backup.example",))
        tried = lambda: sum(line.startswith("RCPT TO:<x@backup.example>") for line in primary.lines)  # noqa: E731
        yield self.until(lambda: tried() >= 2, timeout=30)
        self.assertEqual(len(envelopes), 1)
        self.assertEqual(sink.transactions, [])  # no bounce: it waits
        self.assertEqual(len(self.gw.service.spool.queueIds()), 1)


class OwnNameLoopTests(RelayTestCase):
    """
    A next hop on port 25 that answers EHLO with the gateway's own hostname
    is the gateway (a loop the address check cannot see: NAT, a wrong DNS
    record, a second address), as Postfix's smtp_helo judges it: no mail
    goes to it; when it is the best MX host (or a smarthost, or an implicit
    MX) the mail bounces 554 5.4.6 at once, when a better host may take it
    the mail is deferred 451 4.4.6; a warning names the host.
    """

    dns = MXTests.dns

    @defer.inlineCallbacks
    def loopingGateway(self, relay, looping):
        """
        A gateway named gw.example.test delivering by C{relay}, its bounces
        to example.org going to a sink; C{looping} next hops answer EHLO
        with that name.  Returns the sink and a L{LogCapture}.
        """
        for hop in looping:
            hop.ehloReply = "250-GW.example.test Hello\n250 PIPELINING"
        sink, sport = self.hop()
        logs = LogCapture(self)
        yield self.gateway(relay, listener={"hostname": "gw.example.test"},
                           routes=[{"name": "senders", "domains": ["example.org"],
                                    "smarthosts": ["[127.0.0.1]:%d" % sport]}])
        return sink, logs

    def deliveries(self, logs, rcpt):
        return [formatEvent(e) for e in logs.events if e.get("event") == "delivery" and e.get("to") == rcpt]

    @defer.inlineCallbacks
    def assertBounced(self, sink, logs, rcpt, destination, hops):
        yield self.until(lambda: sink.transactions and self.spoolEmpty(), timeout=30)
        [block] = deliveryStatus(sink.transactions[0]["data"])[1:]
        self.assertEqual(block["Status"], "5.4.6")
        self.assertIn("mail for %s loops back to myself" % (destination,), block["Diagnostic-Code"])
        [line] = self.deliveries(logs, rcpt)
        self.assertTrue(line.endswith("dsn=5.4.6, status=bounced (554 5.4.6 mail for %s loops back to myself)"
                                      % (destination,)), line)
        self.assertTrue(logs.find("replied to HELO/EHLO with my own hostname", name="GW.example.test"))
        for hop in hops:
            self.assertNotIn("MAIL", hop.verbs())

    @defer.inlineCallbacks
    def test_bestMXAnswersWithOwnName(self):
        """The best MX host answers with the gateway's name: bounced at once, the worse host not tried."""
        from twisted.names import dns

        best, address = MXTests.port25(self)
        backup, backupAddress = MXTests.port25(self, exclude=[address])
        dnsPort = self.dns([
            ("loop.example", dns.MX, dns.Record_MX(10, b"mx.loop.example")),
            ("loop.example", dns.MX, dns.Record_MX(20, b"backup.loop.example")),
            ("mx.loop.example", dns.A, dns.Record_A(address)),
            ("backup.loop.example", dns.A, dns.Record_A(backupAddress))])
        sink, logs = yield self.loopingGateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort}, [best])
        yield self.send(rcpts=("x@loop.example",))
        yield self.assertBounced(sink, logs, "x@loop.example", "loop.example", [best])
        self.assertEqual(backup.lines, [])

    @defer.inlineCallbacks
    def test_backupMXAnswersWithOwnName(self):
        """
        A worse MX host answers with the gateway's name (the best one is
        down): the mail is deferred, not bounced, and waits for the best.
        """
        from twisted.names import dns

        backup, address = MXTests.port25(self)
        dead = MXTests.freeAddress(self, [address])
        dnsPort = self.dns([
            ("backup.example", dns.MX, dns.Record_MX(10, b"mx.backup.example")),
            ("backup.example", dns.MX, dns.Record_MX(20, b"me.backup.example")),
            ("mx.backup.example", dns.A, dns.Record_A(dead)),
            ("me.backup.example", dns.A, dns.Record_A(address))])
        sink, logs = yield self.loopingGateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort}, [backup])
        yield self.send(rcpts=("x@backup.example",))
        yield self.until(lambda: len(self.deliveries(logs, "x@backup.example")) >= 2, timeout=30)
        for line in self.deliveries(logs, "x@backup.example"):
            self.assertTrue(line.endswith("dsn=4.4.6, status=deferred (451 4.4.6 mail for backup.example loops "
                                          "back to myself)"), line)
        self.assertNotIn("MAIL", backup.verbs())
        self.assertEqual(sink.transactions, [])  # no bounce: it waits
        self.assertEqual(len(self.gw.service.spool.queueIds()), 1)

    @defer.inlineCallbacks
    def test_smarthostAnswersWithOwnName(self):
        """A smarthost on port 25 answering with the gateway's name bounces, as Postfix's [relayhost] does."""
        hop, address = MXTests.port25(self)
        sink, logs = yield self.loopingGateway({"smarthosts": ["[%s]:25" % address]}, [hop])
        yield self.send(rcpts=("x@example.net",))
        yield self.assertBounced(sink, logs, "x@example.net", address, [hop])

    @defer.inlineCallbacks
    def test_otherNameDelivered(self):
        """An MX host whose name only begins like the gateway's gets the mail."""
        from twisted.names import dns

        hop, address = MXTests.port25(self)
        dnsPort = self.dns([("other.example", dns.A, dns.Record_A(address))])
        sink, logs = yield self.loopingGateway({"mx": True, "resolver": "127.0.0.1:%d" % dnsPort}, [])
        hop.ehloReply = "250-gw.example.test.other.example\n250 PIPELINING"
        yield self.send(rcpts=("x@other.example",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        self.assertEqual(hop.recipients(), ["x@other.example"])
        self.assertEqual(logs.find("replied to HELO/EHLO with my own hostname"), [])


class SilentDNS:
    """A DNS server on loopback UDP that never answers; notes the names each query asks about."""

    def __init__(self, test):
        from twisted.internet.protocol import DatagramProtocol
        from twisted.names import dns

        self.names = []
        names = self.names

        class Silent(DatagramProtocol):
            def datagramReceived(self, data, address):
                message = dns.Message()
                message.fromStr(data)
                names.extend((q.name.name.decode(), q.type) for q in message.queries)

        self.udp = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        test.addCleanup(self._settled)  # (after the gateway's stop: cleanups run last first)
        test.addCleanup(self.udp.stopListening)
        self.port = self.udp.getHost().port

    @defer.inlineCallbacks
    def _settled(self):
        """Wait (5 s at most) for the query timers a cancelled lookup leaves to run out."""
        for _ in range(100):
            if not any(getattr(call.func, "__name__", "") == "_clearFailed" for call in reactor.getDelayedCalls()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)

    def asked(self, qtype):
        """The distinct names asked about with C{qtype}."""
        return {name for name, t in self.names if t == qtype}


class FanOutTests(RelayTestCase):
    """How many next-hop deliveries messages to many recipient domains start at once."""

    @defer.inlineCallbacks
    def test_deliveriesInProgressBoundedByConcurrency(self):
        """
        Messages each to 20 recipient domains, with concurrency = 3 and a
        DNS server that never answers: the deliveries in progress (a lookup
        each) stay within concurrency, rather than the first message's 20
        at once (or three messages' worth of them).
        """
        from twisted.names import dns

        server = SilentDNS(self)
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % server.port, "concurrency": 3})
        self.gw.service.queue.stopTimeout = 0.5
        fds = len(os.listdir("/proc/self/fd"))
        for m in range(4):
            yield self.send(rcpts=["r@d%d-%d.example" % (m, n) for n in range(20)])
        yield task.deferLater(reactor, 1.5, lambda: None)
        asked = server.asked(dns.MX)
        self.assertLessEqual(len(asked), 3, sorted(asked))
        # (a socket each lookup; the spool's ring and directory descriptors, opened at its first message)
        self.assertLessEqual(len(os.listdir("/proc/self/fd")) - fds, 3 + 6)

    @defer.inlineCallbacks
    def overlapGateway(self, domains, concurrency, endOfDataDelay):
        """
        A gateway with C{concurrency} delivery slots and a route for each
        of C{domains} (d0.example ...) to one next hop that answers each end
        of data after C{endOfDataDelay} seconds and counts the transactions
        waiting for that answer at once; returns the next hop's factory.
        """
        hop = OverlapFactory(extensions=["PIPELINING"], endOfDataDelay=endOfDataDelay)
        hop, port = self.hop(factory=hop)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "concurrency": concurrency, "tls": "none"},
                           routes=[{"domains": ["d%d.example" % n], "smarthosts": ["[127.0.0.1]:%d" % port]}
                                   for n in range(domains)])
        return hop

    @defer.inlineCallbacks
    def test_oneMessageToManyDomainsWithinConcurrency(self):
        """
        One message to ten recipient domains, each its own next hop, with
        concurrency = 3: it is delivered to all ten, never more than three
        at a time (all ten went at once).
        """
        hop = yield self.overlapGateway(10, 3, 0.2)
        yield self.send(rcpts=["r@d%d.example" % n for n in range(10)])
        yield self.until(self.spoolEmpty)
        self.assertEqual(sorted(hop.recipients()), sorted("r@d%d.example" % n for n in range(10)))
        self.assertEqual(hop.most, 3)

    @defer.inlineCallbacks
    def test_nextHopsWaitingTheirTurnStartNothingAfterTheStop(self):
        """
        The gateway stops while a message's next hops wait for their turn
        (concurrency = 2, ten domains, each end of data answered after 5 s):
        those two are cut short, none of the others connects, and the
        message stays queued for all ten.
        """
        hop = yield self.overlapGateway(10, 2, 5)
        self.gw.service.queue.stopTimeout = 0.3
        yield self.send(rcpts=["r@d%d.example" % n for n in range(10)])
        yield self.until(lambda: hop.now == 2)
        spool = self.gw.service.spool
        [qid] = spool.queueIds()
        yield self.gw.stop()
        self.assertEqual(len(hop.connections), 2)
        self.assertEqual(spool.queueIds(), [qid])
        self.assertEqual(spool.readState(qid).get("attempts"), None)  # (nothing recorded: it was cut short)


class OverlapServer(ScriptedSMTPServer):
    """A next hop counting the transactions that wait for their end-of-data reply at once."""

    def lineReceived(self, line):
        if self.inData and line == b".":
            self.factory.now += 1
            self.factory.most = max(self.factory.most, self.factory.now)
        ScriptedSMTPServer.lineReceived(self, line)

    def _replyLate(self, text):
        self.factory.now -= 1
        ScriptedSMTPServer._replyLate(self, text)


class OverlapFactory(ScriptedSMTPFactory):
    protocol = OverlapServer
    now = most = 0


class SilentAtQuitServer(ScriptedSMTPServer):
    """A next hop that never answers QUIT; counts the connections it has open at once."""

    def connectionMade(self):
        ScriptedSMTPServer.connectionMade(self)
        self.factory.open += 1
        self.factory.most = max(self.factory.most, self.factory.open)

    def connectionLost(self, reason):
        self.factory.open -= 1
        ScriptedSMTPServer.connectionLost(self, reason)

    def lineReceived(self, line):
        if line.strip().upper() != b"QUIT":
            ScriptedSMTPServer.lineReceived(self, line)


class SilentAtQuitFactory(ScriptedSMTPFactory):
    protocol = SilentAtQuitServer
    open = most = 0


class ClosingConnectionsTests(RelayTestCase):
    """Connections saying QUIT are connections to the next hop too."""

    @defer.inlineCallbacks
    def test_quitUnansweredStaysWithinDestinationConcurrency(self):
        """
        A next hop that never answers QUIT, messages coming one at a time,
        each after the connection kept for the last has been closed: the
        next hop never has more than destination_concurrency connections
        from the gateway (those still waiting for the answer to QUIT are
        cut for new ones) and every message goes out.
        """
        self.patch(SMTPNextHop, "IDLE_SECONDS", 0.05)
        hop, port = self.hop(factory=SilentAtQuitFactory())
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "destination_concurrency": 2,
                            "command_timeout": 30, "tls": "none"})
        self.gw.service.queue.stopTimeout = 0.5
        for n in range(6):
            yield self.send(rcpts=("r%d@example.net" % n,))
            yield self.until(lambda: len(hop.transactions) == n + 1, timeout=5)
            yield task.deferLater(reactor, 0.2, lambda: None)
        yield self.until(self.spoolEmpty, timeout=5)
        self.assertLessEqual(hop.most, 2)


class HopCacheSweepTests(RelayTestCase):
    """The per-domain next hops dropped from a full cache are none a delivery still uses."""

    @defer.inlineCallbacks
    def test_sweepKeepsTheHopsOfTheMessageBeingRouted(self):
        """
        The cache fills up while one message's recipients are routed
        (r@a, r@b, r@c, s@a with room for two): the hop already chosen for
        a.example is not dropped for being idle, so both its recipients go
        on one delivery, every lookup is that of a cached hop, and the stop
        cuts every lookup short (no query goes out after it).
        """
        from twisted.names import dns
        from relaygw.relay.router import HopSpec

        self.patch(HopSpec, "MAX_CACHED", 2)
        server = SilentDNS(self)
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % server.port})
        self.gw.service.queue.stopTimeout = 0.2
        self.gw.service.queue.cutGrace = 0.2
        yield self.send(rcpts=("r@a.example", "r@b.example", "r@c.example", "s@a.example"))
        yield self.until(lambda: server.asked(dns.MX) == {"a.example", "b.example", "c.example"}, timeout=5)
        yield task.deferLater(reactor, 0.2, lambda: None)
        cache = self.gw.service.queue.router.default.cache
        self.assertEqual({domain: len(hop.lookups) for domain, hop in cache.items()},
                         {"a.example": 1, "b.example": 1, "c.example": 1})
        yield self.gw.stop()
        asked = len(server.names)
        yield task.deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(server.names[asked:], [])


class CountingServer(SilentAtQuitServer):
    """A next hop that answers QUIT; counts the connections it has open at once."""

    def lineReceived(self, line):
        ScriptedSMTPServer.lineReceived(self, line)


class CountingFactory(SilentAtQuitFactory):
    protocol = CountingServer


class KeptConnectionsTests(RelayTestCase):
    """Connections kept open for reuse are connections to the next hop too."""

    @defer.inlineCallbacks
    def test_keptForOtherClientsWithinDestinationConcurrency(self):
        """
        With the client identity forwarded, a connection kept open speaks
        for one original client; messages from four clients one after the
        other: the next hop never has more than destination_concurrency
        connections from the gateway (one kept for another client is closed
        for a new one) and every message goes out.
        """
        self.patch(SMTPNextHop, "IDLE_SECONDS", 5.0)
        hop, port = self.hop(factory=CountingFactory(extensions=["XCLIENT NAME ADDR PORT HELO PROTO LOGIN"]))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "forward_identity": True, "tls": "none",
                            "destination_concurrency": 2},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        for n in range(4):
            yield self.send(rcpts=("r%d@example.net" % n,),
                            before=["XCLIENT ADDR=192.0.2.%d" % (10 + n), "EHLO helo.example.net"])
            yield self.until(lambda: len(hop.transactions) == n + 1, timeout=5)
        yield self.until(self.spoolEmpty, timeout=5)
        self.assertLessEqual(hop.most, 2)


class SilentDNSSlotsTests(RelayTestCase):
    """Messages for a domain whose DNS never answers hold no more delivery slots than its connections."""

    @defer.inlineCallbacks
    def test_messagesBatchedBehindALookupGoBack(self):
        """
        Six messages for a domain whose DNS server never answers, in
        batches of one, two and three each waiting for its lookup, held
        every delivery slot (concurrency = 6) for the lookup's time: those
        but the first of each batch go back to the queue manager untried
        after WAIT_SECONDS, and a message for another destination goes out.
        """
        from relaygw.relay import mx

        self.patch(SMTPNextHop, "WAIT_SECONDS", 1.0)
        self.patch(mx, "LOOKUP_SECONDS", 20.0)
        server = SilentDNS(self)
        good, gport = self.hop(extensions=["PIPELINING"])
        yield self.gateway({"mx": True, "resolver": "127.0.0.1:%d" % server.port, "concurrency": 6,
                            "destination_concurrency": 3, "retry_min": 60, "retry_max": 60},
                           routes=[{"domains": ["example.net"], "smarthosts": ["[127.0.0.1]:%d" % gport]}])
        self.gw.service.queue.stopTimeout = 0.5
        slow = []
        for n in range(6):
            slow.append((yield self.send(subject="slow %d" % n, rcpts=("s@silent.example",))))
        started = time.monotonic()
        yield self.send(subject="other", rcpts=("b@example.net",))
        yield self.until(lambda: good.transactions, timeout=10)
        self.assertLess(time.monotonic() - started, 5)
        spool = self.gw.service.spool
        self.assertEqual([spool.readState(qid).get("attempts") for qid in slow], [None] * 6)  # no attempt counted


class RecipientLimitServer(ScriptedSMTPServer):
    """A next hop that takes C{factory.limit} recipients per transaction, "452 4.5.3 too many recipients" after."""

    def lineReceived(self, line):
        if not self.inData and line.upper().startswith(b"RCPT ") and len(self.accepted) >= self.factory.limit:
            self.factory.lines.append(line.decode())
            self.reply("452 4.5.3 Error: too many recipients")
            return
        ScriptedSMTPServer.lineReceived(self, line)


class RecipientLimitFactory(ScriptedSMTPFactory):
    protocol = RecipientLimitServer

    def __init__(self, limit, **kw):
        ScriptedSMTPFactory.__init__(self, **kw)
        self.limit = limit


class TooManyRecipientsTests(RelayTestCase):
    """
    A next hop that takes only so many recipients per transaction (452
    4.5.3 for the others): the rest go at once in new transactions, in
    chunks as RFC 5321 section 4.5.3.1.10 has a client send them, not at
    the retry intervals.
    """

    @defer.inlineCallbacks
    def limitedGateway(self, limit, extensions=("PIPELINING",)):
        hop, port = self.hop(factory=RecipientLimitFactory(limit, extensions=list(extensions)))
        # (a retry long after the test's end: only the first attempt delivers)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        return hop

    @defer.inlineCallbacks
    def recorded(self, count):
        """The progress record of the one message queued, once it has an outcome for C{count} recipients."""
        spool = self.gw.service.spool

        def rcpts():
            ids = spool.queueIds()
            return ids and spool.readState(ids[0]).get("rcpts", {})

        yield self.until(lambda: rcpts() and len(rcpts()) == count, timeout=10)
        return rcpts()

    @defer.inlineCallbacks
    def assertDeliveredInTransactionsOf(self, extensions):
        hop = yield self.limitedGateway(10, extensions)
        rcpts = ["r%02d@example.net" % n for n in range(35)]
        yield self.send(rcpts=rcpts)
        yield self.until(lambda: self.spoolEmpty(), timeout=10)
        self.assertEqual([len(t["rcpts"]) for t in hop.transactions], [10, 10, 10, 5])
        self.assertEqual(hop.recipients(), rcpts)
        self.assertEqual(len(hop.connections), 1)
        self.assertEqual(len({t["data"] for t in hop.transactions}), 1)

    def test_restGoAtOncePipelined(self):
        return self.assertDeliveredInTransactionsOf(["PIPELINING"])

    def test_restGoAtOnceWithoutPipelining(self):
        return self.assertDeliveredInTransactionsOf([])

    @defer.inlineCallbacks
    def test_oneRecipientATransaction(self):
        """
        A next hop that takes one recipient a transaction, for a message of
        1,500: 1,500 transactions one after the other, none nested in the
        one before (no recursion limit is reached).
        """
        hop, port = self.hop(factory=RecipientLimitFactory(1, extensions=["PIPELINING"]))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600},
                           listener={"max_recipients": 1500})
        rcpts = ["r%04d@example.net" % n for n in range(1500)]
        yield self.send(rcpts=rcpts)
        yield self.until(lambda: self.spoolEmpty(), timeout=60)
        self.assertEqual(len(hop.transactions), 1500)
        self.assertEqual(hop.recipients(), rcpts)

    @defer.inlineCallbacks
    def test_refusedFromTheFirstIsADeferral(self):
        """
        A next hop that answers 452 to every RCPT, the first one too: an
        ordinary deferral, one transaction per attempt, no loop.
        """
        hop = yield self.limitedGateway(0)
        yield self.send(rcpts=("a@example.net", "b@example.net"))
        rcpts = yield self.recorded(2)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(hop.verbs().count("MAIL"), 1)
        self.assertEqual(hop.transactions, [])
        self.assertEqual({r["status"] for r in rcpts.values()}, {"deferred"})

    @defer.inlineCallbacks
    def test_restDeferredWhenDataRefused(self):
        """
        A transaction that does not deliver (DATA refused) leads to no
        other: the recipients left over are deferred with the 452 each got.
        """
        hop, port = self.hop(factory=RecipientLimitFactory(2, extensions=["PIPELINING"],
                                                           replies={"DATA": "451 4.3.0 try later"}))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        yield self.send(rcpts=["r%d@example.net" % n for n in range(5)])
        rcpts = yield self.recorded(5)
        self.assertEqual(hop.verbs().count("MAIL"), 1)
        self.assertEqual([rcpts["r%d@example.net" % n]["result"] for n in range(5)],
                         ["451 4.3.0 try later"] * 2 + ["452 4.5.3 Error: too many recipients"] * 3)

    def test_closingAtTheRestSendsNoneAgain(self):
        """
        A next hop that closes (421 to the next MAIL: its messages per
        connection) before the new transaction for the recipients left
        over: those recipients are deferred with that reply, and those it
        took are not sent again (as a message the connection never got to
        would be, whole: again and again, before).
        """
        return self.assertClosedAtTheRest("421 4.7.0", mailLimit=1)

    def test_closedBeforeTheRestSendsNoneAgain(self):
        """The same, with the connection closed right after the end-of-data reply."""
        return self.assertClosedAtTheRest("451 4.4.2 connection to", perConnection=1)

    @defer.inlineCallbacks
    def assertClosedAtTheRest(self, reply, **kw):
        hop, port = self.hop(factory=RecipientLimitFactory(2, extensions=["PIPELINING"], **kw))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        yield self.send(rcpts=["r%d@example.net" % n for n in range(5)])
        rcpts = yield self.recorded(5)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual([rcpts["r%d@example.net" % n]["status"] for n in range(5)],
                         ["done"] * 2 + ["deferred"] * 3)
        self.assertTrue(rcpts["r4@example.net"]["result"].startswith(reply), rcpts)

    @defer.inlineCallbacks
    def test_deliveredMadeDurableBeforeTheRest(self):
        """
        The recipients a transaction delivered are written down as done
        before the new transaction for the rest: a crash during it (here,
        its end of data never answered) does not send to them again, as
        Postfix marks each one done once its transaction is.
        """
        hop, port = self.hop(factory=RecipientLimitFactory(2, extensions=["PIPELINING"],
                                                           silentAtEndFor="r2@example.net"))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        yield self.send(rcpts=["r%d@example.net" % n for n in range(5)])
        spool = self.gw.service.spool

        def written():
            ids = spool.queueIds()
            return ids and {r: e["status"] for r, e in spool.readState(ids[0]).get("rcpts", {}).items()}

        yield self.until(lambda: hop.verbs().count("MAIL") == 2, timeout=10)
        yield self.until(written, timeout=10)
        self.assertEqual(written(), {"r0@example.net": "done", "r1@example.net": "done"})
        self.assertEqual(len(hop.transactions), 1)  # (the second one's end of data still unanswered)

    @defer.inlineCallbacks
    def test_noNewTransactionAfterTheStop(self):
        """
        The gateway stops while a transaction of the message is under way:
        it ends, and no new one starts for the recipients it left over
        (they stay queued), as no other message's would.
        """
        hop, port = self.hop(factory=RecipientLimitFactory(2, extensions=["PIPELINING"], endOfDataDelay=0.5))
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 600, "retry_max": 600})
        yield self.send(rcpts=["r%d@example.net" % n for n in range(10)])
        yield self.until(lambda: hop.verbs().count("MAIL") == 1, timeout=10)
        spool = self.gw.service.spool
        [qid] = spool.queueIds()
        started = time.monotonic()
        yield self.gw.stop()
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(hop.verbs().count("MAIL"), 1)
        self.assertEqual(hop.recipients(), ["r0@example.net", "r1@example.net"])
        self.assertEqual(spool.queueIds(), [qid])
        rcpts = spool.readState(qid)["rcpts"]
        self.assertEqual({r: e["status"] for r, e in rcpts.items()},
                         {"r0@example.net": "done", "r1@example.net": "done"})
