"""
What the fuzzers share: their gateways' material (L{tests.sessionfuzz},
L{tests.trustfuzz}), the failures a case logs, the seed loop and the
command line.
"""

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


class LoggedFailures:
    """The events logged as failures or errors from L{start} to L{stop} (C{events}): a fuzz case must cause none."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        from twisted.logger import LogLevel

        if event.get("log_failure") is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def start(self):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)
        return self

    def stop(self):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self)


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


def runCases(case, base, seeds, cases, figures, minutes=None, done=None):
    """
    C{cases} cases for each seed, each C{case(directory, rng, figures,
    label).run()} in a directory of its own under C{base} (stopping after
    C{minutes}, if given); C{done} is called with each case's label.  A
    Deferred of C{figures}.
    """
    import random
    import time

    from twisted.internet import defer

    @defer.inlineCallbacks
    def run():
        deadline = None if minutes is None else time.monotonic() + minutes * 60
        for seed in seeds:
            rng = random.Random(seed)
            for n in range(cases):
                if deadline is not None and time.monotonic() > deadline:
                    return figures
                label = "%d.%d" % (seed, n)
                yield case(os.path.join(base, label), random.Random(rng.random()), figures, label).run()
                if done is not None:
                    done(label)
        return figures

    return run()


def casesMain(argv, runSeeds, figures, name, cases):
    """
    The command line of a fuzzer run case by case (L{tests.spoolfuzz},
    L{tests.hopfuzz}): C{SEED [SEED...] [--cases N] [--minutes M]}, each
    case's figures as it ends, the problems and the totals at the end; the
    exit status 1 when there was a problem.  C{runSeeds(base, seeds, cases,
    figures, minutes, done)} runs them.
    """
    import argparse
    import tempfile
    import time

    from twisted.internet import defer

    parser = argparse.ArgumentParser(prog="python -m tests." + name)
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--cases", type=int, default=cases)
    parser.add_argument("--minutes", type=float, default=None)
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix=name + "-")
    started = time.monotonic()

    def report(figures):
        for p in figures.problems[:50]:
            print("PROBLEM", p)
        print("%s in %.0f s (%s)" % (figures, time.monotonic() - started, base), flush=True)
        return 1 if figures.problems else 0

    def done(label):
        print("case %s: %s" % (label, figures), flush=True)

    runMain(lambda: defer.succeed(None),
            lambda _: runSeeds(base, args.seeds, args.cases, figures, args.minutes, done).addCallback(report))
