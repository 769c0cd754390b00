"""
Daemon mode: C{twistd --logfile=X --pidfile=P relaygw} without C{-n}
detaches, writes its pid file, and logs to X, every worker included.
"""

import errno
import os
import smtplib
import signal
import socket
import subprocess
import time

from twisted.internet import task
from twisted.python.failure import Failure
from twisted.trial import unittest

from relaygw.testing import Client, configText, freePort, inThread, waitForPort
from relaygw.workers import WorkerSupervisor, twistdArgv
from tests.processes import childPids, spoolPids, waitUntil
from tests.recorders import LogCapture


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


#: The spool synced by a disk thread rather than through io_uring.
DISK_THREAD = {"io_uring": False}


def _gatewayConfig(test, workers, listener=None, process=None, spool=None, relay=None, admin=None):
    """
    A directory with a config of C{workers} workers (and C{process}'s other
    settings, C{spool}'s, C{relay}'s and C{admin}'s) listening on a free
    loopback port (with C{listener}'s settings): (directory, port, config path).
    """
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    port = freePort()
    conf = os.path.join(directory, "relaygw.toml")
    listener = dict({"endpoint": "tcp:%d:interface=127.0.0.1" % port, "relay_networks": ["127.0.0.0/8"]},
                    **(listener or {}))
    with open(conf, "w") as f:
        f.write(configText(directory, process=dict(process or {}, workers=workers), spool=spool, relay=relay,
                           listeners=(listener,), admin=admin))
    return directory, port, conf


class DaemonTests(unittest.TestCase):
    def daemon(self, workers):
        directory, port, conf = _gatewayConfig(self, workers)
        logfile, pidfile = os.path.join(directory, "relaygw.log"), os.path.join(directory, "relaygw.pid")
        argv = [a for a in twistdArgv(conf) if a not in ("--nodaemon", "--pidfile=")]
        argv[1:1] = ["--logfile=" + logfile, "--pidfile=" + pidfile]
        # twistd forks, the parent returns once the daemon is set up.
        started = subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=60)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        deadline = time.monotonic() + 15
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(pidfile) as f:
            pid = int(f.read().strip())
        self.addCleanup(lambda: _alive(pid) and os.kill(pid, signal.SIGKILL))
        waitForPort(port)
        return directory, port, logfile, pidfile, pid

    def session(self, port):
        c = Client(port)
        try:
            self.assertEqual(c.transaction(["b@example.net"], "Subject: daemon\r\n\r\nx\r\n")[-1][0], 250)
            c.cmd("QUIT")
        finally:
            c.close()

    def stop(self, pid, pidfile):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(pid))
        self.assertFalse(os.path.exists(pidfile))

    def test_daemonLogsToItsLogFile(self):
        def run():
            directory, port, logfile, pidfile, pid = self.daemon(1)
            self.session(port)
            time.sleep(0.5)
            self.stop(pid, pidfile)
            with open(logfile) as f:
                log = f.read()
            self.assertRegex(log, r"\] connect from unknown\[127\.0\.0\.1\]")
            self.assertRegex(log, r": queued from=<a@example\.org>")
            self.assertRegex(log, r": to=<b@example\.net>, relay=maildir:.*status=sent")
            self.assertIn("stopped; spool intact", log)

        return inThread(run)

    def test_everyWorkerLogsToTheFile(self):
        def run():
            directory, port, logfile, pidfile, pid = self.daemon(2)
            deadline = time.monotonic() + 15
            while not os.path.isdir(os.path.join(directory, "spool", "w1", "queue")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            for _ in range(10):
                self.session(port)
            time.sleep(0.5)
            self.stop(pid, pidfile)
            with open(logfile) as f:
                log = f.read()
            self.assertIn("started worker 1", log)
            self.assertEqual(log.count(": queued from=<a@example.org>"), 10, log)
            self.assertEqual(log.count("stopped; spool intact"), 2, log)

        return inThread(run)

    def test_portInUseEndsTheLauncher(self):
        """
        A port in use ends a daemon's start: the launcher twistd leaves
        waiting for the daemon's word exits 1 saying why, and the pid file
        is removed.  It waited for ever (start ended with SystemExit, which
        twistd reports to neither).
        """
        def run():
            busy = socket.socket()
            self.addCleanup(busy.close)
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            directory, port, conf = _gatewayConfig(
                self, 1, listener={"endpoint": "tcp:%d:interface=127.0.0.1" % (busy.getsockname()[1],)})
            logfile, pidfile = os.path.join(directory, "relaygw.log"), os.path.join(directory, "relaygw.pid")
            argv = [a for a in twistdArgv(conf) if a not in ("--nodaemon", "--pidfile=")]
            argv[1:1] = ["--logfile=" + logfile, "--pidfile=" + pidfile]
            launcher = subprocess.Popen(argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
            self.addCleanup(lambda: launcher.poll() is None and launcher.kill())
            try:
                err = launcher.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                self.fail("the launcher still waits for the daemon")
            self.assertEqual(launcher.returncode, 1)
            self.assertIn("listener[0].endpoint: cannot listen", err)  # (twistd keeps 100 octets of it)
            # (twistd tells the launcher before it removes the pid file: on a busy machine the launcher may
            # be gone first)
            self.assertTrue(waitUntil(lambda: not os.path.exists(pidfile), 10))
            with open(logfile) as f:
                log = f.read()
            self.assertIn("relaygw.toml: listener[0].endpoint: cannot listen: Address already in use", log)
            self.assertNotIn("Traceback", log)

        return inThread(run)

    def test_hangUpWhileStarting(self):
        """
        SIGHUP as soon as the pid file exists (logrotate's postrotate while
        the gateway starts): twistd writes the pid file before the service
        starts, and the signal's default action killed the gateway, leaving
        the launcher waiting for ever.  It is ignored until the reload
        handler is in place: the gateway starts and serves mail.
        """
        def run():
            directory, port, conf = _gatewayConfig(self, 1)
            logfile, pidfile = os.path.join(directory, "relaygw.log"), os.path.join(directory, "relaygw.pid")
            argv = [a for a in twistdArgv(conf) if a not in ("--nodaemon", "--pidfile=")]
            argv[1:1] = ["--logfile=" + logfile, "--pidfile=" + pidfile]
            launcher = subprocess.Popen(argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(lambda: launcher.poll() is None and launcher.kill())
            pid, deadline = None, time.monotonic() + 30
            while pid is None and time.monotonic() < deadline:
                try:
                    with open(pidfile) as f:
                        pid = int(f.read().strip())
                except (OSError, ValueError):
                    time.sleep(0.0005)
            self.assertIsNotNone(pid)
            self.addCleanup(lambda: _alive(pid) and os.kill(pid, signal.SIGKILL))
            os.kill(pid, signal.SIGHUP)
            self.assertEqual(launcher.wait(30), 0)
            waitForPort(port)
            self.session(port)
            self.stop(pid, pidfile)

        return inThread(run)

    def test_logFileOpenedAgainOnHangUp(self):
        """logrotate moves the log away and sends SIGHUP: every worker writes to a new file."""
        return self.hangUpAfterRotation(breakConfig=False)

    def test_logFileOpenedAgainWhenTheConfigIsRefused(self):
        """
        SIGHUP with a config file that does not load: every worker still
        opens the log file again; the main process, which judges the file,
        says it keeps the running config (the other worker keeps the config
        the main process applied).
        """
        return self.hangUpAfterRotation(breakConfig=True)

    def hangUpAfterRotation(self, breakConfig):
        def run():
            directory, port, logfile, pidfile, pid = self.daemon(2)
            deadline = time.monotonic() + 15
            while not os.path.isdir(os.path.join(directory, "spool", "w1", "queue")) and time.monotonic() < deadline:
                time.sleep(0.05)
            if breakConfig:
                with open(os.path.join(directory, "relaygw.toml"), "a") as f:
                    f.write("[process]\nworkers = 2\n")  # a table given twice
            self.session(port)
            os.rename(logfile, logfile + ".1")
            os.kill(pid, signal.SIGHUP)
            deadline = time.monotonic() + 15
            while not os.path.exists(logfile) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # (the other worker reloads after the first)
            for _ in range(10):
                self.session(port)
            time.sleep(0.5)
            self.stop(pid, pidfile)
            with open(logfile + ".1") as f:
                old = f.read()
            with open(logfile) as f:
                new = f.read()
            self.assertEqual(old.count(": queued from=<a@example.org>"), 1, old)
            self.assertEqual(new.count(": queued from=<a@example.org>"), 10, new)
            self.assertEqual(new.count("stopped; spool intact"), 2, new)
            self.assertEqual(new.count("reload refused, keeping the running config"), 1 if breakConfig else 0, new)

        return inThread(run)


class FileLimitTests(unittest.TestCase):
    """The gateway raises its soft limit on open files to the hard one, and says when even that is too low."""

    def start(self, soft, hard, workers=1, listener=None, relay=None, admin=None):
        import resource

        directory, port, conf = _gatewayConfig(self, workers, listener, relay=relay, admin=admin)
        self.conf, self.directory = conf, directory
        p = subprocess.Popen(twistdArgv(conf), cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        self.addCleanup(lambda: p.poll() is None and p.kill())
        self.addCleanup(p.stdout.close)
        waitForPort(port)
        self.port = port
        return p

    @staticmethod
    def softLimit(pid):
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])

    def stopped(self, p):
        p.send_signal(signal.SIGTERM)
        return p.communicate(timeout=30)[0].decode()

    def workersStarted(self, workers=2):
        """
        Wait (up to 30 s) for the other workers to lock their spool
        partitions, which each does just before it listens.
        """
        wanted = {"w%d" % n for n in range(1, workers)}
        self.assertTrue(waitUntil(lambda: wanted <= set(spoolPids(self.directory)), 30))

    def waitingClient(self, port, held):
        """A client that connects now, and is not greeted within 1 s: it waits in the listen queue (in C{held})."""
        waiting = Client(port)
        held.append(waiting)
        waiting.sock.settimeout(1)
        self.assertRaises(TimeoutError, waiting.sock.recv, 100)
        return waiting

    def test_softRaisedToHard(self):
        def run():
            p = self.start(256, 4096, workers=2)
            self.workersStarted()
            self.assertEqual([self.softLimit(pid) for pid in [p.pid] + childPids(p.pid)], [4096, 4096])
            self.assertNotIn("open-file limit", self.stopped(p))

        return inThread(run)

    def test_warnsWhenTheHardLimitIsTooLow(self):
        def run():
            p = self.start(512, 512)
            self.assertEqual(self.softLimit(p.pid), 512)
            output = self.stopped(p)
            # (512 - 100 deliveries - 64) / 2 descriptors a session, against the default max_connections.
            self.assertIn("the open-file limit is 512: this process can hold 174 connections at once, fewer "
                          "than max_connections allows (1000)", output)

        return inThread(run)

    def test_adminConnectionsInTheBudget(self):
        """
        With an admin endpoint, its 64 connections come out of the budget
        of the process serving it (they took descriptors the budget had
        counted for sessions: 451s at end of data with a low limit).
        """
        def run():
            p = self.start(512, 512, admin={"endpoint": "tcp:%d:interface=127.0.0.1" % freePort()})
            output = self.stopped(p)
            # (512 - 100 deliveries - 64 admin connections - 64) / 2
            self.assertIn("the open-file limit is 512: this process can hold 142 connections at once", output)

        return inThread(run)

    def test_mainProcessCountsItsWorkers(self):
        """
        The main process, worker 0 of four, holds two descriptors for each
        other worker (its stdin pipe and its client-count channel), so it
        can hold 3 connections fewer within a hard limit of 200: 15, each
        other worker 18 (before: 18 for every one, and at 256 workers the
        main process was some 500 descriptors short of what it counted on).
        """
        def run():
            p = self.start(200, 200, workers=4)
            self.workersStarted(4)  # (each says what it can hold before)
            time.sleep(1.0)
            output = self.stopped(p)
            self.assertEqual(output.count("this process can hold 15 connections at once"), 1, output)
            self.assertEqual(output.count("this process can hold 18 connections at once"), 3, output)

        return inThread(run)

    def test_pastTheLimitClientsWait(self):
        """
        Within a hard limit of 200, 18 connections fit: then the gateway
        stops accepting, so the 19th client waits in the listen queue (no
        descriptor taken, nobody reset), the sessions held still get their
        spool files (before: 451 at the end of data, with a traceback), and
        the 19th is greeted as soon as one of them ends.
        """
        def run():
            p = self.start(200, 200)
            port = self.port
            time.sleep(0.5)  # (the probe of the port has gone)
            held = [Client(port) for _ in range(18)]
            try:
                self.assertEqual([c.reply()[0] for c in held], [220] * 18)
                # (the port stops accepting once the 18th is held)
                time.sleep(0.3)
                waiting = self.waitingClient(port, held)
                c = held[0]
                for line in ("EHLO x", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
                    self.assertEqual(c.cmd(line)[0], 250)
                self.assertEqual(c.cmd("DATA")[0], 354)
                c.send("Subject: fits\r\n\r\nx\r\n.\r\n")
                self.assertEqual(c.reply()[0], 250)
                self.assertEqual(c.cmd("QUIT")[0], 221)
                waiting.sock.settimeout(10)
                self.assertEqual(waiting.reply()[0], 220)
            finally:
                for c in held:
                    c.close()
            output = self.stopped(p)
            self.assertIn("holding 18 connections, all the open-file limit allows", output)
            self.assertIn("accepting connections again", output)
            self.assertNotIn("Traceback", output)
            self.assertNotIn("EMFILE", output)

        return inThread(run)

    def burst(self, clients, greeted):
        """
        C{clients} connect at once: C{greeted} of them are greeted, the
        others wait in the listen queue, and are greeted once the first
        ones have ended.
        """
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(clients)]
        try:
            time.sleep(1.0)
            first = []
            for c in socks:
                c.settimeout(0.2)
                try:
                    first.append(c.recv(100)[:3])
                except TimeoutError:
                    first.append(None)
            self.assertEqual((first.count(b"220"), first.count(None)), (greeted, clients - greeted), first)
            for c, greeting in zip(socks, first):
                if greeting is not None:
                    c.sendall(b"QUIT\r\n")
            later = []
            for c, greeting in zip(socks, first):
                if greeting is None:
                    c.settimeout(10)
                    later.append(c.recv(100)[:3])
            self.assertEqual(later, [b"220"] * (clients - greeted))
        finally:
            for c in socks:
                c.close()

    def test_aBurstPastTheBudgetWaits(self):
        """
        Within a hard limit of 200, 18 connections fit: of 30 clients that
        connect at once, 18 are greeted and the other 12 wait in the
        listen queue, each greeted once a session ends (before: Twisted
        accepted the whole burst in one go, and the gateway refused the
        12 with 421 4.7.0).
        """
        def run():
            p = self.start(200, 200)
            time.sleep(0.5)  # (the probe of the port has gone)
            self.burst(30, 18)
            output = self.stopped(p)
            self.assertNotIn("too many connections", output)
            self.assertNotIn("Traceback", output)

        return inThread(run)

    def test_pauseAtTheBudgetSaidOnce(self):
        """
        At the budget the listeners stop and start accepting again with
        each session that ends: the gateway says so once (as Postfix's
        master says a service reached its process limit at most every
        1000 s), not each time (before: 3 pairs of lines here, 134 pairs
        for 900 short sessions).
        """
        def run():
            p = self.start(200, 200)
            time.sleep(0.5)
            self.burst(30, 18)
            self.burst(30, 18)
            output = self.stopped(p)
            self.assertEqual(output.count("holding 18 connections, all the open-file limit allows"), 1, output)
            self.assertEqual(output.count("accepting connections again"), 1, output)

        return inThread(run)

    def test_aBurstFillsBothWorkers(self):
        """
        Two workers, max_connections = 3 each: of 10 clients that connect
        at once, 6 are greeted, whichever worker woke first, and 4 wait
        (before: the worker woken took the whole burst from the shared
        queue and refused all but 3 with 421 4.7.0).
        """
        def run():
            p = self.start(4096, 4096, workers=2, listener={"max_connections": 3})
            self.workersStarted()
            time.sleep(0.5)
            self.burst(10, 6)
            output = self.stopped(p)
            self.assertNotIn("too many connections", output)
            self.assertNotIn("Traceback", output)

        return inThread(run)

    def test_noDescriptorToAcceptLeavesClientsWaiting(self):
        """
        When C{accept} finds the process out of descriptors (its limit
        lowered under it), clients stay in the listen queue, and are
        greeted once descriptors are free again (before: Twisted closed
        every one waiting, unanswered, to recover).
        """
        import resource

        def run():
            p = self.start(200, 200)
            time.sleep(0.5)
            used = len(os.listdir("/proc/%d/fd" % p.pid))
            resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (used, 200))
            clients = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(10)]
            try:
                for c in clients:
                    c.settimeout(0.3)
                    self.assertRaises(TimeoutError, c.recv, 100)  # (not closed: b"")
                resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (200, 200))
                for c in clients:
                    c.settimeout(10)
                    self.assertEqual(c.recv(100)[:3], b"220")
            finally:
                for c in clients:
                    c.close()
            output = self.stopped(p)
            self.assertIn("no descriptor to accept a connection (EMFILE)", output)
            self.assertNotIn("EMFILE recovery", output)
            self.assertNotIn("Traceback", output)

        return inThread(run)

    def test_fullWorkerLeavesClientsToTheOther(self):
        """
        Two workers, max_connections = 3 each: six clients are greeted,
        whichever worker the kernel woke for them (a worker holding its 3
        stops accepting, and the other takes the client: before, the full
        one answered 421 while the other had room); the seventh waits in
        the listen queue, and is greeted once a session ends.
        """
        def run():
            p = self.start(4096, 4096, workers=2, listener={"max_connections": 3})
            port = self.port
            self.workersStarted()
            time.sleep(0.5)  # (the probe of the port has gone, the worker listens)
            held = []
            try:
                for _ in range(6):
                    held.append(Client(port))
                    self.assertEqual(held[-1].reply()[0], 220)
                    # (the worker that greeted it may now hold its 3: the next one goes to the other)
                    time.sleep(0.3)
                waiting = self.waitingClient(port, held)
                self.assertEqual(held[0].cmd("QUIT")[0], 221)
                waiting.sock.settimeout(10)
                self.assertEqual(waiting.reply()[0], 220)
            finally:
                for c in held:
                    c.close()
            output = self.stopped(p)
            self.assertNotIn("too many connections", output)
            self.assertNotIn("Traceback", output)

        return inThread(run)

    def test_budgetFollowsReloadedConcurrency(self):
        """
        A reload that raises C{[relay] concurrency} leaves room for its
        deliveries: within a hard limit of 200, 63 connections fit beside
        10 deliveries, and 18 beside 100, so once that reload is applied
        the 19th client waits (before: the budget stayed the one the
        gateway started with, and the deliveries ran it out of descriptors).
        """
        def run():
            p = self.start(200, 200, relay={"concurrency": 10})
            directory = os.path.dirname(self.conf)
            with open(self.conf, "w") as f:
                f.write(configText(directory, relay={"concurrency": 100}, listeners=({
                    "endpoint": "tcp:%d:interface=127.0.0.1" % self.port, "relay_networks": ["127.0.0.0/8"]},)))
            p.send_signal(signal.SIGHUP)
            time.sleep(3.0)  # (the reload judged and applied, also on a loaded machine)
            held = [Client(self.port) for _ in range(18)]
            try:
                self.assertEqual([c.reply()[0] for c in held], [220] * 18)
                time.sleep(0.3)
                self.waitingClient(self.port, held)
            finally:
                for c in held:
                    c.close()
            output = self.stopped(p)
            self.assertIn("can hold 18 connections at once", output)
            self.assertIn("holding 18 connections, all the open-file limit allows", output)

        return inThread(run)

    def test_proxyConnectionsBeforeTheirHeaderCount(self):
        """
        Connections a PROXY listener holds before their header take
        descriptors too: 18 of them fill the budget, and a client with its
        header waits until they have timed out (before: greeted at once,
        and a burst of such connections ran the process out of descriptors).
        """
        def run():
            p = self.start(200, 200, listener={"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"],
                                               "proxy_timeout": 2})
            port = self.port
            time.sleep(0.5)
            silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(18)]
            try:
                time.sleep(0.3)
                c = Client(port)
                c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
                c.sock.settimeout(1)
                self.assertRaises(TimeoutError, c.sock.recv, 100)
                c.sock.settimeout(10)
                self.assertEqual(c.reply()[0], 220)  # (once the silent ones were closed, after 2 s)
                c.close()
            finally:
                for s in silent:
                    s.close()
            self.assertNotIn("Traceback", self.stopped(p))

        return inThread(run)


class CPUAffinityTests(unittest.TestCase):
    """
    With at least one worker per CPU (or the CPUs listed) each worker is
    kept to one CPU, every thread of it but the disk thread, which runs on
    any of the workers' CPUs; with fewer workers, one, or when told not
    to, none is.  The CPUs the gateway may use are given as the
    main process passes them on to its workers (C{workers.CPUS_ENV}), so
    that the tests hold on a machine of any size.
    """

    def cpus(self, workers, process=None, given=None, spool=None):
        """
        Start the gateway, relay a few messages, and give each process's
        CPUs: {pid: (its main thread's, {each other thread's})}.
        """
        from relaygw.workers import CPUS_ENV

        directory, port, conf = _gatewayConfig(self, workers, process=process, spool=spool)
        env = dict(os.environ, **({CPUS_ENV: ",".join(map(str, given))} if given else {}))
        p = subprocess.Popen(twistdArgv(conf), cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        waitForPort(port)
        if workers > 1:  # (each worker has kept to its CPU by the time it holds its spool partition)
            self.assertTrue(waitUntil(lambda: len([n for n in spoolPids(directory) if n.startswith("w")]) == workers,
                                      20))
        for _ in range(4):  # (the threads a delivery starts are there too)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        pids = [p.pid] + childPids(p.pid)
        return pids, {pid: (frozenset(os.sched_getaffinity(pid)),
                            {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/%d/task" % pid)
                             if int(t) != pid})
                      for pid in pids}

    def assertKept(self, cpus, kept, shared):
        """
        Each process's main thread on its CPU (C{kept}: {pid: CPU}), its
        other threads there too or on the C{shared} CPUs, and a disk thread
        on those (one worker at least has relayed a message; with
        L{DISK_THREAD}).
        """
        for pid, cpu in kept.items():
            main, others = cpus[pid]
            self.assertEqual(main, frozenset([cpu]))
            self.assertLessEqual(others, {frozenset([cpu]), frozenset(shared)})
        self.assertIn(frozenset(shared), set().union(*(others for _, others in cpus.values())))

    def test_eachWorkerOnOneCPU(self):
        """Two workers for (at most) two CPUs: worker N on the Nth."""
        def run():
            allowed = sorted(os.sched_getaffinity(0))[:2]
            (main, worker), cpus = self.cpus(2, given=allowed, spool=DISK_THREAD)
            self.assertKept(cpus, {main: allowed[0], worker: allowed[1 % len(allowed)]}, allowed)

        return inThread(run)

    def test_listed(self):
        """Listed CPUs: worker N on the Nth listed, however many CPUs the gateway may use."""
        def run():
            allowed = sorted(os.sched_getaffinity(0))
            listed = [allowed[-1], allowed[0]]
            (main, worker), cpus = self.cpus(2, {"cpu_affinity": listed}, given=allowed + [max(allowed) + 1],
                                             spool=DISK_THREAD)
            self.assertKept(cpus, {main: listed[0], worker: listed[1]}, listed)

        return inThread(run)

    def test_leftToTheKernel(self):
        def run():
            allowed = frozenset(os.sched_getaffinity(0))
            # (the third CPU given need not exist: with fewer workers than CPUs none is kept)
            wide = sorted(allowed)[:2] + [max(allowed) + 1]
            for workers, process, given in ((2, {"cpu_affinity": False}, sorted(allowed)[:2]), (1, None, None),
                                            (2, None, wide)):
                pids, cpus = self.cpus(workers, process, given)
                self.assertEqual(len(pids), workers)
                for pid in pids:
                    main, others = cpus[pid]
                    self.assertEqual({main} | others, {allowed}, (workers, process, given))

        return inThread(run)

    def test_cannotKeepToACPU(self):
        """A CPU that cannot be had leaves the worker to the kernel, with one warning (and it starts all the same)."""
        from relaygw import workers

        before = os.sched_getaffinity(0)
        self.addCleanup(os.environ.pop, workers.CPUS_ENV, None)
        logs = LogCapture(self)
        for given, listed in (("not-a-list", True), ("99999", True), ("0", [99999])):
            os.environ[workers.CPUS_ENV] = given
            self.assertIsNone(workers.keepToOneCPU(0, 2, listed))
            self.assertEqual(os.sched_getaffinity(0), before)
        warnings = logs.find("left to run on any CPU", index=0)
        self.assertEqual(len(warnings), 3)
        self.assertEqual([type(e["error"]) for e in warnings], [ValueError, OSError, OSError])

    def test_fewerWorkersThanCPUs(self):
        """Fewer workers than CPUs: none kept, and the main process says so, once."""
        from relaygw import workers

        before = os.sched_getaffinity(0)
        self.addCleanup(os.environ.pop, workers.CPUS_ENV, None)
        logs = LogCapture(self)
        os.environ[workers.CPUS_ENV] = "0,1,2,3"
        self.assertIsNone(workers.keepToOneCPU(0, 3))
        self.assertIsNone(workers.keepToOneCPU(1, 3))
        self.assertEqual(os.sched_getaffinity(0), before)
        said = logs.find("workers left to run on any CPU")
        self.assertEqual([(e["workers"], e["cpus"]) for e in said], [(3, 4)])


class ClockStepTests(unittest.TestCase):
    """
    A step of the wall clock (NTP's first sync, an administrator's C{date})
    moves no timer: the reactor's run on the monotonic clock.  The gateway
    runs under twistd with a shim that steps its C{time.time} on request.
    """

    def gateway(self):
        directory, port, conf = _gatewayConfig(self, 1, listener={"idle_timeout": 3})
        self.stepFile = os.path.join(directory, "clock-step")
        shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clockstep")
        env = dict(os.environ, RELAYGW_TEST_CLOCK_STEP=self.stepFile,
                   PYTHONPATH=os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")])))
        p = subprocess.Popen(twistdArgv(conf), cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        waitForPort(port)
        c = Client(port, timeout=20)
        self.addCleanup(c.close)
        self.assertEqual(c.reply()[0], 220)
        self.assertEqual(c.cmd("EHLO x")[0], 250)
        return c

    def step(self, seconds):
        with open(self.stepFile + ".new", "w") as f:
            f.write(repr(seconds))
        os.rename(self.stepFile + ".new", self.stepFile)

    def test_backward(self):
        """An hour back: the idle session is still closed after its 3 s (before: not for an hour)."""
        def run():
            c = self.gateway()
            self.step(-3600)
            started = time.monotonic()
            code, lines = c.reply()
            self.assertEqual((code, lines[0].split()[0]), (421, "4.4.2"))
            self.assertIn("idle timeout", lines[0])
            self.assertLess(time.monotonic() - started, 10)

        return inThread(run)

    def test_forward(self):
        """An hour on: no timer fires early (before: the next reactor turn, here for a new connection, closed it)."""
        def run():
            c = self.gateway()
            self.step(3600)
            time.sleep(0.5)
            other = Client(c.sock.getpeername()[1])
            self.addCleanup(other.close)
            self.assertEqual(other.reply()[0], 220)
            time.sleep(0.5)
            self.assertEqual(c.cmd("NOOP")[0], 250)
            started = time.monotonic()
            self.assertEqual(c.reply()[0], 421)  # (the idle timeout, in its own time)
            self.assertGreater(time.monotonic() - started, 2)

        return inThread(run)


class _FakeTransport:
    def __init__(self, pid):
        self.pid = pid

    def signalProcess(self, name):
        pass


class _SpawningClock(task.Clock):
    """A clock whose spawnProcess fails while C{failing} is set (fork's EAGAIN, a full descriptor table)."""

    def __init__(self):
        task.Clock.__init__(self)
        self.spawned = []
        self.failing = False

    def spawnProcess(self, proto, executable, args, env=None, path=None, childFDs=None):
        if self.failing:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.spawned.append(proto)
        return _FakeTransport(1000 + len(self.spawned))


class RestartAfterAFailedSpawnTests(unittest.TestCase):
    """
    A worker that died is started again after a delay; when that start
    fails (fork refused: EAGAIN, ENOMEM; the main process out of
    descriptors), it is tried again later, with the back-off (it was
    never tried again: the worker was gone for good, and with it the
    delivery of its partition's messages).
    """

    def test_restartTriedAgain(self):
        clock = _SpawningClock()
        supervisor = WorkerSupervisor(clock, 2, ["/bin/true"])
        supervisor.startService()
        self.assertEqual(len(clock.spawned), 1)
        first = clock.spawned[0]
        first.processEnded(Failure(Exception("process ended by signal 9")))
        clock.failing = True
        logs = LogCapture(self)
        clock.advance(supervisor.restartDelay)
        self.assertEqual(len(logs.find("cannot start worker {index}: {error}; trying again in {delay}s")), 1)
        clock.failing = False
        for _ in range(120):  # two minutes, far past the longest back-off
            clock.advance(1)
        self.assertEqual(len(clock.spawned), 2, "worker 1 never started again after one failed start; "
                         "running workers: %r" % (sorted(supervisor.children),))
