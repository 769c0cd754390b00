"""
The Maildir next hop: one file per accepted message, named by its queue id,
so that a delivery repeated after a crash replaces its own copy.
"""

import os
import shutil
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaygw.relay.maildir import MaildirNextHop
from relaygw.relay.nexthop import WITHDRAWN
from relaygw.durable import Committer
from relaygw.spool import Spool
from relaygw.testing import Gateway, inThread
from tests.messages import sendOne

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
    def test_otherRecipientsAddTheirOwnCopy(self):
        """
        The same message delivered here to some recipients, later to the
        others (deferred at first by another next hop, then routed here):
        two copies, each naming its recipients.  The second replaced the
        first (lost mail: the first recipients' copy, already logged sent).
        """
        message = self.spool.load(self.qid)
        yield self.hop.deliver([message.narrowed(message.recipients[:1])])
        yield self.hop.deliver([message.narrowed(message.recipients[1:])])
        stored = self.stored()
        self.assertEqual(len(stored), 2)
        self.assertEqual(sorted(c.split(b"\r\n")[1] for c in stored.values()),
                         sorted(b"X-Envelope-To: <%s>" % r.encode() for r in message.recipients))

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
    def test_removedMaildirMadeAgain(self):
        """
        A Maildir removed while the gateway runs (or only its C{new/}) is
        made again at the next delivery, which succeeds: not deferred until
        a restart makes it.
        """
        shutil.rmtree(self.maildir)
        [results] = yield self.hop.deliver([self.spool.load(self.qid)])
        self.assertEqual({r.code for r in results.values()}, {250})
        self.assertEqual(len(self.stored()), 1)
        self.assertEqual(sorted(os.listdir(self.maildir)), ["cur", "new", "tmp"])
        shutil.rmtree(os.path.join(self.maildir, "new"))
        [results] = yield self.hop.deliver([self.spool.load(self.qid)])
        self.assertEqual({r.code for r in results.values()}, {250})
        self.assertEqual(len(self.stored()), 1)

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


class MaildirFailureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_failureIsOneLine(self):
        """
        A Maildir that cannot take a message defers it with the error in
        one line, in the log, the queue and the next attempt's reply: not
        the repr of the Deferred list that gathered it, traceback and all.
        """
        gw = Gateway(self.mktemp(), listeners=({"relay_networks": ["127.0.0.0/8"]},))
        yield gw.start()
        self.addCleanup(gw.stop)
        tmp = os.path.join(gw.directory, "outbox", "tmp")
        os.rmdir(tmp)
        with open(tmp, "w"):  # (a file where tmp/ belongs: the write fails)
            pass
        qid = yield inThread(lambda: sendOne(gw.port))
        spool, deadline = gw.service.spool, time.monotonic() + 15
        while not spool.readState(qid).get("attempts") and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        [reply] = [r["result"] for r in spool.readState(qid)["rcpts"].values()]
        self.assertRegex(reply, r"^451 4\.4\.0 next hop failure: \[Errno 20\] Not a directory: "
                                r"'%s/%s\.[^']*'$" % (tmp, qid))
