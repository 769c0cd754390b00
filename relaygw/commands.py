"""
Pure parsers for SMTP command arguments (RFC 5321 section 4.1.2): the
reverse-path and forward-path of MAIL and RCPT with their ESMTP parameters.
Each failure carries the reply the protocol should send.
"""

import ipaddress
import re

from relaygw import codes, xtext
from relaygw.trust import parseIP

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = r"%s(?:\.%s)*" % (_ATOM, _ATOM)
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = r"%s(?:\.%s)*\.?" % (_LABEL, _LABEL)
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_IPV4_LITERAL = re.compile(r"^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$")
#: RFC 5321 General-address-literal: Standardized-tag ":" 1*dcontent.
_GENERAL_LITERAL = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?):([\x21-\x5a\x5e-\x7e]+)$")
_MAILBOX = re.compile(r"^(%s|%s)@(%s|%s)$" % (_DOT_STRING, _QUOTED, _DOMAIN, _LITERAL))
_SOURCE_ROUTE = re.compile(r"^@[^:,]+(?:,@[^:,]+)*:")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_QUOTED_PAIR = re.compile(r"\\(.)")
_ADDRESS_TYPE = re.compile(r"^%s\Z" % _ATOM)

#: RFC 3461's limits on ENVID (section 4.4) and ORCPT (section 4.2), as sent (xtext).
MAX_ENVID = 100
MAX_ORCPT = 500
#: NOTIFY's words (RFC 3461 section 4.1) in the order they are kept and sent on.
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


class CommandError(Exception):
    """A command argument is refused; C{reply} says how."""

    def __init__(self, reply):
        Exception.__init__(self, reply.text)
        self.reply = reply


def splitWords(text):
    """
    Split command arguments on SP only (RFC 5321: C{SP} separates them; a
    TAB or any other white space is part of a word, and so refused by the
    word's own grammar).  Runs of SP count as one.
    """
    return [w for w in text.split(" ") if w]


def validLiteral(literal):
    """
    Whether C{literal} (without brackets) is an RFC 5321 address literal:
    an IPv4 address, C{IPv6:} and an IPv6 address (no zone), or another
    standardized tag, C{:} and dcontent.
    """
    m = _IPV4_LITERAL.match(literal)
    if m:
        return all(int(part) <= 255 for part in m.groups())
    m = _GENERAL_LITERAL.match(literal)
    if not m:
        return False
    tag, rest = m.groups()
    if tag.upper() == "IPV6":
        try:
            return "%" not in rest and bool(ipaddress.IPv6Address(rest))
        except ValueError:
            return False
    # Only IPv6 is registered (RFC 5321 section 4.1.3); other tags keep
    # to the general grammar, and an all-digit one would be IPv4.
    return not tag.isdigit()


def _split(args, keyword):
    """Split C{FROM:<path> params} into the path text and parameter words."""
    if args[: len(keyword)].upper() != keyword:
        raise CommandError(codes.SYNTAX.format(what="%s<address>" % keyword))
    rest = args[len(keyword):].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if '"' in rest[:end]:
            end = _quotedPathEnd(rest)
        if end == -1:
            return rest, []
        path, params = rest[: end + 1], rest[end + 1:]
        if params and not params.startswith(" "):
            return rest, []
        return path, splitWords(params)
    words = splitWords(rest)
    if not words:
        raise CommandError(codes.SYNTAX.format(what="%s<address>" % keyword))
    return words[0], words[1:]


def _quotedPathEnd(rest):
    """The index of the C{>} that ends the path C{rest} starts with, past a quoted local part's C{>}s; -1 if none."""
    quoted = escaped = False
    for i, c in enumerate(rest):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def parsePath(path, badReply, allowEmpty=False, allowPostmaster=False):
    """Validate a path and return the bare address (C{""} for C{<>})."""
    if not path.isascii():
        raise CommandError(codes.NON_ASCII_ADDRESS)
    if path.startswith("<") and path.endswith(">"):
        address = path[1:-1]
    elif "<" in path or ">" in path:
        raise CommandError(badReply)
    else:
        address = path
    if address == "" and allowEmpty:
        return ""
    # A source route is dropped (RFC 5321 section 4.1.1.3); one with no
    # mailbox after it (<@relay.example:>) is not the null path.
    address = _SOURCE_ROUTE.sub("", address)
    if address == "":
        raise CommandError(badReply)
    if allowPostmaster and address.lower() == "postmaster":
        return address
    # No limit on the local part or the path but the command line's: RFC
    # 5321 section 4.5.3.1 asks for none where possible, SRS and VERP
    # senders run past its 64 octets, and Postfix takes them.  A domain
    # past 255 octets names nothing (RFC 1035).
    m = _MAILBOX.match(address)
    if not m or len(m.group(2)) > 255:
        raise CommandError(badReply)
    domain = m.group(2)
    if domain.startswith("[") and not validLiteral(domain[1:-1]):
        raise CommandError(badReply)
    # Digits and dots alone (192.0.2.1 without its brackets) name no host:
    # RFC 1123 section 2.1, and Postfix's "numeric hostname".
    if domain.replace(".", "").isdigit():
        raise CommandError(badReply)
    # A mailbox that begins with "-", quoted or not, reads as an option where
    # a command takes it: Postfix refuses it (allow_min_user = no).
    if _unquoted(m.group(1)).startswith("-"):
        raise CommandError(badReply)
    return address


def _unquoted(local):
    """A local part as it reads without its quotes and backslash escapes."""
    if local.startswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def canonicalDomain(domain):
    """
    C{domain} as routes, next hops and the queue tool name it: lower case,
    without the root's dot, and an address literal in its canonical form
    (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}; IPv4-mapped IPv6 as IPv4), so
    that each destination has one name however a recipient writes it.
    """
    domain = domain.lower().rstrip(".")
    if domain.startswith("[") and domain.endswith("]"):
        try:
            address = parseIP(domain[1:-1])
        except ValueError:
            return domain  # (another tag: no next hop takes it)
        return "[%s]" % (address,) if address.version == 4 else "[IPv6:%s]" % (address,)
    return domain


def addressDomain(address):
    """
    The L{canonicalDomain} of an accepted address's domain: what follows its
    last C{@}, or for an address literal (which may hold C{@}, never C{[}) its
    last C{@[}; an address without C{@} (C{postmaster}) is taken whole.
    """
    if address.endswith("]") and "@[" in address:
        return canonicalDomain(address[address.rindex("@[") + 1:])
    return canonicalDomain(address.rpartition("@")[2])


def parseParams(words):
    """
    ESMTP parameters as an ordered dict of uppercased keyword -> value.  A
    keyword given twice is refused: which of its values counts would be a
    guess, and a hop that guessed the other way (SIZE, BODY) would act on
    a value this one never checked.
    """
    params = {}
    for word in words:
        if not word.isascii():  # (RFC 5321's esmtp-value is ASCII: a syntax error, not a non-ASCII address)
            raise CommandError(codes.SYNTAX.format(what="non-ASCII parameter"))
        m = _PARAM.match(word)
        if not m:
            raise CommandError(codes.SYNTAX.format(what="bad parameter %s" % word))
        key = m.group(1).upper()
        if key in params:
            raise CommandError(codes.SYNTAX.format(what="%s given twice" % key))
        params[key] = m.group(2)
    return params


def _xtext(value, limit, refusal):
    """
    A DSN parameter's xtext, checked as Postfix does (each octet decoded
    printable ASCII) and at most C{limit} characters: its canonical form
    (uppercase escapes, each octet that needs one escaped), which is what
    is kept and sent on; else C{refusal}.
    """
    if value is None or len(value) > limit:
        raise CommandError(refusal)
    try:
        decoded = xtext.decode(value)
    except xtext.XtextError:
        raise CommandError(refusal)
    if not all(0x20 <= b <= 0x7E for b in decoded):
        raise CommandError(refusal)
    return xtext.encode(decoded)


def parseNotify(value):
    """RCPT's NOTIFY (RFC 3461 section 4.1): C{NEVER}, or SUCCESS, FAILURE, DELAY in order, comma-separated."""
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if not all(word in _NOTIFY for word in words):
        raise CommandError(codes.NOTIFY_SYNTAX)
    return ",".join(word for word in _NOTIFY if word in words)


def parseOrcpt(value):
    """RCPT's ORCPT (RFC 3461 section 4.2): C{addr-type;xtext}, the xtext in its canonical form."""
    kind, semicolon, address = (value or "").partition(";")
    if not semicolon or not address or not _ADDRESS_TYPE.match(kind) or len(value) > MAX_ORCPT:
        raise CommandError(codes.ORCPT_SYNTAX)
    return "%s;%s" % (kind, _xtext(address, MAX_ORCPT, codes.ORCPT_SYNTAX))


def parseMail(args, maxSize):
    """
    C{MAIL} arguments -> C{(address, params)}.  Knows SIZE (RFC 1870),
    BODY (RFC 6152), AUTH (RFC 4954), and RET and ENVID (RFC 3461, their
    values kept uppercased and as canonical xtext); anything else is
    555 5.5.4.
    """
    path, words = _split(args, "FROM:")
    address = parsePath(path, codes.BAD_SENDER, allowEmpty=True)
    params = parseParams(words)
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise CommandError(codes.SIZE_SYNTAX)
            if maxSize and int(value) > maxSize:
                raise CommandError(codes.MESSAGE_TOO_BIG_DECLARED)
        elif key == "BODY":
            if value is None:
                raise CommandError(codes.SYNTAX.format(what="BODY=7BIT or BODY=8BITMIME"))
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(codes.BAD_PARAMETER.format(param="BODY=%s" % (value,)))
        elif key == "AUTH":
            if value is None:
                raise CommandError(codes.SYNTAX.format(what="AUTH=<mailbox>"))
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise CommandError(codes.RET_SYNTAX)
            params[key] = value.upper()
        elif key == "ENVID":
            params[key] = _xtext(value, MAX_ENVID, codes.ENVID_SYNTAX)
        else:
            raise CommandError(codes.BAD_PARAMETER.format(param=key))
    return address, params


def parseRcpt(args):
    """
    C{RCPT} arguments -> C{(address, params)}.  Knows NOTIFY and ORCPT
    (RFC 3461; kept as L{parseNotify} and L{parseOrcpt} give them);
    anything else is 555 5.5.4.
    """
    path, words = _split(args, "TO:")
    address = parsePath(path, codes.BAD_RECIPIENT, allowPostmaster=True)
    params = parseParams(words)
    for key, value in params.items():
        if key == "NOTIFY":
            params[key] = parseNotify(value)
        elif key == "ORCPT":
            params[key] = parseOrcpt(value)
        else:
            raise CommandError(codes.BAD_PARAMETER.format(param=key))
    return address, params


def parseHelo(text):
    """
    The client's greeting name, as the EHLO/HELO argument and XCLIENT's
    C{HELO=} both give it: one function for both, so neither can add a
    clause to the Received header.  Like Postfix, control and 8-bit octets
    become C{?}; only the first word names the client.

    @return: C{(name, cleaned text)}: the first word, and the whole argument
        cleaned (for C{ehlo_string}); C{(None, "")} if there is no word.
    """
    if text.isascii() and text.isprintable():  # (the usual name: nothing to clean, no call a character)
        cleaned = text
    else:
        cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    words = cleaned.split(" ")
    name = next((w for w in words if w), None)
    return name, cleaned
