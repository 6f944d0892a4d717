"""Builds the package `da`. At build time protoc (grpcio-tools) writes the serialized
FileDescriptorSet of the repository's proto/da/v1/attention.proto to da/v1/attention.desc, which
the wheel ships; da/v1/attention_pb2.py makes the message classes from it at import.

No protoc gencode is shipped: protoc's Python messages refuse to import under a protobuf older
than the protoc that wrote them, and grpcio-tools' stubs under a grpcio older than itself, while
the package supports protobuf >= 4.21 and grpcio >= 1.51 (the gRPC stub is da/_stub.py).
"""

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, os.pardir, "proto")
PROTO = os.path.join("da", "v1", "attention.proto")
DESCRIPTOR_SET = os.path.join("da", "v1", "attention.desc")
# Gencode that earlier builds wrote beside the package (and into build/lib): never shipped now.
STALE = [os.path.join("da", "v1", "attention_pb2_grpc.py")]


class BuildWithDescriptorSet(build_py):
    """build_py that first writes da/v1/attention.desc (protoc --descriptor_set_out) and removes
    the gencode earlier builds left, so that package data and build/lib hold no stale stub."""

    def run(self):
        if not os.path.isfile(os.path.join(PROTO_DIR, PROTO)):
            raise SystemExit(f"{os.path.join(PROTO_DIR, PROTO)} is missing: the package is built "
                             "from a checkout, beside the repository's proto/")
        # --include_imports: the set holds the proto's imports too (none today), imports first.
        out = os.path.join(HERE, DESCRIPTOR_SET)
        command = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO_DIR}",
                   "--include_imports", f"--descriptor_set_out={out}",
                   os.path.join(PROTO_DIR, PROTO)]
        subprocess.run(command, check=True)
        for stale in STALE:
            for root in (HERE, self.build_lib):
                if os.path.exists(os.path.join(root, stale)):
                    os.remove(os.path.join(root, stale))
        super().run()


setup(cmdclass={"build_py": BuildWithDescriptorSet})
