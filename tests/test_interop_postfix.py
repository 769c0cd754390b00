"""
A real Postfix (Debian's package, a throwaway instance) as the gateway's
next hop: it gets the mail and the client identity forwarded with XCLIENT,
and, when it does not offer 8BITMIME, 8-bit content converted to 7 bits.
"""

import os
import shutil
import subprocess
import tempfile

from twisted.internet import defer
from twisted.logger import formatEvent

from relaygw.testing import PostfixInstance, freePort, inThread
from tests.recorders import LogCapture
from tests.relaysetup import RelayTestCase


class _PostfixNextHop(RelayTestCase):
    """A Postfix instance (its main.cf with C{settings}) relaying to a scripted sink offering C{sinkExtensions}."""

    timeout = 120
    settings = None
    sinkExtensions = ()

    @defer.inlineCallbacks
    def setUp(self):
        if not os.path.exists("/usr/sbin/postfix"):
            raise AssertionError("postfix is not installed (/usr/sbin/postfix missing; make test installs it)")
        self.sink, sinkPort = self.hop(extensions=list(self.sinkExtensions))
        self.postfixPort = freePort()
        # Postfix's queue holds UNIX sockets: keep the path short (108 octets).
        directory = tempfile.mkdtemp(prefix="relaygw-pf-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.postfix = PostfixInstance(directory, self.postfixPort, "[127.0.0.1]:%d" % sinkPort, self.settings)
        # Registered before starting, so a half-started instance is stopped too.
        self.addCleanup(inThread, self.postfix.stop)
        yield inThread(self._startPostfix)

    def _startPostfix(self):
        try:
            self.postfix.start()
            check = subprocess.run(["/usr/sbin/postfix", "-c", self.postfix.conf, "check"],
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, "postfix check failed: %s" % (check.stdout + check.stderr)
        except subprocess.CalledProcessError as e:
            raise AssertionError("cannot start postfix: %s\n%s%s\nmaillog:\n%s" % (
                e, e.stdout.decode(errors="replace"), e.stderr.decode(errors="replace"), self.postfix.log()))
        except TimeoutError as e:
            raise AssertionError("postfix did not listen on port %d: %s\nmaillog:\n%s" % (
                self.postfixPort, e, self.postfix.log()))


class PostfixNextHopTests(_PostfixNextHop):
    @defer.inlineCallbacks
    def test_postfixGetsMailAndForwardedIdentity(self):
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        yield self.send(subject="through-postfix",
                        before=["XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net",
                                "EHLO helo.example.net"])
        yield self.send(subject="second-client", rcpts=("c@example.net",),
                        before=["XCLIENT NAME=other.example.net ADDR=192.0.2.8 PORT=4568 HELO=helo8.example.net",
                                "EHLO helo8.example.net"])
        yield self.until(self.spoolEmpty, timeout=30)
        yield self.until(lambda: len(self.sink.transactions) == 2, timeout=60)
        bySubject = {}
        for t in self.sink.transactions:
            data = t["data"].decode()
            bySubject[data.split("Subject: ", 1)[1].split("\r\n", 1)[0]] = (t, data)
        t, data = bySubject["through-postfix"]
        self.assertEqual((t["mailfrom"], t["rcpts"]), ("a@example.org", ["b@example.net"]))
        # Postfix's own Received header names the client relaygw forwarded.
        first = data.split("Received: ", 2)[1]
        self.assertIn("from helo.example.net (client.example.net [192.0.2.7])", first, data)
        self.assertIn("by postfix.test", first)
        self.assertTrue(data.endswith("body of through-postfix\r\n"), data)
        # The second message, from another client, under its own identity.
        t, data = bySubject["second-client"]
        self.assertEqual(t["rcpts"], ["c@example.net"])
        first = data.split("Received: ", 2)[1]
        self.assertIn("from helo8.example.net (other.example.net [192.0.2.8])", first, data)
        log = self.postfix.log()
        self.assertIn("client.example.net[192.0.2.7]", log)
        self.assertIn("other.example.net[192.0.2.8]", log)


    @defer.inlineCallbacks
    def test_postfixGetsTheClientsProtocol(self):
        """
        A client that greeted with HELO behind a balancer (nginx replays its
        HELO after XCLIENT) spoke SMTP, and Postfix hears it so: its
        Received header says "with SMTP" as relaygw's does, not "with
        ESMTP" (an EHLO after XCLIENT PROTO=SMTP makes it ESMTP there).  A
        client that greeted with EHLO stays ESMTP.
        """
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        for verb, subject, addr in (("HELO", "plain", "192.0.2.7"), ("EHLO", "extended", "192.0.2.8")):
            yield self.send(subject=subject, before=["XCLIENT NAME=client.example.net ADDR=%s" % (addr,),
                                                     "%s helo.example.net" % (verb,)])
        yield self.until(self.spoolEmpty, timeout=30)
        yield self.until(lambda: len(self.sink.transactions) == 2, timeout=60)
        received = {}
        for t in self.sink.transactions:
            data = t["data"].decode()
            received[data.split("Subject: ", 1)[1].split("\r\n", 1)[0]] = data.split("\r\nSubject: ", 1)[0]
        for subject, proto in (("plain", "SMTP"), ("extended", "ESMTP")):
            postfix, relaygw = received[subject].split("Received: ")[1:3]
            self.assertIn("from helo.example.net (client.example.net", postfix)
            self.assertIn("by postfix.test (Postfix) with %s id" % (proto,), postfix, received[subject])
            self.assertIn("by relay.test (relaygw) with %s id" % (proto,), relaygw, received[subject])


class PostfixWithout8BITMIMETests(_PostfixNextHop):
    """Postfix not offering 8BITMIME (C{smtpd_discard_ehlo_keywords}); its own next hop does, so it converts nothing."""

    settings = {"smtpd_discard_ehlo_keywords": "8bitmime"}
    sinkExtensions = ("8BITMIME",)

    @defer.inlineCallbacks
    def test_eightBitContentConverted(self):
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none"})
        yield self.send(subject="caf\u00e9")
        yield self.until(self.spoolEmpty, timeout=30)
        yield self.until(lambda: len(self.sink.transactions) == 1, timeout=60)
        data = self.sink.transactions[0]["data"]
        self.assertIn(b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n", data)
        self.assertTrue(data.endswith(b"\r\n\r\nbody of caf=E9\r\n"), data)
        self.assertIn(b"by postfix.test", data.split(b"Received: ", 2)[1])


class PostfixRefusingXforwardTests(_PostfixNextHop):
    """
    A Postfix next hop that offers XFORWARD but not XCLIENT, and speaks IPv4
    only: it refuses an IPv6 client address in XFORWARD (501 5.5.4).
    """

    settings = {"smtpd_authorized_xclient_hosts": "", "smtpd_authorized_xforward_hosts": "127.0.0.0/8"}

    @defer.inlineCallbacks
    def test_refusedXforwardDoesNotHoldTheMessage(self):
        """
        XFORWARD is for the next hop's logs: a refusal of it is logged and
        the message goes on (as Postfix's smtp client does), not deferred
        until its lifetime ends.
        """
        logs = LogCapture(self)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["2001:db8::/32"]})
        yield self.send(subject="v6-client",
                        before=["XCLIENT NAME=client.example.net ADDR=IPV6:2001:db8::5 HELO=v6.example.net",
                                "EHLO v6.example.net"])
        yield self.until(lambda: len(self.sink.transactions) == 1, timeout=30)
        yield self.until(self.spoolEmpty, timeout=30)
        data = self.sink.transactions[0]["data"].decode()
        self.assertIn("Subject: v6-client", data)
        # relaygw's own Received header names the client; Postfix's names relaygw.
        self.assertIn("from v6.example.net (client.example.net [IPv6:2001:db8::5])", data)
        self.assertIn("501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::5",
                      " ".join(e.get("log_format", "").format(**e) for e in logs.events
                               if "refused XFORWARD" in e.get("log_format", "")))
        # (Postfix logged the message as the gateway's.)
        self.assertIn(": client=localhost[127.0.0.1]", self.postfix.log())


class PostfixRefusingAHeloTests(_PostfixNextHop):
    """A Postfix next hop whose HELO policy refuses one client's greeting name for now (450)."""

    settings = {"smtpd_delay_reject": "no",
                "smtpd_helo_restrictions": "check_helo_access inline:{ { bad.example = 450 4.7.1 go away } }"}

    @defer.inlineCallbacks
    def test_refusedClientGreetingDefersOnlyThatClient(self):
        """
        The next hop refusing the greeting relaygw replays for a client
        after XCLIENT refuses that client's mail, not the next hop: however
        many of its messages come, other clients' mail goes on at once
        (before, three of them had the next hop suspended for everybody).
        """
        logs = LogCapture(self)
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True, "retry_min": 300, "retry_max": 600},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                                     "relay_networks": ["192.0.2.0/24"]})
        for n in range(4):  # (one batch each: every client its own address)
            yield self.send(subject="bad%d" % n, rcpts=("bad%d@example.net" % n,),
                            before=["XCLIENT ADDR=192.0.2.%d" % (10 + n,), "EHLO bad.example"])
            yield self.until(lambda: len([e for e in logs.events if e.get("status") == "deferred"]) > n,
                             timeout=30)
        yield self.send(subject="good", rcpts=("good@example.net",),
                        before=["XCLIENT ADDR=192.0.2.20", "EHLO good.example"])
        yield self.until(lambda: len(self.sink.transactions) == 1, timeout=30)
        self.assertEqual(self.sink.transactions[0]["rcpts"], ["good@example.net"])
        deferred = [e for e in logs.events if e.get("status") == "deferred"]
        self.assertEqual(len(deferred), 4)
        for e in deferred:
            self.assertIn("450 4.7.1 <bad.example>: Helo command rejected: go away", formatEvent(e))
        self.assertEqual([e for e in logs.events if "suspended" in e.get("log_format", "")], [])
