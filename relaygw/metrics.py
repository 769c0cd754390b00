"""
Prometheus metrics in a private registry (prometheus_client's own Twisted
resource is not used: it imports the global reactor at import time).
Every method swallows its own errors: a metrics bug never breaks SMTP.
"""

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.logger import Logger

log = Logger(namespace="relaygw.metrics")

KNOWN_COMMANDS = frozenset(
    "HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH "
    "XCLIENT XREMOTEIP XSETCONTEXT XDUMPCONTEXT".split()
)


def _safe(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        try:
            method(self, *args, **kw)
        except Exception:
            log.failure("metrics update failed")

    return wrapper


class Metrics:
    def __init__(self, registry=None):
        self.registry = r = registry or CollectorRegistry()
        self.connectionsOpen = Gauge("relaygw_connections_open", "Open SMTP connections", ["listener"], registry=r)
        self.connectionsTotal = Counter("relaygw_connections", "SMTP connections accepted", ["listener"], registry=r)
        self.commands = Counter("relaygw_commands", "SMTP commands received", ["listener", "command"], registry=r)
        self.replies = Counter("relaygw_replies", "SMTP replies sent by class", ["listener", "class"], registry=r)
        self.accepted = Counter("relaygw_messages_accepted", "Messages accepted and queued", ["listener"], registry=r)
        self.bytes = Counter("relaygw_message_bytes", "Octets of accepted messages", ["listener"], registry=r)
        self.fsync = Histogram("relaygw_fsync_seconds", "End of data to durable in the spool",
                               buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1), registry=r)
        self.tls = Counter("relaygw_tls_handshakes", "TLS handshakes completed", ["listener"], registry=r)
        self.auth = Counter("relaygw_auth", "AUTH attempts", ["listener", "result"], registry=r)
        self.verbs = Counter("relaygw_trusted_verbs", "Trusted verb uses and refusals",
                             ["listener", "verb", "result"], registry=r)
        self.deliveries = Counter("relaygw_delivery_attempts", "Delivery results per recipient",
                                  ["nexthop", "result"], registry=r)
        self.spoolDepth = Gauge("relaygw_spool_messages", "Messages in the spool", registry=r)
        self.spoolAge = Gauge("relaygw_spool_oldest_age_seconds", "Age of the oldest spooled message", registry=r)

    @_safe
    def connection(self, listener, delta):
        self.connectionsOpen.labels(listener).inc(delta)
        if delta > 0:
            self.connectionsTotal.labels(listener).inc()

    @_safe
    def event(self, listener, kind, *labels):
        if kind == "command":
            verb = labels[0] if labels[0] in KNOWN_COMMANDS else "other"
            self.commands.labels(listener, verb).inc()
        elif kind == "reply":
            self.replies.labels(listener, "%dxx" % (labels[0] // 100)).inc()
        elif kind == "tls_handshakes":
            self.tls.labels(listener).inc()
        elif kind == "auth":
            self.auth.labels(listener, labels[0]).inc()
        elif kind in ("verb_used", "verb_refused"):
            self.verbs.labels(listener, labels[0], kind[5:]).inc()

    @_safe
    def queued(self, listener, size, seconds):
        self.accepted.labels(listener).inc()
        self.bytes.labels(listener).inc(size)
        self.fsync.observe(seconds)

    @_safe
    def delivery(self, hop, result):
        self.deliveries.labels(hop, result).inc()

    def setSpoolProbe(self, probe):
        """C{probe() -> (depth, oldestAgeSeconds)}, evaluated at each scrape."""
        self.spoolDepth.set_function(lambda: probe()[0])
        self.spoolAge.set_function(lambda: probe()[1])

    def render(self):
        return generate_latest(self.registry)
