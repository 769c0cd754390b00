"""The shipped example configs are valid for relaygw, HAProxy and nginx."""

import glob
import os
import shutil
import subprocess

from twisted.trial import unittest

from relaygw import config
from relaygw.testing import freePort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExampleTests(unittest.TestCase):
    def test_relaygwConfigs(self):
        paths = sorted(glob.glob(os.path.join(ROOT, "etc", "**", "*.toml"), recursive=True))
        self.assertGreaterEqual(len(paths), 4)
        for path in paths:
            c = config.load(path)
            self.assertTrue(c.listeners, path)
        haproxied = config.load(os.path.join(ROOT, "etc", "haproxy", "relaygw-1.toml"))
        self.assertTrue(haproxied.listeners[0].proxy_protocol)
        self.assertEqual(haproxied.admin.endpoint, "tcp:8081:interface=127.0.0.1")
        nginxed = config.load(os.path.join(ROOT, "etc", "nginx", "relaygw.toml"))
        self.assertEqual(nginxed.listeners[0].extensions, ("xclient",))

    def test_haproxyConfig(self):
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.assertTrue(os.path.exists(haproxy), "haproxy is not installed (make test installs it)")
        p = subprocess.run([haproxy, "-c", "-f", os.path.join(ROOT, "etc", "haproxy", "haproxy.cfg")],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_haproxyStarts(self):
        """
        HAProxy runs the example (its ports moved to free ones) within this
        machine's open-file hard limit (before: its maxconn 20000 wanted
        40,021 descriptors, and HAProxy would not start where the limit is
        20,000).
        """
        with open(os.path.join(ROOT, "etc", "haproxy", "haproxy.cfg")) as f:
            text = f.read()
        for port in ("2525", "2601", "2602", "8081", "8082"):
            text = text.replace(":%s" % port, ":%d" % freePort()).replace("port %s" % port, "port %d" % freePort())
        cfg = os.path.join(os.path.abspath(self.mktemp()))
        with open(cfg, "w") as f:
            f.write(text)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        p = subprocess.Popen([haproxy, "-f", cfg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            code = p.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if p.poll() is None:
                p.kill()
            output = p.communicate()[0]
        self.assertIsNone(code, output)
        self.assertNotIn("Cannot raise FD limit", output)

    def test_nginxConfig(self):
        self.assertTrue(os.path.exists("/usr/sbin/nginx"), "nginx is not installed (make test installs it)")
        prefix = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(prefix, "logs"))
        p = subprocess.run(["/usr/sbin/nginx", "-t", "-p", prefix, "-c", os.path.join(ROOT, "etc", "nginx", "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_systemdUnitRunsThePlugin(self):
        with open(os.path.join(ROOT, "etc", "systemd", "relaygw.service")) as f:
            unit = f.read()
        self.assertIn("twistd --nodaemon --pidfile= relaygw --config", unit)
        self.assertIn("KillSignal=SIGTERM", unit)
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", unit)


class NginxDeploymentTests(unittest.TestCase):
    """
    etc/nginx as an operator runs it from a fresh directory: relaygw with
    etc/nginx/relaygw.toml, then nginx with the command the config's
    comment gives (only the ports moved to free ones): nginx starts, its
    auth endpoint sends the client to relaygw, and a client outside
    relay_networks is refused 554 5.7.1 there, as the comments say.
    """

    timeout = 60

    def test_documentedCommandsWork(self):
        import re
        import signal
        import smtplib
        import time

        from relaygw.testing import freePort, twistdRunning, waitForPort

        self.assertTrue(os.path.exists("/usr/sbin/nginx"), "nginx is not installed (make test installs it)")
        root = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(ROOT, "etc"), os.path.join(root, "etc"))
        conf = os.path.join(root, "etc", "nginx", "nginx.conf")
        gwConf = os.path.join(root, "etc", "nginx", "relaygw.toml")
        smtp, auth, gw = freePort(), freePort(), freePort()
        with open(conf) as f:
            text = f.read()
        [command] = re.findall(r"^#   (.*nginx -c .*)$", text, re.M)
        text = text.replace("127.0.0.1:25;", "127.0.0.1:%d;" % smtp).replace("8089", str(auth))
        text = text.replace("Auth-Port 2525", "Auth-Port %d" % gw)
        with open(conf, "w") as f:
            f.write(text)
        with open(gwConf) as f:
            text = f.read()
        with open(gwConf, "w") as f:
            f.write(text.replace("tcp:2525:", "tcp:%d:" % gw))

        with twistdRunning(gwConf, root):
            waitForPort(gw)
            pidFile = os.path.join(root, "var", "nginx", "nginx.pid")
            # (A file, not a pipe: nginx goes on writing its error log to the standard error it was given.)
            with open(os.path.join(root, "nginx.out"), "w+") as out:
                code = subprocess.run(["bash", "-c", command], cwd=root, env=dict(os.environ, PWD=root),
                                      stdout=out, stderr=subprocess.STDOUT, timeout=30).returncode
                out.seek(0)
                started = out.read()
            if not os.path.exists(pidFile):  # (a daemon nginx may have started without its pid file)
                for line in subprocess.run(["pgrep", "-f", conf], capture_output=True, text=True).stdout.split():
                    os.kill(int(line), signal.SIGTERM)
            self.assertEqual((code, "[emerg]" in started), (0, False), started)
            try:
                waitForPort(smtp)
                with smtplib.SMTP("127.0.0.1", smtp, timeout=20) as s:
                    self.assertEqual(s.ehlo("client.example")[0], 250)
                    self.assertEqual(s.mail("a@example.org")[0], 250)
                    self.assertEqual(s.rcpt("b@example.net"), (554, b"5.7.1 <b@example.net>: Relay access denied"))
            finally:
                with open(pidFile) as f:
                    pid = int(f.read())
                # The documented stop: the same -c and -p, and -s quit.
                stop = subprocess.run(["bash", "-c", command.split("&& ", 1)[-1] + " -s quit"], cwd=root,
                                      env=dict(os.environ, PWD=root), capture_output=True, text=True, timeout=30)
                deadline = time.monotonic() + 10
                while os.path.exists(pidFile) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if os.path.exists(pidFile):
                    os.kill(pid, signal.SIGTERM)
            self.assertEqual(stop.returncode, 0, stop.stderr)
