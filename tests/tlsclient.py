"""
A blocking TLS client for tests that end a session in a chosen way
(L{RecordClient}): pyOpenSSL through memory BIOs, so that a test decides
what one write to the socket holds (content, a close_notify alert, both),
can shut the TCP write side after it, and keeps reading what the server
sends after its own close_notify (Python's C{ssl} refuses to: its
C{unwrap} fails on application data).
"""

import socket
import time

from OpenSSL import SSL


class RecordClient:
    """
    The client side of a TLS connection on C{sock} (a connected blocking
    socket, past STARTTLS or on an implicit TLS port).  L{records} gives
    the octets for the socket and L{send} writes them; L{readAll} reads to
    the end.

    @ivar closeNotified: whether the server's close_notify has been read.
    """

    closeNotified = False

    def __init__(self, sock, hostname=b"relay.test", maximum=None):
        self.sock = sock
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if maximum is not None:
            ctx.set_max_proto_version(maximum)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(hostname)
        self.buf = b""
        self._handshake()

    def _outgoing(self):
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                return out

    def _handshake(self):
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                self.sock.sendall(self._outgoing())
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("closed during the handshake")
                self.conn.bio_write(data)
        self.sock.sendall(self._outgoing())

    def records(self, data=b"", closeNotify=False):
        """The octets that carry C{data} (and, if asked, a close_notify after it), not sent yet."""
        if data:
            self.conn.sendall(data)
        if closeNotify:
            self.conn.shutdown()
        return self._outgoing()

    def send(self, data=b"", closeNotify=False, shutWrite=False):
        """C{data} (and a close_notify) in one write, then the TCP write side shut if asked."""
        self.sock.sendall(self.records(data, closeNotify))
        if shutWrite:
            self.sock.shutdown(socket.SHUT_WR)

    def _decrypt(self):
        while True:
            try:
                self.buf += self.conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closeNotified = True
                return

    def reply(self):
        """One reply (octets, CRLFs kept; C{b""} once the connection ends without one)."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    reply = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                    self.buf = self.buf[len(reply):]
                    return reply
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.conn.bio_write(data)
            self._decrypt()
            self.sock.sendall(self._outgoing())

    def cmd(self, line):
        self.send(line + b"\r\n")
        return self.reply()

    def readAll(self, timeout=10.0):
        """
        What the server sends (decrypted) until it closes the connection:
        C{(octets, how)}, C{how} C{"eof"}, C{"reset"} or C{"open"} (not
        closed within C{timeout}).
        """
        self.sock.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except ConnectionResetError:
                return self._take(), "reset"
            if not data:
                return self._take(), "eof"
            self.conn.bio_write(data)
            if not self.closeNotified:
                self._decrypt()
        return self._take(), "open"

    def _take(self):
        data, self.buf = self.buf, b""
        return data


def clientHello(hostname=b"relay.test"):
    """The octets of a client's first flight (its ClientHello), from a client that goes no further."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(hostname)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)
