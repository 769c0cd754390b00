"""
The message sink on the spool (relaygw.sink.SpoolSink): the Received
header first, the size limit on the client's octets only, the envelope as
the spool stores it; and sessions that hand messages to a given sink.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from relaygw import config
from relaygw.context import ValidationContext
from relaygw.sink import IIncomingMessage, IMessageSink, SpoolSink
from relaygw.durable import Committer
from relaygw.spool import Spool
from relaygw.spoolapi import Envelope
from relaygw.testing import MemorySink, SessionHarness, configText


class SpoolSinkTests(unittest.TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(directory, listeners=({"max_message_size": 100},)))
        self.listener = config.load(path).listeners[0]
        self.spool = Spool(os.path.join(directory, "spool"), Committer(reactor))
        self.spool.open()
        self.sink = SpoolSink(self.spool)
        self.context = ValidationContext(remote_ip="192.0.2.1", remote_name="client.example",
                                         ehlo_domain="client.example", protocol="ESMTP")

    def envelope(self):
        return Envelope(mailfrom="a@example.org", recipients=["b@example.net"], arrival=1.0,
                        context=self.context.snapshot())

    @defer.inlineCallbacks
    def test_receivedHeaderSizeAndEnvelope(self):
        self.assertTrue(verifyObject(IMessageSink, self.sink))
        incoming = self.sink.begin(self.envelope(), self.context, self.listener)
        self.assertTrue(verifyObject(IIncomingMessage, incoming))
        incoming.write(b"Subject: x\r\n\r\n" + b"y" * 80 + b"\r\n")
        self.assertFalse(incoming.tooBig)
        qid = yield incoming.commit()
        self.assertEqual(qid, incoming.queueId)
        message = self.spool.load(qid)
        self.assertEqual((message.mailfrom, message.recipients), ("a@example.org", ["b@example.net"]))
        with message.openBody() as body:
            content = body.read()
        self.assertTrue(content.startswith(b"Received: from client.example (client.example [192.0.2.1])\r\n"))
        self.assertIn(b" id %s\r\n" % qid.encode(), content)
        self.assertTrue(content.endswith(b"y" * 80 + b"\r\n"))
        self.assertEqual(message.size, len(content))

    @defer.inlineCallbacks
    def test_contentStartingWithWhitespaceIsNotPartOfReceived(self):
        """
        Content whose first line starts with a space or tab (no header can)
        is not let continue the Received header: as Postfix's cleanup does,
        an empty line ends the header section before it, so that line and
        all that follows reach the next hop unchanged, as the body.
        """
        client = b"\t(authenticated as postmaster)\r\nSubject: x\r\n\r\nbody\r\n"
        incoming = self.sink.begin(self.envelope(), self.context, self.listener)
        received = incoming.size
        incoming.write(client[:1])
        incoming.write(client[1:])
        qid = yield incoming.commit()
        message = self.spool.load(qid)
        with message.openBody() as body:
            content = body.read()
        self.assertEqual(content[received:], b"\r\n" + client)
        self.assertTrue(content[:received].endswith(b" +0000\r\n"))
        self.assertEqual(message.size, len(content))

    def test_emptyLineNotCountedAgainstTheLimit(self):
        """The empty line before content starting with a space counts with the Received header, not the client's."""
        incoming = self.sink.begin(self.envelope(), self.context, self.listener)
        incoming.write(b" " + b"x" * 97 + b"\r\n")
        self.assertFalse(incoming.tooBig)
        incoming.write(b"z")
        self.assertTrue(incoming.tooBig)
        incoming.abort()

    def test_whitespaceAfterTheStartIsContent(self):
        """Only the content's very first octet is looked at: later lines starting with a space are the client's."""
        incoming = self.sink.begin(self.envelope(), self.context, self.listener)
        received = incoming.size
        client = b"Subject: x\r\n folded\r\n\r\n body\r\n"
        incoming.write(client)
        self.assertEqual(incoming.size, received + len(client))
        incoming.abort()

    def test_limitCountsClientOctetsOnly(self):
        incoming = self.sink.begin(self.envelope(), self.context, self.listener)
        incoming.write(b"x" * 98 + b"\r\n")
        self.assertFalse(incoming.tooBig)
        incoming.write(b"z")
        self.assertTrue(incoming.tooBig)
        incoming.abort()
        self.assertEqual(self.spool.queueIds(), [])


class SessionSinkTests(unittest.TestCase):
    def test_messageReachesTheGivenSink(self):
        sink = MemorySink()
        harness = SessionHarness(self.mktemp(), {"relay_networks": ["127.0.0.0/8"]}, sink=sink)
        c = harness.connect()
        self.addCleanup(c.lose)
        c.reply()
        for line in ("EHLO client.example", "MAIL FROM:<a@example.org> BODY=8BITMIME", "RCPT TO:<b@example.net>"):
            self.assertEqual(c.cmd(line)[0], 250)
        self.assertEqual(c.cmd("DATA")[0], 354)
        self.assertEqual(c.cmd("Subject: s\r\n\r\n..dot\r\n."), (250, ["2.0.0 Ok: queued as M00001"]))
        [(envelope, content)] = sink.messages
        self.assertEqual((envelope.mailfrom, envelope.recipients, envelope.mail_params),
                         ("a@example.org", ["b@example.net"], {"BODY": "8BITMIME"}))
        self.assertEqual(envelope.context["connection"]["ehlo_domain"], "client.example")
        self.assertEqual(content, b"Subject: s\r\n\r\n.dot\r\n")
        self.assertEqual(harness.queued, ["M00001"])


class EnvelopeAsDictTests(unittest.TestCase):
    """Envelope.asDict: the same deep copy dataclasses.asdict makes, made without deepcopy per value."""

    def envelope(self):
        class Opaque:
            pass

        context = {"connection": {"remote_ip": "192.0.2.1", "remote_port": 25, "trusted": True, "x": None,
                                  "pair": (1, ["a"]), "opaque": Opaque()},
                   "message": {"recipients": ["b@example.net"], "size": 1.5}}
        return Envelope(mailfrom="a@example.org", recipients=["b@example.net"], mail_params={"SIZE": "10"},
                        arrival=1.0, context=context, queue_id="Q", size=7)

    def test_equalToDataclassesAsdict(self):
        import dataclasses

        e = self.envelope()
        mine, theirs = e.asDict(), dataclasses.asdict(e)
        opaque = (mine["context"]["connection"].pop("opaque"), theirs["context"]["connection"].pop("opaque"))
        self.assertEqual(mine, theirs)
        self.assertEqual(type(opaque[0]), type(opaque[1]))
        self.assertIsNot(opaque[0], e.context["connection"]["opaque"])

    def test_deepCopy(self):
        e = self.envelope()
        d = e.asDict()
        d["recipients"].append("c@example.net")
        d["context"]["connection"]["remote_ip"] = "192.0.2.9"
        d["context"]["connection"]["pair"][1].append("b")
        d["mail_params"]["SIZE"] = "11"
        self.assertEqual(e.recipients, ["b@example.net"])
        self.assertEqual(e.context["connection"]["remote_ip"], "192.0.2.1")
        self.assertEqual(e.context["connection"]["pair"], (1, ["a"]))
        self.assertEqual(e.mail_params, {"SIZE": "10"})
