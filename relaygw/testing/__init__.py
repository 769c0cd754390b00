"""
Public test helpers, one module per job:

  - L{relaygw.testing.gateway}: the TOML for a test gateway, a gateway in
    the test's reactor on loopback ports or as a C{twistd} child, and the
    Received header of what it delivered;
  - L{relaygw.testing.client}: a raw blocking SMTP client over a real
    socket, run in a thread, and loopback port helpers;
  - L{relaygw.testing.nexthop}: a scripted SMTP next hop;
  - L{relaygw.testing.postfix}: a throwaway Postfix (its master.cf
    template, C{POSTFIX_MASTER_CF}, is changed in that module);
  - L{relaygw.testing.harness}: one session without sockets on a
    StringTransport and task.Clock, where STARTTLS is a real TLS handshake
    in memory and a PROXY listener's connections start with a header
    through its wrapper;
  - L{relaygw.testing.memorysink}: a message sink in memory for it.

The public names are importable from here.
"""

from relaygw.testing.client import Client, freePort, inThread, waitForPort
from relaygw.testing.gateway import Gateway, configText, receivedHeader, runTwistd, tomlValue, twistdRunning
from relaygw.testing.harness import HarnessTransport, SessionClient, SessionHarness
from relaygw.testing.memorysink import MemorySink
from relaygw.testing.nexthop import ScriptedSMTPFactory, ScriptedSMTPServer
from relaygw.testing.postfix import PostfixInstance

__all__ = [
    "Client", "Gateway", "HarnessTransport", "MemorySink", "PostfixInstance", "ScriptedSMTPFactory",
    "ScriptedSMTPServer", "SessionClient", "SessionHarness", "configText", "freePort", "inThread",
    "receivedHeader", "runTwistd", "tomlValue", "twistdRunning", "waitForPort",
]
