"""
What start would trip on beyond the file's own syntax: files that must be
readable (certificates, keys, CAs, credentials), a key that matches its
certificate, a policy that imports and provides L{relaygw.policy.IPolicy},
a spool that can be written and a Maildir that is a directory.

L{relaygw.config.parse} runs these checks with C{environment=True}, which
C{--check-config}, start and reload all use: the three refuse the same
configurations with the same words.  Nothing here changes the file system.
"""

import os
import stat


def check(report, built, listeners, routes):
    """Add every problem of the validated sections to C{report}."""
    _writableDirectory(report, "spool.directory", built["spool"].directory)
    _spoolLayout(report, "spool.directory", built["spool"].directory)
    _writableDirectory(report, "relay.maildir", built["relay"].maildir)
    _maildir(report, "relay.maildir", built["relay"].maildir)
    _caFile(report, "relay.tls_ca", built["relay"].tls_ca)
    for i, route in enumerate(routes):
        _caFile(report, "route[%d].tls_ca" % i, route.tls_ca)
    for i, listener in enumerate(listeners):
        _listener(report, "listener[%d]" % i, listener)


def _listener(report, where, l):
    if l.tls_certificate is not None and l.tls_key is not None:
        _serverTLS(report, where, l)
    if l.tls_client_ca is not None:
        _caFile(report, where + ".tls_client_ca", l.tls_client_ca)
    if l.credentials is not None:
        what = "a password file (relaygw-passwd)"
        data = _readable(report, where + ".credentials", l.credentials, what)
        if data is not None:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                report.add(where + ".credentials", "%s is not UTF-8 (expected %s)" % (l.credentials, what))
    _policy(report, where + ".policy", l)


def _readable(report, key, path, what, pem=False):
    """
    The file's bytes, or C{None} after reporting why it cannot be read.
    Only a regular file is read: a FIFO would hold the check (and a
    reload, which runs it on the reactor) until something writes to it,
    and a device such as /dev/zero would never end.  A C{pem} file
    (certificate, key, CA bundle) larger than L{relaygw.tls.MAX_PEM_SIZE}
    is refused unread.
    """
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                if pem:
                    from relaygw import tls

                    if st.st_size > tls.MAX_PEM_SIZE:
                        report.add(key, "%s (expected %s)" % (tls.oversized(path, st.st_size), what))
                        return None
                return f.read()
            report.add(key, "%s is not a regular file (expected %s)" % (path, what))
    except IsADirectoryError:
        report.add(key, "%s is a directory (expected %s)" % (path, what))
    except OSError as e:
        report.add(key, "cannot read %s: %s (expected %s)" % (path, e.strerror, what))
    return None


def _certificates(report, key, path, what):
    from cryptography import x509

    data = _readable(report, key, path, what, pem=True)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        report.add(key, "%s holds no PEM certificate (expected %s)" % (path, what))
        return None


def _caFile(report, key, path):
    if path is not None:
        _certificates(report, key, path, "a readable PEM CA bundle")


def _serverTLS(report, where, l):
    from cryptography.hazmat.primitives import serialization

    if l.tls_self_signed and not os.path.exists(l.tls_certificate) and not os.path.exists(l.tls_key):
        # Start generates the pair: the directories must take the files.
        for key, path in (("tls_certificate", l.tls_certificate), ("tls_key", l.tls_key)):
            before = len(report.errors)
            _writableDirectory(report, where + "." + key, os.path.dirname(path))
            if len(report.errors) == before:
                _namesFit(report, where + "." + key, path, _existing(path))
        return
    chain = _certificates(report, where + ".tls_certificate", l.tls_certificate,
                          "a readable PEM certificate, leaf first")
    keyPEM = _readable(report, where + ".tls_key", l.tls_key, "a readable PEM private key", pem=True)
    if keyPEM is None:
        return
    try:
        key = serialization.load_pem_private_key(keyPEM, password=None)
    except (ValueError, TypeError):
        report.add(where + ".tls_key", "%s holds no unencrypted PEM private key (expected one)" % (l.tls_key,))
        return
    if chain is None:
        return
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != chain[0].public_key().public_bytes(serialization.Encoding.DER, public)):
        report.add(where + ".tls_key", "%s does not match %s (expected the certificate's private key)" % (
            l.tls_key, l.tls_certificate))
        return
    from relaygw.tls import ServerTLS

    try:
        ServerTLS(l.tls_certificate, l.tls_key, l.tls_min_version, l.tls_ciphers, l.tls_client_ca)
    except Exception as e:
        report.add(where + ".tls_certificate", "OpenSSL refuses the TLS settings: %s (expected a usable "
                   "certificate, key and ciphers)" % (_oneLine(e),))


def _policy(report, key, l):
    from relaygw.policy import loadPolicy

    try:
        loadPolicy(l.policy, l)
    except Exception as e:
        report.add(key, "cannot load %r: %s (expected the dotted name of a class providing "
                   "relaygw.policy.IPolicy)" % (l.policy, _oneLine(e)))


def _writableDirectory(report, key, path):
    """A directory that exists and can be written, or can be created (start creates it)."""
    probe = _existing(path)
    if os.path.islink(probe) and not os.path.exists(probe):
        report.add(key, "%s is a symbolic link to nothing (expected a directory%s)" % (
            probe, "" if probe == path else " to create %s in" % (path,)))
    elif not os.path.isdir(probe):
        report.add(key, "%s is not a directory (expected a directory%s)" % (
            probe, "" if probe == path else " to create %s in" % (path,)))
    elif not os.access(probe, os.W_OK | os.X_OK):
        report.add(key, "%s is not writable (expected a directory the gateway may write%s)" % (
            probe, "" if probe == path else " to create %s in" % (path,)))
    elif probe != path:
        _namesFit(report, key, path, probe)


def _existing(path):
    """
    C{path}, or the nearest of its parents that exists (a symbolic link to
    nothing is no directory to create the rest in).
    """
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def _namesFit(report, key, path, probe):
    """
    The names of C{path} still to create under C{probe} (a directory that
    exists) are no longer than its file system takes: one that is would
    fail with ENAMETOOLONG only when start makes it.
    """
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if any(len(os.fsencode(name)) > limit for name in os.path.relpath(path, probe).split(os.sep)):
        report.add(key, "cannot create %s: a name over %d octets (expected shorter names)" % (path, limit))


def _spoolLayout(report, key, path):
    """
    What start would refuse, or fail on, in a spool that exists (and in
    each worker's partition of it): an area that is not a real directory
    or cannot be written, a lock file that is a link or a directory or
    cannot be written.  A spool a first start as another user (root) laid
    out would otherwise pass, and then refuse every message 451.
    """
    from relaygw.spool import LOCK_FILE, Spool, areaProblems, partitions

    for directory in [path] + list(partitions(path).values()):
        try:
            unfit = dict(areaProblems(directory))
        except OSError:  # (a spool that cannot be searched: _writableDirectory says so)
            unfit = {}
        for area in Spool.AREAS:
            area = directory + os.sep + area
            if area in unfit:
                report.add(key, "%s is %s (expected the spool's own directory)" % (area, unfit[area]))
            elif os.path.isdir(area) and not os.access(area, os.W_OK | os.X_OK):
                report.add(key, "%s is not writable (expected a directory the gateway may write)" % (area,))
        lock = os.path.join(directory, LOCK_FILE)
        mode = _lmode(lock)
        if mode is None:
            continue
        if stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
            report.add(key, "%s is %s, not a lock file (expected the spool's lock file)" % (
                lock, "a symbolic link" if stat.S_ISLNK(mode) else "a directory"))
        elif not os.access(lock, os.R_OK | os.W_OK):
            report.add(key, "%s is not writable (expected a lock file the gateway may write)" % (lock,))


def _maildir(report, key, path):
    """The Maildir's C{tmp/}, C{new/} and C{cur/} that exist are directories the gateway may write."""
    for sub in ("tmp", "new", "cur"):
        sub = os.path.join(path, sub)
        if not os.path.lexists(sub):
            continue  # (start makes it)
        if not os.path.isdir(sub):
            report.add(key, "%s is not a directory (expected a Maildir's tmp, new and cur directories)" % (sub,))
        elif not os.access(sub, os.W_OK | os.X_OK):
            report.add(key, "%s is not writable (expected a directory the gateway may write)" % (sub,))


def _lmode(path):
    """The mode of C{path} itself (a symbolic link not followed), or C{None} if there is nothing there."""
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def _oneLine(e):
    text = str(e) or e.__class__.__name__
    return " ".join(text.split())

