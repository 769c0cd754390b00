"""
SMTP AUTH for the gateway: C{twisted.cred} checkers and realm, scrypt
password hashes in a password file, SASL PLAIN decoding and per-peer failure
accounting.

The session's identity is an L{IRelayUser} obtained from the portal built by
L{makePortal}.  On an always-allow listener every login (anonymous or with
any username and password) yields the user C{anonymous}.
"""

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import stat
import tempfile
from collections import deque

from zope.interface import Attribute, Interface, implementer

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer, threads

from relaygw import sasl
from relaygw.logs import Logger

log = Logger()

ANONYMOUS_NAME = "anonymous"


class IRelayUser(Interface):
    """
    The identity of an authenticated SMTP session.
    """

    username = Attribute("The user's name (C{str}); C{'anonymous'} for anonymous access.")


@implementer(IRelayUser)
class RelayUser:
    def __init__(self, username):
        self.username = username

    def __repr__(self):
        return "<RelayUser %r>" % (self.username,)


@implementer(portal.IRealm)
class RelayRealm:
    """
    Map avatar IDs to L{RelayUser}s; L{checkers.ANONYMOUS} is C{anonymous}.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IRelayUser not in interfaces:
            raise NotImplementedError("RelayRealm only provides IRelayUser")
        if avatarId is checkers.ANONYMOUS or avatarId == checkers.ANONYMOUS:
            name = ANONYMOUS_NAME
        elif isinstance(avatarId, bytes):
            name = avatarId.decode("utf-8")
        else:
            name = avatarId
        return IRelayUser, RelayUser(name), lambda: None


# Password hashes.

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_MAXMEM = 2**26


def _b64encode(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text):
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _encodePassword(password):
    if isinstance(password, str):
        return password.encode("utf-8")
    return password


def hashPassword(password):
    """
    Hash a password with scrypt and a random salt.

    @param password: the password (C{str}; C{bytes} are used as they are).
    @return: C{"$scrypt$n=16384,r=8,p=1$<salt>$<hash>"}, base64 without
        padding.
    """
    salt = os.urandom(16)
    digest = hashlib.scrypt(_encodePassword(password), salt=salt, dklen=32, maxmem=_MAXMEM, **_SCRYPT)
    params = ",".join("%s=%d" % (k, v) for k, v in _SCRYPT.items())
    return "$scrypt$%s$%s$%s" % (params, _b64encode(salt), _b64encode(digest))


def verifyPassword(password, encoded):
    """
    Check a password against a hash from L{hashPassword}, in constant time.

    @return: C{False} for a wrong password and for anything malformed or of
        an unknown scheme.
    """
    try:
        empty, scheme, params, salt, digest = encoded.split("$")
        if empty or scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
        salt, digest = _b64decode(salt), _b64decode(digest)
        if not 16 <= len(digest) <= 64:
            return False
        computed = hashlib.scrypt(
            _encodePassword(password), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=_MAXMEM
        )
    except (ValueError, KeyError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(computed, digest)


# A well-formed hash nobody's password matches, for unknown users.
_DUMMY = "$scrypt$n=16384,r=8,p=1$%s$%s" % (_b64encode(b"relaygw-no-user!"), _b64encode(bytes(32)))


# The password file.


def _checkUsername(user):
    # (Nothing that is not printable: Python's splitlines also ends a line
    # at \v, \f, \x1c-\x1e, \x85, U+2028 and U+2029.)
    if not user or user != user.strip() or user.startswith("#") or ":" in user or not user.isprintable():
        raise ValueError("invalid user name %r" % (user,))


def checkPassword(password):
    """A password a client can send (AUTH PLAIN separates its fields with NUL); raises C{ValueError} otherwise."""
    if not password or any(c in password for c in "\0\r\n"):
        raise ValueError("a password must not be empty or hold NUL, CR or LF")


class PasswordFileError(Exception):
    """The password file cannot be read (an operator's problem: no traceback)."""


class PasswordFile:
    """
    A file of C{username:hash} lines; blank lines and C{#} comments are
    kept.  Every change rewrites it atomically with mode 0600.
    """

    def __init__(self, path):
        self.path = path

    def _lines(self):
        try:
            # (a regular file only: a FIFO would block the reader, the reactor's at a login, until written to,
            # and a device such as /dev/zero never end)
            with open(self.path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise PasswordFileError("%s is not a regular file" % (self.path,))
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            return []
        except UnicodeDecodeError:
            raise PasswordFileError("%s is not UTF-8" % (self.path,))
        except OSError as e:
            raise PasswordFileError("cannot read %s: %s" % (self.path, e.strerror))
        # The lines as they are written: each ended by LF (not by whatever
        # else Python's splitlines takes for a line break), a CR before it dropped.
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        return [line.rstrip("\r") for line in lines]

    @staticmethod
    def _parse(line):
        """
        @return: C{(user, hash)}, or C{None} for a blank, comment or
            malformed line.
        """
        if not line.strip() or line.lstrip().startswith("#"):
            return None
        user, sep, encoded = line.partition(":")
        if not sep or not user:
            return None
        return user, encoded.strip()

    def users(self):
        """
        @return: C{{username: hash}}; empty if the file does not exist.
        """
        result = {}
        for number, line in enumerate(self._lines(), 1):
            entry = self._parse(line)
            if entry is None:
                if line.strip() and not line.lstrip().startswith("#"):
                    log.warn("{path}:{line}: not user:hash, ignored", path=self.path, line=number)
                continue
            result[entry[0]] = entry[1]
        return result

    def set(self, user, password):
        """
        Add C{user} or change its password.
        """
        _checkUsername(user)
        checkPassword(password)
        line = "%s:%s" % (user, hashPassword(password))
        with self._locked():
            lines, found = [], False
            for old in self._lines():
                entry = self._parse(old)
                if entry is not None and entry[0] == user:
                    if not found:
                        lines.append(line)
                    found = True
                else:
                    lines.append(old)
            if not found:
                lines.append(line)
            self._write(lines)

    def remove(self, user):
        """
        Remove C{user}.

        @return: C{False} if there was no such user.
        """
        with self._locked():
            lines = self._lines()
            kept = [line for line in lines if (self._parse(line) or (None,))[0] != user]
            if len(kept) == len(lines):
                return False
            self._write(kept)
            return True

    @contextlib.contextmanager
    def _locked(self):
        """
        One change at a time: an exclusive lock on C{FILE.lock} (the file
        itself is replaced by each change, so it cannot carry the lock)
        around the read, the change and the write.
        """
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _keepAccess(self, tmp):
        """
        The new file gets the old one's mode (less any access for others:
        it holds password hashes), owner and group, so that a gateway
        running as its own user or group keeps its access; 0600 when there
        was none.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            os.chmod(tmp, 0o600)
            return
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                os.chown(tmp, -1, st.st_gid)  # not root: at least the group, or fail rather than lock it out
        os.chmod(tmp, stat.S_IMODE(st.st_mode) & ~0o007)

    def _write(self, lines):
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % os.path.basename(self.path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            self._keepAccess(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            dirfd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dirfd)
        except OSError:
            pass
        finally:
            os.close(dirfd)


# Checkers.


class SessionPassword(credentials.UsernamePassword):
    """
    A username and password a session asks about, with C{wanted()}: whether
    its client is still there for the answer (a checker need not verify
    them once it has gone).
    """

    def __init__(self, username, password, wanted):
        credentials.UsernamePassword.__init__(self, username, password)
        self.wanted = wanted


@implementer(checkers.ICredentialsChecker)
class HashedPasswordChecker:
    """
    Check usernames and passwords against a L{PasswordFile}, hashing in a
    thread.  The file is read again whenever it changes; a missing file has
    no users.  The avatar ID is the username (C{str}).
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    #: How many passwords are hashed at once.
    concurrency = 2

    def __init__(self, path, threadpool=None, reactor=None):
        """
        @param threadpool: where to hash; by default the reactor's thread
            pool (L{threads.deferToThread}).
        @param reactor: the reactor, needed with C{threadpool}.
        """
        self._file = PasswordFile(path)
        # At most this many hashes at once: a flood of guesses waits its
        # turn instead of taking every thread (and core) from the others.
        self._hashing = defer.DeferredSemaphore(self.concurrency)
        self._threadpool = threadpool
        self._reactor = reactor
        self._stamp = None
        self._users = {}

    def _currentUsers(self):
        try:
            st = os.stat(self._file.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            raise PasswordFileError("cannot read %s: %s" % (self._file.path, e.strerror))
        if stamp != self._stamp:
            self._users = self._file.users() if stamp is not None else {}
            self._stamp = stamp
            log.info("{count} users from {path}", count=len(self._users), path=self._file.path)
        return self._users

    def _inThread(self, f, *args, wanted=None):
        def turn():
            # A client that has gone while its guess waited for a turn gets no hash.
            if wanted is not None and not wanted():
                raise defer.CancelledError()
            return self._toThread(f, *args)

        return self._hashing.run(turn)

    def _toThread(self, f, *args):
        if self._threadpool is None:
            return threads.deferToThread(f, *args)
        if self._reactor is None:
            from twisted.internet import reactor as _reactor

            self._reactor = _reactor
        return threads.deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def requestAvatarId(self, credentials):
        """
        @return: a L{Deferred} firing with the username, or failing with
            L{error.UnauthorizedLogin} (or with another error if the file
            cannot be read).
        """
        try:
            users = self._currentUsers()
        except Exception:
            return defer.fail()
        username = credentials.username
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                username = None
        encoded = users.get(username) if username is not None else None
        d = self._inThread(verifyPassword, credentials.password, encoded or _DUMMY,
                           wanted=getattr(credentials, "wanted", None))

        def checked(ok):
            if ok and encoded is not None:
                return username
            raise error.UnauthorizedLogin()

        return d.addCallback(checked)


@implementer(checkers.ICredentialsChecker)
class _AnyPasswordIsAnonymous:
    """
    For always-allow listeners: any username and password log in as
    L{checkers.ANONYMOUS}, unless C{checker} accepts them as a real user.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, checker=None):
        self._checker = checker

    def requestAvatarId(self, credentials):
        if self._checker is None:
            return defer.succeed(checkers.ANONYMOUS)

        def anonymous(failure):
            failure.trap(error.UnauthorizedLogin)
            return checkers.ANONYMOUS

        return defer.maybeDeferred(self._checker.requestAvatarId, credentials).addErrback(anonymous)


def makePortal(credentialsPath=None, alwaysAllow=False):
    """
    Build the portal for a listener.

    @param credentialsPath: a password file for L{HashedPasswordChecker}.
    @param alwaysAllow: accept L{credentials.IAnonymous}, and any username
        and password as C{anonymous} (a user of C{credentialsPath} still logs
        in as itself).
    @return: a L{portal.Portal} for L{IRelayUser}.
    """
    hashed = HashedPasswordChecker(credentialsPath) if credentialsPath is not None else None
    found = []
    if alwaysAllow:
        found = [checkers.AllowAnonymousAccess(), _AnyPasswordIsAnonymous(hashed)]
    elif hashed is not None:
        found = [hashed]
    return portal.Portal(RelayRealm(), found)


#: SASL PLAIN's response form lives with the exchange.
decodePlain = sasl.decodePlain


class FailureTracker:
    """
    Failed logins per client address, across connections, within a
    sliding window: the AUTH brute-force limiter.

    The session asks before it verifies anything: L{lockedOut} says
    whether the address may try at all (failures in the window plus the
    attempts being verified now reach C{limit}: so no more than C{limit}
    passwords per window are ever hashed for one address, however many
    connections it opens).  L{attempt} then reserves a try and says how
    long to wait before verifying it (0 without recent failures, then 0.5,
    1, 2 ... up to C{maxDelay} seconds), and L{done} ends it, counting a
    failure.  L{tooMany} says whether the address is now locked out.
    """

    maxPeers = 10000

    def __init__(self, clock=None, limit=5, window=600.0, baseDelay=0.5, maxDelay=8.0):
        """
        @param clock: an L{IReactorTime}; by default the reactor.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.limit = limit
        self.window = window
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self._failures = {}
        self._inflight = {}
        self._prunedAt = float("-inf")

    def _recent(self, peer):
        times = self._failures.get(peer)
        if times is None:
            return 0
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[peer]
        return len(times)

    def record(self, peer):
        """
        Count a failure for C{peer} now.  At most C{maxPeers} addresses are
        remembered: past that, those whose failures have all expired go (a
        walk of the table, at most once a tenth of the window), then the
        longest remembered.  A client with that many addresses has that
        many times C{limit} tries anyway.
        """
        failures = self._failures
        if peer not in failures and len(failures) >= self.maxPeers:
            now = self._clock.seconds()
            if now >= self._prunedAt + self.window / 10:
                self._prunedAt = now
                for other in list(failures):
                    self._recent(other)
            while len(failures) >= self.maxPeers:
                del failures[next(iter(failures))]
        failures.setdefault(peer, deque(maxlen=max(self.limit, 32))).append(self._clock.seconds())

    def delay(self, peer):
        """
        @return: seconds to wait before verifying the next attempt: 0
            without a failure in the window, then 0.5 after the first, 1,
            2, 4, ... capped at C{maxDelay}.
        """
        n = self._recent(peer)
        if not n:
            return 0
        return min(self.maxDelay, self.baseDelay * 2 ** min(n - 1, 32))

    def tooMany(self, peer):
        """
        @return: whether C{peer} has C{limit} or more failures in the window.
        """
        return self._recent(peer) >= self.limit

    def lockedOut(self, peer):
        """
        @return: whether C{peer} must not try now: its failures in the
            window and its attempts being verified reach C{limit}.
        """
        return self._recent(peer) + self._inflight.get(peer, 0) >= self.limit

    def attempt(self, peer):
        """
        Reserve an attempt for C{peer} (call L{done} when it is decided).

        @return: the seconds to wait before verifying it.
        """
        wait = self.delay(peer)
        self._inflight[peer] = self._inflight.get(peer, 0) + 1
        return wait

    def begin(self, peer):
        """
        C{None} when C{peer} is locked out (L{lockedOut}); otherwise reserve
        an attempt (L{attempt}, ended with L{end}) and return the seconds to
        wait before verifying it.
        """
        if self.lockedOut(peer):
            return None
        return self.attempt(peer)

    def end(self, peer, failed):
        """End an attempt L{begin} reserved (L{done}); whether C{peer} now has too many failures."""
        self.done(peer, failed)
        return self.tooMany(peer)

    def done(self, peer, failed):
        """End an attempt L{attempt} reserved; count it if it C{failed}."""
        left = self._inflight.get(peer, 0) - 1
        if left > 0:
            self._inflight[peer] = left
        else:
            self._inflight.pop(peer, None)
        if failed:
            self.record(peer)
