"""
--check-config catches everything start would refuse, reports every error
at once as C{file: key: what is wrong (expected ...)}, and start refuses the
same configurations with the same words and no traceback.
"""

import os
import re
import shutil
import tempfile

from twisted.trial import unittest

from relaygw import config
from relaygw.testing import configText
from relaygw.tls import generateSelfSigned
from tests.processes import twistdCommand

LINE = re.compile(r"^relaygw\.toml: [\w\[\].]+: .+ \(expected .+\)$")


class BrokenConfigTests(unittest.TestCase):
    """One broken config per row: the check names the key and says what was expected."""

    def setUp(self):
        self.dir = d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.cert, self.key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        generateSelfSigned(self.cert, self.key, "relay.test")
        self.otherCert, self.otherKey = os.path.join(d, "o-cert.pem"), os.path.join(d, "o-key.pem")
        generateSelfSigned(self.otherCert, self.otherKey, "other.test")
        # (sockets in a short directory: one under _trial_temp may pass the 107 octets a socket path can have)
        self.socketDir = tempfile.mkdtemp(prefix="rgw-")
        self.addCleanup(shutil.rmtree, self.socketDir, True)
        self.afile = os.path.join(d, "a-file")
        with open(self.afile, "w") as f:
            f.write("not PEM\n")
        self.tls = {"tls_certificate": self.cert, "tls_key": self.key}
        self.maildirWithNewAFile = os.path.join(d, "outbox-new-a-file")
        os.makedirs(os.path.join(self.maildirWithNewAFile, "tmp"))
        with open(os.path.join(self.maildirWithNewAFile, "new"), "w"):
            pass
        self.huge = os.path.join(d, "huge.pem")  # (1 TiB, sparse)
        with open(self.huge, "wb") as f:
            f.truncate(1 << 40)
        self.latin1 = os.path.join(d, "passwd-latin1")
        with open(self.latin1, "wb") as f:
            f.write(b"j\xf6rg:$scrypt$x\n")

    def rows(self):
        """(what, config keyword arguments or raw TOML, key the error names, words it uses)."""
        d, sd, tls = self.dir, self.socketDir, self.tls
        missing = os.path.join(d, "missing.pem")
        return [
            ("missing certificate", {"listeners": (dict(tls, tls_certificate=missing),)},
             "listener[0].tls_certificate", "cannot read"),
            ("certificate is a directory", {"listeners": (dict(tls, tls_certificate=d),)},
             "listener[0].tls_certificate", "is a directory"),
            ("certificate not PEM", {"listeners": (dict(tls, tls_certificate=self.afile),)},
             "listener[0].tls_certificate", "holds no PEM certificate"),
            ("missing key", {"listeners": (dict(tls, tls_key=missing),)}, "listener[0].tls_key", "cannot read"),
            ("key not PEM", {"listeners": (dict(tls, tls_key=self.afile),)}, "listener[0].tls_key", "no unencrypted"),
            ("key does not match", {"listeners": (dict(tls, tls_key=self.otherKey),)},
             "listener[0].tls_key", "does not match"),
            ("certificate without key", {"listeners": ({"tls_certificate": self.cert},)},
             "listener[0].tls_key", "go together"),
            ("missing client CA", {"listeners": (dict(tls, tls_client_ca=missing,
                                                      tls_client_identities=["dns:lb.example"]),)},
             "listener[0].tls_client_ca", "cannot read"),
            ("client CA not PEM", {"listeners": (dict(tls, tls_client_ca=self.afile),)},
             "listener[0].tls_client_ca", "holds no PEM certificate"),
            ("bad client identity", {"listeners": (dict(tls, tls_client_ca=self.cert,
                                                        tls_client_identities=["bogus"]),)},
             "listener[0].tls_client_identities", "dns:NAME or uri:URI"),
            ("identities without CA", {"listeners": (dict(tls, tls_client_identities=["dns:a.example"]),)},
             "listener[0].tls_client_identities", "needs tls_client_ca"),
            ("self-signed without its files", {"listeners": ({"tls_self_signed": True},)},
             "listener[0].tls_self_signed", "needs tls_certificate"),
            ("client CA without a certificate", {"listeners": ({"tls_client_ca": self.cert,
                                                                "tls_client_identities": ["dns:lb.example"]},)},
             "listener[0].tls_client_ca", "needs tls_certificate"),
            ("ciphers without a certificate", {"listeners": ({"tls_ciphers": "ECDHE+AESGCM"},)},
             "listener[0].tls_ciphers", "needs tls_certificate"),
            ("bad ciphers", {"listeners": (dict(tls, tls_ciphers="NO-SUCH-CIPHER"),)},
             "listener[0].tls_ciphers", "accepts no cipher"),
            ("bad TLS version", {"listeners": (dict(tls, tls_min_version="1.1"),)},
             "listener[0].tls_min_version", "one of 1.2, 1.3"),
            ("missing credentials", {"listeners": ({"credentials": missing},)},
             "listener[0].credentials", "cannot read"),
            ("missing relay CA", {"relay": {"tls_ca": missing}}, "relay.tls_ca", "cannot read"),
            ("huge relay CA", {"relay": {"tls_ca": self.huge}}, "relay.tls_ca",
             "1099511627776 octets, over the 16777216 a PEM file may have"),
            ("huge key", {"listeners": (dict(tls, tls_key=self.huge),)}, "listener[0].tls_key",
             "1099511627776 octets, over the 16777216 a PEM file may have"),
            ("AUTH credentials with MX delivery", {"relay": {"mx": True, "auth_user": "u", "auth_password": "p"}},
             "relay.auth_user", "every recipient domain's MX host"),
            ("a route's AUTH credentials with MX delivery", {"routes": ({"domains": ["x.example"], "mx": True,
                                                                        "auth_user": "u", "auth_password": "p"},)},
             "route[0].auth_user", "every recipient domain's MX host"),
            ("missing route CA", {"routes": ({"domains": ["x.example"], "smarthosts": ["[127.0.0.1]:25"],
                                              "tls_ca": missing},)}, "route[0].tls_ca", "cannot read"),
            ("unknown policy module", {"listeners": ({"policy": "nosuch.module.Policy"},)},
             "listener[0].policy", "IPolicy"),
            ("policy without IPolicy", {"listeners": ({"policy": "relaygw.config.Invalid"},)},
             "listener[0].policy", "does not provide IPolicy"),
            ("port out of range", {"listeners": ({"endpoint": "tcp:99999"},)},
             "listener[0].endpoint", "out of range"),
            ("endpoint does not parse", {"listeners": ({"endpoint": "nosuch:1"},)},
             "listener[0].endpoint", "cannot parse"),
            ("port not a number", {"listeners": ({"endpoint": "tcp:abc"},)}, "listener[0].endpoint", "cannot parse"),
            ("admin port equals a listener's", {"listeners": ({"endpoint": "tcp:2525:interface=127.0.0.1"},),
                                                "admin": {"endpoint": "tcp:2525:interface=127.0.0.1"}},
             "admin.endpoint", "port 2525 is also listener[0].endpoint's"),
            ("two listeners on one port", {"listeners": ({"endpoint": "tcp:2525"},
                                                         {"endpoint": "tcp:2525:interface=127.0.0.1"})},
             "listener[1].endpoint", "port 2525"),
            ("spool under a file", {"spool": {"directory": os.path.join(self.afile, "spool")}},
             "spool.directory", "is not a directory"),
            ("spool is a file", {"spool": {"directory": self.afile}}, "spool.directory", "is not a directory"),
            ("spool read-only", {"spool": {"directory": "/proc/sys/relaygw-spool"}}, "spool.directory", "not writable"),
            ("maildir is a file", {"relay": {"maildir": self.afile}}, "relay.maildir", "is not a directory"),
            ("maildir's new/ is a file", {"relay": {"maildir": self.maildirWithNewAFile}}, "relay.maildir",
             "%s/new is not a directory (expected a Maildir's tmp, new and cur directories)"
             % (self.maildirWithNewAFile,)),
            ("retry_min above retry_max", {"relay": {"retry_min": 5000, "retry_max": 4000}},
             "relay.retry_min", "retry_min <= retry_max"),
            ("hostname with spaces", {"listeners": ({"hostname": "bad host name!"},)},
             "listener[0].hostname", "not a valid host name"),
            ("non-ASCII hostname", {"listeners": ({"hostname": "relä.example"},)},
             "listener[0].hostname", "ASCII host name"),
            ("hostname with CR LF", 'hostname = "relay.example\\r\\nX-Injected: yes"\n',
             "listener[0].hostname", "line break"),
            ("bad address literal", {"listeners": ({"hostname": "[300.1.1.1]"},)},
             "listener[0].hostname", "not an address literal"),
            ("bad helo_name", {"relay": {"helo_name": "-bad-.example"}}, "relay.helo_name", "not a valid host name"),
            ("idle_timeout nan", "idle_timeout = nan\n", "listener[0].idle_timeout", "finite"),
            ("data_timeout inf", "data_timeout = inf\n", "listener[0].data_timeout", "finite"),
            ("retry_max inf", {"relay": {"retry_max": float("inf")}}, "relay.retry_max", "finite"),
            ("greet_delay negative", {"listeners": ({"greet_delay": -1},)}, "listener[0].greet_delay", "negative"),
            ("max_recipients zero", {"listeners": ({"max_recipients": 0},)}, "listener[0].max_recipients", "positive"),
            ("wrong type", {"listeners": ({"max_recipients": "many"},)}, "listener[0].max_recipients", "an integer"),
            ("misspelt key", {"listeners": ({"max_recipient": 5},)}, "listener[0].max_recipient", "max_recipients?"),
            ("bad CIDR", {"listeners": ({"trusted_peers": ["10.0.0.0/33"]},)}, "listener[0].trusted_peers", "CIDRs"),
            ("CIDR with host bits", {"listeners": ({"relay_networks": ["10.0.0.1/8"]},)},
             "listener[0].relay_networks", "'10.0.0.1/8' has host bits set (expected 10.0.0.0/8, or 10.0.0.1/32"),
            ("IPv6 CIDR with host bits",
             {"listeners": ({"proxy_protocol": True, "proxy_trusted": ["2001:db8::1/32"]},)},
             "listener[0].proxy_trusted", "(expected 2001:db8::/32, or 2001:db8::1/128"),
            ("IPv4-mapped CIDR", {"listeners": ({"trusted_peers": ["::ffff:127.0.0.5/128"]},)},
             "listener[0].trusted_peers", "'::ffff:127.0.0.5/128' is IPv4-mapped: it would match no client "
             "(expected 127.0.0.5/32"),
            ("IPv4-mapped network", {"listeners": ({"relay_networks": ["::ffff:10.0.0.0/104"]},)},
             "listener[0].relay_networks", "(expected 10.0.0.0/8"),
            ("smarthost port out of range", {"relay": {"smarthosts": ["[127.0.0.1]:99999"]}},
             "relay.smarthosts", "a port from 1 to 65535"),
            ("smarthost port not a number", {"relay": {"smarthosts": ["mx.example:abc"]}},
             "relay.smarthosts", "bad port"),
            ("smarthost bad name", {"relay": {"smarthosts": ["bad host"]}}, "relay.smarthosts", "host name"),
            ("bad resolver", {"relay": {"resolver": "127.0.0.1:0"}}, "relay.resolver", "bad port"),
            ("workers with a unix endpoint", {"process": {"workers": 2},
                                              "listeners": ({"endpoint": "unix:%s/s.sock" % sd},)},
             "listener[0].endpoint", "plain TCP"),
            ("bad fsync", {"spool": {"fsync": "never"}}, "spool.fsync", "one of grouped, each"),
            ("bad log level", {"log": {"level": "loud"}}, "log.level", "one of debug"),
            ("ciphers OpenSSL cannot parse", {"listeners": (dict(tls, tls_ciphers="!!!:::"),)},
             "listener[0].tls_ciphers", "accepts no cipher"),
            ("backlog out of range", {"listeners": ({"endpoint": "tcp:2525:interface=127.0.0.1:backlog=" + "9" * 20},)},
             "listener[0].endpoint", "a backlog from 1 to 65535"),
            ("interface not an address", {"listeners": ({"endpoint": "tcp:2525:interface=not-an-ip"},)},
             "listener[0].endpoint", "is not an address"),
            ("interface with a space", {"listeners": ({"endpoint": "tcp:2525:interface=127.0.0.1 "},)},
             "listener[0].endpoint", "is not an address"),
            ("socket in a missing directory", {"listeners": ({"endpoint": "unix:/nonexistent-dir-for-test/s"},)},
             "listener[0].endpoint", "is not a directory"),
            ("empty socket path", {"listeners": ({"endpoint": "unix:"},)}, "listener[0].endpoint", "empty socket path"),
            ("socket path too long to bind", {"listeners": ({"endpoint": "unix:%s/%s.sock" % (d, "s" * 108)},)},
             "listener[0].endpoint", "at most 107 octets"),
            ("one address written two ways", {"listeners": ({"endpoint": "tcp:2525:interface=127.0.0.1"},
                                                           {"endpoint": "tcp:2525:interface=127.000.000.001"})},
             "listener[1].endpoint", "port 2525"),
            ("an IPv4-mapped address", {"listeners": ({"endpoint": "tcp:2525:interface=127.0.0.1"},
                                                     {"endpoint": r"tcp6:2525:interface=\:\:ffff\:127.0.0.1"})},
             "listener[1].endpoint", "port 2525"),
            ("one socket twice", {"listeners": ({"endpoint": "unix:%s/s.sock" % sd},
                                                {"endpoint": "unix:%s/../%s/s.sock" % (sd, os.path.basename(sd))})},
             "listener[1].endpoint", "socket %s/s.sock" % sd),
            ("workers past the bound", {"process": {"workers": 1000}}, "process.workers", "1 to 256"),
            ("cpu_affinity a word", {"process": {"cpu_affinity": "auto"}}, "process.cpu_affinity",
             "true, false or a list"),
            ("cpu_affinity an empty list", {"process": {"cpu_affinity": []}}, "process.cpu_affinity",
             "CPU numbers such as [0, 1]"),
            ("cpu_affinity a negative CPU", {"process": {"cpu_affinity": [0, -1]}}, "process.cpu_affinity",
             "CPU numbers such as [0, 1]"),
            ("cpu_affinity CPUs as strings", {"process": {"cpu_affinity": ["0"]}}, "process.cpu_affinity",
             "CPU numbers such as [0, 1]"),
            ("drain_delay past the bound", {"listeners": ({"drain_delay": 1e9},)},
             "listener[0].drain_delay", "0 to 3600 seconds"),
            ("drain_timeout negative", {"listeners": ({"drain_timeout": -1},)},
             "listener[0].drain_timeout", "0 to 3600 seconds"),
            ("credentials not UTF-8", {"listeners": ({"credentials": self.latin1},)},
             "listener[0].credentials", "is not UTF-8"),
            ("policy a builtin that exits", {"listeners": ({"policy": "sys.exit"},)},
             "listener[0].policy", "is not a policy class"),
            ("policy an object that exits", {"listeners": ({"policy": "builtins.exit"},)},
             "listener[0].policy", "exited when called"),
            ("policy the interface", {"listeners": ({"policy": "relaygw.policy.IPolicy"},)},
             "listener[0].policy", "is not a policy class"),
            ("resolver a name", {"relay": {"resolver": "dns.example"}}, "relay.resolver", "is not an address"),
            ("smarthost with an empty port", {"relay": {"smarthosts": ["mx.example:"]}},
             "relay.smarthosts", "empty port"),
            ("route domain not a name", {"routes": ({"domains": ["a b"], "smarthosts": ["[127.0.0.1]:25"]},)},
             "route[0].domains", "not a valid host name"),
        ]

    def text(self, spec):
        if isinstance(spec, str):
            key = spec.partition(" ")[0]
            return "".join(l for l in configText(self.dir).splitlines(True) if not l.startswith(key + " ")) + spec
        return configText(self.dir, **spec)

    def check(self, spec):
        """The errors of the config C{spec}; C{[]} if it passed."""
        path = os.path.join(self.dir, "relaygw.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.text(spec))
        try:
            config.load(path, environment=True)
        except config.ConfigError as e:
            return e.errors
        return []

    def test_everyBrokenConfigRefused(self):
        rows = self.rows()
        self.assertGreaterEqual(len(rows), 37)
        wrong = []
        for what, spec, key, words in rows:
            errors = self.check(spec)
            if not any(e.startswith("relaygw.toml: %s: " % key) and words in e for e in errors):
                wrong.append((what, errors))
            wrong += [(what, e) for e in errors if not LINE.match(e) or "invalid literal" in e]
        self.assertEqual(wrong, [])

    def test_goodConfigPasses(self):
        path = os.path.join(self.dir, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(self.dir, listeners=(dict(self.tls, hostname="[192.0.2.1]"),
                                                    {"endpoint": r"tcp:0:interface=\:\:1", "hostname": "a-b.example."}),
                               admin={"endpoint": "tcp:0:interface=127.0.0.1"},
                               process={"workers": 2, "cpu_affinity": [1, 0]}))
        c = config.load(path, environment=True)
        self.assertEqual(c.listeners[1].hostname, "a-b.example.")
        self.assertEqual(c.process.cpu_affinity, (1, 0))

    def test_portSharedAcrossAddressFamilies(self):
        """
        The IPv4 wildcard (tcp:PORT) and one IPv6 address can listen on one
        port, as the kernel binds them; the IPv6 wildcard (dual-stack) takes
        the port on every address, IPv4 ones included.
        """
        self.assertEqual(self.check({"listeners": ({"endpoint": "tcp:2525"},
                                                   {"endpoint": r"tcp6:2525:interface=\:\:1"})}), [])
        self.assertEqual(self.check({"listeners": ({"endpoint": r"tcp6:2525:interface=\:\:1"},
                                                   {"endpoint": "tcp:2525:interface=127.0.0.1"})}), [])
        for second in ("tcp:2525:interface=127.0.0.1", r"tcp6:2525:interface=\:\:1"):
            errors = self.check({"listeners": ({"endpoint": "tcp6:2525"}, {"endpoint": second})})
            self.assertEqual(len(errors), 1, errors)
            self.assertIn("listener[1].endpoint: port 2525 is also listener[0].endpoint's", errors[0])

    def test_hostNameInterfaceInTheEndpointsFamily(self):
        """
        A host name for the interface is looked up in the endpoint's
        family, as binding does: tcp:PORT:interface=localhost binds
        127.0.0.1, and shares its port with a listener on 127.0.0.1, though
        the resolver gives ::1 first (as with Debian's /etc/hosts), which
        the check took before and so passed what start could not bind.
        """
        import socket

        real = socket.getaddrinfo

        def getaddrinfo(host, port, family=0, *args, **kw):
            if host != "localhost":
                return real(host, port, family, *args, **kw)
            answers = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
                       (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
            return [a for a in answers if family in (0, a[0])]

        self.patch(socket, "getaddrinfo", getaddrinfo)
        errors = self.check({"listeners": ({"endpoint": "tcp:2525:interface=localhost"},
                                           {"endpoint": "tcp:2525:interface=127.0.0.1"})})
        self.assertEqual(errors, ["relaygw.toml: listener[1].endpoint: port 2525 is also listener[0].endpoint's "
                                  "(expected one of its own)"])
        self.assertEqual(self.check({"listeners": ({"endpoint": "tcp:2525:interface=localhost"},
                                                   {"endpoint": r"tcp6:2525:interface=\:\:1"})}), [])

    def test_quotedKeysNamedOnOneLine(self):
        """
        Unknown keys quoted with a line break, a terminal escape or a NUL
        in them are named as TOML writes them: each error stays one line,
        with nothing a terminal would act on (before: the line broke in
        two, or carried the escape).
        """
        path = os.path.join(self.dir, "relaygw.toml")
        with open(path, "w") as f:
            f.write('"\\u001b[2J" = 1\n' + configText(self.dir).replace(
                "[spool]\n", '[spool]\n"a\\nb" = 1\n"dot.ted" = 2\n"\\u0000" = 3\n'))
        with self.assertRaises(config.ConfigError) as e:
            config.load(path)
        self.assertEqual(e.exception.errors, [
            "relaygw.toml: \"\\u001b[2J\": unknown key (expected one of spool, relay, admin, log, process, listener, "
            "route)",
            "relaygw.toml: spool.\"\\u0000\": unknown key (expected one of the keys etc/relaygw.toml lists)",
            "relaygw.toml: spool.\"a\\nb\": unknown key (expected one of the keys etc/relaygw.toml lists)",
            "relaygw.toml: spool.\"dot.ted\": unknown key (expected one of the keys etc/relaygw.toml lists)"])

    def test_everyErrorAtOnce(self):
        errors = self.check({"listeners": ({"hostname": "bad host", "max_recipients": 0, "policy": "no.such"},),
                             "relay": {"retry_min": 10, "retry_max": 5},
                             "spool": {"directory": self.afile}})
        keys = sorted(e.split(": ")[1] for e in errors)
        self.assertEqual(keys, ["listener[0].hostname", "listener[0].max_recipients", "listener[0].policy",
                                "relay.retry_min", "spool.directory"])


class CommandLineTests(unittest.TestCase):
    """twistd relaygw: --check-config and start print the same lines, and no traceback."""

    def write(self, text):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(text)
        return d, path

    def test_startRefusesWhatTheCheckRefuses(self):
        d, path = self.write(configText("/nonexistent-dir-for-test", listeners=(
            {"tls_certificate": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem", "policy": "no.Such",
             "endpoint": "tcp:99999"},), relay={"retry_min": 9, "retry_max": 1}) + "idle_timeout = nan\n")
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config")
        self.assertEqual(code, 1)
        lines = err.splitlines()
        self.assertEqual(len(lines), 6, err)
        for line in lines:
            self.assertRegex(line, LINE)
        startCode, startOut, startErr = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual(startCode, 1)
        self.assertEqual(startErr.splitlines(), lines)
        self.assertNotIn("Traceback", startOut + startErr)

    def test_escapedIPv6WithWorkers(self):
        d, path = self.write(configText(os.path.abspath(self.mktemp()),
                                        listeners=({"endpoint": r"tcp:2525:interface=\:\:1"},),
                                        process={"workers": 2}))
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("ok", out)

    def test_portInUseEndsStartWithOneLine(self):
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d, path = self.write(configText(os.path.abspath(self.mktemp()),
                                        listeners=({"endpoint": "tcp:%d:interface=127.0.0.1" % port},)))
        code, out, err = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual(code, 1)
        self.assertIn("relaygw.toml: listener[0].endpoint: cannot listen: Address already in use", out)
        self.assertNotIn("Traceback", out + err)

    def test_spoolLeftByAnotherUser(self):
        """
        A spool whose areas and lock file another user made (a first start
        as root, then the service's own user) is refused by the check and
        at start with one line naming each, not accepted and then
        answering every message 451 (or ending start with a traceback);
        so is a Maildir whose new/ the gateway cannot write.
        """
        d = os.path.abspath(self.mktemp())
        spool, outbox = os.path.join(d, "spool"), os.path.join(d, "outbox")
        os.makedirs(os.path.join(spool, "queue"))
        os.makedirs(os.path.join(outbox, "new"))
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        with open(os.path.join(spool, "lock"), "w"):
            pass
        if os.getuid() == 0:
            # Root may write anywhere: the check and the start run as another user, for whom the areas are not
            # writable (the spool directory itself is).
            user = 65534
            os.chown(spool, user, user)
            os.chown(outbox, user, user)
            for top in (os.path.dirname(d), d):
                os.chmod(top, 0o755)
            if twistdCommand("--help", cwd=d, user=user)[0] != 0:
                raise unittest.SkipTest("uid %d cannot run twistd from here" % (user,))
        else:
            user = None
            os.chmod(os.path.join(spool, "queue"), 0o555)
            os.chmod(os.path.join(spool, "lock"), 0o444)
            os.chmod(os.path.join(outbox, "new"), 0o555)
        for area in (os.path.join(spool, "queue"), os.path.join(outbox, "new")):
            self.addCleanup(os.chmod, area, 0o755)
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config", cwd=d, user=user)
        self.assertEqual(code, 1, out + err)
        lines = err.splitlines()
        self.assertEqual(lines, [
            "relaygw.toml: spool.directory: %s is not writable (expected a directory the gateway may write)"
            % (os.path.join(spool, "queue"),),
            "relaygw.toml: spool.directory: %s is not writable (expected a lock file the gateway may write)"
            % (os.path.join(spool, "lock"),),
            "relaygw.toml: relay.maildir: %s is not writable (expected a directory the gateway may write)"
            % (os.path.join(outbox, "new"),)])
        startCode, startOut, startErr = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d, user=user)
        self.assertEqual((startCode, startErr.splitlines()), (1, lines))
        self.assertNotIn("Traceback", startOut + startErr)

    def test_spoolLayoutRefusedByTheCheck(self):
        """
        A spool area that is a symbolic link or a file, or a lock file that
        is a directory, which start refuses, is refused by the check too,
        with the same line at start: the check said ok before.
        """
        d = os.path.abspath(self.mktemp())
        spool = os.path.join(d, "spool")
        os.makedirs(os.path.join(d, "elsewhere"))
        os.makedirs(os.path.join(spool, "lock"))
        os.symlink(os.path.join(d, "elsewhere"), os.path.join(spool, "queue"))
        with open(os.path.join(spool, "state"), "w"):
            pass
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config", cwd=d)
        self.assertEqual(code, 1, out + err)
        lines = err.splitlines()
        self.assertEqual(lines, [
            "relaygw.toml: spool.directory: %s is a symbolic link, not a directory (expected the spool's own "
            "directory)" % (os.path.join(spool, "queue"),),
            "relaygw.toml: spool.directory: %s is not a directory (expected the spool's own directory)"
            % (os.path.join(spool, "state"),),
            "relaygw.toml: spool.directory: %s is a directory, not a lock file (expected the spool's lock file)"
            % (os.path.join(spool, "lock"),)])
        startCode, startOut, startErr = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual((startCode, startErr.splitlines()), (1, lines))

    def test_danglingLinksRefusedByTheCheck(self):
        """
        A spool, Maildir or self-signed certificate directory that is a
        symbolic link to nothing (its target not mounted, say), which start
        cannot create, is refused by the check with a line naming it, and
        start says the same lines: the check said ok before, and start
        ended with a traceback.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        for name in ("spool", "outbox", "tls"):
            os.symlink(os.path.join(d, "unmounted-" + name), os.path.join(d, name))
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d, listeners=({"tls_certificate": os.path.join(d, "tls", "cert.pem"),
                                              "tls_key": os.path.join(d, "tls", "key.pem"),
                                              "tls_self_signed": True},)))
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config", cwd=d)
        self.assertEqual(code, 1, out + err)
        lines = err.splitlines()
        tls = os.path.join(d, "tls")
        self.assertEqual(lines, [
            "relaygw.toml: spool.directory: %s is a symbolic link to nothing (expected a directory)"
            % (os.path.join(d, "spool"),),
            "relaygw.toml: relay.maildir: %s is a symbolic link to nothing (expected a directory)"
            % (os.path.join(d, "outbox"),),
            "relaygw.toml: listener[0].tls_certificate: %s is a symbolic link to nothing (expected a directory)"
            % (tls,),
            "relaygw.toml: listener[0].tls_key: %s is a symbolic link to nothing (expected a directory)" % (tls,)])
        startCode, startOut, startErr = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual((startCode, startErr.splitlines()), (1, lines))
        self.assertNotIn("Traceback", startOut + startErr)

    def test_namesTooLongRefusedByTheCheck(self):
        """
        A spool, Maildir or self-signed certificate to create with a name
        longer than the file system takes is refused by the check, and
        start says the same lines: the check said ok before, and start
        ended with one line of its own (the spool) or a traceback (the
        Maildir, the certificate).
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        spool, outbox = os.path.join(d, "s" * 256), os.path.join(d, "outbox", "o" * 256, "box")
        cert = os.path.join(d, "tls", "c" * 256)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d, spool={"directory": spool}, relay={"maildir": outbox}, listeners=(
                {"tls_certificate": cert, "tls_key": os.path.join(d, "tls", "key.pem"), "tls_self_signed": True},)))
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config", cwd=d)
        self.assertEqual(code, 1, out + err)
        lines = err.splitlines()
        self.assertEqual(lines, [
            "relaygw.toml: spool.directory: cannot create %s: a name over 255 octets (expected shorter names)"
            % (spool,),
            "relaygw.toml: relay.maildir: cannot create %s: a name over 255 octets (expected shorter names)"
            % (outbox,),
            "relaygw.toml: listener[0].tls_certificate: cannot create %s: a name over 255 octets (expected shorter "
            "names)" % (cert,)])
        startCode, startOut, startErr = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual((startCode, startErr.splitlines()), (1, lines))
        self.assertNotIn("Traceback", startOut + startErr)
        self.assertEqual(os.listdir(d), ["relaygw.toml"])

    def test_maildirStartCannotMakeIsOneLine(self):
        """
        A Maildir the checks pass but the file system will not make (as
        root, where /proc passes for writable) ends start with one line
        naming the key, not a traceback.
        """
        if os.getuid() != 0:
            raise unittest.SkipTest("only root finds /proc writable")
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        outbox = "/proc/relaygw-test-%d/outbox" % (os.getpid(),)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d, relay={"maildir": outbox}))
        self.assertEqual(twistdCommand("relaygw", "--config", path, "--check-config", cwd=d)[::2], (0, ""))
        code, out, err = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual((code, err), (1, "relaygw.toml: relay.maildir: cannot create %s: No such file or directory "
                                          "(expected a directory the gateway may write)\n"
                                          % (os.path.dirname(outbox),)))
        self.assertNotIn("Traceback", out)

    def test_maildirThatCannotBeMadeIsAConfigError(self):
        """
        Making the gateway with a Maildir that cannot be made (past the
        checks: the disk full, a race) raises the config error line that
        start prints and a reload logs.
        """
        from relaygw.service import makeService

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        with open(os.path.join(d, "a-file"), "w"):
            pass
        outbox = os.path.join(d, "a-file", "outbox")
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d, relay={"maildir": outbox}))
        with self.assertRaises(config.ConfigError) as e:
            makeService(config.load(path))
        self.assertEqual(e.exception.errors, [
            "relaygw.toml: relay.maildir: cannot create %s: Not a directory (expected a directory the gateway may "
            "write)" % (outbox,)])

    def test_twistdSwitchingUserRefused(self):
        """
        C{twistd --uid/--gid} switches user after the service is made: the
        spool, its lock and the log file would be the starting user's
        (root's), and the first write as the other user a traceback.  Start
        refuses them with one line instead, before it touches the spool.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        other = 65534 if os.getuid() != 65534 else 65533
        for option in ("--uid=%d" % (other,), "--gid=%d" % (other,)):
            code, out, err = twistdCommand("-n", "--pidfile=", option, "relaygw", "--config", path, cwd=d)
            self.assertEqual((code, err), (1, "relaygw: twistd --uid and --gid are not supported (expected twistd "
                                              "started as the user the gateway runs as, e.g. systemd's User=)\n"))
            self.assertNotIn("Traceback", out)
            self.assertFalse(os.path.exists(os.path.join(d, "spool")))

    def test_twistdLogDestinationsRefused(self):
        """
        The gateway writes its own log (C{--logfile}, else standard output
        with C{-n}, else C{twistd.log}): twistd's C{--syslog} and
        C{--logger} would be passed over without a word, the lines going to
        a file in the working directory, so start refuses them.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        for option in ("--syslog", "--logger=twisted.logger.textFileLogObserver"):
            code, out, err = twistdCommand("-n", "--pidfile=", option, "relaygw", "--config", path, cwd=d)
            self.assertEqual((code, err), (1, "relaygw: twistd --syslog and --logger are not supported (expected "
                                              "--logfile, or standard output with -n)\n"), option)
            self.assertFalse(os.path.exists(os.path.join(d, "spool")))
            self.assertFalse(os.path.exists(os.path.join(d, "twistd.log")))

    def test_pidFileNotWritableIsOneLine(self):
        """
        A C{--pidfile} twistd cannot write (its directory missing, or a
        file) ends start with one line, before the spool
        is taken, not with a traceback once the service is made; nothing
        is left where it was tried.
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        for name, why in (("missing/twistd.pid", "No such file or directory"),
                          ("relaygw.toml/twistd.pid", "Not a directory")):
            pidfile = os.path.join(d, name)
            for daemon in ((), ("-n",)):
                code, out, err = twistdCommand(*daemon, "--pidfile=" + pidfile, "--logfile=" + os.path.join(d, "log"),
                                               "relaygw", "--config", path, cwd=d)
                self.assertEqual((code, err), (1, "%s: cannot write the pid file: %s\n" % (pidfile, why)))
                self.assertNotIn("Traceback", out)
                self.assertFalse(os.path.exists(os.path.join(d, "spool")))
        self.assertEqual(os.listdir(d), ["relaygw.toml"])

    def test_twistdChrootRefused(self):
        """
        C{twistd --chroot} changes root after the service is made: start
        refuses it with one line, before it touches the spool, where it
        ended with a misleading "cannot listen: No such file or directory".
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relaygw.toml")
        with open(path, "w") as f:
            f.write(configText(d))
        code, out, err = twistdCommand("-n", "--pidfile=", "--chroot=" + d, "relaygw", "--config", path, cwd=d)
        self.assertEqual((code, err), (1, "relaygw: twistd --chroot is not supported (expected the gateway started "
                                          "in the root it runs in, e.g. systemd's RootDirectory=)\n"))
        self.assertNotIn("cannot listen", out)
        self.assertEqual(os.listdir(d), ["relaygw.toml"])

    def test_controlCharactersEscaped(self):
        """
        A path with a terminal escape in the file, and a file name with a
        line break: the check and start print each error on one line, the
        characters escaped (before: raw, the escape acted on by the
        terminal and the line broken in two).
        """
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "relay\ngw.toml")
        with open(path, "w") as f:
            f.write(configText(d, listeners=({"credentials": "CREDENTIALS"},)).replace(
                '"CREDENTIALS"', '"/nonexistent\\u001b[2J/passwd"'))
        line = ("relay\\x0agw.toml: listener[0].credentials: cannot read /nonexistent\\x1b[2J/passwd: No such file or "
                "directory (expected a password file (relaygw-passwd))\n")
        self.assertEqual(twistdCommand("relaygw", "--config", path, "--check-config", cwd=d)[::2], (1, line))
        code, out, err = twistdCommand("-n", "--pidfile=", "relaygw", "--config", path, cwd=d)
        self.assertEqual((code, err), (1, line))

    def test_byteOrderMarkTaken(self):
        """A config saved with a UTF-8 byte-order mark (some editors add one) is read as without it."""
        d, path = self.write(configText(os.path.abspath(self.mktemp())))
        with open(path, "rb") as f:
            text = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + text)
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("ok", out)

    def test_fifoRefusedAtOnce(self):
        """A FIFO (or a device) for a config file is refused, not read: reading it could wait for ever."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        fifo = os.path.join(d, "relaygw.toml")
        os.mkfifo(fifo)
        for args in (("relaygw", "--config", fifo, "--check-config"), ("-n", "--pidfile=", "relaygw", "--config", fifo)):
            code, out, err = twistdCommand(*args, cwd=d)  # (before: waited for a writer until killed)
            self.assertEqual((code, err), (1, "relaygw.toml: not a regular file (expected a TOML file)\n"))

    def test_deepNestingIsOneLine(self):
        d, path = self.write("x = " + "[" * 3000 + "]" * 3000 + "\n")
        code, out, err = twistdCommand("relaygw", "--config", path, "--check-config")
        self.assertEqual(code, 1)
        self.assertEqual(err, "relaygw.toml: arrays or tables nested too deeply (expected TOML a few levels deep)\n")

    def test_workerIndexNotANumber(self):
        d, path = self.write(configText(os.path.abspath(self.mktemp())))
        code, out, err = twistdCommand("-n", "--pidfile=", "relaygw", "--worker", "abc", "--config", path, cwd=d)
        self.assertEqual(code, 1)
        self.assertIn("--worker: 'abc' is not a worker index (expected 0 or more)", out + err)
        self.assertNotIn("Traceback", out + err)
