"""
XREMOTEIP ip: a trusted peer changes the perceived client address.

Decision (protocol.md section 11): the session is not reset and there is no
new greeting; HELO/EHLO and AUTH are kept.  The name becomes unknown, the
port unavailable, and the connect policy runs again for the new address.
Inside a transaction it is refused with 503 5.5.1.
"""

from relaygw import codes
from relaygw.commands import splitWords
from relaygw.trust import clientIP
from relaygw.verbs import afterConnectPolicy, refuse


def parse(args):
    words = splitWords(args)
    if len(words) != 1:
        return None
    try:
        return clientIP(words[0])
    except ValueError:
        return None


def run(session, args):
    if session.inTransaction:
        return refuse(codes.BAD_SEQUENCE.format(what="MAIL transaction in progress"), "inside a transaction")
    ip = parse(args)
    if ip is None:
        return refuse(codes.SYNTAX.format(what="XREMOTEIP address"), "bad address %r" % (args,))
    keys = {"remote_ip": ip, "remote_name": "unknown", "remote_name_status": "perm", "remote_port": 0}
    session.audit("XREMOTEIP", {k: (session.context.get(k), v) for k, v in keys.items()})
    session.context.update(overridden=True, **keys)
    return afterConnectPolicy(session.rerunConnectPolicy(), codes.OK)
