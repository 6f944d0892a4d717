"""Inputs and outputs: numpy arrays (float32, float16, ml_dtypes.bfloat16) or torch tensors
(float32, float16, bfloat16, on any device), seen as numpy arrays of their bytes on the host (bf16
as uint16; a strided input keeps its strides, its rows gathered as they are sent), and an output
given back in the input's kind, dtype and device.

torch is never imported here: a tensor is recognised through `sys.modules`, so the package works
without torch and costs nothing when torch is not used.
"""

import sys

import numpy as np

from da import errors
from da.v1 import attention_pb2 as pb

# The wire dtype of each accepted dtype name, and the numpy dtype its bytes are held in.
_WIRE = {"float32": pb.DTYPE_FP32, "float16": pb.DTYPE_FP16, "bfloat16": pb.DTYPE_BF16}
_RAW = {pb.DTYPE_FP32: np.float32, pb.DTYPE_FP16: np.float16, pb.DTYPE_BF16: np.uint16}


def _torch_of(value):
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(value, torch.Tensor) else None


class HostTensor:
    """A caller's tensor as a numpy array on the host (`raw`, bf16 as uint16), its wire dtype and
    how to give an output of the same kind back (`give_back`). `raw` is a view of the caller's
    array or CPU tensor, strides and all (not copied: a stream gathers each block's rows as it
    sends them), or a contiguous copy of a tensor on another device."""

    def __init__(self, name, value):
        torch = _torch_of(value)
        if torch is not None:
            self._init_torch(name, value, torch)
        else:
            self._init_numpy(name, value)
        self.shape = self.raw.shape
        self.nbytes = self.raw.nbytes

    def _init_numpy(self, name, value):
        array = np.asarray(value)
        self.dtype_name = str(array.dtype)
        # A non-native byte order has the same name: refused, the wire is little-endian.
        self.wire = _WIRE.get(array.dtype.name) if array.dtype.isnative else None
        self._check(name, array.ndim, array.shape, "float32, float16 or bfloat16 (ml_dtypes)")
        self.raw = array.view(_RAW[self.wire])  # Same item size: any strides.
        self.torch = None
        self.numpy_dtype = array.dtype

    def _init_torch(self, name, tensor, torch):
        self.dtype_name = str(tensor.dtype)
        self.wire = {torch.float32: pb.DTYPE_FP32, torch.float16: pb.DTYPE_FP16,
                     torch.bfloat16: pb.DTYPE_BF16}.get(tensor.dtype)
        self._check(name, tensor.dim(), tuple(tensor.shape),
                    "torch.float32, torch.float16 or torch.bfloat16")
        if tensor.requires_grad and torch.is_grad_enabled():
            raise errors.invalid(
                f"{name} requires grad, but da computes attention on a server, without "
                "gradients: call it under torch.no_grad() (or torch.inference_mode()), or pass "
                "tensors that do not require grad")
        self.torch = torch
        self.device = tensor.device
        self.torch_dtype = tensor.dtype
        host = tensor.detach()
        if host.device.type != "cpu":
            host = host.to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            host = host.view(torch.int16)
        self.raw = host.numpy().view(_RAW[self.wire])

    def _check(self, name, ndim, shape, accepted):
        if ndim != 4:
            raise errors.invalid(f"{name}: expected rank 4 (batch, seq_len, heads, head_dim), "
                                 f"got shape {list(shape)}")
        if self.wire is None:
            raise errors.invalid(f"{name}: dtype {self.dtype_name} is not {accepted}")

    def with_dtype(self, wire):
        """The output kind for an output in another dtype (a wire dtype): this tensor's kind
        (numpy or torch) and device, that dtype."""
        if wire == self.wire:
            return self
        out = object.__new__(HostTensor)
        out.shape, out.wire, out.torch = self.shape, wire, self.torch
        out.nbytes = self.raw.size * np.dtype(_RAW[wire]).itemsize
        if self.torch is None:
            if wire == pb.DTYPE_BF16:
                try:
                    import ml_dtypes  # noqa: PLC0415 (only numpy's bfloat16 output needs it)
                except ImportError:
                    raise errors.invalid("out_dtype bfloat16 for numpy inputs needs the ml_dtypes "
                                         "package (numpy has no bfloat16)") from None
                out.numpy_dtype = np.dtype(ml_dtypes.bfloat16)
            else:
                out.numpy_dtype = np.dtype(_RAW[wire])
            out.dtype_name = str(out.numpy_dtype)
        else:
            torch = self.torch
            out.device = self.device
            out.torch_dtype = {pb.DTYPE_FP32: torch.float32, pb.DTYPE_FP16: torch.float16,
                               pb.DTYPE_BF16: torch.bfloat16}[wire]
            out.dtype_name = str(out.torch_dtype)
        return out

    def same_kind(self, other):
        return self.wire == other.wire and (self.torch is None) == (other.torch is None)

    def empty(self, shape):
        """A host array for an output of this tensor's dtype (raw)."""
        return np.empty(shape, dtype=_RAW[self.wire])

    def give_back(self, raw):
        """raw (a host array of this dtype's bytes) as the caller's kind, dtype and device."""
        if self.torch is None:
            return raw.view(self.numpy_dtype)
        torch = self.torch
        if self.wire == pb.DTYPE_BF16:
            tensor = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(raw)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)


class Output:
    """Where an output lands: `raw`, a host array filled block by block, and `result()`, what the
    caller gets. `query` is the output's kind: the query's, or HostTensor.with_dtype's for an
    output dtype of its own. With `out` (an array or tensor of that shape and dtype) the output
    is written there: in place for numpy and for C-contiguous CPU tensors, else copied once at
    the end (a GPU tensor)."""

    def __init__(self, query, out=None):
        self._query = query
        self._out = out
        if out is None:
            self.raw = query.empty(query.shape)
            return
        torch = _torch_of(out)
        if torch is not None:
            self._init_torch_out(out, torch)
        else:
            if not isinstance(out, np.ndarray):
                raise errors.invalid(f"out: expected a numpy array or torch tensor, got "
                                     f"{type(out).__name__}")
            # Any strides: the output is written into its rows by slices.
            self._check_out(out.shape, str(out.dtype), out.flags.writeable)
            self.raw = out.view(_RAW[query.wire])
        self._in_place = True

    def _init_torch_out(self, out, torch):
        self._check_out(tuple(out.shape), str(out.dtype), True)
        if out.requires_grad and torch.is_grad_enabled():
            raise errors.invalid(
                "out requires grad, but da writes it in place, without gradients: call it under "
                "torch.no_grad() (or torch.inference_mode()), or pass an out that does not "
                "require grad")
        self._in_place = out.device.type == "cpu" and out.is_contiguous()
        if self._in_place:
            host = out.detach()  # The same memory; numpy() refuses a tensor requiring grad.
            host = host.view(torch.int16) if out.dtype == torch.bfloat16 else host
            self.raw = host.numpy().view(_RAW[self._query.wire])
        else:
            self.raw = self._query.empty(self._query.shape)

    def _check_out(self, shape, dtype_name, usable):
        query = self._query
        if tuple(shape) != tuple(query.shape) or dtype_name != query.dtype_name:
            raise errors.invalid(f"out: shape {list(shape)} and dtype {dtype_name}, expected the "
                                 f"query's shape {list(query.shape)} and the output's dtype "
                                 f"{query.dtype_name}")
        if not usable:
            raise errors.invalid("out: must be writeable")

    def result(self):
        if self._out is None:
            return self._query.give_back(self.raw)
        if not self._in_place:
            self._out.copy_(self._query.give_back(self.raw))
        return self._out
