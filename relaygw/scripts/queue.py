"""
relaygw-queue: inspect and steer a gateway's spool, stopped or running.

Every change is an atomic file operation the gateway expects (a marker
created or removed, a queue file unlinked), so the tool never corrupts a
spool the gateway is writing to.  A running gateway notices flush requests
and released messages within a few seconds.
"""

import argparse
import json
import os
import re
import sys
import time

from relaygw import config as _config
from relaygw.relay.queue import FLUSH_MARKER, RELEASE_MARKER
from relaygw.spool import Spool, partitions

_QUEUE_ID = re.compile(r"[A-Za-z0-9_-]+")


def _spools(args):
    """
    The spool partitions: the spool directory itself, or with
    C{[process] workers} > 1 each worker's C{wN} partition under it.
    """
    if args.spool:
        directory, workers = os.path.abspath(args.spool), 1
    else:
        cfg = _config.load(args.config) if args.config else _config.loadDefault()
        directory, workers = cfg.spool.directory, cfg.process.workers
    found = list(partitions(directory).values())
    if workers > 1 or (found and not os.path.isdir(os.path.join(directory, "queue"))):
        return [Spool(path, None) for path in found]
    return [Spool(directory, None)]


def _find(spools, qid):
    """The partition holding message C{qid}, or C{None}."""
    if not _QUEUE_ID.fullmatch(qid):
        return None
    for spool in spools:
        if os.path.isfile(spool.path("queue", qid)):
            return spool
    return None


def _requestFlush(spools, qid=None):
    """
    Leave the marker each partition's queue manager polls for: retry
    everything, or only C{qid}.
    """
    for spool in spools:
        marker = FLUSH_MARKER if qid is None else RELEASE_MARKER + qid
        with open(os.path.join(spool.directory, marker), "w"):
            pass


def _summary(spool, qid, now):
    m = spool.load(qid)
    state = spool.readState(qid)
    rcpts = state.get("rcpts", {})
    nxt = state.get("next_attempt")
    return {
        "id": qid,
        "age": int(now - m.envelope.get("arrival", now)),
        "sender": m.mailfrom,
        "recipients": {r: rcpts.get(r, {}).get("status", "pending") for r in m.recipients},
        "next_attempt": "held" if spool.isHeld(qid) else (
            "now" if nxt is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(nxt))),
        "last_error": state.get("last_error", ""),
        "size": m.envelope["size"],
    }


def main(argv=None, out=sys.stdout):
    p = argparse.ArgumentParser(prog="relaygw-queue", description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", help="the gateway's config file (default: the embedded default config)")
    p.add_argument("--spool", help="the spool directory (instead of --config)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="queue id, age, sender, recipients, next attempt, last error")
    for name, what in (("show", "one message: envelope, context and progress"),
                       ("delete", "remove a message from the queue"),
                       ("hold", "keep a message from being delivered"),
                       ("release", "let a held message be delivered again")):
        sub.add_parser(name, help=what).add_argument("id")
    sub.add_parser("flush", help="retry every queued message now")
    args = p.parse_args(argv)
    try:
        spools = _spools(args)
    except _config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    now = time.time()
    cmd = args.command
    if cmd == "list":
        count = 0
        for spool in spools:
            ids = spool.queueIds() if os.path.isdir(spool.path("queue")) else []
            count += len(ids)
            for qid in ids:
                try:
                    s = _summary(spool, qid, now)
                except (FileNotFoundError, ValueError):
                    continue  # delivered or being written meanwhile
                rcpts = " ".join("<%s>:%s" % kv for kv in s["recipients"].items())
                out.write("%s  %6ds  <%s>  %s  next=%s  %s\n" % (
                    qid, s["age"], s["sender"], rcpts, s["next_attempt"], s["last_error"]))
        out.write("%d message(s)\n" % count)
        return 0
    if cmd == "flush":
        _requestFlush(spools)
        out.write("flush requested\n")
        return 0
    qid = args.id
    spool = _find(spools, qid)
    if spool is None:
        print("relaygw-queue: no such message: %s" % qid, file=sys.stderr)
        return 1
    if cmd == "show":
        try:
            m = spool.load(qid)
            shown = {"summary": _summary(spool, qid, now), "envelope": m.envelope, "state": spool.readState(qid)}
        except FileNotFoundError:
            # Delivered (and removed) since we looked.
            print("relaygw-queue: no such message: %s" % qid, file=sys.stderr)
            return 1
        out.write(json.dumps(shown, indent=2, sort_keys=True) + "\n")
    elif cmd == "delete":
        spool.remove(qid)
        out.write("deleted %s\n" % qid)
    elif cmd == "hold":
        with open(spool.path("hold", qid), "w"):
            pass
        if not os.path.exists(spool.path("queue", qid)):
            # Delivered meanwhile: leave no stray marker behind.
            spool.remove(qid)
            print("relaygw-queue: no such message: %s" % qid, file=sys.stderr)
            return 1
        out.write("held %s\n" % qid)
    elif cmd == "release":
        try:
            os.unlink(spool.path("hold", qid))
        except FileNotFoundError:
            pass
        _requestFlush([spool], qid)
        out.write("released %s\n" % qid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
