"""
RFC 3464 delivery status notifications: building one, and queueing it for
the sender.  Bounces for recipients that failed for good; success notices
(RFC 3461 C{NOTIFY=SUCCESS}) for recipients relayed to a next hop that
offers no DSN, or delivered to a Maildir.  A recipient's NOTIFY says which
it gets (none at all with C{NEVER}); MAIL's C{RET} how much of the message
a bounce returns and C{ENVID} the report's C{Original-Envelope-Id}; its
C{ORCPT} the C{Original-Recipient}.
"""

import os
import re
import time

from twisted.internet import defer

from relaygw.datareader import isContinuation
from relaygw.logs import Logger
from relaygw.spoolapi import Envelope
from relaygw.trace import dateTime
from relaygw.xtext import XtextError, decode

log = Logger(namespace="relaygw.queue")


#: RFC 5322's limit on a line's length, its CRLF not counted.
RFC5322_LINE = 998

#: A bounce for C{RET=FULL} returns the whole message only up to this
#: size (Postfix's C{bounce_size_limit}); a larger one, its header section.
RETURN_LIMIT = 50000

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


def _whole(message):
    """
    The whole message for a bounce's message/rfc822 part (C{RET=FULL}), or
    C{None} when it is over L{RETURN_LIMIT} or holds what no 7bit or 8bit
    part may (NUL, a bare CR, a line over 998 octets): then its headers go.
    """
    if message.size > RETURN_LIMIT:
        return None
    with message.openBody() as f:
        data = f.read(RETURN_LIMIT + 1)
    if len(data) > RETURN_LIMIT or b"\x00" in data:
        return None
    if any(len(line) > RFC5322_LINE or b"\r" in line for line in data.split(b"\r\n")):
        return None
    return data


def _clean(text):
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))


def _decoded(value):
    """A DSN parameter's xtext (checked when it came in), decoded and cleaned for a report's field."""
    try:
        return _clean(decode(value).decode("ascii", "replace"))
    except XtextError:
        return _clean(value)


def _notify(message, rcpt):
    """The NOTIFY C{rcpt} was given (a list of words), or C{None}."""
    params = message.envelope.rcpt_params.get(rcpt)
    notify = params.get("NOTIFY") if params else None
    return notify.split(",") if notify else None


def wanted(message, results, success=False):
    """
    The C{{recipient: result}} of C{results} whose recipient asked for a
    notice (RFC 3461 section 4.1): a failure without NOTIFY, or with
    FAILURE; a success with SUCCESS, when the gateway is the last to
    report it (the result's C{action}).
    """
    if not message.envelope.rcpt_params:  # (the usual case: no DSN parameters, bounces only)
        return {} if success else results
    kept = {}
    for rcpt, result in results.items():
        notify = _notify(message, rcpt)
        if success:
            if notify and "SUCCESS" in notify and result.action:
                kept[rcpt] = result
        elif notify is None or "FAILURE" in notify:
            kept[rcpt] = result
    return kept


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
    the original headers (the whole message for C{RET=FULL}, see
    L{_whole}).  C{failures} maps recipient -> result (with C{code},
    C{enhanced} and C{describe()}).
    """
    return buildReport(message, failures, hostname, now=now)


def buildReport(message, results, hostname, success=False, now=None):
    """
    A report for C{results} (recipient -> result): a bounce, or with
    C{success} a success notice (each result's C{action}: "relayed" or
    "delivered"), which returns the headers only (RFC 3461 section 4.3).
    """
    # One message can bounce more than once (recipients that fail for good
    # in different attempts): each bounce has its own Message-ID.
    envelope = message.envelope
    returned = None if success or envelope.mail_params.get("RET") != "FULL" else _whole(message)
    if returned is None:
        returned, returnedType = _headers(message), "text/rfc822-headers"
    else:
        returnedType = "message/rfc822"
    encoding = [] if returned.isascii() else ["Content-Transfer-Encoding: 8bit"]  # (the report's and the part's)
    token = os.urandom(4).hex()
    boundary = "relaygw-%s-%s" % (message.queueId, token)
    date = dateTime(now)
    arrival = dateTime(message.arrival)
    if success:
        subject = "Successful Mail Delivery Report"
        human = ["This is the mail system at host %s." % hostname, "",
                 "Your message was successfully delivered to the destination(s) listed below.",
                 "If the message was delivered to a mailbox you will receive no further notifications.",
                 "Otherwise you may still receive notifications of mail delivery errors from other systems.", ""]
    else:
        subject = "Undelivered Mail Returned to Sender"
        human = ["This is the mail system at host %s." % hostname, "",
                 "Your message could not be delivered to one or more recipients.", ""]
    blocks = []
    for rcpt, result in results.items():
        reply = _clean(result.describe())
        human.append(_cut("<%s>: %s" % (_clean(rcpt), reply)))
        if success:
            action = result.action
            status = result.enhanced if result.enhanced and result.enhanced[0] == "2" else "2.0.0"
        else:
            action = "failed"
            # A recipient whose lifetime ran out on temporary failures keeps
            # their last status (4.x.x, Action: failed), as Postfix's bounces
            # do: RFC 3464 section 2.3.4 has the Status say what went wrong,
            # and nothing ever said it was permanent.
            if result.enhanced and result.enhanced[0] in "45":
                status = result.enhanced
            else:
                status = "4.0.0" if result.temporary else "5.0.0"
        if result.reply:  # (the next hop's reply, and its name: RFC 3464 sections 2.3.5, 2.3.6)
            diagnostic = _cut("Diagnostic-Code: smtp; " + reply)
            if result.relay:
                diagnostic = "Remote-MTA: dns; %s\r\n%s" % (_clean(result.relay.split("[", 1)[0]), diagnostic)
        else:  # (no SMTP reply says so: the gateway's own diagnostic, no code it never got)
            diagnostic = _cut("Diagnostic-Code: X-relaygw; " + _clean(result.text))
        params = envelope.rcpt_params.get(rcpt) if envelope.rcpt_params else None
        original = ""
        if params and "ORCPT" in params:  # (RFC 3464 section 2.3.1: as the sender gave it, decoded)
            kind, _, address = params["ORCPT"].partition(";")
            original = _cut("Original-Recipient: %s;%s" % (_clean(kind), _decoded(address))) + "\r\n"
        blocks.append(
            "%sFinal-Recipient: rfc822; %s\r\nAction: %s\r\nStatus: %s\r\n"
            "%s\r\n" % (original, _clean(rcpt), action, status, diagnostic)
        )
    envid = envelope.mail_params.get("ENVID")
    perMessage = "Original-Envelope-Id: %s\r\n" % (_decoded(envid),) if envid else ""
    parts = [
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
        "To: <%s>" % _clean(message.mailfrom),
        "Subject: %s" % subject,
        "Date: %s" % date,
        "Message-ID: <%s.%s.%s@%s>" % (message.queueId, token, "success" if success else "bounce", hostname),
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
        "%sReporting-MTA: dns; %s\r\nX-Relaygw-Queue-ID: %s\r\nArrival-Date: %s\r\n" % (
            perMessage, hostname, message.queueId, arrival),
    ]
    text = "\r\n".join(parts)
    # A blank line ends the per-message fields; one more separates each
    # recipient's group (RFC 3464 section 2.1).
    text += "\r\n" + "\r\n".join(blocks) + "\r\n--%s\r\nContent-Type: %s\r\n%s\r\n" % (
        boundary, returnedType, "".join(line + "\r\n" for line in encoding))
    body = text.encode("ascii") + returned
    return body + ("\r\n--%s--\r\n" % boundary).encode("ascii")


def queueBounce(spool, message, failures, hostname):
    """
    Queue the bounce of C{message} for C{failures} to its envelope sender
    (through the spool's C{newMessage}), leaving out the recipients whose
    NOTIFY asked for none (L{wanted}).  Fires with the bounce's queue id
    once it is durable, so the original is never removed before its bounce
    exists.  A message with the null sender never bounces: that is logged,
    and the Deferred fires with C{None}; so it does when no recipient is
    left to report.
    """
    if message.mailfrom == "":
        log.warn("{qid}: undeliverable message with null sender dropped for {rcpts}",
                 qid=message.queueId, rcpts=", ".join(failures))
        return defer.succeed(None)
    failures = wanted(message, failures)
    if not failures:
        return defer.succeed(None)
    return _queue(spool, message, buildBounce(message, failures, hostname))


def queueSuccess(spool, message, results, hostname):
    """
    Queue the success notice of C{message} for those of C{results} (its
    recipients done in one attempt) that asked for one (L{wanted}); as
    L{queueBounce}, fires with its queue id once durable, or with C{None}
    when there is none to send (the null sender gets none).
    """
    results = wanted(message, results, success=True)
    if not results or message.mailfrom == "":
        return defer.succeed(None)
    return _queue(spool, message, buildReport(message, results, hostname, success=True))


def _queue(spool, message, body):
    writer = spool.newMessage(Envelope(
        mailfrom="", recipients=[message.mailfrom], arrival=time.time(),
        context={"connection": {"bounce_for": message.queueId}, "message": {}}))
    writer.write(body)
    return writer.commit()
