"""Builds the package `da`, generating da/v1's protobuf messages and gRPC stubs from the
repository's proto/ at build time (pip install ./python from a checkout)."""

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, os.pardir, "proto")


class BuildWithStubs(build_py):
    def run(self):
        out = os.path.join(HERE)  # da/v1/attention_pb2*.py land beside the package's code.
        os.makedirs(os.path.join(out, "da", "v1"), exist_ok=True)
        command = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO_DIR}",
                   f"--python_out={out}", f"--grpc_python_out={out}",
                   os.path.join(PROTO_DIR, "da", "v1", "attention.proto")]
        subprocess.run(command, check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
