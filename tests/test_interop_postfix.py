"""
A real Postfix (Debian's package, a throwaway instance) as the gateway's
next hop: it gets the mail and the client identity forwarded with XCLIENT.
"""

import os
import shutil
import tempfile

from twisted.internet import defer, reactor

from relaygw.testing import PostfixInstance, ScriptedSMTPFactory, freePort, inThread
from tests.test_relay import RelayTestCase


class PostfixNextHopTests(RelayTestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        if not os.path.exists("/usr/sbin/postfix"):
            raise AssertionError("postfix is not installed (make test installs it)")
        self.sink, sinkPort = self.hop()
        self.postfixPort = freePort()
        # Postfix's queue holds UNIX sockets: keep the path short (108 octets).
        directory = tempfile.mkdtemp(prefix="relaygw-pf-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.postfix = PostfixInstance(directory, self.postfixPort, "[127.0.0.1]:%d" % sinkPort)
        yield inThread(self.postfix.start)
        self.addCleanup(inThread, self.postfix.stop)

    @defer.inlineCallbacks
    def test_postfixGetsMailAndForwardedIdentity(self):
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % self.postfixPort], "tls": "none",
                            "forward_identity": True},
                           listener={"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"]})
        yield self.send(subject="through-postfix",
                        before=["XCLIENT NAME=client.example.net ADDR=192.0.2.7 PORT=4567 HELO=helo.example.net",
                                "EHLO helo.example.net"])
        yield self.until(self.spoolEmpty, timeout=30)
        yield self.until(lambda: self.sink.transactions, timeout=60)
        data = self.sink.transactions[0]["data"].decode()
        # Postfix's own Received header names the client relaygw forwarded.
        first = data.split("Received: ", 2)[1]
        self.assertIn("from helo.example.net (client.example.net [192.0.2.7])", first, data)
        self.assertIn("by postfix.test", first)
        self.assertIn("Subject: through-postfix", data)
        log = self.postfix.log()
        self.assertIn("client.example.net[192.0.2.7]", log)
