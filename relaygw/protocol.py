"""
The ESMTP session: a L{Protocol} with L{TimeoutMixin} and its own verb
table (C{do_VERB} for the verbs in L{SMTPSession.VERBS}, the trusted verbs
of L{relaygw.verbs}, and C{500 5.5.2} for anything else).  It owns what
C{twisted.mail.smtp.ESMTP} gets wrong: bounded line framing (the pure
L{relaygw.linereader}), DATA framed by the pure L{relaygw.datareader}, one
command at a time with input paused while a reply is pending (so
pipelined replies stay in order), every reply rendered from
L{relaygw.codes} with enhanced status codes, and the STARTTLS injection
fix.

This module holds the session core: input and command dispatch, reply
output, state reset and the simple commands.  The rest are mixins: the
connection's start up to the greeting and its end (L{relaygw.lifecycle}),
HELO/EHLO (L{relaygw.hello}), the mail transaction
(L{relaygw.transaction}), STARTTLS (L{relaygw.starttls}), AUTH
(L{relaygw.authcommand}), the trusted verbs (L{relaygw.verbsession}) and
flow control with the closing of the connection (L{relaygw.flow}).

Bare LF (protocol.md section 2): in C{reject} mode a bare LF in a command
gets 550 5.5.2 and a close, and in content the message is read to its end
and refused with 550 5.5.2; in the default C{normalize} mode it ends a
line, and in content is stored as CRLF but never helps form the end of
data.
"""

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from relaygw import codes, maillog, wire
from relaygw.authcommand import AuthCommand
from relaygw.flow import FlowControl
from relaygw.hello import Hello
from relaygw.lifecycle import Lifecycle, newSessionId
from relaygw.linereader import BARE_LF, LINE_TOO_LONG
from relaygw.logs import Logger
from relaygw.modes import AUTH, CLOSED, COMMAND, DATA
from relaygw.starttls import StartTLS
from relaygw.transaction import MailTransaction
from relaygw.verbsession import TrustedVerbs

log = Logger(namespace="relaygw.smtp")


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer, interfaces.IHalfCloseableProtocol)
class SMTPSession(Lifecycle, Hello, MailTransaction, StartTLS, TrustedVerbs, FlowControl, AuthCommand, Protocol,
                  TimeoutMixin):
    """
    One SMTP connection.  The factory (L{relaygw.listeners.SMTPFactory})
    carries the spool, the portal, the trusted verbs and the TLS settings;
    at connect the session pins the factory's current
    L{relaygw.listeners.ListenerSettings} (config, policy, trust) whole, so
    a reload applies to new sessions only.

    @ivar settings: the pinned L{relaygw.listeners.ListenerSettings}.
    @ivar listener: C{settings.listener}.
    @ivar verdict: the L{relaygw.trust.Verdict} for this connection.
    @ivar countedIP: the client address the per-IP limits count this
        session against (C{None}: not counted).
    @ivar lineReader: the L{relaygw.linereader.LineReader} holding the
        input not read yet.
    """

    #: Commands a C{require_tls} listener takes before TLS (protocol.md section 8).
    BEFORE_TLS = frozenset(("EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "HELP", "XCLIENT"))

    settings = None
    countedIP = None

    @property
    def ctx(self):
        """The old name of L{context}."""
        return self.context

    @property
    def buf(self):
        """The input not read yet (octets)."""
        return self.lineReader.unread

    #: The verbs this session implements, each a C{do_VERB} method.  Any
    #: other verb is a trusted verb of L{relaygw.verbs} or unknown.
    VERBS = frozenset("EHLO HELO MAIL RCPT DATA RSET NOOP VRFY EXPN HELP QUIT STARTTLS AUTH".split())

    #: Counters most sessions never move, so class defaults until they do:
    #: CPython shares one key table among a class's instance dicts up to 30
    #: attributes, and past that each session's dict is a table of its own
    #: (1.2 KB more for each idle connection).
    errors = 0
    junkCommands = 0
    excessRecipients = 0

    def __init__(self):
        self.mode = COMMAND
        self.waiting = None
        self.greeted = False
        self.helo = None
        self.mailfrom = None
        self.mailParams = None
        self.rcpts = []
        self.writer = None
        self.tlsActive = False
        self.avatar = None
        self.refusedSession = None
        self.writePaused = False
        self.commandCounts = maillog.CommandCounts()
        self.lastCommand = (None, None)
        self.headers = None

    # -- output --------------------------------------------------------

    def reply(self, r, lines=None, unasked=False, counted=True, logged=True):
        """
        Send reply C{r} (a L{codes.Reply}); close after it if it says so.
        C{unasked}: it answers no command (an idle timeout, a drain), so it
        is not logged as a reject of the last one, nor is a refusal not
        C{logged}.  A 4xx or 5xx counts toward C{max_errors} unless not
        C{counted}.
        """
        if self.mode == CLOSED:
            if not unasked:
                # (The client left before it: the command's outcome still counts, as a 250 after a commit.)
                self.commandCounts.replied(r.code)
            return
        wire.send(self.transport, codes.render(r.code, r.enhanced, lines if lines is not None else r.text))
        self.factory.stats("reply", r.code)
        if not unasked:
            self.commandCounts.replied(r.code)
        if r.code >= 400 and not unasked and logged:
            verb, args = self.lastCommand
            maillog.reject(self.sessionId, self.context, verb, args, r, self.mailfrom, self.helo,
                           (self.context.message or {}).get("queue_id"), self.rcpts)
        if r.close:
            self._close()
        elif r.code >= 400 and self.greeted and counted:
            self._countError()

    def _countError(self):
        self.errors += 1
        if self.errors >= self.listener.max_errors:
            self.reply(codes.TOO_MANY_ERRORS.format(host=self.hostname))

    def _junkReply(self, r):
        """
        Answer NOOP, RSET or VRFY: past C{junk_command_limit} of them since
        the session's last accepted message, each counts as an error too
        (Postfix's C{smtpd_junk_command_limit}), so a client cannot keep a
        session busy or open with them for ever.
        """
        self.reply(r)
        self.junkCommands += 1
        if r.code < 400 and self.junkCommands > self.listener.junk_command_limit:
            self._countError()

    # -- input ---------------------------------------------------------

    def dataReceived(self, data):
        if self.mode == CLOSED:
            return
        self.lineReader.feed(data)
        if self.waiting is not None or self.writePaused:
            self._updateReading()
            return
        self._process()
        if self.mode == DATA and len(data) >= wire.SERVER_BUFFER:
            self._readOn()

    def _readOn(self):
        """
        Message content that keeps coming is read on in the same reactor
        turn, up to L{READ_ON} octets more, instead of one read a turn (a
        100 KB message took seven).  Only while DATA goes on: what waits
        behind the end of data is still at most one read.
        """
        left = self.READ_ON
        while left > 0 and self.mode == DATA and self.waiting is None and not self.writePaused:
            data = wire.readOn(self.transport)
            if not data:
                return
            left -= len(data)
            self.lineReader.feed(data)
            self._process()
            if len(data) < wire.SERVER_BUFFER:  # the socket has nothing more for now
                return

    #: Octets of message content read on in one reactor turn (L{_readOn}).
    READ_ON = 128 * 1024

    def _wait(self, d):
        """
        Hold input until Deferred C{d} (a pending reply) has fired.  A
        Deferred that has already fired holds nothing.
        """
        if not isinstance(d, defer.Deferred):
            return
        if d.called and not d.paused:  # (fired: its callbacks run now)
            d.addErrback(self._internalError)
            return
        self.waiting = d
        d.addCallbacks(self._resume, self._resumeAfterError)

    def _resume(self, _):
        self.waiting = None
        if self.mode != CLOSED:
            self._updateReading()
            self._process()

    def _resumeAfterError(self, failure):
        self._internalError(failure)
        self._resume(None)

    def _internalError(self, failure):
        log.failure("[{session}] internal error", failure, session=self.sessionId)
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        # (before the greeting no command would ever be read: close, not wait for the idle timeout)
        self.reply(codes.LOCAL_ERROR if self.greeted else codes.UNAVAILABLE.format(host=self.hostname))

    def _process(self):
        """Consume buffered input until it runs dry or a reply is pending."""
        self._consume()
        if self.inputEnded:
            self._endOfInput()

    def _consume(self):
        lines = self.lineReader
        while self.waiting is None and not self.writePaused and self.mode != CLOSED and self.greeted:
            if self.mode == DATA:
                if not lines.pending or not self._dataInput():
                    return
                continue
            line = lines.next()
            if line is None:
                return
            if line is LINE_TOO_LONG:
                self._lineError(codes.AUTH_LINE_TOO_LONG if self.mode == AUTH else codes.LINE_TOO_LONG)
                continue
            if line is BARE_LF:
                self._unknownLine()
                self.reply(codes.BARE_LF_COMMAND)
                return
            self.resetTimeout()
            if self.factory.draining and not self.inTransaction and self.mode == COMMAND \
                    and line.split(b" ", 1)[0].upper() != b"QUIT":
                # (the session ends with this 421: it answers no command it ran, and is no reject of the last)
                self.reply(codes.SHUTTING_DOWN.format(host=self.hostname), unasked=True)
                return
            if self.mode == AUTH:
                self._wait(self._authStep(line))
            else:
                self._wait(self._command(line))

    def _lineError(self, r):
        """A line is refused as a line: that also ends an AUTH exchange."""
        if self.mode == AUTH:
            self.endExchange()
        else:
            self._unknownLine()
        self.reply(r)

    def _unknownLine(self):
        """A command line refused before its verb was read: logged and counted as an unknown command."""
        self.commandCounts.command("UNKNOWN")
        self.lastCommand = ("UNKNOWN", None)

    def _command(self, line):
        text = line.decode("latin-1")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        self.factory.stats("command", verb)
        self.commandCounts.command(verb)
        self.lastCommand = (verb or "UNKNOWN", args)  # (a blank line: no command, and not the connect stage)
        if self.refusedSession is not None and verb != "QUIT":
            return self.reply(codes.POLICY_REFUSED_SESSION)
        if verb not in self.BEFORE_TLS and self._needsTLS():
            return self.reply(codes.TLS_REQUIRED)
        if verb not in self.VERBS:
            return self.trustedVerb(verb, args.strip(" "))
        return getattr(self, "do_" + verb)(args.strip(" "))

    def _ask(self, result, then):
        """
        Run C{then(result)} now if the policy answered synchronously, or
        when its Deferred fires; returns a Deferred only in the second case.
        """
        if isinstance(result, defer.Deferred):
            return result.addCallback(then)
        return then(result)

    # -- state ---------------------------------------------------------

    def resetSession(self, keepHelo=False, keepAuth=False):
        """Forget the transaction, and HELO/EHLO and AUTH unless kept."""
        self.resetTransaction()
        if not keepHelo:
            self.helo = None
            self.context.update(ehlo_domain=None, ehlo_string=None, helo_name=None, protocol="SMTP")
        if not keepAuth:
            self.avatar = None
            self.context.update(auth_user=None, auth_name=None, auth_status=None)
            if self.listener.always_allow and self.settings.portal is not None:
                self._wait(self._loginAnonymous())

    def newSession(self):
        """A new session id for a new identity (the caller logs it against the old one); returns it."""
        self.sessionId = newSessionId()
        self.context.update(session_id=self.sessionId)
        return self.sessionId

    # -- simple commands -----------------------------------------------

    def do_RSET(self, args):
        if args:
            return self.reply(codes.SYNTAX.format(what="RSET"))
        self.resetTransaction()
        return self._junkReply(codes.OK)

    def do_NOOP(self, args):
        return self._junkReply(codes.OK)

    def do_VRFY(self, args):
        if not args:
            return self.reply(codes.SYNTAX.format(what="VRFY address"))
        return self._junkReply(codes.VRFY_CANNOT if self.listener.vrfy else codes.VRFY_DISABLED)

    def do_EXPN(self, args):
        return self.reply(codes.NOT_IMPLEMENTED)

    def do_HELP(self, args):
        return self.reply(codes.HELP)

    def do_QUIT(self, args):
        return self.reply(codes.BYE.format(host=self.hostname))
