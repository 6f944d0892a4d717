#!/usr/bin/env python3
"""scripts/local-stack end to end: a real da-server scraped by a real Prometheus loading
deploy/prometheus's rules (every second here). Traffic through `da-client load`, then through
Prometheus' HTTP API: the target is up, da_requests_total grew, the recording rules have values
and no alert is pending or firing; then a burst of malformed requests makes DaHighErrorRatio
pending (its `for` of 5 minutes keeps it from firing within the test); every query of the Grafana
dashboard (deploy/grafana) is valid and has data.

    test_local_stack.py --client-binary build/bin/da-client --bin-dir build/bin
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
parser = argparse.ArgumentParser()
parser.add_argument("--client-binary", required=True)
parser.add_argument("--bin-dir", required=True)
ARGS, UNITTEST_ARGV = parser.parse_known_args()


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


class LocalStackTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="da-local-stack-")
        state = os.path.join(cls.tmp.name, "state")
        env = dict(os.environ, GRPC_PORT="0", METRICS_PORT="0", PROM_PORT="0", INTERVAL="1s",
                   STATE_FILE=state, BIN=ARGS.bin_dir)
        cls.log = open(os.path.join(cls.tmp.name, "stack.log"), "w+b")
        cls.stack = subprocess.Popen([os.path.join(ROOT, "scripts", "local-stack"), "--threads",
                                      "1"], env=env, stdout=cls.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_until(lambda: os.path.exists(state) or cls.stack.poll() is not None, 60,
                       "scripts/local-stack to start")
            if cls.stack.poll() is not None:
                raise AssertionError("local-stack ended: " + cls.stack_log())
            with open(state) as f:
                cls.state = dict(line.strip().split("=", 1) for line in f if "=" in line)
        except BaseException:
            cls.stop()
            raise

    @classmethod
    def stack_log(cls):
        cls.log.seek(0)
        return cls.log.read().decode(errors="replace")

    @classmethod
    def stop(cls):
        if cls.stack.poll() is None:
            os.killpg(cls.stack.pid, signal.SIGTERM)
            try:
                cls.stack.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(cls.stack.pid, signal.SIGKILL)
                cls.stack.wait()
        cls.log.close()
        cls.tmp.cleanup()

    @classmethod
    def tearDownClass(cls):
        cls.stop()

    def query(self, expr):
        """The instant vector of expr: [(labels, value)]."""
        url = (f"http://{self.state['prometheus']}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        self.assertEqual(body["status"], "success", body)
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def alerts(self):
        with urllib.request.urlopen(f"http://{self.state['prometheus']}/api/v1/alerts",
                                    timeout=10) as answer:
            return json.load(answer)["data"]["alerts"]

    def load(self, *extra):
        done = subprocess.run([ARGS.client_binary, "load", "--server", self.state["grpc"],
                               "--concurrency", "2", "--mix", "small", "--json", *extra],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, f"{done.args}: {done.stdout}\n{done.stderr}")
        return json.loads(done.stdout)

    def test_traffic_rules_and_an_error_burst(self):
        wait_until(lambda: self.query('up{job="da"} == 1'), 30, "the da target to be up")
        before = sum(v for _, v in self.query("sum(da_requests_total)")) if self.query(
            "sum(da_requests_total)") else 0.0
        self.load("--duration-s", "4")
        wait_until(lambda: [v for _, v in self.query("sum(da_requests_total)") if v > before + 10],
                   30, "da_requests_total to grow past the load's calls")
        # The recording rules have values: the request rate, the error ratio (0: all OK), the
        # latency quantile, throughput and queue time.
        for expr in ('da:requests:rate5m{method="Attend"} > 0',
                     'da:request_errors:ratio_rate5m{method="Attend"} == 0',
                     'da:request_duration_seconds:p99{method="Attend"} > 0',
                     "da:tokens:rate5m > 0", "da:queue_duration_seconds:p99 >= 0"):
            wait_until(lambda: self.query(expr), 30, f"recording rule: {expr}")
        self.assertEqual([a for a in self.alerts() if a["state"] in ("pending", "firing")], [],
                         "no alert on healthy traffic")
        # A burst of malformed requests: the error ratio rises past 5%, the alert is pending.
        self.load("--duration-s", "3", "--malformed-fraction", "1")
        pending = wait_until(
            lambda: [a for a in self.alerts()
                     if a["labels"]["alertname"] == "DaHighErrorRatio" and a["state"] == "pending"],
            30, "DaHighErrorRatio to be pending")
        # The burst's malformed requests go to whichever method the load's kinds use (unary and
        # streamed alike): every method the alert names has its error ratio past the threshold.
        for alert in pending:
            method = alert["labels"]["method"]
            self.assertIn(method, ("Attend", "AttendStream"), alert)
            ratio = self.query(f'da:request_errors:ratio_rate5m{{method="{method}"}}')
            self.assertGreater(ratio[0][1], 0.05, ratio)

        # Every query of the Grafana dashboard is valid PromQL here and has data after this
        # traffic (the dashboard's $job variable set to this stack's job).
        with open(os.path.join(ROOT, "deploy", "grafana", "da-dashboard.json")) as f:
            dashboard = json.load(f)
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$job", "da")
                with self.subTest(panel=panel["title"], expr=expr):
                    self.assertTrue(self.query(expr), f"no data for {expr}")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0]] + UNITTEST_ARGV, verbosity=2)
