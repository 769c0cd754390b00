"""
The configuration: TOML, read with C{tomllib}, validated into immutable
objects.  Every error names the file, the key and the problem
(C{relaygw.toml: listener[0].endpoint: ...}), and nothing starts until the
whole file is valid.
"""

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources

#: The default drain_delay when an admin endpoint answers a load balancer's
#: health checks: time for it to see the 503 and take the instance out.
DRAIN_DELAY = 5.0

VERBS = ("xclient", "xremoteip", "xsetcontext", "xdumpcontext")


class ConfigError(Exception):
    """
    The configuration is not valid.  C{errors} lists every problem found,
    each as C{file: key: what is wrong (expected ...)}; the message is
    those lines.  A control character in one (from a path or a file name
    in the file, say) is escaped: each stays one line, with nothing a
    terminal would act on.
    """

    def __init__(self, errors):
        if isinstance(errors, str):
            errors = [errors]
        self.errors = [e.translate(_CONTROLS) for e in errors]
        Exception.__init__(self, "\n".join(self.errors))


#: C0 and C1 control characters (and DEL), as \xNN.
_CONTROLS = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))}


class Invalid(ValueError):
    """A value check failed: C{what} is wrong, C{expected} says what would do."""

    def __init__(self, what, expected=None):
        ValueError.__init__(self, what if expected is None else "%s (expected %s)" % (what, expected))


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _cidrs(value):
    for c in value:
        try:
            network = ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise Invalid("%r is not a network" % (c,), "CIDRs such as 192.0.2.0/24 or 2001:db8::/32")
        if network.version == 6 and network.subnet_of(_IPV4_MAPPED):
            # Clients are judged by their IPv4 address (trust.parseIP), as Postfix judges them: written
            # mapped, the network would match none of them.
            mapped = network.network_address.ipv4_mapped
            raise Invalid("%r is IPv4-mapped: it would match no client" % (c,), "%s/%d" % (
                mapped, network.prefixlen - 96))
        address = ipaddress.ip_interface(c).ip
        if address != network.network_address:
            # 10.0.0.1/8 would grant all of 10.0.0.0/8, where one address may have been meant (Postfix skips such
            # a rule, with a warning).
            raise Invalid("%r has host bits set" % (c,), "%s, or %s/%d for the one address" % (
                network, address, network.max_prefixlen))
    return tuple(value)


def endpointPort(description):
    """
    What a server endpoint string listens on: C{(interface, port)} for a
    TCP port (the interface as the address it binds, L{_listeningAddress}),
    C{("unix", absolute path)} for a UNIX socket, C{None} for anything else.

    @raise Invalid: if the string does not parse or the port is out of range.
    """
    from twisted.internet.endpoints import TCP6ServerEndpoint, serverFromString
    from twisted.internet.testing import MemoryReactor

    expected = "a Twisted server endpoint such as tcp:2525:interface=127.0.0.1"
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except Exception:
        raise Invalid("cannot parse %r" % (description,), expected)
    while not hasattr(endpoint, "_port") and hasattr(endpoint, "_wrappedEndpoint"):
        endpoint = endpoint._wrappedEndpoint
    backlog = getattr(endpoint, "_backlog", None)
    if isinstance(backlog, int) and not 0 < backlog <= 65535:
        raise Invalid("backlog %s out of range" % (backlog,), "a backlog from 1 to 65535")
    port = getattr(endpoint, "_port", None)
    if port is None:
        path = getattr(endpoint, "_address", None)
        return None if path is None else ("unix", _unixPath(path))
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise Invalid("port %s out of range" % (port,), "a port from 0 to 65535")
    interface = getattr(endpoint, "_interface", "")
    return _listeningAddress(interface, socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint)
                             else socket.AF_INET), port


def _listeningAddress(interface, family=socket.AF_INET):
    """
    The address C{interface} names, as the kernel will bind it (an IPv4
    address for an IPv4-mapped one); a host name is looked up in the
    endpoint's address C{family}, as binding does (C{localhost} is
    127.0.0.1 for a tcp: endpoint, though the resolver may give ::1
    first).  C{""} (every address) stays C{""}.
    """
    if not interface:
        return ""
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.getaddrinfo(interface, None, family)[0][4][0])
        except (OSError, UnicodeError, ValueError):
            raise Invalid("interface %r is not an address" % (interface,), "an IP address such as 127.0.0.1")
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return str(address)


#: The octets of a UNIX socket's path that Linux takes (its sun_path, less the terminating NUL).
_UNIX_PATH_MAX = 107


def _unixPath(path):
    """A UNIX socket endpoint's path, absolute: not empty, short enough to bind, in a directory that exists."""
    if not path:
        raise Invalid("empty socket path", "unix:PATH")
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise Invalid("socket path %s too long" % (path,), "an absolute path of at most %d octets" % _UNIX_PATH_MAX)
    if not os.path.isdir(os.path.dirname(path)):
        raise Invalid("%s is not a directory" % (os.path.dirname(path),), "unix:PATH in an existing directory")
    return path


def _endpoint(value):
    endpointPort(value)
    return value


def _listenerEndpoint(value):
    """
    A listener's endpoint: not Twisted's C{ssl:}, whose TLS takes none of
    the listener's C{tls_*} settings (nor its certificate reloads, and it
    ends a session at the client's close_notify, replies still due).
    """
    if re.match(r"\s*ssl\s*:", value, re.IGNORECASE):
        raise Invalid("ssl: endpoints have none of the listener's TLS settings",
                      "tcp:PORT with implicit_tls = true and tls_certificate")
    return _endpoint(value)


def _choice(*options):
    def check(value):
        if value not in options:
            raise Invalid("%r is not allowed" % (value,), "one of %s" % ", ".join(options))
        return value

    return check


def _subset(*options):
    def check(value):
        for v in value:
            if v not in options:
                raise Invalid("%r is not allowed" % (v,), "any of %s" % ", ".join(options))
        return tuple(dict.fromkeys(value))

    return check


def _positive(value):
    if value <= 0:
        raise Invalid("must be positive", "a number above 0")
    return value


def _cpus(value):
    # true, false, or the CPUs worker N is kept to in turn (as nginx's worker_cpu_affinity lists them)
    if isinstance(value, bool):
        return value
    if not value or not all(type(c) is int and 0 <= c < 4096 for c in value):
        raise Invalid("%r is not a list of CPU numbers" % (value,), "true, false or CPU numbers such as [0, 1]")
    return tuple(value)


def _workers(value):
    # (A bound, so that a stray digit cannot fork the machine to its knees.)
    if not 1 <= value <= 256:
        raise Invalid("%s workers" % (value,), "1 to 256, about one per core")
    return value


def _nonNegative(value):
    if value < 0:
        raise Invalid("must not be negative", "0 or more")
    return value


def _drainSeconds(value):
    # (A bound, so that a stray digit cannot keep SIGTERM from ever stopping the gateway.)
    if not 0 <= value <= 3600:
        raise Invalid("%s seconds" % (value,), "0 to 3600 seconds")
    return value


def _atLeast512(value):
    if value < 512:
        raise Invalid("must be at least 512", "512 or more, RFC 5321")
    return value


_LDH = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def checkHostname(value):
    """
    A host name the gateway may put on the wire: ASCII letters, digits and
    hyphens in dot-separated labels (RFC 1123), or an address literal
    (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}).

    @raise Invalid: otherwise.
    """
    expected = "an ASCII host name (letters, digits, hyphens, dots) or an address literal such as [192.0.2.1]"
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        try:
            if inner[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
            return value
        except ValueError:
            raise Invalid("%r is not an address literal" % (value,), expected)
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if len(value) > 253 or not all(_LDH.match(label) for label in labels):
        raise Invalid("%r is not a valid host name" % (value,), expected)
    return value


def _hostname(value):
    if value is None:
        return value
    return checkHostname(value)


def defaultHostname():
    """
    The machine's host name, as Postfix's myhostname defaults to it (with
    C{.localdomain} when it has no dot), so that gateways on different
    machines greet with different names (the outbound loop check compares
    them); C{relaygw.localdomain} when it is no host name to put on the wire.
    """
    name = socket.gethostname().rstrip(".").lower()
    if "." not in name:
        name += ".localdomain"
    try:
        return checkHostname(name)
    except Invalid:
        return "relaygw.localdomain"


def _smarthostHost(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        checkHostname(host)


def _smarthost(value):
    for v in value:
        host, _ = parseHostPort(v)
        _smarthostHost(host)
    return tuple(value)


def _domains(value):
    for v in value:  # (strings: _value checked the list's items)
        checkHostname(v)
    return tuple(value)


def _identities(value):
    from relaygw.trust import parseClientIdentity

    for v in value:
        try:
            parseClientIdentity(v)
        except Exception:
            raise Invalid("%r is not a client identity" % (v,), "dns:NAME or uri:URI")
    return tuple(value)


def _ciphers(value):
    from twisted.internet import ssl

    try:
        ciphers = ssl.AcceptableCiphers.fromOpenSSLCipherString(value)._ciphers
    except Exception:  # (OpenSSL.SSL.Error for a string it cannot parse)
        ciphers = ()
    if not ciphers:
        raise Invalid("OpenSSL accepts no cipher in %r" % (value,), "an OpenSSL cipher string such as HIGH:!aNULL")
    return value


def _policyName(value):
    from twisted.python.reflect import namedAny

    try:
        factory = namedAny(value)
    except Exception as e:
        raise Invalid("cannot import %r: %s" % (value, " ".join(str(e).split()) or e.__class__.__name__),
                      "the dotted name of a class providing relaygw.policy.IPolicy")
    if not callable(factory):
        raise Invalid("%r is not a class" % (value,), "the dotted name of a class providing relaygw.policy.IPolicy")
    return value


def parseHostPort(text, defaultPort=25):
    """C{[host]:port}, C{host:port} or C{host} -> C{(host, port)}; L{Invalid} otherwise."""
    expected = "[host]:port, host:port or host"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise Invalid("bad host %r" % (text,), expected)
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not port:
            raise Invalid("empty port in %r" % (text,), expected)
    else:
        host, port = text, ""
    if not host:
        raise Invalid("empty host in %r" % (text,), expected)
    if port and not (port.isascii() and port.isdigit()):
        raise Invalid("bad port in %r" % (text,), "a port from 1 to 65535")
    port = int(port) if port else defaultPort
    if not 0 < port < 65536:
        raise Invalid("bad port in %r" % (text,), "a port from 1 to 65535")
    return host, port


def _opt(default, kind, check=None, path=False):
    """A config key: default, expected TOML type(s) and an optional check."""
    return field(default=default, metadata={"kind": kind, "check": check, "path": path})


@dataclass(frozen=True)
class ListenerConfig:
    name: str = _opt(None, str)
    endpoint: str = _opt(None, str, _listenerEndpoint)
    hostname: str = _opt(defaultHostname(), str, _hostname)
    max_message_size: int = _opt(26214400, int, _nonNegative)
    max_recipients: int = _opt(100, int, _positive)
    hopcount_limit: int = _opt(50, int, _positive)
    max_connections: int = _opt(1000, int, _positive)
    max_connections_per_ip: int = _opt(0, int, _nonNegative)
    connection_rate_per_ip: int = _opt(0, int, _nonNegative)
    idle_timeout: float = _opt(300, (int, float), _positive)
    data_timeout: float = _opt(600, (int, float), _positive)
    min_data_rate: int = _opt(500, int, _nonNegative)
    max_line_length: int = _opt(2048, int, _atLeast512)
    max_errors: int = _opt(20, int, _positive)
    junk_command_limit: int = _opt(100, int, _nonNegative)
    greet_delay: float = _opt(0, (int, float), _nonNegative)
    drain_timeout: float = _opt(30, (int, float), _drainSeconds)
    # Seconds the listener keeps accepting after SIGTERM while /healthz says
    # 503 (None: DRAIN_DELAY with an admin endpoint, else 0).
    drain_delay: float = _opt(None, (int, float), _drainSeconds)
    bare_lf: str = _opt("normalize", str, _choice("normalize", "reject"))
    vrfy: bool = _opt(True, bool)
    policy: str = _opt("relaygw.policy.RelayAccessPolicy", str, _policyName)
    trusted_peers: tuple = _opt((), list, _cidrs)
    extensions: tuple = _opt((), list, _subset(*VERBS))
    relay_networks: tuple = _opt((), list, _cidrs)
    tls_certificate: str = _opt(None, str, path=True)
    tls_key: str = _opt(None, str, path=True)
    tls_min_version: str = _opt("1.2", str, _choice("1.2", "1.3"))
    tls_ciphers: str = _opt(None, str, _ciphers)
    tls_client_ca: str = _opt(None, str, path=True)
    tls_client_identities: tuple = _opt((), list, _identities)
    tls_self_signed: bool = _opt(False, bool)
    require_tls: bool = _opt(False, bool)
    implicit_tls: bool = _opt(False, bool)
    always_allow: bool = _opt(False, bool)
    credentials: str = _opt(None, str, path=True)
    auth_plaintext: bool = _opt(False, bool)
    proxy_protocol: bool = _opt(False, bool)
    proxy_trusted: tuple = _opt((), list, _cidrs)
    proxy_timeout: float = _opt(5.0, (int, float), _positive)
    received_shows_peer: bool = _opt(False, bool)
    received_shows_login: bool = _opt(False, bool)


@dataclass(frozen=True)
class SpoolConfig:
    directory: str = _opt("var/spool", str, path=True)
    fsync: str = _opt("grouped", str, _choice("grouped", "each"))
    io_uring: bool = _opt(True, bool)
    min_free_space: int = _opt(64 * 1024 * 1024, int, _nonNegative)


@dataclass(frozen=True)
class NextHopConfig:
    """Where mail goes and how: shared by [relay] and each [[route]]."""

    smarthosts: tuple = _opt((), list, _smarthost)
    mx: bool = _opt(False, bool)
    tls: str = _opt("may", str, _choice("none", "may", "verify"))
    tls_ca: str = _opt(None, str, path=True)
    auth_user: str = _opt(None, str)
    auth_password: str = _opt(None, str)
    forward_identity: bool = _opt(False, bool)
    destination_concurrency: int = _opt(10, int, _positive)
    command_timeout: float = _opt(300, (int, float), _positive)


@dataclass(frozen=True)
class RelayConfig(NextHopConfig):
    maildir: str = _opt("var/outbox", str, path=True)
    helo_name: str = _opt(None, str, _hostname)
    resolver: str = _opt(None, str)
    concurrency: int = _opt(100, int, _positive)
    retry_min: float = _opt(300, (int, float), _positive)
    retry_max: float = _opt(4000, (int, float), _positive)
    max_lifetime: float = _opt(432000, (int, float), _positive)
    bounce_lifetime: float = _opt(432000, (int, float), _positive)
    defer_all: bool = _opt(False, bool)   # accept and queue, deliver nothing (maintenance, benchmarks)


@dataclass(frozen=True)
class RouteConfig(NextHopConfig):
    """
    A route: recipients in C{domains}, or messages whose context has
    C{context_key} = C{context_value}.  What it does not set of
    L{INHERITED} it takes from [relay], as a Postfix transport takes
    main.cf's settings; never the smarthosts or credentials.
    """

    INHERITED = ("tls", "tls_ca", "forward_identity", "destination_concurrency", "command_timeout")

    name: str = _opt(None, str)
    domains: tuple = _opt((), list, _domains)
    context_key: str = _opt(None, str)
    context_value: str = _opt(None, str)


@dataclass(frozen=True)
class AdminConfig:
    endpoint: str = _opt(None, str, _endpoint)


@dataclass(frozen=True)
class ProcessConfig:
    workers: int = _opt(1, int, _workers)
    cpu_affinity: object = _opt(True, (bool, list), _cpus)


@dataclass(frozen=True)
class LogConfig:
    format: str = _opt("text", str, _choice("text", "json"))
    level: str = _opt("info", str, _choice("debug", "info", "warn", "error"))


@dataclass(frozen=True)
class Config:
    path: str
    spool: SpoolConfig
    relay: RelayConfig
    admin: AdminConfig
    log: LogConfig
    process: ProcessConfig
    listeners: tuple
    routes: tuple = ()


_KINDS = {int: "an integer", str: "a string", bool: "true or false", list: "a list of strings"}


def _expectedKind(kind):
    if isinstance(kind, tuple):
        return "true, false or a list" if bool in kind else "a number"
    return _KINDS[kind]


def _typeName(value):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


class _Report:
    """The errors found so far, each C{file: key: what is wrong (expected ...)}."""

    def __init__(self, fname):
        self.fname = fname
        self.errors = []

    def add(self, key, what):
        self.errors.append("%s: %s: %s" % (self.fname, key, what))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _keyName(name):
    """
    A key of the file as an error names it: bare, or quoted as TOML
    writes it, escapes and all, so that a line break, NUL or terminal
    escape in a quoted key cannot break the error's line.
    """
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _build(cls, table, where, report, base, defaults=None):
    """
    Validate C{table} into a C{cls}.  Every problem goes to C{report}, and
    a key in error takes its default (from C{defaults}, else the field's),
    so that the checks that follow can still look at the rest (every
    error is reported at once).
    """
    defaults = defaults or {}
    known = {f.name: f for f in fields(cls)}
    if not isinstance(table, dict):
        report.add(where, "wrong type %s (expected a table)" % (_typeName(table),))
        table = {}
    for name in sorted(set(table) - set(known)):
        close = difflib.get_close_matches(name, known, 1)
        report.add("%s.%s" % (where, _keyName(name)), "unknown key (expected %s)" % (
            "%s?" % close[0] if close else "one of the keys etc/relaygw.toml lists"))
    values = {}
    for name, f in known.items():
        meta = f.metadata
        value = defaults.get(name, f.default)
        if name not in table:
            if f.default is None and cls is ListenerConfig and name in ("name", "endpoint"):
                report.add("%s.%s" % (where, name), "missing required key (expected %s)" % (
                    _expectedKind(meta["kind"]),))
        else:
            value = _value(table[name], meta, "%s.%s" % (where, name), report, value)
        if meta["path"] and value is not None:
            value = os.path.normpath(os.path.join(base, value))
        values[name] = value
    return cls(**values)


def _value(value, meta, key, report, default):
    """C{value} checked against the key's type and check; on error, reported and C{default}."""
    kind = meta["kind"]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kind):
        report.add(key, "wrong type %s (expected %s)" % (_typeName(value), _expectedKind(kind)))
        return default
    if kind is list and not all(isinstance(v, str) for v in value):
        report.add(key, "wrong type (expected a list of strings)")
        return default
    if isinstance(value, float) and not math.isfinite(value):
        report.add(key, "%s is not a finite number (expected a finite number)" % (value,))
        return default
    if isinstance(value, str) and any(c in value for c in "\r\n\x00"):
        report.add(key, "contains a line break or NUL (expected one line of text)")
        return default
    try:
        if meta["check"] is not None:
            value = meta["check"](value)
    except Invalid as e:
        report.add(key, str(e))
        return default
    return tuple(value) if kind is list else value


def _sharedSelfSigned(listeners):
    """
    A listener naming the certificate and key another listener's
    C{tls_self_signed} generates (an implicit TLS port and a STARTTLS port
    sharing one pair) has them generated too, whichever listener comes
    first: the files need not exist yet, at the check or at start.
    """
    generated = {(l.tls_certificate, l.tls_key) for l in listeners if l.tls_self_signed and l.tls_certificate}
    return tuple(replace(l, tls_self_signed=True)
                 if not l.tls_self_signed and (l.tls_certificate, l.tls_key) in generated else l
                 for l in listeners)


def listenerErrors(l):
    """What is wrong with listener C{l}'s keys taken together: C{[(key, what is wrong)]}."""
    errors = []
    if (l.tls_certificate is None) != (l.tls_key is None):
        errors.append(("tls_key", "tls_certificate and tls_key go together (expected both or none)"))
    if (l.implicit_tls or l.require_tls) and l.tls_certificate is None:
        errors.append(("implicit_tls" if l.implicit_tls else "require_tls",
                       "needs tls_certificate and tls_key (expected both set)"))
    if l.proxy_protocol and not l.proxy_trusted:
        errors.append(("proxy_trusted", "required with proxy_protocol (expected the balancers' CIDRs)"))
    if l.tls_client_identities and l.tls_client_ca is None:
        errors.append(("tls_client_identities", "needs tls_client_ca (expected both set)"))
    if l.tls_certificate is None:
        # Without a certificate the listener offers no TLS: these would be silently ignored.
        for key in ("tls_self_signed", "tls_client_ca", "tls_ciphers"):
            if getattr(l, key) not in (None, False):
                errors.append((key, "needs tls_certificate and tls_key (expected both set)"))
    return errors


def _overlap(a, b):
    """
    Whether one port on the addresses C{a} and C{b} (as L{endpointPort}
    gives them) is one socket for the kernel: the same address, or a
    wildcard covering the other.  The IPv6 wildcard takes every address
    (dual-stack); the IPv4 one only IPv4 addresses, so it and one IPv6
    address listen side by side.
    """
    if a == b or "::" in (a, b):
        return True
    if a in ("", "0.0.0.0") or b in ("", "0.0.0.0"):
        other = b if a in ("", "0.0.0.0") else a
        return other in ("", "0.0.0.0") or ":" not in other
    return False


def _portsDistinct(report, listeners, admin):
    """No two listening sockets (listeners, admin) on the same TCP port and address."""
    seen = []
    named = [("listener[%d].endpoint" % i, l.endpoint) for i, l in enumerate(listeners) if l.endpoint]
    if admin.endpoint:
        named.append(("admin.endpoint", admin.endpoint))
    for key, endpoint in named:
        try:
            bound = endpointPort(endpoint)
        except Invalid:
            continue
        if bound is None or bound[1] == 0:
            continue
        interface, port = bound
        for otherKey, (otherInterface, otherPort) in seen:
            if port == otherPort and _overlap(interface, otherInterface):
                what = "socket %s" % (port,) if interface == "unix" else "port %d" % (port,)
                report.add(key, "%s is also %s's (expected one of its own)" % (what, otherKey))
                break
        seen.append((key, bound))


def parse(text, path="<config>", base=None, environment=False):
    """
    Parse and validate TOML C{text}; relative paths resolve against C{base}.
    With C{environment}, also check what start would trip on (files,
    certificates, policy, spool; L{relaygw.preflight}).  Every error found
    is reported at once, in one L{ConfigError}.
    """
    fname = os.path.basename(path)
    if base is None:
        base = os.path.dirname(os.path.abspath(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("%s: %s (expected TOML)" % (fname, e))
    except RecursionError:
        raise ConfigError("%s: arrays or tables nested too deeply (expected TOML a few levels deep)" % (fname,))
    report = _Report(fname)
    sections = {"spool": SpoolConfig, "relay": RelayConfig, "admin": AdminConfig, "log": LogConfig,
                "process": ProcessConfig}
    for name in sorted(set(data) - set(sections) - {"listener", "route"}):
        report.add(_keyName(name), "unknown key (expected one of %s, listener, route)" % ", ".join(sections))
    built = {name: _build(cls, data.get(name, {}), name, report, base) for name, cls in sections.items()}
    raw = data.get("listener", [])
    listeners = ()
    if not isinstance(raw, list) or not raw:
        report.add("listener", "at least one [[listener]] table is required (expected [[listener]])")
    else:
        listeners = tuple(_build(ListenerConfig, t, "listener[%d]" % i, report, base) for i, t in enumerate(raw))
    names = [l.name for l in listeners]
    for i, n in enumerate(names):
        if n is not None and n in names[:i]:
            report.add("listener[%d].name" % i, "duplicate listener name %r (expected a name of its own)" % (n,))
    for i, l in enumerate(listeners):
        for key, what in listenerErrors(l):
            report.add("listener[%d].%s" % (i, key), what)
    _portsDistinct(report, listeners, built["admin"])
    listeners = _sharedSelfSigned(listeners)
    rawRoutes = data.get("route", [])
    routes = ()
    if not isinstance(rawRoutes, list):
        report.add("route", "wrong type (expected an array of tables, [[route]])")
    else:
        inherited = {name: getattr(built["relay"], name) for name in RouteConfig.INHERITED}
        routes = tuple(_build(RouteConfig, t, "route[%d]" % i, report, base, inherited)
                       for i, t in enumerate(rawRoutes))
    for i, r in enumerate(routes):
        if not r.domains and not r.context_key:
            report.add("route[%d]" % i, "matches nothing (expected domains or context_key)")
        if (r.context_key is None) != (r.context_value is None):
            report.add("route[%d].context_value" % i, "context_key and context_value go together (expected both)")
        if not r.smarthosts and not r.mx:
            report.add("route[%d]" % i, "goes nowhere (expected smarthosts or mx = true)")
    hops = [("relay", built["relay"])] + [("route[%d]" % i, r) for i, r in enumerate(routes)]
    for where, hop in hops:
        if hop.smarthosts and hop.mx:
            report.add("%s.mx" % where, "smarthosts and mx exclude each other (expected one of them)")
        if (hop.auth_user is None) != (hop.auth_password is None):
            report.add("%s.auth_password" % where, "auth_user and auth_password go together (expected both)")
        if hop.mx and hop.auth_user is not None:
            report.add("%s.auth_user" % where, "with mx = true the credentials would go to every recipient "
                       "domain's MX host (expected them with smarthosts only)")
    relay = built["relay"]
    if relay.resolver is not None:
        try:
            host, _ = parseHostPort(relay.resolver, 53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise Invalid("%r is not an address" % (host,), "a DNS server's address, such as 127.0.0.1:53")
        except Invalid as e:
            report.add("relay.resolver", str(e))
    if relay.retry_min > relay.retry_max:
        report.add("relay.retry_min", "%s is above retry_max %s (expected retry_min <= retry_max)" % (
            relay.retry_min, relay.retry_max))
    if built["process"].workers > 1:
        from relaygw.workers import parseTCP

        for i, l in enumerate(listeners):
            if l.endpoint and parseTCP(l.endpoint) is None:
                report.add("listener[%d].endpoint" % i,
                           "workers > 1 needs a plain TCP endpoint (expected tcp:PORT[:interface=ADDRESS])")
    if environment:
        from relaygw import preflight

        preflight.check(report, built, listeners, routes)
    if report.errors:
        raise ConfigError(report.errors)
    return Config(path=path, listeners=listeners, routes=routes, **built)


def drainDelay(config, listener):
    """
    C{listener}'s drain_delay: as set, or by default L{DRAIN_DELAY} when
    C{config} has an admin endpoint (whose health checks a load balancer
    reads) and 0 without.  Worked out when used, so that it follows the
    admin endpoint the gateway runs with (a reload cannot change that).
    """
    if listener.drain_delay is not None:
        return listener.drain_delay
    return DRAIN_DELAY if config.admin.endpoint else 0


def load(path, environment=False):
    """Read and validate the config file at C{path} (with C{environment}: as start would)."""
    return parse(read(path), path, environment=environment)


#: Octets a config file may have: many times any real one, little to read and parse on a worker's reactor.
MAX_SIZE = 1024 * 1024


def read(path):
    """The text of the config file at C{path}; raises L{ConfigError} when it cannot be read."""
    try:
        # (Not a FIFO or a device, which could block the reader for ever.)
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError("%s: not a regular file (expected a TOML file)" % (os.path.basename(path),))
            data = f.read(MAX_SIZE + 1)  # (the file may grow after the fstat)
            if len(data) > MAX_SIZE:
                raise ConfigError("%s: %d octets, over the %d a config may have (expected a TOML file)" % (
                    os.path.basename(path), max(status.st_size, len(data)), MAX_SIZE))
            # A byte-order mark first (some editors write one): not TOML's, but
            # no more than a mark that the text is UTF-8, which it must be.
            return data.decode("utf-8").removeprefix("\ufeff")
    except OSError as e:
        raise ConfigError("%s: cannot read: %s (expected a readable file)" % (os.path.basename(path), e.strerror))
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 (expected a UTF-8 TOML file)" % (os.path.basename(path),))


def loadDefault(base=None, environment=False):
    """The embedded default config; its relative paths resolve against C{base} (the cwd)."""
    text = resources.files("relaygw").joinpath("default.toml").read_text()
    return parse(text, "default.toml", base or os.getcwd(), environment=environment)
