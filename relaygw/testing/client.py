"""
The client side over loopback: a raw blocking SMTP line client
(L{Client}) for use in a thread (L{inThread}) so the reactor keeps
serving, and the port helpers (L{freePort}, L{waitForPort}).
"""

import itertools
import os
import random
import socket
import threading
import time

from twisted.internet import threads


class Client:
    """A raw blocking SMTP client for use in a thread (C{inThread})."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; pending %r" % (self.buf,))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("latin-1")

    def reply(self):
        """One (possibly multi-line) reply as C{(code, [lines])}, text after the code."""
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def transaction(self, rcpts, content=None, helo="x", mailfrom="a@example.org"):
        """
        The greeting, EHLO, MAIL, each RCPT and, given C{content} (without
        the final dot), DATA and the content: every reply as C{(code, lines)}.
        """
        replies = [self.reply(), self.cmd("EHLO " + helo), self.cmd("MAIL FROM:<%s>" % mailfrom)]
        replies += [self.cmd("RCPT TO:<%s>" % r) for r in rcpts]
        if content is not None:
            replies.append(self.cmd("DATA"))
            if replies[-1][0] == 354:
                self.send(content + ".\r\n")
                replies.append(self.reply())
        return replies

    def closed(self, wait=5):
        """Whether the server closed the connection (reads and drops any data)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def inThread(f, *args, **kw):
    """Run blocking client code in a thread so the reactor keeps serving."""
    return threads.deferToThread(f, *args, **kw)


def waitForPort(port, host="127.0.0.1", timeout=15.0):
    """Block until something listens on C{port}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("nothing listens on %s:%d" % (host, port))


# Ports handed out by freePort: below the kernel's ephemeral range (32768 and up
# on Linux), so no port it picks for bind(0) or an outgoing connection can be one
# of them, and a block of its own for each trial worker (its working directory
# is named after its number), so two test processes never hand out the same port
# between one's choice and its server's bind.
_PORT_BASE, _PORT_BLOCK, _WORKER_BLOCKS, _OTHER_BLOCKS = 10000, 2000, 8, 3
_ports = None
_portsLock = threading.Lock()


def _portCycle():
    name = os.path.basename(os.getcwd())
    if name.isdigit() and int(name) < _WORKER_BLOCKS:
        block = int(name)
    else:
        block = _WORKER_BLOCKS + os.getpid() % _OTHER_BLOCKS
    first = _PORT_BASE + block * _PORT_BLOCK
    start = random.randrange(_PORT_BLOCK)
    return itertools.cycle([first + (start + i) % _PORT_BLOCK for i in range(_PORT_BLOCK)])


def freePort():
    """A loopback port nothing listens on, not handed out again until its block has been."""
    global _ports
    with _portsLock:
        if _ports is None:
            _ports = _portCycle()
        for _ in range(_PORT_BLOCK):
            port = next(_ports)
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            return port
    raise OSError("no free port in this process's block")
