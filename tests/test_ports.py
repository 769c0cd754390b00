"""The test port helper: ports no other test process or the kernel hands out."""

import os
import socket

from twisted.trial import unittest

from relaygw.testing import freePort


class FreePortTests(unittest.TestCase):
    def test_distinctAndBelowEphemeral(self):
        """Ports come from below the kernel's ephemeral range and are not repeated."""
        ports = [freePort() for _ in range(50)]
        self.assertEqual(len(set(ports)), 50)
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        self.assertTrue(all(10000 <= p < low for p in ports), ports)

    def test_workerBlock(self):
        """A trial worker (working directory named after its number) has a block of its own."""
        name = os.path.basename(os.getcwd())
        port = freePort()
        if name.isdigit():
            self.assertEqual((port - 10000) // 2000, int(name))
        else:
            self.assertGreaterEqual((port - 10000) // 2000, 8)

    def test_skipsPortsInUse(self):
        """A port something is bound to is passed over (ports are handed out in turn)."""
        port = freePort()
        while (port - 10000) % 2000 > 1990:
            port = freePort()
        taken = []
        try:
            for p in (port + 1, port + 2):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", p))
            self.assertEqual(freePort(), port + 3)
        finally:
            for s in taken:
                s.close()
