#!/usr/bin/env python3
"""Load smoke (issue #5): a real da-server (2 compute threads) under `da-client load` for 20 s at
concurrency 16 with the mixed mix and 10% malformed requests. Afterwards the server must be alive
and healthy, every answer must have been OK or the malformed request's expected code, every
request kind must have been answered, the server's peak RSS must stay under a bound derived from
the mix, and SIGTERM must make it exit 0.

    test_load.py --server-binary build/bin/da-server --client-binary build/bin/da-client
"""

import json
import subprocess
import unittest

import da_testing

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "client_binary"))

CONCURRENCY = 16
DURATION_S = 20
MALFORMED_FRACTION = 0.1
PLAN_CACHE_BYTES = 64 << 20
# Allocator arenas, gRPC's per-connection buffers and thread stacks: what a loaded server holds
# beyond the requests themselves and its plan cache.
SLACK_BYTES = 128 << 20
MIB = 1 << 20


def proc_status_bytes(pid, field):
    """A memory field of /proc/<pid>/status (given in kB) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def rss_bound(idle_rss, max_request_bytes):
    """The most a sound server may hold at its peak under this load.

    A call in flight holds at most twice its request bytes (q + k + v + output, as admission
    counts them): a unary call holds the received message and its parsed copy of q, k, v, plus the
    output and its serialised copy; a (collected) stream holds the assembled q, k, v and output
    plus a few blocks of about 4 MiB. At most CONCURRENCY calls are in flight (one per worker), so
    the requests account for CONCURRENCY * 2 * max_request_bytes (16 * 2 * 32 MiB = 1 GiB for the
    mixed mix, whose largest kind is a 16384-token fp32 stream). Plans live in the plan cache,
    bounded by --plan-cache-bytes (plus the plans of the computations running, a few MiB each,
    covered by the slack). A leak of every request's buffers would pass this within a few
    seconds of load.
    """
    return idle_rss + CONCURRENCY * 2 * max_request_bytes + PLAN_CACHE_BYTES + SLACK_BYTES


class LoadSmokeTest(unittest.TestCase):
    def test_mixed_load_with_malformed_requests(self):
        server = da_testing.Server(ARGS.server_binary, extra_args=[
            "--threads", "2", "--plan-cache-bytes", str(PLAN_CACHE_BYTES), "--log-level", "warn"])
        server.start()
        try:
            pid = server.process.pid
            idle_rss = proc_status_bytes(pid, "VmRSS")
            done = da_testing.run_cli(
                ARGS.client_binary, "load", "--server", server.address, "--concurrency",
                CONCURRENCY, "--duration-s", DURATION_S, "--mix", "mixed",
                "--malformed-fraction", MALFORMED_FRACTION, "--json", timeout_s=DURATION_S + 60)
            self.assertIsNone(server.process.poll(),
                              f"da-server died under load:\n{server.log()[-4000:]}")
            peak_rss = proc_status_bytes(pid, "VmHWM")

            self.assertIn(done.returncode, (0, 1), f"da-client load failed: {done.stderr}")
            report = json.loads(done.stdout)
            self.check_report(report, done)
            self.check_still_serving(server)

            bound = rss_bound(idle_rss, report["max_request_bytes"])
            print(f"server RSS: idle {idle_rss / MIB:.0f} MiB, peak {peak_rss / MIB:.0f} MiB, "
                  f"bound {bound / MIB:.0f} MiB; {report['sent']} requests, "
                  f"{report['requests_per_s']:.1f}/s, p50 {report['latency_ms']['p50']:.0f} ms, "
                  f"p99 {report['latency_ms']['p99']:.0f} ms")
            self.assertLess(peak_rss, bound,
                            f"server peak RSS {peak_rss / MIB:.0f} MiB over the bound "
                            f"{bound / MIB:.0f} MiB derived from the mix")
        finally:
            server.stop_and_close()  # SIGTERM; raises unless the exit code is 0.

    def check_report(self, report, done):
        samples = json.dumps(report.get("unexpected_samples"), indent=1)
        self.assertEqual(report["unexpected_errors"], 0, f"unexpected answers: {samples}")
        self.assertEqual(done.returncode, 0, f"exit {done.returncode} with no unexpected errors")
        self.assertEqual(report["concurrency"], CONCURRENCY)
        self.assertGreaterEqual(report["elapsed_s"], DURATION_S)
        self.assertEqual(report["sent"], report["completed"] + report["expected_errors"])
        # Every answer was OK or the malformed requests' INVALID_ARGUMENT, and nothing else.
        self.assertEqual(set(report["codes"]), {"OK", "INVALID_ARGUMENT"}, report["codes"])
        for code, counts in report["codes"].items():
            self.assertEqual(counts["unexpected"], 0, code)
        # Each kind was answered: well-formed ones OK, malformed ones with their code.
        kinds = report["kinds"]
        self.assertGreaterEqual(sum(not k["malformed"] for k in kinds.values()), 5)
        self.assertGreaterEqual(sum(k["malformed"] for k in kinds.values()), 9)
        for name, kind in kinds.items():
            with self.subTest(kind=name):
                if kind["malformed"]:
                    self.assertEqual(kind["expected_code"], "INVALID_ARGUMENT")
                    self.assertGreater(kind["expected_errors"], 0)
                    self.assertEqual(kind["ok"], 0)
                else:
                    self.assertGreater(kind["ok"], 0)
                    self.assertEqual(kind["expected_errors"], 0)
        self.assertTrue(any(k["stream"] and not k["malformed"] and k["ok"] for k in kinds.values()))
        self.assertTrue(any(not k["stream"] and k["ok"] for k in kinds.values()))
        # About the requested share of malformed requests (taken in turn, drawn at random).
        share = report["expected_errors"] / report["sent"]
        self.assertLess(abs(share - MALFORMED_FRACTION), 0.08, share)

    def check_still_serving(self, server):
        for service in ("", "da.v1.AttentionService"):
            health = da_testing.run_cli(ARGS.client_binary, "health", "--server", server.address,
                                        "--service", service)
            self.assertEqual((health.returncode, health.stdout.strip()), (0, "SERVING"),
                             f"health of '{service}' after load: {health.stderr}")
        # And it still computes.
        done = da_testing.run_cli(ARGS.client_binary, "random", "--server", server.address,
                                  "--seq-len", 512, "--heads", 4, "--head-dim", 32, "--segments",
                                  "128,256", "--dilations", "1,2", "--json")
        self.assertEqual(done.returncode, 0, done.stderr)


class LoadBehindABalancerTest(unittest.TestCase):
    def test_renewed_connections_reach_a_replica_added_during_the_run(self):
        # `da-client load` through a load balancer (a forwarder whose new connections go to a
        # replica added once the run has started, as a Kubernetes Service does after a
        # scale-up): without --max-connection-age-ms the run keeps its first connections and the
        # added replica sees none of its calls; with it, the renewed connections go there.
        with da_testing.Server(ARGS.server_binary, ["--threads", "1"], metrics=True) as first, \
                da_testing.Server(ARGS.server_binary, ["--threads", "1"],
                                  metrics=True) as added, \
                da_testing.Forwarder(first.port) as balancer:
            for age_ms in (0, 300):
                with self.subTest(age_ms=age_ms):
                    balancer.route = first.port
                    on_first, on_added = first.answered_ok(), added.answered_ok()
                    load = subprocess.Popen(
                        [ARGS.client_binary, "load", "--server", f"127.0.0.1:{balancer.port}",
                         "--concurrency", "2", "--channels", "2", "--duration-s", "3",
                         "--max-connection-age-ms", str(age_ms), "--json"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    try:
                        # The run has made its connections (each checked before the first call).
                        da_testing.wait_until(lambda: first.answered_ok() > on_first, 30,
                                              "the run's first answer")
                        balancer.route = added.port
                        out, err = load.communicate(timeout=60)
                    finally:
                        if load.poll() is None:
                            load.kill()
                            load.wait()
                    self.assertEqual(load.returncode, 0, err)
                    report = json.loads(out)
                    self.assertEqual(report["unexpected_errors"], 0, report["unexpected_samples"])
                    self.assertEqual(report["max_connection_age_ms"], age_ms)
                    reached = added.answered_ok() - on_added
                    print(f"age {age_ms} ms: {report['completed']} answers, "
                          f"{report['connections_renewed']} connections renewed, "
                          f"{reached:.0f} answers from the added replica")
                    if age_ms == 0:
                        self.assertEqual(report["connections_renewed"], 0)
                        self.assertEqual(reached, 0)
                    else:
                        # Two channels, each renewed every 270-300 ms of its 3 s (about 20 in
                        # all; at least 4 with calls slowed down by a loaded machine).
                        self.assertGreaterEqual(report["connections_renewed"], 4)
                        self.assertGreater(reached, report["completed"] / 2)


class LoadUsageTest(unittest.TestCase):
    def test_bad_flags_exit_2_with_one_line(self):
        for args, message in (
                (["--mix", "huge"], "--mix: 'huge' is not small, mixed or large"),
                (["--malformed-fraction", "2"], "--malformed-fraction is 2; must be in [0, 1]"),
                (["--expect-codes", "NOPE"], "--expect-codes: 'NOPE' is not a gRPC status code"),
                (["--transport", "pigeon"], "--transport: 'pigeon' is not auto, unary or stream"),
                (["--max-connection-age-ms", "-1"],
                 "--max-connection-age-ms is -1; must be in [0, 31536000000]")):
            with self.subTest(args=args):
                done = da_testing.run_cli(ARGS.client_binary, "load", *args)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertIn(message, done.stderr)
                self.assertEqual(done.stdout, "")

    def test_no_server_exits_1(self):
        address = f"127.0.0.1:{da_testing.free_port()}"
        done = da_testing.run_cli(ARGS.client_binary, "load", "--server", address,
                                  "--duration-s", 1)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"server {address} does not answer: UNAVAILABLE", done.stderr)


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
