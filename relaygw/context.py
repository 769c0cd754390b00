"""
The validation context: what the gateway knows about a connection and about
the message in progress.

Policy, logs, the Received header and onward XCLIENT read identity only from
here, never from the transport.  The gateway owns most keys; a trusted peer
may add its own keys with XSETCONTEXT, but can never overwrite an owned one.
"""

import re

from relaygw.trust import peerIP

#: Connection keys the gateway owns (protocol.md section 14).
OWNED_CONNECTION_KEYS = frozenset(
    """
    ehlo_domain ehlo_string auth_user auth_status auth_name can_relay tls
    tls_cipher tls_client_cert_subject tls_client_verified
    connection_message_count connection_rcpt_count remote_ip remote_port
    remote_name remote_name_status local_ip local_port protocol peer_ip
    peer_port trusted listener session_id helo_name dest_ip dest_port
    overridden
    """.split()
)

#: Message keys the gateway owns.
OWNED_MESSAGE_KEYS = frozenset(
    """
    mailfrom_string mailfrom_localpart mailfrom_domain rcptto
    message_rcpt_count size queue_id body
    """.split()
)

#: The client identity: XCLIENT attribute -> context key, in the order
#: relaygw advertises them (Postfix's).  XCLIENT applies them, the delivery
#: client forwards them onward (XCLIENT or XFORWARD), and the next hop
#: groups messages by them: this table is the one place that pairs them.
IDENTITY_ATTRIBUTES = (
    ("NAME", "remote_name"),
    ("ADDR", "remote_ip"),
    ("PORT", "remote_port"),
    ("PROTO", "protocol"),
    ("HELO", "ehlo_domain"),
    ("LOGIN", "auth_user"),
    ("DESTADDR", "dest_ip"),
    ("DESTPORT", "dest_port"),
)

IDENTITY_KEYS = dict(IDENTITY_ATTRIBUTES)

#: The attributes forwarded onward, in the order sent: NAME and ADDR last,
#: because once ADDR is sent the next hop usually stops authorising
#: XCLIENT (when the line has to be split in two).  DESTADDR/DESTPORT
#: describe this gateway's listener, not the client, and stay here.
FORWARDED_ATTRIBUTES = ("HELO", "PROTO", "LOGIN", "PORT", "NAME", "ADDR")

#: C{auth_name} of a session that logged in nobody (ALWAYS-ALLOW listeners).
ANONYMOUS_LOGIN = "ALWAYS-ALLOW"


def identityValue(connection, attribute):
    """
    What XCLIENT attribute C{attribute} says of the client whose context
    connection keys are C{connection}: the value, or C{None} when it is not
    available.  Only a real login (AUTH, XCLIENT C{LOGIN=}) is a LOGIN; an
    ALWAYS-ALLOW session logged in nobody.
    """
    value = connection.get(IDENTITY_KEYS[attribute])
    if attribute == "LOGIN" and connection.get("auth_name") == ANONYMOUS_LOGIN:
        return None
    if (attribute in ("NAME", "ADDR") and value == "unknown") or (attribute in ("PORT", "DESTPORT")
                                                                   and value in (0, "0")):
        return None  # the gateway's "unknown" is XCLIENT's [UNAVAILABLE]
    if value is None or value == "":
        return None
    return value


def identityOf(connection):
    """
    Everything onward XCLIENT/XFORWARD would say about a client, as a
    hashable tuple: two messages with the same one speak for the same client.
    """
    return tuple(identityValue(connection, a) for a in FORWARDED_ATTRIBUTES) + (
        connection.get("remote_name_status"),)


_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Limits on client-set keys, so a peer cannot exhaust memory.
MAX_CLIENT_KEYS = 64
MAX_VALUE_LENGTH = 1024


class ContextError(ValueError):
    """A client-supplied key or value is not acceptable."""


def reservedKey(name):
    """Whether C{name} is owned by the gateway (or otherwise not settable)."""
    return (
        name in OWNED_CONNECTION_KEYS
        or name in OWNED_MESSAGE_KEYS
        or name.startswith(("__", "#", "proxy_", "rcptto_"))
    )


class ValidationContext:
    """
    A connection-level dictionary plus a message-level dictionary that lives
    from MAIL to the end of DATA or RSET.

    @ivar connection: the connection keys (owned and client-set).
    @ivar message: the message keys, or C{None} outside a transaction.
    @ivar clientKeys: the names set through XSETCONTEXT (they survive resets).
    """

    def __init__(self, **initial):
        self.connection = dict(initial)
        #: C{get(key, default=None)}: a connection key (the dict's own, a call less for every use).
        self.get = self.connection.get
        self.message = None
        self.clientKeys = set()

    def __getitem__(self, key):
        return self.connection[key]

    def update(self, **values):
        """Set gateway-owned connection keys; C{None} removes a key."""
        for k, v in values.items():
            if v is None:
                self.connection.pop(k, None)
            else:
                self.connection[k] = v

    def setClientKeys(self, pairs):
        """
        Apply client-supplied C{(name, value)} pairs, all or nothing.

        @raise ContextError: a name is malformed or reserved, a value is too
            long or not printable, or the key limit would be exceeded.
        """
        new = set()
        for name, value in pairs:
            # fullmatch: "$" would also match before a trailing newline.
            if not _KEY.fullmatch(name):
                raise ContextError("bad key name")
            if reservedKey(name):
                raise ContextError("key %s is owned by the gateway" % (name,))
            if len(value) > MAX_VALUE_LENGTH:
                raise ContextError("value too long")
            if any(c < " " or c > "~" for c in value):
                raise ContextError("value not printable")
            new.add(name)
        if len(self.clientKeys | new) > MAX_CLIENT_KEYS:
            raise ContextError("too many context keys")
        for name, value in pairs:
            self.connection[name] = value
        self.clientKeys |= new

    def beginMessage(self, mailfrom):
        local, _, domain = mailfrom.rpartition("@") if "@" in mailfrom else (mailfrom, "", "")
        self.message = {
            "mailfrom_string": mailfrom,
            "mailfrom_localpart": local,
            "mailfrom_domain": domain,
            "rcptto": [],
            "message_rcpt_count": 0,
        }

    def addRecipient(self, rcpt):
        self.message["rcptto"].append(rcpt)
        self.message["message_rcpt_count"] = len(self.message["rcptto"])
        self.connection["connection_rcpt_count"] = self.connection.get("connection_rcpt_count", 0) + 1

    def endMessage(self):
        self.message = None

    @property
    def inTransaction(self):
        return self.message is not None

    def items(self):
        """
        Every key as C{(scope, key, value)}: connection keys sorted, then
        message keys sorted while a transaction is open.
        """
        for k in sorted(self.connection):
            yield "connection", k, self.connection[k]
        if self.message is not None:
            for k in sorted(self.message):
                yield "message", k, self.message[k]

    def snapshot(self):
        """A JSON-able copy for the envelope of a spooled message."""
        # A deep copy: the live message's rcptto list must not leak into it.
        return {
            "connection": _copyJSON(self.connection),
            "message": _copyJSON(self.message or {}),
            "client_keys": sorted(self.clientKeys),
        }


def connectionContext(sessionId, listenerName, peer, local, proxied=None):
    """
    The context of a new connection, from facts the client cannot forge:
    the socket's peer and local addresses (C{getPeer()}/C{getHost()}), and
    the balancer's address when the connection came through PROXY
    (C{proxied}: a L{relaygw.proxy} info, or C{None}).  The client
    identity starts as the real peer; XCLIENT may change it later.
    """
    ip = peerIP(getattr(peer, "host", "127.0.0.1") or "127.0.0.1")
    context = ValidationContext(
        session_id=sessionId,
        listener=listenerName,
        remote_ip=ip,
        remote_port=getattr(peer, "port", 0),
        remote_name="unknown",
        remote_name_status="perm",
        local_ip=peerIP(getattr(local, "host", "127.0.0.1") or "127.0.0.1"),
        local_port=getattr(local, "port", 0),
        peer_ip=ip,
        peer_port=getattr(peer, "port", 0),
        protocol="SMTP",
        connection_message_count=0,
        connection_rcpt_count=0,
    )
    if proxied is not None and proxied.peer is not None:
        context.update(proxy_peer_ip=peerIP(proxied.peer.host), proxy_peer_port=proxied.peer.port)
    return context


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _copyJSON(value):
    """A deep copy of JSON-able data (sequences become lists), without copy.deepcopy's bookkeeping."""
    if isinstance(value, dict):
        return {k: v if type(v) in _SCALARS else _copyJSON(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [v if type(v) in _SCALARS else _copyJSON(v) for v in value]
    return value


def display(value):
    """One-line text of a context value, for dumps and logs."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)
