"""
The mail transaction of the SMTP session: MAIL, RCPT and DATA (RFC 5321
section 3.3), the envelope they build, and the message content from the
DATA reader (L{relaygw.datareader}) to the message sink
(L{relaygw.sink}) and the data policy.  A mixin of
L{relaygw.protocol.SMTPSession}, which keeps the input (C{lineReader}),
C{mode}, C{writer} and the replies.
"""

import time

from relaygw import codes, maillog
from relaygw.commands import CommandError, parseMail, parseRcpt
from relaygw.datareader import DataReader, HeaderScanner
from relaygw.logs import Logger
from relaygw.modes import COMMAND, DATA
from relaygw.spoolapi import Envelope, isStorageError


log = Logger(namespace="relaygw.smtp")


class MailTransaction:
    """C{do_MAIL}, C{do_RCPT}, C{do_DATA} and the content that follows DATA."""

    @property
    def inTransaction(self):
        return self.mailfrom is not None

    #: C{{recipient: {"NOTIFY": ..., "ORCPT": ...}}} of this transaction's
    #: recipients given DSN parameters (RFC 3461); C{None} while none was.
    rcptParams = None

    def resetTransaction(self):
        self.mailfrom = None
        self.mailParams = None
        self.rcpts = []
        if self.rcptParams is not None:
            self.rcptParams = None
        if self.excessRecipients:
            self.excessRecipients = 0
        self.context.endMessage()

    #: Recipients past C{max_recipients} refused 452 4.5.3 in one
    #: transaction before each counts as an error (Postfix's
    #: C{smtpd_recipient_overshoot_limit}): a client that pipelines all its
    #: recipients is told which to send again, not cut off at C{max_errors}.
    #: Only the first of them in a transaction is logged (Postfix logs none),
    #: and those that count: one line a recipient would let a client write
    #: the log some five times faster than it sends.
    RECIPIENT_OVERSHOOT = 1000

    def do_MAIL(self, args):
        if self.inTransaction:
            return self.reply(codes.NESTED_MAIL)
        try:
            address, params = parseMail(args, self.listener.max_message_size)
        except CommandError as e:
            return self.reply(e.reply)
        declared = int(params.get("SIZE") or 0)
        if not self.factory.spool.hasRoom(declared):
            log.warn("[{session}] MAIL refused: the spool is below min_free_space, or out of inodes (SIZE={size})",
                     session=self.sessionId, size=declared)
            return self.reply(codes.NO_ROOM)
        self.context.beginMessage(address)

        def answer(refusal):
            if refusal is not None:
                self.context.endMessage()
                return self.reply(refusal)
            self.mailfrom, self.mailParams = address, params
            return self.reply(codes.SENDER_OK)

        return self._ask(self.settings.policy.mail(self.context), answer)

    def do_RCPT(self, args):
        if not self.inTransaction:
            return self.reply(codes.NEED_MAIL)
        try:
            address, params = parseRcpt(args)
        except CommandError as e:
            return self.reply(e.reply)
        if len(self.rcpts) >= self.listener.max_recipients:
            self.excessRecipients += 1
            overshoot = self.excessRecipients > self.RECIPIENT_OVERSHOOT
            return self.reply(codes.TOO_MANY_RECIPIENTS, counted=overshoot,
                              logged=overshoot or self.excessRecipients == 1)

        def answer(refusal):
            if refusal is not None:
                return self.reply(refusal)
            if address not in self.rcpts:  # (a recipient given twice gets the message once, as Postfix's cleanup does)
                self.rcpts.append(address)
                self.context.addRecipient(address)
                if params:  # (its first RCPT's DSN parameters count)
                    if self.rcptParams is None:
                        self.rcptParams = {}
                    self.rcptParams[address] = params
            return self.reply(codes.RECIPIENT_OK)

        return self._ask(self.settings.policy.rcpt(self.context, address), answer)

    def do_DATA(self, args):
        if not self.inTransaction:
            return self.reply(codes.NEED_MAIL)
        if not self.rcpts:
            return self.reply(codes.NO_VALID_RECIPIENTS)
        if args:
            return self.reply(codes.SYNTAX.format(what="DATA"))
        envelope = Envelope(mailfrom=self.mailfrom, recipients=list(self.rcpts),
                            mail_params=dict(self.mailParams or {}), arrival=time.time(),
                            context=self.context.snapshot())
        if self.rcptParams is not None:
            envelope.rcpt_params = self.rcptParams
        try:
            self.writer = self.factory.sink.begin(envelope, self.context, self.listener)
        except OSError as e:
            log.error("[{session}] cannot open spool file: {e}", session=self.sessionId, e=e)
            return self.reply(codes.NO_ROOM)
        self.context.message["queue_id"] = self.writer.queueId
        self.mode = DATA
        self.setTimeout(self.listener.data_timeout)
        self._dataDeadline = self.factory.reactor.seconds() + self.listener.data_timeout
        self.dataReader = DataReader()
        self.headers = HeaderScanner()
        self.reply(codes.START_DATA)

    def _dataInput(self):
        """Hand buffered DATA input to the reader; at its end, finish the message."""
        data = self.lineReader.take()
        body, rest = self.dataReader.feed(data)
        self._content(body)
        if rest is None:
            self._extendDeadline(len(data))
            return False
        self.lineReader.feed(rest)
        self._wait(self._endOfData())
        return True

    def _extendDeadline(self, octets):
        """
        Content keeps DATA alive only at C{min_data_rate}: each read adds
        C{octets / min_data_rate} seconds to what is left of the deadline,
        never beyond C{data_timeout} from now (Postfix's
        C{smtpd_min_data_rate}).  A client trickling its content slower runs
        out of time; one sending nothing times out after C{data_timeout} as
        before.
        """
        rate = self.listener.min_data_rate
        if not rate:
            return self.resetTimeout()
        now = self.factory.reactor.seconds()
        self._dataDeadline = min(self._dataDeadline + octets / rate, now + self.listener.data_timeout)
        self.setTimeout(max(self._dataDeadline - now, 0))

    def _content(self, chunk):
        if not chunk:
            return
        self.writer.write(chunk)
        if not self.writer.tooBig:
            self.headers.feed(chunk)

    def _endOfData(self):
        self.mode = COMMAND
        self.setTimeout(self.listener.idle_timeout)
        # What the mail log names a refusal now (Postfix's name), under the
        # message's queue id rather than NOQUEUE.
        self.lastCommand = ("END-OF-MESSAGE", "")
        writer, self.writer = self.writer, None
        if writer.tooBig:
            return self._refuseMessage(writer, codes.MESSAGE_TOO_BIG)
        if self.headers.received + 1 >= self.listener.hopcount_limit:
            # A mail loop (two relays, or a next hop that routes back here):
            # as Postfix's cleanup, the Received header this hop adds counts.
            return self._refuseMessage(writer, codes.TOO_MANY_HOPS)
        if self.dataReader.sawBareLF and self.listener.bare_lf == "reject":
            return self._refuseMessage(writer, codes.BARE_LF_DATA)
        if writer.failed is not None:
            # The disk filled (or failed), or the process ran out of
            # descriptors, while the content came in: what was written is
            # gone, and the client may try again later.
            log.error("[{session}] spool write failed: {error}", session=self.sessionId, error=writer.failed)
            return self._refuseMessage(writer, codes.NO_ROOM if isStorageError(writer.failed) else codes.LOCAL_ERROR)
        self.context.message["size"] = writer.size

        def queue(refusal):
            if refusal is not None:
                return self._refuseMessage(writer, refusal)
            started = time.monotonic()
            self.committing = True
            d = writer.commit()
            d.addCallbacks(lambda qid: queued(qid, started), failed)
            return d.addBoth(committed)

        def committed(result):
            self.committing = False
            if self._endAfterCommit is not None:
                self._ended(self._endAfterCommit)
            elif self._shutDownAfterCommit:
                self.shutDown()
            return result

        def queued(qid, started):
            seconds = time.monotonic() - started
            maillog.queued(self.sessionId, self.context, qid, self.mailfrom, self.rcpts, writer.size,
                           self.headers.messageId)
            self.context.update(connection_message_count=self.context["connection_message_count"] + 1)
            if self.junkCommands:
                self.junkCommands = 0
            self.resetTransaction()
            self.reply(codes.QUEUED.format(qid=qid))
            # The 250 first: the messages of one grouped commit are answered
            # before any of them starts on its way out.
            self.factory.messageQueued(self, writer.message, seconds)

        def failed(failure):
            error = failure.value
            storage = isStorageError(error)
            if isinstance(error, OSError):
                # The disk, the spool's directories (moved away, say), or the
                # process's descriptors or memory: one line, no traceback.
                log.error("[{session}] spool commit failed: {error}", session=self.sessionId, error=error)
            else:
                log.failure("[{session}] spool commit failed", failure, session=self.sessionId)
            self._refuseMessage(writer, codes.NO_ROOM if storage else codes.LOCAL_ERROR)

        return self._ask(self.settings.policy.data(self.context), queue)

    def _refuseMessage(self, writer, refusal):
        """The message is refused at its end: its content goes, the reply is logged under its queue id."""
        writer.abort()
        self.reply(refusal)
        self.resetTransaction()
