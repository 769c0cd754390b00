"""
The connections an SMTP next hop keeps open, and those it is closing.

A connection that finished its batch stays open for a moment
(C{IDLE_SECONDS}, Postfix's connection cache time) and carries the next
batch without a new connect, greeting, EHLO and TLS handshake, for up to
C{REUSE_SECONDS} after it opened.  One that fell back to plaintext after a
failed opportunistic handshake is never kept: the next batch tries TLS
again.  Kept-open connections and those saying QUIT count against the
destination's C{maxConnections} with those carrying a batch: the oldest
kept for another key, or those slow to answer QUIT, are cut to make room.
"""

from twisted.internet import defer

from relaygw.relay import client as smtpclient


class KeptOpen:
    """
    The kept-open and closing connections of L{relaygw.relay.smtp.SMTPNextHop},
    which provides C{reactor}, C{options}, C{maxConnections}, C{active}
    (connections carrying a batch), C{waiting}, C{stopping} and C{_pump}.

    @ivar idle: C{[(connection, key, timer)]}, most recently used last.
    @ivar closing: the connections saying QUIT: the Deferred that fires when each is closed.
    """

    #: How long a connection with nothing to carry stays open for reuse.
    IDLE_SECONDS = 2.0
    #: How long after it opened a connection may still be reused (Postfix's
    #: C{smtp_connection_reuse_time_limit}).
    REUSE_SECONDS = 300.0

    #: The next hop that replaced this one (a reload rebuilt the router): this one keeps no connection open.
    successor = None

    def __init__(self):
        self.idle = []
        self.closing = {}

    def _connection(self, key, options):
        """A kept-open connection for C{key}, or a new one."""
        for i in range(len(self.idle) - 1, -1, -1):
            conn, k, timer = self.idle[i]
            if k == key:
                del self.idle[i]
                timer.cancel()
                if self._reusableOrClosed(conn):
                    return conn
        return smtpclient.Connection(self.reactor, key[0], key[1], options)

    def _roomFor(self, key):
        """
        Before a connection for C{key} opens: when none is kept open for it
        and the destination's connections (the batches under way, this
        one's among them, those kept open and those closing) are already
        C{maxConnections}, the oldest kept open for other keys (another
        original client's, another smarthost's) are cut.  A Deferred that
        fires once they are closed, or None.
        """
        if any(k == key for _, k, _ in self.idle):
            return None
        excess = self.active + len(self.idle) + len(self.closing) - self.maxConnections
        cut, self.idle = self.idle[:max(0, excess)], self.idle[max(0, excess):]
        for conn, _, timer in cut:
            timer.cancel()
            conn.cut(None)  # (it carries nothing)
        return defer.gatherResults([conn.proto.closed for conn, _, _ in cut]) if cut else None

    def _reusableOrClosed(self, conn):
        """
        Whether C{conn} may carry another batch: open, younger than
        C{REUSE_SECONDS}, and not one that gave up the TLS the next hop's
        policy asks for (reused, one failed handshake would send all later
        mail in plaintext for as long as mail kept coming).  One still open
        that may not is closed.
        """
        if conn.usable and conn.options.tls == self.options.tls \
                and self.reactor.seconds() - conn.opened < self.REUSE_SECONDS:
            return True
        if conn.usable:
            self._close(conn)
        return False

    def _park(self, conn, key):
        """Keep C{conn} open for the next batch, for a moment (if it may carry one)."""
        if not self._reusableOrClosed(conn):
            return
        if self.successor is not None:
            self._close(conn)
            return
        timer = self.reactor.callLater(self.IDLE_SECONDS, self._expire, conn)
        self.idle.append((conn, key, timer))
        while len(self.idle) > self.maxConnections:
            old, _, oldTimer = self.idle.pop(0)
            oldTimer.cancel()
            self._close(old)

    def _expire(self, conn):
        self.idle = [entry for entry in self.idle if entry[0] is not conn]
        self._close(conn)

    def _close(self, conn):
        """
        Say QUIT on C{conn}, which carries nothing now, and close it.  Until
        it is closed it counts as one of the destination's connections
        (L{_pump}).
        """
        d = self.closing[conn] = defer.ensureDeferred(conn.close())
        d.addBoth(self._closed, conn)

    def _closed(self, result, conn):
        if self.closing.pop(conn, None) is not None and (self.waiting or self.successor is not None):
            self._pump()
        return result

    def _makeRoom(self):
        """
        Messages wait, and only connections saying QUIT keep them from a
        connection of their own: those are cut (they carry nothing; a next
        hop slow to answer QUIT would otherwise have more connections from
        the gateway than C{maxConnections}).
        """
        excess = self.active + len(self.closing) - self.maxConnections + 1
        if self.waiting and not self.stopping and self.active < self.maxConnections and excess > 0:
            for conn in list(self.closing)[:excess]:
                conn.cut(None)

    def closeIdle(self):
        """Close every kept-open connection (on shutdown); fires when they, and those closing, are closed."""
        idle, self.idle = self.idle, []
        for conn, _, timer in idle:
            timer.cancel()
            self._close(conn)
        return defer.gatherResults([_whenDone(d) for d in self.closing.values()])


def _whenDone(d):
    """A Deferred that fires (with C{None}) once C{d} has, C{d}'s own result left alone."""
    done = defer.Deferred()
    d.addBoth(lambda result: (done.callback(None), result)[1])
    return done
