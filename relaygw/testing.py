"""
Public test helpers: start a real gateway on a loopback port inside the
test's reactor, and talk to it over a real socket from a thread; or run
one session on a StringTransport with a task.Clock (L{SessionHarness}),
where STARTTLS is a real TLS handshake in memory and a PROXY listener's
connections start with a header through its wrapper.
"""

import dataclasses
import os
import socket
import ssl
import subprocess
import time

from twisted.internet import defer, protocol, threads
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver

from relaygw import config as _config
from relaygw.service import GatewayService
from relaygw.workers import twistdArgv


def tomlValue(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[%s]" % ", ".join(tomlValue(x) for x in v)
    return '"%s"' % str(v).replace("\\", "\\\\").replace('"', '\\"')


def configText(directory, listeners=({},), relay=None, spool=None, admin=None, log=None, routes=(), process=None):
    """TOML for a test gateway rooted in C{directory} (loopback, port 0)."""
    out = ['[spool]']
    for k, v in dict({"directory": os.path.join(directory, "spool")}, **(spool or {})).items():
        out.append("%s = %s" % (k, tomlValue(v)))
    out += ["", "[relay]"]
    for k, v in dict({"maildir": os.path.join(directory, "outbox")}, **(relay or {})).items():
        out.append("%s = %s" % (k, tomlValue(v)))
    for name, table in (("admin", admin), ("log", log), ("process", process)):
        if table:
            out += ["", "[%s]" % name] + ["%s = %s" % (k, tomlValue(v)) for k, v in table.items()]
    for route in routes:
        out += ["", "[[route]]"] + ["%s = %s" % (k, tomlValue(v)) for k, v in route.items()]
    for i, overrides in enumerate(listeners):
        # No drain delay unless a test asks for one: stopping a test gateway
        # with an admin endpoint would otherwise take DRAIN_DELAY seconds.
        table = {"name": "l%d" % i, "endpoint": "tcp:0:interface=127.0.0.1", "hostname": "relay.test",
                 "drain_delay": 0}
        table.update(overrides)
        out += ["", "[[listener]]"] + ["%s = %s" % (k, tomlValue(v)) for k, v in table.items()]
    return "\n".join(out) + "\n"


class Gateway:
    """A gateway running in the test's reactor on loopback ports."""

    def __init__(self, directory, reactor=None, **kw):
        if reactor is None:
            from twisted.internet import reactor
        self.directory = directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "relaygw.toml")
        with open(self.path, "w") as f:
            f.write(configText(directory, **kw))
        self.config = _config.load(self.path)
        self.service = GatewayService(self.config, reactor)
        self.ports = []

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        for svc in self.service:
            waiting = getattr(svc, "_waitingForPort", None)
            if waiting is not None:
                got = defer.Deferred()

                def record(port, got=got):
                    got.callback(port)
                    return port

                waiting.addCallback(record)
                port = yield got
                if svc.name == "admin":
                    self.adminPort = port.getHost().port
                else:
                    self.ports.append(port.getHost().port)
        return self

    @property
    def port(self):
        return self.ports[0]

    def stop(self):
        return defer.maybeDeferred(self.service.stopService)

    @property
    def outbox(self):
        return os.path.join(self.directory, "outbox", "new")

    def delivered(self):
        """The contents of the messages delivered to the Maildir, oldest first."""
        names = sorted(os.listdir(self.outbox), key=lambda n: os.stat(os.path.join(self.outbox, n)).st_mtime_ns)
        out = []
        for n in names:
            with open(os.path.join(self.outbox, n), "rb") as f:
                out.append(f.read())
        return out


class Client:
    """A raw blocking SMTP client for use in a thread (C{inThread})."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; pending %r" % (self.buf,))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("latin-1")

    def reply(self):
        """One (possibly multi-line) reply as C{(code, [lines])}, text after the code."""
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def transaction(self, rcpts, content=None, helo="x", mailfrom="a@example.org"):
        """
        The greeting, EHLO, MAIL, each RCPT and, given C{content} (without
        the final dot), DATA and the content: every reply as C{(code, lines)}.
        """
        replies = [self.reply(), self.cmd("EHLO " + helo), self.cmd("MAIL FROM:<%s>" % mailfrom)]
        replies += [self.cmd("RCPT TO:<%s>" % r) for r in rcpts]
        if content is not None:
            replies.append(self.cmd("DATA"))
            if replies[-1][0] == 354:
                self.send(content + ".\r\n")
                replies.append(self.reply())
        return replies

    def closed(self, wait=5):
        """Whether the server closed the connection (reads and drops any data)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def inThread(f, *args, **kw):
    """Run blocking client code in a thread so the reactor keeps serving."""
    return threads.deferToThread(f, *args, **kw)


def runTwistd(configPath, cwd, extra=()):
    """Start C{twistd -n relaygw} as a child process; returns the Popen."""
    return subprocess.Popen(
        twistdArgv(configPath) + list(extra),
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def receivedHeader(message):
    """The first Received header of C{message} (bytes), folding kept."""
    start = message.index(b"Received: ")
    end = start
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end:end + 1] not in (b"\t", b" "):
            return message[start:end]


def waitForPort(port, host="127.0.0.1", timeout=15.0):
    """Block until something listens on C{port}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("nothing listens on %s:%d" % (host, port))


def freePort():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
        LineReceiver.dataReceived(self, data)

    def reply(self, text):
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
            if f.drop == "body" and f.dropsLeft:
                f.dropsLeft -= 1
                self.dropped = True
                self.transport.abortConnection()
                return
            if line == b"." and f.drop == "end":
                self.dropped = True
                self.transport.loseConnection()  # lost before the end-of-data reply
                return
            if line == b".":
                self.inData = False
                data = b"".join(l + b"\r\n" for l in self.bodyLines)
                f.messages.append(data)
                f.transactions.append({"mailfrom": self.mailfrom, "rcpts": list(self.accepted), "data": data,
                                       "tls": self.tls})
                self.completed += 1
                self.accepted = []
                self.reply(f.endOfData)
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
        elif verb == "STARTTLS" and f.tls is not None:
            self.reply("220 2.0.0 Ready to start TLS")
            self.transport.startTLS(f.tls)
            self.tls = True
        elif verb == "MAIL" and f.drop == "reused" and self.completed:
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
        closes a connection that already carried a message at its next MAIL.
    """

    protocol = ScriptedSMTPServer

    def __init__(self, extensions=(), rcpt=None, replies=None, tls=None, drops=1, **kw):
        self.extensions = list(extensions)
        self.rcpt = rcpt or {}
        self.replies = replies or {}
        self.tls = tls
        self.greeting = kw.pop("greeting", b"220 scripted.example.test ESMTP")
        self.ehloReply = kw.pop("ehloReply", None)
        self.endOfData = kw.pop("endOfData", "250 2.0.0 Ok: queued as 4ABC")
        self.authReply = kw.pop("authReply", "235 2.7.0 Authentication successful")
        self.drop = kw.pop("drop", None)
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


POSTFIX_MASTER_CF = """\
127.0.0.1:%(port)d inet n - n - - smtpd
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
smtp      unix  -  -  n  -     -  smtp
relay     unix  -  -  n  -     -  smtp
showq     unix  n  -  n  -     -  showq
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
anvil     unix  -  -  n  -     1  anvil
scache    unix  -  -  n  -     1  scache
postlog   unix-dgram n - n -   1  postlogd
"""


class PostfixInstance:
    """
    A throwaway Postfix (Debian's package) with its own config, queue and
    data directories under C{directory}, listening on 127.0.0.1:C{port} and
    relaying everything to C{relayhost}.  Started with C{postfix -c DIR start}.
    """

    def __init__(self, directory, port, relayhost, extra=None):
        self.directory = os.path.abspath(directory)
        self.port = port
        self.conf = os.path.join(self.directory, "conf")
        self.maillog = os.path.join(self.directory, "maillog")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(self.directory, "queue"),
            "data_directory": os.path.join(self.directory, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            # 192.0.2.0/24: the documentation clients that tests forward with XCLIENT.
            "mynetworks": "127.0.0.0/8 192.0.2.0/24",
            "relay_domains": "",
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtp_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.directory,
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
            "smtpd_banner": "$myhostname ESMTP",
        }
        settings.update(extra or {})
        self.settings = settings

    def start(self):
        import grp
        import pwd

        for d in (self.conf, self.settings["data_directory"], self.settings["queue_directory"]):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.directory, 0o755)
        os.chown(self.settings["data_directory"], pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write("".join("%s = %s\n" % kv for kv in self.settings.items()))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF % {"port": self.port})
        subprocess.run(["/usr/sbin/postfix", "-c", self.conf, "start"], check=True, capture_output=True, timeout=60)
        waitForPort(self.port)

    def stop(self):
        subprocess.run(["/usr/sbin/postfix", "-c", self.conf, "stop"], capture_output=True, timeout=60)
        pidfile = os.path.join(self.settings["queue_directory"], "pid", "master.pid")
        deadline = time.monotonic() + 10
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log(self):
        try:
            with open(self.maillog) as f:
                return f.read()
        except FileNotFoundError:
            return ""


class SessionHarness:
    """
    SMTP sessions without sockets: each on a L{StringTransport}, with a
    L{task.Clock} for its timers, built by a listener whose config is given
    as a dict (the keys of a C{[[listener]]} table).  The spool is real (a
    temporary directory); its disk thread reports through the real reactor,
    so a test that sends a message waits for its Deferred.

    @param policy: an L{relaygw.policy.IPolicy} instead of the listener's.
    @param sink: an L{relaygw.sink.IMessageSink} instead of the spool
        (L{MemorySink} keeps messages in memory and commits at once).
    @param portal: a cred portal instead of the listener's.

    A listener with C{proxy_protocol} also gets the PROXY wrapper the
    gateway puts in front of it (its header timer on the harness clock):
    L{connect} with C{proxy=} sends a header through it.
    """

    def __init__(self, directory, listener=None, clock=None, policy=None, sink=None, portal=None, **kw):
        from twisted.internet import reactor, task

        self.clock = clock or task.Clock()
        self.directory = directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "relaygw.toml")
        with open(self.path, "w") as f:
            f.write(configText(directory, listeners=(dict(listener or {}),), **kw))
        self.config = _config.load(self.path)
        self.service = GatewayService(self.config, reactor)
        self.service.spool.open()
        self.factory = self.service.factories[0]
        self.factory.reactor = self.clock
        if policy is not None:
            self.factory.settings = dataclasses.replace(self.factory.settings, policy=policy)
        if portal is not None:
            self.factory.portal = portal
        if sink is not None:
            self.factory.sink = sink
        from relaygw.auth import FailureTracker

        self.factory.authFailures = FailureTracker(clock=self.clock)
        # Queued messages are recorded, not delivered.
        self.queued = []
        self.factory.onQueued = lambda queueId, message: self.queued.append(queueId)
        self.proxyFactory = None
        listenerConfig = self.factory.listener
        if listenerConfig.proxy_protocol:
            from relaygw.proxy import ProxyProtocolFactory

            # Built as GatewayService builds it for the listener.
            self.proxyFactory = ProxyProtocolFactory(self.factory, self.factory.settings.trust.balancer,
                                                     listenerConfig.proxy_timeout, self.clock)

    def connect(self, peer="127.0.0.1", port=40000, local=("127.0.0.1", 25), proxy=None):
        """
        A new session from C{peer}:C{port}; returns its L{SessionClient}.

        @param proxy: for a C{proxy_protocol} listener, the octets a balancer
            at C{peer} sends first (a PROXY header, or anything else): they go
            through the listener's PROXY wrapper, which starts the session
            only once it has read a valid header.
        """
        from twisted.internet.address import IPv4Address, IPv6Address

        def address(host, p):
            return (IPv6Address if ":" in host else IPv4Address)("TCP", host, p)

        peerAddress = address(peer, port)
        transport = HarnessTransport(peerAddress=peerAddress, hostAddress=address(*local))
        transport.clock = self.clock
        if proxy is None:
            session = self.factory.buildProtocol(peerAddress)
            outermost = session
        else:
            if self.proxyFactory is None:
                raise ValueError("the listener does not take PROXY headers")
            outermost = self.proxyFactory.buildProtocol(peerAddress)
            session = outermost.wrappedProtocol
        session.callLater = self.clock.callLater
        transport.protocol = outermost
        outermost.makeConnection(transport)
        client = SessionClient(session, transport)
        if proxy is not None:
            client.send(proxy)
        return client

    def spooled(self, queueId):
        """
        A message the sessions queued (see C{queued}), read back through the
        spool's public API: C{(message, content)}, the
        L{relaygw.spoolapi.ISpooledMessage} (its C{envelope} as stored) and
        the content as it goes onward (the Received header first).
        """
        message = self.service.spool.load(queueId)
        with message.openBody() as f:
            return message, f.read()


class HarnessTransport(StringTransport):
    """
    A L{StringTransport} that records STARTTLS and aborts.

    C{protocol} is the protocol the octets from the client go to (the
    session, or a wrapper around it).  C{startTLS} only records the context
    factory; L{insertTLS} (which L{SessionClient.starttls} calls when the
    client begins its handshake) then puts Twisted's TLS layer below
    C{protocol}, as Twisted's TCP transport does in its C{startTLS}: the
    session's writes are encrypted and its handshake notification is the
    real one.  That layer gathers small writes until the next turn of
    C{clock} (the harness's), as it does until the reactor's next turn.
    Unlike over a socket, the layer goes in when the client starts its
    handshake, not at C{startTLS}: anything the session wrote in between
    would be read in clear.
    """

    tlsStarted = None
    aborted = False
    protocol = None
    #: The clock of the TLS layer's next turn (it gathers small writes until then).
    clock = None
    #: The server's L{twisted.protocols.tls.TLSMemoryBIOProtocol} once inserted.
    tls = None

    def startTLS(self, contextFactory):
        self.tlsStarted = contextFactory

    def insertTLS(self):
        """Put a server TLS layer with the recorded context factory below C{protocol}."""
        from zope.interface import directlyProvides

        from twisted.internet.interfaces import ISSLTransport
        from twisted.protocols.tls import TLSMemoryBIOFactory

        if self.tlsStarted is None:
            raise AssertionError("the session did not start TLS")
        tlsFactory = TLSMemoryBIOFactory(self.tlsStarted, False, None, clock=self.clock)
        tls = tlsFactory.protocol(tlsFactory, self.protocol, False)
        self.protocol = self.tls = tls
        self.getHandle = tls.getHandle
        self.getPeerCertificate = tls.getPeerCertificate
        directlyProvides(self, ISSLTransport)
        tls.makeConnection(_Wire(self))
        return tls

    def write(self, data):
        if self.tls is not None:
            self.tls.write(data)
        else:
            StringTransport.write(self, data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        if self.tls is not None and not self.tls.disconnecting:
            self.tls.loseConnection()
        else:
            StringTransport.loseConnection(self)

    def abortConnection(self):
        if self.tls is not None and not self.tls.disconnecting:
            self.tls.abortConnection()
        else:
            self.aborted = True
            StringTransport.loseConnection(self)


class _Wire:
    """What the TLS layer writes to: the records go straight into the L{HarnessTransport}."""

    def __init__(self, transport):
        self.transport = transport

    def write(self, data):
        StringTransport.write(self.transport, data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        StringTransport.loseConnection(self.transport)

    def abortConnection(self):
        self.transport.aborted = True
        StringTransport.loseConnection(self.transport)

    def __getattr__(self, name):
        return getattr(self.transport, name)


class SessionClient:
    """
    The client side of one harness session: send lines, read replies; after
    L{starttls}, through a real TLS session in memory.
    """

    #: The client's C{ssl.SSLObject} once L{starttls} completed its handshake.
    tls = None

    def __init__(self, session, transport):
        self.session = session
        self.transport = transport
        self._pending = b""
        self._partial = []
        self._replies = []
        self._lost = False

    def _deliver(self, data):
        """Octets from the client's side of the wire to the outermost protocol."""
        protocol = self.transport.protocol or self.session
        protocol.dataReceived(data)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        if self.tls is not None:
            self.tls.write(data)
            data = self._outgoing.read()
        self._deliver(data)

    def _wire(self):
        """What the server wrote since the last call, as octets on the wire."""
        out = self.transport.value()
        self.transport.clear()
        return out

    def take(self):
        """Everything written since the last call, as bytes (decrypted after L{starttls})."""
        if self.tls is not None:
            # Twisted's TLS layer writes what it gathered at the next turn.
            self.transport.clock.advance(0)
        wire = self._wire()
        if self.tls is not None:
            self._incoming.write(wire)
            wire = b""
            while True:
                try:
                    chunk = self.tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if not chunk:
                    break
                wire += chunk
        out = self._pending + wire
        self._pending = b""
        return out

    def starttls(self, context=None, hostname="relay.test"):
        """
        The client's side of STARTTLS once the server said 220: a real TLS
        handshake in memory, L{ssl.SSLObject} (with C{context}; by default
        one that checks no certificate) against Twisted's TLS layer, which
        L{HarnessTransport.insertTLS} puts below the session.  Replies not
        read yet stay readable.  Returns the client's C{SSLObject}.
        """
        self._parse()  # whatever came before is plaintext
        self.transport.insertTLS()
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        for _ in range(20):  # a handshake is a few round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if not self._exchange():
                raise AssertionError("the TLS handshake stalled")
        else:
            raise AssertionError("the TLS handshake did not finish")
        self._exchange()  # the client's last flight (TLS 1.3 Finished) reaches the server
        self.tls = tls
        return tls

    def _exchange(self):
        """Move handshake records both ways once; whether any moved."""
        out = self._outgoing.read()
        if out:
            self._deliver(out)
        wire = self._wire()
        if wire:
            self._incoming.write(wire)
        return bool(out or wire)

    def _parse(self):
        data = self.take()
        lines = self._partial
        while b"\r\n" in data:
            line, data = data.split(b"\r\n", 1)
            line = line.decode("latin-1")
            lines.append(line[4:])
            if line[3:4] != "-":
                self._replies.append((int(line[:3]), lines))
                lines = []
        self._partial = lines
        self._pending = data

    def replies(self):
        """Every complete reply not read yet, as C{(code, [texts])}."""
        self._parse()
        out, self._replies = self._replies, []
        return out

    def reply(self):
        """The next reply not read yet (it must have been sent)."""
        self._parse()
        if not self._replies:
            raise AssertionError("no reply was sent")
        return self._replies.pop(0)

    def cmd(self, line):
        """Send C{line} and return the next reply (it must have come at once)."""
        self.send(line + "\r\n")
        return self.reply()

    def whenReply(self, timeout=10.0):
        """
        A Deferred firing with the next reply once it is sent: for replies
        that wait on something outside the session (the spool's disk
        thread at the end of DATA, password hashing for AUTH).  It fails
        with an AssertionError after C{timeout} seconds without one.
        """
        from twisted.internet import reactor, task

        @defer.inlineCallbacks
        def wait():
            deadline = time.monotonic() + timeout
            while True:
                self._parse()
                if self._replies:
                    return self._replies.pop(0)
                if time.monotonic() > deadline:
                    raise AssertionError("no reply within %s s" % (timeout,))
                yield task.deferLater(reactor, 0.005, lambda: None)

        return wait()

    def line(self):
        """
        The next raw line sent (without CRLF), like L{Client.line}: for
        tests of the reply format itself.  Replies read with L{reply} must
        have been read whole before.
        """
        if self._replies or self._partial:
            raise AssertionError("a reply was already parsed; read it with reply()")
        data = self.take()
        if b"\r\n" not in data:
            self._pending = data
            raise AssertionError("no line was sent")
        line, self._pending = data.split(b"\r\n", 1)
        return line.decode("latin-1")

    def closed(self, wait=None):
        """
        Whether the session has ended (its closing reply sent), like
        L{Client.closed}; without a session (a PROXY wrapper refused the
        connection), whether the connection was closed.
        """
        if self.session.transport is None:
            return self.transport.disconnecting
        return self.session.mode == "closed"

    @property
    def buf(self):
        """Octets sent but not yet read as replies (as L{Client.buf})."""
        self._parse()
        return self._pending

    def lose(self):
        """The client goes away."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if not self._lost:
            self._lost = True
            (self.transport.protocol or self.session).connectionLost(Failure(ConnectionDone()))


class MemorySink:
    """
    An L{relaygw.sink.IMessageSink} that keeps messages in memory and
    commits at once (synchronously), for session tests that need no spool.

    @ivar messages: C{[(envelope, content)]} of committed messages.
    """

    def __init__(self, limit=None):
        self.messages = []
        self.limit = limit
        self._next = 0

    def begin(self, envelope, context, listener):
        self._next += 1
        return _MemoryMessage(self, envelope, "M%05d" % self._next,
                              listener.max_message_size if self.limit is None else self.limit)


class _MemoryMessage:
    failed = None
    message = None

    def __init__(self, sink, envelope, queueId, limit):
        self.sink = sink
        self.envelope = envelope
        self.queueId = queueId
        self.limit = limit
        self.chunks = []
        self.size = 0
        self.tooBig = False

    def write(self, chunk):
        if self.tooBig:
            return
        if self.limit and self.size + len(chunk) > self.limit:
            self.tooBig = True
            return
        self.chunks.append(chunk)
        self.size += len(chunk)

    def commit(self):
        from relaygw.spoolapi import Envelope

        self.envelope.queue_id = self.queueId
        self.envelope.size = self.size
        self.message = _Stored(self.queueId, self.envelope)
        self.sink.messages.append((self.envelope, b"".join(self.chunks)))
        assert isinstance(self.envelope, Envelope)
        return defer.succeed(self.queueId)

    def abort(self):
        self.chunks = []


class _Stored:
    """The committed message as the queue manager would get it: its queue id, size and (a copy of) its envelope."""

    def __init__(self, queueId, envelope):
        self.queueId = queueId
        self.envelope = type(envelope)(**envelope.asDict())
        self.size = envelope.size
