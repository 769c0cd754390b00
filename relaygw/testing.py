"""
Public test helpers: start a real gateway on a loopback port inside the
test's reactor, and talk to it over a real socket from a thread.
"""

import os
import socket
import subprocess
import sys
import time

from twisted.internet import defer, threads

from relaygw import config as _config
from relaygw.service import GatewayService


def tomlValue(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[%s]" % ", ".join(tomlValue(x) for x in v)
    return '"%s"' % str(v).replace("\\", "\\\\").replace('"', '\\"')


def configText(directory, listeners=({},), relay=None, spool=None, admin=None, log=None):
    """TOML for a test gateway rooted in C{directory} (loopback, port 0)."""
    out = ['[spool]', 'directory = "%s"' % os.path.join(directory, "spool")]
    for k, v in (spool or {}).items():
        out.append("%s = %s" % (k, tomlValue(v)))
    out += ["", "[relay]", 'maildir = "%s"' % os.path.join(directory, "outbox")]
    for k, v in (relay or {}).items():
        out.append("%s = %s" % (k, tomlValue(v)))
    for name, table in (("admin", admin), ("log", log)):
        if table:
            out += ["", "[%s]" % name] + ["%s = %s" % (k, tomlValue(v)) for k, v in table.items()]
    for i, overrides in enumerate(listeners):
        table = {"name": "l%d" % i, "endpoint": "tcp:0:interface=127.0.0.1", "hostname": "relay.test"}
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
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        [twistd, "-n", "--pidfile=", "relaygw", "--config", configPath] + list(extra),
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


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
