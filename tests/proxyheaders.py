"""PROXY protocol headers for tests: version 2 headers built field by field, and a raw socket that opens with one."""

import ipaddress
import socket
import struct

#: The PROXY protocol version 2 signature.
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command=1, family=1, transport=1, src="192.0.2.7", dst="198.51.100.1", sport=4567, dport=25,
       tlvs=b"", version=2):
    """A version 2 header (addresses omitted for LOCAL)."""
    if command == 0:
        body = b""
    elif family == 1:
        body = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    elif family == 2:
        body = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
    else:
        body = b"\x00" * 216
    body += tlvs
    return SIG + bytes([(version << 4) | command, (family << 4) | transport]) + struct.pack("!H", len(body)) + body


def rawSession(port, header, then=b""):
    """A loopback socket to C{port} that has sent C{header} and then C{then}."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(header + then)
    return s
