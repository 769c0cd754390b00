"""
Files a test plants where the gateway reads: outside a spool (for the tests
that plant symbolic links in it), and FIFOs named for files it reads.
"""

import os
import threading


class OutsideFiles:
    """Files in C{self.outside} (a directory the test makes outside the spool), and checks on them."""

    def outsideFile(self, name, content):
        path = os.path.join(self.outside, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def assertContent(self, path, content):
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content)


def plantFIFO(case, path):
    """
    Make C{path} a FIFO for the test C{case}.  Were the gateway to read it,
    each read would wait for a writer: one comes after 10 s (so that the
    test ends, failing on its timing), and keeps coming until the cleanup.
    """
    os.mkfifo(path)
    done = threading.Event()
    case.addCleanup(done.set)

    def writer():
        if done.wait(10):
            return
        while not done.wait(0.1):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=writer, daemon=True).start()
