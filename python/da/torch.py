"""da.torch.DilatedAttention: a torch.nn.Module that computes dilated attention on a da server,
a drop-in for the DilatedAttention module of dilated-attention-pytorch at inference.

    import torch
    from da.torch import DilatedAttention

    attention = DilatedAttention([2048, 4096, 8192], [1, 2, 4], client="localhost:50051")
    with torch.no_grad():
        out = attention(q, k, v, is_causal=True)  # [batch, seq_len, heads, head_dim]

Its default mode is GROUPED, that module's semantics (docs/MATH.md): head group i runs pattern
i, and the output is divided by the number of patterns. Unlike that module, the sequence need
not be a multiple of the segment lengths (a partial last segment is attended as it is), and key
and value may have fewer heads than the query (grouped-query attention).

Inference only: the server computes no gradients. Tensors that require grad are refused unless
gradients are off (torch.no_grad(), torch.inference_mode()); dropout other than 0 is refused.
Tensors on a GPU are moved to the host for the call and the output is put back on their device,
in their dtype.
"""

import torch

from da import _client

_DEFAULT_TARGET = "localhost:50051"


class DilatedAttention(torch.nn.Module):
    """Dilated attention on a da server.

    segment_lengths, dilation_rates: the patterns (w_i, r_i); softmax_scale: default
    1/sqrt(head_dim); attention_dropout: must be 0 (inference); op: must be None (accepted for
    the signature of dilated-attention-pytorch's module). mode: "grouped" (default) or
    "longnet"; client: a da.Client or a target "host:port" (default localhost:50051);
    precision, stream and parallel_streams: as da.Client.attend; timeout: seconds per call
    (None: the client's default).
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None,
                 attention_dropout=0.0, op=None, *, mode="grouped", client=None,
                 precision="auto", stream=None, parallel_streams=1, timeout=None):
        super().__init__()
        # The same checks as a request's, now rather than at the first forward.
        spec = _client._spec(segment_lengths, dilation_rates, False, mode, precision,
                             softmax_scale)
        if attention_dropout != 0:
            raise ValueError(f"attention_dropout {attention_dropout}: da computes inference "
                             "only, without dropout; use 0")
        if op is not None:
            raise ValueError("op: da computes on its server; an xformers op does not apply")
        self.segment_lengths = list(spec.segment_lengths)
        self.dilation_rates = list(spec.dilation_rates)
        self.softmax_scale = softmax_scale
        self.mode = mode
        self.precision = precision
        self.stream = stream
        self.parallel_streams = _client._check_parallel_streams(parallel_streams)
        self.timeout = timeout
        self.client = client if isinstance(client, _client.Client) else _client.Client(
            client or _DEFAULT_TARGET)

    def forward(self, query, key, value, is_causal=False):
        """query [batch, seq_len, heads, head_dim], key and value [batch, seq_len, kv_heads,
        head_dim], one dtype (float32, float16, bfloat16), on one device. Returns the output
        with the query's shape, dtype and device."""
        return self.client.attend(query, key, value, segments=self.segment_lengths,
                                  dilations=self.dilation_rates, causal=is_causal,
                                  mode=self.mode, precision=self.precision,
                                  scale=self.softmax_scale, stream=self.stream,
                                  parallel_streams=self.parallel_streams, timeout=self.timeout)

    def extra_repr(self):
        """The patterns, scale, mode and precision, as print(module) shows them."""
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"softmax_scale={self.softmax_scale}, mode={self.mode!r}, "
                f"precision={self.precision!r}")
