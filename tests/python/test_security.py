#!/usr/bin/env python3
"""TLS, mutual TLS and bearer tokens seen by an independent client (Python grpcio), against the
real da-server with certificates that openssl makes at test time.

    test_security.py --server-binary build/bin/da-server --proto-dir proto

The server runs with --tls-cert, --tls-key, --tls-client-ca and --auth-token-file. A client with
the CA, a CA-signed client certificate and `authorization: Bearer <token>` metadata gets answers;
without the token AttentionService says UNAUTHENTICATED while health answers; without a client
certificate, or in plaintext, nothing connects (UNAVAILABLE).
"""

import os
import tempfile
import unittest

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import da_testing

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "proto_dir"))
STUB_DIR = tempfile.TemporaryDirectory(prefix="da-stubs-")
pb2, pb2_grpc = da_testing.generate_stubs(ARGS.proto_dir, STUB_DIR.name)

TOKEN = "py-token-4c0ffee"
TIMEOUT_S = 20.0


def make_certificates(folder):
    da_testing.make_certificates(folder)
    with open(os.path.join(folder, "tokens.txt"), "w") as f:
        f.write(f"# tokens\n{TOKEN}\n")


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="da-security-")
        make_certificates(cls.dir.name)
        path = lambda name: os.path.join(cls.dir.name, name)
        cls.server = da_testing.Server(ARGS.server_binary, [
            "--threads", "1", "--tls-cert", path("server.pem"), "--tls-key", path("server.key"),
            "--tls-client-ca", path("ca.pem"), "--auth-token-file", path("tokens.txt")]).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop_and_close()
        cls.dir.cleanup()

    def channel(self, client_certificate=True):
        folder = self.dir.name
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(folder, "ca.pem"),
            private_key=read(folder, "client.key") if client_certificate else None,
            certificate_chain=read(folder, "client.pem") if client_certificate else None)
        return grpc.secure_channel(f"localhost:{self.server.port}", credentials)

    def server_info(self, channel, metadata=()):
        stub = pb2_grpc.AttentionServiceStub(channel)
        return stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=TIMEOUT_S,
                                  metadata=metadata)

    def test_token_over_mutual_tls_is_answered(self):
        with self.channel() as channel:
            info = self.server_info(channel, [("authorization", f"Bearer {TOKEN}")])
            self.assertTrue(info.version)

    def test_without_token_unauthenticated_but_health_answers(self):
        with self.channel() as channel:
            for metadata in ((), [("authorization", "Bearer wrong-token")]):
                with self.assertRaises(grpc.RpcError) as raised:
                    self.server_info(channel, metadata)
                self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
                self.assertNotIn("wrong-token", raised.exception.details())
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service="da.v1.AttentionService"),
                                  timeout=TIMEOUT_S)
            self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)

    def test_no_client_certificate_or_plaintext_cannot_connect(self):
        metadata = [("authorization", f"Bearer {TOKEN}")]
        with self.channel(client_certificate=False) as channel:
            with self.assertRaises(grpc.RpcError) as raised:
                self.server_info(channel, metadata)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)
        with grpc.insecure_channel(self.server.address) as channel:
            with self.assertRaises(grpc.RpcError) as raised:
                self.server_info(channel, metadata)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
