"""
A throwaway Postfix (L{PostfixInstance}) with its own configuration and
queue, for interop tests and the benchmark.  Its master.cf is
L{POSTFIX_MASTER_CF}, read at each start: a caller that needs more
services (the benchmark adds tlsmgr) changes it here, in this module.
"""

import os
import signal
import subprocess
import time

from relaygw.testing.client import waitForPort


POSTFIX_MASTER_CF = """\
127.0.0.1:%(port)d inet n - n - - smtpd
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
smtp      unix  -  -  n  -     -  smtp
relay     unix  -  -  n  -     -  smtp
showq     unix  n  -  n  -     -  showq
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
anvil     unix  -  -  n  -     1  anvil
scache    unix  -  -  n  -     1  scache
postlog   unix-dgram n - n -   1  postlogd
"""


class PostfixInstance:
    """
    A throwaway Postfix (Debian's package) with its own config, queue and
    data directories under C{directory}, listening on 127.0.0.1:C{port} and
    relaying everything to C{relayhost}.  Started with C{postfix -c DIR start}.
    """

    def __init__(self, directory, port, relayhost, extra=None):
        self.directory = os.path.abspath(directory)
        self.port = port
        self.conf = os.path.join(self.directory, "conf")
        self.maillog = os.path.join(self.directory, "maillog")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(self.directory, "queue"),
            "data_directory": os.path.join(self.directory, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            # 192.0.2.0/24: the documentation clients that tests forward with XCLIENT.
            "mynetworks": "127.0.0.0/8 192.0.2.0/24",
            "relay_domains": "",
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtp_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.directory,
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
            "smtpd_banner": "$myhostname ESMTP",
        }
        settings.update(extra or {})
        self.settings = settings

    def start(self):
        import grp
        import pwd

        for d in (self.conf, self.settings["data_directory"], self.settings["queue_directory"]):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.directory, 0o755)
        os.chown(self.settings["data_directory"], pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write("".join("%s = %s\n" % kv for kv in self.settings.items()))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF % {"port": self.port})
        subprocess.run(["/usr/sbin/postfix", "-c", self.conf, "start"], check=True, capture_output=True, timeout=60)
        waitForPort(self.port)

    def stop(self):
        """C{postfix stop}; a master still there 10 s later (ours: its pid file) is killed, and so its children."""
        subprocess.run(["/usr/sbin/postfix", "-c", self.conf, "stop"], capture_output=True, timeout=60)
        pidfile = os.path.join(self.settings["queue_directory"], "pid", "master.pid")
        deadline = time.monotonic() + 10
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            with open(pidfile) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def log(self):
        try:
            with open(self.maillog) as f:
                return f.read()
        except FileNotFoundError:
            return ""
