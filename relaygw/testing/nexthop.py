"""
A scripted SMTP next hop: a server with exactly the replies a test asks
for (L{ScriptedSMTPFactory}), recording every line and transaction.
"""

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver


class ScriptedSMTPServer(LineReceiver):
    """
    A next hop with exactly the replies a test asks for (see
    L{ScriptedSMTPFactory}); it records every line and transaction.
    """

    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.factory.connections.append(self)
        self.accepted = []
        self.mailfrom = None
        self.inData = False
        self.bodyLines = []
        self.authStep = None
        self.xclientUsed = False
        self.tls = False
        self.completed = 0
        if self.factory.greeting:
            self.sendLine(self.factory.greeting)

    def dataReceived(self, data):
        self.factory.chunks.append(data)
        if self.failHandshake:  # (the client's handshake: cut it off)
            self.transport.abortConnection()
            return
        LineReceiver.dataReceived(self, data)

    failHandshake = False

    delayed = None

    def _replyLate(self, text):
        self.reply(text)
        self.resumeProducing()

    def connectionLost(self, reason):
        if self.delayed is not None and self.delayed.active():
            self.delayed.cancel()

    def reply(self, text):
        if text is None:  # (a scripted silence: the client waits for ever)
            return
        self.transport.write(text.encode("utf-8").replace(b"\n", b"\r\n") + b"\r\n")

    def _rcptReply(self, address):
        rule = self.factory.rcpt.get(address)
        if isinstance(rule, list):
            # A sequence of replies, one per attempt; the last one repeats.
            return rule.pop(0) if len(rule) > 1 else rule[0]
        return rule or "250 2.1.5 Ok"

    dropped = False

    def lineReceived(self, line):
        f = self.factory
        if self.dropped:
            return  # aborted: lines already buffered are not processed
        if self.inData:
            if f.bodyReply is not None:  # (answered before the end of data, and closed)
                self.dropped = True
                self.reply(f.bodyReply)
                self.transport.loseConnection()
                return
            if f.drop == "body" and f.dropsLeft:
                f.dropsLeft -= 1
                self.dropped = True
                self.transport.abortConnection()
                return
            if line == b"." and (f.drop == "end" or f.dropAtEndFor in self.accepted):
                self.dropped = True
                self.transport.loseConnection()  # lost before the end-of-data reply
                return
            if line == b"." and f.silentAtEndFor in self.accepted:
                self.dropped = True  # (never answers again)
                return
            if line == b".":
                self.inData = False
                data = b"".join(l + b"\r\n" for l in self.bodyLines)
                f.messages.append(data)
                f.transactions.append({"mailfrom": self.mailfrom, "rcpts": list(self.accepted), "data": data,
                                       "tls": self.tls})
                self.completed += 1
                self.accepted = []
                if f.endOfData is not None and f.endOfDataDelay:
                    self.pauseProducing()  # (what came behind the end of data waits for its reply)
                    self.delayed = reactor.callLater(f.endOfDataDelay, self._replyLate, f.endOfData)
                elif f.endOfData is not None:  # (None: the whole message, and never a reply)
                    self.reply(f.endOfData)
                if self.completed == f.perConnection:
                    self.dropped = True
                    self.transport.loseConnection()  # (what was sent behind that end of data is not read)
            else:
                self.bodyLines.append(line[1:] if line.startswith(b".") else line)
            return
        text = line.decode("utf-8", "replace")
        f.lines.append(text)
        if self.authStep is not None:
            self.authStep += 1
            self.reply("334 UGFzc3dvcmQ6" if self.authStep == 1 else f.authReply)
            if self.authStep > 1:
                self.authStep = None
            return
        verb = text.split(" ", 1)[0].upper()
        if text in f.replies:
            self.reply(f.replies[text])
        elif verb == "EHLO":
            # Like Postfix, XCLIENT is no longer offered once it was used.
            extensions = [e for e in f.extensions if not (self.xclientUsed and e.startswith("XCLIENT"))]
            if f.tls is not None and not self.tls:
                extensions.append("STARTTLS")
            lines = ["250-scripted.example.test"] + ["250-" + e for e in extensions] + ["250 ENHANCEDSTATUSCODES"]
            self.reply(f.ehloReply or "\n".join(lines))
        elif verb == "HELO":
            self.reply("250 scripted.example.test")
        elif verb == "STARTTLS" and f.failHandshakes:
            f.failHandshakes -= 1
            self.reply("220 2.0.0 Ready to start TLS")
            self.failHandshake = True
        elif verb == "STARTTLS" and f.tls is not None:
            self.reply("220 2.0.0 Ready to start TLS")
            self.transport.startTLS(f.tls)
            self.tls = True
        elif verb == "MAIL" and f.mailLimit is not None and self.completed >= f.mailLimit:
            self.reply("421 4.7.0 too many messages on this connection")
            self.dropped = True
            self.transport.loseConnection()
        elif verb == "MAIL" and f.drop == "reused" and self.completed and f.dropsLeft:
            f.dropsLeft -= 1
            self.dropped = True
            self.transport.loseConnection()  # as if its idle timeout had just struck
        elif verb == "MAIL":
            self.accepted = []
            self.mailfrom = text.split("<", 1)[1].split(">", 1)[0]
            self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            address = text.split("<", 1)[1].split(">", 1)[0]
            reply = self._rcptReply(address)
            if reply.startswith("2"):
                self.accepted.append(address)
            self.reply(reply)
        elif verb == "DATA":
            if not self.accepted:
                self.reply("503 5.5.1 Error: no valid recipients")
            else:
                self.inData = True
                self.bodyLines = []
                self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.accepted = []
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()
        elif verb == "AUTH":
            if text.upper() == "AUTH LOGIN":
                self.authStep = 0
                self.reply("334 VXNlcm5hbWU6")
            else:
                self.reply(f.authReply)
        elif verb == "XCLIENT":
            self.xclientUsed = True
            self.reply("220 scripted.example.test ESMTP")
        elif verb == "XFORWARD":
            self.reply("250 2.0.0 Ok")
        else:
            self.reply("502 5.5.2 Error: command not recognized")


class ScriptedSMTPFactory(protocol.ServerFactory):
    """
    @param extensions: EHLO keywords to offer (STARTTLS is added when C{tls}
        is given a server context factory).
    @param rcpt: recipient -> reply text, or a list of replies used one per
        attempt (the last repeats).
    @param drop: C{"body"} aborts the connection inside DATA (C{drops} times);
        C{"end"} closes it instead of answering the final dot; C{"reused"}
        closes a connection that already carried a message at its next MAIL
        (C{drops} times).
    @param bodyReply: a reply sent at the first line of a message's
        content, before its end, the connection closed right after it.
    @param dropAtEndFor: a recipient whose messages get C{"end"}'s close.
    @param silentAtEndFor: a recipient whose messages' end of data is never
        answered (nor anything after it).
    @param failHandshakes: how many STARTTLS (the first ones) are answered
        220 and then the connection reset when the client's handshake starts.
    @param perConnection: the messages a connection takes; it is closed
        right after the last one's end-of-data reply.
    @param endOfDataDelay: seconds before each end-of-data reply.
    @param mailLimit: the messages a connection takes; the next MAIL gets
        421 and the connection is closed.
    """

    protocol = ScriptedSMTPServer

    def __init__(self, extensions=(), rcpt=None, replies=None, tls=None, drops=1, **kw):
        self.extensions = list(extensions)
        self.rcpt = rcpt or {}
        self.replies = replies or {}
        self.tls = tls
        self.greeting = kw.pop("greeting", b"220 scripted.example.test ESMTP")
        self.ehloReply = kw.pop("ehloReply", None)
        self.endOfData = kw.pop("endOfData", "250 2.0.0 Ok: queued as 4ABC")  # (None: no reply)
        self.authReply = kw.pop("authReply", "235 2.7.0 Authentication successful")
        self.drop = kw.pop("drop", None)
        self.bodyReply = kw.pop("bodyReply", None)
        self.dropAtEndFor = kw.pop("dropAtEndFor", None)
        self.silentAtEndFor = kw.pop("silentAtEndFor", None)
        self.perConnection = kw.pop("perConnection", None)
        self.failHandshakes = kw.pop("failHandshakes", 0)
        self.endOfDataDelay = kw.pop("endOfDataDelay", 0)
        self.mailLimit = kw.pop("mailLimit", None)
        self.dropsLeft = drops
        assert not kw, kw
        self.connections = []
        self.lines = []
        self.chunks = []
        self.messages = []
        self.transactions = []

    def verbs(self):
        return [line.split(" ", 1)[0].upper() for line in self.lines]

    def recipients(self):
        """Every recipient accepted in a completed transaction, in order."""
        return [r for t in self.transactions for r in t["rcpts"]]
