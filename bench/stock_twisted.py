"""
Baseline: Twisted's stock ESMTP server that writes each message to its own
file and fsyncs it before the 250 (what the peer baselines call "stock
Twisted with fsync").

    python bench/stock_twisted.py PORT DIRECTORY
"""

import os
import sys

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class FileMessage:
    counter = 0

    def __init__(self, directory):
        FileMessage.counter += 1
        self.path = os.path.join(directory, "m%d" % FileMessage.counter)
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, b"\r\n".join(self.lines) + b"\r\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return defer.succeed(self.path)

    def connectionLost(self):
        self.lines = []


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, directory):
        self.directory = directory

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from stock-twisted"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: FileMessage(self.directory)


class Factory(smtp.SMTPFactory):
    def __init__(self, directory):
        smtp.SMTPFactory.__init__(self)
        self.delivery = Delivery(directory)

    def buildProtocol(self, addr):
        p = smtp.ESMTP()
        p.factory = self
        p.delivery = self.delivery
        return p


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    reactor.listenTCP(port, Factory(directory), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
