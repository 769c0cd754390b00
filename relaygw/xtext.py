"""
RFC 3461 section 4 xtext (the RFC 1891 encoding used by XCLIENT, XFORWARD,
XSETCONTEXT and DSN parameters).

Twisted's own codec is not used: it leaves C{+} and C{=} unescaped, encodes
code points rather than UTF-8 bytes, and raises C{TypeError} on bad escapes.
"""

import re


class XtextError(ValueError):
    """The value is not valid xtext."""


#: The longest attribute value, as sent (xtext), that XCLIENT and XFORWARD
#: take: Postfix's limit, and relaygw's own in both directions.
MAX_ATTRIBUTE = 255

_HEX = b"0123456789ABCDEFabcdef"
_ESCAPE = re.compile(rb"\+([0-9A-Fa-f]{2})")


def encode(value):
    """
    Encode C{value} (str, as UTF-8, or bytes) as xtext: C{+}, C{=}, octets
    up to 0x20 and from 0x7F on become C{+XX} with uppercase hex.
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    out = []
    for b in value:
        if b <= 0x20 or b >= 0x7F or b in (0x2B, 0x3D):
            out.append("+%02X" % b)
        else:
            out.append(chr(b))
    return "".join(out)


def decode(value, lenient=False, raw8bit=False):
    """
    Decode xtext to bytes.

    Strict mode (XSETCONTEXT): a C{+} not followed by two hex digits, a
    decoded NUL, or an octet outside 0x21-0x7E is an L{XtextError}.
    Lowercase hex and a literal C{=} are tolerated, as Postfix does.

    Lenient mode (XCLIENT): a C{+HH} escape is decoded and any other C{+} is
    kept as sent, because nginx sends LOGIN unencoded (C{nginx+user@...}).

    With C{raw8bit} (XCLIENT LOGIN), octets from 0x80 on are kept as sent
    too, as nginx forwards a UTF-8 login's octets unencoded; whether they
    make valid UTF-8 is the caller's to judge.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            raise XtextError("non-ASCII octet in xtext")
    for b in value:
        if b < 0x21 or b == 0x7F or (b > 0x7F and not raw8bit):
            raise XtextError("invalid octet 0x%02X in xtext" % b)
    if not lenient:
        i = value.find(b"+")
        while i != -1:
            if len(value) < i + 3 or value[i + 1] not in _HEX or value[i + 2] not in _HEX:
                raise XtextError("malformed xtext escape")
            i = value.find(b"+", i + 3)
    decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value)
    if b"\x00" in decoded:
        raise XtextError("NUL in xtext")
    return decoded
