"""
Real peers sending XCLIENT: swaks --xclient-* and the nginx mail proxy with
`xclient on` (checklist 73, 74).  Both are installed from Debian packages by
`make test` (scripts/install-peers).
"""

import os
import shutil
import smtplib
import subprocess
import time

from twisted.internet import defer

from relaygw.testing import freePort, inThread, waitForPort
from tests.test_smtp import GatewayTestCase


def need(path):
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if not found:
        raise AssertionError("%s is not installed (make test installs it)" % path)
    return found


class SwaksTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"]}

    def swaks(self, *extra):
        swaks = need("swaks")

        def run():
            return subprocess.run(
                [swaks, "--server", "127.0.0.1:%d" % self.gw.port, "--from", "a@example.org",
                 "--to", "b@example.net", "--header", "Subject: swaks-xclient"] + list(extra),
                capture_output=True, text=True, timeout=60)

        return inThread(run)

    @defer.inlineCallbacks
    def test_xclientIdentity(self):
        # swaks EHLOs again after XCLIENT's 220 (as nginx replays the client's
        # EHLO), and that greeting replaces HELO=, as in Postfix.
        p = yield self.swaks("--xclient-addr", "192.0.2.7", "--xclient-name", "mail.example.net",
                             "--xclient-helo", "xclient-helo.example.net", "--xclient-port", "4567",
                             "--ehlo", "helo.example.net")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("XCLIENT", p.stdout)
        yield self.gw.service.queue.whenIdle()
        [msg] = self.gw.delivered()
        self.assertIn(b"Received: from helo.example.net (mail.example.net [192.0.2.7])", msg)
        self.assertIn(b"(via [127.0.0.1] port", msg)

    @defer.inlineCallbacks
    def test_xclientLogin(self):
        p = yield self.swaks("--xclient-addr", "192.0.2.8", "--xclient-login", "user+tag@example.org")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        yield self.gw.service.queue.whenIdle()
        [msg] = self.gw.delivered()
        self.assertIn(b"[192.0.2.8]", msg)
        self.assertIn(b"with ESMTPA (authenticated as user+tag@example.org)", msg)


NGINX_CONF = """
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process off;
worker_processes 1;
error_log %(dir)s/error.log info;
pid %(dir)s/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server {
        listen 127.0.0.1:%(auth)d;
        location = /auth {
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port %(gateway)d;
            return 200;
        }
    }
}
mail {
    server_name relay-proxy.test;
    auth_http 127.0.0.1:%(auth)d/auth;
    proxy on;
    xclient on;
    smtp_auth none;
    server {
        listen 127.0.0.1:%(smtp)d;
        protocol smtp;
    }
}
"""


class NginxTests(GatewayTestCase):
    listener = {"trusted_peers": ["127.0.0.0/8"], "extensions": ["xclient"]}
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield GatewayTestCase.setUp(self)
        nginx = need("/usr/sbin/nginx")
        need("/usr/lib/nginx/modules/ngx_mail_module.so")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.smtpPort, authPort = freePort(), freePort()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF % {"dir": self.dir, "auth": authPort, "gateway": self.gw.port, "smtp": self.smtpPort})
        self.proc = subprocess.Popen([nginx, "-c", conf, "-p", self.dir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.addCleanup(self._stopNginx)
        yield inThread(waitForPort, self.smtpPort)

    def _stopNginx(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @defer.inlineCallbacks
    def test_xclientOnRelaysWithClientAddress(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=20) as s:
                s.ehlo("client-helo.example")
                s.sendmail("a@example.org", ["b@example.net"], b"Subject: via nginx\r\n\r\nhello\r\n")

        yield inThread(run)
        yield self.gw.service.queue.whenIdle()
        deadline = time.monotonic() + 10
        while not os.listdir(self.gw.outbox) and time.monotonic() < deadline:
            yield inThread(time.sleep, 0.1)
        [msg] = self.gw.delivered()
        # nginx sent XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE], then replayed the client's EHLO.
        self.assertIn(b"Received: from client-helo.example (unknown [127.0.0.1])", msg)
        self.assertIn(b"(via [127.0.0.1] port", msg)
        with open(os.path.join(self.dir, "error.log")) as f:
            self.assertNotIn("[crit]", f.read())
