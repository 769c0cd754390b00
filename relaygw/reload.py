"""
SIGHUP: re-read the config file and apply it to the running gateway, whole
or not at all.

The new file goes through the same checks as C{--check-config} (an invalid
file is refused with the same lines, and the running config stays).  Then
everything the new config needs is built (policies, TLS settings, portals,
the router) before anything running is touched; only if that succeeds is
it swapped in.  Listener settings, trust, policy, certificates, C{[relay]},
C{[[route]]} and C{[log]} apply to new sessions and new deliveries; keys
that shape a listening socket or the spool need a restart, and are named in
a warning.  A listener whose new settings do not hold with the keys it runs
with until a restart (no C{proxy_trusted} while it still expects PROXY
headers) keeps its running settings whole, with a warning saying why.
"""

import dataclasses

from relaygw import logs
from relaygw.config import AdminConfig, ConfigError, ProcessConfig, SpoolConfig, listenerErrors, parse, read
from relaygw.logs import Logger

log = Logger(namespace="relaygw.reload")

#: Listener keys that shape the listening socket: a restart applies them.
LISTENER_RESTART_KEYS = ("endpoint", "implicit_tls", "proxy_protocol")
#: Section keys a restart applies: all of C{[spool]}, C{[process]} and C{[admin]} (L{applicable} keeps them).
SECTION_RESTART_KEYS = tuple((section, f.name) for section, cls in (("spool", SpoolConfig), ("process", ProcessConfig),
                                                                     ("admin", AdminConfig))
                             for f in dataclasses.fields(cls))


def reloadConfig(service, path, text=None, share=None):
    """
    Re-read C{path} (or take C{text}, its content as another process read
    it; relative paths still resolve against C{path}'s directory) and apply
    it to C{service} (a L{GatewayService}).  C{share(text)}, when given,
    hands the text on to the other workers once everything is built and
    before anything changes; if it returns false, the reload is refused.

    @return: the text applied, or C{None} when it was refused.
    """
    try:
        if text is None:
            text = read(path)
        new = parse(text, path, environment=True)
    except ConfigError as e:
        # The same lines --check-config prints; nothing of the new file applies.
        for error in e.errors:
            log.error("reload refused, keeping the running config: {error}", error=error)
        return None
    old = service.config
    restart = _restartKeys(old, new)
    for key in restart:
        log.warn("reload: {key} changes only with a restart", key=key)
    for name, keys, errors in _heldBack(old, new):
        log.warn("reload: listener {name} keeps its running settings until a restart, as the new ones do not hold "
                 "with its running {keys}: {errors}", name=name, keys=", ".join(keys),
                 errors="; ".join("%s: %s" % e for e in errors))
    applied = applicable(old, new)
    try:
        plan = _Plan(service, applied)
    except Exception as e:
        log.error("reload refused, keeping the running config: {error}", error=" ".join(str(e).split()))
        return None
    if share is not None and not share(text):
        log.error("reload refused, keeping the running config: {error}",
                  error="it could not be handed on to the other workers")
        return None
    plan.commit()
    for where, keys in _changedKeys(old, applied):
        log.info("reload: {where}: changed {keys}", where=where, keys=", ".join(keys))
    log.info("reload: applied {path}", path=path)
    return text


def applicable(old, new):
    """
    What of config C{new} a reload applies to a gateway running on C{old}:
    C{new}, with the keys that need a restart as they are in C{old}.  The
    listeners are C{old}'s, which a restart alone changes: one C{new} adds
    is not there, one it removes stays as it was (it still listens), and
    so does one of L{_heldBack}.
    """
    fresh = {l.name: l for l in new.listeners}
    listeners = []
    for l in old.listeners:
        updated = fresh.get(l.name)
        if updated is not None and not listenerErrors(_mixed(l, updated)):
            l = _mixed(l, updated)
        listeners.append(l)
    return dataclasses.replace(new, listeners=tuple(listeners), spool=old.spool, process=old.process,
                               admin=old.admin)


def _mixed(running, updated):
    """Listener C{updated} with the keys a restart applies as in C{running}."""
    return dataclasses.replace(updated, **{k: getattr(running, k) for k in LISTENER_RESTART_KEYS})


def _heldBack(old, new):
    """
    C{[(name, [restart key, ...], [(key, what is wrong), ...])]}: the
    listeners whose settings in C{new} fail the checks a file's listener
    passes (L{listenerErrors}) once mixed with the restart keys they run
    with in C{old}.  They keep their settings in C{old}, whole.
    """
    fresh = {l.name: l for l in new.listeners}
    out = []
    for l in old.listeners:
        updated = fresh.get(l.name)
        errors = listenerErrors(_mixed(l, updated)) if updated is not None else []
        if errors:
            out.append((l.name, [k for k in LISTENER_RESTART_KEYS if getattr(l, k) != getattr(updated, k)], errors))
    return out


def _restartKeys(old, new):
    keys = ["%s.%s" % (section, key) for section, key in SECTION_RESTART_KEYS
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]
    fresh = {l.name: l for l in new.listeners}
    for l in old.listeners:
        updated = fresh.get(l.name)
        if updated is None:
            keys.append("listener %s (removed)" % (l.name,))
            continue
        keys += ["listener %s: %s" % (l.name, k) for k in LISTENER_RESTART_KEYS if getattr(l, k) != getattr(updated, k)]
    known = {l.name for l in old.listeners}
    keys += ["listener %s (added)" % (l.name,) for l in new.listeners if l.name not in known]
    return keys


def _changedKeys(old, new):
    """C{[(where, [key, ...])]} for what differs between two configs."""
    out = []
    was = {l.name: l for l in old.listeners}
    for l in new.listeners:
        before = was.get(l.name)
        if before is not None:
            out.append(("listener %s" % (l.name,), _differ(before, l)))
    out += [("[relay]", _differ(old.relay, new.relay)), ("[log]", _differ(old.log, new.log))]
    out.append(("[[route]]", _routeChanges(old.routes, new.routes)))
    return [(where, keys) for where, keys in out if keys]


def _routeChanges(old, new):
    """The routes added, removed or changed (by name, or C{route[N]}), or their order."""
    def named(routes):
        return {r.name or "route[%d]" % i: r for i, r in enumerate(routes)}

    before, after = named(old), named(new)
    keys = ["%s (removed)" % name for name in before if name not in after]
    for name, route in after.items():
        if name not in before:
            keys.append("%s (added)" % name)
        else:
            keys += ["%s: %s" % (name, key) for key in _differ(before[name], route)]
    if not keys and old != new:
        keys.append("their order")
    return keys


def _differ(a, b):
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


class _Plan:
    """Everything a reload swaps in, built up front so that a failure changes nothing."""

    def __init__(self, service, config):
        self.service = service
        self.config = config
        self.listeners = service.listeners.prepare(config)
        self.queueSettings = service.delivery.prepare(service.config, config)

    def commit(self):
        service = self.service
        service.listeners.apply(self.listeners, self.config)
        service.delivery.apply(self.queueSettings)
        logs.reconfigure(self.config.log.format, self.config.log.level)
        service.config = self.config
