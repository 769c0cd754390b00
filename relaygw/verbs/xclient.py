"""
XCLIENT (Postfix XCLIENT_README): a trusted peer overrides the client
identity.  Every attribute is validated before any is applied, so a refusal
changes nothing (protocol.md section 10).
"""

import ipaddress
import re

from relaygw import codes, xtext
from relaygw.commands import parseHelo, splitWords
from relaygw.context import IDENTITY_ATTRIBUTES, IDENTITY_KEYS
from relaygw.trust import isEndpoint
from relaygw.verbs import VerbError, afterConnectPolicy, refuse

ATTRIBUTES = tuple(name for name, _ in IDENTITY_ATTRIBUTES)
KEYWORD = " ".join(ATTRIBUTES)

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

# As Postfix's valid_hostname: no label starts or ends with a hyphen.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _bad(why):
    return VerbError(codes.SYNTAX.format(what="XCLIENT: %s" % why), why)


def parseAddress(value):
    """
    IPv4, or C{IPV6:} + IPv6 (any case), canonical; never bracketed, and
    never an address no connection has (L{isEndpoint}).
    """
    try:
        if value[:5].upper() == "IPV6:":
            addr = ipaddress.IPv6Address(value[5:])
            if addr.scope_id:
                raise ValueError(value)
            addr = addr.ipv4_mapped or addr
        else:
            addr = ipaddress.IPv4Address(value)
        if not isEndpoint(addr):
            raise ValueError(value)
    except ValueError:
        raise _bad("bad address %s" % (value,))
    return str(addr)


def _hostname(value):
    """
    A host name Postfix's C{valid_hostname} takes, so that onward XCLIENT
    to a Postfix next hop takes it too; a fully qualified name's root dot
    is dropped (Postfix refuses it).
    """
    if len(value) > 255:
        raise _bad("bad hostname")
    name = value[:-1] if value.endswith(".") else value
    if not all(_LABEL.fullmatch(l) for l in name.split(".")) or name.replace(".", "").isdigit():
        raise _bad("bad hostname %s" % (value,))
    return name


def _port(value):
    if not value.isdigit() or len(value) > 5 or int(value) > 65535:
        raise _bad("bad port %s" % (value,))
    return int(value)


def _text(name, octets):
    """
    C{octets} as the text of attribute C{name}, or C{None} if they are not
    text of its kind or hold a control character.
    """
    try:
        value = octets.decode("latin-1" if name == "HELO" else "utf-8" if name == "LOGIN" else "ascii")
    except UnicodeDecodeError:
        return None
    if any(c < " " or c == "\x7f" for c in value) or (name == "LOGIN" and not value.isprintable()):
        return None
    return value


def _decode(name, raw):
    """
    The value of attribute C{name}, xtext-decoded.  A login is UTF-8 (as
    SASL's, RFC 4616, and so what relaygw forwards after an AUTH), taken
    raw as well as encoded, since nginx forwards the login a client gave it
    unencoded (as Postfix takes it): a login whose decoding is no login
    (C{bob+dev}, where C{+de} would be octet 0xDE) is taken as sent.  A
    greeting name's 8-bit octets are left for L{parseHelo} to make C{?}, as
    in an EHLO argument; every other attribute is ASCII.  No value may hold
    a control character.
    """
    if len(raw) > xtext.MAX_ATTRIBUTE:
        raise _bad("attribute value too long")
    try:
        # The line was read as latin-1: one character per octet sent.
        sent = raw.encode("latin-1")
    except UnicodeEncodeError:
        raise _bad("bad attribute value")
    try:
        value = _text(name, xtext.decode(sent, lenient=True, raw8bit=name == "LOGIN"))
    except xtext.XtextError:
        value = None
    if value is None and name == "LOGIN":
        value = _text(name, sent)
    if value is None:
        raise _bad("bad attribute value")
    return value


def parse(args):
    """
    Parse C{NAME=value ...} into C{{attribute: value}}, with special values
    kept as C{UNAVAILABLE}/C{TEMPUNAVAIL} and the rest canonical.  Duplicates:
    the last wins.
    """
    words = splitWords(args)
    if not words:
        raise VerbError(codes.SYNTAX.format(what="XCLIENT attribute=value ..."), "no attributes")
    attrs = {}
    for word in words:
        name, eq, raw = word.partition("=")
        name = name.upper()
        if not eq or not raw:
            raise _bad("bad attribute %s" % (word,))
        if name not in ATTRIBUTES:
            raise _bad("unknown attribute %s" % (name,))
        value = _decode(name, raw)
        special = value.upper() if value.isascii() else value  # (no "ı".upper() == "I")
        if special in (UNAVAILABLE, TEMPUNAVAIL):
            # PROTO has no special value; [TEMPUNAVAIL] is for NAME only.
            if name == "PROTO" or (special == TEMPUNAVAIL and name != "NAME"):
                raise _bad("bad value for %s" % (name,))
            attrs[name] = special
            continue
        if name in ("ADDR", "DESTADDR"):
            value = parseAddress(value)
        elif name in ("PORT", "DESTPORT"):
            value = _port(value)
        elif name == "NAME":
            value = _hostname(value)
        elif name == "PROTO":
            if special not in ("SMTP", "ESMTP"):
                raise _bad("bad protocol %s" % (value,))
            value = special
        elif name == "HELO":
            # The same validation as the EHLO argument: the first word only.
            value, _ = parseHelo(value)
            if value is None:
                raise _bad("bad value for HELO")
        attrs[name] = value
    return attrs


def _identity(attrs):
    """The context keys the attributes set (C{None} removes a key)."""
    keys = {}
    for name, value in attrs.items():
        unavailable = value in (UNAVAILABLE, TEMPUNAVAIL)
        key = IDENTITY_KEYS[name]
        if name == "NAME":
            keys[key] = "unknown" if unavailable else value
            keys["remote_name_status"] = {UNAVAILABLE: "perm", TEMPUNAVAIL: "temp"}.get(value, "ok")
        elif name == "ADDR":
            keys[key] = "unknown" if unavailable else value
        elif name == "PORT":
            keys[key] = 0 if unavailable else value
        elif name == "HELO":
            keys[key] = None if unavailable else value
            keys["helo_name"] = keys[key]
        elif name == "LOGIN":
            if unavailable:
                keys.update(auth_user=None, auth_name=None, auth_status=None)
            else:
                keys.update(auth_user=value, auth_name="XCLIENT", auth_status="pass")
        else:  # PROTO, DESTADDR, DESTPORT
            keys[key] = None if unavailable else value
    return keys


def run(session, args):
    if session.inTransaction:
        return refuse(codes.XCLIENT_IN_TRANSACTION, "inside a transaction")
    try:
        attrs = parse(args)
    except VerbError as e:
        return refuse(e.reply, e.why)
    keys = _identity(attrs)
    old = {k: session.context.get(k) for k in keys}
    hasHelo = "HELO" in attrs and attrs["HELO"] not in (UNAVAILABLE,)
    # LOGIN=[UNAVAILABLE] authenticates nobody: AUTH is reset as without
    # LOGIN=, so that ALWAYS-ALLOW re-applies (protocol.md section 1).
    keepAuth = attrs.get("LOGIN") not in (None, UNAVAILABLE)
    session.resetIdentity(keepAuth=keepAuth, helo=attrs["HELO"] if hasHelo else None)
    if "HELO" not in attrs:
        # The reset forgets HELO/EHLO, but not a name an earlier HELO= set.
        session.context.update(helo_name=None)
    applied = {k: v for k, v in keys.items() if keepAuth or not k.startswith("auth_")}
    session.context.update(overridden=True, **applied)
    session.audit("XCLIENT", {k: (old[k], keys[k]) for k in keys if k in old}, renew=True)
    return afterConnectPolicy(session.rerunConnectPolicy(), codes.GREETING.format(host=session.hostname))
