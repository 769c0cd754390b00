"""
A seeded fuzzer of the config file: the shipped examples (etc/relaygw.toml,
etc/haproxy/, etc/nginx/, etc/systemd/ and the embedded default), moved
into a scratch directory, then mutated: wrong types, numbers out of range
(0, negative, huge, nan, inf), unknown keys and sections, listeners and
routes copied (duplicate names and ports), bad endpoints, CIDRs and host
names, files that are missing, directories, FIFOs, devices, dangling
links, not UTF-8; and the text itself cut, doubled, with stray octets, a
byte-order mark or NULs.

Each case must be judged alike three ways (L{Judge}): C{--check-config}
accepts it (exit 0, one ok line) or refuses it with lines of the form
C{file: key: what is wrong (expected ...)} (exit 1); start with the file
then runs, or exits 1 with the same lines; a SIGHUP with it to a running
gateway applies it, or refuses it with the same lines, and the gateway
still accepts mail.  Nothing is written outside the scratch directory:
paths only name files in it, or absolute ones that are never created
(C{/nonexistent/...}, C{/dev/null}).

Run from the command line for long runs:

    python -m tests.configfuzz SEED [SEED...] --cases N --seconds S [--processes]
"""

import copy
import math
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import fields

from relaygw import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("etc/relaygw.toml", "etc/haproxy/relaygw-1.toml", "etc/haproxy/relaygw-2.toml", "etc/nginx/relaygw.toml",
            "etc/systemd/relaygw.toml", "relaygw/default.toml")
NAME = "relaygw.toml"
#: A line a refused config must be made of: the file, what is wrong, what was expected.
LINE = re.compile(r"^relaygw\.toml: [^\x00-\x1f\x7f]+ \(expected [^\x00-\x1f\x7f]+\)$")

#: Files of the scratch directory a path key may name (made by L{prepare}).
FILES = ("tls/cert.pem", "tls/key.pem", "tls/other-key.pem", "ca.pem", "passwd", "latin1", "a-file", "fifo", "dangling",
         "tls", "empty", "/dev/null", "/dev/zero", "/nonexistent/x.pem", "gen/" + "c" * 256, NAME)
DIRECTORIES = ("spool", "outbox", "sub/spool", "sub/outbox", "a-file", "a-file/under", "dangling", "dangling/under",
               "fifo", "x" * 256, "/nonexistent/spool", "/dev/null", "ro/spool")
PATH_KEYS = ("tls_certificate", "tls_key", "tls_client_ca", "tls_ca", "credentials")
DIRECTORY_KEYS = ("directory", "maildir")

VALUES = [0, -1, 1, 2, 511, 512, 3600, 3601, 65535, 65536, 2 ** 31, 2 ** 63 - 1, -2 ** 63, 0.5, -0.0, 1e308,
          float("nan"), float("inf"), -float("inf"), True, False, "", "x", "0", "1.2", "1.3", "text", "json", "each",
          "reject", "none", "verify", "\u00e9t\u00e9", "a\u0000b", "line\nbreak", "x" * 5000, [], [""], [1], [[]],
          [{}], {}, {"a": 1}, {"endpoint": "tcp:0"},
          ["127.0.0.1/33"], ["10.0.0.1/8"], ["fe80::1%eth0/64"], ["::ffff:127.0.0.1/128"], ["::ffff:127.0.0.0/104"],
          ["1.2.3.4/-1"], ["/8"], ["0.0.0.0/0"], ["::/0"], ["127.0.0.1"], ["2001:db8::/129"], ["192.0.2.0/24", 5],
          ["xclient", "XCLIENT"], ["xclient", "xremoteip", "xsetcontext", "xdumpcontext"], ["bogus"],
          ["[::1]:25"], ["[::1]"], ["host:0"], ["host:99999"], ["-bad-"], ["ex ample"], ["a:b:c"], ["[x]:25"],
          "[192.0.2.1]", "[IPv6:2001:db8::1]", "[IPv6:fe80::1%lo]", "[300.1.1.1]", "a-b.example.", "-x.example",
          "a" * 64 + ".example", "127.0.0.1:53", "[::1]:53", "localhost", "::1", "127.0.0.1:0",
          "relaygw.policy.RelayAccessPolicy", "relaygw.policy.Nope", "relaygw", "relaygw.policy.IPolicy",
          "builtins.int", "no.such.module", "..", "HIGH:!aNULL", "!ALL", "eNULL", "ECDHE+AESGCM",
          ["dns:relay.example"], ["dns:"], ["uri:"], ["x:y"], [0, 1], [5000], [-1], [0, 0]]
SECTIONS = ("spool", "relay", "admin", "log", "process")


def dumps(doc):
    """TOML for C{doc} (tables, arrays of tables, and values of the kinds TOML has)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return repr(v)
        if isinstance(v, str):
            return '"%s"' % "".join(c if c.isprintable() and c not in '"\\' else "\\u%04x" % ord(c) for c in v)
        if isinstance(v, list):
            return "[%s]" % ", ".join(value(x) for x in v)
        return "{%s}" % ", ".join("%s = %s" % (key(k), value(x)) for k, x in v.items())

    def key(k):
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else value(k)

    def tables(v):
        return isinstance(v, list) and v and all(isinstance(t, dict) for t in v)

    out = ["%s = %s" % (key(k), value(v)) for k, v in doc.items() if not isinstance(v, dict) and not tables(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            out += ["", "[%s]" % key(k)] + ["%s = %s" % (key(kk), value(vv)) for kk, vv in v.items()]
        elif tables(v):
            for t in v:
                out += ["", "[[%s]]" % key(k)] + ["%s = %s" % (key(kk), value(vv)) for kk, vv in t.items()]
    return "\n".join(out) + "\n"


def prepare(directory):
    """The files and directories the mutated paths name, in C{directory}."""
    from relaygw.tls import generateSelfSigned

    os.makedirs(os.path.join(directory, "tls"), exist_ok=True)
    os.makedirs(os.path.join(directory, "ro"), exist_ok=True)
    if not os.path.exists(os.path.join(directory, "tls", "cert.pem")):
        generateSelfSigned(os.path.join(directory, "tls", "cert.pem"), os.path.join(directory, "tls", "key.pem"),
                           "relay.test")
        generateSelfSigned(os.path.join(directory, "tls", "other.pem"),
                           os.path.join(directory, "tls", "other-key.pem"), "other.test")
        shutil.copy(os.path.join(directory, "tls", "cert.pem"), os.path.join(directory, "ca.pem"))
    for name, data in (("passwd", b"user:$scrypt$ln=1,r=8,p=1$AAAA$AAAA\n"), ("latin1", b"j\xf6rg:x\n"),
                       ("a-file", b"not PEM\n"), ("empty", b"")):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    if not os.path.lexists(os.path.join(directory, "fifo")):
        os.mkfifo(os.path.join(directory, "fifo"))
    if not os.path.lexists(os.path.join(directory, "dangling")):
        os.symlink(os.path.join(directory, "nothing-here"), os.path.join(directory, "dangling"))


def clean(directory):
    """What a start left in C{directory} (spool, Maildir, generated certificates), so that each case starts alike."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name in ("spool", "outbox", "sub", "x" * 256, "gen", "twistd.log") or name.startswith("s."):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    for name in os.listdir(os.path.join(directory, "ro")):
        shutil.rmtree(os.path.join(directory, "ro", name), ignore_errors=True)


def examples(ports):
    """The shipped configs as tables, on C{ports} (listener, admin), their paths in the scratch directory."""
    docs = []
    for name in EXAMPLES:
        with open(os.path.join(ROOT, name), "rb") as f:
            doc = tomllib.load(f)
        doc.setdefault("spool", {}).update(directory="spool", min_free_space=0)
        relay = doc.setdefault("relay", {})
        relay.update(maildir="outbox")
        for key in ("smarthosts", "mx", "auth_user", "auth_password", "resolver"):
            relay.pop(key, None)
        if "admin" in doc:
            doc["admin"] = {"endpoint": "tcp:%d:interface=127.0.0.1" % ports[1]}
        doc.setdefault("process", {})["workers"] = 1
        listener = doc["listener"][0]
        listener.update(endpoint="tcp:%d:interface=127.0.0.1" % ports[0], drain_delay=0,
                        relay_networks=["127.0.0.0/8"], proxy_protocol=False)
        listener.pop("proxy_trusted", None)
        if "tls_certificate" in listener:
            listener.update(tls_certificate="gen/cert.pem", tls_key="gen/key.pem", tls_self_signed=True)
        doc["listener"] = [listener]
        doc.pop("route", None)
        docs.append(doc)
    return docs


def _endpoint(rng, ports):
    port = rng.choice(ports)
    return rng.choice(["tcp:%d:interface=127.0.0.1" % port, "tcp:0:interface=127.0.0.1",
                       r"tcp:%d:interface=\:\:1" % port,
                       "tcp:%d" % port, "unix:s.sock", "unix:%s" % ("s." + "x" * 120), "unix:/nonexistent/s.sock",
                       "tcp:%d:interface=127.0.0.1:backlog=0" % port, "tcp:%d:interface=127.0.0.1:backlog=99999" % port,
                       r"tcp:%d:interface=\:\:ffff\:127.0.0.1" % port, "tcp:%d:interface=no-such-host.invalid" % port,
                       "ssl:%d" % port, "systemd:domain=INET:index=0", "tcp:99999", "tcp:-1", "tcp:x", "tcp:",
                       "tcp:%d:interface=fe80::1%%lo" % port, "tcp6:%d:interface=::1" % port, "bogus:1"])


def _fix(rng, table, ports):
    """Keep a mutated table's paths in the scratch directory and its endpoints on C{ports}."""
    for key, v in list(table.items()):
        if key in DIRECTORY_KEYS and isinstance(v, str):
            table[key] = rng.choice(DIRECTORIES)
        elif key in PATH_KEYS and isinstance(v, str) and not v.startswith("gen/"):
            table[key] = rng.choice(FILES)
        elif key == "endpoint" and isinstance(v, str) and not v.startswith("tcp:%d:" % ports[0]):
            table[key] = _endpoint(rng, ports)
        elif key == "workers" and isinstance(v, int) and not isinstance(v, bool) and v > 2:
            table[key] = 2
        elif key == "policy" and isinstance(v, str) and not v.startswith(("relaygw.", "builtins.", "no.", "..")):
            table[key] = "relaygw.policy.Nope"
        elif key in ("smarthosts", "resolver", "domains") and v:
            table[key] = {"smarthosts": ["[127.0.0.1]:9"], "resolver": "127.0.0.1:9",
                          "domains": ["example.net"]}[key] if not rng.randrange(3) else v


def tweak(rng, doc):
    """C{doc} with one or two values changed as an operator might (mostly still valid)."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 2)):
        t = rng.choice(_tables(doc))
        numbers = sorted(k for k, v in t.items() if isinstance(v, (bool, int, float)))
        if not numbers:
            continue
        k = rng.choice(numbers)
        v = t[k]
        if isinstance(v, bool):
            t[k] = not v
        elif isinstance(v, int):
            t[k] = rng.choice([v + 1, v * 2, max(1, v // 2), 1])
        else:
            t[k] = rng.choice([v * 2, v / 2, 1.5])
    return doc


def mutate(rng, doc, ports):
    """C{doc} with one to four changes."""
    doc = copy.deepcopy(doc)
    keys = sorted({k for t in _tables(doc) for k in t} | {f.name for cls in (config.ListenerConfig, config.RelayConfig)
                                                          for f in fields(cls)})
    for _ in range(rng.randint(1, 4)):
        tables = _tables(doc)
        t = rng.choice(tables)
        op = rng.randrange(8)
        if op == 0 and t:
            t[rng.choice(sorted(t))] = copy.deepcopy(rng.choice(VALUES))
        elif op == 1:
            t[rng.choice(keys)] = copy.deepcopy(rng.choice(VALUES))
        elif op == 2:
            t[rng.choice(["bogus", "Name", "listeners", "relay", "route", "listener", "spool", "ENDPOINT", "a\nb",
                          "\x1b[2J", "\x00", "dot.ted", "sp ace", "\u00e9"])] = \
                copy.deepcopy(rng.choice(VALUES))
        elif op == 3 and t:
            del t[rng.choice(sorted(t))]
        elif op == 4 and isinstance(doc.get("listener"), list) and doc["listener"]:
            other = copy.deepcopy(rng.choice(doc["listener"]))
            if rng.randrange(2) and isinstance(other, dict):
                other["name"] = "other%d" % rng.randrange(3)
                other["endpoint"] = _endpoint(rng, ports)
            doc["listener"].append(other)
        elif op == 5 and isinstance(doc.get("route", []), list):
            doc.setdefault("route", []).append({
                "name": rng.choice(["r", "r", "s"]), "domains": rng.choice([["example.net"], ["-x"], [], ["a", "a"]]),
                "smarthosts": rng.choice([["[127.0.0.1]:9"], [], ["host:0"]]), rng.choice(keys): rng.choice(VALUES)})
        elif op == 6:
            t[rng.choice(PATH_KEYS + DIRECTORY_KEYS)] = rng.choice(FILES + DIRECTORIES)
        elif op == 7:
            section = rng.choice(SECTIONS + ("listener", "route"))
            doc[section] = copy.deepcopy(rng.choice([[], {}, [{}], 5, "x", [1, 2], {"x": {"y": 1}}]))
    for t in _tables(doc):
        _fix(rng, t, ports)
    return doc


def _tables(doc):
    out = [doc]
    for v in doc.values():
        if isinstance(v, dict):
            out.append(v)
        elif isinstance(v, list):
            out += [t for t in v if isinstance(t, dict)]
    return out


def cut(rng, text):
    """C{text} (octets) damaged: cut, doubled, with stray octets, a byte-order mark, NULs."""
    b = bytearray(text)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(5)
        if op == 0 and b:
            del b[i:i + rng.randrange(1, 40)]
        elif op == 1:
            b[i:i] = rng.choice([b'"', b"[", b"]", b"=", b"\n", b"\r", b"[[listener]]\n", b"\x00", b"\xff", b"\xc3",
                                 b"\xef\xbb\xbf", b"{", b".", b'"""', b"'", b"\\", b"\t", b"#"])
        elif op == 2 and b:
            b[i:i + 1] = bytes([rng.randrange(256)])
        elif op == 3:
            b[i:i] = b[rng.randrange(len(b)):][:rng.randrange(200)]
        elif op == 4 and i == 0:
            b[0:0] = b"\xef\xbb\xbf"
    return bytes(b)


def case(rng, docs, ports):
    """The octets of one mutated config."""
    doc = rng.choice(docs)
    if rng.random() < 0.3:
        return dumps(tweak(rng, doc)).encode("utf-8")
    if rng.random() < 0.7:
        return dumps(mutate(rng, doc, ports)).encode("utf-8")
    text = cut(rng, dumps(doc).encode("utf-8"))
    # (a cut may leave a path or endpoint the fixing above did not see: keep those that name this directory)
    for bad in re.findall(rb'(?:directory|maildir) *= *"(/[^"]*)"', text):
        if bad.decode("utf-8", "replace") not in DIRECTORIES:
            return dumps(doc).encode("utf-8")
    return text


def lineProblems(errors):
    """What is wrong with the lines of a refusal: each must be C{file: ... (expected ...)}."""
    return ["not a config error line: %r" % (line,) for line in errors if not LINE.match(line)]


def judgeInProcess(path):
    """C{(errors or None, problems)}: the in-process check of the file at C{path}."""
    try:
        config.load(path, environment=True)
    except config.ConfigError as e:
        return e.errors, lineProblems(e.errors)
    except Exception as e:  # (what the check must never let out)
        return None, ["%s: %s" % (e.__class__.__name__, e)]
    return None, []


def _twistd():
    return [os.path.join(os.path.dirname(sys.executable), "twistd")]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _listening(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def startProblems(directory, checked):
    """
    Start C{twistd -n relaygw} on the file in C{directory}: it must run
    (and stop on SIGTERM without a traceback) if C{checked} is C{None},
    else exit 1 with C{checked} (the check's lines) on standard error.
    """
    # Started is when it says READY=1 as to systemd (every listener bound, the reactor running).
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = "configfuzz-%d-%d" % (os.getpid(), random.randrange(1 << 30))
    ready.bind("\0" + name)
    env = dict(_env(), NOTIFY_SOCKET="@" + name)
    with ready, open(os.path.join(directory, "twistd.log"), "wb") as log:
        p = subprocess.Popen(_twistd() + ["-n", "--pidfile=", "relaygw", "--config", NAME], cwd=directory,
                             stdout=log, stderr=subprocess.PIPE, env=env)
        code = None
        deadline = time.monotonic() + 30
        while code is None and time.monotonic() < deadline:
            ready.settimeout(0.1)
            try:
                if b"READY=1" in ready.recv(4096):
                    break
            except socket.timeout:
                pass
            code = p.poll()
        if code is None:
            p.send_signal(signal.SIGTERM)
            try:
                code = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                code = "hung"
        err = p.stderr.read().decode("utf-8", "replace")
        p.stderr.close()
    with open(os.path.join(directory, "twistd.log"), "rb") as f:
        out = f.read().decode("utf-8", "replace")
    problems = []
    if "Traceback" in out + err:
        problems.append("start: a traceback: %s" % ((out + err)[-2000:],))
    if checked is None:
        if code not in (0, -signal.SIGTERM) and "cannot listen" not in out:
            problems.append("checked ok, start ended %r: %s" % (code, (err or out)[-1000:]))
    elif code != 1 or err.splitlines() != checked:
        problems.append("check refused, start ended %r saying %r, not %r" % (code, err.splitlines(), checked))
    return problems


def checkProblems(directory):
    """C{(errors or None, problems)} of C{twistd relaygw --check-config} on the file in C{directory}."""
    p = subprocess.run(_twistd() + ["relaygw", "--config", NAME, "--check-config"], cwd=directory,
                       capture_output=True, text=True, timeout=60, env=_env())
    if p.returncode == 0:
        return None, [] if (p.stdout, p.stderr) == ("%s: ok\n" % NAME, "") else [
            "check exit 0 with %r %r" % (p.stdout, p.stderr)]
    lines = p.stderr.splitlines()
    if p.returncode != 1:
        return lines, ["check exit %r: %r" % (p.returncode, p.stderr[-1000:])]
    return lines, lineProblems(lines) + (["check: a traceback"] if "Traceback" in p.stderr else [])


class ReloadingGateway:
    """A gateway on a good config, sent each case with SIGHUP, and given its own config back after one it took."""

    def __init__(self, directory, text, port):
        self.directory, self.text, self.port = directory, text, port
        self.path = os.path.join(directory, NAME)
        with open(self.path, "wb") as f:
            f.write(text)
        self.log = os.path.join(directory, "gateway.log")
        self.process = subprocess.Popen(_twistd() + ["-n", "--pidfile=", "--logfile=" + self.log, "relaygw",
                                                     "--config", NAME], cwd=directory, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=_env())
        if not _listening(port, 30):
            self.stop()
            raise RuntimeError("the gateway did not start: %s" % (self._since(0),))

    def _since(self, offset):
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def reload(self, text, wait=30):
        """SIGHUP with C{text} as the file: the lines logged since it applied or refused it (within C{wait} s)."""
        with open(self.path, "wb") as f:
            f.write(text)
        offset = os.path.getsize(self.log)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            new = self._since(offset)
            if "reload: applied" in new or "reload refused" in new:
                time.sleep(0.3)  # (the rest of a refusal's lines)
                return self._since(offset)
            time.sleep(0.05)
        return None

    def accepting(self):
        """Whether a message is accepted; the reply otherwise."""
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as s:
                refused = s.sendmail("a@example.org", ["b@example.net"], b"Subject: fuzz\r\n\r\nbody\r\n")
            return not refused or refused
        except (OSError, smtplib.SMTPException) as e:
            return "%s: %s" % (e.__class__.__name__, e)

    def problems(self, text, checked):
        """SIGHUP with C{text}: applied if C{checked} is C{None}, else refused with its lines; mail still accepted."""
        quiet = checked is None and tomllib.loads(text.decode("utf-8").removeprefix("\ufeff")).get(
            "log", {}).get("level") in ("warn", "error")  # (its "reload: applied" is not logged)
        logged = self.reload(text, 1 if quiet else 30)
        if self.process.poll() is not None:
            return ["the gateway exited (%r) on a reload" % (self.process.returncode,)]
        if logged is None and not quiet:
            return ["a reload neither applied nor refused within 30 s"]
        logged = logged or ""
        problems = []
        if "Traceback" in logged or " critical " in logged:
            problems.append("reload: a traceback: %s" % (logged[-2000:],))
        refused = [line.partition("reload refused, keeping the running config: ")[2] for line in logged.splitlines()
                   if "reload refused" in line]
        if checked is None and "reload: applied" not in logged and not quiet:
            problems.append("checked ok, reload refused: %r" % (refused,))
        elif checked is not None and refused != checked:
            problems.append("check refused %r, reload %r" % (checked, refused))
        if checked is None:
            self.reload(self.text)
        accepted = self.accepting()
        if accepted is not True:
            problems.append("not accepting mail after the reload: %s" % (accepted,))
        return problems

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def freePorts(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Fuzzer:
    """
    Cases in C{directory}/start (judged in process, and with
    C{processes} by twistd: check, start, reload on a gateway running in
    C{directory}/reload, with C{workers} worker processes).
    """

    def __init__(self, directory, processes=False, workers=1):
        self.directory = directory = os.path.abspath(directory)
        self.start = os.path.join(directory, "start")
        self.reloading = os.path.join(directory, "reload")
        for d in (self.start, self.reloading):
            os.makedirs(d, exist_ok=True)
            prepare(d)
        self.ports = freePorts(4)
        self.docs = examples(self.ports[:2])
        self.reloadDocs = examples(self.ports[2:])
        self.reloadDocs[0]["process"]["workers"] = workers
        self.gateway = None
        if processes:
            self.gateway = ReloadingGateway(self.reloading, dumps(self.reloadDocs[0]).encode("utf-8"), self.ports[2])
        self.cases = self.refused = 0

    def close(self):
        if self.gateway is not None:
            return self.gateway.stop()

    def run(self, seed, cases, seconds, processEvery=1):
        """Up to C{cases} cases from C{seed} within C{seconds}: C{[(seed, case, text, problem)]}."""
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        found = []
        for n in range(cases):
            if time.monotonic() > deadline:
                break
            text = case(rng, self.docs, self.ports[:2])
            self.cases += 1
            problems = self.judge(text, self.gateway is not None and n % processEvery == 0)
            found += [(seed, n, text, p) for p in problems]
        return found

    def judge(self, text, processes):
        clean(self.start)
        path = os.path.join(self.start, NAME)
        with open(path, "wb") as f:
            f.write(text)
        errors, problems = judgeInProcess(path)
        self.refused += errors is not None
        if not processes or problems:
            return problems
        # (not compared with the lines in process: a relative UNIX socket path is the working directory's)
        checked, problems = checkProblems(self.start)
        if problems:
            return problems
        problems += startProblems(self.start, checked)
        # The same case on the reloading gateway's ports and in its directory (the same lines, its paths).
        moved = text.replace(b"%d" % self.ports[0], b"%d" % self.ports[2]).replace(b"%d" % self.ports[1],
                                                                                    b"%d" % self.ports[3])
        with open(path, "wb") as f:
            f.write(moved)
        with open(os.path.join(self.reloading, NAME), "wb") as f:
            f.write(moved)
        checkedThere, more = checkProblems(self.reloading)
        problems += more
        problems += self.gateway.problems(moved, checkedThere)
        return problems


def main(argv):
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.configfuzz")
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--processes", action="store_true", help="check, start and reload with twistd too")
    parser.add_argument("--every", type=int, default=1, help="with --processes: twistd for every Nth case")
    parser.add_argument("--workers", type=int, default=1, help="with --processes: the reloading gateway's workers")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="configfuzz-")
    fuzzer = Fuzzer(directory, args.processes, args.workers)
    found = []
    try:
        for seed in args.seeds:
            t0 = time.monotonic()
            before = fuzzer.cases
            problems = fuzzer.run(seed, args.cases, args.seconds, args.every)
            for s, n, text, p in problems:
                print("PROBLEM seed %d case %d: %s\n%s" % (s, n, p, text.decode("utf-8", "replace")), flush=True)
            found += problems
            print("seed %d: %d cases in %.0f s" % (seed, fuzzer.cases - before, time.monotonic() - t0), flush=True)
    finally:
        code = fuzzer.close()
    print("cases %d refused %d problems %d gateway exit %r" % (fuzzer.cases, fuzzer.refused, len(found), code))
    shutil.rmtree(directory, ignore_errors=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
