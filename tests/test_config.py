"""Configuration validation, --check-config, and the twistd plugin."""

import os

from twisted.trial import unittest

from relaygw import config
from relaygw.testing import configText
from tests.processes import twistdCommand

MINIMAL = '[[listener]]\nname = "in"\nendpoint = "tcp:2525:interface=127.0.0.1"\n'


def twistd(*args, cwd=None):
    """L{twistdCommand} with its standard output and error together."""
    code, out, err = twistdCommand(*args, cwd=cwd)
    return code, out + err


class ParseTests(unittest.TestCase):
    def assertConfigError(self, text, expected):
        with self.assertRaises(config.ConfigError) as cm:
            config.parse(text, "/etc/relaygw/relaygw.toml")
        self.assertEqual(str(cm.exception), expected)

    def test_defaults(self):
        c = config.parse(MINIMAL, "/etc/relaygw/relaygw.toml")
        l = c.listeners[0]
        self.assertEqual((l.max_message_size, l.max_recipients, l.max_connections, l.idle_timeout),
                         (26214400, 100, 1000, 300))
        self.assertEqual(l.extensions, ())
        self.assertEqual(c.spool.directory, "/etc/relaygw/var/spool")

    def test_routeTakesRelaySettings(self):
        """
        A route takes what it does not set of [relay]'s delivery settings, as
        a Postfix transport takes main.cf's; never the smarthosts or the
        credentials.
        """
        c = config.parse('[relay]\nsmarthosts = ["[127.0.0.1]:2700"]\ncommand_timeout = 20\ntls = "none"\n'
                         'destination_concurrency = 3\nauth_user = "u"\nauth_password = "p"\n'
                         '[[route]]\ndomains = ["a.example"]\nmx = true\ndestination_concurrency = 5\n'
                         + MINIMAL, "/etc/relaygw/relaygw.toml")
        [route] = c.routes
        self.assertEqual((route.command_timeout, route.tls, route.destination_concurrency), (20, "none", 5))
        self.assertEqual((route.smarthosts, route.auth_user, route.auth_password), ((), None, None))

    def test_unknownKey(self):
        self.assertConfigError(MINIMAL + "colour = 1\n", "relaygw.toml: listener[0].colour: unknown key "
                               "(expected one of the keys etc/relaygw.toml lists)")
        self.assertConfigError("[spool]\nfoo = 1\n" + MINIMAL, "relaygw.toml: spool.foo: unknown key "
                               "(expected one of the keys etc/relaygw.toml lists)")
        self.assertConfigError("[bogus]\n" + MINIMAL, "relaygw.toml: bogus: unknown key "
                               "(expected one of spool, relay, admin, log, process, listener, route)")

    def test_wrongType(self):
        self.assertConfigError(MINIMAL + 'max_recipients = "many"\n',
                               "relaygw.toml: listener[0].max_recipients: wrong type string (expected an integer)")
        self.assertConfigError(MINIMAL + "require_tls = 1\n", "relaygw.toml: listener[0].require_tls: wrong type integer (expected true or false)")
        self.assertConfigError(MINIMAL + "max_recipients = true\n",
                               "relaygw.toml: listener[0].max_recipients: wrong type boolean (expected an integer)")

    def test_badCIDR(self):
        with self.assertRaises(config.ConfigError) as cm:
            config.parse(MINIMAL + 'trusted_peers = ["10.0.0.0/33"]\n', "relaygw.toml")
        self.assertTrue(str(cm.exception).startswith("relaygw.toml: listener[0].trusted_peers: "))

    def test_badEndpoint(self):
        with self.assertRaises(config.ConfigError) as cm:
            config.parse('[[listener]]\nname = "x"\nendpoint = "nosuch:1"\n', "relaygw.toml")
        self.assertTrue(str(cm.exception).startswith("relaygw.toml: listener[0].endpoint: "))

    def test_sslEndpointRefused(self):
        """
        Twisted's ssl: endpoint takes none of the listener's TLS settings
        and ends a session at the client's close_notify, replies still due:
        refused, pointing at implicit_tls.
        """
        for endpoint in ("ssl:2465:privateKey=k.pem:certKey=c.pem", "SSL:2465"):
            self.assertConfigError(
                '[[listener]]\nname = "x"\nendpoint = "%s"\n' % endpoint,
                "relaygw.toml: listener[0].endpoint: ssl: endpoints have none of the listener's TLS settings "
                "(expected tcp:PORT with implicit_tls = true and tls_certificate)")

    def test_badExtension(self):
        self.assertConfigError(MINIMAL + 'extensions = ["xbogus"]\n',
                               "relaygw.toml: listener[0].extensions: 'xbogus' is not allowed "
                               "(expected any of xclient, xremoteip, xsetcontext, xdumpcontext)")

    def test_listenerRequired(self):
        self.assertConfigError("", "relaygw.toml: listener: at least one [[listener]] table is required "
                                   "(expected [[listener]])")
        self.assertConfigError('[[listener]]\nname = "x"\n', "relaygw.toml: listener[0].endpoint: missing required key (expected a string)")

    def test_duplicateName(self):
        second = MINIMAL.replace("2525", "2526")
        self.assertConfigError(MINIMAL + second, "relaygw.toml: listener[1].name: duplicate listener name 'in' "
                                                 "(expected a name of its own)")

    def test_defaultHostnameIsTheMachines(self):
        """
        A listener greets with the machine's host name unless it says
        otherwise, as Postfix's myhostname: with .localdomain when it has no
        dot, and a fixed name when it is none that may go on the wire.
        """
        for machine, expected in (("vm", "vm.localdomain"), ("Mail.Example.NET.", "mail.example.net"),
                                  ("bad_name", "relaygw.localdomain"), ("", "relaygw.localdomain")):
            self.patch(config.socket, "gethostname", lambda machine=machine: machine)
            self.assertEqual(config.defaultHostname(), expected)
        self.assertEqual(config.parse(MINIMAL, "/x/relaygw.toml").listeners[0].hostname,
                         config.ListenerConfig.hostname)

    def test_contractKeysAccepted(self):
        text = MINIMAL + (
            'hostname = "relaygw.localdomain"\nmax_message_size = 1\nmax_recipients = 1\n'
            'max_connections = 1\nidle_timeout = 300\ntrusted_peers = ["10.0.0.0/8", "2001:db8::/32"]\n'
            'extensions = ["xclient"]\nrelay_networks = []\ntls_certificate = "c.pem"\ntls_key = "k.pem"\n'
            'require_tls = false\nalways_allow = false\ncredentials = "users"\nproxy_protocol = false\n'
            'proxy_trusted = []\n'
        )
        text = '[relay]\nmaildir = "o"\nsmarthosts = ["[127.0.0.1]:2600"]\ntls = "may"\n[admin]\n' \
               'endpoint = "tcp:8025:interface=127.0.0.1"\n' + text
        c = config.parse(text, "/x/relaygw.toml")
        self.assertEqual(c.relay.smarthosts, ("[127.0.0.1]:2600",))
        self.assertEqual(c.listeners[0].tls_certificate, "/x/c.pem")

    def test_embeddedDefault(self):
        c = config.loadDefault("/srv")
        self.assertEqual(c.listeners[0].endpoint, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(c.spool.directory, "/srv/var/spool")
        self.assertEqual(c.relay.maildir, "/srv/var/outbox")

    def test_hostPort(self):
        self.assertEqual(config.parseHostPort("[127.0.0.1]:2600"), ("127.0.0.1", 2600))
        self.assertEqual(config.parseHostPort("[::1]:25"), ("::1", 25))
        self.assertEqual(config.parseHostPort("mx.example.net"), ("mx.example.net", 25))
        self.assertRaises(ValueError, config.parseHostPort, "[::1]:99999")


class TwistdTests(unittest.TestCase):
    """The plugin as the README's set-up installs it."""

    def write(self, text):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_pluginListed(self):
        code, out = twistd("--help")
        self.assertEqual(code, 0)
        self.assertIn("relaygw", out)

    def test_pluginHelpDocumentsOptions(self):
        code, out = twistd("relaygw", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--config", out)
        self.assertIn("--check-config", out)

    def test_checkConfigGood(self):
        path = self.write(configText(os.path.abspath(self.mktemp())))
        code, out = twistd("relaygw", "--config", path, "--check-config")
        self.assertEqual(code, 0, out)
        self.assertIn("ok", out)

    def test_checkConfigBad(self):
        path = self.write(MINIMAL + "max_recipients = -1\n")
        code, out = twistd("relaygw", "--config", path, "--check-config")
        self.assertNotEqual(code, 0)
        self.assertIn("%s: listener[0].max_recipients: must be positive" % os.path.basename(path), out)

    def test_startRefusesBadConfig(self):
        path = self.write(MINIMAL + 'trusted_peers = ["nonsense"]\n')
        code, out = twistd("-n", "--pidfile=", "relaygw", "--config", path)
        self.assertNotEqual(code, 0)
        self.assertIn("listener[0].trusted_peers", out)
        self.assertNotIn("Traceback", out)


class ServiceTests(unittest.TestCase):
    def test_embeddedDefaultGeneratesCertificate(self):
        from twisted.internet import reactor

        from relaygw.service import makeService

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        svc = makeService(config.loadDefault(base), reactor)
        self.assertTrue(os.path.exists(os.path.join(base, "var", "tls", "cert.pem")))
        self.assertTrue(os.path.exists(os.path.join(base, "var", "tls", "key.pem")))
        self.assertIsNotNone(svc.factories[0].tls)

    def test_warnsAboutTrustOnPublicAddress(self):
        from twisted.internet import reactor
        from twisted.logger import globalLogPublisher

        from relaygw.service import makeService

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d = os.path.abspath(self.mktemp())
        public = config.parse(configText(d, listeners=({"endpoint": "tcp:2525", "extensions": ["xclient"]},
                                                       {"name": "aa", "endpoint": "tcp:2526:interface=0.0.0.0",
                                                        "always_allow": True})), os.path.join(d, "r.toml"))
        makeService(public, reactor)
        local = config.parse(configText(d, listeners=({"extensions": ["xclient"]},
                                                      {"name": "t", "endpoint": "tcp:2527", "extensions": ["xclient"],
                                                       "trusted_peers": ["10.0.0.0/8"]})),
                             os.path.join(d, "r.toml"))
        makeService(local, reactor)
        warnings = [e for e in events if "without trusted_peers" in e.get("log_format", "")]
        self.assertEqual(sorted(e["name"] for e in warnings), ["aa", "l0"])
