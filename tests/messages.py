"""
Sending test messages: a whole session over a socket (L{sendOne}), or one
transaction on a client that is already past EHLO (L{sendMessage} on a raw
client, L{queueMessage} on a harness session).
"""

import email

from twisted.internet import defer

from relaygw.testing import Client


def sendOne(port, mailfrom="a@example.org", rcpts=("b@example.net",), subject="relay", before=(), content=None):
    """
    One message to the gateway on C{port} after EHLO and the C{before}
    commands (its C{content} up to the end of data, by default a Subject and
    a body); returns its queue id.
    """
    c = Client(port)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        for line in before:
            code, lines = c.cmd(line)
            assert code in (220, 250), (line, code, lines)
        assert c.cmd("MAIL FROM:<%s>" % mailfrom)[0] == 250
        for r in rcpts:
            assert c.cmd("RCPT TO:<%s>" % r)[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(("Subject: %s\r\n\r\nbody of %s\r\n" % (subject, subject) if content is None else content) + ".\r\n")
        code, lines = c.reply()
        assert code == 250, (code, lines)
        return lines[0].rsplit(" ", 1)[1]
    finally:
        c.close()


def startData(c, mailfrom="a@example.org", rcpt="b@example.net"):
    """EHLO, MAIL, RCPT and DATA on a greeted raw client C{c}: its content may follow."""
    for line in ("EHLO x", "MAIL FROM:<%s>" % mailfrom, "RCPT TO:<%s>" % rcpt):
        code = c.cmd(line)[0]
        assert code == 250, (line, code)
    code = c.cmd("DATA")[0]
    assert code == 354, code


def _transaction(c, mailfrom, rcpt, subject):
    """MAIL, RCPT, DATA and the content on client C{c} (asserts every step up to the content)."""
    code, lines = c.cmd("MAIL FROM:<%s>" % mailfrom)
    assert code == 250, (code, lines)
    code, lines = c.cmd("RCPT TO:<%s>" % rcpt)
    assert code == 250, (code, lines)
    code, lines = c.cmd("DATA")
    assert code == 354, (code, lines)
    c.send("Subject: %s\r\n\r\nbody\r\n.\r\n" % subject)


def _queueId(reply):
    code, lines = reply
    assert code == 250, (code, lines)
    return lines[0].rsplit(" ", 1)[1]


def sendMessage(c, mailfrom="a@example.org", rcpt="b@example.net", subject="verbs"):
    """MAIL, RCPT, DATA; returns the queue id (asserts every step)."""
    _transaction(c, mailfrom, rcpt, subject)
    return _queueId(c.reply())


@defer.inlineCallbacks
def queueMessage(c, mailfrom="a@example.org", rcpt="b@example.net", subject="verbs"):
    """
    L{sendMessage} for a harness session (L{SessionClient}) on the real
    spool: waits for the end-of-data reply; fires with the queue id.
    """
    _transaction(c, mailfrom, rcpt, subject)
    return _queueId((yield c.whenReply()))


def mimeLeaves(content):
    """Each leaf part of C{content} (octets): its content type and decoded payload."""
    return [(part.get_content_type(), part.get_payload(decode=True))
            for part in email.message_from_bytes(content).walk() if not part.is_multipart()]


def mimeFields(content):
    """
    Each entity's header fields in C{content} (octets), less those a 7-bit
    conversion may set (the encoding, MIME-Version).
    """
    return [[(name, value) for name, value in part.items()
             if name.lower() not in ("content-transfer-encoding", "mime-version")]
            for part in email.message_from_bytes(content).walk()]
