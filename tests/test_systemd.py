"""
etc/systemd as shipped: the unit passes systemd-analyze verify (where
installed), its config passes --check-config with its absolute paths, and
the gateway reports readiness with the notify protocol (one datagram).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from relaygw import config, sdnotify
from relaygw.testing import configText, freePort, inThread
from relaygw.workers import twistdArgv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "systemd", "relaygw.service")
CONF = os.path.join(ROOT, "etc", "systemd", "relaygw.toml")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def unitSettings():
    with open(UNIT) as f:
        pairs = [line.split("=", 1) for line in f if re.match(r"^[A-Z]\w*=", line)]
    settings = {}
    for k, v in pairs:
        settings.setdefault(k, []).append(v.strip())
    return settings


class UnitTests(unittest.TestCase):
    def test_systemdAnalyzeVerify(self):
        """The unit as shipped, with the install path pointing at this checkout's twistd."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        with open(UNIT) as f:
            unit = f.read().replace("/opt/relaygw/.venv/bin/twistd", TWISTD)
        path = os.path.join(d, "relaygw.service")
        with open(path, "w") as f:
            f.write(unit)
        p = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("relaygw.service", p.stderr)

    def test_unitServesTheGateway(self):
        s = unitSettings()
        self.assertEqual(s["Type"], ["notify"])
        self.assertEqual((s["User"], s["Group"]), (["relaygw"], ["relaygw"]))
        self.assertIn("CAP_NET_BIND_SERVICE", s["AmbientCapabilities"][0])
        self.assertEqual(s["ProtectSystem"], ["strict"])
        writable = s["ReadWritePaths"][0].split()
        c = config.load(CONF)
        for path in (c.spool.directory, c.relay.maildir, c.listeners[0].tls_certificate, c.listeners[0].tls_key):
            self.assertTrue(os.path.isabs(path), path)
            self.assertTrue(any(path == w or path.startswith(w + "/") for w in writable), path)
        self.assertIn("--config /etc/relaygw/relaygw.toml", s["ExecStart"][0])
        stopTimeout = int(s["TimeoutStopSec"][0])
        self.assertGreater(stopTimeout, max(l.drain_timeout for l in c.listeners) + 30)
        self.assertTrue(any(l.endpoint.startswith("tcp:25") for l in c.listeners))

    def test_shippedConfigPassesTheCheck(self):
        """--check-config on the shipped config, as root would run it (elsewhere, under a scratch root)."""
        path = CONF
        if os.geteuid() != 0 or not os.access("/var/lib", os.W_OK):
            root = os.path.abspath(self.mktemp())
            os.makedirs(root)
            with open(CONF) as f:
                text = f.read().replace('"/var/', '"%s/var/' % root)
            path = os.path.join(root, "relaygw.toml")
            with open(path, "w") as f:
                f.write(text)
        p = subprocess.run([TWISTD, "relaygw", "--config", path, "--check-config"], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        self.assertIn(": ok", p.stdout)


class NotifyTests(unittest.TestCase):
    def listen(self, abstract=False):
        """A datagram socket like systemd's: a short path (Unix socket paths are short), or an abstract name."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.settimeout(15)
        if abstract:
            name = "relaygw-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
            s.bind("\0" + name)
            return s, "@" + name
        directory = tempfile.mkdtemp(prefix="rgw-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "notify")
        s.bind(path)
        return s, path

    def test_oneDatagram(self):
        s, path = self.listen()
        self.assertTrue(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(s.recv(4096), b"READY=1")
        self.assertFalse(sdnotify.notify("READY=1", {}))
        self.assertFalse(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path + ".missing"}))

    def test_gatewayReportsReadyThenStopping(self):
        s, path = self.listen(abstract=True)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = freePort()
        conf = os.path.join(directory, "relaygw.toml")
        with open(conf, "w") as f:
            f.write(configText(directory, listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % port},)))

        def run():
            p = subprocess.Popen(twistdArgv(conf), cwd=directory, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, NOTIFY_SOCKET=path))
            try:
                ready = s.recv(4096).decode()
                # READY comes once the port listens.
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                p.send_signal(signal.SIGTERM)
                stopping = s.recv(4096).decode()
                p.wait(30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.assertEqual(ready.splitlines()[0], "READY=1")
            self.assertEqual(stopping, "STOPPING=1")

        return inThread(run)



