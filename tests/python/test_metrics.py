#!/usr/bin/env python3
"""/metrics of a real da-server after traffic: clean under `promtool check metrics`, and the
metric families the README documents are there with values that follow the traffic.

    test_metrics.py --server-binary build/bin/da-server --client-binary build/bin/da-client
"""

import re
import shutil
import subprocess
import unittest
import urllib.error
import urllib.request

import da_testing

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "client_binary"))

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# Family name -> Prometheus type, as documented in README.md.
FAMILIES = {
    "da_requests_total": "counter",
    "da_request_duration_seconds": "histogram",
    "da_queue_duration_seconds": "histogram",
    "da_compute_duration_seconds": "histogram",
    "da_tokens_total": "counter",
    "da_in_flight_requests": "gauge",
    "da_request_bytes_total": "counter",
    "da_requests_rejected_total": "counter",
    "da_queue_length": "gauge",
    "da_engine_running_requests": "gauge",
    "da_memory_reserved_bytes": "gauge",
    "da_memory_budget_bytes": "gauge",
    "da_engine_runs_cancelled_total": "counter",
    "da_engine_runs_deadline_exceeded_total": "counter",
    "da_engine_stop_latency_seconds": "histogram",
    "da_device_info": "gauge",
    "da_device_memory_bytes": "gauge",
    "da_device_busy_seconds_total": "counter",
    "da_device_up": "gauge",
}


def parse_exposition(text):
    """Returns ({family: type}, [(name, {label: value}, float value)])."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            if not match:
                raise AssertionError(f"unparsable sample line: {line!r}")
            name, labels, value = match.groups()
            samples.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return types, samples


def total(samples, name, **labels):
    return sum(value for sample, sample_labels, value in samples if sample == name
               and all(sample_labels.get(k) == v for k, v in labels.items()))


def attend_ok_count(samples):
    return total(samples, "da_requests_total", method="Attend", code="OK")


class MetricsTest(unittest.TestCase):
    def test_metrics_after_traffic(self):
        promtool = shutil.which("promtool")
        self.assertIsNotNone(promtool, "promtool not on PATH (Debian package prometheus; "
                                       "scripts/install-deps installs it)")
        with da_testing.Server(ARGS.server_binary, metrics=True) as server:
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            batch, seq_len, repeat = 2, 512, 3
            traffic = [
                ["--repeat", repeat],
                ["--stream", "--dtype", "fp16", "--kv-heads", "2"],
            ]
            for extra in traffic:
                done = da_testing.run_cli(
                    ARGS.client_binary, "random", "--server", server.address, "--batch", batch,
                    "--seq-len", seq_len, "--heads", 4, "--head-dim", 16, "--segments", "128,256",
                    "--dilations", "1,2", *extra)
                self.assertEqual(done.returncode, 0, done.stderr)
            # One request the server rejects (dilation 8 > segment 4), counted under its code.
            done = da_testing.run_cli(
                ARGS.client_binary, "random", "--server", server.address, "--seq-len", 16,
                "--heads", 1, "--head-dim", 4, "--segments", "4", "--dilations", "8")
            self.assertNotEqual(done.returncode, 0, done.stdout)

            def scrape_after_traffic():
                try:
                    with urllib.request.urlopen(url, timeout=5) as answer:
                        text = answer.read().decode()
                except (urllib.error.URLError, ConnectionError):
                    return None
                # Metrics may be recorded just after the answer is sent: wait for all of them.
                return text if attend_ok_count(parse_exposition(text)[1]) >= repeat else None

            text = da_testing.wait_until(scrape_after_traffic, 30, f"{url} to count the traffic")

            check = subprocess.run([promtool, "check", "metrics"], input=text,
                                   capture_output=True, text=True, timeout=60)
            self.assertEqual(check.returncode, 0,
                             f"promtool check metrics:\n{check.stdout}{check.stderr}")

            types, samples = parse_exposition(text)
            self.assertTrue(any(line.startswith("da_requests_total{") and 'method="Attend"'
                                in line and 'code="OK"' in line for line in text.splitlines()))
            for family, kind in FAMILIES.items():
                with self.subTest(family=family):
                    self.assertEqual(types.get(family), kind, f"# TYPE of {family}")
            self.assertGreaterEqual(attend_ok_count(samples), repeat)
            self.assertGreaterEqual(
                total(samples, "da_requests_total", method="AttendStream", code="OK"), 1)
            tokens = batch * seq_len * (repeat + 1)
            self.assertGreaterEqual(total(samples, "da_tokens_total"), tokens)
            self.assertEqual(
                total(samples, "da_requests_total", method="Attend", code="INVALID_ARGUMENT"), 1)
            for family in ("da_queue_duration_seconds", "da_compute_duration_seconds"):
                self.assertGreaterEqual(total(samples, family + "_count"), repeat + 1, family)
            self.assertGreaterEqual(total(samples, "da_request_duration_seconds_count"),
                                    repeat + 1)
            directions = {labels.get("direction"): value for name, labels, value in samples
                          if name == "da_request_bytes_total"}
            self.assertEqual(len(directions), 2, f"da_request_bytes_total: {directions}")
            self.assertTrue(all(value > 0 for value in directions.values()), directions)
            self.assertEqual(total(samples, "da_in_flight_requests"), 0)
            self.assertEqual(
                total(samples, "da_requests_rejected_total", reason="invalid_argument"), 1)
            self.assertEqual(total(samples, "da_memory_reserved_bytes"), 0)
            self.assertGreater(total(samples, "da_memory_budget_bytes"), 0)  # The default.
            # The CPU is always a device: listed, up, with memory, and busy for the traffic above.
            infos = [labels for name, labels, value in samples
                     if name == "da_device_info" and value == 1]
            self.assertIn("cpu:0", [labels.get("device") for labels in infos], infos)
            cpu = next(labels for labels in infos if labels.get("device") == "cpu:0")
            self.assertEqual(cpu.get("kind"), "cpu", cpu)
            self.assertTrue(cpu.get("name") and cpu.get("capability"), cpu)
            self.assertEqual(total(samples, "da_device_up", device="cpu:0"), 1)
            self.assertGreater(total(samples, "da_device_memory_bytes", device="cpu:0"), 0)
            self.assertGreater(total(samples, "da_device_busy_seconds_total", device="cpu:0"), 0)
            self.assertEqual(server.stop(), 0, server.log())


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
