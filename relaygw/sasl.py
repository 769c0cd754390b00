"""
SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954), as a pure
exchange: the client's lines in, a challenge, the credentials or a
refusal out.  No portal, no clock, no I/O: the session asks the portal
(and the brute-force limiter) once the exchange yields L{Credentials}.
"""

import base64
import binascii
from dataclasses import dataclass

from relaygw import codes

MECHANISMS = ("PLAIN", "LOGIN")

_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"


@dataclass(frozen=True)
class Challenge:
    """Send C{334 text} and wait for the client's next line."""

    text: str


@dataclass(frozen=True)
class Credentials:
    """The exchange is complete: verify these."""

    user: str
    password: str
    authzid: str = ""


@dataclass(frozen=True)
class Refused:
    """The exchange ends with C{reply}; nothing is verified."""

    reply: codes.Reply


class SASLError(Exception):
    """The AUTH command itself is refused with C{reply} (no exchange starts)."""

    def __init__(self, reply):
        Exception.__init__(self, reply.text)
        self.reply = reply


def decodePlain(response):
    """
    Split a SASL PLAIN response (RFC 4616), already base64-decoded.

    @param response: C{authzid NUL authcid NUL passwd}.
    @return: C{(authzid, authcid, password)} as C{str}; authzid may be
        empty.
    @raise ValueError: if the form is wrong or a part is not UTF-8.
    """
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise ValueError("PLAIN response must have three NUL-separated parts")
    authzid, authcid, password = (p.decode("utf-8") for p in parts)
    if not authcid or not password:
        raise ValueError("PLAIN response has an empty authcid or password")
    return authzid, authcid, password


def encodePlain(user, password, authzid=""):
    """The client's side of L{decodePlain}: the base64 text of a PLAIN response."""
    return base64.b64encode(("%s\0%s\0%s" % (authzid, user, password)).encode("utf-8")).decode("ascii")


class Exchange:
    """
    One AUTH exchange.  L{begin} parses the AUTH arguments; L{first} gives
    the first outcome (from the initial response, or the first challenge);
    L{respond} takes each further client line.  Every outcome is a
    L{Challenge} (the exchange goes on), L{Credentials} or L{Refused} (it
    is over).
    """

    def __init__(self, mechanism, initial=None):
        self.mechanism = mechanism
        self.initial = initial
        self.user = None

    @classmethod
    def begin(cls, args):
        """
        C{AUTH} arguments (C{mechanism [initial-response]}) -> an exchange.

        @raise SASLError: no mechanism (501 5.5.4) or an unknown one (504 5.5.4).
        """
        mechanism, _, initial = args.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            raise SASLError(codes.SYNTAX.format(what="AUTH mechanism"))
        if mechanism not in MECHANISMS:
            raise SASLError(codes.AUTH_MECHANISM)
        return cls(mechanism, initial.encode("ascii", "replace") if initial else None)

    def first(self):
        if self.initial is not None:
            return self.respond(self.initial)
        return Challenge("" if self.mechanism == "PLAIN" else _USERNAME)

    def respond(self, line):
        """The client's line (bytes, without CRLF) -> the next outcome."""
        line = line.strip()
        if line == b"*":
            return Refused(codes.AUTH_CANCELLED)
        try:
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return Refused(codes.AUTH_BAD_BASE64)
        if self.mechanism == "PLAIN":
            try:
                authzid, user, password = decodePlain(decoded)
            except ValueError:
                # Decoded, but no RFC 4616 message: the authentication fails
                # (RFC 4954 section 4 keeps 501 5.5.2 for what cannot be decoded).
                return Refused(codes.AUTH_FAILED)
            return Credentials(user, password, authzid)
        if self.user is None:
            self.user = decoded.decode("utf-8", "replace")
            return Challenge(_PASSWORD)
        return Credentials(self.user, decoded.decode("utf-8", "replace"))
