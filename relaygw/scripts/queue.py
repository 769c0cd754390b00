"""
relaygw-queue: inspect and steer a gateway's spool, stopped or running.

Every change is an atomic file operation the gateway expects (a marker
created or removed, a queue file unlinked), so the tool never corrupts a
spool the gateway is writing to.  A running gateway notices flush requests
and released messages within a few seconds.  Whatever the spool holds, the
tool answers with a line, never a traceback.
"""

import argparse
import errno
import json
import os
import sys
import time

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from relaygw import config as _config
from relaygw.commands import addressDomain, canonicalDomain
from relaygw.relay.outcome import pending
from relaygw.spool import UnsafeSpool, isQueueId, spoolsAt
from relaygw.spoolapi import CorruptMessage

EPILOG = """\
Messages to act on (hold, release, delete, flush): queue ids; ALL for every
queued message; - to read ids from standard input (one a line, as many as
given); or --domain example.net for every message with a recipient there
still to deliver.
"""


class _NoSpool(Exception):
    """The spool directory named does not exist, or holds no spool."""


def _spools(args):
    """
    The spool partitions: the spool directory itself, or with
    C{[process] workers} > 1 each worker's C{wN} partition under it.
    Raises L{UnsafeSpool} when one's layout is not safe to work on.
    """
    if args.spool:
        directory, workers = os.path.abspath(args.spool), 1
    else:
        cfg = _config.load(args.config) if args.config else _config.loadDefault()
        directory, workers = cfg.spool.directory, cfg.process.workers
    if not os.path.isdir(directory):
        # (every command alike: list would say "0 messages", flush fail on its marker)
        raise _NoSpool("no spool at %s" % (directory,))
    spools = spoolsAt(directory, workers)
    for spool in spools:
        spool.checkLayout()
    if not any(os.path.isdir(spool.path("queue")) for spool in spools):
        # A directory no gateway has laid out (a mistyped --spool, /tmp): nothing to list, and no place for
        # flush's marker or anything else this tool would write.
        raise _NoSpool("no spool at %s" % (directory,))
    return spools


def _clean(text):
    """C{text} fit for one line of a terminal: control and non-ASCII characters escaped."""
    return "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in str(text))


def _why(error):
    """An C{OSError} as a line: the path it names and what is wrong."""
    return _clean("%s: %s" % (error.filename, error.strerror) if error.filename else error.strerror or error)


def _when(t, never="-"):
    if t is None:
        return never
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, ValueError, OSError, TypeError):
        return "?"


def _find(spools, qid):
    """The partition holding message C{qid}, or C{None}."""
    if not isQueueId(qid):
        return None
    for spool in spools:
        if spool.exists(qid):
            return spool
    return None


class _Unreadable(Exception):
    """A message the tool can't read: shown as a row, not a traceback."""


def _summary(spool, qid, now, content=False):
    """
    One message as C{list} and C{show} print it.  Raises
    C{FileNotFoundError} when it has gone, C{PermissionError} when this
    user may not read it, L{_Unreadable} when it can't be read back.
    Unless C{content}, the message's content is not read (a listing reads
    envelopes only, as C{postqueue -p} does), so a checksum that does not
    match shows when the message is shown or tried.
    """
    try:
        m = spool.load(qid, content=content)
        state = spool.readState(qid)
    except CorruptMessage as e:
        raise _Unreadable(e.reason)
    except (FileNotFoundError, PermissionError):
        raise  # (gone; or not for this user to read, which says nothing of the message)
    except OSError as e:
        raise _Unreadable(e.strerror or str(e))
    rcpts = state.get("rcpts", {})
    nxt = state.get("next_attempt")
    if spool.isHeld(qid):
        status = "held"
    elif nxt is not None and nxt > now:
        status = "deferred"
    else:
        status = "active"
    return {
        "id": qid,
        "arrival": m.arrival,
        "size": m.size,
        "sender": m.mailfrom,
        "status": status,
        "recipients": [{"address": r, "status": rcpts.get(r, {}).get("status", "pending"),
                        "reply": rcpts.get(r, {}).get("result", "")} for r in m.recipients],
        "next_attempt": nxt,
        "attempts": state.get("attempts", 0),
        "last_error": state.get("last_error", ""),
    }


def _list(spools, out, now):
    """Like C{postqueue -p}: a row per message, a line per recipient, then a summary."""
    counts = {"active": 0, "deferred": 0, "held": 0, "corrupt": 0}
    octets = 0
    out.write("%-24s %-19s %10s  %s\n" % ("QUEUE ID", "ARRIVAL", "SIZE", "SENDER / RECIPIENT  STATE  LAST REPLY"))
    for spool in spools:
        for qid in spool.queueIds():
            try:
                s = _summary(spool, qid, now)
            except FileNotFoundError:
                continue  # delivered meanwhile
            except _Unreadable as e:
                counts["corrupt"] += 1
                out.write("%-24s %-19s %10s  unreadable: %s\n" % (_clean(qid) + "!", "?", "?", _clean(e)))
                continue
            counts[s["status"]] += 1
            octets += s["size"]
            mark = {"held": "!", "active": "*"}.get(s["status"], " ")
            tail = {"held": "held", "deferred": "next attempt " + _when(s["next_attempt"]),
                    "active": "being delivered or due"}[s["status"]]
            out.write("%-24s %-19s %10d  <%s>  (%s)\n" % (_clean(qid) + mark, _when(s["arrival"]), s["size"],
                                                         _clean(s["sender"]), tail))
            for r in s["recipients"]:
                reply = "  " + _clean(r["reply"]) if r["reply"] else ""
                out.write("%46s<%s>  %s%s\n" % ("", _clean(r["address"]), r["status"], reply))
        for qid, reason, when in spool.corrupt():
            counts["corrupt"] += 1
            out.write("%-24s %-19s %10s  corrupt: %s\n" % (_clean(qid) + "#", _when(when), "-", _clean(reason)))
        strays = spool.strays()
        if strays:  # (no message: neither listed nor delivered, as Postfix's mailq skips a bad name)
            print("relaygw-queue: warning: %s: %d files whose names are no queue ids, not listed: %s%s" % (
                _clean(spool.path("queue")), len(strays), ", ".join(_clean(ascii(n)) for n in strays[:10]),
                " ..." if len(strays) > 10 else ""), file=sys.stderr)
    total = counts["active"] + counts["deferred"] + counts["held"]
    out.write("-- %d message%s, %d bytes: %d active, %d deferred, %d held; %d corrupt\n" % (
        total, "" if total == 1 else "s", octets, counts["active"], counts["deferred"], counts["held"],
        counts["corrupt"]))


def _select(spools, args, err):
    """
    The messages C{args} name: C{[(spool, qid, named)]}, and whether every
    named one was found.  For C{release}, ALL and C{--domain} stand for the
    held messages among them (as C{postsuper -H ALL}); only a message
    named by its id (C{named}) is one to complain of when it is not held,
    or has gone by the time it is acted on.
    """
    chosen, ok = [], True
    if args.command == "release":
        def wanted(spool, qid):
            return spool.isHeld(qid)
    else:
        def wanted(spool, qid):
            return True
    if args.domain:
        domain = canonicalDomain(args.domain.lstrip("@"))
        for spool in spools:
            for qid in spool.queueIds():
                try:
                    m = spool.load(qid, content=False)
                except PermissionError:
                    raise  # (not for this user to read: none would be found)
                except (OSError, CorruptMessage):
                    continue
                try:
                    state = spool.readState(qid)
                except (OSError, CorruptMessage):
                    state = {}  # (which are done, it cannot say: every recipient counts)
                # Only the recipients still to deliver, as Postfix's queue tools see them: not a
                # message whose recipient there is done, for the others it still has.
                todo = pending(state, m.recipients)
                if any(addressDomain(r) == domain for r in todo) and wanted(spool, qid):
                    chosen.append((spool, qid, False))
        return chosen, ok
    ids = []
    for word in args.ids:
        if word == "ALL":
            chosen.extend((spool, qid, False) for spool in spools for qid in spool.queueIds() if wanted(spool, qid))
        elif word == "-":
            ids.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            ids.append(word)
    for qid in ids:
        spool = _find(spools, qid)
        if spool is None:
            err("no such message: %s" % _clean(qid))
            ok = False
        else:
            chosen.append((spool, qid, True))
    return chosen, ok


def _parser():
    p = argparse.ArgumentParser(prog="relaygw-queue", description=__doc__.strip().splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the gateway's config file (default: the embedded default config)")
    where.add_argument("--spool", help="the spool directory (instead of --config)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="each message: id, arrival, size, sender, each recipient's state and last reply")
    sub.add_parser("show", help="one message: envelope, context and progress").add_argument("id")
    for name, what in (("delete", "remove messages from the queue (or from corrupt/)"),
                       ("hold", "keep messages from being delivered"),
                       ("release", "let held messages be delivered again, now (ALL: every held one)"),
                       ("flush", "try messages now (all of them when none are named)")):
        s = sub.add_parser(name, help=what, epilog=EPILOG)
        s.add_argument("ids", nargs="*", metavar="ID")
        s.add_argument("--domain", help="every message with a recipient in this domain still to deliver")
    return p


def _run(argv, out):
    args = _parser().parse_args(argv)

    def err(text):
        print("relaygw-queue: %s" % text, file=sys.stderr)

    try:
        spools = _spools(args)
    except (_config.ConfigError, UnsafeSpool) as e:
        for line in str(e).splitlines():  # (every error of a config, each a line of its own)
            err(line)
        return 1
    now = time.time()
    cmd = args.command
    if cmd == "list":
        _list(spools, out, now)
        return 0
    if cmd == "show":
        spool = _find(spools, args.id)
        if spool is None:
            quarantined = [(qid, reason, when) for s in spools for qid, reason, when in s.corrupt() if qid == args.id]
            if quarantined:
                qid, reason, when = quarantined[0]
                out.write(json.dumps({"id": qid, "corrupt": reason, "quarantined": _when(when)}, indent=2,
                                     sort_keys=True) + "\n")
                return 0
            err("no such message: %s" % _clean(args.id))
            return 1
        try:
            summary = _summary(spool, args.id, now, content=True)
            m = spool.load(args.id, content=False)  # (read whole just now)
            shown = {"summary": summary, "envelope": m.envelope.asDict(), "state": spool.readState(args.id)}
        except FileNotFoundError:  # delivered (and removed) since we looked
            err("no such message: %s" % _clean(args.id))
            return 1
        except _Unreadable as e:
            err("%s is unreadable: %s" % (args.id, _clean(e)))
            return 1
        out.write(json.dumps(shown, indent=2, sort_keys=True) + "\n")
        return 0
    if cmd == "flush" and not args.ids and not args.domain:
        for spool in spools:
            spool.requestFlush()
        out.write("flush requested\n")
        return 0
    if not args.ids and not args.domain:
        err("%s: name messages (queue ids, ALL, - or --domain)" % cmd)
        return 2
    out = _Report(out)
    code = _change(spools, args, out, err)
    if out.error is not None:
        raise out.error  # (every message acted on; main says why the output failed)
    if out.gone:
        raise BrokenPipeError()  # (every message acted on; main ends quietly, as for list | head)
    return code


class _Report:
    """
    Standard output for the commands that change messages: a reader that
    goes away (C{hold ALL | head -1}), or an output that fails (closed, a
    full disk), does not stop them half way, nor make each message after
    look failed; what they would say is dropped, and the failure (other
    than the reader gone) reported once they are done.
    """

    def __init__(self, out):
        self.out = out
        self.gone = False
        self.error = None

    def write(self, text):
        if not self.gone:
            try:
                self.out.write(text)
            except BrokenPipeError:
                self.gone = True
            except OSError as e:
                self.gone, self.error = True, e


class _ClosedOutput:
    """Standard output of a process started with its descriptor closed (C{>&-}): every write fails."""

    def write(self, text):
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self):
        pass


def _change(spools, args, out, err):
    """delete, hold, release or flush of the messages C{args} name; the exit code."""
    cmd = args.command
    failed = False
    if cmd == "delete":
        # A quarantined message is named as list shows it (ALL and - are for the queue).
        done = []
        for w in args.ids:
            if w in ("ALL", "-") or _find(spools, w) is not None:
                continue
            try:
                if any(s.discardCorrupt(w) for s in spools):
                    out.write("deleted %s (corrupt)\n" % _clean(w))
                    done.append(w)
            except OSError as e:  # (a directory in corrupt/: left alone)
                err("cannot delete %s: %s" % (_clean(w), _why(e)))
                done.append(w)
                failed = True
        args.ids = [w for w in args.ids if w not in done]
        if not args.ids and not args.domain:
            return 1 if failed else 0
    chosen, ok = _select(spools, args, err)
    ok = ok and not failed
    for spool, qid, named in chosen:
        try:
            # (One of ALL or --domain delivered, or released, since it was chosen: passed over, as postsuper does.)
            ok = (_act(cmd, spool, qid, out, err if named else lambda text: None) or not named) and ok
        except PermissionError:
            raise  # (not this user's to change: nor are the others, in the same directories)
        except OSError as e:  # (junk where a message's file belongs: left alone, the others go on)
            err("cannot %s %s: %s" % (cmd, _clean(qid), _why(e)))
            ok = False
    if not chosen and ok:
        out.write("no messages\n")
    return 0 if ok else 1


def _act(cmd, spool, qid, out, err):
    """Apply C{cmd} to one message; whether it did."""
    if cmd == "delete":
        if not spool.delete(qid):  # (delivered since it was looked up: nothing was deleted)
            err("no such message: %s" % _clean(qid))
            return False
        spool.noteDeleted(qid)  # (for the mail log of the running gateway, or of the next start)
        out.write("deleted %s\n" % _clean(qid))
    elif cmd == "hold":
        if not spool.hold(qid):
            err("no such message: %s" % _clean(qid))
            return False
        out.write("held %s\n" % _clean(qid))
    elif cmd == "release":
        if not spool.release(qid):
            err("%s is not held; nothing changed" % _clean(qid))
            return False
        out.write("released %s\n" % _clean(qid))
    elif cmd == "flush":
        spool.requestFlush(qid)
        out.write("flush requested for %s\n" % _clean(qid))
    return True


def _warnings(event):
    """The spool's warnings (what it leaves alone) as lines on standard error."""
    if event.get("log_level", LogLevel.info) >= LogLevel.warn:
        print("relaygw-queue: warning: %s" % _clean(formatEvent(event)), file=sys.stderr)


def main(argv=None, out=None):
    out = sys.stdout if out is None else out
    if out is None:  # (Python's sys.stdout, with the descriptor closed)
        out = _ClosedOutput()
    globalLogPublisher.addObserver(_warnings)
    try:
        code = _run(argv, out)
        out.flush()
        return code
    except BrokenPipeError:
        # The reader went away (list | head): stop quietly, and keep the
        # interpreter from complaining when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print("relaygw-queue: error: %s" % _why(e), file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback, whatever the spool holds
        print("relaygw-queue: error: %s" % _clean(e), file=sys.stderr)
        return 1
    finally:
        globalLogPublisher.removeObserver(_warnings)


if __name__ == "__main__":
    sys.exit(main())
