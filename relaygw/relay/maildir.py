"""
The embedded default next hop: a local Maildir (C{new/}, C{cur/}, C{tmp/}).

Each message is written once, with C{Return-Path} and C{X-Envelope-To}
headers naming the envelope, made durable through the spool's committer
(so fsyncs are grouped with everything else) and renamed into C{new/}.

The file name is the message's queue id (unique per accepted message) and
a digest of the recipients delivered, so a delivery repeated after a
crash, between the rename and the record of the outcome, replaces its own
earlier copy in C{new/} instead of adding a second one, while a delivery
of the same message to other recipients (some deferred at first, then
routed here) adds its own.  The name in C{tmp/} is unique to each attempt,
so a file that a crash left there never blocks the next.
"""

import hashlib
import os
import socket

from twisted.internet.defer import gatherResults, succeed
from zope.interface import implementer

from relaygw.durable import CommitJob
from relaygw.relay.nexthop import WITHDRAWN, INextHop, Result
from relaygw.spoolapi import Withdrawn

_attempts = 0


@implementer(INextHop)
class MaildirNextHop:
    def __init__(self, directory, committer, reactor):
        self.directory = directory
        self.committer = committer
        self.reactor = reactor
        self._makeDirectories()

    def _makeDirectories(self):
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)

    def describe(self):
        return "maildir:%s" % (self.directory,)

    #: Nothing is kept open between deliveries.
    unused = True

    def closeIdle(self):
        return succeed(None)

    def whenRoom(self, message):
        return succeed(None)  # (it never hands a message back)

    def _name(self, message):
        recipients = hashlib.sha256("\n".join(sorted(message.recipients)).encode("utf-8", "replace")).hexdigest()
        return "%s.%s.%s" % (message.queueId, recipients[:12], socket.gethostname().replace("/", "_").replace(":", "_"))

    def _content(self, message, src):
        """Runs in the disk thread: the envelope headers, then the message's content from C{src}, streamed."""
        head = "Return-Path: <%s>\r\nX-Envelope-To: %s\r\n" % (
            message.mailfrom, ", ".join("<%s>" % r for r in message.recipients))
        yield head.encode("utf-8", "replace")
        with src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                yield chunk

    def deliver(self, messages, progress=None):
        """Deliver each message; results are per recipient, all 250 on success."""

        def one(message, again=True):
            global _attempts
            _attempts += 1
            name = self._name(message)
            tmp = "%s.%d_%d" % (name, os.getpid(), _attempts)
            try:
                src = message.openForDelivery()  # (here, not in the disk thread: a withdrawn message fails no batch)
            except Withdrawn:
                return succeed({r: WITHDRAWN for r in message.recipients})
            job = CommitJob(os.path.join(self.directory, "tmp", tmp), os.path.join(self.directory, "new", name),
                            data=lambda: self._content(message, src))
            d = self.committer.commit(job)
            d.addBoth(lambda result: (src.close(), result)[1])
            d.addCallback(lambda _: {r: Result(250, "2.0.0", "delivered to maildir as " + name, action="delivered")
                                     for r in message.recipients})
            if again:
                d.addErrback(missing, message)
            return d

        def missing(failure, message):
            """
            The Maildir, or a part of it, was removed since: made again (as
            Postfix's local delivery makes a missing one) and tried once more.
            """
            failure.trap(FileNotFoundError)
            self._makeDirectories()
            return one(message, again=False)

        return gatherResults([one(m) for m in messages], consumeErrors=True)
