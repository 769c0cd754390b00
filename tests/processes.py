"""
Gateway processes for tests: C{twistd} children running the source tree,
and what a test reads of them from outside (the spool's lock files, whether
a pid is alive, whether a port refuses connections).
"""

import os
import socket
import subprocess
import sys
import time

import relaygw
from relaygw import testing

#: The source tree under test (child processes must run it, not an installed copy).
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(relaygw.__file__)))


def sourceEnv():
    """The environment for a child process that imports relaygw from L{SOURCE}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SOURCE] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def runTwistd(configPath, cwd):
    """
    C{twistd -n relaygw} from the source tree as a child process, its
    output appended to C{cwd}/twistd.log; returns the Popen.
    """
    with open(os.path.join(cwd, "twistd.log"), "ab") as log:
        return testing.runTwistd(configPath, cwd, stdout=log, env=sourceEnv())


def twistdCommand(*args, cwd=None, user=None):
    """
    Run this Python's C{twistd} with C{args} to its end (60 s at most),
    as C{user} (a uid, the same for the group) when given: C{(returncode,
    stdout, stderr)}.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "twistd")
    ids = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    p = subprocess.run([exe] + list(args), capture_output=True, text=True, cwd=cwd, timeout=60, **ids)
    return p.returncode, p.stdout, p.stderr


def childPids(pid):
    """The pids of the child processes of C{pid} (Linux's /proc)."""
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(child) for child in f.read().split()]


def spoolPids(directory):
    """The pids named by the spool's lock files: {partition: pid}."""
    out = {}
    spool = os.path.join(directory, "spool")
    for name in sorted(os.listdir(spool)):
        path = os.path.join(spool, name, "lock")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                out[name] = int(text)
    return out


def processState(pid):
    """The state letter /proc gives for C{pid}: R, S, T (stopped), Z (zombie)..."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def processAlive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not reaped yet) is not alive
        return processState(pid) != "Z"
    except OSError:
        return False


def portRefused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def waitUntil(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
