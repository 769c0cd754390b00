"""
The embedded default next hop: a local Maildir (C{new/}, C{cur/}, C{tmp/}).

Each message is written once, with C{Return-Path} and C{X-Envelope-To}
headers naming the envelope, made durable through the spool's committer
(so fsyncs are grouped with everything else) and renamed into C{new/}.
"""

import os
import socket
import time

from twisted.internet.defer import gatherResults
from zope.interface import implementer

from relaygw.relay.nexthop import INextHop, Result
from relaygw.spool import CommitJob

_seq = 0


@implementer(INextHop)
class MaildirNextHop:
    def __init__(self, directory, committer, reactor):
        self.directory = directory
        self.committer = committer
        self.reactor = reactor
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    def describe(self):
        return "maildir:%s" % (self.directory,)

    def _uniqueName(self, queueId):
        global _seq
        _seq += 1
        return "%d.%s_%d.%s" % (time.time(), queueId, _seq, socket.gethostname().replace("/", "_"))

    def _content(self, message):
        """Runs in the disk thread: the envelope headers, then the message, streamed."""
        head = "Return-Path: <%s>\r\nX-Envelope-To: %s\r\n" % (
            message.mailfrom, ", ".join("<%s>" % r for r in message.recipients))
        yield head.encode("utf-8", "replace")
        with message.openBody() as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                yield chunk

    def deliver(self, messages):
        """Deliver each message; results are per recipient, all 250 on success."""

        def one(message):
            name = self._uniqueName(message.queueId)
            job = CommitJob(os.path.join(self.directory, "tmp", name), os.path.join(self.directory, "new", name),
                            data=lambda: self._content(message))
            d = self.committer.commit(job)
            d.addCallback(lambda _: {r: Result(250, "2.0.0", "delivered to maildir as " + name)
                                     for r in message.recipients})
            return d

        return gatherResults([one(m) for m in messages], consumeErrors=True)
