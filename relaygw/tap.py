"""
The twistd plugin's options and service maker (C{twistd relaygw}).
"""

import os
import signal
import sys

from twisted.python import usage

from relaygw import config as _config
from relaygw import descriptors, logs


class Options(usage.Options):
    synopsis = "[--config FILE] [--check-config]"
    longdesc = (
        "relaygw: a trusted SMTP relay gateway.  Without --config it runs on the "
        "embedded default config (127.0.0.1:2525, spool var/spool, Maildir var/outbox, "
        "relative to the current directory)."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file (default: the embedded default config)."],
        ["worker", None, "0", "Internal: the index of this worker process ([process] workers > 1)."],
    ]
    optFlags = [
        ["check-config", None, "Validate the config file, print the result and exit (0 if valid)."],
    ]

    def postOptions(self):
        # Start and --check-config refuse the same configurations with the
        # same words: every error, one per line, and no traceback.
        self.configText = None
        if not (self["worker"].isascii() and self["worker"].isdigit()):
            raise usage.UsageError("--worker: %r is not a worker index (expected 0 or more)" % (self["worker"],))
        try:
            if self["config"]:
                self.config = self._workerConfig()
                if self.config is None:
                    self.configText = _config.read(self["config"])
                    self.config = _config.parse(self.configText, self["config"], environment=True)
            else:
                self.config = _config.loadDefault(environment=True)
        except _config.ConfigError as e:
            sys.stderr.write("%s\n" % (e,))
            raise SystemExit(1)
        if self["check-config"]:
            sys.stdout.write("%s: ok\n" % (self["config"] or "default config",))
            raise SystemExit(0)

    def _workerConfig(self):
        """A worker the main process started runs on the main process's config, not the file as it is now."""
        if self["worker"] == "0" or self["check-config"]:
            return None
        from relaygw.workers import workerConfig

        return workerConfig(self["config"])


def makeService(options):
    from relaygw.service import makeService as build

    from relaygw.spool import PartitionLocked, UnsafeSpool
    from relaygw.workers import dieWithParent, keepToOneCPU

    _refuseSwitchingUser(getattr(options, "parent", None))
    _refuseOtherLogs(getattr(options, "parent", None))
    _refuseChroot(getattr(options, "parent", None))
    _checkPidFile(getattr(options, "parent", None))
    worker = int(options["worker"])
    if worker and not dieWithParent():
        sys.stderr.write("relaygw worker %d: the main process has gone; not starting\n" % (worker,))
        raise SystemExit(1)
    descriptors.raiseLimit()  # (before the listeners size themselves to it)
    process = options.config.process
    if process.workers > 1 and process.cpu_affinity:
        # (before any thread starts: they run where this one does)
        keepToOneCPU(worker, process.workers, process.cpu_affinity)
    from twisted.internet import reactor

    from relaygw import eventloop

    eventloop.tune(reactor)
    try:
        configPath = os.path.abspath(options["config"]) if options["config"] else None  # (as the workers get it)
        service = build(options.config, worker=worker, configPath=configPath,
                        logFile=_logFile(getattr(options, "parent", None)), configText=options.configText)
        # Exclusive ownership of the spool partition, for the process's
        # lifetime: a second gateway on the same spool stops here.
        try:
            service.acquireSpool()
        except OSError as e:  # (its lock file cannot be made or opened: the disk failing or full)
            sys.stderr.write("cannot take the spool %s: %s\n" % (service.spool.directory, e))
            raise SystemExit(1)
        service.installSignals = True
        # twistd writes the pid file before the service starts, and the
        # service's SIGHUP handler (reload) is in place only once it has:
        # a SIGHUP in between (logrotate's postrotate) would kill the
        # process.  Until then it is ignored, as the workers' is.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _tuneCollector()
        return service
    except (_config.ConfigError, PartitionLocked, UnsafeSpool) as e:
        sys.stderr.write("%s\n" % (e,))
        raise SystemExit(1)


def _refuseSwitchingUser(twistdOptions):
    """
    Exit with one line if twistd was asked to switch user or group
    (C{--uid}, C{--gid}): it does so only once the service is made, when
    the spool, its lock and the log file already belong to the starting
    user, and the first spool write as the other user would fail.
    """
    if twistdOptions is None:
        return
    uid, gid = twistdOptions.get("uid"), twistdOptions.get("gid")
    if uid not in (None, os.getuid()) or gid not in (None, os.getgid()):
        sys.stderr.write("relaygw: twistd --uid and --gid are not supported (expected twistd started as the user "
                         "the gateway runs as, e.g. systemd's User=)\n")
        raise SystemExit(1)


def _refuseOtherLogs(twistdOptions):
    """
    Exit with one line if twistd was asked to log elsewhere than a file
    (C{--syslog}, C{--logger}): the gateway installs its own observer
    (L{_logFile}), and twistd would pass those over without a word.
    """
    if twistdOptions is None:
        return
    if twistdOptions.get("syslog") or twistdOptions.get("logger"):
        sys.stderr.write("relaygw: twistd --syslog and --logger are not supported (expected --logfile, or standard "
                         "output with -n)\n")
        raise SystemExit(1)


def _refuseChroot(twistdOptions):
    """
    Exit with one line if twistd was asked to C{--chroot}: it changes root
    only once the service is made, when the config, the spool and the
    certificates have been found by their paths outside it and the modules
    a listener imports as it starts are left behind (start then ended with
    "cannot listen: No such file or directory").
    """
    if twistdOptions is not None and twistdOptions.get("chroot"):
        sys.stderr.write("relaygw: twistd --chroot is not supported (expected the gateway started in the root it "
                         "runs in, e.g. systemd's RootDirectory=)\n")
        raise SystemExit(1)


def _checkPidFile(twistdOptions):
    """
    Exit with one line if twistd could not write its C{--pidfile}: it
    writes it only once the service is made and the spool taken, and a
    failure there is a traceback (in the log file when daemonizing).
    Nothing is left behind: a pid file made to try is removed (twistd would
    refuse to start next time on an empty one).
    """
    if twistdOptions is None:
        return
    path = twistdOptions.get("pidfile")
    if not path:
        return
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, 0o644)
        except FileExistsError:  # (a stale one, say: twistd writes it over)
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        else:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        sys.stderr.write("%s: cannot write the pid file: %s\n" % (path, e.strerror))
        raise SystemExit(1)


def _logFile(twistdOptions):
    """
    Where twistd's own options say the log goes: C{--logfile=X} (C{-} is
    standard output), or, when daemonizing without one, twistd's default
    C{twistd.log}; C{None} for standard output.  Opened now, before
    twistd detaches from the terminal.
    """
    if twistdOptions is None:
        return None
    path = twistdOptions.get("logfile")
    if path == "-" or (not path and twistdOptions.get("nodaemon")):
        return None
    path = os.path.abspath(path or "twistd.log")
    try:
        return logs.openLogFile(path)
    except OSError as e:
        sys.stderr.write("%s: cannot open the log file: %s\n" % (path, e.strerror))
        raise SystemExit(1)


def _tuneCollector():
    """
    The modules and configuration loaded by now live as long as the
    process: freeze them so that the collector's full passes skip them,
    and collect the young generation less often (each message leaves
    thousands of short-lived container objects behind).
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10000, 20, 20)
