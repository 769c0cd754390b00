"""
One mail transaction with a next hop: MAIL (with its parameters), RCPT,
DATA and the body, pipelined when the next hop offers PIPELINING, and the
next message's envelope sent right behind the end of data.
"""

import dataclasses
import re

from relaygw.relay.clientwire import RecipientResult, _MessageFailure, _outcome, _SessionFailure, _temporary
from relaygw.relay.downgrade import sevenBit
from relaygw.relay.nexthop import NOT_SENT, STOPPED


_SIZE_LIMIT = re.compile(r"[0-9]{1,20}\Z")


def _rcptCommands(message, dsn):
    """
    The RCPT commands of C{message}; to a next hop that offers DSN
    (C{dsn}), with each recipient's NOTIFY and ORCPT (RFC 3461), as given.
    """
    if not (dsn and message.rcptParams):
        return ["RCPT TO:<%s>" % (recipient,) for recipient in message.recipients]
    commands = []
    for recipient in message.recipients:
        params = message.rcptParams.get(recipient, {})
        words = ["%s=%s" % (key, params[key]) for key in ("NOTIFY", "ORCPT") if key in params]
        commands.append(" ".join(["RCPT TO:<%s>" % (recipient,)] + words))
    return commands


class Transaction:
    """The part of a L{relaygw.relay.client.Connection} that carries one message."""

    #: The reply to an end of data is waited for this many command timeouts:
    #: RFC 5321 (4.5.3.2.6) asks for 10 minutes there against 5 for a command,
    #: as Postfix's smtp_data_done_timeout (600 s) and smtp_rcpt_timeout (300
    #: s).  The next hop is delivering the message: cut off, it has it twice.
    END_OF_DATA_TIMEOUTS = 2

    #: Transactions the connection has completed (their end of data answered).
    transactions = 0

    def _doneCarrying(self, code):
        """
        Whether reply C{code} to a MAIL says the next hop will carry no more
        on this connection (a 421 after a completed transaction: its limit
        of messages per connection, say), which is not the message's doing.
        """
        return code == 421 and self.transactions > 0

    def _mailCommand(self, message, size):
        addresses = [message.mailfrom] + list(message.recipients)
        # Only a line break or a NUL could not go on: a quoted local part may hold
        # "<" and ">" (RFC 5321 section 4.1.2), and the session accepts them.
        if any(c in address for address in addresses for c in "\r\n\0"):
            raise _MessageFailure(RecipientResult(553, "5.1.3", "invalid character in envelope address"))
        parameters = []
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            # ASCII digits only, and few enough for int(): "SIZE ²" or a limit
            # of thousands of digits is no limit (RFC 1870's is 20 digits).
            if _SIZE_LIMIT.match(limit) and int(limit) > 0 and size > int(limit):
                raise _MessageFailure(
                    RecipientResult(
                        552, "5.3.4", "message size %d exceeds the limit %s of %s" % (size, limit, self.where)
                    )
                )
            parameters.append("SIZE=%d" % (size,))
        if "8BITMIME" in self.extensions:
            parameters.append("BODY=8BITMIME")
        if not all(address.isascii() for address in addresses):
            if "SMTPUTF8" not in self.extensions:
                raise _MessageFailure(
                    RecipientResult(553, "5.6.7", "%s does not support SMTPUTF8 addresses" % (self.where,))
                )
            parameters.append("SMTPUTF8")
        if "DSN" in self.extensions and message.mailParams:
            parameters.extend("%s=%s" % (key, message.mailParams[key]) for key in ("RET", "ENVID")
                              if key in message.mailParams)
        return " ".join(["MAIL FROM:<%s>" % (message.mailfrom,)] + parameters)

    def _envelopeAhead(self, index):
        """
        The envelope of message C{index} (MAIL, RCPT, DATA) as lines to send
        right behind the previous message's end of data, which RFC 2920
        allows, so the next hop answers both in one go; C{()} when that
        message must wait for the reply (no PIPELINING, an identity to
        forward first, a message that cannot go out).
        """
        if index >= len(self.messages) or "PIPELINING" not in self.extensions or self.wrappedUp \
                or index in self.takenBack:
            return ()
        message = self.messages[index]
        if not self._identityForwarded(message):
            return ()
        try:
            body, size = self._openBody(message, report=False)
        except _MessageFailure:
            return ()  # its own transaction reports it
        try:
            mail = self._mailCommand(message, size)
        except _MessageFailure:
            body.close()
            return ()
        self.ahead = (body, size)
        return (mail, *_rcptCommands(message, "DSN" in self.extensions), "DATA")

    def _refusedAtRcpt(self, index, message, replies, later=()):
        """
        Each recipient refused at RCPT (C{replies}: MAIL's, then the RCPTs'
        read so far) has that refusal as its outcome, whatever happens to
        the session after it (as Postfix's); not after a refused MAIL,
        whose RCPT replies answer no transaction, nor a 421, nor for those
        of C{later}, kept for another transaction (L{_overLimit}).
        """
        if not replies or not replies[0].positive:
            return
        for recipient, reply in zip(message.recipients, replies[1:]):
            if reply is not None and not reply.positive and not reply.closing and recipient not in later:
                self._settle(index, [recipient], _outcome(reply, "RCPT"))

    @staticmethod
    def _overLimit(message, rcptReplies):
        """
        The recipients the next hop had no room for in this transaction
        (452: too many recipients) although it took others: they go in a
        new transaction once this one has ended, in chunks as RFC 5321
        section 4.5.3.1.10 has a client send them, rather than waiting for
        a retry (Postfix 3.7 defers them, with its usual back-off).  Each
        such transaction takes at least one recipient, so they end; a next
        hop that takes none has deferred them all, the usual way.
        """
        if not any(reply is not None and reply.positive for reply in rcptReplies):
            return []
        return [recipient for recipient, reply in zip(message.recipients, rcptReplies)
                if reply is not None and reply.code == 452]

    async def _send(self, index, message, body, size, sent=False):
        """
        One message: its transaction, then one after the other (a loop, not
        nested: there may be as many as recipients) a transaction for the
        recipients each left over (L{_overLimit}, L{_sendRest}).
        """
        left = await self._oneTransaction(index, message, body, size, sent)
        while left is not None:
            left = await self._sendRest(index, *left)

    async def _oneTransaction(self, index, message, body, size, sent=False, rest=False):
        """
        One transaction.  C{sent}: its envelope already went out behind the
        previous message (L{_envelopeAhead}).  C{rest}: it carries the
        recipients another transaction of the message left over.  Returns
        what L{_sendRest} needs for the recipients this one left over, or
        C{None}.
        """
        proto = self.proto
        if not sent:
            if self.needReset:
                self.stage = "RSET"
                reply = await proto.command("RSET")
                if not reply.positive:
                    raise _SessionFailure(self._refused(reply, "RSET"))
                self.needReset = False
            await self._forwardIdentity(message)
            mail = self._mailCommand(message, size)
        # (after XCLIENT's new EHLO, whose extensions are the session's from then on)
        rcpts = _rcptCommands(message, "DSN" in self.extensions)
        if "8BITMIME" not in self.extensions:  # (8-bit content converted to 7 bits)
            body = await sevenBit(body, size)
        self.stage = "MAIL"
        dataReply = None
        if sent or "PIPELINING" in self.extensions:
            if not sent:
                proto.send(mail, *rcpts, "DATA")
            try:
                replies = await proto.replies(len(rcpts) + 2)
            except Exception:
                read = len(proto.partial)  # (the breakdown is told as that of the first unanswered command)
                self.stage = "MAIL" if not read else "RCPT" if read <= len(rcpts) else "DATA"
                self._refusedAtRcpt(index, message, proto.partial)
                raise
            replies += [None] * (len(rcpts) + 2 - len(replies))  # (none after a 421: judged below)
            mailReply, rcptReplies, dataReply = replies[0], replies[1:-1], replies[-1]
        else:
            mailReply = await proto.command(mail)
            rcptReplies = []
            if mailReply.positive:
                self.stage = "RCPT"
                try:
                    for rcpt in rcpts:
                        rcptReplies.append(await proto.command(rcpt))
                        self._closing(rcptReplies[-1])
                except Exception:
                    self._refusedAtRcpt(index, message, [mailReply, *rcptReplies])
                    raise

        if self._doneCarrying(mailReply.code) and not rest:
            # (not when the message went to some of its recipients already: whole, it would go to them again)
            raise _SessionFailure(NOT_SENT)
        later = self._overLimit(message, rcptReplies) if mailReply.positive else []
        self._refusedAtRcpt(index, message, [mailReply, *rcptReplies], frozenset(later))
        self._closing(mailReply, *rcptReplies, dataReply)
        if mailReply.code == 503:
            # "Nested MAIL command": the next hop still holds a transaction (one it refused at its end of
            # data, pipelined behind), which says nothing of this message: it waits for another attempt.
            result = _temporary("%s refused MAIL: %s" % (self.where, mailReply), "4.5.0")
            if dataReply is not None and dataReply.code == 354:
                # Ending that DATA would complete the other transaction, with these recipients: cut it off.
                proto.abort()
                raise _SessionFailure(result)
            self.needReset = True
            self._settle(index, message.recipients, result)
            return
        if not mailReply.positive:
            self._settle(index, message.recipients, _outcome(mailReply, "MAIL"))
            if dataReply is not None and dataReply.code == 354:
                await self._abandonData()
            return

        accepted = [recipient for recipient, reply in zip(message.recipients, rcptReplies) if reply.positive]
        if not accepted:
            # MAIL opened a transaction that will not complete.
            self.needReset = True
            if dataReply is not None and dataReply.code == 354:
                await self._abandonData()
            return

        if dataReply is None:
            self.stage = "DATA"
            dataReply = await proto.command("DATA")
            self._closing(dataReply)
        if dataReply.code != 354:
            self.needReset = True
            result = _outcome(dataReply, "DATA")
            if result.ok:
                result = _temporary("unexpected reply to DATA: %s" % (dataReply,), "4.5.0")
            self._settle(index, accepted, result)
            return (message, later, rcptReplies, False) if later else None

        self.stage = "message body"
        # (the next message's envelope waits behind the new transaction for the recipients left over)
        await proto.sendBody(body, () if later else self._envelopeAhead(index + 1))
        self.stage = "end of data"
        final = await proto.reply(self.options.timeout * self.END_OF_DATA_TIMEOUTS)
        self._closing(final)
        self.transactions += 1
        result = _outcome(final, "end of data")
        if not result.ok:
            # Postfix refusing a message from its smtpd_end_of_data_restrictions
            # keeps the transaction open: the next MAIL would get "503 nested MAIL".
            self.needReset = True
        if result.ok and message.rcptParams and "DSN" not in self.extensions:
            # Postfix's "relayed": no one further on will tell a sender who asked that it arrived.
            result = result.withAction("relayed")
        self._settle(index, accepted, result)
        return (message, later, rcptReplies, result.ok) if later else None

    async def _sendRest(self, index, message, later, rcptReplies, delivered):
        """
        The recipients of C{message} left over by its transaction (L{_overLimit}):
        in a new one on the same connection once that one delivered (unless
        the gateway is stopping: they stay as they were), else deferred with
        the reply each got.  Returns what the new transaction left over in turn.
        """
        if not delivered:
            left = frozenset(later)
            for recipient, reply in zip(message.recipients, rcptReplies):
                if recipient in left:
                    self._settle(index, [recipient], _outcome(reply, "RCPT"))
            return None
        if self.wrappedUp:  # (the gateway is stopping: no transaction starts after the one under way)
            self._settle(index, later, STOPPED)
            return None
        self._settledSome(index)
        remaining = dataclasses.replace(message, recipients=later)
        body, size = self._openBody(remaining)
        try:
            return await self._oneTransaction(index, remaining, body, size, rest=True)
        finally:
            try:
                body.close()
            except OSError:
                pass

    async def _abandonData(self):
        """The next hop said 354 with no valid recipient: end an empty DATA."""
        self.stage = "end of data"
        self.proto.send(".")
        self._closing(await self.proto.reply())
        self.needReset = True
