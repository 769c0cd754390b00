"""
The embedded default next hop: a local Maildir (C{new/}, C{cur/}, C{tmp/}).

Each message is written once, with C{Return-Path} and C{X-Envelope-To}
headers naming the envelope, made durable through the spool's committer
(so fsyncs are grouped with everything else) and renamed into C{new/}.
"""

import os
import socket
import time

from twisted.internet import threads
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

    def _copy(self, message, name):
        tmp = os.path.join(self.directory, "tmp", name)
        head = "Return-Path: <%s>\r\nX-Envelope-To: %s\r\n" % (
            message.mailfrom, ", ".join("<%s>" % r for r in message.recipients))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, head.encode("utf-8", "replace"))
            with open(message.path, "rb") as src:
                src.seek(message.bodyOffset)
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return CommitJob(tmp, os.path.join(self.directory, "new", name), fd)

    def deliver(self, messages):
        """Deliver each message; results are per recipient, all 250 on success."""
        def one(message):
            name = self._uniqueName(message.queueId)
            if message.envelope.get("size", 0) < (1 << 20):
                job = self._copy(message, name)
                d = self.committer.commit(job)
            else:
                d = threads.deferToThread(self._copy, message, name)
                d.addCallback(self.committer.commit)
            d.addCallback(lambda _: {r: Result(250, "2.0.0", "delivered to maildir as " + name)
                                     for r in message.recipients})
            return d

        return gatherResults([one(m) for m in messages], consumeErrors=True)
