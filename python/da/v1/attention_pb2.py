"""The messages and enums of proto/da/v1/attention.proto, under the names protoc's Python
gencode gives them (pb.AttendRequest, pb.DType, pb.DTYPE_FP32, ...).

Written by hand, not generated: protoc's gencode checks at import that the protobuf runtime is no
older than the protoc that wrote it (google.protobuf.runtime_version), so a wheel built with a new
grpcio-tools would not import beside an older protobuf. Instead the build (python/setup.py) has
protoc write the proto's serialized FileDescriptorSet, attention.desc beside this file, and the
classes are made here from it at import with the runtime's own message factory, which every
protobuf the package supports (>= 4.21) has.

The descriptors live in a pool of their own rather than protobuf's default pool, so another copy
of these definitions imported elsewhere in the process (e.g. generated from the same proto)
cannot collide with them.
"""

import importlib.resources
import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

_PROTO = "da/v1/attention.proto"
_DESCRIPTOR_SET = "attention.desc"


def _read_descriptor_set():
    try:
        return importlib.resources.files(__package__).joinpath(_DESCRIPTOR_SET).read_bytes()
    except FileNotFoundError:
        raise ImportError(
            f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), _DESCRIPTOR_SET)} is "
            f"missing: the package's build (python/setup.py) generates it from proto/{_PROTO}, "
            "so import da as built (pip install ./python, or the wheel of python -m build "
            "--wheel python/; grpcio-tools builds it)") from None


def _load(serialized):
    """A new DescriptorPool holding every file of the FileDescriptorSet `serialized` (protoc
    writes a file's imports before it, the order the pool needs)."""
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(serialized).file:
        pool.AddSerializedFile(file.SerializeToString())
    return pool


def _message_classes(pool):
    """A function giving the class of a message descriptor of pool."""
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22.
        return message_factory.GetMessageClass
    # protobuf 4.21: a factory's GetPrototype (deprecated by GetMessageClass, later removed).
    return message_factory.MessageFactory(pool).GetPrototype


def _export(file, namespace):
    """Puts file's types into namespace as the gencode does: a class per top-level message
    (nested types are attributes of their class), an EnumTypeWrapper per top-level enum
    (pb.DType.Name(1), pb.DType.Value("DTYPE_FP32")), and each top-level enum's values as
    constants (pb.DTYPE_FP32). Returns the names put."""
    message_class = _message_classes(file.pool)
    names = []
    for name, descriptor in file.message_types_by_name.items():
        namespace[name] = message_class(descriptor)
        names.append(name)
    for name, descriptor in file.enum_types_by_name.items():
        namespace[name] = enum_type_wrapper.EnumTypeWrapper(descriptor)
        names.append(name)
        for value in descriptor.values:
            namespace[value.name] = value.number
            names.append(value.name)
    return names


_POOL = _load(_read_descriptor_set())
DESCRIPTOR = _POOL.FindFileByName(_PROTO)
__all__ = ["DESCRIPTOR", *_export(DESCRIPTOR, globals())]
