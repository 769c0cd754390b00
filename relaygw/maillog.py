"""
The mail log: one line per event an operator greps for, modelled on
Postfix's maillog, each carrying the queue id where there is one.

    connect      [S] connect from NAME[IP]:PORT to LISTENER
    reject       [S] QID|NOQUEUE: reject: VERB from NAME[IP]: REPLY; from=<..> to=<..> proto=.. helo=<..>
    queued       [S] QID: queued from=<..>, size=N, nrcpt=N, message-id=<..>, client=NAME[IP]
    disconnect   [S] disconnect from NAME[IP] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6
    closed       [S] timeout|shutting down|lost connection after VERB from NAME[IP]
    delivery     QID: to=<..>, relay=HOST[IP]:PORT, delay=T, delays=a/b/c/d, dsn=X.Y.Z, status=sent (REPLY)
    bounce       QID: sender non-delivery notification: BOUNCE-QID
    notice       QID: sender delivery status notification: NOTICE-QID
    removed      QID: removed, or QID: removed (relaygw-queue delete)
    held         QID: placed on hold
    released     QID: released from hold

Every event also carries its fields typed (C{event}, C{qid}, C{recipients}
as a list, C{delays} as a list of numbers ...), which the JSON log writes
as they are.
"""

import re

from relaygw.context import identityValue
from relaygw.logs import Logger

smtpd = Logger(namespace="relaygw.smtpd")
qmgr = Logger(namespace="relaygw.qmgr")

#: Postfix's status words for the outcome of a delivery attempt.
STATUS = {"done": "sent", "deferred": "deferred", "bounced": "bounced"}


def client(ctx):
    """C{name[ip]} of the (possibly claimed) client in a validation context."""
    return "%s[%s]" % (ctx.get("remote_name") or "unknown", ctx.get("remote_ip") or "unknown")


def connect(session, ctx, listener):
    smtpd.info("[{session}] connect from {client}:{port} to {listener}", event="connect", session=session,
               client=client(ctx), ip=ctx.get("remote_ip"), port=ctx.get("remote_port"), listener=listener)


def disconnect(session, ctx, counts):
    summary = counts.summary()
    smtpd.info("[{session}] disconnect from {client} {summary}", event="disconnect", session=session,
               client=client(ctx), ip=ctx.get("remote_ip"), summary=summary, commands=counts.asDict())


_ADDRESS = re.compile(r"^\s*(?:FROM|TO)\s*:\s*<?([^>\s]*)>?", re.I)


def _address(args):
    m = _ADDRESS.match(args or "")
    return m.group(1) if m else None


def reject(session, ctx, verb, args, reply, sender, helo, qid=None, recipients=()):
    """
    A refused command (4xx or 5xx reply), with who, what and why; C{helo}:
    the name or C{(verb, name)}; C{recipients}: those accepted so far.  As
    Postfix, the line names the sender, the recipient (the refused one, or
    the last accepted) and the HELO name only when there is one.
    """
    if isinstance(helo, tuple):
        helo = helo[-1]
    recipient = _address(args) if verb == "RCPT" else (recipients[-1] if recipients else None)
    if verb == "MAIL" and sender is None:
        sender = _address(args)
    text = " ".join(str(p) for p in (reply.code, reply.enhanced, reply.text) if p)
    smtpd.info("[{session}] {qid}: reject: {verb} from {client}: {reply};"
               + (" from=<{sender}>" if sender is not None else "") + (" to=<{recipient}>" if recipient else "")
               + " proto={proto}" + (" helo=<{helo}>" if helo else ""), event="reject", session=session,
               qid=qid or "NOQUEUE",
               verb=verb or "CONNECT", client=client(ctx), ip=ctx.get("remote_ip"), reply=text, code=reply.code,
               enhanced=reply.enhanced, sender=sender if sender is not None else "",
               recipient=recipient or "", proto=ctx.get("protocol") or "SMTP", helo=helo or "")


def closed(session, ctx, why, verb):
    """
    A session ends unasked (C{why}: an idle timeout, the drain running out,
    or the client gone without QUIT), after C{verb}, the last command
    (Postfix's "timeout after END-OF-MESSAGE", "lost connection after
    DATA"); not a reject of that command.
    """
    smtpd.info("[{session}] {why} after {verb} from {client}", event="closed", session=session, why=why,
               verb=verb or "CONNECT", client=client(ctx), ip=ctx.get("remote_ip"))


_QUEUED = "[{session}] {qid}: queued from=<{sender}>, size={size}, nrcpt={nrcpt}, message-id={message_id}, " \
    "client={client}"


def queued(session, ctx, qid, sender, recipients, size, messageId):
    """
    A message accepted: its client, and its login (AUTH, XCLIENT C{LOGIN=}) when it has one,
    as Postfix's C{sasl_username=}.
    """
    login = identityValue(ctx, "LOGIN")
    smtpd.info(_QUEUED if login is None else _QUEUED + ", sasl_username={sasl_username}", event="queued",
               session=session, qid=qid, sender=sender, recipients=list(recipients), nrcpt=len(recipients),
               size=size, message_id=messageId or "", client=client(ctx), ip=ctx.get("remote_ip"),
               sasl_username=login)


def delivery(qid, recipient, relay, delay, delays, status, result):
    """One recipient's outcome of one delivery attempt."""
    qmgr.info("{qid}: to=<{to}>, relay={relay}, delay={delay:.2f}, delays={delaysText}, dsn={dsn}, "
              "status={status} ({reply})", event="delivery", qid=qid, to=recipient, relay=relay,
              delay=round(delay, 3), delays=[round(d, 3) for d in delays],
              delaysText="/".join(_seconds(d) for d in delays),
              dsn=dsnOf(result), status=STATUS.get(status, status), reply=result.describe())


def _seconds(d):
    """Postfix's way: whole seconds from 10 on, else at most two decimals (C{0}, C{0.01}, C{1.5})."""
    if d >= 10:
        return "%d" % d
    return ("%.2f" % d).rstrip("0").rstrip(".") or "0"


def dsnOf(result):
    enhanced = getattr(result, "enhanced", None)
    if enhanced:
        return str(enhanced)
    code = getattr(result, "code", 0)
    return "%d.0.0" % (code // 100,) if code else "4.0.0"


def bounce(qid, bounceId, sender):
    qmgr.info("{qid}: sender non-delivery notification: {bounce}", event="bounce", qid=qid, bounce=bounceId,
              sender=sender)


def success(qid, noticeId, sender):
    """A success notice (RFC 3461 C{NOTIFY=SUCCESS}) for C{qid} was queued for its sender, as Postfix logs it."""
    qmgr.info("{qid}: sender delivery status notification: {notice}", event="notice", qid=qid, notice=noticeId,
              sender=sender)


def removed(qid, operator=False):
    """C{qid} has left the queue: delivered or bounced, or (C{operator}) deleted with relaygw-queue."""
    qmgr.info("{qid}: removed" + (" (relaygw-queue delete)" if operator else ""), event="removed", qid=qid,
              operator=operator)


def held(qid):
    """The operator held C{qid} with relaygw-queue (Postfix's postsuper -h logs the same line)."""
    qmgr.info("{qid}: placed on hold", event="held", qid=qid)


def released(qid):
    """The operator released C{qid} from hold with relaygw-queue (as postsuper -H)."""
    qmgr.info("{qid}: released from hold", event="released", qid=qid)


class CommandCounts:
    """
    Commands per verb and how many succeeded, for the disconnect line:
    C{ehlo=1 mail=1 rcpt=1/2 ... commands=5/6} (C{ok/total} when some failed), in
    Postfix's order (its command table's, the gateway's own verbs among them), C{unknown} last.
    """

    KNOWN = ("helo", "ehlo", "xclient", "xforward", "xremoteip", "xsetcontext", "xdumpcontext", "starttls", "auth",
             "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy", "etrn", "expn", "help", "quit")
    _ORDER = {verb: n for n, verb in enumerate(KNOWN + ("unknown",))}

    def __init__(self):
        self.counts = {}
        self.current = None
        self.code = None

    def command(self, verb):
        """A command line came in (its reply decides whether it succeeded)."""
        self._settle()
        verb = verb.lower()
        self.current = verb if verb in self.KNOWN else "unknown"
        self.counts.setdefault(self.current, [0, 0])[1] += 1

    def replied(self, code):
        if self.current is not None:
            self.code = code

    def _settle(self):
        # (A 3xx reply asks for more, DATA's content or an AUTH response: the command succeeds only with its
        # final reply, never if the client leaves before it.)
        if self.current is not None and self.code is not None and self.code < 300:
            self.counts[self.current][0] += 1
        self.current, self.code = None, None

    def _ordered(self):
        return [(verb, self.counts[verb]) for verb in sorted(self.counts, key=self._ORDER.__getitem__)]

    def asDict(self):
        self._settle()
        return {verb: {"ok": ok, "total": total} for verb, (ok, total) in self._ordered()}

    def summary(self):
        self._settle()

        def one(ok, total):
            return "%d" % total if ok == total else "%d/%d" % (ok, total)

        parts = ["%s=%s" % (verb, one(*n)) for verb, n in self._ordered()]
        ok = sum(n[0] for n in self.counts.values())
        total = sum(n[1] for n in self.counts.values())
        return " ".join(parts + ["commands=%s" % one(ok, total)])
