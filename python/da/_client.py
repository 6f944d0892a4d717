"""da.Client: unary and streamed attention calls, server info and health (see da/__init__.py)."""

from dataclasses import dataclass

import grpc
import numpy as np

from da import errors
from da.v1 import attention_pb2 as pb
from da.v1 import attention_pb2_grpc as pb_grpc

_MODES = {"longnet": pb.COMBINE_MODE_LONGNET, "grouped": pb.COMBINE_MODE_GROUPED}
_PRECISIONS = {"auto": pb.PRECISION_AUTO, "fp32": pb.PRECISION_FP32, "bf16": pb.PRECISION_BF16,
               "fp16": pb.PRECISION_FP16, "fp8": pb.PRECISION_FP8}
_PRECISION_NAMES = {value: name for name, value in _PRECISIONS.items()}
# A streamed block carries about this many bytes of q, k and v (as da-client's blocks).
_BLOCK_BYTES = 4 << 20
_DEFAULT_MESSAGE_BYTES = 64 << 20  # The server's default --max-message-bytes.


def _wire_dtype(dtype):
    """The wire dtype of a numpy dtype: float32, float16 or ml_dtypes' bfloat16."""
    if dtype == np.float32:
        return pb.DTYPE_FP32
    if dtype == np.float16:
        return pb.DTYPE_FP16
    if dtype.name == "bfloat16":
        return pb.DTYPE_BF16
    return None


@dataclass
class Result:
    """An output with how the server computed it (ExecutionInfo): `precision` used and `reason`,
    `devices`, `queue_time_s`, `compute_time_s`, `plan_cache_hit`, `request_id`, and `info`, the
    whole message."""
    output: np.ndarray
    info: pb.ExecutionInfo

    @property
    def precision(self):
        return _PRECISION_NAMES.get(self.info.precision_used, "auto")

    @property
    def reason(self):
        return self.info.precision_reason

    @property
    def devices(self):
        return list(self.info.devices)

    @property
    def queue_time_s(self):
        return self.info.queue_time_us / 1e6

    @property
    def compute_time_s(self):
        return self.info.compute_time_us / 1e6

    @property
    def plan_cache_hit(self):
        return self.info.plan_cache_hit

    @property
    def request_id(self):
        return self.info.request_id


class Client:
    """A connection to a da server.

    target: "host:port". TLS when any of tls_ca (PEM file of the CA that signed the server's
    certificate), tls_cert and tls_key (a client certificate for mutual TLS) is given; token: a
    bearer token sent with every call; timeout: the default deadline of each call in seconds
    (None: none); options: extra gRPC channel arguments. Thread safe, as a gRPC channel is.
    """

    def __init__(self, target, *, tls_ca=None, tls_cert=None, tls_key=None, token=None,
                 timeout=None, options=(), max_message_bytes=1 << 30):
        self._channel = _make_channel(grpc, target, tls_ca, tls_cert, tls_key, options,
                                      max_message_bytes)
        self._stub = pb_grpc.AttentionServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._message_limit = None  # The server's max_message_bytes, read once.

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, timeout, request_id=""):
        metadata = list(self._metadata)
        if request_id:
            metadata.append(("x-request-id", request_id))
        try:
            return method(request, timeout=timeout if timeout is not None else self._timeout,
                          metadata=metadata)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def info(self, timeout=None):
        """GetServerInfo: version, build features, devices, limits, plan-cache statistics."""
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    def health(self, service="", timeout=None):
        """grpc.health.v1 Check of service ("" liveness, "da.v1.AttentionService" readiness):
        "SERVING", "NOT_SERVING", ... (NOT_FOUND for an unknown service raises da.Error)."""
        check = self._channel.unary_unary("/grpc.health.v1.Health/Check")
        return _health_status(self._call(check, _health_request(service), timeout))

    def attend(self, q, k, v, *, segments, dilations, causal=False, mode="longnet",
               precision="auto", scale=None, stream=None, block_tokens=0, request_id="",
               priority=0, timeout=None, return_info=False):
        """Dilated attention of q over k and v (numpy [B, N, H, D] and [B, N, Hkv, D]).

        mode "longnet" or "grouped"; precision "auto", "fp32", "bf16", "fp16" or "fp8"; scale the
        softmax scale (default 1/sqrt(D)). stream None chooses: one message when q, k, v and the
        output fit the server's message limit, else AttendStream in blocks of block_tokens tokens
        (0: about 4 MiB, at most half the server's message limit). Returns the output (q's shape and dtype), or a Result with the
        execution info when return_info.
        """
        q, k, v, spec = _prepare(q, k, v, segments, dilations, causal, mode, precision, scale)
        limit = self._server_message_limit(timeout)
        if stream is None:
            stream = _wants_stream(q, k, v, limit)
        if stream:
            output, info = self._attend_stream(q, k, v, spec, _block_tokens(q, k, limit,
                                                                             block_tokens),
                                               request_id, priority, timeout)
        else:
            response = self._call(self._stub.Attend, _unary_request(q, k, v, spec, request_id,
                                                                    priority),
                                  timeout, request_id)
            output, info = _unary_output(q, response)
        return Result(output, info) if return_info else output

    def _server_message_limit(self, timeout):
        if self._message_limit is None:
            limit = self.info(timeout).limits.max_message_bytes
            self._message_limit = limit if limit > 0 else _DEFAULT_MESSAGE_BYTES
        return self._message_limit

    def _attend_stream(self, q, k, v, spec, block_tokens, request_id, priority, timeout):
        assembler = _OutputAssembler(q)
        answers = self._call(self._stub.AttendStream,
                             _stream_requests(q, k, v, spec, block_tokens, request_id, priority),
                             timeout, request_id)
        try:
            for message in answers:
                assembler.add(message)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        return assembler.finish()


def _make_channel(module, target, tls_ca, tls_cert, tls_key, options, max_message_bytes):
    """A channel of module (grpc or grpc.aio): TLS when any TLS file is given, messages up to
    max_message_bytes both ways."""
    channel_options = [("grpc.max_receive_message_length", max_message_bytes),
                       ("grpc.max_send_message_length", max_message_bytes), *options]
    if not (tls_ca or tls_cert or tls_key):
        return module.insecure_channel(target, options=channel_options)
    if bool(tls_cert) != bool(tls_key):
        raise errors.invalid("tls_cert and tls_key go together")

    def read(path):
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(root_certificates=read(tls_ca),
                                               private_key=read(tls_key),
                                               certificate_chain=read(tls_cert))
    return module.secure_channel(target, credentials, options=channel_options)


def _prepare(q, k, v, segments, dilations, causal, mode, precision, scale):
    """The arrays as numpy arrays and the spec, after the checks that need no server."""
    q, k, v = (np.asarray(t) for t in (q, k, v))
    spec = _check(q, k, v, segments, dilations, mode, precision)
    spec.causal = bool(causal)
    if scale is not None:
        spec.softmax_scale = float(scale)
    return q, k, v, spec


def _wants_stream(q, k, v, message_limit):
    """Whether q, k, v and the output are too large for one message (with room for framing)."""
    return q.nbytes + k.nbytes + v.nbytes + q.nbytes > 0.9 * message_limit


def _block_tokens(q, k, message_limit, block_tokens):
    """Tokens per streamed block: as asked, or about 4 MiB of q, k and v and never more than
    half a message."""
    if block_tokens > 0:
        return block_tokens
    token_bytes = q.shape[0] * (q.shape[2] + 2 * k.shape[2]) * q.shape[3] * q.itemsize
    return max(1, min(_BLOCK_BYTES, message_limit // 2) // token_bytes)


def _unary_request(q, k, v, spec, request_id, priority):
    return pb.AttendRequest(request_id=request_id, spec=spec, query=_tensor(q), key=_tensor(k),
                            value=_tensor(v), priority=priority)


def _unary_output(q, response):
    output = np.frombuffer(response.output.data, dtype=q.dtype).reshape(q.shape).copy()
    return output, response.info


def _health_request(service):
    """HealthCheckRequest{service = 1}, encoded here so that the client needs no health
    package."""
    encoded = service.encode()
    return b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""


def _health_status(answer):
    """The status of an encoded HealthCheckResponse{status = 1}."""
    status = answer[1] if len(answer) >= 2 and answer[0] == 0x08 else 0
    return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(
        status, str(status))


def _check(q, k, v, segments, dilations, mode, precision):
    """The server's checks that need no server, with its wording; the spec."""
    for name, tensor in (("query", q), ("key", k), ("value", v)):
        if tensor.ndim != 4:
            raise errors.invalid(f"{name}: expected rank 4 (batch, seq_len, heads, head_dim), "
                                 f"got shape {list(tensor.shape)}")
        if _wire_dtype(tensor.dtype) is None:
            raise errors.invalid(f"{name}: dtype {tensor.dtype} is not float32, float16 or "
                                 "bfloat16 (ml_dtypes)")
    for name, tensor in (("key", k), ("value", v)):
        if tensor.dtype != q.dtype:
            raise errors.invalid(f"{name} dtype {tensor.dtype} differs from query dtype "
                                 f"{q.dtype}")
        if (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (
                q.shape[0], q.shape[1], q.shape[3]):
            raise errors.invalid(f"{name} shape {list(tensor.shape)} must match query shape "
                                 f"{list(q.shape)} in batch, seq_len and head_dim")
    if v.shape != k.shape:
        raise errors.invalid(f"value shape {list(v.shape)} differs from key shape "
                             f"{list(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise errors.invalid(f"heads {q.shape[2]} is not a multiple of kv_heads {k.shape[2]}")
    segments, dilations = list(segments), list(dilations)
    if not segments or len(segments) != len(dilations):
        raise errors.invalid(f"spec: {len(segments)} segment lengths and {len(dilations)} "
                             "dilation rates; they must be equal in number and at least one")
    if mode not in _MODES:
        raise errors.invalid(f"mode '{mode}' is not longnet or grouped")
    if precision not in _PRECISIONS:
        raise errors.invalid(f"precision '{precision}' is not one of {sorted(_PRECISIONS)}")
    return pb.AttentionSpec(segment_lengths=[int(w) for w in segments],
                            dilation_rates=[int(r) for r in dilations],
                            combine_mode=_MODES[mode], precision=_PRECISIONS[precision])


def _stream_requests(q, k, v, spec, block_tokens, request_id, priority):
    """The AttendStream requests of q, k, v: the header, then blocks of block_tokens tokens."""
    batch, seq_len, heads, head_dim = q.shape
    yield pb.AttendStreamRequest(header=pb.StreamHeader(
        request_id=request_id, spec=spec, dtype=_wire_dtype(q.dtype), batch=batch,
        seq_len=seq_len, heads=heads, kv_heads=k.shape[2], head_dim=head_dim, priority=priority))
    for start in range(0, seq_len, block_tokens):
        end = min(seq_len, start + block_tokens)
        yield pb.AttendStreamRequest(block=pb.TokenBlock(
            token_start=start, token_count=end - start,
            query=np.ascontiguousarray(q[:, start:end]).tobytes(),
            key=np.ascontiguousarray(k[:, start:end]).tobytes(),
            value=np.ascontiguousarray(v[:, start:end]).tobytes()))


class _OutputAssembler:
    """Fills the output of a streamed answer as its blocks arrive (in order), keeps the trailer's
    execution info."""

    def __init__(self, q):
        self.output = np.empty(q.shape, dtype=q.dtype)
        self.info = None
        self.next_token = 0

    def add(self, message):
        kind = message.WhichOneof("kind")
        if kind == "block":
            block = message.block
            if block.token_start != self.next_token or block.token_count < 1:
                raise errors.Error(grpc.StatusCode.INTERNAL,
                                   f"output block at token {block.token_start}, expected "
                                   f"{self.next_token}")
            batch, _, heads, head_dim = self.output.shape
            rows = np.frombuffer(block.output, dtype=self.output.dtype)
            self.output[:, self.next_token:self.next_token + block.token_count] = rows.reshape(
                batch, block.token_count, heads, head_dim)
            self.next_token += block.token_count
        elif kind == "trailer":
            self.info = message.trailer.info

    def finish(self):
        seq_len = self.output.shape[1]
        if self.next_token != seq_len or self.info is None:
            raise errors.Error(grpc.StatusCode.INTERNAL,
                               f"stream ended after {self.next_token} of {seq_len} tokens")
        return self.output, self.info


def _tensor(array):
    return pb.Tensor(dtype=_wire_dtype(array.dtype), shape=list(array.shape),
                     data=np.ascontiguousarray(array).tobytes())


def _varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

