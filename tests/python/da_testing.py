"""Shared helpers of the Python end-to-end tests: arguments, a real da-server on a loopback port,
the CLI, stubs generated from proto/ at test time, tensors on the wire, tolerances.

    args, rest = parse_args(needs=("server_binary", "proto_dir"))
    with Server(args.server_binary) as server:
        channel = open_channel(server.address)
        ...
        assert server.stop() == 0  # SIGTERM, then the exit code

Nothing here sleeps to wait: every wait polls a condition and gives up at a deadline.
"""

import argparse
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

# Tolerances of an output against the float64 reference: |got - want| <= atol + rtol * |want|.
# The server computes with at least fp32 accumulation, then rounds the output to the input dtype,
# so the bound is set by that rounding: fp32 a few ulps of accumulated error, fp16 half an ulp at
# 2^-11 relative plus the fp32 error, bf16 half an ulp at 2^-8 relative.
TOLERANCES = {
    "fp32": dict(atol=2e-5, rtol=2e-5),
    "fp16": dict(atol=2e-3, rtol=2e-3),
    "bf16": dict(atol=1.6e-2, rtol=1.6e-2),
}

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 256 << 20


def parse_args(needs=()):
    """Parses --server-binary, --client-binary, --proto-dir (or DA_SERVER_BINARY, DA_CLIENT_BINARY,
    DA_PROTO_DIR); the remaining arguments are left for unittest. Exits 2 when one in needs is
    missing."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--server-binary", default=os.environ.get("DA_SERVER_BINARY"))
    parser.add_argument("--client-binary", default=os.environ.get("DA_CLIENT_BINARY"))
    parser.add_argument("--proto-dir", default=os.environ.get("DA_PROTO_DIR"))
    args, rest = parser.parse_known_args()
    for name in needs:
        value = getattr(args, name)
        if not value:
            sys.exit(f"missing --{name.replace('_', '-')} (or DA_{name.upper()})")
        if not os.path.exists(value):
            sys.exit(f"--{name.replace('_', '-')} {value}: no such file or directory")
    return args, [sys.argv[0]] + rest


def run_unittest(argv):
    """Runs the unittest main of the calling module; exits 0 only when every test passed."""
    import unittest
    result = unittest.main(module="__main__", argv=argv, exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)


def wait_until(predicate, timeout_s, what, interval_s=0.02):
    """Polls predicate until it returns a truthy value and returns it; raises at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def free_port():
    """A loopback TCP port that was free a moment ago; nothing listens there (the CLI's
    unreachable-server cases). Servers under test pick their own ports instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A da-server process on 127.0.0.1 with ports chosen by the kernel: --listen 127.0.0.1:0 and,
    with metrics=True, --metrics-listen 127.0.0.1:0; both read back from --port-file and
    --metrics-port-file. Without metrics, /metrics is off (--metrics-listen "")."""

    def __init__(self, binary, extra_args=(), metrics=False):
        self.binary = binary
        self.extra_args = list(extra_args)
        self.metrics = metrics
        self.process = None
        self.port = None
        self.metrics_port = None
        self._dir = None
        self._log = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self._dir = tempfile.TemporaryDirectory(prefix="da-server-")
        port_file = os.path.join(self._dir.name, "port")
        metrics_port_file = os.path.join(self._dir.name, "metrics-port")
        self._log = open(os.path.join(self._dir.name, "server.log"), "w+b")
        command = [self.binary, "--listen", "127.0.0.1:0", "--port-file", port_file]
        if self.metrics:
            command += ["--metrics-listen", "127.0.0.1:0", "--metrics-port-file",
                        metrics_port_file]
        else:
            command += ["--metrics-listen", ""]
        self.process = subprocess.Popen(command + self.extra_args, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.port = wait_until(lambda: self._read_port(port_file), STARTUP_TIMEOUT_S,
                               "the server's --port-file")
        if self.metrics:
            self.metrics_port = wait_until(lambda: self._read_port(metrics_port_file),
                                           STARTUP_TIMEOUT_S, "the server's --metrics-port-file")
        return self

    def metric_values(self):
        """{series: value} of the server's /metrics (metrics=True), series as exposed
        (name{labels})."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                values[series] = float(value)
        return values

    def metric(self, series):
        return self.metric_values().get(series, 0.0)

    def answered_ok(self):
        """Attend and AttendStream calls the server answered OK so far (metrics=True)."""
        values = self.metric_values()
        return sum(values.get(f'da_requests_total{{code="OK",method="{method}"}}', 0.0)
                   for method in ("Attend", "AttendStream"))

    def _read_port(self, path):
        if self.process.poll() is not None:
            raise RuntimeError(f"da-server exited with {self.process.returncode} before "
                               f"serving:\n{self.log()}")
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        # Written once serving: the port, possibly as host:port. A partial write is retried.
        text = text.rsplit(":", 1)[-1]
        return int(text) if text.isdigit() and int(text) > 0 else None

    def log(self):
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def terminate(self):
        """Sends SIGTERM (the start of a graceful drain) without waiting."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s=STOP_TIMEOUT_S):
        """Waits for the process to exit; kills it and raises when it does not within timeout_s."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise TimeoutError(f"da-server did not exit within {timeout_s} s of SIGTERM:\n"
                               f"{self.log()}")

    def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.terminate()
        return self.wait(timeout_s)

    def stop_and_close(self):
        """SIGTERM; raises unless da-server exits 0. Always releases the process and its files."""
        try:
            code = self.stop()
            if code != 0:
                raise AssertionError(f"da-server exited with {code} after SIGTERM:\n{self.log()}")
        finally:
            self.close()

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class Forwarder:
    """A TCP forwarder on a loopback port standing for a load balancer: each connection it
    accepts goes to the port `route` names at that moment (change it as endpoints change);
    connections already made keep their backend.

        with Forwarder(server_a.port) as lb:
            client = da.Client(f"127.0.0.1:{lb.port}")
            ...
            lb.route = server_b.port   # server_a is no longer ready
    """

    def __init__(self, route):
        self.route = route
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # Closed.
            try:
                backend = socket.create_connection(("127.0.0.1", self.route))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, backend]
            for source, sink in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # Either side closed or reset: the other learns of it from its own socket.

    def close(self):
        # shutdown() first: close() alone wakes no thread blocked in accept() or recv().
        for sock in [self._listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # Not connected, or closed by its peer.
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_cli(binary, *args, timeout_s=CALL_TIMEOUT_S):
    """Runs da-client with args; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout_s)


EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def make_certificates(folder):
    """A CA (ca.pem, ca.key) and CA-signed server.pem/.key (for localhost and 127.0.0.1) and
    client.pem/.key in folder, made by openssl: EC P-256 keys, valid for two days."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-new", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=da-py-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, extensions in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                        "extendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        run("req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            f.write(extensions)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


def generate_stubs(proto_dir, out_dir):
    """Generates the Python messages and stubs of da/v1/attention.proto into out_dir and imports
    them. Returns (attention_pb2, attention_pb2_grpc).

    Only da.v1 is generated: the health stubs come from grpcio-health-checking, and a generated
    package named grpc would shadow grpcio itself.
    """
    command = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_dir}",
               f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
               os.path.join(proto_dir, "da", "v1", "attention.proto")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"grpc_tools.protoc failed:\n{done.stderr}")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("da.v1.attention_pb2"),
            importlib.import_module("da.v1.attention_pb2_grpc"))


def open_channel(address):
    import grpc
    return grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])


# --- Tensors -------------------------------------------------------------------------------

def round_to_bf16(x):
    """float32 values rounded to the nearest bfloat16 (ties to even), still as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def random_inputs(rng, batch, seq_len, heads, kv_heads, head_dim, dtype):
    """Fresh normal q, k, v as float32 arrays whose values the dtype represents exactly."""
    arrays = [rng.standard_normal((batch, seq_len, h, head_dim)).astype(np.float32)
              for h in (heads, kv_heads, kv_heads)]
    if dtype == "fp16":
        arrays = [a.astype(np.float16).astype(np.float32) for a in arrays]
    elif dtype == "bf16":
        arrays = [round_to_bf16(a) for a in arrays]
    return arrays


def to_bytes(values, dtype):
    """Little-endian bytes of float32 values (exactly representable in dtype) in that dtype."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "fp32":
        return values.astype("<f4").tobytes()
    if dtype == "fp16":
        return values.astype("<f2").tobytes()
    if dtype == "bf16":
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    raise ValueError(dtype)


def from_bytes(data, dtype, shape):
    """float32 array from little-endian bytes of dtype."""
    if dtype == "fp32":
        array = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif dtype == "fp16":
        array = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "bf16":
        array = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(dtype)
    return array.reshape(shape)


def assert_close(got, want, dtype, what):
    """Asserts |got - want| <= atol + rtol * |want| everywhere, with the dtype's tolerances."""
    tol = TOLERANCES[dtype]
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}")
    if not np.all(np.isfinite(got)):
        raise AssertionError(f"{what}: non-finite output at {np.argwhere(~np.isfinite(got))[:5]}")
    error = np.abs(got - want)
    bound = tol["atol"] + tol["rtol"] * np.abs(want)
    if np.any(error > bound):
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        raise AssertionError(
            f"{what}: {int(np.sum(error > bound))} of {error.size} elements outside "
            f"atol={tol['atol']} rtol={tol['rtol']}; worst at [b,n,h,d]={tuple(map(int, worst))}: "
            f"got {got[worst]:.8g}, want {want[worst]:.8g}")
