"""
SIGHUP reloads the config in every worker, whole or not at all: listener
settings, trust, policy, TLS, [relay], [[route]] and [log] apply without a
restart; restart-only keys are named in a warning; an invalid file is
refused with --check-config's words and the running config stays.
"""

import io
import os
import signal
import smtplib
import ssl
import stat
import time

from twisted.application.service import Application
from twisted.internet import defer, reactor, task, threads
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial import unittest

from relaygw import config, logs
from relaygw.ringcommit import RingCommitter
from relaygw.testing import (Client, Gateway, ScriptedSMTPFactory, configText, freePort, inThread, twistdRunning,
                             waitForPort)
from relaygw.tls import generateSelfSigned
from tests.outside import plantFIFO
from tests.processes import childPids, processState, spoolPids
from tests.tlsmaterial import clientContext, makeCA


def sendNumbered(port, n):
    """Send message C{n} to C{rN@example.net}; the reply to its end of data."""
    c = Client(port)
    try:
        return c.transaction(["r%d@example.net" % n], "Subject: %d\r\n\r\nx\r\n" % n)[-1][0]
    finally:
        c.close()


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.hops = []
        for _ in range(3):
            hop = ScriptedSMTPFactory()
            port = reactor.listenTCP(0, hop, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.hops.append((hop, "[127.0.0.1]:%d" % port.getHost().port))
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},),
                          relay={"smarthosts": [self.hops[0][1]], "tls": "none"})
        self.gw.service.configPath = self.gw.path
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def rewrite(self, listener=None, relay=None, routes=(), log=None, spool=None):
        table = {"relay_networks": ["127.0.0.0/8"], "endpoint": "tcp:0:interface=127.0.0.1"}
        table.update(listener or {})
        hop = {"smarthosts": [self.hops[0][1]], "tls": "none"}
        hop.update(relay or {})
        with open(self.gw.path, "w") as f:
            f.write(configText(self.gw.directory, listeners=(table,), relay=hop, routes=routes, log=log, spool=spool))

    def messages(self, level):
        return [logs.escape(e["log_format"].format(**e)) for e in self.events
                if e.get("log_namespace") == "relaygw.reload" and e["log_level"].name == level]

    def recipientsAccepted(self, *rcpts):
        def run():
            c = Client(self.gw.port)
            try:
                return [code for code, _ in c.transaction(rcpts)[3:]]
            finally:
                c.close()

        return inThread(run)

    def send(self, rcpt):
        def run():
            with smtplib.SMTP("127.0.0.1", self.gw.port) as s:
                s.sendmail("a@example.org", [rcpt], b"Subject: reload\r\n\r\nx\r\n")

        d = inThread(run)
        d.addCallback(lambda _: self.gw.service.queue.whenIdle())
        return d

    @defer.inlineCallbacks
    def test_invalidConfigRefusedWhole(self):
        """
        max_recipients = 1, no relay networks and a misspelt policy in one
        edit: nothing applies, and the log says what --check-config says.
        """
        self.rewrite({"max_recipients": 1, "relay_networks": [], "policy": "relaygw.policy.NoSuchPolicy"})
        self.gw.service.reload()
        self.assertEqual((yield self.recipientsAccepted("b@example.net", "c@example.net")), [250, 250])
        with self.assertRaises(config.ConfigError) as cm:
            config.load(self.gw.path, environment=True)
        self.assertEqual(self.messages("error"), ["reload refused, keeping the running config: %s" % e
                                                  for e in cm.exception.errors])
        self.assertIn("listener[0].policy", cm.exception.errors[0])

    @defer.inlineCallbacks
    def test_hugeFileRefusedUnread(self):
        """
        A config file far larger than any config (here 1 TiB, sparse) is
        refused at once and the gateway goes on as it ran (before: reading
        it raised MemoryError out of the reload; a few GiB stalled every
        session while it was read).
        """
        os.truncate(self.gw.path, 1 << 40)
        self.gw.service.reload()
        self.assertEqual(self.messages("error"), [
            "reload refused, keeping the running config: relaygw.toml: 1099511627776 octets, over the %d a config "
            "may have (expected a TOML file)" % config.MAX_SIZE])
        self.assertEqual((yield self.recipientsAccepted("b@example.net")), [250])

    @defer.inlineCallbacks
    def test_fifoRefusedUnread(self):
        """
        A FIFO named for a file the config reads (a CA bundle, a password
        file) is refused at once, unread, and the gateway goes on as it
        ran (before: the reload read it on the reactor, and no session was
        greeted and no health check answered until something wrote to it).
        """
        fifo = os.path.join(self.gw.directory, "pipe")
        plantFIFO(self, fifo)
        self.rewrite(listener={"credentials": fifo}, relay={"tls_ca": fifo})
        started = time.monotonic()
        self.gw.service.reload()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(self.messages("error"), [
            "reload refused, keeping the running config: relaygw.toml: relay.tls_ca: %s is not a regular file "
            "(expected a readable PEM CA bundle)" % (fifo,),
            "reload refused, keeping the running config: relaygw.toml: listener[0].credentials: %s is not a regular "
            "file (expected a password file (relaygw-passwd))" % (fifo,)])
        self.assertEqual((yield self.recipientsAccepted("b@example.net")), [250])

    @defer.inlineCallbacks
    def test_listenerTrustAndPolicySettingsApply(self):
        self.rewrite({"max_recipients": 1, "relay_networks": ["192.0.2.0/24"]})
        self.gw.service.reload()
        self.assertEqual((yield self.recipientsAccepted("b@example.net")), [554])
        self.rewrite({"max_recipients": 1})
        self.gw.service.reload()
        self.assertEqual((yield self.recipientsAccepted("b@example.net", "c@example.net")), [250, 452])
        self.assertIn("reload: listener l0: changed max_recipients, relay_networks", self.messages("info"))

    @defer.inlineCallbacks
    def test_relayAndRoutesApply(self):
        yield self.send("b@example.net")
        self.assertEqual(self.hops[0][0].recipients(), ["b@example.net"])
        self.rewrite(relay={"smarthosts": [self.hops[1][1]]},
                     routes=({"name": "partner", "domains": ["partner.example"], "smarthosts": [self.hops[2][1]],
                              "tls": "none"},))
        self.gw.service.reload()
        yield self.send("c@example.net")
        yield self.send("d@partner.example")
        self.assertEqual([h.recipients() for h, _ in self.hops],
                         [["b@example.net"], ["c@example.net"], ["d@partner.example"]])
        self.assertIn("reload: [[route]]: changed partner (added)", self.messages("info"))
        self.rewrite(relay={"smarthosts": [self.hops[1][1]]},
                     routes=({"name": "partner", "domains": ["partner.example"], "smarthosts": [self.hops[0][1]],
                              "tls": "none"},))
        self.gw.service.reload()
        self.assertIn("reload: [[route]]: changed partner: smarthosts", self.messages("info"))
        self.rewrite(relay={"smarthosts": [self.hops[1][1]]})
        self.gw.service.reload()
        self.assertIn("reload: [[route]]: changed partner (removed)", self.messages("info"))
        self.assertIn("reload: [relay]: changed smarthosts", self.messages("info"))

    @defer.inlineCallbacks
    def test_destinationConcurrencyHeldAcrossAReload(self):
        """
        A reload that rebuilds the router (here retry_min changes) while a
        message is on the one connection destination_concurrency allows:
        the messages that come next wait for that connection to end rather
        than open more (before: the new router opened its own connections
        beside those of the one it replaced, so the next hop saw more than
        the config says).
        """
        hop = self.hops[0][0]

        class Counting(type(hop).protocol):
            def connectionMade(self):
                super().connectionMade()
                self.factory.open += 1
                self.factory.most = max(self.factory.most, self.factory.open)

            def connectionLost(self, reason):
                super().connectionLost(reason)
                self.factory.open -= 1

        hop.protocol, hop.open, hop.most = Counting, 0, 0
        hop.endOfDataDelay = 1.0
        self.rewrite(relay={"destination_concurrency": 1, "retry_min": 30})
        self.gw.service.reload()

        def send(n):
            return sendNumbered(self.gw.port, n)

        self.assertEqual((yield inThread(send, 0)), 250)
        deadline = reactor.seconds() + 5
        while not hop.open and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.rewrite(relay={"destination_concurrency": 1, "retry_min": 31})
        self.gw.service.reload()
        self.assertEqual((yield inThread(lambda: [send(1), send(2)])), [250, 250])
        deadline = reactor.seconds() + 15
        while len(hop.recipients()) < 3 and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sorted(hop.recipients()), ["r0@example.net", "r1@example.net", "r2@example.net"])
        self.assertEqual(hop.most, 1)

    @defer.inlineCallbacks
    def test_waitingMessageFollowsTheNewSmarthost(self):
        """
        A reload that gives the destination another smarthost while a
        message waits for the one connection to the old one (busy with a
        message whose end of data it answers late): the waiting message
        goes to the new smarthost at once (before: it stayed in the old next
        hop's line and went to the old smarthost once its connection came
        free, after the reload).
        """
        old, new = self.hops[0][0], self.hops[1][0]
        old.endOfDataDelay = 2.0
        self.rewrite(relay={"destination_concurrency": 1})
        self.gw.service.reload()

        def send(n):
            return sendNumbered(self.gw.port, n)

        self.assertEqual((yield inThread(lambda: [send(0), send(1)])), [250, 250])
        yield task.deferLater(reactor, 0.5, lambda: None)  # (r0 on the connection, r1 waiting for it)
        self.rewrite(relay={"destination_concurrency": 1, "smarthosts": [self.hops[1][1]]})
        self.gw.service.reload()
        deadline = reactor.seconds() + 10
        while len(old.recipients() + new.recipients()) < 2 and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((old.recipients(), new.recipients()), (["r0@example.net"], ["r1@example.net"]))

    @defer.inlineCallbacks
    def test_deferAllStopsWhatWaits(self):
        """
        defer_all turned on by a reload: messages waiting for a delivery
        slot are not sent (before, all of them went out after the reload);
        turned off again, each goes out once.  (The first message holds the
        one slot: its next hop never answers its end of data.)
        """
        relay = {"concurrency": 1, "command_timeout": 1}
        self.rewrite(relay=relay)
        self.gw.service.reload()
        hop = self.hops[0][0]
        hop.silentAtEndFor = "r0@example.net"

        def run():
            for i in range(5):
                c = Client(self.gw.port)
                try:
                    assert c.transaction(["r%d@example.net" % i], "Subject: %d\r\n\r\nx\r\n" % i)[-1][0] == 250
                finally:
                    c.close()

        yield inThread(run)
        queue = self.gw.service.queue
        self.assertEqual(len(queue.ready), 4)
        self.rewrite(relay=dict(relay, defer_all=True))
        self.gw.service.reload()
        yield task.deferLater(reactor, 3, lambda: None)  # (the first one's attempt ends: its slot is free)
        self.assertEqual(hop.recipients(), [])
        self.assertEqual((len(queue.ready), len(self.gw.service.spool.queueIds())), (0, 5))
        self.rewrite(relay=relay)
        self.gw.service.reload()
        deadline = reactor.seconds() + 15
        while len(hop.recipients()) < 4 and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sorted(hop.recipients()), ["r%d@example.net" % i for i in range(1, 5)])

    @defer.inlineCallbacks
    def test_retriesApply(self):
        self.rewrite(relay={"retry_min": 7, "retry_max": 70, "concurrency": 3})
        self.gw.service.reload()
        q = self.gw.service.queue
        self.assertEqual((q.retryMin, q.retryMax, q.concurrency), (7, 70, 3))
        yield self.send("b@example.net")

    def test_logApplies(self):
        self.patch(logs, "_enabled", logs._enabled)
        self.patch(logs, "_installed", None)
        out = io.StringIO()
        app = Application("t")
        logs.install(app, out, "text", "info")
        observer = ILogObserver(app)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        logs.Logger(namespace="t").debug("before {x}", x=1)
        self.rewrite(log={"format": "json", "level": "debug"})
        self.gw.service.reload()
        logs.Logger(namespace="t").debug("after {x}", x=1)
        self.assertNotIn("before 1", out.getvalue())
        self.assertIn('"message": "after 1"', out.getvalue())

    @defer.inlineCallbacks
    def test_tlsCertificateApplies(self):
        d = os.path.abspath(self.mktemp())
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        generateSelfSigned(cert, key, "relay.test")

        def ehlo():
            c = Client(self.gw.port)
            try:
                c.reply()
                return c.cmd("EHLO x")[1]
            finally:
                c.close()

        self.assertNotIn("STARTTLS", (yield inThread(ehlo)))
        self.rewrite({"tls_certificate": cert, "tls_key": key})
        self.gw.service.reload()
        self.assertIn("STARTTLS", (yield inThread(ehlo)))

    def test_brokenCertificateReportedOnce(self):
        """
        A certificate file broken in place at a SIGHUP: one error line, the
        config's refusal naming it (not also the certificate reload's), and
        the running certificate stays.
        """
        d = os.path.abspath(self.mktemp())
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        generateSelfSigned(cert, key, "relay.test")
        self.rewrite({"tls_certificate": cert, "tls_key": key})
        self.gw.service.reload()
        before = self.gw.service.factories[0].tls.certificate
        with open(cert, "w") as f:
            f.write("garbage")
        self.gw.service.reload()
        errors = [logs.escape(e["log_format"].format(**e)) for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("reload refused, keeping the running config: ", errors[0])
        self.assertIn(cert, errors[0])
        self.assertIs(self.gw.service.factories[0].tls.certificate, before)

    def test_replacedCertificateNeverOfferedAgain(self):
        """
        A session open across a reload that replaces the certificate and key
        gets the new ones at its STARTTLS: a replaced key (one that leaked)
        is not used for another handshake.
        """
        d = os.path.abspath(self.mktemp())
        old, new = os.path.join(d, "old"), os.path.join(d, "new")
        for where, name in ((old, "old.test"), (new, "new.test")):
            os.makedirs(where)
            generateSelfSigned(os.path.join(where, "cert.pem"), os.path.join(where, "key.pem"), name)
        self.rewrite({"tls_certificate": os.path.join(old, "cert.pem"), "tls_key": os.path.join(old, "key.pem")})
        self.gw.service.reload()

        def run():
            c = Client(self.gw.port)
            try:
                c.reply()
                c.cmd("EHLO x")
                self.rewrite({"tls_certificate": os.path.join(new, "cert.pem"),
                              "tls_key": os.path.join(new, "key.pem")})
                threads.blockingCallFromThread(reactor, self.gw.service.reload)
                self.assertEqual(c.cmd("STARTTLS")[0], 220)
                context = ssl.create_default_context(cafile=os.path.join(new, "cert.pem"))
                c.sock = context.wrap_socket(c.sock, server_hostname="new.test")
                return c.cmd("EHLO x")[0]
            finally:
                c.close()

        return inThread(run).addCallback(self.assertEqual, 250)

    def test_restartKeysNamed(self):
        self.rewrite({"endpoint": "tcp:0:interface=127.0.0.2"})
        with open(self.gw.path, "a") as f:
            f.write("\n[process]\nworkers = 2\n")
        self.gw.service.reload()
        self.assertEqual(self.messages("warn"), ["reload: process.workers changes only with a restart",
                                                 "reload: listener l0: endpoint changes only with a restart"])


    @defer.inlineCallbacks
    def test_spoolSyncsChangeWithARestart(self):
        """The committer is the process's: C{io_uring} (as C{fsync}) changes only with a restart."""
        committer = self.gw.service.committer
        self.rewrite(spool={"io_uring": not isinstance(committer, RingCommitter)})
        self.gw.service.reload()
        self.assertEqual(self.messages("warn"), ["reload: spool.io_uring changes only with a restart"])
        self.assertIs(self.gw.service.committer, committer)
        yield self.send("b@example.net")
        self.assertEqual(self.hops[0][0].recipients(), ["b@example.net"])

    def test_everySpoolKeyNamed(self):
        """
        C{min_free_space}, a spool key as the others, is named in the warning
        (before: not applied, and not said either).
        """
        minFree = self.gw.service.spool.minFree
        self.rewrite(spool={"min_free_space": minFree + 1})
        self.gw.service.reload()
        self.assertEqual(self.messages("warn"), ["reload: spool.min_free_space changes only with a restart"])
        self.assertEqual(self.gw.service.spool.minFree, minFree)


class ListenerSetReloadTests(unittest.TestCase):
    """
    The listeners are what the gateway started with until a restart: one a
    reload removes goes on as it was (warned), and given back it takes the
    settings the file gives it, as any listener does (a worker started
    again builds its listeners the same way, so it serves them alike).
    """

    @defer.inlineCallbacks
    def test_removedThenGivenBack(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        base = {"relay_networks": ["127.0.0.0/8"], "endpoint": "tcp:0:interface=127.0.0.1"}
        gw = Gateway(self.mktemp(), listeners=(base, dict(base, hostname="one.test")))
        gw.service.configPath = gw.path
        yield gw.start()
        self.addCleanup(gw.stop)

        def reload(*listeners):
            with open(gw.path, "w") as f:
                f.write(configText(gw.directory, listeners=listeners))
            gw.service.reload()
            return inThread(greeting)

        def greeting():
            c = Client(gw.ports[1])
            try:
                return c.reply()[1][0]
            finally:
                c.close()

        self.assertEqual((yield reload(base)), "one.test ESMTP relaygw")
        self.assertIn("reload: {key} changes only with a restart", [e.get("log_format") for e in events])
        self.assertEqual([l.name for l in gw.service.config.listeners], ["l0", "l1"])
        self.assertEqual((yield reload(base, dict(base, hostname="two.test"))), "two.test ESMTP relaygw")

    @defer.inlineCallbacks
    def test_hostnamesJudgedAfterAReload(self):
        """
        Every listener's hostname is one a next hop answering EHLO with is
        the gateway (a loop): a reload renaming any listener, not only the
        first, gives new deliveries next hops that know the new names.
        """
        base = {"relay_networks": ["127.0.0.0/8"], "endpoint": "tcp:0:interface=127.0.0.1"}
        gw = Gateway(self.mktemp(), listeners=(base, dict(base, hostname="One.test")),
                     relay={"smarthosts": ["[127.0.0.1]:25"]})
        gw.service.configPath = gw.path
        yield gw.start()
        self.addCleanup(gw.stop)
        before = gw.service.queue.router
        self.assertEqual(before.default.nextHop("example.net").options.ownNames, {"relay.test", "one.test"})
        with open(gw.path, "w") as f:
            f.write(configText(gw.directory, listeners=(base, dict(base, hostname="two.test")),
                               relay={"smarthosts": ["[127.0.0.1]:25"]}))
        gw.service.reload()
        self.assertIsNot(gw.service.queue.router, before)
        self.assertEqual(gw.service.queue.router.default.nextHop("example.net").options.ownNames,
                         {"relay.test", "two.test"})


class HeldBackListenerReloadTests(unittest.TestCase):
    """
    A listener whose new settings do not hold with the keys it runs with
    until a restart keeps its running settings whole, with one warning
    naming it and why: turning proxy_protocol off and dropping
    proxy_trusted (a valid file for the next start) leaves it speaking
    PROXY and trusting its balancers, not refusing every connection.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["192.0.2.0/24"], "proxy_protocol": True,
                                                     "proxy_trusted": ["127.0.0.0/8"]},))
        self.gw.service.configPath = self.gw.path
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def greeting(self):
        def run():
            c = Client(self.gw.port)
            try:
                c.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 4567 25\r\n")
                try:
                    return c.reply()
                except (EOFError, ConnectionError) as e:
                    return repr(e)
            finally:
                c.sock.close()

        return inThread(run)

    @defer.inlineCallbacks
    def test_balancerStillServedAfterReload(self):
        before = yield self.greeting()
        self.assertEqual(before[0], 220)
        with open(self.gw.path, "w") as f:
            f.write(configText(self.gw.directory, listeners=({"relay_networks": ["192.0.2.0/24"],
                                                              "hostname": "new.test",
                                                              "endpoint": "tcp:0:interface=127.0.0.1"},)))
        self.gw.service.reload()
        warnings = [logs.escape(e["log_format"].format(**e)) for e in self.events
                    if e.get("log_namespace") == "relaygw.reload" and e["log_level"].name == "warn"]
        self.assertEqual(warnings, [
            "reload: listener l0: proxy_protocol changes only with a restart",
            "reload: listener l0 keeps its running settings until a restart, as the new ones do not hold with its"
            " running proxy_protocol: proxy_trusted: required with proxy_protocol (expected the balancers' CIDRs)"])
        self.assertEqual((yield self.greeting()), before)


class WorkersReloadTests(unittest.TestCase):
    """SIGHUP to the main process of two workers reaches both."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = freePort()
        self.conf = os.path.join(self.directory, "relaygw.toml")

    def replace(self, text):
        with open(self.conf + ".new", "w") as f:
            f.write(text)
        os.replace(self.conf + ".new", self.conf)  # (as an editor or a deployment tool does)

    def write(self, limit):
        """The config of two workers, with C{max_recipients = limit}."""
        self.replace(configText(self.directory, process={"workers": 2}, listeners=({
            "endpoint": "tcp:%d:interface=127.0.0.1" % self.port, "max_recipients": limit,
            "relay_networks": ["127.0.0.0/8"]},)))

    def reload(self, process, limit):
        """Write the config with C{max_recipients = limit}, SIGHUP the main process, and give it a moment."""
        self.write(limit)
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)

    def secondRecipient(self):
        """The reply to a second RCPT: 452 with C{max_recipients = 1}."""
        c = Client(self.port)
        try:
            return c.transaction(["b@example.net", "c@example.net"])[-1][0]
        finally:
            c.close()

    def bothWorkersUp(self):
        waitForPort(self.port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not os.path.isdir(os.path.join(self.directory, "spool", "w1", "queue")):
            time.sleep(0.1)
        time.sleep(0.5)

    def test_everyWorkerReloads(self):
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                before = [self.secondRecipient() for _ in range(10)]
                self.write(1)
                p.send_signal(signal.SIGHUP)
                # Both workers reload within moments; sessions then spread over both.
                deadline = time.monotonic() + 15
                while True:
                    time.sleep(0.3)
                    after = [self.secondRecipient() for _ in range(10)]
                    if after == [452] * 10 or time.monotonic() > deadline:
                        break
            out = p.output
            self.assertEqual(before, [250] * 10)
            self.assertEqual(after, [452] * 10)
            self.assertEqual(out.count("reload: listener l0: changed max_recipients"), 2, out)

        return inThread(run)

    def test_workersApplyWhatTheMainProcessApplied(self):
        """
        The file replaced by an invalid one after the main process applied
        it but before a worker read it (that worker held up here with
        SIGSTOP; a busy one is slow to get to its SIGHUP): the worker
        applies what the main process applied, rather than refusing the
        file it finds and staying on the old config for good.
        """
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                [worker] = childPids(p.pid)
                os.kill(worker, signal.SIGSTOP)
                try:
                    self.reload(p, 1)
                    self.replace("[[listener]]\nname = 1\n")  # invalid
                finally:
                    os.kill(worker, signal.SIGCONT)
                time.sleep(1.0)
                codes = [self.secondRecipient() for _ in range(20)]
            out = p.output
            self.assertEqual(out.count("reload: applied"), 2, out)
            self.assertNotIn("reload refused", out)
            self.assertEqual(codes, [452] * 20)

        return inThread(run)

    def test_refusedFileReloadsNothingAnywhere(self):
        """
        A refused file after an applied one: the workers apply nothing (the
        text worker 0 last applied is no news), and say nothing.
        """
        def run():
            self.write(100)
            relative = ["--config", os.path.basename(self.conf)]  # (both processes name the file by its full path)
            with twistdRunning(None, self.directory, relative) as p:
                self.bothWorkersUp()
                self.reload(p, 1)
                self.replace("[[listener]]\nname = 1\n")  # invalid
                p.send_signal(signal.SIGHUP)
                time.sleep(1.0)
                codes = [self.secondRecipient() for _ in range(10)]
            self.assertEqual(p.output.count("reload: applied %s\n" % (self.conf,)), 2, p.output)
            self.assertEqual(p.output.count("reload refused"), 2, p.output)  # (a line per error, the main process's)
            self.assertEqual(codes, [452] * 10)

        return inThread(run)

    def test_textThatCannotBeSharedIsRefused(self):
        """
        The main process cannot hand the new text on to the workers (its
        file cannot be written: a full disk, say): the reload is refused in
        the main process too, so that no two processes differ.
        """
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                os.mkdir(os.path.join(self.directory, "spool", "reload.toml.tmp"))  # (it cannot be written)
                [worker] = childPids(p.pid)
                os.kill(worker, signal.SIGSTOP)
                try:
                    self.reload(p, 1)
                    codes = [self.secondRecipient() for _ in range(5)]  # (the main process's)
                finally:
                    os.kill(worker, signal.SIGCONT)
            self.assertEqual(codes, [250] * 5, p.output)
            self.assertIn("reload refused, keeping the running config: it could not be handed on to the other workers",
                          p.output)
            self.assertNotIn("reload: applied", p.output)

        return inThread(run)

    def test_raisedMaxConnectionsTakesTheWaitingClient(self):
        """
        Both workers hold their max_connections (1), so neither accepts and
        a third client waits in the listen queue; a reload raising the limit
        lets them accept again at once (before: not until a session ended,
        up to idle_timeout later, the workers judging it by the old limit).
        """
        def write(limit):
            self.replace(configText(self.directory, process={"workers": 2}, listeners=({
                "endpoint": "tcp:%d:interface=127.0.0.1" % self.port, "max_connections": limit,
                "relay_networks": ["127.0.0.0/8"]},)))

        def run():
            write(1)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                held = []
                try:
                    for _ in range(2):
                        time.sleep(0.5)  # (the worker that took the last one has stopped accepting)
                        held.append(Client(self.port))
                        self.assertEqual(held[-1].reply()[0], 220)
                    time.sleep(0.5)
                    waiting = Client(self.port, timeout=1)
                    held.append(waiting)
                    self.assertRaises(TimeoutError, waiting.reply)  # (both workers full)
                    write(10)
                    p.send_signal(signal.SIGHUP)
                    waiting.sock.settimeout(5)
                    return waiting.reply()[0]
                finally:
                    for c in held:
                        c.close()

        return inThread(run).addCallback(self.assertEqual, 220)

    def restartWorker(self, process, edit=lambda: None):
        """Call C{edit()}, kill worker 1 and wait until the main process has started it again: its pid."""
        [old] = childPids(process.pid)
        edit()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and spoolPids(self.directory).get("w1") in (None, old):
            time.sleep(0.005)
        [new] = childPids(process.pid)
        self.assertEqual(spoolPids(self.directory).get("w1"), new)
        return new

    def workersAnswer(self, process, sessions):
        """
        The replies to a second RCPT (L{secondRecipient}) in C{sessions}
        sessions the other workers alone take (the main process held up with
        SIGSTOP).
        """
        os.kill(process.pid, signal.SIGSTOP)
        try:
            # Stopped for good: one still in epoll_wait would be woken for
            # the next connection in the other's stead, and strand it.
            while processState(process.pid) != "T":
                time.sleep(0.01)
            return [self.secondRecipient() for _ in range(sessions)]
        finally:
            os.kill(process.pid, signal.SIGCONT)

    def restartedWorkerAnswers(self, process, edit):
        """L{workersAnswer} in ten sessions once worker 1 is started again after C{edit()}."""
        self.restartWorker(process, edit)
        return self.workersAnswer(process, 10)

    def test_sighupWhileAWorkerStarts(self):
        """
        SIGHUP (logrotate's postrotate, say) while a worker the main process
        started again is still starting: the worker is not killed by it
        (its default action, until the handler is in place), and catches up
        on a reload it missed.
        """
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                new = self.restartWorker(p)
                # Its config read (the lock is taken after it), its handler
                # most likely not yet in place: hold it there over a reload.
                os.kill(new, signal.SIGSTOP)
                try:
                    self.reload(p, 1)
                finally:
                    os.kill(new, signal.SIGCONT)
                for _ in range(10):
                    p.send_signal(signal.SIGHUP)
                    time.sleep(0.05)
                time.sleep(1.0)
                self.assertEqual(childPids(p.pid), [new])
                codes = self.workersAnswer(p, 5)
            self.assertEqual(p.output.count("exited"), 1, p.output)  # (the kill -9)
            self.assertEqual(codes, [452] * 5, p.output)

        return inThread(run)

    def test_restartedWorkerRunsOnTheMainConfig(self):
        """
        A worker started again after a crash runs on the config the main
        process started on, not on the file as edited since (and not yet
        reloaded), as every other process does.
        """
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                codes = self.restartedWorkerAnswers(p, lambda: self.write(1))
            self.assertEqual(codes, [250] * 10, p.output)

        return inThread(run)

    def test_restartedWorkerKeepsWhatWasReloaded(self):
        """... and with what the main process has applied on SIGHUP since."""
        def run():
            self.write(100)
            with twistdRunning(self.conf, self.directory) as p:
                self.bothWorkersUp()
                self.reload(p, 1)
                codes = self.restartedWorkerAnswers(p, lambda: self.write(100))
            self.assertEqual(p.output.count("reload: applied"), 2, p.output)
            self.assertEqual(codes, [452] * 10, p.output)
            # The texts the workers read are the user's alone (a config may hold a smarthost's password).
            for name in ("started.toml", "reload.toml"):
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.directory, "spool", name)).st_mode), 0o600)

        return inThread(run)


class ClientCertificateTrustReloadTests(unittest.TestCase):
    """
    Trust by client certificate is the pinned bundle's, whole: a session
    open across a reload that names another client CA and other identities
    is judged at its STARTTLS by neither a mix of the two (the new CA with
    the identities its own bundle allows) nor the new settings.
    """

    @defer.inlineCallbacks
    def setUp(self):
        d = os.path.abspath(self.mktemp())
        self.oldCA, _ = makeCA(os.path.join(d, "old"), "Old CA")
        self.newCA, issue = makeCA(os.path.join(d, "new"), "New CA")
        # Allowed by the old identities, issued by the new CA.
        self.mixed = issue("lb1", "lb1.example.net")
        self.allowed = issue("lb2", "lb2.example.net")
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        generateSelfSigned(cert, key, "relay.test")
        self.tls = {"tls_certificate": cert, "tls_key": key, "extensions": ["xclient"], "trusted_peers": []}
        self.gw = Gateway(d, listeners=(dict(self.tls, tls_client_ca=self.oldCA,
                                             tls_client_identities=["dns:lb1.example.net"]),))
        self.gw.service.configPath = self.gw.path
        yield self.gw.start()
        self.addCleanup(self.gw.stop)

    def xclientAfterStartTLS(self, cert, during=lambda: None):
        """The reply to XCLIENT once STARTTLS presented C{cert}, C{during()} called after the first EHLO."""
        c = Client(self.gw.port)
        try:
            c.reply()
            c.cmd("EHLO x")
            during()
            self.assertEqual(c.cmd("STARTTLS")[0], 220)
            c.sock = clientContext(cert).wrap_socket(c.sock, server_hostname="relay.test")
            c.cmd("EHLO x")
            return c.cmd("XCLIENT ADDR=192.0.2.9")[0]
        finally:
            c.close()

    def test_openSessionKeepsItsClientCA(self):
        def reload():
            with open(self.gw.path, "w") as f:
                f.write(configText(self.gw.directory, listeners=(dict(
                    self.tls, tls_client_ca=self.newCA, tls_client_identities=["dns:lb2.example.net"],
                    endpoint="tcp:0:interface=127.0.0.1"),)))
            threads.blockingCallFromThread(reactor, self.gw.service.reload)

        def run():
            # (and a new session is judged by the new settings)
            return self.xclientAfterStartTLS(self.mixed, reload), self.xclientAfterStartTLS(self.allowed)

        return inThread(run).addCallback(self.assertEqual, (550, 220))
