"""
A seeded fuzz of the spool's promise across a restart: what was accepted is
delivered once and whole, or set aside in C{corrupt/}; never lost silently,
never delivered twice, altered, or to an address it was not accepted for.

Each case accepts a few tagged messages through a real gateway over
loopback while its next hop takes some recipients and defers the rest (so
each message stays queued, some with recipients already done), stops it,
records what the spool holds, damages the spool at random (bits flipped,
files cut short, grown, deleted, copied over one another; stray names,
directories, FIFOs and symbolic links in every area; operator markers),
and starts a gateway on it whose next hop takes everything.  L{Figures}
counts the outcome of each message and collects the problems.  File modes
are not damaged: the tests run as root, which ignores them.

Run from the command line for long runs:

    python -m tests.spoolfuzz SEED [SEED...] --cases N --minutes M
"""

import os
import re
import time
from functools import partial

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from relaygw.spool import Spool
from relaygw.testing import Client, Gateway, ScriptedSMTPFactory, inThread
from tests.fuzzing import casesMain, runCases

_TAG = re.compile(rb"^Message-ID: <(fuzz[^>]*)>\r$", re.M)
_QUEUED = re.compile(r"queued as (\S+)")
#: Names a stray file gets, besides ones made from a queued message's id.
_ODD = ["x", ".hidden", "a b", "\u00e9t\u00e9", "x" * 200, "-", "lock", "flush", "1", "0" * 21, "q.tmp", ".tmp",
        ".state", ".reason", "..state", "x.1", "x.1.state"]


class Figures:
    """What the cases came to, and the problems found (each a line naming its case)."""

    def __init__(self):
        self.spools = self.messages = self.delivered = self.quarantined = self.lost = self.held = 0
        self.duplicates = self.damages = self.fresh = 0
        self.problems = []

    def __str__(self):
        return ("spools %d messages %d damages %d delivered %d quarantined %d lost %d held %d duplicates %d "
                "fresh %d problems %d" % (self.spools, self.messages, self.damages, self.delivered,
                                          self.quarantined, self.lost, self.held, self.duplicates, self.fresh,
                                          len(self.problems)))


def body(rng, tag):
    """Wire form (dot-stuffed, no final dot) and content of a message tagged C{tag}."""
    lines = ["Message-ID: <%s>" % tag, "Subject: spool fuzz %s" % tag, ""]
    size = rng.choice([0, 10, 200, 5000, 70000] + ([300000] if rng.random() < 0.1 else []))
    while sum(len(l) + 2 for l in lines) < size:
        line = "".join(rng.choice("abcdefgh ijk.,-") for _ in range(rng.randrange(0, 120)))
        lines.append("." + line if rng.random() < 0.05 else line)
    content = "".join(l + "\r\n" for l in lines).encode("ascii")
    wire = "".join(("." + l if l.startswith(".") else l) + "\r\n" for l in lines)
    return wire, content


def sendAll(port, messages):
    """Send each C{(recipients, wire)}; the queue id of each, or None where it was not accepted."""
    qids = []
    for rcpts, wire in messages:
        c = Client(port)
        try:
            replies = c.transaction(rcpts, wire, mailfrom="sender@example.org")
            c.cmd("QUIT")
        finally:
            c.close()
        code, lines = replies[-1]
        found = _QUEUED.search(lines[-1]) if code == 250 else None
        qids.append(found.group(1) if found else None)
    return qids


def tagOf(data):
    found = _TAG.search(data)
    return found.group(1).decode("ascii") if found else None


class Damage:
    """Damages a stopped gateway's spool at random, and notes what a fair outcome allows."""

    def __init__(self, rng, spoolDir, outside, qids):
        self.rng = rng
        self.dir = spoolDir
        self.outside = outside
        self.qids = qids
        self.deleted = set()  # queue file gone: the message may be gone
        self.progressLost = set()  # progress record gone: done recipients may get it again
        self.held = set()  # a hold marker: the message may stay queued
        self.done = []
        self.sentinels = {}

    def path(self, area, name=None):
        return os.path.join(self.dir, area) if name is None else os.path.join(self.dir, area, name)

    def sentinel(self, data=b"outside the spool\n"):
        path = os.path.join(self.outside, "s%d" % len(self.sentinels))
        with open(path, "wb") as f:
            f.write(data)
        self.sentinels[path] = data
        return path

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def write(self, path, data):
        if os.path.islink(path):  # (replaced, never written through)
            os.unlink(path)
        with open(path, "wb") as f:
            f.write(data)

    def remove(self, path):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def junk(self):
        return bytes(self.rng.randrange(256) for _ in range(self.rng.choice([0, 1, 20, 300])))

    def flip(self, path, start=0, end=None):
        data = bytearray(self.read(path))
        end = len(data) if end is None else end
        if end <= start:
            return False
        for _ in range(self.rng.choice([1, 1, 2, 8])):
            data[self.rng.randrange(start, end)] ^= 1 << self.rng.randrange(8)
        self.write(path, bytes(data))
        return True

    def run(self, count):
        kinds = [k for k in dir(self) if k.startswith("do_")]
        for _ in range(count):
            kind = self.rng.choice(kinds)
            qid = self.rng.choice(self.qids)
            if getattr(self, kind)(qid) is not False:
                self.done.append((kind[3:], qid))

    # -- queue files ------------------------------------------------------

    def queueFile(self, qid):
        path = self.path("queue", qid)
        return path if os.path.isfile(path) and not os.path.islink(path) else None

    def do_flipEnvelope(self, qid):
        path = self.queueFile(qid)
        return path is not None and self.flip(path, 0, self.read(path).find(b"\n") + 1)

    def do_flipContent(self, qid):
        path = self.queueFile(qid)
        return path is not None and self.flip(path, self.read(path).find(b"\n") + 1)

    def do_truncate(self, qid):
        path = self.queueFile(qid)
        if path is None:
            return False
        data = self.read(path)
        self.write(path, data[:self.rng.randrange(len(data))])

    def do_extend(self, qid):
        path = self.queueFile(qid)
        if path is None:
            return False
        self.write(path, self.read(path) + (self.junk() or b"\r\n"))

    def do_deleteQueueFile(self, qid):
        path = self.queueFile(qid)
        if path is None:
            return False
        os.unlink(path)
        self.deleted.add(qid)

    def do_copyOver(self, qid):
        """Another message's queue file (or a copy of this one) takes this one's name or a new one."""
        source = self.queueFile(self.rng.choice(self.qids))
        if source is None:
            return False
        target = self.rng.choice([qid, qid[:-1] + ("0" if qid[-1] != "0" else "1"), "copy"])
        if self.path("queue", target) == source or os.path.isdir(self.path("queue", target)):
            return False
        if self.rng.random() < 0.5:
            self.write(self.path("queue", target), self.read(source))
        else:
            self.remove(self.path("queue", target))
            os.link(source, self.path("queue", target))

    def do_queueLink(self, qid):
        """The queue file replaced by a symbolic link to a copy outside the spool."""
        path = self.queueFile(qid)
        if path is None:
            return False
        target = self.sentinel(self.read(path))
        os.unlink(path)
        os.symlink(target, path)

    def do_queueDirectory(self, qid):
        """The queue file replaced by a directory (the message is gone)."""
        path = self.queueFile(qid)
        if path is None:
            return False
        os.unlink(path)
        os.mkdir(path)
        self.deleted.add(qid)

    # -- progress records -------------------------------------------------

    def stateFile(self, qid):
        path = self.path("state", qid)
        return path if os.path.isfile(path) and not os.path.islink(path) else None

    def do_flipState(self, qid):
        path = self.stateFile(qid)
        return path is not None and self.flip(path)

    def do_truncateState(self, qid):
        path = self.stateFile(qid)
        if path is None:
            return False
        data = self.read(path)
        self.write(path, data[:self.rng.randrange(len(data) + 1)])

    def do_extendState(self, qid):
        path = self.stateFile(qid)
        if path is None:
            return False
        self.write(path, self.read(path) + self.rng.choice([b" ", b"\n", b"}", b"x", self.junk()]))

    def do_deleteState(self, qid):
        path = self.stateFile(qid)
        if path is None:
            return False
        os.unlink(path)
        self.progressLost.add(qid)

    def do_copyStateOver(self, qid):
        """Another message's progress record in this one's place."""
        source = self.stateFile(self.rng.choice(self.qids))
        if source is None or source == self.path("state", qid) or os.path.isdir(self.path("state", qid)):
            return False
        self.write(self.path("state", qid), self.read(source))

    def do_stateLink(self, qid):
        path = self.stateFile(qid)
        if path is None:
            return False
        target = self.sentinel(self.read(path))
        os.unlink(path)
        os.symlink(target, path)

    def do_stateDirectory(self, qid):
        path = self.stateFile(qid)
        if path is None:
            return False
        os.unlink(path)
        os.mkdir(path)

    # -- strays and markers ------------------------------------------------

    def strayName(self, qid):
        return self.rng.choice(_ODD + [qid + ".tmp", qid + ".1", qid + ".state", qid + ".reason", qid.lower(),
                                       qid + "x", "release." + qid])

    def stray(self, path):
        if os.path.lexists(path):
            return False
        kind = self.rng.randrange(6)
        if kind == 0:
            os.mkdir(path)
        elif kind == 1:
            os.mkfifo(path)
        elif kind == 2:
            os.symlink(self.sentinel(), path)
        elif kind == 3:
            os.symlink(os.path.join(self.outside, "nowhere"), path)
        else:
            self.write(path, self.junk())

    def do_stray(self, qid):
        area = self.rng.choice(Spool.AREAS)
        return self.stray(self.path(area, self.strayName(qid)))

    def do_strayCopy(self, qid):
        """A copy of a queue or progress file in another area, under its name or a stray one."""
        source = self.rng.choice([self.queueFile(qid), self.stateFile(qid)])
        if source is None:
            return False
        area = self.rng.choice(["tmp", "spent", "corrupt", "hold", "state"])
        target = self.path(area, self.rng.choice([qid, qid + ".state", self.strayName(qid)]))
        if os.path.lexists(target) or (area == "state" and os.path.basename(target) == qid):
            return False
        if area == "hold" and os.path.basename(target) == qid:
            self.held.add(qid)
        if self.rng.random() < 0.5:
            os.link(source, target)
        else:
            self.write(target, self.read(source))

    def do_hold(self, qid):
        if os.path.lexists(self.path("hold", qid)):
            return False
        self.stray(self.path("hold", qid))
        self.held.add(qid)

    def do_marker(self, qid):
        name = self.rng.choice(["flush", "release.", "release..", "release." + qid, "released." + qid,
                                "held." + qid, "deleted." + qid, "deleted.", "deleted.junk", "held.", "release.x/"])
        path = os.path.join(self.dir, name.rstrip("/"))
        if os.path.lexists(path):
            return False
        if self.rng.random() < 0.7:
            self.write(path, b"")
        else:
            self.stray(path)

    def do_lockFile(self, qid):
        self.write(os.path.join(self.dir, "lock"), self.junk())


class Case:
    """One spool: messages accepted and deferred, the spool damaged, and the restart that delivers."""

    def __init__(self, directory, rng, figures, label):
        self.dir = os.path.abspath(directory)
        self.spoolDir = os.path.join(self.dir, "spool")
        self.rng = rng
        self.figures = figures
        self.label = label
        self.bad = []  # log events that are failures (a traceback)

    def problem(self, why):
        self.figures.problems.append("%s: %s" % (self.label, why))

    def gateway(self, hopPort, retry=600):
        return Gateway(self.dir, listeners=({"relay_networks": ["127.0.0.0/8"]},),
                       relay={"smarthosts": ["[127.0.0.1]:%d" % hopPort.getHost().port], "retry_min": retry,
                              "retry_max": retry, "tls": "none"})

    @defer.inlineCallbacks
    def until(self, condition, seconds):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        return condition()

    @defer.inlineCallbacks
    def run(self):
        def observe(event):
            fmt = event.get("log_format") or ""
            if "log_failure" in event or "Unhandled" in fmt or "Traceback" in fmt:
                self.bad.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            yield self._run()
        finally:
            globalLogPublisher.removeObserver(observe)
        for event in self.bad:
            self.problem("logged a failure: %s %s" % (formatEvent(event), event.get("log_failure")))
        self.figures.spools += 1

    @defer.inlineCallbacks
    def _run(self):
        rng = self.rng
        pool = ["ok%d@example.net" % i for i in range(4)] + ["later%d@example.net" % i for i in range(4)]
        hop = ScriptedSMTPFactory(extensions=["PIPELINING", "8BITMIME"],
                                  rcpt={r: "451 4.3.0 later" for r in pool if r.startswith("later")})
        hopPort = reactor.listenTCP(0, hop, interface="127.0.0.1")
        gw = self.gateway(hopPort)
        yield gw.start()
        sent = []
        for n in range(rng.randrange(3, 9)):
            rcpts = rng.sample(pool, rng.randrange(1, 5))
            if not any(r.startswith("later") for r in rcpts):
                rcpts.append(rng.choice(pool[4:]))
            wire, content = body(rng, "fuzz.%s.%d" % (self.label, n))
            sent.append((rcpts, wire, content))
        qids = yield inThread(sendAll, gw.port, [(r, w) for r, w, _ in sent])
        spool = gw.service.spool

        def attempted():
            try:
                return all(q is None or spool.readState(q).get("attempts", 0) >= 1 for q in qids)
            except Exception:
                return False

        settled = yield self.until(lambda: attempted() and not gw.service.queue.active, 20)
        yield gw.stop()
        yield hopPort.stopListening()
        if not settled:
            self.problem("the first attempts did not end")
        accepted = self.record(sent, qids, hop)
        self.figures.messages += len(accepted)
        if not accepted:
            return
        outside = os.path.join(self.dir, "outside")
        os.makedirs(outside)
        damage = Damage(rng, self.spoolDir, outside, sorted(accepted))
        damage.run(rng.randrange(1, 7))
        self.figures.damages += len(damage.done)
        yield self.restart(accepted, damage)

    def record(self, sent, qids, hop):
        """
        C{{qid: (tag, recipients, content, done)}} as the stopped spool holds
        them, checked against what was sent and what the next hop got.
        """
        spool = Spool(self.spoolDir, None)
        accepted = {}
        for (rcpts, _, content), qid in zip(sent, qids):
            if qid is None:
                self.problem("not accepted: %r" % (rcpts,))
                continue
            message = spool.load(qid)
            with message.openBody() as f:
                stored = f.read()
            state = spool.readState(qid)
            done = {r for r, e in state.get("rcpts", {}).items() if e.get("status") == "done"}
            if message.recipients != rcpts or not stored.endswith(content):
                self.problem("%s not spooled as sent" % qid)
            if done != {r for r in rcpts if r.startswith("ok")}:
                self.problem("%s: done %r before the damage" % (qid, sorted(done)))
            accepted[qid] = (tagOf(stored), rcpts, stored, done)
        got = {}
        for t in hop.transactions:
            got.setdefault(tagOf(t["data"]), []).append(t)
        for qid, (tag, rcpts, stored, done) in accepted.items():
            if sorted(r for t in got.get(tag, []) for r in t["rcpts"]) != sorted(done):
                self.problem("%s: the first next hop got %r" % (qid, got.get(tag)))
            if any(t["data"] != stored for t in got.get(tag, [])):
                self.problem("%s: the first next hop got other content" % qid)
        return accepted

    @defer.inlineCallbacks
    def restart(self, accepted, damage):
        hop = ScriptedSMTPFactory(extensions=["PIPELINING", "8BITMIME"])
        hopPort = reactor.listenTCP(0, hop, interface="127.0.0.1")
        # A start leaves a deferred message until its recorded next attempt,
        # but no longer than its retry interval from the start: a short one
        # here has the restart deliver what the spool holds within the case.
        gw = self.gateway(hopPort, retry=0.2)
        try:
            yield gw.start()
        except Exception as e:
            self.problem("no start after %r: %s" % (damage.done, e))
            yield hopPort.stopListening()
            return
        spool = gw.service.spool
        seen = []

        def quiet():
            if gw.service.queue.active:
                return False
            now = (spool.queueIds(), len(hop.transactions))
            seen.append((time.monotonic(), now))
            if not now[0]:
                return True
            return all(n == now for t, n in seen if t > time.monotonic() - 1.0) and seen[0][0] < time.monotonic() - 1
        yield self.until(quiet, 20)
        # The gateway keeps serving: a fresh message goes out.
        wire, content = body(self.rng, "fuzz.%s.fresh" % self.label)
        [fresh] = yield inThread(sendAll, gw.port, [(["fresh@example.net"], wire)])
        delivered = yield self.until(lambda: any(tagOf(t["data"]) == tagOf(content) for t in hop.transactions), 10)
        if fresh is None or not delivered:
            self.problem("a fresh message after %r was not delivered" % (damage.done,))
        else:
            self.figures.fresh += 1
        yield gw.stop()
        yield hopPort.stopListening()
        self.check(accepted, damage, hop.transactions, spool)

    def check(self, accepted, damage, transactions, spool):
        """Each message delivered once and whole to the recipients still to do, set aside, or gone if deleted."""
        where = " after %r" % (damage.done,)
        byTag = {}
        for t in transactions:
            byTag.setdefault(tagOf(t["data"]), []).append(t)
        known = {tag for tag, _, _, _ in accepted.values()} | {"fuzz.%s.fresh" % self.label}
        for tag in set(byTag) - known:
            self.problem("delivered what was never accepted (%r)%s" % (tag, where))
        quarantined = {name.partition(".")[0] for name, _, _ in spool.corrupt()}
        queued = set(spool.queueIds())
        for qid, (tag, rcpts, stored, done) in sorted(accepted.items()):
            got = byTag.get(tag, [])
            to = [r for t in got for r in t["rcpts"]]
            if any(t["data"] != stored for t in got):
                self.problem("%s delivered altered%s" % (qid, where))
            if set(to) - set(rcpts):
                self.problem("%s delivered to %r, not accepted for%s" % (qid, sorted(set(to) - set(rcpts)), where))
            again = [r for r in to if r in done] if qid not in damage.progressLost else []
            twice = sorted(r for r in set(to) if to.count(r) > 1)
            if again or twice:
                self.figures.duplicates += len(again) + len(twice)
                self.problem("%s delivered again to %r%s" % (qid, again + twice, where))
            todo = [r for r in rcpts if r not in done or qid in damage.progressLost]
            if set(todo) <= set(to):
                self.figures.delivered += 1
            elif qid in quarantined:
                self.figures.quarantined += 1
            elif qid in damage.deleted and not to:
                self.figures.lost += 1
            elif qid in damage.held and qid in queued:
                self.figures.held += 1
            else:
                self.problem("%s lost: %r of %r delivered, %s%s" % (qid, to, todo, "queued" if qid in queued
                                                                      else "gone", where))
        for path, data in damage.sentinels.items():
            if not os.path.isfile(path) or damage.read(path) != data:
                self.problem("%s outside the spool changed%s" % (path, where))


#: C{runSeeds(base, seeds, cases, figures, minutes=None, done=None)}: C{cases} L{Case}s for
#: each seed (L{tests.fuzzing.runCases}); a Deferred of C{figures}.
runSeeds = partial(runCases, Case)


if __name__ == "__main__":
    import sys

    casesMain(sys.argv[1:], runSeeds, Figures(), "spoolfuzz", 50)
