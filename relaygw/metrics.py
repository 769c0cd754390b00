"""
Prometheus metrics in a private registry.

prometheus_client's own Twisted resource is not used: it imports the global
reactor at import time and renders on the reactor's thread pool.  Every
public method catches and logs its own errors: a metrics bug must never
break SMTP.  Label values that come from the network are capped to known
sets so a client cannot blow up the series count.
"""

import collections
import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from relaygw.logs import Logger

log = Logger(namespace="relaygw.metrics")

KNOWN_COMMANDS = frozenset(
    "HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH "
    "XCLIENT XREMOTEIP XSETCONTEXT XDUMPCONTEXT".split()
)
REPLY_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
AUTH_RESULTS = frozenset(["success", "failure", "locked"])  # (locked: refused unverified, its address locked out)
DELIVERY_RESULTS = frozenset(["ok", "defer", "bounce"])
FSYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Arrival to a recipient's final outcome: seconds to days (the queue lifetime is 5 days).
QUEUE_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 2 * 86400, 5 * 86400)
#: One delivery attempt: connection set-up plus transmission.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
QUEUE_STATES = ("active", "deferred", "held", "corrupt")
FINAL_STATUSES = frozenset(["sent", "bounced"])


def _capped(value, known):
    """C{value} if it is in C{known}, else C{"other"}."""
    return value if value in known else "other"


def _safe(method):
    """Log and swallow any exception raised by C{method}."""

    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        try:
            return method(self, *args, **kw)
        except Exception:
            log.failure("metrics: {method} failed", method=method.__name__)

    return wrapper


FREE_DOC = "Octets free on the spool's file system"


class _SpoolCollector:
    """Reports the spool probe's answer at scrape time; one probe call per scrape."""

    def __init__(self):
        self.probe = None

    def describe(self):
        # Without describe(), register() would call collect() (and the probe) at once.
        return [
            GaugeMetricFamily("relaygw_spool_messages", "Messages in the spool"),
            GaugeMetricFamily("relaygw_spool_oldest_age_seconds", "Age of the oldest spooled message"),
            GaugeMetricFamily("relaygw_spool_free_bytes", FREE_DOC),
        ]

    def collect(self):
        if self.probe is None:
            return []
        try:
            depth, age, *free = self.probe()
            depth, age = float(depth), float(age)
        except Exception:
            log.failure("metrics: spool probe failed")
            return []
        families = [
            GaugeMetricFamily("relaygw_spool_messages", "Messages in the spool", value=depth),
            GaugeMetricFamily("relaygw_spool_oldest_age_seconds", "Age of the oldest spooled message",
                              value=age),
        ]
        if free:
            families.append(GaugeMetricFamily("relaygw_spool_free_bytes", FREE_DOC, value=float(free[0])))
        return families


class _QueueCollector:
    """Messages in the queue by state, from the queue probe at scrape time (like relaygw-queue list's summary)."""

    DOC = "Messages in the queue by state: active (due or being delivered), deferred, held, corrupt"

    def __init__(self):
        self.probe = None

    def describe(self):
        return [GaugeMetricFamily("relaygw_queue_messages", self.DOC, labels=["state"])]

    def collect(self):
        if self.probe is None:
            return []
        try:
            counts = self.probe()
        except Exception:
            log.failure("metrics: queue probe failed")
            return []
        family = GaugeMetricFamily("relaygw_queue_messages", self.DOC, labels=["state"])
        for state in QUEUE_STATES:
            family.add_metric([state], float(counts.get(state, 0)))
        return [family]


class _Tally:
    """
    The per-command and per-reply counters, a dozen events per message: a
    dict increment each, where prometheus_client's C{labels().inc()} takes
    two locks; they become counter families at scrape time (both run on
    the reactor thread).
    """

    FAMILIES = {
        "commands": ("relaygw_commands", "SMTP commands received", ["listener", "command"]),
        "replies": ("relaygw_replies", "SMTP replies sent, by class", ["listener", "class"]),
        "refusals": ("relaygw_refusals", "SMTP refusals (4xx, 5xx) sent, by reply code", ["listener", "code"]),
    }

    def __init__(self):
        self.counts = collections.Counter()

    def describe(self):
        return [CounterMetricFamily(name, doc, labels=labels) for name, doc, labels in self.FAMILIES.values()]

    def collect(self):
        families = {kind: CounterMetricFamily(name, doc, labels=labels)
                    for kind, (name, doc, labels) in self.FAMILIES.items()}
        for (kind, *labels), n in self.counts.items():
            families[kind].add_metric(labels, n)
        return list(families.values())


class Metrics:
    """
    The gateway's counters, gauges and histograms.

    @ivar registry: the L{CollectorRegistry} everything is registered in.
    """

    def __init__(self, registry=None):
        self.registry = r = CollectorRegistry() if registry is None else registry
        self.connectionsOpen = Gauge("relaygw_connections_open", "Open SMTP connections",
                                     ["listener"], registry=r)
        self.connectionsTotal = Counter("relaygw_connections", "SMTP connections accepted",
                                        ["listener"], registry=r)
        self._tally = _Tally()
        r.register(self._tally)
        self._children = {}
        self.tls = Counter("relaygw_tls_handshakes", "TLS handshakes completed", ["listener"], registry=r)
        self.auth = Counter("relaygw_auth", "AUTH attempts", ["listener", "result"], registry=r)
        self.verbs = Counter("relaygw_trusted_verbs", "Trusted verbs used or refused",
                             ["listener", "verb", "result"], registry=r)
        self.accepted = Counter("relaygw_messages_accepted", "Messages accepted and spooled",
                                ["listener"], registry=r)
        self.bytes = Counter("relaygw_message_bytes", "Octets of accepted messages", ["listener"], registry=r)
        self.fsync = Histogram("relaygw_fsync_seconds", "End of DATA to durable in the spool",
                               buckets=FSYNC_BUCKETS, registry=r)
        self.deliveries = Counter("relaygw_delivery_attempts", "Delivery results per recipient",
                                  ["nexthop", "result"], registry=r)
        self.corruptFiles = Counter("relaygw_spool_corrupt", "Queue or state files moved to corrupt/",
                                    registry=r)
        self._spool = _SpoolCollector()
        r.register(self._spool)
        self.queueSeconds = Histogram("relaygw_delivery_queue_seconds",
                                      "Arrival to a recipient's final outcome (sent or bounced)", ["status"],
                                      buckets=QUEUE_BUCKETS, registry=r)
        self.attemptSeconds = Histogram("relaygw_delivery_attempt_seconds",
                                        "One recipient's delivery attempt: connection set-up and transmission",
                                        buckets=ATTEMPT_BUCKETS, registry=r)
        self._queue = _QueueCollector()
        r.register(self._queue)
        #: Each peer snapshot's L{_Restarts}, by path.
        self._restarts = {}
        if registry is None:
            ProcessCollector(registry=r)

    def _labelled(self, metric, *values):
        """C{metric.labels(*values)}, looked up once (it takes a lock each time)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    @_safe
    def connection(self, listener, delta):
        """A session opened (C{+1}) or closed (C{-1}) on C{listener}."""
        self._labelled(self.connectionsOpen, listener).inc(delta)
        if delta > 0:
            self._labelled(self.connectionsTotal, listener).inc()

    @_safe
    def event(self, listener, kind, *labels):
        """One SMTP session event; unknown kinds are ignored."""
        if kind == "command":
            self._tally.counts["commands", listener, _capped(str(labels[0]).upper(), KNOWN_COMMANDS)] += 1
        elif kind == "reply":
            code = int(labels[0])
            cls = REPLY_CLASSES.get(code // 100)
            if cls is not None:
                self._tally.counts["replies", listener, cls] += 1
            if 400 <= code < 600:
                # The gateway's own reply table: a bounded set of codes.
                self._tally.counts["refusals", listener, str(code)] += 1
        elif kind == "tls_handshakes":
            self._labelled(self.tls, listener).inc()
        elif kind == "auth":
            self._labelled(self.auth, listener, _capped(labels[0], AUTH_RESULTS)).inc()
        elif kind in ("verb_used", "verb_refused"):
            verb = _capped(str(labels[0]).upper(), KNOWN_COMMANDS)
            self._labelled(self.verbs, listener, verb, kind[len("verb_"):]).inc()

    @_safe
    def queued(self, listener, size, seconds):
        """A message of C{size} octets became durable C{seconds} after its final dot."""
        self._labelled(self.accepted, listener).inc()
        self._labelled(self.bytes, listener).inc(max(0, size))
        self.fsync.observe(seconds)

    @_safe
    def delivery(self, hop, result):
        """
        One recipient's delivery attempt via C{hop} ended with C{result}.
        MX delivery's hops (C{mx:DOMAIN}, one per recipient domain a client
        names) count as one, C{mx}.
        """
        hop = "mx" if hop.startswith("mx:") else hop
        self._labelled(self.deliveries, hop, _capped(result, DELIVERY_RESULTS)).inc()

    @_safe
    def deliveryTimes(self, status, inQueue, attempt):
        """
        One recipient's attempt ended with C{status} (sent, deferred,
        bounced) C{inQueue} seconds after the message arrived; the attempt
        itself took C{attempt} seconds.
        """
        self.attemptSeconds.observe(max(0.0, attempt))
        if status in FINAL_STATUSES:
            self._labelled(self.queueSeconds, status).observe(max(0.0, inQueue))

    @_safe
    def setQueueProbe(self, probe):
        """C{probe() -> {state: count}} for L{QUEUE_STATES}, called at each scrape."""
        self._queue.probe = probe

    @_safe
    def corrupt(self):
        """A message was quarantined as corrupt."""
        self.corruptFiles.inc()

    @_safe
    def setSpoolProbe(self, probe):
        """C{probe() -> (depth, oldestAgeSeconds[, freeBytes])}, called at each scrape."""
        self._spool.probe = probe

    #: Other worker processes' snapshots (paths), added in by L{render}.
    peers = ()

    def render(self):
        """The registry in the Prometheus text format, with the other workers' counts added in."""
        try:
            if not self.peers:
                return generate_latest(self.registry)
            return generate_latest(_Merged(self.registry, self.peers, self._restarts))
        except Exception:
            log.failure("metrics: render failed")
            return b""


class _Merged:
    """
    A registry's families plus the same families from other workers'
    snapshots: values of the same sample and labels are added up (the
    oldest-message age takes the largest); C{_created} samples are this
    process's own.  A snapshot that can't be read or parsed is left out.
    """

    LARGEST = frozenset(["relaygw_spool_oldest_age_seconds", "relaygw_spool_free_bytes",
                         "process_start_time_seconds", "process_max_fds"])

    def __init__(self, registry, peers, restarts=None):
        self.registry = registry
        self.peers = peers
        self.restarts = {} if restarts is None else restarts

    def collect(self):
        families, values = {}, {}

        def add(family, own):
            samples = [s for s in family.samples if own or not s.name.endswith("_created")]
            if family.name not in families and (own or samples):
                # (Not a family of another worker's _created samples alone, as the text
                # format parses them: its HELP and TYPE would come twice.)
                families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                elif family.name in self.LARGEST:
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] += sample.value

        for family in self.registry.collect():
            add(family, True)
        for path in self.peers:
            try:
                with open(path, encoding="utf-8") as f:
                    peer = list(text_string_to_metric_families(f.read()))
            except (OSError, ValueError):  # (a UnicodeDecodeError among them)
                continue
            restarts = self.restarts.setdefault(path, _Restarts())
            for family in restarts.carried(peer):
                add(family, False)
        for (name, sample, labels), value in values.items():
            families[name].add_sample(sample, dict(labels), value)
        return list(families.values())


class _Restarts:
    """
    One peer worker's counters across its restarts: a worker started again
    (its C{process_start_time_seconds} changed, or a counter fell) counts
    from zero, so what its last snapshot had counted is carried on, and the
    merged counters never go back.
    """

    MONOTONIC = frozenset(["counter", "histogram", "summary"])

    def __init__(self):
        self.start = None
        self.last = {}  # (family, sample, labels): value in the last snapshot read
        self.offset = {}  # (family, sample, labels): counted by the worker's earlier processes
        self.described = {}  # family: (documentation, type)

    def carried(self, families):
        """C{families} of a snapshot, their counters plus what earlier processes counted."""
        current, start = {}, None
        for family in families:
            if family.name == "process_start_time_seconds" and family.samples:
                start = family.samples[0].value
            if family.type in self.MONOTONIC:
                self.described[family.name] = (family.documentation, family.type)
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        current[family.name, sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        fell = any(value < self.last[key] for key, value in current.items()
                   if key in self.last and self.described[key[0]][1] == "counter")
        if fell or (start is not None and self.start is not None and start != self.start):
            for key, value in self.last.items():
                self.offset[key] = self.offset.get(key, 0) + value
            self.last = current
        else:
            self.last.update(current)
        if start is not None:
            self.start = start
        if not self.offset:
            return families
        out = [family for family in families if family.type not in self.MONOTONIC]
        carried = {}
        for key in list(current) + [key for key in self.offset if key not in current]:  # (buckets in order)
            name = key[0]
            if name not in carried:
                carried[name] = Metric(name, *self.described[name])
            carried[name].add_sample(key[1], dict(key[2]), current.get(key, 0) + self.offset.get(key, 0))
        return out + list(carried.values())
