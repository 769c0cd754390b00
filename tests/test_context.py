"""
relaygw.context.ValidationContext: gateway-owned keys, client keys set with
XSETCONTEXT (all or nothing, limited), and the message-level dictionary
(protocol.md sections 1, 12, 14; checklist 76, 77, 80).
"""

import json

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial import unittest

from relaygw import context
from relaygw.context import ContextError, ValidationContext, display, reservedKey
from relaygw.proxy import ProxyInfo

#: protocol.md section 14, verbatim (proxy_* and rcptto_* are prefixes).
DOC_CONNECTION_KEYS = """
    ehlo_domain ehlo_string auth_user auth_status auth_name can_relay tls tls_cipher
    tls_client_cert_subject tls_client_verified connection_message_count connection_rcpt_count
    remote_ip remote_port remote_name remote_name_status local_ip local_port protocol peer_ip
    peer_port trusted
""".split()
DOC_MESSAGE_KEYS = "mailfrom_string mailfrom_localpart mailfrom_domain message_rcpt_count".split()
#: Keys the gateway itself sets at run time (protocol.py, verbs, spool).
RUNTIME_KEYS = "session_id listener helo_name dest_ip dest_port overridden queue_id size rcptto".split()


def fresh():
    return ValidationContext(remote_ip="127.0.0.1", session_id="abc", trusted=True)


class OwnedKeyTests(unittest.TestCase):
    """Checklist 77: gateway-owned keys can never be set by a client."""

    def test_documentedKeysAreReserved(self):
        for key in DOC_CONNECTION_KEYS + DOC_MESSAGE_KEYS + RUNTIME_KEYS:
            self.assertTrue(reservedKey(key), key)

    def test_reservedPrefixes(self):
        for key in ("__bypass_x", "__", "proxy_peer_ip", "proxy_anything", "rcptto_0", "rcptto_domain", "#x"):
            self.assertTrue(reservedKey(key), key)

    def test_ordinaryKeysAreNotReserved(self):
        for key in ("binding", "a", "b", "Remote_IP", "x.y-z_1", "proxy", "_private", "tlsx"):
            self.assertFalse(reservedKey(key), key)

    def test_setClientKeysRefusesEveryOwnedKey(self):
        for key in DOC_CONNECTION_KEYS + DOC_MESSAGE_KEYS + RUNTIME_KEYS + ["__bypass_x", "proxy_peer_ip"]:
            ctx = fresh()
            before = dict(ctx.connection)
            self.assertRaises(ContextError, ctx.setClientKeys, [(key, "forged")])
            self.assertEqual(ctx.connection, before, key)
            self.assertEqual(ctx.clientKeys, set())

    def test_ownedValueKeptAfterRefusal(self):
        ctx = fresh()
        self.assertRaises(ContextError, ctx.setClientKeys, [("remote_ip", "192.0.2.1")])
        self.assertRaises(ContextError, ctx.setClientKeys, [("trusted", "no")])
        self.assertEqual(ctx["remote_ip"], "127.0.0.1")
        self.assertIs(ctx["trusted"], True)

    def test_keysAreCaseSensitive(self):
        ctx = fresh()
        ctx.setClientKeys([("REMOTE_IP", "x")])
        self.assertEqual((ctx["REMOTE_IP"], ctx["remote_ip"]), ("x", "127.0.0.1"))


class KeyNameTests(unittest.TestCase):
    def test_badNamesRefused(self):
        for name in ("", "a b", "a=b", "a/b", "k" * 65, "caf\u00e9", "a:b", "a\tb", "a\nb", "a\n", "\na"):
            ctx = fresh()
            self.assertRaises(ContextError, ctx.setClientKeys, [(name, "1")])
            self.assertNotIn(name, ctx.connection)

    def test_goodNames(self):
        ctx = fresh()
        names = ["a", "k" * 64, "A-Z.a_z-0.9", "_x", "9"]
        ctx.setClientKeys([(n, "v") for n in names])
        for n in names:
            self.assertEqual(ctx[n], "v")
        self.assertEqual(ctx.clientKeys, set(names))


class ValueTests(unittest.TestCase):
    def test_printableValuesAccepted(self):
        ctx = fresh()
        ctx.setClientKeys([("empty", ""), ("space", "a b"), ("all", "".join(map(chr, range(0x20, 0x7F))))])
        self.assertEqual(ctx["empty"], "")
        self.assertEqual(ctx["space"], "a b")

    def test_nonPrintableValuesRefused(self):
        for value in ("a\rb", "a\nb", "\x00", "\t", "\x7f", "caf\u00e9", "\u20ac"):
            ctx = fresh()
            self.assertRaises(ContextError, ctx.setClientKeys, [("k", value)])
            self.assertNotIn("k", ctx.connection)

    def test_valueLengthLimit(self):
        self.assertEqual(context.MAX_VALUE_LENGTH, 1024)
        ctx = fresh()
        ctx.setClientKeys([("k", "v" * 1024)])
        self.assertEqual(len(ctx["k"]), 1024)
        self.assertRaises(ContextError, ctx.setClientKeys, [("k", "w" * 1025)])
        self.assertEqual(ctx["k"], "v" * 1024)

    def test_laterValueReplaces(self):
        ctx = fresh()
        ctx.setClientKeys([("a", "1")])
        ctx.setClientKeys([("a", "2")])
        self.assertEqual(ctx["a"], "2")
        ctx.setClientKeys([("a", "3"), ("a", "4")])
        self.assertEqual(ctx["a"], "4")
        self.assertEqual(ctx.clientKeys, {"a"})


class AllOrNothingTests(unittest.TestCase):
    """Checklist 77: a refused pair means no pair of the call is applied."""

    def check(self, pairs):
        ctx = fresh()
        ctx.setClientKeys([("old", "1")])
        before, keys = dict(ctx.connection), set(ctx.clientKeys)
        self.assertRaises(ContextError, ctx.setClientKeys, pairs)
        self.assertEqual(ctx.connection, before)
        self.assertEqual(ctx.clientKeys, keys)

    def test_ownedKeyLast(self):
        self.check([("ok", "1"), ("old", "2"), ("remote_ip", "192.0.2.1")])

    def test_ownedKeyFirst(self):
        self.check([("trusted", "yes"), ("ok", "1")])

    def test_badValueInTheMiddle(self):
        self.check([("ok", "1"), ("bad", "a\rb"), ("ok2", "2")])

    def test_valueTooLong(self):
        self.check([("ok", "1"), ("big", "v" * 1025)])

    def test_badName(self):
        self.check([("ok", "1"), ("a b", "2")])


class KeyLimitTests(unittest.TestCase):
    def test_limitIs64(self):
        self.assertEqual(context.MAX_CLIENT_KEYS, 64)

    def test_64KeysThenRefused(self):
        ctx = fresh()
        for i in range(64):
            ctx.setClientKeys([("k%d" % i, "1")])
        self.assertEqual(len(ctx.clientKeys), 64)
        self.assertRaises(ContextError, ctx.setClientKeys, [("onemore", "1")])
        self.assertNotIn("onemore", ctx.connection)
        # Replacing existing keys does not count against the limit.
        ctx.setClientKeys([("k0", "2"), ("k63", "3")])
        self.assertEqual((ctx["k0"], ctx["k63"]), ("2", "3"))

    def test_oneCallOverTheLimitSetsNothing(self):
        ctx = fresh()
        ctx.setClientKeys([("k%d" % i, "1") for i in range(63)])
        self.assertRaises(ContextError, ctx.setClientKeys, [("x", "1"), ("y", "1")])
        self.assertNotIn("x", ctx.connection)
        self.assertEqual(len(ctx.clientKeys), 63)
        ctx.setClientKeys([("x", "1")])
        self.assertEqual(len(ctx.clientKeys), 64)

    def test_65InOneCallRefused(self):
        ctx = fresh()
        self.assertRaises(ContextError, ctx.setClientKeys, [("k%d" % i, "1") for i in range(65)])
        self.assertEqual(ctx.clientKeys, set())

    def test_gatewayKeysDoNotCount(self):
        ctx = ValidationContext(**{"g%d" % i: i for i in range(100)})
        ctx.setClientKeys([("k%d" % i, "1") for i in range(64)])
        self.assertEqual(len(ctx.clientKeys), 64)


class GatewayUpdateTests(unittest.TestCase):
    def test_updateSetsAndNoneRemoves(self):
        ctx = fresh()
        ctx.update(remote_name="mx.example", auth_user="alice")
        self.assertEqual(ctx["remote_name"], "mx.example")
        ctx.update(auth_user=None)
        self.assertNotIn("auth_user", ctx.connection)
        self.assertIsNone(ctx.get("auth_user"))
        self.assertEqual(ctx.get("auth_user", "d"), "d")
        ctx.update(never_set=None)  # removing a missing key is fine
        self.assertRaises(KeyError, lambda: ctx["never_set"])

    def test_clientKeysSurviveGatewayUpdatesAndMessages(self):
        # protocol.md section 1: XSETCONTEXT keys survive every reset.
        ctx = fresh()
        ctx.setClientKeys([("binding", "bulk")])
        ctx.update(ehlo_domain=None, auth_user=None, remote_ip="192.0.2.7")
        ctx.beginMessage("a@example.org")
        ctx.endMessage()
        self.assertEqual(ctx["binding"], "bulk")
        self.assertEqual(ctx.clientKeys, {"binding"})


class MessageLifecycleTests(unittest.TestCase):
    def test_noTransactionAtFirst(self):
        ctx = fresh()
        self.assertIsNone(ctx.message)
        self.assertFalse(ctx.inTransaction)

    def test_beginAddEnd(self):
        ctx = fresh()
        ctx.beginMessage("alice@example.org")
        self.assertTrue(ctx.inTransaction)
        self.assertEqual(ctx.message, {"mailfrom_string": "alice@example.org", "mailfrom_localpart": "alice",
                                       "mailfrom_domain": "example.org", "rcptto": [], "message_rcpt_count": 0})
        ctx.addRecipient("b@example.net")
        ctx.addRecipient("c@example.net")
        self.assertEqual(ctx.message["rcptto"], ["b@example.net", "c@example.net"])
        self.assertEqual(ctx.message["message_rcpt_count"], 2)
        self.assertEqual(ctx["connection_rcpt_count"], 2)
        ctx.endMessage()
        self.assertIsNone(ctx.message)
        self.assertFalse(ctx.inTransaction)

    def test_nextMessageStartsEmptyConnectionCountsOn(self):
        ctx = fresh()
        ctx.beginMessage("a@example.org")
        ctx.addRecipient("b@example.net")
        ctx.endMessage()
        ctx.beginMessage("")
        self.assertEqual(ctx.message["rcptto"], [])
        self.assertEqual(ctx.message["message_rcpt_count"], 0)
        ctx.addRecipient("c@example.net")
        self.assertEqual(ctx["connection_rcpt_count"], 2)

    def test_nullSenderAndOddAddresses(self):
        ctx = fresh()
        ctx.beginMessage("")
        self.assertEqual((ctx.message["mailfrom_localpart"], ctx.message["mailfrom_domain"]), ("", ""))
        ctx.beginMessage('"a@b"@example.org')
        self.assertEqual((ctx.message["mailfrom_localpart"], ctx.message["mailfrom_domain"]),
                         ('"a@b"', "example.org"))
        ctx.beginMessage("postmaster")
        self.assertEqual((ctx.message["mailfrom_localpart"], ctx.message["mailfrom_domain"]), ("postmaster", ""))

    def test_messageKeysNotVisibleAsConnectionKeys(self):
        ctx = fresh()
        ctx.beginMessage("a@example.org")
        self.assertIsNone(ctx.get("mailfrom_string"))

    def test_itemsConnectionSortedThenMessageSorted(self):
        ctx = ValidationContext(zeta=1, alpha=2)
        self.assertEqual(list(ctx.items()), [("connection", "alpha", 2), ("connection", "zeta", 1)])
        ctx.beginMessage("a@example.org")
        items = list(ctx.items())
        self.assertEqual(items[:2], [("connection", "alpha", 2), ("connection", "zeta", 1)])
        scopes = [s for s, _, _ in items[2:]]
        self.assertEqual(set(scopes), {"message"})
        keys = [k for _, k, _ in items[2:]]
        self.assertEqual(keys, sorted(keys))
        self.assertIn("mailfrom_string", keys)
        ctx.endMessage()
        self.assertEqual(len(list(ctx.items())), 2)


class SnapshotTests(unittest.TestCase):
    def test_jsonAble(self):
        ctx = fresh()
        ctx.setClientKeys([("b", "2"), ("a", "1")])
        ctx.beginMessage("a@example.org")
        ctx.addRecipient("b@example.net")
        snap = json.loads(json.dumps(ctx.snapshot()))
        self.assertEqual(snap["connection"]["a"], "1")
        self.assertEqual(snap["connection"]["remote_ip"], "127.0.0.1")
        self.assertEqual(snap["message"]["rcptto"], ["b@example.net"])
        self.assertEqual(snap["client_keys"], ["a", "b"])

    def test_outsideTransaction(self):
        self.assertEqual(fresh().snapshot()["message"], {})

    def test_isACopy(self):
        ctx = fresh()
        ctx.beginMessage("a@example.org")
        ctx.addRecipient("b@example.net")
        snap = ctx.snapshot()
        ctx.update(remote_ip="192.0.2.9")
        ctx.setClientKeys([("late", "1")])
        ctx.addRecipient("c@example.net")
        ctx.message["queue_id"] = "Q1"
        self.assertEqual(snap["connection"]["remote_ip"], "127.0.0.1")
        self.assertNotIn("late", snap["connection"])
        self.assertEqual(snap["client_keys"], [])
        self.assertNotIn("queue_id", snap["message"])
        self.assertEqual(snap["message"]["rcptto"], ["b@example.net"])
        self.assertEqual(snap["message"]["message_rcpt_count"], 1)


class DisplayTests(unittest.TestCase):
    def test_display(self):
        self.assertEqual(display(["a@x", "b@y"]), "a@x b@y")
        self.assertEqual(display(True), "yes")
        self.assertEqual(display(False), "no")
        self.assertEqual(display(0), "0")
        self.assertEqual(display(4567), "4567")
        self.assertEqual(display("x+y"), "x+y")


class ConnectionContextTests(unittest.TestCase):
    """relaygw.context.connectionContext: the context a new connection starts with."""

    def test_fromSocketAddresses(self):
        ctx = context.connectionContext("abc", "mx", IPv4Address("TCP", "192.0.2.7", 40000),
                                        IPv4Address("TCP", "198.51.100.1", 25))
        self.assertEqual(
            (ctx["session_id"], ctx["listener"], ctx["remote_ip"], ctx["remote_port"], ctx["peer_ip"],
             ctx["peer_port"], ctx["local_ip"], ctx["local_port"], ctx["remote_name"], ctx["protocol"]),
            ("abc", "mx", "192.0.2.7", 40000, "192.0.2.7", 40000, "198.51.100.1", 25, "unknown", "SMTP"),
        )
        self.assertNotIn("proxy_peer_ip", ctx.connection)

    def test_scopedLinkLocalPeer(self):
        ctx = context.connectionContext("abc", "mx", IPv6Address("TCP", "fe80::1%eth0", 40000),
                                        IPv6Address("TCP", "fe80::2%eth0", 25))
        self.assertEqual((ctx["remote_ip"], ctx["local_ip"]), ("fe80::1", "fe80::2"))

    def test_proxiedRecordsTheBalancer(self):
        proxied = ProxyInfo("PROXY", 1, peer=IPv4Address("TCP", "10.0.0.5", 5555))
        ctx = context.connectionContext("abc", "mx", IPv4Address("TCP", "192.0.2.7", 40000),
                                        IPv4Address("TCP", "10.0.0.9", 25), proxied)
        self.assertEqual((ctx["proxy_peer_ip"], ctx["proxy_peer_port"]), ("10.0.0.5", 5555))
