"""
systemd's readiness protocol without a dependency: one datagram (C{READY=1},
C{STOPPING=1}, C{STATUS=...}) to the Unix socket named by C{$NOTIFY_SOCKET}
(a leading C{@} is Linux's abstract namespace).  Without the variable
(not under systemd, or C{Type=} other than notify) nothing is sent.
"""

import os
import socket

from relaygw.logs import Logger

log = Logger(namespace="relaygw.sdnotify")


def notify(state, environ=None):
    """
    Send C{state} (e.g. C{"READY=1"}) to systemd.

    @return: C{True} if a datagram was sent.  Never raises.
    """
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("cannot notify systemd ({state}): {error}", state=state.split("=")[0], error=e)
        return False
    return True
