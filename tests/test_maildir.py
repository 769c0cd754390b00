"""
The Maildir next hop: one file per accepted message, named by its queue id,
so that a delivery repeated after a crash replaces its own copy.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relaygw.relay.maildir import MaildirNextHop
from relaygw.relay.nexthop import WITHDRAWN
from relaygw.durable import Committer
from relaygw.spool import Spool

BODY = b"Subject: once\r\n\r\nbody\r\n"


class MaildirTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.committer = Committer(reactor)
        self.spool = Spool(os.path.join(base, "spool"), self.committer)
        self.spool.open()
        self.maildir = os.path.join(base, "outbox")
        self.hop = MaildirNextHop(self.maildir, self.committer, reactor)
        w = self.spool.newMessage({"mailfrom": "a@example.org", "recipients": ["b@example.net", "c@example.net"],
                                   "arrival": 1.7e9, "context": {"connection": {}}})
        w.write(BODY)
        self.qid = yield w.commit()

    def stored(self):
        new = os.path.join(self.maildir, "new")
        return {name: open(os.path.join(new, name), "rb").read() for name in os.listdir(new)}

    @defer.inlineCallbacks
    def test_deliveredWhole(self):
        [results] = yield self.hop.deliver([self.spool.load(self.qid)])
        self.assertEqual(sorted(results), ["b@example.net", "c@example.net"])
        self.assertEqual({r.code for r in results.values()}, {250})
        [(name, content)] = self.stored().items()
        self.assertTrue(name.startswith(self.qid + "."), name)
        self.assertTrue(content.endswith(BODY), content)
        self.assertIn(b"X-Envelope-To: <b@example.net>, <c@example.net>\r\n", content)
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])

    @defer.inlineCallbacks
    def test_repeatedDeliveryKeepsOneCopy(self):
        """A crash after the rename and before the outcome was recorded repeats the delivery."""
        yield self.hop.deliver([self.spool.load(self.qid)])
        yield self.hop.deliver([self.spool.load(self.qid)])
        self.assertEqual(len(self.stored()), 1)

    @defer.inlineCallbacks
    def test_leftoverTmpFileDoesNotBlock(self):
        """A crash mid-write leaves a file in tmp/; the repeated delivery still succeeds."""
        yield self.hop.deliver([self.spool.load(self.qid)])
        [name] = self.stored()
        with open(os.path.join(self.maildir, "tmp", name), "wb") as f:
            f.write(b"Subject: half")
        [results] = yield self.hop.deliver([self.spool.load(self.qid)])
        self.assertEqual({r.code for r in results.values()}, {250})
        self.assertEqual(list(self.stored()), [name])

    @defer.inlineCallbacks
    def test_heldMessageNotStored(self):
        """A message held after its attempt began is withdrawn: nothing is stored, no batch fails."""
        message = self.spool.load(self.qid)
        self.spool.hold(self.qid)
        [results] = yield self.hop.deliver([message])
        self.assertEqual(set(results.values()), {WITHDRAWN})
        self.assertEqual(self.stored(), {})
        self.spool.release(self.qid)
        [results] = yield self.hop.deliver([message])
        self.assertEqual({r.code for r in results.values()}, {250})
