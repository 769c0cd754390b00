"""The shipped example configs are valid for relaygw, HAProxy and nginx."""

import glob
import os
import shutil
import subprocess

from twisted.trial import unittest

from relaygw import config

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
