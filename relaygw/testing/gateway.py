"""
A gateway for tests: the TOML for one rooted in a directory
(L{configText}), one running in the test's reactor on loopback ports
(L{Gateway}) or as a C{twistd} child process (L{runTwistd}), and the
Received header of what it delivered (L{receivedHeader}).
"""

import contextlib
import os
import signal
import subprocess

from twisted.internet import defer

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


def runTwistd(configPath, cwd, extra=(), stdout=subprocess.PIPE, env=None):
    """
    Start C{twistd -n relaygw} as a child process; returns the Popen.  Its
    output (standard error too) goes to a pipe unless C{stdout} says where.
    """
    return subprocess.Popen(
        twistdArgv(configPath) + list(extra),
        cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT, env=env,
    )


@contextlib.contextmanager
def twistdRunning(configPath, cwd, extra=()):
    """
    L{runTwistd} for a C{with} block.  At its end the process is stopped
    if it still runs (SIGTERM, then SIGKILL after 30 s), and what it wrote
    is kept in C{p.output}.
    """
    p = runTwistd(configPath, cwd, extra)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        p.output = p.stdout.read().decode()
        p.stdout.close()


def receivedHeader(message):
    """The first Received header of C{message} (bytes), folding kept."""
    start = message.index(b"Received: ")
    end = start
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end:end + 1] not in (b"\t", b" "):
            return message[start:end]
