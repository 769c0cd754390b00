"""
Tests for L{relaygw.relay.client}: deliveries to loopback next hops, either
L{twisted.mail.smtp} servers or a scripted server giving exact replies.
"""

import base64
import errno
import os
from ssl import DER_cert_to_PEM_cert

from cryptography import x509
from zope.interface import implementer

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent
from twisted.mail import smtp
from twisted.trial import unittest

from relaygw import tls
from relaygw.relay import body, client, clientwire
from relaygw.relay.client import DeliveryOptions, OutboundMessage, RecipientResult, deliver
from relaygw.relay.nexthop import NOT_SENT, STOPPED
from tests.recorders import LogCapture
from tests.tlsmaterial import altNames, certificate, commonName, newKey, pem, unreadableCertificate

CONTENT = (
    b"From: sender@example.net\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: dots and 8 bits\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"a line . with a dot\r\n"
    b"caf\xc3\xa9 \xff\xfe raw 8-bit\r\n"
    b"\r\n"
    b"last line\r\n"
)

#: L{CONTENT} as it goes to a next hop without 8BITMIME (RFC 6152): quoted-printable, as Postfix converts it.
CONTENT_7BIT = (
    b"From: sender@example.net\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: dots and 8 bits\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b"=2E\r\n"
    b"a line . with a dot\r\n"
    b"caf=C3=A9 =FF=FE raw 8-bit\r\n"
    b"\r\n"
    b"last line\r\n"
)


def _options(caFile=None, **kw):
    if caFile is not None:
        kw["clientTLS"] = tls.ClientTLS(caFile)
    kw.setdefault("heloName", "relay.example.net")
    kw.setdefault("timeout", 5)
    return DeliveryOptions(**kw)


class _FailingFile:
    """A body file whose reads fail after C{goodReads} of them."""

    def __init__(self, f, goodReads):
        self.f, self.left = f, goodReads

    def read(self, size):
        if self.left <= 0:
            raise OSError(5, "Input/output error")
        self.left -= 1
        return self.f.read(size)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class _DeliveryTestCase(unittest.TestCase):
    def body(self, content=CONTENT, prefix=b""):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(prefix + content)
        return path

    def message(self, recipients=("rcpt@example.test",), content=CONTENT, **kw):
        kw.setdefault("mailfrom", "sender@example.net")
        return OutboundMessage(recipients=list(recipients), bodyPath=self.body(content), **kw)

    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def assertTemporary(self, result, *words):
        self.assertIsInstance(result, RecipientResult)
        self.assertTrue(result.temporary, result)
        self.assertFalse(result.ok)
        for word in words:
            self.assertIn(word, result.text)


# A twisted.mail server that keeps what it receives.


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, mailbox, origin, user):
        self.mailbox, self.origin, self.user = mailbox, origin, user
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        content = b"".join(line + b"\r\n" for line in self.lines)
        self.mailbox.messages.append((str(self.origin), str(self.user.dest), content))
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class _Mailbox:
    def __init__(self, replies=None):
        self.messages = []
        self.replies = replies or {}

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        self.origin = origin
        return origin

    def validateTo(self, user):
        reply = self.replies.get(str(user.dest))
        if reply:
            raise smtp.SMTPBadRcpt(user, code=reply[0], resp=reply[1])
        origin = self.origin
        return lambda: _Message(self, origin, user)


class _ESMTPServer(smtp.ESMTP):
    def extensions(self):
        ext = smtp.ESMTP.extensions(self)
        ext[b"8BITMIME"] = None
        ext[b"PIPELINING"] = None
        ext[b"SIZE"] = [b"10240000"]
        return ext


class _ServerFactory(protocol.ServerFactory):
    def __init__(self, mailbox, contextFactory=None):
        self.mailbox = mailbox
        self.contextFactory = contextFactory
        self.connections = []

    def buildProtocol(self, addr):
        p = _ESMTPServer(contextFactory=self.contextFactory)
        p.host = b"mx.example.test"
        p.delivery = self.mailbox
        p.factory = self
        p.noisy = False
        self.connections.append(p)
        return p


# A scripted server for exact control of the replies.


from relaygw.testing import ScriptedSMTPFactory as _ScriptedFactory  # noqa: E402
from relaygw.testing import ScriptedSMTPServer  # noqa: E402


class _OneWriteAfterEndOfData(protocol.Protocol):
    """
    A next hop with PIPELINING that answers the first message's end of data
    and the envelope sent ahead of it in one write: 250, then 250 to MAIL,
    421 to the first RCPT, and (not closing) 250 and 354 to the rest.
    """

    def connectionMade(self):
        self.transport.write(b"220 hop.test ESMTP\r\n")

    def dataReceived(self, data):
        self.factory.received.append(data)
        if data.startswith(b"EHLO"):
            self.transport.write(b"250-hop.test\r\n250 PIPELINING\r\n")
        elif data.startswith(b"MAIL"):
            self.transport.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        elif b"\r\n.\r\nMAIL" in b"".join(self.factory.received) and data.endswith(b"DATA\r\n"):
            self.transport.write(b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n421 4.3.2 shutting down\r\n"
                                 b"250 2.1.5 Ok\r\n354 go ahead\r\n")


class _ResettingServer(ScriptedSMTPServer):
    """At the first line of content: the C{bodyReply} straight to the socket, then a reset."""

    def lineReceived(self, line):
        if self.inData and not self.dropped:
            self.dropped = True
            self.transport.socket.sendall(self.factory.bodyReply.encode() + b"\r\n")
            self.transport.abortConnection()
            return
        ScriptedSMTPServer.lineReceived(self, line)


class _ForgetfulAfterXclient(ScriptedSMTPServer):
    """A next hop whose EHLO after XCLIENT offers nothing but ENHANCEDSTATUSCODES."""

    def lineReceived(self, line):
        if self.xclientUsed and not self.inData and line.upper().startswith(b"EHLO"):
            self.factory.lines.append(line.decode())
            self.reply("250-scripted.example.test\n250 ENHANCEDSTATUSCODES")
            return
        ScriptedSMTPServer.lineReceived(self, line)


class DeliveryTests(_DeliveryTestCase):
    @defer.inlineCallbacks
    def test_byteForByte(self):
        """
        Two messages arrive intact on one connection, dot-stuffing undone by
        the server, 8-bit octets untouched, the body offset honoured.
        """
        mailbox = _Mailbox()
        factory = _ServerFactory(mailbox)
        port = self.listen(factory)
        second = CONTENT.replace(b"last line", b"second message")
        messages = [
            self.message(["a@example.test", "b@example.test"]),
            OutboundMessage(
                "other@example.net",
                ["c@example.test"],
                self.body(second, prefix=b"XXXX\r\n"),
                bodyOffset=6,
            ),
        ]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertEqual(len(results), 2)
        self.assertEqual(set(results[0]), {"a@example.test", "b@example.test"})
        for result in list(results[0].values()) + list(results[1].values()):
            self.assertTrue(result.ok, result)
            self.assertEqual(result.code, 250)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual(
            sorted(mailbox.messages),
            [
                ("other@example.net", "c@example.test", second),
                ("sender@example.net", "a@example.test", CONTENT),
                ("sender@example.net", "b@example.test", CONTENT),
            ],
        )

    @defer.inlineCallbacks
    def test_dotsAcrossChunks(self):
        """
        Dot-stuffing is right wherever line starts fall in the chunks read,
        and content without a final CRLF gets one.
        """
        self.patch(body._BodyProducer, "CHUNK_SIZE", 3)
        factory = _ScriptedFactory()
        port = self.listen(factory)
        content = b"Subject: x\r\n\r\n.a\r\n..\r\nb.\r\n.\r\n.\r\n..c"
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(content=content)], _options())
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.messages, [content + b"\r\n"])
        self.assertIn(b"\r\n..a\r\n...\r\nb.\r\n..\r\n..\r\n...c\r\n.\r\n", b"".join(factory.chunks))

    @defer.inlineCallbacks
    def test_bodyCloseFails(self):
        """
        Closing the message's file once it is sent fails (EIO or EINTR, the
        file only read): nothing of it is lost, so the message stays
        delivered and the next one goes out on the same connection, without
        a critical traceback (the connection was torn down with one).
        """
        for error in (errno.EIO, errno.EINTR):
            class Closing(_FailingFile):
                def close(self):
                    self.f.close()
                    raise OSError(error, os.strerror(error))

                __exit__ = lambda self, *exc: self.close()

            client.open = lambda path, mode, **kw: Closing(open(path, mode, **kw), 1000)
            self.addCleanup(vars(client).pop, "open", None)
            factory = _ScriptedFactory()
            port = self.listen(factory)
            results = yield deliver(reactor, "127.0.0.1", port, [self.message(), self.message(content=b"two\r\n")],
                                    _options())
            self.assertTrue(all(r["rcpt@example.test"].ok for r in results), results)
            self.assertEqual(len(factory.messages), 2)
            self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_unreadableBodyIsNeverTerminated(self):
        """
        A read error in the body (on the first chunk, and on a later one;
        to a next hop with 8BITMIME, and to one without, where the content
        is read to be converted) fails the message temporarily, 4.3.0 with
        the error, and is logged as one line naming it, not as a traceback
        nor as a lost connection; the next hop never gets an end of data
        for it.
        """
        for extensions, chunkSize, goodReads in (
                (["8BITMIME"], 65536, 0), (["8BITMIME"], 3, 2), ([], 65536, 0), ([], 3, 2)):
            self.patch(body._BodyProducer, "CHUNK_SIZE", chunkSize)
            client.open = lambda path, mode, n=goodReads, **kw: _FailingFile(open(path, mode, **kw), n)
            self.addCleanup(vars(client).pop, "open", None)
            logged = LogCapture(self)
            factory = _ScriptedFactory(extensions=extensions)
            port = self.listen(factory)
            results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
            result = results[0]["rcpt@example.test"]
            self.assertTemporary(result)
            self.assertEqual((result.code, result.enhanced, result.text),
                             (451, "4.3.0", "cannot read the message: Input/output error"))
            self.assertEqual(factory.messages, [])
            self.assertIn(b"DATA", b"".join(factory.chunks))  # the body had begun
            self.assertEqual(self.flushLoggedErrors(), [])  # one line, no traceback
            [event] = logged.find("cannot read the message")
            self.assertEqual(formatEvent(event), "127.0.0.1:%d: cannot read the message: [Errno 5] Input/output error"
                             % (port,))

    @defer.inlineCallbacks
    def test_mailParameters(self):
        """
        SIZE and BODY=8BITMIME are sent when advertised, the null sender as
        <>, and the enhanced status code is parsed.
        """
        factory = _ScriptedFactory(extensions=["SIZE 1000000", "8BITMIME"])
        port = self.listen(factory)
        message = self.message(mailfrom="")
        results = yield deliver(reactor, "127.0.0.1", port, [message], _options())
        self.assertEqual(
            factory.lines[1:4],
            ["MAIL FROM:<> SIZE=%d BODY=8BITMIME" % (len(CONTENT),), "RCPT TO:<rcpt@example.test>", "DATA"],
        )
        self.assertEqual(
            results[0]["rcpt@example.test"], RecipientResult(250, "2.0.0", "Ok: queued as 4ABC")
        )

    @defer.inlineCallbacks
    def test_sizeLimit(self):
        """A message larger than the advertised SIZE is refused locally."""
        factory = _ScriptedFactory(extensions=["SIZE 10"])
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        result = results[0]["rcpt@example.test"]
        self.assertEqual((result.code, result.enhanced), (552, "5.3.4"))
        self.assertNotIn("MAIL", factory.verbs())

    @defer.inlineCallbacks
    def test_heloFallback(self):
        """A 5xx to EHLO falls back to HELO, and no ESMTP parameters follow."""
        factory = _ScriptedFactory(ehloReply="500 5.5.1 what?")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.verbs()[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(factory.lines[2], "MAIL FROM:<sender@example.net>")

    @defer.inlineCallbacks
    def test_heloFallbackAfter4xx(self):
        """Any refusal of EHLO but 421 falls back to HELO, as Postfix's client does."""
        factory = _ScriptedFactory(ehloReply="454 4.3.0 no ESMTP now")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.verbs()[:3], ["EHLO", "HELO", "MAIL"])

    @defer.inlineCallbacks
    def test_ehlo421EndsTheSession(self):
        """A 421 to EHLO ends the session: no HELO, every recipient deferred."""
        factory = _ScriptedFactory(ehloReply="421 4.3.2 closing")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        result = results[0]["rcpt@example.test"]
        self.assertTrue(result.temporary)
        self.assertNotIn("HELO", factory.verbs())

    @defer.inlineCallbacks
    def test_perRecipientResults(self):
        """Each recipient gets its RCPT reply when refused, else the end-of-data reply."""
        mailbox = _Mailbox(
            {
                "later@example.test": (451, "4.7.1 greylisted, try later"),
                "nobody@example.test": (550, "5.1.1 no such user"),
                "gone@example.test": (550, "5.1.1 gone"),
            }
        )
        port = self.listen(_ServerFactory(mailbox))
        recipients = ["ok@example.test", "later@example.test", "nobody@example.test", "gone@example.test"]
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(recipients)], _options())
        r = results[0]
        self.assertTrue(r["ok@example.test"].ok)
        self.assertEqual((r["later@example.test"].code, r["later@example.test"].enhanced), (451, "4.7.1"))
        self.assertTrue(r["later@example.test"].temporary)
        self.assertEqual(r["later@example.test"].text, "greylisted, try later")
        for rcpt in ("nobody@example.test", "gone@example.test"):
            self.assertTrue(r[rcpt].permanent)
            self.assertEqual((r[rcpt].code, r[rcpt].enhanced), (550, "5.1.1"))
        self.assertEqual([m[1] for m in mailbox.messages], ["ok@example.test"])

    @defer.inlineCallbacks
    def test_mailRefused(self):
        """A refused MAIL applies to every recipient; the next message still goes."""
        factory = _ScriptedFactory(replies={"MAIL FROM:<spam@example.net>": "554 5.7.1 go away"})
        port = self.listen(factory)
        messages = [
            self.message(["a@example.test", "b@example.test"], mailfrom="spam@example.net"),
            self.message(["c@example.test"]),
        ]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertEqual(set(results[0].values()), {RecipientResult(554, "5.7.1", "go away")})
        self.assertTrue(results[1]["c@example.test"].ok)
        self.assertNotIn("RSET", factory.verbs())

    @defer.inlineCallbacks
    def test_noRecipientAccepted(self):
        """With no recipient accepted, DATA is not sent and RSET precedes the next MAIL."""
        factory = _ScriptedFactory(rcpt={"x@example.test": "550 5.1.1 unknown"})
        port = self.listen(factory)
        messages = [self.message(["x@example.test"]), self.message(["y@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertTrue(results[0]["x@example.test"].permanent)
        self.assertTrue(results[1]["y@example.test"].ok)
        self.assertEqual(factory.verbs(), ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT"])
        self.assertEqual(len(factory.messages), 1)

    @defer.inlineCallbacks
    def test_endOfDataRefused(self):
        """A refusal at end of data applies to every accepted recipient."""
        factory = _ScriptedFactory(endOfData="552 5.3.4 message too big", rcpt={"b@example.test": "450 4.2.0 busy"})
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test", "b@example.test"])], _options())
        self.assertEqual(results[0]["a@example.test"], RecipientResult(552, "5.3.4", "message too big"))
        self.assertEqual(results[0]["b@example.test"], RecipientResult(450, "4.2.0", "busy"))

    @defer.inlineCallbacks
    def test_droppedMidData(self):
        """A connection dropped during DATA leaves its recipients temporary, and the next message not sent."""
        factory = _ScriptedFactory(drop="body")
        port = self.listen(factory)
        content = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        content *= 4000
        messages = [self.message(["a@example.test", "b@example.test"], content=content), self.message(["c@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        for result in results[0].values():
            self.assertTemporary(result, "127.0.0.1:%d" % (port,))
        self.assertIn("lost during message body", results[0]["a@example.test"].text)
        self.assertEqual(results[1]["c@example.test"], NOT_SENT)
        self.assertEqual(factory.messages, [])

    def bigMessages(self):
        """A message larger than the socket buffers can take at once, and a small one behind it."""
        content = (b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n") * 4000
        return [self.message(["a@example.test", "b@example.test"], content=content), self.message(["c@example.test"])]

    @defer.inlineCallbacks
    def test_refusedMidData(self):
        """
        A next hop that refuses the content before its end and closes the
        connection: its reply is the message's outcome (a 5xx bounces, a
        4xx defers, quoting it), not a lost connection; the next message
        was not sent.
        """
        for reply, expected in [("552 5.3.4 message too big", RecipientResult(552, "5.3.4", "message too big")),
                                ("451 4.3.0 try again later", RecipientResult(451, "4.3.0", "try again later"))]:
            factory = _ScriptedFactory(bodyReply=reply)
            port = self.listen(factory)
            results = yield deliver(reactor, "127.0.0.1", port, self.bigMessages(), _options())
            for rcpt in ("a@example.test", "b@example.test"):
                self.assertEqual(results[0][rcpt], expected)
                self.assertTrue(results[0][rcpt].reply)
            self.assertEqual(results[1]["c@example.test"], NOT_SENT)
            self.assertEqual(factory.messages, [])

    @defer.inlineCallbacks
    def test_refusedMidDataThenReset(self):
        """
        A next hop that refuses the content and resets the connection at
        once (its socket closed with our body unread): the refusal is read
        before the reset is acted on, and is the message's outcome.
        """
        for _ in range(3):
            factory = _ScriptedFactory(bodyReply="552 5.3.4 message too big")
            factory.protocol = _ResettingServer
            port = self.listen(factory)
            results = yield deliver(reactor, "127.0.0.1", port, self.bigMessages(), _options())
            self.assertEqual(results[0]["a@example.test"], RecipientResult(552, "5.3.4", "message too big"))
            self.assertEqual(results[1]["c@example.test"], NOT_SENT)

    @defer.inlineCallbacks
    def test_acceptedMidData(self):
        """
        A 250 before the end of data answers nothing sent: a protocol
        error, the message deferred, never taken as delivered.
        """
        factory = _ScriptedFactory(bodyReply="250 2.0.0 Ok: queued as 4ABC")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, self.bigMessages(), _options())
        for rcpt in ("a@example.test", "b@example.test"):
            self.assertTemporary(results[0][rcpt], "protocol error", "not asked for")
        self.assertEqual(results[1]["c@example.test"], NOT_SENT)

    @defer.inlineCallbacks
    def test_droppedAfterData(self):
        """A connection closed instead of the end-of-data reply is temporary too."""
        factory = _ScriptedFactory(drop="end")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "lost during end of data")

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        """An unused loopback port gives a temporary failure for everyone."""
        p = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        port = p.getHost().port
        yield p.stopListening()
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test", "b@example.test"])], _options())
        for result in results[0].values():
            self.assertTemporary(result, "connection to 127.0.0.1:%d failed" % (port,))
            self.assertEqual(result.enhanced, "4.4.1")

    @defer.inlineCallbacks
    def test_timeout(self):
        """A next hop that never replies times out: temporary."""
        factory = _ScriptedFactory(greeting=None)
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options(timeout=0.3))
        self.assertTemporary(results[0]["rcpt@example.test"], "timeout", "greeting")

    @defer.inlineCallbacks
    def test_greetingRefused(self):
        """A 554 greeting defers the mail; the client says QUIT."""
        factory = _ScriptedFactory(greeting=b"554 5.7.1 no service for you")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "no service for you")
        self.assertEqual(factory.verbs(), ["QUIT"])

    @defer.inlineCallbacks
    def test_malformedReply(self):
        """Garbage instead of a reply is a temporary protocol error."""
        factory = _ScriptedFactory(greeting=b"HELLO THERE")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error")

    @defer.inlineCallbacks
    def test_endlessMultilineReply(self):
        """
        A multi-line reply longer than 64 KB in all (each line short) is a
        protocol error as soon as it passes the limit, not a reply kept in
        memory until it ends.
        """
        factory = _ScriptedFactory(greeting=b"220-scripted.example.test\r\n" * 4000 + b"220 at last")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error")
        self.assertEqual(factory.verbs(), [])

    def test_floodOfRepliesNotAskedFor(self):
        """
        Replies nobody asked for yet (answers to pipelined commands arrive
        so, a flood too) are kept up to 1 MB in all; past that the
        connection is cut and what is waiting for a reply hears of it.
        """
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from relaygw.relay.clientwire import _SMTPClientProtocol

        wire = _SMTPClientProtocol(5, Clock(), "hop")
        transport = StringTransport()
        wire.makeConnection(transport)
        wire.send(*["NOOP"] * 1000)
        flood = (b"250 " + b"x" * 996 + b"\r\n") * 40  # 40 replies of 1,000 octets (1,256 counted) a read
        for _ in range(20):  # 1,004,800 counted
            wire.dataReceived(flood)
        self.assertIsNone(wire.violation)
        self.assertEqual(self.successResultOf(wire.replies(3))[2].code, 250)
        wire.dataReceived(flood * 2)
        self.assertEqual(wire.violation, "more than 1048576 octets of replies not asked for")
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(wire.reply())  # what came before the violation answers nothing

    def test_floodOfTinyRepliesCountsWhatTheyCost(self):
        """Bare "250" lines are counted with what each costs to keep: 4,000 of them, not 350,000, fill 1 MB."""
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from relaygw.relay.clientwire import _SMTPClientProtocol

        wire = _SMTPClientProtocol(5, Clock(), "hop")
        wire.makeConnection(StringTransport())
        wire.send(*["NOOP"] * 5000)
        wire.dataReceived(b"250\r\n" * 3800)
        self.assertIsNone(wire.violation)
        wire.dataReceived(b"250\r\n" * 300)
        self.assertEqual(wire.violation, "more than 1048576 octets of replies not asked for")

    @defer.inlineCallbacks
    def test_noReplyBuiltAfterAViolation(self):
        """
        A mixed-code reply to the end of data is a violation, and the lines
        read behind it do not complete a reply: the message is not taken as
        accepted.
        """
        factory = _ScriptedFactory(endOfData="250-first\n451-second\n250 late")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error")

    @defer.inlineCallbacks
    def test_repliesBeforeTheirCommand(self):
        """
        Replies the next hop sends before the command they would answer (a
        second reply to DATA, extra replies behind the greeting) answer no
        command: they are a protocol error, never taken for the reply to a
        later command, so a message is not counted as accepted when the
        next hop never took it, or refused it.
        """
        factory = _ScriptedFactory(replies={"DATA": "354 go ahead\n250 2.0.0 queued early"})
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error")
        self.assertEqual(factory.transactions, [])
        factory = _ScriptedFactory(greeting=b"220 hi\r\n250 one\r\n250 two\r\n250 three\r\n354 four",
                                   endOfData="451 4.3.0 not now")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error")
        self.assertEqual(factory.verbs(), [])

    @defer.inlineCallbacks
    def test_keptConnectionWithAReplyNotAskedFor(self):
        """
        A kept-open connection that reads a reply while nothing is due is
        no longer usable at once, before the cut connection is gone: the
        next batch does not go out on it.
        """
        factory = _ScriptedFactory()
        port = self.listen(factory)
        conn = client.Connection(reactor, "127.0.0.1", port, _options())
        results = yield defer.ensureDeferred(conn.carry([self.message()], keepOpen=True))
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        yield task.deferLater(reactor, 0, lambda: None)  # (out of the read that answered the end of data)
        self.assertTrue(conn.usable)
        conn.proto.dataReceived(b"421 4.4.2 closing\r\n")
        self.assertFalse(conn.usable)
        yield conn.proto.closed

    def test_replyWhileNothingIsDue(self):
        """
        A reply read while no command awaits one (the greeting answered,
        nothing sent since) is a protocol error at once, not a reply kept
        for the next command.
        """
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from relaygw.relay.clientwire import _SMTPClientProtocol

        wire = _SMTPClientProtocol(5, Clock(), "hop")
        transport = StringTransport()
        wire.makeConnection(transport)
        wire.dataReceived(b"220 hello\r\n")
        self.assertEqual(self.successResultOf(wire.reply()).code, 220)
        wire.dataReceived(b"250 2.0.0 stray\r\n")
        self.assertIn("not asked for", wire.violation)
        self.assertTrue(transport.disconnecting)

    def test_emptyList(self):
        """No messages: nothing to do, no connection."""
        d = deliver(reactor, "127.0.0.1", 1, [], _options())
        self.assertEqual(self.successResultOf(d), [])


class OddSizeExtensionTests(_DeliveryTestCase):
    """
    EHLO's SIZE parameter is the next hop's text: whatever it says, the
    message goes (RFC 1870 gives SIZE a decimal number; anything else
    means no usable limit), and nothing raises.
    """

    @defer.inlineCallbacks
    def _deliverWithSize(self, value):
        factory = _ScriptedFactory(extensions=["SIZE " + value])
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options())
        return factory, results[0]["rcpt@example.test"]

    @defer.inlineCallbacks
    def test_hugeSizeAdvertised(self):
        """
        A SIZE of 5,000 digits (a huge limit: far above any message) is no
        reason to refuse delivery.  Python 3.11 refuses int() of a string of
        more than 4,300 digits, and str.isdigit() does not protect that call.
        """
        factory, result = yield self._deliverWithSize("9" * 5000)
        self.assertTrue(result.ok, result)
        self.assertEqual(factory.messages, [CONTENT_7BIT])

    @defer.inlineCallbacks
    def test_nonDecimalDigitSizeAdvertised(self):
        """
        A SIZE of "\u00b2" (SUPERSCRIPT TWO: str.isdigit() says yes, int()
        raises ValueError) is garbage, not a reason never to deliver.
        """
        factory, result = yield self._deliverWithSize("\u00b2")
        self.assertTrue(result.ok, result)
        self.assertEqual(factory.messages, [CONTENT_7BIT])


class PipeliningTests(_DeliveryTestCase):
    def transactionChunk(self, factory):
        return [chunk for chunk in factory.chunks if chunk.startswith(b"MAIL ")]

    @defer.inlineCallbacks
    def test_rcptRefusalStandsWhenTheSessionBreaksDown(self):
        """
        A recipient refused at RCPT keeps that refusal as its outcome when
        the session then breaks down (DATA never answered, or a 421 to a
        later RCPT), pipelined or not, as Postfix's: b@ bounces with the
        next hop's 550 rather than being deferred with the breakdown.
        """
        refused = RecipientResult(550, "5.1.1", "no such user")
        for extensions, rcpt, replies in [
                (["PIPELINING"], {"b@example.test": "550 5.1.1 no such user"}, {"DATA": None}),
                ([], {"b@example.test": "550 5.1.1 no such user"}, {"DATA": None}),
                (["PIPELINING"], {"b@example.test": "550 5.1.1 no such user",
                                  "c@example.test": "421 4.4.2 closing"}, {}),
        ]:
            factory = _ScriptedFactory(extensions=extensions, rcpt=rcpt, replies=replies)
            port = self.listen(factory)
            results = yield deliver(reactor, "127.0.0.1", port,
                                    [self.message(["a@example.test", "b@example.test", "c@example.test"])],
                                    _options(timeout=0.5))
            self.assertEqual(results[0]["b@example.test"], refused, extensions)
            self.assertTrue(results[0]["b@example.test"].reply)
            self.assertTrue(results[0]["a@example.test"].temporary, results[0]["a@example.test"])
            self.assertTrue(results[0]["c@example.test"].temporary, results[0]["c@example.test"])
            if not rcpt.get("c@example.test"):  # (the breakdown names the command never answered)
                self.assertIn("timeout waiting for DATA", results[0]["a@example.test"].text)

    @defer.inlineCallbacks
    def test_pipelined(self):
        """With PIPELINING, MAIL, every RCPT and DATA go in one write."""
        factory = _ScriptedFactory(extensions=["PIPELINING"], rcpt={"b@example.test": "550 5.1.1 no"})
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test", "b@example.test"])], _options())
        self.assertEqual(
            self.transactionChunk(factory),
            [b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"],
        )
        self.assertTrue(results[0]["a@example.test"].ok)
        self.assertTrue(results[0]["b@example.test"].permanent)
        self.assertEqual(factory.messages, [CONTENT_7BIT])

    @defer.inlineCallbacks
    def test_notPipelined(self):
        """Without PIPELINING, each command waits for the previous reply."""
        factory = _ScriptedFactory()
        port = self.listen(factory)
        yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test", "b@example.test"])], _options())
        self.assertEqual(self.transactionChunk(factory), [b"MAIL FROM:<sender@example.net>\r\n"])
        self.assertIn(b"RCPT TO:<b@example.test>\r\n", factory.chunks)

    @defer.inlineCallbacks
    def test_pipelinedNoRecipient(self):
        """
        Pipelined DATA with every recipient refused: the 503 is taken as the
        DATA reply, no body is sent, and RSET precedes the next message.
        """
        factory = _ScriptedFactory(extensions=["PIPELINING"], rcpt={"x@example.test": "450 4.2.1 slow down"})
        port = self.listen(factory)
        messages = [self.message(["x@example.test"]), self.message(["y@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertEqual(results[0]["x@example.test"], RecipientResult(450, "4.2.1", "slow down"))
        self.assertTrue(results[1]["y@example.test"].ok)
        self.assertEqual(
            factory.verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
        )
        self.assertEqual(factory.messages, [CONTENT_7BIT])


    def aheadOfReply(self, factory):
        """Whether a MAIL went out in the same write as an end of data."""
        return any(b".\r\nMAIL FROM:" in chunk for chunk in factory.chunks)

    @defer.inlineCallbacks
    def test_envelopeBehindEndOfData(self):
        """
        The next message's MAIL, RCPT and DATA follow the previous end of
        data in one write (RFC 2920), and each message still gets its own
        end-of-data reply, including a refused one.
        """
        factory = _ScriptedFactory(extensions=["PIPELINING"], endOfData="554 5.7.1 refused")
        port = self.listen(factory)
        messages = [self.message(["a@example.test"]), self.message(["b@example.test"], mailfrom="second@example.net"),
                    self.message(["c@example.test"], content=CONTENT.replace(b"last", b"third"))]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertTrue(self.aheadOfReply(factory))
        self.assertEqual(factory.verbs(), ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"])
        for result, rcpt in zip(results, ["a@example.test", "b@example.test", "c@example.test"]):
            self.assertEqual(result[rcpt], RecipientResult(554, "5.7.1", "refused"))
        self.assertEqual(factory.messages, [CONTENT_7BIT, CONTENT_7BIT, CONTENT_7BIT.replace(b"last", b"third")])

    @defer.inlineCallbacks
    def test_unreadableMessageNotAhead(self):
        """
        A next message that cannot be read is not announced ahead of the
        reply: it fails on its own, and the others go through.
        """
        factory = _ScriptedFactory(extensions=["PIPELINING"])
        port = self.listen(factory)
        missing = OutboundMessage("sender@example.net", ["b@example.test"], self.mktemp())
        messages = [self.message(["a@example.test"]), missing, self.message(["c@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertTrue(results[0]["a@example.test"].ok)
        self.assertTemporary(results[1]["b@example.test"], "cannot read the message")
        self.assertTrue(results[2]["c@example.test"].ok)
        self.assertEqual(factory.recipients(), ["a@example.test", "c@example.test"])
        self.assertFalse(self.aheadOfReply(factory))

    @defer.inlineCallbacks
    def test_lostWithEnvelopeAhead(self):
        """
        The connection going away after an end of data, with the next
        envelope already sent, defers that message; the messages behind it
        were not sent (no attempt: L{NOT_SENT}), whether their envelope had
        gone out ahead or not.
        """
        for extensions in (["PIPELINING"], []):
            factory = _ScriptedFactory(extensions=extensions, drop="end")
            port = self.listen(factory)
            messages = [self.message(["a@example.test"]), self.message(["b@example.test"]),
                        self.message(["c@example.test"])]
            results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
            self.assertTemporary(results[0]["a@example.test"], "end of data")
            self.assertFalse(results[0]["a@example.test"].untried)
            self.assertEqual([results[1]["b@example.test"], results[2]["c@example.test"]], [NOT_SENT] * 2)
            self.assertTrue(NOT_SENT.untried)

    @defer.inlineCallbacks
    def test_closedAfterAnEndOfDataReply(self):
        """
        A next hop that closes right after its reply to an end of data
        (one message per connection): the next message, its envelope sent
        ahead but never answered, was not sent (it was "lost during MAIL",
        an attempt).
        """
        factory = _ScriptedFactory(extensions=["PIPELINING"], perConnection=1)
        port = self.listen(factory)
        messages = [self.message(["a@example.test"]), self.message(["b@example.test"]),
                    self.message(["c@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertTrue(results[0]["a@example.test"].ok)
        self.assertEqual([results[1]["b@example.test"], results[2]["c@example.test"]], [NOT_SENT] * 2)

    @defer.inlineCallbacks
    def test_wrappedUp(self):
        """
        A connection wrapped up (the gateway stopping) finishes the
        transaction under way, begins no other (L{STOPPED}), and is closed
        rather than kept, even when that transaction was its batch's last.
        """
        for count in (1, 2):
            factory = _ScriptedFactory(extensions=["PIPELINING"], endOfDataDelay=0.3)
            port = self.listen(factory)
            conn = client.Connection(reactor, "127.0.0.1", port, _options())
            messages = [self.message(["m%d@example.test" % n]) for n in range(count)]
            carried = defer.ensureDeferred(conn.carry(messages, keepOpen=True))
            while "DATA" not in factory.verbs():
                yield task.deferLater(reactor, 0.01, lambda: None)
            conn.wrapUp()
            results = yield carried
            self.assertTrue(results[0]["m0@example.test"].ok)
            self.assertEqual([r["m%d@example.test" % n] for n, r in enumerate(results)][1:], [STOPPED] * (count - 1))
            self.assertFalse(conn.usable)
            yield conn.proto.closed
            self.assertEqual(len(factory.transactions), 1)

    @defer.inlineCallbacks
    def test_421AtMailOnAUsedConnection(self):
        """
        A 421 to MAIL on a connection that has carried a message (the next
        hop's limit per connection) is not the message's doing: it and
        those behind it were not sent.  On a fresh connection, a 421 to
        the first MAIL is an attempt.
        """
        for extensions in (["PIPELINING"], []):
            factory = _ScriptedFactory(extensions=extensions, mailLimit=1)
            port = self.listen(factory)
            messages = [self.message(["m%d@example.test" % n]) for n in range(3)]
            results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
            self.assertTrue(results[0]["m0@example.test"].ok)
            self.assertEqual([results[1]["m1@example.test"], results[2]["m2@example.test"]], [NOT_SENT] * 2)
        factory = _ScriptedFactory(mailLimit=0)
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test"])], _options())
        self.assertEqual(results[0]["a@example.test"].code, 421)

    @defer.inlineCallbacks
    def test_421EndsTheConnection(self):
        """
        A 421 to the MAIL, a RCPT, the DATA or the end of data of a fresh
        connection's first message says the next hop is closing the
        connection (RFC 5321 3.8), even one that has not closed it yet:
        that message is deferred with the reply, nothing more goes out on
        the connection (no QUIT either), and the messages behind it were
        not sent.
        """
        closing = "421 4.3.2 shutting down"
        scripts = [{"replies": {"MAIL FROM:<first@example.net>": closing}}, {"rcpt": {"b@example.test": closing}},
                   {"replies": {"DATA": closing}}, {"endOfData": closing}, {"mailLimit": 0}]
        for extensions in (["PIPELINING"], []):
            for script in scripts:
                factory = _ScriptedFactory(extensions=extensions, **script)
                port = self.listen(factory)
                messages = [self.message(["a@example.test", "b@example.test"], mailfrom="first@example.net"),
                            self.message(["c@example.test"]), self.message(["d@example.test"])]
                results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
                for rcpt in ("a@example.test", "b@example.test"):
                    self.assertEqual(results[0][rcpt], RecipientResult(421, "4.3.2", "shutting down") if
                                     "mailLimit" not in script else
                                     RecipientResult(421, "4.7.0", "too many messages on this connection"),
                                     (extensions, script))
                    self.assertTrue(results[0][rcpt].reply)
                self.assertEqual([results[1]["c@example.test"], results[2]["d@example.test"]], [NOT_SENT] * 2)
                ahead = extensions and "endOfData" in script  # (the next envelope went out before the reply)
                self.assertEqual(factory.verbs().count("MAIL"), 2 if ahead else 1, (extensions, script))
                self.assertNotIn("QUIT", factory.verbs())
                self.assertEqual(len(factory.transactions), 1 if "endOfData" in script else 0)

    @defer.inlineCallbacks
    def test_pipelined421WithoutTheRest(self):
        """
        A next hop that answers a pipelined MAIL with 421 and then neither
        closes nor answers the RCPT and DATA behind it: the message is
        deferred with the 421 at once, not after the command timeout.
        """
        from twisted.protocols.basic import LineReceiver

        class Closing(LineReceiver):
            def connectionMade(self):
                self.sendLine(b"220 closing.example.test ESMTP")

            def lineReceived(self, line):
                if line.startswith(b"EHLO"):
                    self.sendLine(b"250-closing.example.test\r\n250 PIPELINING")
                elif line.startswith(b"MAIL"):
                    self.sendLine(b"421 4.3.2 shutting down")

        port = self.listen(protocol.Factory.forProtocol(Closing))
        started = reactor.seconds()
        messages = [self.message(["a@example.test"]), self.message(["b@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options(timeout=3))
        self.assertLess(reactor.seconds() - started, 2)
        self.assertEqual(results[0]["a@example.test"], RecipientResult(421, "4.3.2", "shutting down"))
        self.assertEqual(results[1]["b@example.test"], NOT_SENT)

    @defer.inlineCallbacks
    def test_421BeforeTheTransaction(self):
        """
        A 421 to STARTTLS (with C{tls = "may"}, which goes on in plaintext
        after another refusal) or to XFORWARD ends the connection too: the
        message is deferred with the reply (after STARTTLS, every message),
        nothing is sent in plaintext or for the next message, and no QUIT.
        """
        closing = "421 4.3.2 shutting down"
        xforward = ("XFORWARD HELO=helo?with?space+2Beq+3D? PROTO=ESMTPSA PORT=54321"
                    " NAME=client.example.net ADDR=IPV6:2001:db8::5")
        for extensions, line, options in ((["STARTTLS"], "STARTTLS", _options(tls="may")),
                                          (["XFORWARD NAME ADDR PORT PROTO HELO"], xforward,
                                           _options(forwardIdentity=True))):
            factory = _ScriptedFactory(extensions=extensions, replies={line: closing})
            port = self.listen(factory)
            messages = [self.message(context=AuthAndForwardingTests.CONTEXT), self.message(["c@example.test"])]
            results = yield deliver(reactor, "127.0.0.1", port, messages, options)
            self.assertEqual(results[0]["rcpt@example.test"], RecipientResult(421, "4.3.2", "shutting down"))
            # (before any message, as a refused greeting: each is told the reply)
            self.assertEqual(results[1]["c@example.test"], NOT_SENT if line == xforward else
                             RecipientResult(421, "4.3.2", "shutting down"))
            self.assertEqual(factory.verbs(), ["EHLO", line.split()[0]])

    @defer.inlineCallbacks
    def test_421EndsAKeptConnection(self):
        """
        A 421 to a RCPT on a kept-open connection: that message is deferred
        with the reply, the one behind it was not sent, and the connection
        is not kept.
        """
        factory = _ScriptedFactory(extensions=["PIPELINING"], rcpt={"b@example.test": "421 4.3.2 shutting down"})
        port = self.listen(factory)
        conn = client.Connection(reactor, "127.0.0.1", port, _options())
        results = yield defer.ensureDeferred(conn.carry([self.message(["a@example.test"])], keepOpen=True))
        self.assertTrue(results[0]["a@example.test"].ok)
        self.assertTrue(conn.usable)
        results = yield defer.ensureDeferred(conn.carry([self.message(["b@example.test"]),
                                                         self.message(["c@example.test"])], keepOpen=True))
        self.assertEqual(results[0]["b@example.test"], RecipientResult(421, "4.3.2", "shutting down"))
        self.assertEqual(results[1]["c@example.test"], NOT_SENT)
        self.assertFalse(conn.usable)
        self.assertEqual(factory.verbs().count("MAIL"), 2)
        yield conn.proto.closed

    @defer.inlineCallbacks
    def test_421AmongRepliesAlreadyRead(self):
        """
        A 421 among replies read before they were asked for (the next
        hop's answer to an end of data and to the envelope sent ahead of
        it, in one write), with the next hop answering the commands behind
        it (250, 354) instead of closing: the message is deferred with the
        421, none of its recipients taken by a reply after it; no content
        and no QUIT go out.  (The messages are large enough for their
        check for 8-bit octets to be made in a thread, while the replies
        are read.)
        """
        factory = protocol.ServerFactory.forProtocol(_OneWriteAfterEndOfData)
        factory.received = []
        port = self.listen(factory)
        large = b"Subject: large\r\n\r\n" + (b"y" * 998 + b"\r\n") * 70
        messages = [self.message(["a@example.test"], content=large),
                    self.message(["b@example.test", "c@example.test"], content=large),
                    self.message(["d@example.test"], content=large)]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options())
        self.assertTrue(results[0]["a@example.test"].ok)
        for rcpt in ("b@example.test", "c@example.test"):
            self.assertEqual(results[1][rcpt], RecipientResult(421, "4.3.2", "shutting down"))
        self.assertEqual(results[2]["d@example.test"], NOT_SENT)
        received = b"".join(factory.received)
        self.assertTrue(received.endswith(b".\r\nMAIL FROM:<sender@example.net>\r\nRCPT TO:<b@example.test>\r\n"
                                          b"RCPT TO:<c@example.test>\r\nDATA\r\n"), received[-200:])

    @defer.inlineCallbacks
    def test_silentAfterEndOfData(self):
        """A next hop that never answers an end of data: that message times out, the next one is not sent."""
        factory = _ScriptedFactory(endOfData=None)
        port = self.listen(factory)
        messages = [self.message(["a@example.test"]), self.message(["b@example.test"])]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options(timeout=0.3))
        self.assertTemporary(results[0]["a@example.test"], "timeout waiting for end of data")
        self.assertEqual(results[1]["b@example.test"], NOT_SENT)

    @defer.inlineCallbacks
    def test_endOfDataReplyWaitedForLonger(self):
        """
        The reply to an end of data is waited for twice the command timeout
        (RFC 5321 4.5.3.2.6: 10 minutes there, 5 for a command): a next hop
        still busy with the message when a command would have timed out has
        it accepted, not sent again (silence beyond that times out:
        L{test_silentAfterEndOfData}).
        """
        factory = _ScriptedFactory(endOfDataDelay=0.6)
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options(timeout=0.4))
        self.assertTrue(results[0]["rcpt@example.test"].ok, results)
        self.assertEqual(len(factory.transactions), 1)

    @defer.inlineCallbacks
    def test_failedSessionFailsEveryMessage(self):
        """A session that fails before any message (its greeting refused) is an attempt for each message."""
        factory = _ScriptedFactory(greeting=b"421 4.3.2 busy")
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(["a@example.test"]),
                                                             self.message(["b@example.test"])], _options())
        for result, rcpt in zip(results, ["a@example.test", "b@example.test"]):
            self.assertTemporary(result[rcpt], "busy")
            self.assertFalse(result[rcpt].untried)


class AuthAndForwardingTests(_DeliveryTestCase):
    @defer.inlineCallbacks
    def test_authPlain(self):
        """AUTH PLAIN carries the credentials as the initial response."""
        factory = _ScriptedFactory(extensions=["AUTH LOGIN PLAIN"])
        port = self.listen(factory)
        options = _options(auth=("relay", "s3cret"), tls="none")  # (this next hop offers no STARTTLS)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], options)
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.lines[1], "AUTH PLAIN " + base64.b64encode(b"\0relay\0s3cret").decode())
        self.assertEqual(factory.verbs()[2], "MAIL")

    @defer.inlineCallbacks
    def test_authLogin(self):
        """AUTH LOGIN is used when PLAIN is not offered."""
        factory = _ScriptedFactory(extensions=["AUTH LOGIN"])
        port = self.listen(factory)
        options = _options(auth=("relay", "s3cret"), tls="none")  # (this next hop offers no STARTTLS)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], options)
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.lines[1:4], ["AUTH LOGIN", "cmVsYXk=", "czNjcmV0"])

    @defer.inlineCallbacks
    def test_authRefused(self):
        """A refused AUTH defers the mail instead of sending it unauthenticated."""
        factory = _ScriptedFactory(extensions=["AUTH PLAIN"], authReply="535 5.7.8 bad credentials")
        port = self.listen(factory)
        options = _options(auth=("relay", "wrong"), tls="none")  # (this next hop offers no STARTTLS)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], options)
        result = results[0]["rcpt@example.test"]
        self.assertTemporary(result, "bad credentials")
        self.assertEqual(result.enhanced, "4.7.8")
        self.assertNotIn("MAIL", factory.verbs())

    CONTEXT = {
        "remote_ip": "2001:db8::5",
        "remote_port": 54321,
        "remote_name": "client.example.net",
        "ehlo_domain": "helo with space+eq=\x7f",
        "protocol": "ESMTPSA",
        "auth_user": "jo@example.net",
    }

    @defer.inlineCallbacks
    def test_xclient(self):
        """
        XCLIENT passes the identity on, xtext-encoded, IPv6 as IPV6:, NAME
        and ADDR last; a greeting name no command line can carry is not
        replayed (nor the gateway's own sent in its place), and nothing the
        first EHLO offered is used any more (no PIPELINING).
        """
        factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR PORT HELO PROTO LOGIN", "PIPELINING"])
        port = self.listen(factory)
        messages = [self.message(context=self.CONTEXT), self.message(context=dict(self.CONTEXT))]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options(forwardIdentity=True))
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertTrue(results[1]["rcpt@example.test"].ok)
        self.assertEqual(
            factory.lines[1],
            "XCLIENT HELO=helo+20with+20space+2Beq+3D+7F PROTO=ESMTP LOGIN=jo@example.net"
            " PORT=54321 NAME=client.example.net ADDR=IPV6:2001:db8::5",
        )
        self.assertEqual(factory.verbs(), ["EHLO", "XCLIENT"] + ["MAIL", "RCPT", "DATA"] * 2 + ["QUIT"])
        self.assertEqual(factory.lines[2], "MAIL FROM:<sender@example.net>")

    @defer.inlineCallbacks
    def test_xclientReplaysTheClientsGreeting(self):
        """
        After XCLIENT the next hop is greeted as the client greeted; a client
        that gave no greeting is given none (it was greeted in the
        gateway's name, which the next hop then took for the client's HELO).
        """
        for helo, after in (("helo.example", ["EHLO"]), (None, [])):
            factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR HELO"])
            port = self.listen(factory)
            context = {"remote_ip": "192.0.2.9", "remote_port": 1, "ehlo_domain": helo}
            results = yield deliver(reactor, "127.0.0.1", port, [self.message(context=context)],
                                    _options(forwardIdentity=True))
            self.assertTrue(results[0]["rcpt@example.test"].ok)
            self.assertEqual(factory.verbs(), ["EHLO", "XCLIENT"] + after + ["MAIL", "RCPT", "DATA", "QUIT"])
            self.assertEqual(factory.lines[1], "XCLIENT HELO=%s NAME=[UNAVAILABLE] ADDR=192.0.2.9"
                             % (helo or "[UNAVAILABLE]"))
            if helo:
                self.assertEqual(factory.lines[2], "EHLO helo.example")

    @defer.inlineCallbacks
    def test_xclientReplaysAPlainSMTPGreetingWithHELO(self):
        """
        A client that spoke plain SMTP (PROTO=SMTP: it sent HELO) is replayed
        with HELO, not EHLO (which would make it ESMTP at the next hop); the
        session then has no extensions, so nothing offered before is used.
        """
        factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR PROTO HELO", "8BITMIME", "PIPELINING"])
        port = self.listen(factory)
        context = {"remote_ip": "192.0.2.9", "ehlo_domain": "helo.example", "protocol": "SMTP"}
        results = yield deliver(reactor, "127.0.0.1", port, [self.message(context=context)],
                                _options(forwardIdentity=True))
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertEqual(factory.verbs(), ["EHLO", "XCLIENT", "HELO", "MAIL", "RCPT", "DATA", "QUIT"])
        self.assertEqual(factory.lines[1], "XCLIENT HELO=helo.example PROTO=SMTP NAME=[UNAVAILABLE] ADDR=192.0.2.9")
        self.assertEqual(factory.lines[2:4], ["HELO helo.example", "MAIL FROM:<sender@example.net>"])

    @defer.inlineCallbacks
    def test_xclientOtherIdentity(self):
        """
        A message from another client, once the next hop no longer offers
        XCLIENT, is deferred rather than sent under the wrong identity.
        """
        factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR"])
        port = self.listen(factory)
        other = dict(self.CONTEXT, remote_ip="192.0.2.7")
        messages = [self.message(context=self.CONTEXT), self.message(["x@example.test"], context=other)]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options(forwardIdentity=True))
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        result = results[1]["x@example.test"]
        self.assertTemporary(result, "identity")
        self.assertEqual(result.enhanced, "4.4.3")
        self.assertEqual(factory.verbs(), ["EHLO", "XCLIENT", "MAIL", "RCPT", "DATA", "QUIT"])

    @defer.inlineCallbacks
    def test_xclientThenExtensionsOfTheNewGreeting(self):
        """
        The EHLO after XCLIENT says what the session offers from then on:
        a DSN offered before it and not after is not used (no NOTIFY,
        ORCPT, RET, ENVID), nor a SIZE limit offered only before it.
        """
        factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR", "DSN", "SIZE 10"])
        factory.protocol = _ForgetfulAfterXclient
        port = self.listen(factory)
        message = self.message(context=dict(self.CONTEXT, ehlo_domain="helo.example"),
                               rcptParams={"rcpt@example.test": {"NOTIFY": "SUCCESS"}}, mailParams={"RET": "HDRS"})
        results = yield deliver(reactor, "127.0.0.1", port, [message], _options(forwardIdentity=True))
        self.assertTrue(results[0]["rcpt@example.test"].ok, results[0])
        self.assertEqual(factory.verbs(), ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"])
        self.assertIn("MAIL FROM:<sender@example.net>", factory.lines)
        self.assertIn("RCPT TO:<rcpt@example.test>", factory.lines)

    @defer.inlineCallbacks
    def test_xforwardNameTemporarilyUnknown(self):
        """A name not looked up for now is XCLIENT's [TEMPUNAVAIL], XFORWARD's [UNAVAILABLE] (it has no other)."""
        context = {"remote_ip": "192.0.2.9", "remote_port": 1, "remote_name_status": "temporary"}
        for extension, line in (("XCLIENT NAME ADDR", "XCLIENT NAME=[TEMPUNAVAIL] ADDR=192.0.2.9"),
                                ("XFORWARD NAME ADDR", "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.9")):
            factory = _ScriptedFactory(extensions=[extension])
            port = self.listen(factory)
            yield deliver(reactor, "127.0.0.1", port, [self.message(context=context)], _options(forwardIdentity=True))
            self.assertEqual(factory.lines[1], line)

    @defer.inlineCallbacks
    def test_xclientAdvertisedOnly(self):
        """Only the advertised attributes are sent; missing values are [UNAVAILABLE]."""
        factory = _ScriptedFactory(extensions=["XCLIENT ADDR NAME"])
        port = self.listen(factory)
        context = {"remote_ip": "192.0.2.9", "remote_port": 1}
        yield deliver(reactor, "127.0.0.1", port, [self.message(context=context)], _options(forwardIdentity=True))
        self.assertEqual(factory.lines[1], "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.9")

    @defer.inlineCallbacks
    def test_noForwardingUnlessAsked(self):
        """Without forwardIdentity no XCLIENT is sent."""
        factory = _ScriptedFactory(extensions=["XCLIENT NAME ADDR"])
        port = self.listen(factory)
        yield deliver(reactor, "127.0.0.1", port, [self.message(context=self.CONTEXT)], _options())
        self.assertNotIn("XCLIENT", factory.verbs())

    @defer.inlineCallbacks
    def test_xforward(self):
        """
        XFORWARD (no XCLIENT) goes before each MAIL, without a new EHLO; its
        values hold no whitespace, control or header-special character
        (XFORWARD_README: each is C{?}, as Postfix's smtpd makes them).
        """
        factory = _ScriptedFactory(extensions=["XFORWARD NAME ADDR PORT PROTO HELO"])
        port = self.listen(factory)
        other = dict(self.CONTEXT, remote_ip="192.0.2.7")
        messages = [self.message(context=self.CONTEXT), self.message(context=other)]
        results = yield deliver(reactor, "127.0.0.1", port, messages, _options(forwardIdentity=True))
        self.assertTrue(results[1]["rcpt@example.test"].ok)
        self.assertEqual(
            factory.verbs(), ["EHLO"] + ["XFORWARD", "MAIL", "RCPT", "DATA"] * 2 + ["QUIT"]
        )
        self.assertEqual(
            factory.lines[1],
            "XFORWARD HELO=helo?with?space+2Beq+3D? PROTO=ESMTPSA PORT=54321"
            " NAME=client.example.net ADDR=IPV6:2001:db8::5",
        )
        self.assertTrue(factory.lines[5].endswith(" ADDR=192.0.2.7"))


# TLS


def _certificate(subject, issuer, issuerKey, key, ca, names=()):
    extensions = [(x509.BasicConstraints(ca=ca, path_length=None), True)]
    if names:
        extensions.append(altNames(*[x509.DNSName(n) for n in names]))
    return certificate(commonName(subject), commonName(issuer), key, issuerKey, 1, *extensions)


_pki = {}


def _makePKI():
    """A test CA, a server certificate for mx.example.test it signed, and an unrelated CA."""
    if not _pki:
        caKey = newKey()
        ca = _certificate("Test CA", "Test CA", caKey, caKey, True)
        otherKey = newKey()
        other = _certificate("Other CA", "Other CA", otherKey, otherKey, True)
        serverKey = newKey()
        server = _certificate("mx.example.test", "Test CA", caKey, serverKey, False, ["mx.example.test"])
        _pki.update(ca=pem(ca), other=pem(other), server=pem(server) + pem(serverKey))
    return _pki


class STARTTLSTests(_DeliveryTestCase):
    def setUp(self):
        pki = _makePKI()
        self.caFile = self.body(pki["ca"])
        self.otherCaFile = self.body(pki["other"])
        self.mailbox = _Mailbox()
        serverOptions = ssl.PrivateCertificate.loadPEM(pki["server"]).options()
        self.factory = _ServerFactory(self.mailbox, serverOptions)
        self.port = self.listen(self.factory)

    def send(self, **kw):
        return deliver(reactor, "127.0.0.1", self.port, [self.message()], _options(**kw))

    @defer.inlineCallbacks
    def test_verify(self):
        """"verify" delivers over TLS against the right name and CA."""
        content = CONTENT + b"".join(b".%06d %s\r\n" % (i, b"y" * 200) for i in range(2000))
        message = self.message(content=content)
        options = _options(tls="verify", tlsHostname="mx.example.test", caFile=self.caFile)
        results = yield deliver(reactor, "127.0.0.1", self.port, [message], options)
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertTrue(self.factory.connections[0].startedTLS)
        self.assertEqual([m[2] for m in self.mailbox.messages], [content])

    @defer.inlineCallbacks
    def test_verifyAbsoluteName(self):
        """
        "verify" for a name written with the root's final dot (a smarthost
        configured as C{[mx.example.test.]}) checks and sends the name
        without it, as certificates and SNI hold names: before, the check
        compared C{mx.example.test.} with the certificate's
        C{mx.example.test} and every delivery was deferred.
        """
        results = yield self.send(tls="verify", tlsHostname="mx.example.test.", caFile=self.caFile)
        self.assertTrue(results[0]["rcpt@example.test"].ok, results)
        self.assertEqual(self.factory.connections[0].transport.getHandle().get_servername(), b"mx.example.test")

    @defer.inlineCallbacks
    def test_verifyNameWithUnderscore(self):
        """
        "verify" for a host name with an underscore (C{mx_1.example.test}:
        in DNS and in a private CA's certificates, though no host name
        RFC 1123 allows) checks it as written and delivers.  Before, the
        strict IDNA encoding of the name raised before STARTTLS: every
        delivery deferred 4.7.5 "cannot set up TLS", with a traceback.
        """
        caKey, key = newKey(), newKey()
        ca = _certificate("Underscore CA", "Underscore CA", caKey, caKey, True)
        cert = _certificate("mx_1.example.test", "Underscore CA", caKey, key, False, ["mx_1.example.test"])
        port = self.listen(_ServerFactory(self.mailbox, ssl.PrivateCertificate.loadPEM(pem(cert) + pem(key)).options()))
        options = _options(tls="verify", tlsHostname="mx_1.example.test", caFile=self.body(pem(ca)))
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], options)
        self.assertTrue(results[0]["rcpt@example.test"].ok, results)
        self.assertEqual(len(self.mailbox.messages), 1)

    @defer.inlineCallbacks
    def test_verifyWrongName(self):
        """"verify" against another name fails, temporarily, before MAIL."""
        results = yield self.send(tls="verify", tlsHostname="wrong.example.test", caFile=self.caFile)
        result = results[0]["rcpt@example.test"]
        self.assertTemporary(result, "TLS handshake")
        self.assertEqual(result.enhanced, "4.7.5")
        self.assertEqual(self.mailbox.messages, [])

    @defer.inlineCallbacks
    def refusedBy(self, server, ca):
        """
        Deliver with "verify" for mx.example.test, trusting C{ca}, to a next
        hop serving C{server}: the handshake must fail temporarily and
        nothing be delivered; the recipient's result.
        """
        port = self.listen(_ServerFactory(self.mailbox, server.options()))
        options = _options(tls="verify", tlsHostname="mx.example.test", caFile=self.body(pem(ca)))
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], options)
        result = results[0]["rcpt@example.test"]
        self.assertTemporary(result, "TLS handshake")
        self.assertEqual(self.mailbox.messages, [])
        return result

    @defer.inlineCallbacks
    def test_verifyUnparsableCertificateForAnotherName(self):
        """
        "verify" against a certificate from the right CA, for another name,
        that cryptography cannot parse (OpenSSL can): a temporary failure,
        as for any wrong name.  Twisted's check of the name logged the parse
        error and let the chain's result stand, so the message went to a
        server that never proved to be the next hop.
        """
        caKey, key = newKey(), newKey()
        ca = _certificate("Odd CA", "Odd CA", caKey, caKey, True)
        der = unreadableCertificate(commonName("Odd CA"), caKey, key, x509.DNSName("other.example.test"))
        server = ssl.PrivateCertificate.loadPEM(DER_cert_to_PEM_cert(der).encode() + pem(key))
        result = yield self.refusedBy(server, ca)
        self.assertEqual(result.enhanced, "4.7.5")

    @defer.inlineCallbacks
    def test_verifyMalformedNamePattern(self):
        """
        "verify" against a certificate from the right CA whose only name is
        a pattern service_identity refuses to match (two wildcards): a
        temporary failure.  Twisted's check raised CertificateError, logged
        it and let the chain's result stand.
        """
        caKey, key = newKey(), newKey()
        ca = _certificate("Wild CA", "Wild CA", caKey, caKey, True)
        cert = _certificate("wild", "Wild CA", caKey, key, False, ["*.*.example.test"])
        yield self.refusedBy(ssl.PrivateCertificate.loadPEM(pem(cert) + pem(key)), ca)

    @defer.inlineCallbacks
    def test_verifyOtherCA(self):
        """"verify" with a CA that did not sign the certificate fails, temporarily."""
        results = yield self.send(tls="verify", tlsHostname="mx.example.test", caFile=self.otherCaFile)
        self.assertTemporary(results[0]["rcpt@example.test"], "TLS handshake")
        self.assertEqual(self.mailbox.messages, [])

    @defer.inlineCallbacks
    def test_may(self):
        """"may" uses TLS without checking the certificate."""
        results = yield self.send(tls="may")
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertTrue(self.factory.connections[0].startedTLS)

    @defer.inlineCallbacks
    def test_none(self):
        """"none" does not use STARTTLS even when offered."""
        results = yield self.send(tls="none")
        self.assertTrue(results[0]["rcpt@example.test"].ok)
        self.assertFalse(self.factory.connections[0].startedTLS)

    @defer.inlineCallbacks
    def test_verifyWithoutSTARTTLS(self):
        """"verify" with a next hop not offering STARTTLS is a temporary failure."""
        factory = _ServerFactory(self.mailbox)
        port = self.listen(factory)
        results = yield deliver(
            reactor, "127.0.0.1", port, [self.message()],
            _options(tls="verify", tlsHostname="mx.example.test", caFile=self.caFile),
        )
        result = results[0]["rcpt@example.test"]
        self.assertTemporary(result, "STARTTLS")
        self.assertEqual(result.enhanced, "4.7.4")
        self.assertEqual(self.mailbox.messages, [])

    @defer.inlineCallbacks
    def test_mayWithoutSTARTTLS(self):
        """"may" with a next hop not offering STARTTLS delivers in plaintext."""
        factory = _ServerFactory(self.mailbox)
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options(tls="may"))
        self.assertTrue(results[0]["rcpt@example.test"].ok)

    @defer.inlineCallbacks
    def test_responseInjection(self):
        """Data pipelined after the 220 to STARTTLS is refused, not trusted."""
        factory = _ScriptedFactory(
            extensions=["STARTTLS"],
            replies={"STARTTLS": "220 2.0.0 go ahead\n250 injected"},
        )
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()], _options(tls="may"))
        self.assertTemporary(results[0]["rcpt@example.test"], "protocol error", "STARTTLS")


class EhloKeywordTests(unittest.TestCase):
    """The next hop's EHLO keywords, as the client reads them."""

    def test_authLinesJoined(self):
        """Every AUTH line's mechanisms, the obsolete C{AUTH=} form's too, in the order given."""
        reply = clientwire._Reply(250, ("relay.example", "PIPELINING", "AUTH LOGIN", "auth=PLAIN CRAM-MD5",
                                        "AUTH XOAUTH2", "size 1000"))
        self.assertEqual(clientwire._extensions(reply), {"PIPELINING": "", "AUTH": "LOGIN PLAIN CRAM-MD5 XOAUTH2",
                                                         "SIZE": "1000"})

    def test_manyAuthLines(self):
        """
        An EHLO reply of 6,000 AUTH lines (under 64 KB): all its mechanisms,
        read in time linear in the reply (each line used to join all the
        lines before it again).
        """
        mechanisms = ["M%d" % i for i in range(6000)]
        reply = clientwire._Reply(250, ("relay.example",) + tuple("AUTH " + m for m in mechanisms))
        self.assertEqual(clientwire._extensions(reply)["AUTH"].split(), mechanisms)


class ReplyTimerTests(unittest.TestCase):
    """
    The wire protocol's reply timer: it bounds each wait for a reply, the
    sending of a body and a close, and is left armed (not cancelled) while
    the connection is idle, when it must not cut the connection off.
    """

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from relaygw.relay.clientwire import _SMTPClientProtocol

        self.clock = Clock()
        self.proto = _SMTPClientProtocol(10, self.clock, "mx.example.test")
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def assertCommandTimesOut(self):
        """A command whose reply does not come: cut off after the whole timeout, not before."""
        self.proto.command("NOOP")
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting or self.proto.timedOut)
        self.clock.advance(0.2)
        self.assertTrue(self.proto.timedOut)
        self.assertTrue(self.transport.disconnecting)

    def test_waitForReplyTimesOut(self):
        """A reply that does not come within the timeout: the connection is cut off."""
        self.assertCommandTimesOut()

    def test_idleIsNotCutOff(self):
        """Every reply answered: the timer left armed does not cut the kept connection off."""
        answered = []
        self.proto.command("NOOP").addCallback(answered.append)
        self.proto.dataReceived(b"250 2.0.0 ok\r\n")
        self.assertEqual([r.code for r in answered], [250])
        self.clock.advance(60)
        self.assertFalse(self.proto.timedOut)
        self.assertFalse(self.transport.disconnecting)
        # The next command gets a whole timeout of its own.
        self.assertCommandTimesOut()

    def test_timerRestartsForTheNextCommand(self):
        """A command sent just before the previous command's deadline gets the whole timeout."""
        self.proto.command("NOOP")
        self.clock.advance(9)
        self.proto.dataReceived(b"250 2.0.0 ok\r\n")
        self.assertCommandTimesOut()

    def test_closeTimesOut(self):
        """A next hop that does not close after QUIT is cut off within the timeout."""
        self.proto.closeWithin(3)
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(3.1)
        self.assertTrue(self.proto.timedOut)


PASSWORD = "s3cret-smarthost-password"
SECRET_B64 = (base64.b64encode(b"\0relay\0" + PASSWORD.encode()).decode(),
              base64.b64encode(PASSWORD.encode()).decode())


class PlaintextCredentialTests(_DeliveryTestCase):
    """
    With tls = "may" the smarthost password never goes over a plaintext
    connection (tls = "none" alone sends it in the clear): a man in the
    middle who deletes STARTTLS from the EHLO reply, or answers it 454,
    gets no more than one who breaks the handshake (which is not retried
    in plaintext with AUTH either).  The mail is deferred, not sent
    unauthenticated.
    """

    def assertNoCredentials(self, factory, results):
        sent = "\n".join(factory.lines)
        self.assertNotIn("AUTH", factory.verbs(), "AUTH sent in plaintext: %r" % (factory.lines,))
        for secret in SECRET_B64:
            self.assertNotIn(secret, sent)
        # And the mail is deferred, not sent unauthenticated either.
        self.assertNotIn("MAIL", factory.verbs())
        self.assertTemporary(results[0]["rcpt@example.test"])

    @defer.inlineCallbacks
    def test_mayStrippedSTARTTLSKeepsPassword(self):
        """tls=may, AUTH configured, STARTTLS stripped from EHLO: no AUTH PLAIN in the clear."""
        factory = _ScriptedFactory(extensions=["AUTH PLAIN LOGIN"])  # (STARTTLS stripped)
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()],
                                _options(tls="may", auth=("relay", PASSWORD)))
        self.assertNoCredentials(factory, results)

    @defer.inlineCallbacks
    def test_mayStrippedSTARTTLSKeepsPasswordLogin(self):
        """The same with AUTH LOGIN only: the password is not sent base64'd in the clear."""
        factory = _ScriptedFactory(extensions=["AUTH LOGIN"])
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()],
                                _options(tls="may", auth=("relay", PASSWORD)))
        self.assertNoCredentials(factory, results)

    @defer.inlineCallbacks
    def test_mayRefusedSTARTTLSKeepsPassword(self):
        """tls=may, AUTH configured, STARTTLS offered but answered 454: no AUTH in the clear."""
        factory = _ScriptedFactory(extensions=["STARTTLS", "AUTH PLAIN LOGIN"],
                                      replies={"STARTTLS": "454 4.7.0 TLS not available due to local problem"})
        port = self.listen(factory)
        results = yield deliver(reactor, "127.0.0.1", port, [self.message()],
                                _options(tls="may", auth=("relay", PASSWORD)))
        self.assertNoCredentials(factory, results)


class OwnNameTests(_DeliveryTestCase):
    """
    A next hop on port 25 whose reply to EHLO (or HELO) begins with one of
    the gateway's own names is the gateway itself, as Postfix's smtp_helo
    judges it against myhostname: no mail goes to it, and the mail "loops
    back to myself", bounced (554 5.4.6) when that host is the best one for
    the destination, deferred (451 4.4.6) when a better one may take it.
    """

    def listen25(self, factory):
        """Listen on port 25 of some 127.0.0.x (the port Postfix checks); that address."""
        for last in range(161, 181):
            address = "127.0.0.%d" % last
            try:
                port = reactor.listenTCP(25, factory, interface=address)
            except CannotListenError:
                continue
            self.addCleanup(port.stopListening)
            return address
        raise unittest.SkipTest("cannot listen on port 25 of any 127.0.0.161-180 address")

    def send(self, address, port=25, **kw):
        options = _options(ownNames=frozenset({"relay.example.net", "other.example.net"}), **kw)
        return deliver(reactor, address, port, [self.message()], options)

    @defer.inlineCallbacks
    def test_bestHostBounces(self):
        """The best host answers EHLO with an own name (in another case): 554 5.4.6, no MAIL, a warning."""
        logs = LogCapture(self)
        factory = _ScriptedFactory(ehloReply="250-Relay.Example.NET at your service\n250 PIPELINING")
        address = self.listen25(factory)
        results = yield self.send(address, destination="example.test")
        result = results[0]["rcpt@example.test"]
        self.assertEqual(result, RecipientResult(554, "5.4.6", "mail for example.test loops back to myself"))
        self.assertTrue(result.permanent)
        self.assertEqual(factory.verbs(), ["EHLO", "QUIT"])
        [warning] = logs.find("replied to HELO/EHLO with my own hostname")
        self.assertEqual(formatEvent(warning), "host %s:25 replied to HELO/EHLO with my own hostname Relay.Example.NET"
                         % (address,))

    @defer.inlineCallbacks
    def test_worseHostDefers(self):
        """A host that is not the best answers with an own name: 451 4.4.6, a better one may take the mail."""
        factory = _ScriptedFactory(ehloReply="250 other.example.net")
        address = self.listen25(factory)
        results = yield self.send(address, destination="example.test", bestMX=False)
        result = results[0]["rcpt@example.test"]
        self.assertEqual(result, RecipientResult(451, "4.4.6", "mail for example.test loops back to myself"))
        self.assertNotIn("MAIL", factory.verbs())

    @defer.inlineCallbacks
    def test_heloReply(self):
        """After a refused EHLO, the HELO reply is judged the same; the mail is for the host connected to."""
        factory = _ScriptedFactory(ehloReply="502 5.5.2 no ESMTP", replies={"HELO relay.example.net":
                                                                            "250 relay.example.net"})
        address = self.listen25(factory)
        results = yield self.send(address)
        self.assertEqual(results[0]["rcpt@example.test"],
                         RecipientResult(554, "5.4.6", "mail for %s loops back to myself" % (address,)))
        self.assertEqual(factory.verbs(), ["EHLO", "HELO", "QUIT"])

    @defer.inlineCallbacks
    def test_otherNameDelivered(self):
        """Only the first word counts, whole: a host naming itself otherwise gets the mail."""
        for reply in ("250-relay.example.net.example.org relay.example.net\n250 PIPELINING", "250 scripted.test"):
            factory = _ScriptedFactory(ehloReply=reply)
            address = self.listen25(factory)
            results = yield self.send(address, destination="example.test")
            self.assertTrue(results[0]["rcpt@example.test"].ok, results)
            self.assertEqual(len(factory.messages), 1)

    @defer.inlineCallbacks
    def test_otherPortNotJudged(self):
        """
        On another port than 25 the name is not judged, as Postfix does not:
        there a content filter on the same machine answers with its name.
        """
        factory = _ScriptedFactory(ehloReply="250 relay.example.net")
        results = yield self.send("127.0.0.1", self.listen(factory), destination="example.test")
        self.assertTrue(results[0]["rcpt@example.test"].ok, results)
        self.assertEqual(len(factory.messages), 1)
