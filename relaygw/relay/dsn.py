"""
RFC 3464 delivery status notifications for recipients that failed for good:
building one, and queueing it for the sender.
"""

import os
import re
import time
from email.utils import formatdate

from twisted.internet import defer

from relaygw.datareader import isContinuation
from relaygw.logs import Logger
from relaygw.spoolapi import Envelope

log = Logger(namespace="relaygw.queue")


#: RFC 5322's limit on a line's length, its CRLF not counted.
RFC5322_LINE = 998

#: The start of a header field: a name (printable, no colon), then the
#: colon (white space before it: RFC 5322's obsolete syntax).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def _headers(message, limit=65536):
    """
    The original message's header section, for the bounce's
    text/rfc822-headers part: at most C{limit} octets, in whole lines, a
    line longer than RFC 5322 allows continued on the next (a space first,
    a UTF-8 character kept whole), NUL and bare CR (which no 7bit or 8bit
    part may hold, RFC 2045) as "?".  The section ends at the first line
    that is neither a header field nor a field's continuation, blank or
    not: a body that follows the headers without a blank line is not
    returned.
    """
    with message.openBody() as f:
        data = f.read(limit)
    end = data.find(b"\r\n\r\n")
    if end == -1:
        end = data.rfind(b"\r\n")  # (no end of the headers in the first C{limit} octets)
    if end != -1:
        data = data[: end + 2]
    fields = data.split(b"\r\n")
    for n, line in enumerate(fields):
        if not (_FIELD.match(line) or (n and isContinuation(line))):
            del fields[n:]
            break
    lines = []
    for line in fields:
        line = line.replace(b"\x00", b"?").replace(b"\r", b"?")
        while len(line) > RFC5322_LINE:
            cut = RFC5322_LINE
            while 0x80 <= line[cut] < 0xC0 and cut > RFC5322_LINE - 3:  # (inside a UTF-8 character)
                cut -= 1
            lines.append(line[:cut])
            line = b" " + line[cut:]
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def _clean(text):
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))


#: A line of a bounce that quotes a next hop's reply is cut to this many
#: characters: RFC 5322 limits a line to 998 octets, and the rest of a
#: longer reply says nothing a sender needs.
LINE_MAX = 900


def _cut(line):
    return line if len(line) <= LINE_MAX else line[:LINE_MAX] + " [...]"


def buildBounce(message, failures, hostname, now=None):
    """
    The bounce for C{message}: a C{multipart/report} with a human part, a
    C{message/delivery-status} part with one block per failed recipient, and
    the original headers.  C{failures} maps recipient -> result (with
    C{code}, C{enhanced} and C{describe()}).
    """
    # One message can bounce more than once (recipients that fail for good
    # in different attempts): each bounce has its own Message-ID.
    headers = _headers(message)
    encoding = [] if headers.isascii() else ["Content-Transfer-Encoding: 8bit"]  # (the report's and the part's)
    token = os.urandom(4).hex()
    boundary = "relaygw-%s-%s" % (message.queueId, token)
    date = formatdate(now, usegmt=True)
    arrival = formatdate(message.arrival, usegmt=True)
    human = [
        "This is the mail system at host %s." % hostname,
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    blocks = []
    for rcpt, result in failures.items():
        reply = _clean(result.describe())
        human.append(_cut("<%s>: %s" % (_clean(rcpt), reply)))
        status = result.enhanced if result.enhanced and result.enhanced[0] in "45" else "5.0.0"
        if status[0] == "4":  # the queue lifetime ran out on a temporary failure
            status = "5" + status[1:]
        if result.reply:  # (the next hop's reply, and its name: RFC 3464 sections 2.3.5, 2.3.6)
            diagnostic = _cut("Diagnostic-Code: smtp; " + reply)
            if result.relay:
                diagnostic = "Remote-MTA: dns; %s\r\n%s" % (_clean(result.relay.split("[", 1)[0]), diagnostic)
        else:  # (no SMTP reply says so: the gateway's own diagnostic, no code it never got)
            diagnostic = _cut("Diagnostic-Code: X-relaygw; " + _clean(result.text))
        blocks.append(
            "Final-Recipient: rfc822; %s\r\nAction: failed\r\nStatus: %s\r\n"
            "%s\r\n" % (_clean(rcpt), status, diagnostic)
        )
    parts = [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
        "To: <%s>" % _clean(message.mailfrom),
        "Subject: Undelivered Mail Returned to Sender",
        "Date: %s" % date,
        "Message-ID: <%s.%s.bounce@%s>" % (message.queueId, token, hostname),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="%s"' % boundary,
    ] + encoding + [
        "",
        "This is a MIME-encapsulated message.",
        "",
        "--" + boundary,
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ] + human + [
        "",
        "--" + boundary,
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; %s\r\nX-Relaygw-Queue-ID: %s\r\nArrival-Date: %s\r\n" % (
            hostname, message.queueId, arrival),
    ]
    text = "\r\n".join(parts)
    # A blank line ends the per-message fields; one more separates each
    # recipient's group (RFC 3464 section 2.1).
    text += "\r\n" + "\r\n".join(blocks) + "\r\n--%s\r\nContent-Type: text/rfc822-headers\r\n%s\r\n" % (
        boundary, "".join(line + "\r\n" for line in encoding))
    body = text.encode("ascii") + headers
    return body + ("\r\n--%s--\r\n" % boundary).encode("ascii")


def queueBounce(spool, message, failures, hostname):
    """
    Queue the bounce of C{message} for C{failures} to its envelope sender
    (through the spool's C{newMessage}).  Fires with the bounce's queue id
    once it is durable, so the original is never removed before its bounce
    exists.  A message with the null sender never bounces: that is logged,
    and the Deferred fires with C{None}.
    """
    if message.mailfrom == "":
        log.warn("{qid}: undeliverable message with null sender dropped for {rcpts}",
                 qid=message.queueId, rcpts=", ".join(failures))
        return defer.succeed(None)
    body = buildBounce(message, failures, hostname)
    writer = spool.newMessage(Envelope(
        mailfrom="", recipients=[message.mailfrom], arrival=time.time(),
        context={"connection": {"bounce_for": message.queueId}, "message": {}}))
    writer.write(body)
    return writer.commit()
