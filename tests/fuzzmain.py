"""The command line shared by the fuzzers (L{tests.sessionfuzz}, L{tests.trustfuzz})."""

import sys


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
        d.addErrback(lambda f: (f.printTraceback(), result.update(rc=2)))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    sys.exit(result["rc"])
