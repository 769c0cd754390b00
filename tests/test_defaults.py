"""
Defaults that serve: a listen queue of at least 1024 with one process or
several, an example config whose every shown default is the loader's,
relaygw-passwd keeping a file's mode and group, and no markup in --help.
"""

import dataclasses
import io
import os
import re
import subprocess
import sys
import tomllib

from twisted.internet import defer
from twisted.trial import unittest

from relaygw import config
from relaygw.auth import PasswordFile
from relaygw.scripts import passwd
from relaygw.testing import Gateway

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def listenBacklog(port):
    """The accept queue length of the socket listening on C{port} (ss's Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], capture_output=True, text=True, timeout=10).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.startswith("LISTEN")]


def somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


class BacklogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def backlogs(self, **kw):
        gw = Gateway(self.mktemp(), **kw)
        yield gw.start()
        self.addCleanup(gw.stop)
        return listenBacklog(gw.port)

    @defer.inlineCallbacks
    def test_oneProcess(self):
        self.assertEqual((yield self.backlogs()), [min(1024, somaxconn())])

    @defer.inlineCallbacks
    def test_severalWorkers(self):
        self.assertEqual((yield self.backlogs(process={"workers": 2})), [min(1024, somaxconn())])

    @defer.inlineCallbacks
    def test_endpointSaysOtherwise(self):
        self.assertEqual((yield self.backlogs(listeners=({"endpoint": "tcp:0:interface=127.0.0.1:backlog=2000"},))),
                         [min(2000, somaxconn())])


#: How the example marks a value that is not the loader's default: "(default: X; why)".
_SHOWN_FOR_THE_EXAMPLE = re.compile(r"\(default: ([^)]*)\)")


class ExampleConfigTests(unittest.TestCase):
    """
    Every key etc/relaygw.toml shows, set or commented out, either has the
    loader's default as its value or says C{(default: X)} with X the
    loader's default.
    """

    def shown(self):
        """(section, key, value, comment) for each `key = value` line, commented out or not."""
        section = None
        with open(os.path.join(ROOT, "etc", "relaygw.toml")) as f:
            for line in f:
                m = re.match(r"^\s*#?\s*\[\[?(\w+)\]\]?\s*$", line)
                if m:
                    section = m.group(1)
                    continue
                m = re.match(r"^\s*#?\s*(\w+)\s*=\s*(.*)$", line)
                if not m or section is None:
                    continue
                key, rest = m.groups()
                # The value ends at the first "#" outside it.
                for cut in [i for i, c in enumerate(rest) if c == "#"] + [len(rest)]:
                    try:
                        value = tomllib.loads("v = " + rest[:cut])["v"]
                    except tomllib.TOMLDecodeError:
                        continue
                    yield section, key, value, rest[cut:].lstrip("#").strip()
                    break

    def defaults(self):
        out = {}
        for section, cls in (("spool", config.SpoolConfig), ("relay", config.RelayConfig),
                             ("admin", config.AdminConfig), ("log", config.LogConfig),
                             ("process", config.ProcessConfig), ("listener", config.ListenerConfig),
                             ("route", config.RouteConfig)):
            for f in dataclasses.fields(cls):
                out[section, f.name] = f.default
        return out

    def test_shownDefaultsAreTheLoaders(self):
        defaults = self.defaults()
        wrong, seen = [], 0
        for section, key, value, comment in self.shown():
            self.assertIn((section, key), defaults, "%s.%s is not a key" % (section, key))
            default = defaults[section, key]
            if isinstance(default, tuple):
                default = list(default)
            said = _SHOWN_FOR_THE_EXAMPLE.search(comment)
            if section == "route":
                continue  # a route exists only where one is written: the block is an example
            if said is not None:
                claimed = said.group(1).split(";")[0].strip()
                if claimed.startswith("the machine's host name"):
                    ok = default == config.defaultHostname()
                else:
                    ok = default is None if claimed == "none" else tomllib.loads("v = " + claimed)["v"] == default
            elif "(required)" in comment:
                ok = default is None
            else:
                ok = value == default
            if not ok:
                wrong.append("%s.%s = %r (%s): the loader's default is %r" % (section, key, value, comment, default))
            seen += 1
        self.assertEqual(wrong, [])
        self.assertGreater(seen, 60)

    def test_everyKeyShown(self):
        shown = {(s, k) for s, k, _, _ in self.shown()}
        missing = sorted("%s.%s" % sk for sk in self.defaults() if sk not in shown and sk[0] != "route")
        self.assertEqual(missing, [])


class PasswdTests(unittest.TestCase):
    def run_(self, path, user, password):
        self.patch(sys, "stdin", io.StringIO(password + "\n"))
        return passwd.main([path, user])

    def test_keepsModeAndGroup(self):
        path = os.path.abspath(self.mktemp())
        PasswordFile(path).set("alice", "one")
        os.chmod(path, 0o640)
        gid = 65534 if os.geteuid() == 0 else os.getegid()
        if os.geteuid() == 0:
            os.chown(path, -1, gid)
        self.assertEqual(self.run_(path, "bob", "two"), 0)
        st = os.stat(path)
        self.assertEqual((st.st_mode & 0o777, st.st_gid), (0o640, gid))
        self.assertEqual(self.run_(path, "alice", "three"), 0)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
        with open(path) as f:
            self.assertEqual(sorted(line.split(":")[0] for line in f), ["alice", "bob"])

    def test_newFileIsPrivate(self):
        path = os.path.abspath(self.mktemp())
        self.assertEqual(self.run_(path, "alice", "one"), 0)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class HelpTests(unittest.TestCase):
    """No epytext markup (C{...}, L{...}) in any --help."""

    def test_noMarkup(self):
        commands = [[os.path.join(BIN, "twistd"), "relaygw", "--help"],
                    [os.path.join(BIN, "relaygw-passwd"), "--help"],
                    [os.path.join(BIN, "relaygw-queue"), "--help"]]
        commands += [[os.path.join(BIN, "relaygw-queue"), sub, "--help"]
                     for sub in ("list", "show", "delete", "hold", "release", "flush")]
        for argv in commands:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, argv)
            self.assertNotRegex(p.stdout + p.stderr, r"\b[CLIBUM]\{", argv)
            self.assertTrue(p.stdout.strip(), argv)
