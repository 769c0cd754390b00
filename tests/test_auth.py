"""
Tests for L{relaygw.auth} and C{relaygw-passwd}.
"""

import io
import os
import sys
import time

from twisted.cred import checkers, credentials, error
from twisted.internet import defer, task
from twisted.trial import unittest

from relaygw import auth
from relaygw.scripts import passwd


class HashTests(unittest.TestCase):
    def test_roundTrip(self):
        """
        A hash verifies its password and no other; salts differ.
        """
        encoded = auth.hashPassword("s3cret \u00e9")
        self.assertTrue(encoded.startswith("$scrypt$n=16384,r=8,p=1$"))
        self.assertTrue(auth.verifyPassword("s3cret \u00e9", encoded))
        self.assertTrue(auth.verifyPassword("s3cret \u00e9".encode(), encoded))
        self.assertFalse(auth.verifyPassword("s3cret", encoded))
        self.assertNotEqual(encoded, auth.hashPassword("s3cret \u00e9"))

    def test_malformed(self):
        """
        Unknown schemes and malformed hashes never verify.
        """
        for encoded in ["", "plain", "$md5$x$y$z", "$scrypt$n=16384$x$y", "$scrypt$n=3,r=8,p=1$AAAA$AAAA"]:
            self.assertFalse(auth.verifyPassword("", encoded), encoded)


class PasswordFileTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.file = auth.PasswordFile(self.path)

    def test_setRemove(self):
        """
        Users can be added, changed and removed; comments stay; the file
        keeps its mode, but never readable by others.
        """
        self.assertEqual(self.file.users(), {})
        with open(self.path, "w") as f:
            f.write("# users\n")
        os.chmod(self.path, 0o644)
        self.file.set("alice", "one")
        self.file.set("bob", "two")
        self.file.set("alice", "three")
        users = self.file.users()
        self.assertEqual(sorted(users), ["alice", "bob"])
        self.assertTrue(auth.verifyPassword("three", users["alice"]))
        self.assertTrue(self.file.remove("bob"))
        self.assertFalse(self.file.remove("bob"))
        self.assertEqual(list(self.file.users()), ["alice"])
        with open(self.path) as f:
            self.assertTrue(f.read().startswith("# users\nalice:$scrypt$"))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)

    def test_atomic(self):
        """
        The file is replaced, not rewritten in place, and no temporary file
        is left behind.
        """
        self.file.set("alice", "one")
        before = os.stat(self.path).st_ino
        self.file.set("bob", "two")
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        name = os.path.basename(self.path)
        self.assertEqual(sorted(os.listdir(os.path.dirname(os.path.abspath(self.path)))), [name, name + ".lock"])

    def test_concurrentChangesAllKept(self):
        """
        Two processes changing the file at once lose nothing: each change
        reads, changes and writes the file under its lock (before: 6 of
        100 simultaneous additions were lost, both processes saying done).
        """
        import subprocess
        import sys

        script = ("import sys; from relaygw import auth; f = auth.PasswordFile(sys.argv[1]); "
                  "[f.set('%s%d' % (sys.argv[2], i), 'pw') for i in range(40)]")
        procs = [subprocess.Popen([sys.executable, "-c", script, self.path, who]) for who in ("a", "b")]
        self.assertEqual([p.wait(timeout=120) for p in procs], [0, 0])
        self.assertEqual(sorted(self.file.users()), sorted("%s%d" % (w, i) for w in "ab" for i in range(40)))

    def test_badUsername(self):
        """
        Names that would corrupt the file are refused.
        """
        for name in ["", "a:b", "a\nb", "#x", " x"] + ["x%sadmin" % c for c in "\v\f\x1c\x1d\x1e\x85\u2028\u2029"]:
            self.assertRaises(ValueError, self.file.set, name, "pw")
        self.assertFalse(os.path.exists(self.path))

    def test_onlyLineFeedsEndLines(self):
        """
        A line the file holds ends at LF only: a name with a vertical tab
        (written by hand; the tool refuses one) is not two users, and
        cannot change another user's password (before: x\\vadmin:HASH
        set admin's).
        """
        self.file.set("admin", "right")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("x\vadmin:%s\n" % (auth.hashPassword("wrong"),))
        users = self.file.users()
        self.assertEqual(sorted(users), ["admin", "x\vadmin"])
        self.assertTrue(auth.verifyPassword("right", users["admin"]))

    def test_badPassword(self):
        """A password AUTH could never send (NUL separates AUTH PLAIN's fields) is refused."""
        for password in ["", "a\0b", "a\nb"]:
            self.assertRaises(ValueError, self.file.set, "alice", password)
        self.assertFalse(os.path.exists(self.path))


class PortalTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        auth.PasswordFile(self.path).set("alice", "wonder")

    def login(self, portal, creds):
        d = portal.login(creds, None, auth.IRelayUser)
        return d.addCallback(lambda result: result[1].username)

    @defer.inlineCallbacks
    def test_checker(self):
        """
        The right password logs in as the user; a wrong one or an unknown
        user fails.
        """
        portal = auth.makePortal(self.path)
        name = yield self.login(portal, credentials.UsernamePassword(b"alice", b"wonder"))
        self.assertEqual(name, "alice")
        yield self.assertFailure(
            self.login(portal, credentials.UsernamePassword(b"alice", b"wrong")), error.UnauthorizedLogin
        )
        yield self.assertFailure(
            self.login(portal, credentials.UsernamePassword(b"nobody", b"wonder")), error.UnauthorizedLogin
        )
        yield self.assertFailure(self.login(portal, credentials.Anonymous()), error.UnhandledCredentials)

    @defer.inlineCallbacks
    def test_reloads(self):
        """
        A change to the file is seen by the next login.
        """
        portal = auth.makePortal(self.path)
        yield self.login(portal, credentials.UsernamePassword(b"alice", b"wonder"))
        auth.PasswordFile(self.path).set("alice", "new")
        yield self.assertFailure(
            self.login(portal, credentials.UsernamePassword(b"alice", b"wonder")), error.UnauthorizedLogin
        )
        name = yield self.login(portal, credentials.UsernamePassword(b"alice", b"new"))
        self.assertEqual(name, "alice")

    @defer.inlineCallbacks
    def test_alwaysAllow(self):
        """
        On an always-allow portal, anonymous access and any username and
        password are C{anonymous}.
        """
        portal = auth.makePortal(alwaysAllow=True)
        name = yield self.login(portal, credentials.Anonymous())
        self.assertEqual(name, "anonymous")
        name = yield self.login(portal, credentials.UsernamePassword(b"mallory", b"x"))
        self.assertEqual(name, "anonymous")

    @defer.inlineCallbacks
    def test_alwaysAllowWithCredentials(self):
        """
        With a password file too, its users log in as themselves and anyone
        else as C{anonymous}.
        """
        portal = auth.makePortal(self.path, alwaysAllow=True)
        name = yield self.login(portal, credentials.UsernamePassword(b"alice", b"wonder"))
        self.assertEqual(name, "alice")
        name = yield self.login(portal, credentials.UsernamePassword(b"alice", b"wrong"))
        self.assertEqual(name, "anonymous")

    def test_realm(self):
        """
        L{checkers.ANONYMOUS} is C{anonymous}; bytes avatar IDs are decoded.
        """
        realm = auth.RelayRealm()
        iface, user, logout = realm.requestAvatar(checkers.ANONYMOUS, None, auth.IRelayUser)
        self.assertIs(iface, auth.IRelayUser)
        self.assertTrue(auth.IRelayUser.providedBy(user))
        self.assertEqual(user.username, "anonymous")
        self.assertEqual(realm.requestAvatar(b"bob", None, auth.IRelayUser)[1].username, "bob")


class DecodePlainTests(unittest.TestCase):
    def test_good(self):
        self.assertEqual(auth.decodePlain(b"\0alice\0pw"), ("", "alice", "pw"))
        self.assertEqual(auth.decodePlain(b"admin\0alice\0p\xc3\xa9"), ("admin", "alice", "p\u00e9"))

    def test_bad(self):
        for response in [b"", b"alice\0pw", b"\0\0pw", b"\0alice\0", b"a\0b\0c\0d", b"\0al\xffice\0pw"]:
            self.assertRaises(ValueError, auth.decodePlain, response)


class FailureTrackerTests(unittest.TestCase):
    def test_delayGrows(self):
        """
        The delay doubles from 0.5 up to 8 seconds, per peer.
        """
        clock = task.Clock()
        tracker = auth.FailureTracker(clock, limit=100)
        delays = []
        for _ in range(7):
            tracker.record("192.0.2.1")
            delays.append(tracker.delay("192.0.2.1"))
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 8, 8])
        tracker.record("192.0.2.2")
        self.assertEqual(tracker.delay("192.0.2.2"), 0.5)

    def test_tooManyInWindow(self):
        """
        L{FailureTracker.tooMany} is true after five failures within ten
        minutes, and failures older than that are forgotten.
        """
        clock = task.Clock()
        tracker = auth.FailureTracker(clock)
        for _ in range(4):
            tracker.record("peer")
            clock.advance(60)
        self.assertFalse(tracker.tooMany("peer"))
        tracker.record("peer")
        self.assertTrue(tracker.tooMany("peer"))
        self.assertFalse(tracker.tooMany("other"))
        clock.advance(600 - 4 * 60 + 1)
        self.assertFalse(tracker.tooMany("peer"))
        self.assertEqual(tracker.delay("peer"), 4)
        clock.advance(600)
        self.assertEqual(tracker.delay("peer"), 0)

    def test_boundedTable(self):
        """
        Failed logins from more addresses than C{maxPeers} (a client with
        many IPv6 addresses) keep the table at that size, without a walk of
        it for every new address (that made each failure cost the reactor
        thread a pass over ten thousand entries); expired ones go first.
        """
        clock = task.Clock()
        tracker = auth.FailureTracker(clock)
        tracker.maxPeers = 10000
        for n in range(5000):
            tracker.record("2001:db8::%x" % n)
        clock.advance(601)  # those have expired
        started = time.process_time()
        for n in range(5000, 17000):
            tracker.record("2001:db8::%x" % n)
        self.assertLess(time.process_time() - started, 2.0)
        self.assertEqual(len(tracker._failures), 10000)
        self.assertEqual(tracker.delay("2001:db8::0"), 0)  # expired, and gone
        self.assertEqual(tracker.delay("2001:db8::%x" % 16999), 0.5)
        self.assertTrue(all(tracker.delay("2001:db8::%x" % n) == 0 for n in range(5000, 7000)))  # the oldest, evicted


class PasswdScriptTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.stderr = io.StringIO()
        self.patch(passwd.sys, "stderr", self.stderr)

    def runScript(self, *argv, stdin=""):
        self.patch(passwd.sys, "stdin", io.StringIO(stdin))
        return passwd.main(list(argv))

    def test_setFromStdin(self):
        """
        A piped password is read once and stored; the file is created.
        """
        self.assertEqual(self.runScript(self.path, "alice", stdin="secret\n"), 0)
        users = auth.PasswordFile(self.path).users()
        self.assertTrue(auth.verifyPassword("secret", users["alice"]))

    def test_delete(self):
        self.assertEqual(self.runScript(self.path, "alice", stdin="secret\n"), 0)
        self.assertEqual(self.runScript("--delete", self.path, "alice"), 0)
        self.assertEqual(auth.PasswordFile(self.path).users(), {})
        self.assertEqual(self.runScript("--delete", self.path, "alice"), 1)
        self.assertIn("no user", self.stderr.getvalue())

    def test_errors(self):
        """
        An empty password, a bad name or bad usage exit with 1 and a
        message.
        """
        self.assertEqual(self.runScript(self.path, "alice", stdin=""), 1)
        self.assertEqual(self.runScript(self.path, "a:b", stdin="pw\n"), 1)
        self.assertEqual(self.runScript(self.path), 1)
        self.assertEqual(self.runScript(os.path.join(self.path, "missing-dir", "f"), "alice", stdin="pw\n"), 1)
        self.assertEqual(self.stderr.getvalue().count("relaygw-passwd: "), 4)
        self.assertFalse(os.path.exists(self.path))

    def test_fileInAMissingDirectory(self):
        """
        FILE in a directory that does not exist: the line names FILE and
        says what is wrong in words (before: an errno and the lock file's
        name, C{[Errno 2] No such file or directory: '.../users.lock'}).
        """
        path = os.path.join(self.path, "missing-dir", "users")
        self.assertEqual(self.runScript(path, "alice", stdin="pw\n"), 1)
        self.assertEqual(self.stderr.getvalue(),
                         "relaygw-passwd: cannot change %s: No such file or directory\n" % (path,))

    def test_fifoIsOneLine(self):
        """
        A FIFO for FILE: exit 1 at once with one line (before: the read
        waited for a writer for ever; a device such as /dev/zero was read
        until memory ran out).
        """
        import subprocess

        from tests.processes import sourceEnv

        os.mkfifo(self.path)
        p = subprocess.run([sys.executable, "-m", "relaygw.scripts.passwd", self.path, "alice"], input="pw\n",
                           capture_output=True, text=True, timeout=20, env=sourceEnv())
        self.assertEqual((p.returncode, p.stderr), (1, "relaygw-passwd: %s is not a regular file\n" % (self.path,)))
        with self.assertRaises(auth.PasswordFileError) as e:
            auth.PasswordFile("/dev/zero").users()
        self.assertEqual(str(e.exception), "/dev/zero is not a regular file")

    def test_unreadableFileIsOneLine(self):
        """A directory, or a file that is not UTF-8, for FILE: exit 1 with one line (before: a traceback)."""
        os.makedirs(self.path)
        self.assertEqual(self.runScript(self.path, "alice", stdin="pw\n"), 1)
        latin1 = self.mktemp()
        with open(latin1, "wb") as f:
            f.write(b"j\xf6rg:x\n")
        self.assertEqual(self.runScript(latin1, "alice", stdin="pw\n"), 1)
        self.assertEqual(self.stderr.getvalue(), "relaygw-passwd: cannot read %s: Is a directory\n"
                         "relaygw-passwd: %s is not UTF-8\n" % (self.path, latin1))
