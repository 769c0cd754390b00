"""
Onward relay end to end: a gateway in the test's reactor relaying to
scripted loopback next hops (smarthosts, failover, retries, bounces, TLS,
AUTH, XCLIENT forwarding, routes, MX), and a crash during delivery.
"""

import json
import os
import signal
import time

from twisted.internet import defer, reactor, task
from twisted.internet.ssl import PrivateCertificate
from twisted.trial import unittest

from relaygw.testing import (
    Client, Gateway, ScriptedSMTPFactory, configText, freePort, inThread, runTwistd, waitForPort,
)
from tests.test_starttls import makeCA

FAST = {"retry_min": 0.3, "retry_max": 0.6}


def sendOne(port, mailfrom="a@example.org", rcpts=("b@example.net",), subject="relay", before=()):
    c = Client(port)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        for line in before:
            code, lines = c.cmd(line)
            assert code in (220, 250), (line, code, lines)
        assert c.cmd("MAIL FROM:<%s>" % mailfrom)[0] == 250
        for r in rcpts:
            assert c.cmd("RCPT TO:<%s>" % r)[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send("Subject: %s\r\n\r\nbody of %s\r\n.\r\n" % (subject, subject))
        code, lines = c.reply()
        assert code == 250, (code, lines)
        return lines[0].rsplit(" ", 1)[1]
    finally:
        c.close()


class RelayTestCase(unittest.TestCase):
    timeout = 60

    def hop(self, **kw):
        factory = ScriptedSMTPFactory(**kw)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self._closeHop, port, factory)
        return factory, port.getHost().port

    def _closeHop(self, port, factory):
        for c in factory.connections:
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

    def spoolEmpty(self):
        return not self.gw.service.spool.queueIds() and not self.gw.service.queue.active


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
    def test_lifetimeExpiryBounces(self):
        hop, port = self.hop(rcpt={"slow@example.net": "451 4.4.1 come back later"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "max_lifetime": 0.5})
        yield self.send(rcpts=("slow@example.net",))
        yield self.until(lambda: hop.transactions and self.spoolEmpty())
        [bounce] = hop.transactions
        self.assertEqual(bounce["rcpts"], ["a@example.org"])
        self.assertIn(b"Status: 5.4.1", bounce["data"])

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
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"]})
        yield self.send(before=["XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net",
                                "EHLO helo.example.net"])
        yield self.until(self.spoolEmpty)
        [xclient] = [l for l in hop.lines if l.startswith("XCLIENT ")]
        self.assertIn("HELO=helo.example.net", xclient)
        self.assertIn("NAME=client.example.net", xclient)
        self.assertIn("PORT=4567", xclient)
        self.assertTrue(xclient.endswith("ADDR=192.0.2.7"), xclient)
        after = hop.lines[hop.lines.index(xclient) + 1]
        self.assertTrue(after.startswith("EHLO "), after)
        self.assertIn(b"(client.example.net [192.0.2.7])", hop.transactions[0]["data"])


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

    @defer.inlineCallbacks
    def test_verifyWithWrongCAStaysQueued(self):
        hop, port = self.hop(tls=self.serverTLS)
        yield self.gateway({"smarthosts": ["[localhost]:%d" % port], "tls": "verify", "tls_ca": self.otherCA})
        qid = yield self.send()
        yield self.until(lambda: self.gw.service.spool.readState(qid).get("attempts", 0) >= 1)
        self.assertEqual(hop.transactions, [])
        self.assertEqual(self.gw.service.spool.readState(qid)["rcpts"]["b@example.net"]["status"], "deferred")


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
        self.assertIn(b"Subject: bulk", bulk.transactions[0]["data"])
        self.assertEqual(partner.recipients(), ["x@mail.partner.example"])


class MXTests(RelayTestCase):
    """MX delivery through a DNS server on loopback."""

    def dns(self, records):
        from twisted.names import dns, server
        from twisted.names.authority import PySourceAuthority  # noqa: F401 (for the record types)
        from twisted.names.common import ResolverBase

        class Zone(ResolverBase):
            def _lookup(self, name, cls, type, timeout):
                name = name.decode() if isinstance(name, bytes) else name
                answers = [dns.RRHeader(name=name, type=t, payload=p, ttl=60, auth=True)
                           for (n, t, p) in records if n == name and t == type]
                if not answers and not any(n == name for (n, _, _) in records):
                    return defer.fail(dns.AuthoritativeDomainError(name))
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


class CrashDuringDeliveryTests(RelayTestCase):
    """kill -9 after the first attempt: succeeded recipients are never sent again."""

    timeout = 90

    def test_noResendAfterRestart(self):
        hop, hport = self.hop(rcpt={"later@example.net": ["451 4.3.0 not now", "451 4.3.0 not now",
                                                            "250 2.1.5 Ok"]})
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = freePort()
        conf = os.path.join(directory, "relaygw.toml")
        with open(conf, "w") as f:
            f.write(configText(directory, relay={"smarthosts": ["[127.0.0.1]:%d" % hport], "retry_min": 2,
                                                 "retry_max": 2},
                               listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % port,
                                           "relay_networks": ["127.0.0.0/8"]},)))
        procs = []

        def start():
            p = runTwistd(conf, directory)
            procs.append(p)
            waitForPort(port)
            return p

        def run():
            try:
                p = start()
                qid = sendOne(port, rcpts=("now@example.net", "later@example.net"))
                statePath = os.path.join(directory, "spool", "state", qid)
                deadline = time.monotonic() + 20
                while not os.path.exists(statePath) and time.monotonic() < deadline:
                    time.sleep(0.05)
                with open(statePath) as f:
                    state = json.load(f)
                assert state["rcpts"]["now@example.net"]["status"] == "done", state
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
                start()
                deadline = time.monotonic() + 30
                while "later@example.net" not in hop.recipients() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
                return qid
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                        try:
                            p.wait(20)
                        except Exception:
                            p.kill()
                            p.wait()
                    p.stdout.close()

        def check(qid):
            self.assertEqual(sorted(hop.recipients()), ["later@example.net", "now@example.net"])
            self.assertFalse(os.path.exists(os.path.join(directory, "spool", "queue", qid)))

        return inThread(run).addCallback(check)
