"""
Real peers sending XCLIENT to the gateway (checklist 73, 74): swaks with
--xclient-*, and the nginx mail proxy with `xclient on`, whose auth_http
endpoint is served by the test itself.  Both come from Debian packages that
`make test` installs (scripts/install-peers); a missing binary fails the
test, it is never skipped.
"""

import base64
import os
import re
import smtplib
import socket
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import resource, server

from relaygw.testing import freePort, inThread, receivedHeader
from tests.recorders import recordEnvelopes
from tests.sessions import GatewayTestCase

SWAKS = "/usr/bin/swaks"
NGINX = "/usr/sbin/nginx"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
TIMEOUT = "/usr/bin/timeout"


def need(path):
    """The path of a peer binary; fails the test clearly when it is missing."""
    if not os.path.exists(path):
        raise AssertionError("%s is not installed: run `make test` (scripts/install-peers installs the "
                             "interop peers from Debian packages)" % (path,))
    return path


class InteropTestCase(GatewayTestCase):
    # Trust grants XCLIENT only; relaying is judged on the claimed address.
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"],
                "relay_networks": ["127.0.0.1/32", "192.0.2.0/24"]}
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        yield GatewayTestCase.setUp(self)
        self.envelopes = recordEnvelopes(self.gw)

    @defer.inlineCallbacks
    def delivered(self, timeout=15):
        """The one delivered message, waiting for the Maildir (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            yield self.gw.service.queue.whenIdle()
            msgs = self.gw.delivered()
            if msgs or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(msgs), 1, "expected exactly one delivered message")
        self.assertEqual(len(self.envelopes), 1)
        return msgs[0]


# -- swaks (checklist 74) -------------------------------------------------------


class SwaksTests(InteropTestCase):
    @defer.inlineCallbacks
    def swaks(self, *extra):
        swaks = need(SWAKS)
        need(TIMEOUT)
        args = ["-k", "5", "60", swaks, "--server", "127.0.0.1:%d" % self.gw.port, "--timeout", "20",
                "--to", "b@example.net", "--from", "a@example.org", "--ehlo", "swaks-ehlo.example",
                "--header", "Subject: swaks-xclient"] + list(extra)
        out, err, code = yield getProcessOutputAndValue(TIMEOUT, args, env=dict(os.environ), reactor=reactor)
        transcript = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
        self.assertEqual(code, 0, "swaks exited %s:\n%s" % (code, transcript))
        return transcript

    def sent(self, transcript, verb):
        """The command lines swaks sent that start with C{verb}."""
        return [l.split("-> ", 1)[1] for l in transcript.splitlines()
                if re.match(r"^\s*-> ", l) and l.split("-> ", 1)[1].startswith(verb)]

    @defer.inlineCallbacks
    def test_xclientAddrNameHeloPort(self):
        transcript = yield self.swaks("--xclient-addr", "192.0.2.7", "--xclient-name", "mail.example.net",
                                      "--xclient-helo", "helo.example.net", "--xclient-port", "4567")
        [xclient] = self.sent(transcript, "XCLIENT ")
        self.assertEqual(sorted(xclient.split()[1:]), ["ADDR=192.0.2.7", "HELO=helo.example.net",
                                                       "NAME=mail.example.net", "PORT=4567"])
        self.assertIn("<-  220 relay.test ESMTP relaygw", transcript)
        # swaks EHLOs again after XCLIENT's 220 (as every XCLIENT client does).
        self.assertEqual(self.sent(transcript, "EHLO "), ["EHLO swaks-ehlo.example"] * 2)

        msg = yield self.delivered()
        header = receivedHeader(msg)
        # NAME and ADDR are the XCLIENT ones; the real peer stays out (as in
        # Postfix).  The HELO name is the one of the EHLO swaks sent after
        # XCLIENT, which replaces HELO= as in Postfix.
        self.assertRegex(header, rb"^Received: from swaks-ehlo\.example \(mail\.example\.net \[192\.0\.2\.7\]\)\r\n"
                                 rb"\tby relay\.test \(relaygw\) with ESMTP id \S+\r\n"
                                 rb"\tfor <b@example\.net>; ")
        self.assertIn(b"Subject: swaks-xclient", msg)
        ctx = self.envelopes[0].context["connection"]
        self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["remote_name_status"], ctx["remote_port"]),
                         ("192.0.2.7", "mail.example.net", "ok", 4567))
        self.assertEqual((ctx["helo_name"], ctx["ehlo_domain"]), ("helo.example.net", "swaks-ehlo.example"))
        self.assertEqual((ctx["peer_ip"], ctx["overridden"], ctx["trusted"]), ("127.0.0.1", True, True))

    @defer.inlineCallbacks
    def test_xclientLogin(self):
        transcript = yield self.swaks("--xclient-addr", "192.0.2.8", "--xclient-name", "mail.example.net",
                                      "--xclient-login", "user+tag@example.org")
        [xclient] = self.sent(transcript, "XCLIENT ")
        # swaks xtext-encodes the "+".
        self.assertIn("LOGIN=user+2Btag@example.org", xclient.split())
        msg = yield self.delivered()
        header = receivedHeader(msg)
        self.assertRegex(header, rb"^Received: from swaks-ehlo\.example \(mail\.example\.net \[192\.0\.2\.8\]\)\r\n"
                                 rb"\tby relay\.test \(relaygw\) with ESMTPA id ")
        self.assertNotIn(b"user+tag", header)  # the login is logged, not written in the trace
        ctx = self.envelopes[0].context["connection"]
        self.assertEqual((ctx["auth_user"], ctx["auth_name"], ctx["auth_status"]),
                         ("user+tag@example.org", "XCLIENT", "pass"))


# -- nginx mail proxy (checklist 73) ---------------------------------------------------


NGINX_CONF = """\
load_module %(module)s;
daemon off;
master_process off;
worker_processes 1;
error_log %(dir)s/error.log info;
pid %(dir)s/nginx.pid;
events { worker_connections 64; }
mail {
    server_name relay-proxy.test;
    auth_http 127.0.0.1:%(auth)d/auth;
    xclient on;
    smtp_auth %(smtpAuth)s;
    proxy on;
    proxy_pass_error_message on;
    server {
        listen 127.0.0.1:%(smtp)d;
        protocol smtp;
    }
}
"""


class AuthHTTP(resource.Resource):
    """
    nginx's auth_http endpoint: every request is accepted and sent on to
    the gateway; the request headers are kept for the test.
    """

    isLeaf = True

    def __init__(self, gatewayPort):
        resource.Resource.__init__(self)
        self.gatewayPort = gatewayPort
        self.requests = []

    def render_GET(self, request):
        headers = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.path, headers))
        request.setHeader(b"Auth-Status", b"OK")
        request.setHeader(b"Auth-Server", b"127.0.0.1")
        request.setHeader(b"Auth-Port", str(self.gatewayPort).encode("ascii"))
        return b""


class NginxProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = False

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended = True


class NginxCase(InteropTestCase):
    """nginx with the mail module in front of the gateway, its auth endpoint served here."""

    smtpAuth = "none"

    @defer.inlineCallbacks
    def startNginx(self):
        nginx = need(NGINX)
        need(NGINX_MAIL_MODULE)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.auth = AuthHTTP(self.gw.port)
        site = server.Site(self.auth)
        site.noisy = False
        authPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(authPort.stopListening)
        self.smtpPort = freePort()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF % {"module": NGINX_MAIL_MODULE, "dir": self.dir, "smtp": self.smtpPort,
                                  "auth": authPort.getHost().port, "smtpAuth": self.smtpAuth})
        self.nginx = NginxProcess()
        reactor.spawnProcess(self.nginx, nginx, [nginx, "-e", os.path.join(self.dir, "error.log"), "-c", conf,
                                                 "-p", self.dir + "/"], env=dict(os.environ))
        self.addCleanup(self.stopNginx)
        deadline = time.monotonic() + 15
        while not self.listening(self.smtpPort):
            if self.nginx.ended or time.monotonic() > deadline:
                self.fail("nginx did not start listening on 127.0.0.1:%d:\n%s\n%s"
                          % (self.smtpPort, b"".join(self.nginx.output).decode("utf-8", "replace"),
                             self.errorLog()))
            yield task.deferLater(reactor, 0.1, lambda: None)

    @staticmethod
    def listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def errorLog(self):
        try:
            with open(os.path.join(self.dir, "error.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @defer.inlineCallbacks
    def stopNginx(self):
        """Stop the nginx we spawned, by its process, and wait for it (bounded)."""
        for sig, wait in (("TERM", 10), ("KILL", 5)):
            if self.nginx.ended:
                return
            try:
                self.nginx.transport.signalProcess(sig)
            except ProcessExitedAlready:
                return
            deadline = time.monotonic() + wait
            while not self.nginx.ended and time.monotonic() < deadline:
                yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(self.nginx.ended, "nginx did not exit")


class NginxTests(NginxCase):
    @defer.inlineCallbacks
    def test_xclientOnRelaysWithClientAddress(self):
        yield self.startNginx()

        def send():
            with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=20) as s:
                code, _ = s.ehlo("client-helo.example")
                assert code == 250, code
                refused = s.sendmail("a@example.org", ["b@example.net"], b"Subject: via nginx\r\n\r\nhello\r\n")
                assert refused == {}, refused

        yield inThread(send)
        msg = yield self.delivered()

        # nginx asked its auth endpoint once, about this client.
        self.assertEqual(len(self.auth.requests), 1)
        path, headers = self.auth.requests[0]
        self.assertEqual(path, b"/auth")
        self.assertEqual((headers["auth-protocol"], headers["auth-method"], headers["client-ip"]),
                         ("smtp", "none", "127.0.0.1"))
        self.assertEqual(headers["auth-smtp-helo"], "client-helo.example")

        # nginx sent XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE], then replayed
        # the client's EHLO: the client address, an unknown name; nginx
        # itself stays out of the trace.
        header = receivedHeader(msg)
        self.assertRegex(header, rb"^Received: from client-helo\.example \(unknown \[127\.0\.0\.1\]\)\r\n"
                                 rb"\tby relay\.test \(relaygw\) with ESMTP id \S+\r\n"
                                 rb"\tfor <b@example\.net>; ")
        self.assertIn(b"Subject: via nginx", msg)
        ctx = self.envelopes[0].context["connection"]
        self.assertEqual((ctx["remote_ip"], ctx["remote_name"], ctx["remote_name_status"]),
                         ("127.0.0.1", "unknown", "perm"))
        self.assertEqual((ctx["overridden"], ctx["ehlo_domain"], ctx["peer_ip"]),
                         (True, "client-helo.example", "127.0.0.1"))
        self.assertNotIn("auth_user", ctx)  # no LOGIN with smtp_auth none
        self.assertNotIn("[crit]", self.errorLog())
        self.assertNotIn("[emerg]", self.errorLog())


class NginxLoginTests(NginxCase):
    """
    nginx with C{smtp_auth}: the client logs in at nginx, and nginx forwards
    the login it took in XCLIENT C{LOGIN=}, as the client gave it (nginx
    does not xtext-encode it).  The client relays on that login only.
    """

    smtpAuth = "plain login"
    listener = {"trusted_peers": ["127.0.0.1/32"], "extensions": ["xclient"],
                "relay_networks": ["192.0.2.0/24"], "received_shows_login": True}

    def loginAndSend(self, user):
        """Log in at nginx as C{user} (AUTH PLAIN) and send one message: the replies."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=20) as s:
                s.ehlo("client.example")
                token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0secret").decode("ascii")
                auth = s.docmd("AUTH", "PLAIN " + token)
                mail = s.mail("a@example.org")
                rcpt = s.rcpt("b@example.net")
                data = s.data(b"Subject: login\r\n\r\nhello\r\n") if rcpt[0] == 250 else None
                return auth, mail, rcpt, data

        return inThread(send)

    @defer.inlineCallbacks
    def assertRelayedAs(self, user):
        auth, mail, rcpt, data = yield self.loginAndSend(user)
        self.assertEqual((auth[0], mail[0], rcpt[0], data and data[0]), (235, 250, 250, 250),
                         (auth, mail, rcpt, data, self.errorLog()))
        msg = yield self.delivered()
        ctx = self.envelopes[0].context["connection"]
        self.assertEqual((ctx["auth_user"], ctx["auth_name"], ctx["remote_ip"]), (user, "XCLIENT", "127.0.0.1"))
        self.assertEqual(self.auth.requests[0][1]["auth-method"], "plain")
        return msg

    @defer.inlineCallbacks
    def test_utf8LoginRelays(self):
        yield self.startNginx()
        msg = yield self.assertRelayedAs("j\u00fcrgen+tag@example.org")
        # Received shows the login, each non-ASCII character as "?" (as any client-given value).
        self.assertIn(b"(authenticated as j?rgen+tag@example.org)", receivedHeader(msg))

    @defer.inlineCallbacks
    def test_plusTagLoginRelays(self):
        """A login whose "+de" would decode to no UTF-8 (0xDE "v") is the login as nginx sent it."""
        yield self.startNginx()
        msg = yield self.assertRelayedAs("bob+dev@example.org")
        self.assertIn(b"(authenticated as bob+dev@example.org)", receivedHeader(msg))


# -- nginx in front is no open relay, and limits count its clients --------------


def smtpFrom(source, port, helo="client.example"):
    """An smtplib client whose socket is bound to loopback address C{source}."""
    s = smtplib.SMTP(timeout=20, source_address=(source, 0))
    s.connect("127.0.0.1", port)
    s.ehlo(helo)
    return s


class NginxRelayTests(NginxCase):
    """
    The shipped nginx deployment: nginx (127.0.0.1) is trusted for XCLIENT,
    and each client relays on its own address (relay_networks), never on
    nginx's.  Client sockets are bound to loopback addresses so that nginx
    forwards distinct client addresses.
    """

    listener = {"trusted_peers": ["127.0.0.1/32"], "extensions": ["xclient"],
                "relay_networks": ["127.0.0.0/26"], "max_connections_per_ip": 2}

    @defer.inlineCallbacks
    def test_outsideRefusedInsideRelayed(self):
        yield self.startNginx()

        def outside():
            with smtpFrom("127.0.0.66", self.smtpPort, "spammer.example") as s:
                self.assertEqual(s.mail("spam@spammer.example")[0], 250)
                return s.rcpt("victim@gmail.example")

        code, text = yield inThread(outside)
        self.assertEqual((code, text), (554, b"5.7.1 <victim@gmail.example>: Relay access denied"))
        self.assertEqual(self.envelopes, [])

        def inside():
            with smtpFrom("127.0.0.5", self.smtpPort, "inside.example") as s:
                refused = s.sendmail("a@example.org", ["victim@gmail.example"], b"Subject: inside\r\n\r\nok\r\n")
                assert refused == {}, refused

        yield inThread(inside)
        msg = yield self.delivered()
        self.assertTrue(receivedHeader(msg).startswith(b"Received: from inside.example (unknown [127.0.0.5])\r\n"
                                                       b"\tby relay.test (relaygw) with ESMTP id "), msg)
        self.assertEqual(self.envelopes[0].context["connection"]["remote_ip"], "127.0.0.5")

    def held(self, sources):
        """Open one session per source through nginx, up to RCPT, and keep them open."""
        sessions, replies = [], []
        for source in sources:
            s = smtpFrom(source, self.smtpPort)
            sessions.append(s)
            s.mail("a@example.org")
            replies.append(s.rcpt("b@example.net"))
        return sessions, replies

    @defer.inlineCallbacks
    def test_perIPLimitCountsTheClients(self):
        yield self.startNginx()

        def run(sources):
            sessions, replies = self.held(sources)
            for s in sessions:
                try:
                    s.quit()
                except smtplib.SMTPException:
                    s.close()
            return replies

        # Three clients from three addresses, all at once: nginx itself is not counted.
        replies = yield inThread(run, ["127.0.0.11", "127.0.0.12", "127.0.0.13"])
        self.assertEqual([r[0] for r in replies], [250, 250, 250])
        factory = self.gw.service.factories[0]
        deadline = time.monotonic() + 10
        while factory.sessions and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(dict(factory.clients.perIP), {})
        # Three from one address: the third is refused (421 4.7.0 from relaygw, through nginx).
        replies = yield inThread(run, ["127.0.0.21"] * 3)
        self.assertEqual([r[0] for r in replies[:2]], [250, 250])
        # nginx passes relaygw's refusal on with proxy_pass_error_message on
        # (without it, nginx says 451 4.3.2 Internal server error).
        self.assertEqual(replies[2], (421, b"4.7.0 relay.test too many connections, try again later"))
