"""relaygw-queue against the spool of a running gateway."""

import io
import json
import os
import subprocess
import sys

from twisted.internet import defer

from relaygw.scripts import queue as tool
from relaygw.testing import inThread
from tests.test_relay import RelayTestCase


class QueueToolTests(RelayTestCase):
    def run_(self, *argv):
        out = io.StringIO()
        code = tool.main(["--config", self.gw.path] + list(argv), out=out)
        return code, out.getvalue()

    @defer.inlineCallbacks
    def setUp(self):
        self.hop_, port = self.hop(rcpt={"b@example.net": "451 4.3.0 not now", "c@example.net": "451 4.3.0 not now"})
        yield self.gateway({"smarthosts": ["[127.0.0.1]:%d" % port], "retry_min": 300, "retry_max": 300})
        self.gw.service.queue.pollInterval = 0.2
        self.q1 = yield self.send(rcpts=("b@example.net",))
        self.q2 = yield self.send(rcpts=("c@example.net",), mailfrom="d@example.org")
        spool = self.gw.service.spool
        yield self.until(lambda: all(spool.readState(q).get("attempts") for q in (self.q1, self.q2)))

    def test_listAndShow(self):
        code, out = self.run_("list")
        self.assertEqual(code, 0)
        line = [l for l in out.splitlines() if l.startswith(self.q1)][0]
        self.assertIn("<a@example.org>", line)
        self.assertIn("<b@example.net>:deferred", line)
        self.assertIn("451 4.3.0 not now", line)
        self.assertIn("next=20", line)  # a date
        self.assertIn("2 message(s)", out)
        code, out = self.run_("show", self.q2)
        shown = json.loads(out)
        self.assertEqual(shown["envelope"]["mailfrom"], "d@example.org")
        self.assertEqual(shown["state"]["rcpts"]["c@example.net"]["status"], "deferred")

    @defer.inlineCallbacks
    def test_holdReleaseFlushDelete(self):
        self.assertEqual(self.run_("hold", self.q1)[0], 0)
        self.assertIn("next=held", self.run_("list")[1])
        self.hop_.rcpt.clear()  # the next hop recovers
        self.assertEqual(self.run_("flush")[0], 0)
        yield self.until(lambda: self.q2 not in self.gw.service.spool.queueIds())
        self.assertEqual(self.hop_.recipients(), ["c@example.net"])
        self.assertIn(self.q1, self.gw.service.spool.queueIds())  # held: not delivered
        self.assertEqual(self.run_("release", self.q1)[0], 0)
        yield self.until(lambda: self.q1 not in self.gw.service.spool.queueIds())
        self.assertEqual(sorted(self.hop_.recipients()), ["b@example.net", "c@example.net"])

    def test_delete(self):
        code, out = self.run_("delete", self.q1)
        self.assertEqual((code, out), (0, "deleted %s\n" % self.q1))
        self.assertNotIn(self.q1, self.gw.service.spool.queueIds())
        self.assertEqual(self.run_("show", self.q1)[0], 1)
        self.assertEqual(self.run_("delete", "../etc")[0], 1)

    def test_consoleScript(self):
        exe = os.path.join(os.path.dirname(sys.executable), "relaygw-queue")

        def run():
            return subprocess.run([exe, "--config", self.gw.path, "list"], capture_output=True, text=True,
                                  timeout=30)

        def check(p):
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(self.q1, p.stdout)
            self.assertIn("2 message(s)", p.stdout)

        return inThread(run).addCallback(check)
