"""What the fuzzers (L{tests.sessionfuzz}, L{tests.trustfuzz}) share: their gateways' material, and the command line."""

import os
import sys


def material(directory):
    """
    In C{directory} (made if need be): a self-signed certificate for
    C{relay.test} and a password file where C{alice} logs in with
    C{s3cret}; returns C{(users, certificate, key)}, absolute paths.
    """
    from relaygw.auth import PasswordFile
    from tests.tlsmaterial import generateSelfSigned

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    users = os.path.join(directory, "users")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    generateSelfSigned(cert, key, "relay.test")
    PasswordFile(users).set("alice", "s3cret")
    return users, cert, key


def runMain(start, work):
    """
    Start a gateway (C{start()}: a Deferred of what C{work} takes), run
    C{work} on it (a Deferred of the exit status) under the reactor, and
    exit with that status (2 when either step failed).
    """
    from twisted.internet import reactor

    result = {"rc": 0}

    def go():
        d = start()
        d.addCallback(work)
        d.addCallback(lambda rc: result.update(rc=rc))
        d.addErrback(lambda f: (f.printTraceback(sys.stderr), result.update(rc=2)))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    sys.exit(result["rc"])
