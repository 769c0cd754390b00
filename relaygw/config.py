"""
The configuration: TOML, read with C{tomllib}, validated into immutable
objects.  Every error names the file, the key and the problem
(C{relaygw.toml: listener[0].endpoint: ...}), and nothing starts until the
whole file is valid.
"""

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources

VERBS = ("xclient", "xremoteip", "xsetcontext", "xdumpcontext")


class ConfigError(Exception):
    """The configuration is not valid; the message is C{file: key: problem}."""


def _cidrs(value):
    for c in value:
        ipaddress.ip_network(c, strict=False)
    return tuple(value)


def _endpoint(value):
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    serverFromString(MemoryReactor(), value)
    return value


def _choice(*options):
    def check(value):
        if value not in options:
            raise ValueError("must be one of %s" % ", ".join(options))
        return value

    return check


def _subset(*options):
    def check(value):
        for v in value:
            if v not in options:
                raise ValueError("%r is not one of %s" % (v, ", ".join(options)))
        return tuple(dict.fromkeys(value))

    return check


def _positive(value):
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _nonNegative(value):
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _atLeast512(value):
    if value < 512:
        raise ValueError("must be at least 512 (RFC 5321)")
    return value


def _smarthost(value):
    for v in value:
        parseHostPort(v)
    return tuple(value)


def parseHostPort(text, defaultPort=25):
    """C{[host]:port}, C{host:port} or C{host} -> C{(host, port)}."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError("bad host %r" % (text,))
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError("empty host in %r" % (text,))
    port = int(port) if port else defaultPort
    if not 0 < port < 65536:
        raise ValueError("bad port in %r" % (text,))
    return host, port


def _opt(default, kind, check=None, path=False):
    """A config key: default, expected TOML type(s) and an optional check."""
    return field(default=default, metadata={"kind": kind, "check": check, "path": path})


@dataclass(frozen=True)
class ListenerConfig:
    name: str = _opt(None, str)
    endpoint: str = _opt(None, str, _endpoint)
    hostname: str = _opt("relaygw.localdomain", str)
    max_message_size: int = _opt(26214400, int, _nonNegative)
    max_recipients: int = _opt(100, int, _positive)
    max_connections: int = _opt(1000, int, _positive)
    max_connections_per_ip: int = _opt(0, int, _nonNegative)
    connection_rate_per_ip: int = _opt(0, int, _nonNegative)
    idle_timeout: float = _opt(300, (int, float), _positive)
    data_timeout: float = _opt(600, (int, float), _positive)
    max_line_length: int = _opt(2048, int, _atLeast512)
    max_errors: int = _opt(20, int, _positive)
    greet_delay: float = _opt(0, (int, float), _nonNegative)
    drain_timeout: float = _opt(30, (int, float), _nonNegative)
    bare_lf: str = _opt("normalize", str, _choice("normalize", "reject"))
    vrfy: bool = _opt(True, bool)
    policy: str = _opt("relaygw.policy.RelayAccessPolicy", str)
    trusted_peers: tuple = _opt((), list, _cidrs)
    extensions: tuple = _opt((), list, _subset(*VERBS))
    relay_networks: tuple = _opt((), list, _cidrs)
    tls_certificate: str = _opt(None, str, path=True)
    tls_key: str = _opt(None, str, path=True)
    tls_min_version: str = _opt("1.2", str, _choice("1.2", "1.3"))
    tls_ciphers: str = _opt(None, str)
    tls_client_ca: str = _opt(None, str, path=True)
    tls_client_identities: tuple = _opt((), list)
    tls_self_signed: bool = _opt(False, bool)
    require_tls: bool = _opt(False, bool)
    implicit_tls: bool = _opt(False, bool)
    always_allow: bool = _opt(False, bool)
    credentials: str = _opt(None, str, path=True)
    auth_plaintext: bool = _opt(False, bool)
    proxy_protocol: bool = _opt(False, bool)
    proxy_trusted: tuple = _opt((), list, _cidrs)
    proxy_timeout: float = _opt(5.0, (int, float), _positive)


@dataclass(frozen=True)
class SpoolConfig:
    directory: str = _opt("var/spool", str, path=True)
    fsync: str = _opt("grouped", str, _choice("grouped", "each"))


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
    helo_name: str = _opt(None, str)
    resolver: str = _opt(None, str)
    concurrency: int = _opt(100, int, _positive)
    retry_min: float = _opt(300, (int, float), _positive)
    retry_max: float = _opt(4000, (int, float), _positive)
    max_lifetime: float = _opt(432000, (int, float), _positive)
    bounce_lifetime: float = _opt(432000, (int, float), _positive)
    defer_all: bool = _opt(False, bool)   # accept and queue, deliver nothing (maintenance, benchmarks)


@dataclass(frozen=True)
class RouteConfig(NextHopConfig):
    """A route: recipients in C{domains}, or messages whose context has C{context_key} = C{context_value}."""

    name: str = _opt(None, str)
    domains: tuple = _opt((), list)
    context_key: str = _opt(None, str)
    context_value: str = _opt(None, str)


@dataclass(frozen=True)
class AdminConfig:
    endpoint: str = _opt(None, str, _endpoint)


@dataclass(frozen=True)
class ProcessConfig:
    workers: int = _opt(1, int, _positive)


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


def _build(cls, table, where, fname, base):
    if not isinstance(table, dict):
        raise ConfigError("%s: %s: must be a table" % (fname, where))
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError("%s: %s.%s: unknown key" % (fname, where, unknown[0]))
    values = {}
    for name, f in known.items():
        meta = f.metadata
        key = "%s.%s" % (where, name)
        if name not in table:
            if f.default is None and cls is ListenerConfig and name in ("name", "endpoint"):
                raise ConfigError("%s: %s: missing required key" % (fname, key))
            value = f.default
            if meta["path"] and value is not None:
                value = os.path.normpath(os.path.join(base, value))
            values[name] = value
            continue
        value = table[name]
        kind = meta["kind"]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError("%s: %s: wrong type %s" % (fname, key, type(value).__name__))
        if not isinstance(value, kind):
            raise ConfigError("%s: %s: wrong type %s" % (fname, key, type(value).__name__))
        if kind is list and not all(isinstance(v, str) for v in value):
            raise ConfigError("%s: %s: must be a list of strings" % (fname, key))
        try:
            if meta["check"] is not None:
                value = meta["check"](value)
        except Exception as e:
            raise ConfigError("%s: %s: %s" % (fname, key, e))
        if kind is list:
            value = tuple(value)
        if meta["path"] and value is not None:
            value = os.path.normpath(os.path.join(base, value))
        values[name] = value
    return cls(**values)


def parse(text, path="<config>", base=None):
    """Parse and validate TOML C{text}; relative paths resolve against C{base}."""
    fname = os.path.basename(path)
    if base is None:
        base = os.path.dirname(os.path.abspath(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("%s: %s" % (fname, e))
    sections = {"spool": SpoolConfig, "relay": RelayConfig, "admin": AdminConfig, "log": LogConfig,
                "process": ProcessConfig}
    unknown = sorted(set(data) - set(sections) - {"listener", "route"})
    if unknown:
        raise ConfigError("%s: %s: unknown key" % (fname, unknown[0]))
    built = {name: _build(cls, data.get(name, {}), name, fname, base) for name, cls in sections.items()}
    raw = data.get("listener", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError("%s: listener: at least one [[listener]] table is required" % (fname,))
    listeners = tuple(_build(ListenerConfig, t, "listener[%d]" % i, fname, base) for i, t in enumerate(raw))
    names = [l.name for l in listeners]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError("%s: listener[%d].name: duplicate listener name %r" % (fname, i, n))
    for i, l in enumerate(listeners):
        if (l.tls_certificate is None) != (l.tls_key is None):
            raise ConfigError("%s: listener[%d].tls_key: tls_certificate and tls_key go together" % (fname, i))
        if (l.implicit_tls or l.require_tls) and l.tls_certificate is None:
            key = "implicit_tls" if l.implicit_tls else "require_tls"
            raise ConfigError("%s: listener[%d].%s: needs tls_certificate and tls_key" % (fname, i, key))
        if l.proxy_protocol and not l.proxy_trusted:
            raise ConfigError("%s: listener[%d].proxy_trusted: required with proxy_protocol" % (fname, i))
    rawRoutes = data.get("route", [])
    if not isinstance(rawRoutes, list):
        raise ConfigError("%s: route: must be an array of tables ([[route]])" % (fname,))
    routes = tuple(_build(RouteConfig, t, "route[%d]" % i, fname, base) for i, t in enumerate(rawRoutes))
    for i, r in enumerate(routes):
        if not r.domains and not r.context_key:
            raise ConfigError("%s: route[%d]: needs domains or context_key" % (fname, i))
        if (r.context_key is None) != (r.context_value is None):
            raise ConfigError("%s: route[%d].context_value: context_key and context_value go together" % (fname, i))
        if not r.smarthosts and not r.mx:
            raise ConfigError("%s: route[%d]: needs smarthosts or mx = true" % (fname, i))
    for where, hop in [("relay", built["relay"])] + [("route[%d]" % i, r) for i, r in enumerate(routes)]:
        if hop.smarthosts and hop.mx:
            raise ConfigError("%s: %s.mx: smarthosts and mx exclude each other" % (fname, where))
        if (hop.auth_user is None) != (hop.auth_password is None):
            raise ConfigError("%s: %s.auth_password: auth_user and auth_password go together" % (fname, where))
    if built["relay"].resolver is not None:
        try:
            parseHostPort(built["relay"].resolver, 53)
        except ValueError as e:
            raise ConfigError("%s: relay.resolver: %s" % (fname, e))
    if built["process"].workers > 1:
        from relaygw.workers import parseTCP

        for i, l in enumerate(listeners):
            if parseTCP(l.endpoint) is None:
                raise ConfigError("%s: listener[%d].endpoint: workers > 1 needs a plain tcp: endpoint" % (fname, i))
    return Config(path=path, listeners=listeners, routes=routes, **built)


def load(path):
    """Read and validate the config file at C{path}."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("%s: %s" % (os.path.basename(path), e))
    return parse(text, path)


def loadDefault(base=None):
    """The embedded default config; its relative paths resolve against C{base} (the cwd)."""
    text = resources.files("relaygw").joinpath("default.toml").read_text()
    return parse(text, "default.toml", base or os.getcwd())
